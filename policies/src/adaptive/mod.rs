//! Ports of the kernel's adaptive interrupt moderation, run inside a layer through the
//! environment's [`LayerController`] hook, at notification granularity, as drivers run them:
//!
//! - [`dim`]: Linux Dynamic Interrupt Moderation (`net_dim`, lib/dim), a hill climber over five
//!   moderation profiles, checked row by row against the kernel's reference vectors
//!   (`policies/tests/dim_vectors.rs`).
//! - [`itr`]: Intel ixgbe's adaptive ITR (`ixgbe_update_itr`), which picks the next interrupt
//!   interval from the packets and bytes of the last interrupt.
//!
//! Both are ports, not reinterpretations: they keep the kernel's names, integer widths and
//! wrap-arounds, so that a baseline labelled `dim` or `itr` behaves as a Linux host would.
//! [`AdaptiveFactory`] hands them to an environment.

pub mod dim;
pub mod itr;

use moderato_env::{Adaptive, ControllerFactory, Direction, LayerController, LayerId};
use serde::{Deserialize, Serialize};

pub use dim::{
    CqPeriodMode, DIM_NEVENTS, DimController, DimCqModer, DimSample, DimState, DimStats, DimTuneState, NetDim,
};
pub use itr::{ItrConfig, ItrController, IxgbeLinkSpeed, KernelHz};

/// A setting of an adaptive algorithm that no kernel would accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdaptiveConfigError {
    /// `CONFIG_HZ` outside Kconfig's choices.
    #[error("itr.hz = {hz}: the kernel tick rate (CONFIG_HZ) must be one of 100, 250, 300 or 1000")]
    KernelHz { hz: u32 },
}

/// Settings of the DIM port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DimConfig {
    /// Which profile tables to use: `eqe` (timer starts at the first event; the default) or `cqe`
    /// (timer restarts at each completion).
    pub cq_period_mode: CqPeriodMode,
}

/// Settings of both adaptive algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdaptiveConfig {
    pub dim: DimConfig,
    pub itr: ItrConfig,
}

/// Builds DIM and ITR controllers for an environment. Every layer runs the same algorithm, as
/// every driver on a Linux host would; receive streams use the receive profile table and transmit
/// streams the transmit table.
#[derive(Debug, Clone, Default)]
pub struct AdaptiveFactory {
    pub config: AdaptiveConfig,
}

impl AdaptiveFactory {
    pub fn new(config: AdaptiveConfig) -> Self {
        AdaptiveFactory { config }
    }
}

impl ControllerFactory for AdaptiveFactory {
    fn create(&self, mode: Adaptive, _layer: LayerId, dir: Direction) -> Option<Box<dyn LayerController>> {
        Some(match mode {
            Adaptive::Dim => Box::new(DimController::new(self.config.dim.cq_period_mode, dir)),
            Adaptive::Itr => Box::new(ItrController::new(self.config.itr, dir)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moderato_env::Knobs;

    #[test]
    fn factory_builds_both_modes_with_direction_tables() {
        let f = AdaptiveFactory::default();
        // DIM EQE default profile 1: rx 8 µs / 256 packets, tx 8 µs / 128 packets.
        let rx = f.create(Adaptive::Dim, LayerId::Nic, Direction::Rx).unwrap();
        assert_eq!(rx.initial(), Knobs::new(8, 256));
        let tx = f.create(Adaptive::Dim, LayerId::Backend(0), Direction::Tx).unwrap();
        assert_eq!(tx.initial(), Knobs::new(8, 128));
        // CQE default profile 1: rx 8 µs / 128 packets.
        let cqe = AdaptiveFactory::new(AdaptiveConfig {
            dim: DimConfig { cq_period_mode: CqPeriodMode::Cqe },
            ..AdaptiveConfig::default()
        });
        assert_eq!(
            cqe.create(Adaptive::Dim, LayerId::Frontend(1), Direction::Rx).unwrap().initial(),
            Knobs::new(8, 128)
        );
        // ITR: rx starts at IXGBE_20K_ITR (50 µs), tx at IXGBE_12K_ITR (84 µs), timer only.
        assert_eq!(
            f.create(Adaptive::Itr, LayerId::Nic, Direction::Rx).unwrap().initial(),
            Knobs::new(50, 0)
        );
        assert_eq!(
            f.create(Adaptive::Itr, LayerId::Nic, Direction::Tx).unwrap().initial(),
            Knobs::new(84, 0)
        );
    }

    #[test]
    fn config_rejects_unknown_hz_and_keys() {
        let ok: AdaptiveConfig = serde_json::from_str(
            r#"{"dim": {"cq_period_mode": "cqe"}, "itr": {"link_speed": "1g", "hz": 250}}"#,
        )
        .unwrap();
        assert_eq!(ok.dim.cq_period_mode, CqPeriodMode::Cqe);
        assert_eq!(ok.itr.hz, KernelHz::HZ_250);
        assert_eq!(ok.itr.link_speed, IxgbeLinkSpeed::Speed1GbFull);

        let bad_hz = serde_json::from_str::<AdaptiveConfig>(
            r#"{"dim": {"cq_period_mode": "eqe"}, "itr": {"link_speed": "10g", "hz": 512}}"#,
        )
        .unwrap_err();
        assert!(bad_hz.to_string().contains("itr.hz = 512"), "{bad_hz}");

        let unknown = serde_json::from_str::<AdaptiveConfig>(
            r#"{"dim": {"cq_period_mode": "eqe", "profile": 2}, "itr": {"link_speed": "10g", "hz": 1000}}"#,
        );
        assert!(unknown.is_err());
    }
}
