//! The learned policy: burn actor networks, the frozen-model format and its loader.
//!
//! A frozen model is a directory:
//! - `actor.bpk`: the actors' weights in burn's native (burnpack) format;
//! - `model.json`: [`ModelMeta`] — format version, feature names and normalisation statistics,
//!   action space, network config, the control interval and probes it was trained with, and
//!   provenance (experiment config and its hash, source revision, timesteps, evaluation summary,
//!   SHA-256 of the weights).
//!
//! [`LearnedPolicy::load`] checks all of it and fails with a sentence naming what does not match.
//! Inference is deterministic: the Gaussian's mean, on a device without autodiff.
//!
//! **Monotone in each VM's target.** A model trained for a range of targets (`slo_range_us`)
//! decides through an envelope that makes one promise exact: on a fixed observation, a tighter
//! target for a VM never yields heavier coalescing on that VM's path (the NIC, its backend, its
//! frontend). The actor is evaluated, in one batch, at every point of a [`TARGET_GRID`]-point
//! log-spaced grid over the range at or above the VM's target (snapped down to the grid); each of
//! the VM's backend and frontend knobs is the least any of those proposes, and each NIC knob the
//! least over every VM with a target, that VM's target varied with the others' removed (so that
//! no other VM's target can move it). The snap makes the decision that of a target up to
//! `(hi/lo)^(1/24)` (≈ 1.15× for 50 µs – 2 ms) tighter. Training samples around the actor's own
//! means; validation, evaluation and deploy all decide through the envelope.

pub mod features;
pub mod net;
pub mod trim;

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::store::ModuleRecord;
use burn::tensor::Device;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use moderato_env::{
    ActionSpace, BACKEND_FEATURES, CoalescingSettings, EnvSpec, GUEST_FEATURES, HOST_FEATURES,
    KNOBS_PER_LAYER, LayerId, LayerKind, Observation, VmSettings, feature_names,
};

pub use features::{FeatureBatch, Ignored, Normalizer, RunningStats};
pub use net::{
    Activation, Actor, BACKEND_IN, BatchTensors, GUEST_IN, HeadInputs, HeadTensors, History, Means, Mlp,
    NIC_IN, NetConfig, head_widths, host_vm_max, host_vm_mean,
};

use crate::{Policy, Requirements};

/// Version of the frozen-model format this build reads and writes (2: per-VM objectives, the
/// `slo_*` features and `slo_range_us`; 3: host profiles, six values per layer with the NAPI
/// deferral, the deferral and profile features, `profiles`).
pub const FORMAT_VERSION: u32 = 3;
pub const META_FILE: &str = "model.json";
pub const WEIGHTS_FILE: &str = "actor.bpk";
/// Largest weights file read, bytes (16 layers of 4096 × 4096 f32 weights are 1 GiB).
pub const MAX_WEIGHTS_BYTES: u64 = 2 << 30;

/// Feature names, per group, in network input order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureNames {
    pub host: Vec<String>,
    pub backend: Vec<String>,
    pub guest: Vec<String>,
}

impl FeatureNames {
    /// The names this build's environments produce.
    pub fn current() -> Self {
        FeatureNames {
            host: feature_names(HOST_FEATURES),
            backend: feature_names(BACKEND_FEATURES),
            guest: feature_names(GUEST_FEATURES),
        }
    }
}

/// Which latency probes the model saw in training; it needs them at deploy time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Probes {
    pub host: bool,
    pub guest: bool,
}

/// Where the model came from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    pub experiment: String,
    /// The resolved experiment config (TOML) and its SHA-256.
    pub config_toml: String,
    pub config_sha256: String,
    /// `git describe --always --dirty` of the source that trained it, or "unknown".
    pub source_revision: String,
    pub seed: u64,
    pub timesteps: u64,
    /// Seconds since the Unix epoch.
    pub created_unix: u64,
    /// The evaluation against baselines at the end of training (Markdown), if any.
    #[serde(default)]
    pub evaluation: Option<String>,
    /// The validation (Markdown) of the checkpoint exported: the best on the experiment's
    /// `[validation]` suite, which training never sampled; absent without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation: Option<String>,
    pub weights_sha256: String,
    /// SHA-256 of what the weights mean: format version, features, normaliser, action space,
    /// network config, interval, probes and `weights_sha256` (see [`semantics_sha256`]). A
    /// `model.json` edited by hand (`activation = "relu"` on tanh weights, another clip) no longer
    /// matches it and is refused. Models saved before it existed have none and load unchecked;
    /// `moderato export <model-dir> <model-dir>` adds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub semantics_sha256: Option<String>,
}

/// `model.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelMeta {
    pub format_version: u32,
    pub features: FeatureNames,
    pub normalizer: Normalizer,
    pub action_space: ActionSpace,
    pub network: NetConfig,
    /// The control interval it was trained with, µs.
    pub interval_us: u64,
    pub probes: Probes,
    /// The range of p99 targets (µs) the training held VMs to; a deploy or evaluation that gives
    /// a VM a target outside it is refused. Absent: a model from before per-VM objectives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slo_range_us: Option<[f64; 2]>,
    /// The host profiles the model was trained on (every profile its experiment's scenarios and
    /// generator could draw); an evaluation or a deploy on another profile is refused.
    pub profiles: Vec<moderato_env::HostProfile>,
    pub provenance: Provenance,
}

/// Why a model could not be loaded or does not fit.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("{path}: not a valid model.json: {message}")]
    Meta { path: PathBuf, message: String },
    #[error(
        "{path}: format version {found}, but this build reads version {FORMAT_VERSION}; re-export the model with this build (moderato export) from a checkpoint of this build, or retrain it from its provenance.config_toml"
    )]
    Version { path: PathBuf, found: u32 },
    #[error("{path}: the model was trained on other {group} features: {diff}; retrain it for this build")]
    Features { path: PathBuf, group: &'static str, diff: String },
    #[error("{path}: corrupt weights: SHA-256 is {found}, model.json says {expected}; copy the model again")]
    Checksum { path: PathBuf, found: String, expected: String },
    #[error(
        "{path}: edited by hand: its semantics (features, normalizer, action space, network, interval, probes) \
         hash to {found}, provenance.semantics_sha256 says {expected}; copy the model again, or if the edit \
         is deliberate and matches the weights, reseal it with `moderato export <dir> <dir>`"
    )]
    Semantics { path: PathBuf, found: String, expected: String },
    #[error("{path}: cannot load the weights: {message}")]
    Weights { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Mismatch { path: PathBuf, message: String },
}

fn diff_names(model: &[String], env: &[String]) -> Option<String> {
    if model == env {
        return None;
    }
    let missing: Vec<&String> = model.iter().filter(|n| !env.contains(n)).collect();
    let extra: Vec<&String> = env.iter().filter(|n| !model.contains(n)).collect();
    Some(if missing.is_empty() && extra.is_empty() {
        "same names in another order".into()
    } else {
        format!(
            "the model has {missing:?} that this build lacks, this build has {extra:?} that the model lacks"
        )
    })
}

/// Renumbers a module's parameter ids 1, 2, … in visiting order. burn draws ids at random when a
/// parameter is created and writes them into `.bpk` files; fixed ids make the same weights the
/// same bytes, so a model trained twice from the same config has the same SHA-256.
#[derive(Debug, Default)]
struct StableIds {
    next: u64,
}

impl burn::module::ModuleMapper for StableIds {
    fn map_float<const D: usize>(
        &mut self,
        mut param: burn::module::Param<burn::tensor::Tensor<D>>,
    ) -> burn::module::Param<burn::tensor::Tensor<D>> {
        self.next += 1;
        param.id = burn::module::ParamId::from(self.next);
        param
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// What [`Provenance::semantics_sha256`] covers, in a fixed order (a struct, not a JSON map, so
/// that the bytes do not depend on serde_json's map ordering).
#[derive(Serialize)]
struct Semantics<'a> {
    format_version: u32,
    features: &'a FeatureNames,
    normalizer: &'a Normalizer,
    action_space: &'a ActionSpace,
    network: &'a NetConfig,
    interval_us: u64,
    probes: &'a Probes,
    #[serde(skip_serializing_if = "Option::is_none")]
    slo_range_us: Option<[f64; 2]>,
    profiles: &'a [moderato_env::HostProfile],
    weights_sha256: &'a str,
}

/// SHA-256 (hex) of `meta`'s semantics: its compact JSON serialisation of every field except the
/// rest of the provenance. Floats serialise as their shortest round-trip form, so a value read
/// from `model.json` hashes as it was written.
pub fn semantics_sha256(meta: &ModelMeta) -> String {
    let s = Semantics {
        format_version: meta.format_version,
        features: &meta.features,
        normalizer: &meta.normalizer,
        action_space: &meta.action_space,
        network: &meta.network,
        interval_us: meta.interval_us,
        probes: &meta.probes,
        slo_range_us: meta.slo_range_us,
        profiles: &meta.profiles,
        weights_sha256: &meta.provenance.weights_sha256,
    };
    sha256_hex(&serde_json::to_vec(&s).unwrap_or_default())
}

/// Checks the values of `meta` that parse but would make inference panic or meaningless: the
/// normaliser's statistics and clip, the interval, the action space.
fn check_meta_values(meta: &ModelMeta) -> Result<(), String> {
    let n = &meta.normalizer;
    if !(n.clip.is_finite() && n.clip > 0.0 && n.clip <= 1e6) {
        return Err(format!(
            "normalizer.clip = {:e}: normalised features are clipped to [-clip, clip]; use a positive number \
             up to 1e6 (training writes 10)",
            n.clip
        ));
    }
    for (group, st, len) in [
        ("host", &n.host, HOST_FEATURES.len()),
        ("backend", &n.backend, BACKEND_FEATURES.len()),
        ("guest", &n.guest, GUEST_FEATURES.len()),
    ] {
        if st.mean.len() != len || st.var.len() != len {
            return Err(format!(
                "normalizer.{group} has {} means and {} variances for {len} features; the statistics do not \
                 match the feature lists",
                st.mean.len(),
                st.var.len()
            ));
        }
        if let Some(v) = st.mean.iter().find(|v| !v.is_finite()) {
            return Err(format!("normalizer.{group}.mean holds {v}: means must be finite numbers"));
        }
        if let Some(v) = st.var.iter().find(|v| !(v.is_finite() && **v >= 0.0)) {
            return Err(format!("normalizer.{group}.var holds {v}: variances must be finite and >= 0"));
        }
        if !(st.count.is_finite() && st.count >= 0.0) {
            return Err(format!("normalizer.{group}.count = {}: a count is finite and >= 0", st.count));
        }
    }
    if meta.interval_us == 0 || meta.interval_us > 60_000_000 {
        return Err(format!("interval_us = {}: use 1..=60000000", meta.interval_us));
    }
    moderato_env::sim::limits::check_action_space(&meta.action_space)
}

/// A frozen actor acting on observations.
#[derive(Debug)]
pub struct LearnedPolicy {
    name: String,
    dir: PathBuf,
    meta: ModelMeta,
    actor: Actor,
    /// `meta.network.ignore_features` as columns.
    ignored: Ignored,
    device: Device,
    /// The previous interval's observation (or the decaying peak of the recent ones), for a
    /// model with `network.history` (forgotten by `reset`, and when the number of VMs changes).
    prev: Option<Observation>,
}

impl LearnedPolicy {
    /// A policy from an actor in memory (during training and evaluation).
    /// Panics if `meta.network` lists an unknown feature to ignore (validated configs do not).
    pub fn new(name: impl Into<String>, actor: Actor, meta: ModelMeta, device: Device) -> Self {
        let ignored = Ignored::new(&meta.network.ignore_features).expect("a validated network config");
        LearnedPolicy {
            name: name.into(),
            dir: PathBuf::new(),
            actor: actor.valid(),
            meta,
            ignored,
            device,
            prev: None,
        }
    }

    /// Loads and checks a frozen model directory.
    pub fn load(dir: &Path, device: &Device) -> Result<LearnedPolicy, ModelError> {
        Self::load_checked(dir, device, true)
    }

    /// Writes `provenance.semantics_sha256` into the `model.json` of `dir` (replacing it
    /// atomically), after every other check of [`LearnedPolicy::load`] passed: for models saved
    /// before the hash existed, and for deliberate edits. Returns the new metadata.
    pub fn reseal(dir: &Path) -> Result<ModelMeta, ModelError> {
        let p = Self::load_checked(dir, &Device::flex(), false)?;
        let mut meta = p.meta;
        meta.provenance.semantics_sha256 = Some(semantics_sha256(&meta));
        let m_path = dir.join(META_FILE);
        let io = |e: &dyn std::fmt::Display| ModelError::Io { path: m_path.clone(), message: e.to_string() };
        let json = serde_json::to_string_pretty(&meta).map_err(|e| io(&e))?;
        let tmp = dir.join(format!("{META_FILE}.tmp"));
        std::fs::write(&tmp, json).map_err(|e| io(&e))?;
        std::fs::rename(&tmp, &m_path).map_err(|e| io(&e))?;
        Ok(meta)
    }

    fn load_checked(dir: &Path, device: &Device, check_seal: bool) -> Result<LearnedPolicy, ModelError> {
        let meta_path = dir.join(META_FILE);
        let text = moderato_env::sim::limits::read_config(&meta_path).map_err(|e| ModelError::Io {
            path: meta_path.clone(),
            message: format!("{e} (a model directory holds {META_FILE} and {WEIGHTS_FILE})"),
        })?;
        // Read the version first, so that an old format gets the version error, not a field one.
        let version = serde_json::from_str::<serde_json::Value>(&text)
            .map_err(|e| ModelError::Meta { path: meta_path.clone(), message: e.to_string() })?
            .get("format_version")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| ModelError::Meta {
                path: meta_path.clone(),
                message: "no format_version".into(),
            })?;
        if version != u64::from(FORMAT_VERSION) {
            return Err(ModelError::Version { path: meta_path, found: version as u32 });
        }
        let meta: ModelMeta = serde_json::from_str(&text)
            .map_err(|e| ModelError::Meta { path: meta_path.clone(), message: e.to_string() })?;
        let cur = FeatureNames::current();
        for (group, m, e) in [
            ("host", &meta.features.host, &cur.host),
            ("backend", &meta.features.backend, &cur.backend),
            ("guest", &meta.features.guest, &cur.guest),
        ] {
            if let Some(diff) = diff_names(m, e) {
                return Err(ModelError::Features { path: meta_path, group, diff });
            }
        }
        check_meta_values(&meta).map_err(|m| ModelError::Mismatch { path: meta_path.clone(), message: m })?;
        meta.network.validate().map_err(|m| ModelError::Mismatch { path: meta_path.clone(), message: m })?;
        let w_path = dir.join(WEIGHTS_FILE);
        let bytes = moderato_env::sim::limits::read_bounded(&w_path, MAX_WEIGHTS_BYTES)
            .map_err(|e| ModelError::Io { path: w_path.clone(), message: e.to_string() })?;
        let found = sha256_hex(&bytes);
        if found != meta.provenance.weights_sha256 {
            return Err(ModelError::Checksum {
                path: w_path,
                found,
                expected: meta.provenance.weights_sha256,
            });
        }
        if let Some(expected) = meta.provenance.semantics_sha256.as_ref().filter(|_| check_seal) {
            let found = semantics_sha256(&meta);
            if &found != expected {
                return Err(ModelError::Semantics { path: meta_path, found, expected: expected.clone() });
            }
        }
        let record = ModuleRecord::from_bytes(burn::tensor::Bytes::from_bytes_vec(bytes))
            .map_err(|e| ModelError::Weights { path: w_path.clone(), message: format!("{e:?}") })?;
        let actor = Actor::new(&meta.network, 0, device)
            .try_load_record(record)
            .map_err(|e| ModelError::Weights { path: w_path.clone(), message: format!("{e:?}") })?;
        let name =
            format!("model:{}", dir.file_name().map_or_else(|| "model".into(), |f| f.to_string_lossy()));
        let ignored = Ignored::new(&meta.network.ignore_features)
            .map_err(|m| ModelError::Mismatch { path: meta_path.clone(), message: m })?;
        Ok(LearnedPolicy {
            name,
            dir: dir.to_path_buf(),
            meta,
            actor: actor.valid(),
            ignored,
            device: device.clone(),
            prev: None,
        })
    }

    /// Writes `actor` and `meta` (whose `weights_sha256` is filled in) into `dir`.
    pub fn save(dir: &Path, actor: Actor, mut meta: ModelMeta) -> Result<ModelMeta, ModelError> {
        let io = |path: &Path, e: &dyn std::fmt::Display| ModelError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(|e| io(dir, &e))?;
        let w_path = dir.join(WEIGHTS_FILE);
        let bytes = actor
            .map(&mut StableIds::default())
            .into_record()
            .into_bytes()
            .map_err(|e| ModelError::Weights { path: w_path.clone(), message: format!("{e:?}") })?;
        meta.provenance.weights_sha256 = sha256_hex(&bytes);
        meta.format_version = FORMAT_VERSION;
        meta.provenance.semantics_sha256 = Some(semantics_sha256(&meta));
        std::fs::write(&w_path, &bytes[..]).map_err(|e| io(&w_path, &e))?;
        let m_path = dir.join(META_FILE);
        let json = serde_json::to_string_pretty(&meta).map_err(|e| io(&m_path, &e))?;
        std::fs::write(&m_path, json).map_err(|e| io(&m_path, &e))?;
        Ok(meta)
    }

    pub fn meta(&self) -> &ModelMeta {
        &self.meta
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Checks that the model fits an environment: action space and probes.
    pub fn check_spec(&self, spec: &EnvSpec) -> Result<(), ModelError> {
        let path = self.dir.join(META_FILE);
        if !spec.action_space.same_limits(&self.meta.action_space) {
            return Err(ModelError::Mismatch {
                path,
                message: format!(
                    "action space differs: {}; give an eval config the model's bounds under \
                     [sim.action_space] (`moderato simulate` takes them from the model; a deploy runs \
                     the default bounds only)",
                    self.meta
                        .action_space
                        .limit_differences(&spec.action_space)
                        .iter()
                        .map(|(k, m, e)| format!("sim.action_space.{k} is {m} in the model and {e} here"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
        for (needed, have, side) in [
            (self.meta.probes.host, spec.host_probe, "host"),
            (self.meta.probes.guest, spec.guest_probe, "guest"),
        ] {
            if needed && !have {
                return Err(ModelError::Mismatch {
                    path,
                    message: format!(
                        "the model was trained with a {side} latency probe and this environment has none; \
                         configure one (or use a model trained without it)"
                    ),
                });
            }
        }
        self.check_profile(spec.profile)?;
        self.check_objectives(&spec.vm_slo_p99_us)
    }

    /// Refuses a host whose profile the model was not trained on, naming both.
    pub fn check_profile(&self, profile: moderato_env::HostProfile) -> Result<(), ModelError> {
        if self.meta.profiles.contains(&profile) {
            return Ok(());
        }
        let trained: Vec<&str> = self.meta.profiles.iter().map(|p| p.name()).collect();
        Err(ModelError::Mismatch {
            path: self.dir.join(META_FILE),
            message: format!(
                "the host's profile is {profile}, and the model was trained for {}; use a model trained \
                 on {profile} hosts (its experiment's [suite] profiles or [suite.generator] profiles), or \
                 set the host's profile (a scenario's host.profile, a deploy config's profile) if it is wrong",
                if trained.is_empty() { "no profile".to_string() } else { trained.join(", ") }
            ),
        })
    }

    /// Refuses VM targets (µs, `None`: no objective) outside the range the model was trained
    /// for, naming the VM, its target and the range.
    pub fn check_objectives(&self, targets: &[Option<f64>]) -> Result<(), ModelError> {
        let Some([lo, hi]) = self.meta.slo_range_us else { return Ok(()) };
        for (v, t) in targets.iter().enumerate() {
            if let Some(t) = t.filter(|t| !(lo * (1.0 - 1e-9)..=hi * (1.0 + 1e-9)).contains(t)) {
                return Err(ModelError::Mismatch {
                    path: self.dir.join(META_FILE),
                    message: format!(
                        "VM {v} has a p99 target of {t} µs, outside the {lo}–{hi} µs the model was trained for; \
                         give it a target in that range, or use a model trained for it (its experiment's \
                         [suite.generator] slo_p99_us or [suite] slo_p99_us)"
                    ),
                });
            }
        }
        Ok(())
    }

    /// Checks that the model can act for `vms` VMs (the actors share weights across VMs).
    pub fn check_vms(&self, vms: usize) -> Result<(), ModelError> {
        if vms == 0 || vms > 64 {
            return Err(ModelError::Mismatch {
                path: self.dir.clone(),
                message: format!("{vms} VMs: the model acts for 1..=64"),
            });
        }
        Ok(())
    }

    /// Mean actions for a batch of observations (all with `vms` VMs or fewer, padded). A model
    /// with history reads each row as the first interval (its previous interval is itself).
    pub fn mean_actions(&self, batch: &FeatureBatch) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        self.mean_actions_after(batch, None)
    }

    /// Mean actions for a batch whose previous interval is `prev` (the same rows, observed one
    /// interval earlier; `None`: the batch itself), read only by a model with `network.history`.
    pub fn mean_actions_after(
        &self,
        batch: &FeatureBatch,
        prev: Option<&FeatureBatch>,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let heads = |b: &FeatureBatch| HeadInputs::new(&b.normalized(&self.meta.normalizer, &self.ignored));
        let mode = self.meta.network.history;
        let x = heads(batch);
        let x = if mode.is_none() {
            x
        } else {
            let p = prev.map_or_else(|| x.clone(), heads);
            x.with_history(&p, mode)
        };
        let m = self.actor.means_of(&x.tensors(&self.device));
        let v = |t: burn::tensor::TensorData| t.convert::<f32>().try_into_vec::<f32>().unwrap_or_default();
        (v(m.nic.into_data()), v(m.backend.into_data()), v(m.frontend.into_data()))
    }
}

/// Targets of the monotone envelope: this many log-spaced points over a model's `slo_range_us`.
pub const TARGET_GRID: usize = 25;

/// A batch of the one observation `obs`, padded to `vms` VMs.
fn one_row(obs: &Observation, space: &ActionSpace, vms: usize) -> FeatureBatch {
    let mut b = FeatureBatch::new(vms);
    b.push(obs, space);
    b
}

/// VM `vm`'s p99 target in `obs`: the guest's own, else the host's list.
pub(crate) fn target_in(obs: &Observation, vm: usize) -> Option<f64> {
    obs.guests[vm].slo_p99_us.or(obs.host.slo_p99_us.get(vm).copied().flatten())
}

/// What a row of the monotone envelope's batch decides: a VM's path, the NIC, or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Row {
    Path,
    Alone,
    Both,
}

/// `obs` with VM `vm`'s target set to `t` (where the observation carries targets) and, with
/// `alone`, every other VM's target removed.
fn with_target(obs: &Observation, vm: usize, t: f64, alone: bool) -> Observation {
    let mut o = obs.clone();
    let on_host = !o.host.slo_p99_us.is_empty();
    if on_host {
        o.host.slo_p99_us.resize(o.guests.len(), None);
    }
    for (w, g) in o.guests.iter_mut().enumerate() {
        let value = if w == vm {
            Some(t)
        } else if alone {
            None
        } else {
            continue;
        };
        if on_host {
            o.host.slo_p99_us[w] = value;
        }
        if !on_host || g.slo_p99_us.is_some() || w == vm {
            g.slo_p99_us = value;
        }
    }
    o
}

impl LearnedPolicy {
    /// The decision with the monotone envelope over each VM's target (see the module docs): the
    /// knobs of VM `v`'s backend and frontend are the least coalescing the actor proposes for any
    /// grid target at or looser than `v`'s (snapped down to the grid), the NIC's the least over
    /// every VM with a target, each taken alone. A tighter target can then never coalesce more on
    /// that VM's path. VMs without a target keep the actor's plain decision for their layers.
    fn act_monotone(
        &self,
        obs: &Observation,
        prev: Option<&Observation>,
        targets: &[Option<f64>],
        [lo, hi]: [f64; 2],
    ) -> CoalescingSettings {
        let vms = obs.guests.len();
        let space = &self.meta.action_space;
        let grid: Vec<f64> = (0..TARGET_GRID)
            .map(|i| if hi > lo { lo * (hi / lo).powf(i as f64 / (TARGET_GRID - 1) as f64) } else { lo })
            .collect();
        let mut b = one_row(obs, space, vms);
        // Each row's previous interval (a model with history): `prev` with the same targets.
        let mut bp = prev.map(|p| one_row(p, space, vms));
        // Rows: 0 the observation as it is; then per VM with a target, its grid variants, each
        // once with the other VMs' targets as they are (its path) and once alone (the NIC); one
        // row serves both where no other VM has a target.
        let mut rows: Vec<(usize, Row)> = vec![(usize::MAX, Row::Path)];
        for (v, t) in targets.iter().enumerate() {
            let Some(t) = *t else { continue };
            let others = targets.iter().enumerate().any(|(w, t)| w != v && t.is_some());
            let kinds: &[Row] = if others { &[Row::Path, Row::Alone] } else { &[Row::Both] };
            let snapped = grid.iter().rposition(|&g| g <= t * (1.0 + 1e-9)).unwrap_or(0);
            for &g in &grid[snapped..] {
                for &kind in kinds {
                    b.push(&with_target(obs, v, g, kind == Row::Alone), space);
                    if let (Some(bp), Some(p)) = (bp.as_mut(), prev) {
                        bp.push(&with_target(p, v, g, kind == Row::Alone), space);
                    }
                    rows.push((v, kind));
                }
            }
        }
        let (nic, be, fe) = self.mean_actions_after(&b, bp.as_ref());
        let k = KNOBS_PER_LAYER;
        let min_into = |acc: &mut [f32], x: &[f32]| acc.iter_mut().zip(x).for_each(|(a, x)| *a = a.min(*x));
        let mut out_nic = vec![f32::INFINITY; k];
        let mut out_be = be[..vms * k].to_vec();
        let mut out_fe = fe[..vms * k].to_vec();
        for v in (0..vms).filter(|&v| targets[v].is_some()) {
            out_be[v * k..(v + 1) * k].fill(f32::INFINITY);
            out_fe[v * k..(v + 1) * k].fill(f32::INFINITY);
        }
        for (r, &(v, kind)) in rows.iter().enumerate().skip(1) {
            if kind != Row::Path {
                min_into(&mut out_nic, &nic[r * k..(r + 1) * k]);
            }
            if kind != Row::Alone {
                let at = (r * vms + v) * k;
                min_into(&mut out_be[v * k..(v + 1) * k], &be[at..at + k]);
                min_into(&mut out_fe[v * k..(v + 1) * k], &fe[at..at + k]);
            }
        }
        decode_means(space, vms, &out_nic, &out_be, &out_fe)
    }
}

/// Decodes mean actions of one observation (row 0 of a batch padded to `vms`) into settings.
pub fn decode_means(
    space: &ActionSpace,
    vms: usize,
    nic: &[f32],
    backend: &[f32],
    frontend: &[f32],
) -> CoalescingSettings {
    let k = KNOBS_PER_LAYER;
    let mut s = CoalescingSettings {
        nic: space.decode_layer(LayerKind::Nic, &nic[..k]),
        vms: Vec::with_capacity(vms),
    };
    for v in 0..vms {
        s.vms.push(VmSettings::new(
            space.decode_layer(LayerKind::Backend, &backend[v * k..(v + 1) * k]),
            space.decode_layer(LayerKind::Frontend, &frontend[v * k..(v + 1) * k]),
        ));
    }
    debug_assert!(LayerId::all(vms).count() == 1 + 2 * vms);
    s
}

impl Policy for LearnedPolicy {
    fn name(&self) -> &str {
        &self.name
    }

    /// Format 3 decides each NAPI layer's deferral.
    fn sets_deferral(&self) -> bool {
        true
    }

    fn check_profile(&self, profile: moderato_env::HostProfile) -> Result<(), String> {
        LearnedPolicy::check_profile(self, profile).map_err(|e| e.to_string())
    }

    fn follows_profile(&self) -> bool {
        true
    }

    fn act(&mut self, obs: &Observation) -> CoalescingSettings {
        let vms = obs.guests.len();
        // The previous interval (a model with history): the last observation seen (or the
        // decaying peak with this one in it), unless this is the first of an episode or the
        // host's VMs changed, when it is this one.
        let history = self.meta.network.history;
        let prev = if history.is_none() {
            None
        } else {
            let last = self.prev.take().filter(|p| p.guests.len() == vms);
            let (prev, keep) = history.advance(obs, last);
            self.prev = Some(keep);
            prev
        };
        let prev = prev.as_ref();
        let targets: Vec<Option<f64>> = (0..vms).map(|v| target_in(obs, v)).collect();
        if let (Some(range), true) = (self.meta.slo_range_us, targets.iter().any(Option::is_some)) {
            return self.act_monotone(obs, prev, &targets, range);
        }
        let space = &self.meta.action_space;
        let bp = prev.map(|p| one_row(p, space, vms));
        let (nic, be, fe) = self.mean_actions_after(&one_row(obs, space, vms), bp.as_ref());
        decode_means(&self.meta.action_space, vms, &nic, &be, &fe)
    }

    fn reset(&mut self) {
        self.prev = None;
    }

    fn requirements(&self) -> Requirements {
        let ignored = &self.meta.network.ignore_features;
        let keep = |names: &[String], probe: bool| -> Vec<String> {
            names
                .iter()
                .filter(|n| (probe || !n.contains(".probe_")) && !ignored.contains(n))
                .cloned()
                .collect()
        };
        let f = &self.meta.features;
        let mut host = keep(&f.host, self.meta.probes.host);
        host.extend(keep(&f.backend, true));
        Requirements { host, guest: keep(&f.guest, self.meta.probes.guest) }
    }
}
