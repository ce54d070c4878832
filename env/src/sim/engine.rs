//! The discrete-event core.
//!
//! # Model
//! Packets flow through *stages*. A stage is a bounded queue of packets (a ring or a buffer) whose
//! items are handed to a CPU as *jobs*. Knob-driven stages notify with ethtool semantics: a
//! notification fires when `frames` items are pending or `usecs` after the first pending item,
//! whichever comes first (`usecs = 0`: at once). Worker stages (backend threads, the sending
//! application) take whatever is pending whenever they are idle, up to a budget, as a thread does.
//!
//! ```text
//! rx:  wire ─► NicRx ─► BeRx[v] ─► FeRx[v] ─► SockRx[v] ─► application (stream) / response ─┐
//!      (L1 rx knob,     (worker,    (L2 rx knob, (L3 rx knob,                                   │
//!       host irq)        host thr.)  vCPU irq)    vCPU process)                                 │
//! tx:  application ─► SockTx[v] ─► FeTx[v] ─► BeTx[v] ─► NicTx ─► wire            ◄───────────┘
//!      (bulk tx)      (worker,     (L3 tx knob: (worker,   (serialised at line rate)
//!                      vCPU proc.)  kick, vCPU)  host thr.)
//! completions: BeTx ─► FeTxc[v] (L2 tx knob, vCPU irq) frees FeTx ring slots;
//!              wire ─► NicTxc   (L1 tx knob, host irq) frees NIC tx ring slots.
//! ```
//! Each CPU serves two priority classes with preemptive resume: interrupt work (the notification
//! jobs of knob-driven stages) runs before thread work (workers, the stack and the application).
//! When interrupt work saturates a CPU, thread work starves, queues fill and packets drop: receive
//! livelock emerges rather than being scripted. Receive-side queues drop when full; transmit-side
//! queues back-pressure (a full ring stalls its sender), so tx-completion knobs add latency only
//! through back-pressure.
//!
//! # NAPI (`host.napi`, on by default; see [`super::napi`])
//! Four knob stages are NAPI instances, as in Linux: `NicRx`, `NicTxc` (the host NIC driver),
//! `FeRx`, `FeTxc` (virtio-net / netfront in the guest). Their notification is an interrupt that
//! masks the stage and queues a *poll* job; the poll takes what is pending when it *starts*, up to
//! the weight, so items that arrive while the interrupt waits or the poll runs raise nothing.
//!
//! ```text
//!            knobs fire              poll starts: take ≤ weight        poll ends
//!   armed ───────────────► masked ─────────────────────────────► took = weight? ─yes─► poll again
//!     ▲      (interrupt:                                               │ no           (softirq, or
//!     │       notify cost)                                             ▼               ksoftirqd past
//!     └──── re-armed: knobs decide the next interrupt ◄──── napi_complete_done         the budget)
//!           (virtio/netfront: pending items → poll again, no interrupt)
//! ```
//! Polls run at interrupt priority within one softirq run's budget (`netdev_budget × (1 +
//! softirq_max_restart)` packets or `softirq_max_time_us`), then at thread priority until a poll
//! completes. Adaptive controllers (DIM, ITR) see their sample when a poll completes, as drivers
//! call `net_dim` from their poll. The other two knob stages are not NAPI: `SockRx` (the wake-up of
//! the application) and `FeTx` (the guest's kick), which vhost and netback suppress by other means.
//! With `host.napi = false` every notification is its own job that takes what was pending when it
//! fired (the pre-NAPI kernel).
//!
//! # Busy polling and IRQ suspension (a VM's `polling`; see [`crate::AppPolling`])
//! The application of a VM that busy-polls (`busy_poll_us > 0`) does not sleep after it has
//! read its socket: it returns to epoll, which polls the guest's rx NAPI (`FeRx`) in the
//! application's own context (thread priority on the vCPU: the poll's cost and the frontend's
//! per-packet work, no interrupt, no wake-up) and then reads what that delivered (the stack and
//! the application, no wake-up either). With nothing there it *spins* for up to `busy_poll_us`
//! with the NAPI's interrupt masked (prefer_busy_poll); the spin is CPU time of the stack, and it
//! ends early when items arrive (they are polled at once) or when other thread work becomes
//! runnable on the vCPU (`need_resched`: the application yields and spins on with what is left of
//! its budget after that work). A spin that runs out ends in `busy_poll_stop`: the NAPI's
//! deferral takes over if one is set (its count reloaded, its timer armed), else the interrupt is
//! re-armed, and the application sleeps until its socket wakes it.
//!
//! Without IRQ suspension the busy poll stops after every poll that found work, so the
//! interrupt is back while the application processes. With `irq_suspend_timeout_us` the
//! interrupt stays suspended from the application's first poll that finds work until a busy
//! poll finds nothing (then as above), and each poll re-arms the suspension's timer: if the
//! application has not polled again when it expires, the interrupt is resumed.
//!
//! ```text
//!   asleep ──socket notification──► read ──► epoll: poll FeRx ──found──► read ─┐
//!     ▲                                        │ nothing                       │
//!     │                                        ▼                               │
//!     └──── busy_poll_stop ◄──ran out── spin (≤ busy_poll_us) ──items──► poll ─┘
//! ```
//!
//! # Performance
//! A packet is 16 bytes in a preallocated `VecDeque`; a batch moves as a run of them. Arrivals are
//! not heap events: the loop compares the next source time, the next wire arrival and the next
//! scheduled event. Scheduled events sit in fixed slots (see [`Slot`]), one per CPU, knob stage
//! and the tx wire, since only the latest of each can matter; only closed-loop clients keep a
//! heap. The event loop allocates nothing in steady state (`tests/alloc_free.rs`).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::Arc;

use hdrhistogram::Histogram;

use super::arrivals::{ArrivalGen, Purpose, Rng64, Sizer, stream};
use super::napi::{SoftirqLimits, SoftirqRun};
use super::scenario::{Arrivals, FlowKind, Scenario, ServiceDist};
use crate::controller::{ControllerFactory, DriverSample, LayerController};
use crate::info::CpuBreakdown;
use crate::settings::{Adaptive, CoalescingSettings, Direction, Knobs, LayerId, Moderation, NapiParams};

/// A packet: its origin time and what it belongs to.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pkt {
    /// Arrival at the NIC (rx, request-response) or the application's send (bulk tx), ns.
    pub t0: u64,
    pub bytes: u16,
    pub vm: u8,
    pub flow: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    NicRx,
    NicTx,
    NicTxc,
    BeRx(usize),
    FeRx(usize),
    SockRx(usize),
    SockTx(usize),
    FeTx(usize),
    BeTx(usize),
    FeTxc(usize),
}

/// Stage indices: three host stages, then seven per VM.
pub(crate) const NIC_RX: usize = 0;
pub(crate) const NIC_TX: usize = 1;
pub(crate) const NIC_TXC: usize = 2;
const PER_VM: usize = 7;
#[inline]
pub(crate) fn be_rx(v: usize) -> usize {
    3 + PER_VM * v
}
#[inline]
pub(crate) fn fe_rx(v: usize) -> usize {
    4 + PER_VM * v
}
#[inline]
pub(crate) fn sock_rx(v: usize) -> usize {
    5 + PER_VM * v
}
#[inline]
pub(crate) fn sock_tx(v: usize) -> usize {
    6 + PER_VM * v
}
#[inline]
pub(crate) fn fe_tx(v: usize) -> usize {
    7 + PER_VM * v
}
#[inline]
pub(crate) fn be_tx(v: usize) -> usize {
    8 + PER_VM * v
}
#[inline]
pub(crate) fn fe_txc(v: usize) -> usize {
    9 + PER_VM * v
}

/// The knob-governed stage of each (layer, direction), per the table in SIMULATOR.md. On an
/// SR-IOV host (`sriov`) the guest drives a VF: its driver's knobs (the frontend's) moderate the
/// VF's interrupts into the guest (`FeRx`, `FeTxc`), and the backend, which such a host lacks,
/// maps onto the two stages no ethtool knob reaches there (the socket wake-up and the doorbell;
/// the profile keeps them per-packet).
pub(crate) fn knob_stage(layer: LayerId, dir: Direction, sriov: bool) -> usize {
    match (layer, dir) {
        (LayerId::Backend(v), Direction::Rx) if sriov => sock_rx(v),
        (LayerId::Backend(v), Direction::Tx) if sriov => fe_tx(v),
        (LayerId::Frontend(v), Direction::Rx) if sriov => fe_rx(v),
        (LayerId::Frontend(v), Direction::Tx) if sriov => fe_txc(v),
        (LayerId::Nic, Direction::Rx) => NIC_RX,
        (LayerId::Nic, Direction::Tx) => NIC_TXC,
        (LayerId::Backend(v), Direction::Rx) => fe_rx(v),
        (LayerId::Backend(v), Direction::Tx) => fe_txc(v),
        (LayerId::Frontend(v), Direction::Rx) => sock_rx(v),
        (LayerId::Frontend(v), Direction::Tx) => fe_tx(v),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
enum Prio {
    /// Hard/soft interrupt context.
    Irq,
    /// Threads: backend workers, guest stack and application.
    Thread,
}

/// Which CPU-accounting bucket a stage's work goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bucket {
    Nic,
    Backend,
    Frontend,
    Stack,
}

#[derive(Debug, Clone, Copy)]
enum Trigger {
    /// ethtool knobs.
    Knobs(Knobs),
    /// A worker: one job at a time, taking up to `budget` pending items when it starts.
    Worker { budget: u32 },
    /// The NIC's transmit wire.
    Wire,
}

#[derive(Debug)]
struct Controller {
    mode: Adaptive,
    ctl: Box<dyn LayerController>,
}

/// Cumulative counters of a stage.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct StageCounters {
    /// Items admitted.
    pub admitted: u64,
    pub admitted_bytes: u64,
    pub drops: u64,
    /// Notifications (knob stages: interrupts) or jobs (workers).
    pub notifications: u64,
    /// NAPI polls (NAPI stages only).
    pub polls: u64,
    /// Items whose job completed.
    pub done: u64,
    pub done_bytes: u64,
}

#[derive(Debug)]
struct Stage {
    kind: Kind,
    q: VecDeque<Pkt>,
    /// Items at the front of `q` already in a job.
    in_jobs: usize,
    /// Slots still owned by items that left `q` (awaiting a completion).
    held: usize,
    /// Slots reserved by upstream jobs in flight towards this stage.
    reserved: usize,
    cap: usize,
    trigger: Trigger,
    controller: Option<Controller>,
    pending: u32,
    pending_bytes: u64,
    first_pending_ns: u64,
    timer_gen: u32,
    timer_armed: bool,
    jobs_out: u32,
    /// A worker found idle by a kick pays `wake_ns` on its next job.
    wake_due: bool,
    /// NAPI: the notification schedules a poll and is masked until a poll completes.
    napi: bool,
    /// NAPI: the notification is masked (a poll is scheduled or running).
    masked: bool,
    /// NAPI: the next poll carries the cost of the interrupt that scheduled it.
    irq_due: bool,
    /// NAPI: polls run in ksoftirqd (thread priority) until one completes.
    ksoftirqd: bool,
    /// NAPI: a completing poll re-checks its ring and polls again without an interrupt when
    /// items arrived meanwhile (virtio-net, netfront).
    recheck: bool,
    /// NAPI: fixed cost of one poll.
    poll_ns: u64,
    /// NAPI deferral: `napi_defer_hard_irqs` and `gro_flush_timeout` (ns) in force.
    defer_max: u32,
    defer_timeout_ns: u64,
    /// NAPI deferral: `defer_hard_irqs_count`, the empty polls left before the interrupt is
    /// re-armed.
    defer_left: u32,
    /// NAPI deferral: the hrtimer is armed (the stage stays masked until it polls).
    defer_armed: bool,
    /// NAPI deferral: the next poll was scheduled by the hrtimer and pays `timer_ns`.
    timer_due: bool,
    /// NAPI deferral: the hrtimer's cost (arming and expiry).
    timer_ns: u64,
    /// Busy polling (`FeRx`): the application owns the NAPI (it polls it; the interrupt is
    /// masked).
    app_owned: bool,
    /// IRQ suspension (`FeRx`): the suspension's timer is armed in the stage's timer slot.
    suspend_armed: bool,
    /// Busy polling (`FeRx`, `SockRx`): items arriving here end the application's spin.
    wakes_spinner: bool,
    cpu: usize,
    prio: Prio,
    bucket: Bucket,
    notify_ns: u64,
    per_pkt_ns: u64,
    per_byte_ps: u64,
    wake_ns: u64,
    /// Driver-sample counters for adaptive controllers (they wrap at kernel widths).
    ctr_pkts: u64,
    ctr_bytes: u64,
    c: StageCounters,
}

impl Stage {
    fn new(kind: Kind, cap: usize, trigger: Trigger, cpu: usize, prio: Prio, bucket: Bucket) -> Stage {
        Stage {
            kind,
            q: VecDeque::with_capacity(cap.min(1 << 16)),
            in_jobs: 0,
            held: 0,
            reserved: 0,
            cap,
            trigger,
            controller: None,
            pending: 0,
            pending_bytes: 0,
            first_pending_ns: 0,
            timer_gen: 0,
            timer_armed: false,
            jobs_out: 0,
            wake_due: false,
            napi: false,
            masked: false,
            irq_due: false,
            ksoftirqd: false,
            recheck: false,
            poll_ns: 0,
            defer_max: 0,
            defer_timeout_ns: 0,
            defer_left: 0,
            defer_armed: false,
            timer_due: false,
            timer_ns: 0,
            app_owned: false,
            suspend_armed: false,
            wakes_spinner: false,
            cpu,
            prio,
            bucket,
            notify_ns: 0,
            per_pkt_ns: 0,
            per_byte_ps: 0,
            wake_ns: 0,
            ctr_pkts: 0,
            ctr_bytes: 0,
            c: StageCounters::default(),
        }
    }

    #[inline]
    fn free(&self) -> usize {
        self.cap.saturating_sub(self.q.len() + self.held + self.reserved)
    }

    /// Bytes of the `k` pending items from queue index `first` on (the first pending item):
    /// `pending_bytes` when they are all that is pending, else summed.
    #[inline]
    fn pending_bytes_of(&self, first: usize, k: u32) -> u64 {
        if k == self.pending {
            debug_assert_eq!(first + k as usize, self.q.len(), "pending items end the queue");
            self.pending_bytes
        } else {
            self.q.range(first..first + k as usize).map(|p| u64::from(p.bytes)).sum()
        }
    }

    fn knobs(&self) -> Option<Knobs> {
        match self.trigger {
            Trigger::Knobs(k) => Some(k),
            _ => None,
        }
    }

    /// The adaptive algorithm, if any, sees the driver's sample now and may set new knobs.
    fn controller_sample(&mut self, now: u64) {
        if let Some(c) = self.controller.as_mut() {
            let sample = DriverSample {
                time_ns: now,
                event_ctr: self.c.notifications as u16,
                pkt_ctr: self.ctr_pkts as u32,
                byte_ctr: self.ctr_bytes as u32,
            };
            if let Some(k) = c.ctl.on_notification(&sample) {
                self.trigger = Trigger::Knobs(k);
            }
        }
    }
}

/// `Job::k` of a job that has not taken its items yet.
const UNCLAIMED: u32 = u32::MAX;

// Word-sized fields only (no `bool`): jobs are copied on every push, pop and start, and byte
// fields made those copies overlap in ways that stall store forwarding.
#[derive(Debug, Clone, Copy)]
struct Job {
    remaining_ns: u64,
    notify_ns: u64,
    packet_ns: u64,
    app_ns: u64,
    stage: u32,
    /// Items; for a worker or a NAPI poll `UNCLAIMED` until the job starts.
    k: u32,
}

impl Job {
    /// A job that takes its items when it starts (a worker's run, a NAPI poll).
    #[inline]
    fn unclaimed(si: usize) -> Job {
        Job { stage: si as u32, k: UNCLAIMED, remaining_ns: 0, notify_ns: 0, packet_ns: 0, app_ns: 0 }
    }

    #[inline]
    fn claimed(&self) -> bool {
        self.k != UNCLAIMED
    }
}

/// The job a CPU runs, at `prio`, and when it ends.
#[derive(Debug, Clone, Copy)]
struct Running {
    job: Job,
    end: u64,
    prio: Prio,
}

#[derive(Debug)]
struct Cpu {
    irq: VecDeque<Job>,
    thread: VecDeque<Job>,
    running: Option<Running>,
    /// Start of the running job's current accounting segment.
    seg_start: u64,
    epoch: u32,
    /// Halt wake-up latency (vCPUs only).
    wake_ns: u64,
    waking: bool,
    idle_since: u64,
    busy_irq_ns: u64,
    busy_thread_ns: u64,
    /// A finished job's effects are being applied: new jobs queue and start afterwards, in
    /// priority order, not in the order the effects pushed them.
    completing: bool,
    /// The softirq run in interrupt context (NAPI).
    sirq: SoftirqRun,
    /// A vCPU whose application's busy-poll spin is queued or running: other thread work that
    /// becomes runnable ends it (`need_resched`).
    spin: bool,
}

impl Cpu {
    fn new(wake_ns: u64) -> Cpu {
        Cpu {
            irq: VecDeque::with_capacity(1024),
            thread: VecDeque::with_capacity(1024),
            running: None,
            seg_start: 0,
            epoch: 0,
            wake_ns,
            waking: false,
            idle_since: 0,
            busy_irq_ns: 0,
            busy_thread_ns: 0,
            completing: false,
            sirq: SoftirqRun::default(),
            spin: false,
        }
    }

    fn account(&mut self, now: u64) {
        if let Some(Running { prio, .. }) = self.running {
            let d = now - self.seg_start;
            match prio {
                Prio::Irq => self.busy_irq_ns += d,
                Prio::Thread => self.busy_thread_ns += d,
            }
        }
        self.seg_start = now;
    }
}

/// The order of events: by time, then by scheduling order (`seq`), packed as `t << 64 | seq`
/// so that one integer comparison decides.
#[inline]
fn ev_key(t: u64, seq: u64) -> u128 {
    u128::from(t) << 64 | u128::from(seq)
}

/// No event.
const NO_EVENT: u128 = u128::MAX;

/// An event in a fixed slot. Each CPU (its running job's end or its wake-up), each stage (its
/// coalescing timer) and the tx wire has at most one event that can still matter: scheduling a
/// new one makes the older one stale (a CPU's epoch, a timer's generation moved on), so the new
/// one replaces it in the slot. Firing a stale slot does nothing, as a stale heap entry did.
#[derive(Debug, Clone, Copy)]
struct Slot {
    key: u128,
    /// The CPU's epoch or the timer's generation when the event was scheduled.
    tag: u32,
}

/// A closed-loop client's next request: (key, vm, flow). Clients are the only events that are
/// many per flow; they keep a heap.
type ClientEv = (u128, u32, u32);

/// A traffic source: a flow's arrivals.
#[derive(Debug)]
struct Source {
    vm: u8,
    flow: u8,
    /// Rx sources arrive on the wire; bulk-tx sources start at the application.
    rx: bool,
    arrivals: ArrivalGen,
    sizes: Sizer,
}

/// The client pool of a closed-loop flow.
#[derive(Debug)]
struct Clients {
    think_ns: f64,
    timeout_ns: u64,
    rng: Rng64,
}

#[derive(Debug)]
struct FlowInfo {
    /// Index of the flow's source in `Engine::sources` (its sizes).
    src: usize,
    clients: Option<Clients>,
    app_ns: u64,
    /// Recorded in the VM's latency population.
    counted: bool,
    responses: Option<Sizer>,
}

/// Cumulative per-VM counters.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct VmCounters {
    pub completed: u64,
    pub dropped: u64,
    pub lat_count: u64,
    pub lat_sum_ns: u128,
    pub lat_max_ns: u64,
}

/// Cumulative counters of the whole host.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Totals {
    pub offered: u64,
    pub completed: u64,
    pub completed_bytes: u64,
    pub dropped: u64,
    /// Arrivals dropped at the upstream switch (the wire was saturated).
    pub switch_drops: u64,
    pub cpu: CpuBreakdown,
}

/// Probe configuration: every `every`-th latency sample is seen by the probes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ProbeCfg {
    pub every: u64,
    /// Relative measurement noise of a probe sample (lognormal sigma).
    pub noise: f64,
}

/// Latency histograms kept per VM and interval, in nanoseconds.
pub(crate) fn new_hist() -> Histogram<u64> {
    // 1 ns .. 100 s at 2 significant digits (1% resolution).
    Histogram::new_with_bounds(1, 100_000_000_000, 2).expect("static histogram bounds")
}

/// The simulated host.
#[derive(Debug)]
pub(crate) struct Engine {
    pub now: u64,
    /// Slots `0..cpus` are the CPUs', then one per knob stage (its timer), then the tx wire's.
    slots: Vec<Slot>,
    /// The timer slot of each stage (`u32::MAX`: none), and the stage of each timer slot.
    timer_slot: Vec<u32>,
    slot_stage: Vec<u32>,
    /// The earliest slot and its key, unless `slots_dirty` (then found again by a scan).
    next_slot: usize,
    next_key: u128,
    slots_dirty: bool,
    clients: BinaryHeap<Reverse<ClientEv>>,
    seq: u64,
    stages: Vec<Stage>,
    cpus: Vec<Cpu>,
    /// Index of the first vCPU in `cpus` (host cores come first).
    vcpu0: usize,
    sources: Vec<Source>,
    next_src: usize,
    next_src_t: u64,
    flows: Vec<Vec<FlowInfo>>,
    /// Per VM: the application time per packet when all its flows have the same.
    vm_app_ns: Vec<Option<u64>>,
    vms: usize,
    /// Packets on the rx wire and in the switch, with their NIC arrival times.
    wire_rx: VecDeque<(u64, Pkt)>,
    wire_rx_free_ps: u64,
    wire_tx_free_ps: u64,
    wire_tx_busy: bool,
    ps_per_byte: f64,
    /// The last frame size `wire_ps` computed, and its wire time.
    wire_memo: (u32, u64),
    switch_buffer: usize,
    service: ServiceDist,
    service_rng: Rng64,
    probe_rng: Rng64,
    factory: Option<Arc<dyn ControllerFactory>>,
    pub totals: Totals,
    pub vm_ctr: Vec<VmCounters>,
    /// Interval latency histograms per VM; the caller drains them.
    pub vm_hist: Vec<Histogram<u64>>,
    pub guest_probe: Vec<Histogram<u64>>,
    pub host_probe: Histogram<u64>,
    probe: ProbeCfg,
    /// Latency samples until the next one a probe sees, per VM and for the host: a countdown
    /// from `probe.every` (every `every`-th sample, without a division per packet).
    vm_probe_in: Vec<u64>,
    host_probe_in: u64,
    /// NAPI weight: most items per poll.
    napi_weight: u32,
    softirq: SoftirqLimits,
    /// Per VM: its application's busy-poll loop.
    apps: Vec<AppLoop>,
    /// Some VM's application has busy-polled in this run (the hot paths skip the loop otherwise).
    polling_ever: bool,
    /// SR-IOV (`sriov-vf`): each VM drives a VF of the NIC; its packets bypass the host's
    /// driver and the backend (see the module docs).
    sriov: bool,
}

/// Where a VM's application is in its busy-poll loop (see the module docs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum AppState {
    /// Sleeping in epoll: a notification of `SockRx` wakes it.
    #[default]
    Asleep,
    /// Polling its NAPI or processing what it read.
    Busy,
    /// Spinning on its NAPI for what arrives next.
    Spinning,
}

/// Why a spin ended before its budget.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum SpinEnd {
    /// It ran out (or has not ended yet).
    #[default]
    Timeout,
    /// Items arrived.
    Work,
    /// Other thread work became runnable on the vCPU.
    Resched,
}

/// A VM application's busy-poll loop: its settings and where it is.
#[derive(Debug, Clone, Copy, Default)]
struct AppLoop {
    /// `busy_poll_us` and `irq_suspend_timeout_us` in force, ns.
    spin_ns: u64,
    suspend_ns: u64,
    state: AppState,
    /// What is left of the spin budget of the current busy poll (it survives a yield).
    spin_left_ns: u64,
    spin_end: SpinEnd,
}

impl AppLoop {
    fn on(&self) -> bool {
        self.spin_ns > 0
    }
}

fn ns(us: f64) -> u64 {
    (us * 1000.0).round().max(0.0) as u64
}

impl Engine {
    pub fn new(
        sc: &Scenario,
        seed: u64,
        factory: Option<Arc<dyn ControllerFactory>>,
        probe: ProbeCfg,
    ) -> Engine {
        let h = &sc.host;
        let c = &sc.costs;
        let vms = sc.vms.len();
        let sriov = sc.profile() == crate::HostProfile::SriovVf;
        let mut stages = Vec::with_capacity(3 + PER_VM * vms);
        let nic = h.nic_cpu;
        let pp = Knobs::PER_PACKET;
        let napi = |s: &mut Stage, poll_us: f64, timer_us: f64, recheck: bool| {
            s.napi = h.napi;
            s.poll_ns = ns(poll_us);
            s.timer_ns = ns(timer_us);
            s.recheck = recheck;
        };
        let mut s = Stage::new(Kind::NicRx, h.nic_rx_ring, Trigger::Knobs(pp), nic, Prio::Irq, Bucket::Nic);
        s.notify_ns = ns(c.nic_irq_us);
        s.per_pkt_ns = ns(c.nic_per_packet_us);
        napi(&mut s, c.nic_poll_us, c.host_timer_us, false);
        stages.push(s);
        // With SR-IOV the VFs' own tx rings (`FeTx`) hold the frames until the wire has sent
        // them; this stage is then only the NIC's arbitration onto the wire, unbounded.
        let nic_tx_cap = if sriov { usize::MAX } else { h.nic_tx_ring };
        stages.push(Stage::new(Kind::NicTx, nic_tx_cap, Trigger::Wire, nic, Prio::Irq, Bucket::Nic));
        let mut s = Stage::new(Kind::NicTxc, usize::MAX, Trigger::Knobs(pp), nic, Prio::Irq, Bucket::Nic);
        s.notify_ns = ns(c.nic_irq_us);
        s.per_pkt_ns = ns(c.nic_per_packet_us);
        napi(&mut s, c.nic_poll_us, c.host_timer_us, false);
        stages.push(s);
        let vcpu0 = h.cpus;
        for (v, vm) in sc.vms.iter().enumerate() {
            let vc = vcpu0 + v;
            let hc = vm.backend_cpu;
            let budget = h.worker_batch;
            let mut s = Stage::new(
                Kind::BeRx(v),
                vm.backend_queue,
                Trigger::Worker { budget },
                hc,
                Prio::Thread,
                Bucket::Backend,
            );
            s.per_pkt_ns = ns(c.backend_per_packet(h.backend));
            stages.push(s);
            // The guest driver's NAPI stages (rx, tx completion): virtio-net / netfront, or with
            // SR-IOV the VF's driver, a NIC driver in the guest (per packet and per poll as the
            // host's), which re-arms its interrupt when a poll completes, as NIC drivers do.
            let guest_driver = |s: &mut Stage| {
                s.notify_ns = ns(c.virq(h.posted_interrupts));
                if sriov {
                    s.per_pkt_ns = ns(c.nic_per_packet_us);
                    napi(s, c.nic_poll_us, c.guest_timer_us, false);
                } else {
                    s.per_pkt_ns = ns(c.frontend_per_packet_us);
                    napi(s, c.frontend_poll_us, c.guest_timer_us, true);
                }
            };
            let mut s =
                Stage::new(Kind::FeRx(v), vm.ring, Trigger::Knobs(pp), vc, Prio::Irq, Bucket::Frontend);
            guest_driver(&mut s);
            stages.push(s);
            let mut s = Stage::new(
                Kind::SockRx(v),
                vm.socket_buffer,
                Trigger::Knobs(pp),
                vc,
                Prio::Thread,
                Bucket::Stack,
            );
            s.notify_ns = ns(c.app_wakeup_us);
            s.per_pkt_ns = ns(c.stack_per_packet_us);
            s.per_byte_ps = ns(c.stack_per_byte_ns);
            stages.push(s);
            let mut s = Stage::new(
                Kind::SockTx(v),
                vm.socket_buffer,
                Trigger::Worker { budget },
                vc,
                Prio::Thread,
                Bucket::Stack,
            );
            s.per_pkt_ns = ns(c.stack_per_packet_us);
            s.per_byte_ps = ns(c.stack_per_byte_ns);
            stages.push(s);
            let mut s =
                Stage::new(Kind::FeTx(v), vm.ring, Trigger::Knobs(pp), vc, Prio::Irq, Bucket::Frontend);
            // A VF's doorbell is an MMIO write to its BAR, mapped into the guest: no exit.
            s.notify_ns = ns(if sriov { c.vf_doorbell_us } else { c.kick_us });
            stages.push(s);
            let mut s = Stage::new(
                Kind::BeTx(v),
                usize::MAX,
                Trigger::Worker { budget },
                hc,
                Prio::Thread,
                Bucket::Backend,
            );
            s.per_pkt_ns = ns(c.backend_per_packet(h.backend));
            s.wake_ns = ns(c.backend_wakeup_us);
            stages.push(s);
            let mut s =
                Stage::new(Kind::FeTxc(v), usize::MAX, Trigger::Knobs(pp), vc, Prio::Irq, Bucket::Frontend);
            guest_driver(&mut s);
            stages.push(s);
        }
        let mut cpus: Vec<Cpu> = (0..h.cpus).map(|_| Cpu::new(0)).collect();
        cpus.extend((0..vms).map(|_| Cpu::new(ns(c.vcpu_wakeup_us))));
        let n_cpus = cpus.len();
        let mut timer_slot = vec![u32::MAX; stages.len()];
        let mut slot_stage = Vec::new();
        for (si, st) in stages.iter().enumerate() {
            if st.knobs().is_some() {
                timer_slot[si] = (n_cpus + slot_stage.len()) as u32;
                slot_stage.push(si as u32);
            }
        }

        let mut sources = Vec::new();
        let mut flows = Vec::with_capacity(vms);
        for (v, vm) in sc.vms.iter().enumerate() {
            let any_sensitive = vm.flows.iter().any(|f| f.is_latency_sensitive());
            let mut fl = Vec::new();
            for (f, flow) in vm.flows.iter().enumerate() {
                let (vu, fu) = (v as u64, f as u64);
                sources.push(Source {
                    vm: v as u8,
                    flow: f as u8,
                    rx: flow.kind != FlowKind::BulkTx,
                    arrivals: ArrivalGen::new(flow.arrivals.clone(), stream(seed, Purpose::Arrivals, vu, fu)),
                    sizes: Sizer::new(flow.size.clone(), stream(seed, Purpose::Sizes, vu, fu)),
                });
                let clients = match flow.arrivals {
                    Arrivals::ClosedLoop { think_us, timeout_us, .. } => Some(Clients {
                        think_ns: think_us * 1000.0,
                        timeout_ns: (timeout_us * 1000.0) as u64,
                        rng: stream(seed, Purpose::Arrivals, vu, fu),
                    }),
                    _ => None,
                };
                fl.push(FlowInfo {
                    src: sources.len() - 1,
                    clients,
                    app_ns: ns(flow.app_us),
                    counted: flow.is_latency_sensitive() || !any_sensitive,
                    responses: (flow.kind == FlowKind::RequestResponse).then(|| {
                        Sizer::new(
                            flow.response_size.clone().unwrap_or(flow.size.clone()),
                            stream(seed, Purpose::ResponseSizes, vu, fu),
                        )
                    }),
                });
            }
            flows.push(fl);
        }
        let mut e = Engine {
            now: 0,
            slots: vec![Slot { key: NO_EVENT, tag: 0 }; n_cpus + slot_stage.len() + 1],
            timer_slot,
            slot_stage,
            next_slot: 0,
            next_key: NO_EVENT,
            slots_dirty: false,
            clients: BinaryHeap::with_capacity(4096),
            seq: 0,
            stages,
            cpus,
            vcpu0,
            sources,
            next_src: 0,
            next_src_t: u64::MAX,
            vm_app_ns: flows
                .iter()
                .map(|fl| fl.first().map(|f| f.app_ns).filter(|&a| fl.iter().all(|f| f.app_ns == a)))
                .collect(),
            flows,
            vms,
            wire_rx: VecDeque::with_capacity(h.switch_buffer + 1),
            wire_rx_free_ps: 0,
            wire_tx_free_ps: 0,
            wire_tx_busy: false,
            // Picoseconds per byte on the wire: 8 bits / (Gbit/s) = 8000 / Gbps ps.
            ps_per_byte: 8000.0 / h.line_rate_gbps,
            wire_memo: (u32::MAX, 0),
            switch_buffer: h.switch_buffer,
            service: c.service,
            service_rng: stream(seed, Purpose::Service, 0, 0),
            probe_rng: stream(seed, Purpose::Probe, 0, 0),
            factory,
            totals: Totals::default(),
            vm_ctr: vec![VmCounters::default(); vms],
            vm_hist: (0..vms).map(|_| new_hist()).collect(),
            guest_probe: (0..vms).map(|_| new_hist()).collect(),
            host_probe: new_hist(),
            probe,
            vm_probe_in: vec![probe.every; vms],
            host_probe_in: probe.every,
            napi_weight: h.napi_weight,
            softirq: SoftirqLimits::new(h),
            apps: vec![AppLoop::default(); vms],
            polling_ever: false,
            sriov,
        };
        e.pick_next_source();
        // Every closed-loop client starts after one think time.
        for (v, vm) in sc.vms.iter().enumerate() {
            for (f, flow) in vm.flows.iter().enumerate() {
                if let Arrivals::ClosedLoop { clients, .. } = flow.arrivals {
                    for _ in 0..clients {
                        e.client_after_think(v, f);
                    }
                }
            }
        }
        e
    }

    /// Schedules the next request of a closed-loop client of flow (v, f) one think time from now.
    fn client_after_think(&mut self, v: usize, f: usize) {
        let c = self.flows[v][f].clients.as_mut().expect("closed-loop flow");
        let t = self.now + (c.rng.exp1() * c.think_ns) as u64;
        self.push_client(t, v, f);
    }

    /// A packet of flow (v, f) was dropped: a closed-loop client retries after its timeout.
    #[inline]
    fn on_drop(&mut self, p: Pkt) {
        let (v, f) = (p.vm as usize, p.flow as usize);
        self.totals.dropped += 1;
        self.vm_ctr[v].dropped += 1;
        if let Some(c) = self.flows[v][f].clients.as_ref() {
            let t = self.now + c.timeout_ns;
            self.push_client(t, v, f);
        }
    }

    pub fn vms(&self) -> usize {
        self.vms
    }

    // ---------------------------------------------------------------- settings

    /// Applies new settings; adaptive controllers persist while their mode stays the same.
    pub fn apply(&mut self, s: &CoalescingSettings) -> Result<(), String> {
        if s.vms.len() != self.vms {
            return Err(format!("settings for {} VMs on a host with {}", s.vms.len(), self.vms));
        }
        for layer in LayerId::all(self.vms) {
            let ls = *s.layer(layer);
            for dir in Direction::BOTH {
                self.apply_one(layer, dir, ls.get(dir))?;
            }
            let napi_stages = match layer {
                LayerId::Nic => Some([NIC_RX, NIC_TXC]),
                LayerId::Backend(_) => None,
                LayerId::Frontend(v) => Some([fe_rx(v), fe_txc(v)]),
            };
            for si in napi_stages.into_iter().flatten() {
                // Read by the next poll that completes (the kernel reads the values in
                // napi_complete_done); a deferral already under way runs its timer out.
                let st = &mut self.stages[si];
                st.defer_max = ls.napi.napi_defer_hard_irqs;
                st.defer_timeout_ns = ls.napi.gro_flush_timeout_ns;
            }
        }
        for (v, vm) in s.vms.iter().enumerate() {
            vm.polling.check().map_err(|e| format!("VM {v}: {e}"))?;
            if !vm.polling.is_off() && !self.stages[fe_rx(v)].napi {
                return Err(format!(
                    "VM {v}: busy polling needs the guest's NAPI, and this host runs without it (host.napi = false)"
                ));
            }
            // Read when the application next returns to epoll; a spin under way runs on.
            let a = &mut self.apps[v];
            a.spin_ns = u64::from(vm.polling.busy_poll_us) * 1000;
            a.suspend_ns = u64::from(vm.polling.irq_suspend_timeout_us) * 1000;
            self.polling_ever |= a.spin_ns > 0;
            if a.state == AppState::Asleep {
                a.spin_left_ns = a.spin_ns;
            }
        }
        Ok(())
    }

    /// The NAPI deferral in force on `layer` (off on a backend, which has no NAPI).
    pub fn napi(&self, layer: LayerId) -> NapiParams {
        let si = match layer {
            LayerId::Nic => NIC_RX,
            LayerId::Backend(_) => return NapiParams::OFF,
            LayerId::Frontend(v) => fe_rx(v),
        };
        let st = &self.stages[si];
        NapiParams::new(st.defer_max, st.defer_timeout_ns)
    }

    fn apply_one(&mut self, layer: LayerId, dir: Direction, m: Moderation) -> Result<(), String> {
        let si = knob_stage(layer, dir, self.sriov);
        let knobs = match m {
            Moderation::Fixed(k) => {
                self.stages[si].controller = None;
                k
            }
            Moderation::Adaptive(mode) => {
                let keep = self.stages[si].controller.as_ref().is_some_and(|c| c.mode == mode);
                if keep {
                    // The controller keeps its state and its current knobs.
                    return Ok(());
                }
                let f = self.factory.as_ref().ok_or_else(|| {
                    format!(
                        "{layer} {}: adaptive mode `{}` needs a controller factory",
                        dir.name(),
                        mode.name()
                    )
                })?;
                let ctl = f.create(mode, layer, dir).ok_or_else(|| {
                    format!("{layer} {}: no implementation of adaptive mode `{}`", dir.name(), mode.name())
                })?;
                let k = ctl.initial();
                self.stages[si].controller = Some(Controller { mode, ctl });
                k
            }
        };
        self.set_knobs(si, knobs);
        Ok(())
    }

    /// Changes a stage's knobs, honouring items already pending under the old ones.
    fn set_knobs(&mut self, si: usize, k: Knobs) {
        let st = &mut self.stages[si];
        if st.knobs() == Some(k) {
            return;
        }
        st.trigger = Trigger::Knobs(k);
        if st.pending == 0 || st.masked {
            // A masked NAPI stage: the poll takes what is pending; the new knobs apply once it
            // completes.
            return;
        }
        self.fire_or_arm(si);
    }

    /// Items are pending at an armed knob stage whose first item came at `first_pending_ns`:
    /// fire now if its knobs say so, else arm the timer for `usecs` after that first item.
    fn fire_or_arm(&mut self, si: usize) {
        let st = &self.stages[si];
        let Some(k) = st.knobs() else { unreachable!("only knob stages fire on their knobs") };
        let deadline = st.first_pending_ns + u64::from(k.usecs) * 1000;
        if k.usecs == 0 || (k.frames > 0 && st.pending >= k.frames) || deadline <= self.now {
            self.fire(si);
        } else {
            let st = &mut self.stages[si];
            st.timer_armed = true;
            st.timer_gen = st.timer_gen.wrapping_add(1);
            let epoch = st.timer_gen;
            self.set_timer(si, deadline, epoch);
        }
    }

    /// Knobs in force for (layer, direction).
    pub fn knobs(&self, layer: LayerId, dir: Direction) -> Knobs {
        self.stages[knob_stage(layer, dir, self.sriov)].knobs().unwrap_or(Knobs::PER_PACKET)
    }

    pub(crate) fn counters(&self, stage: usize) -> StageCounters {
        self.stages[stage].c
    }

    /// Busy time of CPU `i` (host cores first, then one vCPU per VM): (irq, thread), ns.
    pub fn cpu_busy(&mut self, i: usize) -> (u64, u64) {
        let now = self.now;
        let c = &mut self.cpus[i];
        c.account(now);
        (c.busy_irq_ns, c.busy_thread_ns)
    }

    pub fn host_cpus(&self) -> usize {
        self.vcpu0
    }

    /// Packets anywhere inside the host (including the wire and the switch).
    pub fn in_flight(&self) -> u64 {
        let queued: usize = self.stages.iter().map(|s| s.q.len()).sum();
        (queued + self.wire_rx.len()) as u64
    }

    // ---------------------------------------------------------------- event loop

    #[inline]
    fn push_client(&mut self, t: u64, v: usize, f: usize) {
        self.seq += 1;
        self.clients.push(Reverse((ev_key(t, self.seq), v as u32, f as u32)));
    }

    /// Schedules slot `i`'s event at `t`, replacing the slot's older one.
    #[inline]
    fn set_slot(&mut self, i: usize, t: u64, tag: u32) {
        self.seq += 1;
        let key = ev_key(t, self.seq);
        self.slots[i] = Slot { key, tag };
        if i == self.next_slot {
            if key <= self.next_key {
                self.next_key = key;
            } else {
                self.slots_dirty = true;
            }
        } else if key < self.next_key {
            self.next_key = key;
            self.next_slot = i;
        }
    }

    #[inline]
    fn set_cpu_done(&mut self, ci: usize, t: u64, epoch: u32) {
        self.set_slot(ci, t, epoch);
    }

    #[inline]
    fn set_timer(&mut self, si: usize, t: u64, gen_: u32) {
        self.set_slot(self.timer_slot[si] as usize, t, gen_);
    }

    /// The stage's timer event went stale (the stage notified): drop it rather than fire it
    /// for nothing.
    #[inline]
    fn clear_timer(&mut self, si: usize) {
        let i = self.timer_slot[si] as usize;
        if self.slots[i].key != NO_EVENT {
            self.slots[i].key = NO_EVENT;
            if i == self.next_slot {
                self.slots_dirty = true;
            }
        }
    }

    #[inline]
    fn set_wire_done(&mut self, t: u64) {
        self.set_slot(self.slots.len() - 1, t, 0);
    }

    /// Finds the earliest slot again.
    fn rescan_slots(&mut self) {
        let (mut best, mut at) = (NO_EVENT, 0);
        for (i, s) in self.slots.iter().enumerate() {
            if s.key < best {
                best = s.key;
                at = i;
            }
        }
        self.next_key = best;
        self.next_slot = at;
        self.slots_dirty = false;
    }

    fn pick_next_source(&mut self) {
        let mut best = (u64::MAX, 0);
        for (i, s) in self.sources.iter().enumerate() {
            let t = s.arrivals.peek();
            if t < best.0 {
                best = (t, i);
            }
        }
        self.next_src_t = best.0;
        self.next_src = best.1;
    }

    /// Runs every event up to and including `t_end`, then sets the clock to `t_end`.
    pub fn run_until(&mut self, t_end: u64) {
        loop {
            if self.slots_dirty {
                self.rescan_slots();
            }
            let k_slot = self.next_key;
            let k_client = self.clients.peek().map_or(NO_EVENT, |e| e.0.0);
            let k_ev = k_slot.min(k_client);
            let t_ev = if k_ev == NO_EVENT { u64::MAX } else { (k_ev >> 64) as u64 };
            let t_wire = self.wire_rx.front().map_or(u64::MAX, |x| x.0);
            let t_src = self.next_src_t;
            let t = t_ev.min(t_wire).min(t_src);
            if t > t_end {
                break;
            }
            self.now = t;
            // Fixed order for simultaneous events: scheduled events (by sequence), wire, sources.
            if t_ev == t {
                if k_slot < k_client {
                    let i = self.next_slot;
                    let tag = self.slots[i].tag;
                    self.slots[i].key = NO_EVENT;
                    self.slots_dirty = true;
                    self.handle_slot(i, tag);
                } else {
                    let Reverse((_, vm, flow)) = self.clients.pop().expect("peeked");
                    let src = self.flows[vm as usize][flow as usize].src;
                    self.emit(src);
                }
            } else if t_wire == t {
                let (_, p) = self.wire_rx.pop_front().expect("peeked");
                // The NIC's switch puts a VF's packets straight into that VF's ring.
                let si = if self.sriov { fe_rx(p.vm as usize) } else { NIC_RX };
                self.admit(si, p);
            } else {
                self.generate();
            }
        }
        self.now = t_end;
    }

    fn handle_slot(&mut self, i: usize, tag: u32) {
        let n_cpus = self.cpus.len();
        if i < n_cpus {
            if self.cpus[i].epoch == tag {
                self.cpu_done(i);
            }
        } else if i < self.slots.len() - 1 {
            let si = self.slot_stage[i - n_cpus] as usize;
            let st = &self.stages[si];
            if st.timer_gen != tag {
                return;
            }
            if st.defer_armed {
                self.defer_timer(si);
            } else if st.suspend_armed {
                // The application did not poll again within irq_suspend_timeout: the
                // interrupt is resumed.
                self.app_release(self.stage_vm(si));
            } else if st.timer_armed && st.pending > 0 {
                self.fire(si);
            }
        } else {
            self.wire_done();
        }
    }

    /// The next source emits a packet.
    fn generate(&mut self) {
        let i = self.next_src;
        let src = &mut self.sources[i];
        src.arrivals.advance();
        self.pick_next_source();
        self.emit(i);
    }

    /// Source `i` emits one packet now: onto the rx wire, or into its VM's send queue.
    fn emit(&mut self, i: usize) {
        let now = self.now;
        let src = &mut self.sources[i];
        let bytes = src.sizes.draw();
        let p = Pkt { t0: now, bytes: bytes as u16, vm: src.vm, flow: src.flow };
        let rx = src.rx;
        self.totals.offered += 1;
        if rx {
            // The upstream switch feeds the wire at line rate; it drops when its buffer is full.
            if self.wire_rx.len() >= self.switch_buffer {
                self.totals.switch_drops += 1;
                self.on_drop(p);
                return;
            }
            let start = self.wire_rx_free_ps.max(now * 1000);
            let done = start + self.wire_ps(bytes);
            self.wire_rx_free_ps = done;
            // Arrival at the NIC when the last bit is in, rounded up to the next nanosecond.
            let t_nic = done.div_ceil(1000);
            self.wire_rx.push_back((t_nic, Pkt { t0: t_nic, ..p }));
        } else {
            self.admit(sock_tx(p.vm as usize), p);
        }
    }

    /// Wire time of a frame: the frame plus 20 bytes of preamble and inter-frame gap. The last
    /// size's answer is kept: flows mostly repeat their frame size, and `round` is a libm call.
    #[inline]
    fn wire_ps(&mut self, bytes: u32) -> u64 {
        if self.wire_memo.0 != bytes {
            self.wire_memo = (bytes, (f64::from(bytes.max(64) + 20) * self.ps_per_byte).round() as u64);
        }
        self.wire_memo.1
    }

    /// Puts a packet into a stage's queue, or drops it when the queue is full.
    fn admit(&mut self, si: usize, p: Pkt) {
        let st = &mut self.stages[si];
        if st.free() == 0 {
            st.c.drops += 1;
            self.on_drop(p);
            return;
        }
        st.q.push_back(p);
        st.c.admitted += 1;
        st.c.admitted_bytes += u64::from(p.bytes);
        self.on_items(si, 1, u64::from(p.bytes));
    }

    /// Items became pending at a stage (packets admitted, or completions counted).
    fn on_items(&mut self, si: usize, k: u32, bytes: u64) {
        let now = self.now;
        let st = &mut self.stages[si];
        if st.pending == 0 {
            st.first_pending_ns = now;
        }
        st.pending += k;
        st.pending_bytes += bytes;
        match st.trigger {
            // Masked (NAPI, or an application that is awake): no notification; the scheduled
            // poll or the application takes the items.
            Trigger::Knobs(_) if st.masked => {
                if st.wakes_spinner {
                    self.end_spin(self.stage_vm(si), SpinEnd::Work);
                }
            }
            Trigger::Knobs(kn) => {
                if kn.usecs == 0 || (kn.frames > 0 && st.pending >= kn.frames) {
                    self.fire(si);
                } else if !st.timer_armed {
                    st.timer_armed = true;
                    st.timer_gen = st.timer_gen.wrapping_add(1);
                    let epoch = st.timer_gen;
                    self.set_timer(si, now + u64::from(kn.usecs) * 1000, epoch);
                }
            }
            Trigger::Worker { .. } => self.kick_worker(si),
            Trigger::Wire => {
                if !self.wire_tx_busy {
                    self.wire_start();
                }
            }
        }
    }

    /// Free slots downstream of a back-pressured stage (`usize::MAX` where drops are used).
    fn downstream_free(&self, si: usize) -> usize {
        match self.stages[si].kind {
            Kind::SockTx(v) => self.stages[fe_tx(v)].free(),
            Kind::BeTx(_) => self.stages[NIC_TX].free(),
            _ => usize::MAX,
        }
    }

    fn downstream_of(&self, si: usize) -> Option<usize> {
        match self.stages[si].kind {
            Kind::SockTx(v) => Some(fe_tx(v)),
            Kind::BeTx(_) => Some(NIC_TX),
            _ => None,
        }
    }

    /// A notification fires (knob stages) or a worker is woken (worker stages).
    fn fire(&mut self, si: usize) {
        let st = &mut self.stages[si];
        st.c.notifications += 1;
        st.jobs_out += 1;
        let job = match st.trigger {
            Trigger::Knobs(_) if st.napi => {
                // napi_schedule: mask, and let the poll take the items when it runs.
                st.masked = true;
                st.irq_due = true;
                let armed = std::mem::take(&mut st.timer_armed);
                st.timer_gen = st.timer_gen.wrapping_add(1);
                if armed {
                    self.clear_timer(si);
                }
                Job::unclaimed(si)
            }
            Trigger::Knobs(_) => {
                let notify_ns = st.notify_ns;
                self.take_pending(si, notify_ns)
            }
            Trigger::Worker { .. } => Job::unclaimed(si),
            Trigger::Wire => unreachable!("the wire has no notifications"),
        };
        let (cpu, prio) = (self.stages[si].cpu, self.stages[si].prio);
        self.cpu_push(cpu, job, prio);
    }

    /// A job of everything pending at a (non-NAPI) knob stage, with `notify_ns` of overhead.
    fn take_pending(&mut self, si: usize, notify_ns: u64) -> Job {
        let now = self.now;
        let st = &mut self.stages[si];
        let k = st.pending;
        let bytes = st.pending_bytes;
        st.pending = 0;
        st.pending_bytes = 0;
        let armed = std::mem::take(&mut st.timer_armed);
        st.timer_gen = st.timer_gen.wrapping_add(1);
        st.ctr_pkts += u64::from(k);
        st.ctr_bytes += bytes;
        let first = st.in_jobs;
        if !matches!(st.kind, Kind::NicTxc | Kind::FeTxc(_)) {
            st.in_jobs += k as usize;
        }
        if armed {
            self.clear_timer(si);
        }
        let job = self.cost(si, k, bytes, first, notify_ns);
        // The adaptive algorithm sees the sample after every notification, as a driver
        // calls net_dim after each poll.
        self.stages[si].controller_sample(now);
        job
    }

    /// The CPU cost of a job of `k` items (`bytes` in all) starting at queue index `first`,
    /// with `notify_ns` of fixed overhead.
    #[inline]
    fn cost(&mut self, si: usize, k: u32, bytes: u64, first: usize, notify_ns: u64) -> Job {
        let st = &self.stages[si];
        let per_pkt = match self.service {
            ServiceDist::Deterministic => u64::from(k) * st.per_pkt_ns,
            ServiceDist::Exponential => {
                let mean = st.per_pkt_ns as f64;
                let mut sum = 0.0;
                for _ in 0..k {
                    sum += self.service_rng.exp1() * mean;
                }
                sum.round() as u64
            }
        };
        let st = &self.stages[si];
        let packet_ns = per_pkt + (bytes * st.per_byte_ps + 500) / 1000;
        let mut app_ns = 0;
        if let Kind::SockRx(v) = st.kind {
            if let Some(each) = self.vm_app_ns[v] {
                app_ns = u64::from(k) * each;
            } else {
                let fl = &self.flows[v];
                for p in st.q.range(first..first + k as usize) {
                    app_ns += fl[p.flow as usize].app_ns;
                }
            }
        }
        Job {
            stage: si as u32,
            k,
            remaining_ns: notify_ns + packet_ns + app_ns,
            notify_ns,
            packet_ns,
            app_ns,
        }
    }

    /// A worker job starts: it takes what is pending now, up to its budget and what fits
    /// downstream.
    fn claim(&mut self, job: &mut Job) {
        let si = job.stage as usize;
        let free = self.downstream_free(si);
        let st = &mut self.stages[si];
        let Trigger::Worker { budget } = st.trigger else { unreachable!("only workers claim") };
        let k = st.pending.min(budget).min(free.min(u32::MAX as usize) as u32);
        let first = st.in_jobs;
        let bytes = st.pending_bytes_of(first, k);
        st.pending -= k;
        st.pending_bytes -= bytes;
        st.in_jobs += k as usize;
        st.ctr_pkts += u64::from(k);
        st.ctr_bytes += bytes;
        let wake = if st.wake_due && k > 0 { st.wake_ns } else { 0 };
        st.wake_due = false;
        let notify_ns = st.notify_ns + wake;
        if let Some(d) = self.downstream_of(si) {
            self.stages[d].reserved += k as usize;
        }
        *job = if k == 0 { Job { k: 0, ..*job } } else { self.cost(si, k, bytes, first, notify_ns) };
    }

    /// A NAPI poll starts on CPU `ci` at `prio`: it takes what is pending now, up to the weight.
    /// It pays the interrupt's cost if an interrupt scheduled it, and the poll's own cost always.
    fn napi_claim(&mut self, ci: usize, job: &mut Job, prio: Prio) {
        let si = job.stage as usize;
        let now = self.now;
        let st = &mut self.stages[si];
        let k = st.pending.min(self.napi_weight);
        let first = st.in_jobs;
        let completions = matches!(st.kind, Kind::NicTxc | Kind::FeTxc(_));
        let bytes = if completions {
            // Completions carry no queue entries: their bytes are shared out evenly.
            if st.pending == 0 { 0 } else { st.pending_bytes * u64::from(k) / u64::from(st.pending) }
        } else {
            st.pending_bytes_of(first, k)
        };
        st.pending -= k;
        st.pending_bytes -= bytes;
        if !completions {
            st.in_jobs += k as usize;
        }
        st.ctr_pkts += u64::from(k);
        st.ctr_bytes += bytes;
        st.c.polls += 1;
        // The interrupt's cost covers the poll it schedules (the calibrated per-notification
        // cost of SIMULATOR.md); every further poll of the same schedule costs `poll_ns`.
        let mut notify_ns = if std::mem::take(&mut st.irq_due) { st.notify_ns } else { st.poll_ns };
        if std::mem::take(&mut st.timer_due) {
            // Scheduled by the deferral's hrtimer: the poll's cost and the timer's.
            notify_ns += st.timer_ns;
        }
        if prio == Prio::Irq {
            self.cpus[ci].sirq.on_poll(now, k);
        }
        *job = self.cost(si, k, bytes, first, notify_ns);
    }

    /// A NAPI poll of `k` items finished (its items have moved on).
    fn napi_poll_done(&mut self, si: usize, k: u32) {
        if self.stages[si].app_owned {
            // The application's busy poll: it processes what it found.
            self.app_poll_done(self.stage_vm(si));
            return;
        }
        if k == self.napi_weight {
            // The poll used its whole weight: it stays scheduled and polls again.
            self.napi_reschedule(si);
            return;
        }
        self.napi_complete(si, k > 0);
    }

    /// napi_complete_done after a poll (`found_work`: it took items), or busy_poll_stop.
    fn napi_complete(&mut self, si: usize, found_work: bool) {
        let now = self.now;
        let st = &mut self.stages[si];
        // napi_complete_done's deferral: a poll that found work reloads the count of empty
        // polls to defer; while the count lasts and the timeout is set, the interrupt stays
        // masked and the hrtimer polls again after the timeout (the driver neither re-arms
        // its interrupt nor, like mlx5, runs DIM).
        if found_work {
            st.defer_left = st.defer_max;
        }
        if st.defer_left > 0 {
            st.defer_left -= 1;
            if st.defer_timeout_ns > 0 {
                st.ksoftirqd = false;
                st.defer_armed = true;
                st.timer_gen = st.timer_gen.wrapping_add(1);
                let (at, epoch) = (now + st.defer_timeout_ns, st.timer_gen);
                self.set_timer(si, at, epoch);
                return;
            }
        }
        // napi_complete_done re-arms: the adaptive algorithm sees the sample, as drivers call
        // net_dim (and ixgbe its ITR update) when a poll completes; then the interrupt is
        // re-armed.
        st.controller_sample(now);
        st.masked = false;
        let in_ksoftirqd = std::mem::take(&mut st.ksoftirqd);
        if st.pending == 0 {
            return;
        }
        if st.recheck {
            // virtqueue_napi_complete found new buffers: poll again, no interrupt, in the same
            // context (a poll in ksoftirqd stays there).
            st.masked = true;
            st.ksoftirqd = in_ksoftirqd;
            self.napi_reschedule(si);
        } else {
            // A NIC with packets in its ring interrupts as soon as its knobs allow.
            self.fire_or_arm(si);
        }
    }

    // ---------------------------------------------------------------- busy polling

    /// The VM of a per-VM stage.
    #[inline]
    fn stage_vm(&self, si: usize) -> usize {
        (si - 3) / PER_VM
    }

    /// A job of VM `v`'s application ended: a spin (`spin`), or the processing of what it read.
    fn app_job_done(&mut self, v: usize, spin: bool) {
        if spin {
            self.spin_over(v);
            let a = &mut self.apps[v];
            match std::mem::take(&mut a.spin_end) {
                // Nothing came within the budget: the application sleeps.
                SpinEnd::Timeout => a.spin_left_ns = 0,
                SpinEnd::Work => a.spin_left_ns = a.spin_ns,
                // It yielded; it spins on with what is left of its budget.
                SpinEnd::Resched => {}
            }
        } else {
            self.apps[v].spin_left_ns = self.apps[v].spin_ns;
        }
        self.app_return(v);
    }

    /// VM `v`'s spin is over: nothing it waits on ends it any more.
    fn spin_over(&mut self, v: usize) {
        self.cpus[self.vcpu0 + v].spin = false;
        self.stages[fe_rx(v)].wakes_spinner = false;
        self.stages[sock_rx(v)].wakes_spinner = false;
    }

    /// VM `v`'s application returns to epoll: it reads what its socket holds, else busy-polls
    /// its NAPI, else spins for what comes, else sleeps.
    fn app_return(&mut self, v: usize) {
        if !self.apps[v].on() {
            self.app_sleep(v);
            return;
        }
        let (ss, vc) = (sock_rx(v), self.vcpu0 + v);
        // Awake: the socket raises no wake-ups.
        let st = &mut self.stages[ss];
        st.masked = true;
        if std::mem::take(&mut st.timer_armed) {
            st.timer_gen = st.timer_gen.wrapping_add(1);
            self.clear_timer(ss);
        }
        self.apps[v].state = AppState::Busy;
        if self.stages[ss].jobs_out > 0 {
            // Its own earlier read is still queued; it returns after that one.
            return;
        }
        if self.stages[ss].pending > 0 {
            let job = self.take_pending(ss, 0);
            self.stages[ss].jobs_out += 1;
            self.cpu_push(vc, job, Prio::Thread);
            return;
        }
        if self.app_poll(v) {
            return;
        }
        if self.apps[v].spin_left_ns > 0 {
            self.push_spin(v);
            return;
        }
        self.app_sleep(v);
    }

    /// The application takes its NAPI (`napi_busy_loop`), unless a poll is scheduled in
    /// softirq; the interrupt stays masked while it owns it.
    fn app_grab(&mut self, v: usize) -> bool {
        let si = fe_rx(v);
        let st = &mut self.stages[si];
        if st.app_owned {
            return true;
        }
        if st.jobs_out > 0 {
            return false;
        }
        st.app_owned = true;
        st.masked = true;
        let armed = std::mem::take(&mut st.timer_armed) | std::mem::take(&mut st.defer_armed);
        st.timer_due = false;
        st.timer_gen = st.timer_gen.wrapping_add(1);
        if armed {
            self.clear_timer(si);
        }
        true
    }

    /// The application polls its NAPI in its own context if it can take it and it has items;
    /// with IRQ suspension the suspension's timer starts again.
    fn app_poll(&mut self, v: usize) -> bool {
        if !self.app_grab(v) {
            return false;
        }
        let si = fe_rx(v);
        if self.stages[si].pending == 0 {
            return false;
        }
        let (now, suspend_ns) = (self.now, self.apps[v].suspend_ns);
        let st = &mut self.stages[si];
        st.jobs_out += 1;
        if suspend_ns > 0 {
            st.suspend_armed = true;
            st.timer_gen = st.timer_gen.wrapping_add(1);
            let epoch = st.timer_gen;
            self.set_timer(si, now + suspend_ns, epoch);
        }
        self.cpu_push(self.vcpu0 + v, Job::unclaimed(si), Prio::Thread);
        true
    }

    /// The application's poll of its NAPI ended: without IRQ suspension the busy poll stops
    /// (`busy_poll_stop`: deferral or the interrupt takes over); the application then reads.
    fn app_poll_done(&mut self, v: usize) {
        if self.apps[v].suspend_ns == 0 {
            self.app_release(v);
        }
        self.apps[v].spin_left_ns = self.apps[v].spin_ns;
        self.app_return(v);
    }

    /// The application lets go of its NAPI: `busy_poll_stop`, or the end of an IRQ suspension
    /// (`napi_resume_irqs`). Either arms the deferral's timer where one is set, else re-arms
    /// the interrupt.
    fn app_release(&mut self, v: usize) {
        let si = fe_rx(v);
        let st = &mut self.stages[si];
        if !st.app_owned {
            return;
        }
        st.app_owned = false;
        if std::mem::take(&mut st.suspend_armed) {
            st.timer_gen = st.timer_gen.wrapping_add(1);
            self.clear_timer(si);
        }
        self.napi_complete(si, true);
    }

    /// The application sleeps in epoll: its socket wakes it again, and its NAPI is let go.
    fn app_sleep(&mut self, v: usize) {
        let a = &mut self.apps[v];
        a.state = AppState::Asleep;
        a.spin_left_ns = a.spin_ns;
        let ss = sock_rx(v);
        self.stages[ss].masked = false;
        if self.stages[ss].pending > 0 {
            self.fire_or_arm(ss);
        }
        self.app_release(v);
    }

    /// The application spins for what arrives, for what is left of its budget (prefer_busy_poll:
    /// with its NAPI masked where it can take it).
    fn push_spin(&mut self, v: usize) {
        let (ss, vc) = (sock_rx(v), self.vcpu0 + v);
        self.app_grab(v);
        let a = &mut self.apps[v];
        a.state = AppState::Spinning;
        a.spin_end = SpinEnd::Timeout;
        let left = a.spin_left_ns;
        self.stages[ss].jobs_out += 1;
        self.stages[ss].wakes_spinner = true;
        self.stages[fe_rx(v)].wakes_spinner = true;
        let job =
            Job { stage: ss as u32, k: 0, remaining_ns: left, notify_ns: left, packet_ns: 0, app_ns: 0 };
        self.cpu_push(vc, job, Prio::Thread);
        self.cpus[vc].spin = true;
    }

    /// VM `v`'s spin ends now (`why`): its job finishes at once, its CPU time being what it spun.
    fn end_spin(&mut self, v: usize, why: SpinEnd) {
        let vc = self.vcpu0 + v;
        if !self.cpus[vc].spin {
            return;
        }
        self.spin_over(v);
        let (now, ss) = (self.now, sock_rx(v) as u32);
        let cpu = &mut self.cpus[vc];
        let spun = match cpu.running.as_mut() {
            Some(r) if r.job.stage == ss && r.job.k == 0 => {
                r.job.notify_ns -= r.end - now;
                r.end = now;
                cpu.epoch = cpu.epoch.wrapping_add(1);
                let (epoch, spun) = (cpu.epoch, r.job.notify_ns);
                self.set_cpu_done(vc, now, epoch);
                spun
            }
            _ => match cpu.thread.iter_mut().find(|j| j.stage == ss && j.k == 0) {
                Some(j) => {
                    j.notify_ns -= j.remaining_ns;
                    j.remaining_ns = 0;
                    j.notify_ns
                }
                None => {
                    debug_assert!(false, "VM {v}'s spin is neither running nor queued");
                    0
                }
            },
        };
        let a = &mut self.apps[v];
        a.spin_end = why;
        if why == SpinEnd::Resched {
            a.spin_left_ns = a.spin_left_ns.saturating_sub(spun);
        }
    }

    /// The deferral's hrtimer expired (`napi_watchdog`): it schedules a poll, which runs in the
    /// softirq the timer raises.
    fn defer_timer(&mut self, si: usize) {
        let st = &mut self.stages[si];
        st.defer_armed = false;
        st.timer_due = true;
        self.napi_reschedule(si);
    }

    /// A scheduled NAPI instance polls again: in the same softirq while its budget lasts, else
    /// in ksoftirqd at thread priority.
    fn napi_reschedule(&mut self, si: usize) {
        let now = self.now;
        let ci = self.stages[si].cpu;
        let deferred = self.stages[si].ksoftirqd || self.cpus[ci].sirq.exhausted(now, &self.softirq);
        let st = &mut self.stages[si];
        st.jobs_out += 1;
        st.ksoftirqd = deferred;
        let prio = if deferred { Prio::Thread } else { Prio::Irq };
        self.cpu_push(ci, Job::unclaimed(si), prio);
    }

    fn cpu_push(&mut self, ci: usize, job: Job, prio: Prio) {
        if self.polling_ever && prio == Prio::Thread && self.cpus[ci].spin {
            // Runnable thread work ends the application's spin (need_resched), before it queues.
            self.end_spin(ci - self.vcpu0, SpinEnd::Resched);
        }
        let now = self.now;
        let cpu = &mut self.cpus[ci];
        match prio {
            Prio::Irq => cpu.irq.push_back(job),
            Prio::Thread => cpu.thread.push_back(job),
        }
        if cpu.waking || cpu.completing {
            return;
        }
        match cpu.running {
            None => {
                if cpu.wake_ns > 0 && cpu.idle_since < now {
                    // A halted vCPU: the job waits for the wake-up.
                    cpu.waking = true;
                    cpu.epoch = cpu.epoch.wrapping_add(1);
                    let epoch = cpu.epoch;
                    let t = now + cpu.wake_ns;
                    self.set_cpu_done(ci, t, epoch);
                } else {
                    self.cpu_start_next(ci);
                }
            }
            Some(Running { job: run, prio: Prio::Thread, end }) if prio == Prio::Irq => {
                // Interrupts preempt threads; the thread resumes later where it stopped.
                cpu.account(now);
                let rest = Job { remaining_ns: end - now, ..run };
                cpu.thread.push_front(rest);
                cpu.running = None;
                self.cpu_start_next(ci);
            }
            Some(_) => {}
        }
    }

    fn cpu_start_next(&mut self, ci: usize) {
        let now = self.now;
        loop {
            let cpu = &mut self.cpus[ci];
            let (mut job, prio) = if let Some(j) = cpu.irq.pop_front() {
                (j, Prio::Irq)
            } else {
                // No interrupt-context work left: a softirq run ends here.
                cpu.sirq.end();
                if let Some(j) = cpu.thread.pop_front() {
                    (j, Prio::Thread)
                } else {
                    cpu.running = None;
                    cpu.idle_since = now;
                    return;
                }
            };
            if !job.claimed() && self.stages[job.stage as usize].napi {
                // A poll runs even when it finds nothing: an empty poll still costs.
                self.napi_claim(ci, &mut job, prio);
            } else if !job.claimed() {
                self.claim(&mut job);
                if job.k == 0 {
                    // Nothing to do after all (the queue was drained or downstream is full).
                    self.job_done(job);
                    continue;
                }
            }
            let cpu = &mut self.cpus[ci];
            let end = now + job.remaining_ns;
            cpu.seg_start = now;
            cpu.running = Some(Running { job, end, prio });
            cpu.epoch = cpu.epoch.wrapping_add(1);
            let epoch = cpu.epoch;
            self.set_cpu_done(ci, end, epoch);
            return;
        }
    }

    fn cpu_done(&mut self, ci: usize) {
        let now = self.now;
        let cpu = &mut self.cpus[ci];
        if cpu.waking {
            cpu.waking = false;
            self.cpu_start_next(ci);
            return;
        }
        cpu.account(now);
        let Some(Running { job, .. }) = cpu.running.take() else { return };
        cpu.idle_since = now;
        cpu.completing = true;
        self.account_job(&job);
        self.job_done(job);
        self.cpus[ci].completing = false;
        if self.cpus[ci].running.is_none() && !self.cpus[ci].waking {
            self.cpu_start_next(ci);
        }
    }

    fn account_job(&mut self, job: &Job) {
        let cpu = &mut self.totals.cpu;
        let b = match self.stages[job.stage as usize].bucket {
            Bucket::Nic => &mut cpu.nic,
            Bucket::Backend => &mut cpu.backend,
            Bucket::Frontend => &mut cpu.frontend,
            Bucket::Stack => &mut cpu.stack,
        };
        b.notify_ns += job.notify_ns;
        b.packet_ns += job.packet_ns;
        cpu.app_ns += job.app_ns;
    }

    /// Moves a finished job's items on.
    fn job_done(&mut self, job: Job) {
        let si = job.stage as usize;
        let k = job.k as usize;
        let st = &mut self.stages[si];
        st.jobs_out -= 1;
        st.c.done += k as u64;
        let kind = st.kind;
        match kind {
            Kind::NicTxc => {
                self.stages[NIC_TX].held -= k;
                for v in 0..self.vms {
                    self.kick_worker(be_tx(v));
                }
            }
            Kind::FeTxc(v) => {
                self.stages[fe_tx(v)].held -= k;
                self.kick_worker(sock_tx(v));
            }
            _ => {
                st.in_jobs -= k;
                for _ in 0..k {
                    let p = self.stages[si].q.pop_front().expect("job items are queued");
                    self.stages[si].c.done_bytes += u64::from(p.bytes);
                    self.route(kind, p);
                }
                if let Kind::FeTx(v) = kind {
                    self.stages[si].held += k;
                    if !self.sriov {
                        let b = be_tx(v);
                        if self.stages[b].jobs_out == 0 && self.stages[b].pending as usize == k {
                            // The kick found the backend worker idle: it must be woken.
                            self.stages[b].wake_due = true;
                        }
                        self.kick_worker(b);
                    }
                }
            }
        }
        if self.stages[si].napi {
            self.napi_poll_done(si, job.k);
        } else if matches!(self.stages[si].trigger, Trigger::Worker { .. }) {
            self.kick_worker(si);
        } else if self.polling_ever
            && let Kind::SockRx(v) = kind
        {
            let a = &self.apps[v];
            if a.on() || a.state != AppState::Asleep {
                self.app_job_done(v, job.k == 0);
            }
        }
    }

    /// A worker with pending items and room downstream starts a job if it has none.
    fn kick_worker(&mut self, si: usize) {
        let st = &self.stages[si];
        if st.jobs_out == 0 && st.pending > 0 && self.downstream_free(si) > 0 {
            self.fire(si);
        }
    }

    /// Where a packet goes when its job at a stage of kind `from` completes.
    fn route(&mut self, from: Kind, p: Pkt) {
        let v = p.vm as usize;
        match from {
            Kind::NicRx => self.admit(be_rx(v), p),
            Kind::BeRx(_) => self.admit(fe_rx(v), p),
            Kind::FeRx(_) => self.admit(sock_rx(v), p),
            Kind::SockRx(_) => {
                self.totals.completed += 1;
                self.totals.completed_bytes += u64::from(p.bytes);
                self.vm_ctr[v].completed += 1;
                let fl = &mut self.flows[v][p.flow as usize];
                if let Some(sz) = fl.responses.as_mut() {
                    // The application answers: the response keeps the request's origin time.
                    let bytes = sz.draw() as u16;
                    self.totals.offered += 1;
                    self.admit(sock_tx(v), Pkt { bytes, ..p });
                } else {
                    self.record_latency(p);
                }
            }
            Kind::SockTx(_) => {
                let d = &mut self.stages[fe_tx(v)];
                d.reserved -= 1;
                self.admit(fe_tx(v), p);
            }
            Kind::FeTx(_) if self.sriov => {
                // The doorbell rang: the NIC fetches the VF's descriptors and queues the frames
                // for the wire; the ring's slots stay owned until the VF's tx completion.
                self.admit(NIC_TX, p);
            }
            Kind::FeTx(_) => {
                // Slots stay owned by the frontend ring until the tx completion.
                let b = &mut self.stages[be_tx(v)];
                b.q.push_back(p);
                b.c.admitted += 1;
                b.c.admitted_bytes += u64::from(p.bytes);
                b.pending += 1;
                b.pending_bytes += u64::from(p.bytes);
            }
            Kind::BeTx(_) => {
                self.stages[NIC_TX].reserved -= 1;
                self.admit(NIC_TX, p);
                self.on_items(fe_txc(v), 1, u64::from(p.bytes));
            }
            Kind::NicTx | Kind::NicTxc | Kind::FeTxc(_) => unreachable!("no packets leave {from:?}"),
        }
    }

    fn wire_start(&mut self) {
        let Some(p) = self.stages[NIC_TX].q.front().copied() else { return };
        self.wire_tx_busy = true;
        let start = self.wire_tx_free_ps.max(self.now * 1000);
        let done = start + self.wire_ps(u32::from(p.bytes));
        self.wire_tx_free_ps = done;
        self.set_wire_done(done.div_ceil(1000));
    }

    fn wire_done(&mut self) {
        self.wire_tx_busy = false;
        let st = &mut self.stages[NIC_TX];
        let p = st.q.pop_front().expect("a frame was on the wire");
        if !self.sriov {
            st.held += 1;
        }
        st.c.done += 1;
        st.c.done_bytes += u64::from(p.bytes);
        self.totals.completed += 1;
        self.totals.completed_bytes += u64::from(p.bytes);
        let v = p.vm as usize;
        self.vm_ctr[v].completed += 1;
        self.record_latency(p);
        if self.flows[v][p.flow as usize].clients.is_some() {
            // The response reached its client, which thinks and asks again.
            self.client_after_think(v, p.flow as usize);
        }
        // The completion is the host driver's, or with SR-IOV the VF's, in the guest.
        let txc = if self.sriov { fe_txc(v) } else { NIC_TXC };
        self.on_items(txc, 1, u64::from(p.bytes));
        if !self.stages[NIC_TX].q.is_empty() {
            self.wire_start();
        }
    }

    fn record_latency(&mut self, p: Pkt) {
        let v = p.vm as usize;
        if !self.flows[v][p.flow as usize].counted {
            return;
        }
        let lat = self.now - p.t0;
        let c = &mut self.vm_ctr[v];
        c.lat_count += 1;
        c.lat_sum_ns += u128::from(lat);
        c.lat_max_ns = c.lat_max_ns.max(lat);
        let l = lat.max(1);
        self.vm_hist[v].saturating_record(l);
        // Probes see a sample of the traffic, with measurement noise.
        self.vm_probe_in[v] -= 1;
        if self.vm_probe_in[v] == 0 {
            self.vm_probe_in[v] = self.probe.every;
            let m = self.probe_sample(l);
            self.guest_probe[v].saturating_record(m);
        }
        self.host_probe_in -= 1;
        if self.host_probe_in == 0 {
            self.host_probe_in = self.probe.every;
            let m = self.probe_sample(l);
            self.host_probe.saturating_record(m);
        }
    }

    fn probe_sample(&mut self, l: u64) -> u64 {
        if self.probe.noise > 0.0 {
            ((l as f64) * (self.probe.noise * self.probe_rng.normal()).exp()).max(1.0) as u64
        } else {
            l
        }
    }
}
