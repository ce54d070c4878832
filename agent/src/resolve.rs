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
