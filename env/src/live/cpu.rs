//! CPU time from `/proc/stat`, parsed by the `procfs` crate, and shares over an interval.
//!
//! Of a CPU's ticks, `irq + softirq` is interrupt work; `user + nice + system` minus the time spent
//! running guests' vCPUs (`guest`, `guest_nice`, which the kernel also counts in `user`/`nice`) is
//! the rest of the busy time; `idle`, `iowait` and `steal` are not busy. Shares are of all ticks
//! including steal, so a guest whose vCPU is preempted sees less than 100 % of the interval.

use std::path::Path;

use procfs::{ExplicitSystemInfo, FromReadSI, KernelStats};

use super::LiveError;
use crate::obs::CpuObs;

/// Cumulative ticks of one CPU (or of all of them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTicks {
    pub irq: u64,
    pub other: u64,
    pub total: u64,
}

impl CpuTicks {
    fn from_time(t: &procfs::CpuTime) -> Self {
        let irq = t.irq.unwrap_or(0) + t.softirq.unwrap_or(0);
        let guest = t.guest.unwrap_or(0) + t.guest_nice.unwrap_or(0);
        let other = (t.user + t.nice + t.system).saturating_sub(guest);
        let total = t.user + t.nice + t.system + t.idle + t.iowait.unwrap_or(0) + irq + t.steal.unwrap_or(0);
        CpuTicks { irq, other, total }
    }

    /// Ticks from `self` to `later`, field by field (iowait can go backwards; so can a CPU that
    /// went offline and came back: those fields count as zero).
    pub fn delta(&self, later: &CpuTicks) -> CpuTicks {
        CpuTicks {
            irq: later.irq.saturating_sub(self.irq),
            other: later.other.saturating_sub(self.other),
            total: later.total.saturating_sub(self.total),
        }
    }

    fn add(&mut self, o: &CpuTicks) {
        self.irq += o.irq;
        self.other += o.other;
        self.total += o.total;
    }

    /// Shares of `total`; zeros for an empty interval.
    pub fn shares(&self) -> CpuObs {
        if self.total == 0 {
            return CpuObs::default();
        }
        let t = self.total as f64;
        CpuObs { irq: (self.irq as f64 / t).clamp(0.0, 1.0), other: (self.other as f64 / t).clamp(0.0, 1.0) }
    }
}

/// One reading of `/proc/stat`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuSnapshot {
    pub total: CpuTicks,
    /// `(cpu number, ticks)` of each online CPU.
    pub per_cpu: Vec<(u32, CpuTicks)>,
}

/// Parses the text of `/proc/stat`. `path` only names the file in errors.
pub fn parse_stat(text: &str, path: &Path) -> Result<CpuSnapshot, LiveError> {
    // Only tick ratios are used, so the tick rate does not matter; procfs wants one anyway.
    let si = ExplicitSystemInfo {
        boot_time_secs: 0,
        ticks_per_second: 100,
        page_size: 4096,
        is_little_endian: true,
    };
    let stats = KernelStats::from_read(text.as_bytes(), &si)
        .map_err(|e| LiveError::Proc { path: path.into(), message: e.to_string() })?;
    // procfs keeps per-CPU lines in file order without their numbers; offline CPUs are absent
    // from the file, so take the numbers from the same text.
    let numbers: Vec<u32> = text
        .lines()
        .filter_map(|l| l.strip_prefix("cpu"))
        .filter(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter_map(|n| n.parse().ok())
        .collect();
    if numbers.len() != stats.cpu_time.len() {
        return Err(LiveError::Proc {
            path: path.into(),
            message: format!("{} per-CPU lines but {} CPU numbers", stats.cpu_time.len(), numbers.len()),
        });
    }
    Ok(CpuSnapshot {
        total: CpuTicks::from_time(&stats.total),
        per_cpu: numbers.into_iter().zip(stats.cpu_time.iter().map(CpuTicks::from_time)).collect(),
    })
}

/// Reads `<procfs_root>/stat`.
pub fn read_stat(procfs_root: &Path) -> Result<CpuSnapshot, LiveError> {
    let path = procfs_root.join("stat");
    let text =
        std::fs::read_to_string(&path).map_err(|source| LiveError::Read { path: path.clone(), source })?;
    parse_stat(&text, &path)
}

/// CPU shares between two snapshots, over `cpus` (by number) or every CPU. CPUs missing from
/// either snapshot (offline) count for nothing.
pub fn shares(prev: &CpuSnapshot, cur: &CpuSnapshot, cpus: Option<&[u32]>) -> CpuObs {
    match cpus {
        None => prev.total.delta(&cur.total).shares(),
        Some(set) => {
            let mut sum = CpuTicks::default();
            for (n, later) in cur.per_cpu.iter().filter(|(n, _)| set.contains(n)) {
                if let Some((_, before)) = prev.per_cpu.iter().find(|(m, _)| m == n) {
                    sum.add(&before.delta(later));
                }
            }
            sum.shares()
        }
    }
}

/// Per-CPU shares between two snapshots, for operators (`moderato observe`).
pub fn per_cpu_shares(prev: &CpuSnapshot, cur: &CpuSnapshot) -> Vec<(u32, CpuObs)> {
    cur.per_cpu
        .iter()
        .filter_map(|(n, later)| {
            prev.per_cpu.iter().find(|(m, _)| m == n).map(|(_, before)| (*n, before.delta(later).shares()))
        })
        .collect()
}
