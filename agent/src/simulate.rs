//! `moderato simulate`: run one scenario under one policy and print what happens.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use moderato_env::sim::{Scenario, SimConfig, SimEnv};
use moderato_env::{Env, EpisodeSummary};

use crate::resolve::{PolicySource, controller_factory, resolve};

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// Scenario file (see experiments/scenarios/).
    pub scenario: PathBuf,
    /// Settings: a baseline name (per-packet, static:mlx5, static:16/32, dim, itr, ...) or a
    /// frozen-model directory.
    #[arg(long, default_value = "static:moderate")]
    pub settings: String,
    /// Simulated seconds.
    #[arg(long, default_value_t = 1.0)]
    pub seconds: f64,
    /// Seed of every random draw.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Control interval, ms (one printed row each).
    #[arg(long, default_value_t = 10.0)]
    pub interval_ms: f64,
    /// Print only the summary.
    #[arg(long)]
    pub quiet: bool,
}

pub fn run(args: SimulateArgs) -> Result<()> {
    let scenario = Scenario::load(&args.scenario)?;
    let interval_us = (args.interval_ms * 1000.0).round() as u64;
    anyhow::ensure!(interval_us > 0, "--interval-ms {} is too small", args.interval_ms);
    anyhow::ensure!(
        args.seconds.is_finite() && args.seconds > 0.0 && args.seconds <= 1e5,
        "--seconds {}: give a positive number of simulated seconds (at most 1e5)",
        args.seconds
    );
    let steps = ((args.seconds * 1e6) / interval_us as f64).ceil().max(1.0) as u32;
    let source = resolve(&args.settings, std::path::Path::new("."), &Default::default())?;
    anyhow::ensure!(
        source != PolicySource::BestStatic,
        "best-static is found by `moderato eval`; simulate takes a fixed setting, a baseline or a model"
    );
    let cfg = SimConfig { interval_us, episode_steps: steps, ..SimConfig::default() };
    let mut policy = source.instantiate(&cfg.spec(scenario.vms.len()))?;
    let slo = cfg.reward.slo_p99_us;
    let mut env = SimEnv::new(scenario.clone(), cfg, Some(controller_factory()))?;
    let (mut obs, _) = env.reset(args.seed)?;
    let bar = crate::progress::bar(u64::from(steps), "intervals", args.quiet || steps > 500);
    if !args.quiet {
        println!(
            "{:>8} {:>9} {:>9} {:>9} {:>8} {:>8} {:>9} {:>9} {:>8}",
            "t_ms", "rx_kpps", "tx_kpps", "irq_k/s", "cpu_us", "p50_us", "p99_us", "drops/s", "reward"
        );
    }
    for _ in 0..steps {
        let action = policy.act(&obs);
        let st = env.step(&action).with_context(|| format!("{} on {}", policy.name(), scenario.name))?;
        let t = st.info.truth.as_ref().context("the simulator reports ground truth")?;
        if !args.quiet {
            let worst = t
                .worst_sensitive_p99_us()
                .unwrap_or_else(|| t.vms.iter().map(|v| v.latency.p99_us).fold(0.0, f64::max));
            let p50 = t.vms.iter().map(|v| v.latency.p50_us).fold(0.0, f64::max);
            let irq = st.obs.host.nic.irq_per_s().unwrap_or(0.0)
                + st.obs.guests.iter().filter_map(|g| g.frontend.irq_per_s()).sum::<f64>();
            println!(
                "{:>8.1} {:>9.1} {:>9.1} {:>9.1} {:>8.2} {:>8.1} {:>9.1} {:>9.0} {:>8.3}",
                st.info.time_ns as f64 / 1e6,
                st.obs.host.nic.rx_pps / 1e3,
                st.obs.host.nic.tx_pps / 1e3,
                irq / 1e3,
                t.cpu_us_per_packet(),
                p50,
                worst,
                t.dropped as f64 * 1e9 / t.interval_ns as f64,
                st.reward
            );
        }
        bar.inc(1);
        obs = st.obs;
        if st.truncated || st.terminated {
            break;
        }
    }
    bar.finish_and_clear();
    let s = env.episode_summary().context("episode summary")?;
    print_summary(&scenario.name, policy.name(), slo, &s);
    Ok(())
}

fn print_summary(scenario: &str, policy: &str, slo: f64, s: &EpisodeSummary) {
    let t = &s.totals;
    let per = |ns: u64| if t.completed == 0 { 0.0 } else { ns as f64 / 1000.0 / t.completed as f64 };
    println!("\n{scenario} under {policy}, {:.3} s simulated", s.duration_ns as f64 / 1e9);
    println!(
        "  throughput      {:.1} kpps, {:.3} Gbit/s",
        t.throughput_pps() / 1e3,
        t.throughput_bps() / 1e9
    );
    println!(
        "  CPU µs/packet   {:.3} (nic {:.3}, backend {:.3}, frontend {:.3}, stack {:.3})",
        t.cpu_us_per_packet(),
        per(t.cpu.nic.total_ns()),
        per(t.cpu.backend.total_ns()),
        per(t.cpu.frontend.total_ns()),
        per(t.cpu.stack.total_ns())
    );
    println!(
        "  latency µs      p50 {:.1}  p99 {:.1}  p99.9 {:.1}  (mean {:.1}, {} samples)",
        s.latency.p50_us, s.latency.p99_us, s.latency.p999_us, s.latency.mean_us, s.latency.count
    );
    println!("  SLO p99 ≤ {slo} µs violated in {} of {} intervals", s.slo_violations, s.intervals);
    println!("  drops           {} of {} offered ({:.3}%)", t.dropped, t.offered, 100.0 * t.drop_fraction());
}
