//! The evaluation harness: orderings that must hold, determinism, and its output files.

use std::path::Path;

use moderato_agent::eval::{self, Cache, EvalConfig, Row};
use moderato_env::sim::SimConfig;

fn suite(policies: &[&str]) -> eval::Suite {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments/eval");
    config(policies).into_suite(&dir.join("test.toml")).unwrap()
}

/// rr-latency under `policies`, 3 seeds of 30 intervals, for a config in `experiments/eval/`.
fn config(policies: &[&str]) -> EvalConfig {
    EvalConfig {
        name: "test".into(),
        scenarios: vec!["../scenarios/rr-latency.toml".into()],
        policies: policies.iter().map(|s| s.to_string()).collect(),
        seeds: vec![1, 2, 3],
        sim: SimConfig { interval_us: 10_000, episode_steps: 30, ..SimConfig::default() },
        statics: Default::default(),
        adaptive: Default::default(),
        threads: 2,
        warmup_steps: 0,
        slo_p99_us: None,
        profile: None,
        trim: Default::default(),
        slo_feedback: Default::default(),
    }
}

fn by<'a>(rows: &'a [Row], policy: &str, seed: u64) -> &'a Row {
    rows.iter().find(|r| r.policy == policy && r.seed == seed).unwrap()
}

#[test]
fn orderings_that_must_hold_on_a_simple_scenario() {
    let presets = ["static:ixgbe", "static:mlx5", "static:moderate", "static:heavy"];
    let mut names = vec!["per-packet", "best-static"];
    names.extend(presets);
    let s = suite(&names);
    let rows = eval::run_suite(&s, &Cache { dir: None }, false).unwrap();
    for seed in [1, 2, 3] {
        let pp = by(&rows, "per-packet", seed);
        let heavy = by(&rows, "static:heavy", seed);
        let best = by(&rows, "best-static", seed);
        for r in rows.iter().filter(|r| r.seed == seed) {
            // Per-packet: the lowest latency and the highest CPU per packet.
            assert!(
                pp.p99_us <= r.p99_us,
                "seed {seed}: per-packet p99 {} > {} {}",
                pp.p99_us,
                r.policy,
                r.p99_us
            );
            assert!(
                pp.cpu_us_per_packet >= r.cpu_us_per_packet,
                "seed {seed}: {} cheaper than per-packet",
                r.policy
            );
            // Heavy coalescing: the opposite.
            assert!(heavy.p99_us >= r.p99_us, "seed {seed}: {} slower than heavy", r.policy);
            assert!(
                heavy.cpu_us_per_packet <= r.cpu_us_per_packet,
                "seed {seed}: {} cheaper than heavy",
                r.policy
            );
        }
        // best-static is never worse than a preset on its own objective.
        for p in presets.iter().chain(["per-packet"].iter()) {
            let r = by(&rows, p, seed);
            assert!(
                !r.score().better_than(&best.score()),
                "seed {seed}: {p} {:?} beats best-static {:?}",
                r.score(),
                best.score()
            );
        }
    }
}

#[test]
fn the_same_config_gives_identical_results_and_files() {
    let s = suite(&["per-packet", "dim", "itr", "static:mlx5"]);
    let a = eval::run_suite(&s, &Cache { dir: None }, false).unwrap();
    let b = eval::run_suite(&s, &Cache { dir: None }, false).unwrap();
    assert_eq!(a, b);
    let tmp = tempfile::tempdir().unwrap();
    let (da, db) = (tmp.path().join("a"), tmp.path().join("b"));
    eval::write_outputs(&da, &s, &a, &eval::aggregate(&a)).unwrap();
    eval::write_outputs(&db, &s, &b, &eval::aggregate(&b)).unwrap();
    let csv = |d: &Path| std::fs::read(d.join("results.csv")).unwrap();
    assert_eq!(csv(&da), csv(&db));
    assert_eq!(
        csv(&da).iter().filter(|&&c| c == b'\n').count(),
        1 + 4 * 3,
        "header + one row per policy × seed"
    );
    for f in [
        "report.md",
        "results.json",
        "config.toml",
        "plots/rr-latency.png",
        "plots/rr-latency.svg",
        "plots/summary.png",
    ] {
        assert!(da.join(f).is_file(), "{f} missing");
    }
    let md = std::fs::read_to_string(da.join("report.md")).unwrap();
    assert!(md.contains("★") && md.contains("| dim |") || md.contains("★ **dim**"), "{md}");
}

#[test]
fn best_static_is_cached_and_the_cache_is_used() {
    let s = suite(&["best-static", "per-packet"]);
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache { dir: Some(tmp.path().to_path_buf()) };
    let a = eval::run_suite(&s, &cache, false).unwrap();
    let dir = tmp.path().join("best-static");
    let entries: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(entries.len(), 3, "one cache entry per scenario and seed");
    // Plant per-packet in every cache entry: a run that reads the cache must now reproduce the
    // per-packet rows under the best-static name.
    for e in &entries {
        let mut f: moderato_policies::best_static::Found =
            serde_json::from_str(&std::fs::read_to_string(e).unwrap()).unwrap();
        f.settings = moderato_env::CoalescingSettings::per_packet(1);
        std::fs::write(e, serde_json::to_string(&f).unwrap()).unwrap();
    }
    let b = eval::run_suite(&s, &cache, false).unwrap();
    for seed in [1, 2, 3] {
        let (planted, pp) = (by(&b, "best-static", seed), by(&b, "per-packet", seed));
        assert_eq!(planted.cpu_us_per_packet, pp.cpu_us_per_packet, "seed {seed}: the cache was not read");
        assert_ne!(by(&a, "best-static", seed).cpu_us_per_packet, pp.cpu_us_per_packet);
    }
}

#[test]
fn best_static_held_out_runs_the_setting_found_on_the_next_seed() {
    let s = suite(&["best-static", "best-static-held-out", "per-packet"]);
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache { dir: Some(tmp.path().to_path_buf()) };
    let a = eval::run_suite(&s, &cache, false).unwrap();
    // Plant per-packet in seed 2's cache entry only: held-out at seed 1 (which runs seed 2's
    // setting) becomes per-packet; best-static at seed 1 and held-out at seed 3 (seed 1's) do not.
    let e = cache.path(&s.scenarios[0], &s.config.sim, 2, s.config.warmup_steps).unwrap();
    let mut f: moderato_policies::best_static::Found =
        serde_json::from_str(&std::fs::read_to_string(&e).unwrap()).unwrap();
    assert_ne!(f.settings, moderato_env::CoalescingSettings::per_packet(1), "per-packet is no plant");
    f.settings = moderato_env::CoalescingSettings::per_packet(1);
    std::fs::write(&e, serde_json::to_string(&f).unwrap()).unwrap();
    let b = eval::run_suite(&s, &cache, false).unwrap();
    let pp1 = by(&b, "per-packet", 1).cpu_us_per_packet;
    assert_eq!(by(&b, "best-static-held-out", 1).cpu_us_per_packet, pp1, "seed 1 runs seed 2's setting");
    assert_eq!(by(&b, "best-static", 1), by(&a, "best-static", 1));
    assert_eq!(by(&b, "best-static-held-out", 3), by(&a, "best-static-held-out", 3));
}

#[test]
fn a_warm_up_is_run_but_not_counted() {
    let s = suite(&["static:moderate"]);
    let sim = &s.config.sim;
    let sc = &s.scenarios[0];
    let adaptive = Default::default();
    let mut p = s.policies[0].instantiate(&sim.spec(sc.vms.len())).unwrap();
    let (plain, _) = eval::run_episode(sc, sim, &adaptive, p.as_mut(), 1, 0).unwrap();
    let (warm, _) = eval::run_episode(sc, sim, &adaptive, p.as_mut(), 1, 10).unwrap();
    // The same number of counted intervals, over a later stretch of the same simulation.
    assert_eq!(plain.intervals, u64::from(sim.episode_steps));
    assert_eq!(warm.intervals, u64::from(sim.episode_steps));
    assert_eq!(warm.duration_ns, plain.duration_ns);
    assert_ne!(warm.totals.completed, plain.totals.completed, "the warm-up was counted");
    // The warm-up of a suite is on the cache key and in the report.
    let mut ws = s.clone();
    ws.config.warmup_steps = 10;
    let rows = eval::run_suite(&ws, &Cache { dir: None }, false).unwrap();
    assert!(eval::report::markdown(&ws, &eval::aggregate(&rows)).contains("warm-up of 10 intervals"));
}

#[test]
fn a_saved_config_re_runs_as_it_is_and_names_models_by_their_directory() {
    let s = suite(&["dim", "../../models/default"]);
    let label = s.policies[1].label();
    assert!(label.ends_with("models/default") && !label.starts_with("model:"), "{label}");
    let rows = eval::run_suite(&s, &Cache { dir: None }, false).unwrap();
    assert!(rows.iter().any(|r| r.policy == label), "rows carry the label");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    eval::write_outputs(&out, &s, &rows, &eval::aggregate(&rows)).unwrap();
    let again = EvalConfig::load(&out.join("config.toml")).unwrap();
    assert_eq!(again.scenarios.iter().map(|x| &x.name).collect::<Vec<_>>(), ["rr-latency"]);
    assert_eq!(again.policies[1].label(), label, "the model resolves to the same directory");
}

#[test]
fn a_config_given_by_a_relative_path_saves_a_config_whose_models_resolve() {
    // As `moderato eval experiments/eval/x.toml` loads it: the config's directory is relative to
    // the working directory (the agent crate's, under cargo test).
    let mut cfg = config(&["../../models/default", "trim:../../models/default"]);
    cfg.sim.episode_steps = 3;
    let s = cfg.into_suite(Path::new("../experiments/eval/relative.toml")).unwrap();
    let rows = eval::run_suite(&s, &Cache { dir: None }, false).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    eval::write_outputs(&out, &s, &rows, &eval::aggregate(&rows)).unwrap();
    let again = EvalConfig::load(&out.join("config.toml"))
        .unwrap_or_else(|e| panic!("the saved config does not load: {e:#}"));
    let labels = |s: &eval::Suite| s.policies.iter().map(|p| p.label()).collect::<Vec<_>>();
    assert_eq!(labels(&again), labels(&s), "the models resolve to the same directories");
}

#[test]
fn the_report_says_which_flows_the_slo_covers() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments/eval");
    let cfg = EvalConfig {
        name: "t".into(),
        scenarios: vec!["../scenarios/rr-latency.toml".into(), "../scenarios/bulk-tx.toml".into()],
        policies: vec!["static:moderate".into()],
        seeds: vec![1, 2, 3],
        sim: SimConfig { interval_us: 10_000, episode_steps: 5, ..SimConfig::default() },
        statics: Default::default(),
        adaptive: Default::default(),
        threads: 2,
        warmup_steps: 0,
        slo_p99_us: None,
        profile: None,
        trim: Default::default(),
        slo_feedback: Default::default(),
    };
    let s = cfg.into_suite(&dir.join("t.toml")).unwrap();
    let rows = eval::run_suite(&s, &Cache { dir: None }, false).unwrap();
    let md = eval::report::markdown(&s, &eval::aggregate(&rows));
    assert!(md.contains("of the latency-sensitive flows"), "{md}");
    let bulk = md.split("### bulk-tx").nth(1).unwrap();
    assert!(bulk.contains("No latency-sensitive flow"), "{bulk}");
    let rr = md.split("### rr-latency").nth(1).unwrap().split("###").next().unwrap();
    assert!(!rr.contains("No latency-sensitive flow"), "{rr}");
}

#[test]
fn out_of_bounds_knobs_in_an_eval_config_are_refused() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments/eval");
    let cfg = EvalConfig {
        name: "t".into(),
        scenarios: vec!["../scenarios/rr-latency.toml".into()],
        policies: vec!["static:nic=2000/32".into()],
        seeds: vec![1, 2, 3],
        sim: SimConfig::default(),
        statics: Default::default(),
        adaptive: Default::default(),
        threads: 1,
        warmup_steps: 0,
        slo_p99_us: None,
        profile: None,
        trim: Default::default(),
        slo_feedback: Default::default(),
    };
    let e = format!("{:#}", cfg.into_suite(&dir.join("t.toml")).unwrap_err());
    assert!(e.contains("t.toml") && e.contains("2000") && e.contains("usecs_max"), "{e}");
}

fn sweep_config(targets: &str) -> std::result::Result<eval::Suite, String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments/eval");
    let text = format!(
        "name = \"sweep\"\nscenarios = [\"../scenarios/rr-latency.toml\"]\npolicies = [\"static:moderate\", \"slo-feedback\"]\n\
         seeds = [1, 2, 3]\nthreads = 2\nslo_p99_us = {targets}\n[sim]\ninterval_us = 10000\nepisode_steps = 40\n"
    );
    let cfg: EvalConfig = toml::from_str(&text).map_err(|e| e.to_string())?;
    cfg.into_suite(&dir.join("sweep.toml")).map_err(|e| format!("{e:#}"))
}

#[test]
fn an_slo_sweep_runs_the_suite_at_each_target_and_slo_feedback_follows_it() {
    let suite = sweep_config("[60, 1000]").unwrap();
    assert_eq!(suite.slo_targets(), vec![60.0, 1000.0]);
    let at = |t: f64| {
        let s = suite.at_slo(t);
        assert_eq!(s.config.sim.reward.slo_p99_us, t);
        eval::aggregate(&eval::run_suite(&s, &Cache { dir: None }, false).unwrap())
    };
    let (tight, loose) = (at(60.0), at(1000.0));
    let get = |a: &[eval::Aggregate], p: &str| a.iter().find(|x| x.policy == p).unwrap().clone();
    // A fixed setting does the same work whatever the target; only its violations are counted
    // against a different line.
    let (ft, fl) = (get(&tight, "static:moderate"), get(&loose, "static:moderate"));
    assert_eq!(ft.cpu_us_per_packet, fl.cpu_us_per_packet);
    assert!(ft.slo_violation_rate.mean >= fl.slo_violation_rate.mean);
    // The feedback controller coalesces more (less CPU per packet) when it is given more room.
    let (st, sl) = (get(&tight, "slo-feedback"), get(&loose, "slo-feedback"));
    assert!(
        sl.cpu_us_per_packet.mean < st.cpu_us_per_packet.mean,
        "1000 µs: {:?}, 60 µs: {:?}",
        sl.cpu_us_per_packet,
        st.cpu_us_per_packet
    );
    assert!(sl.p99_us.mean > st.p99_us.mean);
    let md = eval::report::overview(&loose);
    assert!(md.contains("| slo-feedback |") && md.contains("| static:moderate |"), "{md}");
}

#[test]
fn bad_slo_targets_are_refused_with_the_key() {
    for (t, want) in
        [("[]", "1 to 16"), ("[100, 100]", "repeats"), ("-5", "(0, 10000000]"), ("[100, 1e9]", "1000000000")]
    {
        let e = sweep_config(t).err().unwrap_or_else(|| panic!("{t} was accepted"));
        assert!(e.contains("slo_p99_us") && e.contains(want), "{t}: {e}");
    }
    // One target overrides [sim.reward].
    assert_eq!(sweep_config("150").unwrap().config.sim.reward.slo_p99_us, 150.0);
}

fn mean(rows: &[Row], policy: &str, f: impl Fn(&Row) -> f64) -> f64 {
    let xs: Vec<f64> = rows.iter().filter(|r| r.policy == policy).map(f).collect();
    assert_eq!(xs.len(), 3, "{policy}");
    xs.iter().sum::<f64>() / 3.0
}

/// A config's `[slo_feedback]` and `[trim]` tables reach the controllers: a lower setpoint holds
/// rr-latency's p99 lower, at more CPU per packet; the saved copy of the config keeps them.
#[test]
fn an_eval_configs_gains_reach_its_feedback_controllers() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments/eval");
    let mut cfg = config(&["slo-feedback", "trim:../../models/default"]);
    let base = cfg.clone().into_suite(&dir.join("test.toml")).unwrap();
    cfg.slo_feedback.setpoint = 0.4;
    cfg.slo_feedback.headroom = 0.3;
    cfg.trim.setpoint = 0.4;
    cfg.trim.floor_headroom = 0.3;
    let tight = cfg.clone().into_suite(&dir.join("test.toml")).unwrap();
    let r0 = eval::run_suite(&base, &Cache { dir: None }, false).unwrap();
    let r1 = eval::run_suite(&tight, &Cache { dir: None }, false).unwrap();
    for p in base.policies.iter().map(|p| p.label()) {
        let (p99_0, p99_1) = (mean(&r0, &p, |r| r.p99_us), mean(&r1, &p, |r| r.p99_us));
        let (cpu_0, cpu_1) = (mean(&r0, &p, |r| r.cpu_us_per_packet), mean(&r1, &p, |r| r.cpu_us_per_packet));
        assert!(p99_1 < 0.8 * p99_0, "{p}: p99 {p99_1} at setpoint 0.4 against {p99_0} at 0.8");
        assert!(cpu_1 > cpu_0, "{p}: {cpu_1} µs per packet at setpoint 0.4 against {cpu_0} at 0.8");
    }
    let saved = toml::to_string(&tight.config.portable(&tight)).unwrap();
    assert!(saved.contains("[trim]") && saved.contains("[slo_feedback]"), "{saved}");
    let back: EvalConfig = toml::from_str(&saved).unwrap();
    assert_eq!(back.gains(), tight.config.gains());
    assert!(
        !toml::to_string(&base.config.portable(&base)).unwrap().contains("[trim]"),
        "defaults are not written"
    );
    // The report says which gains are not the defaults.
    let md = eval::report::markdown(&tight, &eval::aggregate(&r1));
    assert!(md.contains("`[trim]` floor_headroom = 0.3, setpoint = 0.4"), "{md}");
    assert!(md.contains("`[slo_feedback]` headroom = 0.3, setpoint = 0.4"), "{md}");
    assert!(!eval::report::markdown(&base, &eval::aggregate(&r0)).contains("Gains not"));
}

#[test]
fn bad_gains_in_an_eval_config_are_refused_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let scenario = Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments/scenarios/rr-latency.toml");
    let path = dir.path().join("gains.toml");
    let text = |table: &str| {
        format!(
            "name = \"g\"\nscenarios = [{:?}]\npolicies = [\"slo-feedback\"]\n{table}\n",
            scenario.display().to_string()
        )
    };
    std::fs::write(&path, text("[trim]\nsetpoint = 2.0")).unwrap();
    let e = format!("{:#}", EvalConfig::load(&path).unwrap_err());
    assert!(e.contains("gains.toml") && e.contains("[trim] setpoint = 2") && e.contains("Fix:"), "{e}");
    std::fs::write(&path, text("[slo_feedback]\nincrease = -1.0")).unwrap();
    let e = format!("{:#}", EvalConfig::load(&path).unwrap_err());
    assert!(e.contains("[slo_feedback] increase = -1"), "{e}");
    std::fs::write(&path, text("[trim]\nsetpont = 0.5")).unwrap();
    let e = format!("{:#}", EvalConfig::load(&path).unwrap_err());
    assert!(e.contains("gains.toml") && e.contains("setpont"), "{e}");
    std::fs::write(&path, text("[trim]\nwindow = 8")).unwrap();
    assert_eq!(EvalConfig::load(&path).unwrap().config.trim.window, 8);
}
