//! Decision logs, human and JSON, captured from the deploy loop on a fake `Coalescer` and a copy of
//! the virtio guest fixture tree.
//!
//! One test in its own binary, formats in turn: tracing caches per-callsite interest globally, and
//! a test thread without a subscriber that hits a callsite while another thread installs a scoped
//! one can leave that callsite disabled for it (a harness artefact; the binary sets one global
//! subscriber).

use moderato_agent::deploy::{self, LogFormat};
use moderato_env::{CoalescingSettings, Moderation};
use tokio::sync::watch;

mod common;

use common::{Buf, Rig, Scripted, frontend, make, opts, rt};

fn run_logged(format: LogFormat) -> String {
    let buf = Buf::default();
    let b2 = buf.clone();
    let _guard = tracing::subscriber::set_default(deploy::subscriber(format, false, move || b2.clone()));
    let mut rig = Rig::new();
    let want = frontend(Moderation::fixed(400, 16), Moderation::fixed(40, 16));
    let lp = make(
        &mut rig,
        Scripted::fixed("steady", want),
        Scripted::fixed("steady", CoalescingSettings::per_packet(1)),
        opts(Some(2)),
    );
    let (_tx, rx) = watch::channel(false);
    rt().block_on(lp.run(rx)).unwrap();
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
    // Inputs, decision and applied knobs are JSON values, not prose (issue 15).
    assert!(d["inputs"]["frontend"]["rx_pps"].is_number(), "{d}");
    assert!(d["inputs"]["cpu"]["irq"].is_number(), "{d}");
    assert!(d["inputs"]["probe"].is_null(), "no probe configured: {d}");
    assert_eq!(d["inputs"]["complete"], true, "{d}");
    let fe = |v: &serde_json::Value| v["vm0.frontend"].clone();
    assert_eq!(
        fe(&d["decided"]),
        serde_json::json!({"interface": "eth0", "rx": {"usecs": 400, "frames": 16}, "tx": {"usecs": 40, "frames": 16}})
    );
    assert_eq!(
        fe(&d["applied"]),
        serde_json::json!({"interface": "eth0", "rx": {"usecs": 16, "frames": 9}, "tx": {"usecs": 16, "frames": 9}})
    );
    let limited = d["limited"].as_array().unwrap();
    assert!(limited.iter().any(|n| n.as_str().unwrap().contains("max change per step")), "{d}");
    assert_eq!(d["level"], "INFO");
    assert_eq!(d["target"], "moderato::deploy");
    assert!(events.iter().any(|e| e["message"] == "restored the original settings"));
    assert!(events.iter().any(|e| e["original"].as_str().is_some_and(|o| o.contains("rx-usecs 0"))));

    let text = run_logged(LogFormat::Human);
    let decisions: Vec<&str> = text.lines().filter(|l| l.contains(" decision ")).collect();
    assert_eq!(decisions.len(), 2, "{text}");
    assert!(
        decisions[1].contains("step=2")
            && decisions[1].contains("inputs={")
            && decisions[1].contains("\"frontend\":{"),
        "{}",
        decisions[1]
    );
    assert!(text.contains("deploy loop starting"), "{text}");
    assert!(!text.contains('\u{1b}'), "no colours when writing to a file");
}
