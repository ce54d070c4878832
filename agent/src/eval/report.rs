//! Aggregates over seeds and the files an evaluation writes.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use moderato_policies::best_static::Score;
use serde::Serialize;

use super::plot::{PlotPoint, plot_scenario, plot_summary};
use super::{Row, Suite};

/// Mean and 95% confidence half-width over seeds (Student's t with n − 1 degrees of freedom).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Stat {
    pub mean: f64,
    pub ci95: f64,
}

/// t_{0.975, df} for df = 1..=30; 1.96 beyond.
const T975: [f64; 30] = [
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
    2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
];

impl Stat {
    pub fn of(xs: &[f64]) -> Stat {
        let n = xs.len();
        if n == 0 {
            return Stat::default();
        }
        let mean = xs.iter().sum::<f64>() / n as f64;
        if n == 1 {
            return Stat { mean, ci95: 0.0 };
        }
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        let t = T975.get(n - 2).copied().unwrap_or(1.96);
        Stat { mean, ci95: t * (var / n as f64).sqrt() }
    }
}

/// One policy on one scenario, over seeds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Aggregate {
    pub scenario: String,
    pub policy: String,
    pub seeds: usize,
    pub cpu_us_per_packet: Stat,
    pub p50_us: Stat,
    pub p99_us: Stat,
    pub p999_us: Stat,
    pub slo_violation_rate: Stat,
    pub drop_rate: Stat,
    pub throughput_pps: Stat,
    pub reward: Stat,
    /// The best policy of the scenario: the lowest mean CPU per packet among those that meet the
    /// SLO (no violating interval, drops ≤ 0.1%), or the smallest miss if none does.
    pub best: bool,
}

impl Aggregate {
    fn score(&self) -> Score {
        Score {
            cpu_us_per_packet: self.cpu_us_per_packet.mean,
            slo_violation_rate: self.slo_violation_rate.mean,
            drop_fraction: self.drop_rate.mean,
        }
    }
}

/// Aggregates rows per (scenario, policy), keeping the rows' order of first appearance.
pub fn aggregate(rows: &[Row]) -> Vec<Aggregate> {
    let mut keys: Vec<(String, String)> = Vec::new();
    for r in rows {
        let k = (r.scenario.clone(), r.policy.clone());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let mut out: Vec<Aggregate> = keys
        .into_iter()
        .map(|(scenario, policy)| {
            let rs: Vec<&Row> =
                rows.iter().filter(|r| r.scenario == scenario && r.policy == policy).collect();
            let st = |f: fn(&Row) -> f64| Stat::of(&rs.iter().map(|r| f(r)).collect::<Vec<_>>());
            Aggregate {
                seeds: rs.len(),
                cpu_us_per_packet: st(|r| r.cpu_us_per_packet),
                p50_us: st(|r| r.p50_us),
                p99_us: st(|r| r.p99_us),
                p999_us: st(|r| r.p999_us),
                slo_violation_rate: st(|r| r.slo_violation_rate),
                drop_rate: st(|r| r.drop_rate),
                throughput_pps: st(|r| r.throughput_pps),
                reward: st(|r| r.reward),
                best: false,
                scenario,
                policy,
            }
        })
        .collect();
    let scenarios: Vec<String> = out.iter().map(|a| a.scenario.clone()).fold(Vec::new(), |mut v, s| {
        if !v.contains(&s) {
            v.push(s);
        }
        v
    });
    for s in scenarios {
        let mut best: Option<usize> = None;
        for (i, a) in out.iter().enumerate().filter(|(_, a)| a.scenario == s) {
            if best.is_none_or(|b| a.score().better_than(&out[b].score())) {
                best = Some(i);
            }
        }
        if let Some(b) = best {
            out[b].best = true;
        }
    }
    out
}

fn pm(s: Stat, scale: f64, digits: usize) -> String {
    format!("{:.d$} ± {:.d$}", s.mean * scale, s.ci95 * scale, d = digits)
}

/// The results as Markdown: one table per scenario.
pub fn markdown(suite: &Suite, aggs: &[Aggregate]) -> String {
    let cfg = &suite.config;
    let mut md = String::new();
    let warmup = if cfg.warmup_steps > 0 {
        format!(" after a warm-up of {} intervals (not counted)", cfg.warmup_steps)
    } else {
        String::new()
    };
    let _ = writeln!(
        md,
        "Mean ± 95% interval over {} seeds ({:?}); episodes of {} × {} ms{warmup}, each after a \
         per-packet reset interval that is not counted. SLO: p99 ≤ {} µs of the latency-sensitive \
         flows (request-response), which the p99 columns report; a scenario without any (bulk \
         only) reports the p99 of all its flows, which the SLO does not cover. ★ marks the best \
         policy: the lowest CPU per packet among those with no SLO-violating interval and drops \
         ≤ 0.1% (or the smallest miss).\n",
        cfg.seeds.len(),
        cfg.seeds,
        cfg.sim.episode_steps,
        cfg.sim.interval_us as f64 / 1000.0,
        cfg.sim.reward.slo_p99_us
    );
    // Gains that differ from the documented defaults change what `trim:` and `slo-feedback` are:
    // say so where the numbers are read.
    let g = cfg.gains();
    for (table, set, default) in [
        ("trim", toml_table(&g.trim), toml_table(&moderato_policies::learned::trim::TrimGains::default())),
        (
            "slo_feedback",
            toml_table(&g.slo_feedback),
            toml_table(&moderato_policies::slo_feedback::Gains::default()),
        ),
    ] {
        let changed: Vec<String> = set
            .iter()
            .filter(|(k, v)| default.get(*k) != Some(*v))
            .map(|(k, v)| format!("{k} = {v}"))
            .collect();
        if !changed.is_empty() {
            let _ = writeln!(md, "Gains not the defaults: `[{table}]` {}.\n", changed.join(", "));
        }
    }
    for sc in &suite.scenarios {
        let s = sc.name.as_str();
        let _ = writeln!(md, "### {s}\n");
        if !has_sensitive_flows(sc) {
            let _ = writeln!(
                md,
                "No latency-sensitive flow (bulk only): p99 is of all flows and the SLO does not apply.\n"
            );
        }
        let _ = writeln!(
            md,
            "| policy | CPU µs/pkt | p50 µs | p99 µs | p99.9 µs | SLO viol. % | drops % | kpps | reward |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|");
        for a in aggs.iter().filter(|a| a.scenario == s) {
            let name = if a.best { format!("★ **{}**", a.policy) } else { a.policy.clone() };
            let _ = writeln!(
                md,
                "| {name} | {} | {} | {} | {} | {} | {} | {} | {} |",
                pm(a.cpu_us_per_packet, 1.0, 2),
                pm(a.p50_us, 1.0, 1),
                pm(a.p99_us, 1.0, 1),
                pm(a.p999_us, 1.0, 1),
                pm(a.slo_violation_rate, 100.0, 1),
                pm(a.drop_rate, 100.0, 2),
                pm(a.throughput_pps, 1e-3, 1),
                pm(a.reward, 1.0, 3),
            );
        }
        let _ = writeln!(md);
    }
    md
}

/// One line per policy over every scenario of `aggs`: mean CPU per packet, its ratio to
/// best-static's (mean over scenarios and the worst scenario) and SLO-violating intervals (mean,
/// worst, and the worst excess over best-static's in percentage points). Without best-static in
/// the suite the comparison columns read `–`.
pub fn overview(aggs: &[Aggregate]) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "| policy | CPU µs/pkt (mean over scenarios) | CPU ÷ best-static, mean | worst (scenario) | SLO viol. % mean | worst | worst excess over best-static (pts) |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|");
    let mut policies: Vec<&str> = Vec::new();
    for a in aggs {
        if !policies.contains(&a.policy.as_str()) {
            policies.push(&a.policy);
        }
    }
    let best = |scenario: &str| aggs.iter().find(|b| b.scenario == scenario && b.policy == "best-static");
    for p in policies {
        let rows: Vec<&Aggregate> = aggs.iter().filter(|a| a.policy == p).collect();
        let n = rows.len() as f64;
        let cpu = rows.iter().map(|a| a.cpu_us_per_packet.mean).sum::<f64>() / n;
        let viol = rows.iter().map(|a| a.slo_violation_rate.mean).sum::<f64>() / n;
        let worst_viol = rows.iter().map(|a| a.slo_violation_rate.mean).fold(0.0, f64::max);
        let pairs: Vec<(&Aggregate, &Aggregate)> =
            rows.iter().filter_map(|a| Some((*a, best(&a.scenario)?))).collect();
        let (ratio, worst, excess) = if pairs.len() == rows.len() && !pairs.is_empty() {
            let r: Vec<(f64, &str)> = pairs
                .iter()
                .map(|(a, b)| {
                    (a.cpu_us_per_packet.mean / b.cpu_us_per_packet.mean.max(1e-12), a.scenario.as_str())
                })
                .collect();
            let mean = r.iter().map(|x| x.0).sum::<f64>() / r.len() as f64;
            let (w, ws) = r.iter().copied().fold((f64::MIN, ""), |m, x| if x.0 > m.0 { x } else { m });
            let ex = pairs
                .iter()
                .map(|(a, b)| a.slo_violation_rate.mean - b.slo_violation_rate.mean)
                .fold(f64::MIN, f64::max);
            (format!("{mean:.3}"), format!("{w:.3} ({ws})"), format!("{:+.1}", ex * 100.0))
        } else {
            ("–".into(), "–".into(), "–".into())
        };
        let _ = writeln!(
            md,
            "| {p} | {cpu:.2} | {ratio} | {worst} | {:.1} | {:.1} | {excess} |",
            viol * 100.0,
            worst_viol * 100.0
        );
    }
    md
}

/// Whether any VM of `sc` is held to a latency target (its own, or the run's SLO).
pub fn has_sensitive_flows(sc: &moderato_env::sim::Scenario) -> bool {
    sc.vms.iter().any(|v| v.target_us(1.0).is_some())
}

fn points(aggs: &[Aggregate], scenario: &str) -> Vec<PlotPoint> {
    aggs.iter()
        .filter(|a| a.scenario == scenario)
        .map(|a| PlotPoint {
            policy: a.policy.clone(),
            p99_us: a.p99_us.mean,
            p99_ci: a.p99_us.ci95,
            cpu_us: a.cpu_us_per_packet.mean,
            cpu_ci: a.cpu_us_per_packet.ci95,
            best: a.best,
            slo_violation_rate: a.slo_violation_rate.mean,
            drop_rate: a.drop_rate.mean,
        })
        .collect()
}

#[derive(Serialize)]
struct JsonOut<'a> {
    config: &'a super::EvalConfig,
    rows: &'a [Row],
    aggregates: &'a [Aggregate],
}

/// Writes `report.md`, `results.csv`, `results.json`, `config.toml` and `plots/` into `dir`.
pub fn write_outputs(dir: &Path, suite: &Suite, rows: &[Row], aggs: &[Aggregate]) -> Result<()> {
    std::fs::create_dir_all(dir.join("plots")).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut report = format!(
        "# Evaluation `{}`\n\nConfig: `{}` (re-run it as it is: `moderato eval {}`)\n\n",
        suite.config.name,
        suite.path.display(),
        dir.join("config.toml").display()
    );
    report.push_str(&markdown(suite, aggs));
    report.push_str("Plots: `plots/<scenario>.png` (CPU per packet against p99), `plots/summary.png`.\n");
    std::fs::write(dir.join("report.md"), report)?;
    let mut w = csv::Writer::from_path(dir.join("results.csv"))?;
    for r in rows {
        w.serialize(r)?;
    }
    w.flush()?;
    let portable = suite.config.portable(suite);
    let json = JsonOut { config: &portable, rows, aggregates: aggs };
    std::fs::write(dir.join("results.json"), serde_json::to_string_pretty(&json)?)?;
    // Paths made absolute, so that the copy runs from the run directory or anywhere else.
    std::fs::write(
        dir.join("config.toml"),
        format!(
            "# The evaluation's config, with absolute paths: moderato eval {}\n{}",
            dir.join("config.toml").display(),
            toml::to_string(&portable)?
        ),
    )?;
    let plots = dir.join("plots");
    let slo = suite.config.sim.reward.slo_p99_us;
    let mut summary = Vec::new();
    for sc in &suite.scenarios {
        let pts = points(aggs, &sc.name);
        let title = format!("{}: CPU per packet vs p99 latency", sc.name);
        plot_scenario(&plots, &sc.name, &title, slo, has_sensitive_flows(sc), &pts)?;
        summary.push((sc.name.clone(), pts));
    }
    let reference = if aggs.iter().any(|a| a.policy == "dim") { "dim" } else { aggs[0].policy.as_str() };
    plot_summary(&plots, "summary", reference, &summary)?;
    Ok(())
}

/// A gains struct as TOML key = value pairs, for the report's line on non-default gains.
fn toml_table<T: serde::Serialize>(g: &T) -> toml::Table {
    toml::Table::try_from(g).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t_interval_of_three_seeds() {
        let s = Stat::of(&[1.0, 2.0, 3.0]);
        assert_eq!(s.mean, 2.0);
        // sd = 1, n = 3: 4.303 / sqrt(3).
        assert!((s.ci95 - 4.303 / 3f64.sqrt()).abs() < 1e-9);
        assert_eq!(Stat::of(&[5.0]).ci95, 0.0);
    }
}
