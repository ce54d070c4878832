//! Every shipped config parses, and bad configs get errors that name the file, key and fix.

use std::path::Path;

use moderato_agent::eval::EvalConfig;
use moderato_agent::train::ExperimentConfig;

fn experiments() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments")
}

#[test]
fn shipped_experiment_and_eval_configs_load() {
    // Every experiment config shipped in experiments/ (the recipes and the ablations).
    let mut n = 0;
    for e in std::fs::read_dir(experiments()).unwrap() {
        let f = e.unwrap().path();
        if f.extension().is_some_and(|x| x == "toml") {
            ExperimentConfig::load(&f).unwrap_or_else(|e| panic!("{}: {e:#}", f.display()));
            n += 1;
        }
    }
    assert!(n >= 8, "{n} experiment configs");
    let suite = EvalConfig::load(&experiments().join("eval/standard.toml")).unwrap();
    assert!(suite.scenarios.len() >= 6 && suite.config.seeds.len() >= 3);
}

#[test]
fn bad_experiment_configs_name_the_key() {
    let base = experiments().join("example.toml");
    let text = std::fs::read_to_string(&base).unwrap();
    let cases = [
        (text.replace("num_steps = 64", "num_steps = 50"), "num_steps = 50"),
        (text.replace("gamma = 0.9", "gamma = 1.5"), "ppo.gamma = 1.5"),
        (text.replace("learning_rate = 3e-4", "learnin_rate = 3e-4"), "learnin_rate"),
        (text.replace("rate_scale = [0.7, 1.3]", "rate_scale = [1.3, 0.7]"), "suite.rate_scale"),
        (text.replace("\"scenarios/bulk-stream.toml\"", "\"scenarios/nope.toml\""), "nope.toml"),
        (text.replace("num_minibatches = 8", "num_minibatches = 7"), "ppo.num_minibatches = 7"),
        (
            text.replace("ignore_features = []", "ignore_features = [\"nic.irq_rate\"]"),
            "network.ignore_features: `nic.irq_rate` is not a feature; valid names: nic.rx_kpps_ln",
        ),
        (text.replace("history = \"none\"", "history = \"last\""), "`none`, `previous`, `delta`"),
        (
            text.replace(
                "# [network.init_knobs.nic]\n# rx = { usecs = 64, frames = 32 }",
                "[network.init_knobs.nic]\nrx = { usecs = 5000, frames = 32 }",
            ),
            "network.init_knobs.nic.rx = { usecs = 5000, frames = 32 } is outside sim.action_space.nic",
        ),
    ];
    for (bad, key) in cases {
        let e = format!("{:#}", ExperimentConfig::parse(&bad, &base).unwrap_err());
        assert!(e.contains("example.toml") && e.contains(key), "expected `{key}` in: {e}");
    }
}

#[test]
fn bad_eval_configs_list_valid_policy_names() {
    let dir = tempfile::tempdir().unwrap();
    let scen = experiments().join("scenarios/rr-latency.toml");
    let p = dir.path().join("bad.toml");
    std::fs::write(
        &p,
        format!(
            "name = \"x\"\nscenarios = [{:?}]\npolicies = [\"per-packet\", \"dimm\"]\nseeds = [1, 2, 3]\n",
            scen
        ),
    )
    .unwrap();
    let e = format!("{:#}", EvalConfig::load(&p).unwrap_err());
    assert!(
        e.contains("bad.toml") && e.contains("dimm") && e.contains("static:mlx5") && e.contains("itr"),
        "{e}"
    );
    std::fs::write(
        &p,
        format!("name = \"x\"\nscenarios = [{:?}]\npolicies = [\"dim\"]\nseeds = [1]\n", scen),
    )
    .unwrap();
    let e = format!("{:#}", EvalConfig::load(&p).unwrap_err());
    assert!(e.contains("at least 3"), "{e}");
    std::fs::write(&p, format!("name = \"x\"\nscenario = [{:?}]\npolicies = [\"dim\"]\n", scen)).unwrap();
    let e = format!("{:#}", EvalConfig::load(&p).unwrap_err());
    assert!(e.contains("scenario"), "{e}");
}

#[test]
fn eval_name_with_dot_dot_cannot_leave_runs() {
    // `runs/eval-<name>-<time>` with this name was /tmp/x-<time>: the report landed outside runs/.
    let dir = tempfile::tempdir().unwrap();
    let scen = experiments().join("scenarios/rr-latency.toml");
    let p = dir.path().join("escape.toml");
    for name in ["../../../../tmp/x", "/tmp/x", "a/../../b", ""] {
        std::fs::write(
            &p,
            format!("name = {name:?}\nscenarios = [{scen:?}]\npolicies = [\"dim\"]\nseeds = [1, 2, 3]\n"),
        )
        .unwrap();
        let e = format!("{:#}", EvalConfig::load(&p).unwrap_err());
        assert!(
            e.contains("escape.toml") && e.contains(&format!("name = {name:?}")) && e.contains("rename"),
            "{e}"
        );
    }
    // The experiment's name makes runs/<name>-<time> the same way.
    let base = experiments().join("example.toml");
    let text = std::fs::read_to_string(&base).unwrap();
    let bad = text.replace("name = \"example\"", "name = \"../../../../tmp/x\"");
    assert_ne!(bad, text);
    let e = format!("{:#}", ExperimentConfig::parse(&bad, &base).unwrap_err());
    assert!(e.contains("example.toml") && e.contains("name = \"../../../../tmp/x\""), "{e}");
}

#[test]
fn experiment_numbers_have_upper_bounds() {
    let base = experiments().join("example.toml");
    let text = std::fs::read_to_string(&base).unwrap();
    for (from, to, key) in [
        ("episode_steps = 64", "episode_steps = 4000000000", "[sim] episode_steps = 4000000000"),
        ("slo_p99_us = 200.0", "slo_p99_us = 1e308", "reward.slo_p99_us = 1e308"),
        ("rate_scale = [0.7, 1.3]", "rate_scale = [0.7, 1e300]", "suite.rate_scale"),
        ("update_epochs = 10", "update_epochs = 1000000", "ppo.update_epochs = 1000000"),
    ] {
        let bad = text.replace(from, to);
        assert_ne!(bad, text, "example.toml has no `{from}`");
        let e = format!("{:#}", ExperimentConfig::parse(&bad, &base).unwrap_err());
        assert!(e.contains("example.toml") && e.contains(key), "expected `{key}` in: {e}");
    }
}

#[test]
fn eval_scenario_dev_zero_is_refused_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("zero.toml");
    std::fs::write(
        &p,
        "name = \"x\"\nscenarios = [\"/dev/zero\"]\npolicies = [\"dim\"]\nseeds = [1, 2, 3]\n",
    )
    .unwrap();
    let e = format!("{:#}", EvalConfig::load(&p).unwrap_err());
    assert!(e.contains("zero.toml") && e.contains("/dev/zero") && e.contains("not a regular file"), "{e}");
    let e = format!("{:#}", EvalConfig::load(Path::new("/dev/zero")).unwrap_err());
    assert!(e.contains("/dev/zero") && e.contains("not a regular file"), "{e}");
}

#[test]
fn a_model_records_the_range_of_targets_its_training_held_vms_to() {
    let load =
        |f: &str| ExperimentConfig::load(&experiments().join(f)).unwrap_or_else(|e| panic!("{f}: {e:#}"));
    // The generalist: the generator's range and the suite's, 50 µs – 2 ms.
    assert_eq!(load("ppo-generalist.toml").slo_range_us(), Some([50.0, 2000.0]));
    // The standard recipe holds every latency-sensitive VM to the one 200 µs target.
    assert_eq!(load("ppo-standard.toml").slo_range_us(), Some([200.0, 200.0]));
    // Profiles: the generalist trains on all three; the standard recipe on its scenarios' own
    // (none named: kvm-notf-coal, every mechanism).
    use moderato_env::HostProfile;
    assert_eq!(
        load("ppo-generalist.toml").profiles(),
        vec![HostProfile::KvmNotfCoal, HostProfile::KvmVhost, HostProfile::Xen]
    );
    assert_eq!(load("ppo-standard.toml").profiles(), vec![HostProfile::KvmNotfCoal]);
    // A bad range names the key.
    let text = std::fs::read_to_string(experiments().join("ppo-generalist.toml")).unwrap();
    let bad = text.replacen("slo_p99_us = [50.0, 2000.0]", "slo_p99_us = [500.0, 20.0]", 1);
    let e = format!(
        "{:#}",
        ExperimentConfig::parse(&bad, &experiments().join("ppo-generalist.toml")).unwrap_err()
    );
    assert!(e.contains("suite.slo_p99_us") && e.contains("low <= high"), "{e}");
}
