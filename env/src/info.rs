//! Ground truth: what the simulator knows exactly and a live host does not. It feeds rewards and
//! reports, never observations.

use serde::{Deserialize, Serialize};

use crate::reward::RewardTerms;
use crate::settings::CoalescingSettings;

/// Latency percentiles of one population of packets, microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyStats {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

/// CPU time of one layer, split into fixed per-notification overhead and per-packet work.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuSplit {
    pub notify_ns: u64,
    pub packet_ns: u64,
}

impl CpuSplit {
    pub fn total_ns(&self) -> u64 {
        self.notify_ns + self.packet_ns
    }
    fn add(&mut self, o: &CpuSplit) {
        self.notify_ns += o.notify_ns;
        self.packet_ns += o.packet_ns;
    }
    fn minus(&self, o: &CpuSplit) -> CpuSplit {
        CpuSplit { notify_ns: self.notify_ns - o.notify_ns, packet_ns: self.packet_ns - o.packet_ns }
    }
}

/// Networking CPU time by layer and category, plus application time (which moderation does not
/// change and which [`IntervalTruth::cpu_us_per_packet`] leaves out).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuBreakdown {
    /// L1: NIC interrupts and the host driver (rx and tx completion), on the host.
    pub nic: CpuSplit,
    /// L2 on the host: backend copies and worker wake-ups.
    pub backend: CpuSplit,
    /// L2/L3 in the guest: virtual interrupts, frontend driver work, tx kicks.
    pub frontend: CpuSplit,
    /// The guest stack: per-packet protocol work and application wake-ups.
    pub stack: CpuSplit,
    /// Application work per request (not networking).
    pub app_ns: u64,
}

impl CpuBreakdown {
    /// Networking CPU time of every layer.
    pub fn network_ns(&self) -> u64 {
        self.nic.total_ns() + self.backend.total_ns() + self.frontend.total_ns() + self.stack.total_ns()
    }
    pub fn host_ns(&self) -> u64 {
        self.nic.total_ns() + self.backend.total_ns()
    }
    pub fn guest_ns(&self) -> u64 {
        self.frontend.total_ns() + self.stack.total_ns()
    }
    pub fn notify_ns(&self) -> u64 {
        self.nic.notify_ns + self.backend.notify_ns + self.frontend.notify_ns + self.stack.notify_ns
    }
    /// `self − o`, for the difference of two cumulative readings.
    pub fn minus(&self, o: &CpuBreakdown) -> CpuBreakdown {
        CpuBreakdown {
            nic: self.nic.minus(&o.nic),
            backend: self.backend.minus(&o.backend),
            frontend: self.frontend.minus(&o.frontend),
            stack: self.stack.minus(&o.stack),
            app_ns: self.app_ns - o.app_ns,
        }
    }

    pub fn add(&mut self, o: &CpuBreakdown) {
        self.nic.add(&o.nic);
        self.backend.add(&o.backend);
        self.frontend.add(&o.frontend);
        self.stack.add(&o.stack);
        self.app_ns += o.app_ns;
    }
}

/// Ground truth of one VM over one interval.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VmTruth {
    /// Whether this VM's latency is held to a target (`slo_p99_us` is set).
    pub latency_sensitive: bool,
    /// This VM's p99 target, µs; `None` for a VM without a latency objective.
    #[serde(default)]
    pub slo_p99_us: Option<f64>,
    /// Round trip (request-response) or one-way (stream, bulk transmit) latency.
    pub latency: LatencyStats,
    /// Packets of this VM's traffic that completed their path (delivered or sent on the wire).
    pub completed: u64,
    pub dropped: u64,
}

/// Ground truth of one control interval.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IntervalTruth {
    pub interval_ns: u64,
    /// Packets that entered the host in this interval: arrivals on the wire (dropped there or
    /// not) and packets that guest applications sent.
    pub offered: u64,
    /// Packets that completed their path: delivered to a guest application, or sent on the wire.
    pub completed: u64,
    pub dropped: u64,
    /// Packets anywhere inside the host at the end of the interval.
    pub in_flight: u64,
    pub completed_bytes: u64,
    pub cpu: CpuBreakdown,
    pub vms: Vec<VmTruth>,
    /// NAPI polls in the interval (zero where NAPI is off).
    #[serde(default)]
    pub polls: PollCounts,
}

/// NAPI polls per notification stream; the interrupt counts are in the observation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PollCounts {
    /// The NIC's rx queue.
    pub nic_rx: u64,
    /// The NIC's tx-completion queue.
    pub nic_tx: u64,
    /// Every guest's rx virtqueue / netfront rx ring.
    pub guest_rx: u64,
    /// Every guest's tx-completion notifications.
    pub guest_tx: u64,
}

impl PollCounts {
    fn add(&mut self, o: &PollCounts) {
        self.nic_rx += o.nic_rx;
        self.nic_tx += o.nic_tx;
        self.guest_rx += o.guest_rx;
        self.guest_tx += o.guest_tx;
    }
}

impl IntervalTruth {
    fn per_s(&self, x: u64) -> f64 {
        if self.interval_ns == 0 { 0.0 } else { x as f64 * 1e9 / self.interval_ns as f64 }
    }

    pub fn throughput_pps(&self) -> f64 {
        self.per_s(self.completed)
    }

    pub fn throughput_bps(&self) -> f64 {
        8.0 * self.per_s(self.completed_bytes)
    }

    /// Networking CPU (every layer, application work excluded) per completed packet, µs.
    pub fn cpu_us_per_packet(&self) -> f64 {
        if self.completed == 0 { 0.0 } else { self.cpu.network_ns() as f64 / 1000.0 / self.completed as f64 }
    }

    pub fn drop_fraction(&self) -> f64 {
        if self.offered == 0 { 0.0 } else { (self.dropped as f64 / self.offered as f64).min(1.0) }
    }

    /// The worst p99 among latency-sensitive VMs that completed packets this interval.
    pub fn worst_sensitive_p99_us(&self) -> Option<f64> {
        self.vms
            .iter()
            .filter(|v| v.latency_sensitive && v.latency.count > 0)
            .map(|v| v.latency.p99_us)
            .reduce(f64::max)
    }

    /// The worst ratio of a VM's p99 to its own target, among VMs with a target that completed
    /// packets this interval.
    pub fn worst_slo_ratio(&self) -> Option<f64> {
        self.vms
            .iter()
            .filter_map(|v| v.slo_p99_us.filter(|_| v.latency.count > 0).map(|t| v.latency.p99_us / t))
            .reduce(f64::max)
    }

    /// Whether some VM's p99 exceeded its own target this interval.
    pub fn slo_violated(&self) -> bool {
        self.worst_slo_ratio().is_some_and(|r| r > 1.0)
    }

    /// Adds another interval's counts (latency percentiles do not add; they are left alone, and
    /// `in_flight` takes the later value).
    pub fn add(&mut self, o: &IntervalTruth) {
        self.interval_ns += o.interval_ns;
        self.offered += o.offered;
        self.completed += o.completed;
        self.dropped += o.dropped;
        self.in_flight = o.in_flight;
        self.completed_bytes += o.completed_bytes;
        self.cpu.add(&o.cpu);
        self.polls.add(&o.polls);
        if self.vms.len() < o.vms.len() {
            self.vms.resize(o.vms.len(), VmTruth::default());
        }
        for (a, b) in self.vms.iter_mut().zip(&o.vms) {
            a.latency_sensitive = b.latency_sensitive;
            a.slo_p99_us = b.slo_p99_us;
            a.completed += b.completed;
            a.dropped += b.dropped;
        }
    }
}

/// Everything a step reports besides the observation and the reward.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Info {
    /// Time at the end of the interval, nanoseconds since reset.
    pub time_ns: u64,
    /// The settings in force during the interval, after clamping to the action space.
    pub applied: Option<CoalescingSettings>,
    /// Ground truth; `None` on a live host, which has none.
    pub truth: Option<IntervalTruth>,
    pub reward_terms: RewardTerms,
    /// Problems the environment met but survived (a counter read that failed, a knob the
    /// driver refused); a live host reports them here rather than failing the step.
    pub warnings: Vec<String>,
}

/// Ground truth of a whole episode, for evaluation reports.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EpisodeSummary {
    pub duration_ns: u64,
    /// Sums over the episode's intervals.
    pub totals: IntervalTruth,
    /// Latency over every packet of latency-sensitive VMs in the episode (all VMs when none is).
    pub latency: LatencyStats,
    /// Per VM, over the episode.
    pub vm_latency: Vec<LatencyStats>,
    pub intervals: u64,
    /// Intervals in which some VM's p99 exceeded its target.
    pub slo_violations: u64,
}
