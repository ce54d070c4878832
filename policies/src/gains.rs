//! The feedback controllers' gains, as eval and deploy configs set them: `[trim]` (the trim of a
//! model, [`crate::learned::trim::TrimGains`]) and `[slo_feedback]` ([`crate::slo_feedback::Gains`]).
//! Every key is optional and defaults to the documented value; a config without either table
//! runs the defaults.

use serde::{Deserialize, Serialize};

use crate::learned::trim::TrimGains;
use crate::slo_feedback::Gains;

/// The gains of every feedback controller a run may name.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerGains {
    /// `trim:<model>` and `trim-targets:<model>`.
    #[serde(default, skip_serializing_if = "is_default")]
    pub trim: TrimGains,
    /// `slo-feedback` and `slo-feedback:<p99_us>`.
    #[serde(default, skip_serializing_if = "is_default")]
    pub slo_feedback: Gains,
}

/// Whether `x` is its type's default (for `skip_serializing_if`: a config keeps only the tables
/// it changed).
pub fn is_default<T: Default + PartialEq>(x: &T) -> bool {
    *x == T::default()
}

impl ControllerGains {
    /// Refuses gains a controller cannot run with, naming the table and the key.
    pub fn check(&self) -> Result<(), String> {
        self.trim.check().map_err(|e| format!("[trim] {e}"))?;
        self.slo_feedback.check().map_err(|e| format!("[slo_feedback] {e}"))
    }

    /// Whether every gain is the documented default.
    pub fn is_default(&self) -> bool {
        *self == ControllerGains::default()
    }
}

pub(crate) fn finite(key: &str, x: f64) -> Result<(), String> {
    if x.is_finite() { Ok(()) } else { Err(format!("{key} = {x}: take a finite number")) }
}

pub(crate) fn at_least(key: &str, x: f64, lo: f64) -> Result<(), String> {
    finite(key, x)?;
    if x < lo { Err(format!("{key} = {x}: take a number of at least {lo}")) } else { Ok(()) }
}

pub(crate) fn within(key: &str, x: f64, lo: f64, hi: f64) -> Result<(), String> {
    finite(key, x)?;
    if x < lo || x > hi { Err(format!("{key} = {x}: take a number from {lo} to {hi}")) } else { Ok(()) }
}

/// A share of the target: above 0, at most 1.
pub(crate) fn share(key: &str, x: f64) -> Result<(), String> {
    finite(key, x)?;
    if x <= 0.0 || x > 1.0 {
        Err(format!("{key} = {x}: take a share of the target, above 0 and at most 1 (e.g. 0.8)"))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_pass_and_each_bad_key_is_named() {
        assert!(ControllerGains::default().check().is_ok());
        let mut g = ControllerGains::default();
        g.trim.setpoint = 1.5;
        let e = g.check().unwrap_err();
        assert!(e.starts_with("[trim] setpoint = 1.5"), "{e}");
        let mut g = ControllerGains::default();
        g.trim.window = 0;
        assert!(g.check().unwrap_err().contains("window = 0"));
        let mut g = ControllerGains::default();
        g.trim.floor_headroom = 0.9;
        assert!(g.check().unwrap_err().contains("floor_headroom 0.9 is above setpoint 0.8"));
        let mut g = ControllerGains::default();
        g.slo_feedback.decrease = f64::NAN;
        assert!(g.check().unwrap_err().starts_with("[slo_feedback] decrease = NaN"));
        let mut g = ControllerGains::default();
        g.slo_feedback.start = 9.0;
        assert!(g.check().unwrap_err().contains("start = 9: take a number from 0 to 8"));
    }
}
