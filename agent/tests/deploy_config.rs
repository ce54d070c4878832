//! The deploy config: the two examples load, and every kind of mistake names the file, the key and
//! the fix.

use std::path::{Path, PathBuf};

use moderato_agent::deploy::DeployConfig;
use moderato_env::live::Role;

fn example(role: &str) -> (String, PathBuf) {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments/deploy").join(format!("{role}.toml"));
    (std::fs::read_to_string(&path).unwrap(), path)
}

fn err(text: &str) -> String {
    format!("{:#}", DeployConfig::parse(text, Path::new("/etc/moderato/deploy.toml")).unwrap_err())
}

#[test]
fn the_host_example_loads_into_a_live_config() {
    let (text, path) = example("host");
    let cfg = DeployConfig::parse(&text, &path).unwrap();
    assert_eq!(cfg.role(None, &path).unwrap(), Role::Host);
    let live = cfg.live_config(Role::Host, &path).unwrap();
    assert_eq!(live.nic.as_ref().unwrap().name, "eth0");
    let backends: Vec<&str> = live.backends.iter().map(|b| b.as_ref().unwrap().name.as_str()).collect();
    assert_eq!(backends, ["vnet0", "vnet1"]);
    assert_eq!(live.vms(), 2);
    assert_eq!(live.interval.as_millis(), 1000);
    assert_eq!(live.probe.unwrap().target.to_string(), "192.0.2.10:7");
    assert_eq!(live.cpus, None);
    let limits = cfg.limits(Role::Host, &path).unwrap();
    assert_eq!(limits.nic.max_change_usecs, 32);
    assert_eq!(cfg.vm_names(), ["vm0", "vm1"]);
    // vm0 has its own target, vm1 is marked as having none.
    assert_eq!(live.objectives, [Some(150.0), None]);
    // The host example has no guest side.
    let e = format!("{:#}", cfg.live_config(Role::Guest, &path).unwrap_err());
    assert!(e.contains("key `guest`") && e.contains("Fix:"), "{e}");
}

#[test]
fn the_guest_example_loads_into_a_live_config() {
    let (text, path) = example("guest");
    let cfg = DeployConfig::parse(&text, &path).unwrap();
    assert_eq!(cfg.role(None, &path).unwrap(), Role::Guest);
    let live = cfg.live_config(Role::Guest, &path).unwrap();
    assert_eq!(live.frontend.as_ref().unwrap().name, "eth0");
    assert_eq!(live.vms(), 1);
    assert!(live.probe.is_none());
    assert_eq!(cfg.limits(Role::Guest, &path).unwrap().frontend.rx_frames.min, 1);
    let e = format!("{:#}", cfg.limits(Role::Host, &path).unwrap_err());
    assert!(e.contains("key `limits.nic`"), "{e}");
}

#[test]
fn every_key_of_the_examples_has_a_doc_comment_line() {
    for role in ["host", "guest"] {
        let (text, _) = example(role);
        let lines: Vec<&str> = text.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            let t = l.trim();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            let prev = lines[..i].iter().rev().find(|p| !p.trim().is_empty()).map_or("", |p| p.trim());
            assert!(prev.starts_with('#'), "{role}.toml line {}: `{t}` has no doc comment above it", i + 1);
        }
    }
}

#[test]
fn an_unknown_key_names_the_file_the_key_and_the_fix() {
    let (text, _) = example("guest");
    let e = err(&text.replace("interval_ms = 1000", "interval_ms = 1000\ncolour = \"blue\""));
    assert!(e.starts_with("/etc/moderato/deploy.toml: line "), "{e}");
    assert!(e.contains("key `colour`") && e.contains("unknown field `colour`"), "{e}");
    assert!(e.contains("Fix: remove the key or correct its spelling"), "{e}");

    let e = err(&text.replace("max_change_usecs = 16", "max_change_usec = 16"));
    assert!(e.contains("key `limits.frontend.max_change_usec`"), "{e}");

    let e = err(&text.replace("rx_usecs = { min = 0, max = 128 }", "rx_usecs = { min = 0, maxx = 128 }"));
    assert!(e.contains("key `limits.frontend.rx_usecs.maxx`"), "{e}");
}

#[test]
fn a_missing_key_names_the_key_and_says_to_add_it() {
    let (text, _) = example("guest");
    let without: String =
        text.lines().filter(|l| !l.starts_with("stale_after_intervals")).map(|l| format!("{l}\n")).collect();
    let e = err(&without);
    assert!(e.contains("missing field `stale_after_intervals`") && e.contains("Fix: add the key"), "{e}");
    let e = err(&text.replace("allow_adaptive = true", ""));
    assert!(e.contains("missing field `allow_adaptive`"), "{e}");
}

#[test]
fn bad_values_name_the_key_and_the_fix() {
    let (text, _) = example("host");
    let cases = [
        ("interval_ms = 1000", "interval_ms = \"fast\"", "key `interval_ms`"),
        (
            "interval_ms = 1000",
            "interval_ms = 5",
            "key `interval_ms`: 5 ms is out of range. Fix: use 10 to 3600000",
        ),
        ("stale_after_intervals = 3", "stale_after_intervals = 0", "key `stale_after_intervals`"),
        (
            "rx_usecs = { min = 0, max = 256 }",
            "rx_usecs = { min = 300, max = 200 }",
            "key `limits.nic.rx_usecs`: min 300 is above max 200. Fix: set min <= max",
        ),
        ("max_change_usecs = 32", "max_change_usecs = 0", "key `limits.nic.max_change_usecs`"),
        (
            "target = \"192.0.2.10:7\"",
            "target = \"echo-host\"",
            "key `latency.target`: `echo-host` is not an address:port",
        ),
        ("source = \"udp-echo\"", "source = \"icmp\"", "key `latency.source`"),
        ("name = \"vm1\"", "name = \"vm0\"", "two VMs are named `vm0`"),
    ];
    for (from, to, want) in cases {
        assert!(text.contains(from), "{from}");
        let e = err(&text.replacen(from, to, 1));
        assert!(e.contains(want), "{to}: {e}");
        assert!(e.starts_with("/etc/moderato/deploy.toml"), "{e}");
    }
}

#[test]
fn the_latency_source_and_its_keys_must_agree() {
    let (text, _) = example("host");
    let no_target: String =
        text.lines().filter(|l| !l.starts_with("target")).map(|l| format!("{l}\n")).collect();
    let e = err(&no_target);
    assert!(e.contains("key `latency.target`: missing") && e.contains("Fix: add target"), "{e}");
    let e = err(&text.replace("source = \"udp-echo\"", "source = \"none\""));
    assert!(e.contains("key `latency.target`: is set but `latency.source` is \"none\""), "{e}");
}

#[test]
fn the_role_comes_from_the_flag_or_the_one_section() {
    let (host, path) = example("host");
    let (guest, _) = example("guest");
    let guest_part = &guest[guest.find("[guest]").unwrap()..guest.find("[limits.frontend]").unwrap()];
    let both = host.replace(
        "# Safety bounds of the physical NIC",
        &format!("{guest_part}\n# Safety bounds of the physical NIC"),
    );
    let cfg = DeployConfig::parse(&both, &path).unwrap();
    let e = format!("{:#}", cfg.role(None, &path).unwrap_err());
    assert!(e.contains("both [host] and [guest]") && e.contains("--role"), "{e}");
    assert_eq!(cfg.role(Some(Role::Guest), &path).unwrap(), Role::Guest);
}

#[test]
fn an_interface_that_plays_two_layers_is_refused() {
    let (text, path) = example("host");
    let cfg = DeployConfig::parse(&text.replace("backend = \"vnet1\"", "backend = \"eth0\""), &path).unwrap();
    let e = format!("{:#}", cfg.live_config(Role::Host, &path).unwrap_err());
    assert!(e.contains("host.toml") && e.contains("`eth0` plays two layers"), "{e}");
}

#[test]
fn an_empty_deploy_config_is_an_error_not_a_panic() {
    // Issue 14: an empty file panicked in the key lookup of the error message (config.rs:111).
    for text in ["", "\n", "   \n\n", "# only a comment\n"] {
        let e = err(text);
        assert!(e.starts_with("/etc/moderato/deploy.toml: "), "{text:?}: {e}");
        assert!(e.contains("Fix: "), "{text:?}: {e}");
    }
    // One key short of everything, on the last line without a newline.
    let e = err("interval_ms = 1000");
    assert!(e.contains("missing field") && e.contains("Fix: add the key"), "{e}");
}

#[test]
fn the_state_dir_and_the_slo_guard_are_checked() {
    let (text, path) = example("host");
    let cfg = DeployConfig::parse(&text, &path).unwrap();
    assert_eq!(cfg.state_dir(), PathBuf::from("/run/moderato"));
    let slo = cfg.slo.clone().unwrap();
    assert_eq!((slo.p99_us, slo.after_intervals), (500.0, 3));
    let e = err(&text.replace("state_dir = \"/run/moderato\"", "state_dir = \"run/moderato\""));
    assert!(e.contains("key `state_dir`: `run/moderato` is not an absolute path"), "{e}");
    for (from, to, key) in [
        ("p99_us = 500.0", "p99_us = 0.0", "key `slo.p99_us`"),
        ("p99_us = 500.0", "p99_us = 1e308", "key `slo.p99_us`"),
        ("p99_us = 500.0", "p99_us = nan", "key `slo.p99_us`"),
        ("\nafter_intervals = 3", "\nafter_intervals = 0", "key `slo.after_intervals`"),
    ] {
        let e = err(&text.replace(from, to));
        assert!(e.contains(key) && e.contains("out of range") && e.contains("Fix: "), "{to}: {e}");
    }
    // A guard without a probe could never act.
    let none: String = text
        .lines()
        .filter(|l| !l.starts_with("target") && !l.starts_with("period_ms") && !l.starts_with("timeout_ms"))
        .map(|l| l.replace("source = \"udp-echo\"", "source = \"none\"") + "\n")
        .collect();
    let e = err(&none);
    assert!(e.contains("key `slo`: the guard needs a latency probe"), "{e}");
    let e = err(&text.replace("timeout_ms = 200", "timeout_ms = 99999999"));
    assert!(e.contains("key `latency.timeout_ms`") && e.contains("out of range"), "{e}");
}

#[test]
fn vm_objectives_default_to_the_slo_table_or_none_and_bad_ones_name_the_key() {
    let (text, path) = example("host");
    // Files from before per-VM objectives (no slo_p99_us keys): every VM gets [slo] p99_us where
    // there is an [slo] table, else no objective.
    let old: String = text.lines().filter(|l| !l.starts_with("slo_p99_us")).collect::<Vec<_>>().join("\n");
    let cfg = DeployConfig::parse(&old, &path).unwrap();
    let live = cfg.live_config(Role::Host, &path).unwrap();
    assert_eq!(live.objectives, [Some(500.0), Some(500.0)], "the host example's [slo] p99_us");
    let no_slo = old.split("\n[slo]").next().unwrap();
    let cfg = DeployConfig::parse(no_slo, &path).unwrap();
    assert_eq!(cfg.live_config(Role::Host, &path).unwrap().objectives, [None, None]);
    let (guest, gpath) = example("guest");
    let g = DeployConfig::parse(&guest, &gpath).unwrap();
    assert_eq!(g.live_config(Role::Guest, &gpath).unwrap().objectives, [None]);
    let own = guest.replace("# slo_p99_us = 200", "slo_p99_us = 200");
    let g = DeployConfig::parse(&own, &gpath).unwrap();
    assert_eq!(g.live_config(Role::Guest, &gpath).unwrap().objectives, [Some(200.0)]);
    // Out of range, or neither a number nor "none": the key and the fix.
    let e = err(&text.replace("slo_p99_us = 150", "slo_p99_us = 0"));
    assert!(
        e.contains("key `host.vms[0].slo_p99_us`") && e.contains("Fix:") && e.contains("\"none\""),
        "{e}"
    );
    let e = err(&guest.replace("# slo_p99_us = 200", "slo_p99_us = \"soon\""));
    assert!(e.contains("soon") && e.contains("\"none\""), "{e}");
}

#[test]
fn the_controllers_gains_are_read_checked_and_reach_the_policy() {
    let (text, path) = example("host");
    assert!(DeployConfig::parse(&text, &path).unwrap().gains().is_default(), "no table: the defaults");
    let with = format!("{text}\n[slo_feedback]\nstart = 8.0\n\n[trim]\nwindow = 4\n");
    let cfg = DeployConfig::parse(&with, &path).unwrap();
    let gains = cfg.gains();
    assert_eq!(gains.trim.window, 4);
    assert_eq!(gains.trim.setpoint, 0.8, "an absent key keeps its default");
    // slo-feedback starts a VM at the configured level when its probe first reports (here a p99
    // of 140 µs, inside the band where the level holds): 8 is the ladder's top (256 µs / 128
    // frames) where the default (2) is 4 µs / 4 frames.
    let mut obs = moderato_env::Observation { guests: vec![Default::default()], ..Default::default() };
    obs.host.probe = Some(moderato_env::ProbeObs { p50_us: 80.0, p99_us: 140.0, samples: 100 });
    let knobs = |g: &moderato_policies::gains::ControllerGains| {
        let mut p = moderato_agent::resolve::deploy_policy("slo-feedback", 1, Some(200.0), &[], g).unwrap();
        p.act(&obs).vms[0].backend.rx
    };
    assert_eq!(knobs(&gains), moderato_env::Moderation::fixed(256, 128));
    assert_eq!(knobs(&Default::default()), moderato_env::Moderation::fixed(4, 4));

    let e = err(&format!("{text}\n[trim]\nwindow = 0\n"));
    assert!(
        e.contains("/etc/moderato/deploy.toml") && e.contains("[trim] window = 0") && e.contains("Fix:"),
        "{e}"
    );
    let e = err(&format!("{text}\n[slo_feedback]\nsetpont = 0.7\n"));
    assert!(e.contains("setpont") && e.contains("Fix:"), "{e}");
}
