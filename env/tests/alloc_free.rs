//! The event loop allocates nothing in steady state (engine.rs, "Performance").
//!
//! A counting global allocator (`stats_alloc`) counts every allocation and reallocation. `step`
//! allocates its return values by design (the observation's and the truth's per-VM vectors, the
//! applied settings), a fixed number per step whatever happened in the interval. So the test
//! runs each scenario twice, with 1 ms and with 20 ms intervals (20 times the events per step),
//! warms both up, and asserts that every measured step of both allocates exactly as often: any
//! allocation inside the event loop (a queue or the event heap growing, a boxed event, a
//! per-packet vector) would make the 20 ms steps allocate more, or vary from step to step.
//!
//! Covered: everything `SimEnv::step` runs (settings applied, the event loop over the interval,
//! the interval's bookkeeping, rewards) on every standard scenario at three knob settings.
//! Not covered: `reset` (it builds the engine), the live environment.

use std::alloc::System;
use std::path::{Path, PathBuf};

use moderato_env::sim::{Scenario, SimConfig, SimEnv};
use moderato_env::{CoalescingSettings, Env, Knobs, LayerSettings};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Allocations and reallocations so far, all threads (this file has one test, so that no other
/// test thread allocates while it measures).
fn allocs() -> u64 {
    let s = GLOBAL.stats();
    (s.allocations + s.reallocations) as u64
}

fn scenario_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments/scenarios");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    v.sort();
    v
}

const WARM_STEPS: usize = 30;
const MEASURED_STEPS: usize = 20;

/// Allocations of each measured step, and the packets those steps offered.
fn per_step_allocs(s: &Scenario, interval_us: u64, action: &CoalescingSettings) -> (Vec<u64>, u64) {
    let cfg = SimConfig { interval_us, episode_steps: 1000, ..SimConfig::default() };
    let mut env = SimEnv::new(s.clone(), cfg, None).expect("standard scenario");
    env.reset(1).expect("reset");
    for _ in 0..WARM_STEPS {
        env.step(action).expect("step");
    }
    let mut counts = Vec::with_capacity(MEASURED_STEPS);
    let mut packets = 0;
    for _ in 0..MEASURED_STEPS {
        let before = allocs();
        let st = env.step(action).expect("step");
        counts.push(allocs() - before);
        packets += st.info.truth.as_ref().map_or(0, |t| t.offered);
        drop(st);
    }
    (counts, packets)
}

#[test]
fn a_step_allocates_the_same_whatever_its_interval_runs() {
    // The counter counts (else the assertions below could not fail).
    let region = Region::new(GLOBAL);
    let v: Vec<u64> = std::hint::black_box(Vec::with_capacity(10));
    assert_eq!(region.change().allocations, 1);
    drop(v);
    for f in scenario_files() {
        let s = Scenario::load(&f).unwrap_or_else(|e| panic!("{e}"));
        let vms = s.vms.len();
        let uni =
            |u, n| CoalescingSettings::uniform(vms, LayerSettings::fixed(Knobs::new(u, n), Knobs::new(u, n)));
        for (what, action) in [
            ("per-packet", CoalescingSettings::per_packet(vms)),
            ("16/16", uni(16, 16)),
            ("250/64", uni(250, 64)),
        ] {
            let (short, p_short) = per_step_allocs(&s, 1_000, &action);
            let (long, p_long) = per_step_allocs(&s, 20_000, &action);
            let name = format!("{} at {what}", s.name);
            assert!(p_long > 10 * p_short.max(1) && p_long > 2_000, "{name}: too few packets ({p_long})");
            let base = short[0];
            assert!(
                short.iter().chain(&long).all(|&n| n == base),
                "{name}: the event loop allocates: per-step allocations at 1 ms {short:?}, at 20 ms {long:?} \
                 ({p_long} packets in the 20 ms steps)"
            );
        }
    }
}
