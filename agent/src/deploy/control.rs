//! The deploy loop: observe → decide → limit → apply, once per control interval.
//!
//! [`DeployLoop::new`] takes the baseline readings, refuses a policy whose features this side
//! cannot provide, and reads the original settings of every controlled interface. From then on
//! the loop owns the duty to put them back: [`DeployLoop::run`] restores them on every exit it
//! controls (shutdown signal, `--steps` reached, an error), and `Drop` does it for the rest (a
//! panic, a caller that drops the loop). A dry run reads and decides but sets nothing, so it has
//! nothing to restore.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use anyhow::{Result, bail};
use moderato_env::live::{HostEnv, LiveSample, Original, Role};
use moderato_env::{
    BACKEND_FEATURES, CoalescingSettings, Env, GUEST_FEATURES, HOST_FEATURES, LayerId, LayerSettings,
};
use moderato_policies::Policy;
use tokio::sync::watch;

use super::limits::{Limits, show};
use super::metrics::Metrics;

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
}

impl Default for LoopOptions {
    fn default() -> Self {
        LoopOptions { dry_run: false, max_steps: None, stale_after: 3, vm_names: Vec::new() }
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
}

/// The loop with the host it controls. See the [module docs](self).
pub struct DeployLoop {
    env: HostEnv,
    primary: Box<dyn Policy>,
    fallback: Box<dyn Policy>,
    limits: Limits,
    opts: LoopOptions,
    metrics: Arc<Metrics>,
    /// Originals to put back; `None` once restored (or in a dry run).
    restore: Option<Vec<Original>>,
    /// The layers this side sets, with their interface names.
    layers: Vec<(LayerId, String)>,
    previous: BTreeMap<LayerId, LayerSettings>,
    /// Interfaces whose original settings are known (read at start or when they appeared).
    known: std::collections::BTreeSet<String>,
    bad_in_a_row: u32,
    in_fallback: bool,
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

/// A one-line summary of this side's observation, for decision logs.
fn inputs(role: Role, s: &LiveSample, vm_names: &[String]) -> String {
    let mut o = String::new();
    let kpps = |x: f64| x / 1000.0;
    let irq = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{:.1}k", v / 1000.0));
    match role {
        Role::Host => {
            let h = &s.obs.host;
            let n = &h.nic;
            let _ = write!(
                o,
                "nic rx {:.1}kpps tx {:.1}kpps irq {}/s drops {:.0}/s",
                kpps(n.rx_pps),
                kpps(n.tx_pps),
                irq(n.irq_per_s()),
                n.drops_per_s
            );
            for (v, b) in h.backends.iter().enumerate() {
                let name = vm_names.get(v).cloned().unwrap_or_else(|| format!("vm{v}"));
                let _ = write!(
                    o,
                    "; {name} to-guest {:.1}kpps from-guest {:.1}kpps drops {:.0}/s",
                    kpps(b.rx_pps),
                    kpps(b.tx_pps),
                    b.drops_per_s
                );
            }
            let _ = write!(o, "; cpu irq {:.1}% other {:.1}%", 100.0 * h.cpu.irq, 100.0 * h.cpu.other);
            if let Some(p) = h.probe {
                let _ = write!(o, "; probe p50 {:.0}us p99 {:.0}us", p.p50_us, p.p99_us);
            }
        }
        Role::Guest => {
            if let Some(g) = s.obs.guests.first() {
                let f = &g.frontend;
                let _ = write!(
                    o,
                    "frontend rx {:.1}kpps tx {:.1}kpps irq rx {}/s tx {}/s drops {:.0}/s; cpu irq {:.1}% other {:.1}%",
                    kpps(f.rx_pps),
                    kpps(f.tx_pps),
                    irq(f.rx_irq_per_s),
                    irq(f.tx_irq_per_s),
                    f.drops_per_s,
                    100.0 * g.cpu.irq,
                    100.0 * g.cpu.other
                );
                if let Some(p) = g.probe {
                    let _ = write!(o, "; probe p50 {:.0}us p99 {:.0}us", p.p50_us, p.p99_us);
                }
            }
        }
    }
    if !s.complete {
        o.push_str("; INCOMPLETE");
    }
    o
}

/// This side's layers of `s`, as `layer rx .. tx ..`.
fn side(s: &CoalescingSettings, layers: &[(LayerId, String)]) -> String {
    layers
        .iter()
        .map(|(id, name)| {
            let l = s.layer(*id);
            format!("{id}({name}) rx {} tx {}", show(l.rx), show(l.tx))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

impl DeployLoop {
    /// Takes baseline readings, checks both policies against what this side can provide, and
    /// reads the original settings. Nothing is set here.
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
        let (originals, warnings) = env.originals();
        for w in warnings {
            tracing::warn!(target: "moderato::deploy", "{w}");
        }
        let previous = originals.iter().map(|o| (o.layer, o.settings())).collect();
        let known = originals.iter().map(|o| o.ifname.clone()).collect();
        for o in &originals {
            tracing::info!(target: "moderato::deploy", layer = %o.layer, interface = %o.ifname, original = %o.params,
                "original settings{}", if opts.dry_run { "" } else { "; restored at exit" });
        }
        for l in env.layers() {
            let state = match &l.control {
                moderato_env::live::Control::ObserveOnly(why) => format!("observe-only: {why}"),
                moderato_env::live::Control::Controlled => "controlled".into(),
                moderato_env::live::Control::Unknown => "not present yet".into(),
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
            "deploy loop starting{}",
            if opts.dry_run { " (dry run: nothing will be set)" } else { "" }
        );
        let restore = (!opts.dry_run).then_some(originals);
        Ok(DeployLoop {
            env,
            primary,
            fallback,
            limits,
            opts,
            metrics,
            restore,
            layers,
            previous,
            known,
            bad_in_a_row: 0,
            in_fallback: false,
            summary: Summary {
                stop: StopReason::Shutdown,
                decisions: 0,
                fallback_decisions: 0,
                fallbacks: 0,
                last: None,
                restored: 0,
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

    /// One interval: fallback bookkeeping, decision, limits, apply, log, metrics.
    fn decide(&mut self, sample: LiveSample) -> Result<()> {
        let role = self.env.config().role;
        for w in &sample.info.warnings {
            tracing::warn!(target: "moderato::deploy", "{w}");
        }
        if sample.complete {
            self.bad_in_a_row = 0;
        } else {
            self.bad_in_a_row = self.bad_in_a_row.saturating_add(1);
        }
        self.adopt_new_interfaces();
        let stale = self.bad_in_a_row >= self.opts.stale_after.max(1);
        if stale && !self.in_fallback {
            self.in_fallback = true;
            self.summary.fallbacks += 1;
            self.metrics.fallback_switch();
            self.fallback.reset();
            tracing::warn!(
                target: "moderato::deploy",
                intervals = self.bad_in_a_row,
                "observations stale or failing for {} intervals: fallback policy `{}` decides until they recover",
                self.bad_in_a_row,
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
        let (safe, notes) = self.limits.apply(&decided, &self.previous, &ids);
        self.env.apply(&safe)?;
        for id in ids {
            self.previous.insert(id, *safe.layer(id));
        }
        self.summary.decisions += 1;
        if self.in_fallback {
            self.summary.fallback_decisions += 1;
        }
        let step = self.summary.decisions;
        tracing::info!(
            target: "moderato::deploy",
            step,
            policy = %policy_name,
            fallback = self.in_fallback,
            dry_run = self.opts.dry_run,
            complete = sample.complete,
            inputs = %inputs(role, &sample, &self.opts.vm_names),
            decided = %side(&decided, &self.layers),
            applied = %side(&safe, &self.layers),
            limited = %notes.join("; "),
            "decision"
        );
        self.metrics.record(&sample, &policy_name, self.in_fallback, &safe, &self.layers, !notes.is_empty());
        self.summary.last = Some(safe);
        Ok(())
    }

    /// An interface that was absent at start and has appeared is about to be set: its settings as
    /// first read are its originals (restored at exit) and the reference for the step limit.
    fn adopt_new_interfaces(&mut self) {
        for l in self.env.layers() {
            let (moderato_env::live::Control::Controlled, Some(params)) = (&l.control, l.params) else {
                continue;
            };
            if !self.known.insert(l.ifname.clone()) {
                continue;
            }
            let o = Original { layer: l.layer, ifname: l.ifname, params };
            tracing::info!(target: "moderato::deploy", layer = %o.layer, interface = %o.ifname, original = %o.params,
                "interface appeared; original settings{}", if self.opts.dry_run { "" } else { "; restored at exit" });
            self.previous.insert(o.layer, o.settings());
            if let Some(r) = self.restore.as_mut() {
                r.push(o);
            }
        }
    }

    /// Puts the original settings back (once).
    fn finish(&mut self) {
        let Some(originals) = self.restore.take() else { return };
        let warnings = self.env.restore(&originals);
        for w in &warnings {
            tracing::error!(target: "moderato::deploy", "{w}");
        }
        self.summary.restored = originals.len();
        tracing::info!(
            target: "moderato::deploy",
            interfaces = originals.len(),
            failures = warnings.len(),
            "restored the original settings"
        );
    }
}

impl Drop for DeployLoop {
    fn drop(&mut self) {
        self.finish();
    }
}
