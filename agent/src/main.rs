//! `moderato`: train, evaluate, simulate and deploy learned interrupt-moderation policies.
//!
//! One grammar for every subcommand: the config file is the first positional argument (`--config
//! FILE` still works, hidden, for the deploy and observe spellings of 0.1), the policy is
//! `--policy` (`--settings` is simulate's hidden old spelling), and a number of control intervals
//! is `--steps` (`--count` is observe's hidden old spelling).

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser, Subcommand};

use moderato_agent::deploy::{self, LogFormat, RoleArg};
use moderato_agent::{eval, outln, resolve, simulate, train};

/// `0.1.0 (<git describe>)`: the crate version and the source revision the binary was built from.
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("MODERATO_SOURCE_REVISION"), ")");

#[derive(Debug, Parser)]
#[command(
    name = "moderato",
    version = VERSION,
    about = "Learned interrupt moderation for virtualized hosts",
    after_help = "A policy is named the same way everywhere: per-packet, static:<preset> (ixgbe, mlx5, \
                  moderate, heavy), static:<usecs>/<frames>, dim, itr, best-static and best-static-held-out (eval only), napi:<defer>/<timeout_us>, \
                  slo-feedback, busy-poll:<us> (simulated only), irq-suspend:<busy_us>/<timeout_us>, a frozen-model \
                  directory, trim:<model directory> (the model under a feedback trim of its targets and floors under its knobs) or trim-targets:<model directory> (the trim of targets alone). `moderato <command> --help` explains each command."
)]
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
    Train(TrainCli),
    /// Freeze the model of any training checkpoint.
    Export(train::ExportArgs),
    /// Run a policy on a live host: observe, decide, set the knobs; restores them on exit.
    Deploy(DeployCli),
    /// Put back the original settings a deploy journalled (after it was killed), without a policy.
    Restore(RestoreCli),
    /// Print what a deployed policy would see on this host, each interval.
    Observe(ObserveCli),
    /// Answer the udp-echo latency probe of a deploy (run it in the VM or on the peer host).
    Echo(deploy::EchoArgs),
    /// Draw hosts from an experiment's scenario generator into scenario files, or check scenario files.
    #[command(subcommand)]
    Scenarios(ScenariosCmd),
    /// Print a shell completion script (e.g. `moderato completions bash > /etc/bash_completion.d/moderato`).
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page, or write one page per command into a directory.
    Man {
        /// Write `moderato.1` and `moderato-<command>.1` into this directory instead of printing moderato.1.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
}

/// The config file: first positional argument; `--config FILE` is the hidden old spelling.
#[derive(Debug, clap::Args)]
struct ConfigArg {
    /// Config file (TOML); required.
    #[arg(value_name = "CONFIG", required_unless_present = "config_flag")]
    config: Option<PathBuf>,
    /// Old spelling of the positional CONFIG.
    #[arg(
        long = "config",
        id = "config_flag",
        value_name = "CONFIG",
        hide = true,
        conflicts_with = "config"
    )]
    config_flag: Option<PathBuf>,
}

impl ConfigArg {
    fn path(self) -> PathBuf {
        // clap guarantees exactly one of them.
        self.config.or(self.config_flag).unwrap_or_default()
    }
}

#[derive(Debug, clap::Args)]
#[command(after_help = "CONFIG: an eval config (see experiments/eval/standard.toml).")]
struct EvalArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Output directory (default: `runs/eval-<name>-<time>`).
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

#[derive(Debug, clap::Args)]
#[command(after_help = "CONFIG: an experiment config (see experiments/example.toml).")]
struct TrainCli {
    #[command(flatten)]
    config: ConfigArg,
    /// Continue the run in this directory from its newest checkpoint.
    #[arg(long, value_name = "RUN_DIR")]
    resume: Option<PathBuf>,
    /// Run directory for a new run (default: `runs/<name>-<time>`); refused if it exists, unless --force.
    #[arg(long, value_name = "RUN_DIR", conflicts_with = "resume")]
    out: Option<PathBuf>,
    /// Start a new run in an existing --out directory, deleting its checkpoints, model and evaluation.
    #[arg(long, requires = "out")]
    force: bool,
    /// Stop after this many iterations of this invocation, with a checkpoint to --resume from.
    #[arg(long, value_name = "N")]
    max_iterations: Option<u64>,
    /// Skip the final evaluation against baselines.
    #[arg(long)]
    no_eval: bool,
    /// Train with this seed instead of the experiment's `seed` (for several training seeds of one
    /// recipe); recorded in the run's config.toml and the model.
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
}

#[derive(Debug, clap::Args)]
#[command(after_help = "CONFIG: a deploy config (see experiments/deploy/host.toml and guest.toml).")]
struct DeployCli {
    #[command(flatten)]
    config: ConfigArg,
    /// A frozen model directory or a baseline name (per-packet, dim, itr, static:PRESET, static:USECS/FRAMES,
    /// napi:DEFER/TIMEOUT_US for NAPI deferral); trim:MODEL_DIR runs the model under a feedback trim of
    /// each VM's target and floors under its knobs (it reads the latency source's probe and the drop
    /// counters); trim-targets:MODEL_DIR without the floors.
    #[arg(long)]
    policy: String,
    /// Which side of the host this process runs on.
    #[arg(long, value_enum)]
    role: RoleArg,
    /// Decide and log every interval, but set nothing.
    #[arg(long)]
    dry_run: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    /// Stop after N intervals (default: run until SIGINT/SIGTERM).
    #[arg(long, value_name = "N", alias = "count")]
    steps: Option<u64>,
    /// Run a learned model even where the interfaces' mechanisms (ethtool coalescing, NAPI
    /// deferral) differ from the deploy config's `profile`; without it such a deploy is refused.
    #[arg(long)]
    allow_profile_mismatch: bool,
}

#[derive(Debug, clap::Args)]
#[command(after_help = "CONFIG: the deploy config of the deploy to undo (its interfaces and `state_dir`).")]
struct RestoreCli {
    #[command(flatten)]
    config: ConfigArg,
    /// Which side (default: the one section the config has).
    #[arg(long, value_enum)]
    role: Option<RoleArg>,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
}

#[derive(Debug, clap::Args)]
#[command(after_help = "CONFIG: a deploy config (see experiments/deploy/host.toml and guest.toml).")]
struct ObserveCli {
    #[command(flatten)]
    config: ConfigArg,
    /// Which side to observe (default: the one section the config has).
    #[arg(long, value_enum)]
    role: Option<RoleArg>,
    /// Stop after N intervals (default: until interrupted).
    #[arg(long, value_name = "N", alias = "count")]
    steps: Option<u64>,
}

#[derive(Debug, Subcommand)]
enum ScenariosCmd {
    /// Draw hosts from the experiment's [suite.generator] and write each as a scenario file (and its traces).
    #[command(after_help = "EXPERIMENT: an experiment config with a [suite.generator] (see \
                            experiments/ppo-generalist.toml). Replay a drawn host with: moderato simulate DIR/<name>.toml")]
    Sample {
        /// Experiment config (TOML) whose [suite.generator] draws the hosts.
        experiment: PathBuf,
        /// Hosts to draw.
        #[arg(long, value_name = "N")]
        count: usize,
        /// Directory to write `<name>.toml` files (and `traces/`) into; refused if not empty, unless --force.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Base seed of the draws (default: the experiment's `seed`); the same seed writes the same files.
        #[arg(long, value_name = "S")]
        seed: Option<u64>,
        /// Write into a non-empty --out (replacing files of the same names).
        #[arg(long)]
        force: bool,
    },
    /// Load scenario files and report what is wrong with each, if anything.
    Check {
        /// Scenario files (TOML).
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
}

fn run_scenarios(c: ScenariosCmd) -> Result<()> {
    match c {
        ScenariosCmd::Sample { experiment, count, out, seed, force } => {
            moderato_agent::scenarios::sample(&experiment, count, &out, seed, force).map(|_| ())
        }
        ScenariosCmd::Check { files } => moderato_agent::scenarios::check(&files),
    }
}

fn run_eval(a: EvalArgs) -> Result<()> {
    let config = a.config.path();
    let mut suite = eval::EvalConfig::load(&config)?;
    if let Some(t) = a.threads {
        suite.config.threads = t;
    }
    let out = a.out.unwrap_or_else(|| {
        PathBuf::from("runs").join(format!("eval-{}-{}", suite.config.name, moderato_agent::timestamp()))
    });
    let cache = eval::Cache { dir: (!a.no_cache).then_some(a.cache_dir) };
    let started = std::time::Instant::now();
    let targets = suite.slo_targets();
    if targets.len() == 1 {
        let rows = eval::run_suite(&suite, &cache, true)?;
        let aggs = eval::aggregate(&rows);
        // Written before printed: a reader that closes stdout early loses no result.
        eval::write_outputs(&out, &suite, &rows, &aggs)?;
        outln!("{}", eval::report::markdown(&suite, &aggs));
        outln!("Over all scenarios:\n\n{}", eval::report::overview(&aggs));
        tracing::info!(
            "{} episodes in {:.1} s; wrote {} (re-run it with: moderato eval {})",
            rows.len(),
            started.elapsed().as_secs_f64(),
            out.display(),
            out.join("config.toml").display()
        );
        return Ok(());
    }
    // A sweep: the whole suite at each target, each in its own directory, and an overview.
    let mut md = format!(
        "# Evaluation `{}` at {} SLO targets\n\nConfig: `{}`. Each target's full report: `slo-<target>/report.md`.\n\n",
        suite.config.name,
        targets.len(),
        config.display()
    );
    let mut episodes = 0;
    for t in targets {
        let sub = suite.at_slo(t);
        tracing::info!("SLO p99 ≤ {t} µs");
        let rows = eval::run_suite(&sub, &cache, true)?;
        let aggs = eval::aggregate(&rows);
        let dir = out.join(format!("slo-{t}"));
        eval::write_outputs(&dir, &sub, &rows, &aggs)?;
        episodes += rows.len();
        md.push_str(&format!("## SLO p99 ≤ {t} µs\n\n{}\n", eval::report::overview(&aggs)));
    }
    std::fs::write(out.join("report.md"), &md).with_context(|| format!("cannot write {}", out.display()))?;
    outln!("{md}");
    tracing::info!(
        "{episodes} episodes in {:.1} s; wrote {} (re-run it with: moderato eval {})",
        started.elapsed().as_secs_f64(),
        out.display(),
        config.display()
    );
    Ok(())
}

fn print_man(out: Option<PathBuf>) -> Result<()> {
    let cmd = Cli::command();
    match out {
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
            clap_mangen::generate_to(cmd, &dir)
                .with_context(|| format!("cannot write man pages into {}", dir.display()))?;
            tracing::info!(
                "wrote man pages into {} (read one with: man -l {}/moderato.1)",
                dir.display(),
                dir.display()
            );
        }
        None => {
            let mut stdout = std::io::stdout().lock();
            clap_mangen::Man::new(cmd).render(&mut stdout).context("writing the man page")?;
            stdout.flush()?;
        }
    }
    Ok(())
}

/// Log lines of the interactive commands (train, eval, simulate, export, man): readable, on
/// stderr, filtered by `RUST_LOG` (default `info`). Deploy, observe and echo set their own.
fn init_cli_logging() {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let sub = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .finish();
    let _ = tracing::subscriber::set_global_default(sub);
}

fn try_main() -> Result<()> {
    let cli = Cli::parse();
    if matches!(
        cli.command,
        Command::Simulate(_)
            | Command::Eval(_)
            | Command::Train(_)
            | Command::Export(_)
            | Command::Scenarios(_)
            | Command::Man { .. }
    ) {
        init_cli_logging();
    }
    match cli.command {
        Command::Simulate(a) => simulate::run(a),
        Command::Eval(a) => run_eval(a),
        Command::Train(a) => train::run(train::TrainArgs {
            experiment: a.config.path(),
            resume: a.resume,
            out: a.out,
            force: a.force,
            max_iterations: a.max_iterations,
            no_eval: a.no_eval,
            seed: a.seed,
        }),
        Command::Export(a) => train::export(a),
        Command::Deploy(a) => deploy::run_deploy(
            deploy::DeployArgs {
                policy: a.policy,
                role: a.role,
                config: a.config.path(),
                dry_run: a.dry_run,
                metrics_addr: a.metrics_addr,
                log_format: a.log_format,
                steps: a.steps,
                allow_profile_mismatch: a.allow_profile_mismatch,
            },
            &resolve::deploy_policy,
        ),
        Command::Restore(a) => deploy::run_restore(deploy::RestoreArgs {
            config: a.config.path(),
            role: a.role,
            log_format: a.log_format,
        }),
        Command::Observe(a) => {
            deploy::run_observe(deploy::ObserveArgs { config: a.config.path(), role: a.role, count: a.steps })
        }
        Command::Echo(a) => deploy::run_echo(a),
        Command::Scenarios(c) => run_scenarios(c),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "moderato", &mut std::io::stdout());
            Ok(())
        }
        Command::Man { out } => print_man(out),
    }
}

fn main() -> ExitCode {
    match try_main() {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of stdout went away (`moderato simulate … | head`): the end it asked for.
        Err(e) if broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            // Through the command's log (human or JSON) where one is installed.
            if tracing::dispatcher::has_been_set() {
                tracing::error!("{e:#}");
            } else {
                eprintln!("error: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Whether `e` is a write to a closed pipe.
fn broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grammar_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn old_spellings_parse_like_the_new_ones() {
        let observe = |args: &[&str]| {
            let c = Cli::try_parse_from([&["moderato", "observe"], args].concat()).unwrap();
            let Command::Observe(o) = c.command else { panic!("not observe") };
            (o.config.path(), o.steps)
        };
        let new = observe(&["d.toml", "--steps", "5"]);
        assert_eq!(new, (PathBuf::from("d.toml"), Some(5)));
        assert_eq!(observe(&["--config", "d.toml", "--count", "5"]), new);
        let d = Cli::try_parse_from([
            "moderato", "deploy", "--config", "g.toml", "--policy", "dim", "--role", "guest", "--count", "3",
        ])
        .unwrap();
        let Command::Deploy(d) = d.command else { panic!("not deploy") };
        assert_eq!((d.steps, d.config.path()), (Some(3), PathBuf::from("g.toml")));
        let s = Cli::try_parse_from(["moderato", "simulate", "s.toml", "--settings", "dim"]).unwrap();
        let Command::Simulate(s) = s.command else { panic!("not simulate") };
        assert_eq!(s.policy, "dim");
    }

    #[test]
    fn a_config_given_twice_or_not_at_all_is_refused() {
        let e = Cli::try_parse_from(["moderato", "observe", "a.toml", "--config", "b.toml"]).unwrap_err();
        assert!(e.to_string().contains("cannot be used with"), "{e}");
        let e = Cli::try_parse_from(["moderato", "eval"]).unwrap_err();
        assert!(e.to_string().contains("CONFIG"), "{e}");
    }

    #[test]
    fn old_spellings_are_hidden_from_help() {
        let mut cmd = Cli::command();
        let help = cmd.find_subcommand_mut("observe").unwrap().render_long_help().to_string();
        assert!(help.contains("--steps") && help.contains("[CONFIG]") && help.contains("required"), "{help}");
        assert!(!help.contains("--count") && !help.contains("--config"), "{help}");
        let help = cmd.find_subcommand_mut("simulate").unwrap().render_long_help().to_string();
        assert!(help.contains("--policy") && !help.contains("--settings"), "{help}");
    }
}
