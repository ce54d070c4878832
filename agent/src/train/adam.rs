//! Adam with global gradient-norm clipping, on the host, for the trainer's small networks.
//!
//! burn's `ModuleOptimizer` runs a dozen tensor operations and a map lookup per parameter per
//! step; for PPO's networks (a few thousand weights in 27 tensors) that overhead, not arithmetic,
//! was a third of every minibatch. Here one pass reads every gradient and value out, computes
//! the global norm, clips, applies Adam in plain `f32` loops, and writes the values back.
//!
//! The arithmetic is burn 0.22.1's `Adam` (`AdaptiveMomentum`) operation for operation, so a
//! step is the one burn's optimiser would make; and the state is saved in burn's optimiser record
//! format (burnpack, tensors `{param_id}.momentum.moment_1` / `moment_2`, scalars
//! `{param_id}.momentum.time` and `{param_id}.__rank`), so checkpoints written before this
//! optimiser existed load, and burn's `ModuleOptimizer` can read the ones it writes.

use std::collections::{BTreeMap, HashMap};

use anyhow::{Result, anyhow, bail};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{Bytes, Tensor, TensorData};

/// Adam's hyperparameters (burn's `AdamConfig` defaults, ε as CleanRL).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamSettings {
    pub beta_1: f32,
    pub beta_2: f32,
    pub epsilon: f32,
}

impl Default for AdamSettings {
    fn default() -> Self {
        AdamSettings { beta_1: 0.9, beta_2: 0.999, epsilon: 1e-5 }
    }
}

/// One parameter's moments.
#[derive(Debug, Clone, PartialEq)]
struct Moments {
    time: usize,
    rank: usize,
    shape: Vec<usize>,
    m1: Vec<f32>,
    m2: Vec<f32>,
}

/// Adam over every float parameter of a module, with state kept per parameter id.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostAdam {
    pub settings: AdamSettings,
    state: HashMap<u64, Moments>,
}

/// A parameter read out of a module: its id, shape, value and gradient.
struct Slot {
    id: ParamId,
    shape: Vec<usize>,
    value: Vec<f32>,
    grad: Option<Vec<f32>>,
}

fn host(data: TensorData) -> Vec<f32> {
    data.convert::<f32>().try_into_vec::<f32>().unwrap_or_default()
}

struct Collect<'a> {
    grads: &'a [&'a GradientsParams],
    slots: Vec<Slot>,
}

impl ModuleVisitor for Collect<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let grad = self.grads.iter().find_map(|g| g.get::<D>(param.id)).map(|g| host(g.into_data()));
        let t = param.val();
        let shape = t.dims().to_vec();
        self.slots.push(Slot { id: param.id, shape, value: host(t.inner().into_data()), grad });
    }
}

/// Writes the slots' values back, in the order they were read.
struct Write {
    slots: std::vec::IntoIter<Slot>,
}

impl ModuleMapper for Write {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, tensor, mapper) = param.consume();
        let slot = self.slots.next().expect("the same module is visited twice in the same order");
        assert_eq!(slot.id, id, "parameters visited in another order");
        if slot.grad.is_none() {
            return Param::from_mapped_value(id, tensor, mapper);
        }
        let grad = tensor.is_require_grad();
        let dims: [usize; D] = slot.shape.try_into().expect("the rank of the parameter");
        let mut t = Tensor::<D>::from_data(TensorData::new(slot.value, dims), &tensor.device());
        if grad {
            t = t.require_grad();
        }
        Param::from_mapped_value(id, t, mapper)
    }
}

impl HostAdam {
    pub fn new(settings: AdamSettings) -> HostAdam {
        HostAdam { settings, state: HashMap::new() }
    }

    /// One step: clips the gradients to a global norm of `max_norm` (PyTorch's
    /// `clip_grad_norm_`: scaled by `max_norm / (norm + 1e-6)` when the norm exceeds it), then
    /// Adam with learning rate `lr`. `grads`: the gradients, from one or more backward passes
    /// (each parameter's is taken from the first that has it). Returns the module with updated
    /// parameters and the gradients' norm before clipping.
    pub fn step<M: Module>(
        &mut self,
        lr: f64,
        module: M,
        grads: &[&GradientsParams],
        max_norm: f64,
    ) -> (M, f64) {
        let mut c = Collect { grads, slots: Vec::new() };
        module.visit(&mut c);
        let mut slots = c.slots;
        let sq: f64 = slots
            .iter()
            .filter_map(|s| s.grad.as_ref())
            .map(|g| g.iter().map(|x| f64::from(*x) * f64::from(*x)).sum::<f64>())
            .sum();
        let norm = sq.sqrt();
        let scale = if norm > max_norm { Some((max_norm / (norm + 1e-6)) as f32) } else { None };
        let AdamSettings { beta_1, beta_2, epsilon } = self.settings;
        let lr = lr as f32;
        for s in &mut slots {
            let Some(g) = s.grad.as_mut() else { continue };
            if let Some(f) = scale {
                g.iter_mut().for_each(|x| *x *= f);
            }
            let st = self.state.entry(s.id.val()).or_insert_with(|| Moments {
                time: 0,
                rank: s.shape.len(),
                shape: s.shape.clone(),
                m1: Vec::new(),
                m2: Vec::new(),
            });
            // burn's AdaptiveMomentum: the first step initialises the moments from the gradient.
            if st.time == 0 || st.m1.len() != g.len() {
                st.m1 = g.iter().map(|x| x * (1.0 - beta_1)).collect();
                st.m2 = g.iter().map(|x| (x * x) * (1.0 - beta_2)).collect();
                st.time = 1;
            } else {
                let (f1, f2) = (1.0 - beta_1, 1.0 - beta_2);
                for ((m1, m2), x) in st.m1.iter_mut().zip(st.m2.iter_mut()).zip(g.iter()) {
                    *m1 = *m1 * beta_1 + x * f1;
                    *m2 = *m2 * beta_2 + (x * x) * f2;
                }
                st.time += 1;
            }
            let time = st.time as i32;
            let bc2 = (1.0 - beta_2.powi(time)).sqrt();
            let factor = bc2 / (1.0 - beta_1.powi(time));
            let eps = epsilon * bc2;
            for ((v, m1), m2) in s.value.iter_mut().zip(&st.m1).zip(&st.m2) {
                let update = (m1 * factor) / (m2.sqrt() + eps);
                *v -= update * lr;
            }
        }
        let module = module.map(&mut Write { slots: slots.into_iter() });
        (module, norm)
    }

    /// The state in burn's optimiser record format (burnpack bytes).
    pub fn to_bytes(&self) -> Result<Bytes> {
        let mut ids: Vec<&u64> = self.state.keys().collect();
        ids.sort();
        let mut tensors = Vec::new();
        let mut writer_scalars: Vec<(String, burn_pack::Scalar)> = Vec::new();
        for id in ids {
            let m = &self.state[id];
            for (leaf, v) in [("moment_1", &m.m1), ("moment_2", &m.m2)] {
                let raw: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                tensors.push(burn_pack::Tensor::new(
                    format!("{id}.momentum.{leaf}"),
                    burn_pack::DType::F32,
                    m.shape.clone(),
                    Some(*id),
                    burn_pack::Bytes::from_bytes_vec(raw),
                ));
            }
            writer_scalars.push((format!("{id}.momentum.time"), burn_pack::Scalar::from(m.time)));
            writer_scalars.push((format!("{id}.__rank"), burn_pack::Scalar::from(m.rank)));
        }
        let mut w = burn_pack::Writer::new(tensors);
        for (k, v) in &writer_scalars {
            w = w.with_scalar(k, *v);
        }
        w.into_bytes().map_err(|e| anyhow!("cannot encode the optimiser state: {e:?}"))
    }

    /// State read from burn's optimiser record format: files this optimiser wrote, and the ones
    /// burn's `ModuleOptimizer` with `Adam` wrote (checkpoints from before this optimiser).
    pub fn from_bytes(settings: AdamSettings, bytes: Bytes) -> Result<HostAdam> {
        let reader =
            burn_pack::Reader::from_bytes(bytes).map_err(|e| anyhow!("not a burnpack file: {e:?}"))?;
        let scalars: BTreeMap<String, burn_pack::Scalar> = reader.scalars().clone();
        let scalar = |k: &str| -> Option<usize> { scalars.get(k).and_then(|s| usize::try_from(*s).ok()) };
        let mut m1s: HashMap<u64, (Vec<usize>, Vec<f32>)> = HashMap::new();
        let mut m2s: HashMap<u64, Vec<f32>> = HashMap::new();
        let tensors = reader.into_tensors().map_err(|e| anyhow!("cannot read its tensors: {e:?}"))?;
        for t in tensors {
            let (name, dtype, shape, param_id, bytes) =
                t.into_parts().map_err(|e| anyhow!("cannot read a tensor: {e:?}"))?;
            let Some(id) = param_id else { bail!("tensor `{name}` has no parameter id") };
            let data = TensorData::from_bytes(bytes, shape.clone(), dtype);
            let v = host(data);
            if name == format!("{id}.momentum.moment_1") {
                m1s.insert(id, (shape.iter().copied().collect(), v));
            } else if name == format!("{id}.momentum.moment_2") {
                m2s.insert(id, v);
            } else if name == format!("{id}.momentum.max_moment_2") {
                bail!("tensor `{name}`: state of AMSGrad, which this trainer never used");
            } else {
                bail!("tensor `{name}` is not Adam state (expected `{id}.momentum.moment_1` or `moment_2`)");
            }
        }
        let mut state = HashMap::new();
        for (id, (shape, m1)) in m1s {
            let Some(m2) = m2s.remove(&id) else { bail!("parameter {id}: moment_1 without moment_2") };
            let Some(time) = scalar(&format!("{id}.momentum.time")) else {
                bail!("parameter {id}: no step count (`{id}.momentum.time`)")
            };
            if m1.len() != m2.len() {
                bail!("parameter {id}: moments of different sizes");
            }
            let rank = scalar(&format!("{id}.__rank")).unwrap_or(shape.len());
            state.insert(id, Moments { time, rank, shape, m1, m2 });
        }
        if let Some(id) = m2s.keys().next() {
            bail!("parameter {id}: moment_2 without moment_1");
        }
        Ok(HostAdam { settings, state })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::optim::AdamConfig;
    use burn::tensor::Device;
    use moderato_policies::learned::NetConfig;

    use crate::train::ppo::Model;

    fn grads_of(m: &Model, seed: f32) -> GradientsParams {
        let dev = Device::flex().autodiff();
        let n = 5;
        let x: Vec<f32> =
            (0..n * crate::train::ppo::CRITIC_IN).map(|i| ((i as f32) * 0.37 + seed).sin()).collect();
        let x = Tensor::<2>::from_data(TensorData::new(x, [n, crate::train::ppo::CRITIC_IN]), &dev);
        let a = m.actor.log_std_nic.val().sum() * seed;
        let loss = (m.critic.value_of(x).square().mean() + a).reshape([1]);
        GradientsParams::from_grads(loss.backward(), m)
    }

    fn params(m: &Model) -> Vec<f32> {
        struct All(Vec<f32>);
        impl ModuleVisitor for All {
            fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
                self.0.extend(host(p.val().inner().into_data()));
            }
        }
        let mut a = All(Vec::new());
        m.visit(&mut a);
        a.0
    }

    fn close(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    /// Steps with burn's `ModuleOptimizer` (Adam, ε = 1e-5) and with `HostAdam` from the same
    /// weights and gradients, switching between them through each one's saved state.
    #[test]
    fn host_adam_makes_burns_steps_and_reads_and_writes_its_records() {
        let dev = Device::flex().autodiff();
        let start = Model::new(&NetConfig::default(), &moderato_env::ActionSpace::default(), 5, &dev);
        let mut burn_opt = AdamConfig::new().with_epsilon(1e-5).init();
        let mut host_opt = HostAdam::new(AdamSettings::default());
        let (mut mb, mut mh) = (start.clone(), start);
        for step in 0..3 {
            let lr = 1e-3 * (step + 1) as f64;
            let gb = grads_of(&mb, 0.5 + step as f32);
            let gh = grads_of(&mh, 0.5 + step as f32);
            mb = burn_opt.step(lr, mb, gb);
            mh = host_opt.step(lr, mh, &[&gh], f64::INFINITY).0;
            let d = close(&params(&mb), &params(&mh));
            assert!(d < 1e-6, "step {step}: weights differ by {d}");
        }
        // A record written by burn's optimiser (a checkpoint from before HostAdam) ...
        let mut from_burn =
            HostAdam::from_bytes(AdamSettings::default(), burn_opt.into_bytes().unwrap()).unwrap();
        // ... and one HostAdam wrote, read by burn's.
        let mut burn_from_host =
            AdamConfig::new().with_epsilon(1e-5).init().from_bytes(host_opt.to_bytes().unwrap()).unwrap();
        let g1 = grads_of(&mh, 9.0);
        let g2 = grads_of(&mh, 9.0);
        let a = from_burn.step(1e-3, mh.clone(), &[&g1], f64::INFINITY).0;
        let b = burn_from_host.step(1e-3, mh.clone(), g2);
        let d = close(&params(&a), &params(&b));
        assert!(d < 1e-6, "after swapping states the weights differ by {d}");
        // A fresh optimiser would have stepped differently: the state mattered.
        let fresh = HostAdam::new(AdamSettings::default())
            .step(1e-3, mh.clone(), &[&grads_of(&mh, 9.0)], f64::INFINITY)
            .0;
        assert!(close(&params(&fresh), &params(&a)) > 1e-5);
    }

    #[test]
    fn global_clipping_scales_every_gradient_by_one_factor() {
        let dev = Device::flex().autodiff();
        let m = Model::new(&NetConfig::default(), &moderato_env::ActionSpace::default(), 5, &dev);
        let g = grads_of(&m, 2.0);
        let (_, norm) = HostAdam::new(AdamSettings::default()).step(0.0, m.clone(), &[&g], f64::INFINITY);
        assert!(norm > 0.1, "{norm}");
        // With plain SGD-like first Adam steps the direction is sign(g), so compare the clipped
        // gradients themselves: clip to half the norm, read them back through the moments.
        let mut clipped = HostAdam::new(AdamSettings::default());
        clipped.step(0.0, m.clone(), &[&g], norm / 2.0);
        let mut plain = HostAdam::new(AdamSettings::default());
        plain.step(0.0, m, &[&g], f64::INFINITY);
        let mut ratios = Vec::new();
        for (id, c) in &clipped.state {
            let p = &plain.state[id];
            for (a, b) in c.m1.iter().zip(&p.m1) {
                if b.abs() > 1e-6 {
                    ratios.push(a / b);
                }
            }
        }
        assert!(!ratios.is_empty());
        for r in ratios {
            assert!((r - 0.5).abs() < 1e-3, "a gradient scaled by {r}, not by 0.5");
        }
    }

    #[test]
    fn an_optimizer_file_that_is_not_adam_state_is_refused_with_the_reason() {
        let e = HostAdam::from_bytes(AdamSettings::default(), Bytes::from_bytes_vec(b"not a pack".to_vec()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a burnpack file"), "{e}");
        let raw: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        let t = burn_pack::Tensor::new(
            "7.velocity".into(),
            burn_pack::DType::F32,
            vec![2],
            Some(7),
            burn_pack::Bytes::from_bytes_vec(raw),
        );
        let bytes = burn_pack::Writer::new(vec![t]).into_bytes().unwrap();
        let e = HostAdam::from_bytes(AdamSettings::default(), bytes).unwrap_err().to_string();
        assert!(e.contains("`7.velocity` is not Adam state"), "{e}");
    }
}
