//! A token-bucket pacer that spreads a window of segments over a round trip instead of
//! sending it in one burst, so drop-tail queues on the path do not overflow.
//!
//! Rate = window / SRTT x gain (2 in slow start, 1.25 after), or the rate a model-based
//! controller sets ([`Pacer::check_rate`]); burst = max(10 segments, 1 ms of sending at that
//! rate).

use std::time::{Duration, Instant};

const MIN_BURST_SEGMENTS: u64 = 10;

/// Pacer state.
#[derive(Debug, Clone)]
pub struct Pacer {
    tokens: u64,
    last: Option<Instant>,
}

impl Default for Pacer {
    fn default() -> Self {
        Self::new()
    }
}

impl Pacer {
    /// A full bucket.
    pub const fn new() -> Self {
        Pacer {
            tokens: u64::MAX,
            last: None,
        }
    }

    /// Whether `bytes` may go now. On `Err` it returns when they may.
    pub fn check(
        &mut self,
        now: Instant,
        bytes: u64,
        window: u64,
        srtt: Duration,
        slow_start: bool,
        mss: u64,
    ) -> Result<(), Instant> {
        let srtt_ns = srtt.as_nanos().max(1) as u64;
        // Bytes per second, with the gain applied: window * gain / srtt.
        let gain_num: u64 = if slow_start { 2 } else { 5 };
        let gain_den: u64 = if slow_start { 1 } else { 4 };
        let rate = (window as u128 * gain_num as u128 * 1_000_000_000
            / (gain_den as u128 * srtt_ns as u128))
            .max(1) as u64;
        self.check_rate(now, bytes, rate, mss)
    }

    /// Whether `bytes` may go now at `rate` bytes per second. On `Err` it returns when.
    pub fn check_rate(
        &mut self,
        now: Instant,
        bytes: u64,
        rate: u64,
        mss: u64,
    ) -> Result<(), Instant> {
        let rate = rate.max(1);
        let burst = (MIN_BURST_SEGMENTS * mss).max(rate / 1000);
        let refill = match self.last {
            Some(last) => {
                let ns = now.saturating_duration_since(last).as_nanos();
                (ns * rate as u128 / 1_000_000_000).min(u64::MAX as u128) as u64
            }
            None => burst,
        };
        self.tokens = self.tokens.saturating_add(refill).min(burst);
        self.last = Some(now);
        if self.tokens >= bytes {
            return Ok(());
        }
        let missing = bytes - self.tokens;
        let wait_ns = (missing as u128 * 1_000_000_000).div_ceil(rate as u128);
        Err(now + Duration::from_nanos(wait_ns.min(u64::MAX as u128) as u64))
    }

    /// Takes `bytes` from the bucket after a send that [`Pacer::check`] allowed.
    pub fn on_sent(&mut self, bytes: u64) {
        self.tokens = self.tokens.saturating_sub(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_sends() {
        let t0 = Instant::now();
        let mut p = Pacer::new();
        let srtt = Duration::from_millis(100);
        // window 1 MB per 100 ms at gain 1.25 = 12.5 MB/s; burst = 12.5 kB.
        let mut sent = 0;
        while p.check(t0, 1000, 1_000_000, srtt, false, 1000).is_ok() {
            p.on_sent(1000);
            sent += 1;
        }
        assert_eq!(sent, 12);
        let next = p.check(t0, 1000, 1_000_000, srtt, false, 1000).unwrap_err();
        assert!(
            next > t0 && next <= t0 + Duration::from_micros(100),
            "{:?}",
            next - t0
        );
        assert!(p.check(next, 1000, 1_000_000, srtt, false, 1000).is_ok());
    }
}
