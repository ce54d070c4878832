//! Validation while training: the current actor on the experiment's `[validation]` suite (never
//! sampled by training) against best-static, every `every_iterations`; the best checkpoint is
//! kept in `<run>/model-best` and exported as the run's model.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use burn::module::Module;
use moderato_policies::adaptive::AdaptiveConfig;
use moderato_policies::learned::{LearnedPolicy, META_FILE, ModelMeta, WEIGHTS_FILE};
use serde::{Deserialize, Serialize};

use super::metrics::Metrics;
use super::{Trainer, model_meta};
use crate::eval;

/// Where the best validation checkpoint's actor is kept.
pub const BEST_DIR: &str = "model-best";

/// One scenario of a validation, averaged over its seeds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValidationRow {
    pub scenario: String,
    pub cpu_us_per_packet: f64,
    pub best_static_cpu_us_per_packet: f64,
    pub slo_violation_rate: f64,
    pub best_static_slo_violation_rate: f64,
}

/// A whole validation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Validation {
    pub iteration: u64,
    pub rows: Vec<ValidationRow>,
    /// Mean over scenarios of CPU ÷ best-static's.
    pub cpu_vs_best_static: f64,
    /// Mean share of SLO-violating intervals.
    pub slo_violation_rate: f64,
    /// Lower is better: `cpu_vs_best_static + 10 × mean(max(0, violations − best-static's − 0.01))`.
    pub score: f64,
}

/// The best validation so far (checkpointed with the training state).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BestValidation {
    pub iteration: u64,
    pub score: f64,
    pub table: String,
}

impl Validation {
    fn from_rows(iteration: u64, rows: Vec<ValidationRow>) -> Validation {
        let n = rows.len().max(1) as f64;
        let ratio = rows
            .iter()
            .map(|r| r.cpu_us_per_packet / r.best_static_cpu_us_per_packet.max(1e-12))
            .sum::<f64>()
            / n;
        let viol = rows.iter().map(|r| r.slo_violation_rate).sum::<f64>() / n;
        let excess = rows
            .iter()
            .map(|r| (r.slo_violation_rate - r.best_static_slo_violation_rate - 0.01).max(0.0))
            .sum::<f64>()
            / n;
        Validation {
            iteration,
            rows,
            cpu_vs_best_static: ratio,
            slo_violation_rate: viol,
            score: ratio + 10.0 * excess,
        }
    }

    /// The validation as a Markdown table.
    pub fn markdown(&self) -> String {
        let mut md = format!(
            "Validation at iteration {} (scenarios training never sampled; mean over seeds): CPU ÷ best-static {:.3}, \
             SLO-violating intervals {:.1}%, score {:.3}\n\n\
             | scenario | CPU µs/pkt | best-static | ratio | SLO viol. % | best-static % |\n|---|---|---|---|---|---|\n",
            self.iteration,
            self.cpu_vs_best_static,
            100.0 * self.slo_violation_rate,
            self.score
        );
        for r in &self.rows {
            let _ = writeln!(
                md,
                "| {} | {:.2} | {:.2} | {:.3} | {:.1} | {:.1} |",
                r.scenario,
                r.cpu_us_per_packet,
                r.best_static_cpu_us_per_packet,
                r.cpu_us_per_packet / r.best_static_cpu_us_per_packet.max(1e-12),
                100.0 * r.slo_violation_rate,
                100.0 * r.best_static_slo_violation_rate
            );
        }
        md
    }
}

/// Runs the trainer's current actor on the validation suite. `cache`: best-static's cache.
pub fn validate(t: &Trainer, cache: &eval::Cache) -> Result<Validation> {
    let c = &t.exp.config;
    let Some(v) = &c.validation else { anyhow::bail!("the experiment has no [validation]") };
    let meta = model_meta(&c.name, &t.exp.toml, c, &t.state);
    let mut policy =
        LearnedPolicy::new("validation", t.model.actor.clone().valid(), meta, burn::tensor::Device::flex());
    let mut rows = Vec::with_capacity(t.exp.validation.len());
    for sc in &t.exp.validation {
        let (mut cpu, mut bcpu, mut viol, mut bviol) = (0.0, 0.0, 0.0, 0.0);
        for &seed in &v.seeds {
            let (s, r) = eval::run_episode(sc, &c.sim, &AdaptiveConfig::default(), &mut policy, seed, 0)
                .with_context(|| format!("validation on {}", sc.name))?;
            let row = eval::Row::from_summary(&sc.name, "validation", seed, &s, r);
            let best = eval::best_static(sc, &c.sim, seed, 0, cache)?;
            cpu += row.cpu_us_per_packet;
            viol += row.slo_violation_rate;
            bcpu += best.score.cpu_us_per_packet;
            bviol += best.score.slo_violation_rate;
        }
        let n = v.seeds.len() as f64;
        rows.push(ValidationRow {
            scenario: sc.name.clone(),
            cpu_us_per_packet: cpu / n,
            best_static_cpu_us_per_packet: bcpu / n,
            slo_violation_rate: viol / n,
            best_static_slo_violation_rate: bviol / n,
        });
    }
    Ok(Validation::from_rows(t.state.iteration, rows))
}

/// Validates, logs `validation/*`, and keeps the actor in `<run>/model-best` when it is the best
/// so far (recorded in the training state, so that a resumed run compares against it).
pub fn validate_and_keep(t: &mut Trainer, run: &Path, metrics: &mut dyn Metrics) -> Result<Validation> {
    // Best-static is searched once per run and scenario and seed, then read from the run's cache.
    let cache = eval::Cache { dir: Some(run.join("cache")) };
    let v = validate(t, &cache)?;
    let step = t.state.global_step;
    metrics.scalar("validation/cpu_vs_best_static", v.cpu_vs_best_static, step);
    metrics.scalar("validation/slo_violation_rate", v.slo_violation_rate, step);
    metrics.scalar("validation/score", v.score, step);
    tracing::info!(
        "validation at iteration {}: CPU ÷ best-static {:.3}, SLO-violating intervals {:.1}%, score {:.3}",
        v.iteration,
        v.cpu_vs_best_static,
        100.0 * v.slo_violation_rate,
        v.score
    );
    let from = t.exp.config.validation.as_ref().map_or(0, |c| c.from_iteration);
    if v.iteration >= from && t.state.best_validation.as_ref().is_none_or(|b| v.score < b.score) {
        let dir = run.join(BEST_DIR);
        let table = v.markdown();
        let mut meta = model_meta(&t.exp.config.name, &t.exp.toml, &t.exp.config, &t.state);
        meta.provenance.validation = Some(table.clone());
        LearnedPolicy::save(&dir, t.model.actor.clone().valid(), meta)?;
        t.state.best_validation = Some(BestValidation { iteration: v.iteration, score: v.score, table });
    }
    Ok(v)
}

/// Replaces the run's frozen model with the best validation checkpoint, if there is one; returns it.
pub fn export_best(t: &Trainer, run: &Path, model_dir: &Path) -> Result<Option<BestValidation>> {
    let Some(best) = &t.state.best_validation else { return Ok(None) };
    let dir = run.join(BEST_DIR);
    // The best checkpoint's files, checked by a load before they become the run's model.
    LearnedPolicy::load(&dir, &burn::tensor::Device::flex())
        .with_context(|| format!("{}: the best validation checkpoint", dir.display()))?;
    for f in [META_FILE, WEIGHTS_FILE] {
        std::fs::copy(dir.join(f), model_dir.join(f))
            .with_context(|| format!("cannot copy {} to {}", dir.join(f).display(), model_dir.display()))?;
    }
    let p = model_dir.join(META_FILE);
    let meta: ModelMeta = serde_json::from_str(&std::fs::read_to_string(&p)?)?;
    anyhow::ensure!(meta.provenance.validation.is_some(), "{}: no validation table", p.display());
    Ok(Some(best.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(cpu: f64, b: f64, v: f64, bv: f64) -> ValidationRow {
        ValidationRow {
            scenario: "s".into(),
            cpu_us_per_packet: cpu,
            best_static_cpu_us_per_packet: b,
            slo_violation_rate: v,
            best_static_slo_violation_rate: bv,
        }
    }

    #[test]
    fn the_score_is_the_cpu_ratio_plus_violations_beyond_best_statics_and_a_point() {
        let v = Validation::from_rows(3, vec![row(4.4, 4.0, 0.0, 0.0), row(3.0, 3.0, 0.05, 0.0)]);
        assert!((v.cpu_vs_best_static - 1.05).abs() < 1e-12);
        assert!((v.score - (1.05 + 10.0 * 0.04 / 2.0)).abs() < 1e-12);
        // Within a point of best-static's violations costs nothing.
        let w = Validation::from_rows(3, vec![row(4.0, 4.0, 0.105, 0.1)]);
        assert!((w.score - 1.0).abs() < 1e-12);
        assert!(v.markdown().contains("| s | 4.40 | 4.00 | 1.100 | 0.0 | 0.0 |"));
    }
}
