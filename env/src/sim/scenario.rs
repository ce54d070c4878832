//! Scenarios: one simulated host, read from TOML.
//!
//! A scenario fixes the host (cores, rings, line rate, backend kind), the costs (defaults from
//! SIMULATOR.md, each overridable) and the VMs with their traffic. Files live under
//! `experiments/scenarios/`; every key is documented in `experiments/scenarios/README.md`.
//! Unknown keys are errors, and every error names the file, the key and what to do.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::env::EnvError;

/// One simulated host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Short name, used in reports.
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub host: HostConfig,
    #[serde(default)]
    pub costs: Costs,
    /// The VMs sharing the NIC; at least one.
    #[serde(rename = "vm")]
    pub vms: Vec<VmConfig>,
}

/// The hypervisor and its NIC.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HostConfig {
    /// Host (driver-domain) cores that run the NIC driver and the backends.
    pub cpus: usize,
    /// Core that takes the NIC's interrupts.
    pub nic_cpu: usize,
    /// Wire speed, Gbit/s, both directions.
    pub line_rate_gbps: f64,
    /// NIC rx and tx descriptor rings.
    pub nic_rx_ring: usize,
    pub nic_tx_ring: usize,
    /// Packets the upstream switch port buffers when arrivals exceed the line rate; beyond it
    /// arrivals are dropped before the NIC.
    pub switch_buffer: usize,
    /// Most packets a backend worker or the sending application moves per run (NAPI weight /
    /// vhost batch).
    pub worker_batch: u32,
    /// Backend kind: sets the default backend per-packet cost.
    pub backend: BackendKind,
    /// The moderation mechanisms of each layer ([`crate::HostProfile`]: `kvm-notf-coal`,
    /// `kvm-vhost`, `xen`). Absent: every layer has ethtool's knobs and the NIC and frontend NAPI
    /// deferral, on either backend (the model before profiles; the `kvm-notf-coal` mechanisms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<crate::HostProfile>,
    /// Whether virtual interrupts are posted (APICv / posted interrupts: no VM exit).
    pub posted_interrupts: bool,
    /// NAPI on the NIC's rx and tx-completion interrupts and the guest's rx and tx-completion
    /// notifications, as every Linux NIC driver, virtio-net and netfront since 2.6 (see
    /// `sim::napi`). `false` restores the pre-NAPI model: every notification is its own job, the
    /// kernel of Mogul & Ramakrishnan (1997), for drivers without NAPI.
    pub napi: bool,
    /// Most items one NAPI poll takes (`NAPI_POLL_WEIGHT`, 64 in Linux).
    pub napi_weight: u32,
    /// Packets one softirq round (`net_rx_action`) may poll: `net.core.netdev_budget`, 300.
    pub netdev_budget: u32,
    /// Softirq restarts before the rest is left to ksoftirqd (`MAX_SOFTIRQ_RESTART`, 10).
    pub softirq_max_restart: u32,
    /// Time softirq processing may run in interrupt context before ksoftirqd takes over,
    /// microseconds (`MAX_SOFTIRQ_TIME` = 2 ms; `netdev_budget_usecs` defaults to the same).
    pub softirq_max_time_us: u64,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            cpus: 2,
            nic_cpu: 0,
            line_rate_gbps: 10.0,
            nic_rx_ring: 512,
            nic_tx_ring: 512,
            switch_buffer: 1024,
            worker_batch: 64,
            backend: BackendKind::Vhost,
            profile: None,
            posted_interrupts: false,
            napi: true,
            napi_weight: 64,
            netdev_budget: 300,
            softirq_max_restart: 10,
            softirq_max_time_us: 2000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Xen netback: grant copies, 2.0 µs per packet.
    Xen,
    /// vhost-net: 0.8 µs per packet.
    Vhost,
}

/// How per-packet costs are drawn.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceDist {
    /// Every packet costs exactly the configured mean (the default).
    #[default]
    Deterministic,
    /// Exponentially distributed with the configured mean (for queueing validation).
    Exponential,
}

/// CPU costs at a 3 GHz reference core, microseconds unless the name says otherwise. Defaults and
/// their sources are in SIMULATOR.md; `None` means "the default for this host".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Costs {
    /// L1 hardware interrupt + NAPI schedule, host (Tsafrir 2007).
    pub nic_irq_us: f64,
    /// L1 driver per packet, rx and tx (Brouer's 10 GbE budget analyses).
    pub nic_per_packet_us: f64,
    /// Backend per packet: grant copy (Xen, 2.0) or vhost copy + bridge (0.8) (Apparao 2006,
    /// Menon 2006). Default by `host.backend`.
    pub backend_per_packet_us: Option<f64>,
    /// Virtual interrupt into the guest without posted interrupts: two VM exits.
    pub virq_us: f64,
    /// Virtual interrupt with posted interrupts (APICv, no exit).
    pub virq_posted_us: f64,
    /// Guest tx kick (ioeventfd / event channel), on the vCPU.
    pub kick_us: f64,
    /// Backend worker wake-up when a kick finds it idle, on the host.
    pub backend_wakeup_us: f64,
    /// Frontend driver per packet (virtio-net / netfront), rx and tx completion.
    pub frontend_per_packet_us: f64,
    /// Guest stack per packet (copy-dominated, Cai 2021) ...
    pub stack_per_packet_us: f64,
    /// ... plus this per byte, nanoseconds.
    pub stack_per_byte_ns: f64,
    /// Waking the application for a delivery batch (try_to_wake_up + context switch).
    pub app_wakeup_us: f64,
    /// Latency before a halted vCPU runs again when a notification arrives (IPI, scheduling,
    /// VM entry; the reason KVM has halt-polling). Latency only: no guest CPU time.
    pub vcpu_wakeup_us: f64,
    /// A NAPI poll's fixed cost besides its packets, host NIC driver: the poll call, the GRO
    /// flush and, on the poll that completes, re-enabling the interrupt (an MMIO write). Paid by
    /// every poll that no interrupt scheduled (`nic_irq_us` covers the one that did), empty
    /// ones included; only with `host.napi`.
    pub nic_poll_us: f64,
    /// The same in the guest's frontend (virtio-net / netfront: re-enabling callbacks is a
    /// `used_event` write and a ring re-check).
    pub frontend_poll_us: f64,
    /// The host's deferral timer (NAPI deferral's hrtimer: arming it and its interrupt), paid by
    /// each poll the timer schedules on top of `nic_poll_us`. (This and `guest_timer_us` are
    /// written out only when they differ from the default, so that the scenarios of before keep
    /// their serialised form: the best-static cache is keyed by it.)
    #[serde(skip_serializing_if = "is_default_host_timer")]
    pub host_timer_us: f64,
    /// The same in the guest: the TSC-deadline write that arms the timer and its expiry are VM
    /// exits on a host without an exitless timer, so it costs about two exits.
    #[serde(skip_serializing_if = "is_default_guest_timer")]
    pub guest_timer_us: f64,
    /// `sriov-vf`: the guest's tx doorbell to its VF, an MMIO write to a BAR mapped into the
    /// guest (no VM exit; it replaces `kick_us` there). Written out only when not the default.
    #[serde(skip_serializing_if = "is_default_vf_doorbell")]
    pub vf_doorbell_us: f64,
    /// Distribution of per-packet costs.
    pub service: ServiceDist,
}

impl Default for Costs {
    fn default() -> Self {
        Costs {
            nic_irq_us: 1.0,
            nic_per_packet_us: 0.3,
            backend_per_packet_us: None,
            virq_us: 2.5,
            virq_posted_us: 0.4,
            kick_us: 1.0,
            backend_wakeup_us: 3.0,
            frontend_per_packet_us: 0.7,
            stack_per_packet_us: 1.0,
            stack_per_byte_ns: 0.1,
            app_wakeup_us: 0.5,
            vcpu_wakeup_us: 8.0,
            nic_poll_us: 0.25,
            frontend_poll_us: 0.25,
            host_timer_us: 0.5,
            guest_timer_us: 2.0,
            vf_doorbell_us: 0.2,
            service: ServiceDist::Deterministic,
        }
    }
}

fn is_default_host_timer(v: &f64) -> bool {
    v.to_bits() == Costs::default().host_timer_us.to_bits()
}

fn is_default_guest_timer(v: &f64) -> bool {
    v.to_bits() == Costs::default().guest_timer_us.to_bits()
}

fn is_default_vf_doorbell(v: &f64) -> bool {
    v.to_bits() == Costs::default().vf_doorbell_us.to_bits()
}

impl Costs {
    pub fn backend_per_packet(&self, kind: BackendKind) -> f64 {
        self.backend_per_packet_us.unwrap_or(match kind {
            BackendKind::Xen => 2.0,
            BackendKind::Vhost => 0.8,
        })
    }

    pub fn virq(&self, posted: bool) -> f64 {
        if posted { self.virq_posted_us } else { self.virq_us }
    }

    /// These costs with every virtualization cost set to zero: what the same host would spend
    /// natively. Used for calibration.
    pub fn native(&self) -> Costs {
        Costs {
            backend_per_packet_us: Some(0.0),
            virq_us: 0.0,
            virq_posted_us: 0.0,
            kick_us: 0.0,
            backend_wakeup_us: 0.0,
            frontend_per_packet_us: 0.0,
            frontend_poll_us: 0.0,
            guest_timer_us: 0.0,
            vcpu_wakeup_us: 0.0,
            ..self.clone()
        }
    }
}

/// One VM: its rings, its cores and its traffic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub name: String,
    /// Host core that runs this VM's backend worker.
    #[serde(default = "d_backend_cpu")]
    pub backend_cpu: usize,
    /// Backend and frontend rings (entries).
    #[serde(default = "d_ring")]
    pub ring: usize,
    /// Backend input queue (the tap / vif queue), packets.
    #[serde(default = "d_ring")]
    pub backend_queue: usize,
    /// Guest socket buffers, rx and tx, packets.
    #[serde(default = "d_socket")]
    pub socket_buffer: usize,
    /// The applications' flows; at least one.
    #[serde(rename = "flow")]
    pub flows: Vec<FlowConfig>,
    /// This VM's latency objective: a p99 target in µs, or `"none"` (throughput only). Absent:
    /// a VM with a latency-sensitive flow is held to the run's SLO (`[sim.reward] slo_p99_us`, an
    /// eval config's `slo_p99_us`), any other VM has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slo_p99_us: Option<Objective>,
}

/// A VM's latency objective, as written in scenario and deploy files: a number of µs, or the
/// string `"none"`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Objective {
    /// A p99 latency target, µs.
    P99Us(f64),
    /// No latency objective: the VM is judged on CPU and throughput only.
    Throughput,
}

impl Objective {
    /// The target in µs, `None` for throughput only.
    pub fn target_us(self) -> Option<f64> {
        match self {
            Objective::P99Us(x) => Some(x),
            Objective::Throughput => None,
        }
    }

    /// Checks the target's range; `key` names it in the message.
    pub fn validate(self, key: &str) -> Result<(), String> {
        match self {
            Objective::P99Us(x)
                if !(x.is_finite() && (1.0..=crate::sim::limits::MAX_SLO_US).contains(&x)) =>
            {
                Err(format!(
                    "{key} = {x}: a p99 target is a number of microseconds in [1, {:e}], or \"none\" for a VM \
                     without a latency objective",
                    crate::sim::limits::MAX_SLO_US
                ))
            }
            _ => Ok(()),
        }
    }
}

impl Serialize for Objective {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Objective::P99Us(x) => s.serialize_f64(*x),
            Objective::Throughput => s.serialize_str("none"),
        }
    }
}

impl<'de> Deserialize<'de> for Objective {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Objective;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a p99 target in microseconds (a number) or \"none\"")
            }
            fn visit_f64<E: serde::de::Error>(self, x: f64) -> Result<Objective, E> {
                Ok(Objective::P99Us(x))
            }
            fn visit_i64<E: serde::de::Error>(self, x: i64) -> Result<Objective, E> {
                Ok(Objective::P99Us(x as f64))
            }
            fn visit_u64<E: serde::de::Error>(self, x: u64) -> Result<Objective, E> {
                Ok(Objective::P99Us(x as f64))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Objective, E> {
                if v == "none" {
                    Ok(Objective::Throughput)
                } else {
                    Err(E::custom(format!(
                        "`{v}`: a latency objective is a p99 target in microseconds (a number) or \"none\""
                    )))
                }
            }
        }
        d.deserialize_any(V)
    }
}

impl VmConfig {
    /// This VM's p99 target in µs under a run whose SLO is `default_us`, `None` where it has no
    /// latency objective (see [`VmConfig::slo_p99_us`]).
    pub fn target_us(&self, default_us: f64) -> Option<f64> {
        match self.slo_p99_us {
            Some(o) => o.target_us(),
            None => self.holds_run_slo().then_some(default_us),
        }
    }

    /// Whether this VM is held to the run's SLO: it sets no objective of its own and has a
    /// latency-sensitive flow.
    pub fn holds_run_slo(&self) -> bool {
        self.slo_p99_us.is_none() && self.flows.iter().any(|f| f.is_latency_sensitive())
    }
}

fn d_backend_cpu() -> usize {
    1
}
fn d_ring() -> usize {
    256
}
fn d_socket() -> usize {
    1024
}

/// What a flow's application does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FlowKind {
    /// Bulk receive: packets arrive on the wire and are delivered to the application.
    Stream,
    /// Bulk transmit: the application sends packets out of the wire.
    BulkTx,
    /// Requests arrive on the wire; each costs application time and produces a response on the
    /// tx path. Latency is the round trip from the request's arrival at the NIC to the response
    /// leaving it.
    RequestResponse,
}

/// One application flow of a VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowConfig {
    pub kind: FlowKind,
    /// Arrivals of data packets (stream), requests (request-response) or sends (bulk-tx).
    pub arrivals: Arrivals,
    /// Frame sizes of those packets.
    #[serde(default = "d_size")]
    pub size: SizeDist,
    /// Response frame sizes (request-response only).
    #[serde(default)]
    pub response_size: Option<SizeDist>,
    /// Application time per packet or request, µs.
    #[serde(default)]
    pub app_us: f64,
    /// Whether the SLO holds this flow's latency; default: request-response only.
    #[serde(default)]
    pub latency_sensitive: Option<bool>,
}

fn d_size() -> SizeDist {
    SizeDist::Fixed { bytes: 1500 }
}

impl FlowConfig {
    pub fn is_latency_sensitive(&self) -> bool {
        self.latency_sensitive.unwrap_or(self.kind == FlowKind::RequestResponse)
    }
}

/// An arrival process. Rates are packets (or requests) per second.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "process", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Arrivals {
    Poisson {
        rate_pps: f64,
    },
    Constant {
        rate_pps: f64,
    },
    /// Two-state Markov-modulated Poisson process: exponential on and off periods.
    OnOff {
        on_rate_pps: f64,
        #[serde(default)]
        off_rate_pps: f64,
        mean_on_ms: f64,
        mean_off_ms: f64,
    },
    /// Poisson with a rate that moves linearly from `from_pps` to `to_pps` over `over_s`, then
    /// stays.
    Ramp {
        from_pps: f64,
        to_pps: f64,
        over_s: f64,
    },
    /// Poisson with rate `mean_pps · (1 + amplitude · sin(2π (t / period_s + phase)))`.
    Diurnal {
        mean_pps: f64,
        amplitude: f64,
        period_s: f64,
        #[serde(default)]
        phase: f64,
    },
    /// Closed loop (request-response only): `clients` clients, each sending its next request an
    /// exponential think time (mean `think_us`) after its previous response left the NIC, as
    /// netperf TCP_RR or a memcached client pool does. A client whose request or response is
    /// dropped retries after `timeout_us`. Throughput then depends on latency.
    ClosedLoop {
        clients: u32,
        #[serde(default)]
        think_us: f64,
        #[serde(default = "d_timeout")]
        timeout_us: f64,
    },
    /// Poisson with a piecewise-constant rate replayed from a CSV file with the header
    /// `time_s,rate_pps` (path relative to the scenario file), scaled by `scale`; it loops.
    Trace {
        path: PathBuf,
        #[serde(default = "one")]
        scale: f64,
        /// Filled in when the scenario is loaded.
        #[serde(skip)]
        points: Vec<(f64, f64)>,
    },
}

fn one() -> f64 {
    1.0
}

fn d_timeout() -> f64 {
    10_000.0
}

impl Arrivals {
    /// The rate at time `t_s` (seconds since reset); for on/off, the long-run mean.
    pub fn rate_at(&self, t_s: f64) -> f64 {
        match self {
            Arrivals::Poisson { rate_pps } | Arrivals::Constant { rate_pps } => *rate_pps,
            Arrivals::OnOff { on_rate_pps, off_rate_pps, mean_on_ms, mean_off_ms } => {
                (on_rate_pps * mean_on_ms + off_rate_pps * mean_off_ms) / (mean_on_ms + mean_off_ms)
            }
            Arrivals::Ramp { from_pps, to_pps, over_s } => {
                let u = if *over_s > 0.0 { (t_s / over_s).clamp(0.0, 1.0) } else { 1.0 };
                from_pps + (to_pps - from_pps) * u
            }
            Arrivals::Diurnal { mean_pps, amplitude, period_s, phase } => {
                mean_pps * (1.0 + amplitude * (std::f64::consts::TAU * (t_s / period_s + phase)).sin())
            }
            Arrivals::Trace { scale, points, .. } => trace_rate(points, t_s) * scale,
            // The rate the clients would reach with zero latency: an upper bound.
            Arrivals::ClosedLoop { clients, think_us, .. } => f64::from(*clients) * 1e6 / think_us.max(1.0),
        }
    }

    /// The largest rate the process ever takes (the thinning bound).
    pub fn max_rate(&self) -> f64 {
        match self {
            Arrivals::Poisson { rate_pps } | Arrivals::Constant { rate_pps } => *rate_pps,
            Arrivals::OnOff { on_rate_pps, off_rate_pps, .. } => on_rate_pps.max(*off_rate_pps),
            Arrivals::Ramp { from_pps, to_pps, .. } => from_pps.max(*to_pps),
            Arrivals::Diurnal { mean_pps, amplitude, .. } => mean_pps * (1.0 + amplitude.abs()),
            Arrivals::Trace { scale, points, .. } => points.iter().map(|p| p.1).fold(0.0, f64::max) * scale,
            Arrivals::ClosedLoop { .. } => self.rate_at(0.0),
        }
    }

    /// Multiplies every rate by `k` (domain randomisation, load sweeps).
    pub fn scale_rate(&mut self, k: f64) {
        match self {
            Arrivals::Poisson { rate_pps } | Arrivals::Constant { rate_pps } => *rate_pps *= k,
            Arrivals::OnOff { on_rate_pps, off_rate_pps, .. } => {
                *on_rate_pps *= k;
                *off_rate_pps *= k;
            }
            Arrivals::Ramp { from_pps, to_pps, .. } => {
                *from_pps *= k;
                *to_pps *= k;
            }
            Arrivals::Diurnal { mean_pps, .. } => *mean_pps *= k,
            Arrivals::Trace { scale, .. } => *scale *= k,
            // More load from a closed loop means more clients.
            Arrivals::ClosedLoop { clients, .. } => {
                *clients = ((f64::from(*clients) * k).round() as u32).max(1)
            }
        }
    }
}

/// The rate of a looping piecewise-constant trace at `t_s`.
fn trace_rate(points: &[(f64, f64)], t_s: f64) -> f64 {
    let Some(last) = points.last() else { return 0.0 };
    // The trace loops with the period of its last time stamp (or is constant if that is 0).
    let t = if last.0 > 0.0 { t_s % last.0 } else { 0.0 };
    let i = points.partition_point(|p| p.0 <= t);
    points[i.saturating_sub(1)].1
}

/// Frame sizes in bytes (Ethernet frame with FCS: 64..=1518 for standard MTU).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "dist", rename_all = "kebab-case", deny_unknown_fields)]
pub enum SizeDist {
    Fixed {
        bytes: u32,
    },
    Bimodal {
        small: u32,
        large: u32,
        p_small: f64,
    },
    /// Simple IMIX: 64, 576 and 1500 bytes in the ratio 7 : 4 : 1.
    Imix,
}

impl SizeDist {
    pub fn mean(&self) -> f64 {
        match self {
            SizeDist::Fixed { bytes } => f64::from(*bytes),
            SizeDist::Bimodal { small, large, p_small } => {
                p_small * f64::from(*small) + (1.0 - p_small) * f64::from(*large)
            }
            SizeDist::Imix => (7.0 * 64.0 + 4.0 * 576.0 + 1500.0) / 12.0,
        }
    }
}

/// Largest frame the simulator carries (jumbo frames).
pub const MAX_FRAME: u32 = 9018;

fn err(path: &Path, message: impl Into<String>) -> EnvError {
    EnvError::Config { path: path.to_path_buf(), message: message.into() }
}

impl Scenario {
    /// The host's profile: `host.profile`, or `kvm-notf-coal` (every mechanism) when absent.
    pub fn profile(&self) -> crate::HostProfile {
        self.host.profile.unwrap_or(crate::HostProfile::KvmNotfCoal)
    }

    /// This host as a host of `profile`: `host.profile` set and the backend made the profile's
    /// (a Xen scenario run as `kvm-vhost` becomes a vhost host with the same costs, except the
    /// backend's per-packet default).
    pub fn with_profile(mut self, profile: crate::HostProfile) -> Scenario {
        self.host.profile = Some(profile);
        self.host.backend = profile.backend();
        self
    }

    /// [`Scenario::with_profile`], validated: the error says which profile the host could not be
    /// run as (`as profile kvm-vhost: …`).
    pub fn as_profile(self, profile: crate::HostProfile) -> Result<Scenario, String> {
        let s = self.with_profile(profile);
        s.validate().map_err(|e| format!("as profile {profile}: {e}"))?;
        Ok(s)
    }

    /// Reads and validates a scenario file; trace paths are resolved against its directory.
    pub fn load(path: impl AsRef<Path>) -> Result<Scenario, EnvError> {
        let path = path.as_ref();
        let text = super::limits::read_config(path).map_err(|e| EnvError::Io {
            context: format!("cannot read scenario {}", path.display()),
            err: e,
        })?;
        Self::from_toml(&text, path)
    }

    /// Parses and validates scenario text; `path` names it in errors and anchors trace paths.
    pub fn from_toml(text: &str, path: &Path) -> Result<Scenario, EnvError> {
        let mut s: Scenario = toml::from_str(text).map_err(|e| {
            err(path, format!("{}\n(see experiments/scenarios/README.md for every key)", e.message().trim()))
                .with_span(text, e.span())
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for (vi, vm) in s.vms.iter_mut().enumerate() {
            for (fi, flow) in vm.flows.iter_mut().enumerate() {
                if let Arrivals::Trace { path: tp, points, .. } = &mut flow.arrivals {
                    let full = if tp.is_absolute() { tp.clone() } else { base.join(&tp) };
                    *points = load_trace(&full).map_err(|m| {
                        err(path, format!("vm[{vi}].flow[{fi}].arrivals.path = {}: {m}", tp.display()))
                    })?;
                }
            }
        }
        s.validate().map_err(|m| err(path, m))?;
        Ok(s)
    }

    /// The scenario as a scenario file: [`Scenario::from_toml`] of it gives this scenario back
    /// (traces are written by [`Scenario::save`]).
    pub fn to_toml(&self) -> Result<String, String> {
        toml::to_string(self).map_err(|e| format!("scenario {}: cannot write it as TOML: {e}", self.name))
    }

    /// Writes the scenario file `path` and, next to it, every trace it replays (each at its
    /// `path`, relative to the file's directory; a trace path that is absolute or leaves that
    /// directory is refused rather than written). Loading `path` gives this scenario back.
    pub fn save(&self, path: &Path) -> Result<(), EnvError> {
        let io = |what: String| move |e: std::io::Error| EnvError::Io { context: what, err: e };
        let text = self.to_toml().map_err(|m| err(path, m))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for (vi, vm) in self.vms.iter().enumerate() {
            for (fi, flow) in vm.flows.iter().enumerate() {
                let Arrivals::Trace { path: tp, points, .. } = &flow.arrivals else { continue };
                if tp.is_absolute() || tp.components().any(|c| !matches!(c, std::path::Component::Normal(_)))
                {
                    return Err(err(
                        path,
                        format!(
                            "vm[{vi}].flow[{fi}].arrivals.path = {}: only a relative path below the scenario's \
                             directory is written",
                            tp.display()
                        ),
                    ));
                }
                let full = base.join(tp);
                if let Some(dir) = full.parent() {
                    std::fs::create_dir_all(dir).map_err(io(format!("cannot create {}", dir.display())))?;
                }
                let mut csv = String::from("time_s,rate_pps\n");
                for (t, r) in points {
                    // `{}` of an f64 is the shortest text that parses back to the same number.
                    csv.push_str(&format!("{t},{r}\n"));
                }
                std::fs::write(&full, csv).map_err(io(format!("cannot write trace {}", full.display())))?;
            }
        }
        std::fs::write(path, text).map_err(io(format!("cannot write scenario {}", path.display())))
    }

    /// Checks values that parse but make no sense; the message names the key and the fix.
    pub fn validate(&self) -> Result<(), String> {
        let h = &self.host;
        if self.vms.is_empty() {
            return Err("no [[vm]] table: a scenario needs at least one VM".into());
        }
        if self.vms.len() > 64 {
            return Err(format!("{} VMs: at most 64 are supported", self.vms.len()));
        }
        if h.worker_batch == 0 {
            return Err("host.worker_batch = 0: a worker must move at least one packet per run".into());
        }
        if h.cpus == 0 {
            return Err("host.cpus = 0: the host needs at least one core".into());
        }
        if h.napi_weight == 0 || h.napi_weight > 4096 {
            return Err(format!(
                "host.napi_weight = {}: a poll takes 1..=4096 items (Linux: 64)",
                h.napi_weight
            ));
        }
        if h.netdev_budget == 0 || h.netdev_budget > 1_000_000 {
            return Err(format!("host.netdev_budget = {}: use 1..=1000000 (Linux: 300)", h.netdev_budget));
        }
        if h.softirq_max_restart > 1000 {
            return Err(format!(
                "host.softirq_max_restart = {}: use 0..=1000 (Linux: 10)",
                h.softirq_max_restart
            ));
        }
        if h.softirq_max_time_us == 0 || h.softirq_max_time_us > 1_000_000 {
            return Err(format!(
                "host.softirq_max_time_us = {}: use 1..=1000000 (Linux: 2000)",
                h.softirq_max_time_us
            ));
        }
        if h.nic_cpu >= h.cpus {
            return Err(format!(
                "host.nic_cpu = {} but host.cpus = {}: use 0..{}",
                h.nic_cpu, h.cpus, h.cpus
            ));
        }
        if let Some(p) = h.profile
            && p.backend() != h.backend
        {
            let b = |k: BackendKind| match k {
                BackendKind::Xen => "xen",
                BackendKind::Vhost => "vhost",
            };
            return Err(format!(
                "host.profile = \"{p}\" runs the {} backend but host.backend = \"{}\" (vhost when absent): \
                 set host.backend = \"{}\" or pick a profile of that backend",
                b(p.backend()),
                b(h.backend),
                b(p.backend())
            ));
        }
        if !(h.line_rate_gbps.is_finite() && h.line_rate_gbps > 0.0) {
            return Err(format!("host.line_rate_gbps = {}: must be a positive number", h.line_rate_gbps));
        }
        for (k, v) in [
            ("host.nic_rx_ring", h.nic_rx_ring),
            ("host.nic_tx_ring", h.nic_tx_ring),
            ("host.switch_buffer", h.switch_buffer),
        ] {
            if v == 0 {
                return Err(format!("{k} = 0: rings and buffers need at least one entry"));
            }
        }
        let c = &self.costs;
        for (k, v) in [
            ("nic_irq_us", c.nic_irq_us),
            ("nic_per_packet_us", c.nic_per_packet_us),
            ("backend_per_packet_us", c.backend_per_packet(h.backend)),
            ("virq_us", c.virq_us),
            ("virq_posted_us", c.virq_posted_us),
            ("kick_us", c.kick_us),
            ("backend_wakeup_us", c.backend_wakeup_us),
            ("frontend_per_packet_us", c.frontend_per_packet_us),
            ("stack_per_packet_us", c.stack_per_packet_us),
            ("stack_per_byte_ns", c.stack_per_byte_ns),
            ("app_wakeup_us", c.app_wakeup_us),
            ("vcpu_wakeup_us", c.vcpu_wakeup_us),
            ("nic_poll_us", c.nic_poll_us),
            ("frontend_poll_us", c.frontend_poll_us),
            ("host_timer_us", c.host_timer_us),
            ("guest_timer_us", c.guest_timer_us),
            ("vf_doorbell_us", c.vf_doorbell_us),
        ] {
            if !(v.is_finite() && (0.0..=1e6).contains(&v)) {
                return Err(format!("costs.{k} = {v}: must be a number of microseconds in [0, 1e6]"));
            }
        }
        for (vi, vm) in self.vms.iter().enumerate() {
            let at = format!("vm[{vi}] ({})", vm.name);
            if let Some(o) = vm.slo_p99_us {
                o.validate(&format!("{at}.slo_p99_us"))?;
            }
            if vm.backend_cpu >= h.cpus {
                return Err(format!(
                    "{at}.backend_cpu = {} but host.cpus = {}: use 0..{} or add host cores",
                    vm.backend_cpu, h.cpus, h.cpus
                ));
            }
            for (k, v) in
                [("ring", vm.ring), ("backend_queue", vm.backend_queue), ("socket_buffer", vm.socket_buffer)]
            {
                if v == 0 {
                    return Err(format!("{at}.{k} = 0: needs at least one entry"));
                }
            }
            if vm.flows.is_empty() {
                return Err(format!("{at} has no [[vm.flow]]: add at least one flow"));
            }
            if vm.flows.len() > 255 {
                return Err(format!("{at} has {} flows: at most 255", vm.flows.len()));
            }
            for (fi, f) in vm.flows.iter().enumerate() {
                let at = format!("{at}.flow[{fi}]");
                check_arrivals(&f.arrivals).map_err(|m| format!("{at}.arrivals: {m}"))?;
                if matches!(f.arrivals, Arrivals::ClosedLoop { .. }) && f.kind != FlowKind::RequestResponse {
                    return Err(format!(
                        "{at}.arrivals: process = \"closed-loop\" needs kind = \"request-response\" (clients wait for responses)"
                    ));
                }
                check_size(&f.size).map_err(|m| format!("{at}.size: {m}"))?;
                if let Some(r) = &f.response_size {
                    if f.kind != FlowKind::RequestResponse {
                        return Err(format!("{at}.response_size is only for kind = \"request-response\""));
                    }
                    check_size(r).map_err(|m| format!("{at}.response_size: {m}"))?;
                }
                if !(f.app_us.is_finite() && f.app_us >= 0.0) {
                    return Err(format!("{at}.app_us = {}: must be >= 0", f.app_us));
                }
            }
        }
        // Upper bounds on every numeric key, and the name (see limits.rs).
        super::limits::check_scenario(self)
    }

    /// Mean offered packet rate of the whole host at time `t_s` (both directions, requests and
    /// responses).
    pub fn offered_pps_at(&self, t_s: f64) -> f64 {
        self.vms
            .iter()
            .flat_map(|v| &v.flows)
            .map(|f| f.arrivals.rate_at(t_s) * if f.kind == FlowKind::RequestResponse { 2.0 } else { 1.0 })
            .sum()
    }
}

fn check_arrivals(a: &Arrivals) -> Result<(), String> {
    let bad = |k: &str, v: f64| Err(format!("{k} = {v}: must be a finite number >= 0"));
    let rate_ok = |v: f64| v.is_finite() && (0.0..=1e9).contains(&v);
    match a {
        Arrivals::Poisson { rate_pps } | Arrivals::Constant { rate_pps } => {
            if !rate_ok(*rate_pps) {
                return bad("rate_pps", *rate_pps);
            }
        }
        Arrivals::OnOff { on_rate_pps, off_rate_pps, mean_on_ms, mean_off_ms } => {
            for (k, v) in [("on_rate_pps", *on_rate_pps), ("off_rate_pps", *off_rate_pps)] {
                if !rate_ok(v) {
                    return bad(k, v);
                }
            }
            for (k, v) in [("mean_on_ms", *mean_on_ms), ("mean_off_ms", *mean_off_ms)] {
                if !(v.is_finite() && v > 0.0) {
                    return Err(format!("{k} = {v}: must be a positive number of milliseconds"));
                }
            }
        }
        Arrivals::Ramp { from_pps, to_pps, over_s } => {
            for (k, v) in [("from_pps", *from_pps), ("to_pps", *to_pps)] {
                if !rate_ok(v) {
                    return bad(k, v);
                }
            }
            if !(over_s.is_finite() && *over_s >= 0.0) {
                return bad("over_s", *over_s);
            }
        }
        Arrivals::Diurnal { mean_pps, amplitude, period_s, phase } => {
            if !rate_ok(*mean_pps) {
                return bad("mean_pps", *mean_pps);
            }
            if !(0.0..=1.0).contains(amplitude) {
                return Err(format!("amplitude = {amplitude}: must be in [0, 1] so the rate stays >= 0"));
            }
            if !(period_s.is_finite() && *period_s > 0.0) {
                return Err(format!("period_s = {period_s}: must be a positive number of seconds"));
            }
            if !phase.is_finite() {
                return bad("phase", *phase);
            }
        }
        Arrivals::ClosedLoop { clients, think_us, timeout_us } => {
            if *clients == 0 || *clients > 100_000 {
                return Err(format!("clients = {clients}: use 1..=100000"));
            }
            if !(think_us.is_finite() && *think_us >= 0.0) {
                return bad("think_us", *think_us);
            }
            if !(timeout_us.is_finite() && *timeout_us >= 1.0) {
                return Err(format!("timeout_us = {timeout_us}: a retry timeout of at least 1 µs"));
            }
        }
        Arrivals::Trace { scale, points, .. } => {
            if !(scale.is_finite() && *scale >= 0.0) {
                return bad("scale", *scale);
            }
            if points.is_empty() {
                return Err("the trace has no rows".into());
            }
        }
    }
    Ok(())
}

fn check_size(s: &SizeDist) -> Result<(), String> {
    let ok = |b: u32| (64..=MAX_FRAME).contains(&b);
    match s {
        SizeDist::Fixed { bytes } if !ok(*bytes) => {
            Err(format!("bytes = {bytes}: frames are 64..={MAX_FRAME} bytes (FCS included)"))
        }
        SizeDist::Bimodal { small, large, p_small } => {
            if !ok(*small) || !ok(*large) {
                return Err(format!("small = {small}, large = {large}: frames are 64..={MAX_FRAME} bytes"));
            }
            if !(0.0..=1.0).contains(p_small) {
                return Err(format!("p_small = {p_small}: a probability in [0, 1]"));
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Reads a `time_s,rate_pps` CSV: times strictly increasing from 0, rates >= 0.
fn load_trace(path: &Path) -> Result<Vec<(f64, f64)>, String> {
    let mut rd = csv::Reader::from_reader(super::limits::open_trace(path)?);
    let headers = rd.headers().map_err(|e| e.to_string())?.clone();
    if headers.len() != 2 || &headers[0] != "time_s" || &headers[1] != "rate_pps" {
        return Err(format!("header is {:?}; the trace needs the header `time_s,rate_pps`", headers));
    }
    let mut pts: Vec<(f64, f64)> = Vec::new();
    for (i, row) in rd.records().enumerate() {
        let row = row.map_err(|e| format!("row {}: {e}", i + 2))?;
        let parse = |j: usize| -> Result<f64, String> {
            row[j].trim().parse::<f64>().map_err(|_| format!("row {}: `{}` is not a number", i + 2, &row[j]))
        };
        let (t, r) = (parse(0)?, parse(1)?);
        super::limits::check_trace_row(i + 1, t)?;
        if !(r.is_finite() && r >= 0.0) {
            return Err(format!("row {}: rate_pps = {r} must be >= 0", i + 2));
        }
        if pts.last().is_some_and(|p| t <= p.0) || (pts.is_empty() && t != 0.0) || !t.is_finite() {
            return Err(format!("row {}: time_s = {t}: times must start at 0 and increase", i + 2));
        }
        pts.push((t, r));
    }
    Ok(pts)
}

trait WithSpan {
    fn with_span(self, text: &str, span: Option<std::ops::Range<usize>>) -> Self;
}

impl WithSpan for EnvError {
    /// Adds "line L, column C" to a config error from the byte span TOML reported.
    fn with_span(self, text: &str, span: Option<std::ops::Range<usize>>) -> Self {
        match (self, span) {
            (EnvError::Config { path, message }, Some(sp)) => {
                let before = &text[..sp.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                // The line itself names the key a type error is about (`cpus = 1e9`).
                let src = text.lines().nth(line - 1).unwrap_or("").trim();
                let src: String = src.chars().take(120).collect();
                EnvError::Config { path, message: format!("line {line}, column {col} (`{src}`): {message}") }
            }
            (e, _) => e,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
name = "t"
[[vm]]
name = "a"
[[vm.flow]]
kind = "stream"
arrivals = { process = "poisson", rate_pps = 1000 }
"#;

    #[test]
    fn minimal_scenario_takes_defaults() {
        let s = Scenario::from_toml(MIN, Path::new("t.toml")).unwrap();
        assert_eq!(s.host.nic_rx_ring, 512);
        assert_eq!(s.vms[0].ring, 256);
        assert_eq!(s.costs.backend_per_packet(s.host.backend), 0.8);
        assert!(!s.vms[0].flows[0].is_latency_sensitive());
    }

    #[test]
    fn unknown_key_names_file_key_and_line() {
        let bad = MIN.replace("rate_pps = 1000", "rat_pps = 1000");
        let e = Scenario::from_toml(&bad, Path::new("x/bad.toml")).unwrap_err().to_string();
        assert!(e.contains("x/bad.toml"), "{e}");
        assert!(e.contains("rat_pps"), "{e}");
        assert!(e.contains("line 7"), "{e}");
    }

    #[test]
    fn semantic_errors_name_the_key_and_fix() {
        let bad = MIN.replace("name = \"a\"", "name = \"a\"\nbackend_cpu = 5");
        let e = Scenario::from_toml(&bad, Path::new("s.toml")).unwrap_err().to_string();
        assert!(e.contains("vm[0] (a).backend_cpu = 5") && e.contains("host.cpus = 2"), "{e}");
        let bad = MIN.replace("rate_pps = 1000", "rate_pps = -3");
        let e = Scenario::from_toml(&bad, Path::new("s.toml")).unwrap_err().to_string();
        assert!(e.contains("vm[0] (a).flow[0].arrivals: rate_pps = -3"), "{e}");
    }

    #[test]
    fn trace_rate_is_piecewise_constant_and_loops() {
        let pts = vec![(0.0, 10.0), (1.0, 20.0), (2.0, 0.0)];
        assert_eq!(trace_rate(&pts, 0.5), 10.0);
        assert_eq!(trace_rate(&pts, 1.0), 20.0);
        assert_eq!(trace_rate(&pts, 2.5), 10.0);
    }

    #[test]
    fn a_vm_objective_is_a_target_none_or_absent_with_the_documented_default() {
        // Absent (every file written before per-VM objectives): a VM with a latency-sensitive flow
        // is held to the run's SLO, any other VM has no objective.
        let s = Scenario::from_toml(MIN, Path::new("t.toml")).unwrap();
        assert_eq!(s.vms[0].slo_p99_us, None);
        assert_eq!(s.vms[0].target_us(200.0), None, "a stream VM has no objective by default");
        let rr = MIN.replace("kind = \"stream\"", "kind = \"request-response\"");
        assert_eq!(
            Scenario::from_toml(&rr, Path::new("t.toml")).unwrap().vms[0].target_us(200.0),
            Some(200.0)
        );
        // Its own target, integer or float, overrides the run's SLO, even on a stream VM.
        for (v, want) in [("150", 150.0), ("87.5", 87.5)] {
            let own = MIN.replace("name = \"a\"", &format!("name = \"a\"\nslo_p99_us = {v}"));
            let s = Scenario::from_toml(&own, Path::new("t.toml")).unwrap();
            assert_eq!(s.vms[0].target_us(200.0), Some(want));
            // It writes back as it was read.
            let again = Scenario::from_toml(&toml::to_string(&s).unwrap(), Path::new("t.toml")).unwrap();
            assert_eq!(again, s);
        }
        // "none": throughput only, even for request-response.
        let none = rr.replace("name = \"a\"", "name = \"a\"\nslo_p99_us = \"none\"");
        assert_eq!(Scenario::from_toml(&none, Path::new("t.toml")).unwrap().vms[0].target_us(200.0), None);
        // Anything else names the key and says what to write.
        let bad = MIN.replace("name = \"a\"", "name = \"a\"\nslo_p99_us = \"fast\"");
        let e = Scenario::from_toml(&bad, Path::new("s.toml")).unwrap_err().to_string();
        assert!(e.contains("s.toml") && e.contains("fast") && e.contains("\"none\""), "{e}");
        let bad = MIN.replace("name = \"a\"", "name = \"a\"\nslo_p99_us = 0.5");
        let e = Scenario::from_toml(&bad, Path::new("s.toml")).unwrap_err().to_string();
        assert!(e.contains("vm[0] (a).slo_p99_us = 0.5") && e.contains("\"none\""), "{e}");
    }
}
