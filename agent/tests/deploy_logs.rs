//! Decision logs, human and JSON, captured from the deploy loop on a fake `Coalescer` and a copy of
//! the virtio guest fixture tree.
//!
//! One test in its own binary, formats in turn: tracing caches per-callsite interest globally, and
//! a test thread without a subscriber that hits a callsite while another thread installs a scoped
//! one can leave that callsite disabled for it (a harness artefact; the binary sets one global
//! subscriber).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moderato_agent::deploy::{self, DeployLoop, LayerLimits, Limits, LogFormat, LoopOptions, Metrics, Range};
use moderato_env::live::{CoalesceError, CoalesceParams, Coalescer, HostEnv, LiveConfig};
use moderato_env::{CoalescingSettings, LayerSettings, Moderation, Observation};
use moderato_policies::Policy;
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

#[derive(Debug, Clone)]
struct FakeNic(Arc<Mutex<CoalesceParams>>);

impl Coalescer for FakeNic {
    fn get(&mut self, _: &str) -> Result<CoalesceParams, CoalesceError> {
        Ok(*self.0.lock().unwrap())
    }
    fn set(&mut self, _: &str, p: &CoalesceParams) -> Result<(), CoalesceError> {
        let mut s = self.0.lock().unwrap();
        *s = s.updated(p);
        Ok(())
    }
}

struct Steady(CoalescingSettings);

impl Policy for Steady {
    fn name(&self) -> &str {
        "steady"
    }
    fn act(&mut self, _: &Observation) -> CoalescingSettings {
        self.0.clone()
    }
}

#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn run_logged(format: LogFormat) -> String {
    let buf = Buf::default();
    let b2 = buf.clone();
    let _guard = tracing::subscriber::set_default(deploy::subscriber(format, false, move || b2.clone()));
    let dir = tempfile::tempdir().unwrap();
    let (sys, proc_) = (dir.path().join("sys"), dir.path().join("proc"));
    copy_fixture(&fixture("sysfs-guest-virtio"), &sys);
    copy_tree(&fixture("proc-guest-virtio"), &proc_);
    let cfg = LiveConfig {
        sysfs_root: sys,
        procfs_root: proc_,
        interval: Duration::from_millis(15),
        ..LiveConfig::guest(Some("eth0"))
    };
    let nic = FakeNic(Arc::new(Mutex::new(CoalesceParams {
        rx_usecs: Some(0),
        rx_frames: Some(1),
        tx_usecs: Some(0),
        tx_frames: Some(1),
        adaptive_rx: Some(false),
        adaptive_tx: None,
    })));
    let env = HostEnv::new(cfg, Box::new(nic)).unwrap();
    let mut want = CoalescingSettings::per_packet(1);
    want.vms[0].frontend = LayerSettings { rx: Moderation::fixed(400, 16), tx: Moderation::fixed(40, 16) };
    let l = LayerLimits {
        rx_usecs: Range { min: 0, max: 100 },
        rx_frames: Range { min: 1, max: 64 },
        tx_usecs: Range { min: 0, max: 100 },
        tx_frames: Range { min: 1, max: 64 },
        max_change_usecs: 16,
        max_change_frames: 8,
        allow_adaptive: false,
    };
    let limits = Limits { nic: l.clone(), backend: l.clone(), frontend: l };
    let opts = LoopOptions { dry_run: false, max_steps: Some(2), stale_after: 2, vm_names: Vec::new() };
    let lp = DeployLoop::new(
        env,
        Box::new(Steady(want)),
        Box::new(Steady(CoalescingSettings::per_packet(1))),
        limits,
        opts,
        Metrics::new(false),
    )
    .unwrap();
    let (_tx, rx) = watch::channel(false);
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(lp.run(rx)).unwrap();
    String::from_utf8(buf.0.lock().unwrap().clone()).unwrap()
}

#[test]
fn json_and_human_logs_carry_each_decision_with_its_inputs() {
    let text = run_logged(LogFormat::Json);
    let events: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let decisions: Vec<&serde_json::Value> = events.iter().filter(|e| e["message"] == "decision").collect();
    assert_eq!(decisions.len(), 2, "{text}");
    let d = decisions[0];
    assert_eq!(d["policy"], "steady");
    assert_eq!(d["step"], 1);
    assert_eq!(d["fallback"], false);
    assert!(d["inputs"].as_str().unwrap().starts_with("frontend rx "), "{d}");
    assert_eq!(d["decided"], "vm0.frontend(eth0) rx 400us/16f tx 40us/16f");
    assert_eq!(d["applied"], "vm0.frontend(eth0) rx 16us/9f tx 16us/9f");
    assert!(d["limited"].as_str().unwrap().contains("max change per step"), "{d}");
    assert!(events.iter().any(|e| e["message"] == "restored the original settings"));
    assert!(events.iter().any(|e| e["original"].as_str().is_some_and(|o| o.contains("rx-usecs 0"))));

    let text = run_logged(LogFormat::Human);
    let decisions: Vec<&str> = text.lines().filter(|l| l.contains(" decision ")).collect();
    assert_eq!(decisions.len(), 2, "{text}");
    assert!(
        decisions[1].contains("step=2") && decisions[1].contains("inputs=frontend rx"),
        "{}",
        decisions[1]
    );
    assert!(text.contains("deploy loop starting"), "{text}");
    assert!(!text.contains('\u{1b}'), "no colours when writing to a file");
}
