//! Parsers of `env::live` against fixture copies of real files (see `fixtures/live/README.md`)
//! and against this machine's own `/proc` and `/sys` (read only).

use std::path::Path;

use moderato_env::live::counters::{self, Delta};
use moderato_env::live::cpu;
use moderato_env::live::interrupts::{self, IrqKind, parse_interrupts};

mod common;

use common::{fixture, sysfs};

fn read(rel: &str) -> String {
    std::fs::read_to_string(fixture(rel)).unwrap()
}

#[test]
fn interrupts_of_a_64_cpu_host_parse_with_every_column() {
    let t = parse_interrupts(&read("proc-host-64cpu/interrupts")).unwrap();
    assert_eq!(t.cpus, (0..64).collect::<Vec<u32>>());
    // ixgbe queue 3 is pinned to CPU 6.
    let q3 = t.by_number(123).unwrap();
    assert_eq!(q3.per_cpu.len(), 64);
    assert_eq!(q3.per_cpu[6], 18_382_910);
    assert_eq!(q3.total(), 18_382_910 + 63 * 3);
    assert_eq!(q3.chip, "IR-PCI-MSIX-0000:01:00.0 3-edge");
    assert_eq!(q3.actions, vec!["eno1-TxRx-3"]);
    // A shared line keeps every handler, one with a space in its name.
    assert_eq!(t.by_number(26).unwrap().actions, vec!["PCIe PME", "aerdrv"]);
    // `9-fasteoi` is a flow column too.
    assert_eq!(t.by_number(9).unwrap().actions, vec!["acpi"]);
    // Architecture counters: named, with their description and no handler; ERR has one count.
    let loc = t.line("LOC").unwrap();
    assert_eq!(loc.per_cpu.len(), 64);
    assert_eq!(loc.chip, "Local timer interrupts");
    assert!(loc.actions.is_empty());
    assert_eq!(t.line("ERR").unwrap().per_cpu, vec![0]);
    assert_eq!(t.by_number(216).unwrap().actions, vec!["mlx5_comp15@pci:0000:81:00.0"]);
}

#[test]
fn host_nic_lines_are_found_through_msi_irqs_without_control_vectors() {
    let t = parse_interrupts(&read("proc-host-64cpu/interrupts")).unwrap();
    let (_tmp, sys) = sysfs("sysfs-host");

    let ixgbe = interrupts::find_irqs(&t, &sys, "eno1", &[]);
    assert_eq!(ixgbe.found_by, "msi_irqs");
    let ids: Vec<&str> = ixgbe.lines.iter().map(|(id, _)| id.as_str()).collect();
    // 120..=127 are the queue pairs; 128 (named `eno1`, link status) is left out.
    assert_eq!(ids, ["120", "121", "122", "123", "124", "125", "126", "127"]);
    assert!(ixgbe.lines.iter().all(|(_, k)| *k == IrqKind::Combined));

    let mlx = interrupts::find_irqs(&t, &sys, "ens2f0np0", &[]);
    assert_eq!(mlx.found_by, "msi_irqs");
    let numbers: Vec<u32> = mlx.lines.iter().map(|(id, _)| id.parse().unwrap()).collect();
    // Port 0's 16 completion vectors; not its async vector (200), not port 1's (230..=246).
    assert_eq!(numbers, (201..=216).collect::<Vec<u32>>());

    // A tap has no device and no queue lines: no interrupt rate.
    assert!(interrupts::find_irqs(&t, &sys, "vnet0", &[]).is_empty());

    // Configured names override discovery.
    let cfg = interrupts::find_irqs(&t, &sys, "ens2f0np0", &["mlx5_comp0@pci:0000:81:00.0".to_string()]);
    assert_eq!(cfg.lines, vec![("201".to_string(), IrqKind::Combined)]);
}

#[test]
fn virtio_guest_lines_are_split_into_rx_and_tx() {
    let t = parse_interrupts(&read("proc-guest-virtio/interrupts")).unwrap();
    let (_tmp, sys) = sysfs("sysfs-guest-virtio");
    assert_eq!(interrupts::virtio_device(&sys, "eth0").as_deref(), Some("virtio2"));
    let set = interrupts::find_irqs(&t, &sys, "eth0", &[]);
    // msi_irqs sits on the PCI function, one level above the virtio device.
    assert_eq!(set.found_by, "msi_irqs");
    assert_eq!(
        set.lines,
        vec![
            ("38".to_string(), IrqKind::Rx),
            ("39".to_string(), IrqKind::Tx),
            ("40".to_string(), IrqKind::Rx),
            ("41".to_string(), IrqKind::Tx),
        ]
    );
}

#[test]
fn xen_netfront_lines_are_found_by_queue_names() {
    let t = parse_interrupts(&read("proc-guest-xen/interrupts")).unwrap();
    assert_eq!(t.by_number(54).unwrap().chip, "xen-dyn -event");
    // `-ioapic-edge` is a flow column as well.
    assert_eq!(t.by_number(1).unwrap().actions, vec!["i8042"]);
    let (_tmp, sys) = sysfs("sysfs-guest-xen");
    let set = interrupts::find_irqs(&t, &sys, "eth0", &[]);
    assert_eq!(set.found_by, "queue names");
    let kinds: Vec<(&str, IrqKind)> = set.lines.iter().map(|(id, k)| (id.as_str(), *k)).collect();
    assert_eq!(kinds, [("54", IrqKind::Tx), ("55", IrqKind::Rx), ("56", IrqKind::Tx), ("57", IrqKind::Rx)]);
}

#[test]
fn arm_gic_lines_with_a_trigger_column_parse() {
    let text = "           CPU0       CPU1       \n\
                 11:      51234      50012     GICv3  27 Level     arch_timer\n\
                 48:     771234          0     ITS-MSI 524288 Edge      eth0-rx-0\n\
                 49:          0     661234     ITS-MSI 524289 Edge      eth0-tx-0\n\
                IPI0:      1234       2345       Rescheduling interrupts\n";
    let t = parse_interrupts(text).unwrap();
    assert_eq!(t.by_number(11).unwrap().actions, vec!["arch_timer"]);
    assert_eq!(t.by_number(48).unwrap().actions, vec!["eth0-rx-0"]);
    let set = interrupts::find_irqs(&t, Path::new("/nonexistent"), "eth0", &[]);
    assert_eq!(set.lines, vec![("48".to_string(), IrqKind::Rx), ("49".to_string(), IrqKind::Tx)]);
}

#[test]
fn malformed_interrupts_name_the_line() {
    let err = parse_interrupts("           CPU0\n 38:  x  virtio\n").unwrap_err();
    assert_eq!(err.line, 2);
    assert!(err.to_string().contains("line 2"), "{err}");
    assert!(parse_interrupts("").is_err());
    assert!(parse_interrupts("   CPU0 CPUx\n").is_err());
}

#[test]
fn proc_stat_of_a_64_cpu_host_gives_numbered_cpus() {
    let path = fixture("proc-host-64cpu/stat");
    let s = cpu::parse_stat(&read("proc-host-64cpu/stat"), &path).unwrap();
    assert_eq!(s.per_cpu.len(), 64);
    assert_eq!(s.per_cpu[63].0, 63);
    // cpu0: user 100000 nice 20 system 30000 idle 2000000 iowait 500 irq 4000 softirq 9000.
    assert_eq!(s.per_cpu[0].1, cpu::CpuTicks { irq: 13_000, other: 130_020, total: 2_143_520 });
    // Guest time (CPUs 16..) is counted in user by the kernel and taken out of `other` here.
    assert_eq!(s.per_cpu[16].1.other, 100_016 + 20 + 30_016 - 50_000);
}

#[test]
fn proc_stat_with_offline_cpus_keeps_their_numbers() {
    let text = "cpu  30 0 30 300 0 3 3 0 0 0\n\
                cpu0 10 0 10 100 0 1 1 0 0 0\n\
                cpu1 10 0 10 100 0 1 1 0 0 0\n\
                cpu3 10 0 10 100 0 1 1 0 0 0\n\
                ctxt 1\nbtime 1\nprocesses 1\n";
    let s = cpu::parse_stat(text, Path::new("stat")).unwrap();
    assert_eq!(s.per_cpu.iter().map(|(n, _)| *n).collect::<Vec<_>>(), [0, 1, 3]);
    let later = "cpu  60 0 30 420 0 9 9 0 0 0\n\
                 cpu0 10 0 10 100 0 1 1 0 0 0\n\
                 cpu1 10 0 10 100 0 1 1 0 0 0\n\
                 cpu3 40 0 10 220 0 7 7 0 0 0\n\
                 ctxt 1\nbtime 1\nprocesses 1\n";
    let s2 = cpu::parse_stat(later, Path::new("stat")).unwrap();
    // Only cpu3 moved: 30 other + 12 irq of 162 ticks.
    let only3 = cpu::shares(&s, &s2, Some(&[3]));
    assert!((only3.other - 30.0 / 162.0).abs() < 1e-12);
    assert!((only3.irq - 12.0 / 162.0).abs() < 1e-12);
    let idle0 = cpu::shares(&s, &s2, Some(&[0]));
    assert_eq!((idle0.irq, idle0.other), (0.0, 0.0));
}

#[test]
fn virtio_guest_stat_snapshots_give_the_designed_shares() {
    let a = cpu::parse_stat(&read("proc-guest-virtio/stat"), Path::new("stat")).unwrap();
    let b = cpu::parse_stat(&read("proc-guest-virtio/stat.t1"), Path::new("stat.t1")).unwrap();
    let s = cpu::shares(&a, &b, None);
    assert!((s.irq - 0.1).abs() < 1e-12, "{s:?}");
    assert!((s.other - 0.25).abs() < 1e-12, "{s:?}");
    assert_eq!(cpu::per_cpu_shares(&a, &b).len(), 4);
}

#[test]
fn bad_proc_stat_names_the_file() {
    let err = cpu::parse_stat("cpu  x\n", Path::new("/fixture/stat")).unwrap_err();
    assert!(err.to_string().contains("/fixture/stat"), "{err}");
}

#[test]
fn sysfs_counters_of_the_fixture_tree() {
    let (_tmp, sys) = sysfs("sysfs-host");
    let c = counters::read_if_counters(&sys, "eno1").unwrap();
    assert_eq!(c.ifindex, Some(2));
    assert_eq!(c.rx_packets, 9_100_000_000);
    assert_eq!(c.drops(), 1_234);
    let tap = counters::read_if_counters(&sys, "vnet0").unwrap();
    assert_eq!(tap.tx_dropped, 42);
    let missing = counters::read_if_counters(&sys, "vnet9").unwrap_err();
    assert!(missing.to_string().contains("vnet9/statistics/rx_packets"), "{missing}");
    assert!(!counters::interface_exists(&sys, "vnet9"));
}

#[test]
fn counter_deltas_handle_wraps_and_resets() {
    assert_eq!(counters::delta(5, 5), Delta::Forward(0));
    assert_eq!(counters::delta(4_294_967_000, 704), Delta::Wrapped(1000));
    assert_eq!(counters::delta(9_100_000_000, 12), Delta::Reset(12));
}

// This machine's own files, read only.

#[test]
fn this_machines_proc_interrupts_parses() {
    let t = interrupts::read_interrupts(Path::new("/proc")).unwrap();
    let online = std::fs::read_dir("/sys/devices/system/cpu")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.starts_with("cpu") && n[3..].parse::<u32>().is_ok()
        })
        .count();
    assert!(
        !t.cpus.is_empty() && t.cpus.len() <= online,
        "{} CPUs in the header, {online} in sysfs",
        t.cpus.len()
    );
    assert!(t.line("LOC").is_some() || t.lines.iter().any(|l| l.number().is_some()));
    // Every line with a flow column parsed its handler names without the chip.
    for l in t.lines.iter().filter(|l| l.number().is_some()) {
        assert!(l.actions.iter().all(|a| !a.ends_with("-edge")), "{l:?}");
    }
}

#[test]
fn this_machines_interfaces_and_cpu_read() {
    let sys = Path::new("/sys");
    let table = interrupts::read_interrupts(Path::new("/proc")).unwrap();
    for entry in std::fs::read_dir("/sys/class/net").unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        let c = counters::read_if_counters(sys, &name).unwrap();
        assert!(c.ifindex.is_some(), "{name}");
        // Finding lines must not fail, whatever the driver.
        let _ = interrupts::find_irqs(&table, sys, &name, &[]);
    }
    let a = cpu::read_stat(Path::new("/proc")).unwrap();
    assert!(!a.per_cpu.is_empty());
    let b = cpu::read_stat(Path::new("/proc")).unwrap();
    let s = cpu::shares(&a, &b, None);
    assert!((0.0..=1.0).contains(&s.irq) && (0.0..=1.0).contains(&s.other));
}
