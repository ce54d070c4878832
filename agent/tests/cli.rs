//! The `moderato` binary as a user types it: one grammar, old spellings, completions, man page,
//! version, and simulate's policies, bounds, warm-up and summary.

use std::path::Path;
use std::process::{Command, Output};

fn moderato(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moderato"))
        .args(args)
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .env("RUST_LOG", "info")
        .output()
        .expect("the moderato binary runs")
}

fn ok(args: &[&str]) -> String {
    let o = moderato(args);
    assert!(o.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

fn fails(args: &[&str]) -> String {
    let o = moderato(args);
    assert!(!o.status.success(), "{args:?} succeeded");
    String::from_utf8(o.stderr).unwrap()
}

const RR: &str = "experiments/scenarios/rr-latency.toml";

#[test]
fn version_names_the_source_revision() {
    let v = ok(&["--version"]);
    let rev = v
        .trim()
        .strip_prefix(concat!("moderato ", env!("CARGO_PKG_VERSION"), " ("))
        .unwrap_or_else(|| panic!("{v}"));
    assert!(rev.ends_with(')') && rev.len() > 1, "{v}");
}

#[test]
fn completions_and_man_page() {
    let bash = ok(&["completions", "bash"]);
    assert!(bash.contains("_moderato") && bash.contains("simulate") && bash.contains("--policy"), "bash");
    assert!(ok(&["completions", "zsh"]).contains("#compdef moderato"));
    let man = ok(&["man"]);
    assert!(man.contains(".TH moderato") && man.contains("simulate"), "{man}");
    let dir = tempfile::tempdir().unwrap();
    ok(&["man", "--out", dir.path().to_str().unwrap()]);
    for page in ["moderato.1", "moderato-train.1", "moderato-deploy.1"] {
        assert!(dir.path().join(page).is_file(), "{page} missing");
    }
    let e = fails(&["completions", "tcsh"]);
    assert!(e.contains("tcsh") && e.contains("bash"), "{e}");
}

#[test]
fn simulate_old_and_new_spellings_agree() {
    let new = ok(&["simulate", RR, "--policy", "static:16/16", "--steps", "3", "--quiet"]);
    let old = ok(&["simulate", RR, "--settings", "static:16/16", "--steps", "3", "--quiet"]);
    assert_eq!(new, old);
    assert!(new.contains("under static:16/16"), "{new}");
}

#[test]
fn simulate_per_layer_knobs_and_bounds() {
    let per_layer =
        ok(&["simulate", RR, "--policy", "nic=20/32,backend=0/1,frontend=8/16", "--steps", "3", "--quiet"]);
    assert!(per_layer.contains("under static:nic=20/32,backend=0/1,frontend=8/16"), "{per_layer}");
    let uniform = ok(&["simulate", RR, "--policy", "static:20/32", "--steps", "3", "--quiet"]);
    assert_ne!(per_layer.lines().skip(2).collect::<Vec<_>>(), uniform.lines().skip(2).collect::<Vec<_>>());
    let e = fails(&["simulate", RR, "--policy", "static:1000000/4", "--steps", "3"]);
    assert!(e.contains("1000000") && e.contains("bound 1000"), "{e}");
    let e = fails(&["simulate", RR, "--policy", "dimm", "--steps", "3"]);
    assert!(e.contains("valid names") && !e.contains("best-static"), "{e}");
    let e = fails(&["simulate", RR, "--policy", "best-static", "--steps", "3"]);
    assert!(e.contains("moderato eval"), "{e}");
    let e = fails(&["simulate", RR, "--policy", "nic=20/32,bakend=1/1", "--steps", "3"]);
    assert!(e.contains("bakend") && e.contains("not a layer"), "{e}");
}

#[test]
fn simulate_summary_counts_after_the_warm_up_and_gives_the_simulated_time() {
    let out = ok(&["simulate", RR, "--steps", "3", "--warmup", "2", "--interval-ms", "10"]);
    assert!(out.contains("warm-up of 2 intervals ends"), "{out}");
    // The reset interval, 2 warm-up and 3 counted intervals: 60 ms simulated, 30 ms counted.
    assert!(out.contains("0.060 s simulated"), "{out}");
    assert!(out.contains("the last 3 intervals, 0.030 s"), "{out}");
    assert!(out.contains("violated in") && out.contains("of 3 intervals"), "{out}");
    // 0.03 s is three 10 ms intervals (floating point once made it four).
    let out = ok(&["simulate", RR, "--seconds", "0.03", "--quiet"]);
    assert!(out.contains("the last 3 intervals, 0.030 s") && out.contains("0.040 s simulated"), "{out}");
    let bulk = ok(&["simulate", "experiments/scenarios/bulk-tx.toml", "--steps", "2", "--quiet"]);
    assert!(bulk.contains("none latency-sensitive") && bulk.contains("has none (bulk only)"), "{bulk}");
}

#[test]
fn observe_takes_the_config_first_or_the_old_flag() {
    // A config that does not exist: both spellings reach the loader with the same path.
    let new = fails(&["observe", "no-such.toml", "--steps", "1"]);
    let old = fails(&["observe", "--config", "no-such.toml", "--count", "1"]);
    assert!(new.contains("no-such.toml"), "{new}");
    assert_eq!(new, old);
    let e = fails(&["observe", "a.toml", "--config", "b.toml"]);
    assert!(e.contains("cannot be used with"), "{e}");
}

/// `moderato simulate … | head -1`: the reader closes the pipe after one line, and the command
/// ends quietly and successfully, as Unix tools do, instead of panicking.
#[test]
fn simulate_into_a_pipe_closed_early_ends_quietly() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_moderato"))
        .args(["simulate", RR, "--steps", "20000", "--policy", "per-packet"])
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the moderato binary runs");
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
    assert!(first.contains("t_ms"), "{first}");
    // The reader is gone: every later row is a write into a closed pipe.
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}: {err}", out.status);
    assert!(!err.contains("panicked") && !err.contains("error"), "{err}");
}

#[test]
fn a_model_under_the_trim_is_named_trim_and_a_missing_model_is_refused_naming_it() {
    let out = ok(&["simulate", RR, "--policy", "trim:models/default", "--steps", "5", "--quiet"]);
    assert!(out.contains("under trim:models/default"), "{out}");
    let err = fails(&["simulate", RR, "--policy", "trim:models/nowhere", "--steps", "5"]);
    assert!(err.contains("trim:models/nowhere") && err.contains("frozen-model directory"), "{err}");
}

#[test]
fn trim_targets_is_the_trim_without_its_floors() {
    // A pre-NAPI host's throughput-only stream: the floors coalesce it heavily, the trim of
    // targets alone leaves it to the model (which holds its p99 near 60 µs).
    let ramp = "experiments/scenarios/validation/ramp-25g-no-napi.toml";
    let cpu = |policy: &str| -> f64 {
        let out = ok(&["simulate", ramp, "--policy", policy, "--steps", "30", "--quiet"]);
        assert!(out.contains(&format!("under {policy}")), "{out}");
        let line = out.lines().find(|l| l.trim_start().starts_with("CPU µs/packet")).expect("a CPU line");
        line.split_whitespace().nth(2).and_then(|x| x.parse().ok()).unwrap_or_else(|| panic!("{line}"))
    };
    let (full, targets, bare) =
        (cpu("trim:models/default"), cpu("trim-targets:models/default"), cpu("models/default"));
    assert!(full < 0.8 * targets, "with floors {full} µs/pkt, without {targets}");
    assert!(
        (targets - bare).abs() < 1e-9,
        "no target to trim: the trim of targets is the model ({targets} vs {bare})"
    );
    let err = fails(&["simulate", RR, "--policy", "trim-targets:models/nowhere", "--steps", "5"]);
    assert!(err.contains("trim-targets:models/nowhere") && err.contains("frozen-model directory"), "{err}");
}

#[test]
fn simulate_takes_the_controllers_gains_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gains.toml");
    let p99 = |extra: &[&str]| -> f64 {
        let mut args = vec!["simulate", RR, "--policy", "slo-feedback:200", "--steps", "30", "--quiet"];
        args.extend_from_slice(extra);
        let out = ok(&args);
        let line = out.lines().find(|l| l.trim_start().starts_with("latency µs")).expect("a latency line");
        let at = line.split_whitespace().position(|w| w == "p99").expect("p99");
        line.split_whitespace().nth(at + 1).and_then(|x| x.parse().ok()).unwrap_or_else(|| panic!("{line}"))
    };
    std::fs::write(&file, "[slo_feedback]\nsetpoint = 0.4\nheadroom = 0.3\n").unwrap();
    let f = file.to_str().unwrap();
    let (tight, default) = (p99(&["--gains", f]), p99(&[]));
    assert!(tight < 0.8 * default, "p99 {tight} µs at setpoint 0.4 against {default} at 0.8");
    std::fs::write(&file, "[slo_feedback]\nsetpont = 0.4\n").unwrap();
    let err = fails(&["simulate", RR, "--policy", "slo-feedback:200", "--gains", f]);
    assert!(err.contains("gains.toml") && err.contains("setpont"), "{err}");
}

#[test]
fn simulate_runs_a_scenario_as_another_profile_and_prints_the_knobs_in_force() {
    let out =
        ok(&["simulate", RR, "--profile", "kvm-vhost", "--policy", "napi:2/20", "--steps", "2", "--knobs"]);
    let knobs: Vec<&str> = out.lines().filter(|l| l.trim_start().starts_with("knobs")).collect();
    assert_eq!(knobs.len(), 2, "one knobs line per interval: {out}");
    for l in &knobs {
        assert!(l.contains("nic rx 0/1 tx 0/1 napi 2/20"), "{l}");
        // Stock KVM: vhost has no knobs, virtio-net without NOTF_COAL only its deferral.
        assert!(l.contains("| vm0 backend rx - tx - frontend rx - tx - napi 2/20"), "{l}");
    }
    // As its own profile the same scenario's layers are set by ethtool too.
    let own = ok(&["simulate", RR, "--policy", "static:16/16", "--steps", "1", "--knobs"]);
    assert!(own.contains("nic rx 16/16 tx 16/16 napi 0/0"), "{own}");
    let quiet = ok(&["simulate", RR, "--steps", "1", "--knobs", "--quiet"]);
    assert!(!quiet.contains("knobs"), "{quiet}");
    let e = fails(&["simulate", RR, "--profile", "kvm-vhos", "--steps", "1"]);
    assert!(e.contains("kvm-vhos") && e.contains("kvm-vhost"), "{e}");
}

#[test]
fn simulate_runs_a_model_under_the_bounds_it_was_trained_with() {
    // The shipped model with its deferral bounds narrowed (a deliberate edit, resealed): it
    // decodes into them, and simulate has no config to set them but takes the model's.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("narrow");
    std::fs::create_dir(&dir).unwrap();
    for f in ["actor.bpk", "model.json"] {
        std::fs::copy(root.join("models/default").join(f), dir.join(f)).unwrap();
    }
    let p = dir.join("model.json");
    let mut m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    m["action_space"]["napi"]["defer_max"] = 2.into();
    m["action_space"]["napi"]["timeout_us_max"] = 30.into();
    std::fs::write(&p, m.to_string()).unwrap();
    moderato_policies::learned::LearnedPolicy::reseal(&dir).unwrap();
    let d = dir.to_str().unwrap();
    let out = ok(&["simulate", RR, "--profile", "kvm-vhost", "--policy", d, "--steps", "3", "--knobs"]);
    let napi: Vec<(u32, u32)> = out
        .lines()
        .filter(|l| l.trim_start().starts_with("knobs"))
        .flat_map(|l| l.split("napi ").skip(1).map(|x| x.split_whitespace().next().unwrap().to_string()))
        .map(|x| {
            let (d, t) = x.split_once('/').unwrap();
            (d.parse().unwrap(), t.parse().unwrap())
        })
        .collect();
    assert!(!napi.is_empty(), "{out}");
    assert!(napi.iter().all(|&(d, t)| d <= 2 && t <= 30), "{napi:?}");
}
