//! `moderato observe`: the operator's view of one interval, on the 64-CPU host fixtures with a fake
//! `Coalescer`, and `run_observe` read-only on this machine's loopback.

use std::time::Duration;

use moderato_agent::deploy::{self, ObserveArgs, RoleArg};
use moderato_env::live::{CoalesceError, CoalesceParams, Coalescer, HostEnv, LiveConfig, Role};

mod common;

use common::live::{fixture, sysfs};

#[derive(Debug)]
struct Mlx5;

impl Coalescer for Mlx5 {
    fn get(&mut self, ifname: &str) -> Result<CoalesceParams, CoalesceError> {
        match ifname {
            "ens2f0np0" => Ok(CoalesceParams {
                rx_usecs: Some(8),
                rx_frames: Some(128),
                tx_usecs: Some(16),
                tx_frames: Some(32),
                adaptive_rx: Some(true),
                adaptive_tx: Some(false),
            }),
            _ => Err(CoalesceError::Unsupported { ifname: ifname.into(), detail: None }),
        }
    }
    fn set(&mut self, _: &str, _: &CoalesceParams) -> Result<(), CoalesceError> {
        panic!("observe never sets")
    }
}

#[test]
fn an_interval_shows_rates_knobs_features_and_warnings() {
    let (_tmp, sys) = sysfs("sysfs-host");
    let cfg = LiveConfig {
        sysfs_root: sys,
        procfs_root: fixture("proc-host-64cpu"),
        interval: Duration::from_millis(5),
        ..LiveConfig::host(Some("ens2f0np0"), &["vnet0", "vnet7"])
    };
    let space = cfg.action_space.clone();
    let mut env = HostEnv::new(cfg, Box::new(Mlx5)).unwrap();
    env.start();
    std::thread::sleep(Duration::from_millis(5));
    let s = env.sample();
    let text = deploy::observe::render(Role::Host, &s, &space, &["web".to_string(), "db".to_string()]);
    assert!(text.contains("nic           ens2f0np0"), "{text}");
    assert!(text.contains("16 irq lines by msi_irqs"), "{text}");
    assert!(text.contains("knobs `adaptive-rx on adaptive-tx off rx-usecs 8 rx-frames 128"), "{text}");
    assert!(text.contains("[controlled;"), "{text}");
    assert!(
        text.contains("vm0.backend   vnet0") && text.contains("[observe-only; no irq lines] vm web"),
        "{text}"
    );
    assert!(text.contains("features host:") && text.contains("nic.rx_kpps_ln=0.000"), "{text}");
    assert!(text.contains("features vm1 backend:"), "{text}");
    assert!(text.contains("warning: vnet7 (vm1.backend): no such interface"), "{text}");
}

#[test]
fn run_observe_reads_loopback_without_changing_anything() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lo.toml");
    std::fs::write(
        &path,
        r#"interval_ms = 50
fallback = "per-packet"
stale_after_intervals = 3
[guest]
frontend = "lo"
[limits]
[latency]
source = "none"
"#,
    )
    .unwrap();
    deploy::run_observe(ObserveArgs { config: path.clone(), role: Some(RoleArg::Guest), count: Some(2) })
        .unwrap();
    // The role comes from the one section when not given.
    deploy::run_observe(ObserveArgs { config: path, role: None, count: Some(1) }).unwrap();
}

#[test]
fn moderato_echo_answers_until_shutdown_and_names_a_busy_port() {
    let addr = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let server = std::thread::spawn(move || rt.block_on(deploy::serve_echo(addr, shutdown)));
    let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    client.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let mut buf = [0u8; 64];
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let answer = loop {
        client.send_to(b"moderato probe 1", addr).unwrap();
        if let Ok((n, from)) = client.recv_from(&mut buf) {
            break (buf[..n].to_vec(), from);
        }
        assert!(std::time::Instant::now() < deadline, "no echo from {addr}");
    };
    assert_eq!(answer, (b"moderato probe 1".to_vec(), addr));
    stop.send(true).unwrap();
    server.join().unwrap().unwrap();

    // A port that another socket holds: the error names the address and the flag.
    let busy = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let at = busy.local_addr().unwrap();
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let e = rt.block_on(deploy::serve_echo(at, shutdown)).unwrap_err().to_string();
    assert!(e.starts_with(&format!("binding UDP {at} (--listen): ")), "{e}");
}
