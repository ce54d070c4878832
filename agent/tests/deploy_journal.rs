//! The state journal, the per-interface lock, `moderato restore` and the truthful restore summary,
//! on the fake `Coalescer` and a copy of the virtio guest fixture tree. Each test is named after
//! the failure it pins (issue 14); the real-kernel versions are in `deploy_netns.rs`.

use std::path::Path;

use moderato_agent::deploy::journal::{Entry, Outcome, StateDir, restore_all};
use moderato_agent::deploy::{self, DeployLoop, LoopOptions, Metrics};
use moderato_env::live::{CoalesceError, CoalesceParams, Coalescer, HostEnv, Original};
use moderato_env::{CoalescingSettings, LayerId, Moderation};
use tokio::sync::watch;

mod common;

use common::{ORIGINAL, Rig, Scripted, frontend, limits, opts, rt};

/// What a deploy that was SIGKILLed left in force: not the original.
const LEFT_BY_A_KILLED_DEPLOY: CoalesceParams = CoalesceParams {
    rx_usecs: Some(48),
    rx_frames: Some(24),
    tx_usecs: Some(48),
    tx_frames: Some(24),
    adaptive_rx: Some(false),
    adaptive_tx: None,
};

fn opts_in(state: &Path, steps: Option<u64>) -> LoopOptions {
    LoopOptions { state_dir: Some(state.to_path_buf()), ..opts(steps) }
}

fn steady() -> Box<Scripted> {
    Scripted::fixed("steady", frontend(Moderation::fixed(40, 16), Moderation::fixed(40, 16)))
}

fn fallback() -> Box<Scripted> {
    Scripted::fixed("fb", CoalescingSettings::per_packet(1))
}

fn fixture_ifindex(rig: &Rig) -> u64 {
    std::fs::read_to_string(rig.link().join("ifindex")).unwrap().trim().parse().unwrap()
}

/// A journal as a deploy (PID `pid`) killed with SIGKILL leaves it.
fn killed_deploys_journal(rig: &Rig, state: &Path, pid: u32) {
    let o = Original {
        layer: LayerId::Frontend(0),
        ifname: "eth0".into(),
        ifindex: Some(fixture_ifindex(rig)),
        params: ORIGINAL,
        napi: None,
        napi_instances: Vec::new(),
    };
    let entry = Entry { pid, ..Entry::of(&o) };
    StateDir::open(state).unwrap().write(&entry).unwrap();
    *rig.nic.state.lock().unwrap() = LEFT_BY_A_KILLED_DEPLOY;
}

#[test]
fn the_originals_are_journalled_before_the_first_change_and_the_journal_goes_after_restore() {
    let state = tempfile::tempdir().unwrap();
    let journal = state.path().join("eth0.json");
    let mut rig = Rig::new();
    let sets = rig.nic.sets.clone();
    let j = journal.clone();
    // At its first decision nothing is set yet, and the journal holds the originals.
    let primary = Scripted::new("steady", move |n, _| {
        if n == 1 {
            assert!(sets.lock().unwrap().is_empty());
            let e: Entry = serde_json::from_str(&std::fs::read_to_string(&j).unwrap()).unwrap();
            assert_eq!(e.original, ORIGINAL);
            assert_eq!(e.pid, std::process::id());
            assert_eq!(
                (e.interface.as_str(), e.layer.as_str(), e.ifindex),
                ("eth0", "vm0.frontend", Some(2))
            );
        }
        frontend(Moderation::fixed(40, 16), Moderation::fixed(40, 16))
    });
    let lp = DeployLoop::new(
        rig.env.take().unwrap(),
        primary,
        fallback(),
        limits(),
        opts_in(state.path(), Some(4)),
        Metrics::new(false),
    )
    .unwrap();
    let (_tx, rx) = watch::channel(false);
    let s = rt().block_on(lp.run(rx)).unwrap();
    assert_eq!(s.decisions, 4);
    assert!(!rig.sets().is_empty());
    assert_eq!((s.restored, s.restore_failures.len()), (1, 0));
    assert_eq!(rig.state(), ORIGINAL);
    assert!(!journal.exists(), "removed once restored");
    // The lock file stays (removing it would race with another deploy's lock), with our PID.
    let lock = std::fs::read_to_string(state.path().join("eth0.lock")).unwrap();
    assert_eq!(lock.trim(), std::process::id().to_string());
}

#[test]
fn sigkill_left_settings_are_not_taken_as_the_original_at_the_next_start() {
    let state = tempfile::tempdir().unwrap();
    let mut rig = Rig::new();
    killed_deploys_journal(&rig, state.path(), 4_000_000);
    let lp = DeployLoop::new(
        rig.env.take().unwrap(),
        steady(),
        fallback(),
        limits(),
        opts_in(state.path(), Some(3)),
        Metrics::new(false),
    )
    .unwrap();
    // The stale journal was restored before anything else: the true original is in force, and it
    // is what the new journal holds.
    assert_eq!(rig.sets().first().copied().map(|p| ORIGINAL.updated(&p)), Some(ORIGINAL));
    assert_eq!(rig.state(), ORIGINAL);
    let e = StateDir::open(state.path()).unwrap().read("eth0").unwrap().unwrap();
    assert_eq!(e.original, ORIGINAL);
    assert_eq!(e.pid, std::process::id());
    let (_tx, rx) = watch::channel(false);
    let s = rt().block_on(lp.run(rx)).unwrap();
    assert_eq!(s.restored, 1);
    assert_eq!(rig.state(), ORIGINAL, "the true original, not what the killed deploy left");
}

#[test]
fn two_deploys_on_one_interface_the_second_is_refused_naming_the_holder_pid() {
    let state = tempfile::tempdir().unwrap();
    let held = StateDir::open(state.path()).unwrap().lock("eth0", "deploy").unwrap();
    let mut rig = Rig::new();
    let e = DeployLoop::new(
        rig.env.take().unwrap(),
        steady(),
        fallback(),
        limits(),
        opts_in(state.path(), None),
        Metrics::new(false),
    )
    .unwrap_err()
    .to_string();
    let pid = std::process::id();
    assert!(e.contains(&format!("refusing to deploy on eth0: it is already controlled by PID {pid}")), "{e}");
    assert!(e.contains("eth0.lock") && e.contains("One controller per interface"), "{e}");
    assert!(rig.sets().is_empty(), "the refused deploy set nothing");
    // Released with the first holder: a deploy may start now.
    drop(held);
    let mut rig = Rig::new();
    let lp = DeployLoop::new(
        rig.env.take().unwrap(),
        steady(),
        fallback(),
        limits(),
        opts_in(state.path(), Some(2)),
        Metrics::new(false),
    )
    .unwrap();
    // While it runs, the lock is held: `moderato restore` is refused too.
    let live = lp.env().config().clone();
    let e = restore_all(&live, &StateDir::open(state.path()).unwrap(), &mut rig.nic.clone()).unwrap_err();
    assert!(e.to_string().contains("refusing to restore on eth0"), "{e}");
    let (_tx, rx) = watch::channel(false);
    rt().block_on(lp.run(rx)).unwrap();
    assert_eq!(rig.state(), ORIGINAL);
}

#[test]
fn restore_puts_back_a_killed_deploys_journal_and_removes_it() {
    let state = tempfile::tempdir().unwrap();
    let rig = Rig::new();
    killed_deploys_journal(&rig, state.path(), 4_000_001);
    let live = rig.env.as_ref().unwrap().config().clone();
    let dir = StateDir::open(state.path()).unwrap();
    deploy::restore_with(&live, &dir, &mut rig.nic.clone()).unwrap();
    assert_eq!(rig.state(), ORIGINAL);
    assert!(dir.read("eth0").unwrap().is_none());
    // Again: nothing to do, and nothing set.
    let n = rig.sets().len();
    let report = restore_all(&live, &dir, &mut rig.nic.clone()).unwrap();
    assert_eq!(report.outcomes, vec![("eth0".to_string(), Outcome::NoJournal)]);
    assert!(report.others.is_empty());
    assert_eq!(rig.sets().len(), n);
}

#[test]
fn a_recreated_interface_is_never_restored_to_the_old_ones_original() {
    let state = tempfile::tempdir().unwrap();
    let rig = Rig::new();
    killed_deploys_journal(&rig, state.path(), 4_000_002);
    // The interface was re-created since: a new index, its own settings.
    std::fs::write(rig.link().join("ifindex"), "7\n").unwrap();
    let live = rig.env.as_ref().unwrap().config().clone();
    let dir = StateDir::open(state.path()).unwrap();
    let e = format!("{:#}", deploy::restore_with(&live, &dir, &mut rig.nic.clone()).unwrap_err());
    assert!(e.contains("eth0: not restored: the interface was re-created (ifindex 2 is now 7)"), "{e}");
    assert_eq!(rig.state(), LEFT_BY_A_KILLED_DEPLOY, "the new interface kept its own settings");
    assert!(rig.sets().is_empty());
    assert!(dir.read("eth0").unwrap().is_none(), "a journal that can never apply is removed");
}

#[test]
fn sigterm_while_the_interface_is_gone_does_not_claim_it_was_restored() {
    let state = tempfile::tempdir().unwrap();
    let mut rig = Rig::new();
    let link = rig.link();
    let primary = Scripted::new("steady", move |n, _| {
        if n == 3 {
            std::fs::remove_file(&link).unwrap();
        }
        frontend(Moderation::fixed(40, 16), Moderation::fixed(40, 16))
    });
    let lp = DeployLoop::new(
        rig.env.take().unwrap(),
        primary,
        fallback(),
        limits(),
        opts_in(state.path(), Some(5)),
        Metrics::new(false),
    )
    .unwrap();
    let (_tx, rx) = watch::channel(false);
    let s = rt().block_on(lp.run(rx)).unwrap();
    assert_eq!(s.restored, 0, "{s:?}");
    assert_eq!(s.restore_failures.len(), 1, "{s:?}");
    assert!(s.restore_failures[0].contains("eth0 (vm0.frontend): not restored"), "{:?}", s.restore_failures);
    assert!(s.restore_failures[0].contains("the interface is gone"), "{:?}", s.restore_failures);
}

/// The fake driver, whose interface is deleted and re-created (a new index, its own settings)
/// right after the `at`-th set: between an interval's apply and the next sample.
#[derive(Debug)]
struct Recreating {
    nic: common::FakeNic,
    link: std::path::PathBuf,
    fresh: CoalesceParams,
    at: usize,
    sets: usize,
}

impl Coalescer for Recreating {
    fn get(&mut self, ifname: &str) -> Result<CoalesceParams, CoalesceError> {
        self.nic.get(ifname)
    }
    fn set(&mut self, ifname: &str, p: &CoalesceParams) -> Result<(), CoalesceError> {
        self.nic.set(ifname, p)?;
        self.sets += 1;
        if self.sets == self.at {
            std::fs::write(self.link.join("ifindex"), "9\n").unwrap();
            *self.nic.state.lock().unwrap() = self.fresh;
        }
        Ok(())
    }
}

#[test]
fn a_recreated_interface_gets_its_own_original_read_and_restored() {
    let state = tempfile::tempdir().unwrap();
    let rig = Rig::new();
    // Its own settings, as a new interface would come up with.
    let fresh = CoalesceParams { rx_usecs: Some(8), rx_frames: Some(4), ..ORIGINAL };
    let driver = Recreating { nic: rig.nic.clone(), link: rig.link(), fresh, at: 2, sets: 0 };
    let cfg = rig.env.as_ref().unwrap().config().clone();
    let env = HostEnv::new(cfg, Box::new(driver)).unwrap();
    let lp = DeployLoop::new(
        env,
        steady(),
        fallback(),
        limits(),
        opts_in(state.path(), Some(6)),
        Metrics::new(false),
    )
    .unwrap();
    let (_tx, rx) = watch::channel(false);
    let s = rt().block_on(lp.run(rx)).unwrap();
    assert_eq!((s.restored, s.restore_failures.len()), (1, 0), "{s:?}");
    assert_eq!(rig.state(), fresh, "the new interface's own original, not the old one's");
    let sets = rig.sets();
    // After the re-creation the step limit counts from the new interface's settings (8 µs).
    assert_eq!(sets[2].rx_usecs, Some(24), "{sets:?}");
}

#[test]
fn a_dry_run_takes_no_lock_and_writes_no_journal() {
    let state = tempfile::tempdir().unwrap();
    let _held = StateDir::open(state.path()).unwrap().lock("eth0", "deploy").unwrap();
    let mut rig = Rig::new();
    let o = LoopOptions { dry_run: true, ..opts_in(state.path(), Some(2)) };
    let lp = DeployLoop::new(rig.env.take().unwrap(), steady(), fallback(), limits(), o, Metrics::new(true))
        .unwrap();
    let (_tx, rx) = watch::channel(false);
    rt().block_on(lp.run(rx)).unwrap();
    assert!(!state.path().join("eth0.json").exists());
    assert!(rig.sets().is_empty());
}
