//! Upper bounds on every numeric key of a scenario and of the control loop, the checks on the
//! files a scenario reads (traces), and the rule for names that become file names.
//!
//! The checks in `scenario.rs` and `SimConfig::validate` reject values that make no sense
//! (negative rates, zero cores). The bounds here reject values that parse and look plausible but
//! would make a run allocate without bound or never end: `host.cpus = 1e9` (a billion simulated
//! cores), an on/off source whose periods are 1e-300 ms (it switches state forever without ever
//! sending), `episode_steps = 4e9`, a trace that is `/dev/zero`. Within these bounds a run
//! allocates memory linear in the rings and queues and takes time linear in the simulated packets
//! (at most [`MAX_HOST_PPS`] × [`MAX_EPISODE_S`] per episode). Every bound is far above what a real
//! host has (a 100 GbE port carries 148.8 M minimum-size frames per second); each error names the
//! key, the value, the bound and what to do.

use std::io::Read;
use std::path::Path;

use super::SimConfig;
use super::scenario::{Arrivals, FlowKind, Scenario};
use crate::settings::{ActionSpace, Direction, LayerKind, Moderation};

/// Host cores (`host.cpus`).
pub const MAX_HOST_CPUS: usize = 256;
/// Entries of a ring or queue (`host.nic_rx_ring`, `vm.ring`, `vm.backend_queue`, ...).
pub const MAX_RING: usize = 1 << 20;
/// Packets in a buffer (`host.switch_buffer`, `vm.socket_buffer`).
pub const MAX_BUFFER: usize = 1 << 20;
/// Packets per worker run (`host.worker_batch`).
pub const MAX_WORKER_BATCH: u32 = 65_536;
/// Wire speed, Gbit/s; 1e6 (a wire that is never the bottleneck) is what queueing validation uses.
pub const MAX_LINE_RATE_GBPS: f64 = 1e6;
/// The largest rate one flow and the whole host may offer, packets per second (a 100 GbE port
/// at minimum frames carries 148.8 M/s).
pub const MAX_HOST_PPS: f64 = 2e8;
/// Shortest and longest mean on/off period, milliseconds (1 µs .. about 2.8 hours).
pub const MIN_PERIOD_MS: f64 = 1e-3;
pub const MAX_PERIOD_MS: f64 = 1e7;
/// Longest ramp, diurnal period or trace span, seconds (about 116 days).
pub const MAX_SPAN_S: f64 = 1e7;
/// Shortest diurnal period, seconds.
pub const MIN_DIURNAL_PERIOD_S: f64 = 1e-6;
/// Application time per packet, think time and retry timeout, microseconds (1000 s).
pub const MAX_APP_US: f64 = 1e9;
/// Multiplier of a trace's rates.
pub const MAX_TRACE_SCALE: f64 = 1e6;
/// A trace file: a regular file of at most this many bytes and rows.
pub const MAX_TRACE_BYTES: u64 = 64 << 20;
pub const MAX_TRACE_ROWS: usize = 1_000_000;
/// Longest name of a scenario, experiment or evaluation (it becomes part of file names).
pub const MAX_NAME_LEN: usize = 64;
/// Steps per episode, and the longest episode in simulated seconds (`moderato simulate --seconds`
/// takes up to 1e5).
pub const MAX_EPISODE_STEPS: u32 = 10_000_000;
pub const MAX_EPISODE_S: f64 = 1e5;
/// Largest `probe_every`.
pub const MAX_PROBE_EVERY: u64 = 1_000_000;
/// Largest p99 SLO, microseconds (10 s), CPU reference (1 s) and reward weight.
pub const MAX_SLO_US: f64 = 1e7;
pub const MAX_CPU_REF_US: f64 = 1e6;
pub const MAX_REWARD_WEIGHT: f64 = 1e6;
/// Largest knob bounds of an action space: `usecs_max` (100 s, a timer that never fires, as the
/// queueing validation uses) and `frames_max`.
pub const MAX_USECS: u32 = 100_000_000;
pub const MAX_FRAMES: u32 = 1 << 20;

/// Checks a name that becomes part of a file or directory name (`runs/<name>-<time>`, plots,
/// caches): 1 to [`MAX_NAME_LEN`] ASCII letters, digits, `.`, `_` or `-`, not starting with `.`
/// or `-`, so that it can neither leave its directory (`../x`, `/tmp/x`) nor hide or pose as an
/// option. `key` names it in the error.
pub fn check_name(key: &str, name: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty()
        || name.len() > MAX_NAME_LEN
        || !name.chars().all(ok_char)
        || name.starts_with('.')
        || name.starts_with('-')
    {
        return Err(format!(
            "{key} = {name:?}: a name is 1..={MAX_NAME_LEN} letters, digits, '.', '_' or '-', not starting \
             with '.' or '-' (it becomes a file name under runs/); rename it, e.g. {:?}",
            suggest_name(name)
        ));
    }
    Ok(())
}

/// `name` with every disallowed character replaced by `-`, trimmed to a valid name.
fn suggest_name(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '-' })
        .collect();
    let s = s.trim_start_matches(['.', '-']).chars().take(MAX_NAME_LEN).collect::<String>();
    if s.is_empty() { "run".into() } else { s }
}

fn at_most<T: PartialOrd + std::fmt::Display>(key: &str, v: T, max: T, fix: &str) -> Result<(), String> {
    if v > max { Err(format!("{key} = {v}: at most {max} is supported; {fix}")) } else { Ok(()) }
}

/// `v` as a reader would write it: plain when a whole number below 10^7, else in e-notation
/// (`1e-300`, not three hundred zeros).
pub(crate) fn num(v: f64) -> String {
    if v == v.trunc() && v.abs() < 1e7 { format!("{v}") } else { format!("{v:e}") }
}

/// Checks `v` is a finite number in `[lo, hi]`.
fn within(key: &str, v: f64, lo: f64, hi: f64, unit: &str) -> Result<(), String> {
    if v.is_finite() && (lo..=hi).contains(&v) {
        Ok(())
    } else {
        Err(format!("{key} = {}: use a number of {unit} in [{}, {}]", num(v), num(lo), num(hi)))
    }
}

/// The bounds of a scenario (after [`Scenario::validate`]'s sense checks).
pub(crate) fn check_scenario(s: &Scenario) -> Result<(), String> {
    check_name("name", &s.name)?;
    let h = &s.host;
    at_most("host.cpus", h.cpus, MAX_HOST_CPUS, "model the cores that run the NIC and backends")?;
    for (k, v) in [("host.nic_rx_ring", h.nic_rx_ring), ("host.nic_tx_ring", h.nic_tx_ring)] {
        at_most(k, v, MAX_RING, "real NICs have rings of at most a few thousand entries")?;
    }
    at_most("host.switch_buffer", h.switch_buffer, MAX_BUFFER, "use a smaller buffer")?;
    at_most("host.worker_batch", h.worker_batch, MAX_WORKER_BATCH, "NAPI's weight is 64")?;
    within("host.line_rate_gbps", h.line_rate_gbps, 1e-3, MAX_LINE_RATE_GBPS, "Gbit/s")?;
    let mut host_pps = 0.0;
    for (vi, vm) in s.vms.iter().enumerate() {
        let at = format!("vm[{vi}] ({})", vm.name);
        for (k, v) in [("ring", vm.ring), ("backend_queue", vm.backend_queue)] {
            at_most(&format!("{at}.{k}"), v, MAX_RING, "virtio rings have at most 32768 entries")?;
        }
        at_most(&format!("{at}.socket_buffer"), vm.socket_buffer, MAX_BUFFER, "use a smaller buffer")?;
        for (fi, f) in vm.flows.iter().enumerate() {
            let at = format!("{at}.flow[{fi}]");
            within(&format!("{at}.app_us"), f.app_us, 0.0, MAX_APP_US, "microseconds")?;
            let pps = check_arrivals(&f.arrivals).map_err(|m| format!("{at}.arrivals.{m}"))?;
            host_pps += pps * if f.kind == FlowKind::RequestResponse { 2.0 } else { 1.0 };
        }
    }
    if host_pps > MAX_HOST_PPS {
        return Err(format!(
            "the flows offer up to {host_pps:.3e} packets/s together (requests and responses count twice): \
             at most {MAX_HOST_PPS:e} is supported; lower the rates"
        ));
    }
    Ok(())
}

/// The bounds of one arrival process; returns the highest rate it can offer (packets/s). Errors
/// start with the key inside `arrivals`.
fn check_arrivals(a: &Arrivals) -> Result<f64, String> {
    let rate = |k: &str, v: f64| within(k, v, 0.0, MAX_HOST_PPS, "packets per second");
    match a {
        Arrivals::Poisson { rate_pps } | Arrivals::Constant { rate_pps } => rate("rate_pps", *rate_pps)?,
        Arrivals::OnOff { on_rate_pps, off_rate_pps, mean_on_ms, mean_off_ms } => {
            rate("on_rate_pps", *on_rate_pps)?;
            rate("off_rate_pps", *off_rate_pps)?;
            if *on_rate_pps == 0.0 && *off_rate_pps == 0.0 {
                return Err("on_rate_pps = off_rate_pps = 0: the flow would never send; give the on state \
                            a rate, or use process = \"poisson\" with rate_pps = 0 for a silent flow"
                    .into());
            }
            within("mean_on_ms", *mean_on_ms, MIN_PERIOD_MS, MAX_PERIOD_MS, "milliseconds")?;
            within("mean_off_ms", *mean_off_ms, MIN_PERIOD_MS, MAX_PERIOD_MS, "milliseconds")?;
        }
        Arrivals::Ramp { from_pps, to_pps, over_s } => {
            rate("from_pps", *from_pps)?;
            rate("to_pps", *to_pps)?;
            within("over_s", *over_s, 0.0, MAX_SPAN_S, "seconds")?;
        }
        Arrivals::Diurnal { mean_pps, period_s, phase, .. } => {
            rate("mean_pps", *mean_pps)?;
            within("period_s", *period_s, MIN_DIURNAL_PERIOD_S, MAX_SPAN_S, "seconds")?;
            within("phase", *phase, -1e6, 1e6, "periods")?;
        }
        Arrivals::ClosedLoop { clients, think_us, timeout_us } => {
            within("think_us", *think_us, 0.0, MAX_APP_US, "microseconds")?;
            within("timeout_us", *timeout_us, 1.0, MAX_APP_US, "microseconds")?;
            // Each client sends at most once per think time and retries once per timeout: the
            // retries of clients that all lose their packets are the worst case.
            let retry_pps = f64::from(*clients) * 1e6 / timeout_us;
            if retry_pps > MAX_HOST_PPS {
                return Err(format!(
                    "timeout_us = {}: {clients} clients retrying that often send {retry_pps:.3e} \
                     requests/s, more than {MAX_HOST_PPS:e}; use a longer timeout or fewer clients",
                    num(*timeout_us)
                ));
            }
            // Its throughput is limited by its own latency, not by a rate: it adds nothing here.
            return Ok(0.0);
        }
        Arrivals::Trace { scale, points, .. } => {
            within("scale", *scale, 0.0, MAX_TRACE_SCALE, "(a factor)")?;
            if let Some(&(t, r)) = points.iter().find(|p| p.1 * scale > MAX_HOST_PPS) {
                return Err(format!(
                    "scale = {}: the trace's rate {} at time_s = {} becomes {:.3e} packets/s, more than \
                     {MAX_HOST_PPS:e}; lower the scale",
                    num(*scale),
                    num(r),
                    num(t),
                    r * scale
                ));
            }
        }
    }
    Ok(a.max_rate())
}

/// The bounds of a control loop; `SimConfig::validate` calls it after its sense checks.
pub(crate) fn check_sim(c: &SimConfig) -> Result<(), String> {
    at_most("episode_steps", c.episode_steps, MAX_EPISODE_STEPS, "use longer intervals or shorter episodes")?;
    let episode_s = f64::from(c.episode_steps) * c.interval_us as f64 / 1e6;
    if episode_s > MAX_EPISODE_S {
        return Err(format!(
            "episode_steps = {} × interval_us = {} is an episode of {episode_s} simulated seconds: at most \
             {MAX_EPISODE_S} are supported; use fewer steps",
            c.episode_steps, c.interval_us
        ));
    }
    at_most("probe_every", c.probe_every, MAX_PROBE_EVERY, "a probe sees every n-th sample")?;
    let r = &c.reward;
    for (k, v) in [
        ("reward.w_cpu", r.w_cpu),
        ("reward.w_lat", r.w_lat),
        ("reward.w_viol", r.w_viol),
        ("reward.w_drop", r.w_drop),
    ] {
        within(k, v, 0.0, MAX_REWARD_WEIGHT, "(a weight)")?;
    }
    within("reward.slo_p99_us", r.slo_p99_us, 1e-3, MAX_SLO_US, "microseconds")?;
    within("reward.cpu_ref_us", r.cpu_ref_us, 1e-3, MAX_CPU_REF_US, "microseconds")?;
    check_action_space(&c.action_space)?;
    if let Some(init) = &c.initial {
        for layer in init.layer_ids() {
            let b = c.action_space.bounds(layer.kind());
            for dir in Direction::BOTH {
                if let Moderation::Fixed(k) = init.layer(layer).get(dir)
                    && (k.usecs > b.usecs_max || k.frames > b.frames_max)
                {
                    return Err(format!(
                        "initial: {layer} {} = {k} is outside action_space.{} (usecs_max = {}, frames_max = \
                         {}); use settings within the bounds",
                        dir.name(),
                        layer.kind().name(),
                        b.usecs_max,
                        b.frames_max
                    ));
                }
            }
        }
    }
    Ok(())
}

/// The bounds of an action space (of a control loop or a frozen model).
pub fn check_action_space(space: &ActionSpace) -> Result<(), String> {
    for kind in LayerKind::ALL {
        let b = space.bounds(kind);
        let k = kind.name();
        at_most(
            &format!("action_space.{k}.usecs_max"),
            b.usecs_max,
            MAX_USECS,
            "a timer of 100 s never fires within an interval",
        )?;
        if b.frames_max == 0 || b.frames_max > MAX_FRAMES {
            return Err(format!(
                "action_space.{k}.frames_max = {}: use 1..={MAX_FRAMES} (1: per-packet only)",
                b.frames_max
            ));
        }
    }
    let n = &space.napi;
    if n.timeout_us_min > n.timeout_us_max {
        return Err(format!(
            "action_space.napi.timeout_us_min = {} is above timeout_us_max = {}: lower it, or raise the maximum",
            n.timeout_us_min, n.timeout_us_max
        ));
    }
    Ok(())
}

/// Largest config file read (scenario, experiment, eval, `model.json`), bytes.
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// Reads a file a user named: a regular file (a device such as `/dev/zero`, a FIFO or a directory
/// would make the read endless or meaningless) of at most `max` bytes, read through that limit.
pub fn read_bounded(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file (a device, FIFO or directory); name a file"));
    }
    if meta.len() > max {
        return Err(std::io::Error::other(format!(
            "{} bytes, more than the {max} a file may have",
            meta.len()
        )));
    }
    let mut out = Vec::new();
    std::fs::File::open(path)?.take(max + 1).read_to_end(&mut out)?;
    if out.len() as u64 > max {
        return Err(std::io::Error::other(format!("grew past {max} bytes while read")));
    }
    Ok(out)
}

/// [`read_bounded`] for UTF-8 text of at most [`MAX_CONFIG_BYTES`].
pub fn read_config(path: &Path) -> std::io::Result<String> {
    String::from_utf8(read_bounded(path, MAX_CONFIG_BYTES)?)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"))
}

/// Opens a trace for reading: a regular file (not a device, FIFO or directory) of at most
/// [`MAX_TRACE_BYTES`], read through a limit so that a file growing while it is read cannot make
/// the read endless.
pub(crate) fn open_trace(path: &Path) -> Result<impl Read, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read the trace: {e}"))?;
    if !meta.is_file() {
        return Err("not a regular file: a trace is a CSV file with the header `time_s,rate_pps`".into());
    }
    if meta.len() > MAX_TRACE_BYTES {
        return Err(format!(
            "{} bytes: a trace may have at most {MAX_TRACE_BYTES} bytes; resample it coarser",
            meta.len()
        ));
    }
    let f = std::fs::File::open(path).map_err(|e| format!("cannot read the trace: {e}"))?;
    Ok(f.take(MAX_TRACE_BYTES))
}

/// The bounds of one trace row (after the format checks): row count and span.
pub(crate) fn check_trace_row(row: usize, t: f64) -> Result<(), String> {
    if row > MAX_TRACE_ROWS {
        return Err(format!("more than {MAX_TRACE_ROWS} rows: resample the trace coarser"));
    }
    if t > MAX_SPAN_S {
        return Err(format!("row {}: time_s = {}: a trace spans at most {MAX_SPAN_S:e} s", row + 1, num(t)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_leave_their_directory_are_refused() {
        for bad in ["../../../../tmp/x", "/tmp/x", "a/b", "", ".hidden", "-rf", "a b", "x\0y", "é"] {
            let e = check_name("name", bad).unwrap_err();
            assert!(e.contains("name = ") && e.contains("rename it"), "{bad:?}: {e}");
        }
        for good in ["standard", "ppo-standard", "eval_1.2", "A9"] {
            check_name("name", good).unwrap();
        }
        assert!(check_name("name", &"x".repeat(MAX_NAME_LEN + 1)).is_err());
        assert_eq!(suggest_name("../../tmp/x"), "tmp-x");
    }
}
