//! The metrics server and exposition, and the SLO guard, on the fake `Coalescer` and a copy of the
//! virtio guest fixture tree: every family strictly formed (checked here, and by the Python
//! `prometheus_client` OpenMetrics parser where it is installed), a connection flood that cannot
//! take the loop's descriptors, `/healthz`, and the guard taking over and handing back.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use moderato_agent::deploy::metrics::{self, ServerLimits};
use moderato_agent::deploy::{DeployLoop, LoopOptions, Metrics, SloTarget};
use moderato_env::live::ProbeConfig;
use moderato_env::{CoalescingSettings, Moderation};
use tokio::sync::watch;

mod common;

use common::{Rig, Scripted, frontend, limits, opts, rt};

fn get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn body(resp: &str) -> &str {
    resp.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

/// Checks the OpenMetrics text strictly: every sample belongs to the family declared just above
/// it (name, or name plus the suffixes its type allows), each family is declared once with HELP
/// and TYPE, no gauge carries a `quantile` label, and the text ends with `# EOF`. Returns the
/// families and their types.
fn strict_families(text: &str) -> Vec<(String, String)> {
    let mut families: Vec<(String, String)> = Vec::new();
    let mut current: Option<(String, String)> = None;
    let mut helped = std::collections::BTreeSet::new();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "the text must end with # EOF");
    for l in &lines[..lines.len() - 1] {
        if let Some(rest) = l.strip_prefix("# HELP ") {
            let name = rest.split_whitespace().next().unwrap().to_string();
            assert!(helped.insert(name.clone()), "HELP of {name} twice");
        } else if let Some(rest) = l.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let (name, kind) = (it.next().unwrap().to_string(), it.next().unwrap().to_string());
            assert!(helped.contains(&name), "TYPE of {name} without HELP");
            assert!(!families.iter().any(|(n, _)| *n == name), "family {name} declared twice");
            families.push((name.clone(), kind.clone()));
            current = Some((name, kind));
        } else if l.starts_with('#') {
            panic!("unexpected comment line `{l}`");
        } else {
            let (name, kind) = current.as_ref().unwrap_or_else(|| panic!("sample before any TYPE: `{l}`"));
            let sample = l.split(['{', ' ']).next().unwrap();
            let suffixes: &[&str] = match kind.as_str() {
                "counter" => &["_total", "_created"],
                "histogram" => &["_bucket", "_count", "_sum", "_created"],
                "gauge" => &[""],
                other => panic!("unexpected type {other}"),
            };
            assert!(
                suffixes.iter().any(|s| sample == format!("{name}{s}")),
                "sample `{sample}` is not of family {name} ({kind})"
            );
            if kind == "gauge" {
                assert!(!l.contains("quantile="), "a quantile label on a gauge: `{l}`");
            }
            let value = l.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "`{value}` is not a number in `{l}`");
        }
    }
    families
}

/// Python's `prometheus_client` OpenMetrics parser over `text`, where the package is installed:
/// `Some(families)`, or the parse error as a panic. `None` where it is not installed (CI installs
/// it: `.ci/run`).
fn python_parse(text: &str) -> Option<Vec<String>> {
    let script = "import sys\n\
        from prometheus_client.openmetrics.parser import text_string_to_metric_families as p\n\
        for f in p(sys.stdin.read()):\n    print(f.name, f.type, len(f.samples))\n";
    let mut child = std::process::Command::new("python3")
        .args(["-c", "import prometheus_client"])
        .stderr(std::process::Stdio::null())
        .status()
        .ok()
        .filter(|s| s.success())
        .map(|_| {
            std::process::Command::new("python3")
                .args(["-c", script])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })?;
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the strict parser refused the text:\n{}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8(out.stdout).unwrap().lines().map(str::to_string).collect())
}

/// A UDP echo on loopback that holds each reply `slow` for its first `slow_for`, then answers at
/// once.
fn echo(slow: Duration, slow_for: Duration) -> (SocketAddr, Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    let addr = sock.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let h = std::thread::spawn(move || {
        let start = Instant::now();
        let mut buf = [0u8; 256];
        while !s2.load(Ordering::Relaxed) {
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                if start.elapsed() < slow_for {
                    std::thread::sleep(slow);
                }
                let _ = sock.send_to(&buf[..n], from);
            }
        }
    });
    (addr, stop, h)
}

fn probe(addr: SocketAddr) -> ProbeConfig {
    ProbeConfig { period: Duration::from_millis(2), ..ProbeConfig::new(addr) }
}

#[test]
fn the_metrics_text_is_one_family_per_metric_and_a_strict_parser_reads_it() {
    let (addr, stop, h) = echo(Duration::ZERO, Duration::ZERO);
    let mut rig = Rig::with_probe(Some(probe(addr)));
    let primary = Scripted::fixed("steady", frontend(Moderation::fixed(40, 16), Moderation::fixed(40, 16)));
    let m = Metrics::new(false);
    let o = LoopOptions { slo: Some(SloTarget { p99_us: 1e6, after_intervals: 3 }), ..opts(Some(6)) };
    let lp = DeployLoop::new(
        rig.env.take().unwrap(),
        primary,
        Scripted::fixed("fb", CoalescingSettings::per_packet(1)),
        limits(),
        o,
        m.clone(),
    )
    .unwrap();
    let (_tx, rx) = watch::channel(false);
    rt().block_on(lp.run(rx)).unwrap();
    stop.store(true, Ordering::Relaxed);
    h.join().unwrap();
    let text = m.render();
    let fams = strict_families(&text);
    let kind = |n: &str| fams.iter().find(|(f, _)| f == n).map(|(_, k)| k.as_str());
    // The families the issue found mis-grouped, and the probe's latency as a histogram.
    assert_eq!(kind("moderato_interface_rx_pps"), Some("gauge"), "{text}");
    assert_eq!(kind("moderato_interface_tx_pps"), Some("gauge"), "{text}");
    assert_eq!(kind("moderato_probe_rtt_microseconds"), Some("histogram"), "{text}");
    assert_eq!(kind("moderato_decisions"), Some("counter"), "{text}");
    assert_eq!(kind("moderato_slo_target_p99_microseconds"), Some("gauge"), "{text}");
    assert!(text.contains("moderato_interface_rx_pps{layer=\"vm0.frontend\",interface=\"eth0\"}"), "{text}");
    assert!(text.contains("moderato_decisions_total{policy=\"steady\"} 6"), "{text}");
    let count: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("moderato_probe_rtt_microseconds_count "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(count > 0.0, "{text}");
    if let Some(parsed) = python_parse(&text) {
        for want in [
            "moderato_interface_rx_pps gauge 1",
            "moderato_interface_tx_pps gauge 1",
            "moderato_decisions counter 1",
            "moderato_probe_p99_microseconds gauge 1",
        ] {
            assert!(parsed.iter().any(|l| l == want), "{want} not in {parsed:?}");
        }
        assert!(
            parsed.iter().any(|l| l.starts_with("moderato_probe_rtt_microseconds histogram ")),
            "{parsed:?}"
        );
        assert!(!parsed.iter().any(|l| l.contains(" unknown ")), "{parsed:?}");
    } else {
        eprintln!(
            "note: python3 with prometheus_client not installed; checked with the built-in strict checks only"
        );
    }
}

#[test]
fn a_flood_of_idle_connections_holds_at_most_max_connections_descriptors() {
    fn open_fds() -> usize {
        std::fs::read_dir("/proc/self/fd").unwrap().count()
    }
    let m = Metrics::new(false);
    let limits = ServerLimits { max_connections: 4, timeout: Duration::from_millis(250) };
    // The server on a runtime of its own thread, as beside the deploy loop; it lives until the
    // test process ends.
    let (tx, rx) = std::sync::mpsc::channel();
    let m2 = m.clone();
    std::thread::spawn(move || {
        rt().block_on(async move {
            let l = metrics::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
            tx.send(l.local_addr().unwrap()).unwrap();
            metrics::serve(l, m2, limits).await;
        })
    });
    let addr = rx.recv().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let before = open_fds();
    // 48 clients that connect and never send a byte (half-open requests).
    let n = 48;
    let clients: Vec<TcpStream> = (0..n).map(|_| TcpStream::connect(addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(100));
    let during = open_fds();
    // Our client ends, plus at most 4 accepted server ends: the rest wait in the backlog.
    assert!(during <= before + n + 4, "{before} descriptors before, {during} during the flood");
    assert!(during > before + n, "the server accepted some: {before} → {during}");
    // The timeout closes idle ones and frees their permits: a real request is answered.
    let t = Instant::now();
    let resp = get(addr, "/metrics");
    assert!(resp.starts_with("HTTP/1.1 200 OK"), "{resp}");
    assert!(body(&resp).ends_with("# EOF\n"), "{resp}");
    assert!(t.elapsed() < Duration::from_secs(30));
    drop(clients);
    let resp = get(addr, "/nope");
    assert!(resp.starts_with("HTTP/1.1 404"), "{resp}");
    let resp = get(addr, "/healthz");
    assert!(resp.starts_with("HTTP/1.1 200 OK") && body(&resp).starts_with("ok: "), "{resp}");
}

#[test]
fn healthz_answers_ok_while_decisions_come_and_503_when_they_stall() {
    let m = Metrics::new(false);
    m.set_interval(Duration::from_millis(1));
    assert!(m.health().unwrap().starts_with("ok: "));
    // Allowed: three intervals plus a second since the start (no decision yet).
    std::thread::sleep(Duration::from_millis(1100));
    let e = m.health().unwrap_err();
    assert!(e.starts_with("stalled: ") && e.contains("since the start, with no decision yet"), "{e}");
}

#[test]
fn the_slo_guard_overrides_the_policy_after_k_intervals_over_target_and_hands_back() {
    // Replies held 30 ms for the first 0.3 s (p99 over a 20 ms target), then at once.
    let (addr, stop, h) = echo(Duration::from_millis(30), Duration::from_millis(300));
    let mut rig = Rig::with_probe(Some(probe(addr)));
    let heavy = frontend(Moderation::fixed(100, 64), Moderation::fixed(100, 64));
    let m = Metrics::new(false);
    let o = LoopOptions { slo: Some(SloTarget { p99_us: 20_000.0, after_intervals: 2 }), ..opts(Some(60)) };
    let lp = DeployLoop::new(
        rig.env.take().unwrap(),
        Scripted::fixed("heavy", heavy),
        Scripted::fixed("fb", CoalescingSettings::per_packet(1)),
        limits(),
        o,
        m.clone(),
    )
    .unwrap();
    let (_tx, rx) = watch::channel(false);
    let s = rt().block_on(lp.run(rx)).unwrap();
    stop.store(true, Ordering::Relaxed);
    h.join().unwrap();
    assert_eq!(s.slo_overrides, 1, "{s:?}");
    assert!(s.slo_override_decisions >= 2 && s.slo_override_decisions < s.decisions, "{s:?}");
    // Handed back: the policy's heavy coalescing is in force at the end (within the limits).
    assert_eq!(s.last.as_ref().unwrap().vms[0].frontend.rx, Moderation::fixed(100, 64), "{s:?}");
    let text = m.render();
    assert!(text.contains("moderato_slo_overrides_total 1"), "{text}");
    assert!(text.contains("moderato_slo_override_active 0"), "{text}");
    let violations: f64 =
        text.lines().find_map(|l| l.strip_prefix("moderato_slo_violations_total ")).unwrap().parse().unwrap();
    assert!(violations >= 2.0, "{text}");
}

/// A loopback port with nothing behind it now, and a responder started on it after `after`.
fn late_echo(after: Duration) -> (SocketAddr, Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let addr = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let h = std::thread::spawn(move || {
        std::thread::sleep(after);
        moderato_env::live::serve_udp_echo(addr, &s2).unwrap();
    });
    (addr, stop, h)
}

#[test]
fn a_probe_target_silent_at_start_is_not_refused_and_the_fallback_decides_until_it_answers() {
    let (addr, stop, h) = late_echo(Duration::from_millis(250));
    let mut rig = Rig::with_probe(Some(probe(addr)));
    let mut primary =
        Scripted::fixed("learned", frontend(Moderation::fixed(40, 16), Moderation::fixed(40, 16)));
    primary.req = moderato_policies::Requirements { host: vec![], guest: vec!["guest.probe_p99_ln".into()] };
    let m = Metrics::new(false);
    let lp = DeployLoop::new(
        rig.env.take().unwrap(),
        primary,
        Scripted::fixed("fb", CoalescingSettings::per_packet(1)),
        limits(),
        opts(Some(50)),
        m.clone(),
    )
    .expect("a silent probe target is no reason to refuse");
    let (_tx, rx) = watch::channel(false);
    let s = rt().block_on(lp.run(rx)).unwrap();
    stop.store(true, Ordering::Relaxed);
    h.join().unwrap();
    // At least the start's silence hands decisions to the fallback; on a loaded machine a late
    // reply later on can hand it one more interval, which is the same rule at work.
    assert!(s.fallbacks >= 1, "{s:?}");
    assert!(s.fallback_decisions >= 5, "{s:?}");
    let text = m.render();
    let learned: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("moderato_decisions_total{policy=\"learned\"} "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(learned >= 10.0, "the policy decides once the probe answers:\n{text}");
    assert_eq!(s.last.unwrap().vms[0].frontend.rx, Moderation::fixed(40, 16));
}

#[test]
fn a_policy_that_reads_no_probe_feature_ignores_a_silent_probe() {
    let (addr, stop, h) = late_echo(Duration::from_secs(60));
    let mut rig = Rig::with_probe(Some(probe(addr)));
    let primary = Scripted::fixed("steady", frontend(Moderation::fixed(40, 16), Moderation::fixed(40, 16)));
    let lp = DeployLoop::new(
        rig.env.take().unwrap(),
        primary,
        Scripted::fixed("fb", CoalescingSettings::per_packet(1)),
        limits(),
        opts(Some(10)),
        Metrics::new(false),
    )
    .unwrap();
    let (_tx, rx) = watch::channel(false);
    let s = rt().block_on(lp.run(rx)).unwrap();
    stop.store(true, Ordering::Relaxed);
    drop(h); // its responder is still asleep; the process ends it
    assert_eq!((s.fallbacks, s.fallback_decisions), (0, 0), "{s:?}");
}

#[test]
fn a_deploy_whose_probe_cannot_open_its_socket_yet_starts_and_says_why() {
    // Issue 14: a probe whose network is not up at start refused the deploy. 192.0.2.77 (TEST-NET-1)
    // is on no interface here, as a bind address is before the network comes up; nothing is sent.
    let (addr, stop, h) = late_echo(Duration::from_secs(60));
    let p = ProbeConfig { bind: Some("192.0.2.77:0".parse().unwrap()), ..probe(addr) };
    let mut rig = Rig::with_probe(Some(p));
    let mut env = rig.env.take().unwrap();
    let _ = env.start();
    std::thread::sleep(Duration::from_millis(120));
    let s = env.sample();
    stop.store(true, Ordering::Relaxed);
    drop(h);
    assert!(s.obs.guests[0].probe.is_none());
    let w = s.info.warnings.join("\n");
    assert!(w.contains(&format!("latency probe to {addr}")) && w.contains("errors this interval"), "{w}");
}
