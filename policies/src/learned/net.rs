//! The actor networks (burn modules) and the batch layout they read.
//!
//! The actor is two actors trained together (ARCHITECTURE.md): a host actor (the NIC head reads
//! the host's features and the mean of the backends'; the backend head, shared across VMs, reads
//! the host's features, its VM's backend features and the backends' mean) and a guest actor (one
//! VM's guest features → its frontend's knobs, shared across VMs). Each head outputs the mean of
//! a Gaussian over four values in `[-1, 1]` space; the log standard deviations are
//! state-independent parameters. At deploy time each side needs only its own features.

use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Device, Tensor, TensorData};
use rand::SeedableRng;
use rand_pcg::Pcg64Mcg;
use serde::{Deserialize, Serialize};

use moderato_env::{
    ActionSpace, BACKEND_FEATURES, GUEST_FEATURES, HOST_FEATURES, KNOBS_PER_LAYER, Knobs, LayerKind,
    NapiParams,
};

use super::features::FeatureBatch;

/// Hidden-layer activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    #[default]
    Tanh,
    Relu,
}

/// Sizes and activation of every MLP (actor heads and critic).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// Hidden layer widths.
    #[serde(default = "d_hidden")]
    pub hidden: Vec<usize>,
    #[serde(default)]
    pub activation: Activation,
    /// Initial log standard deviation of the Gaussian policy.
    #[serde(default = "d_log_std")]
    pub init_log_std: f64,
    /// Initial mean action (the actor heads' output bias), in `[-1, 1]` action space: −1 is
    /// per-packet, so a negative value starts training on the low-latency side.
    #[serde(default = "d_init_action")]
    pub init_action_mean: f64,
    /// The NAPI deferral the NIC and guest heads start at (`init_napi = { defer = 4, timeout_us =
    /// 100 }`) in place of `init_action_mean`'s, which decodes to about 1 poll / 4 µs: a timer
    /// shorter than the gaps between packets polls empty and costs more than no deferral, so
    /// training that starts there learns to switch deferral off. Absent: `init_action_mean`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_napi: Option<InitNapi>,
    /// The setting each layer's head starts at, in the kernel's units, in place of
    /// `init_action_mean` (and `init_napi`) for the values it names: e.g. best-static's kind of
    /// setting, so that training refines a good fixed setting rather than searching for one.
    #[serde(default, skip_serializing_if = "InitKnobs::is_empty")]
    pub init_knobs: InitKnobs,
    /// Features the networks do not read (zero after normalisation), for hosts that cannot
    /// measure them; a deployed model does not require them. Empty: every feature.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ignore_features: Vec<String>,
    /// What the actor reads of the previous control interval besides the current one: nothing
    /// (the default, and every model saved before the option existed), the previous interval's
    /// features, or their change since it. The critic reads the current interval only.
    #[serde(default, skip_serializing_if = "History::is_none")]
    pub history: History,
}

/// A starting NAPI deferral (`network.init_napi`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitNapi {
    /// `napi_defer_hard_irqs`.
    pub defer: u32,
    /// `gro_flush_timeout`, µs.
    pub timeout_us: u32,
}

/// Where the heads start (`network.init_knobs`): per layer, any of its coalescing knobs and its
/// deferral. The backend head, shared by every VM, starts every backend there; likewise the guest
/// head (`frontend`) every frontend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct InitKnobs {
    #[serde(default, skip_serializing_if = "InitLayer::is_empty")]
    pub nic: InitLayer,
    #[serde(default, skip_serializing_if = "InitLayer::is_empty")]
    pub backend: InitLayer,
    #[serde(default, skip_serializing_if = "InitLayer::is_empty")]
    pub frontend: InitLayer,
}

/// One layer's starting setting (`network.init_knobs.<layer>`): `rx` and `tx` as
/// `{ usecs, frames }` (frames ≥ 1), `napi` as `{ defer, timeout_us }` (both 0: no deferral).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct InitLayer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx: Option<Knobs>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx: Option<Knobs>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub napi: Option<InitNapi>,
}

impl InitLayer {
    pub fn is_empty(&self) -> bool {
        *self == InitLayer::default()
    }
}

impl InitKnobs {
    pub fn is_empty(&self) -> bool {
        *self == InitKnobs::default()
    }

    /// The layers with their kinds, in head order (NIC, backend, guest).
    fn layers(&self) -> [(LayerKind, InitLayer); 3] {
        [(LayerKind::Nic, self.nic), (LayerKind::Backend, self.backend), (LayerKind::Frontend, self.frontend)]
    }
}

/// Checks a starting deferral (`key`'s value) against `sim.action_space.napi`.
fn check_init_napi(key: &str, p: InitNapi, space: &ActionSpace) -> Result<(), String> {
    let b = space.napi;
    let at = format!("{key} = {{ defer = {}, timeout_us = {} }}", p.defer, p.timeout_us);
    if p.defer > b.defer_max || p.timeout_us > b.timeout_us_max {
        return Err(format!(
            "{at} is outside sim.action_space.napi (defer_max {}, timeout_us_max {}); start inside the \
             bounds or raise them",
            b.defer_max, b.timeout_us_max
        ));
    }
    if p.defer > 0 && p.timeout_us < b.timeout_us_min {
        return Err(format!(
            "{at} is below sim.action_space.napi timeout_us_min {}; start at a longer timeout or lower \
             the minimum",
            b.timeout_us_min
        ));
    }
    if (p.defer == 0) != (p.timeout_us == 0) {
        return Err(format!("{at}: deferral needs both values above 0 (or both 0 for none)"));
    }
    Ok(())
}

/// The previous interval in the actor's input (`network.history`). Each head's input row is the
/// current interval's (normalised) head input, followed with `previous` by the previous
/// interval's and with `delta` by the current minus the previous; at the first interval of an
/// episode (or of a deploy) the previous interval is the current one (`delta` reads zeros).
/// With `peak` it is followed by the recent intervals' decaying peak
/// ([`Observation::held_peak`](moderato_env::Observation::held_peak) at [`History::PEAK_DECAY`]
/// per interval, the current interval included): a burst's rates and latencies stay in view
/// through the lull after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum History {
    #[default]
    None,
    Previous,
    Delta,
    Peak,
}

impl History {
    /// The share of its gap to the current value that a held peak keeps per interval (`peak`):
    /// after 4 intervals (40 ms) 6% of it.
    pub const PEAK_DECAY: f64 = 0.5;

    pub fn is_none(&self) -> bool {
        *self == History::None
    }

    /// What stands for the previous interval in the actor's input at the interval observed as
    /// `obs`, and what to keep for the next interval, given what was kept at the one before
    /// (`None` at an episode's or a deploy's first interval, where `previous` and `delta` read the
    /// current interval as its own previous one): the previous observation, or (`peak`) the
    /// decaying peak with `obs` in it.
    pub fn advance(
        self,
        obs: &moderato_env::Observation,
        kept: Option<moderato_env::Observation>,
    ) -> (Option<moderato_env::Observation>, moderato_env::Observation) {
        match self {
            History::Peak => {
                let p = kept.map_or_else(|| obs.clone(), |k| obs.held_peak(&k, History::PEAK_DECAY));
                (Some(p.clone()), p)
            }
            _ => (kept, obs.clone()),
        }
    }

    /// How many intervals a head input row holds.
    pub fn intervals(self) -> usize {
        if self.is_none() { 1 } else { 2 }
    }
}

fn d_hidden() -> Vec<usize> {
    vec![64, 64]
}
fn d_log_std() -> f64 {
    -0.5
}
fn d_init_action() -> f64 {
    -0.5
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            hidden: d_hidden(),
            activation: Activation::Tanh,
            init_log_std: d_log_std(),
            init_action_mean: d_init_action(),
            init_napi: None,
            init_knobs: InitKnobs::default(),
            ignore_features: Vec::new(),
            history: History::None,
        }
    }
}

impl NetConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.hidden.is_empty() || self.hidden.iter().any(|&h| h == 0 || h > 4096) {
            return Err(format!("network.hidden = {:?}: one or more widths in 1..=4096", self.hidden));
        }
        if !(self.init_log_std.is_finite() && (-5.0..=2.0).contains(&self.init_log_std)) {
            return Err(format!("network.init_log_std = {}: use a value in [-5, 2]", self.init_log_std));
        }
        if !(self.init_action_mean.is_finite() && (-1.0..=1.0).contains(&self.init_action_mean)) {
            return Err(format!(
                "network.init_action_mean = {}: use a value in [-1, 1]",
                self.init_action_mean
            ));
        }
        super::features::Ignored::new(&self.ignore_features)?;
        Ok(())
    }

    /// Checks `init_napi` and `init_knobs` against the settings a policy may make
    /// (`sim.action_space`).
    pub fn validate_for(&self, space: &ActionSpace) -> Result<(), String> {
        if let Some(p) = self.init_napi {
            check_init_napi("network.init_napi", p, space)?;
        }
        for (kind, l) in self.init_knobs.layers() {
            let (b, name) = (space.bounds(kind), kind.name());
            for (dir, k) in [("rx", l.rx), ("tx", l.tx)] {
                let Some(k) = k else { continue };
                if k.usecs > b.usecs_max || k.frames > b.frames_max || k.frames == 0 {
                    return Err(format!(
                        "network.init_knobs.{name}.{dir} = {{ usecs = {}, frames = {} }} is outside \
                         sim.action_space.{name} (usecs_max {}, frames 1..={}); start inside the bounds",
                        k.usecs, k.frames, b.usecs_max, b.frames_max
                    ));
                }
            }
            if let Some(p) = l.napi {
                if kind == LayerKind::Backend && p.defer > 0 {
                    return Err(
                        "network.init_knobs.backend.napi: a backend has no NAPI deferral; set it on \
                         nic or frontend"
                            .into(),
                    );
                }
                check_init_napi(&format!("network.init_knobs.{name}.napi"), p, space)?;
            }
        }
        Ok(())
    }

    /// The heads' initial output bias (NIC, backend, guest head), one value per knob
    /// ([`moderato_env::KNOB_NAMES`]): `init_action_mean` everywhere, the deferral's two values
    /// from `init_napi`, and whatever `init_knobs` names for a layer from it.
    pub fn init_means(&self, space: &ActionSpace) -> [[f32; KNOBS_PER_LAYER]; 3] {
        let napi = |p: InitNapi| space.encode_napi(NapiParams::new(p.defer, u64::from(p.timeout_us) * 1000));
        self.init_knobs.layers().map(|(kind, l)| {
            let mut m = [self.init_action_mean as f32; KNOBS_PER_LAYER];
            if let Some(p) = l.napi.or(self.init_napi) {
                let [d, t] = napi(p);
                m[KNOBS_PER_LAYER - 2] = d;
                m[KNOBS_PER_LAYER - 1] = t;
            }
            for (i, k) in [(0, l.rx), (2, l.tx)] {
                if let Some(k) = k {
                    m[i] = space.encode_usecs(kind, k.usecs);
                    m[i + 1] = space.encode_frames(kind, k.frames);
                }
            }
            m
        })
    }
}

/// Orthogonal initialisation (Saxe et al. 2014) with gain `gain`, as CleanRL's `layer_init`,
/// from our own generator so that a seed fixes every weight. Bias is zero.
fn orthogonal(rng: &mut Pcg64Mcg, rows: usize, cols: usize, gain: f64) -> Vec<f32> {
    // Gram–Schmidt on the longer side's vectors of a Gaussian matrix.
    let (n, m) = if rows >= cols { (cols, rows) } else { (rows, cols) };
    let mut normal = || moderato_env::random::standard_normal(rng);
    // n orthonormal vectors of length m.
    let mut q: Vec<Vec<f64>> = Vec::with_capacity(n);
    while q.len() < n {
        let mut v: Vec<f64> = (0..m).map(|_| normal()).collect();
        for u in &q {
            let d: f64 = v.iter().zip(u).map(|(a, b)| a * b).sum();
            v.iter_mut().zip(u).for_each(|(a, b)| *a -= d * b);
        }
        let norm = v.iter().map(|a| a * a).sum::<f64>().sqrt();
        if norm > 1e-8 {
            q.push(v.into_iter().map(|a| a / norm).collect());
        }
    }
    // Row-major [rows, cols].
    let mut w = vec![0f32; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            let x = if rows >= cols { q[c][r] } else { q[r][c] };
            w[r * cols + c] = (gain * x) as f32;
        }
    }
    w
}

fn linear(rng: &mut Pcg64Mcg, d_in: usize, d_out: usize, gain: f64, device: &Device) -> Linear {
    let mut l = LinearConfig::new(d_in, d_out).init(device);
    let w = orthogonal(rng, d_in, d_out, gain);
    l.weight = Param::from_tensor(Tensor::from_data(TensorData::new(w, [d_in, d_out]), device));
    l.bias = Some(Param::from_tensor(Tensor::zeros([d_out], device)));
    l
}

/// A multilayer perceptron.
#[derive(Module, Debug)]
pub struct Mlp {
    pub hidden: Vec<Linear>,
    pub out: Linear,
    #[module(skip)]
    pub activation: Activation,
}

impl Mlp {
    /// Hidden layers with gain √2, the output layer with `out_gain` (CleanRL: 0.01 for actor
    /// means, 1 for the critic).
    pub fn new(
        cfg: &NetConfig,
        d_in: usize,
        d_out: usize,
        out_gain: f64,
        rng: &mut Pcg64Mcg,
        device: &Device,
    ) -> Mlp {
        let mut hidden = Vec::with_capacity(cfg.hidden.len());
        let mut d = d_in;
        for &h in &cfg.hidden {
            hidden.push(linear(rng, d, h, std::f64::consts::SQRT_2, device));
            d = h;
        }
        Mlp { hidden, out: linear(rng, d, d_out, out_gain, device), activation: cfg.activation }
    }

    /// `[batch, d_in] → [batch, d_out]`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let mut x = x;
        for l in &self.hidden {
            x = l.forward(x); // [batch, h]
            x = match self.activation {
                Activation::Tanh => tanh(x),
                Activation::Relu => burn::tensor::activation::relu(x),
            };
        }
        self.out.forward(x) // [batch, d_out]
    }
}

/// tanh(x) = 2σ(2x) − 1. The `flex` backend computes `tanh` one element at a time through
/// libm's `tanhf` (by `expm1f`), which was half of a training update's time (`perf record` of
/// `ppo-standard`); its sigmoid goes through `expf`, several times cheaper. The two agree to a
/// few ulps (3e-7, `tanh_by_sigmoid_is_tanh`), which no decision can see.
fn tanh(x: Tensor<2>) -> Tensor<2> {
    burn::tensor::activation::sigmoid(x * 2.0) * 2.0 - 1.0
}

/// Input widths of the three heads.
pub const NIC_IN: usize = HOST_FEATURES.len() + BACKEND_FEATURES.len();
pub const BACKEND_IN: usize = HOST_FEATURES.len() + 2 * BACKEND_FEATURES.len();
pub const GUEST_IN: usize = GUEST_FEATURES.len();

/// Input widths of the NIC, backend and guest heads under `cfg` (its history included).
pub fn head_widths(cfg: &NetConfig) -> [usize; 3] {
    let n = cfg.history.intervals();
    [NIC_IN * n, BACKEND_IN * n, GUEST_IN * n]
}

/// Both actors.
#[derive(Module, Debug)]
pub struct Actor {
    pub nic: Mlp,
    pub backend: Mlp,
    pub guest: Mlp,
    /// State-independent log standard deviations, four per head.
    pub log_std_nic: Param<Tensor<1>>,
    pub log_std_backend: Param<Tensor<1>>,
    pub log_std_frontend: Param<Tensor<1>>,
}

/// The Gaussian means of one batch.
#[derive(Debug, Clone)]
pub struct Means {
    /// `[batch, 4]`
    pub nic: Tensor<2>,
    /// `[batch, vms, 4]`
    pub backend: Tensor<3>,
    /// `[batch, vms, 4]`
    pub frontend: Tensor<3>,
}

/// A batch of (normalised) features in tensors.
#[derive(Debug, Clone)]
pub struct BatchTensors {
    /// `[batch, HOST]`
    pub host: Tensor<2>,
    /// `[batch, vms, BACKEND]`
    pub backend: Tensor<3>,
    /// `[batch, vms, GUEST]`
    pub guest: Tensor<3>,
    /// `[batch, vms]`: 1 for a VM that exists, 0 for padding.
    pub mask: Tensor<2>,
}

impl BatchTensors {
    /// Mean over existing VMs of `x`: `[batch, vms, d] → [batch, d]`.
    pub fn vm_mean(&self, x: Tensor<3>) -> Tensor<2> {
        let [b, _, d] = x.dims();
        let m = self.mask.clone().unsqueeze_dim::<3>(2); // [batch, vms, 1]
        let sum = (x * m.clone()).sum_dim(1).reshape([b, d]); // [batch, d]
        let n = m.sum_dim(1).reshape([b, 1]).clamp_min(1.0); // [batch, 1]
        sum / n
    }

    /// Max over existing VMs of `x`: `[batch, vms, d] → [batch, d]`.
    pub fn vm_max(&self, x: Tensor<3>) -> Tensor<2> {
        let [b, _, d] = x.dims();
        let m = self.mask.clone().unsqueeze_dim::<3>(2); // [batch, vms, 1]
        // Padding gets a large negative offset so it never wins the max.
        let x = x + (m - 1.0) * 1e6;
        x.max_dim(1).reshape([b, d])
    }
}

impl Actor {
    /// A fresh actor whose heads start at `cfg.init_action_mean` (see [`Actor::with_init_means`]).
    pub fn new(cfg: &NetConfig, seed: u64, device: &Device) -> Actor {
        Self::with_init_means(cfg, seed, device, [[cfg.init_action_mean as f32; KNOBS_PER_LAYER]; 3])
    }

    /// A fresh actor whose heads' output bias (NIC, backend, guest) is `means`
    /// ([`NetConfig::init_means`]).
    pub fn with_init_means(
        cfg: &NetConfig,
        seed: u64,
        device: &Device,
        means: [[f32; KNOBS_PER_LAYER]; 3],
    ) -> Actor {
        let mut rng = Pcg64Mcg::seed_from_u64(seed);
        let k = KNOBS_PER_LAYER;
        let log_std = |device: &Device| {
            Param::from_tensor(Tensor::from_data(
                TensorData::new(vec![cfg.init_log_std as f32; k], [k]),
                device,
            ))
        };
        let head = |rng: &mut Pcg64Mcg, d_in: usize, means: [f32; KNOBS_PER_LAYER]| {
            let mut m = Mlp::new(cfg, d_in, k, 0.01, rng, device);
            m.out.bias =
                Some(Param::from_tensor(Tensor::from_data(TensorData::new(means.to_vec(), [k]), device)));
            m
        };
        let [nic_in, be_in, g_in] = head_widths(cfg);
        let [m_nic, m_be, m_g] = means;
        Actor {
            nic: head(&mut rng, nic_in, m_nic),
            backend: head(&mut rng, be_in, m_be),
            guest: head(&mut rng, g_in, m_g),
            log_std_nic: log_std(device),
            log_std_backend: log_std(device),
            log_std_frontend: log_std(device),
        }
    }

    /// The Gaussian means for a batch (of an actor without history).
    pub fn means(&self, x: &BatchTensors) -> Means {
        let [b, v, _] = x.backend.dims();
        let mean_b = x.vm_mean(x.backend.clone()); // [batch, BACKEND]
        let nic_in = Tensor::cat(vec![x.host.clone(), mean_b.clone()], 1); // [batch, NIC_IN]
        let nic = self.nic.forward(nic_in); // [batch, 4]
        let h = HOST_FEATURES.len();
        let bf = BACKEND_FEATURES.len();
        let host_v = x.host.clone().unsqueeze_dim::<3>(1).expand([b, v, h]); // [batch, vms, HOST]
        let mean_v = mean_b.unsqueeze_dim::<3>(1).expand([b, v, bf]); // [batch, vms, BACKEND]
        let be_in = Tensor::cat(vec![host_v, x.backend.clone(), mean_v], 2).reshape([b * v, BACKEND_IN]);
        let backend = self.backend.forward(be_in).reshape([b, v, KNOBS_PER_LAYER]); // [batch, vms, 4]
        let g_in = x.guest.clone().reshape([b * v, GUEST_IN]);
        let frontend = self.guest.forward(g_in).reshape([b, v, KNOBS_PER_LAYER]); // [batch, vms, 4]
        Means { nic, backend, frontend }
    }

    /// The Gaussian means from head inputs assembled on the host ([`HeadInputs`]): the MLPs only.
    pub fn means_of(&self, x: &HeadTensors) -> Means {
        let (b, v) = (x.rows, x.vms);
        Means {
            nic: self.nic.forward(x.nic.clone()), // [batch, 4]
            backend: self.backend.forward(x.backend.clone()).reshape([b, v, KNOBS_PER_LAYER]),
            frontend: self.guest.forward(x.guest.clone()).reshape([b, v, KNOBS_PER_LAYER]),
        }
    }
}

/// Mean over existing VMs of per-VM rows `x` (`[rows, vms, d]`, `mask`: `[rows, vms]`), on the
/// host: `[rows, d]`, as [`BatchTensors::vm_mean`] computes it (the same `f32` operations).
pub fn host_vm_mean(x: &[f32], mask: &[f32], vms: usize, d: usize) -> Vec<f32> {
    let rows = mask.len() / vms.max(1);
    let mut out = vec![0f32; rows * d];
    for r in 0..rows {
        let m = &mask[r * vms..(r + 1) * vms];
        let n = m.iter().sum::<f32>().max(1.0);
        let o = &mut out[r * d..(r + 1) * d];
        for (v, mv) in m.iter().enumerate() {
            let xv = &x[(r * vms + v) * d..(r * vms + v + 1) * d];
            o.iter_mut().zip(xv).for_each(|(s, x)| *s += x * mv);
        }
        o.iter_mut().for_each(|s| *s /= n);
    }
    out
}

/// Max over existing VMs of per-VM rows `x`, on the host: `[rows, d]`, as
/// [`BatchTensors::vm_max`] computes it (padding offset by −10⁶ so it never wins).
pub fn host_vm_max(x: &[f32], mask: &[f32], vms: usize, d: usize) -> Vec<f32> {
    let rows = mask.len() / vms.max(1);
    let mut out = vec![f32::NEG_INFINITY; rows * d];
    for r in 0..rows {
        let o = &mut out[r * d..(r + 1) * d];
        for v in 0..vms {
            let off = (mask[r * vms + v] - 1.0) * 1e6;
            let xv = &x[(r * vms + v) * d..(r * vms + v + 1) * d];
            o.iter_mut().zip(xv).for_each(|(s, x)| *s = s.max(x + off));
        }
    }
    out
}

/// The inputs of the three heads for a batch, assembled on the host: what [`Actor::means`]
/// builds with tensor operations before its MLPs (the backends' mean; the host's features
/// beside each VM's), in plain loops. On networks this small burn's per-operation overhead, not
/// arithmetic, is the cost, so [`Actor::means_of`] on these is the cheaper path to the same
/// means.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HeadInputs {
    pub rows: usize,
    pub vms: usize,
    /// `[rows, NIC_IN]`: host features, then the backends' mean.
    pub nic: Vec<f32>,
    /// `[rows, vms, BACKEND_IN]`: host features, this VM's backend features, the backends' mean.
    pub backend: Vec<f32>,
    /// `[rows, vms, GUEST_IN]`
    pub guest: Vec<f32>,
}

/// [`HeadInputs`] in tensors (each head's rows flattened over VMs).
#[derive(Debug, Clone)]
pub struct HeadTensors {
    pub rows: usize,
    pub vms: usize,
    /// `[rows, NIC_IN]`
    pub nic: Tensor<2>,
    /// `[rows · vms, BACKEND_IN]`
    pub backend: Tensor<2>,
    /// `[rows · vms, GUEST_IN]`
    pub guest: Tensor<2>,
}

impl HeadInputs {
    /// The head inputs of a (normalised) batch.
    pub fn new(x: &FeatureBatch) -> HeadInputs {
        let (h, bf, v) = (HOST_FEATURES.len(), BACKEND_FEATURES.len(), x.vms);
        let mean_b = host_vm_mean(&x.backend, &x.mask, v, bf);
        let mut nic = Vec::with_capacity(x.rows * NIC_IN);
        let mut backend = Vec::with_capacity(x.rows * v * BACKEND_IN);
        for r in 0..x.rows {
            let host = &x.host[r * h..(r + 1) * h];
            let mb = &mean_b[r * bf..(r + 1) * bf];
            nic.extend_from_slice(host);
            nic.extend_from_slice(mb);
            for vm in 0..v {
                backend.extend_from_slice(host);
                backend.extend_from_slice(&x.backend[(r * v + vm) * bf..(r * v + vm + 1) * bf]);
                backend.extend_from_slice(mb);
            }
        }
        HeadInputs { rows: x.rows, vms: v, nic, backend, guest: x.guest.clone() }
    }

    /// The inputs with history: each head's row of `self` (the current interval) followed by
    /// the same row of `prev` (the previous interval's inputs, same rows and padding), or by the
    /// difference `self − prev` (`History::Delta`). `History::None` returns `self` unchanged.
    pub fn with_history(self, prev: &HeadInputs, mode: History) -> HeadInputs {
        if mode.is_none() {
            return self;
        }
        assert_eq!((self.rows, self.vms), (prev.rows, prev.vms), "history of another batch");
        let join = |cur: &[f32], old: &[f32], w: usize| {
            let mut out = Vec::with_capacity(2 * cur.len());
            for (c, o) in cur.chunks_exact(w).zip(old.chunks_exact(w)) {
                out.extend_from_slice(c);
                match mode {
                    History::Delta => out.extend(c.iter().zip(o).map(|(c, o)| c - o)),
                    _ => out.extend_from_slice(o),
                }
            }
            out
        };
        HeadInputs {
            rows: self.rows,
            vms: self.vms,
            nic: join(&self.nic, &prev.nic, NIC_IN),
            backend: join(&self.backend, &prev.backend, BACKEND_IN),
            guest: join(&self.guest, &prev.guest, GUEST_IN),
        }
    }

    pub fn tensors(&self, device: &Device) -> HeadTensors {
        let (b, v) = (self.rows, self.vms);
        // Each head's width follows from its data: 1× or 2× (history) the head's input width.
        let t = |d: &Vec<f32>, r: usize, base: usize| {
            let c = d.len().checked_div(r).unwrap_or(base);
            Tensor::<2>::from_data(TensorData::new(d.clone(), [r, c]), device)
        };
        HeadTensors {
            rows: b,
            vms: v,
            nic: t(&self.nic, b, NIC_IN),
            backend: t(&self.backend, b * v, BACKEND_IN),
            guest: t(&self.guest, b * v, GUEST_IN),
        }
    }
}

impl HeadInputs {
    /// Appends another batch's inputs (same padding).
    pub fn extend(&mut self, o: &HeadInputs) {
        assert_eq!(self.vms, o.vms, "head inputs with different padding");
        self.nic.extend_from_slice(&o.nic);
        self.backend.extend_from_slice(&o.backend);
        self.guest.extend_from_slice(&o.guest);
        self.rows += o.rows;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sigmoid form of tanh equals libm's to within 3e-7 (a few f32 ulps) over the range an
    /// MLP sees, and saturates to ±1.
    #[test]
    fn tanh_by_sigmoid_is_tanh() {
        let xs: Vec<f32> =
            (-4000..=4000).map(|i| i as f32 * 0.005).chain([-60.0, -20.0, 20.0, 60.0]).collect();
        let n = xs.len();
        let y = tanh(Tensor::<2>::from_data(TensorData::new(xs.clone(), [1, n]), &Device::flex()));
        let y: Vec<f32> = y.into_data().try_to_vec::<f32>().expect("f32");
        for (x, y) in xs.iter().zip(&y) {
            assert!((y - x.tanh()).abs() <= 3e-7, "tanh({x}) = {} by sigmoid, {} by libm", y, x.tanh());
        }
        assert_eq!((y[0], y[n - 1]), (-1.0, 1.0));
    }

    /// With history each head's row is the current row, then the previous one (or the change);
    /// an actor with history reads the doubled widths, and an old `model.json` without the key
    /// reads as no history.
    #[test]
    fn history_appends_the_previous_interval_to_every_head_row() {
        let (h, bf, gf, v) = (HOST_FEATURES.len(), BACKEND_FEATURES.len(), GUEST_FEATURES.len(), 2);
        let batch = |base: f32| {
            let mut b = FeatureBatch::new(v);
            b.rows = 2;
            b.host = (0..2 * h).map(|i| base + i as f32).collect();
            b.backend = (0..2 * v * bf).map(|i| base + 100.0 + i as f32).collect();
            b.guest = (0..2 * v * gf).map(|i| base + 200.0 + i as f32).collect();
            b.mask = vec![1.0, 1.0, 1.0, 0.0];
            HeadInputs::new(&b)
        };
        let (cur, prev) = (batch(1000.0), batch(0.0));
        assert_eq!(cur.clone().with_history(&prev, History::None), cur);
        let p = cur.clone().with_history(&prev, History::Previous);
        let d = cur.clone().with_history(&prev, History::Delta);
        for (got_p, got_d, c, o, w) in [
            (&p.nic, &d.nic, &cur.nic, &prev.nic, NIC_IN),
            (&p.backend, &d.backend, &cur.backend, &prev.backend, BACKEND_IN),
            (&p.guest, &d.guest, &cur.guest, &prev.guest, GUEST_IN),
        ] {
            assert_eq!(got_p.len(), 2 * c.len());
            for (r, (rp, rd)) in got_p.chunks_exact(2 * w).zip(got_d.chunks_exact(2 * w)).enumerate() {
                assert_eq!(&rp[..w], &c[r * w..(r + 1) * w]);
                assert_eq!(&rp[w..], &o[r * w..(r + 1) * w]);
                assert_eq!(&rd[..w], &c[r * w..(r + 1) * w]);
                let want: Vec<f32> =
                    c[r * w..(r + 1) * w].iter().zip(&o[r * w..(r + 1) * w]).map(|(a, b)| a - b).collect();
                assert_eq!(&rd[w..], &want[..]);
            }
        }
        let cfg = NetConfig { history: History::Delta, ..NetConfig::default() };
        assert_eq!(head_widths(&cfg), [2 * NIC_IN, 2 * BACKEND_IN, 2 * GUEST_IN]);
        let device = Device::flex();
        let m = Actor::new(&cfg, 5, &device).means_of(&d.tensors(&device));
        assert_eq!(m.backend.dims(), [2, v, KNOBS_PER_LAYER]);
        let old: NetConfig = serde_json::from_str(
            r#"{"hidden":[64,64],"activation":"tanh","init_log_std":-0.5,"init_action_mean":-0.5}"#,
        )
        .unwrap();
        assert_eq!(old.history, History::None);
        assert!(
            !serde_json::to_string(&old).unwrap().contains("history"),
            "a model without history keeps its bytes"
        );
    }

    /// What stands for the previous interval: `previous` and `delta` read the observation kept
    /// one interval earlier (none at the first interval) and keep the current one; `peak` reads
    /// and keeps the decaying peak with the current interval in it, and a model says so in
    /// `model.json` as `"peak"`.
    #[test]
    fn history_advances_the_previous_observation_or_the_held_peak() {
        let obs = |pps: f64| {
            let mut o = moderato_env::Observation::default();
            o.host.nic.rx_pps = pps;
            o.host.backends = vec![Default::default()];
            o.guests = vec![Default::default()];
            o
        };
        let (burst, lull) = (obs(70_000.0), obs(5_000.0));
        for mode in [History::Previous, History::Delta] {
            assert_eq!(mode.advance(&lull, None), (None, lull.clone()));
            assert_eq!(mode.advance(&lull, Some(burst.clone())), (Some(burst.clone()), lull.clone()));
        }
        assert_eq!(History::Peak.advance(&lull, None), (Some(lull.clone()), lull.clone()));
        let (read, kept) = History::Peak.advance(&lull, Some(burst.clone()));
        assert_eq!(read.as_ref(), Some(&kept));
        assert_eq!(kept.host.nic.rx_pps, 5_000.0 + History::PEAK_DECAY * 65_000.0);
        let (_, kept2) = History::Peak.advance(&lull, Some(kept));
        assert!(
            kept2.host.nic.rx_pps < 5_000.0 + History::PEAK_DECAY * 65_000.0
                && kept2.host.nic.rx_pps > 5_000.0
        );
        let cfg = NetConfig { history: History::Peak, ..NetConfig::default() };
        assert_eq!(head_widths(&cfg), [2 * NIC_IN, 2 * BACKEND_IN, 2 * GUEST_IN]);
        assert!(serde_json::to_string(&cfg).unwrap().contains(r#""history":"peak""#));
    }

    /// One row of one VM, every feature a fixed non-zero value: what a fresh actor's means are
    /// read from.
    fn one_vm_row() -> FeatureBatch {
        let (h, bf, gf) = (HOST_FEATURES.len(), BACKEND_FEATURES.len(), GUEST_FEATURES.len());
        let mut b = FeatureBatch::new(1);
        b.rows = 1;
        b.host = (0..h).map(|i| (i as f32 * 0.37).sin()).collect();
        b.backend = (0..bf).map(|i| (i as f32 * 0.53).cos()).collect();
        b.guest = (0..gf).map(|i| (i as f32 * 0.71).sin()).collect();
        b.mask = vec![1.0];
        b
    }

    /// `init_napi` starts the NIC and guest heads at that deferral (the output layer's weights are
    /// small, so a fresh actor's means are its bias), every other knob at `init_action_mean`; a
    /// start outside the bounds is refused by key.
    #[test]
    fn init_napi_starts_the_heads_at_that_deferral() {
        use moderato_env::LayerKind;
        let space = ActionSpace::default();
        let cfg =
            NetConfig { init_napi: Some(InitNapi { defer: 4, timeout_us: 100 }), ..NetConfig::default() };
        cfg.validate_for(&space).unwrap();
        let device = Device::flex();
        let b = one_vm_row();
        let data = |t: burn::tensor::TensorData| t.convert::<f32>().try_into_vec::<f32>().unwrap();
        let run = |cfg: &NetConfig| {
            let a = Actor::with_init_means(cfg, 3, &device, cfg.init_means(&space));
            let m = a.means(&b.tensors(&device));
            (data(m.nic.into_data()), data(m.frontend.into_data()))
        };
        let (nic, fe) = run(&cfg);
        let k = KNOBS_PER_LAYER;
        for (kind, a) in [(LayerKind::Nic, &nic), (LayerKind::Frontend, &fe)] {
            let p = space.decode_napi(kind, a[k - 2], a[k - 1]);
            assert_eq!(p.napi_defer_hard_irqs, 4, "{kind:?}");
            assert!((90_000..=110_000).contains(&p.gro_flush_timeout_ns), "{kind:?}: {p:?}");
            let usecs = space.decode_usecs(kind, a[0]);
            assert!((3..=6).contains(&usecs), "rx_usecs {usecs} starts where init_action_mean puts it");
        }
        let (nic0, _) = run(&NetConfig::default());
        let p0 = space.decode_napi(LayerKind::Nic, nic0[k - 2], nic0[k - 1]);
        assert!(p0.napi_defer_hard_irqs <= 1 && p0.gro_flush_timeout_ns <= 6_000, "without it: {p0:?}");
        assert_eq!(NetConfig::default().init_means(&space), [[-0.5; KNOBS_PER_LAYER]; 3]);
        for (d, t, key) in [(9, 100, "defer_max 8"), (4, 501, "timeout_us_max 500"), (4, 0, "both values")] {
            let bad =
                NetConfig { init_napi: Some(InitNapi { defer: d, timeout_us: t }), ..NetConfig::default() };
            let e = bad.validate_for(&space).unwrap_err();
            assert!(e.contains("network.init_napi") && e.contains(key), "{e}");
        }
        // With the timeout decoded from 50 µs: a start below it is refused, one inside starts there.
        let from50 = ActionSpace {
            napi: moderato_env::NapiBounds { timeout_us_min: 50, ..space.napi },
            ..space.clone()
        };
        let short =
            NetConfig { init_napi: Some(InitNapi { defer: 2, timeout_us: 20 }), ..NetConfig::default() };
        let e = short.validate_for(&from50).unwrap_err();
        assert!(e.contains("network.init_napi") && e.contains("timeout_us_min 50"), "{e}");
        let [m, _, _] = cfg.init_means(&from50);
        assert_eq!(from50.decode_napi(LayerKind::Nic, m[4], m[5]), moderato_env::NapiParams::new(4, 100_000));
        let json = serde_json::to_string(&NetConfig::default()).unwrap();
        assert!(!json.contains("init_napi"), "a model without it keeps its bytes");
    }

    /// `init_knobs` starts each head at its layer's setting in the kernel's units (encoded with
    /// that layer's bounds), leaves what it does not name at `init_action_mean` / `init_napi`,
    /// refuses a start outside the bounds by key, and is absent from a model that does not use it.
    #[test]
    fn init_knobs_start_each_head_at_its_layers_setting() {
        use moderato_env::Direction::{Rx, Tx};
        use moderato_env::LayerKind;
        let space = ActionSpace::default();
        let cfg: NetConfig = serde_json::from_str(
            r#"{"init_napi": {"defer": 2, "timeout_us": 50}, "init_knobs": {
                "nic": {"rx": {"usecs": 64, "frames": 32}, "tx": {"usecs": 256, "frames": 128},
                        "napi": {"defer": 4, "timeout_us": 100}},
                "frontend": {"rx": {"usecs": 8, "frames": 8}, "napi": {"defer": 0, "timeout_us": 0}}}}"#,
        )
        .unwrap();
        cfg.validate_for(&space).unwrap();
        let device = Device::flex();
        let b = one_vm_row();
        let a = Actor::with_init_means(&cfg, 3, &device, cfg.init_means(&space));
        let m = a.means(&b.tensors(&device));
        let data = |t: burn::tensor::TensorData| t.convert::<f32>().try_into_vec::<f32>().unwrap();
        let (nic, be, fe) =
            (data(m.nic.into_data()), data(m.backend.into_data()), data(m.frontend.into_data()));
        // The small output weights move a fresh actor's means a little off its bias.
        let fixed = |l: &moderato_env::LayerSettings, d: moderato_env::Direction| match l.get(d) {
            moderato_env::Moderation::Fixed(k) => k,
            other => panic!("{other:?}"),
        };
        let near =
            |got: u32, want: u32| (f64::from(got) - f64::from(want)).abs() <= 0.15 * f64::from(want) + 1.0;
        let nic_s = space.decode_layer(LayerKind::Nic, &nic);
        assert!(near(fixed(&nic_s, Rx).usecs, 64) && near(fixed(&nic_s, Rx).frames, 32), "{nic_s:?}");
        assert!(near(fixed(&nic_s, Tx).usecs, 256) && near(fixed(&nic_s, Tx).frames, 128), "{nic_s:?}");
        assert_eq!(nic_s.napi.napi_defer_hard_irqs, 4, "{nic_s:?}");
        let fe_s = space.decode_layer(LayerKind::Frontend, &fe);
        assert!(near(fixed(&fe_s, Rx).usecs, 8) && near(fixed(&fe_s, Rx).frames, 8), "{fe_s:?}");
        assert_eq!(fe_s.napi, NapiParams::OFF, "both 0: no deferral");
        // The frontend's tx and the whole backend: init_action_mean (about 5 µs / 4 frames).
        assert!((3..=7).contains(&fixed(&fe_s, Tx).usecs), "{fe_s:?}");
        let be_s = space.decode_layer(LayerKind::Backend, &be);
        assert!(
            (3..=7).contains(&fixed(&be_s, Rx).usecs) && (3..=6).contains(&fixed(&be_s, Rx).frames),
            "{be_s:?}"
        );
        // Encoded per layer: the NIC's frames span 1..=256, the frontend's 1..=128.
        let [mn, _, _] = cfg.init_means(&space);
        assert_eq!(mn[1], space.encode_frames(LayerKind::Nic, 32));
        for (bad, key) in [
            (r#"{"nic": {"rx": {"usecs": 2000, "frames": 32}}}"#, "network.init_knobs.nic.rx"),
            (r#"{"frontend": {"tx": {"usecs": 8, "frames": 0}}}"#, "network.init_knobs.frontend.tx"),
            (
                r#"{"frontend": {"napi": {"defer": 9, "timeout_us": 100}}}"#,
                "network.init_knobs.frontend.napi",
            ),
            (r#"{"backend": {"napi": {"defer": 2, "timeout_us": 20}}}"#, "network.init_knobs.backend.napi"),
        ] {
            let c = NetConfig { init_knobs: serde_json::from_str(bad).unwrap(), ..NetConfig::default() };
            let e = c.validate_for(&space).unwrap_err();
            assert!(e.contains(key), "{bad}: {e}");
        }
        assert!(
            serde_json::from_str::<InitKnobs>(r#"{"nic": {"rx_usecs": 4}}"#).is_err(),
            "unknown keys refused"
        );
        let json = serde_json::to_string(&NetConfig::default()).unwrap();
        assert!(!json.contains("init_knobs"), "a model without it keeps its bytes");
        let back: NetConfig = serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(back, cfg);
    }

    /// The host-assembled path gives the means of the tensor path, padding included.
    #[test]
    fn means_from_host_inputs_equal_the_tensor_paths() {
        let device = Device::flex();
        let actor = Actor::new(&NetConfig::default(), 11, &device);
        let (h, bf, gf, v) = (HOST_FEATURES.len(), BACKEND_FEATURES.len(), GUEST_FEATURES.len(), 3);
        let rows = 4;
        let val = |i: usize| ((i as f32) * 0.731).sin() * 2.0;
        let mut b = FeatureBatch::new(v);
        b.rows = rows;
        b.host = (0..rows * h).map(val).collect();
        b.backend = (0..rows * v * bf).map(|i| val(i + 1000)).collect();
        b.guest = (0..rows * v * gf).map(|i| val(i + 2000)).collect();
        // Rows with 1, 2, 3 and 2 VMs.
        b.mask = [1, 0, 0, 1, 1, 0, 1, 1, 1, 0, 1, 1].iter().map(|&m| m as f32).collect();
        let plain = actor.means(&b.tensors(&device));
        let host = actor.means_of(&HeadInputs::new(&b).tensors(&device));
        let data = |t: burn::tensor::TensorData| t.convert::<f32>().try_into_vec::<f32>().unwrap();
        for (a, c) in [
            (data(plain.nic.into_data()), data(host.nic.into_data())),
            (data(plain.backend.into_data()), data(host.backend.into_data())),
            (data(plain.frontend.into_data()), data(host.frontend.into_data())),
        ] {
            assert_eq!(a.len(), c.len());
            let d = a.iter().zip(&c).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
            assert!(d < 1e-6, "means differ by {d}");
        }
        let mean = host_vm_mean(&b.backend, &b.mask, v, bf);
        let t = b.tensors(&device);
        let tm = data(t.vm_mean(t.backend.clone()).into_data());
        let tx = data(t.vm_max(t.backend.clone()).into_data());
        assert_eq!(mean, tm);
        assert_eq!(host_vm_max(&b.backend, &b.mask, v, bf), tx);
    }
}
