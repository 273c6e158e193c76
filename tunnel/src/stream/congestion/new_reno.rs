//! NewReno congestion control (RFC 5681, RFC 6582) with Appropriate Byte Counting (RFC 3465).

use std::time::Instant;

use super::{initial_window, slow_start_increase, Controller};
use crate::stream::rtt::RttEstimator;

/// NewReno state.
#[derive(Debug, Clone)]
pub struct NewReno {
    mss: u64,
    window: u64,
    ssthresh: u64,
    /// Bytes acknowledged in congestion avoidance since the window last grew.
    acked_in_ca: u64,
}

impl NewReno {
    /// A controller at the initial window.
    pub fn new(mss: u64) -> Self {
        NewReno {
            mss,
            window: initial_window(mss),
            ssthresh: u64::MAX,
            acked_in_ca: 0,
        }
    }
}

impl Controller for NewReno {
    fn on_ack(&mut self, _now: Instant, bytes: u64, _rtt: &RttEstimator, app_limited: bool) {
        if app_limited {
            return;
        }
        if self.window < self.ssthresh {
            self.window += slow_start_increase(bytes, self.mss);
        } else {
            // RFC 3465 §2.1: one MSS per window of acknowledged bytes.
            self.acked_in_ca += bytes;
            if self.acked_in_ca >= self.window {
                self.acked_in_ca -= self.window;
                self.window += self.mss;
            }
        }
    }

    fn on_congestion_event(&mut self, _now: Instant, bytes_in_flight: u64) {
        // RFC 5681 (4): ssthresh = max(FlightSize / 2, 2 * SMSS).
        self.ssthresh = (bytes_in_flight.max(self.window) / 2).max(2 * self.mss);
        self.window = self.ssthresh;
        self.acked_in_ca = 0;
    }

    fn on_timeout(&mut self, _now: Instant, bytes_in_flight: u64) {
        self.ssthresh = (bytes_in_flight.max(self.window) / 2).max(2 * self.mss);
        // RFC 5681 §3.1: the loss window is one segment.
        self.window = self.mss;
        self.acked_in_ca = 0;
    }

    fn exit_slow_start(&mut self) {
        self.ssthresh = self.window;
    }

    fn window(&self) -> u64 {
        self.window
    }

    fn ssthresh(&self) -> u64 {
        self.ssthresh
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_start_then_avoidance() {
        let now = Instant::now();
        let rtt = RttEstimator::new();
        let mut c = NewReno::new(1000);
        assert_eq!(c.window(), 10_000);
        c.on_ack(now, 5000, &rtt, false); // ABC caps growth at 2 MSS per ACK
        assert_eq!(c.window(), 12_000);
        c.on_ack(now, 1000, &rtt, true); // app-limited: no growth
        assert_eq!(c.window(), 12_000);
        c.on_congestion_event(now, 12_000);
        assert_eq!((c.window(), c.ssthresh()), (6000, 6000));
        c.on_ack(now, 3000, &rtt, false);
        assert_eq!(c.window(), 6000);
        c.on_ack(now, 3000, &rtt, false);
        assert_eq!(c.window(), 7000);
        c.on_timeout(now, 7000);
        assert_eq!((c.window(), c.ssthresh()), (1000, 3500));
    }
}
