//! Rate-limited logging: a gate that lets one line of a kind through per interval and counts
//! the lines it held back, so hostile input cannot flood the log.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lets one log line through per interval. Shared freely (`&self`); the lock is held only to
/// compare two instants.
#[derive(Debug)]
pub struct LogGate {
    interval: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogGate {
    /// A gate passing at most one line per `interval`.
    pub fn new(interval: Duration) -> LogGate {
        LogGate {
            interval,
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(lines held back since the last one)` when a line may be logged now.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    /// As [`allow`](LogGate::allow), at `now`.
    pub fn allow_at(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.0.is_some_and(|t| now.duration_since(t) < self.interval) {
            s.1 += 1;
            return None;
        }
        s.0 = Some(now);
        Some(std::mem::take(&mut s.1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_and_the_rest_counted() {
        let g = LogGate::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(g.allow_at(t0), Some(0));
        assert_eq!(g.allow_at(t0 + Duration::from_secs(1)), None);
        assert_eq!(g.allow_at(t0 + Duration::from_secs(9)), None);
        assert_eq!(g.allow_at(t0 + Duration::from_secs(10)), Some(2));
        assert_eq!(g.allow_at(t0 + Duration::from_secs(11)), None);
    }
}
