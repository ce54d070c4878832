//! `slo-feedback`: the controller a practitioner would write without a learned model — feedback on
//! each VM's measured probe p99 against its latency target, on one coalescing level shared by the
//! layers on that VM's path.
//!
//! Each VM has a level on [`LADDER`] (0 = per-packet … 8 = 256 µs / 128 frames, each step about
//! doubling the knobs). Every interval, for each VM whose probe reported:
//! - p99 above `setpoint × target` (0.8: a margin for the probe's noise and the next interval's
//!   change): the level falls by [`Gains::decrease`] (multiplicative decrease of the knobs: 2
//!   levels ≈ ÷4);
//! - p99 below `headroom × target` (0.6): the level rises by [`Gains::increase`] (additive
//!   increase: 0.25 levels per interval, so from per-packet to the heaviest setting in 32
//!   intervals);
//! - in between: the level holds.
//!
//! A VM's backend and frontend (rx and tx) take its level; the NIC, shared by every VM, takes the
//! lowest level of the VMs that have ever reported a probe (the tightest path), or the top of the
//! ladder when none has: a VM with no probe is taken for a throughput-only VM and coalesced
//! heavily. A VM that reported before but not in this interval (idle) holds its level.
//!
//! Deployed on the hypervisor it reads the host's probe for every VM (the host cannot see a guest's
//! application); in a guest, that guest's probe. Levels are floored onto the ladder, so the knobs
//! never exceed the action space's defaults (256 µs, 128 frames).

use moderato_env::{CoalescingSettings, Knobs, LayerSettings, Observation, ProbeObs, VmSettings};

use crate::{Policy, Requirements};

/// The coalescing ladder, lightest first.
pub const LADDER: [Knobs; 9] = [
    Knobs::new(0, 1),
    Knobs::new(2, 2),
    Knobs::new(4, 4),
    Knobs::new(8, 8),
    Knobs::new(16, 16),
    Knobs::new(32, 32),
    Knobs::new(64, 64),
    Knobs::new(128, 64),
    Knobs::new(256, 128),
];

/// The ladder's top level.
pub(crate) const TOP: f64 = (LADDER.len() - 1) as f64;

/// The controller's gains (documented defaults: [`Gains::default`]). An eval or deploy config
/// sets them in its `[slo_feedback]` table (each key optional: the default where absent).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Gains {
    /// Levels dropped in an interval whose p99 exceeds the target.
    pub decrease: f64,
    /// Levels gained in an interval whose p99 is below `headroom × target`.
    pub increase: f64,
    /// Share of the target above which the controller coalesces less.
    pub setpoint: f64,
    /// Share of the target under which the controller coalesces more.
    pub headroom: f64,
    /// Level every VM starts an episode at.
    pub start: f64,
}

impl Default for Gains {
    fn default() -> Self {
        Gains { decrease: 2.0, increase: 0.25, setpoint: 0.8, headroom: 0.6, start: 2.0 }
    }
}

impl Gains {
    /// Refuses gains the controller cannot run with, naming the key (as in a config's
    /// `[slo_feedback]` table) and what it takes.
    pub fn check(&self) -> Result<(), String> {
        let Gains { decrease, increase, setpoint, headroom, start } = *self;
        crate::gains::at_least("decrease", decrease, 0.0)?;
        crate::gains::at_least("increase", increase, 0.0)?;
        crate::gains::share("setpoint", setpoint)?;
        crate::gains::share("headroom", headroom)?;
        if headroom > setpoint {
            return Err(format!(
                "headroom {headroom} is above setpoint {setpoint}: the level would rise into the band where it \
                 falls (take headroom <= setpoint)"
            ));
        }
        crate::gains::within("start", start, 0.0, TOP)
    }
}

/// The AIMD controller over each VM's coalescing level.
#[derive(Debug, Clone)]
pub struct SloFeedbackPolicy {
    name: String,
    target_us: f64,
    /// Whether each VM's own target (from the observation) overrides `target_us`.
    per_vm: bool,
    gains: Gains,
    levels: Vec<f64>,
    seen: Vec<bool>,
}

impl SloFeedbackPolicy {
    /// A controller holding each VM's probe p99 under `target_us`.
    pub fn new(name: impl Into<String>, target_us: f64, gains: Gains) -> Self {
        SloFeedbackPolicy {
            name: name.into(),
            target_us,
            per_vm: false,
            gains,
            levels: Vec::new(),
            seen: Vec::new(),
        }
    }

    /// A controller holding each VM's probe p99 under that VM's own target where the observation
    /// carries one (`slo_p99_us`), under `default_us` where it does not; a VM the observation
    /// marks as having no objective gets the heaviest coalescing and leaves the NIC to the others.
    pub fn per_vm(name: impl Into<String>, default_us: f64, gains: Gains) -> Self {
        SloFeedbackPolicy { per_vm: true, ..Self::new(name, default_us, gains) }
    }

    /// VM `vm`'s target in `obs`: `None` for a VM without a latency objective.
    fn target_of(&self, obs: &Observation, vm: usize) -> Option<f64> {
        if !self.per_vm {
            return Some(self.target_us);
        }
        if let Some(t) = obs.guests[vm].slo_p99_us {
            return Some(t);
        }
        match obs.host.slo_p99_us.get(vm) {
            Some(t) if obs.host.slo_p99_us.len() == obs.guests.len() => *t,
            _ => Some(self.target_us),
        }
    }

    pub fn target_us(&self) -> f64 {
        self.target_us
    }

    /// The current level of each VM (after the last [`Policy::act`]).
    pub fn levels(&self) -> &[f64] {
        &self.levels
    }

    fn step(&mut self, vm: usize, probe: Option<&ProbeObs>, target_us: f64) {
        let Some(p) = probe else {
            if !self.seen[vm] {
                self.levels[vm] = TOP;
            }
            return;
        };
        if !self.seen[vm] {
            self.seen[vm] = true;
            self.levels[vm] = self.gains.start;
        }
        let g = self.gains;
        let l = &mut self.levels[vm];
        if p.p99_us > g.setpoint * target_us {
            *l -= g.decrease;
        } else if p.p99_us < g.headroom * target_us {
            *l += g.increase;
        }
        *l = l.clamp(0.0, TOP);
    }
}

/// VM `vm`'s probe in `obs` if it reported this interval: a guest's own where it has one
/// (deployed in the guest, or simulated with guest probes), else the host's, which stands for
/// every VM behind the NIC. Read by this controller and by the trim of a learned model.
pub(crate) fn reported_probe(obs: &Observation, vm: usize) -> Option<&ProbeObs> {
    obs.guests[vm]
        .probe
        .as_ref()
        .or(obs.host.probe.as_ref())
        .filter(|p| p.samples > 0 && p.p99_us.is_finite())
}

/// The features a probe-reading policy needs on each side.
pub(crate) fn probe_requirements() -> Requirements {
    Requirements {
        host: vec!["host.probe_present".into(), "host.probe_p99_ln".into()],
        guest: vec!["guest.probe_present".into(), "guest.probe_p99_ln".into()],
    }
}

/// The knobs of ladder level `level` (floored onto the ladder).
pub(crate) fn knobs(level: f64) -> Knobs {
    LADDER[(level.floor().max(0.0) as usize).min(LADDER.len() - 1)]
}

impl Policy for SloFeedbackPolicy {
    fn name(&self) -> &str {
        &self.name
    }

    fn act(&mut self, obs: &Observation) -> CoalescingSettings {
        let vms = obs.guests.len();
        if self.levels.len() != vms {
            self.levels = vec![self.gains.start; vms];
            self.seen = vec![false; vms];
        }
        for vm in 0..vms {
            let probe = reported_probe(obs, vm);
            match self.target_of(obs, vm) {
                Some(t) => self.step(vm, probe, t),
                None => {
                    // No objective: throughput only, the heaviest coalescing; not the NIC's concern.
                    self.levels[vm] = TOP;
                    self.seen[vm] = false;
                }
            }
        }
        let nic = (0..vms).filter(|&v| self.seen[v]).map(|v| self.levels[v]).fold(TOP, f64::min);
        let nk = knobs(nic);
        CoalescingSettings {
            nic: LayerSettings::fixed(nk, nk),
            vms: self
                .levels
                .iter()
                .map(|&l| {
                    let k = knobs(l);
                    VmSettings::new(LayerSettings::fixed(k, k), LayerSettings::fixed(k, k))
                })
                .collect(),
        }
    }

    fn reset(&mut self) {
        self.levels.clear();
        self.seen.clear();
    }

    fn requirements(&self) -> Requirements {
        probe_requirements()
    }
}

#[cfg(test)]
mod tests {
    use moderato_env::{GuestObs, LayerId};

    use super::*;

    fn obs(p99s: &[Option<f64>]) -> Observation {
        Observation {
            guests: p99s
                .iter()
                .map(|p| GuestObs {
                    probe: p.map(|p99| ProbeObs { p50_us: p99 / 2.0, p99_us: p99, samples: 100 }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn rx(s: &CoalescingSettings, id: LayerId) -> Knobs {
        match s.layer(id).get(moderato_env::Direction::Rx) {
            moderato_env::Moderation::Fixed(k) => k,
            other => panic!("expected fixed knobs, got {other:?}"),
        }
    }

    #[test]
    fn coalesces_more_under_the_target_and_backs_off_multiplicatively_above_it() {
        let mut p = SloFeedbackPolicy::new("slo-feedback", 200.0, Gains::default());
        // Far under the target: the level climbs 0.25 per interval from the start level 2.
        for _ in 0..8 {
            p.act(&obs(&[Some(50.0)]));
        }
        assert_eq!(p.levels(), &[4.0]);
        let s = p.act(&obs(&[Some(50.0)]));
        assert_eq!(rx(&s, LayerId::Frontend(0)), LADDER[4]);
        // In the hold band (0.6..0.8 of the target): nothing moves.
        p.act(&obs(&[Some(140.0)]));
        assert_eq!(p.levels(), &[4.25]);
        // Over the set point (0.8 of the target): two levels down at once.
        let s = p.act(&obs(&[Some(170.0)]));
        assert_eq!(p.levels(), &[2.25]);
        assert_eq!(rx(&s, LayerId::Backend(0)), LADDER[2]);
        // Bounded at per-packet.
        for _ in 0..5 {
            p.act(&obs(&[Some(1000.0)]));
        }
        assert_eq!(p.levels(), &[0.0]);
    }

    #[test]
    fn the_nic_follows_the_tightest_vm_and_a_vm_without_a_probe_is_coalesced_heavily() {
        let mut p = SloFeedbackPolicy::new("slo-feedback", 100.0, Gains::default());
        let mut s = p.act(&obs(&[Some(500.0), None]));
        for _ in 0..3 {
            s = p.act(&obs(&[Some(500.0), None]));
        }
        assert_eq!(p.levels(), &[0.0, TOP]);
        assert_eq!(rx(&s, LayerId::Nic), Knobs::PER_PACKET);
        assert_eq!(rx(&s, LayerId::Frontend(1)), LADDER[8]);
        // The sensitive VM goes idle (no probe): it holds its level, it is not taken for bulk.
        p.act(&obs(&[None, None]));
        assert_eq!(p.levels(), &[0.0, TOP]);
    }

    #[test]
    fn reset_forgets_levels() {
        let mut p = SloFeedbackPolicy::new("slo-feedback", 100.0, Gains::default());
        p.act(&obs(&[Some(10.0)]));
        p.reset();
        p.act(&obs(&[Some(80.0)]));
        assert_eq!(p.levels(), &[2.0]);
    }

    #[test]
    fn each_vm_steers_to_its_own_target_and_a_vm_without_one_is_left_to_coalesce() {
        let mut p = SloFeedbackPolicy::per_vm("slo-feedback", 200.0, Gains::default());
        // 150 µs: over 0.8 × 100 µs for vm0, under 0.6 × 1 ms for vm1; vm2 has no objective.
        let mut o = obs(&[Some(150.0), Some(150.0), Some(150.0)]);
        o.host.slo_p99_us = vec![Some(100.0), Some(1000.0), None];
        let mut s = p.act(&o);
        for _ in 0..3 {
            s = p.act(&o);
        }
        assert_eq!(p.levels(), &[0.0, 3.0, TOP]);
        // The NIC follows the tightest VM with an objective.
        assert_eq!(rx(&s, LayerId::Nic), Knobs::PER_PACKET);
        // A guest's own target (deployed in the guest) wins over the host's list.
        let mut g = obs(&[Some(150.0)]);
        g.guests[0].slo_p99_us = Some(1000.0);
        let mut q = SloFeedbackPolicy::per_vm("slo-feedback", 100.0, Gains::default());
        q.act(&g);
        assert_eq!(q.levels(), &[2.25]);
        // Without targets in the observation, the default holds for every VM; a named target
        // (`slo-feedback:<us>`) ignores the observation's.
        let mut d = SloFeedbackPolicy::per_vm("slo-feedback", 100.0, Gains::default());
        d.act(&obs(&[Some(150.0)]));
        assert_eq!(d.levels(), &[0.0]);
        let mut fixed = SloFeedbackPolicy::new("slo-feedback:100", 100.0, Gains::default());
        fixed.act(&g);
        assert_eq!(fixed.levels(), &[0.0]);
    }
}
