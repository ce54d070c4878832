//! Turning policy names from configs and the command line into policies.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Result, anyhow};
use moderato_env::{ControllerFactory, EnvSpec};
use moderato_policies::Policy;
use moderato_policies::adaptive::AdaptiveFactory;
use moderato_policies::baselines::{self, StaticSpec};
use moderato_policies::learned::LearnedPolicy;

/// Where a policy comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum PolicySource {
    /// A fixed baseline by name, with the config's custom knob sets.
    Baseline { name: String, statics: BTreeMap<String, StaticSpec> },
    /// The hindsight oracle, searched per scenario and seed.
    BestStatic,
    /// A frozen model directory.
    Model { dir: PathBuf, label: String },
}

impl PolicySource {
    /// The name used in reports.
    pub fn label(&self) -> String {
        match self {
            PolicySource::Baseline { name, .. } => name.clone(),
            PolicySource::BestStatic => "best-static".into(),
            PolicySource::Model { label, .. } => label.clone(),
        }
    }

    /// A fresh policy for an environment with this spec; a model is checked against it.
    pub fn instantiate(&self, spec: &EnvSpec) -> Result<Box<dyn Policy>> {
        match self {
            PolicySource::Baseline { name, statics } => Ok(baselines::baseline(name, statics)?),
            PolicySource::BestStatic => {
                Err(anyhow!("best-static is searched per scenario, not instantiated"))
            }
            PolicySource::Model { dir, .. } => {
                let p = LearnedPolicy::load(dir, &burn::tensor::Device::flex())?;
                p.check_vms(spec.vms)?;
                p.check_spec(spec)?;
                Ok(Box::new(p))
            }
        }
    }
}

/// Resolves `name`: a baseline name, `best-static`, or a model directory (relative to `base`).
pub fn resolve(name: &str, base: &Path, statics: &BTreeMap<String, StaticSpec>) -> Result<PolicySource> {
    if name == "best-static" {
        return Ok(PolicySource::BestStatic);
    }
    if !name.starts_with("static:") {
        let dir = if Path::new(name).is_absolute() { PathBuf::from(name) } else { base.join(name) };
        if dir.is_dir() {
            let label = format!(
                "model:{}",
                dir.file_name().map_or(name.into(), |f| f.to_string_lossy().into_owned())
            );
            return Ok(PolicySource::Model { dir, label });
        }
    }
    match baselines::baseline(name, statics) {
        Ok(_) => Ok(PolicySource::Baseline { name: name.to_string(), statics: statics.clone() }),
        Err(e) => Err(anyhow!("{e}, or a frozen-model directory (none at {})", base.join(name).display())),
    }
}

/// The in-layer adaptive algorithms (DIM, ITR) for the simulator.
pub fn controller_factory() -> Arc<dyn ControllerFactory> {
    Arc::new(AdaptiveFactory::default())
}

/// Resolves a policy for `moderato deploy` on a side with `vms` VMs: a baseline or a model
/// directory (relative to the working directory). The deploy loop checks the model's feature
/// requirements against what the host provides, and clamps its decisions to the operator's bounds.
pub fn deploy_policy(name: &str, vms: usize) -> Result<Box<dyn Policy>> {
    match resolve(name, Path::new("."), &BTreeMap::new())? {
        PolicySource::Model { dir, .. } => {
            let p = LearnedPolicy::load(&dir, &burn::tensor::Device::flex())?;
            p.check_vms(vms)?;
            Ok(Box::new(p))
        }
        PolicySource::BestStatic => Err(anyhow!(
            "best-static is found in hindsight by `moderato eval`; deploy the setting it found \
             (static:<usecs>/<frames> or a [static.<name>] set) or a model"
        )),
        baseline => baseline.instantiate(&moderato_env::sim::SimConfig::default().spec(vms)),
    }
}
