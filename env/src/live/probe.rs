//! A UDP echo latency probe: a background thread sends a small datagram with a sequence number and
//! a timestamp every `period` to a configured echo responder and times the replies.
//!
//! Datagram (24 bytes, big-endian): `b"MDTO"`, a 32-bit session id (so replies to an earlier
//! process are ignored), the 64-bit sequence number, and the send time in nanoseconds since the
//! probe started. The responder sends it back unchanged (any UDP echo service does:
//! [`serve_udp_echo`], inetd's echo, `socat UDP-LISTEN:7,fork PIPE`). A reply later than `timeout`
//! counts as lost.

use std::collections::VecDeque;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::LiveError;
use crate::obs::ProbeObs;

const MAGIC: &[u8; 4] = b"MDTO";
const LEN: usize = 24;

/// Where and how often to probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeConfig {
    /// The echo responder.
    pub target: SocketAddr,
    /// Local address to send from; `None`: any address of the target's family.
    pub bind: Option<SocketAddr>,
    /// Time between probes.
    pub period: Duration,
    /// A reply later than this is lost.
    pub timeout: Duration,
}

impl ProbeConfig {
    pub fn new(target: SocketAddr) -> Self {
        ProbeConfig {
            target,
            bind: None,
            period: Duration::from_millis(10),
            timeout: Duration::from_millis(200),
        }
    }
}

/// What the probe measured since the last [`UdpProbe::take`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProbeInterval {
    /// Round-trip times of the replies, microseconds.
    pub rtts_us: Vec<f64>,
    pub sent: u64,
    pub lost: u64,
    pub errors: u64,
    pub last_error: Option<String>,
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl ProbeInterval {
    /// Percentiles of this interval's replies; `None` when none came back.
    pub fn obs(&self) -> Option<ProbeObs> {
        if self.rtts_us.is_empty() {
            return None;
        }
        let mut v = self.rtts_us.clone();
        v.sort_by(f64::total_cmp);
        Some(ProbeObs { p50_us: percentile(&v, 0.50), p99_us: percentile(&v, 0.99), samples: v.len() as u64 })
    }
}

/// A running probe; dropping it stops the thread.
#[derive(Debug)]
pub struct UdpProbe {
    config: ProbeConfig,
    state: Arc<Mutex<ProbeInterval>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn encode(session: u32, seq: u64, ts_ns: u64) -> [u8; LEN] {
    let mut b = [0u8; LEN];
    b[..4].copy_from_slice(MAGIC);
    b[4..8].copy_from_slice(&session.to_be_bytes());
    b[8..16].copy_from_slice(&seq.to_be_bytes());
    b[16..24].copy_from_slice(&ts_ns.to_be_bytes());
    b
}

fn decode(b: &[u8]) -> Option<(u32, u64, u64)> {
    if b.len() != LEN || &b[..4] != MAGIC {
        return None;
    }
    let session = u32::from_be_bytes(b[4..8].try_into().ok()?);
    let seq = u64::from_be_bytes(b[8..16].try_into().ok()?);
    let ts = u64::from_be_bytes(b[16..24].try_into().ok()?);
    Some((session, seq, ts))
}

impl UdpProbe {
    /// Opens the socket and starts probing. A network that is not up yet (no route to the
    /// target, the bind address not configured yet) is not an error: the probe thread retries
    /// once a period, and each interval's [`ProbeInterval::errors`] says why there are no replies
    /// (a daemon started before the network must start, and fall back until the probe answers).
    pub fn start(config: ProbeConfig) -> Result<Self, LiveError> {
        let err = |source| LiveError::Probe { target: config.target, source };
        if config.period.is_zero() || config.timeout.is_zero() {
            return Err(err(std::io::Error::new(
                ErrorKind::InvalidInput,
                "probe period and timeout must be > 0",
            )));
        }
        let state = Arc::new(Mutex::new(ProbeInterval::default()));
        let sock = match open(&config) {
            Ok(s) => Some(s),
            Err(e) if not_up_yet(&e) => {
                let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
                s.errors += 1;
                s.last_error = Some(e.to_string());
                None
            }
            Err(e) => return Err(err(e)),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("moderato-probe".into())
            .spawn(move || run(sock, config, &st, &sp))
            .map_err(err)?;
        Ok(UdpProbe { config, state, stop, thread: Some(thread) })
    }

    pub fn config(&self) -> &ProbeConfig {
        &self.config
    }

    /// Everything measured since the last call.
    pub fn take(&self) -> ProbeInterval {
        std::mem::take(&mut *self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Drop for UdpProbe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The probe's socket: bound (to `bind`, else any address of the target's family) and connected.
fn open(config: &ProbeConfig) -> std::io::Result<UdpSocket> {
    let bind = config.bind.unwrap_or(match config.target {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    });
    let sock = UdpSocket::bind(bind)?;
    sock.connect(config.target)?;
    Ok(sock)
}

/// Errors of a network that is not up yet, which pass without a restart.
fn not_up_yet(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::NetworkUnreachable
            | ErrorKind::HostUnreachable
            | ErrorKind::AddrNotAvailable
            | ErrorKind::NetworkDown
    )
}

fn run(sock: Option<UdpSocket>, cfg: ProbeConfig, state: &Mutex<ProbeInterval>, stop: &AtomicBool) {
    let mut sock = sock;
    while sock.is_none() && !stop.load(Ordering::Relaxed) {
        std::thread::sleep(cfg.period.max(Duration::from_millis(100)));
        match open(&cfg) {
            Ok(s) => sock = Some(s),
            Err(e) => {
                let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
                s.errors += 1;
                s.last_error = Some(e.to_string());
            }
        }
    }
    let Some(sock) = sock else { return };
    let start = Instant::now();
    // Distinguishes this probe's replies from those to an earlier one on the same port.
    let session = std::process::id() ^ (start.elapsed().as_nanos() as u32).rotate_left(16) ^ 0x6d64_746f;
    let mut seq = 0u64;
    let mut outstanding: VecDeque<(u64, Instant)> = VecDeque::new();
    let mut next = Instant::now();
    let mut buf = [0u8; 64];
    let record_err = |e: std::io::Error| {
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        s.errors += 1;
        s.last_error = Some(e.to_string());
    };
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= next {
            let ts = now.duration_since(start).as_nanos() as u64;
            match sock.send(&encode(session, seq, ts)) {
                Ok(_) => {
                    outstanding.push_back((seq, now));
                    state.lock().unwrap_or_else(|p| p.into_inner()).sent += 1;
                }
                Err(e) => record_err(e),
            }
            seq += 1;
            next += cfg.period;
            if next < now {
                // After a stall, resume the period instead of sending a burst.
                next = now + cfg.period;
            }
        }
        while let Some(&(_, sent)) = outstanding.front() {
            if now.duration_since(sent) > cfg.timeout {
                outstanding.pop_front();
                state.lock().unwrap_or_else(|p| p.into_inner()).lost += 1;
            } else {
                break;
            }
        }
        let wait = next
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_micros(200), Duration::from_millis(50));
        if let Err(e) = sock.set_read_timeout(Some(wait)) {
            record_err(e);
            std::thread::sleep(wait);
            continue;
        }
        match sock.recv(&mut buf) {
            Ok(n) => {
                let now_ns = start.elapsed().as_nanos() as u64;
                if let Some((s, q, ts)) = decode(&buf[..n])
                    && s == session
                    && let Some(pos) = outstanding.iter().position(|(o, _)| *o == q)
                {
                    outstanding.remove(pos);
                    let rtt_us = now_ns.saturating_sub(ts) as f64 / 1000.0;
                    state.lock().unwrap_or_else(|p| p.into_inner()).rtts_us.push(rtt_us);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            // ICMP port unreachable on a connected socket: no responder there.
            Err(e) => {
                record_err(e);
                std::thread::sleep(wait);
            }
        }
    }
}

/// A UDP echo responder: sends every datagram back to its sender until `stop` is set. For the far
/// end of the latency probe (a VM, another host) and for tests.
pub fn serve_udp_echo(addr: SocketAddr, stop: &AtomicBool) -> std::io::Result<()> {
    let sock = UdpSocket::bind(addr)?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                let _ = sock.send_to(&buf[..n], from);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        let i = ProbeInterval { rtts_us: vec![30.0, 10.0, 20.0], ..Default::default() };
        let o = i.obs().unwrap();
        assert_eq!((o.p50_us, o.p99_us, o.samples), (20.0, 30.0, 3));
        assert!(ProbeInterval::default().obs().is_none());
    }

    #[test]
    fn datagram_round_trips() {
        assert_eq!(decode(&encode(7, 42, 1234)), Some((7, 42, 1234)));
        assert_eq!(decode(b"nonsense"), None);
    }
}
