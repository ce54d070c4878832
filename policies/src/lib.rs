//! # moderato-policies
//!
//! Everything that decides coalescing settings, behind one [`Policy`] trait: fixed baselines
//! (per-packet, static presets, the kernel documentation's NAPI-deferral recipes `napi:D/T`), ports of the kernel's adaptive algorithms (DIM, ixgbe ITR) that
//! run inside the layers through the environment's `LayerController` hook, the hindsight oracle
//! `best-static`, and the learned burn policy.
//!
//! A policy never does I/O and cannot fail at run time; loading is where errors live.

pub mod adaptive;
pub mod baselines;
pub mod best_static;
pub mod gains;
pub mod learned;
pub mod slo_feedback;

use moderato_env::live::NapiParams;
use moderato_env::{CoalescingSettings, Observation};

/// Decides the coalescing settings of every layer from one observation.
///
/// Deployed on one side of a host, a policy still returns whole settings; the caller applies the
/// part its side owns (the NIC and backends on the hypervisor, the frontend in a guest).
pub trait Policy: Send {
    fn name(&self) -> &str;
    fn act(&mut self, obs: &Observation) -> CoalescingSettings;
    /// Forgets any state carried between steps (start of an episode).
    fn reset(&mut self) {}
    /// What the policy reads; baselines that read nothing keep the default.
    fn requirements(&self) -> Requirements {
        Requirements::default()
    }
    /// The NAPI deferral a deploy sets on every interface of the side it is deployed on;
    /// `None` (the default): the interfaces keep their own. (In the simulator a policy's deferral
    /// is part of what [`act`](Self::act) returns, per layer.)
    fn napi(&self) -> Option<NapiParams> {
        None
    }
    /// Whether a deploy sets the per-layer NAPI deferral of [`act`](Self::act)'s settings (a
    /// learned policy trained with deferral); the default: only where [`napi`](Self::napi) says.
    fn sets_deferral(&self) -> bool {
        self.napi().is_some()
    }
    /// The IRQ-suspension timeout (`irq-suspend-timeout`, ns) a deploy sets on every NAPI instance
    /// of the guest side it is deployed on; `None` (the default): the instances keep their own.
    fn irq_suspend_timeout_ns(&self) -> Option<u64> {
        None
    }
    /// Refuses a host of `profile` this policy was not made for (a learned model trained on
    /// other profiles); the default takes any.
    fn check_profile(&self, _profile: moderato_env::HostProfile) -> Result<(), String> {
        Ok(())
    }
    /// Whether the policy decides only what its host's profile has (a learned model: its outputs
    /// for a mechanism the profile lacks were never trained), so that a deploy leaves a layer
    /// without ethtool coalescing in the profile as it is. The default: every layer is set.
    fn follows_profile(&self) -> bool {
        false
    }
    /// Whether [`act`](Self::act)'s coalescing settings are to be applied. A NAPI-deferral
    /// baseline returns `false`: the interfaces' coalescing knobs stay as they are.
    fn sets_coalescing(&self) -> bool {
        true
    }
    /// Why a live host cannot run this policy, if it cannot (a simulated-only mechanism); a
    /// deploy refuses it with this sentence. The default: it can.
    fn live_refusal(&self) -> Option<String> {
        None
    }
}

impl<P: Policy + ?Sized> Policy for Box<P> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn act(&mut self, obs: &Observation) -> CoalescingSettings {
        (**self).act(obs)
    }
    fn reset(&mut self) {
        (**self).reset()
    }
    fn requirements(&self) -> Requirements {
        (**self).requirements()
    }
    fn napi(&self) -> Option<NapiParams> {
        (**self).napi()
    }
    fn sets_coalescing(&self) -> bool {
        (**self).sets_coalescing()
    }
    fn sets_deferral(&self) -> bool {
        (**self).sets_deferral()
    }
    fn irq_suspend_timeout_ns(&self) -> Option<u64> {
        (**self).irq_suspend_timeout_ns()
    }
    fn check_profile(&self, profile: moderato_env::HostProfile) -> Result<(), String> {
        (**self).check_profile(profile)
    }
    fn follows_profile(&self) -> bool {
        (**self).follows_profile()
    }
    fn live_refusal(&self) -> Option<String> {
        (**self).live_refusal()
    }
}

/// What a policy reads from observations, so that a host that cannot provide it refuses the policy
/// at start rather than feeding it zeros.
///
/// Feature names come from `moderato_env::{HOST_FEATURES, BACKEND_FEATURES}` (the `host` side:
/// what `deploy --role host` must provide) and `moderato_env::GUEST_FEATURES` (the `guest` side).
/// A side a policy does not read on is empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Requirements {
    /// Host-side features read when deployed on the hypervisor.
    pub host: Vec<String>,
    /// Guest-side features read when deployed inside a VM.
    pub guest: Vec<String>,
}
