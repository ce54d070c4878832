//! NAPI instances through netdev netlink: `napi-get` and `napi-set`.
//!
//! Linux 6.9 lists a device's NAPI instances (`napi-get`: id, ifindex, irq, pid); 6.13 adds
//! their deferral (`defer-hard-irqs`, `gro-flush-timeout`) and `irq-suspend-timeout` to the
//! reply, and `napi-set` to change them per instance. The requests go through `nlink`'s generic
//! netlink connection to the `netdev` family (family lookup, sequence numbers, acks and kernel
//! errors are nlink's); nlink 0.33's own netdev messages carry neither the deferral attributes
//! nor `napi-set`, so the two messages are declared here with its `GenlMessage` derive, with the
//! command and attribute numbers of the kernel's `include/uapi/linux/netdev.h`.
//!
//! [`Netdev`] owns one worker thread with a current-thread runtime (as
//! [`NetlinkCoalescer`](super::NetlinkCoalescer) does), so it is callable from plain threads and
//! from inside another runtime.

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use nlink::macros::GenlMessage;
use nlink::netlink::Connection;
use nlink::netlink::genl::netdev::Netdev as NetdevFamily;

use super::napi::NapiParams;

/// `NETDEV_CMD_NAPI_GET`, `NETDEV_CMD_NAPI_SET`.
const CMD_NAPI_GET: u8 = 11;
const CMD_NAPI_SET: u8 = 14;
/// `NETDEV_A_NAPI_*`.
const A_IFINDEX: u16 = 1;
const A_ID: u16 = 2;
const A_IRQ: u16 = 3;
const A_DEFER_HARD_IRQS: u16 = 5;
const A_GRO_FLUSH_TIMEOUT: u16 = 6;
const A_IRQ_SUSPEND_TIMEOUT: u16 = 7;

/// `napi-get`: one instance (`id`), or with only `ifindex` a dump of the device's instances.
#[derive(GenlMessage, Debug, Default, Clone)]
#[genl_message(cmd = CMD_NAPI_GET)]
struct NapiGetRequest {
    #[genl_attr(A_IFINDEX)]
    ifindex: Option<u32>,
    #[genl_attr(A_ID)]
    id: Option<u32>,
}

/// One NAPI instance as `napi-get` reports it. `gro-flush-timeout` and `irq-suspend-timeout` are
/// `uint`s: 4 bytes when the value fits, 8 when not; nlink's u64 fields read both.
#[derive(GenlMessage, Debug, Default, Clone)]
#[genl_message(cmd = CMD_NAPI_GET)]
struct NapiReply {
    #[genl_attr(A_IFINDEX)]
    ifindex: Option<u32>,
    #[genl_attr(A_ID)]
    id: Option<u32>,
    #[genl_attr(A_IRQ)]
    irq: Option<u32>,
    #[genl_attr(A_DEFER_HARD_IRQS)]
    defer_hard_irqs: Option<u32>,
    #[genl_attr(A_GRO_FLUSH_TIMEOUT)]
    gro_flush_timeout: Option<u64>,
    #[genl_attr(A_IRQ_SUSPEND_TIMEOUT)]
    irq_suspend_timeout: Option<u64>,
}

/// `napi-set` on one instance: the attributes present are set, the others left as they are.
#[derive(GenlMessage, Debug, Default, Clone)]
#[genl_message(cmd = CMD_NAPI_SET)]
struct NapiSetRequest {
    #[genl_attr(A_ID)]
    id: Option<u32>,
    #[genl_attr(A_DEFER_HARD_IRQS)]
    defer_hard_irqs: Option<u32>,
    #[genl_attr(A_GRO_FLUSH_TIMEOUT)]
    gro_flush_timeout: Option<u64>,
    #[genl_attr(A_IRQ_SUSPEND_TIMEOUT)]
    irq_suspend_timeout: Option<u64>,
}

/// A NAPI instance of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NapiInstance {
    /// Its id (kernel-wide; above the number of CPUs).
    pub id: u32,
    /// The interrupt it is bound to, where the driver says.
    pub irq: Option<u32>,
    /// Its deferral; `None` on a kernel that lists instances without it (6.9–6.12).
    pub params: Option<NapiParams>,
    /// Its IRQ-suspension timeout, nanoseconds (6.13+).
    pub irq_suspend_timeout_ns: Option<u64>,
}

/// A failed netdev netlink request, as a sentence.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetdevError {
    /// The kernel has no netdev family (before 6.3) or it could not be opened.
    #[error("netdev netlink is not available ({0}); NAPI instances need Linux 6.9+, their deferral 6.13+")]
    Unavailable(String),
    /// EPERM: `napi-set` needs CAP_NET_ADMIN.
    #[error(
        "napi-set on NAPI instance {id} needs CAP_NET_ADMIN (permission denied): run as root or grant the capability"
    )]
    PermissionDenied { id: u32 },
    /// ENOENT: the instance is gone (its device was removed or reconfigured).
    #[error("NAPI instance {id} does not exist (any more)")]
    NoInstance { id: u32 },
    /// Anything else the kernel answered.
    #[error("{0}")]
    Other(String),
}

const ENOENT: i32 = 2;
const EPERM: i32 = 1;
const EACCES: i32 = 13;

fn map_error(what: &str, id: Option<u32>, e: &nlink::Error) -> NetdevError {
    match (e.errno(), id) {
        (Some(EPERM | EACCES), Some(id)) => NetdevError::PermissionDenied { id },
        (Some(ENOENT), Some(id)) => NetdevError::NoInstance { id },
        _ => NetdevError::Other(match e.ext_ack() {
            Some(ack) => format!("{what}: {e} ({ack})"),
            None => format!("{what}: {e}"),
        }),
    }
}

type Job = Box<dyn FnOnce(&Connection<NetdevFamily>, &tokio::runtime::Runtime) + Send>;

/// A connection to the kernel's netdev netlink family, on a worker thread of its own, in this
/// process's network namespace.
#[derive(Debug)]
pub struct Netdev {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

/// How long one request may take before the caller gives up on it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

impl Netdev {
    /// Opens the family. Fails where the kernel has none (before 6.3).
    pub fn open() -> Result<Self, NetdevError> {
        Self::open_with(None)
    }

    /// Opens the family in the named network namespace (`ip netns` name, or a path such as
    /// `/proc/<pid>/ns/net`).
    pub fn open_in(netns: &str) -> Result<Self, NetdevError> {
        Self::open_with(Some(netns.to_string()))
    }

    fn open_with(netns: Option<String>) -> Result<Self, NetdevError> {
        let (jobs, inbox) = mpsc::channel::<Job>();
        let (ready, started) = mpsc::channel::<Result<(), String>>();
        let thread = std::thread::Builder::new()
            .name("moderato-netdev".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready.send(Err(format!("tokio runtime: {e}")));
                        return;
                    }
                };
                let made = rt.block_on(async move {
                    match netns {
                        Some(ns) => Connection::<NetdevFamily>::new_in_async(ns).await,
                        None => Connection::<NetdevFamily>::new_async().await,
                    }
                });
                let conn = match made {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = ready.send(Ok(()));
                for job in inbox {
                    job(&conn, &rt);
                }
            })
            .map_err(|e| NetdevError::Unavailable(format!("worker thread: {e}")))?;
        match started.recv_timeout(REQUEST_TIMEOUT) {
            Ok(Ok(())) => Ok(Netdev { jobs: Some(jobs), thread: Some(thread) }),
            Ok(Err(m)) => Err(NetdevError::Unavailable(m)),
            Err(_) => Err(NetdevError::Unavailable("the connection did not open".into())),
        }
    }

    fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection<NetdevFamily>, &tokio::runtime::Runtime) -> Result<T, NetdevError>
        + Send
        + 'static,
    ) -> Result<T, NetdevError> {
        let gone = || NetdevError::Other("the netdev worker stopped".into());
        let (answer, answered) = mpsc::channel();
        let job: Job = Box::new(move |conn, rt| {
            let _ = answer.send(f(conn, rt));
        });
        self.jobs.as_ref().ok_or_else(gone)?.send(job).map_err(|_| gone())?;
        answered.recv_timeout(REQUEST_TIMEOUT).map_err(|_| {
            NetdevError::Other(format!("no answer from netdev netlink in {REQUEST_TIMEOUT:?}"))
        })?
    }

    /// The NAPI instances of the device with index `ifindex`, by id. Empty: it has none (a veth
    /// without GRO or XDP).
    pub fn instances(&self, ifindex: u32) -> Result<Vec<NapiInstance>, NetdevError> {
        self.call(move |conn, rt| {
            rt.block_on(async move {
                use tokio_stream::StreamExt as _;
                let mut dump = conn
                    .dump_typed_stream::<_, NapiReply>(NapiGetRequest { ifindex: Some(ifindex), id: None })
                    .await
                    .map_err(|e| map_error("napi-get", None, &e))?;
                let mut out = Vec::new();
                while let Some(r) = dump.next().await {
                    let r = r.map_err(|e| map_error("napi-get", None, &e))?;
                    if r.ifindex.is_some_and(|i| i != ifindex) {
                        continue;
                    }
                    let Some(id) = r.id else { continue };
                    out.push(NapiInstance {
                        id,
                        irq: r.irq,
                        params: match (r.defer_hard_irqs, r.gro_flush_timeout) {
                            (Some(d), Some(t)) => Some(NapiParams::new(d, t)),
                            _ => None,
                        },
                        irq_suspend_timeout_ns: r.irq_suspend_timeout,
                    });
                }
                out.sort_unstable_by_key(|i| i.id);
                Ok(out)
            })
        })
    }

    /// Sets, on instance `id`, its deferral (both values in one `napi-set`) where `params` is given
    /// and its IRQ-suspension timeout where `irq_suspend_timeout_ns` is; the caller reads back
    /// what was applied.
    pub fn set(
        &self,
        id: u32,
        params: Option<&NapiParams>,
        irq_suspend_timeout_ns: Option<u64>,
    ) -> Result<(), NetdevError> {
        let req = NapiSetRequest {
            id: Some(id),
            defer_hard_irqs: params.map(|p| p.napi_defer_hard_irqs),
            gro_flush_timeout: params.map(|p| p.gro_flush_timeout_ns),
            irq_suspend_timeout: irq_suspend_timeout_ns,
        };
        self.call(move |conn, rt| {
            rt.block_on(conn.send_typed::<_, NapiReply>(req))
                .map(|_| ())
                .map_err(|e| map_error("napi-set", Some(id), &e))
        })
    }
}

impl Drop for Netdev {
    fn drop(&mut self) {
        // Closing the channel ends the worker.
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
