//! # moderato-env
//!
//! Environments for learned interrupt moderation on virtualized hosts, behind one Gymnasium-shaped
//! [`Env`] trait:
//!
//! - [`sim`]: a discrete-event simulator of a host whose physical NIC is shared by VMs, each with a
//!   backend (Xen netback / vhost) and a frontend (netfront / virtio-net) driver. Every layer
//!   coalesces its notifications with ethtool's four knobs.
//! - [`live`]: a real Linux host, read through procfs/sysfs and driven through ethtool netlink.
//!
//! The action is a typed [`CoalescingSettings`]; observations ([`Observation`]) hold only what a host
//! can measure, split by side (hypervisor / guest); ground truth goes to [`Info`]. This crate has no
//! ML dependency: learned policies live in `moderato-policies`.

mod check;
mod controller;
mod env;
mod info;
mod obs;
mod profile;
mod reward;
mod settings;

pub mod live;
pub mod random;
pub mod sim;

pub use check::check_env;
pub use controller::{ControllerFactory, DriverSample, LayerController};
pub use env::{Env, EnvError, EnvSpec, Step};
pub use info::{
    CpuBreakdown, CpuSplit, EpisodeSummary, Info, IntervalTruth, LatencyStats, PollCounts, VmTruth,
};
pub use obs::{
    BACKEND_FEATURES, CpuObs, Feature, GUEST_FEATURES, GuestObs, HOST_FEATURES, HostObs, InterfaceObs,
    Observation, ProbeObs, feature_names,
};
pub use profile::{HostProfile, LayerMechanisms};
pub use reward::{ExcessShape, RewardConfig, RewardTerms};
pub use settings::{
    ActionSpace, Adaptive, AppPolling, COALESCING_KNOBS, CoalescingSettings, Direction, KNOB_NAMES,
    KNOBS_PER_LAYER, KnobBounds, Knobs, LayerId, LayerKind, LayerSettings, Moderation, NapiBounds,
    NapiParams, VmSettings,
};
