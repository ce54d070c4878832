//! Random streams and traffic sources.
//!
//! Every source owns generators derived from `(seed, stream id)` alone, so adding a VM or a flow
//! never perturbs the draws of the others.

use rand::SeedableRng;
use rand_pcg::Pcg64Mcg;

use super::scenario::{Arrivals, SizeDist};

pub(crate) use crate::random::splitmix64;

/// Purposes of random streams; part of the stream id.
#[derive(Debug, Clone, Copy)]
#[repr(u64)]
pub(crate) enum Purpose {
    Arrivals = 1,
    Sizes = 2,
    ResponseSizes = 3,
    Service = 4,
    Probe = 5,
    ObsNoise = 6,
}

/// A generator for `(seed, purpose, a, b)`, e.g. `(seed, Arrivals, vm, flow)`.
pub(crate) fn stream(seed: u64, purpose: Purpose, a: u64, b: u64) -> Rng64 {
    let k = splitmix64(splitmix64(splitmix64(seed) ^ (purpose as u64)) ^ (a << 20 | b));
    Rng64(Pcg64Mcg::seed_from_u64(k))
}

/// The simulator's generator, with the few draws it needs.
#[derive(Debug, Clone)]
pub(crate) struct Rng64(Pcg64Mcg);

impl Rng64 {
    /// Uniform in `[0, 1)` with 53 random bits.
    #[inline]
    pub fn unit(&mut self) -> f64 {
        crate::random::unit_f64(&mut self.0)
    }

    /// Exponential with mean 1.
    #[inline]
    pub fn exp1(&mut self) -> f64 {
        -(1.0 - self.unit()).ln()
    }

    /// Standard normal.
    pub fn normal(&mut self) -> f64 {
        crate::random::standard_normal(&mut self.0)
    }
}

/// Draws frame sizes.
#[derive(Debug, Clone)]
pub(crate) struct Sizer {
    dist: SizeDist,
    rng: Rng64,
}

impl Sizer {
    pub fn new(dist: SizeDist, rng: Rng64) -> Self {
        Sizer { dist, rng }
    }

    #[inline]
    pub fn draw(&mut self) -> u32 {
        match &self.dist {
            SizeDist::Fixed { bytes } => *bytes,
            SizeDist::Bimodal { small, large, p_small } => {
                if self.rng.unit() < *p_small {
                    *small
                } else {
                    *large
                }
            }
            SizeDist::Imix => match (self.rng.unit() * 12.0) as u32 {
                0..=6 => 64,
                7..=10 => 576,
                _ => 1500,
            },
        }
    }
}

/// An arrival process that yields successive arrival times, nanoseconds.
#[derive(Debug, Clone)]
pub(crate) struct ArrivalGen {
    process: Arrivals,
    rng: Rng64,
    /// Time of the next arrival, ns, kept in f64 so that rounding never accumulates.
    t: f64,
    max_rate: f64,
    /// On/off state and the time it ends.
    on: bool,
    switch_at: f64,
    /// Thinning shortcut (diurnal only): a bound on |d rate / dt| in packets/s per second, and
    /// the last rate computed exactly, at `memo_t_s` (NaN: none yet).
    lipschitz: Option<f64>,
    memo_t_s: f64,
    memo_rate: f64,
}

/// Slack for floating-point error in the thinning shortcut, relative to the maximum rate: the
/// computed rate is within ~1e-12 of the exact one for times below `SHORTCUT_MAX_T_S`, so a
/// decision outside this slack is the one the exact comparison would make.
const SHORTCUT_SLACK: f64 = 1e-6;
/// Beyond this time the sine's argument grows and the shortcut is not used (seconds).
const SHORTCUT_MAX_T_S: f64 = 1e6;

const NS: f64 = 1e9;

impl ArrivalGen {
    pub fn new(process: Arrivals, rng: Rng64) -> Self {
        let max_rate = process.max_rate();
        let lipschitz = match process {
            Arrivals::Diurnal { mean_pps, amplitude, period_s, .. } => {
                Some(mean_pps.abs() * amplitude.abs() * std::f64::consts::TAU / period_s)
            }
            _ => None,
        };
        let mut g = ArrivalGen {
            process,
            rng,
            t: 0.0,
            max_rate,
            on: true,
            switch_at: f64::INFINITY,
            lipschitz,
            memo_t_s: f64::NAN,
            memo_rate: 0.0,
        };
        match g.process {
            Arrivals::OnOff { mean_on_ms, .. } => {
                // Start in the on state, for an exponential (memoryless) share of an on period.
                g.switch_at = g.rng.exp1() * mean_on_ms * 1e6;
                g.advance();
            }
            Arrivals::Constant { rate_pps } if rate_pps > 0.0 => {
                // A random phase, so that constant sources of several VMs do not align.
                g.t = g.rng.unit() * NS / rate_pps;
            }
            _ => g.advance(),
        }
        g
    }

    /// The next arrival time in ns (`u64::MAX` when the source has stopped).
    #[inline]
    pub fn peek(&self) -> u64 {
        if self.t.is_finite() { self.t as u64 } else { u64::MAX }
    }

    /// Moves to the arrival after the current one.
    #[inline]
    pub fn advance(&mut self) {
        self.t = self.next_after(self.t);
    }

    fn next_after(&mut self, t: f64) -> f64 {
        match self.process {
            Arrivals::Poisson { rate_pps } => {
                if rate_pps <= 0.0 {
                    f64::INFINITY
                } else {
                    t + self.rng.exp1() * NS / rate_pps
                }
            }
            Arrivals::Constant { rate_pps } => {
                if rate_pps <= 0.0 {
                    f64::INFINITY
                } else {
                    t + NS / rate_pps
                }
            }
            Arrivals::OnOff { on_rate_pps, off_rate_pps, mean_on_ms, mean_off_ms } => {
                let mut t = t;
                loop {
                    let rate = if self.on { on_rate_pps } else { off_rate_pps };
                    let cand = if rate > 0.0 { t + self.rng.exp1() * NS / rate } else { f64::INFINITY };
                    if cand < self.switch_at {
                        return cand;
                    }
                    // Memoryless: restart the draw from the switch.
                    t = self.switch_at;
                    self.on = !self.on;
                    let mean_ms = if self.on { mean_on_ms } else { mean_off_ms };
                    self.switch_at = t + self.rng.exp1() * mean_ms * 1e6;
                }
            }
            // Closed-loop clients are driven by responses, not by this generator.
            Arrivals::ClosedLoop { .. } => f64::INFINITY,
            Arrivals::Ramp { .. } | Arrivals::Diurnal { .. } | Arrivals::Trace { .. } => {
                // Thinning (Lewis & Shedler 1979): candidates at the maximum rate, each kept with
                // probability rate(t) / max_rate.
                if self.max_rate <= 0.0 {
                    return f64::INFINITY;
                }
                let mut t = t;
                for _ in 0..1_000_000 {
                    t += self.rng.exp1() * NS / self.max_rate;
                    let x = self.rng.unit() * self.max_rate;
                    if self.keep(x, t / NS) {
                        return t;
                    }
                }
                // A rate that stays ~0 for a long stretch: keep looking later.
                t
            }
        }
    }
}

impl ArrivalGen {
    /// Thinning's test `x < rate(t_s)`. For a diurnal process the rate moves at most
    /// `lipschitz · |t_s − memo_t_s|` from the last one computed, so most candidates are decided
    /// without a sine: the same decisions, the same draws.
    #[inline]
    fn keep(&mut self, x: f64, t_s: f64) -> bool {
        let Some(lip) = self.lipschitz else { return x < self.process.rate_at(t_s) };
        if t_s < SHORTCUT_MAX_T_S {
            let slack = lip * (t_s - self.memo_t_s).abs() + SHORTCUT_SLACK * self.max_rate;
            // NaN (no memo yet) fails both tests and falls through.
            if slack < 0.01 * self.max_rate {
                if x < self.memo_rate - slack {
                    return true;
                }
                if x >= self.memo_rate + slack {
                    return false;
                }
            }
        }
        let r = self.process.rate_at(t_s);
        self.memo_t_s = t_s;
        self.memo_rate = r;
        x < r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mean_rate(p: Arrivals, n: usize) -> f64 {
        let mut g = ArrivalGen::new(p, stream(7, Purpose::Arrivals, 0, 0));
        let t0 = g.peek();
        for _ in 0..n {
            g.advance();
        }
        n as f64 * 1e9 / (g.peek() - t0) as f64
    }

    #[test]
    fn processes_have_their_mean_rates() {
        let r = mean_rate(Arrivals::Poisson { rate_pps: 1e5 }, 200_000);
        assert!((r / 1e5 - 1.0).abs() < 0.01, "poisson {r}");
        let r = mean_rate(Arrivals::Constant { rate_pps: 1e5 }, 1000);
        assert!((r / 1e5 - 1.0).abs() < 1e-6, "constant {r}");
        let p = Arrivals::OnOff { on_rate_pps: 2e5, off_rate_pps: 0.0, mean_on_ms: 1.0, mean_off_ms: 1.0 };
        let r = mean_rate(p, 400_000);
        assert!((r / 1e5 - 1.0).abs() < 0.05, "on-off {r}");
    }

    #[test]
    fn streams_are_independent_and_reproducible() {
        let mut a = stream(1, Purpose::Arrivals, 0, 0);
        let mut b = stream(1, Purpose::Arrivals, 0, 0);
        let mut c = stream(1, Purpose::Arrivals, 1, 0);
        let (x, y, z) = (a.unit(), b.unit(), c.unit());
        assert_eq!(x.to_bits(), y.to_bits());
        assert_ne!(x.to_bits(), z.to_bits());
    }

    #[test]
    fn the_diurnal_shortcut_decides_as_the_exact_rate_does() {
        let p = Arrivals::Diurnal { mean_pps: 35_000.0, amplitude: 0.9, period_s: 0.01, phase: 0.3 };
        let mut g = ArrivalGen::new(p.clone(), stream(5, Purpose::Arrivals, 0, 0));
        let mut u = stream(6, Purpose::Arrivals, 0, 0);
        let (mut shortcut, mut n) = (0, 0);
        let mut t_s = 0.0;
        while t_s < 0.05 {
            t_s += u.unit() * 2e-5;
            // Near the rate half the time, so that both branches and the fall-through are hit.
            let r = p.rate_at(t_s);
            let x = if n % 2 == 0 { r * (1.0 + (u.unit() - 0.5) * 1e-3) } else { u.unit() * g.max_rate };
            let before = g.memo_t_s;
            assert_eq!(g.keep(x, t_s), x < r, "t = {t_s} s, x = {x}, rate = {r}");
            shortcut += u64::from(g.memo_t_s.to_bits() == before.to_bits());
            n += 1;
        }
        assert!(shortcut > n / 4 && shortcut < n, "{shortcut} of {n} decided without the sine");
    }

    #[test]
    fn thinning_follows_a_ramp() {
        let p = Arrivals::Ramp { from_pps: 0.0, to_pps: 2e5, over_s: 1.0 };
        let mut g = ArrivalGen::new(p, stream(3, Purpose::Arrivals, 0, 0));
        let (mut first_half, mut second_half) = (0u64, 0u64);
        while g.peek() < 1_000_000_000 {
            if g.peek() < 500_000_000 {
                first_half += 1;
            } else {
                second_half += 1;
            }
            g.advance();
        }
        // ∫ rate: 25k in the first half second, 75k in the second.
        assert!((first_half as f64 / 25_000.0 - 1.0).abs() < 0.03, "{first_half}");
        assert!((second_half as f64 / 75_000.0 - 1.0).abs() < 0.03, "{second_half}");
    }
}
