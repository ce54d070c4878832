//! Fixed baselines: what an operator runs without a learned policy.
//!
//! - `per-packet`: no coalescing anywhere (`usecs 0`, `frames 1`).
//! - `static:<preset>`: common driver defaults ([`PRESETS`]); `static:<usecs>/<frames>` sets every
//!   layer and direction to those knobs; `static:nic=20/32,backend=0/1,frontend=8/16` sets each
//!   layer kind (both directions, or one with `nic.rx=20/32`; a layer not named stays
//!   per-packet); a named knob set from a config (`[static.<name>]`) is `static:<name>`.
//!
//! Knobs beyond the action space's bounds are refused by [`check_bounds`], never clamped
//! silently: the simulator would clamp them, and `static:1000000/4` would quietly be
//! `static:1000/4`.
//! - `dim`, `itr`: the kernel's adaptive algorithms, run inside every layer and direction by the
//!   environment (`adaptive-rx/tx on`).
//! - `slo-feedback` (each VM's own target, the run's SLO for VMs the observation gives none) or
//!   `slo-feedback:<p99_us>` (one target for every VM): AIMD feedback on each VM's probe p99
//!   ([`crate::slo_feedback`]).
//! - `napi:<defer>/<timeout_us>`: the NAPI recipes of the kernel documentation
//!   (Documentation/networking/napi.rst): `napi_defer_hard_irqs = defer` and
//!   `gro_flush_timeout = timeout_us` µs on every interface of the side it is deployed on (e.g.
//!   `napi:2/20`: 2 empty polls, 20 µs = 20000 ns); a deploy leaves the coalescing knobs as they
//!   are, the simulator runs them per-packet (the kernel's default where a profile has no
//!   knobs) with the deferral on the NIC and every frontend.
//!
//! - `busy-poll:<us>`: every guest application busy-polls its rx NAPI for up to `us` µs before it
//!   sleeps (epoll `busy_poll_usecs` with `prefer_busy_poll`), coalescing per-packet.
//! - `irq-suspend:<busy_us>/<timeout_us>[/<defer>/<gro_us>]`: the same with IRQ suspension
//!   (`irq-suspend-timeout`, Linux ≥ 6.13) and the guest's deferral (default 2/20) as what takes
//!   over when an application sleeps: the kernel documentation's IRQ-suspension set-up, e.g.
//!   `irq-suspend:50/20000` (see [`moderato_env::AppPolling`]). A deploy refuses `busy-poll:`; of
//!   `irq-suspend:` it sets the kernel's half on a guest (the deferral, `irq-suspend-timeout`).
//!
//! `best-static` (the hindsight oracle over fixed settings) is a search, not a fixed policy; see
//! [`crate::best_static`].

use std::collections::BTreeMap;

use moderato_env::live::NapiParams;
use moderato_env::live::napi::{DEFER_HARD_IRQS_MAX, GRO_FLUSH_TIMEOUT_NS_MAX};
use moderato_env::{
    ActionSpace, Adaptive, AppPolling, CoalescingSettings, Direction, Knobs, LayerKind, LayerSettings,
    Observation, VmSettings,
};
use serde::{Deserialize, Serialize};

use crate::Policy;
use crate::slo_feedback::{Gains, SloFeedbackPolicy};

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
            vms: vec![VmSettings::new(self.backend.settings(), self.frontend.settings()); vms],
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

/// NAPI deferral on every interface ([`Policy::napi`]); coalescing is not touched
/// ([`Policy::sets_coalescing`] is `false`).
#[derive(Debug, Clone)]
pub struct NapiPolicy {
    name: String,
    params: NapiParams,
}

impl NapiPolicy {
    pub fn new(name: impl Into<String>, params: NapiParams) -> Self {
        NapiPolicy { name: name.into(), params }
    }
    pub fn params(&self) -> NapiParams {
        self.params
    }
}

impl Policy for NapiPolicy {
    fn name(&self) -> &str {
        &self.name
    }
    /// The deferral on the NIC and every frontend (the NAPI layers; a profile's host keeps what
    /// it has), the coalescing knobs per-packet: the simulator applies this. A deploy leaves
    /// the interfaces' own knobs alone ([`sets_coalescing`](Policy::sets_coalescing) is `false`)
    /// and sets [`napi`](Policy::napi) on every interface of its side.
    fn act(&mut self, obs: &Observation) -> CoalescingSettings {
        let mut s = CoalescingSettings::uniform(obs.guests.len(), LayerSettings::PER_PACKET);
        s.nic.napi = self.params;
        for vm in &mut s.vms {
            vm.frontend.napi = self.params;
        }
        s
    }
    fn napi(&self) -> Option<NapiParams> {
        Some(self.params)
    }
    fn sets_coalescing(&self) -> bool {
        false
    }
}

/// The guest applications' busy polling, with IRQ suspension where set, and the guest's
/// deferral as what takes over when an application sleeps (`busy-poll:`, `irq-suspend:`);
/// the coalescing knobs per-packet. The busy poll is each application's own epoll setting, so a
/// deploy refuses `busy-poll:`; of `irq-suspend:` it sets the kernel's half on the guest (the
/// deferral and every NAPI instance's `irq-suspend-timeout`), leaving coalescing as it is.
#[derive(Debug, Clone)]
pub struct PollingPolicy {
    name: String,
    polling: AppPolling,
    napi: NapiParams,
}

impl PollingPolicy {
    pub fn new(name: impl Into<String>, polling: AppPolling, napi: NapiParams) -> Self {
        PollingPolicy { name: name.into(), polling, napi }
    }
}

impl Policy for PollingPolicy {
    fn name(&self) -> &str {
        &self.name
    }
    fn act(&mut self, obs: &Observation) -> CoalescingSettings {
        let mut s = CoalescingSettings::uniform(obs.guests.len(), LayerSettings::PER_PACKET);
        for vm in &mut s.vms {
            vm.frontend.napi = self.napi;
            vm.polling = self.polling;
        }
        s
    }
    fn napi(&self) -> Option<NapiParams> {
        self.irq_suspend_timeout_ns().map(|_| self.napi)
    }
    fn irq_suspend_timeout_ns(&self) -> Option<u64> {
        (self.polling.irq_suspend_timeout_us > 0)
            .then(|| u64::from(self.polling.irq_suspend_timeout_us) * 1_000)
    }
    fn sets_coalescing(&self) -> bool {
        false
    }
    fn live_refusal(&self) -> Option<String> {
        (self.polling.irq_suspend_timeout_us == 0).then(|| {
            format!(
                "policy `{}` is simulated only: busy polling is each application's own epoll setting \
                 (EPIOCSPARAMS busy_poll_usecs, prefer_busy_poll); moderato cannot set it from outside. Deploy \
                 napi:<defer>/<timeout_us> for the deferral, irq-suspend:<busy_us>/<timeout_us> for the kernel's half \
                 of IRQ suspension, or a model",
                self.name
            )
        })
    }
}

/// The deferral `irq-suspend:` gives the guest unless its name sets one: 2 empty polls × 20 µs.
pub const IRQ_SUSPEND_DEFERRAL: NapiParams = NapiParams::new(2, 20_000);

/// Parses `busy-poll:<us>` and `irq-suspend:<busy_us>/<timeout_us>[/<defer>/<gro_us>]`.
pub fn parse_polling(name: &str) -> Result<Option<(AppPolling, NapiParams)>, String> {
    let num = |v: &str, what: &str, form: &str| -> Result<u32, String> {
        v.trim()
            .parse()
            .map_err(|e| format!("{what} `{v}` is not a whole number of microseconds ({e}); write {form}"))
    };
    if let Some(b) = name.strip_prefix("busy-poll:") {
        let form = "busy-poll:<busy_poll_us> (e.g. busy-poll:50)";
        let busy_poll_us = num(b, "busy_poll_us", form)?;
        if busy_poll_us == 0 {
            return Err(format!("busy_poll_us 0 is no busy polling; write {form}"));
        }
        return Ok(Some((AppPolling { busy_poll_us, irq_suspend_timeout_us: 0 }, NapiParams::OFF)));
    }
    let Some(rest) = name.strip_prefix("irq-suspend:") else { return Ok(None) };
    let form = "irq-suspend:<busy_poll_us>/<irq_suspend_timeout_us>[/<defer>/<gro_flush_timeout_us>] \
                (e.g. irq-suspend:50/20000)";
    let parts: Vec<&str> = rest.split('/').collect();
    let (b, t, napi) = match parts[..] {
        [b, t] => (b, t, IRQ_SUSPEND_DEFERRAL),
        [b, t, d, g] => (b, t, parse_napi(&format!("{d}/{g}"))?),
        _ => return Err(format!("`{rest}` is not <busy_poll_us>/<irq_suspend_timeout_us>; write {form}")),
    };
    let p = AppPolling {
        busy_poll_us: num(b, "busy_poll_us", form)?,
        irq_suspend_timeout_us: num(t, "irq_suspend_timeout_us", form)?,
    };
    if p.irq_suspend_timeout_us == 0 {
        return Err(format!(
            "irq_suspend_timeout_us 0 is no suspension (busy-poll:<us> is that); write {form}"
        ));
    }
    p.check()?;
    Ok(Some((p, napi)))
}

/// Parses the `<defer>/<timeout_us>` of `napi:<defer>/<timeout_us>` into the kernel's values
/// (the timeout in ns), within what the kernel accepts; the error says which value is wrong.
pub fn parse_napi(what: &str) -> Result<NapiParams, String> {
    let form = "napi:<defer>/<timeout_us> (e.g. napi:2/20: napi_defer_hard_irqs 2, gro_flush_timeout 20 µs)";
    let Some((d, t)) = what.split_once('/') else {
        return Err(format!("`{what}` is not <defer>/<timeout_us>; write {form}"));
    };
    let defer: u32 = d.trim().parse().map_err(|e| {
        format!(
            "defer `{d}` is not a whole number of polls from 0 to {DEFER_HARD_IRQS_MAX} ({e}); write {form}"
        )
    })?;
    let timeout_us: u64 = t
        .trim()
        .parse()
        .map_err(|e| format!("timeout `{t}` is not a whole number of microseconds ({e}); write {form}"))?;
    let timeout_ns =
        timeout_us.checked_mul(1000).filter(|ns| *ns <= GRO_FLUSH_TIMEOUT_NS_MAX).ok_or_else(|| {
            format!(
                "timeout {timeout_us} µs is above {} µs, the most gro_flush_timeout the kernel's timer holds",
                GRO_FLUSH_TIMEOUT_NS_MAX / 1000
            )
        })?;
    let p = NapiParams::new(defer, timeout_ns);
    p.check().map_err(|e| format!("defer {defer}: {e}"))?;
    Ok(p)
}

/// A baseline name that does not exist or does not parse.
#[derive(Debug, thiserror::Error)]
pub enum UnknownPolicy {
    /// No baseline has this name; `valid` lists every name there is.
    #[error("unknown policy `{name}`: valid names are {}", valid.join(", "))]
    Unknown { name: String, valid: Vec<String> },
    /// A per-layer `static:` setting that does not parse, and why.
    #[error("policy `{name}`: {why}")]
    Malformed { name: String, why: String },
}

/// Every fixed baseline name (with `customs`, the config's own knob sets). `best-static` is not
/// among them: only `moderato eval` searches for it.
pub fn baseline_names(customs: &BTreeMap<String, StaticSpec>) -> Vec<String> {
    let mut v = vec!["per-packet".to_string(), "dim".into(), "itr".into(), "slo-feedback".into()];
    v.push("slo-feedback:<p99_us>".into());
    v.extend(PRESETS.iter().map(|p| format!("static:{}", p.0)));
    v.extend(customs.keys().map(|k| format!("static:{k}")));
    v.push("static:<usecs>/<frames>".into());
    v.push("static:nic=<u>/<f>,backend=<u>/<f>,frontend=<u>/<f>".into());
    v.push("napi:<defer>/<timeout_us>".into());
    v.push("busy-poll:<us>".into());
    v.push("irq-suspend:<busy_us>/<timeout_us>".into());
    v
}

/// Parses `U/F` knobs (`16/32`).
pub fn parse_knobs(s: &str) -> Option<Knobs> {
    let (u, f) = s.split_once('/')?;
    Some(Knobs::new(u.trim().parse().ok()?, f.trim().parse().ok()?))
}

/// Parses per-layer knobs, `nic=20/32,backend=0/1,frontend=8/16` (`nic.rx=20/32` sets one
/// direction); layers not named stay per-packet. `Ok(None)`: not this syntax (no `=`).
pub fn parse_layers(s: &str) -> Result<Option<StaticSpec>, String> {
    if !s.contains('=') {
        return Ok(None);
    }
    let mut spec = StaticSpec::uniform(Knobs::PER_PACKET);
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((key, value)) = part.split_once('=') else {
            return Err(format!("`{part}` is not <layer>=<usecs>/<frames> (e.g. nic=20/32)"));
        };
        let (layer, dir) = match key.trim().split_once('.') {
            Some((l, d)) => (l, Some(d)),
            None => (key.trim(), None),
        };
        let Some(kind) = LayerKind::ALL.into_iter().find(|k| k.name() == layer) else {
            return Err(format!("`{layer}` in `{part}` is not a layer: use nic, backend or frontend"));
        };
        let Some(k) = parse_knobs(value) else {
            return Err(format!("`{value}` in `{part}` is not <usecs>/<frames> (e.g. 20/32)"));
        };
        let lk = match kind {
            LayerKind::Nic => &mut spec.nic,
            LayerKind::Backend => &mut spec.backend,
            LayerKind::Frontend => &mut spec.frontend,
        };
        match dir {
            None => *lk = LayerKnobs::both(k),
            Some("rx") => lk.rx = k,
            Some("tx") => lk.tx = k,
            Some(d) => return Err(format!("`{d}` in `{part}` is not a direction: use rx or tx")),
        }
    }
    Ok(Some(spec))
}

/// The static spec behind `static:<what>`, if it names one.
pub fn static_spec(what: &str, customs: &BTreeMap<String, StaticSpec>) -> Option<StaticSpec> {
    if let Some(s) = customs.get(what) {
        return Some(*s);
    }
    if let Some(p) = PRESETS.iter().find(|p| p.0 == what) {
        return Some(p.2);
    }
    if let Ok(Some(s)) = parse_layers(what) {
        return Some(s);
    }
    parse_knobs(what).map(StaticSpec::uniform)
}

/// A knob beyond the bounds of the action space (the simulator's and the learned policies'
/// range).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "policy `{policy}`: {layer} {dir} {knob} = {value} is beyond the action space's bound {max} \
     (bounds: [sim.action_space] {layer}.usecs_max, {layer}.frames_max; raise the bound or lower the knob)"
)]
pub struct OutOfBounds {
    pub policy: String,
    pub layer: &'static str,
    pub dir: &'static str,
    pub knob: &'static str,
    pub value: u32,
    pub max: u32,
}

/// Refuses a static setting with a knob beyond `space`'s bounds (the environment would clamp it
/// without a word).
pub fn check_bounds(policy: &str, spec: &StaticSpec, space: &ActionSpace) -> Result<(), OutOfBounds> {
    for (kind, lk) in
        [(LayerKind::Nic, spec.nic), (LayerKind::Backend, spec.backend), (LayerKind::Frontend, spec.frontend)]
    {
        let b = space.bounds(kind);
        for (dir, k) in [(Direction::Rx, lk.rx), (Direction::Tx, lk.tx)] {
            let err = |knob, value, max| OutOfBounds {
                policy: policy.to_string(),
                layer: kind.name(),
                dir: if dir == Direction::Rx { "rx" } else { "tx" },
                knob,
                value,
                max,
            };
            if k.usecs > b.usecs_max {
                return Err(err("usecs", k.usecs, b.usecs_max));
            }
            if k.frames > b.frames_max {
                return Err(err("frames", k.frames, b.frames_max));
            }
        }
    }
    Ok(())
}

/// A fixed baseline by name. `best-static` is not one: it needs a search (see
/// [`crate::best_static`]), so it is refused here. `slo-feedback` without a target is refused
/// too: use [`baseline_for`] with the run's SLO, or name the target (`slo-feedback:150`).
pub fn baseline(
    name: &str,
    customs: &BTreeMap<String, StaticSpec>,
) -> Result<Box<dyn Policy>, UnknownPolicy> {
    baseline_for(name, customs, None)
}

/// Bounds of an `slo-feedback` target, µs (those of `[sim.reward] slo_p99_us`).
pub const SLO_TARGET_US: (f64, f64) = (1.0, 10_000_000.0);

/// Parses the target of `slo-feedback:<p99_us>`.
pub fn parse_slo_target(name: &str, s: &str) -> Result<f64, UnknownPolicy> {
    let bad = |why: String| UnknownPolicy::Malformed { name: name.to_string(), why };
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| bad(format!("`{s}` is not a p99 target in µs (e.g. slo-feedback:200)")))?;
    if !(v.is_finite() && (SLO_TARGET_US.0..=SLO_TARGET_US.1).contains(&v)) {
        return Err(bad(format!("target {v} µs is outside {}..={} µs", SLO_TARGET_US.0, SLO_TARGET_US.1)));
    }
    Ok(v)
}

/// Whether `name` is a baseline, without making one: `slo-feedback` is, though its target comes
/// from the run that instantiates it.
pub fn check_name(name: &str, customs: &BTreeMap<String, StaticSpec>) -> Result<(), UnknownPolicy> {
    if name == "slo-feedback" {
        return Ok(());
    }
    baseline(name, customs).map(|_| ())
}

/// [`baseline`], with the run's p99 target (µs) for `slo-feedback` where the run has one.
pub fn baseline_for(
    name: &str,
    customs: &BTreeMap<String, StaticSpec>,
    slo_p99_us: Option<f64>,
) -> Result<Box<dyn Policy>, UnknownPolicy> {
    baseline_with(name, customs, slo_p99_us, Gains::default())
}

/// [`baseline_for`], with `slo-feedback`'s gains (a config's `[slo_feedback]` table).
pub fn baseline_with(
    name: &str,
    customs: &BTreeMap<String, StaticSpec>,
    slo_p99_us: Option<f64>,
    gains: Gains,
) -> Result<Box<dyn Policy>, UnknownPolicy> {
    let unknown = || UnknownPolicy::Unknown { name: name.to_string(), valid: baseline_names(customs) };
    if name == "slo-feedback" {
        let Some(t) = slo_p99_us else {
            return Err(UnknownPolicy::Malformed {
                name: name.to_string(),
                why: "this run has no latency target: name one (slo-feedback:<p99_us>, e.g. slo-feedback:200) or \
                      set the run's SLO ([slo] p99_us in a deploy config)"
                    .into(),
            });
        };
        return Ok(Box::new(SloFeedbackPolicy::per_vm(name, t, gains)));
    }
    if let Some(t) = name.strip_prefix("slo-feedback:") {
        return Ok(Box::new(SloFeedbackPolicy::new(name, parse_slo_target(name, t)?, gains)));
    }
    match name {
        "per-packet" => Ok(Box::new(StaticPolicy::per_packet())),
        "dim" => Ok(Box::new(AdaptivePolicy::new(Adaptive::Dim))),
        "itr" => Ok(Box::new(AdaptivePolicy::new(Adaptive::Itr))),
        _ if name.starts_with("busy-poll:") || name.starts_with("irq-suspend:") => {
            let bad = |why| UnknownPolicy::Malformed { name: name.to_string(), why };
            let (p, napi) = parse_polling(name).map_err(bad)?.ok_or_else(unknown)?;
            Ok(Box::new(PollingPolicy::new(name, p, napi)))
        }
        _ if name.starts_with("napi:") => {
            let p = parse_napi(&name["napi:".len()..])
                .map_err(|why| UnknownPolicy::Malformed { name: name.to_string(), why })?;
            Ok(Box::new(NapiPolicy::new(name, p)))
        }
        _ => {
            let what = name.strip_prefix("static:").ok_or_else(unknown)?;
            if !customs.contains_key(what) {
                parse_layers(what).map_err(|why| UnknownPolicy::Malformed { name: name.to_string(), why })?;
            }
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
        // best-static is searched by `moderato eval`, not a fixed baseline: not offered here.
        assert!(!e.contains("best-static"), "{e}");
    }

    #[test]
    fn busy_poll_and_irq_suspend_recipes_set_every_guest_and_bad_ones_say_why() {
        let none = BTreeMap::new();
        let s = baseline("busy-poll:50", &none).unwrap().act(&obs(2));
        assert!(
            s.vms.iter().all(|v| v.polling == AppPolling { busy_poll_us: 50, irq_suspend_timeout_us: 0 })
        );
        assert!(s.vms.iter().all(|v| v.frontend.napi == NapiParams::OFF));
        let s = baseline("irq-suspend:50/20000", &none).unwrap().act(&obs(2));
        assert!(
            s.vms.iter().all(
                |v| v.polling.irq_suspend_timeout_us == 20_000 && v.frontend.napi == IRQ_SUSPEND_DEFERRAL
            )
        );
        assert_eq!(s.nic, LayerSettings::PER_PACKET);
        let s = baseline("irq-suspend:10/500/4/100", &none).unwrap().act(&obs(1));
        assert_eq!(s.vms[0].frontend.napi, NapiParams::new(4, 100_000));
        // Live: the kernel's half of IRQ suspension; busy polling alone is refused.
        let p = baseline("irq-suspend:50/20000", &none).unwrap();
        assert_eq!((p.irq_suspend_timeout_ns(), p.napi()), (Some(20_000_000), Some(IRQ_SUSPEND_DEFERRAL)));
        assert!(p.live_refusal().is_none() && !p.sets_coalescing());
        let p = baseline("busy-poll:50", &none).unwrap();
        assert!(p.irq_suspend_timeout_ns().is_none() && p.napi().is_none());
        assert!(p.live_refusal().is_some_and(|w| w.contains("EPIOCSPARAMS")));
        for (bad, says) in [
            ("busy-poll:0", "no busy polling"),
            ("busy-poll:fast", "busy_poll_us `fast`"),
            ("irq-suspend:0/20000", "needs busy_poll_us > 0"),
            ("irq-suspend:50/0", "no suspension"),
            ("irq-suspend:50", "not <busy_poll_us>/<irq_suspend_timeout_us>"),
            ("irq-suspend:50/20000/2", "not <busy_poll_us>/<irq_suspend_timeout_us>"),
        ] {
            let e = baseline(bad, &none).err().unwrap().to_string();
            assert!(e.contains(bad) && e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn per_layer_settings_parse_and_bad_ones_say_why() {
        let none = BTreeMap::new();
        let s = static_spec("nic=20/32,backend=0/1,frontend=8/16", &none).unwrap();
        assert_eq!(s.nic, LayerKnobs::both(Knobs::new(20, 32)));
        assert_eq!(s.backend, LayerKnobs::both(Knobs::new(0, 1)));
        assert_eq!(s.frontend, LayerKnobs::both(Knobs::new(8, 16)));
        let s = static_spec("nic.rx=50/0, frontend.tx=4/2", &none).unwrap();
        assert_eq!(s.nic.rx, Knobs::new(50, 0));
        assert_eq!(s.nic.tx, Knobs::PER_PACKET);
        assert_eq!(s.backend, LayerKnobs::PER_PACKET);
        assert_eq!(s.frontend.tx, Knobs::new(4, 2));
        let mut p = baseline("static:nic=20/32,backend=0/1,frontend=8/16", &none).unwrap();
        assert_eq!(p.act(&obs(1)).vms[0].frontend.rx, moderato_env::Moderation::fixed(8, 16));
        for (bad, says) in [
            ("static:nick=20/32", "not a layer"),
            ("static:nic=20", "not <usecs>/<frames>"),
            ("static:nic.up=20/32", "not a direction"),
            ("static:nic=20/32,backend", "not <layer>="),
        ] {
            let e = baseline(bad, &none).err().unwrap().to_string();
            assert!(e.contains(says) && e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn knobs_beyond_the_bounds_are_refused_with_the_bound() {
        let space = ActionSpace::default();
        let none = BTreeMap::new();
        let e =
            check_bounds("static:1000000/4", &static_spec("1000000/4", &none).unwrap(), &space).unwrap_err();
        assert_eq!((e.layer, e.knob, e.value, e.max), ("nic", "usecs", 1_000_000, 1000));
        assert!(e.to_string().contains("usecs_max"), "{e}");
        let e = check_bounds("x", &static_spec("frontend.tx=8/129", &none).unwrap(), &space).unwrap_err();
        assert_eq!((e.layer, e.dir, e.knob, e.max), ("frontend", "tx", "frames", 128));
        for (_, _, spec) in PRESETS {
            check_bounds("preset", spec, &space).unwrap();
        }
        check_bounds("edge", &static_spec("1000/128", &none).unwrap(), &space).unwrap();
    }

    #[test]
    fn napi_recipes_parse_into_the_kernels_units_and_bad_ones_name_the_value() {
        let none = BTreeMap::new();
        let mut p = baseline("napi:2/20", &none).unwrap();
        assert_eq!(p.name(), "napi:2/20");
        assert_eq!(p.napi(), Some(NapiParams::new(2, 20_000)));
        assert!(!p.sets_coalescing());
        assert_eq!(p.act(&obs(2)).vms.len(), 2);
        assert_eq!(parse_napi("0/0").unwrap(), NapiParams::OFF);
        assert_eq!(parse_napi("2147483647/9223372036854775").unwrap().napi_defer_hard_irqs, i32::MAX as u32);
        for (bad, says) in [
            ("napi:2", "not <defer>/<timeout_us>"),
            ("napi:two/20", "defer `two`"),
            ("napi:-1/20", "defer `-1`"),
            ("napi:2/20.5", "timeout `20.5`"),
            ("napi:2147483648/20", "2147483648"),
            ("napi:4294967296/20", "defer `4294967296`"),
            ("napi:2/9223372036854776", "9223372036854776 µs"),
            ("napi:2/18446744073709551615", "18446744073709551615 µs"),
        ] {
            let e = baseline(bad, &none).err().unwrap().to_string();
            assert!(e.contains(says) && e.contains(bad), "{bad}: {e}");
        }
        // Other baselines set no NAPI deferral and do set coalescing.
        let p = baseline("per-packet", &none).unwrap();
        assert_eq!(p.napi(), None);
        assert!(p.sets_coalescing());
        let e = baseline("dimm", &none).err().unwrap().to_string();
        assert!(e.contains("napi:<defer>/<timeout_us>"), "{e}");
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
