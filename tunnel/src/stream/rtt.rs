//! Round-trip time estimation and the retransmission timeout (RFC 6298).

use core::time::Duration;

/// Initial RTO before any sample (RFC 6298 §2.1).
pub const INITIAL_RTO: Duration = Duration::from_secs(1);
/// Lower clamp of the RTO.
pub const MIN_RTO: Duration = Duration::from_millis(200);
/// Upper clamp of the RTO.
pub const MAX_RTO: Duration = Duration::from_secs(10);
/// Clock granularity G.
pub const GRANULARITY: Duration = Duration::from_millis(10);

/// Smoothed RTT, RTT variance and the RTO derived from them.
#[derive(Debug, Clone, Copy)]
pub struct RttEstimator {
    srtt: Option<Duration>,
    rttvar: Duration,
    min: Option<Duration>,
    latest: Duration,
}

impl Default for RttEstimator {
    fn default() -> Self {
        Self::new()
    }
}

impl RttEstimator {
    /// No samples yet.
    pub const fn new() -> Self {
        RttEstimator {
            srtt: None,
            rttvar: Duration::ZERO,
            min: None,
            latest: Duration::ZERO,
        }
    }

    /// Adds a sample from a segment acknowledged on its first transmission (Karn's rule is
    /// the caller's).
    pub fn update(&mut self, r: Duration) {
        self.latest = r;
        self.min = Some(self.min.map_or(r, |m| m.min(r)));
        match self.srtt {
            None => {
                // RFC 6298 §2.2.
                self.srtt = Some(r);
                self.rttvar = r / 2;
            }
            Some(srtt) => {
                // RFC 6298 §2.3: beta = 1/4, alpha = 1/8.
                let diff = srtt.abs_diff(r);
                self.rttvar = (self.rttvar * 3 + diff) / 4;
                self.srtt = Some((srtt * 7 + r) / 8);
            }
        }
    }

    /// RTO = SRTT + max(G, 4 * RTTVAR), clamped to [200 ms, 10 s].
    pub fn rto(&self) -> Duration {
        match self.srtt {
            None => INITIAL_RTO,
            Some(srtt) => (srtt + GRANULARITY.max(self.rttvar * 4)).clamp(MIN_RTO, MAX_RTO),
        }
    }

    /// Smoothed RTT, or the initial RTO before any sample.
    pub fn srtt(&self) -> Duration {
        self.srtt.unwrap_or(INITIAL_RTO)
    }

    /// True once a sample was taken.
    pub fn has_sample(&self) -> bool {
        self.srtt.is_some()
    }

    /// RTT variance.
    pub fn rttvar(&self) -> Duration {
        self.rttvar
    }

    /// Smallest sample seen.
    pub fn min_rtt(&self) -> Option<Duration> {
        self.min
    }

    /// Most recent sample.
    pub fn latest(&self) -> Duration {
        self.latest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc6298_arithmetic() {
        let mut r = RttEstimator::new();
        assert_eq!(r.rto(), INITIAL_RTO);
        r.update(Duration::from_millis(100));
        assert_eq!(r.srtt(), Duration::from_millis(100));
        assert_eq!(r.rttvar(), Duration::from_millis(50));
        assert_eq!(r.rto(), Duration::from_millis(300));
        r.update(Duration::from_millis(200));
        // rttvar = 3/4*50 + 1/4*100 = 62.5; srtt = 7/8*100 + 1/8*200 = 112.5
        assert_eq!(r.rttvar(), Duration::from_micros(62_500));
        assert_eq!(r.srtt(), Duration::from_micros(112_500));
        assert_eq!(r.rto(), Duration::from_micros(362_500));
        let mut tiny = RttEstimator::new();
        tiny.update(Duration::from_millis(1));
        assert_eq!(tiny.rto(), MIN_RTO);
        let mut huge = RttEstimator::new();
        huge.update(Duration::from_secs(30));
        assert_eq!(huge.rto(), MAX_RTO);
    }
}
