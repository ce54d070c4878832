//! The state directory: a journal of every interface's original settings, and one lock per
//! interface, so that a deploy that dies without restoring (SIGKILL, OOM, power loss of the
//! process) leaves what is needed to put the host back, and two deploys never fight over one
//! interface.
//!
//! In the state directory (`state_dir` in the deploy config, default `/run/moderato`):
//! - `<ifname>.lock`: held with `flock(LOCK_EX)` by the deploy that controls the interface, for
//!   its whole life; it holds that process's PID. The kernel releases the lock when the process
//!   dies however it dies, so a stale lock cannot block anyone. Lock files are never removed
//!   (unlinking a lock file that another process has open races with that process's lock).
//! - `<ifname>.json`: the interface's original settings ([`Entry`]), keyed by name *and* ifindex,
//!   written before the first change (atomically: a temporary file, `fsync`, `rename`, `fsync` of
//!   the directory) and removed once they are restored.
//!
//! A journal that a deploy finds at start was left by a process that is gone (it holds the lock
//! now, so no live process can own the journal): it is restored first and logged.
//! `moderato restore` does the same without starting a policy. A value is restored only onto the
//! interface it was read from: a re-created interface (new ifindex) is left with its own settings.

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use moderato_env::LayerId;
use moderato_env::live::{
    CoalesceParams, Coalescer, InstanceNapi, LiveConfig, NapiParams, Original, RestoreFailure,
    restore_original,
};
use serde::{Deserialize, Serialize};

/// The journal format's version.
pub const JOURNAL_VERSION: u32 = 1;

/// One interface's journal: its settings before the deploy with `pid` changed anything.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub version: u32,
    /// The deploy that wrote it.
    pub pid: u32,
    pub interface: String,
    /// The interface's index when the settings were read; restored only onto that index.
    pub ifindex: Option<u64>,
    /// The layer it played, for people reading the file.
    pub layer: String,
    /// The knobs with ethtool's names, `null` where the driver lacks one (all `null` where the
    /// deploy does not set them: a driver without coalescing whose NAPI deferral is set).
    pub original: CoalesceParams,
    /// The NAPI deferral (`napi_defer_hard_irqs`, `gro_flush_timeout_ns`), where the deploy sets
    /// it. Absent in journals of deploys that did not (and of versions before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub napi: Option<NapiParams>,
    /// Each NAPI instance's own deferral (`[{"id": 258, "napi": {...}}]`), where the kernel lists
    /// instances (netdev netlink, 6.13+); restored after the device value. Absent elsewhere.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub napi_instances: Vec<InstanceNapi>,
    /// When it was written, RFC 3339.
    pub written_at: String,
}

impl Entry {
    pub fn of(o: &Original) -> Entry {
        Entry {
            version: JOURNAL_VERSION,
            pid: std::process::id(),
            interface: o.ifname.clone(),
            ifindex: o.ifindex,
            layer: o.layer.to_string(),
            original: o.params,
            napi: o.napi,
            napi_instances: o.napi_instances.clone(),
            written_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        }
    }

    /// What it puts back, for logs: the knobs, then the NAPI deferral (see [`Original::describe`]).
    pub fn describe(&self) -> String {
        self.original(LayerId::Nic).describe()
    }

    /// The original, as the layer `layer` of this side's config.
    pub fn original(&self, layer: LayerId) -> Original {
        Original {
            layer,
            ifname: self.interface.clone(),
            ifindex: self.ifindex,
            params: self.original,
            napi: self.napi,
            napi_instances: self.napi_instances.clone(),
        }
    }
}

/// The state directory. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

/// An interface's lock, held until dropped (or the process dies).
#[derive(Debug)]
pub struct InterfaceLock {
    pub interface: String,
    pub path: PathBuf,
    _file: File,
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

impl StateDir {
    /// Opens (creating, mode 0700) the state directory `dir`; `key` names where it came from.
    pub fn open(dir: &Path) -> Result<StateDir> {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).with_context(|| {
            format!(
                "creating the state directory {} (key `state_dir` of the deploy config, default /run/moderato). \
                 Fix: run as root, let systemd create it (RuntimeDirectory=moderato), or set state_dir to a writable directory",
                dir.display()
            )
        })?;
        Ok(StateDir { dir: dir.to_path_buf() })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn lock_path(&self, ifname: &str) -> PathBuf {
        self.dir.join(format!("{ifname}.lock"))
    }

    pub fn journal_path(&self, ifname: &str) -> PathBuf {
        self.dir.join(format!("{ifname}.json"))
    }

    /// Takes `ifname`'s lock, or refuses naming the process that holds it. `what` says who asks
    /// (for the message).
    pub fn lock(&self, ifname: &str, what: &str) -> Result<InterfaceLock> {
        let path = self.lock_path(ifname);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening the lock file {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let holder = text.trim().parse::<u32>().map_or_else(
                    |_| "another process (its PID is not in the lock file yet)".to_string(),
                    |pid| format!("PID {pid}"),
                );
                bail!(
                    "refusing to {what} on {ifname}: it is already controlled by {holder} (lock {}). \
                     One controller per interface: stop that one first (it restores the interface as it exits)",
                    path.display()
                );
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(anyhow!(e).context(format!("locking {}", path.display())));
            }
        }
        file.set_len(0)
            .and_then(|_| {
                writeln!(file, "{}", std::process::id())?;
                file.sync_all()
            })
            .with_context(|| format!("writing this PID into {}", path.display()))?;
        Ok(InterfaceLock { interface: ifname.to_string(), path, _file: file })
    }

    /// The journal of `ifname`, if there is one.
    pub fn read(&self, ifname: &str) -> Result<Option<Entry>> {
        let path = self.journal_path(ifname);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(anyhow!(e).context(format!("reading the journal {}", path.display()))),
        };
        let entry: Entry = serde_json::from_str(&text).map_err(|e| {
            anyhow!(
                "{}: not a moderato journal ({e}). Fix: check {ifname}'s settings by hand (ethtool -c {ifname}; \
                 /sys/class/net/{ifname}/napi_defer_hard_irqs and gro_flush_timeout), then delete the file",
                path.display()
            )
        })?;
        if entry.version != JOURNAL_VERSION || entry.interface != ifname {
            bail!(
                "{}: journal version {} for interface `{}`, expected version {JOURNAL_VERSION} for `{ifname}`. \
                 Fix: check {ifname}'s settings by hand (ethtool -c {ifname}; \
                 /sys/class/net/{ifname}/napi_defer_hard_irqs and gro_flush_timeout), then delete the file",
                path.display(),
                entry.version,
                entry.interface
            );
        }
        Ok(Some(entry))
    }

    /// Writes `entry` atomically and durably: a temporary file, fsync, rename, fsync of the
    /// directory.
    pub fn write(&self, entry: &Entry) -> Result<()> {
        let path = self.journal_path(&entry.interface);
        let tmp = self.dir.join(format!(".{}.json.tmp", entry.interface));
        let text = serde_json::to_string_pretty(entry)? + "\n";
        let r = (|| -> std::io::Result<()> {
            let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            sync_dir(&self.dir)
        })();
        r.with_context(|| format!("writing the journal {}", path.display()))
    }

    /// Removes `ifname`'s journal (durably).
    pub fn remove(&self, ifname: &str) -> Result<()> {
        let path = self.journal_path(ifname);
        match std::fs::remove_file(&path) {
            Ok(()) => sync_dir(&self.dir).with_context(|| format!("syncing {}", self.dir.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(anyhow!(e).context(format!("removing the journal {}", path.display()))),
        }
    }

    /// Journals in the directory for interfaces not in `known`.
    pub fn others(&self, known: &[&str]) -> Vec<PathBuf> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else { return Vec::new() };
        let mut out: Vec<PathBuf> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.extension().is_some_and(|x| x == "json")
                    && p.file_stem().and_then(|s| s.to_str()).is_some_and(|s| !known.contains(&s))
                    && !p.file_name().and_then(|s| s.to_str()).is_some_and(|s| s.starts_with('.'))
            })
            .collect();
        out.sort();
        out
    }
}

/// What happened to one interface's journal in a restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// No journal: nothing to do.
    NoJournal,
    /// Put back; the journal is removed.
    Restored(Entry),
    /// Not put back. `kept`: the journal stays for another try (`moderato restore`); otherwise
    /// the interface it belongs to is gone for good and the journal was removed.
    Failed { entry: Entry, why: RestoreFailure, kept: bool },
}

impl Outcome {
    pub fn failed(&self) -> bool {
        matches!(self, Outcome::Failed { .. })
    }
}

/// Restores `entry` through `restore` (a coalescer with the sysfs the interface is under), then
/// removes the journal, unless the failure might pass (then it stays for a later restore).
pub fn settle(
    state: &StateDir,
    entry: Entry,
    restore: impl FnOnce(&Entry) -> std::result::Result<(), RestoreFailure>,
) -> Result<Outcome> {
    match restore(&entry) {
        Ok(()) => {
            state.remove(&entry.interface)?;
            Ok(Outcome::Restored(entry))
        }
        Err(why) => {
            let kept = !why.is_permanent();
            if !kept {
                state.remove(&entry.interface)?;
            }
            Ok(Outcome::Failed { entry, why, kept })
        }
    }
}

/// What [`restore_all`] did: each interface's outcome, and the journals of interfaces the config
/// does not name (left alone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreReport {
    pub outcomes: Vec<(String, Outcome)>,
    pub others: Vec<PathBuf>,
}

/// `moderato restore`'s work for one side: for every interface of `live` (locks taken, so that a
/// running deploy is never undercut), restore its journal if there is one. Returns each
/// interface's outcome and the journals of interfaces `live` does not name.
pub fn restore_all(
    live: &LiveConfig,
    state: &StateDir,
    coalescer: &mut dyn Coalescer,
) -> Result<RestoreReport> {
    let interfaces: Vec<(LayerId, String)> = live.interfaces().map(|(id, i)| (id, i.name.clone())).collect();
    let mut locks = Vec::new();
    for (_, name) in &interfaces {
        locks.push(state.lock(name, "restore")?);
    }
    let mut out = Vec::new();
    for (layer, name) in &interfaces {
        let outcome = match state.read(name)? {
            None => Outcome::NoJournal,
            Some(entry) => settle(state, entry, |e| {
                restore_original(&mut *coalescer, &live.sysfs_root, &e.original(*layer))
            })?,
        };
        out.push((name.clone(), outcome));
    }
    let names: Vec<&str> = interfaces.iter().map(|(_, n)| n.as_str()).collect();
    let others = state.others(&names);
    drop(locks);
    Ok(RestoreReport { outcomes: out, others })
}
