//! NAPI: how Linux turns notifications into polls (`net/core/dev.c`, `kernel/softirq.c`).
//!
//! Since 2.6 every NIC driver, virtio-net and netfront handle their interrupts the same way
//! (Salim, Olsson & Kuznetsov, "Beyond Softnet", 2001):
//! 1. **The interrupt masks its source.** The hard interrupt (`napi_schedule`) disables further
//!    interrupts of that queue (on virtio: `virtqueue_disable_cb`, so the device stops
//!    notifying) and puts the queue's NAPI instance on the CPU's poll list. Items that arrive
//!    while it is masked raise nothing; the poll takes them.
//! 2. **A poll takes at most the weight** (`NAPI_POLL_WEIGHT` = 64) and is called again while it
//!    uses all of it.
//! 3. **A poll that finds less than its weight completes** (`napi_complete_done`) and re-arms the
//!    interrupt. From then on the coalescing knobs (`usecs`, `frames`, ethtool semantics) decide
//!    when the next interrupt fires; a NIC whose ring already holds packets interrupts as soon as
//!    its knobs allow. virtio-net and netfront re-check their ring after re-enabling callbacks
//!    (`virtqueue_napi_complete`, `RING_FINAL_CHECK_FOR_RESPONSES`) and poll again at once,
//!    without an interrupt, when something arrived during the poll.
//! 4. **The softirq has a budget.** `net_rx_action` polls up to `netdev_budget` (300) packets per
//!    round; `__do_softirq` restarts up to `MAX_SOFTIRQ_RESTART` (10) times and for at most
//!    `MAX_SOFTIRQ_TIME` (2 ms). Past either limit it wakes ksoftirqd, and the polls still
//!    scheduled run at thread priority, competing with the backend worker or the application
//!    for the CPU instead of starving them.
//!
//! Costs: the interrupt's fixed cost once per interrupt, carried by the poll it schedules (the
//! per-notification costs of SIMULATOR.md were calibrated at low load, where one interrupt is
//! one poll); every further poll of the same schedule (a re-poll after a full weight, a virtio
//! re-check, a poll in ksoftirqd) costs `costs.nic_poll_us` / `costs.frontend_poll_us`, empty
//! ones included; per-packet work as without NAPI. So at low load NAPI changes nothing. The engine keeps the per-stage state (masked, the
//! poll in flight); this module holds the parameters and the per-CPU softirq accounting.

use super::scenario::HostConfig;

/// The softirq's limits, from the scenario's host.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SoftirqLimits {
    /// Packets a softirq may poll in interrupt context before ksoftirqd takes over:
    /// `netdev_budget` per round, one round plus `MAX_SOFTIRQ_RESTART` restarts.
    pub budget_pkts: u64,
    /// Time it may run in interrupt context, ns.
    pub max_time_ns: u64,
}

impl SoftirqLimits {
    pub fn new(h: &HostConfig) -> SoftirqLimits {
        SoftirqLimits {
            budget_pkts: u64::from(h.netdev_budget) * (1 + u64::from(h.softirq_max_restart)),
            max_time_ns: h.softirq_max_time_us * 1000,
        }
    }
}

/// One CPU's current softirq run: the polls it has made in interrupt context since its poll list
/// was last empty.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SoftirqRun {
    active: bool,
    start_ns: u64,
    pkts: u64,
}

impl SoftirqRun {
    /// A poll of `k` items starts in interrupt context.
    #[inline]
    pub fn on_poll(&mut self, now: u64, k: u32) {
        if !self.active {
            self.active = true;
            self.start_ns = now;
            self.pkts = 0;
        }
        self.pkts += u64::from(k);
    }

    /// Whether a poll that must run again goes to ksoftirqd (`wakeup_softirqd`).
    #[inline]
    pub fn exhausted(&self, now: u64, lim: &SoftirqLimits) -> bool {
        self.active && (self.pkts >= lim.budget_pkts || now - self.start_ns >= lim.max_time_ns)
    }

    /// The CPU has no interrupt-context work left: the softirq returns.
    #[inline]
    pub fn end(&mut self) {
        self.active = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_rounds_times_netdev_budget_and_the_time_limit() {
        let lim = SoftirqLimits::new(&HostConfig::default());
        assert_eq!(lim.budget_pkts, 3300);
        assert_eq!(lim.max_time_ns, 2_000_000);
        let mut r = SoftirqRun::default();
        assert!(!r.exhausted(0, &lim), "no run, nothing exhausted");
        for i in 0..51 {
            r.on_poll(i * 100, 64);
        }
        assert!(!r.exhausted(5_100, &lim), "3264 packets in 5 µs is within budget");
        r.on_poll(5_200, 64);
        assert!(r.exhausted(5_200, &lim), "3328 packets exceed 3300");
        r.end();
        r.on_poll(10_000, 1);
        assert!(!r.exhausted(10_000, &lim), "a new run starts afresh");
        assert!(r.exhausted(2_010_000, &lim), "2 ms in interrupt context is the limit");
    }
}
