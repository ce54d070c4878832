//! `moderato deploy --dry-run` against the real kernel (root only), with the policies a user names,
//! loaded by the same resolver as the binary: a baseline (`dim`), the shipped `models/default`, and
//! a model trained here with `moderato train` for a NIC like veth. The "NIC" is a veth end
//! (observe-only: veth has no coalescing and no interrupt lines), vm0's backend a tap; UDP crosses
//! the veth pair and a UDP echo responder inside the namespace is the latency source that the
//! models' probe features need.
//!
//! Its own test binary (process), so that no other test's SIGTERM reaches these loops. Everything
//! is created on 198.18.0.0/15 and removed by a `Drop` guard. Run with
//! `cargo test --release -p moderato-agent -- --ignored` as root with iproute2.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use moderato_agent::deploy::{self, DeployArgs, LogFormat, RoleArg};
use moderato_agent::resolve;
use moderato_agent::train::{self, TrainArgs};
use moderato_env::live::{Coalescer, NetlinkCoalescer};

mod common;

use common::Buf;
use common::live::netns::Lab;

/// This binary's labs: `mdr<n>…`, their /30s 8 blocks on from moderato-env's.
fn lab() -> Lab {
    Lab::new("mdr", 8)
}

/// Helper, not a test of its own: run by `Lab::start_echo` inside the namespace.
#[test]
#[ignore = "needs root and iproute2: cargo test --release -p moderato-agent -- --ignored"]
fn echo_responder() {
    common::live::netns::echo_responder_main();
}

/// The lab's host-side deploy config with `static:moderate` as fallback and latency from `echo`
/// (or none).
fn config(lab: &Lab, dir: &Path, echo: Option<SocketAddr>) -> PathBuf {
    let latency = match echo {
        Some(a) => format!("source = \"udp-echo\"\ntarget = \"{a}\"\nperiod_ms = 10\ntimeout_ms = 200"),
        None => "source = \"none\"".to_string(),
    };
    common::lab_host_config(lab, dir, "static:moderate", &latency)
}

/// Runs `policy` as `moderato deploy --dry-run` would for `steps` intervals while UDP crosses the
/// veth pair, and answers the JSON log events.
fn dry_run(lab: &Lab, config: PathBuf, policy: &str, steps: u64) -> anyhow::Result<Vec<serde_json::Value>> {
    dry_run_allowing(lab, config, policy, steps, false)
}

/// [`dry_run`], with `--allow-profile-mismatch` as `allow` says.
fn dry_run_allowing(
    lab: &Lab,
    config: PathBuf,
    policy: &str,
    steps: u64,
    allow: bool,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let sender = lab.blast(9, 500, 2000, Duration::from_millis(100 * steps + 500));
    let buf = Buf::default();
    let b2 = buf.clone();
    let args = DeployArgs {
        policy: policy.into(),
        role: RoleArg::Host,
        config,
        dry_run: true,
        metrics_addr: None,
        log_format: LogFormat::Json,
        steps: Some(steps),
        allow_profile_mismatch: allow,
    };
    let result = {
        let _g =
            tracing::subscriber::set_default(deploy::subscriber(LogFormat::Json, false, move || b2.clone()));
        deploy::run_deploy(args, &resolve::deploy_policy)
    };
    sender.join().unwrap();
    let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    result.map(|()| text.lines().map(|l| serde_json::from_str(l).unwrap()).collect())
}

fn decisions(events: &[serde_json::Value]) -> Vec<&serde_json::Value> {
    events.iter().filter(|e| e["message"] == "decision").collect()
}

#[test]
#[ignore = "needs root and iproute2: cargo test --release -p moderato-agent -- --ignored"]
fn dry_runs_of_a_baseline_and_of_frozen_models_log_decisions_or_refuse_clearly() {
    let mut lab = lab();
    let dir = tempfile::tempdir().unwrap();
    let mut ethtool = NetlinkCoalescer::new().unwrap();
    let original = ethtool.get(&lab.tap).unwrap();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/default");
    let model = model.to_str().unwrap();

    // A baseline by name, no latency source needed: 20 intervals (2 s), each a logged decision.
    let events = dry_run(&lab, config(&lab, dir.path(), None), "dim", 20).unwrap();
    let d = decisions(&events);
    assert_eq!(d.len(), 20, "{events:#?}");
    assert!(d.iter().all(|d| d["dry_run"] == true && d["policy"] == "dim"), "{d:#?}");
    assert!(
        d.iter().any(|d| d["inputs"]["nic"]["tx_pps"].as_f64().is_some_and(|pps| pps > 0.0)),
        "the UDP sent out of the veth end does not show: {d:#?}"
    );
    assert_eq!(ethtool.get(&lab.tap).unwrap(), original, "a dry run sets nothing");

    // The shipped model reads the NIC's interrupt rate and knobs, which a veth cannot provide, and
    // the probe's latency: it is refused at start with every missing feature named.
    let echo = lab.start_echo(7);
    let refused = dry_run(&lab, config(&lab, dir.path(), Some(echo)), model, 5).unwrap_err();
    let msg = format!("{refused:#}");
    assert!(msg.starts_with("refusing the deployed policy `model:default`"), "{msg}");
    let veth = format!(
        "`nic.rx_usecs`: {a}: its knobs cannot be read: {a}: this driver does not support",
        a = lab.a
    );
    assert!(msg.contains("`nic.irq_krate_ln`: no interrupt line") && msg.contains(&veth), "{msg}");
    assert!(!msg.contains("probe"), "the echo responder provides the probe features: {msg}");

    // A model trained (briefly) to ignore what a veth NIC cannot provide runs: 20 decisions with
    // round trips measured, and the tap untouched.
    let exp = dir.path().join("veth.toml");
    let scenario = Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments/scenarios/bulk-stream.toml");
    std::fs::write(
        &exp,
        format!(
            r#"name = "veth"
seed = 1
total_timesteps = 256
num_envs = 2
num_steps = 64
threads = 2
[suite]
scenarios = ["{}"]
[sim]
interval_us = 2000
episode_steps = 16
[ppo]
num_minibatches = 2
update_epochs = 1
[network]
hidden = [16]
ignore_features = ["nic.irq_krate_ln", "nic.rx_usecs", "nic.rx_frames", "nic.tx_usecs", "nic.tx_frames"]
[checkpoint]
every_iterations = 2
keep = 0
"#,
            scenario.display()
        ),
    )
    .unwrap();
    let run = dir.path().join("run");
    train::run(TrainArgs {
        experiment: exp,
        resume: None,
        out: Some(run.clone()),
        force: false,
        max_iterations: None,
        no_eval: true,
        seed: None,
    })
    .unwrap();
    let veth_model = run.join("model");
    let veth_model = veth_model.to_str().unwrap();
    // It was trained for the default profile, whose NIC has ethtool coalescing, which a veth
    // refuses: the deploy is refused, naming the difference, unless allowed.
    let refused = dry_run(&lab, config(&lab, dir.path(), Some(echo)), veth_model, 5).unwrap_err();
    let msg = format!("{refused:#}");
    assert!(msg.starts_with("refusing policy `model:model`: it was trained for hosts of profile"), "{msg}");
    assert!(
        msg.contains(&format!("({}): profile", lab.a)) && msg.contains("does not support it (EOPNOTSUPP)"),
        "{msg}"
    );
    assert!(msg.contains("--allow-profile-mismatch"), "{msg}");
    let events = dry_run_allowing(&lab, config(&lab, dir.path(), Some(echo)), veth_model, 20, true).unwrap();
    let d = decisions(&events);
    assert_eq!(d.len(), 20, "{events:#?}");
    assert!(d.iter().all(|d| d["dry_run"] == true && d["policy"] == "model:model"), "{d:#?}");
    assert!(d.iter().any(|d| d["inputs"]["probe"]["p99_us"].is_number()), "{d:#?}");
    assert_eq!(ethtool.get(&lab.tap).unwrap(), original, "a dry run sets nothing");
}
