//! The evaluation harness: orderings that must hold, determinism, and its output files.

use std::path::Path;

use moderato_agent::eval::{self, Cache, EvalConfig, Row};
use moderato_env::sim::SimConfig;

fn suite(policies: &[&str]) -> eval::Suite {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments/eval");
    let cfg = EvalConfig {
        name: "test".into(),
        scenarios: vec!["../scenarios/rr-latency.toml".into()],
        policies: policies.iter().map(|s| s.to_string()).collect(),
        seeds: vec![1, 2, 3],
        sim: SimConfig { interval_us: 10_000, episode_steps: 30, ..SimConfig::default() },
        statics: Default::default(),
        adaptive: Default::default(),
        threads: 2,
    };
    cfg.into_suite(&dir.join("test.toml")).unwrap()
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
