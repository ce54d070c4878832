//! Observations: only what a live host can measure, split by where it is measured.
//!
//! The hypervisor sees the physical NIC, each VM's backend interface and the host CPUs
//! ([`HostObs`]); each guest sees its frontend and its vCPU ([`GuestObs`]). Neither side reads the
//! other's counters, so a policy deployed on one side acts on its side's part alone.
//!
//! Each side has a flat feature vector whose entries are named and documented in
//! [`HOST_FEATURES`], [`BACKEND_FEATURES`] and [`GUEST_FEATURES`]. Rates enter as
//! `ln(1 + rate / unit)` so that 1 kpps and 1 Mpps are both visible to a network, sizes as a fraction
//! of 1500 bytes, utilisations in `[0, 1]` and knobs through [`ActionSpace::encode_layer`], in
//! `[-1, 1]`. Every feature has a documented range that [`crate::check_env`] enforces.

use serde::{Deserialize, Serialize};

use crate::HostProfile;
use crate::settings::{ActionSpace, Knobs, LayerKind, NapiParams};

/// One named, documented entry of a flat feature vector.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Feature {
    pub name: &'static str,
    pub doc: &'static str,
    /// Inclusive range of the value.
    pub lo: f32,
    pub hi: f32,
}

const fn f(name: &'static str, doc: &'static str, lo: f32, hi: f32) -> Feature {
    Feature { name, doc, lo, hi }
}

/// Upper bound of a `ln(1 + pps / 1000)` feature: 100 Mpps, far above any 100 GbE link.
pub const LN_KPPS_MAX: f32 = 11.6;
/// Upper bound of a `ln(1 + per_s / 1000)` notification-rate feature.
pub const LN_KRATE_MAX: f32 = 11.6;
/// Upper bound of a `ln(1 + us)` latency feature: about 100 s.
pub const LN_US_MAX: f32 = 18.5;
/// Upper bound of a bytes-per-packet feature (64 KiB GSO packets / 1500).
pub const SIZE_MAX: f32 = 44.0;

/// Features of the host side that are not per VM.
pub const HOST_FEATURES: &[Feature] = &[
    f("nic.rx_kpps_ln", "ln(1 + NIC rx packets/s / 1000)", 0.0, LN_KPPS_MAX),
    f("nic.tx_kpps_ln", "ln(1 + NIC tx packets/s / 1000)", 0.0, LN_KPPS_MAX),
    f("nic.rx_size", "NIC mean rx bytes per packet / 1500 (0 when idle)", 0.0, SIZE_MAX),
    f("nic.tx_size", "NIC mean tx bytes per packet / 1500 (0 when idle)", 0.0, SIZE_MAX),
    f("nic.irq_krate_ln", "ln(1 + NIC interrupts/s / 1000), all queues, rx and tx", 0.0, LN_KRATE_MAX),
    f("nic.drop_kpps_ln", "ln(1 + NIC rx drops/s / 1000) (ring overflow, rx_missed)", 0.0, LN_KPPS_MAX),
    f("nic.rx_usecs", "current NIC rx-usecs, encoded by the action space", -1.0, 1.0),
    f("nic.rx_frames", "current NIC rx-frames, encoded", -1.0, 1.0),
    f("nic.tx_usecs", "current NIC tx-usecs, encoded", -1.0, 1.0),
    f("nic.tx_frames", "current NIC tx-frames, encoded", -1.0, 1.0),
    f("nic.napi_defer", "current NIC napi_defer_hard_irqs, encoded by the action space", -1.0, 1.0),
    f("nic.napi_timeout", "current NIC gro_flush_timeout, encoded", -1.0, 1.0),
    f("host.cpu_irq", "host CPU share in irq + softirq, averaged over the host cores", 0.0, 1.0),
    f("host.cpu_other", "host CPU share busy outside irq/softirq (backend threads, ...)", 0.0, 1.0),
    f("host.probe_present", "1 when a host-side latency probe answered this interval", 0.0, 1.0),
    f("host.probe_p50_ln", "ln(1 + host probe p50 latency in µs); 0 when absent", 0.0, LN_US_MAX),
    f("host.probe_p99_ln", "ln(1 + host probe p99 latency in µs); 0 when absent", 0.0, LN_US_MAX),
    f(
        "host.slo_present",
        "1 when some VM on the host has a latency objective (operator intent, configured)",
        0.0,
        1.0,
    ),
    f(
        "host.slo_tightest_ln",
        "ln(1 + the tightest p99 target of the host's VMs in µs); 0 when none has one",
        0.0,
        LN_US_MAX,
    ),
    f(
        "host.backend_coalescing",
        "1 when the host's backends take ethtool coalescing (its profile, configured)",
        0.0,
        1.0,
    ),
    f("host.guest_coalescing", "1 when the host's guests take ethtool coalescing (its profile)", 0.0, 1.0),
];

/// Features of one VM's backend interface, as the host sees it (rx: towards the guest).
pub const BACKEND_FEATURES: &[Feature] = &[
    f("backend.rx_kpps_ln", "ln(1 + packets/s the backend passed to the guest / 1000)", 0.0, LN_KPPS_MAX),
    f("backend.tx_kpps_ln", "ln(1 + packets/s the backend took from the guest / 1000)", 0.0, LN_KPPS_MAX),
    f("backend.rx_size", "mean bytes per packet towards the guest / 1500", 0.0, SIZE_MAX),
    f("backend.tx_size", "mean bytes per packet from the guest / 1500", 0.0, SIZE_MAX),
    f("backend.drop_kpps_ln", "ln(1 + backend drops/s / 1000) (queue or guest ring full)", 0.0, LN_KPPS_MAX),
    f("backend.rx_usecs", "current backend rx-usecs (notifications to the guest), encoded", -1.0, 1.0),
    f("backend.rx_frames", "current backend rx-frames, encoded", -1.0, 1.0),
    f("backend.tx_usecs", "current backend tx-usecs (tx completions to the guest), encoded", -1.0, 1.0),
    f("backend.tx_frames", "current backend tx-frames, encoded", -1.0, 1.0),
    f(
        "backend.slo_present",
        "1 when this VM has a latency objective (operator intent, configured)",
        0.0,
        1.0,
    ),
    f("backend.slo_ln", "ln(1 + this VM's p99 target in µs); 0 when it has none", 0.0, LN_US_MAX),
];

/// Features of one guest: its frontend interface and its vCPU.
pub const GUEST_FEATURES: &[Feature] = &[
    f("frontend.rx_kpps_ln", "ln(1 + frontend rx packets/s / 1000)", 0.0, LN_KPPS_MAX),
    f("frontend.tx_kpps_ln", "ln(1 + frontend tx packets/s / 1000)", 0.0, LN_KPPS_MAX),
    f("frontend.rx_size", "mean rx bytes per packet / 1500", 0.0, SIZE_MAX),
    f("frontend.tx_size", "mean tx bytes per packet / 1500", 0.0, SIZE_MAX),
    f(
        "frontend.rx_irq_krate_ln",
        "ln(1 + rx interrupts/s / 1000) (virtio input / netfront rx)",
        0.0,
        LN_KRATE_MAX,
    ),
    f(
        "frontend.tx_irq_krate_ln",
        "ln(1 + tx interrupts/s / 1000) (virtio output / netfront tx)",
        0.0,
        LN_KRATE_MAX,
    ),
    f("frontend.drop_kpps_ln", "ln(1 + guest drops/s / 1000) (socket buffers, rings)", 0.0, LN_KPPS_MAX),
    f("frontend.rx_usecs", "current frontend rx-usecs (delivery to the stack), encoded", -1.0, 1.0),
    f("frontend.rx_frames", "current frontend rx-frames, encoded", -1.0, 1.0),
    f("frontend.tx_usecs", "current frontend tx-usecs (kicks to the backend), encoded", -1.0, 1.0),
    f("frontend.tx_frames", "current frontend tx-frames, encoded", -1.0, 1.0),
    f("frontend.napi_defer", "current frontend napi_defer_hard_irqs, encoded", -1.0, 1.0),
    f("frontend.napi_timeout", "current frontend gro_flush_timeout, encoded", -1.0, 1.0),
    f("guest.coalescing", "1 when this guest's frontend takes ethtool coalescing (its profile)", 0.0, 1.0),
    f("guest.cpu_irq", "guest vCPU share in irq + softirq", 0.0, 1.0),
    f("guest.cpu_other", "guest vCPU share busy outside irq/softirq (stack, application)", 0.0, 1.0),
    f("guest.probe_present", "1 when the application latency probe reported this interval", 0.0, 1.0),
    f("guest.probe_p50_ln", "ln(1 + application probe p50 latency in µs); 0 when absent", 0.0, LN_US_MAX),
    f("guest.probe_p99_ln", "ln(1 + application probe p99 latency in µs); 0 when absent", 0.0, LN_US_MAX),
    f(
        "guest.slo_present",
        "1 when this guest has a latency objective (operator intent, configured)",
        0.0,
        1.0,
    ),
    f("guest.slo_ln", "ln(1 + this guest's p99 target in µs); 0 when it has none", 0.0, LN_US_MAX),
];

/// Counters of one network interface over one control interval, as rates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct InterfaceObs {
    pub rx_pps: f64,
    pub tx_pps: f64,
    pub rx_bytes_per_s: f64,
    pub tx_bytes_per_s: f64,
    /// Receive-side notifications per second; `None` where the host cannot see them.
    pub rx_irq_per_s: Option<f64>,
    /// Transmit-side notifications per second; for a NIC with combined queues the total goes in
    /// `rx_irq_per_s` and this is `Some(0.0)`.
    pub tx_irq_per_s: Option<f64>,
    pub drops_per_s: f64,
    /// Knobs in force at the end of the interval (an adaptive mode reports its current profile);
    /// `None` where they cannot be read.
    pub rx_knobs: Option<Knobs>,
    pub tx_knobs: Option<Knobs>,
    /// NAPI deferral in force; `None` where it cannot be read (and on a backend, which has none).
    #[serde(default)]
    pub napi: Option<NapiParams>,
}

impl InterfaceObs {
    fn size(bytes_per_s: f64, pps: f64) -> f32 {
        if pps > 0.0 { ((bytes_per_s / pps) / 1500.0).clamp(0.0, f64::from(SIZE_MAX)) as f32 } else { 0.0 }
    }

    fn knob_features(&self, space: &ActionSpace, kind: LayerKind) -> [f32; 4] {
        let rx = self.rx_knobs.unwrap_or(Knobs::PER_PACKET);
        let tx = self.tx_knobs.unwrap_or(Knobs::PER_PACKET);
        space.encode_layer(kind, rx, tx)
    }

    fn napi_features(&self, space: &ActionSpace) -> [f32; 2] {
        space.encode_napi(self.napi.unwrap_or(NapiParams::OFF))
    }

    /// Notifications per second in both directions, where known.
    pub fn irq_per_s(&self) -> Option<f64> {
        match (self.rx_irq_per_s, self.tx_irq_per_s) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0.0) + b.unwrap_or(0.0)),
        }
    }
}

/// CPU utilisation over one interval, as shares of the CPUs observed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuObs {
    /// Share of time in hard and soft interrupt context.
    pub irq: f64,
    /// Share of time busy outside interrupt context.
    pub other: f64,
}

/// Latency percentiles from a probe, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ProbeObs {
    pub p50_us: f64,
    pub p99_us: f64,
    pub samples: u64,
}

/// What the hypervisor measures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HostObs {
    pub nic: InterfaceObs,
    /// One per VM, in VM order.
    pub backends: Vec<InterfaceObs>,
    pub cpu: CpuObs,
    /// A host-side latency probe, where configured and answered this interval.
    pub probe: Option<ProbeObs>,
    /// Each VM's p99 target (µs), in VM order; `None` for a VM without a latency objective.
    /// Configured by the operator, not measured.
    #[serde(default)]
    pub slo_p99_us: Vec<Option<f64>>,
    /// The host's moderation mechanisms (configured, or the simulated scenario's).
    #[serde(default)]
    pub profile: HostProfile,
}

/// What one guest measures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GuestObs {
    pub frontend: InterfaceObs,
    pub cpu: CpuObs,
    pub probe: Option<ProbeObs>,
    /// This guest's p99 target (µs); `None` without a latency objective. Configured, not measured.
    #[serde(default)]
    pub slo_p99_us: Option<f64>,
    /// The host's moderation mechanisms, as the guest is told (its deploy config).
    #[serde(default)]
    pub profile: HostProfile,
}

/// One control interval's observation, by side.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Observation {
    /// Simulated or wall-clock length of the interval that produced this observation.
    pub interval_ns: u64,
    pub host: HostObs,
    pub guests: Vec<GuestObs>,
}

/// `cur` raised towards `peak` by `decay` of the gap where `peak` is higher: a peak of the
/// recent intervals that decays geometrically towards the present.
fn held(cur: f64, peak: f64, decay: f64) -> f64 {
    if peak > cur { cur + decay * (peak - cur) } else { cur }
}

fn held_opt(cur: Option<f64>, peak: Option<f64>, decay: f64) -> Option<f64> {
    match (cur, peak) {
        (Some(c), Some(p)) => Some(held(c, p, decay)),
        _ => cur,
    }
}

impl InterfaceObs {
    fn held(&self, peak: &InterfaceObs, decay: f64) -> InterfaceObs {
        InterfaceObs {
            rx_pps: held(self.rx_pps, peak.rx_pps, decay),
            tx_pps: held(self.tx_pps, peak.tx_pps, decay),
            rx_bytes_per_s: held(self.rx_bytes_per_s, peak.rx_bytes_per_s, decay),
            tx_bytes_per_s: held(self.tx_bytes_per_s, peak.tx_bytes_per_s, decay),
            rx_irq_per_s: held_opt(self.rx_irq_per_s, peak.rx_irq_per_s, decay),
            tx_irq_per_s: held_opt(self.tx_irq_per_s, peak.tx_irq_per_s, decay),
            drops_per_s: held(self.drops_per_s, peak.drops_per_s, decay),
            ..*self
        }
    }
}

impl CpuObs {
    fn held(&self, peak: &CpuObs, decay: f64) -> CpuObs {
        CpuObs { irq: held(self.irq, peak.irq, decay), other: held(self.other, peak.other, decay) }
    }
}

fn held_probe(cur: &Option<ProbeObs>, peak: &Option<ProbeObs>, decay: f64) -> Option<ProbeObs> {
    match (cur, peak) {
        (Some(c), Some(p)) if c.samples > 0 && p.samples > 0 => Some(ProbeObs {
            p50_us: held(c.p50_us, p.p50_us, decay),
            p99_us: held(c.p99_us, p.p99_us, decay),
            samples: c.samples,
        }),
        _ => *cur,
    }
}

impl Observation {
    /// This interval's observation with every measured quantity (rates, notifications, drops,
    /// CPU shares, probe percentiles) held at a decaying peak of the recent intervals: `peak` is
    /// the value this returned one interval earlier, and each quantity is the current one raised
    /// by `decay` of its gap to `peak`'s where `peak`'s is higher. What is configured or in
    /// force (knobs, deferral, targets, profile) is the current interval's. A `peak` with another
    /// number of VMs (or none) is ignored: the result is `self`.
    pub fn held_peak(&self, peak: &Observation, decay: f64) -> Observation {
        if peak.guests.len() != self.guests.len() || peak.host.backends.len() != self.host.backends.len() {
            return self.clone();
        }
        let h = &self.host;
        Observation {
            interval_ns: self.interval_ns,
            host: HostObs {
                nic: h.nic.held(&peak.host.nic, decay),
                backends: h.backends.iter().zip(&peak.host.backends).map(|(c, p)| c.held(p, decay)).collect(),
                cpu: h.cpu.held(&peak.host.cpu, decay),
                probe: held_probe(&h.probe, &peak.host.probe, decay),
                slo_p99_us: h.slo_p99_us.clone(),
                profile: h.profile,
            },
            guests: self
                .guests
                .iter()
                .zip(&peak.guests)
                .map(|(c, p)| GuestObs {
                    frontend: c.frontend.held(&p.frontend, decay),
                    cpu: c.cpu.held(&p.cpu, decay),
                    probe: held_probe(&c.probe, &p.probe, decay),
                    slo_p99_us: c.slo_p99_us,
                    profile: c.profile,
                })
                .collect(),
        }
    }
}

fn ln_k(rate: f64, hi: f32) -> f32 {
    (rate.max(0.0) / 1000.0).ln_1p().min(f64::from(hi)) as f32
}

fn ln_us(us: f64) -> f32 {
    us.max(0.0).ln_1p().min(f64::from(LN_US_MAX)) as f32
}

fn share(x: f64) -> f32 {
    x.clamp(0.0, 1.0) as f32
}

/// `[present, ln(1 + target)]` of one latency objective.
fn slo_features(t: Option<f64>) -> [f32; 2] {
    match t {
        Some(t) => [1.0, ln_us(t)],
        None => [0.0, 0.0],
    }
}

fn probe_features(p: &Option<ProbeObs>) -> [f32; 3] {
    match p {
        Some(p) if p.samples > 0 => [1.0, ln_us(p.p50_us), ln_us(p.p99_us)],
        _ => [0.0, 0.0, 0.0],
    }
}

impl HostObs {
    /// The host's own features ([`HOST_FEATURES`]).
    pub fn features(&self, space: &ActionSpace) -> Vec<f32> {
        let n = &self.nic;
        let mut v = Vec::with_capacity(HOST_FEATURES.len());
        v.extend([
            ln_k(n.rx_pps, LN_KPPS_MAX),
            ln_k(n.tx_pps, LN_KPPS_MAX),
            InterfaceObs::size(n.rx_bytes_per_s, n.rx_pps),
            InterfaceObs::size(n.tx_bytes_per_s, n.tx_pps),
            ln_k(n.irq_per_s().unwrap_or(0.0), LN_KRATE_MAX),
            ln_k(n.drops_per_s, LN_KPPS_MAX),
        ]);
        v.extend(n.knob_features(space, LayerKind::Nic));
        v.extend(n.napi_features(space));
        v.extend([share(self.cpu.irq), share(self.cpu.other)]);
        v.extend(probe_features(&self.probe));
        v.extend(slo_features(self.slo_p99_us.iter().flatten().copied().reduce(f64::min)));
        let has = |k: LayerKind| if self.profile.mechanisms(k).coalescing { 1.0 } else { 0.0 };
        v.extend([has(LayerKind::Backend), has(LayerKind::Frontend)]);
        debug_assert_eq!(v.len(), HOST_FEATURES.len());
        v
    }

    /// VM `vm`'s backend features ([`BACKEND_FEATURES`]).
    pub fn backend_features(&self, space: &ActionSpace, vm: usize) -> Vec<f32> {
        let b = &self.backends[vm];
        let mut v = Vec::with_capacity(BACKEND_FEATURES.len());
        v.extend([
            ln_k(b.rx_pps, LN_KPPS_MAX),
            ln_k(b.tx_pps, LN_KPPS_MAX),
            InterfaceObs::size(b.rx_bytes_per_s, b.rx_pps),
            InterfaceObs::size(b.tx_bytes_per_s, b.tx_pps),
            ln_k(b.drops_per_s, LN_KPPS_MAX),
        ]);
        v.extend(b.knob_features(space, LayerKind::Backend));
        v.extend(slo_features(self.slo_p99_us.get(vm).copied().flatten()));
        debug_assert_eq!(v.len(), BACKEND_FEATURES.len());
        v
    }
}

impl GuestObs {
    /// This guest's features ([`GUEST_FEATURES`]).
    pub fn features(&self, space: &ActionSpace) -> Vec<f32> {
        let fe = &self.frontend;
        let mut v = Vec::with_capacity(GUEST_FEATURES.len());
        v.extend([
            ln_k(fe.rx_pps, LN_KPPS_MAX),
            ln_k(fe.tx_pps, LN_KPPS_MAX),
            InterfaceObs::size(fe.rx_bytes_per_s, fe.rx_pps),
            InterfaceObs::size(fe.tx_bytes_per_s, fe.tx_pps),
            ln_k(fe.rx_irq_per_s.unwrap_or(0.0), LN_KRATE_MAX),
            ln_k(fe.tx_irq_per_s.unwrap_or(0.0), LN_KRATE_MAX),
            ln_k(fe.drops_per_s, LN_KPPS_MAX),
        ]);
        v.extend(fe.knob_features(space, LayerKind::Frontend));
        v.extend(fe.napi_features(space));
        v.push(if self.profile.mechanisms(LayerKind::Frontend).coalescing { 1.0 } else { 0.0 });
        v.extend([share(self.cpu.irq), share(self.cpu.other)]);
        v.extend(probe_features(&self.probe));
        v.extend(slo_features(self.slo_p99_us));
        debug_assert_eq!(v.len(), GUEST_FEATURES.len());
        v
    }
}

/// Names of a feature list, for model files and error messages.
pub fn feature_names(list: &[Feature]) -> Vec<String> {
    list.iter().map(|f| f.name.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A burst's rates and p99 are held into the lull after it, decaying by `decay` of the gap
    /// per interval; what is in force (knobs, targets) is always the current interval's, and a
    /// quantity that rises is the current one at once.
    #[test]
    fn a_held_peak_carries_a_burst_into_the_lull_after_it() {
        let obs = |pps: f64, p99: f64, usecs: u32| {
            let nic = InterfaceObs {
                rx_pps: pps,
                rx_irq_per_s: Some(pps / 4.0),
                rx_knobs: Some(Knobs::new(usecs, 8)),
                ..Default::default()
            };
            let probe = Some(ProbeObs { p50_us: p99 / 2.0, p99_us: p99, samples: 100 });
            Observation {
                interval_ns: 10_000_000,
                host: HostObs {
                    nic,
                    backends: vec![nic],
                    slo_p99_us: vec![Some(200.0)],
                    ..Default::default()
                },
                guests: vec![GuestObs {
                    frontend: nic,
                    probe,
                    slo_p99_us: Some(200.0),
                    ..Default::default()
                }],
            }
        };
        let burst = obs(70_000.0, 180.0, 64);
        let lull = obs(5_000.0, 40.0, 8);
        let p1 = lull.held_peak(&burst, 0.75);
        assert_eq!(p1.host.nic.rx_pps, 5_000.0 + 0.75 * 65_000.0);
        assert_eq!(p1.host.nic.rx_irq_per_s, Some(1_250.0 + 0.75 * 16_250.0));
        assert_eq!(p1.guests[0].probe.unwrap().p99_us, 40.0 + 0.75 * 140.0);
        assert_eq!(p1.guests[0].frontend.rx_pps, p1.host.nic.rx_pps);
        assert_eq!(p1.host.nic.rx_knobs, Some(Knobs::new(8, 8)), "knobs in force are the current ones");
        let p2 = lull.held_peak(&p1, 0.75);
        assert!((p2.host.nic.rx_pps - (5_000.0 + 0.75 * 0.75 * 65_000.0)).abs() < 1e-6);
        // A rise is taken at once, and decay 0 is the current interval.
        assert_eq!(burst.held_peak(&p2, 0.75), burst);
        assert_eq!(lull.held_peak(&burst, 0.0), lull);
        // Another number of VMs: the peak is ignored.
        let mut two = lull.clone();
        two.guests.push(two.guests[0].clone());
        two.host.backends.push(two.host.nic);
        assert_eq!(two.held_peak(&burst, 0.75), two);
    }

    #[test]
    fn feature_names_are_unique_and_ranges_ordered() {
        for list in [HOST_FEATURES, BACKEND_FEATURES, GUEST_FEATURES] {
            let mut names: Vec<_> = list.iter().map(|f| f.name).collect();
            names.sort_unstable();
            names.dedup();
            assert_eq!(names.len(), list.len());
            assert!(list.iter().all(|f| f.lo < f.hi && !f.doc.is_empty()));
        }
    }

    #[test]
    fn idle_observation_is_in_range_and_absent_probe_is_flagged() {
        let sp = ActionSpace::default();
        let host = HostObs { backends: vec![InterfaceObs::default()], ..Default::default() };
        let v = host.features(&sp);
        assert_eq!(v.len(), HOST_FEATURES.len());
        let present = HOST_FEATURES.iter().position(|f| f.name == "host.probe_present").unwrap();
        assert_eq!(v[present], 0.0);
        // Idle: no division by zero for sizes.
        assert!(v.iter().all(|x| x.is_finite()));
    }

    #[test]
    fn objectives_enter_as_configured_and_the_host_sees_its_tightest() {
        let sp = ActionSpace::default();
        let col = |list: &[Feature], name: &str| list.iter().position(|f| f.name == name).unwrap();
        let host = HostObs {
            backends: vec![InterfaceObs::default(); 3],
            slo_p99_us: vec![Some(300.0), None, Some(80.0)],
            ..Default::default()
        };
        let h = host.features(&sp);
        assert_eq!(h[col(HOST_FEATURES, "host.slo_present")], 1.0);
        assert_eq!(h[col(HOST_FEATURES, "host.slo_tightest_ln")], 81f32.ln());
        let (p, t) = (col(BACKEND_FEATURES, "backend.slo_present"), col(BACKEND_FEATURES, "backend.slo_ln"));
        let b0 = host.backend_features(&sp, 0);
        assert_eq!((b0[p], b0[t]), (1.0, 301f32.ln()));
        let b1 = host.backend_features(&sp, 1);
        assert_eq!((b1[p], b1[t]), (0.0, 0.0), "a VM without an objective");
        // No VM with an objective (or a host that knows none).
        let idle = HostObs { backends: vec![InterfaceObs::default()], ..Default::default() };
        assert_eq!(idle.features(&sp)[col(HOST_FEATURES, "host.slo_present")], 0.0);
        assert_eq!(idle.backend_features(&sp, 0)[p], 0.0);
        let g = GuestObs { slo_p99_us: Some(2000.0), ..Default::default() }.features(&sp);
        assert_eq!(g[col(GUEST_FEATURES, "guest.slo_present")], 1.0);
        assert_eq!(g[col(GUEST_FEATURES, "guest.slo_ln")], 2001f32.ln());
    }
}
