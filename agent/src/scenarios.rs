//! `moderato scenarios`: see what the generator draws, and check scenario files.
//!
//! - `sample <experiment.toml> --count N --out DIR [--seed S]` draws `N` hosts from the
//!   experiment's `[suite.generator]` and writes each as `DIR/<name>.toml` (with its flash-crowd
//!   traces under `DIR/traces/`), so that a user can read what a policy trains on and replay any
//!   of them (`moderato simulate DIR/<name>.toml`). Host `i` is drawn with generator seed
//!   `splitmix64(splitmix64(S) + i)`, `S` defaulting to the experiment's `seed`: the same command writes the
//!   same files. The hosts are draws from the distribution training samples, not the training's
//!   own episodes (those derive their seeds from the run's seed, iteration and environment).
//! - `check <file.toml>...` loads each scenario and says what is wrong with it, if anything.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use moderato_env::random::splitmix64;
use moderato_env::sim::Scenario;
use moderato_env::sim::generator::{estimated_load, sample as draw};

use crate::train::ExperimentConfig;

/// Most hosts one `sample` writes.
pub const MAX_COUNT: usize = 100_000;

/// The generator seed of host `i` of a sample with base seed `base`.
pub fn host_seed(base: u64, i: usize) -> u64 {
    // Through a mix first, so that the hosts of base seeds S and S + 1 do not overlap.
    splitmix64(splitmix64(base).wrapping_add(i as u64))
}

/// Draws `count` hosts from `experiment`'s generator into `out`; returns the files written.
pub fn sample(
    experiment: &Path,
    count: usize,
    out: &Path,
    seed: Option<u64>,
    force: bool,
) -> Result<Vec<PathBuf>> {
    let exp = ExperimentConfig::load(experiment)?;
    let Some(spec) = &exp.config.suite.generator else {
        bail!(
            "{}: has no [suite.generator] to draw from; add one (every key is documented in \
             experiments/example.toml), e.g. copy the one of experiments/ppo-generalist.toml",
            experiment.display()
        );
    };
    if count == 0 || count > MAX_COUNT {
        bail!("--count {count}: draw 1..={MAX_COUNT} hosts");
    }
    if out.exists() && !out.is_dir() {
        bail!("--out {}: exists and is not a directory; choose another --out", out.display());
    }
    if !force && std::fs::read_dir(out).is_ok_and(|mut d| d.next().is_some()) {
        bail!(
            "--out {}: already exists and is not empty; choose another --out, or add --force to write into it \
             (files of the same names are replaced)",
            out.display()
        );
    }
    std::fs::create_dir_all(out)
        .map_err(|e| anyhow::anyhow!("--out {}: cannot create it: {e}", out.display()))?;
    let base = seed.unwrap_or(exp.config.seed);
    let mut written = Vec::with_capacity(count);
    outln!("| file | backend | host cores | VMs | flows | estimated load | bottleneck |");
    outln!("|---|---|---|---|---|---|---|");
    for i in 0..count {
        let s = draw(spec, host_seed(base, i));
        let path = out.join(format!("{}.toml", s.name));
        s.save(&path)?;
        let est = estimated_load(&s);
        outln!(
            "| {} | {:?} | {} | {} | {} | {:.2} | {} |",
            path.display(),
            s.host.backend,
            s.host.cpus,
            s.vms.len(),
            s.vms.iter().map(|v| v.flows.len()).sum::<usize>(),
            est.cpu,
            est.bottleneck
        );
        written.push(path);
    }
    tracing::info!(
        "wrote {count} hosts into {} (base seed {base}); replay one with: moderato simulate {}",
        out.display(),
        written[0].display()
    );
    Ok(written)
}

/// Loads every file; prints `ok` or the error of each, and fails if any is wrong.
pub fn check(files: &[PathBuf]) -> Result<()> {
    let mut bad = 0;
    for f in files {
        match Scenario::load(f) {
            Ok(s) => outln!("ok     {} ({}: {} VMs)", f.display(), s.name, s.vms.len()),
            Err(e) => {
                bad += 1;
                outln!("error  {e}");
            }
        }
    }
    if bad > 0 {
        bail!("{bad} of {} scenario files have errors (above)", files.len());
    }
    Ok(())
}
