//! The deploy config (`experiments/deploy/{host,guest}.toml`): which interface plays which layer on
//! this side, the control interval, safety limits, the fallback policy and the latency source.
//!
//! Every key is documented in the two example files. Unknown keys are errors; so are missing
//! required ones and values out of range, each naming the file, the key and the fix.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use moderato_env::live::{InterfaceConfig, LiveConfig, ProbeConfig, Role};
use moderato_env::sim::Objective;
use moderato_policies::gains::ControllerGains;
use serde::Deserialize;

use super::limits::{LayerLimits, Limits, Range};

/// The whole file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployConfig {
    /// Length of one control interval, milliseconds.
    pub interval_ms: u64,
    /// Baseline policy that decides while observations are stale.
    pub fallback: String,
    /// Consecutive incomplete or failed observations after which the fallback decides.
    pub stale_after_intervals: u32,
    /// CPUs whose time enters the CPU features; empty or absent: all online CPUs.
    #[serde(default)]
    pub cpus: Vec<u32>,
    /// Interfaces on the hypervisor (`--role host`).
    pub host: Option<HostSection>,
    /// The interface inside a guest (`--role guest`).
    pub guest: Option<GuestSection>,
    /// Safety limits per layer kind.
    pub limits: LimitsSection,
    /// Where latency comes from.
    pub latency: LatencySection,
    /// Where the state journal and the per-interface locks live (default `/run/moderato`).
    pub state_dir: Option<PathBuf>,
    /// The run-time latency guard; absent: no guard.
    pub slo: Option<SloSection>,
    /// The host's moderation mechanisms (`kvm-notf-coal`, `kvm-vhost`, `xen`): what a learned
    /// model is told and checked against (a model trained for other profiles is refused).
    /// Absent: `kvm-notf-coal`, every layer's ethtool knobs (the behaviour before profiles).
    #[serde(default)]
    pub profile: Option<moderato_env::HostProfile>,
    /// `[trim]`: the gains of `trim:<model>` and `trim-targets:<model>`; absent keys keep the
    /// documented defaults (`moderato_policies::learned::trim::TrimGains`).
    #[serde(default)]
    pub trim: moderato_policies::learned::trim::TrimGains,
    /// `[slo_feedback]`: the gains of `slo-feedback`; absent keys keep the documented defaults.
    #[serde(default)]
    pub slo_feedback: moderato_policies::slo_feedback::Gains,
}

/// `[slo]`: when the probe's p99 exceeds `p99_us` for `after_intervals` intervals in a row, the
/// loop overrides the policy with the least coalescing the limits allow until it is back under.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SloSection {
    /// Target p99 of the latency probe, microseconds.
    pub p99_us: f64,
    /// Consecutive intervals over the target before the guard takes over (K).
    pub after_intervals: u32,
}

/// The state directory when the config names none.
pub const DEFAULT_STATE_DIR: &str = "/run/moderato";

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostSection {
    /// The physical NIC; absent: no NIC layer on this host.
    pub nic: Option<String>,
    /// `/proc/interrupts` handler-name substrings of the NIC's queues (default: found
    /// automatically).
    #[serde(default)]
    pub nic_irq_names: Vec<String>,
    /// One entry per VM, in VM order.
    #[serde(default)]
    pub vms: Vec<VmSection>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSection {
    /// The VM's name, for logs and metrics.
    pub name: String,
    /// The VM's backend interface on the host (tap/vnet, vif); absent: not observed.
    pub backend: Option<String>,
    #[serde(default)]
    pub backend_irq_names: Vec<String>,
    /// The VM's latency objective: a p99 target in µs, or `"none"`. Absent: `[slo] p99_us` where
    /// the file has an `[slo]` table, else none.
    #[serde(default)]
    pub slo_p99_us: Option<Objective>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestSection {
    /// The frontend interface (virtio-net, netfront); absent: nothing to control.
    pub frontend: Option<String>,
    #[serde(default)]
    pub frontend_irq_names: Vec<String>,
    /// The guest's latency objective: a p99 target in µs, or `"none"`. Absent: `[slo] p99_us`
    /// where the file has an `[slo]` table, else none.
    #[serde(default)]
    pub slo_p99_us: Option<Objective>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    pub nic: Option<LayerLimits>,
    pub backend: Option<LayerLimits>,
    pub frontend: Option<LayerLimits>,
}

/// Kind of latency source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LatencySource {
    None,
    UdpEcho,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatencySection {
    pub source: LatencySource,
    /// `udp-echo`: the responder, `address:port`.
    pub target: Option<String>,
    /// `udp-echo`: local address to send from (default: any).
    pub bind: Option<String>,
    /// `udp-echo`: milliseconds between probes.
    pub period_ms: Option<u64>,
    /// `udp-echo`: a reply later than this many milliseconds is lost.
    pub timeout_ms: Option<u64>,
}

/// The line (1-based) of `offset` in `text` and the dotted key there: the enclosing table, the
/// key assigned on that line, and the field a serde message names (`unknown field `x``).
fn key_at(text: &str, offset: usize, msg: &str) -> (usize, String) {
    let offset = offset.min(text.len());
    let line_no = text[..offset].matches('\n').count();
    let lines: Vec<&str> = text.lines().collect();
    let line = lines.get(line_no).map_or("", |l| l.trim());
    // `lines` is empty for an empty file; `line_no` may be one past the last line.
    let header = lines[..(line_no + 1).min(lines.len())]
        .iter()
        .rev()
        .map(|l| l.trim())
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_start_matches('[').split(']').next().unwrap_or("").trim().to_string())
        .unwrap_or_default();
    let field = msg.split('`').nth(1).filter(|_| msg.contains(" field `")).map(str::to_string);
    let mut parts: Vec<String> = Vec::new();
    if !header.is_empty() {
        parts.push(header);
    }
    // A missing field is reported at its table; an unknown one or a bad value at its line.
    if !line.starts_with('[')
        && !line.starts_with('#')
        && !msg.contains("missing field")
        && let Some((k, _)) = line.split_once('=')
    {
        let k = k.trim().to_string();
        if field.as_deref() != Some(k.as_str()) {
            parts.push(k);
        }
    }
    if let Some(f) = field {
        parts.push(f);
    }
    (line_no + 1, parts.join("."))
}

fn key_error(
    path: &Path,
    key: &str,
    problem: impl std::fmt::Display,
    fix: impl std::fmt::Display,
) -> anyhow::Error {
    anyhow!("{}: key `{key}`: {problem}. Fix: {fix}", path.display())
}

impl DeployConfig {
    /// Reads and checks a deploy config.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading deploy config {}", path.display()))?;
        Self::parse(&text, path)
    }

    /// Parses and checks `text`; `path` names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        if text.trim().is_empty() {
            bail!(
                "{}: the file is empty. Fix: start from experiments/deploy/host.toml or guest.toml, which document every key",
                path.display()
            );
        }
        let cfg: DeployConfig = toml::from_str(text).map_err(|e| {
            let msg = e.message().trim();
            let fix = if msg.contains("unknown field") {
                "remove the key or correct its spelling (the valid keys are listed above)"
            } else if msg.contains("missing field") {
                "add the key; experiments/deploy/host.toml and guest.toml document every key"
            } else {
                "correct the value; experiments/deploy/host.toml and guest.toml document every key"
            };
            match e.span() {
                Some(span) => {
                    let (line, key) = key_at(text, span.start, msg);
                    anyhow!("{}: line {line}: key `{key}`: {msg}. Fix: {fix}", path.display())
                }
                None => anyhow!("{}: {msg}. Fix: {fix}", path.display()),
            }
        })?;
        cfg.check(path)?;
        Ok(cfg)
    }

    /// The feedback controllers' gains this config sets.
    pub fn gains(&self) -> ControllerGains {
        ControllerGains { trim: self.trim, slo_feedback: self.slo_feedback }
    }

    fn check(&self, path: &Path) -> Result<()> {
        self.gains().check().map_err(|e| {
            anyhow!("{}: {e}. Fix: correct the value, or remove the key to keep its default", path.display())
        })?;
        if !(10..=3_600_000).contains(&self.interval_ms) {
            return Err(key_error(
                path,
                "interval_ms",
                format!("{} ms is out of range", self.interval_ms),
                "use 10 to 3600000 (1000 is a good start)",
            ));
        }
        if self.stale_after_intervals == 0 {
            return Err(key_error(
                path,
                "stale_after_intervals",
                "0 would never trust an observation",
                "use 1 or more (3 is a good start)",
            ));
        }
        if self.fallback.trim().is_empty() {
            return Err(key_error(
                path,
                "fallback",
                "empty",
                "name a baseline such as \"static:mlx5\" or \"per-packet\"",
            ));
        }
        for (kind, l) in [
            ("nic", &self.limits.nic),
            ("backend", &self.limits.backend),
            ("frontend", &self.limits.frontend),
        ] {
            if let Some(l) = l {
                l.check().map_err(|(key, problem, fix)| {
                    key_error(path, &format!("limits.{kind}.{key}"), problem, fix)
                })?;
            }
        }
        if let Some(h) = &self.host {
            let mut names: Vec<&str> = h.vms.iter().map(|v| v.name.as_str()).collect();
            names.sort_unstable();
            if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
                return Err(key_error(
                    path,
                    "host.vms.name",
                    format!("two VMs are named `{}`", w[0]),
                    "give each VM its own name",
                ));
            }
        }
        if let Some(t) = self.latency.timeout_ms
            && t > 60_000
        {
            return Err(key_error(
                path,
                "latency.timeout_ms",
                format!("{t} ms is out of range"),
                "use 1 to 60000 (200 is a good start)",
            ));
        }
        if let Some(dir) = &self.state_dir
            && (dir.as_os_str().is_empty() || !dir.is_absolute())
        {
            return Err(key_error(
                path,
                "state_dir",
                format!("`{}` is not an absolute path", dir.display()),
                "use an absolute directory such as \"/run/moderato\"",
            ));
        }
        self.probe(path)?;
        let vm_keys = self.host.iter().flat_map(|h| {
            h.vms.iter().enumerate().map(|(i, v)| (format!("host.vms[{i}].slo_p99_us"), v.slo_p99_us))
        });
        let guest_key = self.guest.iter().map(|g| ("guest.slo_p99_us".to_string(), g.slo_p99_us));
        for (key, o) in vm_keys.chain(guest_key) {
            if let Some(Objective::P99Us(x)) = o.filter(|o| o.validate(&key).is_err()) {
                return Err(key_error(
                    path,
                    &key,
                    format!("{x} is out of range"),
                    "give a p99 target in microseconds in [1, 1e7], or \"none\" for a VM without a latency objective",
                ));
            }
        }
        if let Some(slo) = &self.slo {
            if !(slo.p99_us.is_finite() && slo.p99_us > 0.0 && slo.p99_us <= 10_000_000.0) {
                return Err(key_error(
                    path,
                    "slo.p99_us",
                    format!("{} is out of range", slo.p99_us),
                    "use a target above 0 and at most 10000000 microseconds (10 s)",
                ));
            }
            if !(1..=10_000).contains(&slo.after_intervals) {
                return Err(key_error(
                    path,
                    "slo.after_intervals",
                    format!("{} is out of range", slo.after_intervals),
                    "use 1 to 10000 (3 is a good start)",
                ));
            }
            if self.latency.source == LatencySource::None {
                return Err(key_error(
                    path,
                    "slo",
                    "the guard needs a latency probe, but `latency.source` is \"none\"",
                    "set latency.source = \"udp-echo\" with a target, or remove the [slo] table",
                ));
            }
        }
        Ok(())
    }

    /// The state directory (`state_dir`, else [`DEFAULT_STATE_DIR`]).
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR))
    }

    /// The latency probe this config asks for.
    pub fn probe(&self, path: &Path) -> Result<Option<ProbeConfig>> {
        let l = &self.latency;
        match l.source {
            LatencySource::None => {
                for (key, set) in [
                    ("target", l.target.is_some()),
                    ("bind", l.bind.is_some()),
                    ("period_ms", l.period_ms.is_some()),
                    ("timeout_ms", l.timeout_ms.is_some()),
                ] {
                    if set {
                        return Err(key_error(
                            path,
                            &format!("latency.{key}"),
                            "is set but `latency.source` is \"none\"",
                            "set source = \"udp-echo\" or remove the key",
                        ));
                    }
                }
                Ok(None)
            }
            LatencySource::UdpEcho => {
                let target = l.target.as_deref().ok_or_else(|| {
                    key_error(
                        path,
                        "latency.target",
                        "missing: source \"udp-echo\" needs a responder",
                        "add target = \"<address>:<port>\" of a UDP echo responder",
                    )
                })?;
                let target: SocketAddr = target.parse().map_err(|_| {
                    key_error(
                        path,
                        "latency.target",
                        format!("`{target}` is not an address:port"),
                        "write it as \"192.0.2.10:7\" or \"[2001:db8::10]:7\"",
                    )
                })?;
                let bind = match l.bind.as_deref() {
                    None => None,
                    Some(b) => Some(b.parse::<SocketAddr>().map_err(|_| {
                        key_error(
                            path,
                            "latency.bind",
                            format!("`{b}` is not an address:port"),
                            "write it as \"192.0.2.1:0\"",
                        )
                    })?),
                };
                let period = l.period_ms.unwrap_or(10);
                let timeout = l.timeout_ms.unwrap_or(200);
                if period == 0 || period > self.interval_ms {
                    return Err(key_error(
                        path,
                        "latency.period_ms",
                        format!("{period} ms"),
                        format!("use 1 to interval_ms ({})", self.interval_ms),
                    ));
                }
                if timeout == 0 {
                    return Err(key_error(
                        path,
                        "latency.timeout_ms",
                        "0 ms",
                        "use a positive timeout (200 is a good start)",
                    ));
                }
                Ok(Some(ProbeConfig {
                    target,
                    bind,
                    period: Duration::from_millis(period),
                    timeout: Duration::from_millis(timeout),
                }))
            }
        }
    }

    /// The role to run: `--role` where given, else the one section the file has.
    pub fn role(&self, given: Option<Role>, path: &Path) -> Result<Role> {
        match (given, &self.host, &self.guest) {
            (Some(r), ..) => Ok(r),
            (None, Some(_), None) => Ok(Role::Host),
            (None, None, Some(_)) => Ok(Role::Guest),
            (None, Some(_), Some(_)) => bail!(
                "{}: has both [host] and [guest]. Fix: pass --role host or --role guest",
                path.display()
            ),
            (None, None, None) => bail!(
                "{}: has neither [host] nor [guest]. Fix: add the section for this side",
                path.display()
            ),
        }
    }

    /// A VM's p99 target: its own objective, else `[slo] p99_us`, else none.
    fn objective(&self, own: Option<Objective>) -> Option<f64> {
        match own {
            Some(o) => o.target_us(),
            None => self.slo.as_ref().map(|s| s.p99_us),
        }
    }

    /// The live host's config for `role`.
    pub fn live_config(&self, role: Role, path: &Path) -> Result<LiveConfig> {
        let iface = |name: &Option<String>, irq: &Vec<String>| {
            name.as_ref().map(|n| InterfaceConfig { name: n.clone(), irq_names: irq.clone() })
        };
        let base = match role {
            Role::Host => {
                let h = self.host.as_ref().ok_or_else(|| {
                    key_error(
                        path,
                        "host",
                        "missing, but --role is host",
                        "add a [host] table with the NIC and the VMs' backends",
                    )
                })?;
                LiveConfig {
                    nic: iface(&h.nic, &h.nic_irq_names),
                    backends: h.vms.iter().map(|v| iface(&v.backend, &v.backend_irq_names)).collect(),
                    objectives: h.vms.iter().map(|v| self.objective(v.slo_p99_us)).collect(),
                    ..LiveConfig::host(None, &[])
                }
            }
            Role::Guest => {
                let g = self.guest.as_ref().ok_or_else(|| {
                    key_error(
                        path,
                        "guest",
                        "missing, but --role is guest",
                        "add a [guest] table with the frontend interface",
                    )
                })?;
                LiveConfig {
                    frontend: iface(&g.frontend, &g.frontend_irq_names),
                    objectives: vec![self.objective(g.slo_p99_us)],
                    ..LiveConfig::guest(None)
                }
            }
        };
        let cfg = LiveConfig {
            interval: Duration::from_millis(self.interval_ms),
            probe: self.probe(path)?,
            cpus: (!self.cpus.is_empty()).then(|| self.cpus.clone()),
            profile: self.profile.unwrap_or_default(),
            ..base
        };
        cfg.validate().map_err(|e| anyhow!("{}: {e}", path.display()))?;
        Ok(cfg)
    }

    /// The safety limits of the layers `role` controls; every one of them must be configured.
    pub fn limits(&self, role: Role, path: &Path) -> Result<Limits> {
        let need = |l: &Option<LayerLimits>, kind: &str| {
            l.clone().ok_or_else(|| {
                key_error(
                    path,
                    &format!("limits.{kind}"),
                    format!("missing, but the {role} side sets {kind} knobs"),
                    format!("add a [limits.{kind}] table (see experiments/deploy/{role}.toml)"),
                )
            })
        };
        let unused = LayerLimits::frozen();
        Ok(match role {
            Role::Host => Limits {
                nic: need(&self.limits.nic, "nic")?,
                backend: need(&self.limits.backend, "backend")?,
                frontend: unused,
            },
            Role::Guest => Limits {
                nic: unused.clone(),
                backend: unused,
                frontend: need(&self.limits.frontend, "frontend")?,
            },
        })
    }

    /// VM names, in VM order (host role), for logs and metrics.
    pub fn vm_names(&self) -> Vec<String> {
        self.host.as_ref().map(|h| h.vms.iter().map(|v| v.name.clone()).collect()).unwrap_or_default()
    }
}

impl LayerLimits {
    /// Limits for a layer this side does not set (never used to apply anything).
    fn frozen() -> Self {
        let r = Range { min: 0, max: 0 };
        LayerLimits {
            rx_usecs: r,
            rx_frames: r,
            tx_usecs: r,
            tx_frames: r,
            max_change_usecs: 1,
            max_change_frames: 1,
            allow_adaptive: false,
        }
    }

    /// `(key, problem, fix)` of the first bad value.
    fn check(&self) -> std::result::Result<(), (String, String, String)> {
        for (key, r) in [
            ("rx_usecs", self.rx_usecs),
            ("rx_frames", self.rx_frames),
            ("tx_usecs", self.tx_usecs),
            ("tx_frames", self.tx_frames),
        ] {
            if r.min > r.max {
                return Err((
                    key.into(),
                    format!("min {} is above max {}", r.min, r.max),
                    "set min <= max".into(),
                ));
            }
        }
        for (key, v) in
            [("max_change_usecs", self.max_change_usecs), ("max_change_frames", self.max_change_frames)]
        {
            if v == 0 {
                return Err((key.into(), "0 would freeze the knob".into(), "use 1 or more".into()));
            }
        }
        Ok(())
    }
}
