//! The reward: a documented function of ground truth ([`IntervalTruth`]).
//!
//! `r = −w_cpu · cpu_us_per_packet / cpu_ref_us − w_lat · max(0, max_v p99_v / (m · slo_v) − 1) − w_viol · [max_v p99_v > m · slo_v] − w_drop · drop_fraction`
//!
//! where `p99_v` is VM `v`'s p99 latency in the interval and `slo_v` its own target (its
//! `[[vm]] slo_p99_us`, or `slo_p99_us` here for a latency-sensitive VM that sets none; VMs
//! without an objective and VMs with no completed latency sample contribute nothing), `m` is
//! `slo_margin` and `drop_fraction` is packets dropped over packets offered in the interval. With
//! `slo_excess = "log"` the latency term is `−w_lat · ln(max(1, max_v p99_v / (m · slo_v)))`
//! instead: the same slope at the target, but a p99 at 200× a tight target costs 5.3, not 199, so
//! the hosts no setting can serve do not drown the CPU term. `w_viol` (default 0) prices every
//! interval over the (margined) target at a fixed amount, however small the excess: the count
//! evaluations report, where the excess terms make a p99 just over the target nearly free.

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
    /// Weight of an interval over the target: a fixed penalty when some VM's p99 exceeds
    /// `slo_margin` × its target (the constraint's cost at a fixed price), part of the latency
    /// term. Default 0 (not serialised then, so older configs and models keep their bytes).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub w_viol: f64,
    /// Weight of the drop fraction.
    #[serde(default = "d_w_drop")]
    pub w_drop: f64,
    /// The p99 latency target of latency-sensitive VMs that set none of their own, microseconds.
    #[serde(default = "d_slo")]
    pub slo_p99_us: f64,
    /// The reward and the constraint's cost judge each VM's p99 against `slo_margin` × its
    /// target (e.g. 0.9 trains with a 10% margin); evaluations always count violations of the
    /// target itself. Default 1.
    #[serde(default = "d_margin")]
    pub slo_margin: f64,
    /// How the latency term grows with the excess: `"linear"` (default) or `"log"`.
    #[serde(default)]
    pub slo_excess: ExcessShape,
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
fn is_zero(x: &f64) -> bool {
    *x == 0.0
}
fn d_w_drop() -> f64 {
    10.0
}
/// The latency term's shape (see the module docs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExcessShape {
    /// `max(0, r − 1)` of the worst ratio `r` of p99 to its (margined) target.
    #[default]
    Linear,
    /// `ln(max(1, r))`.
    Log,
}

fn d_margin() -> f64 {
    1.0
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
            w_viol: 0.0,
            w_drop: d_w_drop(),
            slo_p99_us: d_slo(),
            slo_margin: d_margin(),
            slo_excess: ExcessShape::Linear,
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
    /// The constraint's cost of the interval: 1 when some VM's p99 exceeded `slo_margin` × its
    /// target (with margin 1: an SLO-violating interval, as evaluations count them), else 0. Not part of
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
        for (k, v) in
            [("w_cpu", self.w_cpu), ("w_lat", self.w_lat), ("w_viol", self.w_viol), ("w_drop", self.w_drop)]
        {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("reward.{k} = {v}: weights must be finite and >= 0"));
            }
        }
        for (k, v) in [("slo_p99_us", self.slo_p99_us), ("cpu_ref_us", self.cpu_ref_us)] {
            if !(v.is_finite() && v > 0.0) {
                return Err(format!("reward.{k} = {v}: must be a positive number of microseconds"));
            }
        }
        if !(self.slo_margin.is_finite() && (0.1..=10.0).contains(&self.slo_margin)) {
            return Err(format!(
                "reward.slo_margin = {}: the reward judges p99 against slo_margin × the target; use a number in \
                 [0.1, 10] (1 = the target itself)",
                self.slo_margin
            ));
        }
        Ok(())
    }

    /// The relative SLO excess `max(0, p99 / (margin · target) − 1)` of the worst VM.
    pub fn slo_excess(&self, t: &IntervalTruth) -> f64 {
        t.worst_slo_ratio().map_or(0.0, |r| match self.slo_excess {
            ExcessShape::Linear => (r / self.slo_margin - 1.0).max(0.0),
            ExcessShape::Log => (r / self.slo_margin).max(1.0).ln(),
        })
    }

    pub fn terms(&self, t: &IntervalTruth) -> RewardTerms {
        let cost = if t.worst_slo_ratio().is_some_and(|r| r > self.slo_margin) { 1.0 } else { 0.0 };
        RewardTerms {
            cpu: -self.w_cpu * t.cpu_us_per_packet() / self.cpu_ref_us,
            latency: -self.w_lat * self.slo_excess(t) - self.w_viol * cost,
            drops: -self.w_drop * t.drop_fraction(),
            cost,
        }
    }

    pub fn reward(&self, t: &IntervalTruth) -> f32 {
        self.terms(t).total() as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::info::{LatencyStats, VmTruth};

    fn vm(target: Option<f64>, p99_us: f64) -> VmTruth {
        VmTruth {
            latency_sensitive: target.is_some(),
            slo_p99_us: target,
            latency: LatencyStats { p99_us, count: 10, ..Default::default() },
            completed: 10,
            dropped: 0,
        }
    }

    fn truth(vms: Vec<VmTruth>) -> IntervalTruth {
        IntervalTruth { interval_ns: 10_000_000, completed: 20, offered: 20, vms, ..Default::default() }
    }

    #[test]
    fn each_vm_is_judged_against_its_own_target_and_a_vm_without_one_never() {
        let r = RewardConfig::default();
        // 150 µs against a 100 µs target is 50% over; 900 µs against 1 ms is under.
        let t = truth(vec![vm(Some(100.0), 150.0), vm(Some(1000.0), 900.0)]);
        assert!((r.slo_excess(&t) - 0.5).abs() < 1e-12);
        assert_eq!(r.terms(&t).cost, 1.0);
        assert!(t.slo_violated());
        // The same latencies with the targets swapped: the 1 ms VM is far over.
        let t = truth(vec![vm(Some(1000.0), 150.0), vm(Some(100.0), 900.0)]);
        assert!((r.slo_excess(&t) - 8.0).abs() < 1e-12);
        // A throughput-only VM's latency never counts, however high.
        let t = truth(vec![vm(None, 1e6), vm(Some(1000.0), 900.0)]);
        assert_eq!(r.slo_excess(&t), 0.0);
        assert_eq!(r.terms(&t).cost, 0.0);
        assert!(!t.slo_violated());
        // A margin of 0.8 judges against 800 µs: 900 µs is over for the reward and the cost,
        // but not an SLO violation as evaluations count them.
        let m = RewardConfig { slo_margin: 0.8, ..r };
        assert!((m.slo_excess(&t) - 0.125).abs() < 1e-12);
        assert_eq!(m.terms(&t).cost, 1.0);
        assert!(!t.slo_violated());
        // The log shape: the same where p99 is just over, far less where it is far over.
        let lg = RewardConfig { slo_excess: ExcessShape::Log, ..r };
        let t = truth(vec![vm(Some(100.0), 20_000.0)]);
        assert!((r.slo_excess(&t) - 199.0).abs() < 1e-9);
        assert!((lg.slo_excess(&t) - 200f64.ln()).abs() < 1e-12);
        let t = truth(vec![vm(Some(100.0), 101.0)]);
        assert!((lg.slo_excess(&t) - r.slo_excess(&t)).abs() < 1e-4);
        assert_eq!(lg.slo_excess(&truth(vec![vm(Some(100.0), 99.0)])), 0.0);
        // w_viol prices an interval over the target at a fixed amount, however small the excess.
        let v = RewardConfig { w_viol: 3.0, ..r };
        let just_over = truth(vec![vm(Some(100.0), 101.0)]);
        assert!((v.terms(&just_over).latency - (r.terms(&just_over).latency - 3.0)).abs() < 1e-12);
        let under = truth(vec![vm(Some(100.0), 99.0)]);
        assert_eq!(v.terms(&under).latency, 0.0);
        // Unset, it is not serialised (older configs and models keep their bytes).
        assert!(!toml::to_string(&r).unwrap().contains("w_viol"));
        assert!(toml::to_string(&v).unwrap().contains("w_viol = 3.0"));
        let e = RewardConfig { w_viol: -1.0, ..r }.validate().unwrap_err();
        assert!(e.contains("reward.w_viol = -1"), "{e}");
        // The margin is checked.
        let e = RewardConfig { slo_margin: 0.0, ..r }.validate().unwrap_err();
        assert!(e.contains("reward.slo_margin = 0") && e.contains("[0.1, 10]"), "{e}");
    }
}
