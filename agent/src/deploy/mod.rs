//! Deploying a policy on a live host (`moderato deploy`) and watching what it would see
//! (`moderato observe`).
//!
//! - [`config`]: the deploy config (`experiments/deploy/{host,guest}.toml`).
//! - [`limits`]: safety bounds and the largest change per step, applied to every decision.
//! - [`control`]: the loop: observe → decide → limit → apply on tokio, the fallback policy when
//!   observations go stale, and restoration of the original settings on every exit.
//! - [`journal`]: the state directory: a journal of original settings and one lock per interface.
//! - [`metrics`]: OpenMetrics on `--metrics-addr`, and `/healthz`.
//! - [`observe`]: the operator's view of each interval.
//!
//! `moderato restore` ([`run_restore`]) puts back what a deploy that died left in the journal.
//!
//! `moderato echo` ([`run_echo`]) is the far end of the `udp-echo` latency source.
//!
//! The live host itself is `moderato_env::live::HostEnv`; knobs are set through ethtool netlink,
//! NAPI deferral (for `napi:` policies) through the per-device sysfs files.
//! See `docs/deploy.md` for what each hypervisor and driver lets us control.

pub mod config;
pub mod control;
pub mod journal;
pub mod limits;
pub mod logs;
pub mod metrics;
pub mod observe;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use moderato_env::live::{HostEnv, LiveConfig, Role};
use moderato_policies::Policy;
use moderato_policies::gains::ControllerGains;
use tokio::sync::watch;

pub use config::DeployConfig;
pub use control::{DeployLoop, LoopOptions, SloTarget, StopReason, Summary, check_requirements};
pub use limits::{LayerLimits, Limits, Range};
pub use metrics::Metrics;

/// Which side of the host this process runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RoleArg {
    /// The hypervisor: the physical NIC and the VMs' backend interfaces.
    Host,
    /// Inside a VM: its frontend interface.
    Guest,
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Role {
        match r {
            RoleArg::Host => Role::Host,
            RoleArg::Guest => Role::Guest,
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One readable line per event.
    #[default]
    Human,
    /// One JSON object per event (for log pipelines).
    Json,
}

/// `moderato deploy`: run a policy on this side of a live host.
#[derive(Debug, Clone, clap::Args)]
pub struct DeployArgs {
    /// A frozen model directory or a baseline name (per-packet, dim, itr, static:PRESET, static:USECS/FRAMES,
    /// napi:DEFER/TIMEOUT_US for NAPI deferral).
    #[arg(long)]
    pub policy: String,
    /// Which side of the host this process runs on.
    #[arg(long, value_enum)]
    pub role: RoleArg,
    /// Deploy config (see experiments/deploy/host.toml and guest.toml).
    #[arg(long)]
    pub config: PathBuf,
    /// Decide and log every interval, but set nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    /// Stop after N decisions (default: run until SIGINT/SIGTERM).
    #[arg(long, value_name = "N")]
    pub steps: Option<u64>,
    /// Run a learned model even where the interfaces' mechanisms (ethtool coalescing, NAPI
    /// deferral) differ from the deploy config's `profile`; without it such a deploy is refused.
    #[arg(long)]
    pub allow_profile_mismatch: bool,
}

/// `moderato restore`: put back the original settings a deploy journalled, without starting a
/// policy (after a deploy was killed with SIGKILL, or lost its host mid-run).
#[derive(Debug, Clone, clap::Args)]
pub struct RestoreArgs {
    /// The deploy config of the deploy to undo (its interfaces and `state_dir`).
    #[arg(long)]
    pub config: PathBuf,
    /// Which side (default: the one section the config has).
    #[arg(long, value_enum)]
    pub role: Option<RoleArg>,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
}

/// `moderato echo`: answer the `udp-echo` latency probe of a deploy on another side.
#[derive(Debug, Clone, clap::Args)]
pub struct EchoArgs {
    /// Address and UDP port to answer on; a deploy config's `latency.target` points here.
    #[arg(long, default_value = "0.0.0.0:7")]
    pub listen: SocketAddr,
}

/// `moderato observe`: print what a policy would see, every interval.
#[derive(Debug, Clone, clap::Args)]
pub struct ObserveArgs {
    /// Deploy config (see experiments/deploy/host.toml and guest.toml).
    #[arg(long)]
    pub config: PathBuf,
    /// Which side to observe (default: the one section the config has).
    #[arg(long, value_enum)]
    pub role: Option<RoleArg>,
    /// Stop after N intervals (default: until interrupted).
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
}

/// A tracing subscriber writing `format` lines to `writer`, with colours only where `ansi`;
/// `RUST_LOG` filters (default `info`).
pub fn subscriber<W>(format: LogFormat, ansi: bool, writer: W) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(writer);
    match format {
        LogFormat::Human => Box::new(builder.finish()),
        LogFormat::Json => Box::new(builder.event_format(logs::JsonLines).finish()),
    }
}

/// Installs the global subscriber, unless one is already set (then that one keeps logging).
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal as _;
    let ansi = format == LogFormat::Human && std::io::stderr().is_terminal();
    let _ = tracing::subscriber::set_global_default(subscriber(format, ansi, std::io::stderr));
}

/// The signals that stop a deploy (restoring the original settings first): every terminating
/// signal a process can catch. SIGHUP stops too (no reload: a changed config takes a restart).
/// SIGPIPE, ignored by Rust programs, is caught as well so that `kill -PIPE` cannot leave the
/// host changed; sockets write with MSG_NOSIGNAL and never raise it, so only someone else's kill
/// or a log pipe whose reader is gone does (then the deploy stops and restores). Numbers are
/// Linux's on x86 and ARM.
pub const STOP_SIGNALS: [(&str, i32); 7] = [
    ("SIGTERM", 15),
    ("SIGINT", 2),
    ("SIGHUP", 1),
    ("SIGQUIT", 3),
    ("SIGUSR1", 10),
    ("SIGUSR2", 12),
    ("SIGPIPE", 13),
];

/// The shutdown channel, turned true by any of [`STOP_SIGNALS`]. The handlers are registered
/// before this returns, so a signal that arrives while the loop starts is not lost.
fn signals(on_stop: &'static str) -> Result<(watch::Sender<bool>, watch::Receiver<bool>)> {
    use tokio::signal::unix::{SignalKind, signal};
    let (tx, rx) = watch::channel(false);
    for (name, num) in STOP_SIGNALS {
        let mut s =
            signal(SignalKind::from_raw(num)).with_context(|| format!("registering a {name} handler"))?;
        let sender = tx.clone();
        tokio::spawn(async move {
            // Every later arrival is swallowed too: a second signal must not cut a restore short.
            let mut first = true;
            while s.recv().await.is_some() {
                if first {
                    tracing::info!(target: "moderato::deploy", signal = name, "{name}: {on_stop}");
                    let _ = sender.send(true);
                    first = false;
                } else {
                    tracing::info!(target: "moderato::deploy", signal = name, "{name} again: already stopping");
                }
            }
        });
    }
    Ok((tx, rx))
}

/// Resolves a policy name or model directory for a side with `vms` VMs and the config's latency
/// target (`[slo] p99_us`, which `slo-feedback` steers to), if any (the binary's resolver).
/// The last argument is each VM's p99 target (µs, `None`: no objective), which a model checks
/// against the range it was trained for.
pub type PolicyLoader =
    dyn Fn(&str, usize, Option<f64>, &[Option<f64>], &ControllerGains) -> Result<Box<dyn Policy>>;

/// `moderato deploy`. `load_policy(name, vms, slo_p99_us, objectives, gains)` resolves a model directory or baseline name for a
/// side with `vms` VMs. A restore that fails at exit is an error (non-zero exit) after the
/// summary has said so.
pub fn run_deploy(args: DeployArgs, load_policy: &PolicyLoader) -> Result<()> {
    init_logging(args.log_format);
    let r = deploy(args, load_policy);
    if let Err(e) = &r {
        tracing::error!(target: "moderato::deploy", error = %format!("{e:#}"), "deploy failed");
    }
    r
}

fn deploy(args: DeployArgs, load_policy: &PolicyLoader) -> Result<()> {
    let role: Role = args.role.into();
    let cfg = DeployConfig::load(&args.config)?;
    let live = cfg.live_config(role, &args.config)?;
    let limits = cfg.limits(role, &args.config)?;
    let vms = live.vms();
    let target = cfg.slo.as_ref().map(|s| s.p99_us);
    let objectives: Vec<Option<f64>> = (0..vms).map(|v| live.objective(v)).collect();
    let gains = cfg.gains();
    let primary = load_policy(&args.policy, vms, target, &objectives, &gains)
        .with_context(|| format!("loading the policy `{}` (--policy)", args.policy))?;
    let fallback = load_policy(&cfg.fallback, vms, target, &objectives, &gains).with_context(|| {
        format!(
            "loading the fallback policy `{}` (key `fallback` in {})",
            cfg.fallback,
            args.config.display()
        )
    })?;
    if !gains.is_default() {
        // What `trim:` and `slo-feedback` run with, for the record of this deploy.
        let text = toml::to_string(&gains).unwrap_or_default();
        let text = text.lines().filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ");
        tracing::info!(target: "moderato::deploy", gains = %text, "feedback controllers' gains from the config");
    }
    for (p, what) in [(&primary, "--policy"), (&fallback, "fallback")] {
        p.check_profile(live.profile).map_err(|e| {
            anyhow::anyhow!(
                "{what} `{}`: {e} (the deploy config's `profile` is {}{})",
                p.name(),
                live.profile,
                if cfg.profile.is_none() { ", the default" } else { "" }
            )
        })?;
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting tokio")?;
    rt.block_on(async move {
        // Signals first: from here on, none of them can kill the process without a restore.
        let (_keep, shutdown) = signals("stopping and restoring the original settings")?;
        let env = HostEnv::open(live).context("opening the live host")?;
        let opts = LoopOptions {
            dry_run: args.dry_run,
            max_steps: args.steps,
            stale_after: cfg.stale_after_intervals,
            vm_names: cfg.vm_names(),
            state_dir: Some(cfg.state_dir()),
            slo: cfg.slo.as_ref().map(|s| SloTarget { p99_us: s.p99_us, after_intervals: s.after_intervals }),
            allow_profile_mismatch: args.allow_profile_mismatch,
        };
        let metrics = Metrics::new(args.dry_run);
        if let Some(addr) = args.metrics_addr {
            let listener = metrics::bind(addr).await?;
            let limits = metrics::ServerLimits::for_this_process();
            tracing::info!(target: "moderato::deploy", max_connections = limits.max_connections,
                timeout_s = limits.timeout.as_secs_f64(), open_file_limit = metrics::open_file_limit(),
                "metrics at http://{}/metrics", listener.local_addr()?);
            tokio::spawn(metrics::serve(listener, metrics.clone(), limits));
        }
        let lp = DeployLoop::new(env, primary, fallback, limits, opts, metrics)?;
        let summary = lp.run(shutdown).await?;
        let failed = summary.restore_failures.len();
        let line = format!("deploy loop stopped ({:?})", summary.stop);
        if failed == 0 {
            tracing::info!(
                target: "moderato::deploy",
                decisions = summary.decisions,
                fallback_decisions = summary.fallback_decisions,
                fallbacks = summary.fallbacks,
                slo_overrides = summary.slo_overrides,
                restored = summary.restored,
                restore_failures = failed,
                "{line}"
            );
            Ok(())
        } else {
            tracing::error!(
                target: "moderato::deploy",
                decisions = summary.decisions,
                fallback_decisions = summary.fallback_decisions,
                fallbacks = summary.fallbacks,
                slo_overrides = summary.slo_overrides,
                restored = summary.restored,
                restore_failures = failed,
                "{line}; {failed} interface(s) NOT restored"
            );
            anyhow::bail!(
                "{failed} interface(s) could not be restored:\n  - {}",
                summary.restore_failures.join("\n  - ")
            )
        }
    })
}

/// `moderato restore`: for every interface of the config's side, restores its journal (taking
/// its lock, so a running deploy is refused rather than undercut); non-zero exit when any fails.
pub fn run_restore(args: RestoreArgs) -> Result<()> {
    init_logging(args.log_format);
    let cfg = DeployConfig::load(&args.config)?;
    let role = cfg.role(args.role.map(Role::from), &args.config)?;
    let live = LiveConfig { probe: None, ..cfg.live_config(role, &args.config)? };
    let state = journal::StateDir::open(&cfg.state_dir())?;
    let mut coalescer = moderato_env::live::NetlinkCoalescer::new().context("opening ethtool netlink")?;
    let r = restore_with(&live, &state, &mut coalescer);
    if let Err(e) = &r {
        tracing::error!(target: "moderato::restore", error = %format!("{e:#}"), "restore failed");
    }
    r
}

/// [`run_restore`]'s work with a given coalescer (a fake in tests); logs each interface.
pub fn restore_with(
    live: &LiveConfig,
    state: &journal::StateDir,
    coalescer: &mut dyn moderato_env::live::Coalescer,
) -> Result<()> {
    use journal::Outcome;
    let journal::RestoreReport { outcomes, others } = journal::restore_all(live, state, coalescer)?;
    let mut failures = Vec::new();
    let mut restored = 0;
    for (name, o) in &outcomes {
        match o {
            Outcome::NoJournal => {
                tracing::info!(target: "moderato::restore", interface = %name, "no journal: nothing to restore")
            }
            Outcome::Restored(e) => {
                restored += 1;
                tracing::info!(target: "moderato::restore", interface = %name, pid = e.pid,
                    original = %e.describe(),
                    "restored the original settings journalled by PID {}", e.pid);
            }
            Outcome::Failed { entry, why, kept } => {
                let msg = format!(
                    "{name}: not restored: {why}{}",
                    if *kept {
                        " (the journal stays; try again once that is fixed)"
                    } else {
                        " (journal removed)"
                    }
                );
                tracing::error!(target: "moderato::restore", interface = %name, pid = entry.pid, "{msg}");
                failures.push(msg);
            }
        }
    }
    for p in &others {
        tracing::warn!(target: "moderato::restore", journal = %p.display(),
            "a journal for an interface this config does not name; restore it with the config that deployed it");
    }
    tracing::info!(target: "moderato::restore", restored, failures = failures.len(),
        state_dir = %state.path().display(), "restore done");
    if failures.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("{} interface(s) not restored:\n  - {}", failures.len(), failures.join("\n  - "))
    }
}

/// `moderato observe`: prints each interval's observation of this side; sets nothing.
pub fn run_observe(args: ObserveArgs) -> Result<()> {
    let cfg = DeployConfig::load(&args.config)?;
    let role = cfg.role(args.role.map(Role::from), &args.config)?;
    let live = cfg.live_config(role, &args.config)?;
    let space = live.action_space.clone();
    let interval = live.interval;
    let names = cfg.vm_names();
    let mut env = HostEnv::open(live).context("opening the live host")?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "moderato observe: {role} side, interval {} ms (reads only; sets nothing)",
        interval.as_millis()
    )?;
    for w in env.start() {
        writeln!(out, "  warning: {w}")?;
    }
    for l in env.layers() {
        let state = match &l.control {
            moderato_env::live::Control::ObserveOnly(why) => format!("observe-only: {why}"),
            moderato_env::live::Control::Controlled => {
                format!("controlled, now `{}`", l.params.map(|p| p.to_string()).unwrap_or_default())
            }
            moderato_env::live::Control::Unknown => "absent".into(),
        };
        writeln!(out, "  {} = {}: {state}", l.layer, l.ifname)?;
    }
    out.flush()?;
    let mut n = 0u64;
    while args.count.is_none_or(|c| n < c) {
        std::thread::sleep(env.until_due().max(Duration::from_millis(1)));
        let s = env.sample();
        write!(out, "{}", observe::render(role, &s, &space, &names))?;
        out.flush()?;
        n += 1;
    }
    Ok(())
}

/// `moderato echo`: sends every UDP datagram back to its sender until SIGINT or SIGTERM.
pub fn run_echo(args: EchoArgs) -> Result<()> {
    init_logging(LogFormat::Human);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting tokio")?;
    rt.block_on(async move {
        let (_keep, shutdown) = signals("stopping")?;
        serve_echo(args.listen, shutdown).await
    })
}

/// The echo responder on `addr` until `shutdown` turns true (or it fails).
pub async fn serve_echo(addr: SocketAddr, mut shutdown: watch::Receiver<bool>) -> Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    // Bind here first, so that a busy or privileged port is reported before "answering".
    drop(std::net::UdpSocket::bind(addr).map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::PermissionDenied {
            "; ports below 1024 need root or CAP_NET_BIND_SERVICE, or choose another with --listen"
        } else {
            ""
        };
        anyhow::anyhow!("binding UDP {addr} (--listen): {e}{hint}")
    })?);
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let mut server = tokio::task::spawn_blocking(move || moderato_env::live::serve_udp_echo(addr, &flag));
    tracing::info!(target: "moderato::echo", "answering UDP echo on {addr}");
    let result = tokio::select! {
        r = &mut server => r,
        _ = shutdown.wait_for(|s| *s) => {
            stop.store(true, Ordering::Relaxed);
            server.await
        }
    };
    result.context("the echo thread")?.with_context(|| format!("UDP echo on {addr}"))
}
