//! PPO: a known optimum on a toy environment, identical curves for identical seeds, resume that
//! changes nothing, and export.

use std::path::Path;
use std::sync::Arc;

use moderato_agent::train::metrics::Memory;
use moderato_agent::train::ppo::EnvMaker;
use moderato_agent::train::{Experiment, ExperimentConfig, Trainer, checkpoints, train_device, train_loop};
use moderato_env::{
    ActionSpace, CoalescingSettings, Env, EnvError, EnvSpec, Info, LayerId, LayerKind, Moderation,
    Observation, Step,
};
use moderato_policies::Policy;
use moderato_policies::learned::LearnedPolicy;

/// A contextual bandit with a known optimum. Each step shows a context (the rx rates of the NIC,
/// the backend and the frontend are all low or all high) and rewards `−mean_k (a_k − target)²` over every knob's encoded value `a_k`,
/// where the target is −0.6 in a low context and +0.6 in a high one. The best policy reads the
/// context and puts every knob on its target: reward 0.
struct Bandit {
    spec: EnvSpec,
    rng: u64,
    high: bool,
    steps: u32,
}

const TARGET: f32 = 0.6;

impl Bandit {
    fn new() -> Self {
        let spec = EnvSpec {
            vms: 1,
            action_space: ActionSpace::default(),
            interval_ns: 1_000_000,
            max_steps: Some(16),
            host_probe: false,
            guest_probe: false,
            slo_p99_us: None,
            vm_slo_p99_us: Vec::new(),
            profile: Default::default(),
        };
        Bandit { spec, rng: 0, high: false, steps: 0 }
    }

    fn draw(&mut self) -> Observation {
        self.rng = self.rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.high = (self.rng >> 33) & 1 == 1;
        let mut o = Observation { interval_ns: 1_000_000, ..Default::default() };
        o.host.backends = vec![Default::default()];
        o.guests = vec![Default::default()];
        // Every side sees the context, so that each actor can act on it.
        let rate = if self.high { 1e6 } else { 1e3 };
        o.host.nic.rx_pps = rate;
        o.host.backends[0].rx_pps = rate;
        o.guests[0].frontend.rx_pps = rate;
        o
    }

    fn target(&self) -> f32 {
        if self.high { TARGET } else { -TARGET }
    }
}

fn encoded(space: &ActionSpace, s: &CoalescingSettings) -> Vec<f32> {
    let mut v = Vec::new();
    for id in LayerId::all(1) {
        let l = s.layer(id);
        let (Moderation::Fixed(rx), Moderation::Fixed(tx)) = (l.rx, l.tx) else { panic!("fixed knobs") };
        let kind: LayerKind = id.kind();
        v.extend(space.encode_layer(kind, rx, tx));
    }
    v
}

impl Env for Bandit {
    fn spec(&self) -> &EnvSpec {
        &self.spec
    }
    fn reset(&mut self, seed: u64) -> Result<(Observation, Info), EnvError> {
        self.rng = seed;
        self.steps = 0;
        Ok((self.draw(), Info::default()))
    }
    fn step(&mut self, action: &CoalescingSettings) -> Result<Step, EnvError> {
        let t = self.target();
        let a = encoded(&self.spec.action_space, action);
        let reward = -a.iter().map(|x| (x - t).powi(2)).sum::<f32>() / a.len() as f32;
        self.steps += 1;
        Ok(Step {
            obs: self.draw(),
            reward,
            terminated: false,
            truncated: self.steps >= 16,
            info: Info::default(),
        })
    }
}

fn experiment(text: &str) -> Experiment {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments/test.toml");
    ExperimentConfig::parse(text, &path).unwrap()
}

const BANDIT: &str = r#"
name = "bandit"
seed = 7
total_timesteps = 12288
num_envs = 8
num_steps = 32
threads = 1
[suite]
scenarios = ["scenarios/rr-latency.toml"]
[sim]
episode_steps = 16
[ppo]
learning_rate = 3e-3
gamma = 0.5
num_minibatches = 4
update_epochs = 8
norm_reward = false
[network]
hidden = [32]
init_log_std = -0.5
init_action_mean = 0.0
"#;

#[test]
fn ppo_reaches_the_known_optimum_of_a_contextual_bandit() {
    let exp = experiment(BANDIT);
    let make: EnvMaker = Arc::new(|_| Ok(Box::new(Bandit::new()) as Box<dyn Env + Send>));
    let mut t = Trainer::with_envs(exp, train_device(), make, 1);
    let mut m = Memory::default();
    let total = t.exp.config.iterations();
    for _ in 0..total {
        t.iteration(&mut m).unwrap();
    }
    // The mean action in each context is on its target.
    let meta = moderato_agent::train::model_meta("bandit", "", &t.exp.config, &t.state);
    let mut p = LearnedPolicy::new("bandit", t.model.actor.clone(), meta, burn::tensor::Device::flex());
    let mut env = Bandit::new();
    let (mut o, _) = env.reset(99).unwrap();
    let mut worst: f32 = 0.0;
    for _ in 0..20 {
        let a = p.act(&o);
        let err =
            encoded(&ActionSpace::default(), &a).iter().map(|x| (x - env.target()).abs()).fold(0.0, f32::max);
        worst = worst.max(err);
        o = env.step(&a).unwrap().obs;
    }
    // 0.15 in [-1, 1] space: about one step of the integer knob grid near the target plus
    // what 12k samples of exploration noise leave.
    assert!(worst < 0.15, "deterministic actions miss the target by {worst}");
    let returns = m.series("charts/episodic_return");
    let first = returns[0].1;
    let last = returns.last().unwrap().1;
    // Exploration noise keeps training returns below 0; they must have improved a lot.
    assert!(last > first * 0.3, "episodic return {first} → {last}");
}

/// The bandit with a memory: each step rewards the action on the target of the context shown one
/// step earlier (at an episode's first step, the context shown then). Contexts are independent, so
/// an actor that reads only the current interval cannot beat acting at 0 (missing by 0.6); one
/// that reads the previous interval (`network.history`) can put every knob on its target.
struct RecallBandit {
    inner: Bandit,
    target: f32,
}

impl Env for RecallBandit {
    fn spec(&self) -> &EnvSpec {
        &self.inner.spec
    }
    fn reset(&mut self, seed: u64) -> Result<(Observation, Info), EnvError> {
        let r = self.inner.reset(seed)?;
        self.target = self.inner.target();
        Ok(r)
    }
    fn step(&mut self, action: &CoalescingSettings) -> Result<Step, EnvError> {
        let a = encoded(&self.inner.spec.action_space, action);
        let reward = -a.iter().map(|x| (x - self.target).powi(2)).sum::<f32>() / a.len() as f32;
        // The context shown now (before the step draws the next) is the next step's target.
        let shown = self.inner.target();
        let mut step = self.inner.step(action)?;
        self.target = shown;
        step.reward = reward;
        Ok(step)
    }
}

/// Trains on [`RecallBandit`] with `history`, then acts deterministically through the frozen
/// policy (which keeps the previous observation itself, as in deploy) for 3 episodes: the mean
/// and the worst miss of the knobs from the step's target.
fn recall_run(history: &str) -> (f32, f32) {
    let text =
        BANDIT.replace("init_action_mean = 0.0", &format!("init_action_mean = 0.0\nhistory = \"{history}\""));
    let make: EnvMaker =
        Arc::new(|_| Ok(Box::new(RecallBandit { inner: Bandit::new(), target: 0.0 }) as Box<dyn Env + Send>));
    let mut t = Trainer::with_envs(experiment(&text), train_device(), make, 1);
    let mut m = Memory::default();
    for _ in 0..t.exp.config.iterations() {
        t.iteration(&mut m).unwrap();
    }
    let meta = moderato_agent::train::model_meta("recall", "", &t.exp.config, &t.state);
    assert_eq!(meta.network.history.intervals(), if history == "none" { 1 } else { 2 });
    let mut p = LearnedPolicy::new("recall", t.model.actor.clone(), meta, burn::tensor::Device::flex());
    let (mut sum, mut n, mut worst) = (0.0f32, 0usize, 0.0f32);
    for episode in 0..3 {
        let mut env = RecallBandit { inner: Bandit::new(), target: 0.0 };
        let (mut o, _) = env.reset(100 + episode).unwrap();
        p.reset();
        for _ in 0..16 {
            let a = p.act(&o);
            for x in encoded(&ActionSpace::default(), &a) {
                let miss = (x - env.target).abs();
                (sum, n, worst) = (sum + miss, n + 1, worst.max(miss));
            }
            o = env.step(&a).unwrap().obs;
        }
    }
    (sum / n as f32, worst)
}

#[test]
fn an_actor_with_history_learns_what_only_the_previous_interval_shows() {
    for mode in ["previous", "delta"] {
        let (mean, worst) = recall_run(mode);
        assert!(worst < 0.2, "history = {mode}: deterministic actions miss the target by up to {worst}");
        assert!(mean < 0.1, "history = {mode}: mean miss {mean}");
    }
    // The control: without history the previous context is invisible, and the best the actor
    // can do (acting near 0) misses every target by about 0.6.
    let (mean, _) = recall_run("none");
    assert!(mean > 0.45, "history = none: mean miss {mean}, but the task needs the previous interval");
}

/// The bandit with a longer memory: each step rewards the action on +0.6 if any of the last
/// three contexts (the current one included) was high, else on −0.6; a context is high one time
/// in five, so either answer is about as likely. The previous interval alone misses the case
/// where only the context two steps back was high (one step in eight); a decaying peak of the
/// recent contexts (`history = "peak"`) holds it.
struct BurstBandit {
    inner: Bandit,
    shown: [bool; 3],
}

impl BurstBandit {
    fn new() -> Self {
        BurstBandit { inner: Bandit::new(), shown: [false; 3] }
    }

    /// A context from the inner bandit's generator, high one time in five.
    fn draw(&mut self) -> Observation {
        let mut o = self.inner.draw();
        let high = (self.inner.rng >> 40).is_multiple_of(5);
        let rate = if high { 1e6 } else { 1e3 };
        o.host.nic.rx_pps = rate;
        o.host.backends[0].rx_pps = rate;
        o.guests[0].frontend.rx_pps = rate;
        self.shown = [high, self.shown[0], self.shown[1]];
        o
    }

    fn target(&self) -> f32 {
        if self.shown.iter().any(|&h| h) { TARGET } else { -TARGET }
    }
}

impl Env for BurstBandit {
    fn spec(&self) -> &EnvSpec {
        &self.inner.spec
    }
    fn reset(&mut self, seed: u64) -> Result<(Observation, Info), EnvError> {
        self.inner.reset(seed)?;
        self.shown = [false; 3];
        Ok((self.draw(), Info::default()))
    }
    fn step(&mut self, action: &CoalescingSettings) -> Result<Step, EnvError> {
        let a = encoded(&self.inner.spec.action_space, action);
        let t = self.target();
        let reward = -a.iter().map(|x| (x - t).powi(2)).sum::<f32>() / a.len() as f32;
        self.inner.steps += 1;
        Ok(Step {
            obs: self.draw(),
            reward,
            terminated: false,
            truncated: self.inner.steps >= 16,
            info: Info::default(),
        })
    }
}

/// Trains on [`BurstBandit`] with `history` and returns the frozen policy's mean miss over 20
/// episodes (acting through the policy, which keeps its own history as in deploy).
fn burst_run(history: &str) -> f32 {
    let text = BANDIT
        .replace("init_action_mean = 0.0", &format!("init_action_mean = 0.0\nhistory = \"{history}\""))
        .replace("total_timesteps = 12288", "total_timesteps = 61440");
    let make: EnvMaker = Arc::new(|_| Ok(Box::new(BurstBandit::new()) as Box<dyn Env + Send>));
    let mut t = Trainer::with_envs(experiment(&text), train_device(), make, 1);
    let mut m = Memory::default();
    for _ in 0..t.exp.config.iterations() {
        t.iteration(&mut m).unwrap();
    }
    let meta = moderato_agent::train::model_meta("burst", "", &t.exp.config, &t.state);
    let mut p = LearnedPolicy::new("burst", t.model.actor.clone(), meta, burn::tensor::Device::flex());
    let (mut sum, mut n) = (0.0f32, 0usize);
    for episode in 0..20 {
        let mut env = BurstBandit::new();
        let (mut o, _) = env.reset(200 + episode).unwrap();
        p.reset();
        for _ in 0..16 {
            let a = p.act(&o);
            for x in encoded(&ActionSpace::default(), &a) {
                sum += (x - env.target()).abs();
                n += 1;
            }
            o = env.step(&a).unwrap().obs;
        }
    }
    sum / n as f32
}

#[test]
fn an_actor_with_a_held_peak_remembers_a_burst_that_the_previous_interval_has_forgotten() {
    let peak = burst_run("peak");
    let previous = burst_run("previous");
    eprintln!("mean miss: peak {peak}, previous {previous}");
    assert!(peak < 0.2, "history = peak: mean miss {peak}");
    assert!(
        peak + 0.05 < previous,
        "history = peak misses {peak}, previous {previous}: the peak should remember more"
    );
}

const SIM: &str = r#"
name = "tiny"
seed = 3
total_timesteps = 512
num_envs = 4
num_steps = 32
threads = 2
[suite]
scenarios = ["scenarios/onoff-bursts.toml", "scenarios/mixed-host.toml"]
[sim]
interval_us = 2000
episode_steps = 16
[ppo]
num_minibatches = 4
update_epochs = 2
[network]
hidden = [16, 16]
[checkpoint]
every_iterations = 2
keep = 0
"#;

fn curve(m: &Memory) -> Vec<(String, u64, u64)> {
    m.scalars.iter().filter(|s| s.0 != "charts/SPS").map(|s| (s.0.clone(), s.1, s.2.to_bits())).collect()
}

#[test]
fn the_same_seed_gives_the_same_training_curve_and_another_does_not() {
    let run = |text: &str| {
        let mut t = Trainer::new(experiment(text), train_device());
        let mut m = Memory::default();
        for _ in 0..2 {
            t.iteration(&mut m).unwrap();
        }
        curve(&m)
    };
    let a = run(SIM);
    let b = run(SIM);
    assert!(!a.is_empty());
    assert_eq!(a, b, "same seed, different training curves");
    let c = run(&SIM.replace("seed = 3", "seed = 4"));
    assert_ne!(a, c, "different seeds, same training curve");
}

#[test]
fn resume_from_a_checkpoint_makes_the_same_updates() {
    // Straight through: four iterations.
    let tmp = tempfile::tempdir().unwrap();
    let mut straight = Trainer::new(experiment(SIM), train_device());
    let mut m_straight = Memory::default();
    assert!(train_loop(&mut straight, &tmp.path().join("a"), &mut m_straight, None, false).unwrap());

    // Interrupted after two iterations (the process is gone: only the checkpoint survives) ...
    let run = tmp.path().join("b");
    let mut first = Trainer::new(experiment(SIM), train_device());
    let mut m_first = Memory::default();
    assert!(!train_loop(&mut first, &run, &mut m_first, Some(2), false).unwrap());
    drop(first);
    let last = checkpoints(&run).unwrap().pop().unwrap();
    assert!(last.ends_with("iter-000002"), "{}", last.display());
    // ... then resumed from it.
    let mut resumed = Trainer::load_checkpoint(experiment(SIM), &last, train_device()).unwrap();
    assert_eq!(resumed.state.iteration, 2);
    let mut m_resumed = Memory::default();
    assert!(train_loop(&mut resumed, &run, &mut m_resumed, None, false).unwrap());

    let mut joined = curve(&m_first);
    joined.extend(curve(&m_resumed));
    assert_eq!(curve(&m_straight), joined, "resumed training diverged from the uninterrupted run");
    assert_eq!(straight.state, resumed.state);
}

#[test]
fn a_checkpoint_from_another_config_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(experiment(SIM), train_device());
    let mut m = Memory::default();
    train_loop(&mut t, tmp.path(), &mut m, Some(2), false).unwrap();
    let last = checkpoints(tmp.path()).unwrap().pop().unwrap();
    let e = Trainer::load_checkpoint(experiment(&SIM.replace("seed = 3", "seed = 9")), &last, train_device())
        .unwrap_err()
        .to_string();
    assert!(e.contains("another config"), "{e}");
}

#[test]
fn a_resume_can_extend_the_run_but_not_shorten_it() {
    let tmp = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(experiment(SIM), train_device());
    let mut m = Memory::default();
    assert!(!train_loop(&mut t, tmp.path(), &mut m, Some(2), false).unwrap());
    let last = checkpoints(tmp.path()).unwrap().pop().unwrap();
    // 512 → 768 steps: 4 → 6 iterations of 4 envs × 32 steps, continued from iteration 2.
    let longer = SIM.replace("total_timesteps = 512", "total_timesteps = 768");
    let mut r = Trainer::load_checkpoint(experiment(&longer), &last, train_device()).unwrap();
    assert_eq!((r.state.iteration, r.exp.config.iterations()), (2, 6));
    assert!(train_loop(&mut r, tmp.path(), &mut Memory::default(), None, false).unwrap());
    assert_eq!(r.state.iteration, 6);
    let shorter = SIM.replace("total_timesteps = 512", "total_timesteps = 256");
    let e = Trainer::load_checkpoint(experiment(&shorter), &last, train_device()).unwrap_err().to_string();
    assert!(e.contains("was to train 512 timesteps") && e.contains("not shorten it"), "{e}");
    // Any other change beside the total is still another config.
    let other = longer.replace("seed = 3", "seed = 9");
    let e = Trainer::load_checkpoint(experiment(&other), &last, train_device()).unwrap_err().to_string();
    assert!(e.contains("another config"), "{e}");
}

#[test]
fn export_gives_the_trainers_actions() {
    let tmp = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(experiment(SIM), train_device());
    let mut m = Memory::default();
    train_loop(&mut t, tmp.path(), &mut m, Some(2), false).unwrap();
    let last = checkpoints(tmp.path()).unwrap().pop().unwrap();
    let model = tmp.path().join("model");
    let export = |force| {
        moderato_agent::train::export(moderato_agent::train::ExportArgs {
            checkpoint: last.clone(),
            model_dir: model.clone(),
            force,
        })
    };
    export(false).unwrap();
    // A second export into the same directory is refused, unless forced.
    let e = export(false).unwrap_err().to_string();
    assert!(e.contains("--force") && e.contains("model"), "{e}");
    export(true).unwrap();
    let mut loaded = LearnedPolicy::load(&model, &burn::tensor::Device::flex()).unwrap();
    let meta = moderato_agent::train::model_meta("tiny", "", &t.exp.config, &t.state);
    let mut live = LearnedPolicy::new("live", t.model.actor.clone(), meta, burn::tensor::Device::flex());
    let sc = moderato_env::sim::Scenario::load(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments/scenarios/mixed-host.toml"),
    )
    .unwrap();
    let mut env = moderato_env::sim::SimEnv::new(sc, t.exp.config.sim.clone(), None).unwrap();
    let (o, _) = env.reset(1).unwrap();
    assert_eq!(loaded.act(&o), live.act(&o));
    assert_eq!(loaded.meta().provenance.timesteps, t.state.global_step);
}

/// A checkpoint written by the trainer of revision 4546215 (`moderato train` on the `SIM` config, 2
/// of 4 iterations) predates per-VM objectives, which added the `slo_*` features: this build
/// cannot resume it, and says so in a sentence instead of failing on the weights' shapes. (Until
/// the features changed it resumed with its Adam state; that test is in the history, 64988d9.)
#[test]
fn a_checkpoint_from_revision_4546215_is_refused_with_the_reason() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/checkpoint-4546215");
    let text = std::fs::read_to_string(fixture.join("config.toml")).unwrap();
    let e = Trainer::load_checkpoint(experiment(&text), &fixture, train_device()).unwrap_err().to_string();
    assert!(
        e.contains("15 host features, this build has 21")
            && e.contains("slo_*")
            && e.contains("start a new run"),
        "{e}"
    );
    // `moderato export` says the same.
    let out = tempfile::tempdir().unwrap();
    let args = moderato_agent::train::ExportArgs {
        checkpoint: fixture.clone(),
        model_dir: out.path().join("model"),
        force: false,
    };
    let e = format!("{:#}", moderato_agent::train::export(args).unwrap_err());
    assert!(e.contains("host features") && e.contains("start a new run"), "{e}");
}

#[test]
fn a_checkpoint_whose_optimizer_state_is_unreadable_is_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(experiment(SIM), train_device());
    t.iteration(&mut Memory::default()).unwrap();
    t.save_checkpoint(tmp.path()).unwrap();
    // The checkpoint as written resumes.
    Trainer::load_checkpoint(experiment(SIM), tmp.path(), train_device()).unwrap();
    std::fs::write(tmp.path().join("optimizer.bpk"), b"truncated").unwrap();
    let e = Trainer::load_checkpoint(experiment(SIM), tmp.path(), train_device()).unwrap_err().to_string();
    assert!(e.contains("optimizer.bpk") && e.contains("not a burnpack file"), "{e}");
}

#[test]
fn a_max_iterations_stop_leaves_a_checkpoint_to_resume_from() {
    let tmp = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(experiment(SIM), train_device());
    // every_iterations = 2: without the stop's own checkpoint there would be none after one.
    let finished = train_loop(&mut t, tmp.path(), &mut Memory::default(), Some(1), false).unwrap();
    assert!(!finished);
    let last = checkpoints(tmp.path()).unwrap().pop().expect("a checkpoint at the stop");
    assert!(last.ends_with("iter-000001"), "{}", last.display());
    // A second stop at a checkpointed iteration writes nothing new and keeps it.
    let finished = train_loop(&mut t, tmp.path(), &mut Memory::default(), Some(1), false).unwrap();
    assert!(!finished);
    let names: Vec<_> =
        checkpoints(tmp.path()).unwrap().iter().map(|p| p.file_name().unwrap().to_owned()).collect();
    assert_eq!(names, ["iter-000001", "iter-000002"]);
}

#[test]
fn an_existing_out_is_refused_unless_forced() {
    let tmp = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments").canonicalize().unwrap();
    let exp = tmp.path().join("tiny.toml");
    std::fs::write(&exp, SIM.replace("\"scenarios/", &format!("\"{}/scenarios/", root.display()))).unwrap();
    let out = tmp.path().join("run");
    std::fs::create_dir_all(out.join("checkpoints/iter-000009")).unwrap();
    std::fs::write(out.join("checkpoints/iter-000009/state.json"), "{}").unwrap();
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let args = |force| moderato_agent::train::TrainArgs {
        experiment: exp.clone(),
        resume: None,
        out: Some(out.clone()),
        force,
        max_iterations: Some(1),
        no_eval: true,
        seed: None,
    };
    let e = format!("{:#}", moderato_agent::train::run(args(false)).unwrap_err());
    assert!(e.contains("--force") && e.contains("--resume") && e.contains("run"), "{e}");
    assert!(out.join("checkpoints/iter-000009").exists(), "a refused run removed something");
    moderato_agent::train::run(args(true)).unwrap();
    let names: Vec<_> =
        checkpoints(&out).unwrap().iter().map(|p| p.file_name().unwrap().to_owned()).collect();
    assert_eq!(names, ["iter-000001"], "the old run's checkpoints are gone, the stop's is there");
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "mine",
        "--force removes only run outputs"
    );
}

/// A bandit whose cheapest arms break the budget: reward `mean_k a_k` over every knob's encoded
/// value (heavier coalescing is cheaper), and the interval is "SLO-violating" (cost 1) when that
/// mean is above 0. The unconstrained optimum is every knob at the top; under a cost budget of 5%
/// the optimum keeps the mean below 0 by the margin the exploration noise needs.
struct CostlyBandit {
    spec: EnvSpec,
    steps: u32,
    /// The penalty's weight in the reward (0: the reward knows nothing of the violation).
    penalty: f32,
}

impl CostlyBandit {
    fn new(penalty: f32) -> Self {
        CostlyBandit { spec: Bandit::new().spec, steps: 0, penalty }
    }
}

impl Env for CostlyBandit {
    fn spec(&self) -> &EnvSpec {
        &self.spec
    }
    fn reset(&mut self, _seed: u64) -> Result<(Observation, Info), EnvError> {
        self.steps = 0;
        Ok((Bandit::new().draw(), Info::default()))
    }
    fn step(&mut self, action: &CoalescingSettings) -> Result<Step, EnvError> {
        let a = encoded(&self.spec.action_space, action);
        let m = a.iter().sum::<f32>() / a.len() as f32;
        let violated = m > 0.0;
        let mut info = Info::default();
        info.reward_terms.cpu = f64::from(m);
        info.reward_terms.latency = if violated { -f64::from(self.penalty) } else { 0.0 };
        info.reward_terms.cost = if violated { 1.0 } else { 0.0 };
        self.steps += 1;
        Ok(Step {
            obs: Bandit::new().draw(),
            reward: info.reward_terms.total() as f32,
            terminated: false,
            truncated: self.steps >= 16,
            info,
        })
    }
}

fn constrained_run(constraint: &str) -> (f32, Memory) {
    let text = BANDIT.replace("total_timesteps = 12288", "total_timesteps = 16384").replace(
        "norm_reward = false",
        &format!("norm_reward = false\nconstraint = \"{constraint}\"\n[ppo.lagrangian]\ncost_budget = 0.05\nki = 2.0"),
    );
    let exp = experiment(&text);
    let make: EnvMaker = Arc::new(|_| Ok(Box::new(CostlyBandit::new(0.0)) as Box<dyn Env + Send>));
    let mut t = Trainer::with_envs(exp, train_device(), make, 1);
    let mut m = Memory::default();
    for _ in 0..t.exp.config.iterations() {
        t.iteration(&mut m).unwrap();
    }
    let meta = moderato_agent::train::model_meta("bandit", "", &t.exp.config, &t.state);
    let mut p = LearnedPolicy::new("bandit", t.model.actor.clone(), meta, burn::tensor::Device::flex());
    let mut env = CostlyBandit::new(0.0);
    let (o, _) = env.reset(1).unwrap();
    let a = encoded(&ActionSpace::default(), &p.act(&o));
    (a.iter().sum::<f32>() / a.len() as f32, m)
}

#[test]
fn the_lagrangian_finds_the_constrained_optimum_not_the_unconstrained_one() {
    // Without the constraint (and no penalty in the reward) PPO goes for the cheapest arm.
    let (free, _) = constrained_run("penalty");
    assert!(free > 0.5, "unconstrained mean action {free}");
    // With it, the deterministic action stays on the feasible side, close to the boundary.
    let (held, m) = constrained_run("lagrangian");
    assert!((-0.6..=0.0).contains(&held), "constrained mean action {held}");
    let cost = m.series("charts/cost");
    let lambda = m.series("charts/lagrange_multiplier");
    assert!(lambda.iter().any(|x| x.1 > 0.0), "the multiplier never rose");
    assert_eq!(m.series("charts/cost_budget").last().unwrap().1, 0.05);
    // The last quarter of training: the rollout's violation share near the budget (exploration
    // noise included), far below the unconstrained policy's (which violates almost always).
    let tail = &cost[cost.len() * 3 / 4..];
    let mean = tail.iter().map(|x| x.1).sum::<f64>() / tail.len() as f64;
    assert!(mean < 0.2, "rollout cost {mean} over the last quarter");
}

#[test]
fn the_pid_lagrangian_rises_over_budget_and_decays_under_it() {
    use moderato_agent::train::config::LagrangianConfig;
    use moderato_agent::train::ppo::LagrangeState;
    let g = LagrangianConfig { cost_budget: 0.1, kp: 0.0, ki: 1.0, kd: 0.0 };
    let mut s = LagrangeState::default();
    s.update(0.3, &g);
    assert!((s.multiplier - 0.2).abs() < 1e-12);
    s.update(0.3, &g);
    assert!((s.multiplier - 0.4).abs() < 1e-12);
    s.update(0.0, &g);
    assert!((s.multiplier - 0.3).abs() < 1e-12);
    // The integral is floored at zero: a long stretch under budget does not bank credit.
    for _ in 0..10 {
        s.update(0.0, &g);
    }
    assert_eq!(s.multiplier, 0.0);
    s.update(0.2, &g);
    assert!((s.multiplier - 0.1).abs() < 1e-12);
    // The proportional and derivative terms act at once on a rise.
    let g = LagrangianConfig { cost_budget: 0.1, kp: 1.0, ki: 0.0, kd: 2.0 };
    let mut s = LagrangeState::default();
    s.update(0.5, &g);
    assert!((s.multiplier - (0.4 + 2.0 * 0.5)).abs() < 1e-12);
}

#[test]
fn validation_while_training_keeps_the_best_checkpoint_and_exports_it() {
    let text = format!(
        "{SIM}\n[validation]\nscenarios = [\"scenarios/validation/idle-host.toml\", \"scenarios/validation/imix-rr-one-core.toml\"]\nevery_iterations = 1\n"
    );
    let mut t = Trainer::new(experiment(&text), train_device());
    assert_eq!(t.exp.validation.len(), 2);
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let mut m = Memory::default();
    assert!(train_loop(&mut t, &run, &mut m, None, false).unwrap());
    // Logged at every iteration, with the documented names.
    let ratio = m.series("validation/cpu_vs_best_static");
    assert_eq!(ratio.len() as u64, t.exp.config.iterations());
    assert!(ratio.iter().all(|r| r.1.is_finite() && r.1 > 0.0), "{ratio:?}");
    assert_eq!(m.series("validation/slo_violation_rate").len(), ratio.len());
    let scores = m.series("validation/score");
    let best = t.state.best_validation.clone().expect("a best validation");
    let lowest = scores.iter().map(|s| s.1).fold(f64::INFINITY, f64::min);
    assert_eq!(best.score, lowest);
    assert!(
        best.table.contains("| idle-host |") && best.table.contains("| imix-rr-one-core |"),
        "{}",
        best.table
    );
    // The exported model is the best checkpoint, with its validation table.
    let model = run.join("model");
    moderato_agent::train::freeze(&t, &model).unwrap();
    let got = moderato_agent::train::validate::export_best(&t, &run, &model).unwrap().unwrap();
    assert_eq!(got.iteration, best.iteration);
    let meta: moderato_policies::learned::ModelMeta =
        serde_json::from_str(&std::fs::read_to_string(model.join("model.json")).unwrap()).unwrap();
    assert_eq!(meta.provenance.validation.as_deref(), Some(best.table.as_str()));
    LearnedPolicy::load(&model, &burn::tensor::Device::flex()).unwrap();
}

#[test]
fn validations_before_from_iteration_are_logged_but_never_exported() {
    let last = experiment(SIM).config.iterations();
    assert!(last >= 3, "the test needs validations to choose from");
    let with = |from: u64| {
        format!(
            "{SIM}\n[validation]\nscenarios = [\"scenarios/validation/idle-host.toml\"]\nevery_iterations = 1\nfrom_iteration = {from}\n"
        )
    };
    let mut t = Trainer::new(experiment(&with(last)), train_device());
    let tmp = tempfile::tempdir().unwrap();
    let mut m = Memory::default();
    assert!(train_loop(&mut t, &tmp.path().join("run"), &mut m, None, false).unwrap());
    let scores = m.series("validation/score");
    assert_eq!(scores.len() as u64, last, "every validation is still run and logged");
    let best = t.state.best_validation.clone().expect("a best validation");
    assert_eq!(best.iteration, last);
    assert_eq!(best.score, scores.last().unwrap().1);
    // Without it, the lowest score of all (here an earlier one: the check above is not the default's).
    let mut t = Trainer::new(experiment(&with(0)), train_device());
    let tmp = tempfile::tempdir().unwrap();
    let mut m = Memory::default();
    assert!(train_loop(&mut t, &tmp.path().join("run"), &mut m, None, false).unwrap());
    let all = m.series("validation/score");
    let best = t.state.best_validation.clone().expect("a best validation");
    assert_eq!(best.score, all.iter().map(|s| s.1).fold(f64::INFINITY, f64::min));
    assert!(best.iteration < last, "{all:?}");
    // After the last iteration, nothing could be exported: refused by key.
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments/test.toml");
    let e = format!("{:#}", ExperimentConfig::parse(&with(last + 1), &path).unwrap_err());
    assert!(e.contains("test.toml") && e.contains("validation.from_iteration"), "{e}");
}

#[test]
fn a_validation_scenario_that_training_samples_is_refused() {
    let text = format!("{SIM}\n[validation]\nscenarios = [\"scenarios/mixed-host.toml\"]\n");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments/test.toml");
    let e = format!("{:#}", ExperimentConfig::parse(&text, &path).unwrap_err());
    assert!(e.contains("validation.scenarios") && e.contains("training never samples"), "{e}");
    let e = format!(
        "{:#}",
        ExperimentConfig::parse(&format!("{SIM}\n[validation]\nscenarios = []\n"), &path).unwrap_err()
    );
    assert!(e.contains("validation.scenarios"), "{e}");
}

#[test]
fn a_starting_deferral_outside_the_action_space_is_refused_by_key() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments/test.toml");
    let with = |v: &str| SIM.replace("hidden = [16, 16]", &format!("hidden = [16, 16]\ninit_napi = {v}"));
    ExperimentConfig::parse(&with("{ defer = 4, timeout_us = 100 }"), &path).unwrap();
    let e = format!(
        "{:#}",
        ExperimentConfig::parse(&with("{ defer = 4, timeout_us = 900 }"), &path).unwrap_err()
    );
    assert!(
        e.contains("test.toml") && e.contains("network.init_napi") && e.contains("timeout_us_max 500"),
        "{e}"
    );
    let e = format!("{:#}", ExperimentConfig::parse(&with("{ defer = 4 }"), &path).unwrap_err());
    assert!(e.contains("timeout_us"), "{e}");
}

/// `ppo.log_std_anneal_to`: the log standard deviations follow the schedule (linear from
/// `init_log_std` at the first iteration), take no gradient in between, and a bad value is
/// refused by key.
#[test]
fn the_log_std_schedule_replaces_learning_it() {
    let text = BANDIT.replace("update_epochs = 8", "update_epochs = 8\nlog_std_anneal_to = -2.5");
    let exp = experiment(&text);
    let make: EnvMaker = Arc::new(|_| Ok(Box::new(Bandit::new()) as Box<dyn Env + Send>));
    let mut t = Trainer::with_envs(exp, train_device(), make, 1);
    let total = t.exp.config.iterations() as f32;
    let mut m = Memory::default();
    let values = |t: &Trainer| {
        let a = &t.model.actor;
        [&a.log_std_nic, &a.log_std_backend, &a.log_std_frontend]
            .iter()
            .flat_map(|p| p.val().inner().into_data().convert::<f32>().try_into_vec::<f32>().unwrap())
            .collect::<Vec<f32>>()
    };
    for it in 0..3 {
        t.iteration(&mut m).unwrap();
        // Set at the iteration's start, unchanged by its update.
        let want = -0.5 + (-2.5 - -0.5) * it as f32 / total;
        let got = values(&t);
        assert!(got.iter().all(|v| (v - want).abs() < 1e-6), "iteration {it}: {got:?}, want {want}");
    }
    // Without the schedule the same run learns them.
    let make: EnvMaker = Arc::new(|_| Ok(Box::new(Bandit::new()) as Box<dyn Env + Send>));
    let mut learned = Trainer::with_envs(experiment(BANDIT), train_device(), make, 1);
    learned.iteration(&mut Memory::default()).unwrap();
    assert!(values(&learned).iter().any(|v| (v - -0.5).abs() > 1e-4), "learned log stds did not move");
    let bad = BANDIT.replace("update_epochs = 8", "update_epochs = 8\nlog_std_anneal_to = 3.0");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments/test.toml");
    let e = format!("{:#}", ExperimentConfig::parse(&bad, &path).unwrap_err());
    assert!(e.contains("ppo.log_std_anneal_to = 3"), "{e}");
}
