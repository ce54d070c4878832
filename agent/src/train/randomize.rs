//! Domain randomisation of scenarios, per episode.

use moderato_env::random::{splitmix64, unit_f64};
use moderato_env::sim::{Objective, Scenario, generator};
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;

use super::config::SuiteConfig;

/// Log-uniform in `[lo, hi]`.
fn log_uniform(rng: &mut Pcg64Mcg, [lo, hi]: [f64; 2]) -> f64 {
    (lo.ln() + unit_f64(rng) * (hi.ln() - lo.ln())).exp()
}

/// The episode of `seed`: with a `[suite.generator]`, a share `generator_share` of the seeds draw
/// a whole host from it (index `None`); the others, and every seed of a suite without one, draw a
/// scenario index by the suite's weights and perturb that scenario: every flow's rate by its own
/// log-uniform factor in `rate_scale`, every CPU cost by one factor in `cost_scale`.
/// Deterministic in `seed`; a suite without a generator draws exactly as before there was one.
pub fn sample(scenarios: &[Scenario], suite: &SuiteConfig, seed: u64) -> (Option<usize>, Scenario) {
    if let Some(spec) = &suite.generator {
        // Its own stream, so that the list's draws below are those of the same seed without it.
        let mut g = Pcg64Mcg::seed_from_u64(splitmix64(seed ^ GENERATOR_STREAM));
        let share = suite.generator_share();
        if scenarios.is_empty() || share >= 1.0 || unit_f64(&mut g) < share {
            return (None, generator::sample(spec, g.next_u64()));
        }
    }
    let (i, s) = perturb(scenarios, suite, seed);
    (Some(i), s)
}

/// Tags the generator's stream of an episode seed.
const GENERATOR_STREAM: u64 = 0x7375_6974_652e_6765;

fn perturb(scenarios: &[Scenario], suite: &SuiteConfig, seed: u64) -> (usize, Scenario) {
    let mut rng = Pcg64Mcg::seed_from_u64(seed);
    let i = if suite.weights.is_empty() {
        (rng.next_u64() % scenarios.len() as u64) as usize
    } else {
        let total: f64 = suite.weights.iter().sum();
        let mut x = unit_f64(&mut rng) * total;
        let mut pick = scenarios.len() - 1;
        for (j, w) in suite.weights.iter().enumerate() {
            if x < *w {
                pick = j;
                break;
            }
            x -= w;
        }
        pick
    };
    let mut s = scenarios[i].clone();
    if !suite.profiles.is_empty() {
        // Its own stream, so that the draws below are those of the same seed without profiles.
        let mut g = Pcg64Mcg::seed_from_u64(splitmix64(seed ^ PROFILE_STREAM));
        let p = suite.profiles[(g.next_u64() % suite.profiles.len() as u64) as usize];
        s = s.with_profile(p);
    }
    for vm in &mut s.vms {
        for f in &mut vm.flows {
            f.arrivals.scale_rate(log_uniform(&mut rng, suite.rate_scale));
        }
    }
    let k = log_uniform(&mut rng, suite.cost_scale);
    let c = &mut s.costs;
    let backend = c.backend_per_packet(s.host.backend);
    c.backend_per_packet_us = Some(backend * k);
    for x in [
        &mut c.nic_irq_us,
        &mut c.nic_per_packet_us,
        &mut c.virq_us,
        &mut c.virq_posted_us,
        &mut c.kick_us,
        &mut c.vf_doorbell_us,
        &mut c.backend_wakeup_us,
        &mut c.frontend_per_packet_us,
        &mut c.stack_per_packet_us,
        &mut c.stack_per_byte_ns,
        &mut c.app_wakeup_us,
    ] {
        *x *= k;
    }
    if let Some(range) = suite.slo_p99_us {
        // Its own stream, so that the draws above are those of the same seed without a range.
        let mut g = Pcg64Mcg::seed_from_u64(splitmix64(seed ^ SLO_STREAM));
        for vm in &mut s.vms {
            if vm.holds_run_slo() {
                vm.slo_p99_us = Some(Objective::P99Us(log_uniform(&mut g, range).clamp(range[0], range[1])));
            }
        }
    }
    (i, s)
}

/// Tags the per-episode profile stream of an episode seed.
const PROFILE_STREAM: u64 = 0x7072_6f66_696c_6573;

/// Tags the per-episode SLO stream of an episode seed.
const SLO_STREAM: u64 = 0x736c_6f2e_7039_3975;

#[cfg(test)]
mod tests {
    use std::path::Path;

    use moderato_env::sim::generator::GeneratorSpec;

    use super::*;

    fn suite(generator: Option<GeneratorSpec>, share: Option<f64>) -> SuiteConfig {
        SuiteConfig {
            scenarios: vec!["a.toml".into(), "b.toml".into()],
            weights: vec![],
            rate_scale: [0.7, 1.3],
            cost_scale: [0.85, 1.15],
            generator,
            generator_share: share,
            slo_p99_us: None,
            profiles: Vec::new(),
        }
    }

    #[test]
    fn listed_scenarios_run_on_drawn_profiles_and_the_other_draws_stay() {
        use moderato_env::HostProfile;
        let sc = listed();
        let plain = suite(None, None);
        let all = vec![HostProfile::KvmNotfCoal, HostProfile::KvmVhost, HostProfile::Xen];
        let with = SuiteConfig { profiles: all.clone(), ..suite(None, None) };
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..200 {
            let (i, a) = sample(&sc, &plain, seed);
            let (j, b) = sample(&sc, &with, seed);
            assert_eq!(i, j, "seed {seed}: the same scenario");
            let p = b.host.profile.expect("a drawn profile");
            assert_eq!(b.host.backend, p.backend());
            seen.insert(p);
            // Same rates and targets; the costs differ only where the backend changed.
            for (va, vb) in a.vms.iter().zip(&b.vms) {
                assert_eq!(va.flows, vb.flows, "seed {seed}");
                assert_eq!(va.slo_p99_us, vb.slo_p99_us, "seed {seed}");
            }
            if a.host.backend == b.host.backend {
                assert_eq!(a.costs, b.costs, "seed {seed}");
            }
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), all);
    }

    fn listed() -> Vec<Scenario> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments/scenarios");
        ["rr-latency.toml", "mixed-host.toml"].iter().map(|f| Scenario::load(dir.join(f)).unwrap()).collect()
    }

    #[test]
    fn a_generator_share_splits_the_episodes_and_the_list_draws_as_without_one() {
        let sc = listed();
        let plain = suite(None, None);
        let half = suite(Some(GeneratorSpec::default()), Some(0.5));
        let mut generated = 0;
        for seed in 0..400u64 {
            let (i, s) = sample(&sc, &half, seed);
            match i {
                None => {
                    generated += 1;
                    assert!(s.name.starts_with("gen-"), "{}", s.name);
                }
                // A listed episode is the very episode the same seed draws without a generator.
                Some(i) => assert_eq!((Some(i), s), {
                    let (j, t) = sample(&sc, &plain, seed);
                    (j, t)
                }),
            }
            assert_eq!(sample(&sc, &half, seed).1, sample(&sc, &half, seed).1, "seed {seed}");
        }
        assert!((150..=250).contains(&generated), "{generated} of 400 generated at share 0.5");
        let all = suite(Some(GeneratorSpec::default()), None);
        assert!((0..50).all(|seed| sample(&sc, &all, seed).0.is_none()));
        let none = suite(Some(GeneratorSpec::default()), Some(0.0));
        assert!((0..50).all(|seed| sample(&sc, &none, seed).0.is_some()));
    }

    #[test]
    fn a_suite_slo_range_draws_each_sensitive_vms_target_and_leaves_every_other_draw_alone() {
        let sc = listed();
        let plain = suite(None, None);
        let ranged = SuiteConfig { slo_p99_us: Some([50.0, 2000.0]), ..suite(None, None) };
        let mut targets = Vec::new();
        for seed in 0..200u64 {
            let (i, s) = sample(&sc, &ranged, seed);
            let (j, mut t) = sample(&sc, &plain, seed);
            assert_eq!(i, j);
            for (a, b) in s.vms.iter().zip(&mut t.vms) {
                // Only latency-sensitive VMs without a target of their own get one.
                match (a.slo_p99_us, b.target_us(200.0)) {
                    (Some(Objective::P99Us(x)), Some(_)) => {
                        assert!((50.0..=2000.0).contains(&x), "{x}");
                        targets.push(x);
                    }
                    (None, None) => {}
                    other => panic!("seed {seed}: {other:?}"),
                }
                b.slo_p99_us = a.slo_p99_us;
            }
            // Everything else is the episode the seed draws without a range.
            assert_eq!(s, t, "seed {seed}");
        }
        assert!(targets.iter().any(|&x| x < 100.0) && targets.iter().any(|&x| x > 1000.0), "{targets:?}");
    }
}
