//! NAPI deferral of one interface: `napi_defer_hard_irqs` and `gro_flush_timeout`.
//!
//! After a NAPI poll that found work, a device with `napi_defer_hard_irqs = N > 0` and
//! `gro_flush_timeout = T > 0` keeps its interrupt masked and lets an hrtimer poll again after T
//! nanoseconds, for up to N consecutive polls that find nothing; then the interrupt is re-armed
//! (Documentation/networking/napi.rst, "Software IRQ coalescing"). Both default to 0 (off).
//!
//! ## Which interface to the kernel
//! - **Per device, sysfs** (Linux ≥ 5.10): `/sys/class/net/<if>/napi_defer_hard_irqs` and
//!   `gro_flush_timeout`. Since 6.13 a write there is copied into every NAPI instance of the
//!   device; a read shows the device's value. This is what [`SysfsNapi`] reads and writes.
//! - **Per NAPI instance, netdev netlink** (`napi-get`/`napi-set`, Linux ≥ 6.13; [`super::netdev`]).
//!   [`NetlinkNapi`] reads the deferral in force from the instances where the kernel lists them
//!   (what the traffic runs with: the read-back), writes the device's sysfs files (so that
//!   instances the driver creates later start from the value too) and then `napi-set`s any
//!   instance that still differs, and restores each instance's own original
//!   ([`NapiControl::set_instance`]). Where the kernel lists none (a veth without GRO, a kernel
//!   before 6.13, a sysfs tree other than `/sys`) it is [`SysfsNapi`].
//!
//! Where a device's instances differ (someone set one with `napi-set`), a read reports the
//! lowest id's value, and a write sets them all.
//!
//! The kernel takes `napi_defer_hard_irqs` up to `i32::MAX` (ERANGE above) and
//! `gro_flush_timeout` as an `unsigned long` of nanoseconds; its hrtimer takes the timeout as a
//! signed 64-bit `ktime_t`, so values above `i64::MAX` ns wrap and are refused here
//! ([`NapiParams::check`]).

use std::path::{Path, PathBuf};

use super::counters;
use super::netdev::{Netdev, NetdevError};

pub use crate::settings::{DEFER_HARD_IRQS_MAX, GRO_FLUSH_TIMEOUT_NS_MAX, NapiParams};

/// A failed NAPI read or write, as a sentence that names the interface and the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NapiError {
    /// The files are absent while the interface exists: a kernel before 5.10.
    #[error(
        "{ifname}: {} does not exist: NAPI deferral needs Linux 5.10 or later (per-device sysfs files)",
        path.display()
    )]
    Unsupported { ifname: String, path: PathBuf },
    /// EACCES/EPERM: writing needs CAP_NET_ADMIN (and a sysfs mounted by this network namespace).
    #[error(
        "{ifname}: writing {} needs CAP_NET_ADMIN (permission denied): run as root or grant the capability",
        path.display()
    )]
    PermissionDenied { ifname: String, path: PathBuf },
    /// The interface does not exist (now).
    #[error("{ifname}: no such device")]
    NoDevice { ifname: String },
    /// The kernel refused a value (ERANGE, EINVAL).
    #[error("{ifname}: the kernel refused `{value}` for {} ({detail})", path.display())]
    Refused { ifname: String, path: PathBuf, value: String, detail: String },
    /// Anything else (an unreadable or unparsable file).
    #[error("{ifname}: {message}")]
    Other { ifname: String, message: String },
}

/// Reads and sets an interface's NAPI deferral.
pub trait NapiControl: Send + std::fmt::Debug {
    fn get(&mut self, ifname: &str) -> Result<NapiParams, NapiError>;
    /// Sets both values; the caller reads back what the kernel applied.
    fn set(&mut self, ifname: &str, params: &NapiParams) -> Result<(), NapiError>;
    /// The device's own value (its sysfs files), where it can differ from what [`get`](Self::get)
    /// reads from the instances: what a restore puts back as the device value.
    fn get_device(&mut self, ifname: &str) -> Result<NapiParams, NapiError> {
        self.get(ifname)
    }
    /// The deferral of each NAPI instance of `ifname`, by id, where the kernel reports it per
    /// instance (netdev netlink, 6.13+); empty where it does not (only the device value is known).
    fn instances(&mut self, ifname: &str) -> Result<Vec<InstanceNapi>, NapiError> {
        let _ = ifname;
        Ok(Vec::new())
    }
    /// Sets the deferral of the NAPI instance `id` of `ifname` alone.
    fn set_instance(&mut self, ifname: &str, id: u32, params: &NapiParams) -> Result<(), NapiError> {
        let _ = (id, params);
        Err(NapiError::Other {
            ifname: ifname.into(),
            message: "NAPI instances cannot be set here (netdev netlink needs Linux 6.13+)".into(),
        })
    }
    /// Sets the IRQ-suspension timeout (ns; 0: off) of the NAPI instance `id` of `ifname`.
    fn set_irq_suspend(&mut self, ifname: &str, id: u32, timeout_ns: u64) -> Result<(), NapiError> {
        let _ = (id, timeout_ns);
        Err(NapiError::Other {
            ifname: ifname.into(),
            message: "IRQ suspension cannot be set here (netdev netlink's napi-set, Linux 6.13+)".into(),
        })
    }
}

impl<N: NapiControl + ?Sized> NapiControl for Box<N> {
    fn get(&mut self, ifname: &str) -> Result<NapiParams, NapiError> {
        (**self).get(ifname)
    }
    fn set(&mut self, ifname: &str, params: &NapiParams) -> Result<(), NapiError> {
        (**self).set(ifname, params)
    }
    fn get_device(&mut self, ifname: &str) -> Result<NapiParams, NapiError> {
        (**self).get_device(ifname)
    }
    fn instances(&mut self, ifname: &str) -> Result<Vec<InstanceNapi>, NapiError> {
        (**self).instances(ifname)
    }
    fn set_instance(&mut self, ifname: &str, id: u32, params: &NapiParams) -> Result<(), NapiError> {
        (**self).set_instance(ifname, id, params)
    }
    fn set_irq_suspend(&mut self, ifname: &str, id: u32, timeout_ns: u64) -> Result<(), NapiError> {
        (**self).set_irq_suspend(ifname, id, timeout_ns)
    }
}

/// One NAPI instance's deferral and IRQ-suspension timeout, as the deploy's journal keeps them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceNapi {
    /// The instance's id (netdev netlink's).
    pub id: u32,
    pub napi: NapiParams,
    /// `irq-suspend-timeout`, nanoseconds (0: off); `None` where the kernel does not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub irq_suspend_timeout_ns: Option<u64>,
}

/// [`NapiControl`] through the per-device sysfs files under `sysfs_root` (`/sys`).
#[derive(Debug, Clone)]
pub struct SysfsNapi {
    sysfs_root: PathBuf,
}

const DEFER_FILE: &str = "napi_defer_hard_irqs";
const TIMEOUT_FILE: &str = "gro_flush_timeout";

impl SysfsNapi {
    pub fn new(sysfs_root: impl Into<PathBuf>) -> Self {
        SysfsNapi { sysfs_root: sysfs_root.into() }
    }

    fn path(&self, ifname: &str, file: &str) -> PathBuf {
        counters::interface_dir(&self.sysfs_root, ifname).join(file)
    }

    fn io_error(&self, ifname: &str, path: &Path, e: &std::io::Error, value: Option<&str>) -> NapiError {
        let ifname = ifname.to_string();
        if !counters::interface_exists(&self.sysfs_root, &ifname) {
            return NapiError::NoDevice { ifname };
        }
        match (e.kind(), e.raw_os_error(), value) {
            (std::io::ErrorKind::NotFound, ..) => NapiError::Unsupported { ifname, path: path.into() },
            (std::io::ErrorKind::PermissionDenied, ..) | (_, Some(1), _) => {
                NapiError::PermissionDenied { ifname, path: path.into() }
            }
            (_, Some(errno @ (22 | 34)), Some(v)) => NapiError::Refused {
                ifname,
                path: path.into(),
                value: v.to_string(),
                detail: format!("{} ({e})", if errno == 34 { "ERANGE" } else { "EINVAL" }),
            },
            _ => NapiError::Other {
                ifname,
                message: match value {
                    Some(v) => format!("writing `{v}` to {}: {e}", path.display()),
                    None => format!("reading {}: {e}", path.display()),
                },
            },
        }
    }

    fn read(&self, ifname: &str, file: &str) -> Result<u64, NapiError> {
        let path = self.path(ifname, file);
        let text = std::fs::read_to_string(&path).map_err(|e| self.io_error(ifname, &path, &e, None))?;
        text.trim().parse().map_err(|e| NapiError::Other {
            ifname: ifname.into(),
            message: format!("{}: `{}` is not an unsigned integer ({e})", path.display(), text.trim()),
        })
    }

    fn write(&self, ifname: &str, file: &str, value: u64) -> Result<(), NapiError> {
        let path = self.path(ifname, file);
        let v = value.to_string();
        // No create: a file that is absent means the kernel lacks the knob.
        let r = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, v.as_bytes()));
        r.map_err(|e| self.io_error(ifname, &path, &e, Some(&v)))
    }
}

impl NapiControl for SysfsNapi {
    fn get(&mut self, ifname: &str) -> Result<NapiParams, NapiError> {
        let defer = self.read(ifname, DEFER_FILE)?;
        let timeout = self.read(ifname, TIMEOUT_FILE)?;
        let defer = u32::try_from(defer).map_err(|_| NapiError::Other {
            ifname: ifname.into(),
            message: format!("{}: {defer} does not fit in 32 bits", self.path(ifname, DEFER_FILE).display()),
        })?;
        Ok(NapiParams::new(defer, timeout))
    }

    /// The timeout first: with deferral on and the timer at 0 the kernel would not defer anyway,
    /// and the order keeps a half-applied change harmless.
    fn set(&mut self, ifname: &str, params: &NapiParams) -> Result<(), NapiError> {
        self.write(ifname, TIMEOUT_FILE, params.gro_flush_timeout_ns)?;
        self.write(ifname, DEFER_FILE, u64::from(params.napi_defer_hard_irqs))
    }
}

/// [`NapiControl`] through netdev netlink per NAPI instance where the kernel lists them, and the
/// per-device sysfs files (see the [module docs](self)).
#[derive(Debug)]
pub struct NetlinkNapi {
    sysfs: SysfsNapi,
    sysfs_root: PathBuf,
    /// `None`: no netdev family, or a sysfs tree other than `/sys` (whose interfaces the kernel
    /// does not know).
    netdev: Option<Netdev>,
}

impl NetlinkNapi {
    /// Reads the interfaces under `sysfs_root`; netdev netlink is opened only where that is
    /// `/sys` (and the kernel has the family).
    pub fn new(sysfs_root: impl Into<PathBuf>) -> Self {
        let sysfs_root = sysfs_root.into();
        let netdev = if sysfs_root == Path::new("/sys") { Netdev::open().ok() } else { None };
        NetlinkNapi { sysfs: SysfsNapi::new(sysfs_root.clone()), sysfs_root, netdev }
    }

    /// Whether netdev netlink is open.
    pub fn has_netlink(&self) -> bool {
        self.netdev.is_some()
    }

    /// The instances of `ifname` with their deferral, or empty where netlink does not report
    /// them (no family, none listed, a kernel before 6.13).
    fn listed(&self, ifname: &str) -> Result<Vec<InstanceNapi>, NapiError> {
        let Some(netdev) = &self.netdev else { return Ok(Vec::new()) };
        let ifindex = counters::read_ifindex(&self.sysfs_root, ifname)
            .ok_or_else(|| NapiError::NoDevice { ifname: ifname.into() })?;
        let ifindex = u32::try_from(ifindex)
            .map_err(|_| NapiError::Other { ifname: ifname.into(), message: format!("ifindex {ifindex}") })?;
        let all = netdev
            .instances(ifindex)
            .map_err(|e| NapiError::Other { ifname: ifname.into(), message: e.to_string() })?;
        // All or nothing: a kernel that lists instances without their deferral has only sysfs.
        Ok(all
            .iter()
            .map(|i| {
                i.params.map(|napi| InstanceNapi {
                    id: i.id,
                    napi,
                    irq_suspend_timeout_ns: i.irq_suspend_timeout_ns,
                })
            })
            .collect::<Option<Vec<_>>>()
            .unwrap_or_default())
    }

    fn netlink_error(ifname: &str, e: NetdevError) -> NapiError {
        match e {
            NetdevError::PermissionDenied { id } => NapiError::Other {
                ifname: ifname.into(),
                message: format!(
                    "napi-set on NAPI instance {id} needs CAP_NET_ADMIN (permission denied): run as root or grant the capability"
                ),
            },
            e => NapiError::Other { ifname: ifname.into(), message: e.to_string() },
        }
    }
}

impl NapiControl for NetlinkNapi {
    fn get(&mut self, ifname: &str) -> Result<NapiParams, NapiError> {
        match self.listed(ifname)?.first() {
            Some(i) => Ok(i.napi),
            None => self.sysfs.get(ifname),
        }
    }

    fn set(&mut self, ifname: &str, params: &NapiParams) -> Result<(), NapiError> {
        self.sysfs.set(ifname, params)?;
        // Since 6.13 the sysfs write reaches every instance; one that did not take it is set alone.
        for i in self.listed(ifname)? {
            if i.napi != *params {
                self.set_instance(ifname, i.id, params)?;
            }
        }
        Ok(())
    }

    fn get_device(&mut self, ifname: &str) -> Result<NapiParams, NapiError> {
        self.sysfs.get(ifname)
    }

    fn instances(&mut self, ifname: &str) -> Result<Vec<InstanceNapi>, NapiError> {
        self.listed(ifname)
    }

    fn set_instance(&mut self, ifname: &str, id: u32, params: &NapiParams) -> Result<(), NapiError> {
        params.check().map_err(|message| NapiError::Other { ifname: ifname.into(), message })?;
        match &self.netdev {
            Some(n) => n.set(id, Some(params), None).map_err(|e| Self::netlink_error(ifname, e)),
            None => Err(NapiError::Other {
                ifname: ifname.into(),
                message: "netdev netlink is not open: NAPI instances cannot be set".into(),
            }),
        }
    }

    fn set_irq_suspend(&mut self, ifname: &str, id: u32, timeout_ns: u64) -> Result<(), NapiError> {
        if timeout_ns > GRO_FLUSH_TIMEOUT_NS_MAX {
            return Err(NapiError::Other {
                ifname: ifname.into(),
                message: format!(
                    "irq-suspend-timeout {timeout_ns} ns is above {GRO_FLUSH_TIMEOUT_NS_MAX} ns (i64::MAX)"
                ),
            });
        }
        match &self.netdev {
            Some(n) => n.set(id, None, Some(timeout_ns)).map_err(|e| Self::netlink_error(ifname, e)),
            None => Err(NapiError::Other {
                ifname: ifname.into(),
                message: "netdev netlink is not open: IRQ suspension cannot be set (napi-set, Linux 6.13+)"
                    .into(),
            }),
        }
    }
}

/// An in-memory [`NapiControl`] for tests: interfaces and their values; `round_to` makes it
/// apply the timeout rounded down to a multiple (as a driver or kernel might), and `refuse`
/// fails every set with that error.
#[derive(Debug, Clone, Default)]
pub struct MemoryNapi {
    pub values: std::collections::BTreeMap<String, NapiParams>,
    pub round_to: Option<u64>,
    pub refuse: Option<NapiError>,
    /// Every set, in order.
    pub sets: Vec<(String, NapiParams)>,
    /// NAPI instances by interface: a device set reaches them all (as since 6.13), and
    /// `set_instance` sets one.
    pub instances: std::collections::BTreeMap<String, Vec<InstanceNapi>>,
}

impl MemoryNapi {
    pub fn with(mut self, ifname: &str, p: NapiParams) -> Self {
        self.values.insert(ifname.to_string(), p);
        self
    }

    fn instance_mut(&mut self, ifname: &str, id: u32) -> Result<&mut InstanceNapi, NapiError> {
        self.instances.get_mut(ifname).and_then(|v| v.iter_mut().find(|i| i.id == id)).ok_or_else(|| {
            NapiError::Other { ifname: ifname.into(), message: format!("no NAPI instance {id}") }
        })
    }

    /// Gives `ifname` NAPI instances with these ids and values.
    pub fn with_instances(mut self, ifname: &str, instances: &[(u32, NapiParams)]) -> Self {
        self.instances.insert(
            ifname.to_string(),
            instances
                .iter()
                .map(|&(id, napi)| InstanceNapi { id, napi, irq_suspend_timeout_ns: Some(0) })
                .collect(),
        );
        self
    }
}

impl NapiControl for MemoryNapi {
    fn get(&mut self, ifname: &str) -> Result<NapiParams, NapiError> {
        self.values.get(ifname).copied().ok_or_else(|| NapiError::NoDevice { ifname: ifname.into() })
    }
    fn set(&mut self, ifname: &str, params: &NapiParams) -> Result<(), NapiError> {
        if let Some(e) = &self.refuse {
            return Err(e.clone());
        }
        let slot =
            self.values.get_mut(ifname).ok_or_else(|| NapiError::NoDevice { ifname: ifname.into() })?;
        let t = params.gro_flush_timeout_ns;
        *slot = NapiParams::new(
            params.napi_defer_hard_irqs,
            self.round_to.filter(|r| *r > 0).map_or(t, |r| t - t % r),
        );
        let applied = *slot;
        for i in self.instances.get_mut(ifname).into_iter().flatten() {
            i.napi = applied;
        }
        self.sets.push((ifname.to_string(), *params));
        Ok(())
    }
    fn instances(&mut self, ifname: &str) -> Result<Vec<InstanceNapi>, NapiError> {
        Ok(self.instances.get(ifname).cloned().unwrap_or_default())
    }
    fn set_instance(&mut self, ifname: &str, id: u32, params: &NapiParams) -> Result<(), NapiError> {
        if let Some(e) = &self.refuse {
            return Err(e.clone());
        }
        let slot = self.instance_mut(ifname, id)?;
        slot.napi = *params;
        Ok(())
    }
    fn set_irq_suspend(&mut self, ifname: &str, id: u32, timeout_ns: u64) -> Result<(), NapiError> {
        if let Some(e) = &self.refuse {
            return Err(e.clone());
        }
        let slot = self.instance_mut(ifname, id)?;
        slot.irq_suspend_timeout_ns = Some(timeout_ns);
        Ok(())
    }
}

/// The NAPI instances (ids) of the interface with index `ifindex`, from netdev netlink's
/// `napi-get` dump, in this process's network namespace. Empty: the device has none (a veth
/// without GRO or XDP). An error: the kernel has no netdev family (before 6.3) or the dump
/// failed. Callable from inside a tokio runtime.
pub fn napi_instances(ifindex: u32) -> Result<Vec<u32>, String> {
    let netdev = Netdev::open().map_err(|e| e.to_string())?;
    Ok(netdev.instances(ifindex).map_err(|e| e.to_string())?.iter().map(|i| i.id).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(defer: &str, timeout: &str) -> (tempfile::TempDir, SysfsNapi) {
        let dir = tempfile::tempdir().unwrap();
        let ifdir = dir.path().join("class/net/veth0");
        std::fs::create_dir_all(&ifdir).unwrap();
        std::fs::write(ifdir.join(DEFER_FILE), defer).unwrap();
        std::fs::write(ifdir.join(TIMEOUT_FILE), timeout).unwrap();
        let s = SysfsNapi::new(dir.path());
        (dir, s)
    }

    #[test]
    fn reads_and_writes_the_sysfs_files() {
        let (dir, mut s) = tree("0\n", "0\n");
        assert_eq!(s.get("veth0").unwrap(), NapiParams::OFF);
        s.set("veth0", &NapiParams::new(2, 20_000)).unwrap();
        assert_eq!(s.get("veth0").unwrap(), NapiParams::new(2, 20_000));
        let f = dir.path().join("class/net/veth0/gro_flush_timeout");
        assert_eq!(std::fs::read_to_string(f).unwrap(), "20000");
    }

    #[test]
    fn errors_name_the_interface_and_the_file() {
        let (dir, mut s) = tree("0\n", "zero\n");
        let e = s.get("veth0").unwrap_err().to_string();
        assert!(e.contains("veth0") && e.contains("gro_flush_timeout") && e.contains("`zero`"), "{e}");
        assert_eq!(s.get("nope").unwrap_err(), NapiError::NoDevice { ifname: "nope".into() });
        std::fs::remove_file(dir.path().join("class/net/veth0/napi_defer_hard_irqs")).unwrap();
        let e = s.set("veth0", &NapiParams::new(2, 20_000)).unwrap_err();
        assert!(matches!(e, NapiError::Unsupported { .. }), "{e:?}");
        assert!(e.to_string().contains("5.10"), "{e}");
        let e = s.get("veth0").unwrap_err();
        assert!(matches!(e, NapiError::Unsupported { .. }), "{e:?}");
    }

    #[test]
    fn bounds_are_the_kernels() {
        NapiParams::new(DEFER_HARD_IRQS_MAX, GRO_FLUSH_TIMEOUT_NS_MAX).check().unwrap();
        let e = NapiParams::new(DEFER_HARD_IRQS_MAX + 1, 0).check().unwrap_err();
        assert!(e.contains("2147483648") && e.contains("napi_defer_hard_irqs"), "{e}");
        let e = NapiParams::new(0, GRO_FLUSH_TIMEOUT_NS_MAX + 1).check().unwrap_err();
        assert!(e.contains("gro_flush_timeout"), "{e}");
    }

    #[test]
    fn the_fake_rounds_and_refuses() {
        let mut m = MemoryNapi { round_to: Some(1000), ..Default::default() }.with("eth1", NapiParams::OFF);
        m.set("eth1", &NapiParams::new(2, 20_500)).unwrap();
        assert_eq!(m.get("eth1").unwrap(), NapiParams::new(2, 20_000));
        assert!(matches!(m.set("eth9", &NapiParams::OFF), Err(NapiError::NoDevice { .. })));
    }
}
