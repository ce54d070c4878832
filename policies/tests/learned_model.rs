//! The frozen-model format: save → load → identical actions, and every way a model can fail to
//! fit is refused with a sentence that names it.

use std::path::Path;

use burn::tensor::Device;
use moderato_env::sim::{Scenario, SimConfig, SimEnv};
use moderato_env::{ActionSpace, Env, KnobBounds};
use moderato_policies::Policy;
use moderato_policies::learned::{
    Actor, FORMAT_VERSION, FeatureBatch, FeatureNames, LearnedPolicy, META_FILE, ModelMeta, NetConfig,
    Normalizer, Probes, Provenance, WEIGHTS_FILE, semantics_sha256,
};

fn meta() -> ModelMeta {
    ModelMeta {
        format_version: FORMAT_VERSION,
        features: FeatureNames::current(),
        normalizer: Normalizer::default(),
        action_space: ActionSpace::default(),
        network: NetConfig::default(),
        interval_us: 10_000,
        probes: Probes { host: true, guest: true },
        slo_range_us: None,
        profiles: vec![moderato_env::HostProfile::KvmNotfCoal],
        provenance: Provenance { experiment: "test".into(), ..Default::default() },
    }
}

#[test]
fn a_host_of_a_profile_the_model_was_not_trained_on_is_refused_naming_both() {
    use moderato_env::HostProfile;
    let tmp = tempfile::tempdir().unwrap();
    let p = saved(tmp.path());
    p.check_profile(HostProfile::KvmNotfCoal).unwrap();
    let e = p.check_profile(HostProfile::KvmVhost).unwrap_err().to_string();
    assert!(e.contains("kvm-vhost") && e.contains("kvm-notf-coal") && e.contains("profile"), "{e}");
    // Through the simulator's spec too: a kvm-vhost scenario.
    let mut spec = SimConfig::default().spec(1);
    spec.action_space = p.meta().action_space.clone();
    spec.profile = HostProfile::Xen;
    let e = p.check_spec(&spec).unwrap_err().to_string();
    assert!(e.contains("xen"), "{e}");
    // The Policy trait says the same to a deploy.
    assert!(Policy::check_profile(&p, HostProfile::Xen).is_err());
    assert!(p.sets_deferral());
}

fn observations() -> Vec<moderato_env::Observation> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments/scenarios");
    let mut out = Vec::new();
    for f in ["mixed-host.toml", "rr-latency.toml"] {
        let s = Scenario::load(dir.join(f)).unwrap();
        let cfg = SimConfig { interval_us: 2000, episode_steps: 3, ..SimConfig::default() };
        let mut env = SimEnv::new(s, cfg, None).unwrap();
        out.push(env.reset(5).unwrap().0);
    }
    out
}

fn saved(dir: &Path) -> LearnedPolicy {
    let device = Device::flex();
    let actor = Actor::new(&NetConfig::default(), 17, &device);
    let mut m = meta();
    // Non-trivial statistics, so that normalisation is exercised.
    m.normalizer.host.mean.iter_mut().enumerate().for_each(|(i, x)| *x = i as f64 * 0.1);
    let m = LearnedPolicy::save(dir, actor.clone(), m).unwrap();
    LearnedPolicy::new("in-memory", actor, m, device)
}

#[test]
fn save_then_load_gives_identical_actions() {
    let tmp = tempfile::tempdir().unwrap();
    let mut before = saved(tmp.path());
    let mut after = LearnedPolicy::load(tmp.path(), &Device::flex()).unwrap();
    for o in observations() {
        assert_eq!(before.act(&o), after.act(&o));
        // Deterministic: the mean action, twice the same.
        assert_eq!(after.act(&o), after.act(&o));
    }
    let r = after.requirements();
    assert!(r.host.iter().any(|n| n == "host.probe_p99_ln"));
    assert!(r.guest.iter().any(|n| n == "guest.probe_p99_ln"));
}

#[test]
fn a_truncated_weights_file_is_refused_not_half_loaded() {
    let tmp = tempfile::tempdir().unwrap();
    saved(tmp.path());
    let w = tmp.path().join(WEIGHTS_FILE);
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    let e = LearnedPolicy::load(tmp.path(), &Device::flex()).unwrap_err().to_string();
    assert!(e.contains("corrupt weights") && e.contains(WEIGHTS_FILE), "{e}");
}

#[test]
fn weights_that_do_not_fit_the_network_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    saved(tmp.path());
    // Claim a different network in model.json (and a matching checksum): loading must fail.
    let p = tmp.path().join(META_FILE);
    let mut m: ModelMeta = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    m.network.hidden = vec![32];
    // Resealed, so that the weights loader (not the semantics hash) is what refuses it.
    m.provenance.semantics_sha256 = Some(semantics_sha256(&m));
    std::fs::write(&p, serde_json::to_string(&m).unwrap()).unwrap();
    let e = LearnedPolicy::load(tmp.path(), &Device::flex()).unwrap_err().to_string();
    assert!(e.contains("cannot load the weights"), "{e}");
}

#[test]
fn other_features_or_version_or_action_space_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    saved(tmp.path());
    let p = tmp.path().join(META_FILE);
    let original = std::fs::read_to_string(&p).unwrap();

    let mut m: ModelMeta = serde_json::from_str(&original).unwrap();
    m.features.guest[0] = "frontend.rx_mpps".into();
    std::fs::write(&p, serde_json::to_string(&m).unwrap()).unwrap();
    let e = LearnedPolicy::load(tmp.path(), &Device::flex()).unwrap_err().to_string();
    assert!(e.contains("guest features") && e.contains("frontend.rx_mpps"), "{e}");

    let mut v: serde_json::Value = serde_json::from_str(&original).unwrap();
    v["format_version"] = 99.into();
    std::fs::write(&p, v.to_string()).unwrap();
    let e = LearnedPolicy::load(tmp.path(), &Device::flex()).unwrap_err().to_string();
    assert!(e.contains("format version 99"), "{e}");

    std::fs::write(&p, &original).unwrap();
    let pol = LearnedPolicy::load(tmp.path(), &Device::flex()).unwrap();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments/scenarios");
    let s = Scenario::load(dir.join("rr-latency.toml")).unwrap();
    let mut cfg = SimConfig::default();
    cfg.action_space.nic = KnobBounds { usecs_max: 100, frames_max: 64 };
    let env = SimEnv::new(s.clone(), cfg, None).unwrap();
    let e = pol.check_spec(env.spec()).unwrap_err().to_string();
    assert!(e.contains("action space differs"), "{e}");
    // It names each differing key under [sim.action_space], the model's value and this one's.
    assert!(e.contains("sim.action_space.nic.usecs_max is 1000 in the model and 100 here"), "{e}");
    assert!(e.contains("sim.action_space.nic.frames_max is 256 in the model and 64 here"), "{e}");
    assert!(!e.contains("napi"), "{e}");
    let cfg = SimConfig { probe: moderato_env::sim::ProbeMode::None, ..SimConfig::default() };
    let env = SimEnv::new(s, cfg, None).unwrap();
    let e = pol.check_spec(env.spec()).unwrap_err().to_string();
    assert!(e.contains("latency probe"), "{e}");
}

#[test]
fn the_same_weights_give_the_same_bytes() {
    // Two actors from the same seed hold the same weights under different (random) parameter ids.
    let device = Device::flex();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ma = LearnedPolicy::save(a.path(), Actor::new(&NetConfig::default(), 5, &device), meta()).unwrap();
    let mb = LearnedPolicy::save(b.path(), Actor::new(&NetConfig::default(), 5, &device), meta()).unwrap();
    assert_eq!(ma.provenance.weights_sha256, mb.provenance.weights_sha256);
    assert_eq!(
        std::fs::read(a.path().join(WEIGHTS_FILE)).unwrap(),
        std::fs::read(b.path().join(WEIGHTS_FILE)).unwrap()
    );
    LearnedPolicy::load(a.path(), &device).unwrap();
}

#[test]
fn ignored_features_are_not_required_survive_a_save_and_do_not_move_the_actions() {
    let tmp = tempfile::tempdir().unwrap();
    let device = Device::flex();
    let ignore: Vec<String> =
        ["nic.irq_krate_ln", "nic.rx_usecs", "nic.rx_frames", "nic.tx_usecs", "nic.tx_frames"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    let net = NetConfig { ignore_features: ignore.clone(), ..NetConfig::default() };
    let mut m = meta();
    m.network = net.clone();
    LearnedPolicy::save(tmp.path(), Actor::new(&net, 17, &device), m).unwrap();
    let mut pol = LearnedPolicy::load(tmp.path(), &device).unwrap();
    assert_eq!(pol.meta().network.ignore_features, ignore);
    let r = pol.requirements();
    assert!(ignore.iter().all(|n| !r.host.contains(n)), "{:?}", r.host);
    assert!(r.host.iter().any(|n| n == "nic.rx_kpps_ln") && r.host.iter().any(|n| n == "host.probe_p99_ln"));

    // The raw mean actions, before they are rounded to knobs.
    let means = |pol: &LearnedPolicy, o: &moderato_env::Observation| {
        let mut b = FeatureBatch::new(o.guests.len());
        b.push(o, &ActionSpace::default());
        pol.mean_actions(&b)
    };
    for o in observations() {
        let a = means(&pol, &o);
        // The NIC's interrupt rate and current knobs change a lot: the decision does not.
        let mut other = o.clone();
        other.host.nic.rx_irq_per_s = Some(5.0e5);
        other.host.nic.tx_irq_per_s = Some(2.0e5);
        other.host.nic.rx_knobs = None;
        other.host.nic.tx_knobs = None;
        assert_eq!(means(&pol, &other), a);
        assert_eq!(pol.act(&other), pol.act(&o));
        // A feature it does read does move it.
        let mut busier = o.clone();
        busier.host.nic.rx_pps = o.host.nic.rx_pps * 50.0 + 1.0e5;
        assert_ne!(means(&pol, &busier), a);
    }

    // In model.json, an unknown name is refused at load with the list of valid ones.
    let p = tmp.path().join(META_FILE);
    let mut m: ModelMeta = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    m.network.ignore_features[0] = "nic.irq_rate".into();
    std::fs::write(&p, serde_json::to_string(&m).unwrap()).unwrap();
    let e = LearnedPolicy::load(tmp.path(), &device).unwrap_err().to_string();
    assert!(e.contains("`nic.irq_rate` is not a feature"), "{e}");
}

fn edit(dir: &Path, f: impl FnOnce(&mut ModelMeta), reseal: bool) {
    let p = dir.join(META_FILE);
    let mut m: ModelMeta = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut m);
    if reseal {
        m.provenance.semantics_sha256 = Some(semantics_sha256(&m));
    }
    std::fs::write(&p, serde_json::to_string_pretty(&m).unwrap()).unwrap();
}

#[test]
fn model_json_relu_on_tanh_weights_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    saved(tmp.path());
    let p = tmp.path().join(META_FILE);
    let text = std::fs::read_to_string(&p).unwrap();
    assert!(text.contains("\"activation\": \"tanh\""), "{text}");
    // Edited by hand: the weights' checksum still matches, the semantics hash does not.
    std::fs::write(&p, text.replace("\"activation\": \"tanh\"", "\"activation\": \"relu\"")).unwrap();
    let e = LearnedPolicy::load(tmp.path(), &Device::flex()).unwrap_err().to_string();
    assert!(e.contains(META_FILE) && e.contains("edited by hand") && e.contains("reseal"), "{e}");
    // Every semantic section is covered: normaliser, action space, interval, probes.
    for f in [
        (|m: &mut ModelMeta| m.normalizer.host.mean[0] += 1.0) as fn(&mut ModelMeta),
        |m| m.action_space.nic.usecs_max = 999,
        |m| m.interval_us = 20_000,
        |m| m.probes.guest = false,
        |m| m.network.init_log_std = -1.0,
    ] {
        std::fs::write(&p, &text).unwrap();
        edit(tmp.path(), f, false);
        let e = LearnedPolicy::load(tmp.path(), &Device::flex()).unwrap_err().to_string();
        assert!(e.contains("edited by hand"), "{e}");
    }
    // Whitespace is not semantics.
    std::fs::write(&p, text.replace("\n", "\n  ")).unwrap();
    LearnedPolicy::load(tmp.path(), &Device::flex()).unwrap();
}

#[test]
fn negative_normalizer_clip_is_refused_not_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    saved(tmp.path());
    // Resealed: the value check itself must refuse it (it used to panic in f64::clamp at the first
    // decision, in simulate, eval and deploy alike).
    for clip in [-1.0f32, 0.0, f32::MAX] {
        edit(tmp.path(), |m| m.normalizer.clip = clip, true);
        let e = LearnedPolicy::load(tmp.path(), &Device::flex()).unwrap_err().to_string();
        assert!(
            e.contains(META_FILE) && e.contains("normalizer.clip = ") && e.contains("positive"),
            "{clip}: {e}"
        );
    }
    edit(tmp.path(), |m| m.normalizer.clip = 10.0, true);
    LearnedPolicy::load(tmp.path(), &Device::flex()).unwrap();
    edit(tmp.path(), |m| m.normalizer.guest.count = -3.0, true);
    let e = LearnedPolicy::load(tmp.path(), &Device::flex()).unwrap_err().to_string();
    assert!(e.contains("normalizer.guest.count = -3"), "{e}");
    edit(tmp.path(), |m| m.normalizer.guest.count = 1.0, true);
    edit(tmp.path(), |m| m.action_space.backend.frames_max = 0, true);
    let e = LearnedPolicy::load(tmp.path(), &Device::flex()).unwrap_err().to_string();
    assert!(e.contains("action_space.backend.frames_max = 0"), "{e}");
}

#[test]
fn models_without_a_semantics_hash_load_and_can_be_resealed() {
    let tmp = tempfile::tempdir().unwrap();
    let mut fresh = saved(tmp.path());
    // A model.json written before the hash existed.
    edit(tmp.path(), |m| m.provenance.semantics_sha256 = None, false);
    let text = std::fs::read_to_string(tmp.path().join(META_FILE)).unwrap();
    assert!(!text.contains("semantics_sha256"), "{text}");
    let mut old = LearnedPolicy::load(tmp.path(), &Device::flex()).unwrap();
    let sealed = LearnedPolicy::reseal(tmp.path()).unwrap();
    assert_eq!(sealed.provenance.semantics_sha256, Some(semantics_sha256(&sealed)));
    let mut resealed = LearnedPolicy::load(tmp.path(), &Device::flex()).unwrap();
    for o in observations() {
        assert_eq!(old.act(&o), fresh.act(&o));
        assert_eq!(resealed.act(&o), fresh.act(&o));
    }
    // Once sealed, an edit is refused.
    edit(tmp.path(), |m| m.network.activation = moderato_policies::learned::Activation::Relu, false);
    assert!(
        LearnedPolicy::load(tmp.path(), &Device::flex()).unwrap_err().to_string().contains("edited by hand")
    );
}

#[test]
fn the_shipped_default_model_is_sealed_and_loads() {
    let p = shipped();
    let m = p.meta();
    assert_eq!(m.provenance.semantics_sha256.as_deref(), Some(semantics_sha256(m).as_str()));
    assert_eq!(
        m.provenance.weights_sha256,
        "e75e2b88f3f1f7427c4dcbad7aa97edafd805641e598cce18e4801affe6e8047"
    );
    // Trained on every host profile.
    use moderato_env::HostProfile;
    assert_eq!(m.profiles, vec![HostProfile::KvmNotfCoal, HostProfile::KvmVhost, HostProfile::Xen]);
}

#[test]
fn a_target_outside_the_trained_range_is_refused_with_the_vm_and_the_range() {
    let tmp = tempfile::tempdir().unwrap();
    saved(tmp.path());
    edit(tmp.path(), |m| m.slo_range_us = Some([50.0, 2000.0]), true);
    let pol = LearnedPolicy::load(tmp.path(), &Device::flex()).unwrap();
    pol.check_objectives(&[Some(50.0), None, Some(2000.0)]).unwrap();
    let e = pol.check_objectives(&[Some(200.0), Some(20.0)]).unwrap_err().to_string();
    assert!(e.contains("VM 1") && e.contains("20 µs") && e.contains("50–2000 µs"), "{e}");
    // Through the simulator's spec: a scenario VM with its own target of 3 ms.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments/scenarios");
    let mut s = Scenario::load(dir.join("rr-latency.toml")).unwrap();
    s.vms[0].slo_p99_us = Some(moderato_env::sim::Objective::P99Us(3000.0));
    let env = SimEnv::new(s.clone(), SimConfig::default(), None).unwrap();
    let e = pol.check_spec(env.spec()).unwrap_err().to_string();
    assert!(e.contains("VM 0") && e.contains("3000 µs"), "{e}");
    // The run's SLO is every latency-sensitive VM's target where it sets none: 100 µs fits.
    s.vms[0].slo_p99_us = None;
    let cfg = SimConfig {
        reward: moderato_env::RewardConfig { slo_p99_us: 100.0, ..Default::default() },
        ..SimConfig::default()
    };
    pol.check_spec(SimEnv::new(s, cfg, None).unwrap().spec()).unwrap();
    // The range is part of what the weights mean: widening it by hand is refused.
    edit(tmp.path(), |m| m.slo_range_us = Some([1.0, 1e7]), false);
    let e = LearnedPolicy::load(tmp.path(), &Device::flex()).unwrap_err().to_string();
    assert!(e.contains("edited by hand"), "{e}");
}

/// Observations of every standard and validation scenario at a few loads, under per-packet
/// settings, with a VM of each to vary.
fn varied_observations() -> Vec<moderato_env::Observation> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments/scenarios");
    let mut files: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .chain(std::fs::read_dir(root.join("validation")).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    // Each host as written, and as a stock KVM host (where only the NIC and deferral act).
    let hosts = files.iter().flat_map(|f| {
        let s = Scenario::load(f).unwrap();
        [s.clone(), s.with_profile(moderato_env::HostProfile::KvmVhost)]
    });
    for s in hosts {
        let vms = s.vms.len();
        let cfg = SimConfig { episode_steps: 40, ..SimConfig::default() };
        let mut env = SimEnv::new(s, cfg, None).unwrap();
        env.reset(3).unwrap();
        for step in 1..=30 {
            let o = env.step(&moderato_env::CoalescingSettings::per_packet(vms)).unwrap().obs;
            if step % 10 == 0 {
                out.push(o);
            }
        }
    }
    out
}

/// Every knob on VM `vm`'s path (the NIC, its backend, its frontend), deferral included, at
/// target `t` µs.
fn path_knobs(
    p: &mut LearnedPolicy,
    obs: &moderato_env::Observation,
    vm: usize,
    t: f64,
) -> Vec<(String, u32)> {
    let mut o = obs.clone();
    o.host.slo_p99_us.resize(o.guests.len(), None);
    o.host.slo_p99_us[vm] = Some(t);
    o.guests[vm].slo_p99_us = Some(t);
    path_knobs_of(&p.act(&o), vm)
}

#[test]
fn the_shipped_model_never_coalesces_more_on_a_vms_path_for_a_tighter_target() {
    let mut p = shipped();
    let [lo, hi] = p.meta().slo_range_us.expect("the shipped model is trained for a range of targets");
    // Log-spaced targets across the trained range, loosest first.
    let grid: Vec<f64> = (0..=12).rev().map(|i| lo * (hi / lo).powf(f64::from(i) / 12.0)).collect();
    let (mut checked, mut moved, mut bad) = (0usize, 0usize, Vec::new());
    for (n, obs) in varied_observations().iter().enumerate() {
        for vm in 0..obs.guests.len() {
            let knobs: Vec<_> = grid.iter().map(|&t| path_knobs(&mut p, obs, vm, t)).collect();
            for w in 1..grid.len() {
                for ((name, looser), (_, tighter)) in knobs[w - 1].iter().zip(&knobs[w]) {
                    checked += 1;
                    moved += usize::from(tighter != looser);
                    if tighter > looser {
                        bad.push(format!(
                            "observation {n}, vm {vm}: {name} {looser} at {:.0} µs → {tighter} at {:.0} µs",
                            grid[w - 1],
                            grid[w]
                        ));
                    }
                }
            }
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {checked} steps coalesce more for a tighter target:\n{}",
        bad.len(),
        bad.join("\n")
    );
    // The check has teeth: the target does move the knobs.
    assert!(moved > 0, "no knob moved with the target over {checked} steps");
}

/// `obs` with VM `vm`'s target `t` µs (the only target) and its probe reporting `p99` µs (`samples` samples).
fn probed(
    obs: &moderato_env::Observation,
    vm: usize,
    t: f64,
    p99: f64,
    samples: u64,
) -> moderato_env::Observation {
    let mut o = obs.clone();
    // The other VMs without targets: the trim leaves them alone.
    o.host.slo_p99_us = vec![None; o.guests.len()];
    o.guests.iter_mut().for_each(|g| g.slo_p99_us = None);
    o.host.slo_p99_us[vm] = Some(t);
    o.guests[vm].slo_p99_us = Some(t);
    o.guests[vm].probe = Some(moderato_env::ProbeObs { p50_us: p99 / 2.0, p99_us: p99, samples });
    o
}

#[test]
fn the_trim_tells_the_model_a_tighter_target_over_its_setpoint_and_a_looser_one_under_it() {
    use moderato_policies::learned::trim::{TrimGains, TrimmedPolicy};
    let load = shipped;
    let mut raw = load();
    let [lo, hi] = raw.meta().slo_range_us.expect("the shipped model is trained for a range of targets");
    // The loop on the told target alone (its throughput floor is tested below).
    let g = TrimGains { throughput_floor: false, ..TrimGains::default() };
    let obs = varied_observations();
    let (mut moved, mut checked) = (0usize, 0usize);
    for o in obs.iter().step_by(7) {
        let vm = o.guests.len() - 1;
        let t = 200.0;
        // One interval at twice the setpoint: the factor falls by `down` of the log error ...
        let mut trim = TrimmedPolicy::new("trim", load(), g);
        trim.act(&probed(o, vm, t, 2.0 * g.setpoint * t, 100));
        let f = trim.factors()[vm];
        assert!(
            (f.ln() + g.down * 2f64.ln()).abs() < 1e-12,
            "factor {f} after one interval at twice the setpoint"
        );
        // ... and at half the setpoint it rises by `up` of it: slow to loosen, quick to tighten.
        let mut trim = TrimmedPolicy::new("trim", load(), g);
        trim.act(&probed(o, vm, t, 0.5 * g.setpoint * t, 100));
        assert!((trim.factors()[vm].ln() - g.up * 2f64.ln()).abs() < 1e-12);

        // Held far over the target, the told target settles at its floor, and the trimmed policy
        // decides exactly what the model decides when told that target.
        let mut trim = TrimmedPolicy::new("trim", load(), g);
        let over = probed(o, vm, t, 10.0 * t, 100);
        for _ in 0..40 {
            trim.act(&over);
        }
        let floor = (t / g.max_factor).max(lo);
        assert!((t * trim.factors()[vm] - t / g.max_factor).abs() < 1e-9, "{:?}", trim.factors());
        let got = path_knobs_of(&trim.act(&over), vm);
        assert_eq!(got, path_knobs(&mut raw, &over, vm, floor), "over the target: the model told {floor} µs");
        // Held far under it, at its ceiling.
        let mut trim = TrimmedPolicy::new("trim", load(), g);
        let under = probed(o, vm, t, 1.0, 100);
        for _ in 0..200 {
            trim.act(&under);
        }
        let ceiling = (t * g.max_factor).min(hi);
        let got_under = path_knobs_of(&trim.act(&under), vm);
        assert_eq!(
            got_under,
            path_knobs(&mut raw, &under, vm, ceiling),
            "under the target: told {ceiling} µs"
        );
        // The trim changed what the model decides for the operator's own target.
        checked += 2;
        moved += usize::from(got != path_knobs(&mut raw, &over, vm, t));
        moved += usize::from(got_under != path_knobs(&mut raw, &under, vm, t));

        // A probe without samples holds the factor; reset forgets it.
        let before = trim.factors()[vm];
        trim.act(&probed(o, vm, t, 10.0 * t, 0));
        assert_eq!(trim.factors()[vm], before);
        trim.reset();
        assert!(trim.factors().is_empty());
    }
    assert!(moved > 0, "the trim changed none of {checked} decisions");
}

#[test]
fn without_its_throughput_floor_the_trim_leaves_a_vm_without_a_target_as_the_model_decides_it() {
    use moderato_policies::learned::trim::TrimGains;
    let mut raw = shipped();
    let g = TrimGains { throughput_floor: false, ..TrimGains::default() };
    let mut trim = trimmed(g);
    for o in varied_observations().iter().step_by(5) {
        let o = without_targets(o);
        for _ in 0..5 {
            assert_eq!(trim.act(&o), raw.act(&o));
        }
        assert!(trim.factors().iter().all(|&f| f == 1.0), "{:?}", trim.factors());
        trim.reset();
        raw.reset();
    }
}

/// `o` with no VM holding a latency objective, each probe far over any target, and no drops.
fn without_targets(o: &moderato_env::Observation) -> moderato_env::Observation {
    let mut o = o.clone();
    o.host.nic.drops_per_s = 0.0;
    o.host.backends.iter_mut().for_each(|b| b.drops_per_s = 0.0);
    o.guests.iter_mut().for_each(|g| g.frontend.drops_per_s = 0.0);
    for g in &mut o.guests {
        g.slo_p99_us = None;
        g.probe = Some(moderato_env::ProbeObs { p50_us: 5_000.0, p99_us: 10_000.0, samples: 50 });
    }
    o.host.slo_p99_us = vec![None; o.guests.len()];
    o
}

/// Whether every ethtool knob of `a` coalesces at least as much as `floor` (frames 0: no count
/// trigger, the heaviest).
fn at_least(a: moderato_env::Knobs, floor: moderato_env::Knobs) -> bool {
    a.usecs >= floor.usecs && (a.frames == 0 || (floor.frames != 0 && a.frames >= floor.frames))
}

fn fixed(
    s: &moderato_env::CoalescingSettings,
    id: moderato_env::LayerId,
    dir: moderato_env::Direction,
) -> moderato_env::Knobs {
    match s.layer(id).get(dir) {
        moderato_env::Moderation::Fixed(k) => k,
        m => panic!("a learned policy sets fixed knobs, not {m:?}"),
    }
}

#[test]
fn the_trim_floors_a_vm_without_a_target_at_the_heaviest_knobs_and_backs_off_on_its_drops() {
    use moderato_env::{Direction, LayerId};
    use moderato_policies::learned::trim::TrimGains;
    use moderato_policies::slo_feedback::LADDER;
    let mut raw = shipped();
    let g = TrimGains::default();
    let mut trim = trimmed(g);
    let top = LADDER[LADDER.len() - 1];
    let (mut raised, mut checked) = (0usize, 0usize);
    for o in varied_observations().iter().step_by(5) {
        let o = without_targets(o);
        let vms = o.guests.len();
        let (s, model) = (trim.act(&o), raw.act(&o));
        // No VM has an objective: every layer, the NIC included, is at least the ladder's top, and
        // a knob the model set heavier stays the model's.
        for id in moderato_env::LayerId::all(vms) {
            for d in Direction::BOTH {
                let (k, m) = (fixed(&s, id, d), fixed(&model, id, d));
                assert!(at_least(k, top) && at_least(k, m), "{id:?} {d:?}: {k} (model {m}, floor {top})");
                checked += 1;
                raised += usize::from(k != m);
            }
            assert_eq!(s.layer(id).napi, model.layer(id).napi, "the floor leaves deferral to the model");
        }
        assert!(trim.factors().iter().all(|&f| f == 1.0), "no target, no trim of it: {:?}", trim.factors());
        // Drops on VM 0's backend: its floor falls by `floor_down` an interval, the others' hold
        // at the top; intervals without drops climb back by `floor_up`.
        let mut dropping = o.clone();
        dropping.host.backends[0].drops_per_s = 1_000.0;
        trim.act(&dropping);
        let (levels, nic) = trim.floor_levels();
        let top_level = (LADDER.len() - 1) as f64;
        assert_eq!(levels[0], top_level - g.floor_down);
        assert!(levels[1..].iter().all(|&l| l == top_level), "{levels:?}");
        assert_eq!(nic, top_level, "the NIC's floor answers to the NIC's drops");
        for _ in 0..3 {
            trim.act(&dropping);
        }
        assert_eq!(trim.floor_levels().0[0], 0.0, "the floor bottoms out at per-packet");
        let s = trim.act(&o);
        assert_eq!(trim.floor_levels().0[0], g.floor_up);
        let model = raw.act(&o);
        for id in [LayerId::Backend(0), LayerId::Frontend(0)] {
            assert_eq!(s.layer(id), model.layer(id), "a floor at level 0 leaves the model's knobs");
        }
        trim.reset();
        assert!(trim.floor_levels().0.is_empty());
        raw.reset();
    }
    assert!(raised > 0, "the floor raised none of {checked} knobs");
}

#[test]
fn the_trim_raises_a_vm_floor_while_its_p99_is_far_under_its_target_and_drops_it_over_the_setpoint() {
    use moderato_env::{Direction, LayerId};
    use moderato_policies::learned::trim::TrimGains;
    use moderato_policies::slo_feedback::LADDER;
    let g = TrimGains::default();
    let mut trim = trimmed(g);
    let o = &varied_observations()[0];
    let t = 200.0; // four times it is inside the trained range: the factor is what runs out
    // Far under the target (under `floor_headroom` × it): the trim first loosens the target it
    // tells the model; the floor stays at per-packet until that is exhausted ...
    let under = probed(o, 0, t, 0.1 * t, 100);
    trim.act(&under);
    let mut intervals = 1;
    while trim.factors()[0] < g.max_factor - 1e-9 {
        assert_eq!(trim.floor_levels().0[0], 0.0, "the floor climbed before the told target was loosest");
        trim.act(&under);
        intervals += 1;
        assert!(intervals < 100, "the factor never reached its maximum: {:?}", trim.factors());
    }
    // ... then climbs `floor_up` each interval.
    let before = trim.floor_levels().0[0];
    let mut s = trim.act(&under);
    assert_eq!(trim.floor_levels().0[0], before + g.floor_up);
    for _ in 0..40 {
        s = trim.act(&under);
    }
    let top = (LADDER.len() - 1) as f64;
    assert_eq!(trim.floor_levels().0[0], top);
    // VM 0 is the only VM with a target: the NIC follows its floor, and its path is at the top.
    assert_eq!(trim.floor_levels().1, top);
    for id in [LayerId::Nic, LayerId::Backend(0), LayerId::Frontend(0)] {
        for d in Direction::BOTH {
            let k = fixed(&s, id, d);
            assert!(at_least(k, LADDER[LADDER.len() - 1]), "{id:?} {d:?}: {k}");
        }
    }
    // Between the headroom and the setpoint: it holds; over the setpoint: it falls `floor_down`.
    trim.act(&probed(o, 0, t, 0.7 * t, 100));
    assert_eq!(trim.floor_levels().0[0], top);
    trim.act(&probed(o, 0, t, 0.9 * t, 100));
    assert_eq!(trim.floor_levels().0[0], top - g.floor_down);
    // A probe without samples holds it.
    trim.act(&probed(o, 0, t, 0.9 * t, 0));
    assert_eq!(trim.floor_levels().0[0], top - g.floor_down);
}

/// The shipped model, loaded for the flex backend.
fn shipped() -> LearnedPolicy {
    LearnedPolicy::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/default"), &Device::flex())
        .unwrap()
}

/// The shipped model under the trim with gains `g`.
fn trimmed(
    g: moderato_policies::learned::trim::TrimGains,
) -> moderato_policies::learned::trim::TrimmedPolicy {
    moderato_policies::learned::trim::TrimmedPolicy::new("trim", shipped(), g)
}

/// [`path_knobs`]'s list, from settings already decided.
fn path_knobs_of(s: &moderato_env::CoalescingSettings, vm: usize) -> Vec<(String, u32)> {
    use moderato_env::{Direction, LayerId, Moderation};
    let mut out = Vec::new();
    for id in [LayerId::Nic, LayerId::Backend(vm), LayerId::Frontend(vm)] {
        for dir in Direction::BOTH {
            let Moderation::Fixed(k) = s.layer(id).get(dir) else {
                panic!("a learned policy sets fixed knobs")
            };
            out.push((format!("{id:?} {dir:?} usecs"), k.usecs));
            out.push((format!("{id:?} {dir:?} frames"), k.frames));
        }
        let n = s.layer(id).napi;
        out.push((format!("{id:?} napi_defer_hard_irqs"), n.napi_defer_hard_irqs));
        out.push((format!("{id:?} gro_flush_timeout_us"), (n.gro_flush_timeout_ns / 1000) as u32));
    }
    out
}

#[test]
fn after_an_interval_over_its_setpoint_the_trim_loosens_only_once_the_window_has_passed() {
    use moderato_policies::learned::trim::TrimGains;
    let g = TrimGains::default();
    let mut trim = trimmed(g);
    let o = &varied_observations()[0];
    let t = 200.0;
    // A burst: one interval at twice the setpoint.
    trim.act(&probed(o, 0, t, 2.0 * g.setpoint * t, 100));
    let after_burst = trim.factors()[0];
    assert!(after_burst < 1.0);
    // Lulls far under the setpoint: held while the burst is in the window ...
    for i in 1..g.window {
        trim.act(&probed(o, 0, t, 0.1 * t, 100));
        assert_eq!(trim.factors()[0], after_burst, "loosened {i} intervals after the burst");
    }
    // ... and intervals without samples do not count towards it.
    trim.act(&probed(o, 0, t, 0.1 * t, 0));
    assert_eq!(trim.factors()[0], after_burst);
    // The burst has left the window: the next lull loosens, by `up` of its own margin.
    trim.act(&probed(o, 0, t, 0.1 * t, 100));
    let f = trim.factors()[0];
    assert!((f.ln() - after_burst.ln() - g.up * (g.setpoint / 0.1).ln()).abs() < 1e-12, "{f}");
}

/// `o` with VM 0 held to `t` µs (its probe without samples: the trim holds its factor), the other
/// VMs without objectives, and no drops.
fn one_target_no_samples(o: &moderato_env::Observation, t: f64) -> moderato_env::Observation {
    let mut o = without_targets(o);
    o.host.slo_p99_us[0] = Some(t);
    o.guests[0].slo_p99_us = Some(t);
    o.guests
        .iter_mut()
        .for_each(|g| g.probe = Some(moderato_env::ProbeObs { p50_us: 0.0, p99_us: 0.0, samples: 0 }));
    o
}

/// `o` reporting the knobs of `s` as the ones in force, where it reports knobs at all.
fn in_force(
    o: &moderato_env::Observation,
    s: &moderato_env::CoalescingSettings,
) -> moderato_env::Observation {
    use moderato_env::{Direction, InterfaceObs, LayerSettings, Moderation};
    let mut o = o.clone();
    let set = |i: &mut InterfaceObs, l: &LayerSettings| {
        for (seen, d) in [(&mut i.rx_knobs, Direction::Rx), (&mut i.tx_knobs, Direction::Tx)] {
            if let (Some(k), Moderation::Fixed(m)) = (seen.as_mut(), l.get(d)) {
                *k = m;
            }
        }
    };
    set(&mut o.host.nic, &s.nic);
    for (v, vm) in s.vms.iter().enumerate() {
        set(&mut o.host.backends[v], &vm.backend);
        set(&mut o.guests[v].frontend, &vm.frontend);
    }
    o
}

#[test]
fn the_trim_shows_the_model_its_own_knobs_where_a_floor_raised_them() {
    use moderato_env::LayerId;
    use moderato_policies::learned::trim::{TrimGains, TrimmedPolicy};
    let load = shipped;
    let (mut checked, mut differs) = (0usize, 0usize);
    for o in varied_observations().iter().filter(|o| o.guests.len() >= 2) {
        let o = one_target_no_samples(o, 200.0);
        let (mut trim, mut raw, mut blind) =
            (TrimmedPolicy::new("trim", load(), TrimGains::default()), load(), load());
        let s1 = trim.act(&o);
        let m1 = raw.act(&o);
        blind.act(&o);
        assert_ne!(s1, m1, "the neighbours without objectives are floored");
        // The host now reports the floored knobs; the model is shown its own instead.
        let o2 = in_force(&o, &s1);
        let s2 = trim.act(&o2);
        let m2 = raw.act(&in_force(&o, &m1));
        let b2 = blind.act(&o2);
        for id in [LayerId::Nic, LayerId::Backend(0), LayerId::Frontend(0)] {
            assert_eq!(
                s2.layer(id),
                m2.layer(id),
                "{id:?}: VM 0's path is the model's decision on its own knobs"
            );
            differs += usize::from(b2.layer(id) != m2.layer(id));
            checked += 1;
        }
    }
    assert!(checked > 0, "no observation with two VMs");
    assert!(
        differs > 0,
        "shown the floored knobs the model decided the same on all {checked} layers: the test proves nothing"
    );
}

#[test]
fn a_strained_vm_with_a_target_caps_the_throughput_floors_which_creep_back_slowly() {
    use moderato_policies::learned::trim::TrimGains;
    use moderato_policies::slo_feedback::LADDER;
    let g = TrimGains::default();
    let o = varied_observations().into_iter().find(|o| o.guests.len() >= 2).expect("a host with two VMs");
    let o = without_targets(&o);
    let t = 200.0;
    let mut trim = trimmed(g);
    let top = (LADDER.len() - 1) as f64;
    // VM 0 far under its target: its told target loosens; the neighbours' floors stay at the top.
    for _ in 0..30 {
        trim.act(&probed(&o, 0, t, 0.1 * t, 100));
    }
    assert!(trim.factors()[0] > 1.0);
    assert!(trim.floor_levels().0[1..].iter().all(|&l| l == top));
    // One interval over the setpoint (the factor stays above 1): the neighbours yield `floor_down`.
    trim.act(&probed(&o, 0, t, 0.9 * t, 100));
    assert!(trim.factors()[0] > 1.0, "{:?}", trim.factors());
    assert!(trim.floor_levels().0[1..].iter().all(|&l| l == top - g.floor_down), "{:?}", trim.floor_levels());
    // Calm again: they climb only as far as the cap, which creeps up `ceiling_up` an interval.
    let calm = probed(&o, 0, t, 0.7 * t, 100);
    for _ in 0..20 {
        trim.act(&calm);
    }
    let cap = top - g.floor_down + 20.0 * g.ceiling_up;
    for &l in &trim.floor_levels().0[1..] {
        assert!((l - cap).abs() < 1e-9, "floor {l}, cap {cap}");
    }
}

/// The shipped stock-KVM specialist (`models/kvm-vhost`): sealed, for `kvm-vhost` hosts and
/// targets of 150–300 µs only, and reading the decaying peak of the recent intervals: after a
/// burst it acts differently on the same lull than it does when the lull is all it has seen.
#[test]
fn the_shipped_kvm_vhost_model_serves_its_profile_and_targets_and_remembers_a_burst() {
    use moderato_env::HostProfile;
    use moderato_policies::learned::History;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/kvm-vhost");
    let mut p = LearnedPolicy::load(&dir, &Device::flex()).unwrap();
    let m = p.meta().clone();
    assert_eq!(m.provenance.semantics_sha256.as_deref(), Some(semantics_sha256(&m).as_str()));
    assert_eq!(
        m.provenance.weights_sha256,
        "7474ffcf55146383ffcabc720ddc74bc1fe44ea97893287b1854ae67c5190a87"
    );
    assert_eq!(m.profiles, vec![HostProfile::KvmVhost]);
    assert_eq!(m.network.history, History::Peak);
    p.check_profile(HostProfile::KvmVhost).unwrap();
    assert!(p.check_profile(HostProfile::Xen).is_err());
    p.check_objectives(&[Some(200.0), None]).unwrap();
    let e = p.check_objectives(&[Some(100.0)]).unwrap_err().to_string();
    assert!(e.contains("100 µs") && e.contains("150–300 µs"), "{e}");

    // onoff-bursts as a kvm-vhost host: one interval at a burst's rate, one in a lull.
    let scen = Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments/scenarios/onoff-bursts.toml");
    let s = Scenario::load(scen).unwrap().as_profile(HostProfile::KvmVhost).unwrap();
    let mut env = SimEnv::new(s, SimConfig::default(), None).unwrap();
    let (mut o, _) = env.reset(3).unwrap();
    let (mut burst, mut lull) = (None, None);
    for _ in 0..200 {
        let a = p.act(&o);
        o = env.step(&a).unwrap().obs;
        let pps = o.host.nic.rx_pps;
        if pps > 50_000.0 && burst.is_none() {
            burst = Some(o.clone());
        } else if pps < 10_000.0 && burst.is_some() && lull.is_none() {
            lull = Some(o.clone());
        }
    }
    let (burst, lull) = (burst.expect("a burst in 2 s"), lull.expect("a lull after it"));
    p.reset();
    let fresh = p.act(&lull);
    p.reset();
    p.act(&burst);
    let after_burst = p.act(&lull);
    assert_ne!(fresh, after_burst, "the model reads the burst before the lull");
    // And it forgets: a reset, then the lull alone again, is the fresh decision.
    p.reset();
    assert_eq!(p.act(&lull), fresh);
}
