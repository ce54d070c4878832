//! The DIM port against the kernel's reference vectors: 60 sequences of 800 `net_dim` calls
//! recorded from the kernel's own algorithm (see `policies/testdata/README.md`). Every row's state
//! after the call must match.

use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;

use flate2::read::GzDecoder;
use moderato_env::{Direction, DriverSample, LayerController};
use moderato_policies::adaptive::dim::{
    CqPeriodMode, DimController, DimSample, DimState, NET_DIM_RX_EQE_PROFILES, NetDim,
};

const ROWS: usize = 48_000;
const SEQUENCES: usize = 60;

/// One row of `net_dim_vectors.csv`: a call's sample and the kernel's state after it.
#[derive(Debug, Clone, Copy, serde::Deserialize)]
struct Row {
    seq: u32,
    step: u32,
    time_ns: u64,
    event_ctr: u16,
    pkt_ctr: u32,
    byte_ctr: u32,
    state: u8,
    tune_state: u8,
    profile_ix: u8,
    steps_left: u8,
    steps_right: u8,
    tired: u8,
    applied: u8,
}

/// The columns a row checks, in the CSV's order and numbering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Observed {
    state: u8,
    tune_state: u8,
    profile_ix: u8,
    steps_left: u8,
    steps_right: u8,
    tired: u8,
    applied: u8,
}

impl Row {
    fn sample(&self) -> DimSample {
        DimSample {
            time_ns: self.time_ns,
            pkt_ctr: self.pkt_ctr,
            byte_ctr: self.byte_ctr,
            event_ctr: self.event_ctr,
            comp_ctr: 0,
        }
    }

    fn expected(&self) -> Observed {
        Observed {
            state: self.state,
            tune_state: self.tune_state,
            profile_ix: self.profile_ix,
            steps_left: self.steps_left,
            steps_right: self.steps_right,
            tired: self.tired,
            applied: self.applied,
        }
    }
}

fn observed(dim: &NetDim, applied: bool) -> Observed {
    Observed {
        state: dim.state as u8,
        tune_state: dim.tune_state as u8,
        profile_ix: dim.profile_ix,
        steps_left: dim.steps_left,
        steps_right: dim.steps_right,
        tired: dim.tired,
        applied: u8::from(applied),
    }
}

fn vectors_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata").join("net_dim_vectors.csv.gz")
}

fn read_rows() -> Vec<Row> {
    let path = vectors_path();
    let file = File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut reader = csv::Reader::from_reader(BufReader::new(GzDecoder::new(file)));
    reader
        .deserialize()
        .enumerate()
        .map(|(i, r)| r.unwrap_or_else(|e| panic!("{}: data row {}: {e}", path.display(), i + 1)))
        .collect()
}

#[test]
fn net_dim_reproduces_every_kernel_reference_row() {
    let rows = read_rows();
    assert_eq!(rows.len(), ROWS, "row count of the reference vectors");

    let mut dim = NetDim::default();
    let mut seq = None;
    let mut sequences = 0;
    let mut applied_rows = 0;
    for row in &rows {
        if seq != Some(row.seq) {
            // Every sequence starts from a fresh `struct dim`, at step 0.
            assert_eq!(row.step, 0, "seq {} does not start at step 0", row.seq);
            dim = NetDim::default();
            seq = Some(row.seq);
            sequences += 1;
        }
        let before = dim.clone();

        dim.net_dim(&row.sample());
        // The driver's work item applies a chosen profile and restarts measuring before the next
        // call; the recorded state is the one after that reset.
        let applied = dim.state == DimState::ApplyNewProfile;
        if applied {
            dim.state = DimState::StartMeasure;
            applied_rows += 1;
        }

        let got = observed(&dim, applied);
        assert_eq!(
            got,
            row.expected(),
            "first mismatch at seq {} step {}\n sample: {:?}\n kernel: {:?}\n port:   {:?}\n port before the call: {:?}",
            row.seq,
            row.step,
            row,
            row.expected(),
            got,
            before,
        );
    }

    assert_eq!(sequences, SEQUENCES, "sequences in the reference vectors");
    // The data must exercise decisions, not only measurement.
    assert!(applied_rows > 0, "no row applied a profile");
    eprintln!("checked {} rows in {sequences} sequences ({applied_rows} profile changes)", rows.len());
}

#[test]
fn dim_controller_emits_the_rx_eqe_profile_exactly_on_applied_rows() {
    let rows = read_rows();
    let mut ctl = DimController::new(CqPeriodMode::Eqe, Direction::Rx);
    let mut seq = None;
    let mut changes = 0;
    for row in &rows {
        if seq != Some(row.seq) {
            ctl = DimController::new(CqPeriodMode::Eqe, Direction::Rx);
            // Profile 1 of the receive EQE table: 8 µs / 256 packets.
            assert_eq!(ctl.initial(), NET_DIM_RX_EQE_PROFILES[1].knobs());
            seq = Some(row.seq);
        }
        let sample = DriverSample {
            time_ns: row.time_ns,
            event_ctr: row.event_ctr,
            pkt_ctr: row.pkt_ctr,
            byte_ctr: row.byte_ctr,
        };
        let knobs = ctl.on_notification(&sample);
        // Knobs come back exactly on the rows where the kernel applied a profile, and they are that
        // row's profile.
        let expected =
            (row.applied == 1).then(|| NET_DIM_RX_EQE_PROFILES[usize::from(row.profile_ix)].knobs());
        assert_eq!(knobs, expected, "seq {} step {}", row.seq, row.step);
        // The controller never leaves the work item pending.
        assert_ne!(ctl.dim.state, DimState::ApplyNewProfile, "seq {} step {}", row.seq, row.step);
        changes += usize::from(knobs.is_some());
    }
    assert!(changes > 0, "the vectors never changed a profile");
}
