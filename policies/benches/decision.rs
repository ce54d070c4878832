//! Latency of one decision (batch 1) of the learned policy on the `flex` CPU backend, next to a
//! static baseline measured in the same run.
//!
//! `cargo bench -p moderato-policies --bench decision`

use std::path::Path;

use burn::tensor::Device;
use criterion::{Criterion, criterion_group, criterion_main};
use moderato_env::Env;
use moderato_env::sim::{Scenario, SimConfig, SimEnv};
use moderato_policies::Policy;
use moderato_policies::baselines::StaticPolicy;
use moderato_policies::learned::{
    Actor, FORMAT_VERSION, FeatureNames, LearnedPolicy, ModelMeta, NetConfig, Normalizer, Probes, Provenance,
};

fn observation(file: &str) -> moderato_env::Observation {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments/scenarios").join(file);
    let mut env = SimEnv::new(Scenario::load(p).expect("scenario"), SimConfig::default(), None).expect("env");
    env.reset(1).expect("reset").0
}

fn bench(c: &mut Criterion) {
    let device = Device::flex();
    let cfg = NetConfig::default();
    let meta = ModelMeta {
        format_version: FORMAT_VERSION,
        features: FeatureNames::current(),
        normalizer: Normalizer::default(),
        action_space: Default::default(),
        network: cfg.clone(),
        interval_us: 10_000,
        probes: Probes::default(),
        slo_range_us: None,
        profiles: vec![Default::default()],
        provenance: Provenance::default(),
    };
    let mut learned = LearnedPolicy::new("bench", Actor::new(&cfg, 1, &device), meta, device);
    let mut fixed = StaticPolicy::per_packet();
    let mut g = c.benchmark_group("decision");
    for (name, file) in [("1vm", "rr-latency.toml"), ("2vm", "mixed-host.toml")] {
        let obs = observation(file);
        g.bench_function(format!("learned/{name}"), |b| b.iter(|| learned.act(std::hint::black_box(&obs))));
        g.bench_function(format!("static/{name}"), |b| b.iter(|| fixed.act(std::hint::black_box(&obs))));
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
