//! The action: coalescing settings for every layer, and the [`ActionSpace`] that maps a learned
//! actor's outputs in `[-1, 1]` to knobs.
//!
//! Layout of a flat action vector: the NIC's six values, then for each VM its backend's six and
//! its frontend's six. Inside a layer the order is always `rx_usecs, rx_frames, tx_usecs,
//! tx_frames, napi_defer, napi_timeout_us` ([`KNOB_NAMES`]): ethtool's four knobs, then the NAPI
//! deferral (`napi_defer_hard_irqs`, `gro_flush_timeout` in µs). A backend has no NAPI: its last
//! two values decode to no deferral, and a learned policy's training masks them (as it masks what
//! a host profile lacks, [`crate::HostProfile`]).

use serde::{Deserialize, Serialize};

/// The names of a layer's values, in the order used by every flat action vector in the project:
/// ethtool's four knobs, then the NAPI deferral.
pub const KNOB_NAMES: [&str; 6] =
    ["rx_usecs", "rx_frames", "tx_usecs", "tx_frames", "napi_defer", "napi_timeout_us"];
/// Values per layer in a flat action vector.
pub const KNOBS_PER_LAYER: usize = 6;
/// Of which ethtool's coalescing knobs (the first four).
pub const COALESCING_KNOBS: usize = 4;

/// Fixed ethtool knobs for one notification stream: a notification fires when `frames` items are
/// pending or `usecs` after the first pending item, whichever comes first. `usecs = 0` fires at
/// once (per item); `frames = 0` disables the count trigger (timer only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Knobs {
    pub usecs: u32,
    pub frames: u32,
}

impl Knobs {
    /// No coalescing: one notification per item.
    pub const PER_PACKET: Knobs = Knobs { usecs: 0, frames: 1 };

    pub const fn new(usecs: u32, frames: u32) -> Self {
        Knobs { usecs, frames }
    }
}

impl std::fmt::Display for Knobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}us/{}f", self.usecs, self.frames)
    }
}

/// An in-layer adaptive algorithm, as a driver runs it with `ethtool -C adaptive-rx on`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Adaptive {
    /// Linux `net_dim` (lib/dim/net_dim.c).
    Dim,
    /// Intel ixgbe-style adaptive ITR.
    Itr,
}

impl Adaptive {
    pub fn name(self) -> &'static str {
        match self {
            Adaptive::Dim => "dim",
            Adaptive::Itr => "itr",
        }
    }
}

/// The largest `napi_defer_hard_irqs` the kernel accepts (`S32_MAX`).
pub const DEFER_HARD_IRQS_MAX: u32 = i32::MAX as u32;
/// The largest `gro_flush_timeout` (ns) that the kernel's hrtimer takes without wrapping.
pub const GRO_FLUSH_TIMEOUT_NS_MAX: u64 = i64::MAX as u64;

/// One interface's NAPI deferral (`napi_defer_hard_irqs`, `gro_flush_timeout`; see
/// `live::napi` for the kernel's semantics and interfaces). Serialised with the sysfs names (the
/// deploy's journal stores it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NapiParams {
    /// `napi_defer_hard_irqs`: empty polls before the interrupt is re-armed (0: off).
    pub napi_defer_hard_irqs: u32,
    /// `gro_flush_timeout`, nanoseconds: the deferral timer (0: off).
    pub gro_flush_timeout_ns: u64,
}

impl NapiParams {
    /// No deferral (the kernel's default).
    pub const OFF: NapiParams = NapiParams { napi_defer_hard_irqs: 0, gro_flush_timeout_ns: 0 };

    pub const fn new(napi_defer_hard_irqs: u32, gro_flush_timeout_ns: u64) -> Self {
        NapiParams { napi_defer_hard_irqs, gro_flush_timeout_ns }
    }

    /// Whether both values are zero (what `skip_serializing_if` tests: a setting of 2/0 is kept).
    pub fn is_zero(&self) -> bool {
        *self == NapiParams::OFF
    }

    /// Refuses values the kernel would refuse or misread (see `live::napi`).
    pub fn check(&self) -> Result<(), String> {
        if self.napi_defer_hard_irqs > DEFER_HARD_IRQS_MAX {
            return Err(format!(
                "napi_defer_hard_irqs {} is above the kernel's limit {DEFER_HARD_IRQS_MAX} (i32::MAX)",
                self.napi_defer_hard_irqs
            ));
        }
        if self.gro_flush_timeout_ns > GRO_FLUSH_TIMEOUT_NS_MAX {
            return Err(format!(
                "gro_flush_timeout {} ns is above {GRO_FLUSH_TIMEOUT_NS_MAX} ns (i64::MAX), which the \
                 kernel's timer cannot hold",
                self.gro_flush_timeout_ns
            ));
        }
        Ok(())
    }
}

impl std::fmt::Display for NapiParams {
    /// `napi_defer_hard_irqs 2 gro_flush_timeout 20000` (the sysfs names and units).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "napi_defer_hard_irqs {} gro_flush_timeout {}",
            self.napi_defer_hard_irqs, self.gro_flush_timeout_ns
        )
    }
}

/// How one direction of one layer is moderated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Moderation {
    Fixed(Knobs),
    Adaptive(Adaptive),
}

impl Moderation {
    pub const PER_PACKET: Moderation = Moderation::Fixed(Knobs::PER_PACKET);

    pub fn fixed(usecs: u32, frames: u32) -> Self {
        Moderation::Fixed(Knobs::new(usecs, frames))
    }
}

/// Both directions of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerSettings {
    pub rx: Moderation,
    pub tx: Moderation,
    /// NAPI deferral of the layer's NAPI instances (the NIC driver's; the frontend's virtio-net
    /// or netfront rx and tx NAPI). The backend has none: it stays off there. Absent in a file:
    /// off.
    #[serde(default, skip_serializing_if = "NapiParams::is_zero")]
    pub napi: NapiParams,
}

impl LayerSettings {
    pub const PER_PACKET: LayerSettings =
        LayerSettings { rx: Moderation::PER_PACKET, tx: Moderation::PER_PACKET, napi: NapiParams::OFF };

    pub fn fixed(rx: Knobs, tx: Knobs) -> Self {
        LayerSettings { rx: Moderation::Fixed(rx), tx: Moderation::Fixed(tx), napi: NapiParams::OFF }
    }

    pub fn adaptive(mode: Adaptive) -> Self {
        LayerSettings {
            rx: Moderation::Adaptive(mode),
            tx: Moderation::Adaptive(mode),
            napi: NapiParams::OFF,
        }
    }

    pub fn get(&self, dir: Direction) -> Moderation {
        match dir {
            Direction::Rx => self.rx,
            Direction::Tx => self.tx,
        }
    }

    pub fn set(&mut self, dir: Direction, m: Moderation) {
        match dir {
            Direction::Rx => self.rx = m,
            Direction::Tx => self.tx = m,
        }
    }
}

/// One VM's two virtual layers, and how its application polls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSettings {
    pub backend: LayerSettings,
    pub frontend: LayerSettings,
    /// The guest application's busy polling and the IRQ suspension of the guest's rx NAPI
    /// (simulated only; absent in a file: off).
    #[serde(default, skip_serializing_if = "AppPolling::is_off")]
    pub polling: AppPolling,
}

impl VmSettings {
    /// Both layers, the application not polling.
    pub const fn new(backend: LayerSettings, frontend: LayerSettings) -> Self {
        VmSettings { backend, frontend, polling: AppPolling::OFF }
    }
}

/// The guest application's NAPI polling, with the kernel's semantics (`net/core/dev.c`
/// `napi_busy_loop`, `busy_poll_stop`; `fs/eventpoll.c`; Documentation/networking/napi.rst):
/// - `busy_poll_us`: epoll's `busy_poll_usecs` with `prefer_busy_poll`. When the application
///   finds nothing to read it spins on its rx NAPI (the guest's virtio-net or netfront rx queue)
///   for up to this long before it sleeps: the interrupt stays masked while it spins, and what
///   arrives is polled in the application's own context, without an interrupt or a wake-up. A
///   spin that finds nothing ends in `busy_poll_stop`: the NAPI's deferral (if set) or its
///   interrupt takes over.
/// - `irq_suspend_timeout_us`: the NAPI's `irq-suspend-timeout` (netdev netlink, Linux ≥ 6.13).
///   While the application's polls find work the interrupt stays suspended, also while it
///   processes what it found; it is resumed when a busy poll finds nothing (then the deferral
///   takes over) or when the timeout passes without the application polling again. The kernel
///   suspends only for an application that busy-polls through epoll: it needs `busy_poll_us`.
///
/// The simulator runs these on the guest's rx path; a live deploy does not set them (the first
/// is the application's own epoll setting).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppPolling {
    #[serde(default)]
    pub busy_poll_us: u32,
    #[serde(default)]
    pub irq_suspend_timeout_us: u32,
}

impl AppPolling {
    /// The application sleeps when it has nothing to read (the default).
    pub const OFF: AppPolling = AppPolling { busy_poll_us: 0, irq_suspend_timeout_us: 0 };

    pub fn is_off(&self) -> bool {
        *self == AppPolling::OFF
    }

    /// Refuses IRQ suspension without busy polling (the kernel suspends only for an application
    /// that busy-polls).
    pub fn check(&self) -> Result<(), String> {
        if self.irq_suspend_timeout_us > 0 && self.busy_poll_us == 0 {
            return Err(format!(
                "irq_suspend_timeout_us = {} needs busy_poll_us > 0: the kernel suspends interrupts only for an \
                 application that busy-polls through epoll (prefer_busy_poll)",
                self.irq_suspend_timeout_us
            ));
        }
        Ok(())
    }
}

/// The whole action: the physical NIC, and per VM the backend and the frontend.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoalescingSettings {
    pub nic: LayerSettings,
    pub vms: Vec<VmSettings>,
}

impl CoalescingSettings {
    /// Every layer of `vms` VMs set to `layer`.
    pub fn uniform(vms: usize, layer: LayerSettings) -> Self {
        CoalescingSettings { nic: layer, vms: vec![VmSettings::new(layer, layer); vms] }
    }

    pub fn per_packet(vms: usize) -> Self {
        Self::uniform(vms, LayerSettings::PER_PACKET)
    }

    pub fn layer(&self, id: LayerId) -> &LayerSettings {
        match id {
            LayerId::Nic => &self.nic,
            LayerId::Backend(v) => &self.vms[v].backend,
            LayerId::Frontend(v) => &self.vms[v].frontend,
        }
    }

    pub fn layer_mut(&mut self, id: LayerId) -> &mut LayerSettings {
        match id {
            LayerId::Nic => &mut self.nic,
            LayerId::Backend(v) => &mut self.vms[v].backend,
            LayerId::Frontend(v) => &mut self.vms[v].frontend,
        }
    }

    /// Every layer of this action in flat-vector order.
    pub fn layer_ids(&self) -> impl Iterator<Item = LayerId> + '_ {
        LayerId::all(self.vms.len())
    }
}

/// Packet direction as the VM sees it: rx towards the guest, tx from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Rx,
    Tx,
}

impl Direction {
    pub const BOTH: [Direction; 2] = [Direction::Rx, Direction::Tx];
    pub fn name(self) -> &'static str {
        match self {
            Direction::Rx => "rx",
            Direction::Tx => "tx",
        }
    }
}

/// Which layer a knob belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum LayerId {
    /// L1: the physical NIC and its host driver.
    Nic,
    /// L2: VM `n`'s backend (netback / vhost), on the host.
    Backend(usize),
    /// L3: VM `n`'s frontend (netfront / virtio-net), in the guest.
    Frontend(usize),
}

impl LayerId {
    /// The layers of a host with `vms` VMs, in flat-vector order.
    pub fn all(vms: usize) -> impl Iterator<Item = LayerId> {
        std::iter::once(LayerId::Nic)
            .chain((0..vms).flat_map(|v| [LayerId::Backend(v), LayerId::Frontend(v)]))
    }

    /// Position of this layer's first knob in a flat action vector.
    pub fn offset(self) -> usize {
        KNOBS_PER_LAYER
            * match self {
                LayerId::Nic => 0,
                LayerId::Backend(v) => 1 + 2 * v,
                LayerId::Frontend(v) => 2 + 2 * v,
            }
    }

    pub fn kind(self) -> LayerKind {
        match self {
            LayerId::Nic => LayerKind::Nic,
            LayerId::Backend(_) => LayerKind::Backend,
            LayerId::Frontend(_) => LayerKind::Frontend,
        }
    }
}

impl std::fmt::Display for LayerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LayerId::Nic => write!(f, "nic"),
            LayerId::Backend(v) => write!(f, "vm{v}.backend"),
            LayerId::Frontend(v) => write!(f, "vm{v}.frontend"),
        }
    }
}

/// The three kinds of layer; bounds are set per kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerKind {
    Nic,
    Backend,
    Frontend,
}

impl LayerKind {
    pub const ALL: [LayerKind; 3] = [LayerKind::Nic, LayerKind::Backend, LayerKind::Frontend];
    pub fn name(self) -> &'static str {
        match self {
            LayerKind::Nic => "nic",
            LayerKind::Backend => "backend",
            LayerKind::Frontend => "frontend",
        }
    }
}

/// Inclusive bounds of one layer kind's knobs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KnobBounds {
    pub usecs_max: u32,
    pub frames_max: u32,
}

impl KnobBounds {
    /// Clamps into the bounds; `frames = 0` (count trigger off, timer only) is kept.
    pub fn clamp(&self, k: Knobs) -> Knobs {
        Knobs { usecs: k.usecs.min(self.usecs_max), frames: k.frames.min(self.frames_max) }
    }
}

/// Inclusive bounds of the NAPI deferral a policy may set (every NAPI layer).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NapiBounds {
    /// Most `napi_defer_hard_irqs`.
    pub defer_max: u32,
    /// Most `gro_flush_timeout`, µs.
    pub timeout_us_max: u32,
    /// Shortest `gro_flush_timeout` a deferral decodes to, µs (0, the default: the timeout
    /// decodes from 0 like `usecs`). Above 0 the timeout decodes on a log scale from this value to
    /// `timeout_us_max`, and a layer whose `defer` decodes to 0 has no deferral at all. It shapes
    /// what the actor's outputs mean, not what an environment accepts: deferrals with shorter
    /// timeouts (a `napi:` recipe, the operator's own) still apply.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub timeout_us_min: u32,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

impl Default for NapiBounds {
    fn default() -> Self {
        NapiBounds { defer_max: 8, timeout_us_max: 500, timeout_us_min: 0 }
    }
}

impl NapiBounds {
    /// The timeout's log-scale range `(floor, max)` in µs when `timeout_us_min` is above 0.
    fn timeout_floor_range(&self) -> Option<(f64, f64)> {
        let lo = self.timeout_us_min;
        (lo > 0).then(|| (f64::from(lo), f64::from(self.timeout_us_max.max(lo))))
    }

    /// Clamps into the bounds (the timeout in whole µs, as decoded).
    pub fn clamp(&self, p: NapiParams) -> NapiParams {
        NapiParams::new(
            p.napi_defer_hard_irqs.min(self.defer_max),
            p.gro_flush_timeout_ns.min(u64::from(self.timeout_us_max) * 1000),
        )
    }
}

/// Decodes actor outputs in `[-1, 1]` into knobs on a log scale, and encodes knobs back.
///
/// `usecs = exp(u · ln(usecs_max + 1)) − 1` and `frames = exp(u · ln(frames_max))` with
/// `u = (a + 1) / 2`, rounded to the nearest integer, so `a = −1` is per-packet (`0 µs`, `1` frame)
/// and `a = 1` is the bound. A log scale gives a small step the same relative effect everywhere:
/// the difference between 2 and 4 µs matters as much as between 200 and 400.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionSpace {
    pub nic: KnobBounds,
    pub backend: KnobBounds,
    pub frontend: KnobBounds,
    /// NAPI deferral on the NIC and the frontends (default: 8 polls, 500 µs). `defer` and the
    /// timeout decode like `usecs`: `exp(u · ln(max + 1)) − 1`, so `a = −1` is off (with
    /// `timeout_us_min` above 0 the timeout decodes from that floor instead; see [`NapiBounds`]).
    #[serde(default)]
    pub napi: NapiBounds,
}

impl Default for ActionSpace {
    fn default() -> Self {
        ActionSpace {
            nic: KnobBounds { usecs_max: 1000, frames_max: 256 },
            backend: KnobBounds { usecs_max: 1000, frames_max: 128 },
            frontend: KnobBounds { usecs_max: 1000, frames_max: 128 },
            napi: NapiBounds::default(),
        }
    }
}

impl ActionSpace {
    /// The same limits on what an environment accepts (every bound but the decode-only
    /// `napi.timeout_us_min`).
    pub fn same_limits(&self, o: &ActionSpace) -> bool {
        self.limit_differences(o).is_empty()
    }

    /// The limits that differ (every bound but the decode-only `napi.timeout_us_min`), as
    /// `(key under [sim.action_space], self's value, other's value)`.
    pub fn limit_differences(&self, o: &ActionSpace) -> Vec<(String, u32, u32)> {
        let mut out = Vec::new();
        for (layer, a, b) in [
            ("nic", &self.nic, &o.nic),
            ("backend", &self.backend, &o.backend),
            ("frontend", &self.frontend, &o.frontend),
        ] {
            for (key, x, y) in
                [("usecs_max", a.usecs_max, b.usecs_max), ("frames_max", a.frames_max, b.frames_max)]
            {
                if x != y {
                    out.push((format!("{layer}.{key}"), x, y));
                }
            }
        }
        for (key, x, y) in [
            ("napi.defer_max", self.napi.defer_max, o.napi.defer_max),
            ("napi.timeout_us_max", self.napi.timeout_us_max, o.napi.timeout_us_max),
        ] {
            if x != y {
                out.push((key.to_string(), x, y));
            }
        }
        out
    }

    pub fn bounds(&self, kind: LayerKind) -> &KnobBounds {
        match kind {
            LayerKind::Nic => &self.nic,
            LayerKind::Backend => &self.backend,
            LayerKind::Frontend => &self.frontend,
        }
    }

    /// Length of a flat action vector for `vms` VMs.
    pub fn dim(vms: usize) -> usize {
        KNOBS_PER_LAYER * (1 + 2 * vms)
    }

    fn unit(a: f32) -> f64 {
        let a = if a.is_finite() { a.clamp(-1.0, 1.0) } else { -1.0 };
        (f64::from(a) + 1.0) / 2.0
    }

    pub fn decode_usecs(&self, kind: LayerKind, a: f32) -> u32 {
        Self::decode_log0(a, self.bounds(kind).usecs_max)
    }

    /// `exp(u · ln(max + 1)) − 1`, rounded: 0 at `a = −1`, `max` at 1.
    fn decode_log0(a: f32, max: u32) -> u32 {
        let max = f64::from(max);
        ((Self::unit(a) * (max + 1.0).ln()).exp() - 1.0).round().clamp(0.0, max) as u32
    }

    fn encode_log0(v: u32, max: u32) -> f32 {
        let max = f64::from(max);
        if max <= 0.0 {
            return -1.0;
        }
        let u = (f64::from(v).min(max) + 1.0).ln() / (max + 1.0).ln();
        (2.0 * u - 1.0) as f32
    }

    /// The NAPI deferral of a layer of `kind` from its two values (a backend has none).
    pub fn decode_napi(&self, kind: LayerKind, defer: f32, timeout: f32) -> NapiParams {
        if kind == LayerKind::Backend {
            return NapiParams::OFF;
        }
        let d = Self::decode_log0(defer, self.napi.defer_max);
        let Some((l, h)) = self.napi.timeout_floor_range() else {
            let t = Self::decode_log0(timeout, self.napi.timeout_us_max);
            return NapiParams::new(d, u64::from(t) * 1000);
        };
        if d == 0 {
            return NapiParams::OFF;
        }
        // `l · (h / l)^u`, rounded: the floor at `a = −1`, the maximum at 1.
        let t = (l * (Self::unit(timeout) * (h / l).ln()).exp()).round().clamp(l, h) as u64;
        NapiParams::new(d, t * 1000)
    }

    /// The two values of a deferral (the timeout in whole µs, clamped into the bounds).
    pub fn encode_napi(&self, p: NapiParams) -> [f32; 2] {
        if let Some((l, h)) = self.napi.timeout_floor_range() {
            let d = Self::encode_log0(p.napi_defer_hard_irqs, self.napi.defer_max);
            let t = (p.gro_flush_timeout_ns as f64 / 1000.0).clamp(l, h);
            let u = if h > l { (t / l).ln() / (h / l).ln() } else { 0.0 };
            return [d, (2.0 * u - 1.0) as f32];
        }
        [
            Self::encode_log0(p.napi_defer_hard_irqs, self.napi.defer_max),
            Self::encode_log0(
                (p.gro_flush_timeout_ns / 1000).min(u64::from(u32::MAX)) as u32,
                self.napi.timeout_us_max,
            ),
        ]
    }

    pub fn decode_frames(&self, kind: LayerKind, a: f32) -> u32 {
        let max = f64::from(self.bounds(kind).frames_max.max(1));
        (Self::unit(a) * max.ln()).exp().round().clamp(1.0, max) as u32
    }

    pub fn encode_usecs(&self, kind: LayerKind, usecs: u32) -> f32 {
        Self::encode_log0(usecs, self.bounds(kind).usecs_max)
    }

    pub fn encode_frames(&self, kind: LayerKind, frames: u32) -> f32 {
        let max = f64::from(self.bounds(kind).frames_max.max(1));
        if max <= 1.0 {
            return -1.0;
        }
        let u = f64::from(frames.clamp(1, max as u32)).ln() / max.ln();
        (2.0 * u - 1.0) as f32
    }

    /// Decodes one layer's six values ([`KNOB_NAMES`]).
    pub fn decode_layer(&self, kind: LayerKind, a: &[f32]) -> LayerSettings {
        LayerSettings {
            napi: self.decode_napi(kind, a[4], a[5]),
            ..LayerSettings::fixed(
                Knobs::new(self.decode_usecs(kind, a[0]), self.decode_frames(kind, a[1])),
                Knobs::new(self.decode_usecs(kind, a[2]), self.decode_frames(kind, a[3])),
            )
        }
    }

    /// Encodes one layer's fixed knobs into its four coalescing values in `[-1, 1]`.
    pub fn encode_layer(&self, kind: LayerKind, rx: Knobs, tx: Knobs) -> [f32; 4] {
        [
            self.encode_usecs(kind, rx.usecs),
            self.encode_frames(kind, rx.frames),
            self.encode_usecs(kind, tx.usecs),
            self.encode_frames(kind, tx.frames),
        ]
    }

    /// Decodes a whole flat action vector (length [`ActionSpace::dim`]).
    pub fn decode(&self, vms: usize, a: &[f32]) -> CoalescingSettings {
        assert_eq!(a.len(), Self::dim(vms), "action vector length for {vms} VMs");
        let mut s = CoalescingSettings::per_packet(vms);
        for id in LayerId::all(vms) {
            let o = id.offset();
            *s.layer_mut(id) = self.decode_layer(id.kind(), &a[o..o + KNOBS_PER_LAYER]);
        }
        s
    }

    /// Clamps every fixed knob of `s` into these bounds.
    pub fn clamp(&self, s: &mut CoalescingSettings) {
        let ids: Vec<LayerId> = s.layer_ids().collect();
        for id in ids {
            let b = *self.bounds(id.kind());
            let nb = self.napi;
            let layer = s.layer_mut(id);
            layer.napi = nb.clamp(layer.napi);
            for dir in Direction::BOTH {
                if let Moderation::Fixed(k) = layer.get(dir) {
                    layer.set(dir, Moderation::Fixed(b.clamp(k)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_ends_are_per_packet_and_the_bound() {
        let sp = ActionSpace::default();
        for kind in LayerKind::ALL {
            assert_eq!(sp.decode_usecs(kind, -1.0), 0);
            assert_eq!(sp.decode_frames(kind, -1.0), 1);
            assert_eq!(sp.decode_usecs(kind, 1.0), sp.bounds(kind).usecs_max);
            assert_eq!(sp.decode_frames(kind, 1.0), sp.bounds(kind).frames_max);
            // Out-of-range and non-finite outputs are clamped, never propagated.
            assert_eq!(sp.decode_usecs(kind, 7.0), sp.bounds(kind).usecs_max);
            assert_eq!(sp.decode_frames(kind, f32::NAN), 1);
        }
    }

    #[test]
    fn encode_then_decode_is_identity_on_integers() {
        let sp = ActionSpace::default();
        for kind in LayerKind::ALL {
            let b = *sp.bounds(kind);
            for us in 0..=b.usecs_max {
                assert_eq!(sp.decode_usecs(kind, sp.encode_usecs(kind, us)), us);
            }
            for fr in 1..=b.frames_max {
                assert_eq!(sp.decode_frames(kind, sp.encode_frames(kind, fr)), fr);
            }
        }
    }

    #[test]
    fn deferral_decodes_off_at_minus_one_and_round_trips() {
        let sp = ActionSpace::default();
        assert_eq!(sp.decode_napi(LayerKind::Nic, -1.0, -1.0), NapiParams::OFF);
        assert_eq!(sp.decode_napi(LayerKind::Frontend, 1.0, 1.0), NapiParams::new(8, 500_000));
        assert_eq!(sp.decode_napi(LayerKind::Backend, 1.0, 1.0), NapiParams::OFF, "no NAPI in a backend");
        for d in 0..=8 {
            for t in [0, 1, 10, 20, 50, 100, 500] {
                let p = NapiParams::new(d, t * 1000);
                let [a, b] = sp.encode_napi(p);
                assert_eq!(sp.decode_napi(LayerKind::Nic, a, b), p);
            }
        }
        let mut s = CoalescingSettings::per_packet(1);
        s.nic.napi = NapiParams::new(100, 9_000_000);
        sp.clamp(&mut s);
        assert_eq!(s.nic.napi, NapiParams::new(8, 500_000));
    }

    #[test]
    fn a_minimum_timeout_narrows_the_decoded_range_and_keeps_off() {
        let sp = ActionSpace {
            napi: NapiBounds { timeout_us_min: 50, ..NapiBounds::default() },
            ..ActionSpace::default()
        };
        // Off wherever `defer` decodes to 0, whatever the timeout's value.
        for t in [-1.0, 0.0, 1.0] {
            assert_eq!(sp.decode_napi(LayerKind::Nic, -1.0, t), NapiParams::OFF);
        }
        assert_eq!(sp.decode_napi(LayerKind::Nic, 1.0, -1.0), NapiParams::new(8, 50_000));
        assert_eq!(sp.decode_napi(LayerKind::Frontend, 1.0, 1.0), NapiParams::new(8, 500_000));
        // The midpoint is the geometric mean of 50 and 500 µs.
        assert_eq!(sp.decode_napi(LayerKind::Nic, 1.0, 0.0), NapiParams::new(8, 158_000));
        for d in 1..=8 {
            for t in [50, 64, 100, 200, 333, 500] {
                let p = NapiParams::new(d, t * 1000);
                let [a, b] = sp.encode_napi(p);
                assert_eq!(sp.decode_napi(LayerKind::Nic, a, b), p, "{p:?}");
            }
        }
        // A shorter timeout than the minimum encodes to the minimum.
        let [a, b] = sp.encode_napi(NapiParams::new(2, 20_000));
        assert_eq!(sp.decode_napi(LayerKind::Nic, a, b), NapiParams::new(2, 50_000));
        // Only the decoding differs: an environment's limits are the default's.
        assert!(sp.same_limits(&ActionSpace::default()));
        let wider = ActionSpace { napi: NapiBounds { timeout_us_max: 600, ..sp.napi }, ..sp.clone() };
        assert!(!sp.same_limits(&wider));
        // Absent from model.json (and TOML) when 0, so models without it read back unchanged.
        let json = toml::to_string(&ActionSpace::default()).expect("serialises");
        assert!(!json.contains("timeout_us_min"), "{json}");
        let back: ActionSpace = toml::from_str(&json).expect("parses");
        assert_eq!(back, ActionSpace::default());
        let json = toml::to_string(&sp).expect("serialises");
        assert_eq!(toml::from_str::<ActionSpace>(&json).expect("parses"), sp);
    }

    #[test]
    fn flat_layout_matches_layer_offsets() {
        let sp = ActionSpace::default();
        let vms = 2;
        let mut a = vec![-1.0; ActionSpace::dim(vms)];
        // Max out only vm1's frontend rx_usecs.
        a[LayerId::Frontend(1).offset()] = 1.0;
        let s = sp.decode(vms, &a);
        assert_eq!(s.vms[1].frontend.rx, Moderation::fixed(1000, 1));
        assert_eq!(s.vms[0].frontend.rx, Moderation::PER_PACKET);
        assert_eq!(s.nic, LayerSettings::PER_PACKET);
        assert_eq!(LayerId::all(2).count(), 5);
    }
}
