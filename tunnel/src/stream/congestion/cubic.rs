//! CUBIC congestion control (RFC 9438).
//!
//! Window growth in congestion avoidance follows W_cubic(t) = C (t - K)^3 + W_max (segments,
//! seconds), with the Reno-friendly estimate W_est as a floor (§4.3). Fast convergence (§4.7)
//! lowers W_max when a flow keeps losing below its previous maximum.

use std::time::{Duration, Instant};

use super::{initial_window, slow_start_increase, Controller};
use crate::stream::rtt::RttEstimator;

/// RFC 9438 §5: C = 0.4.
const C: f64 = 0.4;
/// RFC 9438 §4.6: multiplicative decrease factor.
const BETA: f64 = 0.7;
/// RFC 9438 §4.3: Reno-friendly additive increase, 3 (1 - beta) / (1 + beta).
const ALPHA: f64 = 3.0 * (1.0 - BETA) / (1.0 + BETA);

/// CUBIC state.
#[derive(Debug, Clone)]
pub struct Cubic {
    mss: u64,
    window: u64,
    ssthresh: u64,
    /// Window before the last reduction, in segments.
    w_max: f64,
    /// Time to reach w_max from the reduced window, in seconds.
    k: f64,
    /// Start of the current congestion-avoidance epoch.
    epoch_start: Option<Instant>,
    /// Reno-friendly window estimate, in segments.
    w_est: f64,
    /// Window at the start of the epoch, in segments.
    cwnd_epoch: f64,
}

impl Cubic {
    /// A controller at the initial window.
    pub fn new(mss: u64) -> Self {
        Cubic {
            mss,
            window: initial_window(mss),
            ssthresh: u64::MAX,
            w_max: 0.0,
            k: 0.0,
            epoch_start: None,
            w_est: 0.0,
            cwnd_epoch: 0.0,
        }
    }

    fn segments(&self, bytes: u64) -> f64 {
        bytes as f64 / self.mss as f64
    }

    fn w_cubic(&self, t: f64) -> f64 {
        C * (t - self.k).powi(3) + self.w_max
    }

    fn reduce(&mut self) {
        let cwnd = self.segments(self.window);
        // §4.7 fast convergence.
        self.w_max = if cwnd < self.w_max {
            cwnd * (1.0 + BETA) / 2.0
        } else {
            cwnd
        };
        let reduced = ((self.window as f64 * BETA) as u64).max(2 * self.mss);
        self.ssthresh = reduced;
        self.epoch_start = None;
    }
}

impl Controller for Cubic {
    fn on_ack(&mut self, now: Instant, bytes: u64, rtt: &RttEstimator, app_limited: bool) {
        if app_limited {
            // §5.8: do not grow while application-limited; restart the epoch afterwards.
            self.epoch_start = None;
            return;
        }
        if self.window < self.ssthresh {
            self.window += slow_start_increase(bytes, self.mss);
            return;
        }
        let start = *self.epoch_start.get_or_insert_with(|| {
            let cwnd = self.window as f64 / self.mss as f64;
            self.cwnd_epoch = cwnd;
            self.w_est = cwnd;
            if self.w_max < cwnd {
                // No reduction happened yet (left slow start by ssthresh): grow from here.
                self.w_max = cwnd;
            }
            self.k = ((self.w_max - cwnd) / C).cbrt();
            now
        });
        let cwnd = self.segments(self.window);
        let t = now.saturating_duration_since(start) + rtt.srtt().min(Duration::from_secs(10));
        let target = self.w_cubic(t.as_secs_f64()).clamp(cwnd, 1.5 * cwnd);
        let acked = self.segments(bytes);
        // §4.3 Reno-friendly region.
        self.w_est += ALPHA * acked / cwnd;
        let next = if self.w_est > target {
            cwnd + (self.w_est - cwnd).max(0.0).min(acked)
        } else {
            // §4.4: grow by (target - cwnd) / cwnd per acknowledged segment.
            cwnd + (target - cwnd) / cwnd * acked
        };
        self.window = ((next * self.mss as f64) as u64).max(self.window);
    }

    fn on_congestion_event(&mut self, _now: Instant, _bytes_in_flight: u64) {
        self.reduce();
        self.window = self.ssthresh;
    }

    fn on_timeout(&mut self, _now: Instant, _bytes_in_flight: u64) {
        self.reduce();
        // §4.8: after a timeout, restart from one segment in slow start.
        self.window = self.mss;
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
    fn reduces_by_beta_and_regrows_toward_w_max() {
        let t0 = Instant::now();
        let mut rtt = RttEstimator::new();
        rtt.update(Duration::from_millis(100));
        let mut c = Cubic::new(1000);
        for _ in 0..90 {
            c.on_ack(t0, 1000, &rtt, false);
        }
        assert_eq!(c.window(), 100_000);
        c.on_congestion_event(t0, 100_000);
        assert_eq!(c.window(), 70_000);
        // K = cbrt(100 * 0.3 / 0.4) ~ 4.2 s: after ~K seconds of ACKs the window is back
        // near W_max, and it keeps growing past it afterwards.
        let mut now = t0;
        while now < t0 + Duration::from_secs(4) {
            now += Duration::from_millis(100);
            for _ in 0..70 {
                c.on_ack(now, 1000, &rtt, false);
            }
        }
        let w = c.window();
        assert!((90_000..=110_000).contains(&w), "{w}");
        let until = now + Duration::from_secs(3);
        while now < until {
            now += Duration::from_millis(100);
            for _ in 0..100 {
                c.on_ack(now, 1000, &rtt, false);
            }
        }
        assert!(c.window() > w.max(100_000), "{} after {w}", c.window());
        c.on_timeout(now, c.window());
        assert_eq!(c.window(), 1000);
    }
}
