//! Rate limits without allocation or floating point: the generic cell rate algorithm (GCRA).
//!
//! A limiter is one `u64`, the theoretical arrival time (TAT) in nanoseconds since the
//! beacon's epoch. A request for `units` advances the TAT by `units / rate`; it is allowed when
//! the new TAT is no further than the burst window ahead of now. So a sender may run
//! `rate x window` units ahead of its rate, then exactly at the rate.

use std::time::Duration;

/// A rate: `per_sec` units per second with a burst window. `per_sec == 0` means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    per_sec: u64,
    window_ns: u64,
}

impl Rate {
    /// No limit.
    pub const UNLIMITED: Rate = Rate {
        per_sec: 0,
        window_ns: 0,
    };

    /// `per_sec` units per second, allowing `burst` worth of units ahead of the rate.
    pub fn new(per_sec: u64, burst: Duration) -> Rate {
        Rate {
            per_sec,
            window_ns: u64::try_from(burst.as_nanos()).unwrap_or(u64::MAX),
        }
    }

    /// `per_sec` units per second, allowing a burst of `burst_units` at once.
    pub fn with_burst_units(per_sec: u64, burst_units: u64) -> Rate {
        let mut r = Rate {
            per_sec,
            window_ns: 0,
        };
        r.window_ns = r.cost_ns(burst_units);
        r
    }

    /// Whether this rate limits anything.
    pub fn is_unlimited(&self) -> bool {
        self.per_sec == 0
    }

    /// Units per second (0: unlimited).
    pub fn per_sec(&self) -> u64 {
        self.per_sec
    }

    fn cost_ns(&self, units: u64) -> u64 {
        if self.per_sec == 0 {
            return 0;
        }
        let ns = u128::from(units) * 1_000_000_000 / u128::from(self.per_sec);
        u64::try_from(ns).unwrap_or(u64::MAX)
    }
}

/// One limiter's state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Gcra {
    tat_ns: u64,
}

impl Gcra {
    /// The TAT after taking `units` at `now_ns`, if `rate` allows it. Does not commit: pass the
    /// result to [`Gcra::commit`], so two limits can be checked before either moves.
    pub fn check(&self, rate: Rate, now_ns: u64, units: u64) -> Option<u64> {
        if rate.is_unlimited() {
            return Some(self.tat_ns);
        }
        let tat = self.tat_ns.max(now_ns).saturating_add(rate.cost_ns(units));
        (tat <= now_ns.saturating_add(rate.window_ns)).then_some(tat)
    }

    /// Records a TAT returned by [`Gcra::check`].
    pub fn commit(&mut self, tat_ns: u64) {
        self.tat_ns = tat_ns;
    }

    /// Checks and commits in one step.
    pub fn take(&mut self, rate: Rate, now_ns: u64, units: u64) -> bool {
        match self.check(rate, now_ns, units) {
            Some(t) => {
                self.commit(t);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn burst_then_rate() {
        let r = Rate::with_burst_units(10, 5);
        let mut g = Gcra::default();
        let t0 = 100 * S;
        for i in 0..5 {
            assert!(g.take(r, t0, 1), "burst packet {i}");
        }
        assert!(!g.take(r, t0, 1), "burst exhausted");
        // One unit comes back every 100 ms.
        assert!(!g.take(r, t0 + S / 20, 1));
        assert!(g.take(r, t0 + S / 10, 1));
        assert!(!g.take(r, t0 + S / 10, 1));
        // After a long pause the full burst is back, not more.
        let t1 = t0 + 60 * S;
        for _ in 0..5 {
            assert!(g.take(r, t1, 1));
        }
        assert!(!g.take(r, t1, 1));
    }

    #[test]
    fn weighted_units_and_check_without_commit() {
        let r = Rate::new(1000, Duration::from_secs(1));
        let g = Gcra::default();
        assert!(g.check(r, S, 1000).is_some());
        assert!(g.check(r, S, 1001).is_none());
        assert_eq!(g, Gcra::default(), "check does not commit");
        assert!(Gcra::default().take(Rate::UNLIMITED, 0, u64::MAX));
    }
}
