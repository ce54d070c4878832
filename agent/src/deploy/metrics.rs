//! Metrics of the deploy loop in the OpenMetrics text format (the `prometheus-client` crate's
//! exposition: one family per metric, counters with `_total`, a histogram for latency), served
//! on `--metrics-addr` by a small hyper HTTP/1 server: `GET /metrics`, and `GET /healthz` for
//! liveness probes (200 while the loop decides on time, 503 when it has stalled).
//!
//! | metric | type | meaning |
//! |---|---|---|
//! | `moderato_knob{layer,interface,knob}` | gauge | knob in force, read back from the driver (ethtool's names: the interface's direction) |
//! | `moderato_adaptive{layer,interface,direction}` | gauge | 1 where the driver's adaptive moderation is on |
//! | `moderato_decided_knob{layer,interface,knob}` | gauge | the last decision after safety limits, VM direction (what a dry run would set) |
//! | `moderato_observe_only{layer,interface}` | gauge | 1 where the layer cannot be set |
//! | `moderato_decisions_total{policy}` | counter | decisions, by the policy that made them |
//! | `moderato_fallback_active` | gauge | 1 while the fallback policy decides |
//! | `moderato_fallbacks_total` | counter | switches to the fallback policy |
//! | `moderato_observation_age_seconds` | gauge | time since the last complete observation |
//! | `moderato_incomplete_observations_total` | counter | observations with missing readings |
//! | `moderato_errors_total` | counter | warnings: failed reads, refused knobs, vanished interfaces |
//! | `moderato_limited_total` | counter | decisions changed by the safety limits |
//! | `moderato_interface_rx_pps{layer,interface}` | gauge | packets per second towards the guest |
//! | `moderato_interface_tx_pps{layer,interface}` | gauge | packets per second from the guest |
//! | `moderato_interface_irq_per_second{layer,interface}` | gauge | interrupt rate, where known |
//! | `moderato_probe_rtt_microseconds` | histogram | every latency probe round trip |
//! | `moderato_probe_p50_microseconds`, `_p99_` | gauge | the probe's percentiles over the last interval |
//! | `moderato_slo_target_p99_microseconds` | gauge | the SLO guard's target (absent without `[slo]`) |
//! | `moderato_slo_violations_total` | counter | intervals whose probe p99 exceeded the target |
//! | `moderato_slo_overrides_total` | counter | times the SLO guard took over from the policy |
//! | `moderato_slo_override_active` | gauge | 1 while the SLO guard overrides the policy |
//! | `moderato_metrics_connections_max` | gauge | connections the server serves at once (the rest wait in the kernel's backlog) |
//! | `moderato_dry_run` | gauge | 1 in a dry run |
//!
//! ## A server that cannot starve the loop
//! The loop opens `/proc/stat`, `/proc/interrupts` and sysfs files every interval, so the server
//! must never take the last descriptors. It accepts a connection only while it holds one of
//! [`ServerLimits::max_connections`] permits; further clients wait in the listen backlog, which
//! costs this process no descriptor. The bound is derived from the process's open-file limit
//! (`/proc/self/limits`), leaving [`RESERVED_FDS`] for the loop. Each connection gets
//! [`ServerLimits::timeout`] for its whole request and answer (headers included), then is closed,
//! so half-open clients free their permit. The unit file raises `LimitNOFILE` as well.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use moderato_env::live::LiveSample;
use moderato_env::{CoalescingSettings, Direction, LayerId, Moderation};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// The OpenMetrics content type of `/metrics`.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Descriptors kept free for the loop's own reads (procfs, sysfs, netlink, the probe).
pub const RESERVED_FDS: u64 = 128;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IfLabels {
    layer: String,
    interface: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KnobLabels {
    layer: String,
    interface: String,
    knob: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirLabels {
    layer: String,
    interface: String,
    direction: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyLabels {
    policy: String,
}

type FGauge = Gauge<f64, AtomicU64>;

/// The deploy loop's counters and gauges, shared with the server.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    knob: Family<KnobLabels, Gauge>,
    adaptive: Family<DirLabels, Gauge>,
    decided_knob: Family<KnobLabels, Gauge>,
    observe_only: Family<IfLabels, Gauge>,
    decisions: Family<PolicyLabels, Counter>,
    fallback_active: Gauge,
    fallbacks: Counter,
    observation_age: FGauge,
    incomplete: Counter,
    errors: Counter,
    limited: Counter,
    rx_pps: Family<IfLabels, FGauge>,
    tx_pps: Family<IfLabels, FGauge>,
    irq: Family<IfLabels, FGauge>,
    probe_rtt: Histogram,
    probe_p50: FGauge,
    probe_p99: FGauge,
    slo_target: FGauge,
    slo_violations: Counter,
    slo_overrides: Counter,
    slo_active: Gauge,
    connections_max: Gauge,
    dry_run: Gauge,
    times: Mutex<Times>,
}

#[derive(Debug)]
struct Times {
    started: Instant,
    last_complete: Option<Instant>,
    last_decision: Option<Instant>,
    interval: Duration,
}

fn knob_labels(layer: LayerId, interface: &str, knob: &str) -> KnobLabels {
    KnobLabels { layer: layer.to_string(), interface: interface.to_string(), knob: knob.to_string() }
}

impl Metrics {
    pub fn new(dry_run: bool) -> Arc<Self> {
        let mut registry = Registry::default();
        macro_rules! reg {
            ($name:literal, $help:literal, $m:expr) => {{
                let m = $m;
                registry.register($name, $help, m.clone());
                m
            }};
        }
        let m = Metrics {
            knob: reg!(
                "moderato_knob",
                "Coalescing knob in force, read back from the driver.",
                Family::default()
            ),
            adaptive: reg!(
                "moderato_adaptive",
                "1 where the driver's adaptive moderation is on.",
                Family::default()
            ),
            decided_knob: reg!(
                "moderato_decided_knob",
                "Last decision after safety limits (VM direction); adaptive directions are left out.",
                Family::default()
            ),
            observe_only: reg!(
                "moderato_observe_only",
                "1 where the layer's knobs cannot be set.",
                Family::default()
            ),
            decisions: reg!(
                "moderato_decisions",
                "Decisions, by the policy that made them.",
                Family::default()
            ),
            fallback_active: reg!(
                "moderato_fallback_active",
                "1 while the fallback policy decides.",
                Gauge::default()
            ),
            fallbacks: reg!("moderato_fallbacks", "Switches to the fallback policy.", Counter::default()),
            observation_age: reg!(
                "moderato_observation_age_seconds",
                "Time since the last complete observation.",
                FGauge::default()
            ),
            incomplete: reg!(
                "moderato_incomplete_observations",
                "Observations with missing readings.",
                Counter::default()
            ),
            errors: reg!(
                "moderato_errors",
                "Warnings: failed reads, refused knobs, vanished interfaces.",
                Counter::default()
            ),
            limited: reg!("moderato_limited", "Decisions changed by the safety limits.", Counter::default()),
            rx_pps: reg!(
                "moderato_interface_rx_pps",
                "Packets per second towards the guest.",
                Family::default()
            ),
            tx_pps: reg!(
                "moderato_interface_tx_pps",
                "Packets per second from the guest.",
                Family::default()
            ),
            irq: reg!(
                "moderato_interface_irq_per_second",
                "Interrupts per second, both directions.",
                Family::default()
            ),
            probe_rtt: reg!(
                "moderato_probe_rtt_microseconds",
                "Round-trip times of the latency probe.",
                Histogram::new([
                    10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1_000.0, 2_000.0, 5_000.0, 10_000.0, 20_000.0,
                    50_000.0, 100_000.0, 200_000.0,
                ])
            ),
            probe_p50: reg!(
                "moderato_probe_p50_microseconds",
                "Median probe round trip over the last interval (0 without replies).",
                FGauge::default()
            ),
            probe_p99: reg!(
                "moderato_probe_p99_microseconds",
                "99th percentile probe round trip over the last interval (0 without replies).",
                FGauge::default()
            ),
            slo_target: FGauge::default(),
            slo_violations: reg!(
                "moderato_slo_violations",
                "Intervals whose probe p99 exceeded the SLO target.",
                Counter::default()
            ),
            slo_overrides: reg!(
                "moderato_slo_overrides",
                "Times the SLO guard took over from the policy.",
                Counter::default()
            ),
            slo_active: reg!(
                "moderato_slo_override_active",
                "1 while the SLO guard overrides the policy with the least coalescing.",
                Gauge::default()
            ),
            connections_max: reg!(
                "moderato_metrics_connections_max",
                "Connections the metrics server serves at once; more wait in the listen backlog.",
                Gauge::default()
            ),
            dry_run: reg!("moderato_dry_run", "1 in a dry run (nothing is set).", Gauge::default()),
            times: Mutex::new(Times {
                started: Instant::now(),
                last_complete: None,
                last_decision: None,
                interval: Duration::from_secs(1),
            }),
            registry,
        };
        m.dry_run.set(i64::from(dry_run));
        Arc::new(m)
    }

    fn times(&self) -> std::sync::MutexGuard<'_, Times> {
        self.times.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The control interval, for `/healthz`.
    pub fn set_interval(&self, interval: Duration) {
        self.times().interval = interval;
    }

    /// The SLO guard's target, exported as a gauge (registered once; `None` leaves it out).
    pub fn set_slo_target(&self, p99_us: Option<f64>) {
        if let Some(t) = p99_us {
            self.slo_target.set(t);
        }
    }

    pub fn slo_violation(&self) {
        self.slo_violations.inc();
    }

    pub fn slo_override(&self, active: bool) {
        if active {
            self.slo_overrides.inc();
        }
        self.slo_active.set(i64::from(active));
    }

    /// Records one interval: what was observed, what was decided (after limits) for `layers`.
    pub fn record(
        &self,
        sample: &LiveSample,
        policy: &str,
        fallback_active: bool,
        safe: &CoalescingSettings,
        layers: &[(LayerId, String)],
        limited: bool,
    ) {
        self.decisions.get_or_create(&PolicyLabels { policy: policy.to_string() }).inc();
        self.fallback_active.set(i64::from(fallback_active));
        self.errors.inc_by(sample.info.warnings.len() as u64);
        {
            let mut t = self.times();
            let now = Instant::now();
            t.last_decision = Some(now);
            if sample.complete {
                t.last_complete = Some(now);
            }
        }
        if !sample.complete {
            self.incomplete.inc();
        }
        if limited {
            self.limited.inc();
        }
        // Interfaces come and go: rebuild the per-interface families from this sample.
        for f in [&self.knob, &self.decided_knob] {
            f.clear();
        }
        self.adaptive.clear();
        self.observe_only.clear();
        for f in [&self.rx_pps, &self.tx_pps, &self.irq] {
            f.clear();
        }
        for r in &sample.interfaces {
            let labels = IfLabels { layer: r.layer.to_string(), interface: r.ifname.clone() };
            if let Some(p) = r.params {
                for (knob, v) in [
                    ("rx_usecs", p.rx_usecs),
                    ("rx_frames", p.rx_frames),
                    ("tx_usecs", p.tx_usecs),
                    ("tx_frames", p.tx_frames),
                ] {
                    if let Some(v) = v {
                        self.knob.get_or_create(&knob_labels(r.layer, &r.ifname, knob)).set(i64::from(v));
                    }
                }
                for (d, v) in [("rx", p.adaptive_rx), ("tx", p.adaptive_tx)] {
                    if let Some(v) = v {
                        let l = DirLabels {
                            layer: r.layer.to_string(),
                            interface: r.ifname.clone(),
                            direction: d.to_string(),
                        };
                        self.adaptive.get_or_create(&l).set(i64::from(v));
                    }
                }
            }
            self.observe_only.get_or_create(&labels).set(i64::from(r.control.is_observe_only()));
            // Reports are in the interface's own direction; a backend's VM direction is swapped.
            let (rx, tx) = match r.layer {
                LayerId::Backend(_) => (r.rates.tx_pps, r.rates.rx_pps),
                _ => (r.rates.rx_pps, r.rates.tx_pps),
            };
            self.rx_pps.get_or_create(&labels).set(rx);
            self.tx_pps.get_or_create(&labels).set(tx);
            if let Some(irq) = r.rates.irq_per_s() {
                self.irq.get_or_create(&labels).set(irq);
            }
        }
        for (id, name) in layers {
            let l = safe.layer(*id);
            for dir in Direction::BOTH {
                if let Moderation::Fixed(k) = l.get(dir) {
                    for (what, v) in [("usecs", k.usecs), ("frames", k.frames)] {
                        let knob = format!("{}_{what}", dir.name());
                        self.decided_knob.get_or_create(&knob_labels(*id, name, &knob)).set(i64::from(v));
                    }
                }
            }
        }
        for rtt in &sample.probe_rtts_us {
            self.probe_rtt.observe(*rtt);
        }
        let probe = match sample.obs.guests.first() {
            Some(g) if g.probe.is_some() => g.probe,
            _ => sample.obs.host.probe,
        };
        self.probe_p50.set(probe.map_or(0.0, |p| p.p50_us));
        self.probe_p99.set(probe.map_or(0.0, |p| p.p99_us));
    }

    pub fn fallback_switch(&self) {
        self.fallbacks.inc();
    }

    /// The OpenMetrics text exposition (ends with `# EOF`).
    pub fn render(&self) -> String {
        let age = {
            let t = self.times();
            t.last_complete.unwrap_or(t.started).elapsed()
        };
        self.observation_age.set(age.as_secs_f64());
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode_registry(&mut out, &self.registry);
        if self.slo_target.get() > 0.0 {
            let mut extra = Registry::default();
            extra.register(
                "moderato_slo_target_p99_microseconds",
                "The SLO guard's p99 target.",
                self.slo_target.clone(),
            );
            let _ = prometheus_client::encoding::text::encode_registry(&mut out, &extra);
        }
        let _ = prometheus_client::encoding::text::encode_eof(&mut out);
        out
    }

    /// `/healthz`: `Ok` while decisions come on time (within three intervals plus a second of the
    /// last, or of the start); otherwise why not.
    pub fn health(&self) -> std::result::Result<String, String> {
        let t = self.times();
        let allowed = t.interval * 3 + Duration::from_secs(1);
        let (since, what) = match t.last_decision {
            Some(d) => (d.elapsed(), "the last decision"),
            None => (t.started.elapsed(), "the start, with no decision yet"),
        };
        if since <= allowed {
            Ok(format!("ok: {:.1} s since {what}\n", since.as_secs_f64()))
        } else {
            Err(format!(
                "stalled: {:.1} s since {what} (allowed {:.1} s)\n",
                since.as_secs_f64(),
                allowed.as_secs_f64()
            ))
        }
    }
}

/// How much the metrics server may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// Connections served at once.
    pub max_connections: usize,
    /// A connection's whole life: request head, answer, close.
    pub timeout: Duration,
}

/// The soft open-file limit of this process (`Max open files` in `/proc/self/limits`).
pub fn open_file_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line.trim_start_matches("Max open files").split_whitespace().next()?;
    if soft == "unlimited" { Some(u64::MAX) } else { soft.parse().ok() }
}

impl ServerLimits {
    /// At most 64 connections, fewer where the open-file limit leaves less than that above
    /// [`RESERVED_FDS`]; 5 s per connection.
    pub fn for_this_process() -> ServerLimits {
        let max = match open_file_limit() {
            Some(n) => n.saturating_sub(RESERVED_FDS).clamp(1, 64),
            None => 16,
        };
        ServerLimits { max_connections: max as usize, timeout: Duration::from_secs(5) }
    }
}

/// Binds the metrics listener (before the loop starts, so a bad address fails at once).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("--metrics-addr {addr}: cannot listen there"))
}

fn answer(req: &Request<hyper::body::Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, ctype: &'static str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(ctype));
        r
    };
    let plain = "text/plain; charset=utf-8";
    if *req.method() != Method::GET && *req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, plain, "only GET\n".into());
    }
    match req.uri().path() {
        "/metrics" => text(StatusCode::OK, CONTENT_TYPE, metrics.render()),
        "/healthz" => match metrics.health() {
            Ok(m) => text(StatusCode::OK, plain, m),
            Err(m) => text(StatusCode::SERVICE_UNAVAILABLE, plain, m),
        },
        "/" => {
            text(StatusCode::OK, plain, "moderato deploy: metrics at /metrics, liveness at /healthz\n".into())
        }
        _ => text(StatusCode::NOT_FOUND, plain, "not found: try /metrics or /healthz\n".into()),
    }
}

/// Answers on `listener` until the runtime stops, within `limits` (see the [module docs](self)).
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, limits: ServerLimits) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    metrics.connections_max.set(limits.max_connections as i64);
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    loop {
        // A permit before accept: a client beyond the bound waits in the kernel's backlog and
        // costs this process no descriptor.
        let Ok(permit) = permits.clone().acquire_owned().await else { return };
        let sock = match listener.accept().await {
            Ok((sock, _)) => sock,
            Err(e) => {
                tracing::warn!(target: "moderato::deploy", "metrics server: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let m = metrics.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| {
                let m = m.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(&req, &m)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.timeout)
                .keep_alive(false)
                .serve_connection(TokioIo::new(sock), service);
            match tokio::time::timeout(limits.timeout, conn).await {
                Ok(Err(e)) => tracing::debug!(target: "moderato::deploy", "metrics connection: {e}"),
                Err(_) => tracing::debug!(target: "moderato::deploy", "metrics connection timed out"),
                Ok(Ok(())) => {}
            }
        });
    }
}
