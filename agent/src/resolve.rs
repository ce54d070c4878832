//! Turning policy names from configs and the command line into policies.
//!
//! A name is, in this order: `best-static` (evaluation only); a frozen-model directory; a knob
//! file (`*.toml`, the format of an eval config's `[static.<name>]` table); per-layer knobs
//! (`nic=20/32,backend=0/1,frontend=8/16`, the same as `static:nic=...`); or a baseline name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use moderato_env::{ActionSpace, ControllerFactory, EnvSpec};
use moderato_policies::Policy;
use moderato_policies::adaptive::AdaptiveFactory;
use moderato_policies::baselines::{self, StaticSpec};
use moderato_policies::gains::ControllerGains;
use moderato_policies::learned::LearnedPolicy;
use moderato_policies::learned::trim::{TrimGains, TrimmedPolicy};

/// The name of [`PolicySource::BestStaticHeldOut`].
pub const BEST_STATIC_HELD_OUT: &str = "best-static-held-out";

/// Where a policy comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum PolicySource {
    /// A fixed baseline by name, with the config's custom knob sets.
    Baseline { name: String, statics: BTreeMap<String, StaticSpec> },
    /// The hindsight oracle, searched per scenario and seed.
    BestStatic,
    /// best-static without hindsight of the run it is judged on: the setting best-static found on
    /// the next of the evaluation's seeds (in the config's order, the last taking the first's), run
    /// on this seed (`best-static-held-out`, evaluation only). It reads best-static's cache; without
    /// one it searches again.
    BestStaticHeldOut,
    /// A frozen model directory, as it is or under the trim ([`Trim`]).
    Model { dir: PathBuf, label: String, trim: Trim },
}

/// How a model runs: as it is, or under the feedback trim of its targets
/// ([`moderato_policies::learned::trim`]), with its floors (`trim:<dir>`) or without them
/// (`trim-targets:<dir>`, the trim before its floors).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trim {
    Off,
    Targets,
    Full,
}

impl Trim {
    /// The policy-name prefix of this trim (`""` for none).
    pub fn prefix(self) -> &'static str {
        match self {
            Trim::Off => "",
            Trim::Targets => "trim-targets:",
            Trim::Full => "trim:",
        }
    }
}

impl PolicySource {
    /// The name used in reports: the baseline's name, or the model's directory (relative to the
    /// working directory where it lies below it).
    pub fn label(&self) -> String {
        match self {
            PolicySource::Baseline { name, .. } => name.clone(),
            PolicySource::BestStatic => "best-static".into(),
            PolicySource::BestStaticHeldOut => BEST_STATIC_HELD_OUT.into(),
            PolicySource::Model { label, .. } => label.clone(),
        }
    }

    /// A fresh policy for an environment with this spec; a model is checked against it. The
    /// feedback controllers run their documented gains.
    pub fn instantiate(&self, spec: &EnvSpec) -> Result<Box<dyn Policy>> {
        self.instantiate_with(spec, &ControllerGains::default())
    }

    /// [`instantiate`](Self::instantiate), with the feedback controllers' gains (a config's
    /// `[trim]` and `[slo_feedback]` tables).
    pub fn instantiate_with(&self, spec: &EnvSpec, gains: &ControllerGains) -> Result<Box<dyn Policy>> {
        match self {
            PolicySource::Baseline { name, statics } => {
                Ok(baselines::baseline_with(name, statics, spec.slo_p99_us, gains.slo_feedback)?)
            }
            PolicySource::BestStatic | PolicySource::BestStaticHeldOut => {
                Err(anyhow!("{} is searched per scenario, not instantiated", self.label()))
            }
            PolicySource::Model { dir, label, trim } => {
                let p = LearnedPolicy::load(dir, &burn::tensor::Device::flex())?;
                p.check_vms(spec.vms)?;
                p.check_spec(spec)?;
                Ok(with_trim(p, label, *trim, gains.trim))
            }
        }
    }

    /// Refuses a static setting with knobs beyond `space`'s bounds (which the simulator would
    /// clamp without a word).
    pub fn check_bounds(&self, space: &ActionSpace) -> Result<()> {
        if let PolicySource::Baseline { name, statics } = self
            && let Some(spec) = name.strip_prefix("static:").and_then(|w| baselines::static_spec(w, statics))
        {
            baselines::check_bounds(name, &spec, space)?;
        }
        Ok(())
    }
}

/// `name` as a path: as it is when absolute, else below `base`.
fn under(base: &Path, name: &str) -> PathBuf {
    if Path::new(name).is_absolute() { PathBuf::from(name) } else { base.join(name) }
}

/// The model as it is, or under the trim of its targets (with or without its floors) with
/// `gains` (`trim-targets:` always without floors).
fn with_trim(p: LearnedPolicy, label: &str, trim: Trim, gains: TrimGains) -> Box<dyn Policy> {
    match trim {
        Trim::Off => Box::new(p),
        Trim::Targets => {
            Box::new(TrimmedPolicy::new(label, p, TrimGains { throughput_floor: false, ..gains }))
        }
        Trim::Full => Box::new(TrimmedPolicy::new(label, p, gains)),
    }
}

/// A model's name in reports: its directory relative to the working directory when it lies
/// below it (`models/default`, `runs/quickstart-…/model`), else the path as found (also when the
/// working directory is `/`, as in the container, where relative paths would read oddly).
fn model_label(dir: &Path) -> String {
    let cwd = std::env::current_dir().ok().and_then(|c| std::fs::canonicalize(c).ok());
    let full = std::fs::canonicalize(dir).ok();
    if let (Some(cwd), Some(full)) = (cwd, full.as_ref())
        && cwd.parent().is_some()
        && let Ok(rel) = full.strip_prefix(&cwd)
        && !rel.as_os_str().is_empty()
    {
        return rel.display().to_string();
    }
    full.unwrap_or_else(|| dir.to_path_buf()).display().to_string()
}

/// Resolves `name` for an evaluation: a baseline name, `best-static`, a knob file or a model
/// directory (paths relative to `base`).
pub fn resolve(name: &str, base: &Path, statics: &BTreeMap<String, StaticSpec>) -> Result<PolicySource> {
    if name == "best-static" {
        return Ok(PolicySource::BestStatic);
    }
    if name == BEST_STATIC_HELD_OUT {
        return Ok(PolicySource::BestStaticHeldOut);
    }
    resolve_fixed(name, base, statics)
        .map_err(|e| anyhow!("{e:#} (an eval config also takes best-static and {BEST_STATIC_HELD_OUT})"))
}

/// Resolves `name` for one run (simulate, deploy): like [`resolve`] but without `best-static`,
/// which is refused with what to do instead.
pub fn resolve_fixed(
    name: &str,
    base: &Path,
    statics: &BTreeMap<String, StaticSpec>,
) -> Result<PolicySource> {
    if name == BEST_STATIC_HELD_OUT {
        return Err(anyhow!(
            "{BEST_STATIC_HELD_OUT} runs the setting best-static found on another of an evaluation's \
             seeds, in `moderato eval`; give a setting, a baseline or a model"
        ));
    }
    if name == "best-static" {
        return Err(anyhow!(
            "best-static is found in hindsight, per scenario and seed, by `moderato eval`; give the \
             setting it found (static:<usecs>/<frames>, or per layer: nic=U/F,backend=U/F,frontend=U/F), \
             a baseline or a model"
        ));
    }
    for trim in [Trim::Full, Trim::Targets] {
        let Some(model) = name.strip_prefix(trim.prefix()) else { continue };
        let path = under(base, model);
        if !path.is_dir() {
            bail!(
                "`{name}`: {} takes a frozen-model directory ({}models/default), and there is none at {}",
                trim.prefix(),
                trim.prefix(),
                path.display()
            );
        }
        return Ok(PolicySource::Model {
            label: format!("{}{}", trim.prefix(), model_label(&path)),
            dir: path,
            trim,
        });
    }
    let path = under(base, name);
    if !name.starts_with("static:") {
        if path.is_dir() {
            return Ok(PolicySource::Model { label: model_label(&path), dir: path, trim: Trim::Off });
        }
        if path.is_file() && name.ends_with(".toml") {
            return knob_file(name, &path, statics);
        }
        if name.contains('=') {
            return resolve_fixed(&format!("static:{name}"), base, statics);
        }
    }
    match baselines::check_name(name, statics) {
        Ok(()) => Ok(PolicySource::Baseline { name: name.to_string(), statics: statics.clone() }),
        Err(e @ baselines::UnknownPolicy::Malformed { .. }) => Err(e.into()),
        Err(e) => Err(anyhow!(
            "{e}, a knob file (*.toml), a frozen-model directory or trim:<model directory> (none at {})",
            path.display()
        )),
    }
}

/// A knob file: one static setting in the format of an eval config's `[static.<name>]` table,
/// known as `static:<name as given>`.
fn knob_file(name: &str, path: &Path, statics: &BTreeMap<String, StaticSpec>) -> Result<PolicySource> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read knob file {}", path.display()))?;
    let spec: StaticSpec = toml::from_str(&text).map_err(|e| {
        anyhow!(
            "knob file {}: {e}\n(a knob file has nic, backend and frontend, each \
             {{ rx = {{ usecs = 20, frames = 32 }}, tx = {{ usecs = 20, frames = 32 }} }})",
            path.display()
        )
    })?;
    let mut statics = statics.clone();
    statics.insert(name.to_string(), spec);
    Ok(PolicySource::Baseline { name: format!("static:{name}"), statics })
}

/// The in-layer adaptive algorithms (DIM, ITR) for the simulator.
pub fn controller_factory() -> Arc<dyn ControllerFactory> {
    Arc::new(AdaptiveFactory::default())
}

/// Resolves a policy for `moderato deploy` on a side with `vms` VMs and the deploy config's
/// latency target (`[slo] p99_us`; a target-steering baseline without one is refused): a
/// baseline or a model directory (relative to the working directory). The deploy loop checks the model's feature
/// requirements against what the host provides, and clamps its decisions to the operator's bounds.
pub fn deploy_policy(
    name: &str,
    vms: usize,
    slo_p99_us: Option<f64>,
    objectives: &[Option<f64>],
    gains: &ControllerGains,
) -> Result<Box<dyn Policy>> {
    match resolve_fixed(name, Path::new("."), &BTreeMap::new())? {
        PolicySource::Model { dir, label, trim } => {
            let p = LearnedPolicy::load(&dir, &burn::tensor::Device::flex())?;
            p.check_vms(vms)?;
            p.check_objectives(objectives)?;
            Ok(with_trim(p, &label, trim, gains.trim))
        }
        other => {
            // A live run's target comes from its config, never from the simulator's default.
            let spec =
                moderato_env::EnvSpec { slo_p99_us, ..moderato_env::sim::SimConfig::default().spec(vms) };
            let policy = other.instantiate_with(&spec, gains)?;
            if let Some(why) = policy.live_refusal() {
                bail!(why);
            }
            Ok(policy)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_files_and_per_layer_knobs_resolve() {
        let none = BTreeMap::new();
        let here = Path::new(".");
        let p = resolve_fixed("nic=20/32,backend=0/1,frontend=8/16", here, &none).unwrap();
        assert_eq!(p.label(), "static:nic=20/32,backend=0/1,frontend=8/16");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("mine.toml");
        std::fs::write(
            &f,
            "nic = { rx = { usecs = 20, frames = 32 }, tx = { usecs = 64, frames = 64 } }\n\
             backend = { rx = { usecs = 0, frames = 1 }, tx = { usecs = 0, frames = 1 } }\n\
             frontend = { rx = { usecs = 8, frames = 16 }, tx = { usecs = 8, frames = 16 } }\n",
        )
        .unwrap();
        let p = resolve_fixed("mine.toml", dir.path(), &none).unwrap();
        assert_eq!(p.label(), "static:mine.toml");
        let mut pol = p.instantiate(&moderato_env::sim::SimConfig::default().spec(1)).unwrap();
        let obs = moderato_env::Observation { guests: vec![Default::default()], ..Default::default() };
        assert_eq!(pol.act(&obs).nic.tx, moderato_env::Moderation::fixed(64, 64));
        std::fs::write(&f, "nic = 3\n").unwrap();
        let e = format!("{:#}", resolve_fixed("mine.toml", dir.path(), &none).unwrap_err());
        assert!(e.contains("mine.toml") && e.contains("knob file"), "{e}");
    }

    #[test]
    fn best_static_only_in_an_evaluation() {
        let none = BTreeMap::new();
        assert_eq!(resolve("best-static", Path::new("."), &none).unwrap(), PolicySource::BestStatic);
        let e = resolve_fixed("best-static", Path::new("."), &none).unwrap_err().to_string();
        assert!(e.contains("moderato eval"), "{e}");
        let held = resolve(BEST_STATIC_HELD_OUT, Path::new("."), &none).unwrap();
        assert_eq!(held, PolicySource::BestStaticHeldOut);
        assert_eq!(held.label(), "best-static-held-out");
        let e = resolve_fixed(BEST_STATIC_HELD_OUT, Path::new("."), &none).unwrap_err().to_string();
        assert!(e.contains("moderato eval") && e.contains("another of an evaluation's seeds"), "{e}");
        let e = resolve_fixed("dimm", Path::new("."), &none).unwrap_err().to_string();
        assert!(e.contains("valid names") && !e.contains("best-static"), "{e}");
        let e = resolve("dimm", Path::new("."), &none).unwrap_err().to_string();
        assert!(e.contains("best-static"), "{e}");
    }

    #[test]
    fn napi_baselines_simulate_and_deploy() {
        let none = BTreeMap::new();
        assert!(matches!(
            resolve("napi:2/20", Path::new("."), &none).unwrap(),
            PolicySource::Baseline { .. }
        ));
        let mut pol = deploy_policy("napi:2/20", 1, None, &[], &ControllerGains::default()).unwrap();
        assert_eq!(pol.napi(), Some(moderato_env::live::NapiParams::new(2, 20_000)));
        assert!(!pol.sets_coalescing());
        pol.reset();
        let e = format!(
            "{:#}",
            deploy_policy("busy-poll:50", 1, None, &[], &ControllerGains::default()).err().unwrap()
        );
        assert!(e.contains("busy-poll:50") && e.contains("simulated only"), "{e}");
        let p = deploy_policy("irq-suspend:50/20000", 1, None, &[], &ControllerGains::default()).unwrap();
        assert_eq!(p.irq_suspend_timeout_ns(), Some(20_000_000));
        let e = format!(
            "{:#}",
            deploy_policy("napi:2/x", 1, None, &[], &ControllerGains::default()).err().unwrap()
        );
        assert!(e.contains("timeout `x`"), "{e}");
    }

    #[test]
    fn slo_feedback_takes_the_deploy_configs_target_or_is_refused_without_one() {
        let p = deploy_policy("slo-feedback", 1, Some(150.0), &[], &ControllerGains::default()).unwrap();
        assert_eq!(p.name(), "slo-feedback");
        let e = format!(
            "{:#}",
            deploy_policy("slo-feedback", 1, None, &[], &ControllerGains::default()).err().unwrap()
        );
        assert!(e.contains("no latency target") && e.contains("[slo] p99_us"), "{e}");
        // A named target needs no config.
        deploy_policy("slo-feedback:300", 1, None, &[], &ControllerGains::default()).unwrap();
    }

    #[test]
    fn out_of_bounds_knobs_are_refused() {
        let none = BTreeMap::new();
        let space = ActionSpace::default();
        let p = resolve_fixed("static:1000000/4", Path::new("."), &none).unwrap();
        let e = p.check_bounds(&space).unwrap_err().to_string();
        assert!(e.contains("1000000") && e.contains("1000"), "{e}");
        resolve_fixed("static:1000/4", Path::new("."), &none).unwrap().check_bounds(&space).unwrap();
        resolve_fixed("dim", Path::new("."), &none).unwrap().check_bounds(&space).unwrap();
    }

    #[test]
    fn a_model_is_named_by_its_directory() {
        // Below the working directory (the crate's, in tests): relative, however it was written.
        assert_eq!(model_label(Path::new("src")), "src");
        assert_eq!(model_label(Path::new("./src/../src")), "src");
        // Elsewhere: the full path, not just the last component.
        let label = model_label(Path::new("../models/default"));
        assert!(label.ends_with("models/default") && label.len() > "models/default".len(), "{label}");
    }
}
