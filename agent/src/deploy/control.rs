//! The deploy loop: observe → decide → limit → apply, once per control interval.
//!
//! [`DeployLoop::new`] takes the baseline readings, refuses a policy whose features this side
//! cannot provide, locks every configured interface in the state directory (one controller per
//! interface), restores a journal that a dead deploy left behind, reads the original settings of
//! every controlled interface and journals them before anything is set (see [`super::journal`]).
//! From then on the loop owns the duty to put them back: [`DeployLoop::run`] restores them on
//! every exit it controls (shutdown signal, `--steps` reached, an error), and `Drop` does it for
//! the rest (a panic, a caller that drops the loop); the journal covers what no code can catch
//! (SIGKILL). A dry run reads and decides but sets nothing, so it has nothing to restore, takes
//! no lock and writes no journal.
//!
//! An interface that appears after start, or comes back re-created (a new ifindex), has its own
//! settings read and journalled before the first set; a value is never restored onto another
//! interface. A restore that fails (the interface is gone, the driver refuses) is counted in
//! [`Summary::restore_failures`], which the binary turns into a non-zero exit.
//!
//! The SLO guard ([`SloTarget`]): when the latency probe's p99 exceeds the target for K
//! consecutive intervals, the decision is overridden with per-packet settings (the least
//! coalescing), which the safety limits then bound and step, until an interval's p99 is back
//! under the target.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use moderato_env::live::{Control, HostEnv, LiveSample, NapiParams, Original, Role};
use moderato_env::{
    BACKEND_FEATURES, CoalescingSettings, Env, GUEST_FEATURES, HOST_FEATURES, LayerId, LayerSettings,
    Moderation,
};
use moderato_policies::Policy;
use serde_json::{Value, json};
use tokio::sync::watch;

use super::journal::{self, Entry, InterfaceLock, Outcome, StateDir};
use super::limits::Limits;
use super::metrics::Metrics;

/// The run-time latency guard's target (the deploy config's `[slo]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SloTarget {
    /// Probe p99 target, microseconds.
    pub p99_us: f64,
    /// Consecutive intervals over the target before the guard overrides the policy (K).
    pub after_intervals: u32,
}

/// How the loop runs.
#[derive(Debug, Clone)]
pub struct LoopOptions {
    /// Decide and log, set nothing.
    pub dry_run: bool,
    /// Stop after this many decisions (`--steps`); `None`: until a shutdown signal.
    pub max_steps: Option<u64>,
    /// Consecutive incomplete observations after which the fallback policy decides.
    pub stale_after: u32,
    /// VM names for logs, in VM order (host role).
    pub vm_names: Vec<String>,
    /// Where the journal and the interface locks live; `None`: neither (tests of the loop alone).
    pub state_dir: Option<PathBuf>,
    /// The run-time latency guard; `None`: none.
    pub slo: Option<SloTarget>,
    /// Run a learned model on a host whose detected mechanisms differ from its profile
    /// (`--allow-profile-mismatch`); otherwise such a deploy is refused before anything is set.
    pub allow_profile_mismatch: bool,
}

impl Default for LoopOptions {
    fn default() -> Self {
        LoopOptions {
            dry_run: false,
            max_steps: None,
            stale_after: 3,
            vm_names: Vec::new(),
            state_dir: None,
            slo: None,
            allow_profile_mismatch: false,
        }
    }
}

/// Why the loop stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Shutdown,
    Steps,
}

/// What a run did.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub stop: StopReason,
    pub decisions: u64,
    /// Decisions made by the fallback policy.
    pub fallback_decisions: u64,
    /// Switches to the fallback policy.
    pub fallbacks: u64,
    /// The last decision after limits.
    pub last: Option<CoalescingSettings>,
    /// Interfaces whose settings were restored at exit.
    pub restored: usize,
    /// Interfaces whose settings could not be restored at exit, each with the reason.
    pub restore_failures: Vec<String>,
    /// Times the SLO guard took over from the policy.
    pub slo_overrides: u64,
    /// Decisions the SLO guard overrode.
    pub slo_override_decisions: u64,
}

/// The loop with the host it controls. See the [module docs](self).
pub struct DeployLoop {
    env: HostEnv,
    primary: Box<dyn Policy>,
    fallback: Box<dyn Policy>,
    limits: Limits,
    opts: LoopOptions,
    metrics: Arc<Metrics>,
    /// Originals to put back, one per interface; `None` once restored (or in a dry run).
    restore: Option<Vec<Original>>,
    /// The interfaces whose NAPI deferral a policy may set, with their originals (the deferral
    /// when no policy asks for one, or the SLO guard is on). Empty unless the deployed or the
    /// fallback policy sets NAPI deferral.
    napi: Vec<Original>,
    /// NAPI messages given once (a value the kernel applied differently, a failing interface).
    napi_said: BTreeSet<String>,
    /// The layers this side sets, with their interface names.
    layers: Vec<(LayerId, String)>,
    previous: BTreeMap<LayerId, LayerSettings>,
    /// The interfaces whose original settings are known, by name, with the ifindex they were
    /// read from (at start, or when the interface appeared or came back re-created).
    known: BTreeMap<String, Option<u64>>,
    /// The state directory and this process's interface locks (none in a dry run).
    state: Option<StateDir>,
    _locks: Vec<InterfaceLock>,
    bad_in_a_row: u32,
    in_fallback: bool,
    /// Whether the deployed policy reads a latency probe feature on this side: then an interval
    /// without probe replies counts as a stale observation (the fallback decides until the probe
    /// answers), since the policy would read zeros.
    primary_reads_probe: bool,
    /// Consecutive intervals with the probe's p99 over the SLO target.
    slo_over: u32,
    slo_active: bool,
    summary: Summary,
}

impl std::fmt::Debug for DeployLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeployLoop")
            .field("env", &self.env)
            .field("primary", &self.primary.name())
            .field("fallback", &self.fallback.name())
            .field("limits", &self.limits)
            .field("opts", &self.opts)
            .field("in_fallback", &self.in_fallback)
            .field("summary", &self.summary)
            .finish_non_exhaustive()
    }
}

/// Every feature name of the project, to tell a typo from an unavailable feature.
fn known_feature(name: &str) -> bool {
    HOST_FEATURES.iter().chain(BACKEND_FEATURES).chain(GUEST_FEATURES).any(|f| f.name == name)
}

/// Refuses `policy` if it reads a feature this side cannot provide. Only the features the policy
/// reads on this side count (`Requirements::host` on the hypervisor, `guest` inside a VM).
pub fn check_requirements(env: &HostEnv, policy: &dyn Policy, which: &str) -> Result<()> {
    let unavailable: BTreeMap<String, String> = env.unavailable_features().into_iter().collect();
    let req = policy.requirements();
    let wanted = match env.config().role {
        Role::Host => req.host,
        Role::Guest => req.guest,
    };
    let mut problems = Vec::new();
    for f in wanted {
        if !known_feature(&f) {
            problems.push(format!("`{f}` is not a feature moderato knows"));
        } else if let Some(why) = unavailable.get(&f) {
            problems.push(format!("`{f}`: {why}"));
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    let role = env.config().role;
    bail!(
        "refusing the {which} policy `{}`: it reads features the {role} side cannot provide:\n  - {}\n\
         Fix: provide them in the deploy config (interfaces, latency source) or deploy a policy that does not read them",
        policy.name(),
        problems.join("\n  - ")
    )
}

/// One interface's rates (VM direction) for decision logs.
fn rates(o: &moderato_env::InterfaceObs) -> Value {
    json!({
        "rx_pps": o.rx_pps,
        "tx_pps": o.tx_pps,
        "irq_per_s": o.irq_per_s(),
        "drops_per_s": o.drops_per_s,
    })
}

/// This side's observation as a JSON object, for decision logs: rates per layer (VM direction),
/// CPU shares and the probe's percentiles (`null` without replies).
fn inputs(role: Role, s: &LiveSample, vm_names: &[String]) -> Value {
    let probe = |p: Option<moderato_env::ProbeObs>| {
        p.map_or(Value::Null, |p| json!({ "p50_us": p.p50_us, "p99_us": p.p99_us, "replies": p.samples }))
    };
    let mut o = match role {
        Role::Host => {
            let h = &s.obs.host;
            let vms: Vec<Value> = h
                .backends
                .iter()
                .enumerate()
                .map(|(v, b)| {
                    let mut r = rates(b);
                    r["vm"] = json!(vm_names.get(v).cloned().unwrap_or_else(|| format!("vm{v}")));
                    r
                })
                .collect();
            json!({
                "nic": rates(&h.nic),
                "backends": vms,
                "cpu": { "irq": h.cpu.irq, "other": h.cpu.other },
                "probe": probe(h.probe),
            })
        }
        Role::Guest => match s.obs.guests.first() {
            Some(g) => json!({
                "frontend": rates(&g.frontend),
                "cpu": { "irq": g.cpu.irq, "other": g.cpu.other },
                "probe": probe(g.probe),
            }),
            None => json!({}),
        },
    };
    o["complete"] = json!(s.complete);
    o
}

/// One direction's setting as JSON: `{"usecs": u, "frames": f}` or `{"adaptive": "dim"}`.
fn moderation(m: Moderation) -> Value {
    match m {
        Moderation::Fixed(k) => json!({ "usecs": k.usecs, "frames": k.frames }),
        Moderation::Adaptive(a) => json!({ "adaptive": a.name() }),
    }
}

/// This side's layers of `s` as a JSON object keyed by layer: interface, rx and tx (VM
/// direction).
fn side(s: &CoalescingSettings, layers: &[(LayerId, String)]) -> Value {
    let mut o = serde_json::Map::new();
    for (id, name) in layers {
        let l = s.layer(*id);
        o.insert(
            id.to_string(),
            json!({ "interface": name, "rx": moderation(l.rx), "tx": moderation(l.tx) }),
        );
    }
    Value::Object(o)
}

/// A NAPI deferral as JSON, with the sysfs names and units.
fn napi_json(n: &NapiParams) -> Value {
    json!({ "napi_defer_hard_irqs": n.napi_defer_hard_irqs, "gro_flush_timeout_ns": n.gro_flush_timeout_ns })
}

/// Whether `policy` reads a latency probe feature on `role`'s side.
fn reads_probe(policy: &dyn Policy, role: Role) -> bool {
    let req = policy.requirements();
    let wanted = match role {
        Role::Host => req.host,
        Role::Guest => req.guest,
    };
    wanted.iter().any(|f| f.contains(".probe_"))
}

/// This side's probe p99 in `s`, if the probe had replies.
fn probe_p99(role: Role, s: &LiveSample) -> Option<f64> {
    match role {
        Role::Host => s.obs.host.probe.map(|p| p.p99_us),
        Role::Guest => s.obs.guests.first().and_then(|g| g.probe).map(|p| p.p99_us),
    }
}

impl DeployLoop {
    /// Takes baseline readings, checks both policies against what this side can provide, locks
    /// the interfaces, restores a dead deploy's journal, and reads and journals the original
    /// settings. Nothing is set here but a stale journal's originals.
    pub fn new(
        mut env: HostEnv,
        primary: Box<dyn Policy>,
        fallback: Box<dyn Policy>,
        limits: Limits,
        opts: LoopOptions,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        env.set_apply(!opts.dry_run);
        let (mut primary, mut fallback) = (primary, fallback);
        primary.reset();
        fallback.reset();
        for w in env.start() {
            tracing::warn!(target: "moderato::deploy", "{w}");
        }
        check_requirements(&env, primary.as_ref(), "deployed")?;
        check_requirements(&env, fallback.as_ref(), "fallback")?;
        let vms = env.spec().vms;
        let role = env.config().role;
        let layers: Vec<(LayerId, String)> = env.layers().into_iter().map(|l| (l.layer, l.ifname)).collect();
        let primary_reads_probe = reads_probe(primary.as_ref(), role);

        // One controller per interface, and what a dead one left behind.
        let (state, locks) = match (&opts.state_dir, opts.dry_run) {
            (Some(dir), false) => {
                let state = StateDir::open(dir)?;
                let mut locks = Vec::new();
                for (_, name) in &layers {
                    locks.push(state.lock(name, "deploy")?);
                }
                for (layer, name) in &layers {
                    recover(&mut env, &state, *layer, name)?;
                }
                (Some(state), locks)
            }
            (Some(dir), true) => {
                for (_, name) in &layers {
                    let j = dir.join(format!("{name}.json"));
                    if j.exists() {
                        tracing::warn!(target: "moderato::deploy", interface = %name, journal = %j.display(),
                            "a journal of original settings exists (a deploy died without restoring); \
                             a dry run leaves it: run `moderato restore --config <this config>`");
                    }
                }
                (None, Vec::new())
            }
            (None, _) => (None, Vec::new()),
        };

        let (mut originals, mut warnings) = env.originals();
        let sets_napi = primary.sets_deferral() || fallback.sets_deferral();
        if sets_napi {
            warnings.extend(env.add_napi_originals(&mut originals));
        }
        for w in warnings {
            tracing::warn!(target: "moderato::deploy", "{w}");
        }
        let napi: Vec<Original> = originals.iter().filter(|o| o.napi.is_some()).cloned().collect();
        // A policy that only sets deferral (a `napi:` recipe) has nothing to do without it; one
        // that also sets coalescing (a learned model) runs with its deferral left unapplied.
        let only_deferral = [&primary, &fallback].iter().any(|p| p.napi().is_some());
        if sets_napi && napi.is_empty() && !only_deferral {
            tracing::warn!(
                target: "moderato::deploy",
                "policy `{}` also decides NAPI deferral, but no interface of this {role} side has it that can be read \
                 (/sys/class/net/<if>/napi_defer_hard_irqs and gro_flush_timeout, Linux 5.10+): only its coalescing \
                 decisions are applied",
                primary.name()
            );
        } else if sets_napi && napi.is_empty() {
            bail!(
                "policy `{}` sets NAPI deferral, but no interface of this {role} side has it that can be read \
                 (/sys/class/net/<if>/napi_defer_hard_irqs and gro_flush_timeout, Linux 5.10+); see the warnings above",
                if primary.sets_deferral() { primary.name() } else { fallback.name() }
            );
        }
        for o in &napi {
            let ids =
                |v: &mut dyn Iterator<Item = u32>| v.map(|i| i.to_string()).collect::<Vec<_>>().join(", ");
            let how = if !o.napi_instances.is_empty() {
                format!(
                    "read per NAPI instance through netdev netlink ({} instance(s): {}; each one's original journalled \
                     and restored), set per device through sysfs and with napi-set on any instance that did not take it",
                    o.napi_instances.len(),
                    ids(&mut o.napi_instances.iter().map(|i| i.id))
                )
            } else {
                match env.napi_instances(&o.ifname) {
                    Ok(v) if v.is_empty() => "set per device through sysfs; netdev netlink lists no NAPI instance (the \
                         device's value applies to instances it creates later: a veth has one only with GRO or XDP on)"
                        .to_string(),
                    Ok(v) => format!(
                        "set per device through sysfs; netdev netlink lists {} NAPI instance(s) ({}) without their \
                         deferral (Linux before 6.13)",
                        v.len(),
                        ids(&mut v.into_iter())
                    ),
                    Err(e) => format!("set per device through sysfs; NAPI instances not listed: {e}"),
                }
            };
            tracing::info!(target: "moderato::deploy", layer = %o.layer, interface = %o.ifname,
                "NAPI deferral {how}");
        }
        // IRQ suspension (`irq-suspend:`) is the guest's, and per NAPI instance (napi-set).
        if let Some(p) = [&primary, &fallback].into_iter().find(|p| p.irq_suspend_timeout_ns().is_some()) {
            if role != Role::Guest {
                bail!(
                    "policy `{}` sets IRQ suspension, which is the guest's (its applications busy-poll their own \
                     sockets): deploy it with --role guest in the VM",
                    p.name()
                );
            }
            if !napi.iter().any(|o| !o.napi_instances.is_empty()) {
                bail!(
                    "policy `{}` sets IRQ suspension per NAPI instance (netdev netlink's napi-set, Linux 6.13+), but \
                     no interface of this guest lists a NAPI instance with it (a veth has one only with GRO or XDP \
                     on); see the log above for each interface",
                    p.name()
                );
            }
            tracing::info!(target: "moderato::deploy", policy = p.name(),
                "IRQ suspension: irq-suspend-timeout is set on every NAPI instance; it takes effect only for \
                 applications that busy-poll through epoll with prefer_busy_poll (EPIOCSPARAMS), which moderato \
                 cannot set for them");
        }
        // What the interfaces offer against the configured profile. A learned model decides for
        // its profile's mechanisms only, so a host that differs is refused before anything is set
        // or journalled (unless allowed); a baseline sets what the host has, and the difference
        // is only said.
        let profile = env.config().profile;
        let detected = env.detect_mechanisms();
        for d in &detected {
            let coalescing = match d.coalescing {
                Some(true) => "yes",
                Some(false) => "no (EOPNOTSUPP)",
                None => "unknown",
            };
            tracing::info!(target: "moderato::deploy", layer = %d.layer, interface = %d.ifname, coalescing,
                deferral = d.deferral, "detected mechanisms");
        }
        let diffs = moderato_env::live::profile_differences(profile, &detected);
        let follower = [&primary, &fallback].into_iter().find(|p| p.follows_profile());
        if profile == moderato_env::HostProfile::SriovVf && role == Role::Host {
            // The VMs' packets bypass the host's driver and the backend: nothing here moderates
            // them. A learned model decides nothing for this side; a baseline may still set the
            // PF's knobs, for the host's own traffic.
            if let Some(model) = follower {
                bail!(
                    "refusing policy `{}` on the host: on profile `sriov-vf` each VM drives a virtual function, \
                     whose packets bypass this host's driver and backend, so the model has nothing to set here. \
                     Deploy it with --role guest inside each VM, where the VF's knobs and NAPI deferral are",
                    model.name()
                );
            }
            tracing::warn!(target: "moderato::deploy", profile = profile.name(),
                "on sriov-vf the VMs' packets bypass this host's interfaces: what is set here moderates only \
                 the host's own traffic (deploy with --role guest in each VM for theirs)");
        }
        if let (Some(model), false, false) = (follower, diffs.is_empty(), opts.allow_profile_mismatch) {
            bail!(
                "refusing policy `{}`: it was trained for hosts of profile `{}` (the deploy config's `profile`), \
                 and this host differs: {}. Set `profile` in the deploy config to what the host has and deploy a \
                 model trained for it, or pass --allow-profile-mismatch to run it anyway (a layer without a \
                 mechanism stays as it is)",
                model.name(),
                profile.name(),
                diffs.join("; ")
            );
        }
        for diff in &diffs {
            tracing::warn!(target: "moderato::deploy", profile = profile.name(),
                "{diff}: check `profile` in the deploy config");
        }
        if let Some(state) = &state {
            for o in &originals {
                state.write(&Entry::of(o))?;
            }
        }
        // Knob state only from interfaces whose knobs are controlled (a NAPI-only entry has none).
        let with_knobs = || originals.iter().filter(|o| !o.params.is_empty());
        let previous = with_knobs().map(|o| (o.layer, o.settings())).collect();
        let known = with_knobs().map(|o| (o.ifname.clone(), o.ifindex)).collect();
        for o in &originals {
            tracing::info!(target: "moderato::deploy", layer = %o.layer, interface = %o.ifname,
                ifindex = o.ifindex, original = %o.describe(),
                "original settings{}", if opts.dry_run { "" } else { "; journalled, restored at exit" });
        }
        for l in env.layers() {
            let state = match &l.control {
                Control::ObserveOnly(why) => format!("observe-only: {why}"),
                Control::Controlled => "controlled".into(),
                Control::Unknown => "not present yet".into(),
            };
            tracing::info!(target: "moderato::deploy", layer = %l.layer, interface = %l.ifname, "{state}");
        }
        tracing::info!(
            target: "moderato::deploy",
            policy = primary.name(),
            fallback = fallback.name(),
            role = %role,
            vms,
            interval_ms = env.config().interval.as_millis() as u64,
            dry_run = opts.dry_run,
            state_dir = %state.as_ref().map_or("none".to_string(), |s| s.path().display().to_string()),
            slo_p99_us = opts.slo.map(|s| s.p99_us),
            slo_after_intervals = opts.slo.map(|s| s.after_intervals),
            "deploy loop starting{}",
            if opts.dry_run { " (dry run: nothing will be set)" } else { "" }
        );
        metrics.set_slo_target(opts.slo.map(|s| s.p99_us));
        metrics.set_interval(env.config().interval);
        let restore = (!opts.dry_run).then_some(originals);
        Ok(DeployLoop {
            env,
            primary,
            fallback,
            limits,
            opts,
            metrics,
            restore,
            napi,
            napi_said: BTreeSet::new(),
            layers,
            previous,
            known,
            state,
            _locks: locks,
            bad_in_a_row: 0,
            in_fallback: false,
            primary_reads_probe,
            slo_over: 0,
            slo_active: false,
            summary: Summary {
                stop: StopReason::Shutdown,
                decisions: 0,
                fallback_decisions: 0,
                fallbacks: 0,
                last: None,
                restored: 0,
                restore_failures: Vec::new(),
                slo_overrides: 0,
                slo_override_decisions: 0,
            },
        })
    }

    pub fn env(&self) -> &HostEnv {
        &self.env
    }

    /// Runs until `shutdown` turns true (or its sender is dropped), or `max_steps` decisions;
    /// restores the original settings on the way out, error or not.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<Summary> {
        let outcome = self.run_inner(&mut shutdown).await;
        self.finish();
        outcome.map(|stop| Summary { stop, ..self.summary.clone() })
    }

    async fn run_inner(&mut self, shutdown: &mut watch::Receiver<bool>) -> Result<StopReason> {
        loop {
            if *shutdown.borrow() {
                return Ok(StopReason::Shutdown);
            }
            tokio::select! {
                _ = tokio::time::sleep(self.env.until_due()) => {}
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        return Ok(StopReason::Shutdown);
                    }
                    continue;
                }
            }
            let sample = self.env.sample();
            self.decide(sample)?;
            if self.opts.max_steps.is_some_and(|n| self.summary.decisions >= n) {
                return Ok(StopReason::Steps);
            }
        }
    }

    /// The SLO guard's bookkeeping for one interval; whether it overrides this decision.
    fn slo_guard(&mut self, sample: &LiveSample) -> bool {
        let Some(target) = self.opts.slo else { return false };
        let role = self.env.config().role;
        match probe_p99(role, sample) {
            Some(p99) if p99 > target.p99_us => {
                self.slo_over = self.slo_over.saturating_add(1);
                self.metrics.slo_violation();
                if !self.slo_active && self.slo_over >= target.after_intervals {
                    self.slo_active = true;
                    self.summary.slo_overrides += 1;
                    self.metrics.slo_override(true);
                    tracing::warn!(
                        target: "moderato::deploy",
                        p99_us = p99,
                        target_p99_us = target.p99_us,
                        intervals = self.slo_over,
                        "SLO guard: probe p99 over the target for {} intervals in a row; overriding the policy \
                         with the least coalescing the limits allow until it is back under",
                        self.slo_over
                    );
                }
            }
            Some(p99) => {
                self.slo_over = 0;
                if self.slo_active {
                    self.slo_active = false;
                    self.metrics.slo_override(false);
                    tracing::info!(
                        target: "moderato::deploy",
                        p99_us = p99,
                        target_p99_us = target.p99_us,
                        "SLO guard: probe p99 back under the target; the policy decides again"
                    );
                }
            }
            // No replies this interval: no evidence either way; the guard keeps its state.
            None => {}
        }
        self.slo_active
    }

    /// One interval: fallback bookkeeping, decision, SLO guard, limits, apply, log, metrics.
    fn decide(&mut self, sample: LiveSample) -> Result<()> {
        let role = self.env.config().role;
        for w in &sample.info.warnings {
            tracing::warn!(target: "moderato::deploy", "{w}");
        }
        let probe_missing = self.primary_reads_probe && probe_p99(role, &sample).is_none();
        if sample.complete && !probe_missing {
            self.bad_in_a_row = 0;
        } else {
            self.bad_in_a_row = self.bad_in_a_row.saturating_add(1);
        }
        self.adopt_new_interfaces()?;
        let stale = self.bad_in_a_row >= self.opts.stale_after.max(1);
        if stale && !self.in_fallback {
            self.in_fallback = true;
            self.summary.fallbacks += 1;
            self.metrics.fallback_switch();
            self.fallback.reset();
            tracing::warn!(
                target: "moderato::deploy",
                intervals = self.bad_in_a_row,
                probe_missing,
                "observations stale or failing for {} intervals{}: fallback policy `{}` decides until they recover",
                self.bad_in_a_row,
                if probe_missing { " (the policy reads the latency probe, which has no replies)" } else { "" },
                self.fallback.name()
            );
        } else if !stale && self.in_fallback {
            self.in_fallback = false;
            self.primary.reset();
            tracing::info!(target: "moderato::deploy", "observations recovered: policy `{}` decides again", self.primary.name());
        }
        let policy = if self.in_fallback { &mut self.fallback } else { &mut self.primary };
        let decided = policy.act(&sample.obs);
        let policy_name = policy.name().to_string();
        let follows_profile = policy.follows_profile();
        let vms = self.env.spec().vms;
        if decided.vms.len() != vms {
            bail!(
                "policy `{policy_name}` decided settings for {} VMs, but this {role} side has {vms}",
                decided.vms.len()
            );
        }
        let ids: Vec<LayerId> = match role {
            Role::Host => LayerId::all(vms).filter(|id| !matches!(id, LayerId::Frontend(_))).collect(),
            Role::Guest => vec![LayerId::Frontend(0)],
        };
        // A policy that follows the profile leaves a layer the profile gives no ethtool
        // coalescing as it is: its setting stays what is in force (what was last applied, or the
        // interface's original).
        let profile = self.env.spec().profile;
        let kept: Vec<(LayerId, LayerSettings)> = if follows_profile {
            let restore = self.restore.as_deref().unwrap_or(&[]);
            ids.iter()
                .filter(|id| !profile.mechanisms(id.kind()).coalescing)
                .filter_map(|&id| {
                    let now = self
                        .previous
                        .get(&id)
                        .copied()
                        .or_else(|| restore.iter().find(|o| o.layer == id).map(|o| o.settings()))?;
                    Some((id, now))
                })
                .collect()
        } else {
            Vec::new()
        };
        let mut decided = decided;
        for &(id, now) in &kept {
            *decided.layer_mut(id) = LayerSettings { napi: decided.layer(id).napi, ..now };
        }
        let guarded = self.slo_guard(&sample);
        let wanted = if guarded {
            self.summary.slo_override_decisions += 1;
            let mut w = decided.clone();
            for &id in &ids {
                *w.layer_mut(id) = LayerSettings::PER_PACKET;
            }
            w
        } else {
            decided.clone()
        };
        let deciding = if self.in_fallback { &self.fallback } else { &self.primary };
        let (napi_wanted, per_layer) = (deciding.napi(), deciding.sets_deferral());
        // IRQ suspension: the deciding policy's timeout, or each instance's own original.
        let suspend = if guarded { None } else { deciding.irq_suspend_timeout_ns() };
        let sets_coalescing = guarded
            || if self.in_fallback {
                self.fallback.sets_coalescing()
            } else {
                self.primary.sets_coalescing()
            };
        let (safe, notes) = self.limits.apply(&wanted, &self.previous, &ids);
        if sets_coalescing {
            self.env.apply(&safe)?;
            for id in ids {
                self.previous.insert(id, *safe.layer(id));
            }
        }
        // The SLO guard takes deferral back to the interfaces' own, as it takes coalescing to the
        // least. A policy that decides per layer (a learned model) sets the NIC's and the
        // frontend's deferral from its settings, clamped into the action space.
        let space = self.env.spec().action_space.clone();
        let napi = self.apply_napi(|layer| match () {
            _ if guarded => None,
            _ if napi_wanted.is_some() => napi_wanted,
            _ if per_layer && !matches!(layer, LayerId::Backend(_)) => {
                Some(space.napi.clamp(decided.layer(layer).napi))
            }
            _ => None,
        });
        let irq_suspend = self.apply_irq_suspend(suspend);
        self.summary.decisions += 1;
        if self.in_fallback {
            self.summary.fallback_decisions += 1;
        }
        let step = self.summary.decisions;
        let (decided_log, applied_log, limited_log) = if sets_coalescing {
            (side(&decided, &self.layers), side(&safe, &self.layers), Value::from(notes.clone()))
        } else {
            (json!("coalescing left as is"), Value::Null, json!([]))
        };
        tracing::info!(
            target: "moderato::deploy",
            step,
            policy = %policy_name,
            fallback = self.in_fallback,
            slo_override = guarded,
            dry_run = self.opts.dry_run,
            complete = sample.complete,
            inputs = %inputs(role, &sample, &self.opts.vm_names),
            decided = %decided_log,
            applied = %applied_log,
            limited = %limited_log,
            napi = %napi,
            irq_suspend = %irq_suspend,
            "decision"
        );
        let knob_layers = if sets_coalescing { &self.layers[..] } else { &[] };
        self.metrics.record(
            &sample,
            &policy_name,
            self.in_fallback,
            &safe,
            knob_layers,
            sets_coalescing && !notes.is_empty(),
        );
        self.summary.last = sets_coalescing.then_some(safe);
        Ok(())
    }

    /// Sets the NAPI deferral of every interface that has one journalled: `wanted` where the
    /// deciding policy sets one, else the interface's original. Returns, per layer, what the
    /// kernel reports afterwards (what the log records); `null` without NAPI interfaces.
    fn apply_napi(&mut self, wanted: impl Fn(LayerId) -> Option<NapiParams>) -> Value {
        if self.napi.is_empty() {
            return Value::Null;
        }
        let mut out = serde_json::Map::new();
        for o in &self.napi {
            let Some(original) = o.napi else { continue };
            let target = wanted(o.layer).unwrap_or(original);
            let entry = match self.env.apply_napi(o, &target) {
                Ok(applied) => {
                    if applied != target && !self.opts.dry_run {
                        let msg = format!(
                            "{} ({}): the kernel applied `{applied}` for `{target}`; the applied value is what is logged",
                            o.ifname, o.layer
                        );
                        if self.napi_said.insert(msg.clone()) {
                            tracing::warn!(target: "moderato::deploy", layer = %o.layer, interface = %o.ifname, "{msg}");
                        }
                    }
                    json!({
                        "interface": o.ifname,
                        "wanted": napi_json(&target),
                        "applied": napi_json(&applied),
                    })
                }
                Err(e) => {
                    if self.napi_said.insert(e.clone()) {
                        tracing::warn!(target: "moderato::deploy", layer = %o.layer, interface = %o.ifname,
                            "NAPI deferral: {e}");
                    }
                    json!({ "interface": o.ifname, "wanted": napi_json(&target), "error": e })
                }
            };
            out.insert(o.layer.to_string(), entry);
        }
        Value::Object(out)
    }

    /// Sets the IRQ-suspension timeout of every journalled NAPI instance: `wanted` (ns) where the
    /// deciding policy sets one, else the instance's original. Returns per layer what the kernel
    /// reports afterwards; `null` where no policy of this deploy sets IRQ suspension.
    fn apply_irq_suspend(&mut self, wanted: Option<u64>) -> Value {
        if self.primary.irq_suspend_timeout_ns().is_none() && self.fallback.irq_suspend_timeout_ns().is_none()
        {
            return Value::Null;
        }
        let mut out = serde_json::Map::new();
        for o in self.napi.iter().filter(|o| !o.napi_instances.is_empty()) {
            // Without a wanted timeout, each instance gets its own original back (they may differ).
            let entry = match self.env.apply_irq_suspend(o, wanted) {
                Ok(applied) => json!({
                    "interface": o.ifname,
                    "wanted_ns": wanted,
                    "applied_ns": applied.iter().map(|(id, ns)| (id.to_string(), json!(ns))).collect::<serde_json::Map<_, _>>(),
                }),
                Err(e) => {
                    if self.napi_said.insert(e.clone()) {
                        tracing::warn!(target: "moderato::deploy", layer = %o.layer, interface = %o.ifname,
                            "IRQ suspension: {e}");
                    }
                    json!({ "interface": o.ifname, "wanted_ns": wanted, "error": e })
                }
            };
            out.insert(o.layer.to_string(), entry);
        }
        Value::Object(out)
    }

    /// An interface that was absent at start and has appeared, or came back re-created (a new
    /// ifindex), is about to be set: its settings as just read are its originals (journalled
    /// before the set, restored at exit) and the reference for the step limit. The originals of
    /// an interface that was re-created belong to an interface that no longer exists and are
    /// dropped.
    fn adopt_new_interfaces(&mut self) -> Result<()> {
        for l in self.env.layers() {
            let (Control::Controlled, Some(params)) = (&l.control, l.params) else {
                continue;
            };
            let recreated = match self.known.get(&l.ifname) {
                None => false,
                Some(was) if l.ifindex.is_some() && *was != l.ifindex => true,
                Some(_) => continue,
            };
            self.known.insert(l.ifname.clone(), l.ifindex);
            // The NAPI deferral journalled for this very interface (same ifindex) stays with it; a
            // re-created interface's deferral is its own and is not touched.
            let journalled = self
                .napi
                .iter()
                .find(|n| n.ifname == l.ifname && (n.ifindex == l.ifindex || n.ifindex.is_none()));
            let napi = journalled.and_then(|n| n.napi);
            let napi_instances = journalled.map(|n| n.napi_instances.clone()).unwrap_or_default();
            let o = Original {
                layer: l.layer,
                ifname: l.ifname,
                ifindex: l.ifindex,
                params,
                napi,
                napi_instances,
            };
            if let Some(state) = &self.state {
                state.write(&Entry::of(&o)).context("journalling an interface's original settings")?;
            }
            tracing::info!(target: "moderato::deploy", layer = %o.layer, interface = %o.ifname,
                ifindex = o.ifindex, original = %o.describe(),
                "{}; original settings{}",
                if recreated { "interface re-created (new ifindex)" } else { "interface appeared" },
                if self.opts.dry_run { "" } else { " journalled, restored at exit" });
            self.previous.insert(o.layer, o.settings());
            if let Some(r) = self.restore.as_mut() {
                r.retain(|x| x.ifname != o.ifname);
                r.push(o);
            }
        }
        Ok(())
    }

    /// Puts the original settings back (once), each only onto the interface it was read from;
    /// a journal entry is removed once it is restored or can never be.
    fn finish(&mut self) {
        let Some(originals) = self.restore.take() else { return };
        let mut restored = 0;
        for o in &originals {
            let r = self.env.restore_one(o);
            let outcome = match &self.state {
                Some(state) => journal::settle(state, Entry::of(o), |_| r.clone()),
                None => Ok(match r.clone() {
                    Ok(()) => Outcome::Restored(Entry::of(o)),
                    Err(why) => Outcome::Failed { entry: Entry::of(o), why, kept: false },
                }),
            };
            match outcome {
                Ok(Outcome::Restored(_)) => {
                    restored += 1;
                    tracing::info!(target: "moderato::deploy", layer = %o.layer, interface = %o.ifname,
                        original = %o.describe(), "restored");
                }
                Ok(Outcome::Failed { why, kept, .. }) => {
                    let msg = format!(
                        "{} ({}): not restored to `{}`: {why}{}",
                        o.ifname,
                        o.layer,
                        o.describe(),
                        if kept {
                            "; the journal stays: run `moderato restore` once it can succeed"
                        } else {
                            ""
                        }
                    );
                    tracing::error!(target: "moderato::deploy", layer = %o.layer, interface = %o.ifname, "{msg}");
                    self.summary.restore_failures.push(msg);
                }
                Ok(Outcome::NoJournal) => {}
                Err(e) => {
                    // Restored (or not), but the journal could not be removed: a later restore
                    // would find it; say so.
                    let msg = format!("{} ({}): {e:#}", o.ifname, o.layer);
                    tracing::error!(target: "moderato::deploy", interface = %o.ifname, "{msg}");
                    if r.is_ok() {
                        restored += 1;
                    }
                    self.summary.restore_failures.push(msg);
                }
            }
        }
        self.summary.restored = restored;
        let failures = self.summary.restore_failures.len();
        if failures == 0 {
            tracing::info!(target: "moderato::deploy", interfaces = restored, failures, "restored the original settings");
        } else {
            tracing::error!(target: "moderato::deploy", interfaces = restored, failures,
                "restored the original settings of {restored} of {} interfaces", originals.len());
        }
    }
}

/// At start, with `name`'s lock held: a journal there was left by a deploy that is gone.
/// Restore it onto the same interface (logged); a failure that may pass keeps the journal and
/// stops the start, since the settings in force now are not the true originals.
fn recover(env: &mut HostEnv, state: &StateDir, layer: LayerId, name: &str) -> Result<()> {
    let Some(entry) = state.read(name)? else { return Ok(()) };
    let path = state.journal_path(name);
    tracing::warn!(target: "moderato::deploy", interface = %name, journal = %path.display(), pid = entry.pid,
        written_at = %entry.written_at,
        "found the journal of a deploy (PID {}) that exited without restoring; restoring it first", entry.pid);
    let o = entry.original(layer);
    match journal::settle(state, entry, |_| env.restore_one(&o))? {
        Outcome::Restored(e) => {
            tracing::warn!(target: "moderato::deploy", interface = %name, original = %o.describe(), pid = e.pid,
                "restored the original settings left by PID {}", e.pid);
            Ok(())
        }
        Outcome::Failed { why, kept: false, .. } => {
            tracing::warn!(target: "moderato::deploy", interface = %name,
                "the journal's original settings were not restored: {why}; the journal is removed");
            Ok(())
        }
        Outcome::Failed { why, kept: true, .. } => bail!(
            "{name}: the journal {} of a deploy that died could not be restored: {why}. \
             Fix: resolve that, then run `moderato restore --config <deploy.toml>` (the journal is kept)",
            path.display()
        ),
        Outcome::NoJournal => Ok(()),
    }
}

impl Drop for DeployLoop {
    fn drop(&mut self) {
        self.finish();
    }
}
