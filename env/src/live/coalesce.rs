//! Reading and setting an interface's coalescing knobs: the [`Coalescer`] trait, and its ethtool
//! netlink implementation [`NetlinkCoalescer`] on the `nlink` crate.
//!
//! `nlink` is async on tokio, while [`Env::step`](crate::Env::step) is synchronous and the deploy
//! loop runs its own runtime; so [`NetlinkCoalescer`] owns one worker thread with a
//! current-thread runtime, and callers talk to it over a channel. It works the same from plain
//! threads and from inside another runtime (where a nested `block_on` would panic).
//!
//! The kernel's ethtool reply carries only the parameters the driver supports, so a `None` in a
//! read [`CoalesceParams`] means "not supported", and a set sends only parameters that a read
//! showed: asking a driver for an unsupported parameter fails the whole request.

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use nlink::netlink::{Connection, Ethtool};

use super::LiveError;

/// Coalescing parameters of one interface. Read: `None` where the driver does not support the
/// parameter. Set: `None` leaves it unchanged. Serialised with ethtool's names (the deploy's
/// state journal stores them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoalesceParams {
    pub rx_usecs: Option<u32>,
    pub rx_frames: Option<u32>,
    pub tx_usecs: Option<u32>,
    pub tx_frames: Option<u32>,
    pub adaptive_rx: Option<bool>,
    pub adaptive_tx: Option<bool>,
}

impl CoalesceParams {
    /// Whether no parameter is set.
    pub fn is_empty(&self) -> bool {
        *self == CoalesceParams::default()
    }

    /// The parameters of `self` that differ from `current` (for a set that touches only what
    /// changes, which keeps a driver's adaptive state and avoids needless reconfiguration).
    pub fn changes_from(&self, current: &CoalesceParams) -> CoalesceParams {
        fn pick<T: PartialEq + Copy>(want: Option<T>, have: Option<T>) -> Option<T> {
            match want {
                Some(w) if have != Some(w) => Some(w),
                _ => None,
            }
        }
        CoalesceParams {
            rx_usecs: pick(self.rx_usecs, current.rx_usecs),
            rx_frames: pick(self.rx_frames, current.rx_frames),
            tx_usecs: pick(self.tx_usecs, current.tx_usecs),
            tx_frames: pick(self.tx_frames, current.tx_frames),
            adaptive_rx: pick(self.adaptive_rx, current.adaptive_rx),
            adaptive_tx: pick(self.adaptive_tx, current.adaptive_tx),
        }
    }

    /// `self` with the set fields of `change` written over it.
    pub fn updated(&self, change: &CoalesceParams) -> CoalesceParams {
        CoalesceParams {
            rx_usecs: change.rx_usecs.or(self.rx_usecs),
            rx_frames: change.rx_frames.or(self.rx_frames),
            tx_usecs: change.tx_usecs.or(self.tx_usecs),
            tx_frames: change.tx_frames.or(self.tx_frames),
            adaptive_rx: change.adaptive_rx.or(self.adaptive_rx),
            adaptive_tx: change.adaptive_tx.or(self.adaptive_tx),
        }
    }
}

impl std::fmt::Display for CoalesceParams {
    /// `ethtool -C` syntax: `rx-usecs 50 rx-frames 32 adaptive-rx off`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        let onoff = |b: bool| if b { "on" } else { "off" };
        if let Some(v) = self.adaptive_rx {
            parts.push(format!("adaptive-rx {}", onoff(v)));
        }
        if let Some(v) = self.adaptive_tx {
            parts.push(format!("adaptive-tx {}", onoff(v)));
        }
        for (name, v) in [
            ("rx-usecs", self.rx_usecs),
            ("rx-frames", self.rx_frames),
            ("tx-usecs", self.tx_usecs),
            ("tx-frames", self.tx_frames),
        ] {
            if let Some(v) = v {
                parts.push(format!("{name} {v}"));
            }
        }
        if parts.is_empty() { f.write_str("(nothing)") } else { f.write_str(&parts.join(" ")) }
    }
}

/// A kernel answer to a coalescing request, as a sentence that names the interface.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoalesceError {
    /// EOPNOTSUPP: the driver has no coalescing (veth, tap, loopback).
    #[error("{ifname}: this driver does not support coalescing (EOPNOTSUPP{})", fmt_detail(detail))]
    Unsupported { ifname: String, detail: Option<String> },
    /// EPERM/EACCES: setting needs CAP_NET_ADMIN.
    #[error("{ifname}: changing coalescing needs CAP_NET_ADMIN (EPERM): run as root or grant the capability")]
    PermissionDenied { ifname: String },
    /// ENODEV: no such interface (now).
    #[error("{ifname}: no such device (ENODEV)")]
    NoDevice { ifname: String },
    /// EINVAL naming a parameter the driver does not have (`cannot modify an unsupported
    /// parameter`): the request asked for a knob that a read did not show.
    #[error("{ifname}: the driver has no such knob in `{requested}` (EINVAL{})", fmt_detail(detail))]
    UnsupportedParameter { ifname: String, requested: String, detail: Option<String> },
    /// EINVAL/ERANGE on a set: a value the driver does not accept.
    #[error(
        "{ifname}: the driver refused `{requested}` ({errno_name}{}): keep the knob inside what the driver accepts",
        fmt_detail(detail)
    )]
    OutOfRange { ifname: String, requested: String, errno_name: &'static str, detail: Option<String> },
    #[error("{ifname}: {message}")]
    Other { ifname: String, message: String },
}

fn fmt_detail(d: &Option<String>) -> String {
    d.as_ref().map(|d| format!(": {d}")).unwrap_or_default()
}

impl CoalesceError {
    pub fn ifname(&self) -> &str {
        match self {
            CoalesceError::Unsupported { ifname, .. }
            | CoalesceError::PermissionDenied { ifname }
            | CoalesceError::NoDevice { ifname }
            | CoalesceError::OutOfRange { ifname, .. }
            | CoalesceError::UnsupportedParameter { ifname, .. }
            | CoalesceError::Other { ifname, .. } => ifname,
        }
    }
}

/// Gets and sets an interface's coalescing: rx/tx usecs and frames, adaptive rx/tx.
pub trait Coalescer: Send + std::fmt::Debug {
    fn get(&mut self, ifname: &str) -> Result<CoalesceParams, CoalesceError>;
    /// Sets the `Some` fields of `params`.
    fn set(&mut self, ifname: &str, params: &CoalesceParams) -> Result<(), CoalesceError>;
}

impl<C: Coalescer + ?Sized> Coalescer for Box<C> {
    fn get(&mut self, ifname: &str) -> Result<CoalesceParams, CoalesceError> {
        (**self).get(ifname)
    }
    fn set(&mut self, ifname: &str, params: &CoalesceParams) -> Result<(), CoalesceError> {
        (**self).set(ifname, params)
    }
}

// Linux errno values (the same on every architecture this runs on; EOPNOTSUPP is 95 except on
// alpha, mips, parisc and sparc).
const EPERM: i32 = 1;
const ENODEV: i32 = 19;
const EINVAL: i32 = 22;
const ERANGE: i32 = 34;

/// Turns an nlink error into a sentence. `requested` is what a set asked for.
fn map_error(ifname: &str, e: &nlink::Error, requested: Option<&CoalesceParams>) -> CoalesceError {
    let ifname = ifname.to_string();
    let detail = e.ext_ack().map(str::to_string);
    if e.is_not_supported() {
        return CoalesceError::Unsupported { ifname, detail };
    }
    if e.is_permission_denied() || e.errno() == Some(EPERM) {
        return CoalesceError::PermissionDenied { ifname };
    }
    if e.is_no_device() || e.errno() == Some(ENODEV) {
        return CoalesceError::NoDevice { ifname };
    }
    if let Some(req) = requested
        && e.errno() == Some(EINVAL)
        && detail.as_deref().is_some_and(|d| d.contains("unsupported parameter"))
    {
        return CoalesceError::UnsupportedParameter { ifname, requested: req.to_string(), detail };
    }
    if let Some(req) = requested
        && let Some(errno @ (EINVAL | ERANGE)) = e.errno()
    {
        let errno_name = if errno == ERANGE { "ERANGE" } else { "EINVAL" };
        return CoalesceError::OutOfRange { ifname, requested: req.to_string(), errno_name, detail };
    }
    CoalesceError::Other { ifname, message: e.to_string() }
}

enum Request {
    Get(String, mpsc::Sender<Result<CoalesceParams, CoalesceError>>),
    Set(String, CoalesceParams, mpsc::Sender<Result<(), CoalesceError>>),
}

/// [`Coalescer`] over ethtool netlink (`ETHTOOL_MSG_COALESCE_GET/SET`), in this process's network
/// namespace.
#[derive(Debug)]
pub struct NetlinkCoalescer {
    tx: Option<mpsc::Sender<Request>>,
    thread: Option<JoinHandle<()>>,
}

/// How long one request may take before the caller gives up on it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

impl NetlinkCoalescer {
    /// Opens an ethtool netlink socket on a worker thread. Fails where the kernel has no ethtool
    /// netlink coalescing (before 5.7, or `CONFIG_ETHTOOL_NETLINK=n`).
    pub fn new() -> Result<Self, LiveError> {
        let (tx, rx) = mpsc::channel::<Request>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let thread = std::thread::Builder::new()
            .name("moderato-ethtool".into())
            .spawn(move || worker(rx, ready_tx))
            .map_err(|e| CoalesceError::Other {
                ifname: "-".into(),
                message: format!("ethtool worker: {e}"),
            })?;
        match ready_rx.recv_timeout(REQUEST_TIMEOUT) {
            Ok(Ok(())) => Ok(NetlinkCoalescer { tx: Some(tx), thread: Some(thread) }),
            Ok(Err(m)) => Err(CoalesceError::Other {
                ifname: "-".into(),
                message: format!(
                    "cannot open ethtool netlink ({m}); it needs Linux 5.7+ with CONFIG_ETHTOOL_NETLINK"
                ),
            }
            .into()),
            Err(_) => Err(CoalesceError::Other {
                ifname: "-".into(),
                message: "ethtool netlink did not start".into(),
            }
            .into()),
        }
    }

    fn call<T>(
        &self,
        ifname: &str,
        make: impl FnOnce(mpsc::Sender<Result<T, CoalesceError>>) -> Request,
    ) -> Result<T, CoalesceError> {
        let gone =
            || CoalesceError::Other { ifname: ifname.into(), message: "ethtool worker stopped".into() };
        let (rtx, rrx) = mpsc::channel();
        self.tx.as_ref().ok_or_else(gone)?.send(make(rtx)).map_err(|_| gone())?;
        rrx.recv_timeout(REQUEST_TIMEOUT).map_err(|_| CoalesceError::Other {
            ifname: ifname.into(),
            message: format!("no answer from ethtool netlink in {REQUEST_TIMEOUT:?}"),
        })?
    }
}

impl Drop for NetlinkCoalescer {
    fn drop(&mut self) {
        // Closing the channel ends the worker.
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Coalescer for NetlinkCoalescer {
    fn get(&mut self, ifname: &str) -> Result<CoalesceParams, CoalesceError> {
        self.call(ifname, |r| Request::Get(ifname.to_string(), r))
    }

    fn set(&mut self, ifname: &str, params: &CoalesceParams) -> Result<(), CoalesceError> {
        if params.is_empty() {
            return Ok(());
        }
        self.call(ifname, |r| Request::Set(ifname.to_string(), *params, r))
    }
}

fn worker(rx: mpsc::Receiver<Request>, ready: mpsc::Sender<Result<(), String>>) {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(format!("tokio runtime: {e}")));
            return;
        }
    };
    let conn = match rt.block_on(Connection::<Ethtool>::new_async()) {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    while let Ok(req) = rx.recv() {
        match req {
            Request::Get(ifname, reply) => {
                let r = rt.block_on(conn.get_coalesce_by_name(&ifname));
                let r = r
                    .map(|c| CoalesceParams {
                        rx_usecs: c.rx_usecs,
                        rx_frames: c.rx_max_frames,
                        tx_usecs: c.tx_usecs,
                        tx_frames: c.tx_max_frames,
                        adaptive_rx: c.use_adaptive_rx,
                        adaptive_tx: c.use_adaptive_tx,
                    })
                    .map_err(|e| map_error(&ifname, &e, None));
                let _ = reply.send(r);
            }
            Request::Set(ifname, p, reply) => {
                let r = rt.block_on(conn.set_coalesce_by_name(&ifname, |mut b| {
                    if let Some(v) = p.rx_usecs {
                        b = b.rx_usecs(v);
                    }
                    if let Some(v) = p.rx_frames {
                        b = b.rx_max_frames(v);
                    }
                    if let Some(v) = p.tx_usecs {
                        b = b.tx_usecs(v);
                    }
                    if let Some(v) = p.tx_frames {
                        b = b.tx_max_frames(v);
                    }
                    if let Some(v) = p.adaptive_rx {
                        b = b.use_adaptive_rx(v);
                    }
                    if let Some(v) = p.adaptive_tx {
                        b = b.use_adaptive_tx(v);
                    }
                    b
                }));
                let _ = reply.send(r.map_err(|e| map_error(&ifname, &e, Some(&p))));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_only_what_differs() {
        let cur = CoalesceParams {
            rx_usecs: Some(50),
            rx_frames: None,
            tx_usecs: Some(50),
            adaptive_rx: Some(true),
            ..Default::default()
        };
        let want = CoalesceParams {
            rx_usecs: Some(50),
            tx_usecs: Some(64),
            adaptive_rx: Some(false),
            ..Default::default()
        };
        let ch = want.changes_from(&cur);
        assert_eq!(ch, CoalesceParams { tx_usecs: Some(64), adaptive_rx: Some(false), ..Default::default() });
        assert_eq!(cur.updated(&ch).tx_usecs, Some(64));
        assert_eq!(ch.to_string(), "adaptive-rx off tx-usecs 64");
    }
}
