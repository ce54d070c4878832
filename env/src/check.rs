//! A Gymnasium-style environment checker (after `gymnasium.utils.env_checker`): every env in the
//! project runs through it in tests.

use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;

use crate::env::Env;
use crate::obs::{Feature, Observation};
use crate::settings::ActionSpace;

/// Checks that
/// - observations have the documented lengths and every feature is finite and inside its range;
/// - rewards are finite;
/// - the same seed and actions give bit-identical observations and rewards;
/// - a different seed gives different observations.
///
/// `make` builds a fresh env; `steps` actions are drawn from a fixed generator (so the check
/// itself is deterministic) and applied to every env.
pub fn check_env<E: Env>(mut make: impl FnMut() -> E, seed: u64, steps: usize) -> Result<(), String> {
    let mut a = make();
    let mut b = make();
    let mut c = make();
    let spec = a.spec().clone();
    let dim = ActionSpace::dim(spec.vms);
    let mut rng = Pcg64Mcg::seed_from_u64(0x5eed);
    let actions: Vec<Vec<f32>> = (0..steps)
        .map(|_| (0..dim).map(|_| (rng.next_u32() as f64 / u32::MAX as f64 * 2.0 - 1.0) as f32).collect())
        .collect();

    let (oa, _) = a.reset(seed).map_err(|e| format!("reset({seed}): {e}"))?;
    let (ob, _) = b.reset(seed).map_err(|e| format!("reset({seed}): {e}"))?;
    let (oc, _) = c.reset(seed.wrapping_add(1)).map_err(|e| format!("reset({}): {e}", seed + 1))?;
    check_obs(&a, &oa, "reset")?;
    let mut ra = vec![flat(&a, &oa)];
    let mut rb = vec![flat(&b, &ob)];
    let mut rc = vec![flat(&c, &oc)];
    for (i, act) in actions.iter().enumerate() {
        let s = spec.action_space.decode(spec.vms, act);
        let sa = a.step(&s).map_err(|e| format!("step {i}: {e}"))?;
        let sb = b.step(&s).map_err(|e| format!("step {i}: {e}"))?;
        let sc = c.step(&s).map_err(|e| format!("step {i}: {e}"))?;
        check_obs(&a, &sa.obs, &format!("step {i}"))?;
        if !sa.reward.is_finite() {
            return Err(format!("step {i}: reward {} is not finite", sa.reward));
        }
        let (mut fa, mut fb, mut fc) = (flat(&a, &sa.obs), flat(&b, &sb.obs), flat(&c, &sc.obs));
        fa.push(sa.reward);
        fb.push(sb.reward);
        fc.push(sc.reward);
        ra.push(fa);
        rb.push(fb);
        rc.push(fc);
        if sa.terminated || sa.truncated {
            break;
        }
    }
    let bits = |v: &Vec<Vec<f32>>| -> Vec<Vec<u32>> {
        v.iter().map(|r| r.iter().map(|x| x.to_bits()).collect()).collect()
    };
    if bits(&ra) != bits(&rb) {
        let i = ra.iter().zip(&rb).position(|(x, y)| x != y).unwrap_or(0);
        return Err(format!("same seed {seed} gave different results at step {i}"));
    }
    if bits(&ra) == bits(&rc) {
        return Err(format!("seeds {seed} and {} gave identical results", seed + 1));
    }
    Ok(())
}

/// All features of an observation, host then each backend then each guest.
fn flat<E: Env>(env: &E, o: &Observation) -> Vec<f32> {
    let sp = &env.spec().action_space;
    let mut v = o.host.features(sp);
    for i in 0..o.host.backends.len() {
        v.extend(o.host.backend_features(sp, i));
    }
    for g in &o.guests {
        v.extend(g.features(sp));
    }
    v
}

fn in_range(list: &[Feature], v: &[f32], what: &str, at: &str) -> Result<(), String> {
    if v.len() != list.len() {
        return Err(format!("{at}: {what} has {} features, documented {}", v.len(), list.len()));
    }
    for (f, x) in list.iter().zip(v) {
        if !x.is_finite() || *x < f.lo || *x > f.hi {
            return Err(format!("{at}: {what} feature {} = {x} outside [{}, {}]", f.name, f.lo, f.hi));
        }
    }
    Ok(())
}

fn check_obs<E: Env>(env: &E, o: &Observation, at: &str) -> Result<(), String> {
    let spec = env.spec();
    let sp = &spec.action_space;
    if o.host.backends.len() != spec.vms || o.guests.len() != spec.vms {
        return Err(format!(
            "{at}: observation has {} backends and {} guests for {} VMs",
            o.host.backends.len(),
            o.guests.len(),
            spec.vms
        ));
    }
    in_range(spec.host_features(), &o.host.features(sp), "host", at)?;
    for v in 0..spec.vms {
        in_range(spec.backend_features(), &o.host.backend_features(sp, v), &format!("vm{v} backend"), at)?;
        in_range(spec.guest_features(), &o.guests[v].features(sp), &format!("vm{v} guest"), at)?;
    }
    Ok(())
}
