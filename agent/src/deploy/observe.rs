//! `moderato observe`: what a policy would see, printed every interval, for operators checking a
//! host before deploying on it. Reads only; sets nothing.

use std::fmt::Write as _;

use moderato_env::live::{Control, InterfaceReport, LiveSample, Role};
use moderato_env::{ActionSpace, Feature, LayerId};

fn rate(pps: f64) -> String {
    if pps >= 1e6 {
        format!("{:.2} Mpps", pps / 1e6)
    } else if pps >= 1e3 {
        format!("{:.1} kpps", pps / 1e3)
    } else {
        format!("{pps:.0} pps")
    }
}

fn bits(bytes_per_s: f64) -> String {
    let b = bytes_per_s * 8.0;
    if b >= 1e9 {
        format!("{:.2} Gbit/s", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} Mbit/s", b / 1e6)
    } else {
        format!("{:.0} kbit/s", b / 1e3)
    }
}

fn per_s(x: Option<f64>) -> String {
    x.map_or("-".into(), |v| if v >= 1e3 { format!("{:.1}k/s", v / 1e3) } else { format!("{v:.0}/s") })
}

fn interface_line(r: &InterfaceReport) -> String {
    // Reports are in the interface's own direction; show a backend in the VM's.
    let (rx, tx, rxb, txb, irx, itx) = match r.layer {
        // A backend's interrupt lines are named from the guest's side already (netback).
        LayerId::Backend(_) => (
            r.rates.tx_pps,
            r.rates.rx_pps,
            r.rates.tx_bytes_per_s,
            r.rates.rx_bytes_per_s,
            r.rates.rx_irq_per_s,
            r.rates.tx_irq_per_s,
        ),
        _ => (
            r.rates.rx_pps,
            r.rates.tx_pps,
            r.rates.rx_bytes_per_s,
            r.rates.tx_bytes_per_s,
            r.rates.rx_irq_per_s,
            r.rates.tx_irq_per_s,
        ),
    };
    let knobs = r.params.map_or("knobs -".to_string(), |p| format!("knobs `{p}`"));
    let state = match &r.control {
        Control::Controlled => "controlled".to_string(),
        Control::ObserveOnly(_) => "observe-only".to_string(),
        Control::Unknown => "absent".to_string(),
    };
    let irq_src = if r.irq_lines.is_empty() {
        "no irq lines".to_string()
    } else {
        format!("{} irq lines by {}", r.irq_lines.len(), r.irq_found_by)
    };
    format!(
        "  {:<13} {:<12} rx {:>10} {:>12}  tx {:>10} {:>12}  irq rx {:>8} tx {:>8}  drops {:>6.0}/s  {knobs}  [{state}; {irq_src}]",
        r.layer.to_string(),
        r.ifname,
        rate(rx),
        bits(rxb),
        rate(tx),
        bits(txb),
        per_s(irx),
        per_s(itx),
        r.rates.drops_per_s,
    )
}

fn features(o: &mut String, title: &str, list: &[Feature], values: &[f32]) {
    let _ = write!(o, "  features {title}:");
    for (i, (f, v)) in list.iter().zip(values).enumerate() {
        if i % 6 == 0 {
            o.push_str("\n   ");
        }
        let _ = write!(o, " {}={v:.3}", f.name);
    }
    o.push('\n');
}

/// One interval as text: rates per interface, CPU, probe, the feature vectors the policy reads,
/// warnings.
pub fn render(role: Role, s: &LiveSample, space: &ActionSpace, vm_names: &[String]) -> String {
    let mut o = String::new();
    let secs = s.info.time_ns as f64 / 1e9;
    let _ = writeln!(
        o,
        "[{secs:8.2} s] interval {:.0} ms{}",
        s.obs.interval_ns as f64 / 1e6,
        if s.complete { "" } else { "  (incomplete: see warnings)" }
    );
    for r in &s.interfaces {
        let mut line = interface_line(r);
        if let LayerId::Backend(v) = r.layer
            && let Some(n) = vm_names.get(v)
        {
            line.push_str(&format!(" vm {n}"));
        }
        o.push_str(&line);
        o.push('\n');
    }
    let (cpu, probe) = match role {
        Role::Host => (s.obs.host.cpu, s.obs.host.probe),
        Role::Guest => s.obs.guests.first().map_or((Default::default(), None), |g| (g.cpu, g.probe)),
    };
    let _ = write!(o, "  cpu irq {:.1}% other {:.1}%", 100.0 * cpu.irq, 100.0 * cpu.other);
    match probe {
        Some(p) => {
            let _ =
                writeln!(o, "  probe p50 {:.0} us p99 {:.0} us ({} replies)", p.p50_us, p.p99_us, p.samples);
        }
        None => o.push_str("  probe -\n"),
    }
    match role {
        Role::Host => {
            features(&mut o, "host", moderato_env::HOST_FEATURES, &s.obs.host.features(space));
            for v in 0..s.obs.host.backends.len() {
                features(
                    &mut o,
                    &format!("vm{v} backend"),
                    moderato_env::BACKEND_FEATURES,
                    &s.obs.host.backend_features(space, v),
                );
            }
        }
        Role::Guest => {
            if let Some(g) = s.obs.guests.first() {
                features(&mut o, "guest", moderato_env::GUEST_FEATURES, &g.features(space));
            }
        }
    }
    for w in &s.info.warnings {
        let _ = writeln!(o, "  warning: {w}");
    }
    o
}
