//! `moderato simulate`: run one scenario under one policy and print what happens.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use moderato_env::sim::{Scenario, SimConfig, SimEnv};
use moderato_env::{Env, EpisodeSummary, LayerKind};
use moderato_policies::gains::ControllerGains;

use crate::resolve::{PolicySource, controller_factory, resolve_fixed};

#[derive(Debug, Args)]
#[command(after_help = "POLICY is a baseline (per-packet, static:mlx5, static:16/32, dim, itr, ...), \
per-layer knobs (nic=20/32,backend=0/1,frontend=8/16; nic.rx=U/F sets one direction; a layer not \
named stays per-packet), a knob file (*.toml: nic, backend, frontend, each { rx = { usecs, frames }, \
tx = { usecs, frames } }), a frozen-model directory, trim:<model directory> (the model under a \
feedback trim of each VM's target and floors under its knobs) or trim-targets:<model directory> (the trim of \
targets alone). Knobs beyond the action space's bounds \
(usecs 1000; frames 256 at the NIC, 128 elsewhere) are refused. \
The episode starts with one reset interval under per-packet settings (the virtio default) that is \
never counted; --warmup N excludes N more intervals under the policy from the summary.")]
pub struct SimulateArgs {
    /// Scenario file (see experiments/scenarios/).
    pub scenario: PathBuf,
    /// The policy (see below).
    #[arg(long, alias = "settings", default_value = "static:moderate")]
    pub policy: String,
    /// Simulated seconds after the warm-up (rounded up to whole intervals).
    #[arg(long, default_value_t = 1.0, conflicts_with = "steps")]
    pub seconds: f64,
    /// Control intervals after the warm-up (instead of --seconds).
    #[arg(long, value_name = "N")]
    pub steps: Option<u32>,
    /// Intervals run under the policy before the summary's statistics start (printed, not counted).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub warmup: u32,
    /// Seed of every random draw.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Control interval, ms (one printed row each).
    #[arg(long, default_value_t = 10.0)]
    pub interval_ms: f64,
    /// Print only the summary.
    #[arg(long)]
    pub quiet: bool,
    /// Gains of the feedback controllers (`trim:`, `trim-targets:`, `slo-feedback`): a TOML file
    /// with a `[trim]` and/or `[slo_feedback]` table, as in an eval or deploy config.
    #[arg(long, value_name = "FILE")]
    pub gains: Option<PathBuf>,
    /// Run the scenario as a host of this profile (kvm-notf-coal, kvm-vhost, xen, sriov-vf): its
    /// backend made the profile's, as an eval config's `profile` does.
    #[arg(long, value_name = "NAME", value_parser = moderato_env::HostProfile::parse)]
    pub profile: Option<moderato_env::HostProfile>,
    /// Under each interval's row, print the settings in force at its end on every layer: rx and
    /// tx as usecs/frames, NAPI deferral as napi_defer_hard_irqs/gro_flush_timeout µs ("-": the
    /// layer has no such knob, or it cannot be read).
    #[arg(long)]
    pub knobs: bool,
}

/// One interface's settings in force, as `--knobs` prints them; "-" for what the host's profile
/// does not offer on that layer (`has`), whatever the simulator reports there.
fn knobs_of(i: &moderato_env::InterfaceObs, has: moderato_env::LayerMechanisms) -> String {
    let k = |k: Option<moderato_env::Knobs>| match k {
        Some(k) if has.coalescing => format!("{}/{}", k.usecs, k.frames),
        _ => "-".to_string(),
    };
    let mut out = format!("rx {} tx {}", k(i.rx_knobs), k(i.tx_knobs));
    if has.deferral {
        let n = i.napi.map_or("-".to_string(), |n| {
            format!("{}/{}", n.napi_defer_hard_irqs, n.gro_flush_timeout_ns / 1000)
        });
        out.push_str(&format!(" napi {n}"));
    }
    out
}

/// What a simulate run measured, for printing and tests.
#[derive(Debug, Clone)]
pub struct SimulateResult {
    pub scenario: String,
    pub policy: String,
    pub slo_p99_us: f64,
    /// Simulated time from the reset to the end, ns (reset interval and warm-up included).
    pub simulated_ns: u64,
    pub warmup_intervals: u32,
    /// Over the intervals after the warm-up.
    pub summary: EpisodeSummary,
}

pub fn run(args: SimulateArgs) -> Result<()> {
    let r = simulate(&args)?;
    print_summary(&r)?;
    Ok(())
}

/// Runs the simulation `args` describe, printing a row per interval unless `quiet`.
pub fn simulate(args: &SimulateArgs) -> Result<SimulateResult> {
    let mut scenario = Scenario::load(&args.scenario)?;
    if let Some(p) = args.profile {
        scenario = scenario
            .as_profile(p)
            .map_err(|e| anyhow::anyhow!("scenario {} (--profile) {e}", args.scenario.display()))?;
    }
    let interval_us = (args.interval_ms * 1000.0).round() as u64;
    anyhow::ensure!(
        args.interval_ms.is_finite() && interval_us > 0,
        "--interval-ms {}: give a positive number of milliseconds",
        args.interval_ms
    );
    let measured = match args.steps {
        Some(n) => {
            anyhow::ensure!(n > 0, "--steps 0: give at least one interval");
            n
        }
        None => {
            anyhow::ensure!(
                args.seconds.is_finite() && args.seconds > 0.0 && args.seconds <= 1e5,
                "--seconds {}: give a positive number of simulated seconds (at most 1e5)",
                args.seconds
            );
            // Whole microseconds first: 0.03 s is 30 000 µs, three 10 ms intervals, not
            // ceil(3.0000000000000004) = 4.
            let total_us = (args.seconds * 1e6).round().max(1.0) as u64;
            u32::try_from(total_us.div_ceil(interval_us)).context("--seconds: too many intervals")?
        }
    };
    let steps = measured
        .checked_add(args.warmup)
        .context("--warmup and --seconds/--steps together are too many intervals")?;
    let source = resolve_fixed(&args.policy, std::path::Path::new("."), &Default::default())
        .with_context(|| format!("--policy {}", args.policy))?;
    let mut cfg = SimConfig { interval_us, episode_steps: steps, ..SimConfig::default() };
    // A model runs under the bounds it was trained with (there is no config here to set them).
    if let PolicySource::Model { dir, .. } = &source {
        let model = moderato_policies::learned::LearnedPolicy::load(dir, &burn::tensor::Device::flex())?;
        cfg.action_space = model.meta().action_space.clone();
    }
    source.check_bounds(&cfg.action_space)?;
    let slo = cfg.reward.slo_p99_us;
    let profile = scenario.profile();
    let mut env = SimEnv::new(scenario.clone(), cfg, Some(controller_factory()))?;
    // The scenario's own spec: its VMs' targets and its host profile, which a model is checked
    // against.
    let gains = match &args.gains {
        Some(f) => load_gains(f)?,
        None => ControllerGains::default(),
    };
    let mut policy = source.instantiate_with(env.spec(), &gains)?;
    let (mut obs, _) = env.reset(args.seed)?;
    let bar = crate::progress::bar(u64::from(steps), "intervals", args.quiet || steps > 500);
    if !args.quiet {
        outln!(
            "{:>8} {:>9} {:>9} {:>9} {:>8} {:>8} {:>9} {:>9} {:>8}",
            "t_ms",
            "rx_kpps",
            "tx_kpps",
            "irq_k/s",
            "cpu_us",
            "p50_us",
            "p99_us",
            "drops/s",
            "reward"
        );
    }
    let mut end_ns = 0;
    for i in 0..steps {
        if i == args.warmup && args.warmup > 0 {
            env.restart_summary();
            if !args.quiet {
                outln!("{:>8} warm-up of {} intervals ends; the summary counts from here", "--", args.warmup);
            }
        }
        let action = policy.act(&obs);
        let st = env.step(&action).with_context(|| format!("{} on {}", policy.name(), scenario.name))?;
        let t = st.info.truth.as_ref().context("the simulator reports ground truth")?;
        end_ns = st.info.time_ns;
        if !args.quiet {
            let worst = t
                .worst_sensitive_p99_us()
                .unwrap_or_else(|| t.vms.iter().map(|v| v.latency.p99_us).fold(0.0, f64::max));
            let p50 = t.vms.iter().map(|v| v.latency.p50_us).fold(0.0, f64::max);
            let irq = st.obs.host.nic.irq_per_s().unwrap_or(0.0)
                + st.obs.guests.iter().filter_map(|g| g.frontend.irq_per_s()).sum::<f64>();
            outln!(
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
            if args.knobs {
                let h = &st.obs.host;
                let has = |kind| profile.mechanisms(kind);
                let mut line = format!("{:>8} nic {}", "knobs", knobs_of(&h.nic, has(LayerKind::Nic)));
                for (v, b) in h.backends.iter().enumerate() {
                    line.push_str(&format!(" | vm{v} backend {}", knobs_of(b, has(LayerKind::Backend))));
                    if let Some(g) = st.obs.guests.get(v) {
                        line.push_str(&format!(
                            " frontend {}",
                            knobs_of(&g.frontend, has(LayerKind::Frontend))
                        ));
                    }
                }
                outln!("{line}");
            }
        }
        bar.inc(1);
        obs = st.obs;
        if st.truncated || st.terminated {
            break;
        }
    }
    bar.finish_and_clear();
    let summary = env.episode_summary().context("episode summary")?;
    Ok(SimulateResult {
        scenario: scenario.name.clone(),
        policy: source.label(),
        slo_p99_us: slo,
        simulated_ns: end_ns,
        warmup_intervals: args.warmup,
        summary,
    })
}

fn print_summary(r: &SimulateResult) -> std::io::Result<()> {
    let (s, slo) = (&r.summary, r.slo_p99_us);
    let t = &s.totals;
    let per = |ns: u64| if t.completed == 0 { 0.0 } else { ns as f64 / 1000.0 / t.completed as f64 };
    outln!("\n{} under {}, {:.3} s simulated", r.scenario, r.policy, r.simulated_ns as f64 / 1e9);
    outln!(
        "  counted         the last {} intervals, {:.3} s (not counted: the reset interval{})",
        s.intervals,
        s.duration_ns as f64 / 1e9,
        if r.warmup_intervals > 0 {
            format!(" and a warm-up of {} intervals", r.warmup_intervals)
        } else {
            String::new()
        }
    );
    outln!("  throughput      {:.1} kpps, {:.3} Gbit/s", t.throughput_pps() / 1e3, t.throughput_bps() / 1e9);
    outln!(
        "  CPU µs/packet   {:.3} (nic {:.3}, backend {:.3}, frontend {:.3}, stack {:.3})",
        t.cpu_us_per_packet(),
        per(t.cpu.nic.total_ns()),
        per(t.cpu.backend.total_ns()),
        per(t.cpu.frontend.total_ns()),
        per(t.cpu.stack.total_ns())
    );
    let sensitive = t.vms.iter().any(|v| v.latency_sensitive);
    outln!(
        "  latency µs      p50 {:.1}  p99 {:.1}  p99.9 {:.1}  (mean {:.1}, {} samples; {})",
        s.latency.p50_us,
        s.latency.p99_us,
        s.latency.p999_us,
        s.latency.mean_us,
        s.latency.count,
        if sensitive { "latency-sensitive flows" } else { "all flows, none latency-sensitive" }
    );
    let targets: Vec<Option<f64>> = t.vms.iter().map(|v| v.slo_p99_us).collect();
    if sensitive && targets.iter().flatten().any(|&x| x != slo) {
        // Per-VM objectives: each VM's own target, and its p99 over the run.
        let per_vm: Vec<String> = targets
            .iter()
            .zip(&s.vm_latency)
            .enumerate()
            .map(|(v, (tg, l))| match tg {
                Some(x) => format!("vm{v} p99 {:.1} ≤ {x} µs", l.p99_us),
                None => format!("vm{v} none"),
            })
            .collect();
        outln!(
            "  SLO per VM ({}) violated in {} of {} intervals",
            per_vm.join(", "),
            s.slo_violations,
            s.intervals
        );
    } else if sensitive {
        outln!(
            "  SLO p99 ≤ {slo} µs (latency-sensitive flows) violated in {} of {} intervals",
            s.slo_violations,
            s.intervals
        );
    } else {
        outln!("  SLO p99 ≤ {slo} µs covers latency-sensitive flows; this scenario has none (bulk only)");
    }
    outln!("  drops           {} of {} offered ({:.3}%)", t.dropped, t.offered, 100.0 * t.drop_fraction());
    Ok(())
}

/// A gains file: `[trim]` and/or `[slo_feedback]` tables, checked.
pub fn load_gains(path: &std::path::Path) -> Result<ControllerGains> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("--gains: cannot read {}", path.display()))?;
    let g: ControllerGains = toml::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "--gains {}: {}\n(a gains file has a [trim] and/or a [slo_feedback] table; the keys are those of \
             TrimGains and slo_feedback::Gains, see the README)",
            path.display(),
            e.message().trim()
        )
    })?;
    g.check().map_err(|e| {
        anyhow::anyhow!(
            "--gains {}: {e}. Fix: correct the value, or remove the key to keep its default",
            path.display()
        )
    })?;
    Ok(g)
}
