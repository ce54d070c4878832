//! Interface counters from `/sys/class/net/<if>/statistics/`, and counter deltas that survive
//! wraps and resets.

use std::path::{Path, PathBuf};

use super::LiveError;

/// One interface's cumulative counters, as the kernel reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IfCounters {
    /// `/sys/class/net/<if>/ifindex`: a new index means the interface was re-created.
    pub ifindex: Option<u64>,
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Received but dropped by the stack or driver (no buffer, filtered).
    pub rx_dropped: u64,
    pub tx_dropped: u64,
    /// Dropped by the device itself (ring full, FIFO overflow). The kernel keeps these out of
    /// `rx_dropped` (Documentation/networking/statistics.rst), so the two add up.
    pub rx_missed_errors: u64,
}

impl IfCounters {
    /// Every drop the interface reports, both directions.
    pub fn drops(&self) -> u64 {
        self.rx_dropped.saturating_add(self.tx_dropped).saturating_add(self.rx_missed_errors)
    }
}

/// `<sysfs_root>/class/net/<ifname>`.
pub fn interface_dir(sysfs_root: &Path, ifname: &str) -> PathBuf {
    sysfs_root.join("class/net").join(ifname)
}

/// Whether the interface exists (its sysfs directory does).
pub fn interface_exists(sysfs_root: &Path, ifname: &str) -> bool {
    interface_dir(sysfs_root, ifname).is_dir()
}

fn read_u64(path: &Path) -> Result<u64, LiveError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| LiveError::Read { path: path.into(), source })?;
    text.trim().parse().map_err(|e: std::num::ParseIntError| LiveError::Parse {
        path: path.into(),
        line: 1,
        message: format!("not an unsigned integer ({e})"),
        text: text.trim().to_string(),
    })
}

/// `ifname`'s interface index (`/sys/class/net/<if>/ifindex`), `None` where it cannot be read
/// (no such interface). A re-created interface has a new index.
pub fn read_ifindex(sysfs_root: &Path, ifname: &str) -> Option<u64> {
    read_u64(&interface_dir(sysfs_root, ifname).join("ifindex")).ok()
}

/// Reads the counters of `ifname`. A missing interface is a [`LiveError::Read`] with
/// `NotFound` on its statistics file.
pub fn read_if_counters(sysfs_root: &Path, ifname: &str) -> Result<IfCounters, LiveError> {
    let dir = interface_dir(sysfs_root, ifname);
    let stats = dir.join("statistics");
    let s = |name: &str| read_u64(&stats.join(name));
    Ok(IfCounters {
        ifindex: read_u64(&dir.join("ifindex")).ok(),
        rx_packets: s("rx_packets")?,
        tx_packets: s("tx_packets")?,
        rx_bytes: s("rx_bytes")?,
        tx_bytes: s("tx_bytes")?,
        rx_dropped: s("rx_dropped")?,
        tx_dropped: s("tx_dropped")?,
        // Older kernels and some virtual drivers lack it; no file means no such drops.
        rx_missed_errors: s("rx_missed_errors").unwrap_or(0),
    })
}

/// What happened between two readings of a cumulative counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delta {
    /// The counter moved forward by this much.
    Forward(u64),
    /// A 32-bit counter wrapped past 2^32 once; this much was counted.
    Wrapped(u64),
    /// The counter went backwards: it was reset (driver reload, interface re-created), and this
    /// much was counted since the reset.
    Reset(u64),
}

impl Delta {
    pub fn value(self) -> u64 {
        match self {
            Delta::Forward(d) | Delta::Wrapped(d) | Delta::Reset(d) => d,
        }
    }
}

/// The increase of a cumulative counter from `prev` to `cur`.
///
/// Counters of 32-bit kernels, and the per-CPU counts of `/proc/interrupts` (an `unsigned int`),
/// wrap at 2^32: a decrease from a value that fits 32 bits to a smaller one, whose unwrapped
/// distance is under half the 32-bit range, is a wrap. Any other decrease is a reset, never a
/// negative rate: the interval counts what the counter holds now.
pub fn delta(prev: u64, cur: u64) -> Delta {
    const R32: u64 = 1 << 32;
    if cur >= prev {
        Delta::Forward(cur - prev)
    } else if prev < R32 {
        let unwrapped = R32 - prev + cur;
        if unwrapped < R32 / 2 { Delta::Wrapped(unwrapped) } else { Delta::Reset(cur) }
    } else {
        Delta::Reset(cur)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_forward_wrap_and_reset() {
        assert_eq!(delta(10, 25), Delta::Forward(15));
        assert_eq!(delta(u32::MAX as u64 - 4, 5), Delta::Wrapped(10));
        // From a small value to a smaller one: a reset, not a wrap of ~4 billion.
        assert_eq!(delta(1000, 10), Delta::Reset(10));
        // 64-bit counters do not wrap in practice: a decrease is a reset.
        assert_eq!(delta(1 << 40, 7), Delta::Reset(7));
    }
}
