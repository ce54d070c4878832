//! `moderato train` and `moderato export`: PPO from an experiment config to a frozen model.
//!
//! A run writes `runs/<name>-<time>/`:
//! - `config.toml`: the resolved experiment;
//! - `tb/`: TensorBoard event files (`charts/*`, `losses/*`, and `perf/*`: where each iteration's
//!   time went, in milliseconds per phase; the same totals end the run's output);
//! - `checkpoints/iter-NNNNNN/`: model, optimiser and trainer state, every
//!   `checkpoint.every_iterations` and at the end (written to a temporary directory and renamed, so
//!   a kill never leaves a half checkpoint);
//! - `model/`: the frozen model;
//! - `eval/`: the evaluation of the model against the baselines on the suite.
//!
//! `--resume <run-dir>` continues from the newest checkpoint; since every iteration is a pure
//! function of the checkpointed state and `(seed, iteration)`, nothing is lost.

mod adam;
pub mod config;
pub mod metrics;
pub mod ppo;
mod randomize;
pub mod validate;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::tensor::Device;
use clap::Args;
use moderato_policies::learned::{Actor, FeatureNames, LearnedPolicy, ModelMeta, Probes, Provenance};

pub use adam::{AdamSettings, HostAdam};
pub use config::{Experiment, ExperimentConfig};
pub use ppo::{IterationStats, Model, Perf, TrainState, Trainer};

use crate::eval;
use metrics::{Metrics, TensorBoard};

/// What `moderato train` was asked to do (the command line is in `main.rs`).
#[derive(Debug, Clone)]
pub struct TrainArgs {
    /// Experiment config (see experiments/example.toml).
    pub experiment: PathBuf,
    /// Continue the run in this directory from its newest checkpoint.
    pub resume: Option<PathBuf>,
    /// Run directory for a new run (default: `runs/<name>-<time>`).
    pub out: Option<PathBuf>,
    /// Start over in an existing `out`, deleting what an earlier run wrote there.
    pub force: bool,
    /// Stop after this many iterations of this invocation (with a checkpoint to resume from).
    pub max_iterations: Option<u64>,
    /// Skip the final evaluation against baselines.
    pub no_eval: bool,
    /// Overrides the experiment's `seed`.
    pub seed: Option<u64>,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// A checkpoint directory (runs/<run>/checkpoints/iter-NNNNNN), or a frozen model directory:
    /// then its model.json is checked and sealed (provenance.semantics_sha256 added) into
    /// `model_dir`, which may be the same directory.
    pub checkpoint: PathBuf,
    /// Where to write the frozen model; refused if it holds files, unless --force.
    pub model_dir: PathBuf,
    /// Overwrite the model in an existing MODEL_DIR.
    #[arg(long)]
    pub force: bool,
}

/// The autodiff device every trainer uses: burn's CPU `flex` backend.
pub fn train_device() -> Device {
    Device::flex().autodiff()
}

const CHECKPOINTS: &str = "checkpoints";

/// Checkpoint directories of a run, oldest first.
pub fn checkpoints(run: &Path) -> Result<Vec<PathBuf>> {
    let dir = run.join(CHECKPOINTS);
    let mut v: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("iter-")))
            .filter(|p| p.join("state.json").exists())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
    };
    v.sort();
    Ok(v)
}

fn write_checkpoint(t: &Trainer, run: &Path, keep: usize) -> Result<PathBuf> {
    let dir = run.join(CHECKPOINTS);
    let name = format!("iter-{:06}", t.state.iteration);
    let tmp = dir.join(format!(".tmp-{name}"));
    let fin = dir.join(&name);
    let _ = std::fs::remove_dir_all(&tmp);
    t.save_checkpoint(&tmp)?;
    if fin.exists() {
        std::fs::remove_dir_all(&fin).with_context(|| format!("cannot replace {}", fin.display()))?;
    }
    std::fs::rename(&tmp, &fin).with_context(|| format!("cannot move checkpoint to {}", fin.display()))?;
    if keep > 0 {
        let all = checkpoints(run)?;
        for old in all.iter().take(all.len().saturating_sub(keep)) {
            let _ = std::fs::remove_dir_all(old);
        }
    }
    Ok(fin)
}

/// `git describe --always --dirty` of the source this binary was built from, or "unknown".
fn source_revision() -> String {
    env!("MODERATO_SOURCE_REVISION").to_string()
}

/// The frozen-model metadata of a trained actor.
pub fn model_meta(exp_name: &str, toml: &str, cfg: &ExperimentConfig, state: &TrainState) -> ModelMeta {
    use sha2::{Digest, Sha256};
    ModelMeta {
        format_version: moderato_policies::learned::FORMAT_VERSION,
        features: FeatureNames::current(),
        normalizer: state.normalizer.clone(),
        action_space: cfg.sim.action_space.clone(),
        network: cfg.network.clone(),
        interval_us: cfg.sim.interval_us,
        probes: Probes { host: cfg.sim.probe.host(), guest: cfg.sim.probe.guest() },
        slo_range_us: state.slo_range_us,
        profiles: state.profiles.clone(),
        provenance: Provenance {
            experiment: exp_name.to_string(),
            config_toml: toml.to_string(),
            config_sha256: hex::encode(Sha256::digest(toml.as_bytes())),
            source_revision: source_revision(),
            seed: cfg.seed,
            timesteps: state.global_step,
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            evaluation: None,
            validation: None,
            weights_sha256: String::new(),
            semantics_sha256: None,
        },
    }
}

/// Freezes the trainer's actor into `dir`.
pub fn freeze(t: &Trainer, dir: &Path) -> Result<ModelMeta> {
    let actor: Actor = t.model.actor.clone().valid();
    let meta = model_meta(&t.exp.config.name, &t.exp.toml, &t.exp.config, &t.state);
    Ok(LearnedPolicy::save(dir, actor, meta)?)
}

/// What a run directory holds that a new run would overwrite (`--force` removes these only).
const RUN_OUTPUTS: &[&str] = &["checkpoints", "model", "model-best", "cache", "eval", "tb", "config.toml"];

/// Whether `dir` exists and holds anything.
fn non_empty_dir(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut rd| rd.next().is_some())
}

/// Makes `run` ready for a new run: refused if it holds anything, unless `force`, which removes
/// what an earlier run wrote there (and nothing else).
fn prepare_new_run(run: &Path, force: bool) -> Result<()> {
    if run.exists() && !run.is_dir() {
        bail!("--out {}: exists and is not a directory; choose another --out", run.display());
    }
    if non_empty_dir(run) {
        if !force {
            let resume = if checkpoints(run)?.is_empty() {
                String::new()
            } else {
                format!("continue it with --resume {}, ", run.display())
            };
            bail!(
                "--out {0}: already exists and is not empty; {resume}start over there with --out {0} --force \
                 (deletes its {1}), or choose another --out",
                run.display(),
                RUN_OUTPUTS.join(", ")
            );
        }
        for name in RUN_OUTPUTS {
            let p = run.join(name);
            let r = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
            match r {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("--force: cannot remove {}", p.display())),
            }
        }
        tracing::warn!("--force: removed the earlier run's outputs in {}", run.display());
    }
    std::fs::create_dir_all(run).with_context(|| format!("cannot create {}", run.display()))
}

/// Trains (or resumes) as the arguments say, then freezes and evaluates.
pub fn run(args: TrainArgs) -> Result<()> {
    let mut exp = ExperimentConfig::load(&args.experiment)?;
    if let Some(seed) = args.seed {
        exp.config.seed = seed;
        exp.toml = toml::to_string(&exp.config)?;
    }
    let device = train_device();
    let (mut trainer, run) = match &args.resume {
        Some(run) => {
            let Some(last) = checkpoints(run)?.pop() else {
                bail!("{}: no checkpoint to resume from (expected {}/iter-*/)", run.display(), CHECKPOINTS);
            };
            tracing::info!("run directory: {} (resuming from {})", run.display(), last.display());
            // Padded to the suite's largest host, the generator's included.
            let (vmax, envs) = (exp.max_vms(), ppo::suite_envs(&exp, None));
            let exp_toml = exp.toml.clone();
            let t = Trainer::load_checkpoint_with_envs(exp, &last, device, envs, vmax)?;
            // The run's config is the one it now trains to (a larger total_timesteps extends it).
            std::fs::write(run.join("config.toml"), exp_toml)?;
            (t, run.clone())
        }
        None => {
            let run = args.out.clone().unwrap_or_else(|| {
                PathBuf::from("runs").join(format!("{}-{}", exp.config.name, crate::timestamp()))
            });
            prepare_new_run(&run, args.force)?;
            std::fs::write(run.join("config.toml"), &exp.toml)?;
            tracing::info!(
                "run directory: {} ({} iterations; watch it with: tensorboard --logdir {})",
                run.display(),
                exp.config.iterations(),
                run.join("tb").display()
            );
            let (vmax, envs) = (exp.max_vms(), ppo::suite_envs(&exp, None));
            (Trainer::with_envs(exp, device, envs, vmax), run)
        }
    };
    let mut tb = TensorBoard::new(&run.join("tb"));
    let finished = train_loop(&mut trainer, &run, &mut tb, args.max_iterations, true)?;
    tb.flush();
    if !finished {
        tracing::info!("{}", trainer.perf.summary().trim_end());
        tracing::info!(
            "stopped after iteration {} of {} (checkpoint written); continue with: moderato train {} --resume {}",
            trainer.state.iteration,
            trainer.exp.config.iterations(),
            args.experiment.display(),
            run.display()
        );
        return Ok(());
    }
    let model_dir = run.join("model");
    freeze(&trainer, &model_dir)?;
    if let Some(best) = validate::export_best(&trainer, &run, &model_dir)? {
        tracing::info!(
            "frozen model: {} (the best validation: iteration {})",
            model_dir.display(),
            best.iteration
        );
    } else {
        tracing::info!("frozen model: {}", model_dir.display());
    }
    let evaluated = trainer.exp.config.evaluation.enabled && !args.no_eval;
    if evaluated {
        let t0 = std::time::Instant::now();
        final_eval(&trainer, &run, &model_dir)?;
        let secs = t0.elapsed().as_secs_f64();
        trainer.perf.evaluation += secs;
        tb.perf("perf/evaluation_s", secs, trainer.state.global_step);
        tb.flush();
    }
    tracing::info!("{}", trainer.perf.summary().trim_end());
    tracing::info!("{}", next_steps(&run, &model_dir, evaluated, &trainer.state.profiles));
    Ok(())
}

/// What to run after a finished training run (`profiles`: those the model was trained for; the
/// simulate line runs `rr-latency`, a `kvm-notf-coal` host, as one of them where that is not one).
fn next_steps(run: &Path, model: &Path, evaluated: bool, profiles: &[moderato_env::HostProfile]) -> String {
    let (run, model) = (run.display(), model.display());
    let mut s =
        format!("done. Next:\n  tensorboard --logdir {run}/tb                 # the training curves\n");
    if evaluated {
        s.push_str(&format!(
            "  less {run}/eval/report.md                     # the evaluation against the baselines\n"
        ));
        s.push_str(&format!("  moderato eval {run}/eval/config.toml        # re-run that evaluation\n"));
    }
    let own = moderato_env::HostProfile::KvmNotfCoal;
    let profile = match profiles.first() {
        Some(p) if !profiles.contains(&own) => format!(" --profile {p}"),
        _ => String::new(),
    };
    s.push_str(&format!(
        "  moderato simulate experiments/scenarios/rr-latency.toml{profile} --policy {model} --knobs   # watch it interval by interval\n"
    ));
    s.push_str(&format!(
        "  moderato deploy experiments/deploy/guest.toml --role guest --policy {model} --dry-run --steps 10"
    ));
    s
}

/// Iterates until the experiment's iterations are done (or `max_iterations` more), writing
/// checkpoints; returns whether training finished.
pub fn train_loop(
    trainer: &mut Trainer,
    run: &Path,
    metrics: &mut dyn Metrics,
    max_iterations: Option<u64>,
    progress: bool,
) -> Result<bool> {
    let total = trainer.exp.config.iterations();
    let every = trainer.exp.config.checkpoint.every_iterations;
    let keep = trainer.exp.config.checkpoint.keep;
    let bar = crate::progress::bar(total, "iterations", progress);
    bar.set_position(trainer.state.iteration);
    let mut done_here = 0u64;
    while trainer.state.iteration < total {
        if max_iterations.is_some_and(|m| done_here >= m) {
            bar.finish_and_clear();
            // The stop's resume hint needs a checkpoint of this very iteration.
            let newest = checkpoints(run)?.pop();
            let name = format!("iter-{:06}", trainer.state.iteration);
            if newest.as_deref().and_then(Path::file_name).is_none_or(|n| n != name.as_str()) {
                write_checkpoint(trainer, run, keep)?;
                metrics.flush();
            }
            return Ok(false);
        }
        let s = trainer.iteration(metrics)?;
        done_here += 1;
        bar.set_position(s.iteration);
        bar.set_message(format!(
            "iteration {}: return {:.3}  cpu {:.2} µs/pkt  p99 {:.0} µs  viol {:.0}%",
            s.iteration,
            s.episodic_return,
            s.cpu_us_per_packet,
            s.p99_latency_us,
            100.0 * s.slo_violation_rate
        ));
        if !progress || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            tracing::info!(
                "iter {:>5}/{total} step {:>9}  return {:8.3}  cpu {:5.2} µs/pkt  p99 {:7.1} µs  viol {:5.1}%  kl {:.4}",
                s.iteration,
                s.global_step,
                s.episodic_return,
                s.cpu_us_per_packet,
                s.p99_latency_us,
                100.0 * s.slo_violation_rate,
                s.approx_kl
            );
        }
        if let Some(v) = &trainer.exp.config.validation
            && (s.iteration % v.every_iterations == 0 || s.iteration == total)
        {
            let t0 = std::time::Instant::now();
            validate::validate_and_keep(trainer, run, metrics)?;
            trainer.perf.evaluation += t0.elapsed().as_secs_f64();
        }
        if s.iteration % every == 0 || s.iteration == total {
            let t0 = std::time::Instant::now();
            write_checkpoint(trainer, run, keep)?;
            let secs = t0.elapsed().as_secs_f64();
            trainer.perf.checkpoint += secs;
            metrics.perf("perf/checkpoint_ms", 1e3 * secs, s.global_step);
            metrics.flush();
        }
    }
    bar.finish_and_clear();
    Ok(true)
}

/// Evaluates the frozen model against the configured baselines on the training suite.
fn final_eval(t: &Trainer, run: &Path, model_dir: &Path) -> Result<()> {
    let c = &t.exp.config;
    let model = std::fs::canonicalize(model_dir)?;
    let mut policies = c.evaluation.policies.clone();
    policies.push(model.to_string_lossy().into_owned());
    let cfg = eval::EvalConfig {
        name: c.name.clone(),
        scenarios: c.suite.scenarios.clone(),
        policies,
        seeds: c.evaluation.seeds.clone(),
        sim: c.sim.clone(),
        statics: c.evaluation.statics.clone(),
        adaptive: Default::default(),
        threads: c.threads,
        warmup_steps: 0,
        slo_p99_us: None,
        // A model trained on one profile is evaluated on it (the scenarios' own may be another).
        profile: match c.suite.profiles.as_slice() {
            [one] => Some(*one),
            _ => None,
        },
        trim: Default::default(),
        slo_feedback: Default::default(),
    };
    let suite = cfg.into_suite(&t.exp.path)?;
    let cache = eval::Cache { dir: Some(PathBuf::from("runs/cache")) };
    let rows = eval::run_suite(&suite, &cache, true)?;
    let aggs = eval::aggregate(&rows);
    let md = eval::report::markdown(&suite, &aggs);
    println!("{md}");
    let out = run.join("eval");
    eval::write_outputs(&out, &suite, &rows, &aggs)?;
    // Record the evaluation in the model's provenance (the weights, and their hash, are unchanged).
    let p = model_dir.join(moderato_policies::learned::META_FILE);
    let mut meta: ModelMeta = serde_json::from_str(&std::fs::read_to_string(&p)?)?;
    meta.provenance.evaluation = Some(md);
    std::fs::write(&p, serde_json::to_string_pretty(&meta)?)?;
    tracing::info!("evaluation: {}", out.join("report.md").display());
    Ok(())
}

/// `moderato export <model-dir> <out>`: a frozen model's files copied to `out` (unless it is the
/// same directory) and its semantics sealed, after every check a load makes.
fn reseal(from: &Path, to: &Path) -> Result<()> {
    use moderato_policies::learned::{META_FILE, WEIGHTS_FILE};
    let same = to.exists() && std::fs::canonicalize(from)? == std::fs::canonicalize(to)?;
    if !same {
        std::fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display()))?;
        for f in [META_FILE, WEIGHTS_FILE] {
            std::fs::copy(from.join(f), to.join(f))
                .with_context(|| format!("cannot copy {} to {}", from.join(f).display(), to.display()))?;
        }
    }
    let meta = LearnedPolicy::reseal(to)?;
    eprintln!(
        "sealed {}: semantics SHA-256 {}",
        to.join(META_FILE).display(),
        meta.provenance.semantics_sha256.as_deref().unwrap_or("")
    );
    Ok(())
}

/// `moderato export`: a frozen model from any checkpoint.
pub fn export(args: ExportArgs) -> Result<()> {
    let dir = &args.checkpoint;
    if dir.join(moderato_policies::learned::META_FILE).is_file() && !dir.join("state.json").exists() {
        return reseal(dir, &args.model_dir);
    }
    if non_empty_dir(&args.model_dir) && !args.force {
        bail!(
            "{}: already exists and is not empty; overwrite it with --force, or choose another directory",
            args.model_dir.display()
        );
    }
    let toml = std::fs::read_to_string(dir.join("config.toml"))
        .with_context(|| format!("{}: not a checkpoint (no config.toml)", dir.display()))?;
    let cfg: ExperimentConfig =
        toml::from_str(&toml).with_context(|| format!("{}/config.toml", dir.display()))?;
    let state: TrainState = serde_json::from_str(
        &std::fs::read_to_string(dir.join("state.json"))
            .with_context(|| format!("{}: not a checkpoint (no state.json)", dir.display()))?,
    )?;
    ppo::check_state_features(dir, &state)?;
    let device = Device::flex();
    let bytes =
        std::fs::read(dir.join("model.bpk")).with_context(|| format!("{}: no model.bpk", dir.display()))?;
    let rec = burn::store::ModuleRecord::from_bytes(burn::tensor::Bytes::from_bytes_vec(bytes))
        .map_err(|e| anyhow::anyhow!("{}/model.bpk: {e:?}", dir.display()))?;
    let model = Model::new(&cfg.network, &cfg.sim.action_space, 0, &device)
        .try_load_record(rec)
        .map_err(|e| anyhow::anyhow!("{}/model.bpk: {e:?}", dir.display()))?;
    let meta = model_meta(&cfg.name, &toml, &cfg, &state);
    LearnedPolicy::save(&args.model_dir, model.actor.valid(), meta)?;
    tracing::info!(
        "exported {} (iteration {}, {} steps) to {}",
        dir.display(),
        state.iteration,
        state.global_step,
        args.model_dir.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use moderato_env::HostProfile;

    /// The simulate line a run prints runs: a model trained without `rr-latency`'s own profile
    /// gets `--profile` (a model refuses a profile it was not trained for).
    #[test]
    fn the_next_steps_simulate_a_profile_the_model_was_trained_for() {
        let (run, model) = (Path::new("runs/x"), Path::new("runs/x/model"));
        let all = next_steps(run, model, true, &[HostProfile::KvmNotfCoal, HostProfile::KvmVhost]);
        assert!(all.contains("rr-latency.toml --policy runs/x/model --knobs"), "{all}");
        assert!(all.contains("eval/report.md"), "{all}");
        let kvm = next_steps(run, model, false, &[HostProfile::KvmVhost]);
        assert!(kvm.contains("rr-latency.toml --profile kvm-vhost --policy runs/x/model"), "{kvm}");
        assert!(!kvm.contains("report.md"), "{kvm}");
        assert!(!next_steps(run, model, false, &[]).contains("--profile"));
    }
}
