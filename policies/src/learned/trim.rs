//! `trim:<model>`: a frozen model under a slow feedback loop on the target it is told.
//!
//! A model reads each VM's p99 target from its observation and decides for it, but how close it
//! runs to the target is whatever training left: `models/default` holds its VMs' p99 at about
//! 60% of a 200 µs target on the standard suite, where best-static runs at 75–80%, and overshoots
//! some 100 µs targets on the validation suite. The trim measures that and corrects it on the
//! running host: each VM's target as the model sees it is the operator's times a factor `e^z`.
//! Every interval whose probe reported moves `z`:
//! - p99 above `setpoint × target`: down by `down` of the log of the ratio, at once;
//! - otherwise up by `up` of the log of `setpoint × target` over the **worst** p99 of the last
//!   `window` reported intervals, so that a load whose bursts come and go is held to its bursts,
//!   not loosened in its lulls (slow to loosen, quick to tighten).
//!
//! `z` stays within `[−ln max_factor, ln max_factor]` and the told target within the model's
//! trained range. A VM without a probe sample holds its factor; a VM without a target is not
//! touched. The model's own decision, its monotone envelope included, is then taken as it is: at
//! a fixed state a tighter operator target is still never coalesced more.
//!
//! Gains ([`TrimGains::default`]): setpoint 0.8, up 0.1, down 0.5, max factor 4, window 16
//! intervals. They were chosen on the standard suite (setpoint 0.9 and no window were tried
//! there: more violations on `onoff-bursts`), never on the validation suite.
//!
//! The probe is the one `slo-feedback` reads: the guest's own where it has one, else the host's.

use std::collections::VecDeque;

use moderato_env::{CoalescingSettings, HostProfile, NapiParams, Observation};

use super::LearnedPolicy;
use crate::slo_feedback::{probe_requirements, reported_probe};
use crate::{Policy, Requirements};

/// The trim's gains (documented defaults: [`TrimGains::default`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrimGains {
    /// Share of the target the loop holds the probe's p99 at.
    pub setpoint: f64,
    /// Share of the log error applied per interval when the p99 is below the setpoint.
    pub up: f64,
    /// Share of the log error applied per interval when the p99 is above the setpoint.
    pub down: f64,
    /// The told target stays within `[target / max_factor, target × max_factor]`.
    pub max_factor: f64,
    /// Intervals whose worst p99 a loosening answers to: the loop loosens only when every
    /// reported interval of the last `window` was under the setpoint, by the worst one's margin,
    /// so that a load whose bursts come and go is held to its bursts, not to its lulls.
    pub window: usize,
}

impl Default for TrimGains {
    fn default() -> Self {
        TrimGains { setpoint: 0.8, up: 0.1, down: 0.5, max_factor: 4.0, window: 16 }
    }
}

/// A learned policy whose per-VM targets are trimmed by feedback (see the module docs).
#[derive(Debug)]
pub struct TrimmedPolicy {
    name: String,
    inner: LearnedPolicy,
    gains: TrimGains,
    /// Per VM: the log of the factor on its target.
    z: Vec<f64>,
    /// Per VM: the probe's p99 over its target in the last `window` reported intervals.
    recent: Vec<VecDeque<f64>>,
}

impl TrimmedPolicy {
    pub fn new(name: impl Into<String>, inner: LearnedPolicy, gains: TrimGains) -> Self {
        TrimmedPolicy { name: name.into(), inner, gains, z: Vec::new(), recent: Vec::new() }
    }

    /// Each VM's factor on its target now.
    pub fn factors(&self) -> Vec<f64> {
        self.z.iter().map(|z| z.exp()).collect()
    }

    /// `obs` as the model is shown it: each VM's target times its factor, within the model's
    /// trained range.
    fn told(&mut self, obs: &Observation) -> Observation {
        let vms = obs.guests.len();
        if self.z.len() != vms {
            self.z = vec![0.0; vms];
            self.recent = vec![VecDeque::with_capacity(self.gains.window.max(1)); vms];
        }
        let g = self.gains;
        let zmax = g.max_factor.max(1.0).ln();
        let range = self.inner.meta().slo_range_us;
        let mut o = obs.clone();
        for v in 0..vms {
            let Some(t) = super::target_in(obs, v) else { continue };
            if let Some(p) = reported_probe(obs, v).filter(|p| p.p99_us > 0.0) {
                let ratio = p.p99_us / t;
                let recent = &mut self.recent[v];
                if recent.len() >= g.window.max(1) {
                    recent.pop_front();
                }
                recent.push_back(ratio);
                let worst = recent.iter().copied().fold(0.0, f64::max);
                let e = (g.setpoint / ratio).ln();
                let step = if e < 0.0 { g.down * e } else { g.up * (g.setpoint / worst).ln().max(0.0) };
                let z = &mut self.z[v];
                *z = (*z + step).clamp(-zmax, zmax);
            }
            let mut told = t * self.z[v].exp();
            if let Some([lo, hi]) = range {
                told = told.clamp(lo, hi);
            }
            if let Some(x) = o.host.slo_p99_us.get_mut(v)
                && x.is_some()
            {
                *x = Some(told);
            }
            if o.guests[v].slo_p99_us.is_some() {
                o.guests[v].slo_p99_us = Some(told);
            }
        }
        o
    }
}

impl Policy for TrimmedPolicy {
    fn name(&self) -> &str {
        &self.name
    }

    fn act(&mut self, obs: &Observation) -> CoalescingSettings {
        let o = self.told(obs);
        self.inner.act(&o)
    }

    fn reset(&mut self) {
        self.z.clear();
        self.recent.clear();
        self.inner.reset();
    }

    /// The model's, and the probes the loop reads (as `slo-feedback` does).
    fn requirements(&self) -> Requirements {
        let mut r = self.inner.requirements();
        let probes = probe_requirements();
        for (side, names) in [(&mut r.host, probes.host), (&mut r.guest, probes.guest)] {
            for n in names {
                if !side.contains(&n) {
                    side.push(n);
                }
            }
        }
        r
    }

    fn napi(&self) -> Option<NapiParams> {
        self.inner.napi()
    }

    fn sets_deferral(&self) -> bool {
        self.inner.sets_deferral()
    }

    fn irq_suspend_timeout_ns(&self) -> Option<u64> {
        self.inner.irq_suspend_timeout_ns()
    }

    fn check_profile(&self, profile: HostProfile) -> Result<(), String> {
        Policy::check_profile(&self.inner, profile)
    }

    fn follows_profile(&self) -> bool {
        self.inner.follows_profile()
    }

    fn sets_coalescing(&self) -> bool {
        self.inner.sets_coalescing()
    }

    fn live_refusal(&self) -> Option<String> {
        self.inner.live_refusal()
    }
}
