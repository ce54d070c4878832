//! `moderato deploy` against the real kernel (root only): a veth pair into a network namespace as
//! the "NIC" (no coalescing: observe-only) and a tap as a VM's backend (its one knob, rx-frames,
//! is really set), driven through `run_deploy` as the binary drives it.
//!
//! One test, in phases, because SIGTERM goes to the whole process: a dry run that logs decisions
//! while UDP crosses the veth, then a real run stopped by SIGTERM that must put the tap back.
//! Everything is created here on 198.18.0.0/15 and removed by a `Drop` guard. Run with
//! `cargo test --release -p moderato-agent -- --ignored` as root with iproute2.

use std::process::Command;
use std::time::{Duration, Instant};

use moderato_agent::deploy::{self, DeployArgs, LogFormat, RoleArg};
use moderato_env::live::{Coalescer, NetlinkCoalescer};
use moderato_env::{CoalescingSettings, LayerSettings, Moderation, Observation};
use moderato_policies::Policy;

mod common;

use common::Buf;
use common::live::netns::Lab;

/// This binary's labs: `mdd<n>…`, their /30s 4 blocks on from moderato-env's.
fn lab() -> Lab {
    Lab::new("mdd", 4)
}

/// A baseline-like fake: every layer at 32 µs / 32 frames.
struct Fixed(&'static str);

impl Policy for Fixed {
    fn name(&self) -> &str {
        self.0
    }
    fn act(&mut self, obs: &Observation) -> CoalescingSettings {
        CoalescingSettings::uniform(
            obs.host.backends.len(),
            LayerSettings { rx: Moderation::fixed(32, 32), tx: Moderation::fixed(32, 32) },
        )
    }
}

fn load(name: &str, _vms: usize) -> anyhow::Result<Box<dyn Policy>> {
    match name {
        "fake-baseline" => Ok(Box::new(Fixed("fake-baseline"))),
        "fake-fallback" => Ok(Box::new(Fixed("fake-fallback"))),
        other => anyhow::bail!("unknown policy {other}"),
    }
}

fn args(config: std::path::PathBuf, dry_run: bool, steps: Option<u64>) -> DeployArgs {
    DeployArgs {
        policy: "fake-baseline".into(),
        role: RoleArg::Host,
        config,
        dry_run,
        metrics_addr: Some("127.0.0.1:0".parse().unwrap()),
        log_format: LogFormat::Json,
        steps,
    }
}

#[test]
#[ignore = "needs root and iproute2: cargo test --release -p moderato-agent -- --ignored"]
fn deploy_dry_run_then_sigterm_restores_on_a_veth_pair_and_a_tap() {
    let lab = lab();
    let dir = tempfile::tempdir().unwrap();
    let config = common::lab_host_config(&lab, dir.path(), "fake-fallback", "source = \"none\"");
    let mut ethtool = NetlinkCoalescer::new().unwrap();
    assert_eq!(ethtool.get(&lab.tap).unwrap().rx_frames, Some(0));

    // Phase 1: a dry run of 20 intervals (2 s) while UDP crosses the veth pair.
    let sender = lab.blast(9, 500, 2000, Duration::from_millis(2500));
    let buf = Buf::default();
    let b2 = buf.clone();
    {
        let _g =
            tracing::subscriber::set_default(deploy::subscriber(LogFormat::Json, false, move || b2.clone()));
        deploy::run_deploy(args(config.clone(), true, Some(20)), &load).unwrap();
    }
    sender.join().unwrap();
    let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    let events: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let decisions: Vec<&serde_json::Value> = events.iter().filter(|e| e["message"] == "decision").collect();
    assert_eq!(decisions.len(), 20, "{text}");
    assert!(decisions.iter().all(|d| d["dry_run"] == true));
    let observe_only =
        format!("{}: this driver does not support coalescing; layer nic stays observe-only", lab.a);
    assert!(events.iter().any(|e| e["message"] == observe_only), "{text}");
    // The traffic shows in the decisions' inputs.
    assert!(
        decisions.iter().any(|d| d["inputs"].as_str().unwrap().starts_with("nic rx ")
            && !d["inputs"].as_str().unwrap().contains("tx 0.0kpps")),
        "{text}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["message"].as_str().is_some_and(|m| m.starts_with("metrics at http://127.0.0.1:")))
    );
    assert_eq!(ethtool.get(&lab.tap).unwrap().rx_frames, Some(0), "a dry run sets nothing");

    // Phase 2: for real, until SIGTERM. The backend's tx frames (the tap's rx-frames) climb
    // 8, 16, 24 (max change 8, bound 24).
    let cfg2 = config.clone();
    let run = std::thread::spawn(move || deploy::run_deploy(args(cfg2, false, None), &load));
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    loop {
        let f = ethtool.get(&lab.tap).unwrap().rx_frames.unwrap();
        if seen.last() != Some(&f) {
            seen.push(f);
        }
        if f == 24 {
            break;
        }
        assert!(Instant::now() < deadline && !run.is_finished(), "tap rx-frames went {seen:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(seen.iter().all(|f| *f % 8 == 0 && *f <= 24), "{seen:?}");
    // SIGTERM to this test process, which only the deploy loop's handler catches.
    let st = Command::new("kill").args(["-TERM", &std::process::id().to_string()]).status().unwrap();
    assert!(st.success());
    run.join().unwrap().unwrap();
    assert_eq!(ethtool.get(&lab.tap).unwrap().rx_frames, Some(0), "restored after SIGTERM");
}
