//! The discrete-event simulator of one virtualized host (see `SIMULATOR.md`), behind [`Env`].
//!
//! [`Scenario`] describes the host and its traffic; [`SimConfig`] the control loop (interval,
//! episode length, reward, probes); [`SimEnv`] runs it. Time is an integer count of nanoseconds and
//! one seed fixes every draw: the same scenario, seed and actions give bit-identical observations
//! and rewards.
//!
//! # Model
//! Packets cross stages: the NIC's rx ring, each VM's backend queue, its frontend ring, its socket
//! buffers, and back out through the frontend, the backend and the NIC's tx ring to the wire.
//! Knob stages notify with ethtool's semantics (`frames` pending or `usecs` after the first);
//! workers (backend threads, the sending application) take what is pending when they run. Each
//! CPU runs interrupt work before thread work, preemptively.
//!
//! NAPI (`[host] napi`, on by default) governs the NIC's rx and tx-completion interrupts and the
//! guest's rx and tx-completion notifications as Linux does: an interrupt masks its queue and
//! schedules a poll of at most `napi_weight` items, re-polled while it fills its weight, in
//! ksoftirqd at thread priority past the softirq's budget, and re-armed by a poll that finds
//! less; the knobs then decide the next interrupt. Under load interrupts fall away even at
//! per-packet settings. `napi = false` is the pre-NAPI kernel, where every notification is its
//! own job and receive livelock follows Mogul & Ramakrishnan (1997). The state machine and its
//! diagram are in the engine's source (`sim/engine.rs`), the budgets in `sim/napi.rs`.

mod arrivals;
mod engine;
pub mod generator;
pub mod limits;
mod napi;
mod scenario;

use std::sync::Arc;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

pub use scenario::{
    Arrivals, BackendKind, Costs, FlowConfig, FlowKind, HostConfig, MAX_FRAME, Objective, Scenario,
    ServiceDist, SizeDist, VmConfig,
};

use crate::controller::ControllerFactory;
use crate::env::{Env, EnvError, EnvSpec, Step};
use crate::info::{CpuBreakdown, EpisodeSummary, Info, IntervalTruth, LatencyStats, PollCounts, VmTruth};
use crate::obs::{CpuObs, GuestObs, HostObs, InterfaceObs, Observation, ProbeObs};
use crate::reward::RewardConfig;
use crate::settings::{ActionSpace, CoalescingSettings, Direction, LayerId};
use arrivals::{Purpose, Rng64, stream};
use engine::{
    Engine, NIC_RX, NIC_TX, NIC_TXC, ProbeCfg, StageCounters, VmCounters, be_rx, be_tx, fe_rx, fe_tx, fe_txc,
    new_hist, sock_rx, sock_tx,
};

/// Which latency probes exist.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeMode {
    None,
    Host,
    Guest,
    #[default]
    Both,
}

impl ProbeMode {
    pub fn host(self) -> bool {
        matches!(self, ProbeMode::Host | ProbeMode::Both)
    }
    pub fn guest(self) -> bool {
        matches!(self, ProbeMode::Guest | ProbeMode::Both)
    }
}

/// The control loop around a scenario.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimConfig {
    /// Length of one control interval, µs.
    pub interval_us: u64,
    /// Steps per episode (then `truncated`).
    pub episode_steps: u32,
    pub reward: RewardConfig,
    pub action_space: ActionSpace,
    /// Latency probes the observation includes.
    pub probe: ProbeMode,
    /// A probe sees every `probe_every`-th latency sample.
    pub probe_every: u64,
    /// Lognormal sigma of a probe sample's measurement error.
    pub probe_noise: f64,
    /// Lognormal sigma of multiplicative noise on observed rates (0: exact counters).
    pub obs_noise: f64,
    /// Settings during the reset interval that produces the first observation
    /// (default: per-packet everywhere, the virtio default).
    pub initial: Option<CoalescingSettings>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            interval_us: 10_000,
            episode_steps: 100,
            reward: RewardConfig::default(),
            action_space: ActionSpace::default(),
            probe: ProbeMode::Both,
            probe_every: 8,
            probe_noise: 0.05,
            obs_noise: 0.0,
            initial: None,
        }
    }
}

impl SimConfig {
    /// The [`EnvSpec`] of a simulator of `scenario` under this config: each VM's p99 target
    /// (`None`: no latency objective; read from the spec from then on) and the host's profile.
    pub fn scenario_spec(&self, scenario: &Scenario) -> EnvSpec {
        let vm_slo_p99_us = scenario.vms.iter().map(|v| v.target_us(self.reward.slo_p99_us)).collect();
        EnvSpec { vm_slo_p99_us, profile: scenario.profile(), ..self.spec(scenario.vms.len()) }
    }

    /// The [`EnvSpec`] of a simulator with `vms` VMs under this config.
    pub fn spec(&self, vms: usize) -> EnvSpec {
        EnvSpec {
            vms,
            action_space: self.action_space.clone(),
            interval_ns: self.interval_us * 1000,
            max_steps: Some(self.episode_steps),
            host_probe: self.probe.host(),
            guest_probe: self.probe.guest(),
            slo_p99_us: Some(self.reward.slo_p99_us),
            vm_slo_p99_us: Vec::new(),
            profile: crate::HostProfile::default(),
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.interval_us == 0 || self.interval_us > 60_000_000 {
            return Err(format!("interval_us = {}: use 1..=60000000", self.interval_us));
        }
        if self.episode_steps == 0 {
            return Err("episode_steps = 0: an episode needs at least one step".into());
        }
        if self.probe_every == 0 {
            return Err("probe_every = 0: use 1 to sample every packet".into());
        }
        for (k, v) in [("probe_noise", self.probe_noise), ("obs_noise", self.obs_noise)] {
            if !(v.is_finite() && (0.0..=2.0).contains(&v)) {
                return Err(format!("{k} = {v}: a lognormal sigma in [0, 2]"));
            }
        }
        self.reward.validate()?;
        // Upper bounds on every numeric key (see limits.rs).
        limits::check_sim(self)
    }
}

/// Cumulative counters at the end of the last interval.
#[derive(Debug, Clone, Default)]
struct Snapshot {
    stages: Vec<StageCounters>,
    vms: Vec<VmCounters>,
    offered: u64,
    completed: u64,
    completed_bytes: u64,
    dropped: u64,
    cpu: CpuBreakdown,
    busy: Vec<(u64, u64)>,
}

#[derive(Debug)]
struct Episode {
    totals: IntervalTruth,
    vm_hist: Vec<Histogram<u64>>,
    intervals: u64,
    slo_violations: u64,
    duration_ns: u64,
}

/// Packets offered, completed, dropped and in flight since reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conservation {
    pub offered: u64,
    pub completed: u64,
    pub dropped: u64,
    pub in_flight: u64,
}

/// The simulator as an [`Env`].
#[derive(Debug)]
pub struct SimEnv {
    scenario: Scenario,
    cfg: SimConfig,
    spec: EnvSpec,
    factory: Option<Arc<dyn ControllerFactory>>,
    eng: Option<Engine>,
    prev: Snapshot,
    episode: Option<Episode>,
    steps: u32,
    noise: Rng64,
}

impl SimEnv {
    /// A simulator of `scenario` under `cfg`; `factory` runs adaptive modes (DIM, ITR).
    pub fn new(
        scenario: Scenario,
        cfg: SimConfig,
        factory: Option<Arc<dyn ControllerFactory>>,
    ) -> Result<SimEnv, EnvError> {
        let bad = |message: String| EnvError::Scenario { scenario: scenario.name.clone(), message };
        scenario.validate().map_err(bad)?;
        cfg.validate().map_err(bad)?;
        if let Some(init) = cfg.initial.as_ref().filter(|i| i.vms.len() != scenario.vms.len()) {
            return Err(bad(format!(
                "initial settings are for {} VMs but the scenario has {}",
                init.vms.len(),
                scenario.vms.len()
            )));
        }
        let spec = cfg.scenario_spec(&scenario);
        Ok(SimEnv {
            scenario,
            cfg,
            spec,
            factory,
            eng: None,
            prev: Snapshot::default(),
            episode: None,
            steps: 0,
            noise: stream(0, Purpose::ObsNoise, 0, 0),
        })
    }

    pub fn scenario(&self) -> &Scenario {
        &self.scenario
    }

    pub fn config(&self) -> &SimConfig {
        &self.cfg
    }

    /// Simulated time since reset, ns.
    pub fn now_ns(&self) -> u64 {
        self.eng.as_ref().map_or(0, |e| e.now)
    }

    /// Starts the episode's statistics afresh: [`Env::episode_summary`] then covers only the
    /// steps after this call, so a warm-up (the backlog of the per-packet reset interval, a
    /// policy settling) is left out. The simulation itself is not touched.
    pub fn restart_summary(&mut self) {
        if let Some(ep) = self.episode.as_mut() {
            let vms = ep.vm_hist.len();
            *ep = Episode {
                totals: IntervalTruth { vms: vec![VmTruth::default(); vms], ..Default::default() },
                vm_hist: (0..vms).map(|_| new_hist()).collect(),
                intervals: 0,
                slo_violations: 0,
                duration_ns: 0,
            };
        }
    }

    /// Packets offered, completed, dropped and in flight since reset: `offered = completed +
    /// dropped + in_flight` always holds.
    pub fn conservation(&self) -> Option<Conservation> {
        let e = self.eng.as_ref()?;
        Some(Conservation {
            offered: e.totals.offered,
            completed: e.totals.completed,
            dropped: e.totals.dropped,
            in_flight: e.in_flight(),
        })
    }

    fn engine(&mut self) -> Result<&mut Engine, EnvError> {
        self.eng.as_mut().ok_or_else(|| EnvError::Action("step before reset".into()))
    }

    fn apply(&mut self, action: &CoalescingSettings) -> Result<CoalescingSettings, EnvError> {
        let mut s = action.clone();
        if s.vms.len() != self.spec.vms {
            return Err(EnvError::Action(format!(
                "settings for {} VMs, but scenario `{}` has {}",
                s.vms.len(),
                self.scenario.name,
                self.spec.vms
            )));
        }
        self.cfg.action_space.clamp(&mut s);
        // What the profile's host lacks stays at the kernel's default; `applied` says so.
        self.scenario.profile().mask(&mut s);
        self.engine()?.apply(&s).map_err(EnvError::Unsupported)?;
        Ok(s)
    }

    /// Runs one interval and turns its counters into an observation and ground truth.
    fn interval(&mut self) -> (Observation, IntervalTruth) {
        let interval_ns = self.spec.interval_ns;
        let eng = self.eng.as_mut().expect("reset before stepping");
        let t_end = eng.now + interval_ns;
        eng.run_until(t_end);
        let vms = eng.vms();
        let n_cpus = eng.host_cpus() + vms;
        let cur = Snapshot {
            stages: (0..3 + 7 * vms).map(|i| eng.counters(i)).collect(),
            vms: eng.vm_ctr.clone(),
            offered: eng.totals.offered,
            completed: eng.totals.completed,
            completed_bytes: eng.totals.completed_bytes,
            dropped: eng.totals.dropped,
            cpu: eng.totals.cpu,
            busy: (0..n_cpus).map(|i| eng.cpu_busy(i)).collect(),
        };
        let prev = std::mem::replace(&mut self.prev, cur);
        let cur = &self.prev;
        let dt = interval_ns as f64 / 1e9;
        let d = |i: usize| -> StageCounters {
            let (a, b) = (cur.stages[i], prev.stages.get(i).copied().unwrap_or_default());
            StageCounters {
                admitted: a.admitted - b.admitted,
                admitted_bytes: a.admitted_bytes - b.admitted_bytes,
                drops: a.drops - b.drops,
                notifications: a.notifications - b.notifications,
                polls: a.polls - b.polls,
                done: a.done - b.done,
                done_bytes: a.done_bytes - b.done_bytes,
            }
        };
        let rate = |x: u64| x as f64 / dt;
        let eng = self.eng.as_mut().expect("reset");
        let knobs = |l: LayerId, dir: Direction| Some(eng.knobs(l, dir));
        let profile = self.scenario.profile();
        let sriov = profile == crate::HostProfile::SriovVf;

        let (nrx, ntx, ntxc) = (d(NIC_RX), d(NIC_TX), d(NIC_TXC));
        let nic = InterfaceObs {
            rx_pps: rate(nrx.admitted),
            tx_pps: rate(ntx.done),
            rx_bytes_per_s: rate(nrx.admitted_bytes),
            tx_bytes_per_s: rate(ntx.done_bytes),
            rx_irq_per_s: Some(rate(nrx.notifications)),
            tx_irq_per_s: Some(rate(ntxc.notifications)),
            drops_per_s: rate(nrx.drops),
            rx_knobs: knobs(LayerId::Nic, Direction::Rx),
            tx_knobs: knobs(LayerId::Nic, Direction::Tx),
            napi: Some(eng.napi(LayerId::Nic)),
        };
        let mut backends = Vec::with_capacity(vms);
        let mut guests = Vec::with_capacity(vms);
        let busy = |i: usize| {
            let (a, b) = (cur.busy[i], prev.busy.get(i).copied().unwrap_or_default());
            (a.0 - b.0, a.1 - b.1)
        };
        let host_cpus = eng.host_cpus();
        for v in 0..vms {
            let (brx, frx, srx, stx, ftx, btx, ftxc) = (
                d(be_rx(v)),
                d(fe_rx(v)),
                d(sock_rx(v)),
                d(sock_tx(v)),
                d(fe_tx(v)),
                d(be_tx(v)),
                d(fe_txc(v)),
            );
            // On sriov-vf there is no backend: the VFs' traffic never reaches the hypervisor's
            // software, so it counts nothing, and the VF's ring drops in the guest.
            let (seen, vf_drops) = if sriov {
                ((StageCounters::default(), StageCounters::default()), frx.drops)
            } else {
                ((frx, btx), 0)
            };
            backends.push(InterfaceObs {
                rx_pps: rate(seen.0.admitted),
                tx_pps: rate(seen.1.done),
                rx_bytes_per_s: rate(seen.0.admitted_bytes),
                tx_bytes_per_s: rate(seen.1.done_bytes),
                // The hypervisor cannot count a backend's notifications (irqfd / event channels).
                rx_irq_per_s: None,
                tx_irq_per_s: None,
                drops_per_s: rate(brx.drops + seen.0.drops),
                rx_knobs: knobs(LayerId::Backend(v), Direction::Rx),
                tx_knobs: knobs(LayerId::Backend(v), Direction::Tx),
                napi: None,
            });
            let (irq, thr) = busy(host_cpus + v);
            guests.push(GuestObs {
                frontend: InterfaceObs {
                    rx_pps: rate(frx.done),
                    tx_pps: rate(ftx.admitted),
                    rx_bytes_per_s: rate(frx.done_bytes),
                    tx_bytes_per_s: rate(ftx.admitted_bytes),
                    rx_irq_per_s: Some(rate(frx.notifications)),
                    tx_irq_per_s: Some(rate(ftxc.notifications)),
                    drops_per_s: rate(srx.drops + stx.drops + vf_drops),
                    rx_knobs: knobs(LayerId::Frontend(v), Direction::Rx),
                    tx_knobs: knobs(LayerId::Frontend(v), Direction::Tx),
                    napi: Some(eng.napi(LayerId::Frontend(v))),
                },
                cpu: CpuObs { irq: irq as f64 / interval_ns as f64, other: thr as f64 / interval_ns as f64 },
                probe: None,
                slo_p99_us: self.spec.vm_slo_p99_us[v],
                profile,
            });
        }
        let (mut hi, mut ht) = (0, 0);
        for i in 0..host_cpus {
            let (a, b) = busy(i);
            hi += a;
            ht += b;
        }
        let denom = (host_cpus as u64 * interval_ns) as f64;
        let mut host = HostObs {
            nic,
            backends,
            cpu: CpuObs { irq: hi as f64 / denom, other: ht as f64 / denom },
            probe: None,
            slo_p99_us: self.spec.vm_slo_p99_us.clone(),
            profile,
        };

        // Latency: ground truth from the interval histograms, then probes.
        let mut vm_truth = Vec::with_capacity(vms);
        let ep = self.episode.as_mut();
        let mut ep_hists = ep.map(|e| &mut e.vm_hist);
        for v in 0..vms {
            let (a, b) = (cur.vms[v], prev.vms.get(v).copied().unwrap_or_default());
            let count = a.lat_count - b.lat_count;
            let sum = a.lat_sum_ns - b.lat_sum_ns;
            let h = &mut eng.vm_hist[v];
            vm_truth.push(VmTruth {
                latency_sensitive: self.spec.vm_slo_p99_us[v].is_some(),
                slo_p99_us: self.spec.vm_slo_p99_us[v],
                latency: latency_stats(h, count, || sum as f64 / count as f64 / 1000.0),
                completed: a.completed - b.completed,
                dropped: a.dropped - b.dropped,
            });
            if let Some(eh) = ep_hists.as_mut() {
                eh[v].add(&*h).expect("same histogram bounds");
            }
            h.reset();
            let g = &mut eng.guest_probe[v];
            if self.cfg.probe.guest() && !g.is_empty() {
                guests[v].probe = Some(probe_obs(g));
            }
            g.reset();
        }
        if self.cfg.probe.host() && !eng.host_probe.is_empty() {
            host.probe = Some(probe_obs(&eng.host_probe));
        }
        eng.host_probe.reset();

        let truth = IntervalTruth {
            interval_ns,
            offered: cur.offered - prev.offered,
            completed: cur.completed - prev.completed,
            dropped: cur.dropped - prev.dropped,
            in_flight: eng.in_flight(),
            completed_bytes: cur.completed_bytes - prev.completed_bytes,
            cpu: cur.cpu.minus(&prev.cpu),
            vms: vm_truth,
            polls: PollCounts {
                nic_rx: nrx.polls,
                nic_tx: ntxc.polls,
                guest_rx: (0..vms).map(|v| d(fe_rx(v)).polls).sum(),
                guest_tx: (0..vms).map(|v| d(fe_txc(v)).polls).sum(),
            },
        };
        let mut obs = Observation { interval_ns, host, guests };
        if self.cfg.obs_noise > 0.0 {
            self.add_noise(&mut obs);
        }
        (obs, truth)
    }

    fn add_noise(&mut self, o: &mut Observation) {
        let s = self.cfg.obs_noise;
        let rng = &mut self.noise;
        let mut jitter = |x: &mut f64| *x *= (s * rng.normal()).exp();
        let mut iface = |i: &mut InterfaceObs| {
            jitter(&mut i.rx_pps);
            jitter(&mut i.tx_pps);
            jitter(&mut i.rx_bytes_per_s);
            jitter(&mut i.tx_bytes_per_s);
            jitter(&mut i.drops_per_s);
            if let Some(x) = i.rx_irq_per_s.as_mut() {
                jitter(x);
            }
            if let Some(x) = i.tx_irq_per_s.as_mut() {
                jitter(x);
            }
        };
        iface(&mut o.host.nic);
        o.host.backends.iter_mut().for_each(&mut iface);
        o.guests.iter_mut().for_each(|g| iface(&mut g.frontend));
    }
}

/// Percentiles of a latency histogram (ns) with its sample count and mean (µs).
fn latency_stats(h: &Histogram<u64>, count: u64, mean_us: impl FnOnce() -> f64) -> LatencyStats {
    if count == 0 || h.is_empty() {
        return LatencyStats::default();
    }
    let us = |x: u64| x as f64 / 1000.0;
    LatencyStats {
        count,
        mean_us: mean_us(),
        p50_us: us(h.value_at_quantile(0.5)),
        p99_us: us(h.value_at_quantile(0.99)),
        p999_us: us(h.value_at_quantile(0.999)),
        max_us: us(h.max()),
    }
}

fn probe_obs(h: &Histogram<u64>) -> ProbeObs {
    ProbeObs {
        p50_us: h.value_at_quantile(0.5) as f64 / 1000.0,
        p99_us: h.value_at_quantile(0.99) as f64 / 1000.0,
        samples: h.len(),
    }
}

impl Env for SimEnv {
    fn spec(&self) -> &EnvSpec {
        &self.spec
    }

    fn reset(&mut self, seed: u64) -> Result<(Observation, Info), EnvError> {
        let probe = ProbeCfg { every: self.cfg.probe_every, noise: self.cfg.probe_noise };
        self.eng = Some(Engine::new(&self.scenario, seed, self.factory.clone(), probe));
        self.noise = stream(seed, Purpose::ObsNoise, 0, 0);
        self.prev = Snapshot::default();
        self.episode = None;
        self.steps = 0;
        let init = self.cfg.initial.clone().unwrap_or_else(|| CoalescingSettings::per_packet(self.spec.vms));
        let applied = self.apply(&init)?;
        let (obs, truth) = self.interval();
        let vms = self.spec.vms;
        self.episode = Some(Episode {
            totals: IntervalTruth { vms: vec![VmTruth::default(); vms], ..Default::default() },
            vm_hist: (0..vms).map(|_| new_hist()).collect(),
            intervals: 0,
            slo_violations: 0,
            duration_ns: 0,
        });
        let info = Info {
            time_ns: self.now_ns(),
            applied: Some(applied),
            reward_terms: self.cfg.reward.terms(&truth),
            truth: Some(truth),
            warnings: Vec::new(),
        };
        Ok((obs, info))
    }

    fn step(&mut self, action: &CoalescingSettings) -> Result<Step, EnvError> {
        let applied = self.apply(action)?;
        let (obs, truth) = self.interval();
        self.steps += 1;
        let terms = self.cfg.reward.terms(&truth);
        if let Some(ep) = self.episode.as_mut() {
            ep.totals.add(&truth);
            ep.intervals += 1;
            ep.duration_ns += truth.interval_ns;
            ep.slo_violations += u64::from(truth.slo_violated());
        }
        Ok(Step {
            obs,
            reward: terms.total() as f32,
            terminated: false,
            truncated: self.steps >= self.cfg.episode_steps,
            info: Info {
                time_ns: self.now_ns(),
                applied: Some(applied),
                truth: Some(truth),
                reward_terms: terms,
                warnings: Vec::new(),
            },
        })
    }

    fn episode_summary(&self) -> Option<EpisodeSummary> {
        let ep = self.episode.as_ref()?;
        let vms = self.spec.vms;
        let any = self.spec.vm_slo_p99_us.iter().any(Option::is_some);
        let mut all = new_hist();
        let mut vm_latency = Vec::with_capacity(vms);
        let (mut count, mut sum) = (0u64, 0f64);
        for v in 0..vms {
            let h = &ep.vm_hist[v];
            let n = h.len();
            // Exact means are not kept per episode; the histogram mean is within its 1% buckets.
            let st = latency_stats(h, n, || h.mean() / 1000.0);
            if !any || self.spec.vm_slo_p99_us[v].is_some() {
                all.add(h).expect("same histogram bounds");
                count += n;
                sum += h.mean() * n as f64;
            }
            vm_latency.push(st);
        }
        let latency = latency_stats(&all, count, || sum / count as f64 / 1000.0);
        Some(EpisodeSummary {
            duration_ns: ep.duration_ns,
            totals: ep.totals.clone(),
            latency,
            vm_latency,
            intervals: ep.intervals,
            slo_violations: ep.slo_violations,
        })
    }
}
