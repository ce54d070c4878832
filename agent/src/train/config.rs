//! Experiment configs: everything a training run needs, in one TOML file.
//!
//! Every key has one doc line here and in `experiments/example.toml`; the config key, the CLI
//! override and the logged name are the same string (CleanRL's habit).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use moderato_env::sim::generator::GeneratorSpec;
use moderato_env::sim::limits::check_name;
use moderato_env::sim::{Scenario, SimConfig};
use moderato_policies::baselines::StaticSpec;
use moderato_policies::learned::NetConfig;
use serde::{Deserialize, Serialize};

/// A training experiment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    /// Names the run directory `runs/<name>-<time>`.
    pub name: String,
    /// Seeds every random draw of the run (environments, exploration, initial weights).
    #[serde(default = "d_seed")]
    pub seed: u64,
    /// Environment steps to train for, over all environments.
    pub total_timesteps: u64,
    /// Environments stepped in parallel.
    #[serde(default = "d_num_envs")]
    pub num_envs: usize,
    /// Steps per environment per rollout; a multiple of `sim.episode_steps`, so that episodes end
    /// exactly at rollout boundaries (which makes every checkpoint a clean resume point).
    #[serde(default = "d_num_steps")]
    pub num_steps: usize,
    /// Worker threads stepping environments (0: one per core).
    #[serde(default)]
    pub threads: usize,
    /// The scenarios episodes are drawn from, and how they are randomised.
    pub suite: SuiteConfig,
    /// The control loop: interval, episode length, reward weights and SLO, probes, action bounds.
    #[serde(default)]
    pub sim: SimConfig,
    #[serde(default)]
    pub ppo: PpoConfig,
    #[serde(default)]
    pub network: NetConfig,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    #[serde(default)]
    pub evaluation: FinalEvalConfig,
    /// A validation suite the training never samples, evaluated while training; the exported
    /// model is the best validation checkpoint. Absent: none (the final model is exported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation: Option<ValidationConfig>,
}

/// `[validation]`: every `every_iterations`, the current actor runs on these scenarios (never
/// sampled by training) against best-static (searched once per scenario and seed, then cached in
/// `<run>/cache`); `validation/cpu_vs_best_static`, `validation/slo_violation_rate` and
/// `validation/score` go to TensorBoard, and the actor with the lowest score (from
/// `from_iteration` on) is kept in `<run>/model-best` and exported as `<run>/model`, with its
/// validation table in `model.json`.
/// Score: mean CPU ÷ best-static's, plus 10 × the mean excess of SLO-violating intervals over
/// best-static's beyond 1 point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidationConfig {
    /// Scenario files, relative to the experiment file (e.g. `scenarios/validation/*.toml`).
    pub scenarios: Vec<PathBuf>,
    /// Evaluate every this many iterations (and after the last).
    #[serde(default = "d_validation_every")]
    pub every_iterations: u64,
    /// Episode seeds of each scenario.
    #[serde(default = "d_validation_seeds")]
    pub seeds: Vec<u64>,
    /// Runs every validation scenario as a host of this profile (its backend made the
    /// profile's), for a model trained on that profile; absent: each scenario's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<moderato_env::HostProfile>,
    /// Only validations at or after this iteration can become the exported model (earlier ones
    /// are still run and logged). 0 (the default): every validation is a candidate. For recipes
    /// whose exploration is scheduled (`ppo.log_std_anneal_to`), where early checkpoints are
    /// validated while their noise is still wide.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub from_iteration: u64,
}

fn is_zero(x: &u64) -> bool {
    *x == 0
}

fn d_validation_every() -> u64 {
    20
}
fn d_validation_seeds() -> Vec<u64> {
    vec![1001]
}

fn d_seed() -> u64 {
    1
}
fn d_num_envs() -> usize {
    8
}
fn d_num_steps() -> usize {
    128
}

/// Upper bounds: environment steps of one run (10^10 is about a month of this 2-core machine),
/// steps per environment per rollout and samples per rollout (each sample holds a few KB).
pub const MAX_TIMESTEPS: u64 = 10_000_000_000;
pub const MAX_NUM_STEPS: u64 = 100_000;
pub const MAX_BATCH: u64 = 4_000_000;

/// Domain randomisation: each episode draws a scenario and perturbs it, or draws a whole host
/// from the generator, so that the policy generalises rather than memorises.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SuiteConfig {
    /// Scenario files, relative to the experiment file: drawn for the episodes the generator does
    /// not draw, and the suite of the final evaluation.
    #[serde(default)]
    pub scenarios: Vec<PathBuf>,
    /// Relative sampling weights, one per scenario (default: uniform).
    #[serde(default)]
    pub weights: Vec<f64>,
    /// Each flow's arrival rate is multiplied by a log-uniform factor in this range.
    #[serde(default = "d_rate_scale")]
    pub rate_scale: [f64; 2],
    /// Every CPU cost of the host is multiplied by one log-uniform factor in this range.
    #[serde(default = "d_cost_scale")]
    pub cost_scale: [f64; 2],
    /// Draw whole hosts from this generator (`moderato_env::sim::generator`); `rate_scale` and
    /// `cost_scale` do not apply to them (the generator draws its own rates and costs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generator: Option<GeneratorSpec>,
    /// Share of episodes drawn from the generator (default 1.0 when there is one); the rest draw
    /// from `scenarios`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generator_share: Option<f64>,
    /// Each latency-sensitive VM of a listed scenario that sets no target of its own is held, per
    /// episode, to a p99 target drawn log-uniform from this range (µs); absent: the experiment's
    /// `[sim.reward] slo_p99_us`. (Generated hosts draw their own, from the generator's
    /// `slo_p99_us`.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slo_p99_us: Option<[f64; 2]>,
    /// Each episode on a listed scenario runs it as a host of one of these profiles, drawn
    /// uniformly (its backend made the profile's); empty (the default): each scenario's own.
    /// (Generated hosts draw theirs from the generator's `profiles`.)
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub profiles: Vec<moderato_env::HostProfile>,
}

impl SuiteConfig {
    /// The share of episodes the generator draws (0 without one).
    pub fn generator_share(&self) -> f64 {
        if self.generator.is_some() { self.generator_share.unwrap_or(1.0) } else { 0.0 }
    }
}

fn d_rate_scale() -> [f64; 2] {
    [0.7, 1.3]
}
fn d_cost_scale() -> [f64; 2] {
    [0.85, 1.15]
}

/// PPO hyperparameters (names as in CleanRL's `ppo_continuous_action.py`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PpoConfig {
    /// Adam learning rate.
    pub learning_rate: f64,
    /// Anneal the learning rate linearly to 0 over the run.
    pub anneal_lr: bool,
    /// Discount factor.
    pub gamma: f64,
    /// GAE λ.
    pub gae_lambda: f64,
    /// Minibatches per epoch.
    pub num_minibatches: usize,
    /// Epochs over each rollout.
    pub update_epochs: usize,
    /// Normalise advantages per minibatch.
    pub norm_adv: bool,
    /// Surrogate clipping coefficient.
    pub clip_coef: f64,
    /// Clip the value loss around the old values.
    pub clip_vloss: bool,
    /// Entropy bonus coefficient.
    pub ent_coef: f64,
    /// Value loss coefficient.
    pub vf_coef: f64,
    /// Global gradient-norm clip.
    pub max_grad_norm: f64,
    /// Stop an update's epochs early when the approximate KL exceeds this (none: never).
    pub target_kl: Option<f64>,
    /// When set, the policy's log standard deviations are not learned: they fall linearly from
    /// `network.init_log_std` at the first iteration to this value at the end of the run, so
    /// exploration narrows as training ends (the deterministic policy that is deployed is then
    /// the one trained, not a mean kept away from the SLO by its noise). None: learned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_std_anneal_to: Option<f64>,
    /// Scale rewards by a running estimate of the discounted return's standard deviation.
    pub norm_reward: bool,
    /// How the SLO enters training: `"penalty"` (the reward's latency term, `[sim.reward]
    /// w_lat`) or `"lagrangian"` (PPO-Lagrangian: the reward without its latency term, and the
    /// share of SLO-violating intervals held under `[ppo.lagrangian] cost_budget` by a learned
    /// multiplier).
    pub constraint: Constraint,
    /// The multiplier's update (only with `constraint = "lagrangian"`).
    pub lagrangian: LagrangianConfig,
}

/// How the latency objective enters training.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Constraint {
    /// A hand-weighted penalty in the reward (the recipe of `models/default`).
    #[default]
    Penalty,
    /// A constraint with a multiplier learned by (PID) dual ascent.
    Lagrangian,
}

/// The PID Lagrangian of Stooke, Achiam & Abbeel (2020): with `e = J_c − budget` the
/// iteration's mean cost over budget, `I ← max(0, I + e)` and
/// `λ = max(0, kp·e + ki·I + kd·max(0, J_c − J_c,prev))`. With `kp = kd = 0` it is plain dual
/// ascent on λ with step `ki` (Ray, Achiam & Amodei 2019).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LagrangianConfig {
    /// Most share of SLO-violating intervals the policy may have (rollout mean).
    pub cost_budget: f64,
    pub kp: f64,
    pub ki: f64,
    pub kd: f64,
}

impl Default for LagrangianConfig {
    fn default() -> Self {
        LagrangianConfig { cost_budget: 0.01, kp: 0.0, ki: 1.0, kd: 0.0 }
    }
}

impl Default for PpoConfig {
    fn default() -> Self {
        PpoConfig {
            learning_rate: 3e-4,
            anneal_lr: true,
            gamma: 0.99,
            gae_lambda: 0.95,
            num_minibatches: 4,
            update_epochs: 10,
            norm_adv: true,
            clip_coef: 0.2,
            clip_vloss: true,
            ent_coef: 0.0,
            vf_coef: 0.5,
            max_grad_norm: 0.5,
            target_kl: None,
            log_std_anneal_to: None,
            norm_reward: true,
            constraint: Constraint::Penalty,
            lagrangian: LagrangianConfig::default(),
        }
    }
}

/// Checkpoint cadence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Write a checkpoint every this many iterations (rollout + update); the last one is always
    /// written.
    pub every_iterations: u64,
    /// Keep this many most recent checkpoints (0: all).
    pub keep: usize,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig { every_iterations: 10, keep: 3 }
    }
}

/// The evaluation that ends a run: the frozen model against baselines on the suite.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinalEvalConfig {
    /// Run it at all.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Baselines to compare with (the model is added).
    #[serde(default = "d_eval_policies")]
    pub policies: Vec<String>,
    /// At least three seeds.
    #[serde(default = "d_eval_seeds")]
    pub seeds: Vec<u64>,
    /// Named static knob sets, usable as `static:<name>`.
    #[serde(default, rename = "static")]
    pub statics: BTreeMap<String, StaticSpec>,
}

fn yes() -> bool {
    true
}
fn d_eval_policies() -> Vec<String> {
    ["per-packet", "static:mlx5", "static:moderate", "dim", "itr", "best-static"].map(String::from).to_vec()
}
fn d_eval_seeds() -> Vec<u64> {
    vec![101, 102, 103]
}

impl Default for FinalEvalConfig {
    fn default() -> Self {
        FinalEvalConfig {
            enabled: true,
            policies: d_eval_policies(),
            seeds: d_eval_seeds(),
            statics: BTreeMap::new(),
        }
    }
}

/// A config with its scenarios loaded.
#[derive(Debug, Clone)]
pub struct Experiment {
    pub config: ExperimentConfig,
    /// The file it came from (relative paths resolve against its directory).
    pub path: PathBuf,
    pub scenarios: Vec<Scenario>,
    /// `[validation]`'s scenarios, loaded (empty without it).
    pub validation: Vec<Scenario>,
    /// The resolved config as TOML, as written into the run and the model.
    pub toml: String,
}

impl Experiment {
    /// The range of p99 targets (µs) a VM of a training episode can be held to: the generator's
    /// `slo_p99_us` (when it draws episodes), the suite's `slo_p99_us` (or, without one,
    /// `[sim.reward] slo_p99_us`) and every `[[vm]] slo_p99_us` of the listed scenarios (when
    /// they are drawn). `None` when no training VM has a target.
    pub fn slo_range_us(&self) -> Option<[f64; 2]> {
        let suite = &self.config.suite;
        let mut r: Option<[f64; 2]> = None;
        let mut add = |lo: f64, hi: f64| {
            r = Some(r.map_or([lo, hi], |[a, b]| [a.min(lo), b.max(hi)]));
        };
        if let Some(g) =
            suite.generator.as_ref().filter(|g| suite.generator_share() > 0.0 && g.p_objective > 0.0)
        {
            add(g.slo_p99_us[0], g.slo_p99_us[1]);
        }
        if suite.generator_share() < 1.0 {
            let default = self.config.sim.reward.slo_p99_us;
            for vm in self.scenarios.iter().flat_map(|s| &s.vms) {
                match (vm.holds_run_slo(), suite.slo_p99_us, vm.target_us(default)) {
                    // Drawn per episode from the suite's range.
                    (true, Some([lo, hi]), _) => add(lo, hi),
                    (_, _, Some(t)) => add(t, t),
                    _ => {}
                }
            }
        }
        r
    }

    /// The host profiles a training episode can run on: the generator's (when it draws
    /// episodes; a host whose backend none of them runs has no profile, i.e. `kvm-notf-coal`) and
    /// the suite's `profiles` (or the listed scenarios' own). Sorted, without repeats.
    pub fn profiles(&self) -> Vec<moderato_env::HostProfile> {
        let suite = &self.config.suite;
        let mut out = Vec::new();
        if let Some(g) = suite.generator.as_ref().filter(|_| suite.generator_share() > 0.0) {
            for b in &g.backends {
                let of = g.profiles_of(*b);
                if of.is_empty() {
                    out.push(moderato_env::HostProfile::default());
                }
                out.extend(of);
            }
        }
        if suite.generator_share() < 1.0 {
            if suite.profiles.is_empty() {
                out.extend(self.scenarios.iter().map(|s| s.profile()));
            } else {
                out.extend(suite.profiles.iter().copied());
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// The most VMs an episode's host can have: the suite's scenarios and the generator's range.
    /// (The trainer pads every batch row to it.)
    pub fn max_vms(&self) -> usize {
        let suite = &self.config.suite;
        let listed = self.scenarios.iter().map(|s| s.vms.len()).max().unwrap_or(1);
        match &suite.generator {
            Some(g) if suite.generator_share() > 0.0 => listed.max(g.vms[1]),
            _ => listed,
        }
    }
}

impl ExperimentConfig {
    pub fn load(path: &Path) -> Result<Experiment> {
        let text = moderato_env::sim::limits::read_config(path)
            .with_context(|| format!("cannot read experiment {}", path.display()))?;
        Self::parse(&text, path)
    }

    /// Parses and validates; `path` names the file in errors and anchors relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Experiment> {
        let config: ExperimentConfig = toml::from_str(text).map_err(|e| {
            anyhow::anyhow!(
                "{}: {}\n(every key is documented in experiments/example.toml)",
                path.display(),
                e
            )
        })?;
        config.validate(path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let scenarios = config
            .suite
            .scenarios
            .iter()
            .map(|s| {
                Scenario::load(base.join(s))
                    .map_err(|e| anyhow::anyhow!("{}: suite.scenarios: {}: {e}", path.display(), s.display()))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut validation = Vec::new();
        if let Some(v) = &config.validation {
            if v.scenarios.is_empty() || v.scenarios.len() > 1024 {
                bail!(
                    "{}: validation.scenarios: give 1 to 1024 scenario files (or remove [validation])",
                    path.display()
                );
            }
            if v.every_iterations == 0 {
                bail!("{}: validation.every_iterations = 0: use at least 1", path.display());
            }
            if v.seeds.is_empty() || v.seeds.len() > 64 {
                bail!("{}: validation.seeds: give 1 to 64 seeds", path.display());
            }
            if v.from_iteration > config.iterations() {
                bail!(
                    "{}: validation.from_iteration = {} is after the run's last iteration ({}): no validation could be exported; lower it, or 0 for all",
                    path.display(),
                    v.from_iteration,
                    config.iterations()
                );
            }
            for s in &v.scenarios {
                let sc = Scenario::load(base.join(s)).map_err(|e| {
                    anyhow::anyhow!("{}: validation.scenarios: {}: {e}", path.display(), s.display())
                })?;
                let sc = match v.profile {
                    Some(p) => sc.as_profile(p).map_err(|e| {
                        anyhow::anyhow!("{}: validation.scenarios: {} {e}", path.display(), s.display())
                    })?,
                    None => sc,
                };
                if scenarios.iter().any(|t| t == &sc) {
                    bail!(
                        "{}: validation.scenarios: {} is also in suite.scenarios; a validation scenario must be one training never samples",
                        path.display(),
                        s.display()
                    );
                }
                validation.push(sc);
            }
        }
        let toml = toml::to_string(&config)?;
        Ok(Experiment { config, path: path.to_path_buf(), scenarios, validation, toml })
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let at = path.display();
        let c = self;
        check_name("name", &c.name).map_err(|m| anyhow::anyhow!("{at}: {m}"))?;
        if c.total_timesteps == 0 {
            bail!("{at}: total_timesteps = 0: train for at least one step");
        }
        c.check_bounds().map_err(|m| anyhow::anyhow!("{at}: {m}"))?;
        if c.num_envs == 0 || c.num_envs > 1024 {
            bail!("{at}: num_envs = {}: use 1..=1024", c.num_envs);
        }
        c.sim.validate().map_err(|m| anyhow::anyhow!("{at}: [sim] {m}"))?;
        let ep = c.sim.episode_steps as usize;
        if c.num_steps == 0 || !c.num_steps.is_multiple_of(ep) {
            bail!(
                "{at}: num_steps = {} must be a positive multiple of sim.episode_steps = {ep}, so that \
                 episodes end at rollout boundaries",
                c.num_steps
            );
        }
        let batch = c.num_envs * c.num_steps;
        if c.ppo.num_minibatches == 0 || !batch.is_multiple_of(c.ppo.num_minibatches) {
            bail!(
                "{at}: ppo.num_minibatches = {} must divide num_envs × num_steps = {batch}",
                c.ppo.num_minibatches
            );
        }
        let p = &c.ppo;
        for (k, v, lo, hi) in [
            ("ppo.learning_rate", p.learning_rate, 0.0, 1.0),
            ("ppo.gamma", p.gamma, 0.0, 1.0),
            ("ppo.gae_lambda", p.gae_lambda, 0.0, 1.0),
            ("ppo.clip_coef", p.clip_coef, 0.0, 10.0),
            ("ppo.ent_coef", p.ent_coef, 0.0, 10.0),
            ("ppo.vf_coef", p.vf_coef, 0.0, 100.0),
            ("ppo.max_grad_norm", p.max_grad_norm, 0.0, 1e6),
            ("ppo.lagrangian.cost_budget", p.lagrangian.cost_budget, 0.0, 1.0),
            ("ppo.lagrangian.kp", p.lagrangian.kp, 0.0, 1e6),
            ("ppo.lagrangian.ki", p.lagrangian.ki, 0.0, 1e6),
            ("ppo.lagrangian.kd", p.lagrangian.kd, 0.0, 1e6),
        ] {
            if !(v.is_finite() && v >= lo && v <= hi) || (k == "ppo.learning_rate" && v == 0.0) {
                bail!("{at}: {k} = {v}: use a value in ({lo}, {hi}]");
            }
        }
        if p.update_epochs == 0 {
            bail!("{at}: ppo.update_epochs = 0: use at least 1");
        }
        if let Some(v) = p.log_std_anneal_to
            && !(v.is_finite() && (-5.0..=2.0).contains(&v))
        {
            bail!("{at}: ppo.log_std_anneal_to = {v}: use a value in [-5, 2] (a log standard deviation)");
        }
        c.network.validate().map_err(|m| anyhow::anyhow!("{at}: {m}"))?;
        c.network.validate_for(&c.sim.action_space).map_err(|m| anyhow::anyhow!("{at}: {m}"))?;
        let s = &c.suite;
        if let Some(g) = &s.generator {
            g.validate().map_err(|m| anyhow::anyhow!("{at}: suite.generator.{m}"))?;
        }
        match (s.generator.is_some(), s.generator_share) {
            (false, Some(_)) => {
                bail!(
                    "{at}: suite.generator_share is set but there is no [suite.generator]: add one, or drop the key"
                )
            }
            (true, Some(p)) if !(0.0..=1.0).contains(&p) => {
                bail!("{at}: suite.generator_share = {p}: a share of episodes in [0, 1]")
            }
            _ => {}
        }
        if s.scenarios.is_empty() {
            if s.generator.is_none() {
                bail!(
                    "{at}: suite.scenarios is empty: list at least one scenario file, or add a [suite.generator]"
                );
            }
            if s.generator_share() < 1.0 {
                bail!(
                    "{at}: suite.generator_share = {} leaves episodes to suite.scenarios, which is empty: list \
                     scenario files or set generator_share = 1.0",
                    s.generator_share()
                );
            }
            if c.evaluation.enabled {
                bail!(
                    "{at}: suite.scenarios is empty, but the final evaluation runs on it: list scenario files \
                     (e.g. the standard seven), or set evaluation.enabled = false"
                );
            }
        }
        if !s.weights.is_empty()
            && (s.weights.len() != s.scenarios.len()
                || s.weights.iter().any(|w| !(w.is_finite() && *w >= 0.0)))
        {
            bail!(
                "{at}: suite.weights must have one non-negative weight per scenario ({} scenarios, {} weights)",
                s.scenarios.len(),
                s.weights.len()
            );
        }
        if !s.weights.is_empty() && s.weights.iter().sum::<f64>() <= 0.0 {
            bail!("{at}: suite.weights sum to 0: give some scenario a positive weight");
        }
        for (k, r) in [("suite.rate_scale", s.rate_scale), ("suite.cost_scale", s.cost_scale)] {
            if !(r[0] > 0.0 && r[0] <= r[1] && r[1].is_finite()) {
                bail!("{at}: {k} = {r:?}: a range [low, high] with 0 < low <= high");
            }
        }
        if let Some(r) = s.slo_p99_us
            && !(r[0] >= 1.0 && r[0] <= r[1] && r[1] <= moderato_env::sim::limits::MAX_SLO_US)
        {
            bail!(
                "{at}: suite.slo_p99_us = {r:?}: a range [low, high] of p99 targets in µs with 1 <= low <= high <= 1e7"
            );
        }
        if c.checkpoint.every_iterations == 0 {
            bail!("{at}: checkpoint.every_iterations = 0: use at least 1");
        }
        if c.evaluation.enabled && c.evaluation.seeds.len() < 3 {
            bail!("{at}: evaluation.seeds has {} seed(s): give at least 3", c.evaluation.seeds.len());
        }
        Ok(())
    }

    /// Upper bounds on the numeric keys the sense checks leave open: what fits in memory and ends.
    fn check_bounds(&self) -> std::result::Result<(), String> {
        let c = self;
        let over = |k: &str, v: u64, max: u64, fix: &str| -> std::result::Result<(), String> {
            if v > max { Err(format!("{k} = {v}: at most {max}; {fix}")) } else { Ok(()) }
        };
        over("total_timesteps", c.total_timesteps, MAX_TIMESTEPS, "split the run, or resume it")?;
        over("num_steps", c.num_steps as u64, MAX_NUM_STEPS, "use more environments")?;
        let batch = c.num_envs as u64 * c.num_steps as u64;
        over("num_envs × num_steps", batch, MAX_BATCH, "the rollout must fit in memory")?;
        over("threads", c.threads as u64, 1024, "0 means one per core")?;
        over("ppo.num_minibatches", c.ppo.num_minibatches as u64, batch, "at most one per sample")?;
        over("ppo.update_epochs", c.ppo.update_epochs as u64, 1000, "PPO uses 3 to 30")?;
        if let Some(kl) = c.ppo.target_kl
            && !(kl.is_finite() && kl > 0.0 && kl <= 100.0)
        {
            return Err(format!("ppo.target_kl = {kl}: use a value in (0, 100], or leave it out"));
        }
        over("checkpoint.every_iterations", c.checkpoint.every_iterations, 1 << 32, "checkpoint more often")?;
        over("checkpoint.keep", c.checkpoint.keep as u64, 1 << 20, "0 keeps all")?;
        over("network.hidden (layers)", c.network.hidden.len() as u64, 16, "use fewer layers")?;
        for (k, r) in [("suite.rate_scale", c.suite.rate_scale), ("suite.cost_scale", c.suite.cost_scale)] {
            if !(r[0] >= 1e-3 && r[1] <= 100.0) {
                return Err(format!("{k} = {r:?}: keep the range within [0.001, 100]"));
            }
        }
        if c.suite.scenarios.len() > 1024
            || c.evaluation.seeds.len() > 1024
            || c.evaluation.policies.len() > 1024
        {
            return Err("suite.scenarios, evaluation.seeds and evaluation.policies: at most 1024 each".into());
        }
        Ok(())
    }

    /// Iterations (rollout + update) of the run.
    pub fn iterations(&self) -> u64 {
        self.total_timesteps.div_ceil((self.num_envs * self.num_steps) as u64)
    }
}
