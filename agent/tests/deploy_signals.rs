//! Every catchable terminating signal stops `moderato deploy` through its restore path, with a
//! zero exit and a summary (issue 14: SIGHUP and SIGUSR1 used to kill it, 129 and 138, with the
//! host's settings left changed). Run as a separate process on loopback as the "NIC" (observe-only:
//! nothing is set), so it needs no privilege; the same with a tap whose knob is really set is in
//! `deploy_netns.rs` (root).

use std::path::{Path, PathBuf};
use std::time::Duration;

mod common;

use common::process::Proc;

fn lo_config(dir: &Path) -> PathBuf {
    let text = format!(
        r#"interval_ms = 50
fallback = "per-packet"
stale_after_intervals = 3
state_dir = "{}"
[host]
nic = "lo"
[limits.nic]
rx_usecs = {{ min = 0, max = 64 }}
rx_frames = {{ min = 0, max = 64 }}
tx_usecs = {{ min = 0, max = 64 }}
tx_frames = {{ min = 0, max = 64 }}
max_change_usecs = 8
max_change_frames = 8
allow_adaptive = false
[limits.backend]
rx_usecs = {{ min = 0, max = 64 }}
rx_frames = {{ min = 0, max = 64 }}
tx_usecs = {{ min = 0, max = 64 }}
tx_frames = {{ min = 0, max = 64 }}
max_change_usecs = 8
max_change_frames = 8
allow_adaptive = false
[latency]
source = "none"
"#,
        dir.join("state").display()
    );
    let p = dir.join("deploy.toml");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn sighup_sigquit_sigusr1_and_every_other_stop_signal_end_the_deploy_through_its_restore() {
    let dir = tempfile::tempdir().unwrap();
    let config = lo_config(dir.path());
    for (name, _) in moderato_agent::deploy::STOP_SIGNALS {
        let mut p = Proc::deploy("static:16/8", &config, &[], None);
        p.wait_for(Duration::from_secs(20), "a decision", |e| e["message"] == "decision");
        p.signal(name.trim_start_matches("SIG"));
        let st = p.wait(Duration::from_secs(20));
        let text = p.text();
        assert!(st.success(), "{name}: exit {st}\n{text}");
        let events = p.events();
        assert!(events.iter().any(|e| e["signal"] == name), "{name}:\n{text}");
        let stop = events.iter().find(|e| e["message"] == "deploy loop stopped (Shutdown)");
        let stop = stop.unwrap_or_else(|| panic!("{name}: no summary\n{text}"));
        assert_eq!(stop["restore_failures"], 0, "{name}:\n{text}");
    }
}

#[test]
fn a_second_deploy_on_the_same_interface_is_refused_naming_the_first_ones_pid() {
    let dir = tempfile::tempdir().unwrap();
    let config = lo_config(dir.path());
    let mut first = Proc::deploy("static:16/8", &config, &[], None);
    first.wait_for(Duration::from_secs(20), "a decision", |e| e["message"] == "decision");
    let mut second = Proc::deploy("static:32/32", &config, &["--steps", "3"], None);
    let st = second.wait(Duration::from_secs(20));
    let text = second.text();
    assert!(!st.success(), "{text}");
    let want = format!("refusing to deploy on lo: it is already controlled by PID {}", first.pid());
    assert!(text.contains(&want), "{text}");
    assert!(!second.events().iter().any(|e| e["message"] == "decision"), "{text}");
    // The error is a JSON event too (issue 15: fatal errors through tracing).
    assert!(
        second.events().iter().any(|e| e["message"] == "deploy failed" && e["level"] == "ERROR"),
        "{text}"
    );
    first.signal("TERM");
    assert!(first.wait(Duration::from_secs(20)).success(), "{}", first.text());
}
