//! The reward: a documented function of ground truth ([`IntervalTruth`]).
//!
//! `r = −w_cpu · cpu_us_per_packet / cpu_ref_us − w_lat · max(0, p99 / slo − 1) − w_drop · drop_fraction`
//!
//! where `p99` is the worst p99 latency among latency-sensitive VMs in the interval (a VM with no
//! completed latency sample contributes nothing) and `drop_fraction` is packets dropped over
//! packets offered in the interval.

use serde::{Deserialize, Serialize};

use crate::info::IntervalTruth;

/// Weights and the SLO; from the experiment or evaluation config.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardConfig {
    /// Weight of CPU per packet.
    #[serde(default = "d_w_cpu")]
    pub w_cpu: f64,
    /// Weight of the relative SLO excess of the p99 latency.
    #[serde(default = "d_w_lat")]
    pub w_lat: f64,
    /// Weight of the drop fraction.
    #[serde(default = "d_w_drop")]
    pub w_drop: f64,
    /// The p99 latency SLO of latency-sensitive VMs, microseconds.
    #[serde(default = "d_slo")]
    pub slo_p99_us: f64,
    /// CPU per packet that scores −w_cpu, microseconds.
    #[serde(default = "d_cpu_ref")]
    pub cpu_ref_us: f64,
}

fn d_w_cpu() -> f64 {
    1.0
}
fn d_w_lat() -> f64 {
    2.0
}
fn d_w_drop() -> f64 {
    10.0
}
fn d_slo() -> f64 {
    200.0
}
fn d_cpu_ref() -> f64 {
    10.0
}

impl Default for RewardConfig {
    fn default() -> Self {
        RewardConfig {
            w_cpu: d_w_cpu(),
            w_lat: d_w_lat(),
            w_drop: d_w_drop(),
            slo_p99_us: d_slo(),
            cpu_ref_us: d_cpu_ref(),
        }
    }
}

/// The three terms of one reward, each already weighted and negated, and the interval's cost for
/// constrained training.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RewardTerms {
    pub cpu: f64,
    pub latency: f64,
    pub drops: f64,
    /// The constraint's cost of the interval: 1 when a latency-sensitive flow's p99 exceeded the
    /// SLO (an SLO-violating interval, as evaluations count them), else 0. Not part of
    /// [`RewardTerms::total`]; constrained PPO (`[ppo] constraint = "lagrangian"`) bounds its mean.
    #[serde(default)]
    pub cost: f64,
}

impl RewardTerms {
    pub fn total(&self) -> f64 {
        self.cpu + self.latency + self.drops
    }
}

impl RewardConfig {
    /// Checks that weights are finite and non-negative and the SLO and reference positive.
    pub fn validate(&self) -> Result<(), String> {
        for (k, v) in [("w_cpu", self.w_cpu), ("w_lat", self.w_lat), ("w_drop", self.w_drop)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("reward.{k} = {v}: weights must be finite and >= 0"));
            }
        }
        for (k, v) in [("slo_p99_us", self.slo_p99_us), ("cpu_ref_us", self.cpu_ref_us)] {
            if !(v.is_finite() && v > 0.0) {
                return Err(format!("reward.{k} = {v}: must be a positive number of microseconds"));
            }
        }
        Ok(())
    }

    /// The relative SLO excess `max(0, p99 / slo − 1)` of the worst latency-sensitive VM.
    pub fn slo_excess(&self, t: &IntervalTruth) -> f64 {
        t.worst_sensitive_p99_us().map_or(0.0, |p99| (p99 / self.slo_p99_us - 1.0).max(0.0))
    }

    pub fn terms(&self, t: &IntervalTruth) -> RewardTerms {
        RewardTerms {
            cpu: -self.w_cpu * t.cpu_us_per_packet() / self.cpu_ref_us,
            latency: -self.w_lat * self.slo_excess(t),
            drops: -self.w_drop * t.drop_fraction(),
            cost: if t.worst_sensitive_p99_us().is_some_and(|p99| p99 > self.slo_p99_us) { 1.0 } else { 0.0 },
        }
    }

    pub fn reward(&self, t: &IntervalTruth) -> f32 {
        self.terms(t).total() as f32
    }
}
