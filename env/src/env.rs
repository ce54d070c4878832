//! The `Env` seam: one Gymnasium-shaped loop drives the simulator and a live host.

use std::path::PathBuf;

use crate::info::{EpisodeSummary, Info};
use crate::obs::{BACKEND_FEATURES, Feature, GUEST_FEATURES, HOST_FEATURES, Observation};
use crate::settings::{ActionSpace, CoalescingSettings};

/// What an environment looks like from outside: its VMs, features and action bounds.
#[derive(Debug, Clone, PartialEq)]
pub struct EnvSpec {
    /// Number of VMs on the host (each has a backend and a frontend layer).
    pub vms: usize,
    pub action_space: ActionSpace,
    /// Length of one control interval.
    pub interval_ns: u64,
    /// Steps until `truncated`; `None` for a live host that runs until stopped.
    pub max_steps: Option<u32>,
    /// Whether a host-side latency probe exists.
    pub host_probe: bool,
    /// Whether guest application latency probes exist.
    pub guest_probe: bool,
    /// The p99 latency target (µs) the run is judged against, where one is set: the simulator's
    /// `[sim.reward] slo_p99_us`, a deploy config's `[slo] p99_us`. Policies that steer to a
    /// target (`slo-feedback`) take it from here.
    pub slo_p99_us: Option<f64>,
    /// Each VM's own p99 target (µs), `None` for a VM without a latency objective; empty where
    /// the environment does not know them (then `slo_p99_us` applies to every VM).
    pub vm_slo_p99_us: Vec<Option<f64>>,
    /// The host's moderation mechanisms (the scenario's profile, a deploy config's `profile`).
    pub profile: crate::HostProfile,
}

impl EnvSpec {
    pub fn host_features(&self) -> &'static [Feature] {
        HOST_FEATURES
    }
    pub fn backend_features(&self) -> &'static [Feature] {
        BACKEND_FEATURES
    }
    pub fn guest_features(&self) -> &'static [Feature] {
        GUEST_FEATURES
    }
}

/// One step's result. `terminated` ends the MDP (do not bootstrap); `truncated` is a time limit
/// (bootstrap from `obs`).
#[derive(Debug, Clone)]
pub struct Step {
    pub obs: Observation,
    pub reward: f32,
    pub terminated: bool,
    pub truncated: bool,
    pub info: Info,
}

/// Errors of environments. Each carries the input that caused it.
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("invalid scenario `{scenario}`: {message}")]
    Scenario { scenario: String, message: String },
    #[error("action does not fit this environment: {0}")]
    Action(String),
    #[error("{0}")]
    Unsupported(String),
    /// An I/O error, with what was being done (the error is part of the message, not a source,
    /// so that error chains do not print it twice).
    #[error("{context}: {err}")]
    Io { context: String, err: std::io::Error },
    #[error("{0}")]
    Live(String),
}

/// A Gymnasium-shaped environment.
pub trait Env {
    fn spec(&self) -> &EnvSpec;
    /// Starts an episode; the seed fixes every random draw of the episode.
    fn reset(&mut self, seed: u64) -> Result<(Observation, Info), EnvError>;
    /// Applies `action` for one control interval and reports what happened.
    fn step(&mut self, action: &CoalescingSettings) -> Result<Step, EnvError>;
    /// Ground truth of the episode so far, where the environment has any.
    fn episode_summary(&self) -> Option<EpisodeSummary> {
        None
    }
}

impl<E: Env + ?Sized> Env for Box<E> {
    fn spec(&self) -> &EnvSpec {
        (**self).spec()
    }
    fn reset(&mut self, seed: u64) -> Result<(Observation, Info), EnvError> {
        (**self).reset(seed)
    }
    fn step(&mut self, action: &CoalescingSettings) -> Result<Step, EnvError> {
        (**self).step(action)
    }
    fn episode_summary(&self) -> Option<EpisodeSummary> {
        (**self).episode_summary()
    }
}
