//! A port of Linux Dynamic Interrupt Moderation: `lib/dim/net_dim.c`, `lib/dim/dim.c` and the parts
//! of `include/linux/dim.h` that `net_dim` uses.
//!
//! # How the algorithm works
//!
//! A driver calls [`NetDim::net_dim`] after every interrupt's poll with cumulative counters. Every
//! [`DIM_NEVENTS`] interrupts DIM closes a measurement window, turns it into rates
//! ([`dim_calc_stats`]) and compares them with the previous window ([`net_dim_stats_compare`]):
//! more bytes per msec is better, then more packets per msec, then fewer interrupts per msec. A
//! small state machine ([`NetDim::net_dim_decision`]) walks a table of five moderation profiles,
//! from profile 0 (least moderation) to 4 (most): it keeps stepping in one direction while the
//! rates improve, turns round when they do not, and parks once it has found a top (a profile
//! that is better than both neighbours) or has taken too many steps ([`DimTuneState`]).
//!
//! # Names
//!
//! Functions, constants and fields keep the kernel's names, so this file can be read side by side
//! with the C. Enums use Rust's CamelCase for the kernel's constants, with the kernel name as a
//! doc alias and the kernel's numeric value as the discriminant:
//!
//! | kernel | here |
//! |---|---|
//! | `DIM_START_MEASURE`, `DIM_MEASURE_IN_PROGRESS`, `DIM_APPLY_NEW_PROFILE` | [`DimState`] |
//! | `DIM_PARKING_ON_TOP`, `DIM_PARKING_TIRED`, `DIM_GOING_RIGHT`, `DIM_GOING_LEFT` | [`DimTuneState`] |
//! | `DIM_STATS_WORSE`, `DIM_STATS_SAME`, `DIM_STATS_BETTER` | [`DimStatsResult`] |
//! | `DIM_STEPPED`, `DIM_TOO_TIRED`, `DIM_ON_EDGE` | [`DimStepResult`] |
//! | `DIM_CQ_PERIOD_MODE_START_FROM_EQE`, `..._CQE` | [`CqPeriodMode`] |
//! | `struct dim`, `struct dim_sample`, `struct dim_stats`, `struct dim_cq_moder` | [`NetDim`], [`DimSample`], [`DimStats`], [`DimCqModer`] |
//!
//! # Integer arithmetic
//!
//! The port keeps the kernel's widths, because the reference vectors
//! (`policies/testdata/net_dim_vectors.csv.gz`) exercise every one of them: the event gap is taken
//! modulo 2^16, packet and byte gaps modulo 2^32, `npkts * 1000` and `nbytes * 1000` wrap in u32,
//! and [`IS_SIGNIFICANT_DIFF`] is unsigned integer arithmetic.
//!
//! # The driver side
//!
//! `net_dim` only decides. When it moves to [`DimState::ApplyNewProfile`] the kernel schedules the
//! driver's work item, which programs the profile's moderation into the hardware and sets the state
//! back to [`DimState::StartMeasure`]. [`DimController`] emulates that work item synchronously, so
//! the new knobs take effect before the next notification.

use moderato_env::{Direction, DriverSample, Knobs, LayerController};

/// Interrupts (events) per decision window (`DIM_NEVENTS`, include/linux/dim.h).
pub const DIM_NEVENTS: u16 = 64;

/// Profiles per table (`NET_DIM_PARAMS_NUM_PROFILES`, lib/dim/net_dim.c).
pub const NET_DIM_PARAMS_NUM_PROFILES: usize = 5;

/// Default profile index in EQE mode (`NET_DIM_DEF_PROFILE_EQE`, lib/dim/net_dim.c).
pub const NET_DIM_DEF_PROFILE_EQE: u8 = 1;

/// Default profile index in CQE mode (`NET_DIM_DEF_PROFILE_CQE`, lib/dim/net_dim.c).
pub const NET_DIM_DEF_PROFILE_CQE: u8 = 1;

/// Microseconds per millisecond: the factor that turns per-µs gaps into per-msec rates.
const USEC_PER_MSEC: u32 = 1000;

/// The significance threshold of [`IS_SIGNIFICANT_DIFF`], in percent.
const SIGNIFICANT_DIFF_PERCENT: u64 = 10;

/// One moderation profile (`struct dim_cq_moder`): the completion-queue timer and packet count
/// that the driver programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DimCqModer {
    /// CQ timer, microseconds.
    pub usec: u16,
    /// CQ packet (completion) count that fires the interrupt.
    pub pkts: u16,
}

impl DimCqModer {
    const fn new(usec: u16, pkts: u16) -> Self {
        DimCqModer { usec, pkts }
    }

    /// The profile as ethtool knobs: `usec` is the timer, `pkts` the count trigger.
    pub fn knobs(self) -> Knobs {
        Knobs { usecs: u32::from(self.usec), frames: u32::from(self.pkts) }
    }
}

/// When the CQ timer starts (`DIM_CQ_PERIOD_MODE_*`, include/linux/dim.h). Each mode has its own
/// profile tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CqPeriodMode {
    /// The timer starts at the first event (`DIM_CQ_PERIOD_MODE_START_FROM_EQE`); the kernel's
    /// default for most drivers.
    #[default]
    #[doc(alias = "DIM_CQ_PERIOD_MODE_START_FROM_EQE")]
    Eqe = 0,
    /// The timer restarts at every completion (`DIM_CQ_PERIOD_MODE_START_FROM_CQE`).
    #[doc(alias = "DIM_CQ_PERIOD_MODE_START_FROM_CQE")]
    Cqe = 1,
}

impl CqPeriodMode {
    /// The default profile index for this mode (`NET_DIM_DEF_PROFILE_*`).
    pub fn default_profile_ix(self) -> u8 {
        match self {
            CqPeriodMode::Eqe => NET_DIM_DEF_PROFILE_EQE,
            CqPeriodMode::Cqe => NET_DIM_DEF_PROFILE_CQE,
        }
    }
}

/// `NET_DIM_DEFAULT_RX_CQ_PKTS_FROM_EQE`: the receive count trigger of every EQE profile.
const NET_DIM_DEFAULT_RX_CQ_PKTS_FROM_EQE: u16 = 256;
/// `NET_DIM_DEFAULT_TX_CQ_PKTS_FROM_EQE`: the transmit count trigger of every EQE profile.
const NET_DIM_DEFAULT_TX_CQ_PKTS_FROM_EQE: u16 = 128;

/// Receive profiles, EQE mode (`NET_DIM_RX_EQE_PROFILES`): 1, 8, 64, 128, 256 µs at 256 packets.
pub const NET_DIM_RX_EQE_PROFILES: [DimCqModer; NET_DIM_PARAMS_NUM_PROFILES] = [
    DimCqModer::new(1, NET_DIM_DEFAULT_RX_CQ_PKTS_FROM_EQE),
    DimCqModer::new(8, NET_DIM_DEFAULT_RX_CQ_PKTS_FROM_EQE),
    DimCqModer::new(64, NET_DIM_DEFAULT_RX_CQ_PKTS_FROM_EQE),
    DimCqModer::new(128, NET_DIM_DEFAULT_RX_CQ_PKTS_FROM_EQE),
    DimCqModer::new(256, NET_DIM_DEFAULT_RX_CQ_PKTS_FROM_EQE),
];

/// Receive profiles, CQE mode (`NET_DIM_RX_CQE_PROFILES`).
pub const NET_DIM_RX_CQE_PROFILES: [DimCqModer; NET_DIM_PARAMS_NUM_PROFILES] = [
    DimCqModer::new(2, 256),
    DimCqModer::new(8, 128),
    DimCqModer::new(16, 64),
    DimCqModer::new(32, 64),
    DimCqModer::new(64, 64),
];

/// Transmit profiles, EQE mode (`NET_DIM_TX_EQE_PROFILES`): 1, 8, 32, 64, 128 µs at 128 packets.
pub const NET_DIM_TX_EQE_PROFILES: [DimCqModer; NET_DIM_PARAMS_NUM_PROFILES] = [
    DimCqModer::new(1, NET_DIM_DEFAULT_TX_CQ_PKTS_FROM_EQE),
    DimCqModer::new(8, NET_DIM_DEFAULT_TX_CQ_PKTS_FROM_EQE),
    DimCqModer::new(32, NET_DIM_DEFAULT_TX_CQ_PKTS_FROM_EQE),
    DimCqModer::new(64, NET_DIM_DEFAULT_TX_CQ_PKTS_FROM_EQE),
    DimCqModer::new(128, NET_DIM_DEFAULT_TX_CQ_PKTS_FROM_EQE),
];

/// Transmit profiles, CQE mode (`NET_DIM_TX_CQE_PROFILES`).
pub const NET_DIM_TX_CQE_PROFILES: [DimCqModer; NET_DIM_PARAMS_NUM_PROFILES] = [
    DimCqModer::new(5, 128),
    DimCqModer::new(8, 64),
    DimCqModer::new(16, 32),
    DimCqModer::new(32, 32),
    DimCqModer::new(64, 32),
];

/// The profile table for a mode and a direction (`rx_profile[mode]` / `tx_profile[mode]`).
pub fn net_dim_profiles(
    cq_period_mode: CqPeriodMode,
    dir: Direction,
) -> &'static [DimCqModer; NET_DIM_PARAMS_NUM_PROFILES] {
    match (dir, cq_period_mode) {
        (Direction::Rx, CqPeriodMode::Eqe) => &NET_DIM_RX_EQE_PROFILES,
        (Direction::Rx, CqPeriodMode::Cqe) => &NET_DIM_RX_CQE_PROFILES,
        (Direction::Tx, CqPeriodMode::Eqe) => &NET_DIM_TX_EQE_PROFILES,
        (Direction::Tx, CqPeriodMode::Cqe) => &NET_DIM_TX_CQE_PROFILES,
    }
}

/// `net_dim_get_rx_moderation`: receive profile `ix`, clamped to the table (the kernel trusts its
/// caller; a port that cannot index out of bounds clamps instead).
pub fn net_dim_get_rx_moderation(cq_period_mode: CqPeriodMode, ix: u8) -> DimCqModer {
    profile_at(net_dim_profiles(cq_period_mode, Direction::Rx), ix)
}

/// `net_dim_get_tx_moderation`: transmit profile `ix`, clamped to the table.
pub fn net_dim_get_tx_moderation(cq_period_mode: CqPeriodMode, ix: u8) -> DimCqModer {
    profile_at(net_dim_profiles(cq_period_mode, Direction::Tx), ix)
}

/// `net_dim_get_def_rx_moderation`: the receive profile a driver starts with.
pub fn net_dim_get_def_rx_moderation(cq_period_mode: CqPeriodMode) -> DimCqModer {
    net_dim_get_rx_moderation(cq_period_mode, cq_period_mode.default_profile_ix())
}

/// `net_dim_get_def_tx_moderation`: the transmit profile a driver starts with.
pub fn net_dim_get_def_tx_moderation(cq_period_mode: CqPeriodMode) -> DimCqModer {
    net_dim_get_tx_moderation(cq_period_mode, cq_period_mode.default_profile_ix())
}

fn profile_at(table: &[DimCqModer; NET_DIM_PARAMS_NUM_PROFILES], ix: u8) -> DimCqModer {
    table[usize::from(ix).min(NET_DIM_PARAMS_NUM_PROFILES - 1)]
}

/// What a driver hands to `net_dim` (`struct dim_sample`): a timestamp and cumulative counters
/// that wrap at the kernel's widths.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DimSample {
    /// Sample timestamp (`ktime_t time`), nanoseconds.
    pub time_ns: u64,
    /// Packets so far (`u32 pkt_ctr`).
    pub pkt_ctr: u32,
    /// Bytes so far (`u32 byte_ctr`).
    pub byte_ctr: u32,
    /// Interrupts so far (`u16 event_ctr`).
    pub event_ctr: u16,
    /// Completions so far (`u32 comp_ctr`); only RDMA DIM fills it, net drivers leave it 0.
    pub comp_ctr: u32,
}

impl From<&DriverSample> for DimSample {
    fn from(s: &DriverSample) -> Self {
        DimSample {
            time_ns: s.time_ns,
            pkt_ctr: s.pkt_ctr,
            byte_ctr: s.byte_ctr,
            event_ctr: s.event_ctr,
            comp_ctr: 0,
        }
    }
}

/// Rates of one measurement window (`struct dim_stats`). The kernel stores them in `int`; they are
/// produced from u32 arithmetic and compared as unsigned here (see [`IS_SIGNIFICANT_DIFF`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DimStats {
    /// ppms: packets per msec.
    pub ppms: u32,
    /// bpms: bytes per msec.
    pub bpms: u32,
    /// epms: events (interrupts) per msec.
    pub epms: u32,
    /// cpms: completions per msec (0 for net DIM: no completion counter).
    pub cpms: u32,
    /// cpe_ratio: completions per event, in percent.
    pub cpe_ratio: u32,
}

/// `dim.state`: where the measurement cycle is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum DimState {
    /// The next call starts a window (`DIM_START_MEASURE`); also the state after a profile was
    /// applied.
    #[default]
    #[doc(alias = "DIM_START_MEASURE")]
    StartMeasure = 0,
    /// A window is open (`DIM_MEASURE_IN_PROGRESS`).
    #[doc(alias = "DIM_MEASURE_IN_PROGRESS")]
    MeasureInProgress = 1,
    /// A new profile was chosen and the driver's work item has not applied it yet
    /// (`DIM_APPLY_NEW_PROFILE`); `net_dim` ignores samples meanwhile.
    #[doc(alias = "DIM_APPLY_NEW_PROFILE")]
    ApplyNewProfile = 2,
}

/// `dim.tune_state`: what the profile walk is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum DimTuneState {
    /// Found a local top; leaves only on a significant change in the rates (`DIM_PARKING_ON_TOP`).
    #[default]
    #[doc(alias = "DIM_PARKING_ON_TOP")]
    ParkingOnTop = 0,
    /// Took too many steps; waits `tired` windows before moving again (`DIM_PARKING_TIRED`).
    #[doc(alias = "DIM_PARKING_TIRED")]
    ParkingTired = 1,
    /// Trying more moderation: higher profile indices (`DIM_GOING_RIGHT`).
    #[doc(alias = "DIM_GOING_RIGHT")]
    GoingRight = 2,
    /// Trying less moderation: lower profile indices (`DIM_GOING_LEFT`).
    #[doc(alias = "DIM_GOING_LEFT")]
    GoingLeft = 3,
}

/// Verdict of [`net_dim_stats_compare`] (`DIM_STATS_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DimStatsResult {
    #[doc(alias = "DIM_STATS_WORSE")]
    Worse = 0,
    #[doc(alias = "DIM_STATS_SAME")]
    Same = 1,
    #[doc(alias = "DIM_STATS_BETTER")]
    Better = 2,
}

/// Result of [`NetDim::net_dim_step`] (`DIM_STEPPED`, `DIM_TOO_TIRED`, `DIM_ON_EDGE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DimStepResult {
    /// Moved one profile (or stayed, when parked) and counted the step.
    #[doc(alias = "DIM_STEPPED")]
    Stepped = 0,
    /// `tired` reached twice the number of profiles: time to park tired.
    #[doc(alias = "DIM_TOO_TIRED")]
    TooTired = 1,
    /// Already at the first or last profile in the walking direction.
    #[doc(alias = "DIM_ON_EDGE")]
    OnEdge = 2,
}

/// `BIT_GAP(bits, end, start)` for 16-bit counters: `end - start` modulo 2^16.
fn bit_gap_u16(end: u16, start: u16) -> u16 {
    end.wrapping_sub(start)
}

/// `BIT_GAP(bits, end, start)` for 32-bit counters: `end - start` modulo 2^32.
fn bit_gap_u32(end: u32, start: u32) -> u32 {
    end.wrapping_sub(start)
}

/// `DIV_ROUND_UP(n, d)`: `(n + d - 1) / d`, with `d > 0`.
fn div_round_up(n: u32, d: u32) -> u32 {
    n.div_ceil(d)
}

/// `IS_SIGNIFICANT_DIFF(val, ref)` (include/linux/dim.h): "more than 10% difference",
/// `100 * |val - ref| / ref > 10` in unsigned integer arithmetic (the quotient truncates, so a
/// 10.9% difference is not significant). Callers guarantee `ref != 0`.
#[allow(non_snake_case)]
pub fn IS_SIGNIFICANT_DIFF(val: u32, r#ref: u32) -> bool {
    // 100UL * abs(val - ref): at most 100 * (2^32 - 1), which fits u64.
    (100 * u64::from(val.abs_diff(r#ref))) / u64::from(r#ref) > SIGNIFICANT_DIFF_PERCENT
}

/// `dim_calc_stats` (lib/dim/dim.c): the rates of the window from `start` to `end`, or `None` when
/// less than a microsecond passed (the kernel returns false and `net_dim` waits for a later
/// sample).
pub fn dim_calc_stats(start: &DimSample, end: &DimSample) -> Option<DimStats> {
    // delta_us = ktime_us_delta(end, start), truncated to u32 ("u32 holds up to 71 minutes").
    let delta_us = (end.time_ns.wrapping_sub(start.time_ns) / 1000) as u32;
    // Packet, byte and completion gaps modulo 2^32 (BIT_GAP(BITS_PER_TYPE(u32), ..)).
    let npkts = bit_gap_u32(end.pkt_ctr, start.pkt_ctr);
    let nbytes = bit_gap_u32(end.byte_ctr, start.byte_ctr);
    let ncomps = bit_gap_u32(end.comp_ctr, start.comp_ctr);

    if delta_us == 0 {
        return None;
    }

    // ppms = DIV_ROUND_UP(npkts * USEC_PER_MSEC, delta_us): packets per msec, rounded up. The
    // product is u32 and wraps for windows of more than ~4.29 M packets (~4.29 MB for bpms).
    let ppms = div_round_up(npkts.wrapping_mul(USEC_PER_MSEC), delta_us);
    // bpms: bytes per msec.
    let bpms = div_round_up(nbytes.wrapping_mul(USEC_PER_MSEC), delta_us);
    // epms: events per msec; a window always holds DIM_NEVENTS events.
    let epms = div_round_up(u32::from(DIM_NEVENTS) * USEC_PER_MSEC, delta_us);
    // cpms: completions per msec.
    let cpms = div_round_up(ncomps.wrapping_mul(USEC_PER_MSEC), delta_us);
    // cpe_ratio = DIV_ROUND_DOWN_ULL(cpms * 100, epms): completions per event, percent.
    let cpe_ratio = if epms != 0 { (u64::from(cpms) * 100 / u64::from(epms)) as u32 } else { 0 };

    Some(DimStats { ppms, bpms, epms, cpms, cpe_ratio })
}

/// `net_dim_stats_compare` (lib/dim/net_dim.c): is `curr` better than `prev`? Throughput decides
/// first (bytes per msec, then packets per msec); only at equal throughput do fewer interrupts
/// per msec count as better. A rate that is zero in `prev` cannot be compared by ratio: any
/// nonzero current value is better.
pub fn net_dim_stats_compare(curr: &DimStats, prev: &DimStats) -> DimStatsResult {
    use DimStatsResult::{Better, Same, Worse};

    if prev.bpms == 0 {
        return if curr.bpms != 0 { Better } else { Same };
    }
    if IS_SIGNIFICANT_DIFF(curr.bpms, prev.bpms) {
        return if curr.bpms > prev.bpms { Better } else { Worse };
    }

    if prev.ppms == 0 {
        return if curr.ppms != 0 { Better } else { Same };
    }
    if IS_SIGNIFICANT_DIFF(curr.ppms, prev.ppms) {
        return if curr.ppms > prev.ppms { Better } else { Worse };
    }

    if prev.epms == 0 {
        return Same;
    }
    if IS_SIGNIFICANT_DIFF(curr.epms, prev.epms) {
        // Fewer interrupts for the same throughput is the point of moderation.
        return if curr.epms < prev.epms { Better } else { Worse };
    }

    Same
}

/// One DIM instance (`struct dim`) for one notification stream.
///
/// The fields are public so that tests and logs can compare them with the kernel's, row by row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetDim {
    /// `state`: the measurement cycle.
    pub state: DimState,
    /// `tune_state`: the profile walk.
    pub tune_state: DimTuneState,
    /// `profile_ix`: current profile, 0 (least moderation) ..= 4 (most).
    pub profile_ix: u8,
    /// `steps_left`: steps taken towards lower profiles in the current walk.
    pub steps_left: u8,
    /// `steps_right`: steps taken towards higher profiles in the current walk.
    pub steps_right: u8,
    /// `tired`: steps since the last park on top; while parked tired, windows still to wait.
    pub tired: u8,
    /// `prev_stats`: the rates the next window is compared with.
    pub prev_stats: DimStats,
    /// `start_sample`: the counters at the start of the open window.
    pub start_sample: DimSample,
    /// Not kernel state: the rates of the last closed window (the kernel's local `curr_stats`),
    /// kept for logs and tests. `None` until a window closes.
    pub measurement: Option<DimStats>,
}

impl Default for NetDim {
    /// A fresh instance as the kernel's reference vectors start it: `START_MEASURE`,
    /// `PARKING_ON_TOP`, the default profile ([`NET_DIM_DEF_PROFILE_EQE`]), all counters and
    /// `prev_stats` zero.
    fn default() -> Self {
        NetDim::new(NET_DIM_DEF_PROFILE_EQE)
    }
}

impl NetDim {
    /// A fresh instance starting at `profile_ix` (clamped to the table).
    pub fn new(profile_ix: u8) -> Self {
        NetDim {
            state: DimState::StartMeasure,
            tune_state: DimTuneState::ParkingOnTop,
            profile_ix: profile_ix.min(NET_DIM_PARAMS_NUM_PROFILES as u8 - 1),
            steps_left: 0,
            steps_right: 0,
            tired: 0,
            prev_stats: DimStats::default(),
            start_sample: DimSample::default(),
            measurement: None,
        }
    }

    /// `net_dim` (lib/dim/net_dim.c): the entry point a driver calls after each interrupt's poll
    /// with the stream's cumulative counters.
    ///
    /// When the call chooses a new profile it leaves `state == ApplyNewProfile`; the caller (the
    /// driver's work item) applies `profile_ix` and sets `state = StartMeasure`.
    pub fn net_dim(&mut self, end_sample: &DimSample) {
        match self.state {
            DimState::MeasureInProgress => {
                // nevents = BIT_GAP(16, end.event_ctr, start.event_ctr)
                let nevents = bit_gap_u16(end_sample.event_ctr, self.start_sample.event_ctr);
                if nevents < DIM_NEVENTS {
                    return;
                }
                // No time passed: keep the window open (current kernels `break` here).
                let Some(curr_stats) = dim_calc_stats(&self.start_sample, end_sample) else {
                    return;
                };
                self.measurement = Some(curr_stats);
                if self.net_dim_decision(&curr_stats) {
                    // schedule_work(&dim->work): the driver applies the profile.
                    self.state = DimState::ApplyNewProfile;
                    return;
                }
                // fallthrough: the same sample starts the next window.
                self.start_measure(end_sample);
            }
            DimState::StartMeasure => self.start_measure(end_sample),
            DimState::ApplyNewProfile => {}
        }
    }

    /// The `DIM_START_MEASURE` case: `dim_update_sample(end..., &dim->start_sample)` and open a
    /// window. The kernel stamps the start with `ktime_get()` at this moment; the sample's own
    /// timestamp is that moment here.
    fn start_measure(&mut self, end_sample: &DimSample) {
        self.start_sample = DimSample {
            time_ns: end_sample.time_ns,
            pkt_ctr: end_sample.pkt_ctr,
            byte_ctr: end_sample.byte_ctr,
            event_ctr: end_sample.event_ctr,
            // dim_update_sample leaves comp_ctr alone (only the _with_comps variant sets it).
            comp_ctr: self.start_sample.comp_ctr,
        };
        self.state = DimState::MeasureInProgress;
    }

    /// `net_dim_decision` (lib/dim/net_dim.c): one step of the profile walk for a closed window.
    /// Returns whether `profile_ix` changed.
    pub fn net_dim_decision(&mut self, curr_stats: &DimStats) -> bool {
        let prev_state = self.tune_state;
        let prev_ix = self.profile_ix;

        match self.tune_state {
            DimTuneState::ParkingOnTop => {
                // Parked on a top: leave only when the traffic changed significantly.
                let stats_res = net_dim_stats_compare(curr_stats, &self.prev_stats);
                if stats_res != DimStatsResult::Same {
                    self.net_dim_exit_parking();
                }
            }
            DimTuneState::ParkingTired => {
                // Parked tired: wait out `tired` windows, whatever the rates do (u8, as the kernel's).
                self.tired = self.tired.wrapping_sub(1);
                if self.tired == 0 {
                    self.net_dim_exit_parking();
                }
            }
            DimTuneState::GoingRight | DimTuneState::GoingLeft => {
                // The last step did not help: walk the other way.
                let stats_res = net_dim_stats_compare(curr_stats, &self.prev_stats);
                if stats_res != DimStatsResult::Better {
                    self.dim_turn();
                }

                // A turn right after one step back from a longer walk: this profile is a top.
                if self.dim_on_top() {
                    self.dim_park_on_top();
                } else {
                    match self.net_dim_step() {
                        DimStepResult::OnEdge => self.dim_park_on_top(),
                        DimStepResult::TooTired => self.dim_park_tired(),
                        DimStepResult::Stepped => {}
                    }
                }
            }
        }

        // While the tuner stays parked on top, `prev_stats` keeps the rates of the window that
        // found the top, so that a slow drift still adds up to a significant difference.
        if prev_state != DimTuneState::ParkingOnTop || self.tune_state != DimTuneState::ParkingOnTop {
            self.prev_stats = *curr_stats;
        }

        self.profile_ix != prev_ix
    }

    /// `net_dim_step` (lib/dim/net_dim.c): move one profile in the walking direction and count
    /// the step in `tired`.
    pub fn net_dim_step(&mut self) -> DimStepResult {
        // Twice as many steps as there are profiles without parking on a top: give up for now.
        if usize::from(self.tired) == NET_DIM_PARAMS_NUM_PROFILES * 2 {
            return DimStepResult::TooTired;
        }

        match self.tune_state {
            DimTuneState::ParkingOnTop | DimTuneState::ParkingTired => {}
            DimTuneState::GoingRight => {
                if usize::from(self.profile_ix) == NET_DIM_PARAMS_NUM_PROFILES - 1 {
                    return DimStepResult::OnEdge;
                }
                self.profile_ix += 1;
                self.steps_right += 1;
            }
            DimTuneState::GoingLeft => {
                if self.profile_ix == 0 {
                    return DimStepResult::OnEdge;
                }
                self.profile_ix -= 1;
                self.steps_left += 1;
            }
        }

        self.tired += 1;
        DimStepResult::Stepped
    }

    /// `net_dim_exit_parking` (lib/dim/net_dim.c): start walking, towards less moderation unless
    /// already at profile 0, and take the first step.
    pub fn net_dim_exit_parking(&mut self) {
        self.tune_state =
            if self.profile_ix != 0 { DimTuneState::GoingLeft } else { DimTuneState::GoingRight };
        self.net_dim_step();
    }

    /// `dim_on_top` (lib/dim/dim.c): is the current profile a good place to park? Parked states
    /// are; a walker is on top when it just turned back after one step from a walk of more than
    /// one step the other way (both neighbours were worse).
    pub fn dim_on_top(&self) -> bool {
        match self.tune_state {
            DimTuneState::ParkingOnTop | DimTuneState::ParkingTired => true,
            DimTuneState::GoingRight => self.steps_left > 1 && self.steps_right == 1,
            DimTuneState::GoingLeft => self.steps_right > 1 && self.steps_left == 1,
        }
    }

    /// `dim_turn` (lib/dim/dim.c): reverse the walking direction and restart the new direction's
    /// step count. Parked states do not turn.
    pub fn dim_turn(&mut self) {
        match self.tune_state {
            DimTuneState::ParkingOnTop | DimTuneState::ParkingTired => {}
            DimTuneState::GoingRight => {
                self.tune_state = DimTuneState::GoingLeft;
                self.steps_left = 0;
            }
            DimTuneState::GoingLeft => {
                self.tune_state = DimTuneState::GoingRight;
                self.steps_right = 0;
            }
        }
    }

    /// `dim_park_on_top` (lib/dim/dim.c): park and forget the walk, `tired` included.
    pub fn dim_park_on_top(&mut self) {
        self.steps_right = 0;
        self.steps_left = 0;
        self.tired = 0;
        self.tune_state = DimTuneState::ParkingOnTop;
    }

    /// `dim_park_tired` (lib/dim/dim.c): park and forget the walk's direction, but keep `tired`:
    /// it now counts the windows to wait before walking again.
    pub fn dim_park_tired(&mut self) {
        self.steps_right = 0;
        self.steps_left = 0;
        self.tune_state = DimTuneState::ParkingTired;
    }
}

/// DIM running inside one layer's notification stream: [`NetDim`] plus a profile table and an
/// emulation of the driver's work item (`mlx5e_rx_dim_work` and friends), which applies the chosen
/// profile and sets `state` back to [`DimState::StartMeasure`].
///
/// The work item runs synchronously inside [`LayerController::on_notification`], so the new knobs
/// take effect before the next notification (a kernel applies them a little later, from a
/// workqueue; samples arriving meanwhile are ignored in `APPLY_NEW_PROFILE`).
#[derive(Debug, Clone)]
pub struct DimController {
    /// The algorithm's state.
    pub dim: NetDim,
    profiles: &'static [DimCqModer; NET_DIM_PARAMS_NUM_PROFILES],
}

impl DimController {
    /// DIM for one direction with the kernel's tables for `cq_period_mode`, starting at the
    /// mode's default profile.
    pub fn new(cq_period_mode: CqPeriodMode, dir: Direction) -> Self {
        DimController {
            dim: NetDim::new(cq_period_mode.default_profile_ix()),
            profiles: net_dim_profiles(cq_period_mode, dir),
        }
    }

    /// The profile table this controller walks.
    pub fn profiles(&self) -> &'static [DimCqModer; NET_DIM_PARAMS_NUM_PROFILES] {
        self.profiles
    }

    /// The knobs of the current profile.
    pub fn current(&self) -> Knobs {
        profile_at(self.profiles, self.dim.profile_ix).knobs()
    }
}

impl LayerController for DimController {
    fn initial(&self) -> Knobs {
        self.current()
    }

    fn on_notification(&mut self, sample: &DriverSample) -> Option<Knobs> {
        self.dim.net_dim(&DimSample::from(sample));
        if self.dim.state != DimState::ApplyNewProfile {
            return None;
        }
        // The driver's work item: program the profile, then `dim->state = DIM_START_MEASURE`.
        self.dim.state = DimState::StartMeasure;
        Some(self.current())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn significant_diff_truncates_like_the_kernel() {
        // 100 * 11 / 100 = 11 > 10: significant.
        assert!(IS_SIGNIFICANT_DIFF(111, 100));
        // 100 * 10 / 100 = 10, not > 10.
        assert!(!IS_SIGNIFICANT_DIFF(110, 100));
        // 100 * 119 / 1000 = 11 (11.9 truncated): significant; 100 * 119 / 1090 = 10: not.
        assert!(IS_SIGNIFICANT_DIFF(881, 1000));
        assert!(!IS_SIGNIFICANT_DIFF(1209, 1090));
        // Symmetric in the sign of the difference, and no overflow at the top of u32.
        assert!(IS_SIGNIFICANT_DIFF(0, u32::MAX));
        assert!(IS_SIGNIFICANT_DIFF(u32::MAX, 1));
    }

    #[test]
    fn calc_stats_wraps_counters_and_products_in_u32() {
        let start = DimSample { time_ns: 0, pkt_ctr: u32::MAX - 9, byte_ctr: 0, event_ctr: 0, comp_ctr: 0 };
        // 1 ms later, 20 packets across the wrap, and 5,000,000 bytes: 5e9 wraps to 705,032,704.
        let end =
            DimSample { time_ns: 1_000_000, pkt_ctr: 10, byte_ctr: 5_000_000, event_ctr: 64, comp_ctr: 0 };
        let s = dim_calc_stats(&start, &end).unwrap();
        assert_eq!(s.ppms, 20);
        assert_eq!(s.bpms, (5_000_000u32.wrapping_mul(1000)).div_ceil(1000));
        assert_eq!(s.bpms, 705_033);
        // 64 events in 1000 µs: DIV_ROUND_UP(64000, 1000) = 64.
        assert_eq!(s.epms, 64);
        // Less than a microsecond: no stats, as the kernel's `return false`.
        assert_eq!(dim_calc_stats(&start, &DimSample { time_ns: 999, ..end }), None);
    }

    #[test]
    fn stats_compare_orders_throughput_before_interrupts() {
        let prev = DimStats { ppms: 100, bpms: 10_000, epms: 50, ..DimStats::default() };
        // 20% more bytes: better, whatever the interrupts do.
        let more_bytes = DimStats { bpms: 12_000, epms: 500, ..prev };
        assert_eq!(net_dim_stats_compare(&more_bytes, &prev), DimStatsResult::Better);
        // Same throughput, half the interrupts: better; twice the interrupts: worse.
        assert_eq!(net_dim_stats_compare(&DimStats { epms: 25, ..prev }, &prev), DimStatsResult::Better);
        assert_eq!(net_dim_stats_compare(&DimStats { epms: 100, ..prev }, &prev), DimStatsResult::Worse);
        // Nothing known before: any traffic is better, none is the same.
        let zero = DimStats::default();
        assert_eq!(net_dim_stats_compare(&prev, &zero), DimStatsResult::Better);
        assert_eq!(net_dim_stats_compare(&zero, &zero), DimStatsResult::Same);
    }

    /// The reference vectors never separate this detail from its obvious simplification (always
    /// overwriting `prev_stats`), so it is pinned here: parked on top, a slow drift of 6% per
    /// window is measured against the window that found the top, and the second step (12%) wakes
    /// the tuner. Overwriting would compare 6% steps forever and never leave.
    #[test]
    fn parked_on_top_keeps_prev_stats_so_a_slow_drift_adds_up() {
        let top = DimStats { ppms: 100, bpms: 1000, epms: 50, ..DimStats::default() };
        let mut dim = NetDim { prev_stats: top, ..NetDim::default() };

        // 100 * 60 / 1000 = 6: not significant; still parked, and prev_stats is still the top.
        assert!(!dim.net_dim_decision(&DimStats { bpms: 1060, ..top }));
        assert_eq!(dim.tune_state, DimTuneState::ParkingOnTop);
        assert_eq!(dim.prev_stats, top);

        // 100 * 120 / 1000 = 12 against the top (only 100 * 60 / 1060 = 5 against the last
        // window): better, so DIM exits parking to the left, profile 1 -> 0.
        assert!(dim.net_dim_decision(&DimStats { bpms: 1120, ..top }));
        assert_eq!(dim.tune_state, DimTuneState::GoingLeft);
        assert_eq!(dim.profile_ix, 0);
        // Leaving the park records the new window.
        assert_eq!(dim.prev_stats.bpms, 1120);
    }

    /// Also not in the reference vectors: a window that closes with less than 1 µs elapsed stays
    /// open (current kernels `break` when `dim_calc_stats` returns false).
    #[test]
    fn a_window_without_elapsed_time_stays_open() {
        let mut dim = NetDim::default();
        let start = DimSample { time_ns: 5_000, pkt_ctr: 0, byte_ctr: 0, event_ctr: 0, comp_ctr: 0 };
        dim.net_dim(&start);
        assert_eq!(dim.state, DimState::MeasureInProgress);
        // 64 events but only 999 ns: no stats, no decision, the window keeps its start.
        dim.net_dim(&DimSample { time_ns: 5_999, event_ctr: 64, pkt_ctr: 64, ..start });
        assert_eq!(dim.state, DimState::MeasureInProgress);
        assert_eq!(dim.start_sample, start);
        assert_eq!(dim.measurement, None);
        // Once a microsecond has passed the window closes and decides.
        dim.net_dim(&DimSample { time_ns: 6_000, event_ctr: 65, pkt_ctr: 65, byte_ctr: 6500, ..start });
        assert!(dim.measurement.is_some());
        assert_eq!(dim.state, DimState::ApplyNewProfile);
    }

    #[test]
    fn controller_applies_the_profile_and_restarts_measuring() {
        let mut c = DimController::new(CqPeriodMode::Eqe, Direction::Rx);
        // Default profile 1 of the EQE receive table: 8 µs / 256 packets.
        assert_eq!(c.initial(), Knobs::new(8, 256));
        // First call opens a window; 63 more events do not close it.
        for ev in 0..64u16 {
            let s = DriverSample {
                time_ns: u64::from(ev) * 10_000,
                event_ctr: ev,
                pkt_ctr: u32::from(ev) * 10,
                byte_ctr: u32::from(ev) * 15_000,
            };
            assert_eq!(c.on_notification(&s), None);
        }
        // Event 64 closes it: traffic where `prev_stats` was zero is "better", so DIM exits parking
        // to the left (profile 1 -> 0: 1 µs) and the work item resets the state.
        let s = DriverSample { time_ns: 640_000, event_ctr: 64, pkt_ctr: 640, byte_ctr: 960_000 };
        assert_eq!(c.on_notification(&s), Some(Knobs::new(1, 256)));
        assert_eq!(c.dim.state, DimState::StartMeasure);
        assert_eq!(c.dim.tune_state, DimTuneState::GoingLeft);
        assert_eq!(c.dim.profile_ix, 0);
    }
}
