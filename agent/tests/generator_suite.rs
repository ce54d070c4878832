//! `[suite.generator]` in experiment configs and `moderato scenarios`: the generalist config
//! loads and round-trips, bad generator keys are named, training steps generated hosts of every
//! size, and `scenarios sample` writes replayable, deterministic scenario files.

use std::path::Path;
use std::process::{Command, Output};

use moderato_agent::train::metrics::Memory;
use moderato_agent::train::ppo::suite_envs;
use moderato_agent::train::{ExperimentConfig, Trainer, train_device};
use moderato_env::Env;
use moderato_env::sim::Scenario;
use moderato_env::sim::generator::GeneratorSpec;

fn experiments() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments")
}

fn moderato(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moderato"))
        .args(args)
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .output()
        .expect("the moderato binary runs")
}

#[test]
fn the_generalist_config_loads_and_its_resolved_toml_round_trips() {
    let exp = ExperimentConfig::load(&experiments().join("ppo-generalist.toml"))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let g = exp.config.suite.generator.as_ref().expect("ppo-generalist has a generator");
    // The defaults, written out, and the three host profiles.
    let profiles = vec![
        moderato_env::HostProfile::KvmNotfCoal,
        moderato_env::HostProfile::KvmVhost,
        moderato_env::HostProfile::Xen,
    ];
    assert_eq!(
        g,
        &GeneratorSpec { profiles, ..Default::default() },
        "ppo-generalist writes out the defaults"
    );
    assert_eq!(exp.config.suite.generator_share(), 0.6);
    assert_eq!(exp.max_vms(), 4);
    // The run's config.toml (checked again on resume and read by export) parses back to it.
    let back: ExperimentConfig = toml::from_str(&exp.toml).unwrap();
    assert_eq!(back, exp.config);
    // Configs without a generator resolve as before: no new keys in their TOML.
    let std = ExperimentConfig::load(&experiments().join("ppo-standard.toml")).unwrap();
    assert!(!std.toml.contains("generator"), "{}", std.toml);
    assert_eq!(std.max_vms(), 2);
}

#[test]
fn bad_generator_configs_name_the_key() {
    let base = experiments().join("ppo-generalist.toml");
    let text = std::fs::read_to_string(&base).unwrap();
    let cases = [
        (text.replace("cpus = [1, 4]", "cpus = [3, 1]"), "suite.generator.cpus = [3, 1]"),
        (text.replace("cpus = [1, 4]", "cpu = [1, 4]"), "cpu"),
        (text.replace("load = [0.05, 1.1]", "load = [0.05, 5.0]"), "suite.generator.load = [0.05, 5]"),
        (text.replace("p_jumbo = 0.2", "p_jumbo = 2.0"), "suite.generator.p_jumbo = 2"),
        (text.replace("\"trace\"]", "\"tracefile\"]"), "tracefile"),
        (text.replace("generator_share = 0.6", "generator_share = 1.5"), "suite.generator_share = 1.5"),
    ];
    for (bad, key) in &cases {
        let e = format!("{:#}", ExperimentConfig::parse(bad, &base).unwrap_err());
        assert!(e.contains("ppo-generalist.toml") && e.contains(key), "expected `{key}` in: {e}");
    }
    // The list may be empty only when the generator draws every episode and nothing evaluates on it.
    let start = text.find("scenarios = [").unwrap();
    let end = start + text[start..].find(']').unwrap() + 1;
    let empty = format!("{}scenarios = []{}", &text[..start], &text[end..])
        .replace("generator_share = 0.6", "generator_share = 1.0");
    let e = format!("{:#}", ExperimentConfig::parse(&empty, &base).unwrap_err());
    assert!(e.contains("final evaluation") && e.contains("evaluation.enabled = false"), "{e}");
    let no_eval = empty.replace("[evaluation]", "[evaluation]\nenabled = false");
    ExperimentConfig::parse(&no_eval, &base).unwrap();
    let half = no_eval.replace("generator_share = 1.0", "generator_share = 0.5");
    let e = format!("{:#}", ExperimentConfig::parse(&half, &base).unwrap_err());
    assert!(e.contains("suite.generator_share = 0.5") && e.contains("empty"), "{e}");
    let orphan = std::fs::read_to_string(experiments().join("ppo-standard.toml"))
        .unwrap()
        .replace("rate_scale = [0.7, 1.3]", "rate_scale = [0.7, 1.3]\ngenerator_share = 0.5");
    let e = format!(
        "{:#}",
        ExperimentConfig::parse(&orphan, &experiments().join("ppo-standard.toml")).unwrap_err()
    );
    assert!(e.contains("no [suite.generator]"), "{e}");
}

const TINY: &str = r#"
name = "tiny-generalist"
seed = 5
total_timesteps = 128
num_envs = 4
num_steps = 16
threads = 1
[suite]
scenarios = []
[suite.generator]
vms = [1, 4]
[sim]
interval_us = 1000
episode_steps = 8
[ppo]
num_minibatches = 2
update_epochs = 1
[network]
hidden = [8]
[evaluation]
enabled = false
"#;

#[test]
fn training_draws_generated_hosts_of_every_size_and_steps_them() {
    let exp =
        ExperimentConfig::parse(TINY, &experiments().join("tiny.toml")).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(exp.max_vms(), 4);
    let make = suite_envs(&exp, None);
    let mut sizes = std::collections::BTreeSet::new();
    for seed in 0..64 {
        let mut env = make(seed).unwrap();
        let vms = env.spec().vms;
        assert!((1..=4).contains(&vms));
        sizes.insert(vms);
        // The same episode seed builds the same host.
        let (a, _) = env.reset(seed).unwrap();
        let (b, _) = make(seed).unwrap().reset(seed).unwrap();
        assert_eq!(format!("{a:?}"), format!("{b:?}"), "seed {seed}");
    }
    assert_eq!(sizes.len(), 4, "{sizes:?}");
    // Two PPO iterations over such hosts, padded to four VMs.
    let vmax = exp.max_vms();
    let mut t = Trainer::with_envs(exp.clone(), train_device(), suite_envs(&exp, None), vmax);
    let mut m = Memory::default();
    for _ in 0..2 {
        let s = t.iteration(&mut m).unwrap();
        assert!(s.episodic_return.is_finite(), "{s:?}");
    }
}

#[test]
fn scenarios_sample_writes_replayable_deterministic_files() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let exp = "experiments/ppo-generalist.toml";
    for out in [&a, &b] {
        let o = moderato(&[
            "scenarios",
            "sample",
            exp,
            "--count",
            "12",
            "--out",
            out.to_str().unwrap(),
            "--seed",
            "9",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(String::from_utf8_lossy(&o.stdout).contains("estimated load"));
    }
    let mut files: Vec<_> = std::fs::read_dir(&a).unwrap().map(|e| e.unwrap().path()).collect();
    files.retain(|p| p.extension().is_some_and(|x| x == "toml"));
    files.sort();
    assert_eq!(files.len(), 12);
    for f in &files {
        let twin = b.join(f.file_name().unwrap());
        assert_eq!(std::fs::read(f).unwrap(), std::fs::read(&twin).unwrap(), "{}", f.display());
        Scenario::load(f).unwrap_or_else(|e| panic!("{e}"));
    }
    // Every written file passes `scenarios check`, and one replays in the simulator.
    let mut args = vec!["scenarios", "check"];
    let names: Vec<String> = files.iter().map(|f| f.to_str().unwrap().to_string()).collect();
    args.extend(names.iter().map(String::as_str));
    let o = moderato(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let o = moderato(&["simulate", &names[0], "--policy", "static:moderate", "--steps", "2", "--quiet"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Another seed draws other hosts; a second sample into a full directory is refused.
    let o = moderato(&["scenarios", "sample", exp, "--count", "12", "--out", a.to_str().unwrap()]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("not empty"));
    let c = dir.path().join("c");
    let o =
        moderato(&["scenarios", "sample", exp, "--count", "3", "--out", c.to_str().unwrap(), "--seed", "10"]);
    assert!(o.status.success());
    assert!(std::fs::read_dir(&c).unwrap().all(|e| !a.join(e.unwrap().file_name()).is_file()));
}

#[test]
fn scenarios_commands_explain_their_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o");
    let o = moderato(&[
        "scenarios",
        "sample",
        "experiments/ppo-standard.toml",
        "--count",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("ppo-standard.toml") && e.contains("[suite.generator]"), "{e}");
    let o = moderato(&[
        "scenarios",
        "sample",
        "experiments/ppo-generalist.toml",
        "--count",
        "0",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--count 0"));
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "name = \"x\"\n[host]\ncpus = 0\n[[vm]]\nname = \"a\"\n[[vm.flow]]\nkind = \"stream\"\narrivals = { process = \"poisson\", rate_pps = 1 }\n").unwrap();
    let o = moderato(&["scenarios", "check", "experiments/scenarios/rr-latency.toml", bad.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(!o.status.success() && text.contains("ok     experiments/scenarios/rr-latency.toml"), "{text}");
    assert!(text.contains("bad.toml") && text.contains("host.cpus = 0"), "{text}");
}
