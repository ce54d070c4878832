//! Training throughput: the `ppo-standard` recipe for a fixed number of iterations, printing
//! environment steps per second and where the time went.
//!
//! ```sh
//! cargo bench -p moderato-agent --bench train                       # 8 iterations (65,536 steps)
//! MODERATO_BENCH_ITERATIONS=20 cargo bench -p moderato-agent --bench train
//! MODERATO_BENCH_CONFIG=experiments/quickstart.toml cargo bench -p moderato-agent --bench train
//! ```
//!
//! The first iteration is a warm-up and not counted. The same recipe through the binary, for a
//! side-by-side comparison with another build: `moderato train experiments/ppo-standard.toml
//! --max-iterations N --no-eval --out <dir>` prints the same summary at its end.

use std::path::PathBuf;

use moderato_agent::train::metrics::Memory;
use moderato_agent::train::{ExperimentConfig, Perf, Trainer, train_device};

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; there is nothing to filter.
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let config = std::env::var("MODERATO_BENCH_CONFIG")
        .map_or_else(|_| root.join("experiments/ppo-standard.toml"), |p| root.join(p));
    let iterations: u64 = match std::env::var("MODERATO_BENCH_ITERATIONS") {
        Ok(s) => s.parse().map_err(|_| {
            anyhow::anyhow!("MODERATO_BENCH_ITERATIONS={s}: expected a whole number of iterations, e.g. 8")
        })?,
        Err(_) => 8,
    };
    anyhow::ensure!(iterations >= 1, "MODERATO_BENCH_ITERATIONS must be at least 1");
    let exp = ExperimentConfig::load(&config)?;
    let mut t = Trainer::new(exp, train_device());
    let mut m = Memory::default();
    t.iteration(&mut m)?; // warm-up
    t.perf = Perf::default();
    let started = std::time::Instant::now();
    for _ in 0..iterations {
        t.iteration(&mut m)?;
    }
    let secs = started.elapsed().as_secs_f64();
    let steps = t.perf.steps;
    println!(
        "train/{}: {iterations} iterations, {steps} environment steps in {secs:.2} s: {:.0} environment steps/s",
        t.exp.config.name,
        steps as f64 / secs
    );
    print!("{}", t.perf.summary());
    Ok(())
}
