//! Fixed baselines: what an operator runs without a learned policy.
//!
//! - `per-packet`: no coalescing anywhere (`usecs 0`, `frames 1`).
//! - `static:<preset>`: common driver defaults ([`PRESETS`]); `static:<usecs>/<frames>` sets every
//!   layer and direction to those knobs; a named knob set from a config (`[static.<name>]`) is
//!   `static:<name>`.
//! - `dim`, `itr`: the kernel's adaptive algorithms, run inside every layer and direction by the
//!   environment (`adaptive-rx/tx on`).
//!
//! `best-static` (the hindsight oracle over fixed settings) is a search, not a fixed policy; see
//! [`crate::best_static`].

use std::collections::BTreeMap;

use moderato_env::{Adaptive, CoalescingSettings, Knobs, LayerSettings, Observation, VmSettings};
use serde::{Deserialize, Serialize};

use crate::Policy;

/// A whole static setting by layer kind: the NIC, and every VM's backend and frontend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticSpec {
    pub nic: LayerKnobs,
    pub backend: LayerKnobs,
    pub frontend: LayerKnobs,
}

/// Fixed knobs of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerKnobs {
    pub rx: Knobs,
    pub tx: Knobs,
}

impl LayerKnobs {
    pub const PER_PACKET: LayerKnobs = LayerKnobs { rx: Knobs::PER_PACKET, tx: Knobs::PER_PACKET };
    pub const fn both(k: Knobs) -> Self {
        LayerKnobs { rx: k, tx: k }
    }
    fn settings(self) -> LayerSettings {
        LayerSettings::fixed(self.rx, self.tx)
    }
}

impl StaticSpec {
    pub const fn uniform(k: Knobs) -> Self {
        StaticSpec { nic: LayerKnobs::both(k), backend: LayerKnobs::both(k), frontend: LayerKnobs::both(k) }
    }

    /// The settings for a host with `vms` VMs.
    pub fn settings(&self, vms: usize) -> CoalescingSettings {
        CoalescingSettings {
            nic: self.nic.settings(),
            vms: vec![
                VmSettings { backend: self.backend.settings(), frontend: self.frontend.settings() };
                vms
            ],
        }
    }
}

/// Driver defaults. The virtual layers stay per-packet in the driver presets, as virtio-net ships.
pub const PRESETS: &[(&str, &str, StaticSpec)] = &[
    (
        "ixgbe",
        "Intel ixgbe-like: NIC 50 µs timer only (rx-frames 0), virtual layers per-packet",
        StaticSpec {
            nic: LayerKnobs::both(Knobs::new(50, 0)),
            backend: LayerKnobs::PER_PACKET,
            frontend: LayerKnobs::PER_PACKET,
        },
    ),
    (
        "mlx5",
        "Mellanox mlx5-like: NIC 16 µs / 32 frames, virtual layers per-packet",
        StaticSpec {
            nic: LayerKnobs::both(Knobs::new(16, 32)),
            backend: LayerKnobs::PER_PACKET,
            frontend: LayerKnobs::PER_PACKET,
        },
    ),
    ("moderate", "every layer 16 µs / 16 frames", StaticSpec::uniform(Knobs::new(16, 16))),
    (
        "heavy",
        "every layer 256 µs / 128 frames: lowest CPU, highest latency",
        StaticSpec::uniform(Knobs::new(256, 128)),
    ),
];

/// Fixed settings from a [`StaticSpec`].
#[derive(Debug, Clone)]
pub struct StaticPolicy {
    name: String,
    spec: StaticSpec,
}

impl StaticPolicy {
    pub fn new(name: impl Into<String>, spec: StaticSpec) -> Self {
        StaticPolicy { name: name.into(), spec }
    }
    pub fn per_packet() -> Self {
        Self::new("per-packet", StaticSpec::uniform(Knobs::PER_PACKET))
    }
    pub fn spec(&self) -> &StaticSpec {
        &self.spec
    }
}

impl Policy for StaticPolicy {
    fn name(&self) -> &str {
        &self.name
    }
    fn act(&mut self, obs: &Observation) -> CoalescingSettings {
        self.spec.settings(obs.guests.len())
    }
}

/// Exact per-VM fixed settings (what `best-static` finds).
#[derive(Debug, Clone)]
pub struct FixedPolicy {
    name: String,
    settings: CoalescingSettings,
}

impl FixedPolicy {
    pub fn new(name: impl Into<String>, settings: CoalescingSettings) -> Self {
        FixedPolicy { name: name.into(), settings }
    }
}

impl Policy for FixedPolicy {
    fn name(&self) -> &str {
        &self.name
    }
    fn act(&mut self, _obs: &Observation) -> CoalescingSettings {
        self.settings.clone()
    }
}

/// Hands every layer and direction to an in-layer adaptive algorithm.
#[derive(Debug, Clone)]
pub struct AdaptivePolicy {
    mode: Adaptive,
}

impl AdaptivePolicy {
    pub fn new(mode: Adaptive) -> Self {
        AdaptivePolicy { mode }
    }
}

impl Policy for AdaptivePolicy {
    fn name(&self) -> &str {
        self.mode.name()
    }
    fn act(&mut self, obs: &Observation) -> CoalescingSettings {
        CoalescingSettings::uniform(obs.guests.len(), LayerSettings::adaptive(self.mode))
    }
}

/// A baseline name that does not exist, with every valid name.
#[derive(Debug, thiserror::Error)]
#[error("unknown policy `{name}`: valid names are {}", valid.join(", "))]
pub struct UnknownPolicy {
    pub name: String,
    pub valid: Vec<String>,
}

/// Every baseline name (with `customs`, the config's own knob sets).
pub fn baseline_names(customs: &BTreeMap<String, StaticSpec>) -> Vec<String> {
    let mut v = vec!["per-packet".to_string(), "dim".into(), "itr".into(), "best-static".into()];
    v.extend(PRESETS.iter().map(|p| format!("static:{}", p.0)));
    v.extend(customs.keys().map(|k| format!("static:{k}")));
    v.push("static:<usecs>/<frames>".into());
    v
}

/// Parses `U/F` knobs (`16/32`).
pub fn parse_knobs(s: &str) -> Option<Knobs> {
    let (u, f) = s.split_once('/')?;
    Some(Knobs::new(u.trim().parse().ok()?, f.trim().parse().ok()?))
}

/// The static spec behind `static:<what>`, if it names one.
pub fn static_spec(what: &str, customs: &BTreeMap<String, StaticSpec>) -> Option<StaticSpec> {
    if let Some(s) = customs.get(what) {
        return Some(*s);
    }
    if let Some(p) = PRESETS.iter().find(|p| p.0 == what) {
        return Some(p.2);
    }
    parse_knobs(what).map(StaticSpec::uniform)
}

/// A fixed baseline by name. `best-static` is not one: it needs a search (see
/// [`crate::best_static`]), so it is refused here with that explanation.
pub fn baseline(
    name: &str,
    customs: &BTreeMap<String, StaticSpec>,
) -> Result<Box<dyn Policy>, UnknownPolicy> {
    let unknown = || UnknownPolicy { name: name.to_string(), valid: baseline_names(customs) };
    match name {
        "per-packet" => Ok(Box::new(StaticPolicy::per_packet())),
        "dim" => Ok(Box::new(AdaptivePolicy::new(Adaptive::Dim))),
        "itr" => Ok(Box::new(AdaptivePolicy::new(Adaptive::Itr))),
        _ => {
            let what = name.strip_prefix("static:").ok_or_else(unknown)?;
            let spec = static_spec(what, customs).ok_or_else(unknown)?;
            Ok(Box::new(StaticPolicy::new(name, spec)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(vms: usize) -> Observation {
        Observation { guests: vec![Default::default(); vms], ..Default::default() }
    }

    #[test]
    fn names_resolve_and_unknown_names_list_the_valid_ones() {
        let none = BTreeMap::new();
        for n in ["per-packet", "dim", "itr", "static:ixgbe", "static:mlx5", "static:heavy", "static:8/16"] {
            let mut p = baseline(n, &none).unwrap();
            assert_eq!(p.name(), n);
            assert_eq!(p.act(&obs(2)).vms.len(), 2);
        }
        let e = baseline("static:fast", &none).err().unwrap().to_string();
        assert!(e.contains("static:fast") && e.contains("static:mlx5") && e.contains("per-packet"), "{e}");
        let e = baseline("dimm", &none).err().unwrap().to_string();
        assert!(e.contains("valid names are"), "{e}");
    }

    #[test]
    fn presets_and_custom_sets() {
        let mut customs = BTreeMap::new();
        customs.insert("mine".to_string(), StaticSpec::uniform(Knobs::new(7, 3)));
        let mut p = baseline("static:mine", &customs).unwrap();
        let s = p.act(&obs(1));
        assert_eq!(s.vms[0].frontend.rx, moderato_env::Moderation::fixed(7, 3));
        let ixgbe = static_spec("ixgbe", &customs).unwrap();
        assert_eq!(ixgbe.nic.rx, Knobs::new(50, 0));
        assert_eq!(ixgbe.frontend.rx, Knobs::PER_PACKET);
    }
}
