//! Prometheus text metrics of the deploy loop, served by a small tokio TCP server that answers
//! `GET /metrics` (text exposition format 0.0.4).
//!
//! | metric | type | meaning |
//! |---|---|---|
//! | `moderato_knob{layer,interface,knob}` | gauge | knob in force, read back from the driver (ethtool's names: the interface's direction) |
//! | `moderato_adaptive{layer,interface,direction}` | gauge | 1 where the driver's adaptive moderation is on |
//! | `moderato_decided_knob{layer,interface,knob}` | gauge | the last decision after safety limits, VM direction (what a dry run would set) |
//! | `moderato_observe_only{layer,interface}` | gauge | 1 where the layer cannot be set |
//! | `moderato_decisions_total{policy}` | counter | decisions, by the policy that made them |
//! | `moderato_fallback_active` | gauge | 1 while the fallback policy decides |
//! | `moderato_fallbacks_total` | counter | switches to the fallback policy |
//! | `moderato_observation_age_seconds` | gauge | time since the last complete observation |
//! | `moderato_incomplete_observations_total` | counter | observations with missing readings |
//! | `moderato_errors_total` | counter | warnings: failed reads, refused knobs, vanished interfaces |
//! | `moderato_limited_total` | counter | decisions changed by the safety limits |
//! | `moderato_interface_{rx,tx}_pps{layer,interface}` | gauge | packet rates (VM direction) |
//! | `moderato_interface_irq_per_second{layer,interface}` | gauge | interrupt rate, where known |
//! | `moderato_probe_latency_microseconds{quantile}` | gauge | latency probe p50/p99 |
//! | `moderato_dry_run` | gauge | 1 in a dry run |

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use moderato_env::live::{InterfaceReport, LiveSample};
use moderato_env::{CoalescingSettings, Direction, LayerId, LayerSettings, Moderation};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Default)]
struct State {
    dry_run: bool,
    decisions: BTreeMap<String, u64>,
    fallback_active: bool,
    fallbacks: u64,
    incomplete: u64,
    errors: u64,
    limited: u64,
    last_complete: Option<Instant>,
    started: Option<Instant>,
    interfaces: Vec<InterfaceReport>,
    decided: Vec<(LayerId, String, LayerSettings)>,
    probe: Option<(f64, f64)>,
}

/// The deploy loop's counters and gauges, shared with the server.
#[derive(Debug, Default)]
pub struct Metrics {
    state: Mutex<State>,
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

impl Metrics {
    pub fn new(dry_run: bool) -> Arc<Self> {
        let m = Metrics::default();
        {
            let mut s = m.lock();
            s.dry_run = dry_run;
            s.started = Some(Instant::now());
        }
        Arc::new(m)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records one interval: what was observed, what was decided (after limits) for `layers`.
    pub fn record(
        &self,
        sample: &LiveSample,
        policy: &str,
        fallback_active: bool,
        safe: &CoalescingSettings,
        layers: &[(LayerId, String)],
        limited: bool,
    ) {
        let mut s = self.lock();
        *s.decisions.entry(policy.to_string()).or_default() += 1;
        s.fallback_active = fallback_active;
        s.errors += sample.info.warnings.len() as u64;
        if sample.complete {
            s.last_complete = Some(Instant::now());
        } else {
            s.incomplete += 1;
        }
        if limited {
            s.limited += 1;
        }
        s.interfaces = sample.interfaces.clone();
        s.decided = layers.iter().map(|(id, name)| (*id, name.clone(), *safe.layer(*id))).collect();
        let probe = match sample.obs.guests.first() {
            Some(g) if g.probe.is_some() => g.probe,
            _ => sample.obs.host.probe,
        };
        s.probe = probe.map(|p| (p.p50_us, p.p99_us));
    }

    pub fn fallback_switch(&self) {
        self.lock().fallbacks += 1;
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let s = self.lock();
        let mut o = String::new();
        let head = |o: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        head(&mut o, "moderato_knob", "gauge", "Coalescing knob in force, read back from the driver.");
        for r in &s.interfaces {
            if let Some(p) = r.params {
                for (knob, v) in [
                    ("rx_usecs", p.rx_usecs),
                    ("rx_frames", p.rx_frames),
                    ("tx_usecs", p.tx_usecs),
                    ("tx_frames", p.tx_frames),
                ] {
                    if let Some(v) = v {
                        let _ = writeln!(
                            o,
                            "moderato_knob{{layer=\"{}\",interface=\"{}\",knob=\"{knob}\"}} {v}",
                            r.layer,
                            esc(&r.ifname)
                        );
                    }
                }
            }
        }
        head(&mut o, "moderato_adaptive", "gauge", "1 where the driver's adaptive moderation is on.");
        for r in &s.interfaces {
            if let Some(p) = r.params {
                for (d, v) in [("rx", p.adaptive_rx), ("tx", p.adaptive_tx)] {
                    if let Some(v) = v {
                        let _ = writeln!(
                            o,
                            "moderato_adaptive{{layer=\"{}\",interface=\"{}\",direction=\"{d}\"}} {}",
                            r.layer,
                            esc(&r.ifname),
                            u8::from(v)
                        );
                    }
                }
            }
        }
        head(
            &mut o,
            "moderato_decided_knob",
            "gauge",
            "Last decision after safety limits (VM direction); adaptive directions are left out.",
        );
        for (id, name, l) in &s.decided {
            for dir in Direction::BOTH {
                if let Moderation::Fixed(k) = l.get(dir) {
                    for (what, v) in [("usecs", k.usecs), ("frames", k.frames)] {
                        let _ = writeln!(
                            o,
                            "moderato_decided_knob{{layer=\"{id}\",interface=\"{}\",knob=\"{}_{what}\"}} {v}",
                            esc(name),
                            dir.name()
                        );
                    }
                }
            }
        }
        head(&mut o, "moderato_observe_only", "gauge", "1 where the layer's knobs cannot be set.");
        for r in &s.interfaces {
            let _ = writeln!(
                o,
                "moderato_observe_only{{layer=\"{}\",interface=\"{}\"}} {}",
                r.layer,
                esc(&r.ifname),
                u8::from(r.control.is_observe_only())
            );
        }
        head(&mut o, "moderato_decisions_total", "counter", "Decisions, by the policy that made them.");
        for (p, n) in &s.decisions {
            let _ = writeln!(o, "moderato_decisions_total{{policy=\"{}\"}} {n}", esc(p));
        }
        let age = match (s.last_complete, s.started) {
            (Some(t), _) | (None, Some(t)) => t.elapsed(),
            _ => Duration::ZERO,
        };
        for (name, kind, help, v) in [
            (
                "moderato_fallback_active",
                "gauge",
                "1 while the fallback policy decides.",
                f64::from(u8::from(s.fallback_active)),
            ),
            ("moderato_fallbacks_total", "counter", "Switches to the fallback policy.", s.fallbacks as f64),
            (
                "moderato_observation_age_seconds",
                "gauge",
                "Time since the last complete observation.",
                age.as_secs_f64(),
            ),
            (
                "moderato_incomplete_observations_total",
                "counter",
                "Observations with missing readings.",
                s.incomplete as f64,
            ),
            (
                "moderato_errors_total",
                "counter",
                "Warnings: failed reads, refused knobs, vanished interfaces.",
                s.errors as f64,
            ),
            (
                "moderato_limited_total",
                "counter",
                "Decisions changed by the safety limits.",
                s.limited as f64,
            ),
            ("moderato_dry_run", "gauge", "1 in a dry run (nothing is set).", f64::from(u8::from(s.dry_run))),
        ] {
            head(&mut o, name, kind, help);
            let _ = writeln!(o, "{name} {v}");
        }
        head(&mut o, "moderato_interface_rx_pps", "gauge", "Packets per second towards the guest.");
        head(&mut o, "moderato_interface_tx_pps", "gauge", "Packets per second from the guest.");
        head(&mut o, "moderato_interface_irq_per_second", "gauge", "Interrupts per second, both directions.");
        for r in &s.interfaces {
            // Reports are in the interface's own direction; a backend's VM direction is swapped.
            let (rx, tx) = match r.layer {
                LayerId::Backend(_) => (r.rates.tx_pps, r.rates.rx_pps),
                _ => (r.rates.rx_pps, r.rates.tx_pps),
            };
            let labels = format!("layer=\"{}\",interface=\"{}\"", r.layer, esc(&r.ifname));
            let _ = writeln!(o, "moderato_interface_rx_pps{{{labels}}} {rx}");
            let _ = writeln!(o, "moderato_interface_tx_pps{{{labels}}} {tx}");
            if let Some(irq) = r.rates.irq_per_s() {
                let _ = writeln!(o, "moderato_interface_irq_per_second{{{labels}}} {irq}");
            }
        }
        head(
            &mut o,
            "moderato_probe_latency_microseconds",
            "gauge",
            "Latency probe percentiles over the last interval.",
        );
        if let Some((p50, p99)) = s.probe {
            let _ = writeln!(o, "moderato_probe_latency_microseconds{{quantile=\"0.5\"}} {p50}");
            let _ = writeln!(o, "moderato_probe_latency_microseconds{{quantile=\"0.99\"}} {p99}");
        }
        o
    }
}

/// Binds the metrics listener (before the loop starts, so a bad address fails at once).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("--metrics-addr {addr}: cannot listen there"))
}

/// Answers `GET /metrics` on `listener` until the runtime stops.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        match listener.accept().await {
            Ok((sock, _)) => {
                let m = metrics.clone();
                tokio::spawn(async move {
                    if let Err(e) = answer(sock, &m).await {
                        tracing::debug!("metrics connection: {e}");
                    }
                });
            }
            Err(e) => {
                tracing::warn!("metrics server: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn answer(sock: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    // Read the request head (without tokio's io-util: readiness plus try_read).
    let mut buf = Vec::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !buf.windows(4).any(|w| w == b"\r\n\r\n")
        && !buf.windows(2).any(|w| w == b"\n\n")
        && buf.len() < 8192
    {
        tokio::time::timeout_at(deadline, sock.readable())
            .await
            .map_err(|_| std::io::ErrorKind::TimedOut)??;
        let mut chunk = [0u8; 1024];
        match sock.try_read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    let head = String::from_utf8_lossy(&buf);
    let mut first = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
    let (status, ctype, body) = match (method, target.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", metrics.render()),
        ("GET", "/") => {
            ("200 OK", "text/plain; charset=utf-8", "moderato deploy: metrics at /metrics\n".to_string())
        }
        ("GET", _) => ("404 Not Found", "text/plain; charset=utf-8", "not found: try /metrics\n".to_string()),
        _ => ("405 Method Not Allowed", "text/plain; charset=utf-8", "only GET\n".to_string()),
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut out = resp.as_bytes();
    while !out.is_empty() {
        tokio::time::timeout_at(deadline, sock.writable())
            .await
            .map_err(|_| std::io::ErrorKind::TimedOut)??;
        match sock.try_write(out) {
            Ok(n) => out = &out[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
