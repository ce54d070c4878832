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
