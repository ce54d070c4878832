//! Regression tests for inputs that used to panic, abort or hang the simulator (found by fuzzing
//! the shipped scenarios, issue 14): each now ends in an error that names the file, the key, the
//! value and the fix, before anything is allocated or simulated.

use std::path::Path;

use moderato_env::sim::{Scenario, SimConfig, SimEnv};

const BASE: &str = r#"
name = "t"
[host]
cpus = 2
[[vm]]
name = "a"
[[vm.flow]]
kind = "request-response"
arrivals = { process = "poisson", rate_pps = 1000 }
"#;

/// Loads `text` as `dir/case.toml` and returns the error, which must name the file.
fn load_err(dir: &Path, text: &str) -> String {
    let path = dir.join("case.toml");
    std::fs::write(&path, text).unwrap();
    let e = match Scenario::load(&path) {
        Ok(s) => panic!("accepted: {s:?}"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("case.toml"), "the error names the file: {e}");
    e
}

fn with_arrivals(arrivals: &str) -> String {
    BASE.replace(r#"{ process = "poisson", rate_pps = 1000 }"#, arrivals)
}

#[test]
fn base_scenario_loads_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ok.toml"), BASE).unwrap();
    let s = Scenario::load(dir.path().join("ok.toml")).unwrap();
    SimEnv::new(s, SimConfig::default(), None).unwrap();
}

#[test]
fn host_cpus_u64_max_is_refused_not_a_capacity_overflow() {
    let dir = tempfile::tempdir().unwrap();
    let e = load_err(dir.path(), &BASE.replace("cpus = 2", "cpus = 18446744073709551615"));
    assert!(e.contains("host.cpus") && e.contains("18446744073709551615"), "{e}");
}

#[test]
fn host_cpus_1e9_is_refused_not_an_allocation_abort() {
    let dir = tempfile::tempdir().unwrap();
    let e = load_err(dir.path(), &BASE.replace("cpus = 2", "cpus = 1000000000"));
    assert!(e.contains("host.cpus = 1000000000") && e.contains("at most 256"), "{e}");
    // As a float, too (TOML's 1e9): a type error, not an abort.
    let e = load_err(dir.path(), &BASE.replace("cpus = 2", "cpus = 1e9"));
    assert!(e.contains("line 4, column 8 (`cpus = 1e9`)") && e.contains("expected usize"), "{e}");
}

#[test]
fn onoff_with_both_rates_zero_is_refused_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let e = load_err(
        dir.path(),
        &with_arrivals(
            r#"{ process = "on-off", on_rate_pps = 0, off_rate_pps = 0, mean_on_ms = 1, mean_off_ms = 1 }"#,
        ),
    );
    assert!(e.contains("vm[0] (a).flow[0].arrivals.on_rate_pps = off_rate_pps = 0"), "{e}");
}

#[test]
fn onoff_with_1e_300_periods_is_refused_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let e = load_err(
        dir.path(),
        &with_arrivals(
            r#"{ process = "on-off", on_rate_pps = 1000, mean_on_ms = 1e-300, mean_off_ms = 1e-300 }"#,
        ),
    );
    assert!(e.contains("vm[0] (a).flow[0].arrivals.mean_on_ms = 1e-300"), "{e}");
    assert!(e.contains("milliseconds in [1e-3, 1e7]"), "{e}");
}

#[test]
fn trace_path_dev_zero_is_refused_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let e = load_err(dir.path(), &with_arrivals(r#"{ process = "trace", path = "/dev/zero" }"#));
    assert!(e.contains("arrivals.path = /dev/zero") && e.contains("not a regular file"), "{e}");
    // A directory is not a trace either.
    let e = load_err(dir.path(), &with_arrivals(r#"{ process = "trace", path = "." }"#));
    assert!(e.contains("not a regular file"), "{e}");
}

#[test]
fn trace_rows_are_bounded_in_time() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("t.csv"), "time_s,rate_pps\n0,10\n1e12,5\n").unwrap();
    let e = load_err(dir.path(), &with_arrivals(r#"{ process = "trace", path = "t.csv" }"#));
    assert!(e.contains("row 3: time_s = 1e12"), "{e}");
    std::fs::write(dir.path().join("t.csv"), "time_s,rate_pps\n0,10\n1,5\n").unwrap();
    let e = load_err(dir.path(), &with_arrivals(r#"{ process = "trace", path = "t.csv", scale = 1e9 }"#));
    assert!(e.contains("scale = 1e9"), "{e}");
}

#[test]
fn every_numeric_scenario_key_has_an_upper_bound() {
    let dir = tempfile::tempdir().unwrap();
    for (from, to, key) in [
        ("cpus = 2", "cpus = 2\nnic_rx_ring = 100000000", "host.nic_rx_ring"),
        ("cpus = 2", "cpus = 2\nswitch_buffer = 100000000", "host.switch_buffer"),
        ("cpus = 2", "cpus = 2\nworker_batch = 4000000000", "host.worker_batch"),
        ("cpus = 2", "cpus = 2\nline_rate_gbps = 1e300", "host.line_rate_gbps"),
        ("name = \"a\"", "name = \"a\"\nring = 100000000", "vm[0] (a).ring"),
        ("name = \"a\"", "name = \"a\"\nsocket_buffer = 100000000", "vm[0] (a).socket_buffer"),
        ("rate_pps = 1000", "rate_pps = 1e9", "arrivals.rate_pps = 1e9"),
        ("kind = \"request-response\"", "kind = \"request-response\"\napp_us = 1e300", "app_us"),
    ] {
        let e = load_err(dir.path(), &BASE.replace(from, to));
        assert!(e.contains(key), "{key}: {e}");
    }
    let e = load_err(
        dir.path(),
        &with_arrivals(r#"{ process = "closed-loop", clients = 100000, think_us = 0, timeout_us = 1 }"#),
    );
    assert!(e.contains("timeout_us = 1:") && e.contains("fewer clients"), "{e}");
    let e = load_err(
        dir.path(),
        &with_arrivals(r#"{ process = "diurnal", mean_pps = 1000, amplitude = 0.5, period_s = 1e-300 }"#),
    );
    assert!(e.contains("period_s"), "{e}");
    let e = load_err(
        dir.path(),
        &with_arrivals(r#"{ process = "ramp", from_pps = 0, to_pps = 1, over_s = 1e300 }"#),
    );
    assert!(e.contains("over_s"), "{e}");
}

#[test]
fn scenario_name_cannot_leave_its_directory() {
    let dir = tempfile::tempdir().unwrap();
    let e = load_err(dir.path(), &BASE.replace("name = \"t\"", "name = \"../../../../tmp/x\""));
    assert!(e.contains("name = \"../../../../tmp/x\"") && e.contains("rename it"), "{e}");
}

#[test]
fn episode_steps_4e9_is_refused() {
    let c = SimConfig { episode_steps: 4_000_000_000, ..SimConfig::default() };
    let e = c.validate().unwrap_err();
    assert!(e.contains("episode_steps = 4000000000") && e.contains("at most 10000000"), "{e}");
    // Within the step bound, the episode's length in simulated time is bounded too.
    let c = SimConfig { episode_steps: 10_000, interval_us: 60_000_000, ..SimConfig::default() };
    let e = c.validate().unwrap_err();
    assert!(e.contains("simulated seconds"), "{e}");
}

#[test]
fn slo_1e308_is_refused() {
    let mut c = SimConfig::default();
    c.reward.slo_p99_us = 1e308;
    let e = c.validate().unwrap_err();
    assert!(e.contains("reward.slo_p99_us = 1e308") && e.contains("microseconds"), "{e}");
}

#[test]
fn action_space_and_initial_settings_are_bounded() {
    let mut c = SimConfig::default();
    c.action_space.nic.frames_max = 0;
    assert!(c.validate().unwrap_err().contains("action_space.nic.frames_max = 0"));
    let mut c = SimConfig::default();
    c.action_space.napi.timeout_us_min = 600;
    let e = c.validate().unwrap_err();
    assert!(
        e.contains("action_space.napi.timeout_us_min = 600") && e.contains("timeout_us_max = 500"),
        "{e}"
    );
    let mut c = SimConfig::default();
    let mut init = moderato_env::CoalescingSettings::per_packet(1);
    init.nic = moderato_env::LayerSettings::fixed(
        moderato_env::Knobs::new(5000, 1),
        moderato_env::Knobs::PER_PACKET,
    );
    c.initial = Some(init);
    let e = c.validate().unwrap_err();
    assert!(e.contains("initial: nic rx = 5000us/1f is outside action_space.nic"), "{e}");
}

#[test]
fn scenario_file_dev_zero_is_refused_not_a_hang() {
    // An eval config listing "/dev/zero" as a scenario read it forever (found by the fuzz test).
    let e = Scenario::load("/dev/zero").unwrap_err().to_string();
    assert!(e.contains("/dev/zero") && e.contains("not a regular file"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let e = Scenario::load(dir.path()).unwrap_err().to_string();
    assert!(e.contains("not a regular file"), "{e}");
}
