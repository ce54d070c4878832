//! The validation suite (`experiments/scenarios/validation/`): scenarios training never samples
//! (the generator reads no files, and no shipped experiment lists them). Each loads, passes the
//! environment checker, and differs in kind from the standard seven and from the others.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use moderato_env::check_env;
use moderato_env::sim::{Arrivals, Scenario, SimConfig, SimEnv, SizeDist};

fn toml_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    v.sort();
    v
}

fn scenarios() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments/scenarios")
}

/// What kind of host a scenario is: the things that change which settings are good.
fn kind(s: &Scenario) -> String {
    let mut flows = BTreeSet::new();
    for f in s.vms.iter().flat_map(|v| &v.flows) {
        let process = match &f.arrivals {
            Arrivals::Poisson { .. } => "poisson",
            Arrivals::Constant { .. } => "constant",
            Arrivals::OnOff { .. } => "on-off",
            Arrivals::Ramp { .. } => "ramp",
            Arrivals::Diurnal { .. } => "diurnal",
            Arrivals::ClosedLoop { .. } => "closed-loop",
            Arrivals::Trace { .. } => "trace",
        };
        let size = |z: &SizeDist| match z {
            SizeDist::Fixed { bytes } if *bytes > 1518 => "jumbo",
            SizeDist::Fixed { bytes } if *bytes < 256 => "small",
            SizeDist::Fixed { .. } => "fixed",
            SizeDist::Bimodal { .. } => "bimodal",
            SizeDist::Imix => "imix",
        };
        let response = f.response_size.as_ref().map_or("-", size);
        flows.insert(format!("{:?}/{process}/{}/{response}", f.kind, size(&f.size)));
    }
    let h = &s.host;
    format!(
        "{:?} cpus={} vms={} posted={} napi={} gbps={} {:?}",
        h.backend,
        h.cpus,
        s.vms.len(),
        h.posted_interrupts,
        h.napi,
        h.line_rate_gbps,
        flows
    )
}

#[test]
fn the_validation_suite_has_eight_distinct_valid_scenarios() {
    let dir = scenarios().join("validation");
    let files = toml_files(&dir);
    assert!(files.len() >= 8, "{} validation scenarios: at least 8 are promised", files.len());
    let standard = toml_files(&scenarios());
    assert_eq!(standard.len(), 7, "the standard seven: {standard:?}");
    let standard_bytes: Vec<Vec<u8>> = standard.iter().map(|f| std::fs::read(f).unwrap()).collect();
    let mut kinds: BTreeSet<String> =
        standard.iter().map(|f| kind(&Scenario::load(f).unwrap_or_else(|e| panic!("{e}")))).collect();
    assert_eq!(kinds.len(), 7, "the standard seven are of seven kinds");
    let mut names = BTreeSet::new();
    for f in &files {
        let s = Scenario::load(f).unwrap_or_else(|e| panic!("{e}"));
        assert!(!s.description.is_empty(), "{}: add a description", f.display());
        assert!(names.insert(s.name.clone()), "{}: name {} used twice", f.display(), s.name);
        let bytes = std::fs::read(f).unwrap();
        assert!(!standard_bytes.contains(&bytes), "{} is a copy of a standard scenario", f.display());
        let k = kind(&s);
        assert!(kinds.insert(k.clone()), "{}: of the same kind as another scenario: {k}", f.display());
        let cfg = SimConfig { interval_us: 2_000, episode_steps: 6, ..SimConfig::default() };
        check_env(|| SimEnv::new(s.clone(), cfg.clone(), None).unwrap(), 42, 6)
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
    }
}

#[test]
fn no_shipped_experiment_trains_on_the_validation_suite() {
    let experiments = Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments");
    for f in toml_files(&experiments) {
        let text = std::fs::read_to_string(&f).unwrap();
        let doc: toml::Table = toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let listed = doc
            .get("suite")
            .and_then(|s| s.get("scenarios"))
            .and_then(|s| s.as_array())
            .map(|a| a.iter().filter_map(|x| x.as_str()).map(String::from).collect::<Vec<_>>())
            .unwrap_or_default();
        for s in listed {
            assert!(!s.contains("validation/"), "{} trains on {s}, a validation scenario", f.display());
        }
    }
}
