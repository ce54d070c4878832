//! `/proc/interrupts`: a parser (procfs does not parse this file) and the lookup of an
//! interface's interrupt lines.
//!
//! The file is a header of online CPUs (`CPU0 CPU1 ...`), then one line per interrupt:
//!
//! ```text
//!  38:          0       4631 PCI-MSIX-0000:00:03.0   1-edge      virtio2-input.0
//! 112:   18379910          0 IR-PCI-MSI 1572864-edge      eth0-TxRx-0
//! NMI:          0          0   Non-maskable interrupts
//! ```
//!
//! The kernel prints the chip, the hardware irq glued to the flow handler (`1-edge`,
//! `-event` for Xen event channels, `Level` on ARM GICs), then the handlers' device names
//! separated by `, `. Per-CPU counts are `unsigned int` in the kernel: they wrap at 2^32, which at
//! 100 k interrupts/s is about 12 hours, so deltas go through [`crate::live::counters::delta`].
//!
//! An interface's lines are found, in this order:
//! 1. names given in the config ([`InterfaceConfig::irq_names`](super::InterfaceConfig));
//! 2. the device's MSI vectors, `/sys/class/net/<if>/device/msi_irqs/` (or the parent device's, for
//!    virtio, whose `device` is the virtio device on a PCI function), minus control vectors;
//! 3. queue names that start with the interface name (`eth0-TxRx-0`, `eth0-q0-rx`,
//!    `i40e-eth0-TxRx-3`, Xen's `vif1.0-q0-tx`);
//! 4. for a virtio device, names of its queues (`virtio2-input.0`, `virtio2-output.0`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::LiveError;

/// One line of `/proc/interrupts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IrqLine {
    /// The first column without its colon: an IRQ number (`"38"`) or an architecture counter's
    /// name (`"NMI"`, `"LOC"`).
    pub id: String,
    /// Counts per online CPU, in header order; shorter for lines such as `ERR:` that have a single
    /// total.
    pub per_cpu: Vec<u64>,
    /// The chip, hardware irq and flow (`PCI-MSIX-0000:00:03.0 1-edge`), or the description of an
    /// architecture counter (`Non-maskable interrupts`).
    pub chip: String,
    /// Device names of the line's handlers (`["virtio2-input.0"]`); several on a shared line.
    pub actions: Vec<String>,
}

impl IrqLine {
    /// The IRQ number, for numbered lines.
    pub fn number(&self) -> Option<u32> {
        self.id.parse().ok()
    }

    pub fn total(&self) -> u64 {
        self.per_cpu.iter().sum()
    }
}

/// A parsed `/proc/interrupts`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InterruptTable {
    /// Online CPU numbers, from the header (`CPU0 CPU3` gives `[0, 3]`).
    pub cpus: Vec<u32>,
    pub lines: Vec<IrqLine>,
}

impl InterruptTable {
    pub fn line(&self, id: &str) -> Option<&IrqLine> {
        self.lines.iter().find(|l| l.id == id)
    }

    pub fn by_number(&self, irq: u32) -> Option<&IrqLine> {
        self.lines.iter().find(|l| l.number() == Some(irq))
    }
}

/// A line of `/proc/interrupts` that the parser could not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}: `{text}`")]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    pub message: String,
    pub text: String,
}

/// Whether `tok` is the flow column: `<hwirq>-<flow>` (`1-edge`, `9-fasteoi`, Xen's `-event` and
/// `-ioapic-edge`),
/// or a bare ARM GIC trigger (`Level`, `Edge`).
fn is_flow_token(tok: &str) -> bool {
    if matches!(tok, "Level" | "Edge" | "level" | "edge") {
        return true;
    }
    match tok.split_once('-') {
        Some((hw, flow)) => {
            hw.bytes().all(|b| b.is_ascii_digit())
                && !flow.is_empty()
                && flow.starts_with(|c: char| c.is_ascii_alphabetic())
                && flow.bytes().all(|b| b.is_ascii_alphabetic() || b == b'_' || b == b'-')
        }
        None => false,
    }
}

/// Parses the text of `/proc/interrupts`.
pub fn parse_interrupts(text: &str) -> Result<InterruptTable, ParseError> {
    let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
    let (hline, header) = lines.next().ok_or_else(|| ParseError {
        line: 1,
        message: "empty file".into(),
        text: String::new(),
    })?;
    let mut cpus = Vec::new();
    for tok in header.split_whitespace() {
        let n = tok.strip_prefix("CPU").and_then(|n| n.parse().ok()).ok_or_else(|| ParseError {
            line: hline + 1,
            message: "header column is not `CPU<n>`".into(),
            text: header.to_string(),
        })?;
        cpus.push(n);
    }
    if cpus.is_empty() {
        return Err(ParseError {
            line: hline + 1,
            message: "header names no CPU".into(),
            text: header.into(),
        });
    }
    let mut out = Vec::new();
    for (i, line) in lines {
        let err = |m: &str| ParseError { line: i + 1, message: m.to_string(), text: line.to_string() };
        let (id, rest) = line.split_once(':').ok_or_else(|| err("no `:` after the interrupt id"))?;
        let id = id.trim();
        if id.is_empty() || id.contains(char::is_whitespace) {
            return Err(err("bad interrupt id"));
        }
        let mut toks = rest.split_whitespace().peekable();
        let mut per_cpu = Vec::with_capacity(cpus.len());
        while per_cpu.len() < cpus.len() {
            match toks.peek().map(|t| t.parse::<u64>()) {
                Some(Ok(v)) => {
                    per_cpu.push(v);
                    toks.next();
                }
                _ => break,
            }
        }
        if per_cpu.is_empty() {
            return Err(err("no count"));
        }
        let desc: Vec<&str> = toks.collect();
        let (chip, actions) = if id.parse::<u32>().is_ok() {
            match desc.iter().skip(1).position(|t| is_flow_token(t)).map(|p| p + 1) {
                Some(flow) => {
                    let names = desc[flow + 1..].join(" ");
                    (desc[..=flow].join(" "), split_actions(&names))
                }
                // No flow column: the last word names the handler.
                None if desc.len() >= 2 => {
                    (desc[..desc.len() - 1].join(" "), vec![desc[desc.len() - 1].to_string()])
                }
                None => (desc.join(" "), Vec::new()),
            }
        } else {
            (desc.join(" "), Vec::new())
        };
        out.push(IrqLine { id: id.to_string(), per_cpu, chip, actions });
    }
    Ok(InterruptTable { cpus, lines: out })
}

fn split_actions(names: &str) -> Vec<String> {
    names.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()
}

/// Reads and parses `<procfs_root>/interrupts`.
pub fn read_interrupts(procfs_root: &Path) -> Result<InterruptTable, LiveError> {
    let path = procfs_root.join("interrupts");
    let text =
        std::fs::read_to_string(&path).map_err(|source| LiveError::Read { path: path.clone(), source })?;
    parse_interrupts(&text).map_err(|e| LiveError::Parse {
        path,
        line: e.line,
        message: e.message,
        text: e.text,
    })
}

/// What a queue's interrupt line carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IrqKind {
    /// Receive notifications (`virtio2-input.0`, `eth0-rx-0`, `eth0-q0-rx`).
    Rx,
    /// Transmit completions (`virtio2-output.0`, `eth0-tx-0`).
    Tx,
    /// A combined queue pair (`eth0-TxRx-0`, `mlx5_comp3@pci:...`).
    Combined,
    /// Control, link-status or admin vectors (`virtio2-config`, `mlx5_async0`, `...:misc`).
    Control,
}

/// Classifies a handler name by the words in it. `ifname` is the interface the line belongs to:
/// ixgbe names its link-status vector exactly after the interface.
pub fn classify(action: &str, ifname: &str) -> IrqKind {
    if action == ifname {
        return IrqKind::Control;
    }
    let lower = action.to_ascii_lowercase();
    let words: Vec<&str> = lower.split(['-', '_', '.', '@', ':', ' ']).filter(|w| !w.is_empty()).collect();
    let has = |p: &[&str]| words.iter().any(|w| p.iter().any(|p| w.starts_with(p)));
    let is = |p: &[&str]| words.iter().any(|w| p.contains(w));
    if has(&["txrx", "rxtx", "comp", "combined", "virtqueues"]) {
        IrqKind::Combined
    } else if has(&["config", "async", "ctrl", "cmd", "misc", "admin", "event", "lsc", "mbx", "fdir"])
        || is(&["err", "other"])
    {
        IrqKind::Control
    } else if is(&["rx", "input"]) {
        IrqKind::Rx
    } else if is(&["tx", "output"]) {
        IrqKind::Tx
    } else {
        IrqKind::Combined
    }
}

/// The interrupt lines of one interface.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IrqSet {
    /// `(line id, kind)`, control vectors left out.
    pub lines: Vec<(String, IrqKind)>,
    /// How the lines were found, for operators (`msi_irqs`, `queue names`, `config`).
    pub found_by: &'static str,
}

impl IrqSet {
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    pub fn has(&self, kinds: &[IrqKind]) -> bool {
        self.lines.iter().any(|(_, k)| kinds.contains(k))
    }
}

fn data_lines(
    table: &InterruptTable,
    ifname: &str,
    mut keep: impl FnMut(&IrqLine) -> bool,
) -> Vec<(String, IrqKind)> {
    let mut out = Vec::new();
    for line in table.lines.iter().filter(|l| keep(l)) {
        // A shared line is data if any handler is; the first data handler names the kind.
        let kind = line.actions.iter().map(|a| classify(a, ifname)).find(|k| *k != IrqKind::Control);
        if let Some(kind) = kind {
            out.push((line.id.clone(), kind));
        }
    }
    out
}

/// MSI vectors of the interface's device: `device/msi_irqs`, or the parent device's (virtio).
pub fn msi_irqs(sysfs_root: &Path, ifname: &str) -> Option<BTreeSet<u32>> {
    let device = sysfs_root.join("class/net").join(ifname).join("device");
    let mut candidates: Vec<PathBuf> = vec![device.join("msi_irqs")];
    if let Ok(real) = std::fs::canonicalize(&device)
        && let Some(parent) = real.parent()
    {
        candidates.push(parent.join("msi_irqs"));
    }
    for dir in candidates {
        if let Ok(rd) = std::fs::read_dir(&dir) {
            let set: BTreeSet<u32> = rd
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
                .collect();
            if !set.is_empty() {
                return Some(set);
            }
        }
    }
    None
}

/// The virtio device behind an interface (`virtio2`), where it is one.
pub fn virtio_device(sysfs_root: &Path, ifname: &str) -> Option<String> {
    let device = sysfs_root.join("class/net").join(ifname).join("device");
    let real = std::fs::canonicalize(device).ok()?;
    let name = real.file_name()?.to_str()?;
    (name.starts_with("virtio") && name["virtio".len()..].bytes().all(|b| b.is_ascii_digit()))
        .then(|| name.to_string())
}

/// Finds the data interrupt lines of `ifname` (see the module docs for the order).
pub fn find_irqs(table: &InterruptTable, sysfs_root: &Path, ifname: &str, configured: &[String]) -> IrqSet {
    if !configured.is_empty() {
        let lines =
            data_lines(table, ifname, |l| l.actions.iter().any(|a| configured.iter().any(|c| a.contains(c))));
        return IrqSet { lines, found_by: "config irq_names" };
    }
    if let Some(msi) = msi_irqs(sysfs_root, ifname) {
        let lines = data_lines(table, ifname, |l| l.number().is_some_and(|n| msi.contains(&n)));
        if !lines.is_empty() {
            return IrqSet { lines, found_by: "msi_irqs" };
        }
    }
    let prefix = format!("{ifname}-");
    let infix = format!("-{ifname}-");
    let lines = data_lines(table, ifname, |l| {
        l.actions.iter().any(|a| a.starts_with(&prefix) || a.contains(&infix) || a == ifname)
    });
    if !lines.is_empty() {
        return IrqSet { lines, found_by: "queue names" };
    }
    if let Some(virtio) = virtio_device(sysfs_root, ifname) {
        let vprefix = format!("{virtio}-");
        let lines =
            data_lines(table, ifname, |l| l.actions.iter().any(|a| a.starts_with(&vprefix) || *a == virtio));
        if !lines.is_empty() {
            return IrqSet { lines, found_by: "virtio queue names" };
        }
    }
    IrqSet::default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_tokens() {
        for t in ["1-edge", "1572864-edge", "9-fasteoi", "-event", "-virq", "Level", "0-edge", "-ioapic-edge"]
        {
            assert!(is_flow_token(t), "{t}");
        }
        for t in
            ["IO-APIC", "eth0-TxRx-0", "virtio2-input.0", "xen-dyn", "PCI-MSIX-0000:00:03.0", "xen-percpu"]
        {
            assert!(!is_flow_token(t), "{t}");
        }
    }

    #[test]
    fn classify_known_queue_names() {
        use IrqKind::*;
        let cases = [
            ("eth0-TxRx-0", Combined),
            ("i40e-eth0-TxRx-3", Combined),
            ("eth0", Control),
            ("i40e-0000:3b:00.0:misc", Control),
            ("mlx5_comp7@pci:0000:81:00.0", Combined),
            ("mlx5_async0@pci:0000:81:00.0", Control),
            ("virtio2-input.0", Rx),
            ("virtio2-output.3", Tx),
            ("virtio2-config", Control),
            ("virtio2-virtqueues", Combined),
            ("eth0-q0-rx", Rx),
            ("eth0-q1-tx", Tx),
            ("vif3.0-q0-tx", Tx),
            ("eth0-rx-2", Rx),
        ];
        for (name, kind) in cases {
            assert_eq!(classify(name, "eth0"), kind, "{name}");
        }
    }
}
