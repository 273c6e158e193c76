//! Congestion control behind a trait, so a connection can run NewReno, CUBIC (the default)
//! or BBR.
//!
//! Windows are in bytes. A controller learns of acknowledged bytes, congestion events (loss
//! detected by duplicate ACKs or SACK, at most one per window of data) and retransmission
//! timeouts; the connection asks it for the congestion window. Model-based controllers (BBR)
//! also take a delivery-rate sample after every ACK ([`Controller::on_rate_sample`], in or
//! out of recovery) and set the pacing rate themselves ([`Controller::pacing_rate`]); the
//! loss-based ones ignore samples and leave pacing to the window.

mod bbr;
mod cubic;
mod new_reno;

use core::fmt::Debug;
use std::time::Instant;

pub use bbr::{Bbr, Mode as BbrMode, ProbeBwPhase};
pub use cubic::Cubic;
pub use new_reno::NewReno;

pub use super::rate::RateSample;
use super::rtt::RttEstimator;

/// A congestion controller.
pub trait Controller: Debug + Send {
    /// `bytes` were newly acknowledged (cumulatively or by SACK) while not in recovery.
    /// `app_limited` is true when the sender was not using its window, so the window must
    /// not grow.
    fn on_ack(&mut self, now: Instant, bytes: u64, rtt: &RttEstimator, app_limited: bool);
    /// A loss was detected by duplicate ACKs or SACK; called once per loss event.
    fn on_congestion_event(&mut self, now: Instant, bytes_in_flight: u64);
    /// The retransmission timer fired for a new loss event.
    fn on_timeout(&mut self, now: Instant, bytes_in_flight: u64);
    /// Leaves slow start at the current window (HyStart++, RFC 9406, saw the queue grow).
    fn exit_slow_start(&mut self);
    /// Current congestion window in bytes.
    fn window(&self) -> u64;
    /// Slow-start threshold in bytes.
    fn ssthresh(&self) -> u64;
    /// True in slow start.
    fn in_slow_start(&self) -> bool {
        self.window() < self.ssthresh()
    }
    /// A delivery-rate sample, taken after every ACK that delivered or declared lost data,
    /// whatever the recovery phase. Loss-based controllers ignore it.
    fn on_rate_sample(&mut self, _now: Instant, _sample: &RateSample) {}
    /// The sending rate in bytes per second, when the controller sets it; `None` lets the
    /// pacer derive it from the window and the smoothed RTT.
    fn pacing_rate(&self) -> Option<u64> {
        None
    }
}

/// Which algorithm a connection uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Algorithm {
    /// RFC 6582 NewReno with Appropriate Byte Counting (RFC 3465).
    NewReno,
    /// RFC 9438 CUBIC.
    #[default]
    Cubic,
    /// BBR version 3 (draft-ietf-ccwg-bbr).
    Bbr,
}

/// An algorithm name that is not `cubic`, `bbr` or `newreno`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown congestion control {0:?} (expected cubic, bbr or newreno)")]
pub struct UnknownAlgorithm(pub String);

impl core::str::FromStr for Algorithm {
    type Err = UnknownAlgorithm;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "cubic" => Ok(Algorithm::Cubic),
            "bbr" => Ok(Algorithm::Bbr),
            "newreno" | "reno" => Ok(Algorithm::NewReno),
            _ => Err(UnknownAlgorithm(s.to_string())),
        }
    }
}

impl core::fmt::Display for Algorithm {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Algorithm::NewReno => "newreno",
            Algorithm::Cubic => "cubic",
            Algorithm::Bbr => "bbr",
        })
    }
}

impl Algorithm {
    /// A controller for a connection with segment size `mss`.
    pub fn build(self, mss: u64) -> Box<dyn Controller> {
        match self {
            Algorithm::NewReno => Box::new(NewReno::new(mss)),
            Algorithm::Cubic => Box::new(Cubic::new(mss)),
            Algorithm::Bbr => Box::new(Bbr::new(mss)),
        }
    }
}

/// RFC 6928 initial window: min(10 * MSS, max(2 * MSS, 14600)).
pub fn initial_window(mss: u64) -> u64 {
    (10 * mss).min((2 * mss).max(14_600))
}

/// Slow-start growth with Appropriate Byte Counting (RFC 3465 §2.2, L = 2).
pub(crate) fn slow_start_increase(bytes: u64, mss: u64) -> u64 {
    bytes.min(2 * mss)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for a in [Algorithm::NewReno, Algorithm::Cubic, Algorithm::Bbr] {
            assert_eq!(a.to_string().parse::<Algorithm>(), Ok(a));
        }
        assert_eq!("BBR".parse::<Algorithm>(), Ok(Algorithm::Bbr));
        assert_eq!(
            "vegas".parse::<Algorithm>(),
            Err(UnknownAlgorithm("vegas".into()))
        );
    }
}
