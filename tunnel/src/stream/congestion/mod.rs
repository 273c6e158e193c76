//! Congestion control behind a trait, so a connection can run NewReno or CUBIC (the default).
//!
//! Windows are in bytes. A controller learns of acknowledged bytes, congestion events (loss
//! detected by duplicate ACKs or SACK, at most one per window of data) and retransmission
//! timeouts; the connection asks it for the congestion window.

mod cubic;
mod new_reno;

use core::fmt::Debug;
use std::time::Instant;

pub use cubic::Cubic;
pub use new_reno::NewReno;

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
}

/// Which algorithm a connection uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Algorithm {
    /// RFC 6582 NewReno with Appropriate Byte Counting (RFC 3465).
    NewReno,
    /// RFC 9438 CUBIC.
    #[default]
    Cubic,
}

impl Algorithm {
    /// A controller for a connection with segment size `mss`.
    pub fn build(self, mss: u64) -> Box<dyn Controller> {
        match self {
            Algorithm::NewReno => Box::new(NewReno::new(mss)),
            Algorithm::Cubic => Box::new(Cubic::new(mss)),
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
