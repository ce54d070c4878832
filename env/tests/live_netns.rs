//! `env::live` against the real kernel: a network namespace with a veth pair (and a tap), UDP sent
//! across it, ethtool netlink's answers for drivers without coalescing, NAPI deferral through the
//! per-device sysfs files and the NAPI instances netdev netlink lists.
//!
//! The root-only tests create their own interfaces (`mdt<n>a` in this namespace, its peer `mdt<n>b`
//! in namespace `mdt<n>`, tap `mdt<n>t`) on 198.18.0.0/15 (the benchmarking range), use only those
//! addresses, and remove everything in a `Drop` guard, also when a test fails. Nothing else on the
//! machine is touched. Run them with
//! `cargo test --release -p moderato-env -- --ignored` as root with iproute2 installed.

use std::time::Duration;

use moderato_env::live::napi::napi_instances;
use moderato_env::live::netdev::Netdev;
use moderato_env::live::{
    CoalesceError, CoalesceParams, Coalescer, Control, HostEnv, InstanceNapi, LiveConfig, NapiControl,
    NapiError, NapiParams, NetlinkCoalescer, NetlinkNapi, Original, ProbeConfig, RestoreFailure, SysfsNapi,
    restore_original,
};
use moderato_env::{CoalescingSettings, Env, Knobs, LayerSettings};

mod common;

use common::netns::Lab;

/// This binary's labs: `mdt<n>…`, on the /30s at the start of each process's block.
fn lab() -> Lab {
    Lab::new("mdt", 0)
}

/// Helper, not a test of its own: run by `Lab::start_echo` inside the namespace. Without
/// `MODERATO_ECHO_AT` it returns at once.
#[test]
#[ignore = "needs root and iproute2: cargo test --release -p moderato-env -- --ignored"]
fn echo_responder() {
    common::netns::echo_responder_main();
}

#[test]
fn ethtool_netlink_says_loopback_has_no_coalescing_and_names_a_missing_device() {
    // Read-only: a get needs no privilege.
    let mut c = NetlinkCoalescer::new().expect("ethtool netlink (Linux 5.6+)");
    match c.get("lo") {
        Err(CoalesceError::Unsupported { ifname, .. }) => assert_eq!(ifname, "lo"),
        other => panic!("lo: {other:?}"),
    }
    match c.get("mdt-nosuchdev") {
        Err(e @ CoalesceError::NoDevice { .. }) => {
            assert_eq!(e.to_string(), "mdt-nosuchdev: no such device (ENODEV)")
        }
        other => panic!("missing device: {other:?}"),
    }
}

#[test]
#[ignore = "needs root and iproute2: cargo test --release -p moderato-env -- --ignored"]
fn veth_refuses_coalescing_and_tap_has_only_rx_frames() {
    let lab = lab();
    let mut c = NetlinkCoalescer::new().unwrap();
    assert!(matches!(c.get(&lab.a), Err(CoalesceError::Unsupported { .. })));
    let err = c.set(&lab.a, &CoalesceParams { rx_usecs: Some(50), ..Default::default() }).unwrap_err();
    assert!(matches!(err, CoalesceError::Unsupported { .. }), "{err}");
    assert!(
        err.to_string().starts_with(&format!("{}: this driver does not support coalescing", lab.a)),
        "{err}"
    );

    // tun/tap answers with one knob: rx-frames, its `rx_batched` (0 by default).
    let tap = c.get(&lab.tap).unwrap();
    assert_eq!(tap, CoalesceParams { rx_frames: Some(0), ..Default::default() });
    let err = c.set(&lab.tap, &CoalesceParams { rx_usecs: Some(8), ..Default::default() }).unwrap_err();
    assert!(matches!(err, CoalesceError::UnsupportedParameter { .. }), "{err:?}");
    c.set(&lab.tap, &CoalesceParams { rx_frames: Some(8), ..Default::default() }).unwrap();
    assert_eq!(c.get(&lab.tap).unwrap().rx_frames, Some(8));
}

#[test]
#[ignore = "needs root and iproute2: cargo test --release -p moderato-env -- --ignored"]
fn host_env_sees_udp_cross_a_veth_pair_and_stays_observe_only() {
    let mut lab = lab();
    let echo = lab.start_echo(7007);
    let cfg = LiveConfig {
        interval: Duration::from_millis(250),
        probe: Some(ProbeConfig { period: Duration::from_millis(5), ..ProbeConfig::new(echo) }),
        ..LiveConfig::host(Some(&lab.a), &[&lab.tap])
    };
    let mut env = HostEnv::open(cfg).unwrap();
    let (_, info) = env.reset(0).unwrap();
    let msg = format!("{}: this driver does not support coalescing; layer nic stays observe-only", lab.a);
    assert!(info.warnings.contains(&msg), "{msg} not in {:?}", info.warnings);
    // The tap is controlled: its one knob, rx-frames, is the backend's tx frames (from the guest).
    assert_eq!(env.layers()[1].control, Control::Controlled);
    let (originals, w) = env.originals();
    assert!(w.is_empty(), "{w:?}");
    assert_eq!(originals.len(), 1);

    // 1000-byte datagrams to the echo port: the veth transmits them and receives the echoes.
    let sender = lab.blast(7007, 1000, 2000, Duration::from_millis(1500));
    // And one core kept busy meanwhile, so that /proc/stat's tick sampling cannot miss the load
    // (a 2000 pps sender alone may take no tick at all in 250 ms on an idle machine).
    let spinner = std::thread::spawn(|| {
        let until = std::time::Instant::now() + Duration::from_millis(1500);
        let mut x = 0u64;
        while std::time::Instant::now() < until {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    });
    let action = CoalescingSettings::uniform(1, LayerSettings::fixed(Knobs::new(50, 32), Knobs::new(50, 16)));
    let mut steps = Vec::new();
    for _ in 0..6 {
        // The loop keeps running although no layer can be set.
        steps.push(env.step(&action).unwrap());
    }
    let sent = sender.join().unwrap();
    spinner.join().unwrap();
    assert!(sent > 100, "sent {sent}");

    let busy = steps.iter().filter(|s| s.obs.host.nic.tx_pps > 100.0).count();
    assert!(busy >= 3, "{:?}", steps.iter().map(|s| s.obs.host.nic.tx_pps).collect::<Vec<_>>());
    let total_tx: f64 = steps.iter().map(|s| s.obs.host.nic.tx_pps * s.obs.interval_ns as f64 / 1e9).sum();
    // Every datagram, plus ARP and the probe's own packets, within rounding of the counter reads.
    assert!(total_tx >= sent as f64 * 0.95, "counted {total_tx} of {sent}");
    let s = steps.iter().find(|s| s.obs.host.nic.tx_pps > 100.0).unwrap();
    let nic = s.obs.host.nic;
    assert!(nic.rx_pps > 100.0, "echoes come back: {}", nic.rx_pps);
    let tx_size = nic.tx_bytes_per_s / nic.tx_pps;
    // 1000 bytes of payload + UDP 8 + IPv4 20 + Ethernet 14, diluted a little by the 24-byte probes.
    assert!((700.0..=1042.5).contains(&tx_size), "{tx_size}");
    assert_eq!(nic.rx_irq_per_s, None, "veth has no interrupt lines");
    assert_eq!(nic.rx_knobs, None);
    assert!(s.info.truth.is_none());
    // One spinning core of the machine's N: a share near 1/N, never 0.
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let online = stat.lines().filter(|l| l.starts_with("cpu") && !l.starts_with("cpu ")).count() as f64;
    let cpu = s.obs.host.cpu;
    assert!(cpu.irq + cpu.other > 0.3 / online && cpu.irq + cpu.other <= 1.0, "{cpu:?} on {online} CPUs");
    // The probe answered through the veth pair.
    let p = steps.iter().rev().find_map(|s| s.obs.host.probe).expect("probe samples");
    assert!(p.samples > 10 && p.p50_us > 0.0 && p.p99_us >= p.p50_us, "{p:?}");
    assert!(env.spec().host_probe);
    // A tap nobody reads: no traffic, no failure; its knob took the action's backend tx frames.
    assert_eq!(s.obs.host.backends[0].rx_pps, 0.0);
    assert_eq!(s.obs.host.backends[0].tx_knobs, Some(Knobs::new(0, 16)));
    assert_eq!(s.obs.host.backends[0].rx_knobs, None);
    let w = env.restore(&originals);
    assert!(w.is_empty(), "{w:?}");
    assert_eq!(NetlinkCoalescer::new().unwrap().get(&lab.tap).unwrap().rx_frames, Some(0));
}

#[test]
#[ignore = "needs root and iproute2: cargo test --release -p moderato-env -- --ignored"]
fn guest_role_on_a_veth_end_counts_its_traffic() {
    let lab = lab();
    let cfg = LiveConfig { interval: Duration::from_millis(200), ..LiveConfig::guest(Some(&lab.a)) };
    let mut env = HostEnv::open(cfg).unwrap();
    let (_, info) = env.reset(0).unwrap();
    assert!(
        info.warnings.iter().any(|w| w.contains("layer vm0.frontend stays observe-only")),
        "{:?}",
        info.warnings
    );
    // No listener on the port: the peer answers with ICMP port unreachable (rate-limited).
    let sender = lab.blast(9, 200, 1000, Duration::from_millis(700));
    let mut tx = 0.0;
    for _ in 0..4 {
        let s = env.step(&CoalescingSettings::per_packet(1)).unwrap();
        tx += s.obs.guests[0].frontend.tx_pps * s.obs.interval_ns as f64 / 1e9;
        assert_eq!(s.obs.host.backends.len(), 1);
    }
    let sent = sender.join().unwrap();
    assert!(tx >= sent as f64 * 0.95, "{tx} of {sent}");
}

/// Turns GRO on (`rx-gro`) on `ifname` through ethtool netlink: a veth has NAPI instances only
/// with GRO or XDP on.
fn gro(ifname: &str, on: bool) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let c = nlink::netlink::Connection::<nlink::netlink::Ethtool>::new_async().await.unwrap();
        c.set_features_by_name(ifname, |f| if on { f.enable("rx-gro") } else { f.disable("rx-gro") })
            .await
            .unwrap();
    });
}

#[test]
#[ignore = "needs root and iproute2: cargo test --release -p moderato-env -- --ignored"]
fn napi_deferral_on_a_veth_is_set_read_back_and_restored_through_sysfs() {
    let lab = lab();
    let mut sysfs = SysfsNapi::new("/sys");
    // A fresh veth: deferral off.
    assert_eq!(sysfs.get(&lab.a).unwrap(), NapiParams::OFF);
    let ifindex: u32 =
        std::fs::read_to_string(format!("/sys/class/net/{}/ifindex", lab.a)).unwrap().trim().parse().unwrap();

    // NAPI instances in netdev netlink: none while GRO is off, one per receive queue with it on.
    gro(&lab.a, false);
    assert_eq!(napi_instances(ifindex).unwrap(), Vec::<u32>::new(), "a veth without GRO has no NAPI");
    gro(&lab.a, true);
    let ids = napi_instances(ifindex).unwrap();
    assert_eq!(ids.len(), 1, "one receive queue, one NAPI instance: {ids:?}");

    // The original, the kernel documentation's recipe, and back, through the per-device files.
    let cfg = LiveConfig::guest(Some(&lab.a));
    let mut env = HostEnv::open(cfg).unwrap();
    env.start();
    let mut originals = Vec::new();
    let w = env.add_napi_originals(&mut originals);
    assert!(w.is_empty(), "{w:?}");
    assert_eq!(originals.len(), 1);
    assert_eq!(originals[0].napi, Some(NapiParams::OFF));
    assert!(originals[0].params.is_empty(), "a veth has no coalescing to journal");
    let applied = env.apply_napi(&originals[0], &NapiParams::new(2, 20_000)).unwrap();
    assert_eq!(applied, NapiParams::new(2, 20_000));
    let file = |f: &str| std::fs::read_to_string(format!("/sys/class/net/{}/{f}", lab.a)).unwrap();
    assert_eq!((file("napi_defer_hard_irqs").trim(), file("gro_flush_timeout").trim()), ("2", "20000"));
    // The kernel's limits: defer is at most i32::MAX; the refusal names the file and the value.
    let e = sysfs.set(&lab.a, &NapiParams::new(i32::MAX as u32 + 1, 20_000)).unwrap_err();
    assert!(matches!(e, NapiError::Refused { .. }), "{e:?}");
    assert!(e.to_string().contains("napi_defer_hard_irqs") && e.to_string().contains("2147483648"), "{e}");
    let w = env.restore(&originals);
    assert!(w.is_empty(), "{w:?}");
    assert_eq!(sysfs.get(&lab.a).unwrap(), NapiParams::OFF);

    // A non-zero original comes back too, also through `restore_original` (what `moderato
    // restore` runs), and a re-created veth is left alone.
    sysfs.set(&lab.a, &NapiParams::new(1, 5_000)).unwrap();
    let mut originals = Vec::new();
    env.add_napi_originals(&mut originals);
    sysfs.set(&lab.a, &NapiParams::new(7, 70_000)).unwrap();
    let mut ethtool = NetlinkCoalescer::new().unwrap();
    restore_original(&mut ethtool, std::path::Path::new("/sys"), &originals[0]).unwrap();
    assert_eq!(sysfs.get(&lab.a).unwrap(), NapiParams::new(1, 5_000));
    let stale = Original { ifindex: originals[0].ifindex.map(|i| i + 1000), ..originals[0].clone() };
    sysfs.set(&lab.a, &NapiParams::new(7, 70_000)).unwrap();
    let e = restore_original(&mut ethtool, std::path::Path::new("/sys"), &stale).unwrap_err();
    assert!(matches!(e, RestoreFailure::Recreated { .. }), "{e:?}");
    assert_eq!(sysfs.get(&lab.a).unwrap(), NapiParams::new(7, 70_000), "not another interface's");
}

#[test]
#[ignore = "needs root and iproute2: cargo test --release -p moderato-env -- --ignored"]
fn napi_instances_of_a_veth_are_set_read_back_and_restored_through_netdev_netlink() {
    let lab = lab();
    gro(&lab.a, true);
    let ifindex: u32 =
        std::fs::read_to_string(format!("/sys/class/net/{}/ifindex", lab.a)).unwrap().trim().parse().unwrap();
    // napi-get with the 6.13 attributes: the instance's deferral and IRQ-suspension timeout.
    let netdev = Netdev::open().expect("netdev netlink (Linux 6.3+)");
    let listed = netdev.instances(ifindex).unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    let id = listed[0].id;
    assert_eq!(listed[0].params, Some(NapiParams::OFF), "{listed:?}");
    assert_eq!(listed[0].irq_suspend_timeout_ns, Some(0), "{listed:?}");

    // napi-set on the instance alone: the device's sysfs value stays; the read-back is the
    // instance's. IRQ suspension is set and read back the same way.
    let mut napi = NetlinkNapi::new("/sys");
    assert!(napi.has_netlink());
    let alone = NapiParams::new(3, 30_000);
    napi.set_instance(&lab.a, id, &alone).unwrap();
    let mut sysfs = SysfsNapi::new("/sys");
    assert_eq!(sysfs.get(&lab.a).unwrap(), NapiParams::OFF, "the device value is not the instance's");
    assert_eq!(napi.get(&lab.a).unwrap(), alone, "what the traffic runs with");
    netdev.set(id, None, Some(2_000_000)).unwrap();
    let suspended = netdev.instances(ifindex).unwrap()[0];
    assert_eq!(suspended.irq_suspend_timeout_ns, Some(2_000_000));
    assert_eq!(suspended.params, Some(alone), "a napi-set of the timeout alone leaves the deferral");
    netdev.set(id, None, Some(0)).unwrap();
    // An instance that does not exist is named.
    let e = napi.set_instance(&lab.a, id + 100_000, &alone).unwrap_err();
    assert!(e.to_string().contains(&format!("{}", id + 100_000)), "{e}");

    // The deploy's journal keeps the device value and each instance's own; a policy's write
    // reaches both; the restore (the loop's, and `moderato restore`'s) gives each its own back.
    let mut env = HostEnv::open(LiveConfig::guest(Some(&lab.a))).unwrap();
    env.start();
    let mut originals = Vec::new();
    let w = env.add_napi_originals(&mut originals);
    assert!(w.is_empty(), "{w:?}");
    assert_eq!(originals[0].napi, Some(NapiParams::OFF));
    assert_eq!(
        originals[0].napi_instances,
        vec![InstanceNapi { id, napi: alone, irq_suspend_timeout_ns: Some(0) }]
    );
    let recipe = NapiParams::new(2, 20_000);
    assert_eq!(env.apply_napi(&originals[0], &recipe).unwrap(), recipe);
    assert_eq!((sysfs.get(&lab.a).unwrap(), napi.get(&lab.a).unwrap()), (recipe, recipe));
    let w = env.restore(&originals);
    assert!(w.is_empty(), "{w:?}");
    assert_eq!(sysfs.get(&lab.a).unwrap(), NapiParams::OFF);
    assert_eq!(netdev.instances(ifindex).unwrap()[0].params, Some(alone));
    napi.set(&lab.a, &recipe).unwrap();
    let mut ethtool = NetlinkCoalescer::new().unwrap();
    restore_original(&mut ethtool, std::path::Path::new("/sys"), &originals[0]).unwrap();
    assert_eq!(sysfs.get(&lab.a).unwrap(), NapiParams::OFF);
    assert_eq!(netdev.instances(ifindex).unwrap()[0].params, Some(alone));
}
