//! The throughput and interrupt-rate curves of a host with and without NAPI, per-packet knobs:
//! `cargo run --release -p moderato-env --example napi_curve`.
//!
//! Two hosts, one core for the NIC: `livelock` puts the protocol work (2.0 µs per packet) in the
//! backend thread on the NIC's core (Mogul & Ramakrishnan's setting); `in-poll` runs it inside
//! the NIC's poll (NAPI's own setting), the backend on another core.

use moderato_env::sim::{
    Arrivals, BackendKind, Costs, FlowConfig, FlowKind, HostConfig, ProbeMode, Scenario, ServiceDist,
    SimConfig, SimEnv, SizeDist, VmConfig,
};
use moderato_env::{CoalescingSettings, Env};

fn host(offered: f64, napi: bool, in_poll: bool) -> Scenario {
    let zero = Costs {
        virq_us: 0.0,
        virq_posted_us: 0.0,
        kick_us: 0.0,
        backend_wakeup_us: 0.0,
        frontend_per_packet_us: 0.0,
        stack_per_packet_us: 0.0,
        stack_per_byte_ns: 0.0,
        app_wakeup_us: 0.0,
        vcpu_wakeup_us: 0.0,
        frontend_poll_us: 0.0,
        service: ServiceDist::Deterministic,
        ..Costs::default()
    };
    let (costs, cpus, backend_cpu) = if in_poll {
        (Costs { nic_per_packet_us: 2.3, backend_per_packet_us: Some(0.1), ..zero }, 2, 1)
    } else {
        (Costs { nic_per_packet_us: 0.3, backend_per_packet_us: Some(2.0), ..zero }, 1, 0)
    };
    let flow = FlowConfig {
        kind: FlowKind::Stream,
        arrivals: Arrivals::Poisson { rate_pps: offered },
        size: SizeDist::Fixed { bytes: 64 },
        response_size: None,
        app_us: 0.0,
        latency_sensitive: Some(true),
    };
    Scenario {
        name: "napi-curve".into(),
        description: String::new(),
        host: HostConfig { cpus, backend: BackendKind::Xen, napi, ..HostConfig::default() },
        costs,
        vms: vec![VmConfig {
            name: "vm".into(),
            backend_cpu,
            ring: 256,
            backend_queue: 256,
            socket_buffer: 1024,
            flows: vec![flow],
            slo_p99_us: None,
        }],
    }
}

/// (delivered kpps, NIC interrupts k/s, NIC polls k/s) over 200 ms after 40 ms.
fn point(sc: Scenario) -> (f64, f64, f64) {
    let cfg =
        SimConfig { interval_us: 20_000, episode_steps: 12, probe: ProbeMode::None, ..SimConfig::default() };
    let mut env = SimEnv::new(sc, cfg, None).expect("valid scenario");
    env.reset(51).expect("reset");
    let (mut done, mut irq, mut polls, mut secs) = (0.0, 0.0, 0.0, 0.0);
    for i in 0..12 {
        let s = env.step(&CoalescingSettings::per_packet(1)).expect("step");
        if i < 2 {
            continue;
        }
        let dt = s.obs.interval_ns as f64 / 1e9;
        let t = s.info.truth.expect("simulator truth");
        done += t.completed as f64;
        irq += s.obs.host.nic.rx_irq_per_s.unwrap_or(0.0) * dt;
        polls += t.polls.nic_rx as f64;
        secs += dt;
    }
    (done / secs / 1e3, irq / secs / 1e3, polls / secs / 1e3)
}

fn main() {
    for (name, in_poll) in [("livelock", false), ("in-poll", true)] {
        println!("\n{name} host (kpps; interrupts and polls in k/s)");
        println!("| offered | pre-NAPI delivered | pre-NAPI irq | NAPI delivered | NAPI irq | NAPI polls |");
        println!("|---|---|---|---|---|---|");
        for x in [0.5, 0.9, 1.0, 1.3, 1.65, 2.0, 2.3, 2.6] {
            let offered = x / 3.3e-6;
            let (od, oi, _) = point(host(offered, false, in_poll));
            let (nd, ni, np) = point(host(offered, true, in_poll));
            println!("| {:.0} | {od:.0} | {oi:.0} | {nd:.0} | {ni:.0} | {np:.1} |", offered / 1e3);
        }
    }
}
