//! Safety limits: every knob clamped to operator bounds, and each step's change limited.
//!
//! A policy's decision goes through [`Limits::apply`] before it reaches a driver. For each layer
//! this side sets and each direction:
//! - fixed knobs move at most `max_change_usecs` / `max_change_frames` from the previous decision
//!   (at start: the settings read from the driver), then are clamped into the bounds, so the
//!   bounds always win;
//! - an adaptive mode passes where `allow_adaptive` is true; elsewhere the direction keeps its
//!   previous setting.
//!
//! Directions are the VM's, as everywhere in the project: a backend's `rx` is towards the guest.

use std::collections::BTreeMap;

use moderato_env::{CoalescingSettings, Direction, Knobs, LayerId, LayerKind, LayerSettings, Moderation};
use serde::Deserialize;

/// Inclusive bounds of one knob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Range {
    pub min: u32,
    pub max: u32,
}

impl Range {
    fn clamp(self, v: u32) -> u32 {
        v.clamp(self.min, self.max)
    }
}

/// Limits of one layer kind (`[limits.nic]`, `[limits.backend]`, `[limits.frontend]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerLimits {
    pub rx_usecs: Range,
    pub rx_frames: Range,
    pub tx_usecs: Range,
    pub tx_frames: Range,
    /// Largest change of a usecs knob in one step.
    pub max_change_usecs: u32,
    /// Largest change of a frames knob in one step.
    pub max_change_frames: u32,
    /// Whether the policy may turn on the driver's adaptive moderation.
    pub allow_adaptive: bool,
}

/// Moves `from` towards `to` by at most `max`.
fn step(from: u32, to: u32, max: u32) -> u32 {
    if to > from { to.min(from.saturating_add(max)) } else { to.max(from.saturating_sub(max)) }
}

impl LayerLimits {
    fn ranges(&self, dir: Direction) -> (Range, Range) {
        match dir {
            Direction::Rx => (self.rx_usecs, self.rx_frames),
            Direction::Tx => (self.tx_usecs, self.tx_frames),
        }
    }

    /// One direction: `wanted` limited against `prev`; notes say what was changed and why.
    fn limit_dir(
        &self,
        dir: Direction,
        wanted: Moderation,
        prev: Option<Moderation>,
        notes: &mut Vec<String>,
        layer: LayerId,
    ) -> Moderation {
        let (r_us, r_fr) = self.ranges(dir);
        let d = dir.name();
        let clamp = |k: Knobs| Knobs::new(r_us.clamp(k.usecs), r_fr.clamp(k.frames));
        match wanted {
            Moderation::Adaptive(_) if self.allow_adaptive => wanted,
            Moderation::Adaptive(m) => {
                let kept = match prev {
                    Some(Moderation::Fixed(k)) => Moderation::Fixed(clamp(k)),
                    Some(p @ Moderation::Adaptive(_)) => p,
                    None => Moderation::Fixed(clamp(Knobs::new(r_us.min, r_fr.min))),
                };
                notes.push(format!(
                    "{layer} {d}: adaptive ({}) refused by allow_adaptive = false; kept {}",
                    m.name(),
                    show(kept)
                ));
                kept
            }
            Moderation::Fixed(k) => {
                let stepped = match prev {
                    Some(Moderation::Fixed(p)) => Knobs::new(
                        step(p.usecs, k.usecs, self.max_change_usecs),
                        step(p.frames, k.frames, self.max_change_frames),
                    ),
                    _ => k,
                };
                let out = clamp(stepped);
                if stepped != k {
                    notes.push(format!(
                        "{layer} {d}: {} limited to {} (max change per step)",
                        show(wanted),
                        show(Moderation::Fixed(stepped))
                    ));
                }
                if out != stepped {
                    notes.push(format!(
                        "{layer} {d}: {} clamped to {} (bounds)",
                        show(Moderation::Fixed(stepped)),
                        show(Moderation::Fixed(out))
                    ));
                }
                Moderation::Fixed(out)
            }
        }
    }

    /// One layer's decision limited against its previous settings.
    pub fn limit(
        &self,
        layer: LayerId,
        wanted: LayerSettings,
        prev: Option<LayerSettings>,
        notes: &mut Vec<String>,
    ) -> LayerSettings {
        let mut out = wanted;
        for dir in Direction::BOTH {
            out.set(dir, self.limit_dir(dir, wanted.get(dir), prev.map(|p| p.get(dir)), notes, layer));
        }
        out
    }
}

/// `usecs/frames` or `adaptive(dim)`, for logs.
pub fn show(m: Moderation) -> String {
    match m {
        Moderation::Fixed(k) => format!("{}us/{}f", k.usecs, k.frames),
        Moderation::Adaptive(a) => format!("adaptive({})", a.name()),
    }
}

/// Limits of every layer kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub nic: LayerLimits,
    pub backend: LayerLimits,
    pub frontend: LayerLimits,
}

impl Limits {
    pub fn of(&self, kind: LayerKind) -> &LayerLimits {
        match kind {
            LayerKind::Nic => &self.nic,
            LayerKind::Backend => &self.backend,
            LayerKind::Frontend => &self.frontend,
        }
    }

    /// `decided` with every layer in `layers` limited against `previous`; other layers are
    /// copied (this side does not set them). Returns the notes of everything that was changed.
    pub fn apply(
        &self,
        decided: &CoalescingSettings,
        previous: &BTreeMap<LayerId, LayerSettings>,
        layers: &[LayerId],
    ) -> (CoalescingSettings, Vec<String>) {
        let mut out = decided.clone();
        let mut notes = Vec::new();
        for &id in layers {
            let limited =
                self.of(id.kind()).limit(id, *decided.layer(id), previous.get(&id).copied(), &mut notes);
            *out.layer_mut(id) = limited;
        }
        (out, notes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_moves_at_most_max() {
        assert_eq!(step(0, 100, 16), 16);
        assert_eq!(step(100, 0, 16), 84);
        assert_eq!(step(10, 12, 16), 12);
        assert_eq!(step(5, 0, 16), 0);
        assert_eq!(step(u32::MAX - 1, u32::MAX, 16), u32::MAX);
    }
}
