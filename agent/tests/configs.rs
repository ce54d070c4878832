//! Every shipped config parses, and bad configs get errors that name the file, key and fix.

use std::path::Path;

use moderato_agent::eval::EvalConfig;
use moderato_agent::train::ExperimentConfig;

fn experiments() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments")
}

#[test]
fn shipped_experiment_and_eval_configs_load() {
    for f in ["example.toml", "quickstart.toml", "ppo-standard.toml"] {
        ExperimentConfig::load(&experiments().join(f)).unwrap_or_else(|e| panic!("{f}: {e:#}"));
    }
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
