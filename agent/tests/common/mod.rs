//! Helpers shared by the deploy tests: a fake virtio-net `Coalescer` on a copy of the virtio guest
//! fixture tree ([`Rig`]), scripted policies, the loop's limits and options, and a log sink. The
//! fixture and network-namespace helpers are moderato-env's own test helpers, compiled here by path
//! ([`live`]) so that one copy of them exists.

// Every test binary compiles its own copy of these helpers and uses only some of them.
#![allow(dead_code)]

#[path = "../../../env/tests/common/mod.rs"]
pub mod live;
pub mod process;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moderato_agent::deploy::{DeployLoop, LayerLimits, Limits, LoopOptions, Metrics, Range};
use moderato_env::live::{CoalesceError, CoalesceParams, Coalescer, HostEnv, LiveConfig, ProbeConfig};
use moderato_env::{CoalescingSettings, LayerSettings, Moderation, Observation};
use moderato_policies::{Policy, Requirements};

use live::{copy_fixture, copy_tree, fixture};

/// The fake driver's settings before the loop changes anything.
pub const ORIGINAL: CoalesceParams = live::VIRTIO_DEFAULT;

/// A fake virtio-net driver: one interface, every knob but adaptive-tx, each set recorded.
#[derive(Debug, Clone)]
pub struct FakeNic {
    pub state: Arc<Mutex<CoalesceParams>>,
    pub sets: Arc<Mutex<Vec<CoalesceParams>>>,
}

impl FakeNic {
    pub fn new() -> Self {
        FakeNic { state: Arc::new(Mutex::new(ORIGINAL)), sets: Arc::default() }
    }
}

impl Coalescer for FakeNic {
    fn get(&mut self, ifname: &str) -> Result<CoalesceParams, CoalesceError> {
        assert_eq!(ifname, "eth0");
        Ok(*self.state.lock().unwrap())
    }
    fn set(&mut self, ifname: &str, p: &CoalesceParams) -> Result<(), CoalesceError> {
        assert_eq!(ifname, "eth0");
        self.sets.lock().unwrap().push(*p);
        let mut s = self.state.lock().unwrap();
        *s = s.updated(p);
        Ok(())
    }
}

pub type Script = Box<dyn FnMut(u64, &Observation) -> CoalescingSettings + Send>;

/// A policy run by a closure of (call number from 1, observation).
pub struct Scripted {
    pub name: String,
    pub calls: u64,
    pub script: Script,
    pub req: Requirements,
}

impl Scripted {
    pub fn new(
        name: &str,
        script: impl FnMut(u64, &Observation) -> CoalescingSettings + Send + 'static,
    ) -> Box<Self> {
        Box::new(Scripted {
            name: name.into(),
            calls: 0,
            script: Box::new(script),
            req: Requirements::default(),
        })
    }

    pub fn fixed(name: &str, s: CoalescingSettings) -> Box<Self> {
        Self::new(name, move |_, _| s.clone())
    }
}

impl Policy for Scripted {
    fn name(&self) -> &str {
        &self.name
    }
    fn act(&mut self, obs: &Observation) -> CoalescingSettings {
        self.calls += 1;
        (self.script)(self.calls, obs)
    }
    fn requirements(&self) -> Requirements {
        self.req.clone()
    }
}

/// Per-packet settings for one VM but its frontend's.
pub fn frontend(rx: Moderation, tx: Moderation) -> CoalescingSettings {
    let mut s = CoalescingSettings::per_packet(1);
    s.vms[0].frontend = LayerSettings { rx, tx, napi: Default::default() };
    s
}

/// A guest-side `HostEnv` on a copy of the virtio guest fixtures, its `eth0` on a [`FakeNic`].
pub struct Rig {
    _dir: tempfile::TempDir,
    pub sys: PathBuf,
    pub nic: FakeNic,
    pub env: Option<HostEnv>,
}

impl Rig {
    pub fn new() -> Rig {
        Rig::with_probe(None)
    }

    /// The rig with a latency probe (e.g. to an echo responder on loopback).
    pub fn with_probe(probe: Option<ProbeConfig>) -> Rig {
        Rig::with(probe, moderato_env::HostProfile::default())
    }

    /// The rig configured as a host of `profile`, with `probe`.
    #[allow(dead_code)]
    pub fn with(probe: Option<ProbeConfig>, profile: moderato_env::HostProfile) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().join("sys");
        let proc_ = dir.path().join("proc");
        copy_fixture(&fixture("sysfs-guest-virtio"), &sys);
        copy_tree(&fixture("proc-guest-virtio"), &proc_);
        let cfg = LiveConfig {
            sysfs_root: sys.clone(),
            procfs_root: proc_,
            interval: Duration::from_millis(15),
            probe,
            profile,
            ..LiveConfig::guest(Some("eth0"))
        };
        let nic = FakeNic::new();
        let env = HostEnv::new(cfg, Box::new(nic.clone())).unwrap();
        Rig { _dir: dir, sys, nic, env: Some(env) }
    }

    pub fn link(&self) -> PathBuf {
        self.sys.join("class/net/eth0")
    }

    pub fn sets(&self) -> Vec<CoalesceParams> {
        self.nic.sets.lock().unwrap().clone()
    }

    pub fn state(&self) -> CoalesceParams {
        *self.nic.state.lock().unwrap()
    }
}

/// The same limits on every layer: 0–100 µs, 1–64 frames, at most 16 µs / 8 frames of change a
/// step, no adaptive modes.
pub fn limits() -> Limits {
    let frontend = LayerLimits {
        rx_usecs: Range { min: 0, max: 100 },
        rx_frames: Range { min: 1, max: 64 },
        tx_usecs: Range { min: 0, max: 100 },
        tx_frames: Range { min: 1, max: 64 },
        max_change_usecs: 16,
        max_change_frames: 8,
        allow_adaptive: false,
    };
    Limits { nic: frontend.clone(), backend: frontend.clone(), frontend }
}

pub fn opts(steps: Option<u64>) -> LoopOptions {
    LoopOptions { dry_run: false, max_steps: steps, stale_after: 2, ..LoopOptions::default() }
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// The loop on the rig's environment with [`limits`].
pub fn make(
    rig: &mut Rig,
    primary: Box<dyn Policy>,
    fallback: Box<dyn Policy>,
    o: LoopOptions,
) -> DeployLoop {
    let metrics = Metrics::new(o.dry_run);
    DeployLoop::new(rig.env.take().unwrap(), primary, fallback, limits(), o, metrics).unwrap()
}

/// A log sink that keeps what the subscriber writes.
#[derive(Clone, Default)]
pub struct Buf(pub Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A host-side deploy config in `dir` for a netns lab: its veth end as the NIC (observe-only), its
/// tap as vm0's backend (bounds that let the tap's rx-frames climb 8, 16, 24), 100 ms intervals,
/// `fallback`, the state directory `dir/state`, and the `[latency]` section's body `latency`.
pub fn lab_host_config(
    lab: &live::netns::Lab,
    dir: &std::path::Path,
    fallback: &str,
    latency: &str,
) -> PathBuf {
    let text = format!(
        r#"interval_ms = 100
fallback = "{fallback}"
stale_after_intervals = 3
state_dir = "{state}"
[host]
nic = "{a}"
[[host.vms]]
name = "vm0"
backend = "{tap}"
[limits.nic]
rx_usecs = {{ min = 0, max = 256 }}
rx_frames = {{ min = 0, max = 256 }}
tx_usecs = {{ min = 0, max = 256 }}
tx_frames = {{ min = 0, max = 256 }}
max_change_usecs = 32
max_change_frames = 32
allow_adaptive = false
[limits.backend]
rx_usecs = {{ min = 0, max = 64 }}
rx_frames = {{ min = 0, max = 64 }}
tx_usecs = {{ min = 0, max = 64 }}
tx_frames = {{ min = 0, max = 24 }}
max_change_usecs = 8
max_change_frames = 8
allow_adaptive = false
[latency]
{latency}
"#,
        a = lab.a,
        tap = lab.tap,
        state = dir.join("state").display()
    );
    let path = dir.join("deploy.toml");
    std::fs::write(&path, text).unwrap();
    path
}
