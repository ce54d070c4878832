//! `HostEnv` against copies of the fixture trees (so a test can change counters, remove an
//! interface, bring it back) and a fake `Coalescer`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moderato_env::live::{CoalesceError, CoalesceParams, Coalescer, Control, HostEnv, LiveConfig};
use moderato_env::{CoalescingSettings, Env, Knobs, LayerId, LayerSettings, Moderation};

mod common;

use common::{VIRTIO_DEFAULT, copy_fixture, copy_tree, fixture};

/// A fake driver: per interface, the parameters it supports and holds, or an error for every call.
#[derive(Debug, Clone, Default)]
struct FakeNic {
    state: Arc<Mutex<BTreeMap<String, Result<CoalesceParams, CoalesceError>>>>,
    sets: Arc<Mutex<Vec<(String, CoalesceParams)>>>,
}

impl FakeNic {
    fn with(self, ifname: &str, r: Result<CoalesceParams, CoalesceError>) -> Self {
        self.state.lock().unwrap().insert(ifname.to_string(), r);
        self
    }
}

impl Coalescer for FakeNic {
    fn get(&mut self, ifname: &str) -> Result<CoalesceParams, CoalesceError> {
        self.state
            .lock()
            .unwrap()
            .get(ifname)
            .cloned()
            .unwrap_or(Err(CoalesceError::NoDevice { ifname: ifname.into() }))
    }
    fn set(&mut self, ifname: &str, p: &CoalesceParams) -> Result<(), CoalesceError> {
        self.sets.lock().unwrap().push((ifname.to_string(), *p));
        let mut st = self.state.lock().unwrap();
        match st.get_mut(ifname) {
            Some(Ok(cur)) => {
                *cur = cur.updated(p);
                Ok(())
            }
            Some(Err(e)) => Err(e.clone()),
            None => Err(CoalesceError::NoDevice { ifname: ifname.into() }),
        }
    }
}

struct GuestTree {
    _dir: tempfile::TempDir,
    sys: PathBuf,
    proc_: PathBuf,
}

impl GuestTree {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().join("sys");
        let proc_ = dir.path().join("proc");
        copy_fixture(&fixture("sysfs-guest-virtio"), &sys);
        std::fs::create_dir_all(&proc_).unwrap();
        for f in ["interrupts", "stat"] {
            std::fs::copy(fixture("proc-guest-virtio").join(f), proc_.join(f)).unwrap();
        }
        GuestTree { _dir: dir, sys, proc_ }
    }

    fn stats_dir(&self) -> PathBuf {
        self.sys.join("class/net/eth0/statistics")
    }

    /// Moves every source one interval on (the `.t1` fixtures).
    fn advance(&self) {
        copy_tree(&fixture("sysfs-guest-virtio.t1-statistics"), &self.stats_dir());
        for f in ["interrupts", "stat"] {
            std::fs::copy(fixture("proc-guest-virtio").join(format!("{f}.t1")), self.proc_.join(f)).unwrap();
        }
    }

    fn config(&self) -> LiveConfig {
        LiveConfig {
            sysfs_root: self.sys.clone(),
            procfs_root: self.proc_.clone(),
            interval: Duration::from_millis(20),
            ..LiveConfig::guest(Some("eth0"))
        }
    }
}

#[test]
fn guest_rates_follow_the_counters_with_the_documented_units() {
    let tree = GuestTree::new();
    let fake = FakeNic::default().with("eth0", Ok(VIRTIO_DEFAULT));
    let mut env = HostEnv::new(tree.config(), Box::new(fake)).unwrap();
    let warnings = env.start();
    assert!(warnings.is_empty(), "{warnings:?}");
    tree.advance();
    std::thread::sleep(Duration::from_millis(20));
    let s = env.sample();
    assert!(s.complete, "{:?}", s.info.warnings);
    assert!(s.info.truth.is_none());
    let secs = s.obs.interval_ns as f64 / 1e9;
    assert!(secs >= 0.02);
    // One guest, one default backend on the host side.
    assert_eq!(s.obs.guests.len(), 1);
    assert_eq!(s.obs.host.backends.len(), 1);
    let fe = s.obs.guests[0].frontend;
    let close = |rate: f64, count: f64| (rate * secs - count).abs() < 1e-6 * count.max(1.0);
    assert!(close(fe.rx_pps, 20_000.0), "{}", fe.rx_pps);
    assert!(close(fe.tx_pps, 10_000.0));
    assert!(close(fe.rx_bytes_per_s, 30_000_000.0));
    assert!(close(fe.tx_bytes_per_s, 1_000_000.0));
    assert!(close(fe.drops_per_s, 5.0));
    // input.0 +3000 and input.1 +1000 (across a 32-bit wrap); output.0 +500, output.1 +700.
    assert!(close(fe.rx_irq_per_s.unwrap(), 4000.0), "{:?}", fe.rx_irq_per_s);
    assert!(close(fe.tx_irq_per_s.unwrap(), 1200.0));
    assert_eq!(fe.rx_knobs, Some(Knobs::new(0, 1)));
    let cpu = s.obs.guests[0].cpu;
    assert!((cpu.irq - 0.1).abs() < 1e-12 && (cpu.other - 0.25).abs() < 1e-12, "{cpu:?}");
    assert!(s.obs.guests[0].probe.is_none());
    // Features computed from it stay in their documented ranges.
    let f = s.obs.guests[0].features(&env.spec().action_space);
    for (v, feat) in f.iter().zip(moderato_env::GUEST_FEATURES) {
        assert!(*v >= feat.lo && *v <= feat.hi, "{}: {v}", feat.name);
    }
    assert_eq!(s.interfaces[0].irq_found_by, "msi_irqs");
}

#[test]
fn a_vanished_interface_is_a_warning_and_its_return_resumes_rates() {
    let tree = GuestTree::new();
    let fake = FakeNic::default().with("eth0", Ok(VIRTIO_DEFAULT));
    let mut env = HostEnv::new(tree.config(), Box::new(fake)).unwrap();
    env.start();
    let link = tree.sys.join("class/net/eth0");
    let target = std::fs::read_link(&link).unwrap();
    std::fs::remove_file(&link).unwrap();
    let s = env.sample();
    assert!(!s.complete);
    assert!(
        s.info.warnings.iter().any(|w| w.contains("eth0 (vm0.frontend): interface vanished")),
        "{:?}",
        s.info.warnings
    );
    assert_eq!(s.obs.guests[0].frontend.rx_pps, 0.0);
    // Applying while it is gone touches nothing and does not fail.
    env.apply(&CoalescingSettings::uniform(1, LayerSettings::fixed(Knobs::new(8, 4), Knobs::new(8, 4))))
        .unwrap();
    std::os::unix::fs::symlink(target, &link).unwrap();
    let s = env.sample();
    assert!(!s.complete);
    assert!(s.info.warnings.iter().any(|w| w.contains("present again")), "{:?}", s.info.warnings);
    tree.advance();
    std::thread::sleep(Duration::from_millis(5));
    let s = env.sample();
    assert!(s.complete, "{:?}", s.info.warnings);
    assert!(s.obs.guests[0].frontend.rx_pps > 0.0);
}

#[test]
fn a_counter_that_goes_backwards_is_a_reset_not_a_negative_rate() {
    let tree = GuestTree::new();
    let mut env =
        HostEnv::new(tree.config(), Box::new(FakeNic::default().with("eth0", Ok(VIRTIO_DEFAULT)))).unwrap();
    env.start();
    std::fs::write(tree.stats_dir().join("rx_packets"), "250\n").unwrap();
    std::thread::sleep(Duration::from_millis(5));
    let s = env.sample();
    let fe = s.obs.guests[0].frontend;
    assert!(fe.rx_pps > 0.0);
    assert!((fe.rx_pps * s.obs.interval_ns as f64 / 1e9 - 250.0).abs() < 1e-6);
    assert!(s.info.warnings.iter().any(|w| w.contains("went backwards")), "{:?}", s.info.warnings);
}

#[test]
fn unreadable_sources_are_warnings_never_panics() {
    let tree = GuestTree::new();
    let mut env =
        HostEnv::new(tree.config(), Box::new(FakeNic::default().with("eth0", Ok(VIRTIO_DEFAULT)))).unwrap();
    env.start();
    std::fs::write(tree.proc_.join("interrupts"), "garbage\n").unwrap();
    std::fs::remove_file(tree.proc_.join("stat")).unwrap();
    std::fs::write(tree.stats_dir().join("tx_bytes"), "lots\n").unwrap();
    let s = env.sample();
    assert!(!s.complete);
    let w = s.info.warnings.join("\n");
    assert!(w.contains("interrupts"), "{w}");
    assert!(w.contains("stat"), "{w}");
    assert!(w.contains("tx_bytes") && w.contains("lots"), "{w}");
}

#[test]
fn unsupported_coalescing_makes_the_layer_observe_only_and_the_loop_runs_on() {
    let tree = GuestTree::new();
    let fake = FakeNic::default()
        .with("eth0", Err(CoalesceError::Unsupported { ifname: "eth0".into(), detail: None }));
    let sets = fake.sets.clone();
    let mut env = HostEnv::new(tree.config(), Box::new(fake)).unwrap();
    let (_, info) = env.reset(0).unwrap();
    let msg = "eth0: this driver does not support coalescing; layer vm0.frontend stays observe-only";
    assert!(info.warnings.iter().any(|w| w == msg), "{:?}", info.warnings);
    assert!(matches!(&env.layers()[0].control, Control::ObserveOnly(m) if m == msg));
    let action = CoalescingSettings::uniform(1, LayerSettings::fixed(Knobs::new(50, 16), Knobs::new(50, 16)));
    for _ in 0..3 {
        let step = env.step(&action).unwrap();
        assert_eq!(step.obs.guests[0].frontend.rx_knobs, None);
    }
    assert!(sets.lock().unwrap().is_empty(), "an observe-only layer is never set");
    let unavailable: Vec<String> = env.unavailable_features().into_iter().map(|(f, _)| f).collect();
    assert!(unavailable.contains(&"frontend.rx_usecs".to_string()));
    assert!(unavailable.contains(&"guest.probe_p99_ln".to_string()));
    assert!(!unavailable.contains(&"frontend.rx_kpps_ln".to_string()));
    assert!(!unavailable.contains(&"frontend.rx_irq_krate_ln".to_string()));
}

#[test]
fn apply_sets_only_supported_changed_parameters_and_dry_run_sets_nothing() {
    let tree = GuestTree::new();
    // virtio-net: no adaptive-tx.
    let fake = FakeNic::default().with("eth0", Ok(VIRTIO_DEFAULT));
    let sets = fake.sets.clone();
    let mut env = HostEnv::new(tree.config(), Box::new(fake)).unwrap();
    env.start();
    let a = CoalescingSettings::uniform(1, LayerSettings::fixed(Knobs::new(64, 32), Knobs::new(0, 1)));
    env.apply(&a).unwrap();
    let got = sets.lock().unwrap().clone();
    assert_eq!(
        got,
        vec![(
            "eth0".to_string(),
            CoalesceParams { rx_usecs: Some(64), rx_frames: Some(32), ..Default::default() }
        )]
    );
    // The same action again changes nothing.
    env.apply(&a).unwrap();
    assert_eq!(sets.lock().unwrap().len(), 1);
    // Adaptive rx turns the driver's adaptive-rx on; tx has no adaptive mode: a one-time warning.
    let mut ad = a.clone();
    ad.vms[0].frontend = LayerSettings::adaptive(moderato_env::Adaptive::Dim);
    env.apply(&ad).unwrap();
    assert_eq!(sets.lock().unwrap()[1].1, CoalesceParams { adaptive_rx: Some(true), ..Default::default() });
    let s = env.sample();
    assert!(s.info.warnings.iter().any(|w| w.contains("no adaptive-tx")), "{:?}", s.info.warnings);
    // The other side's layers (the NIC, the backend) are not this guest's to set.
    assert!(sets.lock().unwrap().iter().all(|(i, _)| i == "eth0"));

    env.set_apply(false);
    env.apply(&CoalescingSettings::uniform(1, LayerSettings::fixed(Knobs::new(999, 99), Knobs::new(9, 9))))
        .unwrap();
    assert_eq!(sets.lock().unwrap().len(), 2, "a dry run sets nothing");
    assert_eq!(
        env.apply(&CoalescingSettings::per_packet(3)).unwrap_err().to_string(),
        "action does not fit this environment: settings for 3 VMs, but this guest has 1"
    );
}

#[test]
fn restore_puts_back_the_originals_values_before_modes() {
    let tree = GuestTree::new();
    let orig = CoalesceParams { adaptive_rx: Some(true), rx_usecs: Some(8), ..VIRTIO_DEFAULT };
    let fake = FakeNic::default().with("eth0", Ok(orig));
    let sets = fake.sets.clone();
    let state = fake.state.clone();
    let mut env = HostEnv::new(tree.config(), Box::new(fake)).unwrap();
    env.start();
    let (originals, w) = env.originals();
    assert!(w.is_empty());
    assert_eq!(originals.len(), 1);
    assert_eq!(originals[0].layer, LayerId::Frontend(0));
    env.apply(&CoalescingSettings::uniform(1, LayerSettings::fixed(Knobs::new(100, 64), Knobs::new(20, 8))))
        .unwrap();
    assert_eq!(state.lock().unwrap()["eth0"].as_ref().unwrap().adaptive_rx, Some(false));
    let w = env.restore(&originals);
    assert!(w.is_empty(), "{w:?}");
    assert_eq!(state.lock().unwrap()["eth0"].as_ref().unwrap(), &orig);
    let sets = sets.lock().unwrap();
    let n = sets.len();
    assert_eq!(sets[n - 2].1.adaptive_rx, None, "values first");
    assert_eq!(
        sets[n - 1].1,
        CoalesceParams { adaptive_rx: Some(true), ..Default::default() },
        "then the mode"
    );
}

#[test]
fn host_role_swaps_backend_directions_and_reports_absent_layers_as_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let sys = dir.path().join("sys");
    copy_fixture(&fixture("sysfs-host"), &sys);
    let cfg = LiveConfig {
        sysfs_root: sys.clone(),
        procfs_root: fixture("proc-host-64cpu"),
        interval: Duration::from_millis(10),
        ..LiveConfig::host(Some("ens2f0np0"), &["vnet0", "vnet1"])
    };
    // A third VM whose backend interface is not configured at all.
    let mut cfg = cfg;
    cfg.backends.push(None);
    let fake = FakeNic::default()
        .with(
            "ens2f0np0",
            Ok(CoalesceParams {
                rx_usecs: Some(8),
                rx_frames: Some(128),
                tx_usecs: Some(16),
                tx_frames: Some(32),
                adaptive_rx: Some(true),
                adaptive_tx: Some(true),
            }),
        )
        .with("vnet0", Err(CoalesceError::Unsupported { ifname: "vnet0".into(), detail: None }));
    let mut env = HostEnv::new(cfg, Box::new(fake)).unwrap();
    assert_eq!(env.spec().vms, 3);
    let w = env.start();
    assert!(w.iter().any(|w| w.contains("vnet1 (vm1.backend): no such interface")), "{w:?}");
    assert!(
        w.iter()
            .any(|w| w
                == "vnet0: this driver does not support coalescing; layer vm0.backend stays observe-only")
    );
    // The tap sent 1000 packets towards the guest (its tx) and received 10 from it.
    let st = sys.join("class/net/vnet0/statistics");
    std::fs::write(st.join("tx_packets"), "6001000\n").unwrap();
    std::fs::write(st.join("rx_packets"), "4000010\n").unwrap();
    std::thread::sleep(Duration::from_millis(10));
    let s = env.sample();
    let secs = s.obs.interval_ns as f64 / 1e9;
    let b = s.obs.host.backends[0];
    assert!((b.rx_pps * secs - 1000.0).abs() < 1e-6, "towards the guest: {}", b.rx_pps);
    assert!((b.tx_pps * secs - 10.0).abs() < 1e-6);
    assert_eq!(b.rx_irq_per_s, None, "a tap has no interrupt lines");
    assert_eq!(s.obs.host.backends[1], Default::default());
    assert_eq!(s.obs.host.backends[2], Default::default());
    assert_eq!(s.obs.guests.len(), 3);
    // The NIC's combined queues put everything in rx and report tx as 0.
    assert_eq!(s.obs.host.nic.tx_irq_per_s, Some(0.0));
    assert_eq!(s.obs.host.nic.rx_knobs, Some(Knobs::new(8, 128)));
    let un: BTreeMap<String, String> = env.unavailable_features().into_iter().collect();
    assert!(un["backend.rx_kpps_ln"].contains("vm2 has no backend"), "{un:?}");
    assert!(un["host.probe_p50_ln"].contains("no latency probe"));
    assert!(un["guest.cpu_irq"].contains("--role guest"));
    assert!(!un.contains_key("nic.irq_krate_ln"));
    assert!(!un.contains_key("nic.rx_usecs"));
    // An action for the NIC sets it; fixed knobs turn its adaptive modes off in the same request.
    let mut a = CoalescingSettings::per_packet(3);
    a.nic = LayerSettings {
        rx: Moderation::fixed(32, 64),
        tx: Moderation::fixed(16, 32),
        napi: Default::default(),
    };
    env.apply(&a).unwrap();
    let (originals, _) = env.originals();
    assert_eq!(originals.iter().map(|o| o.ifname.as_str()).collect::<Vec<_>>(), ["ens2f0np0"]);
    assert_eq!(originals[0].params.adaptive_rx, Some(false));
}

#[test]
fn config_that_does_not_fit_the_role_is_refused_with_a_sentence() {
    let mut cfg = LiveConfig::guest(Some("eth0"));
    cfg.nic = Some(moderato_env::live::InterfaceConfig::new("eth1"));
    let err = HostEnv::new(cfg, Box::new(FakeNic::default())).unwrap_err().to_string();
    assert!(err.contains("role is guest"), "{err}");
    let cfg = LiveConfig::host(Some("eth0"), &["eth0"]);
    let err = HostEnv::new(cfg, Box::new(FakeNic::default())).unwrap_err().to_string();
    assert!(err.contains("`eth0` plays two layers"), "{err}");
}
