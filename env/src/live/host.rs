//! [`HostEnv`]: one side of a live host behind the [`Env`] trait.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use super::coalesce::{CoalesceError, CoalesceParams, Coalescer, NetlinkCoalescer};
use super::counters::{self, Delta, IfCounters};
use super::cpu::{self, CpuSnapshot};
use super::interrupts::{self, InterruptTable, IrqKind, IrqSet};
use super::napi::{InstanceNapi, NapiControl, NapiError, NapiParams, NetlinkNapi};
use super::probe::UdpProbe;
use super::{InterfaceConfig, LiveConfig, LiveError, Role};
use crate::env::{Env, EnvError, EnvSpec, Step};
use crate::info::Info;
use crate::obs::{
    BACKEND_FEATURES, CpuObs, GUEST_FEATURES, GuestObs, HOST_FEATURES, HostObs, InterfaceObs, Observation,
};
use crate::settings::{Adaptive, CoalescingSettings, Direction, Knobs, LayerId, LayerSettings, Moderation};

/// Whether a layer's knobs are set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// Not probed yet (the interface has not been seen, or it came back).
    Unknown,
    /// Knobs are read and set.
    Controlled,
    /// Knobs are not set (the driver has no coalescing, or the process may not); counters are
    /// still observed. The reason is a sentence for operators.
    ObserveOnly(String),
}

impl Control {
    pub fn is_observe_only(&self) -> bool {
        matches!(self, Control::ObserveOnly(_))
    }
}

/// A layer of this side, for operators and the deploy loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerStatus {
    pub layer: LayerId,
    pub ifname: String,
    pub present: bool,
    pub control: Control,
    /// Knobs as last read or set; `None` where they cannot be read.
    pub params: Option<CoalesceParams>,
    /// The interface's index at the last sample; a new one means it was re-created.
    pub ifindex: Option<u64>,
}

/// What one interface offers ([`HostEnv::detect_mechanisms`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detected {
    pub layer: LayerId,
    pub ifname: String,
    pub coalescing: Option<bool>,
    pub deferral: bool,
    /// The interface's driver (`/sys/class/net/<if>/device/driver`), where it has a device.
    pub driver: Option<String>,
}

/// Drivers of SR-IOV virtual functions only (a PF driver that also drives VFs, such as mlx5_core,
/// cannot tell them apart by name).
const VF_DRIVERS: [&str; 5] = ["iavf", "i40evf", "ixgbevf", "igbvf", "bnxt_en_vf"];

/// Where what the interfaces offer differs from what `profile` says their layers have, one
/// sentence each. Not a difference: a backend that accepts coalescing (the tap's `rx-frames` on
/// stock KVM, which the profiles leave out of the simulation), an interface whose coalescing is
/// unknown, and deferral files on a layer the profile gives none.
pub fn profile_differences(profile: crate::HostProfile, detected: &[Detected]) -> Vec<String> {
    let mut v = Vec::new();
    for d in detected {
        let kind = d.layer.kind();
        let m = profile.mechanisms(kind);
        let (layer, ifname, p) = (d.layer, &d.ifname, profile.name());
        match d.coalescing {
            Some(false) if m.coalescing => v.push(format!(
                "{layer} ({ifname}): profile `{p}` gives this layer ethtool coalescing, but its driver does not \
                 support it (EOPNOTSUPP)"
            )),
            Some(true) if !m.coalescing && kind == crate::LayerKind::Frontend => v.push(format!(
                "{layer} ({ifname}): its driver accepts ethtool coalescing, which profile `{p}` says this layer \
                 lacks (a virtio device with VIRTIO_NET_F_NOTF_COAL is `kvm-notf-coal`)"
            )),
            _ => {}
        }
        if kind == crate::LayerKind::Frontend
            && let Some(drv) = d.driver.as_deref()
        {
            let vf = VF_DRIVERS.contains(&drv);
            if profile == crate::HostProfile::SriovVf && matches!(drv, "virtio_net" | "xen-netfront" | "vif")
            {
                v.push(format!(
                    "{layer} ({ifname}): its driver is {drv}, a paravirtual device, not the virtual function profile \
                     `{p}` says this guest drives (virtio with NOTF_COAL is `kvm-notf-coal`, without it \
                     `kvm-vhost`; netfront is `xen`)"
                ));
            } else if profile != crate::HostProfile::SriovVf && vf {
                v.push(format!(
                    "{layer} ({ifname}): its driver is {drv}, an SR-IOV virtual function's, whose packets bypass \
                     the host's driver and backend: profile `sriov-vf`, not `{p}`"
                ));
            }
        }
        if m.deferral && !d.deferral {
            v.push(format!(
                "{layer} ({ifname}): profile `{p}` gives this layer NAPI deferral, but \
                 /sys/class/net/{ifname}/napi_defer_hard_irqs or gro_flush_timeout is absent (Linux 5.10+)"
            ));
        }
    }
    v
}

/// An interface's settings before anything was changed, to restore at exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Original {
    pub layer: LayerId,
    pub ifname: String,
    /// The index of the interface these settings were read from. A restore puts them back only
    /// onto that interface: a re-created one (same name, new index) has its own originals.
    /// `None`: not known (restored by name).
    pub ifindex: Option<u64>,
    /// The coalescing knobs; empty where they are not controlled (a driver without coalescing
    /// whose NAPI deferral is set).
    pub params: CoalesceParams,
    /// The NAPI deferral, where a policy sets it; `None`: not touched.
    pub napi: Option<NapiParams>,
    /// Each NAPI instance's own deferral, where the kernel reports instances (netdev netlink,
    /// 6.13+) and a policy sets the deferral; restored after the device value.
    pub napi_instances: Vec<InstanceNapi>,
}

/// Why an original could not be put back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreFailure {
    /// The interface no longer exists.
    Gone,
    /// An interface of that name exists, but it is another one (re-created: a new index); its
    /// settings are its own and are left alone.
    Recreated { was: u64, now: u64 },
    /// Reading or setting the knobs failed.
    Failed(String),
}

impl RestoreFailure {
    /// Whether the original can never be applied (the interface it belongs to is gone for good),
    /// so keeping it for a later restore is pointless.
    pub fn is_permanent(&self) -> bool {
        matches!(self, RestoreFailure::Gone | RestoreFailure::Recreated { .. })
    }
}

impl std::fmt::Display for RestoreFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RestoreFailure::Gone => f.write_str("the interface is gone (ENODEV); nothing to restore onto"),
            RestoreFailure::Recreated { was, now } => write!(
                f,
                "the interface was re-created (ifindex {was} is now {now}); the new one keeps its own settings"
            ),
            RestoreFailure::Failed(m) => f.write_str(m),
        }
    }
}

/// Puts `o` back through `coalescer` and [`NetlinkNapi`] (the per-device NAPI sysfs files under
/// `sysfs_root`, and netdev netlink's instances where that is `/sys`; see
/// [`restore_original_with`]).
pub fn restore_original(
    coalescer: &mut dyn Coalescer,
    sysfs_root: &std::path::Path,
    o: &Original,
) -> Result<(), RestoreFailure> {
    let mut napi = NetlinkNapi::new(sysfs_root);
    restore_original_with(coalescer, &mut napi, sysfs_root, o)
}

/// Whether `ifname` under `sysfs_root` is still the interface with index `ifindex` (where known).
fn same_interface(
    sysfs_root: &std::path::Path,
    ifname: &str,
    ifindex: Option<u64>,
) -> Result<(), RestoreFailure> {
    let now = counters::read_ifindex(sysfs_root, ifname);
    match (ifindex, now) {
        (_, None) if !counters::interface_exists(sysfs_root, ifname) => Err(RestoreFailure::Gone),
        (Some(was), Some(now)) if was != now => Err(RestoreFailure::Recreated { was, now }),
        _ => Ok(()),
    }
}

/// Puts `o` back through `coalescer` and `napi`, onto the same interface only: the interface's
/// index under `sysfs_root` must still be `o.ifindex` (where known). Knob values go first and
/// adaptive modes after, since some drivers refuse knob values while adaptive moderation is on;
/// then the NAPI deferral, which is read back: a value the kernel did not take is a failure.
pub fn restore_original_with(
    coalescer: &mut dyn Coalescer,
    napi: &mut dyn NapiControl,
    sysfs_root: &std::path::Path,
    o: &Original,
) -> Result<(), RestoreFailure> {
    same_interface(sysfs_root, &o.ifname, o.ifindex)?;
    // Both parts are tried: one that fails does not keep the other from being put back.
    let knobs = if o.params.is_empty() { Ok(()) } else { restore_coalescing(coalescer, o) };
    if knobs == Err(RestoreFailure::Gone) {
        return knobs;
    }
    let deferral = match &o.napi {
        Some(want) => restore_napi(napi, &o.ifname, want)
            .and_then(|()| restore_instances(napi, &o.ifname, &o.napi_instances)),
        None => Ok(()),
    };
    match (knobs, deferral) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(e), Ok(())) | (Ok(()), Err(e)) => Err(e),
        (Err(a), Err(b)) => Err(RestoreFailure::Failed(format!("{a}; {b}"))),
    }
}

fn restore_napi(napi: &mut dyn NapiControl, ifname: &str, want: &NapiParams) -> Result<(), RestoreFailure> {
    let fail = |what: &str, e: NapiError| match e {
        NapiError::NoDevice { .. } => RestoreFailure::Gone,
        e => RestoreFailure::Failed(format!("{what} NAPI deferral: {e}")),
    };
    let current = napi.get(ifname).map_err(|e| fail("reading the", e))?;
    if current == *want {
        return Ok(());
    }
    napi.set(ifname, want).map_err(|e| fail(&format!("setting `{want}` as the"), e))?;
    match napi.get(ifname) {
        Ok(got) if got == *want => Ok(()),
        Ok(got) => Err(RestoreFailure::Failed(format!(
            "NAPI deferral: the kernel applied `{got}` when `{want}` was written"
        ))),
        Err(e) => Err(fail("reading back the", e)),
    }
}

/// Puts each NAPI instance's own original back (after the device value, which reached them all),
/// read back. An instance that no longer exists is skipped: its device was reconfigured, and
/// the instances it has now took the device value.
fn restore_instances(
    napi: &mut dyn NapiControl,
    ifname: &str,
    want: &[InstanceNapi],
) -> Result<(), RestoreFailure> {
    if want.is_empty() {
        return Ok(());
    }
    let fail = |what: &str, e: NapiError| match e {
        NapiError::NoDevice { .. } => RestoreFailure::Gone,
        e => RestoreFailure::Failed(format!("{what}: {e}")),
    };
    let now = napi.instances(ifname).map_err(|e| fail("listing the NAPI instances", e))?;
    for w in want {
        let Some(i) = now.iter().find(|i| i.id == w.id) else { continue };
        if i.napi != w.napi {
            napi.set_instance(ifname, w.id, &w.napi)
                .map_err(|e| fail(&format!("setting `{}` on NAPI instance {}", w.napi, w.id), e))?;
        }
        if let Some(t) = w.irq_suspend_timeout_ns
            && i.irq_suspend_timeout_ns != Some(t)
        {
            napi.set_irq_suspend(ifname, w.id, t).map_err(|e| {
                fail(&format!("setting irq-suspend-timeout {t} on NAPI instance {}", w.id), e)
            })?;
        }
    }
    let after = napi.instances(ifname).map_err(|e| fail("reading back the NAPI instances", e))?;
    for w in want {
        let Some(i) = after.iter().find(|i| i.id == w.id) else { continue };
        if i.napi != w.napi {
            return Err(RestoreFailure::Failed(format!(
                "NAPI instance {}: the kernel applied `{}` when `{}` was written",
                w.id, i.napi, w.napi
            )));
        }
        if w.irq_suspend_timeout_ns.is_some() && i.irq_suspend_timeout_ns != w.irq_suspend_timeout_ns {
            return Err(RestoreFailure::Failed(format!(
                "NAPI instance {}: irq-suspend-timeout is {:?} ns after {:?} was written",
                w.id, i.irq_suspend_timeout_ns, w.irq_suspend_timeout_ns
            )));
        }
    }
    Ok(())
}

fn restore_coalescing(coalescer: &mut dyn Coalescer, o: &Original) -> Result<(), RestoreFailure> {
    let current = match coalescer.get(&o.ifname) {
        Ok(p) => p,
        Err(CoalesceError::NoDevice { .. }) => return Err(RestoreFailure::Gone),
        Err(e) => return Err(RestoreFailure::Failed(format!("reading the knobs: {e}"))),
    };
    let change = o.params.changes_from(&current);
    let values = CoalesceParams { adaptive_rx: None, adaptive_tx: None, ..change };
    let modes = CoalesceParams {
        adaptive_rx: change.adaptive_rx,
        adaptive_tx: change.adaptive_tx,
        ..Default::default()
    };
    for part in [values, modes] {
        if part.is_empty() {
            continue;
        }
        match coalescer.set(&o.ifname, &part) {
            Ok(()) => {}
            Err(CoalesceError::NoDevice { .. }) => return Err(RestoreFailure::Gone),
            Err(e) => return Err(RestoreFailure::Failed(format!("setting `{part}`: {e}"))),
        }
    }
    Ok(())
}

impl Original {
    /// What is put back, for logs: the knobs (ethtool syntax), then the NAPI deferral.
    pub fn describe(&self) -> String {
        match (self.params.is_empty(), &self.napi) {
            (_, None) => self.params.to_string(),
            (true, Some(n)) => n.to_string(),
            (false, Some(n)) => format!("{}; {n}", self.params),
        }
    }

    /// The original knobs as layer settings in the project's direction (a backend swaps rx and
    /// tx). A direction with adaptive moderation on reads as [`Adaptive::Dim`]: the driver's own
    /// algorithm, whatever it is. A knob the driver lacks reads as 0.
    pub fn settings(&self) -> LayerSettings {
        let p = &self.params;
        let dir = |adaptive: Option<bool>, usecs: Option<u32>, frames: Option<u32>| {
            if adaptive == Some(true) {
                Moderation::Adaptive(Adaptive::Dim)
            } else {
                Moderation::Fixed(Knobs::new(usecs.unwrap_or(0), frames.unwrap_or(0)))
            }
        };
        swap_if_backend(
            self.layer,
            LayerSettings {
                rx: dir(p.adaptive_rx, p.rx_usecs, p.rx_frames),
                tx: dir(p.adaptive_tx, p.tx_usecs, p.tx_frames),
                napi: self.napi.unwrap_or(NapiParams::OFF),
            },
        )
    }
}

/// One interface's part of a [`LiveSample`], in the interface's own orientation (a backend's rx is
/// what the host received from the guest, before the swap that [`Observation`] applies).
#[derive(Debug, Clone, PartialEq)]
pub struct InterfaceReport {
    pub layer: LayerId,
    pub ifname: String,
    pub present: bool,
    pub control: Control,
    /// Interrupt lines counted, `id:kind`, and how they were found.
    pub irq_lines: Vec<String>,
    pub irq_found_by: &'static str,
    pub rates: InterfaceObs,
    pub params: Option<CoalesceParams>,
}

/// One interval's readings: the observation plus what operators want to see.
#[derive(Debug, Clone)]
pub struct LiveSample {
    pub obs: Observation,
    pub info: Info,
    /// Whether every configured source was read and every rate had a baseline. An incomplete
    /// sample holds zeros where readings are missing; `info.warnings` says which.
    pub complete: bool,
    pub interfaces: Vec<InterfaceReport>,
    /// Shares of each online CPU over the interval.
    pub per_cpu: Vec<(u32, CpuObs)>,
    /// The latency probe's round-trip times of this interval, microseconds (for histograms).
    pub probe_rtts_us: Vec<f64>,
}

#[derive(Debug)]
struct Layer {
    id: LayerId,
    cfg: InterfaceConfig,
    control: Control,
    /// Observe-only for good (no permission), not re-probed when the interface comes back.
    sticky: bool,
    params: Option<CoalesceParams>,
    present: bool,
    /// Counters at the previous sample; `None` when there is no baseline.
    prev: Option<IfCounters>,
    /// Per-CPU counts of this interface's interrupt lines at the previous sample.
    prev_irq: BTreeMap<String, Vec<u64>>,
    irqs: IrqSet,
    /// Warnings given once per layer (a parameter the driver lacks).
    said: BTreeSet<String>,
    /// The interface's index at the last sample.
    ifindex: Option<u64>,
    /// Its driver answered EOPNOTSUPP to reading or setting coalescing.
    no_coalescing: bool,
}

impl Layer {
    fn status(&self) -> LayerStatus {
        LayerStatus {
            layer: self.id,
            ifname: self.cfg.name.clone(),
            present: self.present,
            control: self.control.clone(),
            params: self.params,
            ifindex: self.ifindex,
        }
    }
}

/// One side of a live host as an [`Env`]. See the [module docs](super).
#[derive(Debug)]
pub struct HostEnv {
    config: LiveConfig,
    spec: EnvSpec,
    coalescer: Box<dyn Coalescer>,
    napi: Box<dyn NapiControl>,
    layers: Vec<Layer>,
    probe: Option<UdpProbe>,
    apply_enabled: bool,
    started_at: Option<Instant>,
    last_sample_at: Option<Instant>,
    prev_cpu: Option<CpuSnapshot>,
    applied: Option<CoalescingSettings>,
    /// The NAPI deferral each layer's interface reported after the last `apply_napi`: what the
    /// observation shows as in force (`None` where it was never read).
    napi_in_force: std::collections::BTreeMap<LayerId, NapiParams>,
    /// Warnings from `apply`, reported with the next sample.
    pending: Vec<String>,
}

fn knobs_of(usecs: Option<u32>, frames: Option<u32>) -> Option<Knobs> {
    // A driver without a frames trigger runs on the timer alone: `frames = 0`.
    (usecs.is_some() || frames.is_some()).then(|| Knobs::new(usecs.unwrap_or(0), frames.unwrap_or(0)))
}

fn rate(d: u64, secs: f64) -> f64 {
    if secs > 0.0 { d as f64 / secs } else { 0.0 }
}

impl HostEnv {
    /// A live host that sets knobs through ethtool netlink.
    pub fn open(config: LiveConfig) -> Result<Self, LiveError> {
        let coalescer = NetlinkCoalescer::new()?;
        Self::new(config, Box::new(coalescer))
    }

    /// A live host that sets knobs through `coalescer` (a fake in tests).
    pub fn new(config: LiveConfig, coalescer: Box<dyn Coalescer>) -> Result<Self, LiveError> {
        config.validate()?;
        let vms = config.vms();
        let spec = EnvSpec {
            vms,
            action_space: config.action_space.clone(),
            interval_ns: config.interval.as_nanos() as u64,
            max_steps: None,
            host_probe: config.role == Role::Host && config.probe.is_some(),
            guest_probe: config.role == Role::Guest && config.probe.is_some(),
            slo_p99_us: None,
            vm_slo_p99_us: (0..vms).map(|v| config.objective(v)).collect(),
            profile: config.profile,
        };
        let layers = config
            .interfaces()
            .map(|(id, cfg)| Layer {
                id,
                cfg: cfg.clone(),
                control: Control::Unknown,
                sticky: false,
                params: None,
                present: false,
                prev: None,
                prev_irq: BTreeMap::new(),
                irqs: IrqSet::default(),
                said: BTreeSet::new(),
                no_coalescing: false,
                ifindex: None,
            })
            .collect();
        let probe = config.probe.map(UdpProbe::start).transpose()?;
        let napi = Box::new(NetlinkNapi::new(config.sysfs_root.clone()));
        Ok(HostEnv {
            config,
            spec,
            coalescer,
            napi,
            layers,
            probe,
            apply_enabled: true,
            started_at: None,
            last_sample_at: None,
            prev_cpu: None,
            applied: None,
            napi_in_force: Default::default(),
            pending: Vec::new(),
        })
    }

    /// The same host with NAPI deferral read and set through `napi` (a fake in tests) instead of
    /// the sysfs files under the config's `sysfs_root`.
    pub fn with_napi(mut self, napi: Box<dyn NapiControl>) -> Self {
        self.napi = napi;
        self
    }

    pub fn config(&self) -> &LiveConfig {
        &self.config
    }

    /// With `false`, [`apply`](Self::apply) decides nothing on the host: a dry run.
    pub fn set_apply(&mut self, enabled: bool) {
        self.apply_enabled = enabled;
    }

    pub fn applies(&self) -> bool {
        self.apply_enabled
    }

    pub fn layers(&self) -> Vec<LayerStatus> {
        self.layers.iter().map(Layer::status).collect()
    }

    /// Takes the baseline readings that the first interval's rates are measured from, and probes
    /// every interface's knobs. Returns warnings (missing interfaces, observe-only layers).
    pub fn start(&mut self) -> Vec<String> {
        self.started_at = Some(Instant::now());
        self.last_sample_at = None;
        self.applied = None;
        for l in &mut self.layers {
            l.prev = None;
            l.prev_irq.clear();
        }
        self.prev_cpu = None;
        if let Some(p) = &self.probe {
            p.take();
        }
        let s = self.sample();
        s.info.warnings
    }

    /// The settings of every layer whose knobs can be read, to restore at exit. Layers that
    /// cannot be read are left out (they will not be set either).
    pub fn originals(&mut self) -> (Vec<Original>, Vec<String>) {
        let mut warnings = Vec::new();
        let mut out = Vec::new();
        for i in 0..self.layers.len() {
            if !self.layers[i].present || self.layers[i].control.is_observe_only() {
                continue;
            }
            // The index first: should the interface be re-created between the two reads, the
            // knobs belong to the newer one and a restore onto it is refused rather than wrong.
            let ifindex = counters::read_ifindex(&self.config.sysfs_root, &self.layers[i].cfg.name);
            if let Some(p) = self.read_knobs(i, &mut warnings) {
                let l = &self.layers[i];
                out.push(Original {
                    layer: l.id,
                    ifname: l.cfg.name.clone(),
                    ifindex,
                    params: p,
                    napi: None,
                    napi_instances: Vec::new(),
                });
            }
        }
        (out, warnings)
    }

    /// Adds the NAPI deferral of every present interface to `originals` (into the interface's
    /// entry, or a new one with no knobs where its coalescing is not controlled), for a policy
    /// that sets it. An interface whose deferral cannot be read is left out, with a warning; it
    /// will not be set either.
    pub fn add_napi_originals(&mut self, originals: &mut Vec<Original>) -> Vec<String> {
        let mut warnings = Vec::new();
        for l in &self.layers {
            if !l.present {
                continue;
            }
            let ifindex = counters::read_ifindex(&self.config.sysfs_root, &l.cfg.name);
            match self.napi.get_device(&l.cfg.name) {
                Ok(n) => {
                    let instances = match self.napi.instances(&l.cfg.name) {
                        Ok(v) => v,
                        Err(e) => {
                            warnings.push(format!(
                                "{e}; the NAPI instances of {} ({}) get the device value back at exit, not their own",
                                l.cfg.name, l.id
                            ));
                            Vec::new()
                        }
                    };
                    let fresh = || Original {
                        layer: l.id,
                        ifname: l.cfg.name.clone(),
                        ifindex,
                        params: CoalesceParams::default(),
                        napi: Some(n),
                        napi_instances: instances.clone(),
                    };
                    match originals.iter_mut().find(|o| o.ifname == l.cfg.name) {
                        Some(o) if o.ifindex == ifindex || o.ifindex.is_none() => {
                            o.napi = Some(n);
                            o.napi_instances = instances.clone();
                        }
                        // Re-created between the two reads: these values belong to the newer one.
                        Some(o) => *o = fresh(),
                        None => originals.push(fresh()),
                    }
                }
                Err(e) => warnings
                    .push(format!("{e}; the NAPI deferral of {} ({}) is left as is", l.cfg.name, l.id)),
            }
        }
        warnings
    }

    /// Sets `target` as the NAPI deferral of `o`'s interface (only the interface `o` was read
    /// from: same name and ifindex) where it differs from what is in force, and returns what the
    /// kernel reports afterwards: the value the policy's setting became. In a dry run nothing is
    /// set and the value in force is returned.
    pub fn apply_napi(&mut self, o: &Original, target: &NapiParams) -> Result<NapiParams, String> {
        target.check().map_err(|e| format!("{}: {e}", o.ifname))?;
        same_interface(&self.config.sysfs_root, &o.ifname, o.ifindex)
            .map_err(|e| format!("{} ({}): NAPI deferral not set: {e}", o.ifname, o.layer))?;
        let current = self.napi.get(&o.ifname).map_err(|e| e.to_string())?;
        let now = if !self.apply_enabled || current == *target {
            current
        } else {
            self.napi.set(&o.ifname, target).map_err(|e| e.to_string())?;
            self.napi.get(&o.ifname).map_err(|e| format!("reading back: {e}"))?
        };
        // The read-back, not the wish, is what the next observation reports.
        self.napi_in_force.insert(o.layer, now);
        Ok(now)
    }

    /// Sets the IRQ-suspension timeout of every NAPI instance journalled in `o` (only on the
    /// interface `o` was read from) where it differs: `wanted` (ns), or with `None` each
    /// instance's journalled original. Returns each instance's timeout as the kernel reports it
    /// afterwards. In a dry run nothing is set.
    pub fn apply_irq_suspend(
        &mut self,
        o: &Original,
        wanted: Option<u64>,
    ) -> Result<Vec<(u32, u64)>, String> {
        same_interface(&self.config.sysfs_root, &o.ifname, o.ifindex)
            .map_err(|e| format!("{} ({}): IRQ suspension not set: {e}", o.ifname, o.layer))?;
        let now = self.napi.instances(&o.ifname).map_err(|e| e.to_string())?;
        if self.apply_enabled {
            for i in &now {
                let Some(j) = o.napi_instances.iter().find(|j| j.id == i.id) else { continue };
                let target = wanted.unwrap_or(j.irq_suspend_timeout_ns.unwrap_or(0));
                if i.irq_suspend_timeout_ns != Some(target) {
                    self.napi.set_irq_suspend(&o.ifname, i.id, target).map_err(|e| e.to_string())?;
                }
            }
        }
        let after = self.napi.instances(&o.ifname).map_err(|e| format!("reading back: {e}"))?;
        Ok(after
            .iter()
            .filter(|i| o.napi_instances.iter().any(|j| j.id == i.id))
            .map(|i| (i.id, i.irq_suspend_timeout_ns.unwrap_or(0)))
            .collect())
    }

    /// The NAPI instances (ids) of `ifname` from netdev netlink, for operators. `Err` where the
    /// kernel cannot say (no netdev family), or this host reads a sysfs tree other than `/sys`
    /// (tests), whose interfaces the kernel does not know.
    pub fn napi_instances(&self, ifname: &str) -> Result<Vec<u32>, String> {
        if self.config.sysfs_root != std::path::Path::new("/sys") {
            return Err(format!("sysfs is read from {}, not /sys", self.config.sysfs_root.display()));
        }
        let ifindex = counters::read_ifindex(&self.config.sysfs_root, ifname)
            .ok_or_else(|| format!("{ifname}: no such interface"))?;
        super::napi::napi_instances(
            u32::try_from(ifindex).map_err(|_| format!("{ifname}: ifindex {ifindex}"))?,
        )
    }

    /// What each interface offers, as far as this host can tell: ethtool coalescing (`Some(true)`
    /// when its knobs were read, `Some(false)` when its driver answered EOPNOTSUPP, `None` when
    /// unknown: absent, or no permission) and NAPI deferral (the per-device sysfs files exist).
    /// Call after [`start`](Env::start) has probed the knobs.
    pub fn detect_mechanisms(&self) -> Vec<Detected> {
        self.layers
            .iter()
            .map(|l| {
                let dir = counters::interface_dir(&self.config.sysfs_root, &l.cfg.name);
                Detected {
                    layer: l.id,
                    ifname: l.cfg.name.clone(),
                    coalescing: if l.no_coalescing {
                        Some(false)
                    } else if l.control == Control::Controlled {
                        Some(true)
                    } else {
                        None
                    },
                    deferral: ["napi_defer_hard_irqs", "gro_flush_timeout"]
                        .iter()
                        .all(|f| dir.join(f).exists()),
                    driver: std::fs::read_link(dir.join("device/driver"))
                        .ok()
                        .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned())),
                }
            })
            .collect()
    }

    /// Reads one layer's knobs, updating its control state.
    fn read_knobs(&mut self, i: usize, warnings: &mut Vec<String>) -> Option<CoalesceParams> {
        let name = self.layers[i].cfg.name.clone();
        match self.coalescer.get(&name) {
            Ok(p) => {
                let l = &mut self.layers[i];
                l.params = Some(p);
                if l.control == Control::Unknown {
                    l.control = Control::Controlled;
                }
                Some(p)
            }
            Err(e) => {
                self.layers[i].params = None;
                self.on_error(i, e, warnings);
                None
            }
        }
    }

    /// A coalescing error as the layer's new state and a warning.
    fn on_error(&mut self, i: usize, e: CoalesceError, warnings: &mut Vec<String>) {
        let l = &mut self.layers[i];
        let (name, id) = (l.cfg.name.clone(), l.id);
        match e {
            CoalesceError::Unsupported { .. } => {
                l.no_coalescing = true;
                let msg =
                    format!("{name}: this driver does not support coalescing; layer {id} stays observe-only");
                l.control = Control::ObserveOnly(msg.clone());
                tracing::warn!(layer = %id, interface = %name, "{msg}");
                warnings.push(msg);
            }
            CoalesceError::PermissionDenied { .. } => {
                let msg = format!(
                    "{name}: changing coalescing needs CAP_NET_ADMIN (EPERM); layer {id} stays observe-only: \
                     run as root or grant the capability (see dist/moderato-deploy.service)"
                );
                l.control = Control::ObserveOnly(msg.clone());
                l.sticky = true;
                tracing::warn!(layer = %id, interface = %name, "{msg}");
                warnings.push(msg);
            }
            CoalesceError::NoDevice { .. } => {
                l.params = None;
                warnings.push(format!(
                    "{name} ({id}): no such device (ENODEV); knobs untouched until it is back"
                ));
            }
            other => {
                // The value may be fine next step; re-read before the next set.
                l.params = None;
                warnings.push(format!("{other} (layer {id})"));
            }
        }
    }

    /// Applies this side's part of `action` (the NIC and backends on the host, the frontend in a
    /// guest). Nothing is set in a dry run. Problems become warnings of the next sample; a driver
    /// without coalescing turns its layer observe-only.
    pub fn apply(&mut self, action: &CoalescingSettings) -> Result<(), EnvError> {
        if action.vms.len() != self.spec.vms {
            return Err(EnvError::Action(format!(
                "settings for {} VMs, but this {} has {}",
                action.vms.len(),
                self.config.role,
                self.spec.vms
            )));
        }
        if !self.apply_enabled {
            return Ok(());
        }
        self.applied = Some(action.clone());
        let mut warnings = Vec::new();
        for i in 0..self.layers.len() {
            let l = &self.layers[i];
            if !l.present || l.control.is_observe_only() {
                continue;
            }
            let current = match l.params {
                Some(p) => p,
                None => match self.read_knobs(i, &mut warnings) {
                    Some(p) => p,
                    None => continue,
                },
            };
            let id = self.layers[i].id;
            let desired = swap_if_backend(id, *action.layer(id));
            let want = self.wanted(i, &desired, &current, &mut warnings);
            let change = want.changes_from(&current);
            if change.is_empty() {
                continue;
            }
            let name = self.layers[i].cfg.name.clone();
            match self.coalescer.set(&name, &change) {
                Ok(()) => self.layers[i].params = Some(current.updated(&change)),
                Err(e) => self.on_error(i, e, &mut warnings),
            }
        }
        self.pending.extend(warnings);
        Ok(())
    }

    /// The parameters that express `desired` on a driver that supports what `current` shows.
    fn wanted(
        &mut self,
        i: usize,
        desired: &LayerSettings,
        current: &CoalesceParams,
        warnings: &mut Vec<String>,
    ) -> CoalesceParams {
        let l = &mut self.layers[i];
        let mut once = |key: String, msg: String| {
            if l.said.insert(key) {
                warnings.push(msg);
            }
        };
        // Messages use ethtool's names, which are the interface's directions; on a backend they
        // are the VM's the other way round.
        let name = match l.id {
            LayerId::Backend(_) => format!("{} (backend: ethtool rx is the VM's tx)", l.cfg.name),
            _ => l.cfg.name.clone(),
        };
        let mut want = CoalesceParams::default();
        for dir in Direction::BOTH {
            let (usecs, frames, adaptive) = match dir {
                Direction::Rx => (current.rx_usecs, current.rx_frames, current.adaptive_rx),
                Direction::Tx => (current.tx_usecs, current.tx_frames, current.adaptive_tx),
            };
            let d = dir.name();
            let (mut w_us, mut w_fr, mut w_ad) = (None, None, None);
            match desired.get(dir) {
                Moderation::Fixed(k) => {
                    w_us = usecs.map(|_| k.usecs);
                    w_fr = frames.map(|_| k.frames);
                    w_ad = adaptive.map(|_| false);
                    if usecs.is_none() && frames.is_none() {
                        once(
                            format!("{d}-knobs"),
                            format!("{name}: the driver has no {d}-usecs or {d}-frames; {d} is left as is"),
                        );
                    } else if frames.is_none() {
                        once(
                            format!("{d}-frames"),
                            format!("{name}: the driver has no {d}-frames; only {d}-usecs is set"),
                        );
                    } else if usecs.is_none() {
                        once(
                            format!("{d}-usecs"),
                            format!("{name}: the driver has no {d}-usecs; only {d}-frames is set"),
                        );
                    }
                }
                Moderation::Adaptive(mode) => {
                    if adaptive.is_some() {
                        w_ad = Some(true);
                        once(
                            format!("{d}-adaptive-{}", mode.name()),
                            format!(
                                "{name}: adaptive-{d} on runs the driver's own algorithm, not necessarily {}",
                                mode.name()
                            ),
                        );
                    } else {
                        once(
                            format!("{d}-adaptive"),
                            format!("{name}: the driver has no adaptive-{d}; {d} knobs are left as is"),
                        );
                    }
                }
            }
            match dir {
                Direction::Rx => (want.rx_usecs, want.rx_frames, want.adaptive_rx) = (w_us, w_fr, w_ad),
                Direction::Tx => (want.tx_usecs, want.tx_frames, want.adaptive_tx) = (w_us, w_fr, w_ad),
            }
        }
        want
    }

    /// Sets every layer back to `originals` (read with [`originals`](Self::originals)). Knob
    /// values go first and adaptive modes after, since some drivers refuse knob values while
    /// adaptive moderation is on. Applies even in a dry run; returns warnings.
    pub fn restore(&mut self, originals: &[Original]) -> Vec<String> {
        originals
            .iter()
            .filter_map(|o| {
                self.restore_one(o)
                    .err()
                    .map(|e| format!("restoring {} ({}) to `{}`: {e}", o.ifname, o.layer, o.describe()))
            })
            .collect()
    }

    /// Puts one original back, onto the interface it was read from only (see
    /// [`restore_original`]). Applies even in a dry run.
    pub fn restore_one(&mut self, o: &Original) -> Result<(), RestoreFailure> {
        let r =
            restore_original_with(self.coalescer.as_mut(), self.napi.as_mut(), &self.config.sysfs_root, o);
        if let Some(l) = self.layers.iter_mut().find(|l| l.cfg.name == o.ifname) {
            l.params = None;
        }
        r
    }

    /// Feature names this side cannot provide, each with the reason. A policy that reads one of
    /// them should be refused rather than fed zeros. Call after [`start`](Self::start).
    pub fn unavailable_features(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let find = |id: LayerId| self.layers.iter().find(|l| l.id == id);
        let no_probe = "no latency probe is configured (set the latency source to udp-echo)".to_string();
        let knob_reason = |l: &Layer| -> Option<String> {
            match (&l.control, l.params) {
                (_, Some(_)) => None,
                (Control::ObserveOnly(r), None) => Some(format!("its knobs cannot be read: {r}")),
                _ => Some(format!("the knobs of {} cannot be read", l.cfg.name)),
            }
        };
        let mut push = |name: &str, reason: String| out.push((name.to_string(), reason));
        let is_knob = |n: &str| n.ends_with("_usecs") || n.ends_with("_frames");
        match self.config.role {
            Role::Host => {
                let nic = find(LayerId::Nic);
                for f in HOST_FEATURES {
                    let n = f.name;
                    if n.starts_with("host.probe_") && self.probe.is_none() {
                        push(n, no_probe.clone());
                    } else if let Some(rest) = n.strip_prefix("nic.") {
                        match nic {
                            None => push(n, "no NIC is configured on this host".into()),
                            Some(l) if rest == "irq_krate_ln" && l.irqs.is_empty() => push(
                                n,
                                format!(
                                    "no interrupt line of {} was found in /proc/interrupts (configure its irq names)",
                                    l.cfg.name
                                ),
                            ),
                            Some(l) if is_knob(rest) => {
                                if let Some(r) = knob_reason(l) {
                                    push(n, format!("{}: {r}", l.cfg.name));
                                }
                            }
                            Some(_) => {}
                        }
                    }
                }
                for f in BACKEND_FEATURES {
                    let n = f.name;
                    if self.spec.vms == 0 {
                        push(n, "no VM backend is configured on this host".into());
                        continue;
                    }
                    for v in 0..self.spec.vms {
                        match find(LayerId::Backend(v)) {
                            None => push(n, format!("vm{v} has no backend interface configured")),
                            Some(l) if is_knob(n) => {
                                if let Some(r) = knob_reason(l) {
                                    push(n, format!("{}: {r}", l.cfg.name));
                                }
                            }
                            Some(_) => {}
                        }
                    }
                }
                for f in GUEST_FEATURES {
                    push(
                        f.name,
                        "measured inside the guest: deploy a guest policy there with --role guest".into(),
                    );
                }
            }
            Role::Guest => {
                let fe = find(LayerId::Frontend(0));
                for f in GUEST_FEATURES {
                    let n = f.name;
                    if n.starts_with("guest.probe_") && self.probe.is_none() {
                        push(n, no_probe.clone());
                    } else if let Some(rest) = n.strip_prefix("frontend.") {
                        match fe {
                            None => push(n, "no frontend interface is configured in this guest".into()),
                            Some(l)
                                if rest == "rx_irq_krate_ln"
                                    && !l.irqs.has(&[IrqKind::Rx, IrqKind::Combined]) =>
                            {
                                push(
                                    n,
                                    format!(
                                        "no receive interrupt line of {} was found in /proc/interrupts",
                                        l.cfg.name
                                    ),
                                )
                            }
                            Some(l)
                                if rest == "tx_irq_krate_ln"
                                    && !l.irqs.has(&[IrqKind::Tx, IrqKind::Combined]) =>
                            {
                                push(
                                    n,
                                    format!(
                                        "no transmit interrupt line of {} was found in /proc/interrupts",
                                        l.cfg.name
                                    ),
                                )
                            }
                            Some(l) if is_knob(rest) => {
                                if let Some(r) = knob_reason(l) {
                                    push(n, format!("{}: {r}", l.cfg.name));
                                }
                            }
                            Some(_) => {}
                        }
                    }
                }
                for f in HOST_FEATURES.iter().chain(BACKEND_FEATURES) {
                    push(
                        f.name,
                        "measured on the hypervisor: deploy a host policy there with --role host".into(),
                    );
                }
            }
        }
        out
    }

    /// Reads every counter and knob and turns the change since the previous sample into rates.
    /// Never fails: what cannot be read is a warning and a zero, and the sample is incomplete.
    pub fn sample(&mut self) -> LiveSample {
        let now = Instant::now();
        let elapsed = self.last_sample_at.map(|t| now.duration_since(t));
        let secs = elapsed.map_or(0.0, |e| e.as_secs_f64());
        let mut warnings = std::mem::take(&mut self.pending);
        let mut complete = elapsed.is_some();
        let sysfs = self.config.sysfs_root.clone();
        let procfs = self.config.procfs_root.clone();

        // CPU.
        let (cpu_obs, per_cpu) = match cpu::read_stat(&procfs) {
            Ok(cur) => {
                let r = match &self.prev_cpu {
                    Some(prev) => (
                        cpu::shares(prev, &cur, self.config.cpus.as_deref()),
                        cpu::per_cpu_shares(prev, &cur),
                    ),
                    None => {
                        complete = false;
                        (CpuObs::default(), Vec::new())
                    }
                };
                self.prev_cpu = Some(cur);
                r
            }
            Err(e) => {
                warnings.push(format!("CPU: {e}"));
                complete = false;
                self.prev_cpu = None;
                (CpuObs::default(), Vec::new())
            }
        };

        // Interrupts: one read for every interface.
        let table = match interrupts::read_interrupts(&procfs) {
            Ok(t) => Some(t),
            Err(e) => {
                warnings.push(format!("interrupts: {e}"));
                complete = false;
                None
            }
        };

        let mut reports = Vec::with_capacity(self.layers.len());
        for i in 0..self.layers.len() {
            let (rates, ok) = self.sample_layer(i, &sysfs, table.as_ref(), secs, &mut warnings);
            complete &= ok;
            let l = &self.layers[i];
            reports.push(InterfaceReport {
                layer: l.id,
                ifname: l.cfg.name.clone(),
                present: l.present,
                control: l.control.clone(),
                irq_lines: l
                    .irqs
                    .lines
                    .iter()
                    .map(|(id, k)| format!("{id}:{}", format!("{k:?}").to_lowercase()))
                    .collect(),
                irq_found_by: l.irqs.found_by,
                rates,
                params: l.params,
            });
        }

        // Probe.
        let mut probe_rtts_us = Vec::new();
        let probe = self.probe.as_ref().and_then(|p| {
            let t = p.take();
            probe_rtts_us.clone_from(&t.rtts_us);
            if t.errors > 0 {
                warnings.push(format!(
                    "latency probe to {}: {} send/receive errors this interval (last: {}); is an echo responder running there?",
                    p.config().target,
                    t.errors,
                    t.last_error.as_deref().unwrap_or("?")
                ));
            } else if t.sent > 0 && t.rtts_us.is_empty() && elapsed.is_some() {
                warnings.push(format!("latency probe to {}: no reply this interval", p.config().target));
            }
            t.obs()
        });

        let iface = |id: LayerId| -> InterfaceObs {
            let mut o =
                reports.iter().find(|r| r.layer == id).map(|r| oriented(id, &r.rates)).unwrap_or_default();
            if !matches!(id, LayerId::Backend(_)) {
                o.napi = self.napi_in_force.get(&id).copied();
            }
            o
        };
        let vms = self.spec.vms;
        let obs = match self.config.role {
            Role::Host => Observation {
                interval_ns: elapsed.map_or(0, |e| e.as_nanos() as u64),
                host: HostObs {
                    nic: iface(LayerId::Nic),
                    backends: (0..vms).map(|v| iface(LayerId::Backend(v))).collect(),
                    cpu: cpu_obs,
                    probe,
                    slo_p99_us: self.spec.vm_slo_p99_us.clone(),
                    profile: self.config.profile,
                },
                guests: vec![GuestObs::default(); vms],
            },
            Role::Guest => Observation {
                interval_ns: elapsed.map_or(0, |e| e.as_nanos() as u64),
                host: HostObs { backends: vec![InterfaceObs::default()], ..Default::default() },
                guests: vec![GuestObs {
                    frontend: iface(LayerId::Frontend(0)),
                    cpu: cpu_obs,
                    probe,
                    slo_p99_us: self.spec.vm_slo_p99_us[0],
                    profile: self.config.profile,
                }],
            },
        };
        let started = *self.started_at.get_or_insert(now);
        self.last_sample_at = Some(now);
        let info = Info {
            time_ns: now.duration_since(started).as_nanos() as u64,
            applied: self.applied.clone(),
            truth: None,
            reward_terms: Default::default(),
            warnings,
        };
        LiveSample { obs, info, complete, interfaces: reports, per_cpu, probe_rtts_us }
    }

    /// One interface's rates (interface orientation) and whether they are complete.
    fn sample_layer(
        &mut self,
        i: usize,
        sysfs: &std::path::Path,
        table: Option<&InterruptTable>,
        secs: f64,
        warnings: &mut Vec<String>,
    ) -> (InterfaceObs, bool) {
        let mut ok = true;
        let (name, id) = (self.layers[i].cfg.name.clone(), self.layers[i].id);
        let counters = counters::read_if_counters(sysfs, &name);
        let exists = counters.is_ok() || counters::interface_exists(sysfs, &name);
        let mut rates = InterfaceObs::default();

        if !exists {
            let l = &mut self.layers[i];
            if l.present || l.prev.is_some() || l.control != Control::Unknown {
                warnings
                    .push(format!("{name} ({id}): interface vanished; its rates read 0 until it is back"));
            } else {
                warnings.push(format!("{name} ({id}): no such interface; its rates read 0 until it appears"));
            }
            l.present = false;
            l.prev = None;
            l.prev_irq.clear();
            l.params = None;
            l.ifindex = None;
            if !l.sticky {
                l.control = Control::Unknown;
            }
            return (rates, false);
        }
        if !self.layers[i].present && self.layers[i].prev.is_none() && self.last_sample_at.is_some() {
            warnings
                .push(format!("{name} ({id}): interface is present again; its rates start next interval"));
        }
        self.layers[i].present = true;

        // Packets, bytes, drops.
        match counters {
            Ok(c) => {
                let l = &mut self.layers[i];
                l.ifindex = c.ifindex;
                match l.prev {
                    Some(p) if secs > 0.0 => {
                        let recreated = p.ifindex.is_some() && c.ifindex.is_some() && p.ifindex != c.ifindex;
                        let d =
                            |a: u64, b: u64| if recreated { Delta::Reset(b) } else { counters::delta(a, b) };
                        let ds = [
                            d(p.rx_packets, c.rx_packets),
                            d(p.tx_packets, c.tx_packets),
                            d(p.rx_bytes, c.rx_bytes),
                            d(p.tx_bytes, c.tx_bytes),
                            d(p.drops(), c.drops()),
                        ];
                        if recreated {
                            warnings
                                .push(format!("{name} ({id}): interface was re-created; counting from zero"));
                        } else if ds.iter().any(|d| matches!(d, Delta::Reset(_))) {
                            warnings.push(format!(
                                "{name} ({id}): a counter went backwards (reset); counting from zero"
                            ));
                        }
                        rates.rx_pps = rate(ds[0].value(), secs);
                        rates.tx_pps = rate(ds[1].value(), secs);
                        rates.rx_bytes_per_s = rate(ds[2].value(), secs);
                        rates.tx_bytes_per_s = rate(ds[3].value(), secs);
                        rates.drops_per_s = rate(ds[4].value(), secs);
                    }
                    _ => ok = false,
                }
                l.prev = Some(c);
            }
            Err(e) => {
                warnings.push(format!("{name} ({id}): {e}"));
                self.layers[i].prev = None;
                ok = false;
            }
        }

        // Interrupts.
        match table {
            Some(t) => {
                let l = &mut self.layers[i];
                l.irqs = interrupts::find_irqs(t, sysfs, &name, &l.cfg.irq_names);
                let mut now_counts = BTreeMap::new();
                let (mut rx, mut tx) = (0u64, 0u64);
                let mut baseline = !l.prev_irq.is_empty() && secs > 0.0;
                for (line_id, kind) in &l.irqs.lines {
                    let Some(line) = t.line(line_id) else { continue };
                    match l.prev_irq.get(line_id) {
                        Some(prev) if prev.len() == line.per_cpu.len() => {
                            let d: u64 = prev
                                .iter()
                                .zip(&line.per_cpu)
                                .map(|(a, b)| counters::delta(*a, *b).value())
                                .sum();
                            match kind {
                                IrqKind::Tx => tx += d,
                                _ => rx += d,
                            }
                        }
                        Some(_) => {
                            warnings.push(format!("{name} ({id}): CPUs went on- or offline; interrupt rate resumes next interval"));
                            baseline = false;
                        }
                        None => baseline = false,
                    }
                    now_counts.insert(line_id.clone(), line.per_cpu.clone());
                }
                l.prev_irq = now_counts;
                if !l.irqs.is_empty() {
                    if baseline {
                        let has_rx = l.irqs.has(&[IrqKind::Rx, IrqKind::Combined]);
                        let has_tx = l.irqs.has(&[IrqKind::Tx]);
                        let combined = l.irqs.has(&[IrqKind::Combined]);
                        rates.rx_irq_per_s = has_rx.then(|| rate(rx, secs));
                        rates.tx_irq_per_s = if has_tx {
                            Some(rate(tx, secs))
                        } else if combined {
                            Some(0.0)
                        } else {
                            None
                        };
                    } else {
                        ok = false;
                    }
                }
            }
            None => self.layers[i].prev_irq.clear(),
        }

        // Knobs in force at the end of the interval.
        if !self.layers[i].control.is_observe_only() {
            let before = self.layers[i].control.clone();
            let read = self.read_knobs(i, warnings);
            if read.is_none() && before == Control::Controlled {
                ok = false;
            }
        }
        let l = &self.layers[i];
        if let Some(p) = l.params {
            rates.rx_knobs = knobs_of(p.rx_usecs, p.rx_frames);
            rates.tx_knobs = knobs_of(p.tx_usecs, p.tx_frames);
        }
        (rates, ok)
    }

    fn wait_for_interval(&self) {
        if let Some(t) = self.last_sample_at {
            let due = t + self.config.interval;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        } else {
            std::thread::sleep(self.config.interval);
        }
    }

    /// Time until the current interval ends (zero when it has).
    pub fn until_due(&self) -> Duration {
        self.last_sample_at
            .map(|t| (t + self.config.interval).saturating_duration_since(Instant::now()))
            .unwrap_or(self.config.interval)
    }
}

/// A backend's readings in the project's direction (rx: towards the guest, which is what the
/// host transmits on the backend interface): counters and knobs swap, interrupt lines do not.
fn oriented(id: LayerId, r: &InterfaceObs) -> InterfaceObs {
    match id {
        LayerId::Backend(_) => InterfaceObs {
            rx_pps: r.tx_pps,
            tx_pps: r.rx_pps,
            rx_bytes_per_s: r.tx_bytes_per_s,
            tx_bytes_per_s: r.rx_bytes_per_s,
            // Backend interrupt lines are already named from the guest's side (Xen netback's
            // `vifD.N-qM-tx` is the guest's transmit ring); taps have none.
            rx_irq_per_s: r.rx_irq_per_s,
            tx_irq_per_s: r.tx_irq_per_s,
            drops_per_s: r.drops_per_s,
            rx_knobs: r.tx_knobs,
            tx_knobs: r.rx_knobs,
            napi: None,
        },
        _ => *r,
    }
}

/// A layer's settings in the interface's own direction (see [`oriented`]).
fn swap_if_backend(id: LayerId, s: LayerSettings) -> LayerSettings {
    match id {
        LayerId::Backend(_) => LayerSettings { rx: s.tx, tx: s.rx, ..s },
        _ => s,
    }
}

impl Env for HostEnv {
    fn spec(&self) -> &EnvSpec {
        &self.spec
    }

    /// Takes baseline readings and waits one interval. A live host cannot be seeded: `seed` is
    /// ignored and no two episodes are alike.
    fn reset(&mut self, _seed: u64) -> Result<(Observation, Info), EnvError> {
        let mut warnings = self.start();
        self.wait_for_interval();
        let mut s = self.sample();
        warnings.append(&mut s.info.warnings);
        s.info.warnings = warnings;
        Ok((s.obs, s.info))
    }

    /// Applies this side's part of `action`, waits out the interval, and reports its rates. The
    /// reward is 0: a live host has no ground truth (`info.truth` is `None`).
    fn step(&mut self, action: &CoalescingSettings) -> Result<Step, EnvError> {
        let mut early = Vec::new();
        if self.last_sample_at.is_none() {
            early = self.start();
        }
        self.apply(action)?;
        self.wait_for_interval();
        let mut s = self.sample();
        early.append(&mut s.info.warnings);
        s.info.warnings = early;
        Ok(Step { obs: s.obs, reward: 0.0, terminated: false, truncated: false, info: s.info })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HostProfile;
    use crate::live::MemoryNapi;

    fn d(layer: LayerId, coalescing: Option<bool>, deferral: bool) -> Detected {
        Detected { layer, ifname: format!("if-{layer}"), coalescing, deferral, driver: None }
    }

    #[test]
    fn a_guests_driver_tells_a_virtual_function_from_a_paravirtual_device() {
        let with = |drv: &str| Detected {
            driver: Some(drv.into()),
            ..d(LayerId::Frontend(0), Some(drv != "virtio_net"), true)
        };
        assert!(profile_differences(HostProfile::SriovVf, &[with("iavf")]).is_empty());
        assert!(profile_differences(HostProfile::SriovVf, &[with("mlx5_core")]).is_empty());
        let e = profile_differences(HostProfile::SriovVf, &[with("virtio_net")]);
        // virtio without NOTF_COAL refuses coalescing (one sentence) and is not a VF (another).
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e[1].contains("virtio_net") && e[1].contains("kvm-vhost"), "{e:?}");
        let e = profile_differences(HostProfile::KvmNotfCoal, &[with("ixgbevf")]);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].contains("ixgbevf") && e[0].contains("`sriov-vf`"), "{e:?}");
        let e = [profile_differences(HostProfile::SriovVf, &[with("virtio_net")]), e].concat();
        assert!(e.iter().all(|m| !m.contains("  ")), "one sentence each, no runs of spaces: {e:?}");
        // The host's layers are not judged by driver: a PF's driver serves both.
        let nic = Detected { driver: Some("iavf".into()), ..d(LayerId::Nic, Some(true), true) };
        assert!(profile_differences(HostProfile::KvmVhost, &[nic]).is_empty());
    }

    #[test]
    fn what_the_interfaces_offer_is_held_against_the_profile() {
        // A stock KVM guest: virtio-net refuses coalescing and has the NAPI files.
        let guest = [d(LayerId::Frontend(0), Some(false), true)];
        assert!(profile_differences(HostProfile::KvmVhost, &guest).is_empty());
        let e = profile_differences(HostProfile::KvmNotfCoal, &guest);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].contains("kvm-notf-coal") && e[0].contains("EOPNOTSUPP") && e[0].contains("if-"),
            "{e:?}"
        );
        // A NOTF_COAL device configured as stock KVM: said, with the profile it looks like.
        let e = profile_differences(HostProfile::KvmVhost, &[d(LayerId::Frontend(0), Some(true), true)]);
        assert!(e.len() == 1 && e[0].contains("`kvm-notf-coal`"), "{e:?}");
        // The tap's rx-frames is no difference; unknown coalescing is none either; missing NAPI
        // files are, where the profile has deferral.
        let host = [
            d(LayerId::Nic, None, false),
            d(LayerId::Backend(0), Some(true), false),
            d(LayerId::Backend(1), Some(false), false),
        ];
        let e = profile_differences(HostProfile::KvmVhost, &host);
        assert!(e.len() == 1 && e[0].contains("napi_defer_hard_irqs") && e[0].contains("nic"), "{e:?}");
        let e = profile_differences(HostProfile::KvmNotfCoal, &host);
        assert_eq!(e.len(), 2, "{e:?}");
    }

    #[derive(Debug)]
    struct NoKnobs;
    impl Coalescer for NoKnobs {
        fn get(&mut self, ifname: &str) -> Result<CoalesceParams, CoalesceError> {
            Err(CoalesceError::Unsupported { ifname: ifname.into(), detail: None })
        }
        fn set(&mut self, _: &str, _: &CoalesceParams) -> Result<(), CoalesceError> {
            panic!("no knobs are journalled, none may be set")
        }
    }

    #[test]
    fn each_napi_instance_gets_its_own_original_back_after_the_device_value() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("class/net/eth9")).unwrap();
        std::fs::write(root.path().join("class/net/eth9/ifindex"), "7\n").unwrap();
        let (a, b) = (NapiParams::new(3, 30_000), NapiParams::OFF);
        // A device whose value is off, one of whose two instances was set alone (napi-set).
        let mut napi = MemoryNapi::default().with("eth9", b).with_instances("eth9", &[(300, a), (301, b)]);
        let o = Original {
            layer: LayerId::Frontend(0),
            ifname: "eth9".into(),
            ifindex: Some(7),
            params: CoalesceParams::default(),
            napi: Some(b),
            napi_instances: napi.instances("eth9").unwrap(),
        };
        // A policy's device-wide write reaches both instances.
        napi.set("eth9", &NapiParams::new(2, 20_000)).unwrap();
        assert!(napi.instances["eth9"].iter().all(|i| i.napi == NapiParams::new(2, 20_000)));
        restore_original_with(&mut NoKnobs, &mut napi, root.path(), &o).unwrap();
        assert_eq!(napi.values["eth9"], b, "the device value");
        let now: Vec<_> = napi.instances["eth9"].iter().map(|i| (i.id, i.napi)).collect();
        assert_eq!(now, vec![(300, a), (301, b)], "each instance its own");
        // An instance that is gone is skipped; a kernel that applies something else is a failure.
        let gone = Original {
            napi_instances: vec![InstanceNapi { id: 999, napi: a, irq_suspend_timeout_ns: None }],
            ..o.clone()
        };
        restore_original_with(&mut NoKnobs, &mut napi, root.path(), &gone).unwrap();
        #[derive(Debug)]
        struct Stubborn(MemoryNapi);
        impl NapiControl for Stubborn {
            fn get(&mut self, ifname: &str) -> Result<NapiParams, NapiError> {
                self.0.get(ifname)
            }
            fn set(&mut self, ifname: &str, p: &NapiParams) -> Result<(), NapiError> {
                self.0.set(ifname, p)
            }
            fn instances(&mut self, ifname: &str) -> Result<Vec<InstanceNapi>, NapiError> {
                self.0.instances(ifname)
            }
            fn set_instance(&mut self, _: &str, _: u32, _: &NapiParams) -> Result<(), NapiError> {
                Ok(())
            }
        }
        let mut stubborn = Stubborn(napi);
        stubborn.set("eth9", &NapiParams::new(2, 20_000)).unwrap();
        let e = restore_original_with(&mut NoKnobs, &mut stubborn, root.path(), &o).unwrap_err();
        assert!(e.to_string().contains("NAPI instance 300") && e.to_string().contains("30000"), "{e}");
    }
}
