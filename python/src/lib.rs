//! # moderato-python: the extension module `moderato._native`
//!
//! A thin PyO3 layer over `moderato-env`, `moderato-policies` and `moderato-agent`: it converts
//! types (NumPy arrays, dicts, exceptions) and releases the GIL around simulation; everything it
//! computes comes from those crates. The Gymnasium classes around it are `python/moderato/`.
//!
//! - [`Sim`]: one [`SimEnv`] with a flat `float32` observation (the host's features, then each
//!   VM's backend features, then each guest's features, the order `moderato_env::check_env`
//!   uses) and a flat action in `[-1, 1]` decoded by the env's [`ActionSpace`].
//! - [`VecSim`]: N of them, stepped in Rust threads with the GIL released.
//! - Evaluation of a baseline or a frozen model ([`Sim::evaluate`]) runs `moderato eval`'s own
//!   episode loop (`moderato_agent::eval::run_episode`), so its numbers are `moderato eval`'s.
//!
//! Errors become Python exceptions carrying the Rust message: `FileNotFoundError` for a path that
//! does not exist, `ValueError` for everything the caller can fix (an unknown key, a value out of
//! range, an action of the wrong shape), `RuntimeError` for the rest.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use moderato_agent::eval::{Row, best_static, run_episode};
use moderato_agent::resolve::{PolicySource, resolve};
use moderato_env::sim::{Scenario, SimConfig, SimEnv};
use moderato_env::{
    ActionSpace, BACKEND_FEATURES, Env, EnvError, Feature, GUEST_FEATURES, HOST_FEATURES, Info, KNOB_NAMES,
    LayerId, Moderation, Observation,
};
use moderato_policies::adaptive::{AdaptiveConfig, AdaptiveFactory};
use moderato_policies::baselines::{FixedPolicy, StaticSpec};
use moderato_policies::gains::ControllerGains;
use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray1, PyArray2, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyFileNotFoundError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

fn env_err(e: EnvError) -> PyErr {
    match &e {
        EnvError::Io { err, .. } if err.kind() == std::io::ErrorKind::NotFound => {
            PyFileNotFoundError::new_err(e.to_string())
        }
        EnvError::Io { .. } | EnvError::Live(_) => PyRuntimeError::new_err(e.to_string()),
        _ => PyValueError::new_err(e.to_string()),
    }
}

/// An error of the agent crate (model loading, evaluation), with its whole chain of causes.
fn agent_err(e: anyhow::Error) -> PyErr {
    PyValueError::new_err(format!("{e:#}"))
}

/// The simulator's settings: the `[sim]` (and `[adaptive]`, `[static.<name>]`) tables of an
/// experiment or evaluation config, then `sim_json`'s keys on top.
#[derive(Debug, Clone)]
struct Setup {
    scenario: Scenario,
    sim: SimConfig,
    adaptive: AdaptiveConfig,
    statics: BTreeMap<String, StaticSpec>,
    /// The config's `[trim]` and `[slo_feedback]` gains (the defaults where absent).
    gains: ControllerGains,
}

impl Setup {
    fn load(scenario: &Path, config: Option<&Path>, sim_json: Option<&str>) -> PyResult<Setup> {
        let scenario = Scenario::load(scenario).map_err(env_err)?;
        let mut sim = serde_json::Map::new();
        let mut adaptive = AdaptiveConfig::default();
        let mut statics = BTreeMap::new();
        let mut gains = ControllerGains::default();
        if let Some(path) = config {
            let at = path.display();
            let text = std::fs::read_to_string(path).map_err(|e| {
                let msg = format!("cannot read config {at}: {e}");
                if e.kind() == std::io::ErrorKind::NotFound {
                    PyFileNotFoundError::new_err(msg)
                } else {
                    PyRuntimeError::new_err(msg)
                }
            })?;
            let mut table: toml::Table =
                toml::from_str(&text).map_err(|e| PyValueError::new_err(format!("{at}: {}", e.message())))?;
            if let Some(v) = table.remove("sim") {
                let v =
                    serde_json::to_value(v).map_err(|e| PyValueError::new_err(format!("{at}: [sim] {e}")))?;
                let serde_json::Value::Object(m) = v else {
                    return Err(PyValueError::new_err(format!("{at}: `sim` must be a table")));
                };
                sim = m;
            }
            if let Some(v) = table.remove("adaptive") {
                adaptive = v.try_into().map_err(|e: toml::de::Error| {
                    PyValueError::new_err(format!("{at}: [adaptive] {}", e.message()))
                })?;
            }
            if let Some(v) = table.remove("static") {
                statics = v.try_into().map_err(|e: toml::de::Error| {
                    PyValueError::new_err(format!("{at}: [static] {}", e.message()))
                })?;
            }
            if let Some(v) = table.remove("trim") {
                gains.trim = v.try_into().map_err(|e: toml::de::Error| {
                    PyValueError::new_err(format!("{at}: [trim] {}", e.message()))
                })?;
            }
            if let Some(v) = table.remove("slo_feedback") {
                gains.slo_feedback = v.try_into().map_err(|e: toml::de::Error| {
                    PyValueError::new_err(format!("{at}: [slo_feedback] {}", e.message()))
                })?;
            }
            gains.check().map_err(|e| PyValueError::new_err(format!("{at}: {e}")))?;
        }
        if let Some(json) = sim_json {
            let over: serde_json::Map<String, serde_json::Value> = serde_json::from_str(json)
                .map_err(|e| PyValueError::new_err(format!("sim: {e}: give a dict of [sim] keys")))?;
            sim.extend(over);
        }
        let origin = config.map_or("sim".to_string(), |p| format!("{} [sim] with sim=", p.display()));
        let sim: SimConfig = serde_json::from_value(serde_json::Value::Object(sim)).map_err(|e| {
            PyValueError::new_err(format!(
                "{origin}: {e} (the [sim] keys are documented in experiments/example.toml)"
            ))
        })?;
        sim.validate().map_err(|m| PyValueError::new_err(format!("{origin}: {m}")))?;
        Ok(Setup { scenario, sim, adaptive, statics, gains })
    }

    fn env(&self) -> PyResult<SimEnv> {
        let factory = Arc::new(AdaptiveFactory::new(self.adaptive));
        SimEnv::new(self.scenario.clone(), self.sim.clone(), Some(factory)).map_err(env_err)
    }

    fn vms(&self) -> usize {
        self.scenario.vms.len()
    }
}

/// The flat observation: host features, each VM's backend features, each guest's features.
fn flat_obs(o: &Observation, space: &ActionSpace, out: &mut Vec<f32>) {
    out.extend(o.host.features(space));
    for v in 0..o.host.backends.len() {
        out.extend(o.host.backend_features(space, v));
    }
    for g in &o.guests {
        out.extend(g.features(space));
    }
}

/// `(name, lo, hi, doc)` of each entry of the flat observation for `vms` VMs.
fn obs_table(vms: usize) -> Vec<(String, f32, f32, &'static str)> {
    let row = |prefix: &str, f: &Feature| (format!("{prefix}{}", f.name), f.lo, f.hi, f.doc);
    let mut v: Vec<_> = HOST_FEATURES.iter().map(|f| row("", f)).collect();
    for vm in 0..vms {
        v.extend(BACKEND_FEATURES.iter().map(|f| row(&format!("vm{vm}."), f)));
    }
    for vm in 0..vms {
        v.extend(GUEST_FEATURES.iter().map(|f| row(&format!("vm{vm}."), f)));
    }
    v
}

/// Names of the flat action's entries (`nic.rx_usecs`, ..., `vm0.backend.rx_usecs`, ...).
fn action_names(vms: usize) -> Vec<String> {
    LayerId::all(vms).flat_map(|id| KNOB_NAMES.iter().map(move |k| format!("{id}.{k}"))).collect()
}

/// One value of an info dict.
#[derive(Debug, Clone)]
enum Val {
    F(f64),
    U(u64),
    B(bool),
    Fv(Vec<f64>),
    Uv(Vec<u64>),
}

/// The info of one step: reward terms and ground truth (see `moderato.HostEnv`'s docs).
fn info_entries(info: &Info) -> Vec<(&'static str, Val)> {
    use Val::*;
    let r = &info.reward_terms;
    let mut v = vec![
        ("time_ns", U(info.time_ns)),
        ("reward_cpu", F(r.cpu)),
        ("reward_latency", F(r.latency)),
        ("reward_drops", F(r.drops)),
    ];
    if let Some(t) = &info.truth {
        let per = |ns: u64| if t.completed == 0 { 0.0 } else { ns as f64 / 1000.0 / t.completed as f64 };
        let any_sensitive = t.vms.iter().any(|m| m.latency_sensitive);
        let judged =
            || t.vms.iter().filter(|m| (m.latency_sensitive || !any_sensitive) && m.latency.count > 0);
        let worst =
            |f: fn(&moderato_env::LatencyStats) -> f64| judged().map(|m| f(&m.latency)).fold(0.0, f64::max);
        v.extend([
            ("cpu_us_per_packet", F(t.cpu_us_per_packet())),
            ("cpu_us_per_packet_nic", F(per(t.cpu.nic.total_ns()))),
            ("cpu_us_per_packet_backend", F(per(t.cpu.backend.total_ns()))),
            ("cpu_us_per_packet_frontend", F(per(t.cpu.frontend.total_ns()))),
            ("cpu_us_per_packet_stack", F(per(t.cpu.stack.total_ns()))),
            ("p50_us", F(worst(|l| l.p50_us))),
            ("p99_us", F(worst(|l| l.p99_us))),
            ("slo_violated", B(t.slo_violated())),
            ("offered", U(t.offered)),
            ("completed", U(t.completed)),
            ("dropped", U(t.dropped)),
            ("in_flight", U(t.in_flight)),
            ("drop_fraction", F(t.drop_fraction())),
            ("throughput_pps", F(t.throughput_pps())),
            ("throughput_bps", F(t.throughput_bps())),
            ("vm_p50_us", Fv(t.vms.iter().map(|m| m.latency.p50_us).collect())),
            ("vm_p99_us", Fv(t.vms.iter().map(|m| m.latency.p99_us).collect())),
            ("vm_latency_samples", Uv(t.vms.iter().map(|m| m.latency.count).collect())),
            ("vm_completed", Uv(t.vms.iter().map(|m| m.completed).collect())),
            ("vm_dropped", Uv(t.vms.iter().map(|m| m.dropped).collect())),
        ]);
    }
    v
}

fn info_dict<'py>(py: Python<'py>, entries: Vec<(&'static str, Val)>) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (k, v) in entries {
        match v {
            Val::F(x) => d.set_item(k, x)?,
            Val::U(x) => d.set_item(k, x)?,
            Val::B(x) => d.set_item(k, x)?,
            Val::Fv(x) => d.set_item(k, x.into_pyarray(py))?,
            Val::Uv(x) => d.set_item(k, x.into_pyarray(py))?,
        }
    }
    Ok(d)
}

/// Gymnasium's vector info: each key's values of every env stacked along a first axis of length
/// N, with a boolean `_<key>` mask (every env reports every key here).
fn stacked_info<'py>(py: Python<'py>, rows: Vec<Vec<(&'static str, Val)>>) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    let n = rows.len();
    let Some(first) = rows.first() else { return Ok(d) };
    let keys: Vec<&'static str> = first.iter().map(|(k, _)| *k).collect();
    let mut cols: Vec<Vec<Val>> = keys.iter().map(|_| Vec::with_capacity(n)).collect();
    for row in rows {
        for (i, (_, v)) in row.into_iter().enumerate() {
            cols[i].push(v);
        }
    }
    for (k, col) in keys.into_iter().zip(cols) {
        let width = match &col[0] {
            Val::Fv(x) => x.len(),
            Val::Uv(x) => x.len(),
            _ => 0,
        };
        let value = match &col[0] {
            Val::F(_) => col
                .iter()
                .map(|v| if let Val::F(x) = v { *x } else { 0.0 })
                .collect::<Vec<_>>()
                .into_pyarray(py)
                .into_any(),
            Val::U(_) => col
                .iter()
                .map(|v| if let Val::U(x) = v { *x } else { 0 })
                .collect::<Vec<_>>()
                .into_pyarray(py)
                .into_any(),
            Val::B(_) => {
                col.iter().map(|v| matches!(v, Val::B(true))).collect::<Vec<_>>().into_pyarray(py).into_any()
            }
            Val::Fv(_) => {
                let flat: Vec<f64> =
                    col.iter().flat_map(|v| if let Val::Fv(x) = v { x.clone() } else { vec![] }).collect();
                matrix(py, flat, n, width)?.into_any()
            }
            Val::Uv(_) => {
                let flat: Vec<u64> =
                    col.iter().flat_map(|v| if let Val::Uv(x) = v { x.clone() } else { vec![] }).collect();
                matrix(py, flat, n, width)?.into_any()
            }
        };
        d.set_item(k, value)?;
        d.set_item(format!("_{k}"), vec![true; n].into_pyarray(py))?;
    }
    Ok(d)
}

fn matrix<'py, T: numpy::Element>(
    py: Python<'py>,
    flat: Vec<T>,
    rows: usize,
    cols: usize,
) -> PyResult<Bound<'py, PyArray2<T>>> {
    let a = Array2::from_shape_vec((rows, cols), flat).map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
    Ok(a.into_pyarray(py))
}

/// A JSON value (an evaluation row, a settings record) as Python objects.
fn json_to_py<'py>(py: Python<'py>, v: &serde_json::Value) -> PyResult<Bound<'py, PyAny>> {
    use serde_json::Value as J;
    Ok(match v {
        J::Null => py.None().into_bound(py),
        J::Bool(b) => b.into_pyobject(py)?.to_owned().into_any(),
        J::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => u.into_pyobject(py)?.into_any(),
            (None, Some(i)) => i.into_pyobject(py)?.into_any(),
            _ => n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any(),
        },
        J::String(s) => s.into_pyobject(py)?.into_any(),
        J::Array(a) => {
            let l = PyList::empty(py);
            for x in a {
                l.append(json_to_py(py, x)?)?;
            }
            l.into_any()
        }
        J::Object(m) => {
            let d = PyDict::new(py);
            for (k, x) in m {
                d.set_item(k, json_to_py(py, x)?)?;
            }
            d.into_any()
        }
    })
}

fn row_to_py<'py>(py: Python<'py>, row: &Row) -> PyResult<Bound<'py, PyAny>> {
    let v = serde_json::to_value(row).map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
    json_to_py(py, &v)
}

/// A shape as Python prints it: `(3,)`, `(2, 20)`.
fn py_shape(shape: &[usize]) -> String {
    match shape {
        [n] => format!("({n},)"),
        _ => format!("({})", shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
    }
}

/// The action vector of one env from a NumPy array: exactly `dim` finite values.
fn action_slice(a: &[f32], dim: usize, names: impl Fn() -> Vec<String>) -> PyResult<&[f32]> {
    if a.len() != dim {
        return Err(PyValueError::new_err(format!(
            "action has {} values; this env takes {dim} in [-1, 1]: {}",
            a.len(),
            names().join(", ")
        )));
    }
    if let Some(i) = a.iter().position(|x| !x.is_finite()) {
        return Err(PyValueError::new_err(format!(
            "action[{i}] ({}) = {}: every value must be a finite number in [-1, 1]",
            names()[i],
            a[i]
        )));
    }
    Ok(a)
}

/// One environment's episode bookkeeping besides the env itself.
#[derive(Debug)]
struct Slot {
    env: SimEnv,
    seed: Option<u64>,
    reward_sum: f64,
    steps: u32,
}

/// What one step or reset produced, before it becomes Python objects.
#[derive(Debug)]
struct Out {
    obs: Vec<f32>,
    reward: f32,
    terminated: bool,
    truncated: bool,
    info: Vec<(&'static str, Val)>,
}

impl Slot {
    fn reset(&mut self, seed: u64) -> Result<Out, EnvError> {
        let (o, info) = self.env.reset(seed)?;
        self.seed = Some(seed);
        self.reward_sum = 0.0;
        self.steps = 0;
        let mut obs = Vec::new();
        flat_obs(&o, &self.env.spec().action_space, &mut obs);
        Ok(Out { obs, reward: 0.0, terminated: false, truncated: false, info: info_entries(&info) })
    }

    fn step(&mut self, action: &[f32]) -> Result<Out, EnvError> {
        let spec = self.env.spec();
        let settings = spec.action_space.decode(spec.vms, action);
        let st = self.env.step(&settings)?;
        self.reward_sum += f64::from(st.reward);
        self.steps += 1;
        let mut obs = Vec::new();
        flat_obs(&st.obs, &self.env.spec().action_space, &mut obs);
        Ok(Out {
            obs,
            reward: st.reward,
            terminated: st.terminated,
            truncated: st.truncated,
            info: info_entries(&st.info),
        })
    }
}

/// One simulated host: `reset(seed)`, `step(action)`, the flat spaces' tables, and evaluation of
/// baselines and frozen models on its scenario and settings.
#[pyclass(module = "moderato._native")]
#[derive(Debug)]
struct Sim {
    setup: Setup,
    /// Behind a mutex only so that the class is `Sync`; methods take `&mut self`, so it is never
    /// contended (`get_mut`).
    slot: Mutex<Slot>,
}

/// The value inside a mutex that is only ever reached through `&mut` (never locked, so never
/// poisoned).
fn inner<T>(m: &mut Mutex<T>) -> &mut T {
    m.get_mut().unwrap_or_else(|e| e.into_inner())
}

/// A mutex's value through `&self`, for read-only methods.
fn peek<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[pymethods]
impl Sim {
    /// `scenario`: a scenario TOML file; `config`: an experiment or evaluation config whose
    /// `[sim]`, `[adaptive]` and `[static.<name>]` tables apply; `sim_json`: `[sim]` keys as a JSON
    /// object, applied over the config's.
    #[new]
    #[pyo3(signature = (scenario, config=None, sim_json=None))]
    fn new(scenario: PathBuf, config: Option<PathBuf>, sim_json: Option<String>) -> PyResult<Sim> {
        let setup = Setup::load(&scenario, config.as_deref(), sim_json.as_deref())?;
        let env = setup.env()?;
        Ok(Sim { setup, slot: Mutex::new(Slot { env, seed: None, reward_sum: 0.0, steps: 0 }) })
    }

    /// Name of the scenario.
    #[getter]
    fn scenario_name(&self) -> String {
        self.setup.scenario.name.clone()
    }

    #[getter]
    fn vms(&self) -> usize {
        self.setup.vms()
    }

    /// Steps until `truncated`.
    #[getter]
    fn episode_steps(&self) -> u32 {
        self.setup.sim.episode_steps
    }

    #[getter]
    fn interval_us(&self) -> u64 {
        self.setup.sim.interval_us
    }

    /// The p99 target (µs) of latency-sensitive VMs that set none of their own (`slo_violated` judges each VM against its own).
    #[getter]
    fn slo_p99_us(&self) -> f64 {
        self.setup.sim.reward.slo_p99_us
    }

    /// The `[sim]` settings in force, as a dict.
    fn sim_config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let v = serde_json::to_value(&self.setup.sim).map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
        json_to_py(py, &v)
    }

    /// `(name, lo, hi, doc)` of each observation entry.
    fn observation_table(&self) -> Vec<(String, f32, f32, &'static str)> {
        obs_table(self.setup.vms())
    }

    /// Names of the action entries, each in `[-1, 1]` (log scale: −1 is per-packet, 1 the bound).
    fn action_names(&self) -> Vec<String> {
        action_names(self.setup.vms())
    }

    /// The knob bounds that `1.0` decodes to, per layer kind: `{kind: (usecs_max, frames_max)}`.
    fn knob_bounds(&self) -> BTreeMap<&'static str, (u32, u32)> {
        let sp = &self.setup.sim.action_space;
        moderato_env::LayerKind::ALL
            .iter()
            .map(|k| (k.name(), (sp.bounds(*k).usecs_max, sp.bounds(*k).frames_max)))
            .collect()
    }

    /// Decodes a flat action into the values it sets: `{"nic.rx_usecs": 0, ...,
    /// "nic.napi_defer": 0, "nic.napi_timeout_us": 0, ...}` (a backend's deferral is always 0:
    /// it has no NAPI).
    fn decode_action(&self, action: PyReadonlyArrayDyn<'_, f32>) -> PyResult<BTreeMap<String, u32>> {
        let a = action.as_slice().map_err(|e| PyValueError::new_err(format!("action: {e}")))?;
        let vms = self.setup.vms();
        let names = || action_names(vms);
        let a = action_slice(a, ActionSpace::dim(vms), names)?;
        let s = self.setup.sim.action_space.decode(vms, a);
        let values = LayerId::all(vms).flat_map(|id| {
            let l = s.layer(id);
            let (Moderation::Fixed(rx), Moderation::Fixed(tx)) = (l.rx, l.tx) else {
                unreachable!("an action decodes to fixed knobs")
            };
            let n = l.napi;
            [
                rx.usecs,
                rx.frames,
                tx.usecs,
                tx.frames,
                n.napi_defer_hard_irqs,
                (n.gro_flush_timeout_ns / 1000) as u32,
            ]
        });
        Ok(names().into_iter().zip(values).collect())
    }

    /// Starts an episode: `(obs, info)`.
    fn reset<'py>(
        &mut self,
        py: Python<'py>,
        seed: u64,
    ) -> PyResult<(Bound<'py, PyArray1<f32>>, Bound<'py, PyDict>)> {
        let slot = inner(&mut self.slot);
        let out = py.detach(|| slot.reset(seed)).map_err(env_err)?;
        Ok((out.obs.into_pyarray(py), info_dict(py, out.info)?))
    }

    /// One control interval: `(obs, reward, terminated, truncated, info)`.
    #[allow(clippy::type_complexity)]
    fn step<'py>(
        &mut self,
        py: Python<'py>,
        action: PyReadonlyArrayDyn<'py, f32>,
    ) -> PyResult<(Bound<'py, PyArray1<f32>>, f32, bool, bool, Bound<'py, PyDict>)> {
        if action.ndim() > 1 {
            return Err(PyValueError::new_err(format!(
                "action of shape {}: this env takes a flat vector of {} values",
                py_shape(action.shape()),
                ActionSpace::dim(self.setup.vms())
            )));
        }
        let a = action.as_slice().map_err(|e| PyValueError::new_err(format!("action: {e}")))?;
        let vms = self.setup.vms();
        let a = action_slice(a, ActionSpace::dim(vms), || action_names(vms))?.to_vec();
        let slot = inner(&mut self.slot);
        let out = py.detach(|| slot.step(&a)).map_err(env_err)?;
        Ok((out.obs.into_pyarray(py), out.reward, out.terminated, out.truncated, info_dict(py, out.info)?))
    }

    /// The episode so far, in `moderato eval`'s terms (one row of its `results.csv`): CPU per
    /// packet by layer, latency percentiles, SLO violation rate, drops, throughput, mean reward.
    fn summary<'py>(&self, py: Python<'py>, policy: String) -> PyResult<Bound<'py, PyAny>> {
        let s = peek(&self.slot);
        let (Some(seed), Some(summary)) = (s.seed, s.env.episode_summary()) else {
            return Err(PyValueError::new_err("no episode yet: call reset() first"));
        };
        let reward = s.reward_sum / f64::from(s.steps.max(1));
        row_to_py(py, &Row::from_summary(&self.setup.scenario.name, &policy, seed, &summary, reward))
    }

    /// Runs `policy` (a baseline name: `per-packet`, `static:<preset>`, `static:<usecs>/<frames>`,
    /// `dim`, `itr`, `best-static`; or a frozen-model directory) for one episode per seed on this
    /// scenario and settings, in threads with the GIL released, as `moderato eval` does. Returns
    /// one dict per seed with `moderato eval`'s columns.
    #[pyo3(signature = (policy, seeds, threads=0))]
    fn evaluate<'py>(
        &self,
        py: Python<'py>,
        policy: String,
        seeds: Vec<u64>,
        threads: usize,
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        if seeds.is_empty() {
            return Err(PyValueError::new_err("evaluate: `seeds` is empty: give at least one seed"));
        }
        let source = resolve(&policy, Path::new("."), &self.setup.statics).map_err(agent_err)?;
        let setup = &self.setup;
        let rows = py.detach(|| {
            let job = |seed: u64| -> anyhow::Result<Row> { evaluate_one(setup, &source, seed) };
            parallel_map(&seeds, threads, job)
        });
        rows.into_iter().map(|r| row_to_py(py, &r.map_err(agent_err)?)).collect()
    }
}

/// One episode of `source` on `setup`, as `moderato eval` runs one job (no warm-up: eval's
/// default `warmup_steps = 0`).
fn evaluate_one(setup: &Setup, source: &PolicySource, seed: u64) -> anyhow::Result<Row> {
    let sc = &setup.scenario;
    let mut policy = match source {
        PolicySource::BestStatic => {
            let cache = moderato_agent::eval::Cache { dir: None };
            let found = best_static(sc, &setup.sim, seed, 0, &cache)?;
            Box::new(FixedPolicy::new("best-static", found.settings))
        }
        PolicySource::BestStaticHeldOut => anyhow::bail!(
            "{} runs the setting best-static found on another of an evaluation's seeds: use it in \
             `moderato eval` (an eval config lists the seeds), or evaluate best-static here",
            source.label()
        ),
        other => other.instantiate_with(&setup.sim.scenario_spec(sc), &setup.gains)?,
    };
    let (summary, reward) = run_episode(sc, &setup.sim, &setup.adaptive, policy.as_mut(), seed, 0)?;
    Ok(Row::from_summary(&sc.name, &source.label(), seed, &summary, reward))
}

/// `f` over `items` on up to `threads` scoped threads (0: one per core), results in order.
fn parallel_map<T: Copy + Sync, R: Send>(items: &[T], threads: usize, f: impl Fn(T) -> R + Sync) -> Vec<R> {
    let threads =
        if threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { threads };
    let chunk = items.len().div_ceil(threads.max(1)).max(1);
    if items.len() <= 1 || threads <= 1 {
        return items.iter().map(|&x| f(x)).collect();
    }
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = items
            .chunks(chunk)
            .map(|c| s.spawn(move || c.iter().map(|&x| f(x)).collect::<Vec<R>>()))
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("an evaluation thread panicked")).collect()
    })
}

/// N simulated hosts with the same scenario and settings, stepped together in Rust threads with
/// the GIL released. Each env is exactly a [`Sim`]: the same seeds give the same trajectories.
#[pyclass(module = "moderato._native")]
#[derive(Debug)]
struct VecSim {
    setup: Setup,
    /// Behind a mutex only so that the class is `Sync` (see [`Sim`]).
    slots: Mutex<Vec<Slot>>,
    n: usize,
    threads: usize,
}

/// Runs `f` on every slot with its index, spread over `threads` scoped threads.
fn for_each_slot(
    slots: &mut [Slot],
    threads: usize,
    f: impl Fn(usize, &mut Slot) -> Result<Out, EnvError> + Sync,
) -> Result<Vec<Out>, EnvError> {
    let n = slots.len();
    if threads <= 1 || n <= 1 {
        return slots.iter_mut().enumerate().map(|(i, s)| f(i, s)).collect();
    }
    let chunk = n.div_ceil(threads);
    std::thread::scope(|sc| {
        let f = &f;
        let handles: Vec<_> = slots
            .chunks_mut(chunk)
            .enumerate()
            .map(|(c, part)| {
                sc.spawn(move || {
                    part.iter_mut()
                        .enumerate()
                        .map(|(j, s)| f(c * chunk + j, s))
                        .collect::<Result<Vec<_>, _>>()
                })
            })
            .collect();
        let mut out = Vec::with_capacity(n);
        for h in handles {
            out.extend(h.join().expect("a simulator thread panicked")?);
        }
        Ok(out)
    })
}

type Batch<'py> = (
    Bound<'py, PyArray2<f32>>,
    Bound<'py, PyArray1<f64>>,
    Bound<'py, PyArray1<bool>>,
    Bound<'py, PyArray1<bool>>,
    Bound<'py, PyDict>,
);

impl VecSim {
    fn batch<'py>(&self, py: Python<'py>, outs: Vec<Out>) -> PyResult<Batch<'py>> {
        let n = outs.len();
        let d = outs.first().map_or(0, |o| o.obs.len());
        let mut obs = Vec::with_capacity(n * d);
        let (mut rew, mut term, mut trunc, mut infos) =
            (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        for o in outs {
            obs.extend(o.obs);
            rew.push(f64::from(o.reward));
            term.push(o.terminated);
            trunc.push(o.truncated);
            infos.push(o.info);
        }
        Ok((
            matrix(py, obs, n, d)?,
            rew.into_pyarray(py),
            term.into_pyarray(py),
            trunc.into_pyarray(py),
            stacked_info(py, infos)?,
        ))
    }
}

#[pymethods]
impl VecSim {
    /// `num_envs` copies of `Sim(scenario, config, sim_json)`, stepped on `threads` threads (0: one
    /// per core).
    #[new]
    #[pyo3(signature = (scenario, num_envs, config=None, sim_json=None, threads=0))]
    fn new(
        scenario: PathBuf,
        num_envs: usize,
        config: Option<PathBuf>,
        sim_json: Option<String>,
        threads: usize,
    ) -> PyResult<VecSim> {
        if num_envs == 0 {
            return Err(PyValueError::new_err("num_envs = 0: a vector env needs at least one env"));
        }
        let setup = Setup::load(&scenario, config.as_deref(), sim_json.as_deref())?;
        let slots = (0..num_envs)
            .map(|_| Ok(Slot { env: setup.env()?, seed: None, reward_sum: 0.0, steps: 0 }))
            .collect::<PyResult<Vec<_>>>()?;
        let threads =
            if threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { threads };
        Ok(VecSim { setup, slots: Mutex::new(slots), n: num_envs, threads: threads.min(num_envs) })
    }

    #[getter]
    fn num_envs(&self) -> usize {
        self.n
    }

    /// Resets every env, env `i` with `seeds[i]`: `(obs [N, D], rewards, terminated, truncated,
    /// infos)` (the middle three are zeros and falses).
    fn reset<'py>(&mut self, py: Python<'py>, seeds: Vec<u64>) -> PyResult<Batch<'py>> {
        if seeds.len() != self.n {
            return Err(PyValueError::new_err(format!(
                "{} seeds for {} envs: give one seed per env",
                seeds.len(),
                self.n
            )));
        }
        let (slots, threads) = (inner(&mut self.slots), self.threads);
        let outs = py.detach(|| for_each_slot(slots, threads, |i, s| s.reset(seeds[i]))).map_err(env_err)?;
        self.batch(py, outs)
    }

    /// Steps env `i` with `actions[i]`, or resets it with `seeds[i]` where `reset_mask[i]` (the
    /// next-step autoreset of Gymnasium's vector envs): `(obs, rewards, terminated, truncated,
    /// infos)`; a reset env reports reward 0 and neither flag.
    fn step<'py>(
        &mut self,
        py: Python<'py>,
        actions: PyReadonlyArrayDyn<'py, f32>,
        reset_mask: Vec<bool>,
        seeds: Vec<u64>,
    ) -> PyResult<Batch<'py>> {
        let n = self.n;
        let vms = self.setup.vms();
        let dim = ActionSpace::dim(vms);
        if actions.shape() != [n, dim] {
            return Err(PyValueError::new_err(format!(
                "actions of shape {}: this vector env takes ({n}, {dim}), one row of {dim} values in [-1, 1] per env",
                py_shape(actions.shape())
            )));
        }
        if reset_mask.len() != n || seeds.len() != n {
            return Err(PyValueError::new_err(format!(
                "reset_mask and seeds need {n} entries (got {} and {})",
                reset_mask.len(),
                seeds.len()
            )));
        }
        let a = actions.as_slice().map_err(|e| PyValueError::new_err(format!("actions: {e}")))?;
        for (i, row) in a.chunks(dim).enumerate() {
            action_slice(row, dim, || action_names(vms))
                .map_err(|e| PyValueError::new_err(format!("env {i}: {}", e.value(py))))?;
        }
        let a = a.to_vec();
        let (slots, threads) = (inner(&mut self.slots), self.threads);
        let outs = py
            .detach(|| {
                for_each_slot(slots, threads, |i, s| {
                    if reset_mask[i] { s.reset(seeds[i]) } else { s.step(&a[i * dim..(i + 1) * dim]) }
                })
            })
            .map_err(env_err)?;
        self.batch(py, outs)
    }

    /// Env `i`'s episode so far, as [`Sim::summary`].
    fn summary<'py>(&self, py: Python<'py>, i: usize, policy: String) -> PyResult<Bound<'py, PyAny>> {
        let slots = peek(&self.slots);
        let s = slots
            .get(i)
            .ok_or_else(|| PyValueError::new_err(format!("env {i}: this vector env has {} envs", self.n)))?;
        let (Some(seed), Some(summary)) = (s.seed, s.env.episode_summary()) else {
            return Err(PyValueError::new_err("no episode yet: call reset() first"));
        };
        let reward = s.reward_sum / f64::from(s.steps.max(1));
        row_to_py(py, &Row::from_summary(&self.setup.scenario.name, &policy, seed, &summary, reward))
    }
}

/// Every baseline name, for help texts and errors.
#[pyfunction]
fn baseline_names() -> Vec<String> {
    moderato_policies::baselines::baseline_names(&BTreeMap::new())
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Sim>()?;
    m.add_class::<VecSim>()?;
    m.add_function(wrap_pyfunction!(baseline_names, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
