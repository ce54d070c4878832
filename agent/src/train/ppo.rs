//! Proximal Policy Optimization, written top to bottom in the explicit style of CleanRL's
//! `ppo_continuous_action.py` (<https://github.com/vwxyzjn/cleanrl>), for the two-actor policy of
//! `moderato_policies::learned` and a centralised critic.
//!
//! One iteration = one rollout of `num_steps` steps in each of `num_envs` simulators (stepped in
//! parallel threads) + `update_epochs` epochs of minibatch updates.
//!
//! - PPO: Schulman et al. 2017, <https://arxiv.org/abs/1707.06347>
//! - GAE(λ): Schulman et al. 2016, <https://arxiv.org/abs/1506.02438>
//! - The 37 implementation details: Huang et al. 2022,
//!   <https://iclr-blog-track.github.io/2022/03/25/ppo-implementation-details/>
//! - Truncation bootstrapping as Stable-Baselines3 does it: at a time limit the reward gets
//!   `γ V(s_final)` and the episode ends there (Pardo et al. 2018, <https://arxiv.org/abs/1712.00378>).
//!
//! Every rollout starts fresh episodes, seeded from `(seed, iteration, env, episode)`, and episodes
//! end exactly at rollout boundaries; every random draw of an iteration is derived from
//! `(seed, iteration)`. So a checkpoint at an iteration boundary (weights, optimiser, normalisers)
//! is a complete resume point: training resumed from it makes the same updates bit for bit.
//!
//! Speed. The networks are a few thousand weights, so burn's cost per tensor operation, not
//! arithmetic, sets the update's time; the code keeps operations few: the rollout goes into
//! tensors once per iteration and each minibatch selects its rows; the heads' and critic's
//! inputs (means and maxima over VMs, the host's features beside each VM's) are assembled on the
//! host during the rollout; one log-probability over all action columns with a padding mask;
//! diagnostics from one read-back; Adam with global clipping on the host ([`HostAdam`]); and the
//! critic's forward and backward, a graph disjoint from the actor's, on a second thread; tanh
//! through flex's sigmoid, several times cheaper than its element-wise `tanhf` (see `Mlp`). Each
//! iteration's time by phase is in [`Perf`] (`perf/*` in TensorBoard).

use std::sync::Arc;

use anyhow::{Context, Result};
use burn::module::{Module, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Int, Tensor, TensorData};
use moderato_env::random::{splitmix64, standard_normal};
use moderato_env::sim::SimEnv;
use moderato_env::{
    ActionSpace, BACKEND_FEATURES, ControllerFactory, Env, GUEST_FEATURES, HOST_FEATURES, Observation,
};
use moderato_policies::learned::{
    Actor, BatchTensors, FeatureBatch, HeadInputs, HeadTensors, Ignored, Mlp, NetConfig, Normalizer,
    RunningStats, decode_means, head_widths, host_vm_max, host_vm_mean,
};
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;
use serde::{Deserialize, Serialize};

use super::adam::{AdamSettings, HostAdam};
use super::config::{Constraint, Experiment};
use super::metrics::Metrics;
use super::randomize;

const K: usize = moderato_env::KNOBS_PER_LAYER;

/// Per layer kind (NIC, backend, frontend), 1 for each of a layer's [`K`] values that `profile`'s
/// host has: the coalescing knobs where the layer takes them, the deferral where it has NAPI.
pub fn layer_columns(profile: moderato_env::HostProfile) -> [[f32; K]; 3] {
    moderato_env::LayerKind::ALL.map(|kind| {
        let m = profile.mechanisms(kind);
        let mut c = [0f32; K];
        for (k, v) in c.iter_mut().enumerate() {
            let has = if k < moderato_env::COALESCING_KNOBS { m.coalescing } else { m.deferral };
            *v = if has { 1.0 } else { 0.0 };
        }
        c
    })
}
const LN_2PI: f64 = 1.837_877_066_409_345_5; // ln(2π)

/// Input width of the centralised critic: host features, and the mean and max over VMs of the
/// backend and guest features.
pub const CRITIC_IN: usize = HOST_FEATURES.len() + 2 * BACKEND_FEATURES.len() + 2 * GUEST_FEATURES.len();

/// The centralised critic: it sees both sides (training only; never deployed).
#[derive(Module, Debug)]
pub struct Critic {
    pub mlp: Mlp,
}

impl Critic {
    /// `→ [batch]` state values.
    pub fn value(&self, x: &BatchTensors) -> Tensor<1> {
        let input = Tensor::cat(
            vec![
                x.host.clone(),               // [batch, HOST]
                x.vm_mean(x.backend.clone()), // [batch, BACKEND]
                x.vm_max(x.backend.clone()),  // [batch, BACKEND]
                x.vm_mean(x.guest.clone()),   // [batch, GUEST]
                x.vm_max(x.guest.clone()),    // [batch, GUEST]
            ],
            1,
        ); // [batch, CRITIC_IN]
        self.value_of(input)
    }

    /// `[batch, CRITIC_IN]` inputs (as [`critic_input`] assembles them) `→ [batch]` state values.
    pub fn value_of(&self, input: Tensor<2>) -> Tensor<1> {
        let [b, _] = input.dims();
        self.mlp.forward(input).reshape([b]) // [batch]
    }
}

/// The critic's inputs of a (normalised) batch, assembled on the host: `[rows, CRITIC_IN]`, what
/// [`Critic::value`] builds with tensor operations.
pub fn critic_input(x: &FeatureBatch) -> Vec<f32> {
    let (h, bf, gf, v) = (HOST_FEATURES.len(), BACKEND_FEATURES.len(), GUEST_FEATURES.len(), x.vms);
    let parts = [
        host_vm_mean(&x.backend, &x.mask, v, bf),
        host_vm_max(&x.backend, &x.mask, v, bf),
        host_vm_mean(&x.guest, &x.mask, v, gf),
        host_vm_max(&x.guest, &x.mask, v, gf),
    ];
    let mut out = Vec::with_capacity(x.rows * CRITIC_IN);
    for r in 0..x.rows {
        out.extend_from_slice(&x.host[r * h..(r + 1) * h]);
        for (p, d) in parts.iter().zip([bf, bf, gf, gf]) {
            out.extend_from_slice(&p[r * d..(r + 1) * d]);
        }
    }
    out
}

/// Actor and critic, optimised together.
#[derive(Module, Debug)]
pub struct Model {
    pub actor: Actor,
    pub critic: Critic,
}

impl Model {
    /// A fresh model; `space` decodes the actor's starting deferral (`network.init_napi`).
    pub fn new(cfg: &NetConfig, space: &ActionSpace, seed: u64, device: &Device) -> Model {
        let mut rng = Pcg64Mcg::seed_from_u64(seed ^ 0xC817_1C00);
        Model {
            actor: Actor::with_init_means(cfg, seed, device, cfg.init_means(space)),
            critic: Critic { mlp: Mlp::new(cfg, CRITIC_IN, 1, 1.0, &mut rng, device) },
        }
    }
}

/// What survives between iterations besides weights and optimiser state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Iterations completed.
    pub iteration: u64,
    /// Environment steps taken.
    pub global_step: u64,
    pub normalizer: Normalizer,
    /// Running variance of the discounted return, for reward scaling.
    pub return_stats: RunningStats,
    /// The Lagrange multiplier and its PID state (`constraint = "lagrangian"`; zero otherwise).
    #[serde(default)]
    pub lagrange: LagrangeState,
    /// The best validation so far (`[validation]`), whose actor is in `<run>/model-best`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_validation: Option<super::validate::BestValidation>,
    /// The range of p99 targets (µs) the training episodes can hold a VM to (see
    /// [`super::config::Experiment::slo_range_us`]); recorded in `model.json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slo_range_us: Option<[f64; 2]>,
    /// The host profiles the training episodes can run on (see
    /// [`super::config::Experiment::profiles`]); recorded in `model.json`.
    #[serde(default)]
    pub profiles: Vec<moderato_env::HostProfile>,
}

/// The PID Lagrangian's state between iterations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LagrangeState {
    /// λ, applied to the cost advantages of the next update.
    pub multiplier: f64,
    /// The integral term `I` (sum of the costs over budget, floored at 0).
    pub integral: f64,
    /// The previous iteration's mean cost (the derivative term).
    pub prev_cost: f64,
}

impl LagrangeState {
    /// One update from an iteration's mean cost `cost` (Stooke, Achiam & Abbeel 2020, algorithm 2).
    pub fn update(&mut self, cost: f64, g: &super::config::LagrangianConfig) {
        let e = cost - g.cost_budget;
        self.integral = (self.integral + e).max(0.0);
        let d = (cost - self.prev_cost).max(0.0);
        self.multiplier = (g.kp * e + g.ki * self.integral + g.kd * d).max(0.0);
        self.prev_cost = cost;
    }
}

/// Derives an independent seed from a base seed and a path of integers.
pub fn derive(seed: u64, path: &[u64]) -> u64 {
    let mut x = seed;
    for &p in path {
        x = splitmix64(x ^ splitmix64(p.wrapping_add(0x5EED)));
    }
    x
}

fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap_or_default()
}

/// Summaries of the episodes that ended in one rollout.
#[derive(Debug, Clone, Default)]
struct EpisodeStats {
    returns: Vec<f64>,
    cpu_us_per_packet: Vec<f64>,
    p99_us: Vec<f64>,
    slo_violation_rate: Vec<f64>,
    drop_rate: Vec<f64>,
}

/// One iteration's numbers, also logged.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IterationStats {
    pub iteration: u64,
    pub global_step: u64,
    pub episodic_return: f64,
    pub cpu_us_per_packet: f64,
    pub p99_latency_us: f64,
    pub slo_violation_rate: f64,
    pub value_loss: f64,
    pub policy_loss: f64,
    pub entropy: f64,
    pub approx_kl: f64,
    pub clipfrac: f64,
    pub explained_variance: f64,
    /// Mean cost per step of the rollout (share of SLO-violating intervals).
    pub cost: f64,
    /// The Lagrange multiplier the update used (0 with the penalty).
    pub lagrange_multiplier: f64,
}

/// Where training time goes, in seconds, per phase (wall clock of the thread that runs the
/// trainer; the rollout's simulation runs on worker threads and is timed as the wall time of
/// those parallel steps).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Perf {
    /// Stepping and starting the simulators (parallel, wall time).
    pub simulation: f64,
    /// Actor and critic forward passes during the rollout (features to tensors, the MLPs, back).
    pub inference: f64,
    /// Everything else of the rollout and the update's preparation: feature batches and
    /// normalisation, sampling, reward scaling, GAE, minibatch assembly, diagnostics.
    pub bookkeeping: f64,
    /// The update's forward passes and losses.
    pub update_forward: f64,
    /// `loss.backward()` and collecting the gradients.
    pub update_backward: f64,
    /// Gradient clipping and the Adam step.
    pub update_optimizer: f64,
    /// Final evaluation against the baselines (once per run).
    pub evaluation: f64,
    /// Writing checkpoints.
    pub checkpoint: f64,
    /// Iterations and environment steps these times cover.
    pub iterations: u64,
    pub steps: u64,
}

impl Perf {
    /// `(name, seconds)` of every phase, in order.
    pub fn phases(&self) -> [(&'static str, f64); 8] {
        [
            ("simulation", self.simulation),
            ("inference", self.inference),
            ("bookkeeping", self.bookkeeping),
            ("update_forward", self.update_forward),
            ("update_backward", self.update_backward),
            ("update_optimizer", self.update_optimizer),
            ("evaluation", self.evaluation),
            ("checkpoint", self.checkpoint),
        ]
    }

    pub fn total(&self) -> f64 {
        self.phases().iter().map(|p| p.1).sum()
    }

    pub fn add(&mut self, o: &Perf) {
        self.simulation += o.simulation;
        self.inference += o.inference;
        self.bookkeeping += o.bookkeeping;
        self.update_forward += o.update_forward;
        self.update_backward += o.update_backward;
        self.update_optimizer += o.update_optimizer;
        self.evaluation += o.evaluation;
        self.checkpoint += o.checkpoint;
        self.iterations += o.iterations;
        self.steps += o.steps;
    }

    /// Logs the iteration phases as `perf/<phase>_ms` (milliseconds per iteration) and
    /// `perf/SPS` (evaluation and checkpoints are logged where they happen).
    pub fn log(&self, metrics: &mut dyn Metrics, step: u64) {
        let it = self.iterations.max(1) as f64;
        for (name, s) in self.phases().into_iter().take(6) {
            metrics.perf(&format!("perf/{name}_ms"), 1e3 * s / it, step);
        }
        let total = self.total();
        if total > 0.0 {
            metrics.perf("perf/SPS", self.steps as f64 / total, step);
        }
    }

    /// The end-of-run summary: a line per phase with its total, its share and its time per
    /// iteration.
    pub fn summary(&self) -> String {
        let total = self.total();
        let it = self.iterations.max(1) as f64;
        let mut s = format!(
            "time by phase ({} iterations, {} environment steps, {:.1} s, {:.0} steps/s):\n",
            self.iterations,
            self.steps,
            total,
            if total > 0.0 { self.steps as f64 / total } else { 0.0 }
        );
        for (name, secs) in self.phases() {
            let share = if total > 0.0 { 100.0 * secs / total } else { 0.0 };
            s.push_str(&format!(
                "  {name:<17} {secs:>9.2} s  {share:>5.1}%  {:>8.2} ms/iteration\n",
                1e3 * secs / it
            ));
        }
        s
    }
}

/// A stopwatch that charges elapsed time to phases.
struct Clock(std::time::Instant);

impl Clock {
    fn start() -> Clock {
        Clock(std::time::Instant::now())
    }
    /// Seconds since the last lap (or the start), and restarts.
    fn lap(&mut self) -> f64 {
        let now = std::time::Instant::now();
        let s = now.duration_since(self.0).as_secs_f64();
        self.0 = now;
        s
    }
}

/// Builds the environment of one episode from its seed (which also seeds its reset).
pub type EnvMaker = Arc<dyn Fn(u64) -> Result<Box<dyn Env + Send>> + Send + Sync>;

/// The simulator episodes of an experiment: a randomised scenario from the suite per episode.
pub fn suite_envs(exp: &Experiment, factory: Option<Arc<dyn ControllerFactory>>) -> EnvMaker {
    let scenarios = exp.scenarios.clone();
    let suite = exp.config.suite.clone();
    let sim = exp.config.sim.clone();
    Arc::new(move |seed| {
        let (_, sc) = randomize::sample(&scenarios, &suite, seed);
        Ok(Box::new(SimEnv::new(sc, sim.clone(), factory.clone())?) as Box<dyn Env + Send>)
    })
}

/// The trainer: model, optimiser, normalisers and the experiment.
pub struct Trainer {
    pub exp: Experiment,
    pub device: Device,
    pub model: Model,
    /// Adam (burn's arithmetic, on the host) with global gradient-norm clipping.
    pub optim: HostAdam,
    pub state: TrainState,
    /// Where this process's iterations spent their time (not checkpointed).
    pub perf: Perf,
    /// VMs every batch row is padded to (the suite's largest host).
    pub vmax: usize,
    /// `network.ignore_features` as columns.
    ignored: Ignored,
    make_env: EnvMaker,
    /// The cost's value head (`constraint = "lagrangian"`): a critic of its own, on the same
    /// inputs as the value critic, saved as `cost_critic.bpk`.
    pub cost_critic: Option<Critic>,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer").field("state", &self.state).field("vmax", &self.vmax).finish()
    }
}

/// Rollout storage, preallocated as `(num_steps, num_envs)` row-major (CleanRL's layout).
struct Storage {
    /// The actor heads' inputs (normalised observations).
    heads: HeadInputs,
    /// `[rows, CRITIC_IN]`
    critic: Vec<f32>,
    /// `[rows, 4 + 2·vmax·4]`: 1 for the knobs the row's host has, 0 for padding.
    mask: Vec<f32>,
    /// `[rows, 4 + 2·vmax·4]`: NIC, then backends, then frontends.
    actions: Vec<f32>,
    logprobs: Vec<f32>,
    rewards: Vec<f32>,
    dones: Vec<f32>,
    values: Vec<f32>,
    /// The constraint's cost per row and the cost critic's values (Lagrangian only).
    costs: Vec<f32>,
    cost_values: Vec<f32>,
}

impl Trainer {
    /// A fresh trainer for `exp`'s simulated suite on `device` (an autodiff device).
    pub fn new(exp: Experiment, device: Device) -> Trainer {
        let vmax = exp.max_vms();
        let make_env = suite_envs(&exp, None);
        Self::with_envs(exp, device, make_env, vmax)
    }

    /// A fresh trainer on any environments (`vmax`: the most VMs any of them has).
    pub fn with_envs(exp: Experiment, device: Device, make_env: EnvMaker, vmax: usize) -> Trainer {
        let c = &exp.config;
        let model = Model::new(&c.network, &c.sim.action_space, c.seed, &device);
        // Adam with ε = 1e-5, as CleanRL.
        let optim = HostAdam::new(AdamSettings::default());
        let state = TrainState {
            iteration: 0,
            global_step: 0,
            normalizer: Normalizer::default(),
            return_stats: RunningStats::new(1),
            lagrange: LagrangeState::default(),
            best_validation: None,
            slo_range_us: exp.slo_range_us(),
            profiles: exp.profiles(),
        };
        let ignored = Ignored::new(&c.network.ignore_features).expect("a validated experiment config");
        let cost_critic = (c.ppo.constraint == Constraint::Lagrangian).then(|| {
            let mut rng = Pcg64Mcg::seed_from_u64(c.seed ^ 0xC057_C817);
            Critic { mlp: Mlp::new(&c.network, CRITIC_IN, 1, 1.0, &mut rng, &device) }
        });
        Trainer {
            exp,
            device,
            model,
            optim,
            state,
            perf: Perf::default(),
            vmax,
            ignored,
            make_env,
            cost_critic,
        }
    }

    pub fn action_space(&self) -> &ActionSpace {
        &self.exp.config.sim.action_space
    }

    fn action_width(&self) -> usize {
        K + 2 * self.vmax * K
    }

    /// Sets every log standard deviation of the actor to `v` (their parameter ids kept, so the
    /// optimiser's state and checkpoints still match them).
    fn set_log_std(&mut self, v: f32) {
        let set = |p: Param<Tensor<1>>| {
            p.map(|t| {
                let (shape, device) = (t.shape(), t.device());
                Tensor::<1>::full(shape, v, &device).require_grad()
            })
        };
        let a = &mut self.model.actor;
        a.log_std_nic = set(a.log_std_nic.clone());
        a.log_std_backend = set(a.log_std_backend.clone());
        a.log_std_frontend = set(a.log_std_frontend.clone());
    }

    /// The log standard deviations `(nic, backend, frontend)`.
    fn log_stds(&self) -> [Vec<f32>; 3] {
        let a = &self.model.actor;
        [
            to_vec(a.log_std_nic.val().inner()),
            to_vec(a.log_std_backend.val().inner()),
            to_vec(a.log_std_frontend.val().inner()),
        ]
    }

    /// Runs one iteration: rollout, then update.
    pub fn iteration(&mut self, metrics: &mut dyn Metrics) -> Result<IterationStats> {
        let started = std::time::Instant::now();
        let mut perf = Perf { iterations: 1, ..Perf::default() };
        let mut clock = Clock::start();
        let c = self.exp.config.clone();
        let it = self.state.iteration;
        let iseed = derive(c.seed, &[it]);
        let (n_envs, n_steps) = (c.num_envs, c.num_steps);
        let ep_steps = c.sim.episode_steps as usize;
        let gamma = c.ppo.gamma;

        // Learning-rate annealing (CleanRL: frac = 1 − (iteration − 1) / num_iterations).
        let total_it = c.iterations();
        let lr = if c.ppo.anneal_lr {
            c.ppo.learning_rate * (1.0 - it as f64 / total_it as f64)
        } else {
            c.ppo.learning_rate
        };

        if let Some(end) = c.ppo.log_std_anneal_to {
            self.set_log_std(log_std_at(c.network.init_log_std, end, it, total_it));
        }

        // ------------------------------------------------------------------ rollout
        let infer = self.model.clone().valid();
        let infer_cost = self.cost_critic.clone().map(|c| c.valid());
        let lagrangian = infer_cost.is_some();
        let infer_device = Device::flex();
        let [ls_nic, ls_be, ls_fe] = self.log_stds();
        let mut rng = Pcg64Mcg::seed_from_u64(derive(iseed, &[1]));
        let rows = n_envs * n_steps;
        let aw = self.action_width();
        let v = self.vmax;
        let mut st = Storage {
            heads: HeadInputs { vms: v, ..HeadInputs::default() },
            critic: Vec::with_capacity(rows * CRITIC_IN),
            mask: Vec::with_capacity(rows * aw),
            actions: Vec::with_capacity(rows * aw),
            logprobs: Vec::with_capacity(rows),
            rewards: vec![0.0; rows],
            dones: vec![0.0; rows],
            values: Vec::with_capacity(rows),
            costs: vec![0.0; rows],
            cost_values: Vec::with_capacity(if lagrangian { rows } else { 0 }),
        };
        let mut envs: Vec<Option<Box<dyn Env + Send>>> = (0..n_envs).map(|_| None).collect();
        let mut obs: Vec<Observation> = vec![Observation::default(); n_envs];
        let mut ep_return = vec![0.0f64; n_envs];
        let mut disc_return = vec![0.0f64; n_envs];
        let mut eps = EpisodeStats::default();
        let threads = if c.threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            c.threads
        };
        let mut raw = FeatureBatch::new(v);
        // The raw features of what stands for each env's previous interval (`network.history`).
        let history = c.network.history;
        let mut prev_raw = FeatureBatch::new(v);
        // What each env keeps for its next interval's history (`History::advance`).
        let mut kept: Vec<Option<Observation>> = vec![None; n_envs];
        let mut cost_sum = 0.0f64;
        perf.bookkeeping += clock.lap();

        for t in 0..n_steps {
            if t % ep_steps == 0 {
                // New episodes: a randomised scenario per env.
                let e = (t / ep_steps) as u64;
                let make_env = &self.make_env;
                let started: Vec<Result<(Box<dyn Env + Send>, Observation)>> =
                    parallel_map(n_envs, threads, |i| {
                        let eseed = derive(iseed, &[2, i as u64, e]);
                        let mut env = make_env(eseed)?;
                        let (o, _) = env.reset(derive(eseed, &[3]))?;
                        Ok((env, o))
                    });
                for (i, r) in started.into_iter().enumerate() {
                    let (env, o) = r?;
                    envs[i] = Some(env);
                    obs[i] = o;
                    ep_return[i] = 0.0;
                    disc_return[i] = 0.0;
                }
                perf.simulation += clock.lap();
            }
            // Observe: normalise with the running statistics (updated with what we see).
            raw.clear();
            for o in &obs {
                raw.push(o, self.action_space());
            }
            raw.update(&mut self.state.normalizer);
            let x = raw.normalized(&self.state.normalizer, &self.ignored);
            let heads = HeadInputs::new(&x);
            let heads = if history.is_none() {
                heads
            } else {
                // What stands for the previous interval, as the frozen policy keeps it: at an
                // episode's first interval the current one (as in deploy).
                prev_raw.clear();
                for (i, o) in obs.iter().enumerate() {
                    let last = if t % ep_steps == 0 { None } else { kept[i].take() };
                    let (p, keep) = history.advance(o, last);
                    prev_raw.push(p.as_ref().unwrap_or(o), self.action_space());
                    kept[i] = Some(keep);
                }
                let prev = HeadInputs::new(&prev_raw.normalized(&self.state.normalizer, &self.ignored));
                heads.with_history(&prev, history)
            };
            let critic_in = critic_input(&x);
            perf.bookkeeping += clock.lap();
            let means = infer.actor.means_of(&heads.tensors(&infer_device));
            let critic_t =
                Tensor::from_data(TensorData::new(critic_in.clone(), [n_envs, CRITIC_IN]), &infer_device);
            if let Some(cc) = &infer_cost {
                st.cost_values.extend(to_vec(cc.value_of(critic_t.clone())));
            }
            let values = to_vec(infer.critic.value_of(critic_t));
            let (mu_nic, mu_be, mu_fe) = (to_vec(means.nic), to_vec(means.backend), to_vec(means.frontend));
            perf.inference += clock.lap();

            // Act: a ~ N(μ, σ), with log π(a|s) summed over every existing knob.
            let mut settings = Vec::with_capacity(n_envs);
            for i in 0..n_envs {
                let vms = obs[i].guests.len();
                let mut a = vec![0f32; aw];
                let mut lp = 0.0f64;
                // Which of a layer's values the host's profile has: a value it lacks is sampled
                // (the layout stays fixed) but neither counts in log π nor gets a gradient.
                let cols = layer_columns(obs[i].host.profile);
                let mut sample = |mu: f32, ls: f32, a: &mut f32, counted: bool| {
                    let std = f64::from(ls).exp();
                    let eps = standard_normal(&mut rng);
                    *a = (f64::from(mu) + std * eps) as f32;
                    if counted {
                        lp += -0.5 * eps * eps - f64::from(ls) - 0.5 * LN_2PI;
                    }
                };
                for k in 0..K {
                    sample(mu_nic[i * K + k], ls_nic[k], &mut a[k], cols[0][k] > 0.0);
                }
                for vm in 0..vms {
                    for k in 0..K {
                        let j = (i * v + vm) * K + k;
                        sample(mu_be[j], ls_be[k], &mut a[K + vm * K + k], cols[1][k] > 0.0);
                        sample(mu_fe[j], ls_fe[k], &mut a[K + v * K + vm * K + k], cols[2][k] > 0.0);
                    }
                }
                let s = decode_means(self.action_space(), vms, &a[..K], &a[K..K + v * K], &a[K + v * K..]);
                settings.push(s);
                st.actions.extend_from_slice(&a);
                st.logprobs.push(lp as f32);
                // Which action columns are values this host has (the rest is padding, or what
                // its profile lacks).
                st.mask.extend_from_slice(&cols[0]);
                for side_cols in &cols[1..] {
                    for vm in 0..v {
                        if vm < vms {
                            st.mask.extend_from_slice(side_cols);
                        } else {
                            st.mask.extend(std::iter::repeat_n(0.0, K));
                        }
                    }
                }
            }
            st.heads.extend(&heads);
            st.critic.extend_from_slice(&critic_in);
            st.values.extend_from_slice(&values);
            perf.bookkeeping += clock.lap();

            // Step every environment in parallel.
            let mut taken: Vec<Box<dyn Env + Send>> =
                envs.iter_mut().map(|e| e.take().expect("episode started")).collect();
            let results: Vec<Result<(Box<dyn Env + Send>, moderato_env::Step)>> = {
                let settings = &settings;
                let cells: Vec<std::sync::Mutex<Option<Box<dyn Env + Send>>>> =
                    taken.drain(..).map(|e| std::sync::Mutex::new(Some(e))).collect();
                parallel_map(n_envs, threads, |i| {
                    let mut env = cells[i].lock().expect("one worker per env").take().expect("env present");
                    let step = env.step(&settings[i])?;
                    Ok((env, step))
                })
            };
            perf.simulation += clock.lap();
            let truncating = (t + 1) % ep_steps == 0;
            for (i, r) in results.into_iter().enumerate() {
                let (env, step) = r?;
                let row = t * n_envs + i;
                // Lagrangian: the constraint replaces the reward's latency term.
                let r = if lagrangian {
                    f64::from(step.reward) - step.info.reward_terms.latency
                } else {
                    f64::from(step.reward)
                };
                st.costs[row] = step.info.reward_terms.cost as f32;
                cost_sum += step.info.reward_terms.cost;
                ep_return[i] += r;
                // Reward scaling by the running std of the discounted return (CleanRL's
                // NormalizeReward wrapper), then clipped to ±10.
                disc_return[i] = disc_return[i] * gamma + r;
                let scaled = if c.ppo.norm_reward {
                    self.state.return_stats.update(&[disc_return[i] as f32]);
                    (r / (self.state.return_stats.var[0] + 1e-8).sqrt()).clamp(-10.0, 10.0)
                } else {
                    r
                };
                st.rewards[row] = scaled as f32;
                if step.truncated || step.terminated || truncating {
                    st.dones[row] = 1.0;
                    eps.returns.push(ep_return[i]);
                    if let Some(s) = env.episode_summary() {
                        eps.cpu_us_per_packet.push(s.totals.cpu_us_per_packet());
                        eps.p99_us.push(s.latency.p99_us);
                        eps.slo_violation_rate.push(s.slo_violations as f64 / s.intervals.max(1) as f64);
                        eps.drop_rate.push(s.totals.drop_fraction());
                    }
                }
                obs[i] = step.obs;
                envs[i] = Some(env);
            }
            perf.bookkeeping += clock.lap();
            if truncating {
                // Time limit: bootstrap from the value of the final observation.
                raw.clear();
                for o in &obs {
                    raw.push(o, self.action_space());
                }
                let fin = critic_input(&raw.normalized(&self.state.normalizer, &self.ignored));
                perf.bookkeeping += clock.lap();
                let fin = Tensor::from_data(TensorData::new(fin, [n_envs, CRITIC_IN]), &infer_device);
                if let Some(cc) = &infer_cost {
                    let cvals = to_vec(cc.value_of(fin.clone()));
                    for (r, v) in st.costs[t * n_envs..(t + 1) * n_envs].iter_mut().zip(&cvals) {
                        *r += (gamma * f64::from(*v)) as f32;
                    }
                }
                let vals = to_vec(infer.critic.value_of(fin));
                perf.inference += clock.lap();
                for (r, v) in st.rewards[t * n_envs..(t + 1) * n_envs].iter_mut().zip(&vals) {
                    *r += (gamma * f64::from(*v)) as f32;
                }
                disc_return.iter_mut().for_each(|d| *d = 0.0);
            }
        }
        self.state.global_step += rows as u64;
        perf.steps = rows as u64;

        // ------------------------------------------------------------------ GAE
        // A_t = δ_t + γλ(1 − done_t) A_{t+1},  δ_t = r_t + γ(1 − done_t) V(s_{t+1}) − V(s_t).
        let lam = c.ppo.gae_lambda;
        let mut adv = gae(&st.rewards, &st.values, &st.dones, n_envs, gamma, lam);
        let returns: Vec<f32> = adv.iter().zip(&st.values).map(|(a, v)| a + v).collect();
        // The constraint: the multiplier follows this rollout's mean cost, and the advantages
        // become (A_r − λ A_c) / (1 + λ) (Ray, Achiam & Amodei 2019).
        let mean_cost = cost_sum / rows as f64;
        let cost_returns = if lagrangian {
            self.state.lagrange.update(mean_cost, &c.ppo.lagrangian);
            let lam_c = self.state.lagrange.multiplier;
            let adv_c = gae(&st.costs, &st.cost_values, &st.dones, n_envs, gamma, lam);
            let ret_c: Vec<f32> = adv_c.iter().zip(&st.cost_values).map(|(a, v)| a + v).collect();
            for (a, ac) in adv.iter_mut().zip(&adv_c) {
                *a = ((f64::from(*a) - lam_c * f64::from(*ac)) / (1.0 + lam_c)) as f32;
            }
            Some(ret_c)
        } else {
            None
        };

        // ------------------------------------------------------------------ update
        // The whole rollout goes into tensors once; each minibatch selects its rows.
        let batch = self.upload(&st, &returns, cost_returns.as_deref());
        let mb_size = rows / c.ppo.num_minibatches;
        let mut inds: Vec<usize> = (0..rows).collect();
        let mut shuffle = Pcg64Mcg::seed_from_u64(derive(iseed, &[4]));
        let mut last = MinibatchOut::default();
        let mut clipfracs = Vec::new();
        let total_mb = c.ppo.update_epochs * c.ppo.num_minibatches;
        let mut done_mb = 0;
        perf.bookkeeping += clock.lap();
        'epochs: for _epoch in 0..c.ppo.update_epochs {
            // Fisher–Yates with our generator.
            for j in (1..rows).rev() {
                let k = (shuffle.next_u64() % (j as u64 + 1)) as usize;
                inds.swap(j, k);
            }
            for start in (0..rows).step_by(mb_size) {
                let mb = &inds[start..start + mb_size];
                done_mb += 1;
                let out = self.minibatch(&batch, &adv, mb, lr, done_mb == total_mb, &mut perf, &mut clock)?;
                clipfracs.push(out.clipfrac);
                let stop = c.ppo.target_kl.is_some_and(|target| out.approx_kl > target);
                last = out;
                if stop {
                    break 'epochs;
                }
            }
        }
        // Explained variance of the value predictions before the update.
        let var = |x: &[f32]| {
            let m = x.iter().map(|v| f64::from(*v)).sum::<f64>() / x.len() as f64;
            x.iter().map(|v| (f64::from(*v) - m).powi(2)).sum::<f64>() / x.len() as f64
        };
        let resid: Vec<f32> = returns.iter().zip(&st.values).map(|(r, v)| r - v).collect();
        let var_y = var(&returns);
        let explained_variance = if var_y == 0.0 { f64::NAN } else { 1.0 - var(&resid) / var_y };

        self.state.iteration += 1;
        let step = self.state.global_step;
        let mean = |v: &[f64]| if v.is_empty() { f64::NAN } else { v.iter().sum::<f64>() / v.len() as f64 };
        let stats = IterationStats {
            iteration: self.state.iteration,
            global_step: step,
            episodic_return: mean(&eps.returns),
            cpu_us_per_packet: mean(&eps.cpu_us_per_packet),
            p99_latency_us: mean(&eps.p99_us),
            slo_violation_rate: mean(&eps.slo_violation_rate),
            value_loss: last.v_loss,
            policy_loss: last.pg_loss,
            entropy: last.entropy,
            approx_kl: last.approx_kl,
            clipfrac: mean(&clipfracs),
            explained_variance,
            cost: mean_cost,
            lagrange_multiplier: self.state.lagrange.multiplier,
        };
        let secs = started.elapsed().as_secs_f64();
        metrics.scalar("charts/learning_rate", lr, step);
        metrics.scalar("charts/episodic_return", stats.episodic_return, step);
        metrics.scalar("charts/cpu_us_per_packet", stats.cpu_us_per_packet, step);
        metrics.scalar("charts/p99_latency_us", stats.p99_latency_us, step);
        metrics.scalar("charts/slo_violation_rate", stats.slo_violation_rate, step);
        metrics.scalar("charts/drop_rate", mean(&eps.drop_rate), step);
        metrics.scalar("charts/cost", mean_cost, step);
        if lagrangian {
            metrics.scalar("charts/lagrange_multiplier", self.state.lagrange.multiplier, step);
            metrics.scalar("charts/cost_budget", c.ppo.lagrangian.cost_budget, step);
        }
        metrics.scalar("charts/SPS", rows as f64 / secs, step);
        metrics.scalar("losses/value_loss", last.v_loss, step);
        metrics.scalar("losses/policy_loss", last.pg_loss, step);
        metrics.scalar("losses/entropy", last.entropy, step);
        metrics.scalar("losses/old_approx_kl", last.old_approx_kl, step);
        metrics.scalar("losses/approx_kl", last.approx_kl, step);
        metrics.scalar("losses/clipfrac", stats.clipfrac, step);
        metrics.scalar("losses/explained_variance", explained_variance, step);
        let [a, b, f] = self.log_stds();
        metrics.histogram(
            "policy/log_std",
            &a.iter().chain(&b).chain(&f).map(|x| f64::from(*x)).collect::<Vec<_>>(),
            step,
        );
        metrics.histogram("charts/episodic_returns", &eps.returns, step);
        perf.bookkeeping += clock.lap();
        perf.log(metrics, step);
        self.perf.add(&perf);
        Ok(stats)
    }

    /// The rollout in tensors on the training device, for the update.
    fn upload(&self, st: &Storage, returns: &[f32], cost_returns: Option<&[f32]>) -> Batch {
        let dev = &self.device;
        let rows = st.values.len();
        let v = self.vmax;
        let aw = self.action_width();
        let t2 = |d: &[f32], c: usize| Tensor::<2>::from_data(TensorData::new(d.to_vec(), [rows, c]), dev);
        let t1 = |d: &[f32]| Tensor::<1>::from_data(TensorData::new(d.to_vec(), [rows]), dev);
        // log π_old without its constant −½ log 2π per existing knob: the update's log π_new
        // leaves it out too, and only their difference is used.
        let lp_old: Vec<f32> = st
            .logprobs
            .iter()
            .zip(st.mask.chunks_exact(aw))
            .map(|(lp, m)| {
                (f64::from(*lp) + 0.5 * LN_2PI * m.iter().map(|x| f64::from(*x)).sum::<f64>()) as f32
            })
            .collect();
        // Which of the 12 log standard deviations each action column uses.
        let mut ls_cols: Vec<i64> = (0..K as i64).collect();
        for side in 1..=2 {
            for _ in 0..v {
                ls_cols.extend((0..K as i64).map(|k| side * K as i64 + k));
            }
        }
        let [nic_in, be_in, g_in] = head_widths(&self.exp.config.network);
        Batch {
            nic: t2(&st.heads.nic, nic_in),
            backend: t2(&st.heads.backend, v * be_in),
            guest: t2(&st.heads.guest, v * g_in),
            critic: t2(&st.critic, CRITIC_IN),
            actions: t2(&st.actions, aw),
            mask: t2(&st.mask, aw),
            logprobs: t1(&lp_old),
            returns: t1(returns),
            values: t1(&st.values),
            cost: cost_returns.map(|r| (t1(r), t1(&st.cost_values))),
            ls_cols: Tensor::<1, Int>::from_data(TensorData::new(ls_cols, [aw]), dev),
        }
    }

    /// One gradient step on the rows `mb` of the rollout; the losses are read back only when
    /// `report` (the last minibatch) or when they decide an early stop.
    #[allow(clippy::too_many_arguments)]
    fn minibatch(
        &mut self,
        b: &Batch,
        adv: &[f32],
        mb: &[usize],
        lr: f64,
        report: bool,
        perf: &mut Perf,
        clock: &mut Clock,
    ) -> Result<MinibatchOut> {
        let c = &self.exp.config.ppo;
        let dev = &self.device;
        let n = mb.len();
        let v = self.vmax;
        let aw = self.action_width();
        let idx = Tensor::<1, Int>::from_data(
            TensorData::new(mb.iter().map(|&r| r as i64).collect::<Vec<i64>>(), [n]),
            dev,
        );
        let mut b_adv: Vec<f32> = mb.iter().map(|&r| adv[r]).collect();
        if c.norm_adv && n > 1 {
            let m = b_adv.iter().map(|x| f64::from(*x)).sum::<f64>() / n as f64;
            let sd = (b_adv.iter().map(|x| (f64::from(*x) - m).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt();
            b_adv.iter_mut().for_each(|x| *x = ((f64::from(*x) - m) / (sd + 1e-8)) as f32);
        }
        let b_adv = Tensor::<1>::from_data(TensorData::new(b_adv, [n]), dev);
        let sel2 = |t: &Tensor<2>| t.clone().select(0, idx.clone());
        let sel1 = |t: &Tensor<1>| t.clone().select(0, idx.clone());
        let [_, be_in, g_in] = head_widths(&self.exp.config.network);
        let heads = HeadTensors {
            rows: n,
            vms: v,
            nic: sel2(&b.nic),
            backend: sel2(&b.backend).reshape([n * v, be_in]),
            guest: sel2(&b.guest).reshape([n * v, g_in]),
        };
        let (a, mask) = (sel2(&b.actions), sel2(&b.mask)); // [n, aw]
        let (b_logprobs, b_returns, b_values) = (sel1(&b.logprobs), sel1(&b.returns), sel1(&b.values));
        perf.bookkeeping += clock.lap();

        // The actor's and the critic's losses share no parameter, so their graphs are disjoint:
        // the critic's forward and backward run on a second thread beside the actor's. The
        // gradients are those of the summed loss, bit for bit (the sum passes 1 to each term).
        let model = &self.model;
        let critic_in = sel2(&b.critic);
        let cost_critic = self.cost_critic.as_ref();
        let cost_in = b.cost.as_ref().map(|(r, v)| (critic_in.clone(), sel1(r), sel1(v)));
        let scalar = |t: Tensor<1>| f64::from(to_vec(t.inner())[0]);
        let read_losses = report || c.target_kl.is_some();
        let (out, actor_grads, critic_grads, cost_grads) = std::thread::scope(|s| {
            let critic = s.spawn(move || {
                let newvalue = model.critic.value_of(critic_in); // [n]
                let v_loss = value_loss(newvalue, b_returns, b_values, c.clip_vloss, c.clip_coef);
                let grads =
                    GradientsParams::from_grads((v_loss.clone() * c.vf_coef).backward(), &model.critic);
                // The cost critic: the same loss on the cost's returns (a graph of its own).
                let cost = cost_critic.zip(cost_in).map(|(cc, (x, r, v))| {
                    let loss = value_loss(cc.value_of(x), r, v, c.clip_vloss, c.clip_coef);
                    GradientsParams::from_grads((loss * c.vf_coef).backward(), cc)
                });
                (if read_losses { scalar(v_loss) } else { 0.0 }, grads, cost)
            });
            let means = model.actor.means_of(&heads);
            let mu = Tensor::cat(
                vec![means.nic, means.backend.reshape([n, v * K]), means.frontend.reshape([n, v * K])],
                1,
            ); // [n, aw]
            let a_ = &model.actor;
            let ls = Tensor::cat(
                vec![a_.log_std_nic.val(), a_.log_std_backend.val(), a_.log_std_frontend.val()],
                0,
            );
            // On a schedule (`ppo.log_std_anneal_to`) the log standard deviations take no gradient.
            let ls = if c.log_std_anneal_to.is_some() { ls.detach() } else { ls };
            let ls = ls.select(0, b.ls_cols.clone()).reshape([1, aw]); // [1, aw]
            // log N(a; μ, σ) + ½ log 2π = −½ ((a − μ)/σ)² − log σ, per existing knob.
            let z = (a - mu) * ls.clone().neg().exp();
            let newlogprob = ((z.square() * -0.5 - ls.clone()) * mask.clone()).sum_dim(1).reshape([n]); // [n]
            // Entropy of a Gaussian: ½ + ½ log 2π + log σ per knob; padded VMs count nothing.
            let h = 0.5 + 0.5 * LN_2PI;
            let entropy_loss = (mask.mean_dim(0) * (ls + h)).sum(); // [1]

            let logratio = newlogprob - b_logprobs;
            let ratio = logratio.clone().exp();
            // Clipped surrogate: max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε)).
            let pg1 = b_adv.clone().neg() * ratio.clone();
            let pg2 = b_adv.neg() * ratio.clamp(1.0 - c.clip_coef, 1.0 + c.clip_coef);
            let pg_loss = pg1.max_pair(pg2).mean();
            let actor_loss = pg_loss.clone() - entropy_loss.clone() * c.ent_coef;
            perf.update_forward += clock.lap();

            // Diagnostics (no gradient), on the host: old and new approximations of KL
            // (Schulman's k1, k3) and the clipped fraction.
            let lr_host = to_vec(logratio.inner());
            let (mut k1, mut k3, mut clipped) = (0.0f64, 0.0f64, 0usize);
            for x in &lr_host {
                let x = f64::from(*x);
                let r = x.exp();
                k1 -= x;
                k3 += (r - 1.0) - x;
                if (r - 1.0).abs() > c.clip_coef {
                    clipped += 1;
                }
            }
            let mut out = MinibatchOut {
                approx_kl: k3 / n as f64,
                old_approx_kl: k1 / n as f64,
                clipfrac: clipped as f64 / n as f64,
                ..MinibatchOut::default()
            };
            if read_losses {
                out.pg_loss = scalar(pg_loss);
                out.entropy = scalar(entropy_loss);
            }
            perf.bookkeeping += clock.lap();
            let actor_grads = GradientsParams::from_grads(actor_loss.backward(), &model.actor);
            let (v_loss, critic_grads, cost_grads) =
                critic.join().expect("the critic's update thread panicked");
            out.v_loss = v_loss;
            perf.update_backward += clock.lap();
            (out, actor_grads, critic_grads, cost_grads)
        });
        let (model, _norm) =
            self.optim.step(lr, self.model.clone(), &[&actor_grads, &critic_grads], c.max_grad_norm);
        self.model = model;
        if let (Some(cc), Some(g)) = (self.cost_critic.take(), cost_grads) {
            // Its own clipping: the cost's scale must not shrink the policy's steps.
            let (cc, _norm) = self.optim.step(lr, cc, &[&g], c.max_grad_norm);
            self.cost_critic = Some(cc);
        }
        perf.update_optimizer += clock.lap();
        Ok(out)
    }
}

/// The scheduled log standard deviation of iteration `it` (0-based) of `total`: linear from
/// `start` at the first iteration to `end` after the last (`ppo.log_std_anneal_to`).
fn log_std_at(start: f64, end: f64, it: u64, total: u64) -> f32 {
    let frac = if total == 0 { 0.0 } else { (it as f64 / total as f64).min(1.0) };
    (start + (end - start) * frac) as f32
}

/// GAE(λ) over a `(steps, envs)` row-major rollout:
/// `A_t = δ_t + γλ(1 − done_t) A_{t+1}`, `δ_t = r_t + γ(1 − done_t) V(s_{t+1}) − V(s_t)`.
fn gae(rewards: &[f32], values: &[f32], dones: &[f32], n_envs: usize, gamma: f64, lam: f64) -> Vec<f32> {
    let rows = rewards.len();
    let n_steps = rows / n_envs;
    let mut adv = vec![0f32; rows];
    let mut lastgaelam = vec![0f64; n_envs];
    for t in (0..n_steps).rev() {
        for (i, last) in lastgaelam.iter_mut().enumerate() {
            let row = t * n_envs + i;
            let nextnonterminal = 1.0 - f64::from(dones[row]);
            let nextvalue = if t + 1 < n_steps { f64::from(values[row + n_envs]) } else { 0.0 };
            let delta =
                f64::from(rewards[row]) + gamma * nextvalue * nextnonterminal - f64::from(values[row]);
            *last = delta + gamma * lam * nextnonterminal * *last;
            adv[row] = *last as f32;
        }
    }
    adv
}

/// The value loss, optionally clipped around the old values (CleanRL).
fn value_loss(new: Tensor<1>, returns: Tensor<1>, old: Tensor<1>, clip: bool, coef: f64) -> Tensor<1> {
    if clip {
        let unclipped = (new.clone() - returns.clone()).square();
        let clipped = old.clone() + (new - old).clamp(-coef, coef);
        let clipped = (clipped - returns).square();
        unclipped.max_pair(clipped).mean() * 0.5
    } else {
        (new - returns).square().mean() * 0.5
    }
}

/// The rollout in tensors on the training device.
struct Batch {
    /// `[rows, NIC_IN]`
    nic: Tensor<2>,
    /// `[rows, vmax · BACKEND_IN]`
    backend: Tensor<2>,
    /// `[rows, vmax · GUEST_IN]`
    guest: Tensor<2>,
    /// `[rows, CRITIC_IN]`
    critic: Tensor<2>,
    /// `[rows, aw]`
    actions: Tensor<2>,
    /// `[rows, aw]`
    mask: Tensor<2>,
    /// `[rows]`: log π_old + ½ log 2π per existing knob.
    logprobs: Tensor<1>,
    returns: Tensor<1>,
    values: Tensor<1>,
    /// The cost's returns and the cost critic's old values (Lagrangian only).
    cost: Option<(Tensor<1>, Tensor<1>)>,
    /// `[aw]`: the index into (NIC, backend, frontend) log standard deviations of each column.
    ls_cols: Tensor<1, Int>,
}

#[derive(Debug, Clone, Copy, Default)]
struct MinibatchOut {
    v_loss: f64,
    pg_loss: f64,
    entropy: f64,
    approx_kl: f64,
    old_approx_kl: f64,
    clipfrac: f64,
}

/// Computes `f(i)` for `i in 0..n` on up to `threads` scoped threads; results in index order.
/// Each thread claims the next index when it is free, so a slow simulator holds up one thread,
/// not a fixed share of the others' work.
fn parallel_map<T: Send>(n: usize, threads: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    if threads <= 1 || n <= 1 {
        return (0..n).map(f).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
    std::thread::scope(|s| {
        let (f, next) = (&f, &next);
        let handles: Vec<_> = (0..threads.min(n))
            .map(|_| {
                s.spawn(move || {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= n {
                            break done;
                        }
                        done.push((i, f(i)));
                    }
                })
            })
            .collect();
        for h in handles {
            for (i, v) in h.join().expect("a rollout worker panicked") {
                out[i] = Some(v);
            }
        }
    });
    out.into_iter().map(|v| v.expect("every index computed")).collect()
}

/// Context for errors from a checkpoint directory.
pub fn ctx(path: &std::path::Path, what: &str) -> String {
    format!("{}: {what}", path.display())
}

impl Trainer {
    /// Writes model, optimiser and state into `dir` (created; replaced if it exists).
    pub fn save_checkpoint(&self, dir: &std::path::Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| ctx(dir, "cannot create checkpoint"))?;
        let model = self.model.clone().into_record().into_bytes().map_err(|e| anyhow::anyhow!("{e:?}"))?;
        std::fs::write(dir.join("model.bpk"), &model[..])
            .with_context(|| ctx(dir, "cannot write model.bpk"))?;
        if let Some(cc) = &self.cost_critic {
            let b = cc.clone().into_record().into_bytes().map_err(|e| anyhow::anyhow!("{e:?}"))?;
            std::fs::write(dir.join("cost_critic.bpk"), &b[..])
                .with_context(|| ctx(dir, "cannot write cost_critic.bpk"))?;
        }
        let bytes = self.optim.to_bytes()?;
        std::fs::write(dir.join("optimizer.bpk"), &bytes[..])
            .with_context(|| ctx(dir, "cannot write optimizer.bpk"))?;
        let state = serde_json::to_string_pretty(&self.state)?;
        std::fs::write(dir.join("state.json"), state).with_context(|| ctx(dir, "cannot write state.json"))?;
        std::fs::write(dir.join("config.toml"), &self.exp.toml)
            .with_context(|| ctx(dir, "cannot write config.toml"))?;
        Ok(())
    }

    /// A trainer of `exp`'s suite restored from a checkpoint directory (`exp` must be the config
    /// the run started with).
    pub fn load_checkpoint(exp: Experiment, dir: &std::path::Path, device: Device) -> Result<Trainer> {
        let vmax = exp.max_vms();
        let make_env = suite_envs(&exp, None);
        Self::load_checkpoint_with_envs(exp, dir, device, make_env, vmax)
    }

    /// Like [`Trainer::load_checkpoint`], on any environments.
    pub fn load_checkpoint_with_envs(
        exp: Experiment,
        dir: &std::path::Path,
        device: Device,
        make_env: EnvMaker,
        vmax: usize,
    ) -> Result<Trainer> {
        let saved =
            std::fs::read_to_string(dir.join("config.toml")).with_context(|| ctx(dir, "no config.toml"))?;
        // The same config, compared as parsed (with today's defaults for keys added since), so
        // that a checkpoint written before a new key existed still resumes.
        let saved_cfg = toml::from_str::<super::config::ExperimentConfig>(&saved).ok();
        let same = saved == exp.toml || saved_cfg.as_ref().is_some_and(|c| *c == exp.config);
        // The one change a resume takes: a larger `total_timesteps`, which extends the run (the
        // learning rate, where annealed, then anneals over the new total from here on).
        let grown = saved_cfg.as_ref().filter(|c| {
            let mut c = (*c).clone();
            let before = std::mem::replace(&mut c.total_timesteps, exp.config.total_timesteps);
            c == exp.config && before != exp.config.total_timesteps
        });
        if let Some(c) = grown {
            anyhow::ensure!(
                exp.config.total_timesteps > c.total_timesteps,
                "{}: this run was to train {} timesteps and {} says {}; a resume can extend a run (a larger \
                 total_timesteps) but not shorten it: use --max-iterations to stop early",
                dir.display(),
                c.total_timesteps,
                exp.path.display(),
                exp.config.total_timesteps
            );
            tracing::info!(
                "extending the run from {} to {} timesteps ({} iterations in all){}",
                c.total_timesteps,
                exp.config.total_timesteps,
                exp.config.iterations(),
                if exp.config.ppo.anneal_lr {
                    "; the learning rate anneals over the new total from here on"
                } else {
                    ""
                }
            );
        }
        anyhow::ensure!(
            same || grown.is_some(),
            "{}: this checkpoint was made with another config than {}; resume with the config the run started with \
             (only a larger total_timesteps may differ, to extend the run)",
            dir.display(),
            exp.path.display()
        );
        // A checkpoint of a build with other observation features (before per-VM objectives, say)
        // would fail deep in the weights; say so first.
        let state = std::fs::read_to_string(dir.join("state.json"))
            .with_context(|| ctx(dir, "cannot read state.json"))?;
        let state: TrainState = serde_json::from_str(&state).with_context(|| ctx(dir, "state.json"))?;
        check_state_features(dir, &state)?;
        let mut t = Trainer::with_envs(exp, device, make_env, vmax);
        let bytes =
            std::fs::read(dir.join("model.bpk")).with_context(|| ctx(dir, "cannot read model.bpk"))?;
        let rec = burn::store::ModuleRecord::from_bytes(burn::tensor::Bytes::from_bytes_vec(bytes))
            .map_err(|e| anyhow::anyhow!("{}: model.bpk: {e:?}", dir.display()))?;
        t.model = t
            .model
            .try_load_record(rec)
            .map_err(|e| anyhow::anyhow!("{}: model.bpk: {e:?}", dir.display()))?;
        if let Some(cc) = t.cost_critic.take() {
            let bytes = std::fs::read(dir.join("cost_critic.bpk")).with_context(|| {
                ctx(dir, "cannot read cost_critic.bpk (a Lagrangian run's checkpoint has one)")
            })?;
            let rec = burn::store::ModuleRecord::from_bytes(burn::tensor::Bytes::from_bytes_vec(bytes))
                .map_err(|e| anyhow::anyhow!("{}: cost_critic.bpk: {e:?}", dir.display()))?;
            t.cost_critic = Some(
                cc.try_load_record(rec)
                    .map_err(|e| anyhow::anyhow!("{}: cost_critic.bpk: {e:?}", dir.display()))?,
            );
        }
        let bytes = std::fs::read(dir.join("optimizer.bpk"))
            .with_context(|| ctx(dir, "cannot read optimizer.bpk"))?;
        t.optim = HostAdam::from_bytes(AdamSettings::default(), burn::tensor::Bytes::from_bytes_vec(bytes))
            .map_err(|e| anyhow::anyhow!("{}: optimizer.bpk: {e:#}", dir.display()))?;
        t.state = state;
        Ok(t)
    }
}

/// Refuses a checkpoint whose normaliser has other feature counts than this build (a checkpoint of
/// a build with other observation features), with a sentence instead of a weight-shape error.
pub fn check_state_features(dir: &std::path::Path, state: &TrainState) -> Result<()> {
    let want = Normalizer::default();
    for (group, have, need) in [
        ("host", state.normalizer.host.mean.len(), want.host.mean.len()),
        ("backend", state.normalizer.backend.mean.len(), want.backend.mean.len()),
        ("guest", state.normalizer.guest.mean.len(), want.guest.mean.len()),
    ] {
        anyhow::ensure!(
            have == need,
            "{}: this checkpoint was made by a build with {have} {group} features, this build has {need} \
             (moderato_env::obs lists them; per-VM objectives added the slo_* features, host profiles the napi_* and *coalescing features): it cannot be resumed \
             or exported by this build; start a new run",
            dir.display()
        );
    }
    Ok(())
}
