//! Host profiles: which moderation mechanisms each layer of a real hypervisor stack has.
//!
//! moderato's action gives every layer ethtool's four knobs and a NAPI deferral, but a real host
//! offers a subset. A profile names that subset, per layer, from the drivers' sources:
//!
//! | profile | NIC (host driver) | backend | frontend (guest driver) |
//! |---|---|---|---|
//! | `kvm-notf-coal` | ethtool knobs, NAPI deferral | ethtool knobs: the device's notification coalescing (`VIRTIO_NET_F_NOTF_COAL`, vDPA and hardware virtio) | ethtool knobs, NAPI deferral |
//! | `kvm-vhost` | ethtool knobs, NAPI deferral | none (vhost-net signals the guest whenever its callbacks are on; `drivers/vhost/net.c`) | NAPI deferral only (virtio-net refuses `ethtool -C` without NOTF_COAL, `virtnet_set_coalesce`; deferral keeps its callbacks off, so vhost stops notifying) |
//! | `xen` | ethtool knobs, NAPI deferral | none (netback has no coalescing; `drivers/net/xen-netback`) | NAPI deferral only (netfront polls with NAPI and has no `set_coalesce`; `drivers/net/xen-netfront.c`) |
//! | `sriov-vf` | none for the VMs' traffic (the NIC's switch puts it straight into each VF's rings; the PF's own knobs are left as they are) | none (no backend: the VF's DMA reaches guest memory, its MSI-X the vCPU) | ethtool knobs and NAPI deferral of the VF's driver in the guest (`iavf_set_coalesce` in `drivers/net/ethernet/intel/iavf/iavf_ethtool.c`, `ixgbevf`, `mlx5e` on a VF) |
//!
//! Where a layer lacks a mechanism the simulator keeps that mechanism at the kernel's default
//! ([`HostProfile::mask`]): per-packet notifications, which on NAPI stages means the interrupt
//! is re-armed after every completed poll, and no deferral. The knobs in force, not the ones
//! asked for, are what observations report.
//!
//! On `sriov-vf` the simulator's topology changes (`sim::engine`): a VM's packets go from the
//! wire into its VF's rx ring (the frontend's rx stage, costed as a NIC driver: `nic_per_packet_us`,
//! `nic_poll_us`, interrupts re-armed when a poll completes) and from its tx ring (a doorbell,
//! `vf_doorbell_us`, not a kick) onto the wire, whose completion interrupts the guest; the host's
//! driver and the backend see none of them.
//!
//! Not a separate stage: the tap's `rx-frames` (tun's `rx_batched`, which the live host sets on
//! `kvm-vhost`). `tun_rx_batched` runs only on tun's single-packet path (`tun_get_user`); vhost-net
//! takes that path only when the tap's `sndbuf` is limited or a frame does not fit a page
//! (`vhost_net_build_xdp` answers `-ENOSPC`). Otherwise `handle_tx_copy` hands tun whole batches
//! of up to `VHOST_NET_BATCH` (64) XDP buffers (`vhost_tx_batch`, `tun_sendmsg` with
//! `TUN_MSG_PTR`, Linux 4.19+), which the simulator's backend tx worker already does: a run's
//! frames move on together at its end. IRQ suspension and busy polling are a VM's `polling`
//! (the application's choice, [`crate::AppPolling`]), on every profile whose guest has NAPI.

use serde::{Deserialize, Serialize};

use crate::settings::{CoalescingSettings, LayerId, LayerKind, LayerSettings, NapiParams};
use crate::sim::BackendKind;

/// A host's moderation mechanisms (see the [module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostProfile {
    /// A virtio device with `VIRTIO_NET_F_NOTF_COAL`: ethtool knobs on every layer (the model
    /// moderato had before profiles), NAPI deferral on the NIC and the frontend.
    KvmNotfCoal,
    /// Stock QEMU + vhost-net + virtio-net: the NIC's knobs and NAPI deferral on the NIC and in
    /// the guest.
    KvmVhost,
    /// Xen netback / netfront: the NIC's knobs and NAPI deferral on the NIC and in the guest.
    Xen,
    /// SR-IOV: each guest drives a virtual function of the NIC, with its driver's ethtool knobs
    /// and NAPI deferral; its packets bypass the host's driver and the backend.
    SriovVf,
}

/// What one layer of a profile offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerMechanisms {
    /// ethtool's four coalescing knobs (and the driver's adaptive moderation, on the NIC).
    pub coalescing: bool,
    /// NAPI deferral (`napi_defer_hard_irqs`, `gro_flush_timeout`).
    pub deferral: bool,
}

impl HostProfile {
    pub const ALL: [HostProfile; 4] =
        [HostProfile::KvmNotfCoal, HostProfile::KvmVhost, HostProfile::Xen, HostProfile::SriovVf];

    pub fn name(self) -> &'static str {
        match self {
            HostProfile::KvmNotfCoal => "kvm-notf-coal",
            HostProfile::KvmVhost => "kvm-vhost",
            HostProfile::Xen => "xen",
            HostProfile::SriovVf => "sriov-vf",
        }
    }

    /// The profile named `s`; the error lists the names.
    pub fn parse(s: &str) -> Result<HostProfile, String> {
        HostProfile::ALL.into_iter().find(|p| p.name() == s).ok_or_else(|| {
            let names: Vec<&str> = HostProfile::ALL.iter().map(|p| p.name()).collect();
            format!("unknown host profile `{s}`; write one of {}", names.join(", "))
        })
    }

    /// The backend this profile's hosts run (`sriov-vf`: a KVM host, whose vhost its VMs' packets
    /// bypass).
    pub fn backend(self) -> BackendKind {
        match self {
            HostProfile::KvmNotfCoal | HostProfile::KvmVhost | HostProfile::SriovVf => BackendKind::Vhost,
            HostProfile::Xen => BackendKind::Xen,
        }
    }

    /// What a layer of `kind` offers on this profile.
    pub fn mechanisms(self, kind: LayerKind) -> LayerMechanisms {
        let (coalescing, deferral) = match (self, kind) {
            (HostProfile::SriovVf, LayerKind::Nic | LayerKind::Backend) => (false, false),
            (HostProfile::SriovVf, LayerKind::Frontend) => (true, true),
            (_, LayerKind::Nic) => (true, true),
            (HostProfile::KvmNotfCoal, LayerKind::Backend) => (true, false),
            (_, LayerKind::Backend) => (false, false),
            (HostProfile::KvmNotfCoal, LayerKind::Frontend) => (true, true),
            (_, LayerKind::Frontend) => (false, true),
        };
        LayerMechanisms { coalescing, deferral }
    }

    /// `s` as this profile's host applies it: a mechanism the layer lacks stays at the kernel's
    /// default (per-packet, no deferral).
    pub fn mask_layer(self, kind: LayerKind, s: &mut LayerSettings) {
        let m = self.mechanisms(kind);
        if !m.coalescing {
            s.rx = LayerSettings::PER_PACKET.rx;
            s.tx = LayerSettings::PER_PACKET.tx;
        }
        if !m.deferral {
            s.napi = NapiParams::OFF;
        }
    }

    /// Every layer of `s` masked ([`mask_layer`](Self::mask_layer)).
    pub fn mask(self, s: &mut CoalescingSettings) {
        let ids: Vec<LayerId> = s.layer_ids().collect();
        for id in ids {
            self.mask_layer(id.kind(), s.layer_mut(id));
        }
    }
}

/// `kvm-notf-coal`: every mechanism, the model before profiles (what a host or a scenario that
/// names no profile has).
impl Default for HostProfile {
    fn default() -> Self {
        HostProfile::KvmNotfCoal
    }
}

impl std::fmt::Display for HostProfile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::{Moderation, VmSettings};

    #[test]
    fn names_round_trip_and_unknown_ones_list_the_choices() {
        for p in HostProfile::ALL {
            assert_eq!(HostProfile::parse(p.name()), Ok(p));
            let toml = format!("p = \"{}\"", p.name());
            #[derive(Deserialize)]
            struct W {
                p: HostProfile,
            }
            assert_eq!(toml::from_str::<W>(&toml).unwrap().p, p);
        }
        let e = HostProfile::parse("kvm").unwrap_err();
        assert!(e.contains("kvm-vhost") && e.contains("xen") && e.contains("`kvm`"), "{e}");
        assert_eq!(HostProfile::parse("sriov-vf"), Ok(HostProfile::SriovVf));
    }

    #[test]
    fn masks_keep_what_each_layer_has_and_reset_the_rest() {
        let napi = NapiParams::new(2, 20_000);
        let heavy = LayerSettings {
            napi,
            ..LayerSettings::fixed(crate::Knobs::new(64, 32), crate::Knobs::new(64, 32))
        };
        let all = CoalescingSettings { nic: heavy, vms: vec![VmSettings::new(heavy, heavy)] };
        let mut s = all.clone();
        HostProfile::KvmNotfCoal.mask(&mut s);
        assert_eq!(s.nic, heavy);
        assert_eq!(s.vms[0].backend.napi, NapiParams::OFF, "no NAPI in a backend");
        assert_eq!(s.vms[0].backend.rx, heavy.rx);
        assert_eq!(s.vms[0].frontend, heavy);
        for p in [HostProfile::KvmVhost, HostProfile::Xen] {
            let mut s = all.clone();
            p.mask(&mut s);
            assert_eq!(s.nic, heavy, "{p}: the NIC keeps everything");
            assert_eq!(s.vms[0].backend, LayerSettings::PER_PACKET, "{p}");
            assert_eq!(s.vms[0].frontend.rx, Moderation::PER_PACKET, "{p}");
            assert_eq!(s.vms[0].frontend.napi, napi, "{p}: the guest keeps its deferral");
        }
        assert_eq!(HostProfile::Xen.backend(), BackendKind::Xen);
        assert_eq!(
            HostProfile::KvmVhost.mechanisms(LayerKind::Frontend),
            LayerMechanisms { coalescing: false, deferral: true }
        );
    }
}
