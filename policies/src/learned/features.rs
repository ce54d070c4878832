//! Observation normalisation and the flat batch layout the networks read.

use serde::{Deserialize, Serialize};

use burn::tensor::{Device, Tensor, TensorData};
use moderato_env::{ActionSpace, BACKEND_FEATURES, GUEST_FEATURES, HOST_FEATURES, Observation};

use super::net::BatchTensors;

/// Running mean and variance of one feature group (Welford / Chan's parallel update), as
/// Stable-Baselines3's `RunningMeanStd`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunningStats {
    pub mean: Vec<f64>,
    pub var: Vec<f64>,
    pub count: f64,
}

impl RunningStats {
    pub fn new(dim: usize) -> Self {
        RunningStats { mean: vec![0.0; dim], var: vec![1.0; dim], count: 1e-4 }
    }

    /// Folds a batch of rows (each `dim` long) into the statistics.
    pub fn update(&mut self, rows: &[f32]) {
        let d = self.mean.len();
        if rows.is_empty() || d == 0 {
            return;
        }
        let n = (rows.len() / d) as f64;
        let mut bmean = vec![0.0; d];
        for r in rows.chunks_exact(d) {
            for (m, x) in bmean.iter_mut().zip(r) {
                *m += f64::from(*x) / n;
            }
        }
        let mut bvar = vec![0.0; d];
        for r in rows.chunks_exact(d) {
            for ((v, x), m) in bvar.iter_mut().zip(r).zip(&bmean) {
                *v += (f64::from(*x) - m).powi(2) / n;
            }
        }
        let tot = self.count + n;
        for i in 0..d {
            let delta = bmean[i] - self.mean[i];
            let m2 = self.var[i] * self.count + bvar[i] * n + delta * delta * self.count * n / tot;
            self.mean[i] += delta * n / tot;
            self.var[i] = m2 / tot;
        }
        self.count = tot;
    }

    /// `clip((x − mean) / sqrt(var + 1e-8), −clip, clip)` in place.
    pub fn normalize(&self, row: &mut [f32], clip: f32) {
        for ((x, m), v) in row.iter_mut().zip(&self.mean).zip(&self.var) {
            *x = ((f64::from(*x) - m) / (v + 1e-8).sqrt()).clamp(-f64::from(clip), f64::from(clip)) as f32;
        }
    }
}

/// Normalisation statistics of the three feature groups (shared across VMs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Normalizer {
    pub host: RunningStats,
    pub backend: RunningStats,
    pub guest: RunningStats,
    /// Normalised features are clipped to `[-clip, clip]`.
    pub clip: f32,
}

impl Default for Normalizer {
    fn default() -> Self {
        Normalizer {
            host: RunningStats::new(HOST_FEATURES.len()),
            backend: RunningStats::new(BACKEND_FEATURES.len()),
            guest: RunningStats::new(GUEST_FEATURES.len()),
            clip: 10.0,
        }
    }
}

/// The feature columns a model does not read (`network.ignore_features`): zero after
/// normalisation (the running mean), in training and at inference alike. The network then learns
/// nothing from them, and a host that cannot measure them (a NIC without coalescing or interrupt
/// lines, such as veth) can still run the model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ignored {
    host: Vec<usize>,
    backend: Vec<usize>,
    guest: Vec<usize>,
}

impl Ignored {
    /// The columns of `names`; an unknown or repeated name is an error that lists the valid ones.
    pub fn new(names: &[String]) -> Result<Ignored, String> {
        let mut out = Ignored::default();
        for (i, name) in names.iter().enumerate() {
            if names[..i].contains(name) {
                return Err(format!("network.ignore_features: `{name}` is listed twice"));
            }
            let col = |list: &[moderato_env::Feature]| list.iter().position(|f| f.name == name);
            if let Some(c) = col(HOST_FEATURES) {
                out.host.push(c);
            } else if let Some(c) = col(BACKEND_FEATURES) {
                out.backend.push(c);
            } else if let Some(c) = col(GUEST_FEATURES) {
                out.guest.push(c);
            } else {
                let valid: Vec<&str> = HOST_FEATURES
                    .iter()
                    .chain(BACKEND_FEATURES)
                    .chain(GUEST_FEATURES)
                    .map(|f| f.name)
                    .collect();
                return Err(format!(
                    "network.ignore_features: `{name}` is not a feature; valid names: {}",
                    valid.join(", ")
                ));
            }
        }
        Ok(out)
    }

    pub fn is_empty(&self) -> bool {
        self.host.is_empty() && self.backend.is_empty() && self.guest.is_empty()
    }

    fn zero(cols: &[usize], rows: &mut [f32], width: usize) {
        for r in rows.chunks_exact_mut(width) {
            cols.iter().for_each(|&c| r[c] = 0.0);
        }
    }
}

/// Raw features of a batch of observations, padded to `vms` VMs per row.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FeatureBatch {
    pub rows: usize,
    pub vms: usize,
    /// `[rows, HOST]`
    pub host: Vec<f32>,
    /// `[rows, vms, BACKEND]`
    pub backend: Vec<f32>,
    /// `[rows, vms, GUEST]`
    pub guest: Vec<f32>,
    /// `[rows, vms]`
    pub mask: Vec<f32>,
}

impl FeatureBatch {
    pub fn new(vms: usize) -> Self {
        FeatureBatch { vms, ..Default::default() }
    }

    /// Empties the batch, keeping its padding and its buffers.
    pub fn clear(&mut self) {
        self.rows = 0;
        self.host.clear();
        self.backend.clear();
        self.guest.clear();
        self.mask.clear();
    }

    /// Appends one observation's raw features (it must have at most `self.vms` VMs).
    pub fn push(&mut self, obs: &Observation, space: &ActionSpace) {
        let n = obs.guests.len();
        assert!(n <= self.vms, "observation with {n} VMs in a batch padded to {}", self.vms);
        self.host.extend(obs.host.features(space));
        for v in 0..self.vms {
            if v < n {
                self.backend.extend(obs.host.backend_features(space, v));
                self.guest.extend(obs.guests[v].features(space));
                self.mask.push(1.0);
            } else {
                self.backend.extend(std::iter::repeat_n(0.0, BACKEND_FEATURES.len()));
                self.guest.extend(std::iter::repeat_n(0.0, GUEST_FEATURES.len()));
                self.mask.push(0.0);
            }
        }
        self.rows += 1;
    }

    /// Folds the raw features of existing VMs into `norm`.
    pub fn update(&self, norm: &mut Normalizer) {
        norm.host.update(&self.host);
        let (bf, gf) = (BACKEND_FEATURES.len(), GUEST_FEATURES.len());
        let mut be = Vec::with_capacity(self.backend.len());
        let mut gu = Vec::with_capacity(self.guest.len());
        for (i, m) in self.mask.iter().enumerate() {
            if *m > 0.0 {
                be.extend_from_slice(&self.backend[i * bf..(i + 1) * bf]);
                gu.extend_from_slice(&self.guest[i * gf..(i + 1) * gf]);
            }
        }
        norm.backend.update(&be);
        norm.guest.update(&gu);
    }

    /// A normalised copy (padding stays zero), with the `ignored` columns zero.
    pub fn normalized(&self, norm: &Normalizer, ignored: &Ignored) -> FeatureBatch {
        let mut out = self.clone();
        out.host.chunks_exact_mut(HOST_FEATURES.len()).for_each(|r| norm.host.normalize(r, norm.clip));
        let (bf, gf) = (BACKEND_FEATURES.len(), GUEST_FEATURES.len());
        for (i, m) in self.mask.iter().enumerate() {
            if *m > 0.0 {
                norm.backend.normalize(&mut out.backend[i * bf..(i + 1) * bf], norm.clip);
                norm.guest.normalize(&mut out.guest[i * gf..(i + 1) * gf], norm.clip);
            }
        }
        if !ignored.is_empty() {
            Ignored::zero(&ignored.host, &mut out.host, HOST_FEATURES.len());
            Ignored::zero(&ignored.backend, &mut out.backend, bf);
            Ignored::zero(&ignored.guest, &mut out.guest, gf);
        }
        out
    }

    /// Rows `idx` of this batch, in that order.
    pub fn select(&self, idx: &[usize]) -> FeatureBatch {
        let (h, bf, gf, v) = (HOST_FEATURES.len(), BACKEND_FEATURES.len(), GUEST_FEATURES.len(), self.vms);
        let mut out = FeatureBatch::new(v);
        for &i in idx {
            out.host.extend_from_slice(&self.host[i * h..(i + 1) * h]);
            out.backend.extend_from_slice(&self.backend[i * v * bf..(i + 1) * v * bf]);
            out.guest.extend_from_slice(&self.guest[i * v * gf..(i + 1) * v * gf]);
            out.mask.extend_from_slice(&self.mask[i * v..(i + 1) * v]);
            out.rows += 1;
        }
        out
    }

    /// Appends another batch with the same padding.
    pub fn extend(&mut self, o: &FeatureBatch) {
        assert_eq!(self.vms, o.vms, "batches with different padding");
        self.host.extend_from_slice(&o.host);
        self.backend.extend_from_slice(&o.backend);
        self.guest.extend_from_slice(&o.guest);
        self.mask.extend_from_slice(&o.mask);
        self.rows += o.rows;
    }

    pub fn tensors(&self, device: &Device) -> BatchTensors {
        let (b, v) = (self.rows, self.vms);
        BatchTensors {
            host: Tensor::from_data(TensorData::new(self.host.clone(), [b, HOST_FEATURES.len()]), device),
            backend: Tensor::from_data(
                TensorData::new(self.backend.clone(), [b, v, BACKEND_FEATURES.len()]),
                device,
            ),
            guest: Tensor::from_data(
                TensorData::new(self.guest.clone(), [b, v, GUEST_FEATURES.len()]),
                device,
            ),
            mask: Tensor::from_data(TensorData::new(self.mask.clone(), [b, v]), device),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_stats_match_the_batch_statistics() {
        let mut s = RunningStats::new(2);
        let rows: Vec<f32> = (0..1000).flat_map(|i| [i as f32, 5.0]).collect();
        s.update(&rows[..600]);
        s.update(&rows[600..]);
        assert!((s.mean[0] - 499.5).abs() < 0.01, "{:?}", s.mean);
        assert!((s.var[0] - 83333.25).abs() / 83333.25 < 1e-3, "{:?}", s.var);
        assert!(s.var[1] < 1e-3);
        let mut r = [499.5f32, 5.0];
        s.normalize(&mut r, 10.0);
        assert!(r[0].abs() < 1e-3);
    }

    #[test]
    fn ignored_columns_are_zero_after_normalisation_and_only_they() {
        let names: Vec<String> = ["nic.irq_krate_ln", "backend.rx_usecs", "guest.probe_p99_ln"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let ig = Ignored::new(&names).unwrap();
        let mut b = FeatureBatch::new(2);
        b.rows = 1;
        b.host = vec![3.0; HOST_FEATURES.len()];
        b.backend = vec![3.0; 2 * BACKEND_FEATURES.len()];
        b.guest = vec![3.0; 2 * GUEST_FEATURES.len()];
        b.mask = vec![1.0, 1.0];
        let norm = Normalizer::default();
        let (plain, masked) = (b.normalized(&norm, &Ignored::default()), b.normalized(&norm, &ig));
        let col = |list: &[moderato_env::Feature], n: &str| list.iter().position(|f| f.name == n).unwrap();
        let irq = col(HOST_FEATURES, "nic.irq_krate_ln");
        for (i, (p, m)) in plain.host.iter().zip(&masked.host).enumerate() {
            assert_eq!(*m, if i == irq { 0.0 } else { *p }, "host column {i}");
            assert!(*p > 1.0);
        }
        let bu = col(BACKEND_FEATURES, "backend.rx_usecs");
        for (i, (p, m)) in plain.backend.iter().zip(&masked.backend).enumerate() {
            assert_eq!(*m, if i % BACKEND_FEATURES.len() == bu { 0.0 } else { *p }, "backend column {i}");
        }
        let gp = col(GUEST_FEATURES, "guest.probe_p99_ln");
        for (i, (p, m)) in plain.guest.iter().zip(&masked.guest).enumerate() {
            assert_eq!(*m, if i % GUEST_FEATURES.len() == gp { 0.0 } else { *p }, "guest column {i}");
        }
    }

    #[test]
    fn unknown_or_repeated_ignored_names_are_errors_that_say_what_is_valid() {
        let e = Ignored::new(&["nic.irq_rate".to_string()]).unwrap_err();
        assert!(e.contains("`nic.irq_rate` is not a feature") && e.contains("nic.irq_krate_ln"), "{e}");
        let twice = vec!["nic.rx_usecs".to_string(), "nic.rx_usecs".to_string()];
        assert!(Ignored::new(&twice).unwrap_err().contains("listed twice"));
    }
}
