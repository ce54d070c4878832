//! Simulated packets per wall-clock second, single thread, on every standard scenario.
//!
//! `cargo bench -p moderato-env --bench sim`. Each iteration simulates 0.1 s of a scenario
//! (10 control intervals of 10 ms) with every layer at 16 µs / 16 frames, from a fresh reset; the
//! reported throughput is packets offered to the host (both directions) per second of wall clock.

use std::path::Path;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use moderato_env::sim::{Scenario, SimConfig, SimEnv};
use moderato_env::{CoalescingSettings, Env, Knobs, LayerSettings};

const STEPS: usize = 10;

fn fresh(s: &Scenario) -> SimEnv {
    let cfg = SimConfig { interval_us: 10_000, episode_steps: STEPS as u32, ..SimConfig::default() };
    let mut env = SimEnv::new(s.clone(), cfg, None).expect("standard scenario");
    env.reset(7).expect("reset");
    env
}

fn run(env: &mut SimEnv, settings: &CoalescingSettings) -> u64 {
    for _ in 0..STEPS {
        env.step(settings).expect("step");
    }
    env.conservation().expect("reset").offered
}

fn bench(c: &mut Criterion) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments/scenarios");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("scenarios")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    let mut g = c.benchmark_group("simulate");
    g.sample_size(20);
    for f in files {
        let s = Scenario::load(&f).expect("standard scenario");
        let k = Knobs::new(16, 16);
        let settings = CoalescingSettings::uniform(s.vms.len(), LayerSettings::fixed(k, k));
        // Packets per iteration, counted once (the simulator is deterministic).
        let packets = run(&mut fresh(&s), &settings);
        g.throughput(Throughput::Elements(packets));
        g.bench_function(&s.name, |b| {
            b.iter_batched(|| fresh(&s), |mut env| run(&mut env, &settings), BatchSize::LargeInput)
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
