//! Simulated packets per second of on-CPU time, for comparing simulator revisions on a busy
//! machine (wall-clock benchmarks there move with the load; on-CPU time moves much less).
//!
//! The workload is `benches/sim.rs`'s: 10 intervals of 10 ms from a fresh reset with seed 7,
//! every layer at `U` µs / `F` frames (default 16/16), counting packets offered since reset.
//!
//! `cargo build --release --workspace --example sim_speed`, then
//! `target/release/examples/sim_speed experiments/scenarios/*.toml 100` (scenario files, then
//! iterations). Copy the binary aside to compare it with a later revision's, run alternately.

use moderato_env::sim::{Scenario, SimConfig, SimEnv};
use moderato_env::{CoalescingSettings, Env, Knobs, LayerSettings};

/// This thread's on-CPU time, ns (Linux schedstat).
fn cpu_ns() -> Result<u64, String> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").map_err(|e| format!("schedstat: {e}"))?;
    s.split_whitespace().next().and_then(|x| x.parse().ok()).ok_or_else(|| format!("schedstat: {s:?}"))
}

fn knob(name: &str) -> Result<u32, String> {
    std::env::var(name).map_or(Ok(16), |x| x.parse().map_err(|e| format!("{name}={x}: {e}")))
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: sim_speed SCENARIO.toml... ITERATIONS";
    let (iters, files) = args.split_last().ok_or(usage)?;
    let iters: usize = iters.parse().map_err(|e| format!("{usage}: ITERATIONS `{iters}`: {e}"))?;
    let k = Knobs::new(knob("U")?, knob("F")?);
    for path in files {
        let s = Scenario::load(path).map_err(|e| e.to_string())?;
        let settings = CoalescingSettings::uniform(s.vms.len(), LayerSettings::fixed(k, k));
        let (mut packets, mut cpu) = (0, 0);
        for _ in 0..iters {
            let cfg = SimConfig { interval_us: 10_000, episode_steps: 10, ..SimConfig::default() };
            let mut env = SimEnv::new(s.clone(), cfg, None).map_err(|e| e.to_string())?;
            env.reset(7).map_err(|e| e.to_string())?;
            let t = cpu_ns()?;
            for _ in 0..10 {
                env.step(&settings).map_err(|e| e.to_string())?;
            }
            cpu += cpu_ns()? - t;
            packets += env.conservation().map_or(0, |c| c.offered);
        }
        println!("{:14} {:.3} M packets/s on-CPU", s.name, packets as f64 / cpu.max(1) as f64 * 1e3);
    }
    Ok(())
}
