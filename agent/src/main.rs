//! `moderato`: train, evaluate, simulate and deploy learned interrupt-moderation policies.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use moderato_agent::{deploy, eval, resolve, simulate, train};

#[derive(Debug, Parser)]
#[command(name = "moderato", version, about = "Learned interrupt moderation for virtualized hosts")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one scenario under one policy in the simulator and print each interval.
    Simulate(simulate::SimulateArgs),
    /// Evaluate policies (baselines, best-static, frozen models) on a suite of scenarios.
    Eval(EvalArgs),
    /// Train a policy with PPO from an experiment config, freeze it and evaluate it.
    Train(train::TrainArgs),
    /// Freeze the model of any training checkpoint.
    Export(train::ExportArgs),
    /// Run a policy on a live host: observe, decide, set the knobs; restores them on exit.
    Deploy(deploy::DeployArgs),
    /// Put back the original settings a deploy journalled (after it was killed), without a policy.
    Restore(deploy::RestoreArgs),
    /// Print what a deployed policy would see on this host, each interval.
    Observe(deploy::ObserveArgs),
    /// Answer the udp-echo latency probe of a deploy (run it in the VM or on the peer host).
    Echo(deploy::EchoArgs),
}

#[derive(Debug, clap::Args)]
struct EvalArgs {
    /// Eval config (see experiments/eval/standard.toml).
    config: PathBuf,
    /// Output directory (default: runs/eval-<name>-<time>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Where best-static searches are cached.
    #[arg(long, default_value = "runs/cache")]
    cache_dir: PathBuf,
    /// Search best-static again instead of reading the cache.
    #[arg(long)]
    no_cache: bool,
    /// Worker threads (default: the config's, else one per core).
    #[arg(long)]
    threads: Option<usize>,
}

fn run_eval(a: EvalArgs) -> Result<()> {
    let mut suite = eval::EvalConfig::load(&a.config)?;
    if let Some(t) = a.threads {
        suite.config.threads = t;
    }
    let out = a.out.unwrap_or_else(|| {
        PathBuf::from("runs").join(format!("eval-{}-{}", suite.config.name, moderato_agent::timestamp()))
    });
    let cache = eval::Cache { dir: (!a.no_cache).then_some(a.cache_dir) };
    let started = std::time::Instant::now();
    let rows = eval::run_suite(&suite, &cache, true)?;
    let aggs = eval::aggregate(&rows);
    println!("{}", eval::report::markdown(&suite, &aggs));
    eval::write_outputs(&out, &suite, &rows, &aggs)?;
    eprintln!("{} episodes in {:.1} s; wrote {}", rows.len(), started.elapsed().as_secs_f64(), out.display());
    Ok(())
}

fn try_main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Simulate(a) => simulate::run(a),
        Command::Eval(a) => run_eval(a),
        Command::Train(a) => train::run(a),
        Command::Export(a) => train::export(a),
        Command::Deploy(a) => deploy::run_deploy(a, &resolve::deploy_policy),
        Command::Restore(a) => deploy::run_restore(a),
        Command::Observe(a) => deploy::run_observe(a),
        Command::Echo(a) => deploy::run_echo(a),
    }
}

fn main() -> ExitCode {
    match try_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
