//! Evaluation: every policy × scenario × seed in the simulator, aggregated over seeds, written as
//! a table, CSV, JSON and plots.
//!
//! The same path evaluates baselines and learned models: a policy is a policy. `best-static` is
//! the exception only in that its setting is first searched for in hindsight, per scenario and
//! seed (and cached), then run like any fixed setting.
//!
//! **Warm-up.** Every episode starts with the simulator's reset interval under per-packet
//! settings (the virtio default, `[sim] initial`), which produces the first observation and is
//! never counted. Its backlog can spill into the first intervals under the policy; an eval
//! config's `warmup_steps` runs that many intervals more, under the policy, before the
//! statistics start (they come on top of `[sim] episode_steps`, which are all counted).
//!
//! **The SLO** covers the latency-sensitive flows only (request-response flows, unless a
//! scenario says otherwise): their p99 is what the tables report and what is held to the SLO. A
//! scenario with none (bulk only) reports the p99 of all its flows, and no interval of it can
//! violate the SLO.

pub mod plot;
pub mod report;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use moderato_env::sim::limits::check_name;
use moderato_env::sim::{Scenario, SimConfig, SimEnv};
use moderato_env::{Env, EpisodeSummary};
use moderato_policies::Policy;
use moderato_policies::adaptive::{AdaptiveConfig, AdaptiveFactory};
use moderato_policies::baselines::StaticSpec;
use moderato_policies::best_static::{self, Found, Score};
use moderato_policies::gains::ControllerGains;
use moderato_policies::learned::trim::TrimGains;
use moderato_policies::slo_feedback::Gains as SloGains;
use serde::{Deserialize, Serialize};

pub use report::{Aggregate, Stat, aggregate, write_outputs};

use crate::resolve::{PolicySource, resolve};

/// An evaluation suite, read from TOML.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Names the output directory `runs/eval-<name>-<time>`.
    pub name: String,
    /// Scenario files, relative to this config file.
    pub scenarios: Vec<PathBuf>,
    /// Baseline names (`per-packet`, `static:<preset>`, `dim`, `itr`, `best-static`, ...) and
    /// frozen-model directories (relative to this config file, or absolute).
    pub policies: Vec<String>,
    /// At least three seeds: results are means and 95% intervals over them.
    #[serde(default = "d_seeds")]
    pub seeds: Vec<u64>,
    /// The control loop: interval, episode length, reward weights and SLO, probes.
    #[serde(default)]
    pub sim: SimConfig,
    /// Named static knob sets, usable as `static:<name>`.
    #[serde(default, rename = "static")]
    pub statics: BTreeMap<String, StaticSpec>,
    /// Settings of the in-layer adaptive algorithms behind `dim` and `itr` (DIM's profile tables,
    /// ITR's tick rate and link speed).
    #[serde(default)]
    pub adaptive: AdaptiveConfig,
    /// Worker threads (0: one per core).
    #[serde(default)]
    pub threads: usize,
    /// Intervals under the policy at the start of each episode that the statistics leave out
    /// (besides the reset interval, which is never counted); they are run in addition to
    /// `[sim] episode_steps`.
    #[serde(default)]
    pub warmup_steps: u32,
    /// The SLO (p99 µs of the latency-sensitive flows) to evaluate at: one target, which
    /// overrides `[sim.reward] slo_p99_us`, or a list (`[100, 200, 500]`) that runs the whole
    /// suite at each target (best-static searched per target) and reports each. Absent: the
    /// `[sim.reward]` value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slo_p99_us: Option<SloTargets>,
    /// Runs every scenario as a host of this profile (`kvm-notf-coal`, `kvm-vhost`, `xen`): its
    /// `host.profile` set and its backend made the profile's. Absent: each scenario's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<moderato_env::HostProfile>,
    /// `[trim]`: the gains of every `trim:` and `trim-targets:` policy of the suite; absent keys
    /// keep the documented defaults (`moderato_policies::learned::trim::TrimGains`).
    #[serde(default, skip_serializing_if = "moderato_policies::gains::is_default")]
    pub trim: TrimGains,
    /// `[slo_feedback]`: the gains of every `slo-feedback` policy of the suite; absent keys keep
    /// the documented defaults (`moderato_policies::slo_feedback::Gains`).
    #[serde(default, skip_serializing_if = "moderato_policies::gains::is_default")]
    pub slo_feedback: SloGains,
}

impl EvalConfig {
    /// The feedback controllers' gains this config sets.
    pub fn gains(&self) -> ControllerGains {
        ControllerGains { trim: self.trim, slo_feedback: self.slo_feedback }
    }
}

/// One SLO target or a list of them (`slo_p99_us = 200` or `slo_p99_us = [100, 200, 500]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SloTargets {
    One(f64),
    Many(Vec<f64>),
}

impl SloTargets {
    pub fn list(&self) -> Vec<f64> {
        match self {
            SloTargets::One(t) => vec![*t],
            SloTargets::Many(v) => v.clone(),
        }
    }
}

/// Most targets one sweep may list.
pub const MAX_SLO_TARGETS: usize = 16;

fn d_seeds() -> Vec<u64> {
    vec![1, 2, 3]
}

/// Most scenarios, policies, seeds and threads an eval config may list.
pub const MAX_LIST: usize = 1024;

/// An eval config with its scenarios loaded and its policy names resolved.
#[derive(Debug, Clone)]
pub struct Suite {
    pub config: EvalConfig,
    pub path: PathBuf,
    pub scenarios: Vec<Scenario>,
    pub policies: Vec<PolicySource>,
}

impl EvalConfig {
    pub fn load(path: &Path) -> Result<Suite> {
        let text = moderato_env::sim::limits::read_config(path)
            .with_context(|| format!("cannot read eval config {}", path.display()))?;
        let config: EvalConfig = toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "{}: {}\n(an eval config has name, scenarios, policies, seeds, [sim], [static.<name>], [trim], [slo_feedback]; see experiments/eval/standard.toml)",
                path.display(),
                e
            )
        })?;
        config.into_suite(path)
    }

    /// This config with every scenario and model path absolute, so that a copy of it runs from
    /// anywhere (the copy a run directory keeps, `config.toml`).
    pub fn portable(&self, suite: &Suite) -> EvalConfig {
        let base = suite.path.parent().unwrap_or(Path::new("."));
        let abs = |p: &Path| {
            let joined = if p.is_absolute() { p.to_path_buf() } else { base.join(p) };
            std::fs::canonicalize(&joined).unwrap_or(joined)
        };
        let mut c = self.clone();
        c.scenarios = self.scenarios.iter().map(|s| abs(s)).collect();
        c.policies = self
            .policies
            .iter()
            .zip(&suite.policies)
            .map(|(name, src)| match src {
                PolicySource::Model { dir, trim, .. } => {
                    // Already resolved against the config's directory: joining it again broke
                    // every config given by a relative path (`moderato eval experiments/eval/…`).
                    let d = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.clone());
                    format!("{}{}", trim.prefix(), d.display())
                }
                _ if name.ends_with(".toml") && base.join(name).is_file() => {
                    abs(Path::new(name)).to_string_lossy().into_owned()
                }
                _ => name.clone(),
            })
            .collect();
        c
    }

    /// Validates and resolves everything against `path`'s directory.
    pub fn into_suite(mut self, path: &Path) -> Result<Suite> {
        let base = path.parent().unwrap_or(Path::new("."));
        let at = path.display();
        // The name becomes runs/eval-<name>-<time>: it must not leave runs/.
        check_name("name", &self.name).map_err(|m| anyhow::anyhow!("{at}: {m}"))?;
        if self.scenarios.is_empty() {
            bail!("{at}: `scenarios` is empty: list at least one scenario file");
        }
        for (k, n) in [
            ("scenarios", self.scenarios.len()),
            ("policies", self.policies.len()),
            ("seeds", self.seeds.len()),
        ] {
            if n > MAX_LIST {
                bail!("{at}: `{k}` has {n} entries: at most {MAX_LIST}; split the evaluation");
            }
        }
        if self.threads > MAX_LIST {
            bail!("{at}: threads = {}: at most {MAX_LIST} (0: one per core)", self.threads);
        }
        if self.policies.is_empty() {
            bail!("{at}: `policies` is empty: list baseline names or model directories");
        }
        if self.seeds.len() < 3 {
            bail!(
                "{at}: `seeds` has {} seed(s): give at least 3, results are intervals over seeds",
                self.seeds.len()
            );
        }
        let mut seeds = self.seeds.clone();
        seeds.sort_unstable();
        seeds.dedup();
        if seeds.len() != self.seeds.len() {
            bail!("{at}: `seeds` repeats a seed: {:?}", self.seeds);
        }
        if let Some(t) = &self.slo_p99_us {
            let list = t.list();
            if list.is_empty() || list.len() > MAX_SLO_TARGETS {
                bail!(
                    "{at}: `slo_p99_us` has {} targets: give 1 to {MAX_SLO_TARGETS} (e.g. slo_p99_us = [100, 200, 500])",
                    list.len()
                );
            }
            for &v in &list {
                if !(v.is_finite() && v > 0.0 && v <= 10_000_000.0) {
                    bail!("{at}: `slo_p99_us` = {v}: a p99 target in µs must be in (0, 10000000]");
                }
            }
            if list.iter().enumerate().any(|(i, a)| list[..i].contains(a)) {
                bail!("{at}: `slo_p99_us` repeats a target: {list:?}");
            }
            // The first target is the suite's own; a sweep derives the others with `at_slo`.
            self.sim.reward.slo_p99_us = list[0];
        }
        self.sim.validate().map_err(|m| anyhow::anyhow!("{at}: [sim] {m}"))?;
        self.gains().check().map_err(|m| {
            anyhow::anyhow!("{at}: {m}. Fix: correct the value, or remove the key to keep its default")
        })?;
        let scenarios = self
            .scenarios
            .iter()
            .map(|s| {
                let sc = Scenario::load(base.join(s))
                    .map_err(|e| anyhow::anyhow!("{at}: scenario {}: {e}", s.display()))?;
                let Some(p) = self.profile else { return Ok(sc) };
                sc.as_profile(p).map_err(|e| anyhow::anyhow!("{at}: scenario {} {e}", s.display()))
            })
            .collect::<Result<Vec<_>>>()?;
        let policies = self
            .policies
            .iter()
            .map(|p| -> Result<PolicySource> {
                let src =
                    resolve(p, base, &self.statics).map_err(|e| anyhow::anyhow!("{at}: policies: {e:#}"))?;
                src.check_bounds(&self.sim.action_space)
                    .map_err(|e| anyhow::anyhow!("{at}: policies: {e:#}"))?;
                Ok(src)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Suite { config: self, path: path.to_path_buf(), scenarios, policies })
    }
}

impl Suite {
    /// The SLO targets this suite evaluates at: `slo_p99_us`'s list, else `[sim.reward]`'s.
    pub fn slo_targets(&self) -> Vec<f64> {
        self.config.slo_p99_us.as_ref().map_or_else(|| vec![self.config.sim.reward.slo_p99_us], |t| t.list())
    }

    /// This suite at one SLO target (the reward, the violation count and best-static's search
    /// all use it).
    pub fn at_slo(&self, target: f64) -> Suite {
        let mut s = self.clone();
        s.config.sim.reward.slo_p99_us = target;
        s.config.slo_p99_us = Some(SloTargets::One(target));
        s
    }
}

/// One episode's results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub scenario: String,
    pub policy: String,
    pub seed: u64,
    pub cpu_us_per_packet: f64,
    pub nic_cpu_us_per_packet: f64,
    pub backend_cpu_us_per_packet: f64,
    pub frontend_cpu_us_per_packet: f64,
    pub stack_cpu_us_per_packet: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub mean_latency_us: f64,
    /// Share of control intervals whose p99 exceeded the SLO.
    pub slo_violation_rate: f64,
    pub drop_rate: f64,
    pub throughput_pps: f64,
    /// Mean reward per step.
    pub reward: f64,
}

impl Row {
    pub fn from_summary(scenario: &str, policy: &str, seed: u64, s: &EpisodeSummary, reward: f64) -> Row {
        let t = &s.totals;
        let per = |ns: u64| if t.completed == 0 { 0.0 } else { ns as f64 / 1000.0 / t.completed as f64 };
        Row {
            scenario: scenario.to_string(),
            policy: policy.to_string(),
            seed,
            cpu_us_per_packet: t.cpu_us_per_packet(),
            nic_cpu_us_per_packet: per(t.cpu.nic.total_ns()),
            backend_cpu_us_per_packet: per(t.cpu.backend.total_ns()),
            frontend_cpu_us_per_packet: per(t.cpu.frontend.total_ns()),
            stack_cpu_us_per_packet: per(t.cpu.stack.total_ns()),
            p50_us: s.latency.p50_us,
            p99_us: s.latency.p99_us,
            p999_us: s.latency.p999_us,
            mean_latency_us: s.latency.mean_us,
            slo_violation_rate: if s.intervals == 0 {
                0.0
            } else {
                s.slo_violations as f64 / s.intervals as f64
            },
            drop_rate: t.drop_fraction(),
            throughput_pps: t.throughput_pps(),
            reward,
        }
    }

    pub fn score(&self) -> Score {
        Score {
            cpu_us_per_packet: self.cpu_us_per_packet,
            slo_violation_rate: self.slo_violation_rate,
            drop_fraction: self.drop_rate,
        }
    }
}

/// Runs one episode of `policy` on `scenario` (adaptive modes run with `adaptive`) and
/// summarises it, leaving out the first `warmup_steps` intervals (run in addition to
/// `sim.episode_steps`).
pub fn run_episode(
    scenario: &Scenario,
    sim: &SimConfig,
    adaptive: &AdaptiveConfig,
    policy: &mut dyn Policy,
    seed: u64,
    warmup_steps: u32,
) -> Result<(EpisodeSummary, f64)> {
    let factory = Arc::new(AdaptiveFactory::new(*adaptive));
    let mut sim = sim.clone();
    sim.episode_steps = sim.episode_steps.saturating_add(warmup_steps);
    let mut env = SimEnv::new(scenario.clone(), sim, Some(factory))?;
    let (mut obs, _) = env.reset(seed)?;
    policy.reset();
    let (mut sum, mut n) = (0.0f64, 0u32);
    let mut step = 0u32;
    loop {
        if step == warmup_steps && warmup_steps > 0 {
            env.restart_summary();
        }
        step += 1;
        let action = policy.act(&obs);
        let st =
            env.step(&action).with_context(|| format!("policy {} on {}", policy.name(), scenario.name))?;
        if step <= warmup_steps {
            obs = st.obs;
            continue;
        }
        sum += f64::from(st.reward);
        n += 1;
        obs = st.obs;
        if st.terminated || st.truncated {
            break;
        }
    }
    let summary = env.episode_summary().context("the simulator keeps episode summaries")?;
    Ok((summary, sum / f64::from(n.max(1))))
}

/// Where best-static results are cached, and whether to use the cache.
#[derive(Debug, Clone)]
pub struct Cache {
    pub dir: Option<PathBuf>,
}

impl Cache {
    /// The file that holds best-static's search for this scenario, sim, seed and warm-up (`None`
    /// without a cache directory).
    pub fn path(
        &self,
        scenario: &Scenario,
        sim: &SimConfig,
        seed: u64,
        warmup_steps: u32,
    ) -> Option<PathBuf> {
        use sha2::{Digest, Sha256};
        let dir = self.dir.as_ref()?;
        let mut key = serde_json::json!({
            // 3: the NAPI engine (results of the pre-NAPI physics are not reused).
            "v": 3,
            "scenario": scenario,
            "sim": sim,
            "seed": seed,
            "grid": best_static::GRID,
            "passes": best_static::MAX_PASSES,
            "max_drop": best_static::MAX_DROP_FRACTION,
        });
        // A host that names its profile is also searched over deferral.
        if scenario.host.profile.is_some() {
            key["defer_grid"] = serde_json::to_value(best_static::DEFER_GRID).expect("plain data");
        }
        // Only when set, so that the searches cached before warm-ups existed stay valid.
        if warmup_steps > 0 {
            key["warmup_steps"] = warmup_steps.into();
        }
        let h = hex::encode(Sha256::digest(key.to_string().as_bytes()));
        Some(dir.join("best-static").join(format!("{}-{}.json", scenario.name, &h[..16])))
    }
}

/// The best fixed setting of `scenario` for `seed`, from the cache or a fresh search.
pub fn best_static(
    scenario: &Scenario,
    sim: &SimConfig,
    seed: u64,
    warmup_steps: u32,
    cache: &Cache,
) -> Result<Found> {
    let path = cache.path(scenario, sim, seed, warmup_steps);
    if let Some(p) = path.as_ref().filter(|p| p.exists()) {
        let text = std::fs::read_to_string(p)?;
        if let Ok(f) = serde_json::from_str::<Found>(&text) {
            return Ok(f);
        }
        // A corrupt cache entry is recomputed, not trusted.
    }
    // The driver presets and per-packet are candidates too: best-static is never worse than them.
    let vms = scenario.vms.len();
    let mut presets: Vec<_> =
        moderato_policies::baselines::PRESETS.iter().map(|p| p.2.settings(vms)).collect();
    presets.push(moderato_env::CoalescingSettings::per_packet(vms));
    let found = best_static::search(vms, scenario.host.profile, &presets, |s| -> Result<Score> {
        let mut p = moderato_policies::baselines::FixedPolicy::new("best-static", s.clone());
        let (summary, reward) =
            run_episode(scenario, sim, &AdaptiveConfig::default(), &mut p, seed, warmup_steps)?;
        Ok(Row::from_summary(&scenario.name, "best-static", seed, &summary, reward).score())
    })?;
    if let Some(p) = path {
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create cache dir {}", d.display()))?;
        }
        let tmp = p.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(&found)?)?;
        std::fs::rename(&tmp, &p)?;
    }
    Ok(found)
}

/// One unit of work.
#[derive(Debug, Clone)]
struct Job {
    scenario: usize,
    policy: usize,
    seed: u64,
}

/// Runs the whole suite on `threads` workers (0: one per core) with a progress bar; rows come
/// back in a fixed order (scenario, policy, seed), whatever the scheduling.
pub fn run_suite(suite: &Suite, cache: &Cache, progress: bool) -> Result<Vec<Row>> {
    let cfg = &suite.config;
    let mut jobs = Vec::new();
    for s in 0..suite.scenarios.len() {
        for p in 0..suite.policies.len() {
            for &seed in &cfg.seeds {
                jobs.push(Job { scenario: s, policy: p, seed });
            }
        }
    }
    // Longest first: best-static searches run ~100 episodes each. best-static-held-out last, so
    // that with a cache it reads the searches best-static has made instead of making them again.
    let mut order: Vec<usize> = (0..jobs.len()).collect();
    order.sort_by_key(|&i| match suite.policies[jobs[i].policy] {
        PolicySource::BestStatic => 0,
        PolicySource::BestStaticHeldOut => 2,
        _ => 1,
    });
    let threads = if cfg.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        cfg.threads
    };
    let bar = crate::progress::bar(jobs.len() as u64, "episodes", progress);
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<Row>>>> = Mutex::new((0..jobs.len()).map(|_| None).collect());
    std::thread::scope(|sc| {
        for _ in 0..threads.min(jobs.len()).max(1) {
            sc.spawn(|| {
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&i) = order.get(k) else { break };
                    let r = run_job(suite, &jobs[i], cache);
                    let failed = r.is_err();
                    results.lock().expect("no worker panics while holding the lock")[i] = Some(r);
                    bar.inc(1);
                    if failed {
                        // Let the other workers stop early too.
                        next.store(usize::MAX / 2, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    bar.finish_and_clear();
    let mut rows = Vec::with_capacity(jobs.len());
    for r in results.into_inner().expect("workers are done") {
        match r {
            Some(r) => rows.push(r?),
            None => bail!("evaluation stopped after an error"),
        }
    }
    Ok(rows)
}

fn run_job(suite: &Suite, job: &Job, cache: &Cache) -> Result<Row> {
    let sc = &suite.scenarios[job.scenario];
    let sim = &suite.config.sim;
    let source = &suite.policies[job.policy];
    let mut policy: Box<dyn Policy> = match source {
        PolicySource::BestStatic => {
            let f = best_static(sc, sim, job.seed, suite.config.warmup_steps, cache)?;
            Box::new(moderato_policies::baselines::FixedPolicy::new("best-static", f.settings))
        }
        PolicySource::BestStaticHeldOut => {
            let seeds = &suite.config.seeds;
            let at = seeds.iter().position(|&s| s == job.seed).expect("a job's seed is the suite's");
            let other = seeds[(at + 1) % seeds.len()];
            let f = best_static(sc, sim, other, suite.config.warmup_steps, cache)?;
            Box::new(moderato_policies::baselines::FixedPolicy::new(source.label(), f.settings))
        }
        other => other.instantiate_with(&sim.scenario_spec(sc), &suite.config.gains())?,
    };
    let (summary, reward) =
        run_episode(sc, sim, &suite.config.adaptive, policy.as_mut(), job.seed, suite.config.warmup_steps)?;
    Ok(Row::from_summary(&sc.name, &source.label(), job.seed, &summary, reward))
}
