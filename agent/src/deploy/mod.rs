//! Deploying a policy on a live host (`moderato deploy`) and watching what it would see
//! (`moderato observe`).
//!
//! - [`config`]: the deploy config (`experiments/deploy/{host,guest}.toml`).
//! - [`limits`]: safety bounds and the largest change per step, applied to every decision.
//! - [`control`]: the loop: observe → decide → limit → apply on tokio, the fallback policy when
//!   observations go stale, and restoration of the original settings on every exit.
//! - [`metrics`]: Prometheus text metrics on `--metrics-addr`.
//! - [`observe`]: the operator's view of each interval.
//!
//! `moderato echo` ([`run_echo`]) is the far end of the `udp-echo` latency source.
//!
//! The live host itself is `moderato_env::live::HostEnv`; knobs are set through ethtool netlink.
//! See `docs/deploy.md` for what each hypervisor and driver lets us control.

pub mod config;
pub mod control;
pub mod limits;
pub mod metrics;
pub mod observe;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use moderato_env::live::{HostEnv, Role};
use moderato_policies::Policy;
use tokio::sync::watch;

pub use config::DeployConfig;
pub use control::{DeployLoop, LoopOptions, StopReason, Summary, check_requirements};
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
    /// A frozen model directory or a baseline name (per-packet, dim, itr, static:PRESET, static:USECS/FRAMES).
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
        LogFormat::Json => Box::new(builder.json().flatten_event(true).finish()),
    }
}

/// Installs the global subscriber, unless one is already set (then that one keeps logging).
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal as _;
    let ansi = format == LogFormat::Human && std::io::stderr().is_terminal();
    let _ = tracing::subscriber::set_global_default(subscriber(format, ansi, std::io::stderr));
}

/// The shutdown channel, turned true by SIGINT or SIGTERM. The handlers are registered before this
/// returns, so a signal that arrives while the loop starts is not lost.
fn signals(on_stop: &'static str) -> Result<(watch::Sender<bool>, watch::Receiver<bool>)> {
    use tokio::signal::unix::{SignalKind, signal};
    let (tx, rx) = watch::channel(false);
    let mut term = signal(SignalKind::terminate()).context("registering a SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("registering a SIGINT handler")?;
    let sender = tx.clone();
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(target: "moderato::deploy", "{name}: {on_stop}");
        let _ = sender.send(true);
    });
    Ok((tx, rx))
}

/// Resolves a policy name or model directory for a side with `vms` VMs (the binary's resolver).
pub type PolicyLoader = dyn Fn(&str, usize) -> Result<Box<dyn Policy>>;

/// `moderato deploy`. `load_policy(name, vms)` resolves a model directory or baseline name for a
/// side with `vms` VMs.
pub fn run_deploy(args: DeployArgs, load_policy: &PolicyLoader) -> Result<()> {
    init_logging(args.log_format);
    let role: Role = args.role.into();
    let cfg = DeployConfig::load(&args.config)?;
    let live = cfg.live_config(role, &args.config)?;
    let limits = cfg.limits(role, &args.config)?;
    let vms = live.vms();
    let primary = load_policy(&args.policy, vms)
        .with_context(|| format!("loading the policy `{}` (--policy)", args.policy))?;
    let fallback = load_policy(&cfg.fallback, vms).with_context(|| {
        format!(
            "loading the fallback policy `{}` (key `fallback` in {})",
            cfg.fallback,
            args.config.display()
        )
    })?;
    let env = HostEnv::open(live).context("opening the live host")?;
    let opts = LoopOptions {
        dry_run: args.dry_run,
        max_steps: args.steps,
        stale_after: cfg.stale_after_intervals,
        vm_names: cfg.vm_names(),
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting tokio")?;
    rt.block_on(async move {
        let (_keep, shutdown) = signals("stopping and restoring the original settings")?;
        let metrics = Metrics::new(args.dry_run);
        if let Some(addr) = args.metrics_addr {
            let listener = metrics::bind(addr).await?;
            tracing::info!(target: "moderato::deploy", "metrics at http://{}/metrics", listener.local_addr()?);
            tokio::spawn(metrics::serve(listener, metrics.clone()));
        }
        let lp = DeployLoop::new(env, primary, fallback, limits, opts, metrics)?;
        let summary = lp.run(shutdown).await?;
        tracing::info!(
            target: "moderato::deploy",
            decisions = summary.decisions,
            fallback_decisions = summary.fallback_decisions,
            fallbacks = summary.fallbacks,
            restored = summary.restored,
            "deploy loop stopped ({:?})",
            summary.stop
        );
        Ok(())
    })
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
