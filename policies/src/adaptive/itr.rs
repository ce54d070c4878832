//! A port of Intel ixgbe's adaptive interrupt throttling (`ixgbe_update_itr` and `ixgbe_set_itr`
//! in drivers/net/ethernet/intel/ixgbe/ixgbe_main.c, constants from ixgbe.h), in its current form
//! (since Linux 4.16: `IXGBE_ITR_ADAPTIVE_MIN_USECS` 10, `MAX_USECS` 126, `MIN_INC` 2 and the
//! `LATENCY` flag).
//!
//! # How the algorithm works
//!
//! At the end of every poll ixgbe looks at what the interrupt delivered and picks the next
//! interrupt interval (ITR, µs), by packets per interrupt:
//!
//! | packets per interrupt | decision |
//! |---|---|
//! | none | a little more delay: ITR + 2 µs |
//! | < 4 and < 9000 bytes | latency-driven: an interval from the mean packet size, halved |
//! | 4 ..= 47 | slightly too little delay: ITR + 2 µs |
//! | 48 ..= 95 | "goldilocks": keep ITR |
//! | 96 ..= 255 | overrun: halve ITR (not below 10 µs) |
//! | ≥ 256 | bulk: an interval from the mean packet size, up to 126 µs |
//!
//! and whenever more than one jiffy passed since the last update (traffic too slow to have kept
//! it busy), it falls back to 10 µs in latency mode.
//!
//! # Mapping onto this project's knobs
//!
//! ixgbe's EITR interval is a minimum gap between interrupts and the hardware has no packet-count
//! trigger. [`ItrController`] maps the interval onto the timer knob (`usecs`) and sets
//! `frames = 0`, which in this project means "count trigger disabled, timer only" (see
//! `moderato_env::Knobs`). One controller owns one stream, so it plays a `q_vector` with a
//! single ring container: ixgbe's "smallest of the rx and tx decisions" is that ring's decision.

use moderato_env::{Direction, DriverSample, Knobs, LayerController};
use serde::{Deserialize, Serialize};

use super::AdaptiveConfigError;

/// The step by which the interval grows, µs (`IXGBE_ITR_ADAPTIVE_MIN_INC`).
pub const IXGBE_ITR_ADAPTIVE_MIN_INC: u32 = 2;
/// The shortest adaptive interval, µs (`IXGBE_ITR_ADAPTIVE_MIN_USECS`).
pub const IXGBE_ITR_ADAPTIVE_MIN_USECS: u32 = 10;
/// The longest adaptive interval, µs (`IXGBE_ITR_ADAPTIVE_MAX_USECS`).
pub const IXGBE_ITR_ADAPTIVE_MAX_USECS: u32 = 126;
/// Flag in a ring container's `itr`: the last decision was latency-driven
/// (`IXGBE_ITR_ADAPTIVE_LATENCY`).
pub const IXGBE_ITR_ADAPTIVE_LATENCY: u32 = 0x80;
/// No flag: the last decision was bulk (`IXGBE_ITR_ADAPTIVE_BULK`).
pub const IXGBE_ITR_ADAPTIVE_BULK: u32 = 0x00;

/// `q_vector->itr` for ~20K interrupts/s: 50 µs, shifted left by 2 (`IXGBE_20K_ITR`, ixgbe.h).
/// The start value of a vector with a receive ring when `rx-usecs` is adaptive.
pub const IXGBE_20K_ITR: u32 = 200;
/// `q_vector->itr` for ~12K interrupts/s: 84 µs, shifted left by 2 (`IXGBE_12K_ITR`). The start
/// value of a transmit-only vector when `tx-usecs` is adaptive.
pub const IXGBE_12K_ITR: u32 = 336;

/// Link speed of the adapter (`adapter->link_speed`); it selects how the size-based interval is
/// scaled in `ixgbe_update_itr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum IxgbeLinkSpeed {
    /// `IXGBE_LINK_SPEED_10GB_FULL`.
    #[default]
    #[serde(rename = "10g")]
    Speed10GbFull,
    /// `IXGBE_LINK_SPEED_5GB_FULL` (falls to the kernel's `default:` case).
    #[serde(rename = "5g")]
    Speed5GbFull,
    /// `IXGBE_LINK_SPEED_2_5GB_FULL`.
    #[serde(rename = "2.5g")]
    Speed2_5GbFull,
    /// `IXGBE_LINK_SPEED_1GB_FULL`.
    #[serde(rename = "1g")]
    Speed1GbFull,
    /// `IXGBE_LINK_SPEED_100_FULL`.
    #[serde(rename = "100m")]
    Speed100Full,
    /// `IXGBE_LINK_SPEED_10_FULL`.
    #[serde(rename = "10m")]
    Speed10Full,
}

/// The kernel's timer tick rate (`CONFIG_HZ`): ixgbe measures "time since the last update" in
/// jiffies. Only the rates Kconfig offers are accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct KernelHz(u32);

impl KernelHz {
    /// `CONFIG_HZ=1000`: Fedora, RHEL, and Ubuntu since 24.10.
    pub const HZ_1000: KernelHz = KernelHz(1000);
    /// `CONFIG_HZ=250`: Debian and older Ubuntu kernels.
    pub const HZ_250: KernelHz = KernelHz(250);

    /// Ticks per second.
    pub fn get(self) -> u32 {
        self.0
    }

    /// Nanoseconds per jiffy.
    pub fn jiffy_ns(self) -> u64 {
        1_000_000_000 / u64::from(self.0)
    }

    /// `jiffies` at `time_ns`, counting from time 0.
    pub fn jiffies(self, time_ns: u64) -> u64 {
        time_ns / self.jiffy_ns()
    }
}

impl TryFrom<u32> for KernelHz {
    type Error = AdaptiveConfigError;
    fn try_from(hz: u32) -> Result<Self, Self::Error> {
        match hz {
            100 | 250 | 300 | 1000 => Ok(KernelHz(hz)),
            _ => Err(AdaptiveConfigError::KernelHz { hz }),
        }
    }
}

impl From<KernelHz> for u32 {
    fn from(hz: KernelHz) -> u32 {
        hz.0
    }
}

/// Settings of the ITR port: the host facts ixgbe reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ItrConfig {
    /// Adapter link speed; selects the interval scaling (default 10G).
    pub link_speed: IxgbeLinkSpeed,
    /// Kernel tick rate; one jiffy without an update resets to the lowest latency (default 1000).
    pub hz: KernelHz,
}

impl Default for ItrConfig {
    fn default() -> Self {
        ItrConfig { link_speed: IxgbeLinkSpeed::default(), hz: KernelHz::HZ_1000 }
    }
}

/// `struct ixgbe_ring_container`: what one ring accumulated since the last update, and its last
/// decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IxgbeRingContainer {
    /// `total_packets`: packets since the last update (`unsigned int`, wraps).
    pub total_packets: u32,
    /// `total_bytes`: bytes since the last update (`unsigned int`, wraps).
    pub total_bytes: u32,
    /// `itr`: the last decision, µs, possibly with [`IXGBE_ITR_ADAPTIVE_LATENCY`] set.
    pub itr: u32,
    /// `next_update`: the jiffy by which the next update must come to count as recent. The kernel
    /// zero-fills it and `jiffies` is long past 0 on a running host, so the first update always
    /// finds it stale; `None` stands for that.
    pub next_update: Option<u64>,
}

impl Default for IxgbeRingContainer {
    /// As `ixgbe_alloc_q_vector` leaves it: `itr = MAX_USECS | LATENCY`, nothing counted.
    fn default() -> Self {
        IxgbeRingContainer {
            total_packets: 0,
            total_bytes: 0,
            itr: IXGBE_ITR_ADAPTIVE_MAX_USECS | IXGBE_ITR_ADAPTIVE_LATENCY,
            next_update: None,
        }
    }
}

/// `time_after(a, b)` (include/linux/jiffies.h): is `a` later than `b`, wrap-safe.
fn time_after(a: u64, b: u64) -> bool {
    (b.wrapping_sub(a) as i64) < 0
}

/// `DIV_ROUND_UP(n, d)`.
fn div_round_up(n: u32, d: u32) -> u32 {
    n.div_ceil(d)
}

/// `ixgbe_update_itr` (ixgbe_main.c): the ring container's next interval from what it counted
/// since the last update.
///
/// `q_vector_itr` is the vector's current interval as ixgbe stores it (µs << 2), `jiffies` the
/// time of this update. Leaves the decision in `ring.itr` and clears the counts.
pub fn ixgbe_update_itr(
    q_vector_itr: u32,
    ring: &mut IxgbeRingContainer,
    jiffies: u64,
    link_speed: IxgbeLinkSpeed,
) {
    let itr = update_itr_decision(q_vector_itr, ring, jiffies, link_speed);

    // clear_counts: write back the value; the next update should come within the next jiffy.
    ring.itr = itr;
    ring.next_update = Some(jiffies.wrapping_add(1));
    ring.total_bytes = 0;
    ring.total_packets = 0;
}

/// The body of `ixgbe_update_itr` up to its `clear_counts:` label; each `goto clear_counts` is a
/// `return`, and `goto adjust_by_size` falls into [`adjust_by_size`].
fn update_itr_decision(
    q_vector_itr: u32,
    ring: &IxgbeRingContainer,
    jiffies: u64,
    link_speed: IxgbeLinkSpeed,
) -> u32 {
    // The current interval in µs: q_vector->itr holds it shifted left by 2.
    let current_usecs = q_vector_itr >> 2;

    // No update within 1-2 jiffies: either traffic is so slow that there was no work, or NAPI is
    // polling and moderating by itself. Either way, lowest latency.
    let stale = ring.next_update.is_none_or(|next| time_after(jiffies, next));
    if stale {
        return IXGBE_ITR_ADAPTIVE_MIN_USECS | IXGBE_ITR_ADAPTIVE_LATENCY;
    }

    let packets = ring.total_packets;

    // No packets on this ring (another queue of the vector was busy, or a Tx queue doing TSO is
    // interrupted too often): add the minimum increment and keep the previous latency flag.
    if packets == 0 {
        let itr = (current_usecs + IXGBE_ITR_ADAPTIVE_MIN_INC).min(IXGBE_ITR_ADAPTIVE_MAX_USECS);
        return itr + (ring.itr & IXGBE_ITR_ADAPTIVE_LATENCY);
    }

    let bytes = ring.total_bytes;

    // Fewer than 4 packets and under 9000 bytes: too little data for bulk; latency-driven.
    if packets < 4 && bytes < 9000 {
        return adjust_by_size(IXGBE_ITR_ADAPTIVE_LATENCY, packets, bytes, link_speed);
    }

    // 4 ..= 47 packets: the delay is only slightly too short; grow it by the minimum step.
    if packets < 48 {
        return (current_usecs + IXGBE_ITR_ADAPTIVE_MIN_INC).min(IXGBE_ITR_ADAPTIVE_MAX_USECS);
    }

    // 48 ..= 95 packets: the "goldilocks" zone; keep the current delay.
    if packets < 96 {
        return current_usecs;
    }

    // 96 ..= 255 packets: a slight overrun; halve the delay (q_vector->itr >> 3 is µs / 2).
    if packets < 256 {
        return (q_vector_itr >> 3).max(IXGBE_ITR_ADAPTIVE_MIN_USECS);
    }

    // 256 packets or more: bulk; compute the delay from the packet size.
    adjust_by_size(IXGBE_ITR_ADAPTIVE_BULK, packets, bytes, link_speed)
}

/// The `adjust_by_size:` tail of `ixgbe_update_itr`: an interval from the mean wire size.
///
/// The kernel's comment derives it from `wmem_default / (size + overhead)` packets per interrupt
/// at line rate, reduced to `(170 * (size + 24)) / (size + 640)` µs and evaluated piecewise
/// linearly in units of 1/256 µs; `itr` carries the latency flag (or none for bulk).
fn adjust_by_size(itr: u32, packets: u32, bytes: u32, link_speed: IxgbeLinkSpeed) -> u32 {
    let mut avg_wire_size = bytes / packets;

    avg_wire_size = if avg_wire_size <= 60 {
        // Start at 50K ints/s.
        5120
    } else if avg_wire_size <= 316 {
        // 50K to 16K ints/s.
        avg_wire_size * 40 + 2720
    } else if avg_wire_size <= 1084 {
        // 16K to 9.2K ints/s.
        avg_wire_size * 15 + 11452
    } else if avg_wire_size < 1968 {
        // 9.2K to 8K ints/s.
        avg_wire_size * 5 + 22420
    } else {
        // Plateau at 8K ints/s.
        32256
    };

    // Latency mode halves the delay: 100K to 16K ints/s.
    if itr & IXGBE_ITR_ADAPTIVE_LATENCY != 0 {
        avg_wire_size >>= 1;
    }

    // The value is 256 times too large; scale it for the link speed, in MIN_INC steps, and add it
    // to `itr`, which already holds the flag.
    match link_speed {
        IxgbeLinkSpeed::Speed10GbFull | IxgbeLinkSpeed::Speed100Full | IxgbeLinkSpeed::Speed5GbFull => {
            itr + div_round_up(avg_wire_size, IXGBE_ITR_ADAPTIVE_MIN_INC * 256) * IXGBE_ITR_ADAPTIVE_MIN_INC
        }
        IxgbeLinkSpeed::Speed2_5GbFull | IxgbeLinkSpeed::Speed1GbFull | IxgbeLinkSpeed::Speed10Full => {
            let avg_wire_size = avg_wire_size.min(8064);
            itr + div_round_up(avg_wire_size, IXGBE_ITR_ADAPTIVE_MIN_INC * 64) * IXGBE_ITR_ADAPTIVE_MIN_INC
        }
    }
}

/// ixgbe's adaptive ITR running inside one layer's notification stream.
///
/// Each notification plays one poll that completes (`napi_complete_done` returns true and ixgbe
/// calls `ixgbe_set_itr`): the packets and bytes since the previous notification are added to the
/// ring container, as `ixgbe_clean_rx_irq` / `ixgbe_clean_tx_irq` add theirs, and the interval is
/// updated. Knobs: `usecs` = the interval, `frames = 0` (timer only: ixgbe has no count trigger).
#[derive(Debug, Clone)]
pub struct ItrController {
    config: ItrConfig,
    /// `q_vector->itr`: the programmed interval, µs << 2 (the EITR register's layout).
    pub q_vector_itr: u32,
    /// The stream's ring container.
    pub ring: IxgbeRingContainer,
    /// The previous notification's counters, to take per-interrupt deltas from.
    prev: Option<DriverSample>,
}

impl ItrController {
    /// A controller as `ixgbe_alloc_q_vector` sets one up with adaptive moderation: a receive
    /// stream starts at [`IXGBE_20K_ITR`] (50 µs), a transmit stream, being a transmit-only
    /// vector, at [`IXGBE_12K_ITR`] (84 µs).
    pub fn new(config: ItrConfig, dir: Direction) -> Self {
        let q_vector_itr = match dir {
            Direction::Rx => IXGBE_20K_ITR,
            Direction::Tx => IXGBE_12K_ITR,
        };
        ItrController { config, q_vector_itr, ring: IxgbeRingContainer::default(), prev: None }
    }

    /// The settings this controller was built with.
    pub fn config(&self) -> &ItrConfig {
        &self.config
    }

    /// The current interval in µs.
    pub fn usecs(&self) -> u32 {
        self.q_vector_itr >> 2
    }

    /// The knobs of the current interval: timer only (`frames = 0`).
    pub fn knobs(&self) -> Knobs {
        Knobs { usecs: self.usecs(), frames: 0 }
    }

    /// `ixgbe_set_itr` (ixgbe_main.c): update the ring's decision and program it; returns whether
    /// the interval changed (the kernel writes EITR only then).
    pub fn ixgbe_set_itr(&mut self, jiffies: u64) -> bool {
        ixgbe_update_itr(self.q_vector_itr, &mut self.ring, jiffies, self.config.link_speed);

        // The smallest of the vector's rx and tx decisions; one ring here. Clear the latency flag
        // and shift into the register's position.
        let new_itr = (self.ring.itr & !IXGBE_ITR_ADAPTIVE_LATENCY) << 2;

        if new_itr == self.q_vector_itr {
            return false;
        }
        self.q_vector_itr = new_itr;
        true
    }
}

impl LayerController for ItrController {
    fn initial(&self) -> Knobs {
        self.knobs()
    }

    fn on_notification(&mut self, sample: &DriverSample) -> Option<Knobs> {
        if let Some(prev) = self.prev {
            // What this interrupt delivered: gaps of the cumulative u32 counters, modulo 2^32.
            let packets = sample.pkt_ctr.wrapping_sub(prev.pkt_ctr);
            let bytes = sample.byte_ctr.wrapping_sub(prev.byte_ctr);
            // `ring->total_packets += ...` in the clean routines; unsigned int, wraps.
            self.ring.total_packets = self.ring.total_packets.wrapping_add(packets);
            self.ring.total_bytes = self.ring.total_bytes.wrapping_add(bytes);
        }
        self.prev = Some(*sample);

        let jiffies = self.config.hz.jiffies(sample.time_ns);
        self.ixgbe_set_itr(jiffies).then(|| self.knobs())
    }
}
