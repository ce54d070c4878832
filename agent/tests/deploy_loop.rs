//! The deploy loop against a fake `Coalescer` and a copy of the virtio guest fixture tree (from
//! `env/tests/fixtures/live`): limits, fallback, restoration on every exit, dry run, refusal of
//! policies, metrics and logs.

use std::collections::BTreeMap;
use std::time::Duration;

use moderato_agent::deploy::{self, DeployLoop, LoopOptions, Metrics, StopReason};
use moderato_env::{Adaptive, CoalescingSettings, Knobs, LayerSettings, Moderation};
use moderato_policies::Requirements;
use tokio::sync::watch;

mod common;

use common::{ORIGINAL, Rig, Scripted, frontend, limits, make, opts, rt};

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
        tokio::spawn(deploy::metrics::serve(
            listener,
            metrics,
            deploy::metrics::ServerLimits::for_this_process(),
        ));
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
    assert!(body.starts_with("HTTP/1.1 200 OK\r\n"), "{body}");
    assert!(body.contains("content-type: application/openmetrics-text; version=1.0.0"), "{body}");
    assert!(body.ends_with("# EOF\n"), "{body}");
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

/// An echo responder on loopback, answering the latency probe it configures.
struct Echo {
    probe: moderato_env::live::ProbeConfig,
    flag: std::sync::Arc<std::sync::atomic::AtomicBool>,
    responder: std::thread::JoinHandle<std::io::Result<()>>,
}

impl Echo {
    fn start() -> Echo {
        let addr = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let responder = {
            let flag = flag.clone();
            std::thread::spawn(move || moderato_env::live::serve_udp_echo(addr, &flag))
        };
        let probe = moderato_env::live::ProbeConfig {
            period: Duration::from_millis(2),
            ..moderato_env::live::ProbeConfig::new(addr)
        };
        Echo { probe, flag, responder }
    }

    /// Stops the responder; it must have run without an error.
    fn stop(self) {
        self.flag.store(true, std::sync::atomic::Ordering::Relaxed);
        self.responder.join().unwrap().unwrap();
    }
}

/// The rig as a guest of Linux 5.10 or later (with the NAPI deferral files), `probe` its latency
/// source.
fn deferral_guest(probe: Option<moderato_env::live::ProbeConfig>) -> Rig {
    let rig = Rig::with_probe(probe);
    for f in ["napi_defer_hard_irqs", "gro_flush_timeout"] {
        std::fs::write(rig.link().join(f), "0\n").unwrap();
    }
    rig
}

/// `primary` deployed for 12 intervals on `rig` (per-packet as the fallback); the loop's summary.
fn run_12(rig: &mut Rig, primary: Box<dyn moderato_policies::Policy>) -> deploy::Summary {
    let lp = make(rig, primary, Scripted::fixed("fb", CoalescingSettings::per_packet(1)), opts(Some(12)));
    let (_tx, rx) = watch::channel(false);
    rt().block_on(lp.run(rx)).unwrap()
}

#[test]
fn the_shipped_model_deploys_on_a_virtio_guest_with_a_loopback_probe() {
    // The model reads the guest's latency probe: an echo responder on loopback answers it.
    let echo = Echo::start();
    let probe = echo.probe;
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/default");
    // Loaded as `moderato deploy --policy models/default` loads it.
    let load = || {
        moderato_agent::resolve::deploy_policy(model.to_str().unwrap(), 1, None, &[], &Default::default())
            .unwrap()
    };
    let fallback = || Scripted::fixed("fb", CoalescingSettings::per_packet(1));

    // The fixture guest has no NAPI deferral files (a kernel before 5.10), which the model's
    // profile gives its frontend: refused before anything is set, naming the difference ...
    let mut bare = Rig::with_probe(Some(probe));
    let e = DeployLoop::new(
        bare.env.take().unwrap(),
        load(),
        fallback(),
        limits(),
        opts(Some(2)),
        Metrics::new(false),
    )
    .unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.starts_with(
            "refusing policy `model:default`: it was trained for hosts of profile `kvm-notf-coal`"
        ),
        "{msg}"
    );
    assert!(msg.contains("vm0.frontend (eth0)") && msg.contains("napi_defer_hard_irqs"), "{msg}");
    assert!(bare.sets().is_empty(), "a refused deploy set {:?}", bare.sets());
    // ... unless allowed, when it runs without deferral.
    let mut allowed = Rig::with_probe(Some(probe));
    let o = LoopOptions { allow_profile_mismatch: true, ..opts(Some(2)) };
    let (_tx, rx) = watch::channel(false);
    let s = rt().block_on(make(&mut allowed, load(), fallback(), o).run(rx)).unwrap();
    assert_eq!(s.decisions, 2);

    // A guest of Linux 5.10 or later, with the deferral files: the profile's mechanisms.
    let mut rig = deferral_guest(Some(probe));
    let primary = load();
    assert_eq!(primary.name(), "model:default");
    let s = run_12(&mut rig, primary);
    echo.stop();
    assert_eq!((s.decisions, s.fallback_decisions), (12, 0));
    // It moved the frontend's knobs, within the limits and their largest step.
    let sets = rig.sets();
    // The last set is the restoration, which no limit holds back.
    let (restore, decisions) = sets.split_last().unwrap();
    assert!(!decisions.is_empty());
    assert_eq!(ORIGINAL.updated(restore), ORIGINAL);
    let mut last = ORIGINAL;
    for p in decisions {
        for (now, before, max, step) in [
            (p.rx_usecs, last.rx_usecs, 100, 16),
            (p.tx_usecs, last.tx_usecs, 100, 16),
            (p.rx_frames, last.rx_frames, 64, 8),
            (p.tx_frames, last.tx_frames, 64, 8),
        ] {
            if let (Some(n), Some(b)) = (now, before) {
                assert!(n <= max && n.abs_diff(b) <= step, "{before:?} → {now:?} in {decisions:?}");
            }
        }
        last = last.updated(p);
    }
    let decided = s.last.unwrap().vms[0].frontend;
    assert_ne!(
        decided,
        LayerSettings { rx: Moderation::fixed(0, 1), tx: Moderation::fixed(0, 1), napi: Default::default() }
    );
    assert_eq!(s.restored, 1);
    assert_eq!(rig.state(), ORIGINAL);
}

#[test]
fn the_shipped_model_under_the_trim_deploys_on_a_virtio_guest_and_restores() {
    // `trim:models/default` as `moderato deploy --policy trim:models/default` loads it: the
    // model unchanged, each VM's told target trimmed by the guest's probe p99 (an echo responder
    // on loopback answers it).
    let echo = Echo::start();
    let probe = echo.probe;
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/default");
    let name = format!("trim:{}", model.display());
    let primary =
        moderato_agent::resolve::deploy_policy(&name, 1, Some(200.0), &[], &Default::default()).unwrap();
    let label = primary.name().to_string();
    assert!(label.starts_with("trim:") && label.ends_with("models/default"), "{label}");

    // Without a latency source the trim (like the model) has nothing to read: refused at start,
    // naming the probe, before anything is set.
    let mut bare = deferral_guest(None);
    let e = DeployLoop::new(
        bare.env.take().unwrap(),
        moderato_agent::resolve::deploy_policy(&name, 1, Some(200.0), &[], &Default::default()).unwrap(),
        Scripted::fixed("fb", CoalescingSettings::per_packet(1)),
        limits(),
        opts(Some(2)),
        Metrics::new(false),
    )
    .unwrap_err()
    .to_string();
    assert!(e.starts_with(&format!("refusing the deployed policy `{label}`")), "{e}");
    assert!(e.contains("no latency probe is configured"), "{e}");
    assert!(bare.sets().is_empty(), "a refused deploy set {:?}", bare.sets());

    // With the probe and a guest with the deferral files: it decides every interval itself (no
    // fallback), within the limits, and the original is back at the end.
    let mut rig = deferral_guest(Some(probe));
    let s = run_12(&mut rig, primary);
    echo.stop();
    assert_eq!((s.decisions, s.fallback_decisions), (12, 0));
    let sets = rig.sets();
    let (restore, decisions) = sets.split_last().unwrap();
    assert!(!decisions.is_empty(), "the trimmed model set nothing");
    for p in decisions {
        for u in [p.rx_usecs, p.tx_usecs].into_iter().flatten() {
            assert!(u <= 100, "{p:?} beyond the limits");
        }
    }
    assert_eq!(ORIGINAL.updated(restore), ORIGINAL);
    assert_eq!(s.restored, 1);
    assert_eq!(rig.state(), ORIGINAL);
}
