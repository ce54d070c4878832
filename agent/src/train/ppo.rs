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

use std::sync::Arc;

use anyhow::{Context, Result};
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{AdamConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor, TensorData};
use moderato_env::random::{splitmix64, standard_normal};
use moderato_env::sim::SimEnv;
use moderato_env::{
    ActionSpace, BACKEND_FEATURES, ControllerFactory, Env, GUEST_FEATURES, HOST_FEATURES, Observation,
};
use moderato_policies::learned::{
    Actor, BatchTensors, FeatureBatch, Ignored, Mlp, NetConfig, Normalizer, RunningStats, decode_means,
};
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;
use serde::{Deserialize, Serialize};

use super::config::Experiment;
use super::metrics::Metrics;
use super::randomize;

const K: usize = moderato_env::KNOBS_PER_LAYER;
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
        let [b, _] = input.dims();
        self.mlp.forward(input).reshape([b]) // [batch]
    }
}

/// Actor and critic, optimised together.
#[derive(Module, Debug)]
pub struct Model {
    pub actor: Actor,
    pub critic: Critic,
}

impl Model {
    pub fn new(cfg: &NetConfig, seed: u64, device: &Device) -> Model {
        let mut rng = Pcg64Mcg::seed_from_u64(seed ^ 0xC817_1C00);
        Model {
            actor: Actor::new(cfg, seed, device),
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
    pub optim: ModuleOptimizer,
    pub state: TrainState,
    /// VMs every batch row is padded to (the suite's largest host).
    pub vmax: usize,
    /// `network.ignore_features` as columns.
    ignored: Ignored,
    make_env: EnvMaker,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer").field("state", &self.state).field("vmax", &self.vmax).finish()
    }
}

/// Rollout storage, preallocated as `(num_steps, num_envs)` row-major (CleanRL's layout).
struct Storage {
    obs: FeatureBatch,
    /// `[rows, 4 + 2·vmax·4]`: NIC, then backends, then frontends.
    actions: Vec<f32>,
    logprobs: Vec<f32>,
    rewards: Vec<f32>,
    dones: Vec<f32>,
    values: Vec<f32>,
}

impl Trainer {
    /// A fresh trainer for `exp`'s simulated suite on `device` (an autodiff device).
    pub fn new(exp: Experiment, device: Device) -> Trainer {
        let vmax = exp.scenarios.iter().map(|s| s.vms.len()).max().unwrap_or(1);
        let make_env = suite_envs(&exp, None);
        Self::with_envs(exp, device, make_env, vmax)
    }

    /// A fresh trainer on any environments (`vmax`: the most VMs any of them has).
    pub fn with_envs(exp: Experiment, device: Device, make_env: EnvMaker, vmax: usize) -> Trainer {
        let c = &exp.config;
        let model = Model::new(&c.network, c.seed, &device);
        // Adam with ε = 1e-5, as CleanRL.
        let optim: ModuleOptimizer = AdamConfig::new().with_epsilon(1e-5).init();
        let state = TrainState {
            iteration: 0,
            global_step: 0,
            normalizer: Normalizer::default(),
            return_stats: RunningStats::new(1),
        };
        let ignored = Ignored::new(&c.network.ignore_features).expect("a validated experiment config");
        Trainer { exp, device, model, optim, state, vmax, ignored, make_env }
    }

    pub fn action_space(&self) -> &ActionSpace {
        &self.exp.config.sim.action_space
    }

    fn action_width(&self) -> usize {
        K + 2 * self.vmax * K
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

        // ------------------------------------------------------------------ rollout
        let infer = self.model.clone().valid();
        let infer_device = Device::flex();
        let [ls_nic, ls_be, ls_fe] = self.log_stds();
        let mut rng = Pcg64Mcg::seed_from_u64(derive(iseed, &[1]));
        let rows = n_envs * n_steps;
        let aw = self.action_width();
        let mut st = Storage {
            obs: FeatureBatch::new(self.vmax),
            actions: Vec::with_capacity(rows * aw),
            logprobs: Vec::with_capacity(rows),
            rewards: vec![0.0; rows],
            dones: vec![0.0; rows],
            values: Vec::with_capacity(rows),
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
            }
            // Observe: normalise with the running statistics (updated with what we see).
            let mut raw = FeatureBatch::new(self.vmax);
            for o in &obs {
                raw.push(o, self.action_space());
            }
            raw.update(&mut self.state.normalizer);
            let x = raw.normalized(&self.state.normalizer, &self.ignored);
            let xt = x.tensors(&infer_device);
            let means = infer.actor.means(&xt);
            let values = to_vec(infer.critic.value(&xt));
            let (mu_nic, mu_be, mu_fe) = (to_vec(means.nic), to_vec(means.backend), to_vec(means.frontend));

            // Act: a ~ N(μ, σ), with log π(a|s) summed over every existing knob.
            let mut settings = Vec::with_capacity(n_envs);
            for i in 0..n_envs {
                let vms = obs[i].guests.len();
                let mut a = vec![0f32; aw];
                let mut lp = 0.0f64;
                let mut sample = |mu: f32, ls: f32, a: &mut f32| {
                    let std = f64::from(ls).exp();
                    let eps = standard_normal(&mut rng);
                    *a = (f64::from(mu) + std * eps) as f32;
                    lp += -0.5 * eps * eps - f64::from(ls) - 0.5 * LN_2PI;
                };
                for k in 0..K {
                    sample(mu_nic[i * K + k], ls_nic[k], &mut a[k]);
                }
                for v in 0..vms {
                    for k in 0..K {
                        let j = (i * self.vmax + v) * K + k;
                        sample(mu_be[j], ls_be[k], &mut a[K + v * K + k]);
                        sample(mu_fe[j], ls_fe[k], &mut a[K + self.vmax * K + v * K + k]);
                    }
                }
                let s = decode_means(
                    self.action_space(),
                    vms,
                    &a[..K],
                    &a[K..K + self.vmax * K],
                    &a[K + self.vmax * K..],
                );
                settings.push(s);
                st.actions.extend_from_slice(&a);
                st.logprobs.push(lp as f32);
            }
            st.obs.extend(&x);
            st.values.extend_from_slice(&values);

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
            let truncating = (t + 1) % ep_steps == 0;
            for (i, r) in results.into_iter().enumerate() {
                let (env, step) = r?;
                let row = t * n_envs + i;
                let r = f64::from(step.reward);
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
            if truncating {
                // Time limit: bootstrap from the value of the final observation.
                let mut fin = FeatureBatch::new(self.vmax);
                for o in &obs {
                    fin.push(o, self.action_space());
                }
                let v =
                    to_vec(infer.critic.value(
                        &fin.normalized(&self.state.normalizer, &self.ignored).tensors(&infer_device),
                    ));
                for (r, v) in st.rewards[t * n_envs..(t + 1) * n_envs].iter_mut().zip(&v) {
                    *r += (gamma * f64::from(*v)) as f32;
                }
                disc_return.iter_mut().for_each(|d| *d = 0.0);
            }
        }
        self.state.global_step += rows as u64;

        // ------------------------------------------------------------------ GAE
        // A_t = δ_t + γλ(1 − done_t) A_{t+1},  δ_t = r_t + γ(1 − done_t) V(s_{t+1}) − V(s_t).
        let lam = c.ppo.gae_lambda;
        let mut adv = vec![0f32; rows];
        let mut lastgaelam = vec![0f64; n_envs];
        for t in (0..n_steps).rev() {
            for (i, last) in lastgaelam.iter_mut().enumerate() {
                let row = t * n_envs + i;
                let nextnonterminal = 1.0 - f64::from(st.dones[row]);
                let nextvalue = if t + 1 < n_steps { f64::from(st.values[row + n_envs]) } else { 0.0 };
                let delta = f64::from(st.rewards[row]) + gamma * nextvalue * nextnonterminal
                    - f64::from(st.values[row]);
                *last = delta + gamma * lam * nextnonterminal * *last;
                adv[row] = *last as f32;
            }
        }
        let returns: Vec<f32> = adv.iter().zip(&st.values).map(|(a, v)| a + v).collect();

        // ------------------------------------------------------------------ update
        let mb_size = rows / c.ppo.num_minibatches;
        let mut inds: Vec<usize> = (0..rows).collect();
        let mut shuffle = Pcg64Mcg::seed_from_u64(derive(iseed, &[4]));
        let (mut v_loss_last, mut pg_loss_last, mut ent_last, mut kl_last, mut old_kl_last) =
            (0.0, 0.0, 0.0, 0.0, 0.0);
        let mut clipfracs = Vec::new();
        'epochs: for _epoch in 0..c.ppo.update_epochs {
            // Fisher–Yates with our generator.
            for j in (1..rows).rev() {
                let k = (shuffle.next_u64() % (j as u64 + 1)) as usize;
                inds.swap(j, k);
            }
            for start in (0..rows).step_by(mb_size) {
                let mb = &inds[start..start + mb_size];
                let out = self.minibatch(&st, &adv, &returns, mb, lr)?;
                v_loss_last = out.v_loss;
                pg_loss_last = out.pg_loss;
                ent_last = out.entropy;
                kl_last = out.approx_kl;
                old_kl_last = out.old_approx_kl;
                clipfracs.push(out.clipfrac);
                if c.ppo.target_kl.is_some_and(|target| out.approx_kl > target) {
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
            value_loss: v_loss_last,
            policy_loss: pg_loss_last,
            entropy: ent_last,
            approx_kl: kl_last,
            clipfrac: mean(&clipfracs),
            explained_variance,
        };
        let secs = started.elapsed().as_secs_f64();
        metrics.scalar("charts/learning_rate", lr, step);
        metrics.scalar("charts/episodic_return", stats.episodic_return, step);
        metrics.scalar("charts/cpu_us_per_packet", stats.cpu_us_per_packet, step);
        metrics.scalar("charts/p99_latency_us", stats.p99_latency_us, step);
        metrics.scalar("charts/slo_violation_rate", stats.slo_violation_rate, step);
        metrics.scalar("charts/drop_rate", mean(&eps.drop_rate), step);
        metrics.scalar("charts/SPS", rows as f64 / secs, step);
        metrics.scalar("losses/value_loss", v_loss_last, step);
        metrics.scalar("losses/policy_loss", pg_loss_last, step);
        metrics.scalar("losses/entropy", ent_last, step);
        metrics.scalar("losses/old_approx_kl", old_kl_last, step);
        metrics.scalar("losses/approx_kl", kl_last, step);
        metrics.scalar("losses/clipfrac", stats.clipfrac, step);
        metrics.scalar("losses/explained_variance", explained_variance, step);
        let [a, b, f] = self.log_stds();
        metrics.histogram(
            "policy/log_std",
            &a.iter().chain(&b).chain(&f).map(|x| f64::from(*x)).collect::<Vec<_>>(),
            step,
        );
        metrics.histogram("charts/episodic_returns", &eps.returns, step);
        Ok(stats)
    }

    /// One gradient step on the rows `mb` of the rollout.
    fn minibatch(
        &mut self,
        st: &Storage,
        adv: &[f32],
        returns: &[f32],
        mb: &[usize],
        lr: f64,
    ) -> Result<MinibatchOut> {
        let c = &self.exp.config.ppo;
        let dev = &self.device;
        let n = mb.len();
        let v = self.vmax;
        let x = st.obs.select(mb).tensors(dev);
        let aw = self.action_width();
        let mut a_nic = Vec::with_capacity(n * K);
        let mut a_be = Vec::with_capacity(n * v * K);
        let mut a_fe = Vec::with_capacity(n * v * K);
        for &r in mb {
            let a = &st.actions[r * aw..(r + 1) * aw];
            a_nic.extend_from_slice(&a[..K]);
            a_be.extend_from_slice(&a[K..K + v * K]);
            a_fe.extend_from_slice(&a[K + v * K..]);
        }
        let t1 = |d: Vec<f32>| Tensor::<1>::from_data(TensorData::new(d, [n]), dev);
        let mut b_adv: Vec<f32> = mb.iter().map(|&r| adv[r]).collect();
        if c.norm_adv && n > 1 {
            let m = b_adv.iter().map(|x| f64::from(*x)).sum::<f64>() / n as f64;
            let sd = (b_adv.iter().map(|x| (f64::from(*x) - m).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt();
            b_adv.iter_mut().for_each(|x| *x = ((f64::from(*x) - m) / (sd + 1e-8)) as f32);
        }
        let b_adv = t1(b_adv);
        let b_returns = t1(mb.iter().map(|&r| returns[r]).collect());
        let b_values = t1(mb.iter().map(|&r| st.values[r]).collect());
        let b_logprobs = t1(mb.iter().map(|&r| st.logprobs[r]).collect());
        let a_nic = Tensor::<2>::from_data(TensorData::new(a_nic, [n, K]), dev);
        let a_be = Tensor::<3>::from_data(TensorData::new(a_be, [n, v, K]), dev);
        let a_fe = Tensor::<3>::from_data(TensorData::new(a_fe, [n, v, K]), dev);

        let model = &self.model;
        let means = model.actor.means(&x);
        let ls_nic = model.actor.log_std_nic.val().unsqueeze::<2>(); // [1, 4]
        let ls_be = model.actor.log_std_backend.val().unsqueeze::<3>(); // [1, 1, 4]
        let ls_fe = model.actor.log_std_frontend.val().unsqueeze::<3>(); // [1, 1, 4]
        // log N(a; μ, σ) = −(a − μ)² / (2σ²) − log σ − ½ log 2π, per knob.
        let lp2 = |a: Tensor<2>, mu: Tensor<2>, ls: Tensor<2>| {
            (a - mu).square().div((ls.clone() * 2.0).exp() * 2.0).neg() - ls - 0.5 * LN_2PI
        };
        let lp3 = |a: Tensor<3>, mu: Tensor<3>, ls: Tensor<3>| {
            (a - mu).square().div((ls.clone() * 2.0).exp() * 2.0).neg() - ls - 0.5 * LN_2PI
        };
        let mask = x.mask.clone(); // [n, vms]
        let vm_sum = |t: Tensor<3>| (t.sum_dim(2).reshape([n, v]) * mask.clone()).sum_dim(1).reshape([n]);
        let newlogprob = lp2(a_nic, means.nic, ls_nic.clone()).sum_dim(1).reshape([n]) // [n]
            + vm_sum(lp3(a_be, means.backend, ls_be.clone()))
            + vm_sum(lp3(a_fe, means.frontend, ls_fe.clone()));
        // Entropy of a Gaussian: ½ + ½ log 2π + log σ per knob; padded VMs count nothing.
        let h = 0.5 + 0.5 * LN_2PI;
        let vms_per_row = mask.clone().sum_dim(1).reshape([n]); // [n]
        let entropy = (ls_nic + h).sum().expand([n])
            + vms_per_row * ((ls_be + h).sum() + (ls_fe + h).sum()).expand([n]);
        let newvalue = model.critic.value(&x); // [n]

        let logratio = newlogprob - b_logprobs;
        let ratio = logratio.clone().exp();
        // Diagnostics (no gradient): old and new approximations of KL (Schulman's k1, k3).
        let old_approx_kl = f64::from(to_vec(logratio.clone().neg().mean().inner())[0]);
        let approx_kl = f64::from(to_vec(((ratio.clone() - 1.0) - logratio).mean().inner())[0]);
        let r = to_vec(ratio.clone().inner());
        let clipfrac =
            r.iter().filter(|x| (f64::from(**x) - 1.0).abs() > c.clip_coef).count() as f64 / n as f64;

        // Clipped surrogate: max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε)).
        let pg1 = b_adv.clone().neg() * ratio.clone();
        let pg2 = b_adv.neg() * ratio.clamp(1.0 - c.clip_coef, 1.0 + c.clip_coef);
        let pg_loss = pg1.max_pair(pg2).mean();
        // Value loss, optionally clipped around the old values.
        let v_loss = if c.clip_vloss {
            let unclipped = (newvalue.clone() - b_returns.clone()).square();
            let clipped = b_values.clone() + (newvalue - b_values).clamp(-c.clip_coef, c.clip_coef);
            let clipped = (clipped - b_returns).square();
            unclipped.max_pair(clipped).mean() * 0.5
        } else {
            (newvalue - b_returns).square().mean() * 0.5
        };
        let entropy_loss = entropy.mean();
        let loss = pg_loss.clone() - entropy_loss.clone() * c.ent_coef + v_loss.clone() * c.vf_coef;

        let grads = GradientsParams::from_grads(loss.backward(), &self.model);
        let grads = clip_global_norm(&self.model, grads, c.max_grad_norm);
        let model = std::mem::replace(&mut self.model, Model::new(&NetConfig::default(), 0, dev));
        self.model = self.optim.step(lr, model, grads);
        let scalar = |t: Tensor<1>| f64::from(to_vec(t.inner())[0]);
        Ok(MinibatchOut {
            v_loss: scalar(v_loss),
            pg_loss: scalar(pg_loss),
            entropy: scalar(entropy_loss),
            approx_kl,
            old_approx_kl,
            clipfrac,
        })
    }
}

struct MinibatchOut {
    v_loss: f64,
    pg_loss: f64,
    entropy: f64,
    approx_kl: f64,
    old_approx_kl: f64,
    clipfrac: f64,
}

/// Sum of squares of every gradient of a module's float parameters.
struct SquaredNorm<'a> {
    grads: &'a GradientsParams,
    sum: f64,
}

impl ModuleVisitor for SquaredNorm<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.get::<D>(param.id) {
            self.sum += f64::from(to_vec(g.square().sum())[0]);
        }
    }
}

/// Multiplies every gradient by a factor.
struct Scale<'a> {
    grads: &'a mut GradientsParams,
    factor: f64,
}

impl ModuleVisitor for Scale<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.remove::<D>(param.id) {
            self.grads.register::<D>(param.id, g * self.factor);
        }
    }
}

/// Global gradient-norm clipping (PyTorch's `clip_grad_norm_`): if the norm over all parameters
/// exceeds `max_norm`, every gradient is scaled by `max_norm / (norm + 1e-6)`. burn's
/// `GradientClipping::Norm` clips each tensor on its own, which is not what PPO uses.
pub fn clip_global_norm<M: Module>(module: &M, mut grads: GradientsParams, max_norm: f64) -> GradientsParams {
    let mut sq = SquaredNorm { grads: &grads, sum: 0.0 };
    module.visit(&mut sq);
    let norm = sq.sum.sqrt();
    if norm > max_norm {
        let mut s = Scale { grads: &mut grads, factor: max_norm / (norm + 1e-6) };
        module.visit(&mut s);
    }
    grads
}

/// Computes `f(i)` for `i in 0..n` on up to `threads` scoped threads; results in index order.
fn parallel_map<T: Send>(n: usize, threads: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    if threads <= 1 || n <= 1 {
        return (0..n).map(f).collect();
    }
    let chunk = n.div_ceil(threads);
    let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = (0..n)
            .step_by(chunk)
            .map(|lo| s.spawn(move || (lo..(lo + chunk).min(n)).map(|i| (i, f(i))).collect::<Vec<_>>()))
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
        let bytes = self.optim.into_bytes().map_err(|e| anyhow::anyhow!("{e:?}"))?;
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
        let vmax = exp.scenarios.iter().map(|s| s.vms.len()).max().unwrap_or(1);
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
        anyhow::ensure!(
            saved == exp.toml,
            "{}: this checkpoint was made with another config than {}; resume with the config the run started with",
            dir.display(),
            exp.path.display()
        );
        let mut t = Trainer::with_envs(exp, device, make_env, vmax);
        let bytes =
            std::fs::read(dir.join("model.bpk")).with_context(|| ctx(dir, "cannot read model.bpk"))?;
        let rec = burn::store::ModuleRecord::from_bytes(burn::tensor::Bytes::from_bytes_vec(bytes))
            .map_err(|e| anyhow::anyhow!("{}: model.bpk: {e:?}", dir.display()))?;
        t.model = t
            .model
            .try_load_record(rec)
            .map_err(|e| anyhow::anyhow!("{}: model.bpk: {e:?}", dir.display()))?;
        let bytes = std::fs::read(dir.join("optimizer.bpk"))
            .with_context(|| ctx(dir, "cannot read optimizer.bpk"))?;
        t.optim = AdamConfig::new()
            .with_epsilon(1e-5)
            .init()
            .from_bytes(burn::tensor::Bytes::from_bytes_vec(bytes))
            .map_err(|e| anyhow::anyhow!("{}: optimizer.bpk: {e:?}", dir.display()))?;
        let state = std::fs::read_to_string(dir.join("state.json"))
            .with_context(|| ctx(dir, "cannot read state.json"))?;
        t.state = serde_json::from_str(&state).with_context(|| ctx(dir, "state.json"))?;
        Ok(t)
    }
}
