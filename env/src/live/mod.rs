//! The live host: the same [`Env`](crate::Env) seam as the simulator, driven by a real Linux
//! kernel, so a policy trained in simulation acts here unchanged.
//!
//! [`HostEnv`] plays one side of a virtualized host ([`Role`]):
//! - **host** (the hypervisor): the physical NIC and one backend interface per VM (`vnet0`/tap
//!   for KVM, `vif1.0` for Xen). `spec.vms` is the number of backends; the observation's `guests`
//!   are defaults, since the host cannot read the guests' counters.
//! - **guest**: one frontend interface (virtio-net, netfront). `spec.vms` is 1 and
//!   `host.backends` holds one default entry.
//!
//! Any layer's interface may be absent from the config; its observation is then all zeros with no
//! interrupt rate and no knobs.
//!
//! ## Where the numbers come from
//! - packets, bytes and drops: `/sys/class/net/<if>/statistics/` ([`counters`]); a counter that
//!   goes backwards is a reset (the rate counts from zero), a 32-bit counter that wraps is unwrapped;
//! - notifications: the interface's lines in `/proc/interrupts` ([`interrupts`]), found through the
//!   device's `msi_irqs` or by queue names (`eth0-TxRx-0`, `virtio2-input.0`,
//!   `mlx5_comp0@pci:...`, `eth0-q0-tx`), summed over CPUs;
//! - CPU: `/proc/stat` through the `procfs` crate ([`cpu`]);
//! - latency: an optional UDP echo probe ([`probe`]);
//! - knobs: read back and set through ethtool netlink ([`coalesce`], with the [`Coalescer`] trait
//!   so that tests and the deploy loop can run against a fake);
//! - NAPI deferral (`napi_defer_hard_irqs`, `gro_flush_timeout`): read back and set through the
//!   per-device sysfs files and, per NAPI instance, netdev netlink's `napi-get`/`napi-set`
//!   ([`napi`] with [`NetlinkNapi`], the [`NapiControl`] trait and the [`MemoryNapi`] fake;
//!   [`netdev`]). It is not part of the observation; the deploy loop sets it for policies that ask
//!   ([`HostEnv::apply_napi`]).
//!
//! Rates are per second over the measured wall-clock interval, in the units that
//! [`InterfaceObs`](crate::InterfaceObs), [`CpuObs`](crate::CpuObs) and
//! [`ProbeObs`](crate::ProbeObs) document. A live host has no ground truth: `Info.truth` is
//! `None` and the reward is 0. Problems the host survives (an interface that vanished, a read that
//! failed, a driver that refuses coalescing) go to `Info.warnings`; nothing here panics on them.
//!
//! ## Direction of a backend layer
//! A backend interface sits on the host with the guest behind it, so what the host *transmits* on
//! it goes *towards* the guest. The project's direction is the VM's ("rx: towards the guest"), so a
//! backend layer swaps the interface's rx and tx counters and knobs (its interrupt lines, Xen
//! netback's `vifD.N-qM-tx/rx`, are already named from the guest's side). A tap's
//! only knob, ethtool `rx-frames` (tun's `rx_batched`: packets from the guest batched before the
//! host stack takes them), is therefore the backend's `tx` frames; see `docs/deploy.md`.

pub mod coalesce;
pub mod counters;
pub mod cpu;
mod host;
pub mod interrupts;
pub mod napi;
pub mod netdev;
pub mod probe;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use coalesce::{CoalesceError, CoalesceParams, Coalescer, NetlinkCoalescer};
pub use host::{
    Control, Detected, HostEnv, InterfaceReport, LayerStatus, LiveSample, Original, RestoreFailure,
    profile_differences, restore_original, restore_original_with,
};
pub use napi::{InstanceNapi, MemoryNapi, NapiControl, NapiError, NapiParams, NetlinkNapi, SysfsNapi};
pub use probe::{ProbeConfig, UdpProbe, serve_udp_echo};

use crate::env::EnvError;
use crate::settings::ActionSpace;

/// Which side of a virtualized host this process runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The hypervisor: the physical NIC and the VMs' backend interfaces.
    Host,
    /// Inside a VM: its frontend interface.
    Guest,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Host => "host",
            Role::Guest => "guest",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One interface that plays a layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceConfig {
    /// The interface name, e.g. `eth0`, `vnet3`, `vif2.0`.
    pub name: String,
    /// Substrings of `/proc/interrupts` handler names that are this interface's queues. Empty:
    /// found automatically (msi_irqs, then queue names); set it where that finds nothing.
    pub irq_names: Vec<String>,
}

impl InterfaceConfig {
    pub fn new(name: impl Into<String>) -> Self {
        InterfaceConfig { name: name.into(), irq_names: Vec::new() }
    }
}

/// Everything [`HostEnv`] needs to know about this host.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveConfig {
    pub role: Role,
    /// Host role: the physical NIC (layer 1).
    pub nic: Option<InterfaceConfig>,
    /// Host role: one entry per VM, in VM order; `None` where a VM's backend interface is absent.
    pub backends: Vec<Option<InterfaceConfig>>,
    /// Guest role: the frontend interface.
    pub frontend: Option<InterfaceConfig>,
    /// Length of one control interval.
    pub interval: Duration,
    /// Latency probe; `None` leaves `probe` empty in every observation.
    pub probe: Option<ProbeConfig>,
    /// CPUs (by number) whose time enters [`CpuObs`](crate::CpuObs); `None`: every online CPU.
    pub cpus: Option<Vec<u32>>,
    /// Bounds used to encode knobs in features (and reported in the spec).
    pub action_space: ActionSpace,
    /// Where sysfs is mounted (`/sys`); tests point it at a fixture tree.
    pub sysfs_root: PathBuf,
    /// Where procfs is mounted (`/proc`); tests point it at fixtures.
    pub procfs_root: PathBuf,
    /// Each VM's p99 target (µs) in VM order, `None` for a VM without a latency objective (one
    /// entry for the guest role); empty: no VM has one. Operator intent: it enters the
    /// observation as configured.
    pub objectives: Vec<Option<f64>>,
    /// The host's moderation mechanisms; it enters the observation as configured.
    pub profile: crate::HostProfile,
}

impl LiveConfig {
    fn base(role: Role) -> Self {
        LiveConfig {
            role,
            nic: None,
            backends: Vec::new(),
            frontend: None,
            interval: Duration::from_secs(1),
            probe: None,
            cpus: None,
            action_space: ActionSpace::default(),
            sysfs_root: PathBuf::from("/sys"),
            procfs_root: PathBuf::from("/proc"),
            objectives: Vec::new(),
            profile: crate::HostProfile::default(),
        }
    }

    /// A hypervisor with an optional NIC and one backend interface per VM.
    pub fn host(nic: Option<&str>, backends: &[&str]) -> Self {
        LiveConfig {
            nic: nic.map(InterfaceConfig::new),
            backends: backends.iter().map(|b| Some(InterfaceConfig::new(*b))).collect(),
            ..Self::base(Role::Host)
        }
    }

    /// A guest with an optional frontend interface.
    pub fn guest(frontend: Option<&str>) -> Self {
        LiveConfig { frontend: frontend.map(InterfaceConfig::new), ..Self::base(Role::Guest) }
    }

    /// Number of VMs the environment's spec and actions have.
    pub fn vms(&self) -> usize {
        match self.role {
            Role::Host => self.backends.len(),
            Role::Guest => 1,
        }
    }

    /// VM `vm`'s p99 target, µs.
    pub fn objective(&self, vm: usize) -> Option<f64> {
        self.objectives.get(vm).copied().flatten()
    }

    /// Checks that the interfaces fit the role and the interval is usable.
    pub fn validate(&self) -> Result<(), LiveError> {
        let bad = |m: String| Err(LiveError::Config(m));
        if self.objectives.len() > self.vms() {
            return bad(format!(
                "{} latency objectives for {} VMs: give one per VM, in VM order",
                self.objectives.len(),
                self.vms()
            ));
        }
        match self.role {
            Role::Host if self.frontend.is_some() => {
                return bad("a frontend interface is set, but the role is host: frontends are controlled \
                            from inside the guest (role guest)"
                    .into());
            }
            Role::Guest if self.nic.is_some() || !self.backends.is_empty() => {
                return bad(
                    "a NIC or backend interface is set, but the role is guest: those are controlled \
                            on the hypervisor (role host)"
                        .into(),
                );
            }
            _ => {}
        }
        if self.interval < Duration::from_millis(1) {
            return bad(format!("interval {:?} is shorter than 1 ms", self.interval));
        }
        let mut names: Vec<&str> = self.interfaces().map(|(_, i)| i.name.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return bad(format!("interface `{}` plays two layers; each layer needs its own interface", w[0]));
        }
        for (_, i) in self.interfaces() {
            if i.name.is_empty()
                || i.name.len() > 15
                || i.name.contains('/')
                || i.name.contains(char::is_whitespace)
            {
                return bad(format!(
                    "`{}` is not a Linux interface name (1 to 15 characters, no `/`)",
                    i.name
                ));
            }
        }
        Ok(())
    }

    /// The configured interfaces of this side with the layer each plays.
    pub fn interfaces(&self) -> impl Iterator<Item = (crate::LayerId, &InterfaceConfig)> {
        use crate::LayerId;
        let nic = self.nic.iter().map(|i| (LayerId::Nic, i));
        let backends = self
            .backends
            .iter()
            .enumerate()
            .filter_map(|(v, b)| b.as_ref().map(|b| (LayerId::Backend(v), b)));
        let frontend = self.frontend.iter().map(|i| (LayerId::Frontend(0), i));
        nic.chain(backends).chain(frontend)
    }
}

/// Errors of the live host. Each carries the input that caused it.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}, line {line}: {message}: `{text}`")]
    Parse { path: PathBuf, line: usize, message: String, text: String },
    #[error("{path}: {message}")]
    Proc { path: PathBuf, message: String },
    #[error("live config: {0}")]
    Config(String),
    #[error("latency probe to {target}: {source}")]
    Probe { target: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Coalesce(#[from] CoalesceError),
}

impl From<LiveError> for EnvError {
    fn from(e: LiveError) -> Self {
        match e {
            LiveError::Config(m) => EnvError::Live(format!("live config: {m}")),
            other => EnvError::Live(other.to_string()),
        }
    }
}
