//! Where training metrics go: TensorBoard event files, or memory (tests), behind one small
//! trait. tensorboard-rs 0.5.9 panics in `add_histogram`, `add_text` and `add_hparams`, so only
//! `add_scalar` and `add_histogram_raw` are used.

use std::path::Path;

use tensorboard_rs::summary_writer::SummaryWriter;

pub trait Metrics {
    fn scalar(&mut self, tag: &str, value: f64, step: u64);
    /// A histogram of `values` (skipped when empty).
    fn histogram(&mut self, tag: &str, values: &[f64], step: u64);
    fn flush(&mut self);
    /// A timing (`perf/*`): a scalar, but not part of the training curve, since it differs from
    /// run to run.
    fn perf(&mut self, tag: &str, value: f64, step: u64) {
        self.scalar(tag, value, step);
    }
}

/// TensorBoard event files under a directory.
pub struct TensorBoard {
    writer: SummaryWriter,
}

impl std::fmt::Debug for TensorBoard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TensorBoard")
    }
}

impl TensorBoard {
    pub fn new(dir: &Path) -> Self {
        TensorBoard { writer: SummaryWriter::new(dir) }
    }
}

impl Metrics for TensorBoard {
    fn scalar(&mut self, tag: &str, value: f64, step: u64) {
        if value.is_finite() {
            self.writer.add_scalar(tag, value as f32, step as usize);
        }
    }

    fn histogram(&mut self, tag: &str, values: &[f64], step: u64) {
        let v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return;
        }
        let (min, max) = v.iter().fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(*x), b.max(*x)));
        let sum: f64 = v.iter().sum();
        let sum_sq: f64 = v.iter().map(|x| x * x).sum();
        // 30 equal buckets between min and max; TensorBoard reads each limit as a bucket's right
        // edge.
        let n = 30;
        let width = ((max - min) / n as f64).max(1e-12);
        let limits: Vec<f64> = (1..=n).map(|i| min + width * i as f64).collect();
        let mut counts = vec![0.0; n];
        for x in &v {
            let i = (((x - min) / width) as usize).min(n - 1);
            counts[i] += 1.0;
        }
        self.writer.add_histogram_raw(
            tag,
            min,
            max,
            v.len() as f64,
            sum,
            sum_sq,
            &limits,
            &counts,
            step as usize,
        );
    }

    fn flush(&mut self) {
        self.writer.flush();
    }
}

impl Drop for TensorBoard {
    fn drop(&mut self) {
        self.writer.flush();
    }
}

/// Metrics kept in memory, for tests and for training curves compared across runs.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Memory {
    pub scalars: Vec<(String, u64, f64)>,
    /// The timings (`perf/*`), kept apart from the curve.
    pub perf: Vec<(String, u64, f64)>,
}

impl Memory {
    /// Every value of `tag`, in order.
    pub fn series(&self, tag: &str) -> Vec<(u64, f64)> {
        self.scalars.iter().filter(|s| s.0 == tag).map(|s| (s.1, s.2)).collect()
    }
}

impl Metrics for Memory {
    fn scalar(&mut self, tag: &str, value: f64, step: u64) {
        self.scalars.push((tag.to_string(), step, value));
    }
    fn histogram(&mut self, _tag: &str, _values: &[f64], _step: u64) {}
    fn flush(&mut self) {}
    fn perf(&mut self, tag: &str, value: f64, step: u64) {
        self.perf.push((tag.to_string(), step, value));
    }
}
