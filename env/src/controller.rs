//! The hook through which adaptive in-layer algorithms (DIM, ITR) run inside an environment, at
//! notification granularity, exactly as Linux drivers run `net_dim`.
//!
//! The algorithms themselves live in `moderato-policies`; an environment receives a
//! [`ControllerFactory`] and asks it for a controller whenever a layer's [`Moderation`] is
//! [`Moderation::Adaptive`](crate::Moderation::Adaptive).

use crate::settings::{Adaptive, Direction, Knobs, LayerId};

/// What a driver hands to `net_dim` after each interrupt's poll (`struct dim_sample`): a timestamp
/// and cumulative counters that wrap at their kernel widths.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DriverSample {
    /// Time of the sample (`ktime`), nanoseconds.
    pub time_ns: u64,
    /// Notifications (interrupts) so far; wraps at 2^16 like the kernel's `u16 event_ctr`.
    pub event_ctr: u16,
    /// Packets so far; wraps at 2^32.
    pub pkt_ctr: u32,
    /// Bytes so far; wraps at 2^32.
    pub byte_ctr: u32,
}

/// An adaptive algorithm that owns one notification stream's knobs.
pub trait LayerController: Send + std::fmt::Debug {
    /// The knobs the stream starts with when the algorithm takes over.
    fn initial(&self) -> Knobs;
    /// Called after every notification of the stream; returns new knobs when it changes them.
    fn on_notification(&mut self, sample: &DriverSample) -> Option<Knobs>;
}

/// Builds controllers for adaptive modes. `None` means the factory does not implement `mode`.
pub trait ControllerFactory: Send + Sync + std::fmt::Debug {
    fn create(&self, mode: Adaptive, layer: LayerId, dir: Direction) -> Option<Box<dyn LayerController>>;
}
