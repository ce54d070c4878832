//! Domain randomisation of scenarios, per episode.

use moderato_env::random::unit_f64;
use moderato_env::sim::Scenario;
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;

use super::config::SuiteConfig;

/// Log-uniform in `[lo, hi]`.
fn log_uniform(rng: &mut Pcg64Mcg, [lo, hi]: [f64; 2]) -> f64 {
    (lo.ln() + unit_f64(rng) * (hi.ln() - lo.ln())).exp()
}

/// Draws a scenario index by the suite's weights, then perturbs that scenario: every flow's rate
/// by its own log-uniform factor in `rate_scale`, every CPU cost by one factor in `cost_scale`.
/// Deterministic in `seed`.
pub fn sample(scenarios: &[Scenario], suite: &SuiteConfig, seed: u64) -> (usize, Scenario) {
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
        &mut c.backend_wakeup_us,
        &mut c.frontend_per_packet_us,
        &mut c.stack_per_packet_us,
        &mut c.stack_per_byte_ns,
        &mut c.app_wakeup_us,
    ] {
        *x *= k;
    }
    (i, s)
}
