//! The scenario generator: whole hosts drawn from documented ranges, so that a policy trains on
//! hosts rather than on perturbations of a few files.
//!
//! [`GeneratorSpec`] is the `[suite.generator]` table of an experiment config; every key has a
//! default (below, and in `experiments/example.toml` and `experiments/scenarios/README.md`).
//! [`sample`] draws one [`Scenario`] from it, deterministically in the seed. It reads no files:
//! flash-crowd traces are synthesised in memory (and written next to the scenario only when a
//! drawn host is saved with [`Scenario::save`]), and the hand-written scenarios, the validation
//! suite among them, are never seen by it.
//!
//! # What is drawn, in this order
//! 1. The host: backend kind, host cores, posted interrupts, NAPI, line rate, NIC rings, whether
//!    frames may be jumbo (one MTU per host), the service distribution; then every CPU cost
//!    independently, its default (SIMULATOR.md; the backend's by kind) times a log-uniform factor
//!    in `cost_scale`.
//! 2. Per VM: its backend core (core 0 takes the NIC's interrupts; with two or more cores the
//!    backends run on the others), its rings and queues (powers of two in the ranges), whether
//!    it has a latency objective, and one to `flows_per_vm` flows: a kind, an arrival process
//!    (closed loop for request-response only), frame sizes (and response sizes), application
//!    time, and a share of the host's load.
//! 3. The rates: a load factor in `load`, relative to what the host can carry (see
//!    [`estimated_load`]), split over the flows by their shares. The mean rates are then
//!    `load × capacity`, unless the flows' **peak** rates would exceed the wire's line rate in
//!    either direction: then every rate is lowered until the peaks fit exactly. So idle, busy and
//!    near-saturated hosts all appear, and the offered load never exceeds the line rate.
//!
//! Each part draws from its own stream derived from the seed (the host, the costs, each VM), so
//! a later change to how one VM is drawn leaves the others alone.
//!
//! # Per-VM objectives
//! A VM with an objective (drawn with `p_objective`) marks its stream and request-response flows
//! `latency_sensitive` and gets its own p99 target (`[[vm]] slo_p99_us`), drawn log-uniform from
//! `slo_p99_us` and rounded to whole µs, from a stream of its own (so the target's draw changes
//! no other draw). A VM whose flows are all bulk transmit has no objective.

use rand::SeedableRng;
use rand_pcg::Pcg64Mcg;
use serde::{Deserialize, Serialize};

use super::limits;
use super::scenario::{
    Arrivals, BackendKind, Costs, FlowConfig, FlowKind, HostConfig, MAX_FRAME, Objective, Scenario,
    ServiceDist, SizeDist, VmConfig,
};
use crate::random::{splitmix64, standard_normal, unit_f64};

/// An arrival process, by the name the scenario format gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Process {
    Poisson,
    Constant,
    OnOff,
    Ramp,
    Diurnal,
    /// Request-response flows only.
    ClosedLoop,
    /// A synthetic rate trace with flash crowds.
    Trace,
}

impl Process {
    pub const ALL: [Process; 7] = [
        Process::Poisson,
        Process::Constant,
        Process::OnOff,
        Process::Ramp,
        Process::Diurnal,
        Process::ClosedLoop,
        Process::Trace,
    ];
}

/// A frame-size distribution, by the name the scenario format gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SizeKind {
    Fixed,
    Bimodal,
    Imix,
}

/// The largest frame of a host without jumbo frames (1500-byte MTU, FCS included).
pub const STANDARD_FRAME: u32 = 1518;

/// Packets per notification the capacity estimate assumes ("moderate coalescing").
pub const ASSUMED_BATCH: f64 = 8.0;

/// Flash-crowd traces: length (s) and row spacing (s), number of crowds, and each crowd's decay
/// time constant (s). The peak factor is `flash_peak`.
pub const TRACE_SPAN_S: [f64; 2] = [1.0, 4.0];
pub const TRACE_STEP_S: f64 = 0.01;
pub const TRACE_CROWDS: [usize; 2] = [1, 2];
pub const TRACE_DECAY_S: [f64; 2] = [0.05, 0.4];
/// Lognormal sigma of a trace's row-to-row noise.
pub const TRACE_NOISE: f64 = 0.1;

/// Where each drawn value comes from. Ranges are `[low, high]`, inclusive; integer ranges are
/// uniform, ranges of sizes, times and factors log-uniform; `p_*` are probabilities; lists are
/// drawn from uniformly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GeneratorSpec {
    /// Hypervisor backends (`"vhost"`, `"xen"`).
    pub backends: Vec<BackendKind>,
    /// Host (driver-domain) cores.
    pub cpus: [usize; 2],
    /// Probability that virtual interrupts are posted (APICv).
    pub p_posted_interrupts: f64,
    /// Probability of a pre-NAPI host (`host.napi = false`).
    pub p_napi_off: f64,
    /// Wire speeds, Gbit/s.
    pub line_rate_gbps: Vec<f64>,
    /// NIC rx and tx rings (each drawn on its own), a power of two in this range.
    pub nic_ring: [usize; 2],
    /// Each VM's backend and frontend rings, a power of two.
    pub vm_ring: [usize; 2],
    /// Each VM's backend input queue (tap / vif), a power of two.
    pub backend_queue: [usize; 2],
    /// Each VM's guest socket buffers, packets, a power of two.
    pub socket_buffer: [usize; 2],
    /// Every CPU cost is its default times its own log-uniform factor in this range.
    pub cost_scale: [f64; 2],
    /// Probability of exponentially distributed per-packet costs (else deterministic).
    pub p_exponential_service: f64,
    /// VMs per host.
    pub vms: [usize; 2],
    /// Flows per VM.
    pub flows_per_vm: [usize; 2],
    /// Flow kinds (`"stream"`, `"bulk-tx"`, `"request-response"`).
    pub kinds: Vec<FlowKind>,
    /// Arrival processes; `"closed-loop"` is drawn for request-response flows only.
    pub processes: Vec<Process>,
    /// Frame-size distributions (`"fixed"`, `"bimodal"`, `"imix"`).
    pub sizes: Vec<SizeKind>,
    /// Frame sizes, bytes with FCS (log-uniform); a host without jumbo frames stops at 1518.
    pub frame_bytes: [u32; 2],
    /// Probability that a host carries jumbo frames (up to `frame_bytes[1]`).
    pub p_jumbo: f64,
    /// Probability that a flow's application spends time per packet or request ...
    pub p_app_time: f64,
    /// ... and how much, µs (log-uniform).
    pub app_us: [f64; 2],
    /// A closed loop's think time per client, µs (log-uniform; the client count is then what
    /// carries the flow's rate, and with a single client at a low rate the think time is longer).
    pub think_us: [f64; 2],
    /// A flash crowd's peak over the trace's base rate (log-uniform).
    pub flash_peak: [f64; 2],
    /// The host's load relative to its estimated capacity (uniform; see [`estimated_load`]).
    pub load: [f64; 2],
    /// Probability that a VM has a latency objective (its stream and request-response flows are
    /// then latency-sensitive); the others have none.
    pub p_objective: f64,
    /// A VM objective's p99 latency target, µs (log-uniform, rounded to whole µs).
    pub slo_p99_us: [f64; 2],
    /// Host profiles (`"kvm-notf-coal"`, `"kvm-vhost"`, `"xen"`, `"sriov-vf"`): each host draws one of those
    /// whose backend it drew (from a stream of its own; every other draw is unchanged). Empty (the
    /// default): no profile, every layer has every mechanism (the model before profiles).
    pub profiles: Vec<crate::HostProfile>,
}

impl Default for GeneratorSpec {
    fn default() -> Self {
        GeneratorSpec {
            backends: vec![BackendKind::Vhost, BackendKind::Xen],
            cpus: [1, 4],
            p_posted_interrupts: 0.5,
            p_napi_off: 0.1,
            line_rate_gbps: vec![10.0, 25.0],
            nic_ring: [128, 4096],
            vm_ring: [64, 1024],
            backend_queue: [64, 2048],
            socket_buffer: [128, 4096],
            cost_scale: [0.5, 2.0],
            p_exponential_service: 0.25,
            vms: [1, 4],
            flows_per_vm: [1, 2],
            kinds: vec![FlowKind::Stream, FlowKind::BulkTx, FlowKind::RequestResponse],
            processes: Process::ALL.to_vec(),
            sizes: vec![SizeKind::Fixed, SizeKind::Bimodal, SizeKind::Imix],
            frame_bytes: [64, MAX_FRAME],
            p_jumbo: 0.2,
            p_app_time: 0.7,
            app_us: [0.5, 50.0],
            think_us: [10.0, 1000.0],
            flash_peak: [3.0, 10.0],
            load: [0.05, 1.1],
            p_objective: 0.7,
            slo_p99_us: [50.0, 2000.0],
            profiles: Vec::new(),
        }
    }
}

/// `[low, high]` of integers with `min <= low <= high <= max`.
fn int_range(key: &str, r: [usize; 2], min: usize, max: usize) -> Result<(), String> {
    if r[0] < min || r[0] > r[1] || r[1] > max {
        return Err(format!(
            "{key} = [{}, {}]: a range [low, high] with {min} <= low <= high <= {max}",
            r[0], r[1]
        ));
    }
    Ok(())
}

/// `[low, high]` of finite numbers with `min <= low <= high <= max`.
fn f_range(key: &str, r: [f64; 2], min: f64, max: f64) -> Result<(), String> {
    if !(r[0].is_finite() && r[1].is_finite() && r[0] >= min && r[0] <= r[1] && r[1] <= max) {
        return Err(format!(
            "{key} = [{}, {}]: a range [low, high] with {} <= low <= high <= {}",
            r[0],
            r[1],
            limits::num(min),
            limits::num(max)
        ));
    }
    Ok(())
}

/// A ring range that holds a power of two.
fn pow2_range(key: &str, r: [usize; 2]) -> Result<(), String> {
    int_range(key, r, 1, limits::MAX_RING)?;
    if r[0].next_power_of_two() > r[1] {
        return Err(format!(
            "{key} = [{}, {}]: rings are drawn as powers of two and this range holds none; widen it",
            r[0], r[1]
        ));
    }
    Ok(())
}

impl GeneratorSpec {
    /// The listed profiles a host of `backend` draws from; empty: such a host has no profile
    /// (every mechanism, as `kvm-notf-coal`).
    pub fn profiles_of(&self, backend: BackendKind) -> Vec<crate::HostProfile> {
        self.profiles.iter().copied().filter(|p| p.backend() == backend).collect()
    }

    /// Checks every key; the message names the key (as written under `[suite.generator]`), its
    /// value and what is allowed.
    pub fn validate(&self) -> Result<(), String> {
        if self.backends.is_empty() {
            return Err("backends = []: list at least one of \"vhost\", \"xen\"".into());
        }
        int_range("cpus", self.cpus, 1, 64)?;
        for p in &self.profiles {
            if !self.backends.contains(&p.backend()) {
                return Err(format!(
                    "profiles lists \"{p}\", whose hosts run the {:?} backend, which backends does not list: add it \
                     to backends or drop the profile",
                    p.backend()
                ));
            }
        }
        for (k, p) in [
            ("p_posted_interrupts", self.p_posted_interrupts),
            ("p_napi_off", self.p_napi_off),
            ("p_exponential_service", self.p_exponential_service),
            ("p_jumbo", self.p_jumbo),
            ("p_app_time", self.p_app_time),
            ("p_objective", self.p_objective),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(format!("{k} = {p}: a probability in [0, 1]"));
            }
        }
        if self.line_rate_gbps.is_empty() {
            return Err("line_rate_gbps = []: list at least one wire speed, e.g. [10.0]".into());
        }
        for &g in &self.line_rate_gbps {
            if !(g.is_finite() && (0.1..=1000.0).contains(&g)) {
                return Err(format!("line_rate_gbps: {g}: use wire speeds in [0.1, 1000] Gbit/s"));
            }
        }
        pow2_range("nic_ring", self.nic_ring)?;
        pow2_range("vm_ring", self.vm_ring)?;
        pow2_range("backend_queue", self.backend_queue)?;
        pow2_range("socket_buffer", self.socket_buffer)?;
        f_range("cost_scale", self.cost_scale, 0.01, 100.0)?;
        int_range("vms", self.vms, 1, 64)?;
        int_range("flows_per_vm", self.flows_per_vm, 1, 16)?;
        if self.kinds.is_empty() {
            return Err(
                "kinds = []: list at least one of \"stream\", \"bulk-tx\", \"request-response\"".into()
            );
        }
        if self.processes.is_empty() {
            return Err("processes = []: list at least one arrival process, e.g. [\"poisson\"]".into());
        }
        if self.processes.iter().all(|p| *p == Process::ClosedLoop)
            && self.kinds.iter().any(|k| *k != FlowKind::RequestResponse)
        {
            return Err("processes = [\"closed-loop\"] fits request-response flows only: add an open-loop \
                        process (e.g. \"poisson\") or set kinds = [\"request-response\"]"
                .into());
        }
        if self.sizes.is_empty() {
            return Err("sizes = []: list at least one of \"fixed\", \"bimodal\", \"imix\"".into());
        }
        let [lo, hi] = self.frame_bytes;
        if lo < 64 || lo > hi || hi > MAX_FRAME {
            return Err(format!(
                "frame_bytes = [{lo}, {hi}]: a range [low, high] with 64 <= low <= high <= {MAX_FRAME}"
            ));
        }
        if lo > STANDARD_FRAME && self.p_jumbo < 1.0 {
            return Err(format!(
                "frame_bytes = [{lo}, {hi}] starts above the standard {STANDARD_FRAME}-byte frame: set \
                 p_jumbo = 1.0, or lower frame_bytes[0]"
            ));
        }
        if self.sizes.contains(&SizeKind::Imix) && (lo > 64 || hi < 1500) {
            return Err(format!(
                "sizes holds \"imix\" (64, 576 and 1500 bytes) but frame_bytes = [{lo}, {hi}] excludes some of \
                 them: widen frame_bytes to [64, 1500] or more, or drop \"imix\""
            ));
        }
        f_range("app_us", self.app_us, 1e-3, 1e6)?;
        f_range("think_us", self.think_us, 1.0, 1e6)?;
        f_range("flash_peak", self.flash_peak, 1.0, 100.0)?;
        f_range("load", self.load, 1e-3, 2.0)?;
        f_range("slo_p99_us", self.slo_p99_us, 1.0, limits::MAX_SLO_US)?;
        Ok(())
    }
}

/// A generator for one part of a host: `(seed, part)`.
fn part_rng(seed: u64, part: u64) -> Pcg64Mcg {
    Pcg64Mcg::seed_from_u64(splitmix64(splitmix64(seed ^ 0x6765_6e65_7261_746f) ^ part))
}

const PART_HOST: u64 = 1;
const PART_COSTS: u64 = 2;
const PART_VM: u64 = 1 << 16;
const PART_OBJECTIVE: u64 = 1 << 17;
const PART_PROFILE: u64 = 3;

/// The draws the generator makes.
struct Draw(Pcg64Mcg);

impl Draw {
    fn unit(&mut self) -> f64 {
        unit_f64(&mut self.0)
    }
    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
    fn uniform(&mut self, [lo, hi]: [f64; 2]) -> f64 {
        (lo + self.unit() * (hi - lo)).clamp(lo, hi)
    }
    fn log_uniform(&mut self, [lo, hi]: [f64; 2]) -> f64 {
        (lo.ln() + self.unit() * (hi.ln() - lo.ln())).exp().clamp(lo, hi)
    }
    fn below(&mut self, n: usize) -> usize {
        ((self.unit() * n as f64) as usize).min(n - 1)
    }
    fn int(&mut self, [lo, hi]: [usize; 2]) -> usize {
        lo + self.below(hi - lo + 1)
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }
    /// A power of two in `[lo, hi]` (uniform over the exponents).
    fn pow2(&mut self, [lo, hi]: [usize; 2]) -> usize {
        let e_lo = lo.next_power_of_two().trailing_zeros() as usize;
        let e_hi = (usize::BITS - 1 - hi.leading_zeros()) as usize;
        1 << self.int([e_lo, e_hi.max(e_lo)])
    }
    /// Frame bytes, log-uniform in `[lo, hi]`.
    fn bytes(&mut self, lo: u32, hi: u32) -> u32 {
        (self.log_uniform([f64::from(lo), f64::from(hi)]).round() as u32).clamp(lo, hi)
    }
    fn normal(&mut self) -> f64 {
        standard_normal(&mut self.0)
    }
}

/// An arrival process with its shape drawn and its rate left open: `build(m)` gives the
/// process with mean rate `m` (for ramps the midpoint, for closed loops the zero-latency bound).
#[derive(Debug, Clone)]
enum Shape {
    Poisson,
    Constant,
    OnOff {
        mean_on_ms: f64,
        mean_off_ms: f64,
        off_frac: f64,
    },
    Ramp {
        u: f64,
        over_s: f64,
    },
    Diurnal {
        amplitude: f64,
        period_s: f64,
        phase: f64,
    },
    ClosedLoop {
        think_us: f64,
    },
    /// Rows of a unit-mean trace; the last row closes the loop.
    Trace {
        path: std::path::PathBuf,
        unit: Vec<(f64, f64)>,
    },
}

impl Shape {
    fn draw(d: &mut Draw, p: Process, spec: &GeneratorSpec, path: std::path::PathBuf) -> Shape {
        match p {
            Process::Poisson => Shape::Poisson,
            Process::Constant => Shape::Constant,
            Process::OnOff => Shape::OnOff {
                mean_on_ms: d.log_uniform([1.0, 100.0]),
                mean_off_ms: d.log_uniform([1.0, 200.0]),
                off_frac: d.uniform([0.0, 0.3]),
            },
            Process::Ramp => Shape::Ramp { u: d.uniform([0.1, 0.9]), over_s: d.uniform([0.2, 2.0]) },
            Process::Diurnal => Shape::Diurnal {
                amplitude: d.uniform([0.2, 0.9]),
                period_s: d.uniform([0.5, 5.0]),
                phase: d.unit(),
            },
            Process::ClosedLoop => Shape::ClosedLoop { think_us: d.log_uniform(spec.think_us) },
            Process::Trace => Shape::Trace { path, unit: flash_crowd(d, spec.flash_peak) },
        }
    }

    fn build(&self, m: f64) -> Arrivals {
        match self {
            Shape::Poisson => Arrivals::Poisson { rate_pps: m },
            Shape::Constant => Arrivals::Constant { rate_pps: m },
            &Shape::OnOff { mean_on_ms, mean_off_ms, off_frac } => {
                let on = m * (mean_on_ms + mean_off_ms) / (mean_on_ms + off_frac * mean_off_ms);
                Arrivals::OnOff { on_rate_pps: on, off_rate_pps: on * off_frac, mean_on_ms, mean_off_ms }
            }
            &Shape::Ramp { u, over_s } => {
                Arrivals::Ramp { from_pps: 2.0 * m * u, to_pps: 2.0 * m * (1.0 - u), over_s }
            }
            &Shape::Diurnal { amplitude, period_s, phase } => {
                Arrivals::Diurnal { mean_pps: m, amplitude, period_s, phase }
            }
            &Shape::ClosedLoop { think_us } => {
                // Enough clients that the loop can reach `m` at this think time; the think time
                // then carries the rest, so that the zero-latency bound is `m` exactly.
                let clients = (m * think_us / 1e6).floor().clamp(1.0, 100_000.0);
                let think = (clients * 1e6 / m.max(1e-3)).min(limits::MAX_APP_US);
                Arrivals::ClosedLoop {
                    clients: clients as u32,
                    think_us: think,
                    timeout_us: 10_000f64.max(10.0 * think).min(limits::MAX_APP_US),
                }
            }
            Shape::Trace { path, unit } => Arrivals::Trace {
                path: path.clone(),
                scale: 1.0,
                points: unit.iter().map(|&(t, r)| (t, r * m)).collect(),
            },
        }
    }
}

/// A unit-mean rate trace with flash crowds: a noisy base rate, and one or two crowds that jump
/// to `peak ×` the base and decay exponentially.
fn flash_crowd(d: &mut Draw, peak: [f64; 2]) -> Vec<(f64, f64)> {
    let span = d.uniform(TRACE_SPAN_S);
    let rows = (span / TRACE_STEP_S).round().max(2.0) as usize;
    let span = rows as f64 * TRACE_STEP_S;
    let crowds: Vec<(f64, f64, f64)> = (0..d.int(TRACE_CROWDS))
        .map(|_| (d.uniform([0.0, 0.8 * span]), d.log_uniform(peak), d.uniform(TRACE_DECAY_S)))
        .collect();
    let mut r: Vec<f64> = (0..rows)
        .map(|i| {
            let t = i as f64 * TRACE_STEP_S;
            let surge: f64 = crowds
                .iter()
                .filter(|c| t >= c.0)
                .map(|&(t0, k, tau)| (k - 1.0) * (-(t - t0) / tau).exp())
                .sum();
            (TRACE_NOISE * d.normal()).exp() * (1.0 + surge)
        })
        .collect();
    let mean = r.iter().sum::<f64>() / rows as f64;
    for x in &mut r {
        *x /= mean;
    }
    let mut pts: Vec<(f64, f64)> = r.iter().enumerate().map(|(i, &x)| (i as f64 * TRACE_STEP_S, x)).collect();
    // The last row only marks the loop's period (it is never in force): repeat the first rate so
    // that it adds nothing to the peak.
    pts.push((span, r[0]));
    pts
}

/// A frame-size distribution in `[lo, hi]`.
fn draw_size(d: &mut Draw, kinds: &[SizeKind], lo: u32, hi: u32) -> SizeDist {
    let imix_fits = lo <= 64 && hi >= 1500;
    let usable: Vec<SizeKind> = kinds.iter().copied().filter(|k| *k != SizeKind::Imix || imix_fits).collect();
    // A non-jumbo host of a spec whose only size is IMIX cannot come here (validate), but a
    // jumbo-only range can leave nothing: fall back to fixed.
    let kind = if usable.is_empty() { SizeKind::Fixed } else { d.pick(&usable) };
    match kind {
        SizeKind::Fixed => SizeDist::Fixed { bytes: d.bytes(lo, hi) },
        SizeKind::Bimodal => {
            let (a, b) = (d.bytes(lo, hi), d.bytes(lo, hi));
            SizeDist::Bimodal { small: a.min(b), large: a.max(b), p_small: d.uniform([0.2, 0.9]) }
        }
        SizeKind::Imix => SizeDist::Imix,
    }
}

/// The long-run mean rate of an arrival process (ramps: the midpoint; closed loops: the bound
/// with zero latency; traces: the time-weighted mean of one loop).
pub fn mean_rate(a: &Arrivals) -> f64 {
    match a {
        Arrivals::Ramp { from_pps, to_pps, .. } => 0.5 * (from_pps + to_pps),
        Arrivals::Trace { scale, points, .. } => {
            let Some(last) = points.last() else { return 0.0 };
            if last.0 <= 0.0 {
                return points[0].1 * scale;
            }
            let area: f64 = points.windows(2).map(|w| w[0].1 * (w[1].0 - w[0].0)).sum();
            area / last.0 * scale
        }
        other => other.rate_at(0.0),
    }
}

/// How loaded a host is, by the generator's estimate.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadEstimate {
    /// Utilisation of the busiest CPU (a host core or a VM's vCPU) at the flows' mean rates,
    /// with [`ASSUMED_BATCH`] packets per notification: 1.0 is the estimated capacity.
    pub cpu: f64,
    /// Which CPU that is: `host core i` or `vm i vCPU`.
    pub bottleneck: String,
    /// The wire's use at the flows' peak rates, each direction, as a fraction of the line rate.
    pub wire_rx_peak: f64,
    pub wire_tx_peak: f64,
}

/// Estimates a host's load from its costs and rates: each flow's packets cost, per CPU, the
/// per-packet costs of SIMULATOR.md plus the per-notification costs shared by
/// [`ASSUMED_BATCH`] packets. Receive: NIC driver on the NIC's core, backend copy on the VM's
/// backend core, frontend and stack (and the application's wake-up) on its vCPU. Transmit: stack
/// and frontend, kick and completion on the vCPU, backend and its wake-up on its core, NIC
/// driver and completion on the NIC's core. Request-response flows pay both per request, plus
/// the application time; streams and bulk transmit pay the application time per packet.
pub fn estimated_load(s: &Scenario) -> LoadEstimate {
    let h = &s.host;
    let c = &s.costs;
    let b = ASSUMED_BATCH;
    let backend = c.backend_per_packet(h.backend);
    let virq = c.virq(h.posted_interrupts);
    let mut busy = vec![0.0f64; h.cpus + s.vms.len()];
    let (mut rx_bits, mut tx_bits) = (0.0f64, 0.0f64);
    let wire_bits = |sz: &SizeDist| (sz.mean() + 20.0) * 8.0;
    for (v, vm) in s.vms.iter().enumerate() {
        let vcpu = h.cpus + v;
        let be = vm.backend_cpu.min(h.cpus - 1);
        let nic = h.nic_cpu.min(h.cpus - 1);
        for f in &vm.flows {
            let m = mean_rate(&f.arrivals);
            let peak = f.arrivals.max_rate();
            let rx = |busy: &mut [f64], sz: &SizeDist| {
                busy[nic] += m * (c.nic_per_packet_us + (c.nic_irq_us + c.nic_poll_us) / b);
                busy[be] += m * backend;
                busy[vcpu] += m
                    * (c.frontend_per_packet_us
                        + c.stack_per_packet_us
                        + c.stack_per_byte_ns * sz.mean() / 1000.0
                        + (virq + c.frontend_poll_us + c.app_wakeup_us) / b);
            };
            let tx = |busy: &mut [f64], sz: &SizeDist| {
                busy[vcpu] += m
                    * (c.stack_per_packet_us
                        + c.stack_per_byte_ns * sz.mean() / 1000.0
                        + c.frontend_per_packet_us
                        + (c.kick_us + virq) / b);
                busy[be] += m * (backend + c.backend_wakeup_us / b);
                busy[nic] += m * (c.nic_per_packet_us + c.nic_irq_us / b);
            };
            match f.kind {
                FlowKind::Stream => {
                    rx(&mut busy, &f.size);
                    rx_bits += peak * wire_bits(&f.size);
                }
                FlowKind::BulkTx => {
                    tx(&mut busy, &f.size);
                    tx_bits += peak * wire_bits(&f.size);
                }
                FlowKind::RequestResponse => {
                    let resp = f.response_size.as_ref().unwrap_or(&f.size);
                    rx(&mut busy, &f.size);
                    tx(&mut busy, resp);
                    rx_bits += peak * wire_bits(&f.size);
                    tx_bits += peak * wire_bits(resp);
                }
            }
            busy[vcpu] += m * f.app_us;
        }
    }
    let (i, top) = busy.iter().enumerate().fold((0, 0.0), |a, (i, &u)| if u > a.1 { (i, u) } else { a });
    let line = h.line_rate_gbps * 1e9;
    LoadEstimate {
        cpu: top / 1e6,
        bottleneck: if i < h.cpus { format!("host core {i}") } else { format!("vm {} vCPU", i - h.cpus) },
        wire_rx_peak: rx_bits / line,
        wire_tx_peak: tx_bits / line,
    }
}

/// One flow before its rate is known.
struct Pending {
    vm: usize,
    kind: FlowKind,
    shape: Shape,
    size: SizeDist,
    response_size: Option<SizeDist>,
    app_us: f64,
    latency_sensitive: bool,
    share: f64,
}

/// The scenario of `pending` flows with host load `total` (the sum of the flows' mean rates).
fn assemble(base: &Scenario, pending: &[Pending], total: f64) -> Scenario {
    let mut s = base.clone();
    for p in pending {
        s.vms[p.vm].flows.push(FlowConfig {
            kind: p.kind,
            arrivals: p.shape.build(total * p.share),
            size: p.size.clone(),
            response_size: p.response_size.clone(),
            app_us: p.app_us,
            latency_sensitive: Some(p.latency_sensitive),
        });
    }
    s
}

/// The scenario name of seed `seed`.
pub fn scenario_name(seed: u64) -> String {
    format!("gen-{seed:016x}")
}

/// Draws one host from `spec` (which must pass [`GeneratorSpec::validate`]); the same seed gives
/// the same scenario. The result passes [`Scenario::validate`].
pub fn sample(spec: &GeneratorSpec, seed: u64) -> Scenario {
    let name = scenario_name(seed);
    let mut d = Draw(part_rng(seed, PART_HOST));
    let backend = d.pick(&spec.backends);
    let cpus = d.int(spec.cpus);
    let posted = d.chance(spec.p_posted_interrupts);
    let napi = !d.chance(spec.p_napi_off);
    let line_rate_gbps = d.pick(&spec.line_rate_gbps);
    let nic_rx_ring = d.pow2(spec.nic_ring);
    let nic_tx_ring = d.pow2(spec.nic_ring);
    let jumbo = d.chance(spec.p_jumbo);
    let service = if d.chance(spec.p_exponential_service) {
        ServiceDist::Exponential
    } else {
        ServiceDist::Deterministic
    };
    let load = d.uniform(spec.load);
    let n_vms = d.int(spec.vms);
    let host = HostConfig {
        cpus,
        nic_cpu: 0,
        line_rate_gbps,
        nic_rx_ring,
        nic_tx_ring,
        backend,
        posted_interrupts: posted,
        napi,
        profile: {
            let of_backend = spec.profiles_of(backend);
            (!of_backend.is_empty()).then(|| Draw(part_rng(seed, PART_PROFILE)).pick(&of_backend))
        },
        ..HostConfig::default()
    };

    let mut d = Draw(part_rng(seed, PART_COSTS));
    let dc = Costs::default();
    let mut k = || d.log_uniform(spec.cost_scale);
    let costs = Costs {
        nic_irq_us: dc.nic_irq_us * k(),
        nic_per_packet_us: dc.nic_per_packet_us * k(),
        backend_per_packet_us: Some(dc.backend_per_packet(backend) * k()),
        virq_us: dc.virq_us * k(),
        virq_posted_us: dc.virq_posted_us * k(),
        kick_us: dc.kick_us * k(),
        backend_wakeup_us: dc.backend_wakeup_us * k(),
        frontend_per_packet_us: dc.frontend_per_packet_us * k(),
        stack_per_packet_us: dc.stack_per_packet_us * k(),
        stack_per_byte_ns: dc.stack_per_byte_ns * k(),
        app_wakeup_us: dc.app_wakeup_us * k(),
        vcpu_wakeup_us: dc.vcpu_wakeup_us * k(),
        nic_poll_us: dc.nic_poll_us * k(),
        frontend_poll_us: dc.frontend_poll_us * k(),
        host_timer_us: dc.host_timer_us * k(),
        guest_timer_us: dc.guest_timer_us * k(),
        // Not drawn, so that every other host of a seed stays the one it was before sriov-vf.
        vf_doorbell_us: dc.vf_doorbell_us,
        service,
    };

    let [lo, hi] = spec.frame_bytes;
    let hi = if jumbo { hi } else { hi.min(STANDARD_FRAME) };
    let mut vms = Vec::with_capacity(n_vms);
    let mut pending = Vec::new();
    let mut objectives = 0;
    for v in 0..n_vms {
        let mut d = Draw(part_rng(seed, PART_VM + v as u64));
        let backend_cpu = if cpus == 1 { 0 } else { 1 + d.below(cpus - 1) };
        let ring = d.pow2(spec.vm_ring);
        let backend_queue = d.pow2(spec.backend_queue);
        let socket_buffer = d.pow2(spec.socket_buffer);
        let objective = d.chance(spec.p_objective);
        objectives += usize::from(objective);
        for fi in 0..d.int(spec.flows_per_vm) {
            let kind = d.pick(&spec.kinds);
            let procs: Vec<Process> = spec
                .processes
                .iter()
                .copied()
                .filter(|p| *p != Process::ClosedLoop || kind == FlowKind::RequestResponse)
                .collect();
            let process = d.pick(&procs);
            let path = std::path::PathBuf::from(format!("traces/{name}-vm{v}-flow{fi}.csv"));
            let shape = Shape::draw(&mut d, process, spec, path);
            let size = draw_size(&mut d, &spec.sizes, lo, hi);
            let response_size =
                (kind == FlowKind::RequestResponse).then(|| draw_size(&mut d, &spec.sizes, lo, hi));
            let app_us = if d.chance(spec.p_app_time) { d.log_uniform(spec.app_us) } else { 0.0 };
            pending.push(Pending {
                vm: v,
                kind,
                shape,
                size,
                response_size,
                app_us,
                latency_sensitive: objective && kind != FlowKind::BulkTx,
                share: d.uniform([0.2, 1.0]),
            });
        }
        let sensitive = pending.iter().any(|p| p.vm == v && p.latency_sensitive);
        let target = Draw(part_rng(seed, PART_OBJECTIVE + v as u64)).log_uniform(spec.slo_p99_us).round();
        vms.push(VmConfig {
            name: format!("vm{v}"),
            backend_cpu,
            ring,
            backend_queue,
            socket_buffer,
            flows: vec![],
            slo_p99_us: sensitive
                .then_some(Objective::P99Us(target.clamp(spec.slo_p99_us[0], spec.slo_p99_us[1]))),
        });
    }
    let shares: f64 = pending.iter().map(|p| p.share).sum();
    for p in &mut pending {
        p.share /= shares;
    }
    let base = Scenario { name, description: String::new(), host, costs, vms };
    // Everything is linear in the total rate: estimate at a total of 1 packet/s, then scale.
    let unit = estimated_load(&assemble(&base, &pending, 1.0));
    let cpu_total = load / unit.cpu.max(1e-12);
    let wire_total = 1.0 / unit.wire_rx_peak.max(unit.wire_tx_peak).max(1e-300);
    // Just under the wire's peak so that rounding never crosses it.
    let total = cpu_total.min(wire_total * (1.0 - 1e-9)).min(limits::MAX_HOST_PPS / 4.0);
    let mut s = assemble(&base, &pending, total);
    let est = estimated_load(&s);
    s.description = format!(
        "Drawn by the generator (seed {seed}): {} with {cpus} host core{}{}{}, {:.0} Gbit/s, {} VM{} ({} with a \
         latency objective), {} flow{}; estimated load {:.2} of capacity ({}), peak wire use rx {:.2} / tx {:.2}.",
        match backend {
            BackendKind::Xen => "Xen",
            BackendKind::Vhost => "vhost",
        },
        if cpus == 1 { "" } else { "s" },
        if posted { ", posted interrupts" } else { "" },
        if napi { "" } else { ", no NAPI" },
        line_rate_gbps,
        n_vms,
        if n_vms == 1 { "" } else { "s" },
        objectives,
        pending.len(),
        if pending.len() == 1 { "" } else { "s" },
        est.cpu,
        est.bottleneck,
        est.wire_rx_peak,
        est.wire_tx_peak,
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pow2_draws_stay_in_range() {
        let mut d = Draw(part_rng(1, 1));
        for _ in 0..200 {
            let x = d.pow2([100, 1000]);
            assert!(x.is_power_of_two() && (128..=512).contains(&x), "{x}");
            assert_eq!(d.pow2([64, 64]), 64);
        }
    }

    #[test]
    fn flash_crowd_traces_have_unit_mean_and_a_crowd() {
        let mut d = Draw(part_rng(7, 3));
        for _ in 0..50 {
            let pts = flash_crowd(&mut d, [3.0, 10.0]);
            let a = Arrivals::Trace { path: "x.csv".into(), scale: 1.0, points: pts.clone() };
            assert!((mean_rate(&a) - 1.0).abs() < 1e-9, "{}", mean_rate(&a));
            // A crowd of at least 3x over a noisy base stands out above the mean (the mean holds
            // the crowds too, so the margin is smallest for one slow crowd in a short trace).
            assert!(a.max_rate() > 1.2, "peak {}", a.max_rate());
            assert!(pts.windows(2).all(|w| w[1].0 > w[0].0) && pts[0].0 == 0.0);
        }
    }

    #[test]
    fn validation_names_the_key_and_value() {
        let bad = GeneratorSpec { cpus: [3, 1], ..GeneratorSpec::default() };
        let e = bad.validate().unwrap_err();
        assert!(e.starts_with("cpus = [3, 1]"), "{e}");
        let bad = GeneratorSpec { p_jumbo: 1.5, ..GeneratorSpec::default() };
        assert!(bad.validate().unwrap_err().starts_with("p_jumbo = 1.5"));
        let bad = GeneratorSpec { vm_ring: [65, 127], ..GeneratorSpec::default() };
        assert!(bad.validate().unwrap_err().contains("powers of two"));
        let bad = GeneratorSpec { frame_bytes: [128, 9018], ..GeneratorSpec::default() };
        assert!(bad.validate().unwrap_err().contains("imix"));
        let bad = GeneratorSpec { processes: vec![Process::ClosedLoop], ..GeneratorSpec::default() };
        assert!(bad.validate().unwrap_err().contains("closed-loop"));
        GeneratorSpec::default().validate().unwrap();
    }
}
