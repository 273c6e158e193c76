//! BBR congestion control, version 3 (draft-ietf-ccwg-bbr-01).
//!
//! Layer: a [`Controller`] of the stream state machine, sans-IO. It learns only from
//! [`RateSample`]s (one per ACK that delivered or lost data, in or out of recovery) and sets
//! two outputs: a pacing rate (`pacing_gain x bw`) and a congestion window
//! (`cwnd_gain x BDP`, bounded by the loss-driven `inflight_hi` / `inflight_lo`).
//!
//! The model: `max_bw` is the largest delivery rate over the last two ProbeBW cycles (§4.5.2),
//! `min_rtt` the smallest RTT over 10 s (§4.5.3), `BDP = bw x min_rtt`, with
//! `bw = min(max_bw, bw_lo)`. The state machine (§4.3): Startup (gain 2.77) until the
//! delivery rate stops growing by 25 % for three rounds or the loss rate of a round exceeds
//! 2 %; Drain (gain 0.35) until the queue it built is gone; ProbeBW cycling DOWN (0.9),
//! CRUISE (1.0), REFILL (1.0) and UP (1.25, until the bandwidth stops growing by 25 % for
//! three rounds or the probe loses more than 2 %), probing every 2 to 3 s or after as many
//! rounds as a Reno flow would need (at most 63); ProbeRTT (cwnd = BDP / 2 for 200 ms and a round)
//! when `min_rtt` was not refreshed for 5 s.
//!
//! Loss bounds (§4.5.10): during a bandwidth probe, a sample whose loss exceeds 2 % of what
//! was in flight when its segment was sent marks the path's capacity: `inflight_hi` drops to
//! what was in flight (at least 0.7 x the target) and probing stops. Outside the probing
//! phases, a round losing more than 2 % lowers `bw_lo` and `inflight_lo` to the latest
//! round's delivery, at most by 30 % per round (beta 0.7). Random loss below 2 % therefore
//! does not cut the sending rate.
//!
//! Differences from the draft, each measured in the simulator (`tests/benches/transport.rs`):
//! - a sample counts as "inflight too high" only on an ACK that revealed new loss, for a
//!   segment sent once, and with at least [`MIN_LOSS_SEGMENTS`] lost: during loss recovery
//!   the samples of retransmissions carry the recovery's small flights and the whole
//!   episode's losses, and cut `inflight_hi` in a spiral at 1 % random loss;
//! - the lower bounds move only after a round losing more than [`LOSS_THRESH`] (the draft:
//!   any loss), and only with a delivery-rate measurement in that round; under 1 % random
//!   loss every round has loss, and the draft's rule ratchets the window down;
//! - no packet conservation during fast recovery (loss reactions come from the bounds), no
//!   ack-aggregation allowance (`extra_acked`), no idle-restart handling; after a
//!   retransmission timeout the window restarts at one segment and the previous window comes
//!   back at the next round;
//! - a `min_rtt` sample equal to the current one refreshes its timestamp, so a path with a
//!   constant RTT is not probed needlessly.

use std::time::{Duration, Instant};

use super::{initial_window, Controller};
use crate::stream::rate::RateSample;
use crate::stream::rtt::RttEstimator;

/// §4.6.1: 4 ln 2, the smallest gain that doubles the delivery rate every round.
const STARTUP_PACING_GAIN: f64 = 2.77;
/// §4.6.1.
const STARTUP_CWND_GAIN: f64 = 2.0;
/// §4.6.2: drains the Startup queue in about one round.
const DRAIN_PACING_GAIN: f64 = 0.35;
/// Congestion-window gain outside Startup and ProbeBW_UP.
const DEFAULT_CWND_GAIN: f64 = 2.0;
/// §4.6.3: ProbeBW_UP's window gain, so the pacing gain (not the window) limits probing.
const PROBE_UP_CWND_GAIN: f64 = 2.25;
const PROBE_UP_PACING_GAIN: f64 = 1.25;
const PROBE_DOWN_PACING_GAIN: f64 = 0.9;
/// §4.4: most loss per round tolerated, as a fraction of what was in flight.
const LOSS_THRESH: f64 = 0.02;
/// Fewest segments lost since a segment was sent for its sample to show overflow.
const MIN_LOSS_SEGMENTS: u64 = 4;
/// §4.5.10: multiplicative decrease of the bounds after loss.
const BETA: f64 = 0.7;
/// §4.6.3.2: room left below `inflight_hi` in CRUISE for other flows.
const HEADROOM: f64 = 0.15;
/// §4.6.4: smallest window, in segments.
const MIN_PIPE_SEGMENTS: u64 = 4;
/// §4.6.2.2: pace 1 % below the estimate to leave the bottleneck queue empty.
const PACING_MARGIN: f64 = 0.01;
/// §4.3.1.2: Startup ends after this many rounds without 25 % growth.
const FULL_BW_COUNT: u32 = 3;
const FULL_BW_GROWTH: f64 = 1.25;
/// §4.3.1.3: lost ranges in a round that, with loss above `LOSS_THRESH`, end Startup.
const STARTUP_FULL_LOSS_COUNT: u32 = 6;
/// §4.5.3.
const MIN_RTT_FILTER_LEN: Duration = Duration::from_secs(10);
const PROBE_RTT_INTERVAL: Duration = Duration::from_secs(5);
const PROBE_RTT_DURATION: Duration = Duration::from_millis(200);
const PROBE_RTT_CWND_GAIN: f64 = 0.5;
/// §4.3.3.5: most rounds between bandwidth probes for Reno coexistence.
const MAX_RENO_ROUNDS: u64 = 63;
/// §4.6.3.5: wait 2 s plus up to 1 s at random between bandwidth probes.
const PROBE_WAIT_BASE: Duration = Duration::from_secs(2);

/// The phases of ProbeBW (§4.3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeBwPhase {
    /// Pace below the estimate to drain any queue.
    Down,
    /// Pace at the estimate, with headroom below `inflight_hi`.
    Cruise,
    /// Fill the pipe for one round before probing, so probe losses mean something.
    Refill,
    /// Pace above the estimate to find more bandwidth.
    Up,
}

/// BBR's modes (§4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Exponential search for the bottleneck bandwidth.
    Startup,
    /// Drain the queue Startup built.
    Drain,
    /// Steady state: cycle through the phases.
    ProbeBw(ProbeBwPhase),
    /// Shrink the window to measure the path's own RTT.
    ProbeRtt,
}

/// How ACKs relate to the last bandwidth probe (§4.3.3.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AckPhase {
    Init,
    ProbeStopping,
    Refilling,
    ProbeStarting,
    ProbeFeedback,
}

/// BBR state.
#[derive(Debug, Clone)]
pub struct Bbr {
    mss: u64,
    initial_cwnd: u64,
    mode: Mode,
    pacing_gain: f64,
    cwnd_gain: f64,
    cwnd: u64,
    /// Bytes per second.
    pacing_rate: f64,

    /// Per-cycle maxima of the delivery rate: the previous cycle's and the current one's.
    max_bw_filter: [f64; 2],
    max_bw: f64,
    bw_lo: f64,
    bw: f64,
    bw_latest: f64,
    inflight_latest: u64,
    inflight_hi: u64,
    inflight_lo: u64,

    min_rtt: Option<Duration>,
    min_rtt_stamp: Option<Instant>,
    probe_rtt_min_delay: Option<Duration>,
    probe_rtt_min_stamp: Option<Instant>,
    probe_rtt_expired: bool,
    probe_rtt_done_stamp: Option<Instant>,
    probe_rtt_round_done: bool,
    prior_cwnd: u64,

    round_count: u64,
    round_start: bool,
    next_round_delivered: u64,
    loss_round_start: bool,
    loss_round_delivered: u64,
    loss_in_round: bool,
    /// Loss events (ACKs reporting new loss) and bytes lost and delivered in this round.
    loss_events_in_round: u32,
    lost_in_round: u64,
    delivered_in_round: u64,

    full_bw: f64,
    full_bw_count: u32,
    full_bw_reached: bool,
    /// ProbeBW_UP's own plateau detection: the bandwidth at the last 25 % growth and the
    /// rounds since.
    probe_full_bw: f64,
    probe_full_bw_count: u32,

    cycle_stamp: Option<Instant>,
    ack_phase: AckPhase,
    rounds_since_bw_probe: u64,
    bw_probe_wait: Duration,
    bw_probe_up_cnt: u64,
    bw_probe_up_acks: u64,
    bw_probe_up_rounds: u32,
    bw_probe_samples: bool,

    /// After a retransmission timeout: the window to restore at the next round.
    rto_restore: Option<u64>,
    rng: u64,
}

impl Bbr {
    /// A controller in Startup at the initial window.
    pub fn new(mss: u64) -> Self {
        let initial_cwnd = initial_window(mss);
        Bbr {
            mss,
            initial_cwnd,
            mode: Mode::Startup,
            pacing_gain: STARTUP_PACING_GAIN,
            cwnd_gain: STARTUP_CWND_GAIN,
            cwnd: initial_cwnd,
            // §4.6.2.1: the initial window per 1 ms until an RTT is known.
            pacing_rate: STARTUP_PACING_GAIN * initial_cwnd as f64 / 0.001,
            max_bw_filter: [0.0; 2],
            max_bw: 0.0,
            bw_lo: f64::INFINITY,
            bw: 0.0,
            bw_latest: 0.0,
            inflight_latest: 0,
            inflight_hi: u64::MAX,
            inflight_lo: u64::MAX,
            min_rtt: None,
            min_rtt_stamp: None,
            probe_rtt_min_delay: None,
            probe_rtt_min_stamp: None,
            probe_rtt_expired: false,
            probe_rtt_done_stamp: None,
            probe_rtt_round_done: false,
            prior_cwnd: 0,
            round_count: 0,
            round_start: false,
            next_round_delivered: 0,
            loss_round_start: false,
            loss_round_delivered: 0,
            loss_in_round: false,
            loss_events_in_round: 0,
            lost_in_round: 0,
            delivered_in_round: 0,
            full_bw: 0.0,
            full_bw_count: 0,
            full_bw_reached: false,
            probe_full_bw: 0.0,
            probe_full_bw_count: 0,
            cycle_stamp: None,
            ack_phase: AckPhase::Init,
            rounds_since_bw_probe: 0,
            bw_probe_wait: PROBE_WAIT_BASE,
            bw_probe_up_cnt: u64::MAX,
            bw_probe_up_acks: 0,
            bw_probe_up_rounds: 0,
            bw_probe_samples: false,
            rto_restore: None,
            rng: 0x9E37_79B9_7F4A_7C15,
        }
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The bandwidth estimate in bytes per second.
    pub fn bandwidth(&self) -> f64 {
        self.bw
    }

    /// The minimum RTT estimate.
    pub fn min_rtt(&self) -> Option<Duration> {
        self.min_rtt
    }

    /// The loss-driven upper bound on bytes in flight (`u64::MAX` while unset).
    pub fn inflight_hi(&self) -> u64 {
        self.inflight_hi
    }

    fn random_unit(&mut self) -> f64 {
        // xorshift64*: deterministic, so simulated runs repeat exactly.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let r = self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (r >> 11) as f64 / (1u64 << 53) as f64
    }

    /// `gain x bw x min_rtt` in bytes; the initial window while no RTT is known (§4.6.4.2).
    fn bdp_multiple(&self, bw: f64, gain: f64) -> u64 {
        match self.min_rtt {
            Some(rtt) => (gain * bw * rtt.as_secs_f64()) as u64,
            None => self.initial_cwnd,
        }
    }

    fn min_pipe_cwnd(&self) -> u64 {
        MIN_PIPE_SEGMENTS * self.mss
    }

    fn target_inflight(&self) -> u64 {
        self.bdp_multiple(self.bw, 1.0).min(self.cwnd)
    }

    fn inflight_with_headroom(&self) -> u64 {
        if self.inflight_hi == u64::MAX {
            return u64::MAX;
        }
        let headroom = ((HEADROOM * self.inflight_hi as f64) as u64).max(self.mss);
        self.inflight_hi
            .saturating_sub(headroom)
            .max(self.min_pipe_cwnd())
    }

    fn send_quantum(&self) -> u64 {
        ((self.pacing_rate * 0.001) as u64).clamp(2 * self.mss, 64 * 1024)
    }

    fn is_probing_bw(&self) -> bool {
        matches!(
            self.mode,
            Mode::Startup | Mode::ProbeBw(ProbeBwPhase::Refill | ProbeBwPhase::Up)
        )
    }

    fn in_probe_bw(&self) -> bool {
        matches!(self.mode, Mode::ProbeBw(_))
    }

    fn start_round(&mut self, delivered: u64) {
        self.next_round_delivered = delivered;
    }

    // ---- model ------------------------------------------------------------------------

    fn update_round(&mut self, rs: &RateSample) {
        self.round_start = false;
        if rs.delivered > 0 && rs.prior_delivered >= self.next_round_delivered {
            self.next_round_delivered = rs.total_delivered;
            self.round_count += 1;
            self.rounds_since_bw_probe += 1;
            self.round_start = true;
        }
    }

    fn update_max_bw(&mut self, rs: &RateSample) {
        self.update_round(rs);
        if rs.delivery_rate > 0.0 && (rs.delivery_rate >= self.max_bw || !rs.is_app_limited) {
            self.max_bw_filter[1] = self.max_bw_filter[1].max(rs.delivery_rate);
            self.max_bw = self.max_bw_filter[0].max(self.max_bw_filter[1]);
        }
    }

    fn advance_max_bw_filter(&mut self) {
        self.max_bw_filter = [self.max_bw_filter[1], 0.0];
    }

    fn update_latest_delivery_signals(&mut self, rs: &RateSample) {
        self.loss_round_start = false;
        self.bw_latest = self.bw_latest.max(rs.delivery_rate);
        self.inflight_latest = self.inflight_latest.max(rs.delivered);
        if rs.delivered > 0 && rs.prior_delivered >= self.loss_round_delivered {
            self.loss_round_delivered = rs.total_delivered;
            self.loss_round_start = true;
        }
    }

    fn advance_latest_delivery_signals(&mut self, rs: &RateSample) {
        if self.loss_round_start {
            self.bw_latest = rs.delivery_rate;
            self.inflight_latest = rs.delivered;
        }
    }

    fn update_congestion_signals(&mut self, rs: &RateSample) {
        self.update_max_bw(rs);
        self.lost_in_round += rs.newly_lost;
        self.delivered_in_round += rs.newly_acked;
        if rs.newly_lost > 0 {
            self.loss_in_round = true;
            self.loss_events_in_round += 1;
        }
        if !self.loss_round_start {
            return;
        }
        self.adapt_lower_bounds_from_congestion();
        if self.mode == Mode::Startup {
            self.check_startup_high_loss();
        }
        self.loss_in_round = false;
        self.loss_events_in_round = 0;
        self.lost_in_round = 0;
        self.delivered_in_round = 0;
    }

    /// The loss of the round that just ended exceeded [`LOSS_THRESH`].
    fn round_loss_too_high(&self) -> bool {
        let total = self.lost_in_round + self.delivered_in_round;
        self.lost_in_round as f64 > LOSS_THRESH * total as f64
    }

    /// §4.5.10.3: a round with loss outside bandwidth probing lowers the short-term bounds.
    /// Here only a round losing more than [`LOSS_THRESH`] does, and only with a delivery
    /// measurement: random loss below the threshold is not congestion.
    fn adapt_lower_bounds_from_congestion(&mut self) {
        if self.is_probing_bw()
            || !self.loss_in_round
            || !self.round_loss_too_high()
            || self.bw_latest <= 0.0
        {
            return;
        }
        if self.bw_lo.is_infinite() {
            self.bw_lo = self.max_bw;
        }
        if self.inflight_lo == u64::MAX {
            self.inflight_lo = self.cwnd;
        }
        self.bw_lo = self.bw_latest.max(BETA * self.bw_lo);
        self.inflight_lo = self
            .inflight_latest
            .max((BETA * self.inflight_lo as f64) as u64);
    }

    fn reset_lower_bounds(&mut self) {
        self.bw_lo = f64::INFINITY;
        self.inflight_lo = u64::MAX;
    }

    fn reset_congestion_signals(&mut self) {
        self.loss_in_round = false;
        self.loss_events_in_round = 0;
        self.lost_in_round = 0;
        self.delivered_in_round = 0;
        self.bw_latest = 0.0;
        self.inflight_latest = 0;
    }

    fn bound_bw_for_model(&mut self) {
        self.bw = self.max_bw.min(self.bw_lo);
    }

    /// §4.3.1.3: a round losing more than 2 % in at least six separate events ends Startup.
    fn check_startup_high_loss(&mut self) {
        if self.loss_events_in_round >= STARTUP_FULL_LOSS_COUNT && self.round_loss_too_high() {
            self.full_bw_reached = true;
            self.inflight_hi = self
                .bdp_multiple(self.max_bw, 1.0)
                .max(self.inflight_latest)
                .max(self.min_pipe_cwnd());
        }
    }

    /// §4.3.1.2: the bandwidth stopped growing for three rounds.
    fn check_full_bw_reached(&mut self, rs: &RateSample) {
        if self.full_bw_reached || !self.round_start || rs.is_app_limited {
            return;
        }
        if self.max_bw >= self.full_bw * FULL_BW_GROWTH {
            self.full_bw = self.max_bw;
            self.full_bw_count = 0;
            return;
        }
        self.full_bw_count += 1;
        if self.full_bw_count >= FULL_BW_COUNT {
            self.full_bw_reached = true;
        }
    }

    fn check_startup_done(&mut self) {
        if self.mode == Mode::Startup && self.full_bw_reached {
            self.mode = Mode::Drain;
            self.pacing_gain = DRAIN_PACING_GAIN;
            self.cwnd_gain = STARTUP_CWND_GAIN;
        }
    }

    fn check_drain(&mut self, now: Instant, rs: &RateSample) {
        if self.mode == Mode::Drain && rs.bytes_in_flight <= self.bdp_multiple(self.bw, 1.0) {
            self.start_probe_bw_down(now, rs);
        }
    }

    // ---- ProbeBW ----------------------------------------------------------------------

    fn pick_probe_wait(&mut self) {
        self.rounds_since_bw_probe = u64::from(self.random_unit() < 0.5);
        self.bw_probe_wait = PROBE_WAIT_BASE + Duration::from_secs_f64(self.random_unit());
    }

    fn start_probe_bw_down(&mut self, now: Instant, rs: &RateSample) {
        self.reset_congestion_signals();
        self.bw_probe_up_cnt = u64::MAX;
        self.pick_probe_wait();
        self.cycle_stamp = Some(now);
        self.ack_phase = AckPhase::ProbeStopping;
        self.start_round(rs.total_delivered);
        self.mode = Mode::ProbeBw(ProbeBwPhase::Down);
        self.pacing_gain = PROBE_DOWN_PACING_GAIN;
        self.cwnd_gain = DEFAULT_CWND_GAIN;
    }

    fn start_probe_bw_cruise(&mut self) {
        self.mode = Mode::ProbeBw(ProbeBwPhase::Cruise);
        self.pacing_gain = 1.0;
        self.cwnd_gain = DEFAULT_CWND_GAIN;
    }

    fn start_probe_bw_refill(&mut self, rs: &RateSample) {
        self.reset_lower_bounds();
        self.probe_full_bw = 0.0;
        self.probe_full_bw_count = 0;
        self.bw_probe_up_rounds = 0;
        self.bw_probe_up_acks = 0;
        self.ack_phase = AckPhase::Refilling;
        self.start_round(rs.total_delivered);
        self.mode = Mode::ProbeBw(ProbeBwPhase::Refill);
        self.pacing_gain = 1.0;
        self.cwnd_gain = DEFAULT_CWND_GAIN;
    }

    fn start_probe_bw_up(&mut self, now: Instant, rs: &RateSample) {
        self.ack_phase = AckPhase::ProbeStarting;
        self.start_round(rs.total_delivered);
        self.cycle_stamp = Some(now);
        self.mode = Mode::ProbeBw(ProbeBwPhase::Up);
        self.pacing_gain = PROBE_UP_PACING_GAIN;
        self.cwnd_gain = PROBE_UP_CWND_GAIN;
        self.raise_inflight_hi_slope();
    }

    fn has_elapsed_in_phase(&self, now: Instant, d: Duration) -> bool {
        self.cycle_stamp
            .is_some_and(|s| now.saturating_duration_since(s) > d)
    }

    /// §4.3.3.5: the Reno-coexistence bound on rounds between probes.
    fn is_reno_coexistence_probe_time(&self) -> bool {
        let reno_rounds = self.target_inflight() / self.mss;
        self.rounds_since_bw_probe >= reno_rounds.min(MAX_RENO_ROUNDS)
    }

    fn check_time_to_probe_bw(&mut self, now: Instant, rs: &RateSample) -> bool {
        if self.has_elapsed_in_phase(now, self.bw_probe_wait)
            || self.is_reno_coexistence_probe_time()
        {
            self.start_probe_bw_refill(rs);
            return true;
        }
        false
    }

    fn check_time_to_cruise(&self, rs: &RateSample) -> bool {
        if rs.bytes_in_flight > self.inflight_with_headroom() {
            return false;
        }
        rs.bytes_in_flight <= self.bdp_multiple(self.max_bw, 1.0)
    }

    /// §4.3.3.6 IsTimeToGoDown: UP lasts until the bandwidth stops growing by 25 % for
    /// three rounds (loss above the threshold ends it earlier). While the window is what
    /// holds the probe back at `inflight_hi`, the plateau count restarts.
    fn is_time_to_go_down(&mut self, rs: &RateSample) -> bool {
        let cwnd_limited = rs.bytes_in_flight + rs.newly_acked + self.mss >= self.cwnd;
        if cwnd_limited && self.cwnd >= self.inflight_hi {
            self.probe_full_bw = self.max_bw;
            self.probe_full_bw_count = 0;
            return false;
        }
        if !self.round_start || rs.is_app_limited {
            return false;
        }
        if self.max_bw >= self.probe_full_bw * FULL_BW_GROWTH {
            self.probe_full_bw = self.max_bw;
            self.probe_full_bw_count = 0;
            return false;
        }
        self.probe_full_bw_count += 1;
        self.probe_full_bw_count >= FULL_BW_COUNT
    }

    fn raise_inflight_hi_slope(&mut self) {
        let growth_this_round = 1u64 << self.bw_probe_up_rounds.min(30);
        self.bw_probe_up_rounds = (self.bw_probe_up_rounds + 1).min(30);
        self.bw_probe_up_cnt = (self.cwnd / self.mss / growth_this_round).max(1);
    }

    fn probe_inflight_hi_upward(&mut self, rs: &RateSample) {
        let cwnd_limited = rs.bytes_in_flight + rs.newly_acked + self.mss >= self.cwnd;
        if !cwnd_limited || self.cwnd < self.inflight_hi {
            return;
        }
        self.bw_probe_up_acks += rs.newly_acked / self.mss.max(1);
        if self.bw_probe_up_acks >= self.bw_probe_up_cnt {
            let delta = self.bw_probe_up_acks / self.bw_probe_up_cnt;
            self.bw_probe_up_acks -= delta * self.bw_probe_up_cnt;
            self.inflight_hi = self.inflight_hi.saturating_add(delta * self.mss);
        }
        if self.round_start {
            self.raise_inflight_hi_slope();
        }
    }

    /// §4.5.10.2 IsInflightTooHigh: the flight that carried the sample's segment lost more
    /// than [`LOSS_THRESH`]. Returns that flight's size. Judged only when this ACK revealed
    /// loss and the sample's segment was sent once (a retransmission's flight and loss count
    /// describe the recovery, not the path), with a floor of [`MIN_LOSS_SEGMENTS`] so one
    /// random loss in a small flight is not overflow.
    fn inflight_too_high(&self, rs: &RateSample) -> Option<u64> {
        let high = rs.tx_in_flight > 0
            && rs.newly_lost > 0
            && rs.rtt.is_some()
            && rs.lost as f64 > rs.tx_in_flight as f64 * LOSS_THRESH
            && rs.lost >= MIN_LOSS_SEGMENTS * self.mss;
        high.then_some(rs.tx_in_flight)
    }

    fn handle_inflight_too_high(&mut self, now: Instant, rs: &RateSample, tx_in_flight: u64) {
        self.bw_probe_samples = false;
        if !rs.is_app_limited {
            let floor = (self.target_inflight() as f64 * BETA) as u64;
            self.inflight_hi = tx_in_flight.max(floor).max(self.min_pipe_cwnd());
        }
        if self.mode == Mode::ProbeBw(ProbeBwPhase::Up) {
            self.start_probe_bw_down(now, rs);
        }
    }

    /// §4.5.10.2: raise or cut `inflight_hi` from the samples of a bandwidth probe.
    fn adapt_upper_bounds(&mut self, now: Instant, rs: &RateSample) {
        if self.ack_phase == AckPhase::ProbeStarting && self.round_start {
            self.ack_phase = AckPhase::ProbeFeedback;
        }
        if self.ack_phase == AckPhase::ProbeStopping && self.round_start {
            self.bw_probe_samples = false;
            self.ack_phase = AckPhase::Init;
            if self.in_probe_bw() && !rs.is_app_limited {
                self.advance_max_bw_filter();
            }
        }
        if let Some(tx_in_flight) = self.inflight_too_high(rs) {
            if self.bw_probe_samples {
                self.handle_inflight_too_high(now, rs, tx_in_flight);
            }
            return;
        }
        if self.inflight_hi == u64::MAX {
            return;
        }
        if rs.tx_in_flight > self.inflight_hi {
            self.inflight_hi = rs.tx_in_flight;
        }
        if self.mode == Mode::ProbeBw(ProbeBwPhase::Up) {
            self.probe_inflight_hi_upward(rs);
        }
    }

    fn update_probe_bw_cycle_phase(&mut self, now: Instant, rs: &RateSample) {
        if !self.full_bw_reached {
            return;
        }
        self.adapt_upper_bounds(now, rs);
        let Mode::ProbeBw(phase) = self.mode else {
            return;
        };
        match phase {
            ProbeBwPhase::Down => {
                if self.check_time_to_probe_bw(now, rs) {
                    return;
                }
                if self.check_time_to_cruise(rs) {
                    self.start_probe_bw_cruise();
                }
            }
            ProbeBwPhase::Cruise => {
                self.check_time_to_probe_bw(now, rs);
            }
            ProbeBwPhase::Refill => {
                if self.round_start {
                    self.bw_probe_samples = true;
                    self.start_probe_bw_up(now, rs);
                }
            }
            ProbeBwPhase::Up => {
                if self.is_time_to_go_down(rs) {
                    self.start_probe_bw_down(now, rs);
                }
            }
        }
    }

    // ---- min RTT and ProbeRTT ---------------------------------------------------------

    fn update_min_rtt(&mut self, now: Instant, rs: &RateSample) {
        self.probe_rtt_expired = self
            .probe_rtt_min_stamp
            .is_some_and(|s| now > s + PROBE_RTT_INTERVAL);
        if let Some(rtt) = rs.rtt {
            if self.probe_rtt_min_delay.is_none_or(|m| rtt <= m) || self.probe_rtt_expired {
                if self.probe_rtt_min_delay.is_none() {
                    // Per-connection seed for the probe timing, from its first RTT sample.
                    self.rng ^= rtt.as_nanos() as u64 | 1;
                }
                self.probe_rtt_min_delay = Some(rtt);
                self.probe_rtt_min_stamp = Some(now);
            }
        }
        let min_rtt_expired = self
            .min_rtt_stamp
            .is_some_and(|s| now > s + MIN_RTT_FILTER_LEN);
        if let Some(d) = self.probe_rtt_min_delay {
            if self.min_rtt.is_none_or(|m| d < m) || min_rtt_expired {
                self.min_rtt = Some(d);
                self.min_rtt_stamp = self.probe_rtt_min_stamp;
            }
        }
    }

    fn probe_rtt_cwnd(&self) -> u64 {
        self.bdp_multiple(self.bw, PROBE_RTT_CWND_GAIN)
            .max(self.min_pipe_cwnd())
    }

    fn save_cwnd(&self) -> u64 {
        self.cwnd.max(self.prior_cwnd)
    }

    fn check_probe_rtt(&mut self, now: Instant, rs: &RateSample) {
        if self.mode != Mode::ProbeRtt && self.probe_rtt_expired {
            self.prior_cwnd = self.save_cwnd();
            self.probe_rtt_done_stamp = None;
            self.ack_phase = AckPhase::ProbeStopping;
            self.start_round(rs.total_delivered);
            self.mode = Mode::ProbeRtt;
            self.pacing_gain = 1.0;
            self.cwnd_gain = PROBE_RTT_CWND_GAIN;
        }
        if self.mode == Mode::ProbeRtt {
            self.handle_probe_rtt(now, rs);
        }
    }

    fn handle_probe_rtt(&mut self, now: Instant, rs: &RateSample) {
        match self.probe_rtt_done_stamp {
            None if rs.bytes_in_flight <= self.probe_rtt_cwnd() => {
                self.probe_rtt_done_stamp = Some(now + PROBE_RTT_DURATION);
                self.probe_rtt_round_done = false;
                self.start_round(rs.total_delivered);
            }
            None => {}
            Some(done) => {
                if self.round_start {
                    self.probe_rtt_round_done = true;
                }
                if self.probe_rtt_round_done && now > done {
                    self.probe_rtt_min_stamp = Some(now);
                    self.cwnd = self.cwnd.max(self.prior_cwnd);
                    self.reset_lower_bounds();
                    if self.full_bw_reached {
                        self.start_probe_bw_down(now, rs);
                        self.start_probe_bw_cruise();
                    } else {
                        self.mode = Mode::Startup;
                        self.pacing_gain = STARTUP_PACING_GAIN;
                        self.cwnd_gain = STARTUP_CWND_GAIN;
                    }
                }
            }
        }
    }

    // ---- outputs ----------------------------------------------------------------------

    fn set_pacing_rate(&mut self) {
        if self.bw <= 0.0 {
            return;
        }
        let rate = self.pacing_gain * self.bw * (1.0 - PACING_MARGIN);
        if self.full_bw_reached || rate > self.pacing_rate {
            self.pacing_rate = rate;
        }
    }

    fn set_cwnd(&mut self, rs: &RateSample) {
        let mut max_inflight = self.bdp_multiple(self.bw, self.cwnd_gain) + 3 * self.send_quantum();
        if self.mode == Mode::ProbeBw(ProbeBwPhase::Up) {
            max_inflight += 2 * self.mss;
        }
        if self.full_bw_reached {
            self.cwnd = (self.cwnd + rs.newly_acked).min(max_inflight);
        } else if self.cwnd < max_inflight || rs.total_delivered < self.initial_cwnd {
            self.cwnd += rs.newly_acked;
        }
        self.cwnd = self.cwnd.max(self.min_pipe_cwnd());
        if self.mode == Mode::ProbeRtt {
            self.cwnd = self.cwnd.min(self.probe_rtt_cwnd());
        }
        // §4.6.4.6: the model's bounds.
        let mut cap = if self.in_probe_bw() && self.mode != Mode::ProbeBw(ProbeBwPhase::Cruise) {
            self.inflight_hi
        } else if matches!(
            self.mode,
            Mode::ProbeRtt | Mode::ProbeBw(ProbeBwPhase::Cruise)
        ) {
            self.inflight_with_headroom()
        } else {
            u64::MAX
        };
        cap = cap.min(self.inflight_lo).max(self.min_pipe_cwnd());
        self.cwnd = self.cwnd.min(cap);
    }
}

impl Controller for Bbr {
    fn on_ack(&mut self, _now: Instant, _bytes: u64, _rtt: &RttEstimator, _app_limited: bool) {
        // Everything BBR needs comes with the rate sample of the same ACK.
    }

    fn on_rate_sample(&mut self, now: Instant, rs: &RateSample) {
        if let Some(prior) = self.rto_restore {
            if rs.delivered > 0 && rs.prior_delivered >= self.next_round_delivered {
                self.cwnd = self.cwnd.max(prior);
                self.rto_restore = None;
            }
        }
        // §4.2: update the model, then the state machine, then the outputs.
        self.update_latest_delivery_signals(rs);
        self.update_congestion_signals(rs);
        self.check_full_bw_reached(rs);
        self.check_startup_done();
        self.check_drain(now, rs);
        self.update_probe_bw_cycle_phase(now, rs);
        self.update_min_rtt(now, rs);
        self.check_probe_rtt(now, rs);
        self.advance_latest_delivery_signals(rs);
        self.bound_bw_for_model();
        self.set_pacing_rate();
        self.set_cwnd(rs);
    }

    fn on_congestion_event(&mut self, _now: Instant, _bytes_in_flight: u64) {
        // Loss reaches the model through the rate samples' loss counts (the bounds above).
    }

    fn on_timeout(&mut self, _now: Instant, _bytes_in_flight: u64) {
        // §4.6.4.4: on a timeout, restart from one segment; the window comes back once a
        // round of retransmissions is delivered.
        let prior = self.save_cwnd();
        self.rto_restore = Some(prior);
        self.cwnd = self.mss;
    }

    fn exit_slow_start(&mut self) {
        // Startup ends by the bandwidth plateau or by loss, not by delay increase.
    }

    fn window(&self) -> u64 {
        self.cwnd
    }

    fn ssthresh(&self) -> u64 {
        u64::MAX
    }

    fn in_slow_start(&self) -> bool {
        self.mode == Mode::Startup
    }

    fn pacing_rate(&self) -> Option<u64> {
        Some((self.pacing_rate as u64).max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSS: u64 = 1000;

    /// A bottleneck of `bw` bytes/s and a fixed RTT, driven one round at a time: every round
    /// the controller's window (capped by the path's BDP plus a queue of `queue` bytes) is
    /// delivered, minus `loss` of it.
    struct PathDouble {
        now: Instant,
        rtt: Duration,
        bw: f64,
        queue: u64,
        delivered: u64,
        lost: u64,
    }

    impl PathDouble {
        fn new(bw: f64, rtt: Duration, queue: u64) -> Self {
            PathDouble {
                now: Instant::now(),
                rtt,
                bw,
                queue,
                delivered: 0,
                lost: 0,
            }
        }

        /// One round: ten ACKs carrying what the window let through.
        fn round(&mut self, c: &mut Bbr, loss: f64) {
            let bdp = (self.bw * self.rtt.as_secs_f64()) as u64;
            let sent = c.window().min(bdp + self.queue);
            let lost = (sent as f64 * loss) as u64;
            let queued = sent.saturating_sub(bdp);
            let rtt = self.rtt + Duration::from_secs_f64(queued as f64 / self.bw);
            let prior = self.delivered;
            let per_ack = (sent - lost) / 10;
            for i in 0..10u32 {
                self.now += rtt / 10;
                self.delivered += per_ack;
                let newly_lost = if i == 9 { lost } else { 0 };
                self.lost += newly_lost;
                let rate = if sent > bdp {
                    self.bw
                } else {
                    sent as f64 / rtt.as_secs_f64()
                };
                let rs = RateSample {
                    delivery_rate: rate,
                    delivered: (sent - lost).min(self.delivered - prior + per_ack * 10),
                    interval: rtt,
                    prior_delivered: prior,
                    total_delivered: self.delivered,
                    newly_acked: per_ack,
                    newly_lost,
                    lost,
                    tx_in_flight: sent,
                    is_app_limited: false,
                    rtt: Some(rtt),
                    bytes_in_flight: sent - per_ack * (i as u64 + 1),
                };
                c.on_rate_sample(self.now, &rs);
            }
        }
    }

    #[test]
    fn startup_drain_then_probe_bw() {
        // 10 MB/s x 20 ms: BDP 200 kB.
        let mut path = PathDouble::new(10e6, Duration::from_millis(20), 200_000);
        let mut c = Bbr::new(MSS);
        assert_eq!(c.mode(), Mode::Startup);
        assert!(c.in_slow_start());
        let mut rounds = 0;
        while c.mode() == Mode::Startup {
            path.round(&mut c, 0.0);
            rounds += 1;
            assert!(rounds < 30, "still in Startup");
        }
        assert!(!c.in_slow_start());
        assert!((c.bandwidth() - 10e6).abs() < 1.0, "{}", c.bandwidth());
        assert_eq!(c.min_rtt(), Some(Duration::from_millis(20)));
        // Drain or straight on to ProbeBW; either way ProbeBW follows within a few rounds.
        for _ in 0..5 {
            path.round(&mut c, 0.0);
        }
        assert!(matches!(c.mode(), Mode::ProbeBw(_)), "{:?}", c.mode());
        // Cruise paces at the estimate less the margin, with a window about 2 x BDP.
        for _ in 0..3 {
            path.round(&mut c, 0.0);
        }
        assert_eq!(c.mode(), Mode::ProbeBw(ProbeBwPhase::Cruise));
        let rate = c.pacing_rate().unwrap() as f64;
        assert!((rate - 10e6 * 0.99).abs() < 10.0, "{rate}");
        assert!((390_000..=500_000).contains(&c.window()), "{}", c.window());
        // Within the probe wait (at most 63 rounds here) it probes: REFILL, then UP.
        let mut seen_up = false;
        for _ in 0..70 {
            path.round(&mut c, 0.0);
            seen_up |= c.mode() == Mode::ProbeBw(ProbeBwPhase::Up);
        }
        assert!(seen_up);
    }

    #[test]
    fn heavy_loss_in_a_probe_sets_inflight_hi() {
        let mut path = PathDouble::new(10e6, Duration::from_millis(20), 200_000);
        let mut c = Bbr::new(MSS);
        for _ in 0..20 {
            path.round(&mut c, 0.0);
        }
        assert_eq!(c.inflight_hi(), u64::MAX, "no loss yet: no upper bound");
        // Run until UP, then lose 5 % of the probe.
        let mut rounds = 0;
        while c.mode() != Mode::ProbeBw(ProbeBwPhase::Up) {
            path.round(&mut c, 0.0);
            rounds += 1;
            assert!(rounds < 100);
        }
        let sent = c.window().min(400_000);
        path.round(&mut c, 0.05);
        // The probe's flight (at most what the window let out) is the new bound; probing
        // has stopped.
        assert!(c.inflight_hi() <= sent, "{} > {sent}", c.inflight_hi());
        assert!(c.inflight_hi() >= 140_000, "{}", c.inflight_hi());
        assert_ne!(c.mode(), Mode::ProbeBw(ProbeBwPhase::Up));
        assert!(c.window() <= c.inflight_hi());
    }

    #[test]
    fn random_loss_below_threshold_keeps_the_rate() {
        let mut path = PathDouble::new(10e6, Duration::from_millis(20), 200_000);
        let mut c = Bbr::new(MSS);
        for _ in 0..200 {
            path.round(&mut c, 0.01);
        }
        // 1 % loss every round: the estimate stays near the bottleneck rate.
        assert!(c.bandwidth() > 0.9 * 10e6, "{}", c.bandwidth());
        assert!(c.window() >= 180_000, "{}", c.window());
    }

    #[test]
    fn probe_rtt_after_five_seconds_without_a_new_minimum() {
        let mut path = PathDouble::new(10e6, Duration::from_millis(20), 200_000);
        let mut c = Bbr::new(MSS);
        for _ in 0..20 {
            path.round(&mut c, 0.0);
        }
        // From now on every RTT sample is 1 ms above the minimum.
        path.rtt += Duration::from_millis(1);
        let mut seen = false;
        for _ in 0..400 {
            path.round(&mut c, 0.0);
            if c.mode() == Mode::ProbeRtt {
                seen = true;
                // Half the BDP; once the 10 s min-RTT filter expires the BDP uses 21 ms.
                assert!(c.window() <= 105_000 + MSS, "{}", c.window());
            }
        }
        assert!(seen);
        assert!(matches!(c.mode(), Mode::ProbeBw(_)));
    }

    #[test]
    fn timeout_restarts_from_one_segment_and_restores() {
        let mut path = PathDouble::new(10e6, Duration::from_millis(20), 200_000);
        let mut c = Bbr::new(MSS);
        for _ in 0..20 {
            path.round(&mut c, 0.0);
        }
        let before = c.window();
        c.on_timeout(path.now, before);
        assert_eq!(c.window(), MSS);
        path.round(&mut c, 0.0);
        path.round(&mut c, 0.0);
        assert!(c.window() >= before.min(300_000), "{}", c.window());
    }
}
