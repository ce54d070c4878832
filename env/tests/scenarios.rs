//! Every shipped scenario: it loads, passes the environment checker, and conserves packets
//! under any sequence of actions (a property test).

use std::path::{Path, PathBuf};

use moderato_env::sim::{Scenario, SimConfig, SimEnv};
use moderato_env::{ActionSpace, AppPolling, Env, check_env};
use proptest::prelude::*;

fn scenario_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments/scenarios");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    v.sort();
    v
}

fn short() -> SimConfig {
    SimConfig { interval_us: 2_000, episode_steps: 8, ..SimConfig::default() }
}

#[test]
fn there_are_at_least_six_standard_scenarios_and_all_load() {
    let files = scenario_files();
    assert!(files.len() >= 6, "{files:?}");
    for f in files {
        let s = Scenario::load(&f).unwrap_or_else(|e| panic!("{e}"));
        assert!(!s.description.is_empty(), "{}: add a description", f.display());
    }
}

#[test]
fn every_scenario_as_an_sriov_vf_host_passes_the_env_checker() {
    for f in scenario_files() {
        let s = Scenario::load(&f).unwrap().with_profile(moderato_env::HostProfile::SriovVf);
        check_env(|| SimEnv::new(s.clone(), short(), None).unwrap(), 42, 3)
            .unwrap_or_else(|e| panic!("{} as sriov-vf: {e}", f.display()));
    }
}

#[test]
fn every_scenario_passes_the_env_checker() {
    for f in scenario_files() {
        let s = Scenario::load(&f).unwrap();
        check_env(|| SimEnv::new(s.clone(), short(), None).unwrap(), 42, 8)
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Packets offered = completed + dropped + in flight, after every step, whatever the knobs.
    #[test]
    fn packets_are_conserved(which in 0usize..64, seed in any::<u64>(),
                             actions in prop::collection::vec(prop::collection::vec(-1.0f32..=1.0, 64), 1..6),
                             polling in prop::collection::vec((0usize..3, 0usize..3), 6),
                             profile in 0usize..=moderato_env::HostProfile::ALL.len()) {
        let files = scenario_files();
        let mut s = Scenario::load(&files[which % files.len()]).unwrap();
        // The scenario's own host, or the same one as a host of each profile (sriov-vf's
        // topology included).
        if profile > 0 {
            s = s.with_profile(moderato_env::HostProfile::ALL[profile - 1]);
        }
        let vms = s.vms.len();
        let napi = s.host.napi;
        let mut env = SimEnv::new(s, short(), None).unwrap();
        env.reset(seed).unwrap();
        let sp = ActionSpace::default();
        let mut in_flight = env.conservation().unwrap().in_flight;
        for (i, a) in actions.iter().enumerate() {
            let mut act = sp.decode(vms, &a[..ActionSpace::dim(vms)]);
            // The guest applications' busy polling and IRQ suspension too (a short suspension
            // timeout lets it expire), where the host has NAPI.
            let (b, t) = polling[i];
            if napi && b > 0 {
                let p = AppPolling { busy_poll_us: [0, 5, 50][b], irq_suspend_timeout_us: [0, 30, 20_000][t] };
                for vm in &mut act.vms {
                    vm.polling = p;
                }
            }
            let st = env.step(&act).unwrap();
            let c = env.conservation().unwrap();
            prop_assert_eq!(c.offered, c.completed + c.dropped + c.in_flight);
            let t = st.info.truth.unwrap();
            prop_assert!(st.reward.is_finite());
            // The same balance inside the interval: what was inside plus what came in left or
            // is still inside.
            prop_assert_eq!(in_flight + t.offered, t.completed + t.dropped + t.in_flight);
            in_flight = t.in_flight;
            // CPU shares are shares.
            prop_assert!((0.0..=1.0 + 1e-9).contains(&(st.obs.host.cpu.irq + st.obs.host.cpu.other)));
            for g in &st.obs.guests {
                prop_assert!((0.0..=1.0 + 1e-9).contains(&(g.cpu.irq + g.cpu.other)));
            }
        }
    }
}
