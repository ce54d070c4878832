//! The deploy loop against a fake `Coalescer` and a copy of the virtio guest fixture tree (from
//! `env/tests/fixtures/live`): limits, fallback, restoration on every exit, dry run, refusal of
//! policies, metrics and logs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moderato_agent::deploy::{
    self, DeployLoop, LayerLimits, Limits, LoopOptions, Metrics, Range, StopReason,
};
use moderato_env::live::{CoalesceError, CoalesceParams, Coalescer, HostEnv, LiveConfig};
use moderato_env::{Adaptive, CoalescingSettings, Knobs, LayerSettings, Moderation, Observation};
use moderato_policies::{Policy, Requirements};
use tokio::sync::watch;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../env/tests/fixtures/live").join(rel)
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let ft = e.file_type().unwrap();
        if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src).unwrap(), &dst).unwrap();
        } else if ft.is_dir() {
            copy_tree(&src, &dst);
        } else {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}

/// Copies a fixture tree and creates the symlinks its `links.txt` lists (the fixtures store
/// sysfs's links as a list: real sysfs loops through `device/net/<if>/device`).
fn copy_fixture(from: &Path, to: &Path) {
    copy_tree(from, to);
    if let Ok(text) = std::fs::read_to_string(from.join("links.txt")) {
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
            let (path, target) = line.split_once(" -> ").unwrap();
            let at = to.join(path);
            std::fs::create_dir_all(at.parent().unwrap()).unwrap();
            std::os::unix::fs::symlink(target, at).unwrap();
        }
    }
}

/// A fake virtio-net driver: one interface, every knob but adaptive-tx, each set recorded.
#[derive(Debug, Clone)]
struct FakeNic {
    state: Arc<Mutex<CoalesceParams>>,
    sets: Arc<Mutex<Vec<CoalesceParams>>>,
}

const ORIGINAL: CoalesceParams = CoalesceParams {
    rx_usecs: Some(0),
    rx_frames: Some(1),
    tx_usecs: Some(0),
    tx_frames: Some(1),
    adaptive_rx: Some(false),
    adaptive_tx: None,
};

impl FakeNic {
    fn new() -> Self {
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

type Script = Box<dyn FnMut(u64, &Observation) -> CoalescingSettings + Send>;

/// A policy run by a closure of (call number from 1, observation).
struct Scripted {
    name: String,
    calls: u64,
    script: Script,
    req: Requirements,
}

impl Scripted {
    fn new(
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

    fn fixed(name: &str, s: CoalescingSettings) -> Box<Self> {
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

fn frontend(rx: Moderation, tx: Moderation) -> CoalescingSettings {
    let mut s = CoalescingSettings::per_packet(1);
    s.vms[0].frontend = LayerSettings { rx, tx };
    s
}

struct Rig {
    _dir: tempfile::TempDir,
    sys: PathBuf,
    nic: FakeNic,
    env: Option<HostEnv>,
}

impl Rig {
    fn new() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().join("sys");
        let proc_ = dir.path().join("proc");
        copy_fixture(&fixture("sysfs-guest-virtio"), &sys);
        copy_tree(&fixture("proc-guest-virtio"), &proc_);
        let cfg = LiveConfig {
            sysfs_root: sys.clone(),
            procfs_root: proc_,
            interval: Duration::from_millis(15),
            ..LiveConfig::guest(Some("eth0"))
        };
        let nic = FakeNic::new();
        let env = HostEnv::new(cfg, Box::new(nic.clone())).unwrap();
        Rig { _dir: dir, sys, nic, env: Some(env) }
    }

    fn link(&self) -> PathBuf {
        self.sys.join("class/net/eth0")
    }

    fn sets(&self) -> Vec<CoalesceParams> {
        self.nic.sets.lock().unwrap().clone()
    }

    fn state(&self) -> CoalesceParams {
        *self.nic.state.lock().unwrap()
    }
}

fn limits() -> Limits {
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

fn opts(steps: Option<u64>) -> LoopOptions {
    LoopOptions { dry_run: false, max_steps: steps, stale_after: 2, vm_names: Vec::new() }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn make(rig: &mut Rig, primary: Box<dyn Policy>, fallback: Box<dyn Policy>, o: LoopOptions) -> DeployLoop {
    let metrics = Metrics::new(o.dry_run);
    DeployLoop::new(rig.env.take().unwrap(), primary, fallback, limits(), o, metrics).unwrap()
}

#[test]
fn decisions_are_clamped_to_the_bounds_and_move_at_most_the_max_change_per_step() {
    let mut rig = Rig::new();
    // Far outside the bounds on rx; adaptive (refused by allow_adaptive = false) on tx.
    let primary = Scripted::fixed(
        "greedy",
        frontend(Moderation::fixed(1000, 256), Moderation::Adaptive(Adaptive::Dim)),
    );
    let lp = make(
        &mut rig,
        primary,
        Scripted::fixed("fallback", CoalescingSettings::per_packet(1)),
        opts(Some(9)),
    );
    let (_tx, rx) = watch::channel(false);
    let summary = rt().block_on(lp.run(rx)).unwrap();
    assert_eq!(summary.stop, StopReason::Steps);
    assert_eq!(summary.decisions, 9);
    let sets = rig.sets();
    let rx_usecs: Vec<u32> = sets.iter().filter_map(|p| p.rx_usecs).collect();
    let rx_frames: Vec<u32> = sets.iter().filter_map(|p| p.rx_frames).collect();
    // 0 → 100 in steps of at most 16, then held at the bound; 1 → 64 in steps of 8.
    assert_eq!(rx_usecs[..7], [16, 32, 48, 64, 80, 96, 100]);
    assert_eq!(rx_frames[..8], [9, 17, 25, 33, 41, 49, 57, 64]);
    // tx kept its original fixed knobs and never went adaptive.
    assert!(sets.iter().all(|p| p.tx_usecs.is_none() && p.tx_frames.is_none() && p.adaptive_tx.is_none()));
    let last = summary.last.unwrap();
    assert_eq!(last.vms[0].frontend.rx, Moderation::fixed(100, 64));
    assert_eq!(last.vms[0].frontend.tx, Moderation::fixed(0, 1));
    // Back to the originals at exit.
    assert_eq!(summary.restored, 1);
    assert_eq!(rig.state(), ORIGINAL);
}

#[test]
fn stale_observations_hand_over_to_the_fallback_and_back() {
    let mut rig = Rig::new();
    let link = rig.link();
    let target = std::fs::read_link(&link).unwrap();
    let gone = link.clone();
    // The primary removes the interface after its second decision; the fallback brings it back
    // after its second.
    let primary = Scripted::new("learned", move |n, _| {
        if n == 2 {
            std::fs::remove_file(&gone).unwrap();
        }
        frontend(Moderation::fixed(16, 8), Moderation::fixed(16, 8))
    });
    let back = link.clone();
    let fallback = Scripted::new("static:8/4", move |n, _| {
        if n == 2 {
            std::os::unix::fs::symlink(&target, &back).unwrap();
        }
        frontend(Moderation::fixed(8, 4), Moderation::fixed(8, 4))
    });
    let o = opts(Some(10));
    let metrics = Metrics::new(false);
    let lp =
        DeployLoop::new(rig.env.take().unwrap(), primary, fallback, limits(), o, metrics.clone()).unwrap();
    let (_tx, rx) = watch::channel(false);
    let s = rt().block_on(lp.run(rx)).unwrap();
    // Samples 3 and 4 are incomplete (gone), so the fallback takes over at 4 (stale_after = 2);
    // 5 is still gone, 6 sees it back without a baseline, 7 is complete and the primary returns.
    assert_eq!(s.fallbacks, 1);
    assert_eq!(s.fallback_decisions, 3);
    assert_eq!(s.decisions, 10);
    assert_eq!(s.last.unwrap().vms[0].frontend.rx, Moderation::fixed(16, 8));
    let text = metrics.render();
    assert!(text.contains("moderato_decisions_total{policy=\"static:8/4\"} 3"), "{text}");
    assert!(text.contains("moderato_decisions_total{policy=\"learned\"} 7"), "{text}");
    assert!(text.contains("moderato_fallbacks_total 1"), "{text}");
    assert!(text.contains("moderato_fallback_active 0"), "{text}");
    assert!(text.contains("moderato_incomplete_observations_total 4"), "{text}");
}

#[test]
fn the_originals_are_restored_when_the_shutdown_signal_arrives() {
    let mut rig = Rig::new();
    let primary = Scripted::fixed("steady", frontend(Moderation::fixed(40, 16), Moderation::fixed(40, 16)));
    let lp = make(&mut rig, primary, Scripted::fixed("fb", CoalescingSettings::per_packet(1)), opts(None));
    let (tx, rx) = watch::channel(false);
    let sets = rig.nic.sets.clone();
    let summary = rt().block_on(async move {
        // The same path SIGINT/SIGTERM take in `run_deploy`, once the loop has changed knobs
        // three times.
        tokio::spawn(async move {
            while sets.lock().unwrap().len() < 3 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            tx.send(true).unwrap();
            // Keep the sender alive until the loop has seen it.
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        lp.run(rx).await
    });
    let summary = summary.unwrap();
    assert_eq!(summary.stop, StopReason::Shutdown);
    assert!(summary.decisions >= 3, "{summary:?}");
    assert!(!rig.sets().is_empty(), "the loop changed the knobs");
    assert_eq!(summary.restored, 1);
    assert_eq!(rig.state(), ORIGINAL);
}

#[test]
fn the_originals_are_restored_when_the_loop_fails() {
    let mut rig = Rig::new();
    // A policy that answers for the wrong number of VMs at its third decision.
    let primary = Scripted::new("broken", |n, _| {
        if n == 3 {
            CoalescingSettings::per_packet(2)
        } else {
            frontend(Moderation::fixed(64, 32), Moderation::fixed(64, 32))
        }
    });
    let lp = make(&mut rig, primary, Scripted::fixed("fb", CoalescingSettings::per_packet(1)), opts(None));
    let (_tx, rx) = watch::channel(false);
    let e = rt().block_on(lp.run(rx)).unwrap_err().to_string();
    assert!(e.contains("policy `broken` decided settings for 2 VMs, but this guest side has 1"), "{e}");
    assert!(!rig.sets().is_empty());
    assert_eq!(rig.state(), ORIGINAL);
}

#[test]
fn the_originals_are_restored_when_a_policy_panics() {
    let mut rig = Rig::new();
    let primary = Scripted::new("panicky", |n, _| {
        assert!(n < 3, "policy bug");
        frontend(Moderation::fixed(64, 32), Moderation::fixed(64, 32))
    });
    let lp = make(&mut rig, primary, Scripted::fixed("fb", CoalescingSettings::per_packet(1)), opts(None));
    let (_tx, rx) = watch::channel(false);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rt().block_on(lp.run(rx))));
    assert!(r.is_err());
    assert!(!rig.sets().is_empty());
    assert_eq!(rig.state(), ORIGINAL, "the Drop guard restored them during unwinding");
}

#[test]
fn a_dry_run_decides_and_logs_but_applies_nothing() {
    let mut rig = Rig::new();
    let primary = Scripted::fixed("steady", frontend(Moderation::fixed(40, 16), Moderation::fixed(40, 16)));
    let o = LoopOptions { dry_run: true, ..opts(Some(5)) };
    let lp = make(&mut rig, primary, Scripted::fixed("fb", CoalescingSettings::per_packet(1)), o);
    let (_tx, rx) = watch::channel(false);
    let s = rt().block_on(lp.run(rx)).unwrap();
    assert_eq!(s.decisions, 5);
    // What it would have set, with the limits applied.
    assert_eq!(s.last.unwrap().vms[0].frontend.rx, Moderation::fixed(40, 16));
    assert!(rig.sets().is_empty());
    assert_eq!(s.restored, 0);
    assert_eq!(rig.state(), ORIGINAL);
}

#[test]
fn a_policy_that_reads_what_this_side_cannot_provide_is_refused_at_start() {
    let mut rig = Rig::new();
    let mut primary = Scripted::fixed("learned", CoalescingSettings::per_packet(1));
    primary.req = Requirements {
        host: vec!["host.probe_p99_ln".into()],
        guest: vec!["frontend.rx_kpps_ln".into(), "guest.probe_p99_ln".into(), "guest.bogus".into()],
    };
    let e = DeployLoop::new(
        rig.env.take().unwrap(),
        primary,
        Scripted::fixed("fb", CoalescingSettings::per_packet(1)),
        limits(),
        opts(None),
        Metrics::new(false),
    )
    .unwrap_err()
    .to_string();
    assert!(e.starts_with("refusing the deployed policy `learned`"), "{e}");
    assert!(e.contains("`guest.probe_p99_ln`: no latency probe is configured"), "{e}");
    assert!(e.contains("`guest.bogus` is not a feature moderato knows"), "{e}");
    assert!(!e.contains("frontend.rx_kpps_ln"), "{e}");
    // Host-side features are the host deployment's business.
    assert!(!e.contains("host.probe_p99_ln"), "{e}");
    assert!(rig.sets().is_empty());
}

#[test]
fn metrics_are_served_over_http() {
    let mut rig = Rig::new();
    let primary = Scripted::fixed("steady", frontend(Moderation::fixed(40, 16), Moderation::fixed(40, 16)));
    let metrics = Metrics::new(false);
    let lp = DeployLoop::new(
        rig.env.take().unwrap(),
        primary,
        Scripted::fixed("fb", CoalescingSettings::per_packet(1)),
        limits(),
        opts(Some(4)),
        metrics.clone(),
    )
    .unwrap();
    let body = rt().block_on(async move {
        let listener = deploy::metrics::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(deploy::metrics::serve(listener, metrics));
        let (_tx, rx) = watch::channel(false);
        lp.run(rx).await.unwrap();
        let get = |path: &'static str| {
            tokio::task::spawn_blocking(move || {
                use std::io::{Read, Write};
                let mut s = std::net::TcpStream::connect(addr).unwrap();
                write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
                let mut out = String::new();
                s.read_to_string(&mut out).unwrap();
                out
            })
        };
        let missing = get("/nope").await.unwrap();
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        get("/metrics").await.unwrap()
    });
    assert!(body.starts_with("HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4"), "{body}");
    for want in [
        "moderato_decisions_total{policy=\"steady\"} 4",
        "moderato_knob{layer=\"vm0.frontend\",interface=\"eth0\",knob=\"rx_usecs\"} 40",
        "moderato_decided_knob{layer=\"vm0.frontend\",interface=\"eth0\",knob=\"rx_frames\"} 16",
        "moderato_observe_only{layer=\"vm0.frontend\",interface=\"eth0\"} 0",
        "moderato_fallback_active 0",
        "moderato_dry_run 0",
        "# TYPE moderato_observation_age_seconds gauge",
        "moderato_errors_total 0",
    ] {
        assert!(body.contains(want), "{want} missing from\n{body}");
    }
}

#[test]
fn limits_apply_only_to_this_sides_layers() {
    let l = limits();
    let mut want =
        CoalescingSettings::uniform(1, LayerSettings::fixed(Knobs::new(900, 200), Knobs::new(900, 200)));
    want.vms[0].frontend.rx = Moderation::Adaptive(Adaptive::Dim);
    let prev = BTreeMap::new();
    let (out, notes) = l.apply(&want, &prev, &[moderato_env::LayerId::Frontend(0)]);
    // No previous decision: only the bounds; adaptive refused and no previous to keep.
    assert_eq!(out.vms[0].frontend.tx, Moderation::fixed(100, 64));
    assert_eq!(out.vms[0].frontend.rx, Moderation::fixed(0, 1));
    assert_eq!(out.nic, want.nic, "the NIC is the host's to set");
    assert_eq!(notes.len(), 2, "{notes:?}");
}

#[test]
fn an_interface_that_appears_after_start_is_restored_too() {
    let mut rig = Rig::new();
    let link = rig.link();
    let target = std::fs::read_link(&link).unwrap();
    std::fs::remove_file(&link).unwrap();
    let back = link.clone();
    let primary = Scripted::new("steady", move |n, _| {
        if n == 1 {
            std::os::unix::fs::symlink(&target, &back).unwrap();
        }
        frontend(Moderation::fixed(40, 16), Moderation::fixed(40, 16))
    });
    let lp = make(&mut rig, primary, Scripted::fixed("fb", CoalescingSettings::per_packet(1)), opts(Some(6)));
    let (_tx, rx) = watch::channel(false);
    let s = rt().block_on(lp.run(rx)).unwrap();
    assert!(!rig.sets().is_empty(), "it was set once it appeared");
    // The first set moved from the settings read when it appeared, within the step limit.
    assert_eq!(rig.sets()[0].rx_usecs, Some(16));
    assert_eq!(s.restored, 1);
    assert_eq!(rig.state(), ORIGINAL);
}
