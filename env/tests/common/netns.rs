//! A network namespace with a veth pair into it and a tap beside it, for the root-only tests that
//! run against the real kernel. Everything is made on 198.18.0.0/15 (the benchmarking range) and
//! removed by a `Drop` guard, also when a test fails; nothing else on the machine is touched.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Runs `ip` (iproute2) with `args`; its stderr is the error.
pub fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// A namespace `<prefix><tag>` holding veth end `b` (at `b_addr`, its loopback up), its peer `a`
/// here (at `a_addr`), and tap `tap` here; removed on drop.
#[derive(Debug)]
pub struct Lab {
    pub ns: String,
    pub a: String,
    pub b: String,
    pub tap: String,
    pub a_addr: Ipv4Addr,
    pub b_addr: Ipv4Addr,
    /// A process inside the namespace (the echo responder), killed on drop before the teardown.
    pub echo: Option<Child>,
}

impl Lab {
    /// `prefix` names the interfaces (`<prefix><tag>a`, `…b`, `…t`, at most 15 bytes) and
    /// `block_offset` moves this binary's /30s off another binary's.
    pub fn new(prefix: &str, block_offset: u32) -> Lab {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}{}", std::process::id() % 100_000, n);
        // 198.18.0.0/15 holds 32768 /30s: one per lab.
        let block = (std::process::id().wrapping_mul(8).wrapping_add(n).wrapping_add(block_offset)) % 32768;
        let base = u32::from(Ipv4Addr::new(198, 18, 0, 0)) + block * 4;
        let lab = Lab {
            ns: format!("{prefix}{tag}"),
            a: format!("{prefix}{tag}a"),
            b: format!("{prefix}{tag}b"),
            tap: format!("{prefix}{tag}t"),
            a_addr: Ipv4Addr::from(base + 1),
            b_addr: Ipv4Addr::from(base + 2),
            echo: None,
        };
        let (a_cidr, b_cidr) = (format!("{}/30", lab.a_addr), format!("{}/30", lab.b_addr));
        for args in [
            vec!["netns", "add", &lab.ns],
            vec!["link", "add", &lab.a, "type", "veth", "peer", "name", &lab.b],
            vec!["link", "set", &lab.b, "netns", &lab.ns],
            vec!["addr", "add", &a_cidr, "dev", &lab.a],
            vec!["link", "set", &lab.a, "up"],
            vec!["-n", &lab.ns, "addr", "add", &b_cidr, "dev", &lab.b],
            vec!["-n", &lab.ns, "link", "set", &lab.b, "up"],
            vec!["-n", &lab.ns, "link", "set", "lo", "up"],
            vec!["tuntap", "add", "dev", &lab.tap, "mode", "tap"],
        ] {
            // Drop cleans up whatever was made before a failure.
            ip(&args).unwrap();
        }
        lab
    }

    /// Starts a UDP echo responder on the peer, inside the namespace: this test binary, re-run
    /// under `ip netns exec` as its `echo_responder` test (which the binary must define; see
    /// `env/tests/live_netns.rs`).
    pub fn start_echo(&mut self, port: u16) -> SocketAddr {
        let addr = SocketAddr::from((self.b_addr, port));
        let exe = std::env::current_exe().unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(exe)
            .args(["--exact", "echo_responder", "--ignored", "--nocapture", "--test-threads=1"])
            .env("MODERATO_ECHO_AT", addr.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.echo = Some(child);
        // Wait until it answers.
        let s = UdpSocket::bind((self.a_addr, 0)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 16];
        while Instant::now() < deadline {
            let _ = s.send_to(b"ping", addr);
            if s.recv_from(&mut buf).is_ok() {
                return addr;
            }
        }
        panic!("the echo responder at {addr} did not start");
    }

    /// Sends datagrams of `size` bytes from this side to the peer's `port`, `pps` a second for
    /// `for_`; the thread answers how many it sent.
    pub fn blast(&self, port: u16, size: usize, pps: u32, for_: Duration) -> std::thread::JoinHandle<u64> {
        let (from, to) = (self.a_addr, SocketAddr::from((self.b_addr, port)));
        std::thread::spawn(move || {
            let s = UdpSocket::bind((from, 0)).unwrap();
            let payload = vec![0x5au8; size];
            let start = Instant::now();
            let mut sent = 0u64;
            while start.elapsed() < for_ {
                if s.send_to(&payload, to).is_ok() {
                    sent += 1;
                }
                std::thread::sleep(Duration::from_secs_f64(1.0 / f64::from(pps)));
            }
            sent
        })
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut c) = self.echo.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = ip(&["link", "del", &self.tap]);
        let _ = ip(&["link", "del", &self.a]);
        let _ = ip(&["netns", "del", &self.ns]);
    }
}

/// The body of every test binary's `echo_responder` helper test: serves UDP echo at
/// `MODERATO_ECHO_AT` for at most a minute (the parent kills it sooner). Without the variable it
/// returns at once, so the helper passes as a no-op when `--ignored` runs it directly.
pub fn echo_responder_main() {
    let Ok(addr) = std::env::var("MODERATO_ECHO_AT") else { return };
    let stop = AtomicBool::new(false);
    let stop_at = Instant::now() + Duration::from_secs(60);
    std::thread::scope(|s| {
        s.spawn(|| {
            while Instant::now() < stop_at {
                std::thread::sleep(Duration::from_millis(200));
            }
            stop.store(true, Ordering::Relaxed);
        });
        moderato_env::live::serve_udp_echo(addr.parse().unwrap(), &stop).unwrap();
    });
}
