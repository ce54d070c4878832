//! Calibration of the NAPI simulator against a published DIM result.
//!
//! The virtio-net dynamic coalescing patches (Linux 6.7, `virtnet_rx_dim_work`: net_dim on the
//! guest's rx notifications, with a device that offers `VIRTIO_NET_F_VQ_NOTF_COAL`) report 16.5%
//! less CPU for a saturating UDP stream into the guest than per-packet notifications.

use std::sync::Arc;

use moderato_env::sim::{
    Arrivals, BackendKind, Costs, FlowConfig, FlowKind, HostConfig, ProbeMode, Scenario, SimConfig, SimEnv,
    SizeDist, VmConfig,
};
use moderato_env::{Adaptive, CoalescingSettings, Env, Moderation};
use moderato_policies::adaptive::{AdaptiveConfig, AdaptiveFactory};

/// A vhost host, one guest receiving a UDP stream of `bytes`-byte datagrams at `rate_pps`.
fn udp_stream(bytes: u32, rate_pps: f64) -> Scenario {
    let flow = FlowConfig {
        kind: FlowKind::Stream,
        arrivals: Arrivals::Poisson { rate_pps },
        size: SizeDist::Fixed { bytes },
        response_size: None,
        app_us: 0.0,
        latency_sensitive: Some(false),
    };
    Scenario {
        name: "udp-stream".into(),
        description: String::new(),
        host: HostConfig { backend: BackendKind::Vhost, ..HostConfig::default() },
        costs: Costs::default(),
        vms: vec![VmConfig {
            name: "guest".into(),
            backend_cpu: 1,
            ring: 256,
            backend_queue: 256,
            socket_buffer: 1024,
            flows: vec![flow],
            slo_p99_us: None,
        }],
    }
}

/// (guest CPU µs per delivered packet, delivered pps) over 1 s after a 100 ms warm-up.
fn guest_cost(sc: Scenario, s: &CoalescingSettings) -> (f64, f64) {
    let cfg =
        SimConfig { interval_us: 100_000, episode_steps: 11, probe: ProbeMode::None, ..SimConfig::default() };
    let factory = Arc::new(AdaptiveFactory::new(AdaptiveConfig::default()));
    let mut env = SimEnv::new(sc, cfg, Some(factory)).unwrap();
    env.reset(7).unwrap();
    let (mut ns, mut done, mut secs) = (0u64, 0u64, 0.0);
    for i in 0..11 {
        let st = env.step(s).unwrap();
        if i == 0 {
            continue;
        }
        let t = st.info.truth.unwrap();
        ns += t.cpu.guest_ns();
        done += t.completed;
        secs += t.interval_ns as f64 / 1e9;
    }
    (ns as f64 / 1000.0 / done as f64, done as f64 / secs)
}

/// Per-packet everywhere, but DIM on the guest's rx notifications (the stream the patch moderates:
/// in moderato's layer map, the backend layer's rx knob).
fn dim_on_guest_rx() -> CoalescingSettings {
    let mut s = CoalescingSettings::per_packet(1);
    s.vms[0].backend.rx = Moderation::Adaptive(Adaptive::Dim);
    s
}

#[test]
fn dim_on_virtio_rx_saves_guest_cpu_near_the_published_figure() {
    // "Saturating": 250k datagrams/s of 1500 B is the most the per-packet guest delivers without
    // loss; its vCPU is then about 90% busy (virtual interrupts 2.5 µs, driver 0.7, stack 1.15 and
    // the application's wake-up 0.5 µs per packet, less what NAPI already shares).
    let sc = udp_stream(1500, 250_000.0);
    let (pp, pp_rate) = guest_cost(sc.clone(), &CoalescingSettings::per_packet(1));
    let (dim, dim_rate) = guest_cost(sc, &dim_on_guest_rx());
    let busy = pp * pp_rate / 1e6;
    assert!(
        (0.8..1.0).contains(&busy) && pp_rate > 0.99 * 250_000.0,
        "per-packet: {busy:.2} busy at {pp_rate:.0}/s"
    );
    let saving = 1.0 - dim / pp;
    eprintln!(
        "per-packet {pp:.3} µs/pkt at {pp_rate:.0}/s; DIM {dim:.3} at {dim_rate:.0}/s: saving {saving:.3}"
    );
    // The band is the published 16.5% within a factor of two either way (8%–33%): the patch's
    // setup leaves open what a notification costs its guest (posted interrupts or not: 0.4 or
    // 2.5 µs here) and the per-packet stack cost (datagram size, GRO, checksum offload), each of
    // which moves the notifications' share of the guest's CPU, the most DIM can save, by about
    // two. Here (no posted interrupts) it saves about 31%; with posted interrupts much less.
    assert!((0.08..=0.33).contains(&saving), "DIM saved {:.1}% of guest CPU per packet", 100.0 * saving);
    // And it costs no throughput.
    assert!(dim_rate >= 0.99 * pp_rate, "DIM delivered {dim_rate:.0}/s vs {pp_rate:.0}/s");
}
