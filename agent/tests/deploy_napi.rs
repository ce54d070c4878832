//! NAPI deferral in the deploy loop (`napi:<defer>/<timeout_us>` policies), on the fake virtio-net
//! `Coalescer` and a copy of the virtio guest fixture tree with an in-memory NAPI control: what is
//! set, what the log records (the kernel's read-back), the journal (also an old one without NAPI
//! fields), and the restore on every exit. The real-kernel versions are in `deploy_netns.rs`.

use std::path::Path;
use std::sync::{Arc, Mutex};

use moderato_agent::deploy::journal::{Entry, Outcome, StateDir, restore_all};
use moderato_agent::deploy::{self, DeployLoop, LogFormat, LoopOptions, Metrics};
use moderato_env::live::{MemoryNapi, NapiControl, NapiError, NapiParams};
use moderato_env::{CoalescingSettings, Observation};
use moderato_policies::Policy;
use moderato_policies::baselines::{NapiPolicy, baseline};
use tokio::sync::watch;

mod common;

use common::{Buf, ORIGINAL, Rig, Scripted, limits, opts, rt};

/// Held by every test here for its whole run: tracing caches per-callsite interest globally, and
/// a test thread without a subscriber hitting a callsite while another installs a scoped one can
/// leave it disabled for that one (see `deploy_logs.rs`); one test at a time avoids that.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The frontend's deferral before the deploy.
const NAPI_ORIGINAL: NapiParams = NapiParams::new(1, 5_000);

/// A [`MemoryNapi`] the test keeps a handle on.
#[derive(Debug, Clone)]
struct Shared(Arc<Mutex<MemoryNapi>>);

impl NapiControl for Shared {
    fn get(&mut self, ifname: &str) -> Result<NapiParams, NapiError> {
        self.0.lock().unwrap().get(ifname)
    }
    fn set(&mut self, ifname: &str, p: &NapiParams) -> Result<(), NapiError> {
        self.0.lock().unwrap().set(ifname, p)
    }
}

impl Shared {
    fn now(&self) -> NapiParams {
        self.0.lock().unwrap().values["eth0"]
    }
    fn sets(&self) -> Vec<(String, NapiParams)> {
        self.0.lock().unwrap().sets.clone()
    }
}

/// The rig with eth0's deferral at [`NAPI_ORIGINAL`] in memory; `round_to` as [`MemoryNapi`]'s.
fn rig(round_to: Option<u64>) -> (Rig, Shared) {
    let mut rig = Rig::new();
    let napi = Shared(Arc::new(Mutex::new(MemoryNapi {
        round_to,
        ..MemoryNapi::default().with("eth0", NAPI_ORIGINAL)
    })));
    rig.env = Some(rig.env.take().unwrap().with_napi(Box::new(napi.clone())));
    (rig, napi)
}

fn opts_in(state: &Path, steps: Option<u64>) -> LoopOptions {
    LoopOptions { state_dir: Some(state.to_path_buf()), ..opts(steps) }
}

/// The loop on `env` with `primary`, the per-packet fallback, [`limits`] and `steps` decisions,
/// journalling into `state`.
fn on(env: moderato_env::live::HostEnv, primary: Box<dyn Policy>, state: &Path, steps: u64) -> DeployLoop {
    on_with(env, primary, opts_in(state, Some(steps)))
}

/// [`on`] with the options `o`.
fn on_with(env: moderato_env::live::HostEnv, primary: Box<dyn Policy>, o: LoopOptions) -> DeployLoop {
    DeployLoop::new(env, primary, per_packet(), limits(), o, Metrics::new(false)).unwrap()
}

fn napi_policy(name: &str) -> Box<dyn Policy> {
    baseline(name, &Default::default()).unwrap()
}

fn per_packet() -> Box<Scripted> {
    Scripted::fixed("fb", CoalescingSettings::per_packet(1))
}

/// Runs the loop for `steps` decisions with the log captured; the events.
fn run_logged(lp: DeployLoop) -> (deploy::Summary, Vec<serde_json::Value>) {
    let buf = Buf::default();
    let b2 = buf.clone();
    let s = {
        let _g =
            tracing::subscriber::set_default(deploy::subscriber(LogFormat::Json, false, move || b2.clone()));
        let (_tx, rx) = watch::channel(false);
        rt().block_on(lp.run(rx)).unwrap()
    };
    let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    (s, text.lines().map(|l| serde_json::from_str(l).unwrap()).collect())
}

#[test]
fn napi_2_20_sets_the_deferral_leaves_coalescing_alone_and_restores_at_the_end() {
    let _serial = serial();
    let state = tempfile::tempdir().unwrap();
    let (mut rig, napi) = rig(None);
    let n2 = napi.clone();
    let journal = state.path().join("eth0.json");
    let j = journal.clone();
    // The loop with a fallback that checks, at each of its calls, nothing (it never decides here),
    // and a primary that is the baseline.
    let lp = DeployLoop::new(
        rig.env.take().unwrap(),
        napi_policy("napi:2/20"),
        per_packet(),
        limits(),
        opts_in(state.path(), Some(3)),
        Metrics::new(false),
    )
    .unwrap();
    // Journalled before anything is set: both the knobs and the deferral.
    assert!(n2.sets().is_empty());
    let e: Entry = serde_json::from_str(&std::fs::read_to_string(&j).unwrap()).unwrap();
    assert_eq!((e.original, e.napi), (ORIGINAL, Some(NAPI_ORIGINAL)));
    let (s, events) = run_logged(lp);
    assert_eq!(s.decisions, 3);
    // One set of 2 / 20 µs (then it is in force and left), one back to the original at the end.
    assert_eq!(
        napi.sets(),
        vec![("eth0".to_string(), NapiParams::new(2, 20_000)), ("eth0".to_string(), NAPI_ORIGINAL)]
    );
    assert_eq!(napi.now(), NAPI_ORIGINAL);
    assert!(rig.sets().is_empty(), "coalescing is not touched: {:?}", rig.sets());
    assert_eq!(rig.state(), ORIGINAL);
    assert_eq!((s.restored, s.restore_failures.len()), (1, 0));
    assert!(!journal.exists());
    let decisions: Vec<_> = events.iter().filter(|e| e["message"] == "decision").collect();
    assert_eq!(decisions.len(), 3);
    for d in decisions {
        let napi: serde_json::Value = serde_json::from_str(d["napi"].as_str().unwrap()).unwrap();
        let f = &napi["vm0.frontend"];
        assert_eq!(f["interface"], "eth0", "{d}");
        assert_eq!(f["applied"]["napi_defer_hard_irqs"], 2, "{d}");
        assert_eq!(f["applied"]["gro_flush_timeout_ns"], 20_000, "{d}");
        assert_eq!(d["decided"], "coalescing left as is", "{d}");
    }
}

#[test]
fn what_the_kernel_applied_is_what_the_log_records_with_a_warning() {
    let _serial = serial();
    let state = tempfile::tempdir().unwrap();
    // A kernel that keeps the timeout in whole microseconds: 20.5 µs becomes 20 µs.
    let (mut rig, napi) = rig(Some(1_000));
    let lp = DeployLoop::new(
        rig.env.take().unwrap(),
        Box::new(NapiPolicy::new("napi:odd", NapiParams::new(3, 20_500))),
        per_packet(),
        limits(),
        opts_in(state.path(), Some(2)),
        Metrics::new(false),
    )
    .unwrap();
    let (_, events) = run_logged(lp);
    let d = events.iter().find(|e| e["message"] == "decision").unwrap();
    let logged: serde_json::Value = serde_json::from_str(d["napi"].as_str().unwrap()).unwrap();
    assert_eq!(logged["vm0.frontend"]["wanted"]["gro_flush_timeout_ns"], 20_500);
    assert_eq!(logged["vm0.frontend"]["applied"]["gro_flush_timeout_ns"], 20_000);
    let warned: Vec<_> = events
        .iter()
        .filter(|e| e["message"].as_str().is_some_and(|m| m.contains("the kernel applied")))
        .collect();
    assert_eq!(warned.len(), 1, "once, not every interval: {events:?}");
    assert_eq!(napi.now(), NAPI_ORIGINAL);
}

#[test]
fn a_dry_run_sets_no_deferral_and_a_host_without_the_files_refuses_a_napi_policy() {
    let _serial = serial();
    let (mut rig, napi) = rig(None);
    let o = LoopOptions { dry_run: true, ..opts(Some(2)) };
    let lp = DeployLoop::new(
        rig.env.take().unwrap(),
        napi_policy("napi:2/20"),
        per_packet(),
        limits(),
        o,
        Metrics::new(true),
    )
    .unwrap();
    let (_, events) = run_logged(lp);
    assert!(napi.sets().is_empty());
    let d = events.iter().find(|e| e["message"] == "decision").unwrap_or_else(|| panic!("{events:?}"));
    let logged: serde_json::Value = serde_json::from_str(d["napi"].as_str().unwrap()).unwrap();
    assert_eq!(logged["vm0.frontend"]["applied"]["napi_defer_hard_irqs"], 1, "what is in force: {d}");

    // The fixture tree has no napi_defer_hard_irqs (a kernel before 5.10): refused at start.
    let mut rig = Rig::new();
    let e = DeployLoop::new(
        rig.env.take().unwrap(),
        napi_policy("napi:2/20"),
        per_packet(),
        limits(),
        opts(Some(1)),
        Metrics::new(false),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("napi:2/20") && e.contains("napi_defer_hard_irqs"), "{e}");
    // A coalescing policy there is not affected.
    let mut rig = Rig::new();
    DeployLoop::new(
        rig.env.take().unwrap(),
        per_packet(),
        per_packet(),
        limits(),
        opts(Some(1)),
        Metrics::new(false),
    )
    .unwrap();
}

/// `napi:2/20` that panics at its third decision.
struct PanicsAtThird(u64);

impl Policy for PanicsAtThird {
    fn name(&self) -> &str {
        "napi:2/20 (panics)"
    }
    fn act(&mut self, obs: &Observation) -> CoalescingSettings {
        self.0 += 1;
        assert!(self.0 < 3, "a policy bug");
        CoalescingSettings::per_packet(obs.guests.len())
    }
    fn napi(&self) -> Option<NapiParams> {
        Some(NapiParams::new(2, 20_000))
    }
    fn sets_coalescing(&self) -> bool {
        false
    }
}

#[test]
fn a_panic_in_the_loop_restores_the_deferral_on_the_way_out() {
    let _serial = serial();
    let (mut rig, napi) = rig(None);
    let lp = DeployLoop::new(
        rig.env.take().unwrap(),
        Box::new(PanicsAtThird(0)),
        per_packet(),
        limits(),
        opts(None),
        Metrics::new(false),
    )
    .unwrap();
    let (_tx, rx) = watch::channel(false);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rt().block_on(lp.run(rx))));
    assert!(r.is_err(), "the policy panicked");
    // Set at the first decision, put back while the panic unwound through the loop.
    assert_eq!(napi.sets().first().map(|s| s.1), Some(NapiParams::new(2, 20_000)));
    assert_eq!(napi.now(), NAPI_ORIGINAL, "{:?}", napi.sets());
}

/// A journal as version 0.x wrote it, before NAPI deferral: no `napi` key.
const OLD_JOURNAL: &str = r#"{
  "version": 1,
  "pid": 4000000,
  "interface": "eth0",
  "ifindex": 2,
  "layer": "vm0.frontend",
  "original": {
    "rx_usecs": 0,
    "rx_frames": 1,
    "tx_usecs": 0,
    "tx_frames": 1,
    "adaptive_rx": false,
    "adaptive_tx": null
  },
  "written_at": "2026-11-30T12:00:00.000Z"
}
"#;

#[test]
fn an_old_journal_without_napi_fields_still_loads_and_restores() {
    let _serial = serial();
    let state = tempfile::tempdir().unwrap();
    let rig = Rig::new();
    std::fs::write(state.path().join("eth0.json"), OLD_JOURNAL).unwrap();
    let dir = StateDir::open(state.path()).unwrap();
    let e = dir.read("eth0").unwrap().unwrap();
    assert_eq!((e.original, e.napi, e.pid), (ORIGINAL, None, 4_000_000));
    // Written again, it has no `napi` key either (a reader of the old format still reads it).
    let again = serde_json::to_value(&e).unwrap();
    assert!(again.get("napi").is_none(), "{again}");
    *rig.nic.state.lock().unwrap() = moderato_env::live::CoalesceParams { rx_usecs: Some(48), ..ORIGINAL };
    let live = rig.env.as_ref().unwrap().config().clone();
    let r = restore_all(&live, &dir, &mut rig.nic.clone()).unwrap();
    assert!(matches!(r.outcomes[0].1, Outcome::Restored(_)), "{r:?}");
    assert_eq!(rig.state(), ORIGINAL);
}

#[test]
fn moderato_restore_puts_back_a_journalled_deferral_through_sysfs() {
    let _serial = serial();
    let state = tempfile::tempdir().unwrap();
    let rig = Rig::new();
    // The per-device files, as Linux 5.10+ has them, at what a killed napi:2/20 deploy left.
    std::fs::write(rig.link().join("napi_defer_hard_irqs"), "2\n").unwrap();
    std::fs::write(rig.link().join("gro_flush_timeout"), "20000\n").unwrap();
    let mut e: Entry = serde_json::from_str(OLD_JOURNAL).unwrap();
    e.napi = Some(NAPI_ORIGINAL);
    let dir = StateDir::open(state.path()).unwrap();
    dir.write(&e).unwrap();
    let text = std::fs::read_to_string(state.path().join("eth0.json")).unwrap();
    assert!(text.contains("\"gro_flush_timeout_ns\": 5000"), "{text}");
    let live = rig.env.as_ref().unwrap().config().clone();
    deploy::restore_with(&live, &dir, &mut rig.nic.clone()).unwrap();
    let read = |f: &str| std::fs::read_to_string(rig.link().join(f)).unwrap();
    assert_eq!((read("napi_defer_hard_irqs").trim(), read("gro_flush_timeout").trim()), ("1", "5000"));
    assert!(!state.path().join("eth0.json").exists());
}

#[test]
fn the_policy_trait_defaults_set_coalescing_and_no_deferral() {
    let _serial = serial();
    struct Plain;
    impl Policy for Plain {
        fn name(&self) -> &str {
            "plain"
        }
        fn act(&mut self, obs: &Observation) -> CoalescingSettings {
            CoalescingSettings::per_packet(obs.guests.len())
        }
    }
    let p: Box<dyn Policy> = Box::new(Plain);
    assert_eq!((p.napi(), p.sets_coalescing()), (None, true));
}

/// A policy that decides its guest's deferral per layer, as a learned model does, and keeps the
/// deferral each observation reported.
struct PerLayer {
    want: NapiParams,
    seen: Arc<Mutex<Vec<Option<NapiParams>>>>,
}

impl Policy for PerLayer {
    fn name(&self) -> &str {
        "per-layer"
    }
    fn act(&mut self, obs: &Observation) -> CoalescingSettings {
        self.seen.lock().unwrap().push(obs.guests[0].frontend.napi);
        let mut s = CoalescingSettings::per_packet(1);
        s.vms[0].frontend.napi = self.want;
        s
    }
    fn sets_deferral(&self) -> bool {
        true
    }
}

#[test]
fn a_per_layer_deferral_is_set_and_the_kernels_read_back_is_what_the_policy_sees_next() {
    let _serial = serial();
    let state = tempfile::tempdir().unwrap();
    // The kernel here keeps the timeout to whole 10 µs: 25 µs is read back as something else.
    let (mut rig, napi) = rig(Some(10_000));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let want = NapiParams::new(3, 25_000);
    let lp = on(rig.env.take().unwrap(), Box::new(PerLayer { want, seen: seen.clone() }), state.path(), 3);
    let (s, _events) = run_logged(lp);
    assert_eq!(s.decisions, 3);
    let sets = napi.sets();
    assert_eq!(sets.first(), Some(&("eth0".to_string(), want)), "the decided deferral is what was written");
    // The fake kernel rounds the timeout down to 20 µs: that read-back is what the policy sees
    // from the next interval on (nothing was read into the first observation).
    let applied = NapiParams::new(3, 20_000);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[0], None);
    assert!(seen[1..].iter().all(|n| *n == Some(applied)), "{seen:?} vs {applied}");
    // And the original is written back at the end (this fake rounds it too).
    assert_eq!(sets.last(), Some(&("eth0".to_string(), NAPI_ORIGINAL)));
}

/// A policy that, like a learned model, follows its host's profile and asks for heavy knobs and a
/// deferral on the guest.
struct Follower;

impl Policy for Follower {
    fn name(&self) -> &str {
        "follower"
    }
    fn act(&mut self, _: &Observation) -> CoalescingSettings {
        let mut s = CoalescingSettings::per_packet(1);
        s.vms[0].frontend = moderato_env::LayerSettings {
            napi: NapiParams::new(2, 50_000),
            ..moderato_env::LayerSettings::fixed(
                moderato_env::Knobs::new(64, 32),
                moderato_env::Knobs::new(64, 32),
            )
        };
        s
    }
    fn sets_deferral(&self) -> bool {
        true
    }
    fn follows_profile(&self) -> bool {
        true
    }
}

#[test]
fn on_a_kvm_vhost_guest_a_profile_following_policy_sets_the_deferral_and_leaves_the_knobs() {
    let _serial = serial();
    let state = tempfile::tempdir().unwrap();
    // kvm-vhost: virtio-net without NOTF_COAL has no coalescing to set, only NAPI deferral.
    let mut vhost = common::Rig::with(None, moderato_env::HostProfile::KvmVhost);
    let napi = Shared(Arc::new(Mutex::new(MemoryNapi::default().with("eth0", NAPI_ORIGINAL))));
    vhost.env = Some(vhost.env.take().unwrap().with_napi(Box::new(napi.clone())));
    // The rig's fake driver accepts coalescing and its deferral is served without the sysfs
    // files, so the host does not look like `kvm-vhost`: a profile follower is refused there
    // unless allowed, which is what this test is about.
    let o = LoopOptions { allow_profile_mismatch: true, ..opts_in(state.path(), Some(3)) };
    let env = vhost.env.take().unwrap();
    let e = DeployLoop::new(
        env,
        Box::new(Follower),
        per_packet(),
        limits(),
        opts_in(state.path(), Some(3)),
        Metrics::new(false),
    );
    assert!(format!("{:#}", e.unwrap_err()).contains("which profile `kvm-vhost` says this layer lacks"));
    let mut vhost = common::Rig::with(None, moderato_env::HostProfile::KvmVhost);
    vhost.env = Some(vhost.env.take().unwrap().with_napi(Box::new(napi.clone())));
    let lp = on_with(vhost.env.take().unwrap(), Box::new(Follower), o);
    let (s, _) = run_logged(lp);
    assert_eq!(s.decisions, 3);
    assert!(vhost.sets().iter().all(|p| *p == ORIGINAL), "the knobs stay the original: {:?}", vhost.sets());
    assert_eq!(vhost.state(), ORIGINAL);
    assert_eq!(napi.sets().first(), Some(&("eth0".to_string(), NapiParams::new(2, 50_000))));
    // On the default profile (every mechanism) the same policy sets the knobs too.
    let state = tempfile::tempdir().unwrap();
    let (mut rig, _napi) = rig(None);
    let o = LoopOptions { allow_profile_mismatch: true, ..opts_in(state.path(), Some(3)) };
    let lp = on_with(rig.env.take().unwrap(), Box::new(Follower), o);
    run_logged(lp);
    assert!(rig.sets().iter().any(|p| *p != ORIGINAL), "kvm-notf-coal: the knobs are set");
}

#[test]
fn on_an_sriov_vf_host_a_model_is_refused_on_the_host_role_and_sent_into_the_guests() {
    let _serial = serial();
    let state = tempfile::tempdir().unwrap();
    let (_tmp, sys) = common::live::sysfs("sysfs-host");
    let cfg = moderato_env::live::LiveConfig {
        sysfs_root: sys,
        procfs_root: common::live::fixture("proc-host-64cpu"),
        interval: std::time::Duration::from_millis(15),
        profile: moderato_env::HostProfile::SriovVf,
        ..moderato_env::live::LiveConfig::host(Some("ens2f0np0"), &["vnet0"])
    };
    let env = moderato_env::live::HostEnv::new(cfg, Box::new(PfOnly)).unwrap();
    let o = LoopOptions { allow_profile_mismatch: true, ..opts_in(state.path(), Some(3)) };
    let e = DeployLoop::new(env, Box::new(Follower), per_packet(), limits(), o, Metrics::new(false));
    let e = format!("{:#}", e.unwrap_err());
    assert!(e.contains("sriov-vf") && e.contains("--role guest") && e.contains("bypass"), "{e}");
    assert!(!e.contains("  "), "no runs of spaces: {e}");
    let journalled: Vec<_> = std::fs::read_dir(state.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json"))
        .collect();
    assert!(journalled.is_empty(), "nothing journalled: {journalled:?}");
}

/// The PF of an SR-IOV host: its knobs read; a set would be a bug of the refusal.
#[derive(Debug)]
struct PfOnly;

impl moderato_env::live::Coalescer for PfOnly {
    fn get(
        &mut self,
        ifname: &str,
    ) -> Result<moderato_env::live::CoalesceParams, moderato_env::live::CoalesceError> {
        match ifname {
            "ens2f0np0" => Ok(ORIGINAL),
            _ => Err(moderato_env::live::CoalesceError::Unsupported { ifname: ifname.into(), detail: None }),
        }
    }
    fn set(
        &mut self,
        ifname: &str,
        _: &moderato_env::live::CoalesceParams,
    ) -> Result<(), moderato_env::live::CoalesceError> {
        panic!("{ifname} set: the refusal comes before anything is set")
    }
}
