//! The scenario generator: deterministic per seed, every drawn host valid (validator and env
//! checker), every drawn value inside its documented range, the wire's line rate never exceeded,
//! and a drawn host saved as TOML loads back to the same scenario and simulates identically.

use std::path::Path;

use moderato_env::sim::generator::{
    GeneratorSpec, Process, STANDARD_FRAME, SizeKind, estimated_load, mean_rate, sample,
};
use moderato_env::sim::{
    Arrivals, BackendKind, Costs, FlowKind, MAX_FRAME, Scenario, ServiceDist, SimConfig, SimEnv, SizeDist,
};
use moderato_env::{ActionSpace, Env, check_env};

/// Seeds of the property tests (the default suite: cheap, the draws are microseconds each).
const SEEDS: u64 = 2000;

fn short() -> SimConfig {
    SimConfig { interval_us: 1_000, episode_steps: 4, ..SimConfig::default() }
}

fn in_f(x: f64, [lo, hi]: [f64; 2]) -> bool {
    x >= lo * (1.0 - 1e-12) && x <= hi * (1.0 + 1e-12)
}

fn sizes_in(s: &SizeDist, lo: u32, hi: u32, kinds: &[SizeKind]) -> Result<(), String> {
    let ok = |b: u32| (lo..=hi).contains(&b);
    match s {
        SizeDist::Fixed { bytes } if kinds.contains(&SizeKind::Fixed) && ok(*bytes) => Ok(()),
        SizeDist::Bimodal { small, large, p_small }
            if kinds.contains(&SizeKind::Bimodal)
                && ok(*small)
                && ok(*large)
                && small <= large
                && (0.2..=0.9).contains(p_small) =>
        {
            Ok(())
        }
        SizeDist::Imix if kinds.contains(&SizeKind::Imix) => Ok(()),
        other => Err(format!("{other:?} outside {lo}..={hi} / {kinds:?}")),
    }
}

fn process_of(a: &Arrivals) -> Process {
    match a {
        Arrivals::Poisson { .. } => Process::Poisson,
        Arrivals::Constant { .. } => Process::Constant,
        Arrivals::OnOff { .. } => Process::OnOff,
        Arrivals::Ramp { .. } => Process::Ramp,
        Arrivals::Diurnal { .. } => Process::Diurnal,
        Arrivals::ClosedLoop { .. } => Process::ClosedLoop,
        Arrivals::Trace { .. } => Process::Trace,
    }
}

/// Every documented range of `spec` holds in `s`.
fn honours(spec: &GeneratorSpec, s: &Scenario) -> Result<(), String> {
    let h = &s.host;
    let int = |k: &str, x: usize, [lo, hi]: [usize; 2]| {
        if (lo..=hi).contains(&x) { Ok(()) } else { Err(format!("{k} = {x} outside [{lo}, {hi}]")) }
    };
    let pow2 = |k: &str, x: usize, r: [usize; 2]| {
        int(k, x, r)?;
        if x.is_power_of_two() { Ok(()) } else { Err(format!("{k} = {x} is not a power of two")) }
    };
    if !spec.backends.contains(&h.backend) {
        return Err(format!("backend {:?}", h.backend));
    }
    int("cpus", h.cpus, spec.cpus)?;
    if !spec.line_rate_gbps.contains(&h.line_rate_gbps) {
        return Err(format!("line rate {}", h.line_rate_gbps));
    }
    pow2("nic_rx_ring", h.nic_rx_ring, spec.nic_ring)?;
    pow2("nic_tx_ring", h.nic_tx_ring, spec.nic_ring)?;
    let d = Costs::default();
    let c = &s.costs;
    for (k, x, def) in [
        ("nic_irq_us", c.nic_irq_us, d.nic_irq_us),
        ("nic_per_packet_us", c.nic_per_packet_us, d.nic_per_packet_us),
        ("backend_per_packet_us", c.backend_per_packet(h.backend), d.backend_per_packet(h.backend)),
        ("virq_us", c.virq_us, d.virq_us),
        ("virq_posted_us", c.virq_posted_us, d.virq_posted_us),
        ("kick_us", c.kick_us, d.kick_us),
        ("backend_wakeup_us", c.backend_wakeup_us, d.backend_wakeup_us),
        ("frontend_per_packet_us", c.frontend_per_packet_us, d.frontend_per_packet_us),
        ("stack_per_packet_us", c.stack_per_packet_us, d.stack_per_packet_us),
        ("stack_per_byte_ns", c.stack_per_byte_ns, d.stack_per_byte_ns),
        ("app_wakeup_us", c.app_wakeup_us, d.app_wakeup_us),
        ("vcpu_wakeup_us", c.vcpu_wakeup_us, d.vcpu_wakeup_us),
        ("nic_poll_us", c.nic_poll_us, d.nic_poll_us),
        ("frontend_poll_us", c.frontend_poll_us, d.frontend_poll_us),
    ] {
        if !in_f(x / def, spec.cost_scale) {
            return Err(format!("costs.{k} = {x}: factor {} outside {:?}", x / def, spec.cost_scale));
        }
    }
    int("vms", s.vms.len(), spec.vms)?;
    let jumbo = s.vms.iter().flat_map(|v| &v.flows).any(|f| {
        let big = |z: &SizeDist| match z {
            SizeDist::Fixed { bytes } => *bytes > STANDARD_FRAME,
            SizeDist::Bimodal { large, .. } => *large > STANDARD_FRAME,
            SizeDist::Imix => false,
        };
        big(&f.size) || f.response_size.as_ref().is_some_and(big)
    });
    let hi = if jumbo { spec.frame_bytes[1] } else { spec.frame_bytes[1].min(STANDARD_FRAME) };
    for (vi, vm) in s.vms.iter().enumerate() {
        let at = format!("vm{vi}");
        if vm.backend_cpu >= h.cpus || (h.cpus > 1 && vm.backend_cpu == h.nic_cpu) {
            return Err(format!("{at}.backend_cpu = {} on a host of {} cores", vm.backend_cpu, h.cpus));
        }
        pow2(&format!("{at}.ring"), vm.ring, spec.vm_ring)?;
        pow2(&format!("{at}.backend_queue"), vm.backend_queue, spec.backend_queue)?;
        pow2(&format!("{at}.socket_buffer"), vm.socket_buffer, spec.socket_buffer)?;
        int(&format!("{at} flows"), vm.flows.len(), spec.flows_per_vm)?;
        // One objective per VM: all its receive-path flows agree, bulk transmit never holds one.
        let sensitive: Vec<bool> = vm
            .flows
            .iter()
            .filter(|f| f.kind != FlowKind::BulkTx)
            .map(|f| f.is_latency_sensitive())
            .collect();
        if sensitive.windows(2).any(|w| w[0] != w[1]) {
            return Err(format!("{at}: flows disagree on the VM's objective"));
        }
        // The VM's own target exactly where it has an objective, within the documented range.
        let has = sensitive.first().copied().unwrap_or(false);
        match vm.slo_p99_us.and_then(|o| o.target_us()) {
            Some(t) if has && (spec.slo_p99_us[0]..=spec.slo_p99_us[1]).contains(&t) => {}
            None if !has && vm.slo_p99_us.is_none() => {}
            other => return Err(format!("{at}.slo_p99_us = {other:?} (objective: {has})")),
        }
        for (fi, f) in vm.flows.iter().enumerate() {
            let at = format!("{at}.flow{fi}");
            if !spec.kinds.contains(&f.kind) {
                return Err(format!("{at}: kind {:?}", f.kind));
            }
            if f.kind == FlowKind::BulkTx && f.is_latency_sensitive() {
                return Err(format!("{at}: bulk transmit marked latency-sensitive"));
            }
            let p = process_of(&f.arrivals);
            if !spec.processes.contains(&p)
                || (p == Process::ClosedLoop && f.kind != FlowKind::RequestResponse)
            {
                return Err(format!("{at}: process {p:?} for {:?}", f.kind));
            }
            sizes_in(&f.size, spec.frame_bytes[0], hi, &spec.sizes).map_err(|e| format!("{at}.size: {e}"))?;
            match (&f.response_size, f.kind) {
                (Some(r), FlowKind::RequestResponse) => sizes_in(r, spec.frame_bytes[0], hi, &spec.sizes)
                    .map_err(|e| format!("{at}.response_size: {e}"))?,
                (None, FlowKind::RequestResponse) => return Err(format!("{at}: no response size")),
                (Some(_), _) => return Err(format!("{at}: a response size on {:?}", f.kind)),
                (None, _) => {}
            }
            if f.app_us != 0.0 && !in_f(f.app_us, spec.app_us) {
                return Err(format!("{at}.app_us = {} outside {:?}", f.app_us, spec.app_us));
            }
            match &f.arrivals {
                // The client count carries the rate (clients / think = the flow's rate), so the
                // think time lies in [low / 2, high], or above when one client is all it takes.
                Arrivals::ClosedLoop { clients, think_us, .. }
                    if *think_us < spec.think_us[0] / 2.0
                        || (*clients > 1 && *think_us > spec.think_us[1]) =>
                {
                    return Err(format!("{at}: {clients} clients thinking {think_us} µs"));
                }
                Arrivals::Trace { points, scale, .. } => {
                    let mean = mean_rate(&f.arrivals);
                    let peak = points[..points.len() - 1].iter().map(|p| p.1).fold(0.0, f64::max) * scale;
                    // A crowd of at least flash_peak[0] = 3x over the base stands out above the
                    // mean (which holds the crowds too).
                    if peak < 1.1 * mean {
                        return Err(format!("{at}: trace peak {peak} over mean {mean}: no flash crowd"));
                    }
                }
                _ => {}
            }
        }
    }
    let est = estimated_load(s);
    // The load factor is honoured unless the wire's peak capped the rates (then it is lower).
    let capped = est.wire_rx_peak.max(est.wire_tx_peak) > 1.0 - 1e-6;
    if est.cpu > spec.load[1] * (1.0 + 1e-9) || (!capped && est.cpu < spec.load[0] * (1.0 - 1e-9)) {
        return Err(format!(
            "estimated load {} outside {:?} (capped by the wire: {capped})",
            est.cpu, spec.load
        ));
    }
    if est.wire_rx_peak > 1.0 || est.wire_tx_peak > 1.0 {
        return Err(format!(
            "peak wire use rx {} tx {} exceeds the line rate",
            est.wire_rx_peak, est.wire_tx_peak
        ));
    }
    Ok(())
}

#[test]
fn the_same_seed_draws_the_same_host_and_others_differ() {
    let spec = GeneratorSpec::default();
    let mut names = std::collections::BTreeSet::new();
    let mut distinct = std::collections::BTreeSet::new();
    for seed in 0..200 {
        let a = sample(&spec, seed);
        assert_eq!(a, sample(&spec, seed), "seed {seed}");
        names.insert(a.name.clone());
        distinct.insert(a.to_toml().unwrap());
    }
    assert_eq!(names.len(), 200);
    assert_eq!(distinct.len(), 200, "different seeds drew identical hosts");
}

#[test]
fn every_drawn_host_is_valid_and_honours_the_documented_ranges() {
    let spec = GeneratorSpec::default();
    spec.validate().unwrap();
    for seed in 0..SEEDS {
        let s = sample(&spec, seed);
        s.validate().unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        honours(&spec, &s).unwrap_or_else(|e| panic!("seed {seed}: {e}\n{}", s.to_toml().unwrap()));
    }
}

#[test]
fn a_narrow_spec_is_honoured_too() {
    let spec = GeneratorSpec {
        backends: vec![BackendKind::Xen],
        cpus: [3, 3],
        p_posted_interrupts: 1.0,
        p_napi_off: 0.0,
        line_rate_gbps: vec![1.0],
        nic_ring: [1024, 1024],
        vm_ring: [100, 300],
        cost_scale: [0.9, 1.1],
        p_exponential_service: 1.0,
        vms: [4, 4],
        flows_per_vm: [2, 2],
        kinds: vec![FlowKind::RequestResponse],
        processes: vec![Process::ClosedLoop, Process::Trace],
        sizes: vec![SizeKind::Fixed, SizeKind::Bimodal],
        frame_bytes: [2000, MAX_FRAME],
        p_jumbo: 1.0,
        load: [0.9, 0.95],
        ..GeneratorSpec::default()
    };
    spec.validate().unwrap();
    let mut wire_capped = 0;
    for seed in 0..300 {
        let s = sample(&spec, seed);
        s.validate().unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        honours(&spec, &s).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        assert!(s.host.posted_interrupts && s.host.napi && s.costs.service == ServiceDist::Exponential);
        assert!(s.vms.iter().all(|v| v.ring == 128 || v.ring == 256));
        let est = estimated_load(&s);
        wire_capped += usize::from(est.wire_rx_peak.max(est.wire_tx_peak) > 1.0 - 1e-6);
    }
    // Jumbo frames on a 1 Gbit/s wire: the line rate, not the CPU, caps some hosts.
    assert!(wire_capped > 0, "no host was capped by the wire");
}

#[test]
fn tight_and_loose_targets_and_vms_without_one_all_appear() {
    let spec = GeneratorSpec::default();
    let hosts: Vec<Scenario> = (0..SEEDS).map(|seed| sample(&spec, seed)).collect();
    let objectives: Vec<Option<f64>> =
        hosts.iter().flat_map(|s| s.vms.iter().map(|v| v.slo_p99_us.and_then(|o| o.target_us()))).collect();
    let targets: Vec<f64> = objectives.iter().flatten().copied().collect();
    let share =
        |f: &dyn Fn(f64) -> bool| targets.iter().filter(|&&t| f(t)).count() as f64 / targets.len() as f64;
    // Log-uniform over 50 µs – 2 ms: about a quarter under 125 µs and a quarter over 800 µs.
    assert!(share(&|t| t < 125.0) > 0.15 && share(&|t| t > 800.0) > 0.15, "{targets:?}");
    let without = objectives.iter().filter(|o| o.is_none()).count() as f64 / objectives.len() as f64;
    assert!(without > 0.2 && without < 0.6, "share of VMs without an objective: {without}");
    // Mixed hosts: latency-sensitive and bulk VMs side by side.
    assert!(hosts.iter().any(|s| {
        let o: Vec<bool> = s.vms.iter().map(|v| v.slo_p99_us.is_some()).collect();
        o.contains(&true) && o.contains(&false)
    }));
}

#[test]
fn idle_busy_and_saturated_hosts_all_appear() {
    let spec = GeneratorSpec::default();
    let loads: Vec<f64> = (0..SEEDS).map(|seed| estimated_load(&sample(&spec, seed)).cpu).collect();
    let share =
        |lo: f64, hi: f64| loads.iter().filter(|&&l| l >= lo && l < hi).count() as f64 / loads.len() as f64;
    assert!(share(0.0, 0.2) > 0.05, "idle {}", share(0.0, 0.2));
    assert!(share(0.4, 0.7) > 0.1, "busy {}", share(0.4, 0.7));
    assert!(share(0.9, 1.2) > 0.1, "near-saturated {}", share(0.9, 1.2));
}

#[test]
fn every_kind_process_and_size_appears() {
    let spec = GeneratorSpec::default();
    let mut seen = std::collections::BTreeSet::new();
    for seed in 0..SEEDS {
        let s = sample(&spec, seed);
        seen.insert(format!("{:?}", s.host.backend));
        seen.insert(format!("cpus{}", s.host.cpus));
        seen.insert(format!("vms{}", s.vms.len()));
        for f in s.vms.iter().flat_map(|v| &v.flows) {
            seen.insert(format!("{:?}", f.kind));
            seen.insert(format!("{:?}", process_of(&f.arrivals)));
            seen.insert(
                match &f.size {
                    SizeDist::Fixed { .. } => "fixed",
                    SizeDist::Bimodal { .. } => "bimodal",
                    SizeDist::Imix => "imix",
                }
                .to_string(),
            );
        }
    }
    for want in [
        "Xen",
        "Vhost",
        "cpus1",
        "cpus4",
        "vms1",
        "vms4",
        "Stream",
        "BulkTx",
        "RequestResponse",
        "Poisson",
        "Constant",
        "OnOff",
        "Ramp",
        "Diurnal",
        "ClosedLoop",
        "Trace",
        "fixed",
        "bimodal",
        "imix",
    ] {
        assert!(seen.contains(want), "{want} never drawn: {seen:?}");
    }
}

#[test]
fn drawn_hosts_pass_the_env_checker() {
    let spec = GeneratorSpec::default();
    // Every 10th of the property seeds: the checker simulates three envs each.
    for seed in (0..SEEDS).step_by(10) {
        let s = sample(&spec, seed);
        check_env(|| SimEnv::new(s.clone(), short(), None).unwrap(), seed, 3)
            .unwrap_or_else(|e| panic!("seed {seed}: {e}\n{}", s.to_toml().unwrap()));
    }
}

/// Steps `s` under fixed actions and returns every observation's features and reward, as bits.
fn run(s: Scenario, seed: u64) -> Vec<u64> {
    let vms = s.vms.len();
    let mut env = SimEnv::new(s, short(), None).unwrap();
    env.reset(seed).unwrap();
    let sp = ActionSpace::default();
    let mut out = Vec::new();
    for i in 0..4 {
        let a: Vec<f32> = (0..ActionSpace::dim(vms)).map(|k| ((i * 7 + k) % 5) as f32 / 2.0 - 1.0).collect();
        let st = env.step(&sp.decode(vms, &a)).unwrap();
        out.push(u64::from(st.reward.to_bits()));
        let t = st.info.truth.unwrap();
        out.extend([t.offered, t.completed, t.dropped]);
    }
    out
}

#[test]
fn a_saved_host_loads_back_identical_and_simulates_identically() {
    let spec = GeneratorSpec::default();
    let dir = tempfile::tempdir().unwrap();
    let mut traces = 0;
    for seed in 0..60 {
        let s = sample(&spec, seed);
        let path = dir.path().join(format!("{}.toml", s.name));
        s.save(&path).unwrap();
        let back = Scenario::load(&path).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        assert_eq!(back, s, "seed {seed}");
        traces += s
            .vms
            .iter()
            .flat_map(|v| &v.flows)
            .filter(|f| matches!(f.arrivals, Arrivals::Trace { .. }))
            .count();
        if seed % 6 == 0 {
            assert_eq!(run(back, seed), run(s, seed), "seed {seed}");
        }
    }
    assert!(traces > 0, "no trace among 60 hosts: the round trip of trace files went untested");
}

#[test]
fn save_refuses_trace_paths_outside_its_directory() {
    let spec = GeneratorSpec { processes: vec![Process::Trace], ..GeneratorSpec::default() };
    let mut s = sample(&spec, 1);
    if let Arrivals::Trace { path, .. } = &mut s.vms[0].flows[0].arrivals {
        *path = "../escape.csv".into();
    }
    let dir = tempfile::tempdir().unwrap();
    let e = s.save(&dir.path().join("x.toml")).unwrap_err().to_string();
    assert!(e.contains("vm[0].flow[0].arrivals.path = ../escape.csv"), "{e}");
    assert!(!dir.path().join("x.toml").exists() && !Path::new(&dir.path().join("../escape.csv")).exists());
}

#[test]
fn the_corners_of_every_range_draw_valid_hosts() {
    let low = GeneratorSpec {
        cpus: [1, 1],
        line_rate_gbps: vec![0.1],
        nic_ring: [1, 1],
        vm_ring: [1, 1],
        backend_queue: [1, 1],
        socket_buffer: [1, 1],
        cost_scale: [0.01, 0.01],
        vms: [1, 1],
        flows_per_vm: [1, 1],
        app_us: [1e-3, 1e-3],
        think_us: [1.0, 1.0],
        flash_peak: [1.0, 1.0],
        load: [1e-3, 1e-3],
        ..GeneratorSpec::default()
    };
    let high = GeneratorSpec {
        cpus: [64, 64],
        line_rate_gbps: vec![1000.0],
        nic_ring: [1 << 20, 1 << 20],
        vm_ring: [1 << 20, 1 << 20],
        backend_queue: [1 << 20, 1 << 20],
        socket_buffer: [1 << 20, 1 << 20],
        cost_scale: [100.0, 100.0],
        vms: [64, 64],
        flows_per_vm: [16, 16],
        sizes: vec![SizeKind::Fixed],
        frame_bytes: [MAX_FRAME, MAX_FRAME],
        p_jumbo: 1.0,
        p_app_time: 1.0,
        app_us: [1e6, 1e6],
        think_us: [1e6, 1e6],
        flash_peak: [100.0, 100.0],
        load: [2.0, 2.0],
        slo_p99_us: [1e7, 1e7],
        ..GeneratorSpec::default()
    };
    for (what, spec) in [("low", low), ("high", high)] {
        spec.validate().unwrap_or_else(|e| panic!("{what}: {e}"));
        for seed in 0..40 {
            let s = sample(&spec, seed);
            s.validate().unwrap_or_else(|e| panic!("{what} seed {seed}: {e}"));
            let est = estimated_load(&s);
            assert!(est.wire_rx_peak <= 1.0 && est.wire_tx_peak <= 1.0, "{what} seed {seed}: {est:?}");
        }
    }
}

#[test]
fn profiles_are_drawn_per_backend_on_their_own_stream() {
    use moderato_env::HostProfile;
    let all = HostProfile::ALL.to_vec();
    let spec = GeneratorSpec { profiles: all.clone(), ..GeneratorSpec::default() };
    spec.validate().unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for seed in 0..400 {
        let with = sample(&spec, seed);
        let p = with.host.profile.expect("every backend has a listed profile");
        assert_eq!(p.backend(), with.host.backend, "seed {seed}: {p} on {:?}", with.host.backend);
        with.validate().unwrap();
        seen.insert(p);
        // Every other draw is the one the same seed makes without profiles.
        let mut without = sample(&GeneratorSpec::default(), seed);
        without.host.profile = with.host.profile;
        assert_eq!(without, with, "seed {seed}");
        assert_eq!(with, sample(&spec, seed));
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), all);
    // A profile whose backend is never drawn is refused, naming both.
    let bad = GeneratorSpec { backends: vec![BackendKind::Vhost], profiles: vec![HostProfile::Xen], ..spec };
    let e = bad.validate().unwrap_err();
    assert!(e.contains("\"xen\"") && e.contains("backends"), "{e}");
    // Only vhost profiles listed: Xen hosts keep no profile.
    let vhost_only = GeneratorSpec { profiles: vec![HostProfile::KvmVhost], ..GeneratorSpec::default() };
    for seed in 0..100 {
        let s = sample(&vhost_only, seed);
        let want = (s.host.backend == BackendKind::Vhost).then_some(HostProfile::KvmVhost);
        assert_eq!(s.host.profile, want, "seed {seed}");
    }
}
