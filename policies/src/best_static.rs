//! `best-static`: the oracle for fixed settings, found in hindsight per scenario and seed.
//!
//! It is the bar an expert with a week of tuning would reach: the fixed per-layer, per-VM setting
//! with the lowest CPU per packet that meets the SLO (no interval over the SLO, drops at most
//! [`MAX_DROP_FRACTION`]), or, when none does, the one that misses it least. The full space has
//! `8^(2 + 4·VMs)` grid points, so the search is coordinate descent from the best uniform
//! setting: every (layer, direction) stream in turn tries every grid value with the others held,
//! until a pass improves nothing (at most [`MAX_PASSES`]). The caller supplies the evaluation (an
//! episode in the simulator) and caches the result.
//!
//! On a host that names its profile ([`HostProfile`]) the search covers that profile's
//! mechanisms: settings are masked to what the host has before they are evaluated (so a layer
//! without knobs costs no evaluations), and each layer with NAPI deferral is one more coordinate,
//! over [`DEFER_GRID`]. A host without a profile is searched over the ethtool knobs alone, as
//! before profiles existed.

use std::collections::HashMap;

use moderato_env::{
    CoalescingSettings, Direction, HostProfile, Knobs, LayerId, LayerSettings, Moderation, NapiParams,
};
use serde::{Deserialize, Serialize};

/// The knob values every stream tries (µs / frames).
pub const GRID: [Knobs; 8] = [
    Knobs::new(0, 1),
    Knobs::new(4, 4),
    Knobs::new(8, 8),
    Knobs::new(16, 16),
    Knobs::new(32, 32),
    Knobs::new(64, 32),
    Knobs::new(128, 64),
    Knobs::new(256, 128),
];

/// The NAPI deferrals a deferral coordinate tries (`napi_defer_hard_irqs`, `gro_flush_timeout`):
/// off, then the kernel documentation's kind of recipe at timeouts from 10 µs to 200 µs.
pub const DEFER_GRID: [NapiParams; 6] = [
    NapiParams::OFF,
    NapiParams::new(1, 10_000),
    NapiParams::new(2, 20_000),
    NapiParams::new(2, 50_000),
    NapiParams::new(4, 100_000),
    NapiParams::new(8, 200_000),
];

/// Drops tolerated by "meets the SLO".
pub const MAX_DROP_FRACTION: f64 = 1e-3;
/// Coordinate-descent passes at most.
pub const MAX_PASSES: usize = 3;

/// What one evaluation of a setting measured.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Score {
    pub cpu_us_per_packet: f64,
    /// Share of control intervals whose p99 exceeded the SLO.
    pub slo_violation_rate: f64,
    pub drop_fraction: f64,
}

impl Score {
    pub fn feasible(&self) -> bool {
        self.slo_violation_rate == 0.0 && self.drop_fraction <= MAX_DROP_FRACTION
    }

    /// Whether `self` is a better setting than `other`: feasible first, then the lowest CPU per
    /// packet; among infeasible ones, the smallest miss, then CPU.
    pub fn better_than(&self, other: &Score) -> bool {
        match (self.feasible(), other.feasible()) {
            (true, false) => true,
            (false, true) => false,
            (true, true) => self.cpu_us_per_packet < other.cpu_us_per_packet,
            (false, false) => {
                let (a, b) = (self.miss(), other.miss());
                a < b || (a == b && self.cpu_us_per_packet < other.cpu_us_per_packet)
            }
        }
    }

    fn miss(&self) -> f64 {
        self.slo_violation_rate + (self.drop_fraction - MAX_DROP_FRACTION).max(0.0)
    }
}

/// The search's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Found {
    pub settings: CoalescingSettings,
    pub score: Score,
    /// Settings evaluated.
    pub evaluations: usize,
}

/// Every (layer, direction) stream of a host with `vms` VMs.
pub fn streams(vms: usize) -> Vec<(LayerId, Direction)> {
    LayerId::all(vms).flat_map(|l| Direction::BOTH.map(|d| (l, d))).collect()
}

/// One coordinate of the descent: a (layer, direction) stream's knobs, or a layer's deferral.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Coord {
    Knobs(LayerId, Direction),
    Deferral(LayerId),
}

/// Finds the best fixed setting for `vms` VMs on a host of `profile` (`None`: ethtool knobs on
/// every layer, no deferral); `evaluate` runs one setting and scores it. `candidates` (e.g. the
/// static presets) are evaluated with the uniform grid before the descent starts, so the answer is
/// never worse than any of them.
pub fn search<E>(
    vms: usize,
    profile: Option<HostProfile>,
    candidates: &[CoalescingSettings],
    mut evaluate: impl FnMut(&CoalescingSettings) -> Result<Score, E>,
) -> Result<Found, E> {
    let mask = |mut s: CoalescingSettings| {
        if let Some(p) = profile {
            p.mask(&mut s);
        }
        s
    };
    let mut seen: HashMap<CoalescingSettings, Score> = HashMap::new();
    let mut eval = |s: &CoalescingSettings| -> Result<Score, E> {
        if let Some(sc) = seen.get(s) {
            return Ok(*sc);
        }
        let sc = evaluate(s)?;
        seen.insert(s.clone(), sc);
        Ok(sc)
    };
    let mut best: Option<(CoalescingSettings, Score)> = None;
    let uniform = GRID.iter().map(|&k| CoalescingSettings::uniform(vms, LayerSettings::fixed(k, k)));
    for s in uniform.chain(candidates.iter().filter(|c| c.vms.len() == vms).cloned()) {
        let s = mask(s);
        let sc = eval(&s)?;
        if best.as_ref().is_none_or(|b| sc.better_than(&b.1)) {
            best = Some((s, sc));
        }
    }
    let mut coords: Vec<Coord> = Vec::new();
    for layer in LayerId::all(vms) {
        let m = profile.map(|p| p.mechanisms(layer.kind()));
        if m.is_none_or(|m| m.coalescing) {
            coords.extend(Direction::BOTH.map(|d| Coord::Knobs(layer, d)));
        }
        if m.is_some_and(|m| m.deferral) {
            coords.push(Coord::Deferral(layer));
        }
    }
    let (mut best_s, mut best_sc) = best.expect("the grid is not empty");
    for _ in 0..MAX_PASSES {
        let mut improved = false;
        for &c in &coords {
            let n = match c {
                Coord::Knobs(..) => GRID.len(),
                Coord::Deferral(_) => DEFER_GRID.len(),
            };
            for i in 0..n {
                let mut s = best_s.clone();
                match c {
                    Coord::Knobs(layer, dir) => s.layer_mut(layer).set(dir, Moderation::Fixed(GRID[i])),
                    Coord::Deferral(layer) => s.layer_mut(layer).napi = DEFER_GRID[i],
                }
                let s = mask(s);
                if s == best_s {
                    continue;
                }
                let sc = eval(&s)?;
                if sc.better_than(&best_sc) {
                    best_s = s;
                    best_sc = sc;
                    improved = true;
                }
            }
        }
        if !improved {
            break;
        }
    }
    Ok(Found { settings: best_s, score: best_sc, evaluations: seen.len() })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy objective with a known optimum: CPU falls with every stream's usecs; the SLO is met
    /// only while the NIC rx timer stays at or under 16 µs.
    fn toy(s: &CoalescingSettings) -> Result<Score, ()> {
        let mut total = 0.0;
        for (l, d) in streams(s.vms.len()) {
            if let Moderation::Fixed(k) = s.layer(l).get(d) {
                total += f64::from(k.usecs);
            }
        }
        let Moderation::Fixed(nic_rx) = s.nic.rx else { unreachable!() };
        Ok(Score {
            cpu_us_per_packet: 100.0 / (1.0 + total),
            slo_violation_rate: if nic_rx.usecs > 16 { 0.5 } else { 0.0 },
            drop_fraction: 0.0,
        })
    }

    #[test]
    fn finds_the_known_optimum_of_a_toy_objective() {
        let f = search(1, None, &[], toy).unwrap();
        assert!(f.score.feasible());
        assert_eq!(f.settings.nic.rx, Moderation::fixed(16, 16));
        // Every other stream goes to the largest grid value.
        assert_eq!(f.settings.nic.tx, Moderation::fixed(256, 128));
        assert_eq!(f.settings.vms[0].frontend.rx, Moderation::fixed(256, 128));
        assert!(f.evaluations < 8 + MAX_PASSES * 6 * 8);
    }

    #[test]
    fn never_worse_than_a_candidate_it_was_given() {
        // A candidate off the grid that is the true optimum of this objective.
        let mut star =
            CoalescingSettings::uniform(1, LayerSettings::fixed(Knobs::new(16, 16), Knobs::new(16, 16)));
        star.nic.tx = Moderation::fixed(999, 7);
        let f = search(1, None, std::slice::from_ref(&star), |s| -> Result<Score, ()> {
            let hit = s == &star;
            Ok(Score {
                cpu_us_per_packet: if hit { 1.0 } else { 2.0 },
                slo_violation_rate: 0.0,
                drop_fraction: 0.0,
            })
        })
        .unwrap();
        assert_eq!(f.settings, star);
    }

    #[test]
    fn feasible_beats_infeasible_and_misses_are_ordered() {
        let ok = Score { cpu_us_per_packet: 9.0, slo_violation_rate: 0.0, drop_fraction: 0.0 };
        let cheap_bad = Score { cpu_us_per_packet: 1.0, slo_violation_rate: 0.1, drop_fraction: 0.0 };
        let worse = Score { cpu_us_per_packet: 1.0, slo_violation_rate: 0.3, drop_fraction: 0.0 };
        assert!(ok.better_than(&cheap_bad));
        assert!(!cheap_bad.better_than(&ok));
        assert!(cheap_bad.better_than(&worse));
    }
}
