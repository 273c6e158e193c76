//! The SYN rate limiter (v1 wire §3.1, §3.3 step 3): at most [`GLOBAL_PER_SEC`] new inbound
//! connections per second in all, and [`PER_SOURCE_PER_SEC`] per source node. A SYN over
//! either limit is dropped silently (no RST) by the caller.
//!
//! Sans-IO: the time comes in as an argument. Each limit is a token bucket whose capacity is
//! one second's worth of tokens, kept as GCRA state (one "theoretical arrival time" per
//! bucket, exact integer arithmetic). A SYN is admitted only when both buckets have a token,
//! and only then are tokens taken from both: a flood from one source that its own bucket
//! refuses does not drain the global bucket, so it cannot starve other sources.
//!
//! Memory is bounded: at most `max_sources` per-source buckets ([`MAX_SOURCES`] by default).
//! A bucket that has refilled completely is the same as no bucket, so full buckets are purged
//! about once a second and whenever the table is full. If the table is still full, the bucket
//! closest to full is evicted; that gives its source at most one bucket's worth of extra SYNs,
//! which the global limit still bounds. With the default rates this cannot happen: admitted
//! SYNs are at most 100 + 100/s, and a source's bucket is full again 1 s after its last one,
//! so at most about 200 buckets are ever not full.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// New inbound connections per second in all (v1).
pub const GLOBAL_PER_SEC: u32 = 100;
/// New inbound connections per second from one source node (v1).
pub const PER_SOURCE_PER_SEC: u32 = 10;
/// Per-source buckets tracked at most by default (v1: 4096).
pub const MAX_SOURCES: usize = 4096;
/// How often full per-source buckets are purged.
const PURGE_INTERVAL: Duration = Duration::from_secs(1);

/// One rate: a token every `interval`, up to one second's worth in the bucket.
#[derive(Debug, Clone, Copy)]
struct Rate {
    interval: Duration,
    /// How far ahead of now the arrival time may run: `interval * (capacity - 1)`.
    tolerance: Duration,
}

impl Rate {
    /// `None` for 0 (no limit).
    fn per_sec(n: u32) -> Option<Rate> {
        if n == 0 {
            return None;
        }
        // Rounded up, so the rate is never above `n` per second.
        let interval = Duration::from_nanos(1_000_000_000u64.div_ceil(u64::from(n)));
        Some(Rate {
            interval,
            tolerance: interval * (n - 1),
        })
    }

    /// The bucket's arrival time after admitting one more at `now`, or `None` if it has no
    /// token. `tat` is the current arrival time (`None`: full bucket).
    fn take(&self, tat: Option<Instant>, now: Instant) -> Option<Instant> {
        let tat = tat.map_or(now, |t| t.max(now));
        let limit = now.checked_add(self.tolerance).unwrap_or(now);
        if tat > limit {
            return None;
        }
        Some(tat.checked_add(self.interval).unwrap_or(tat))
    }
}

/// Why a SYN was admitted or refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Within both limits: accept the connection.
    Allowed,
    /// Over the global limit.
    Global,
    /// Over the source's limit.
    Source,
}

/// Counters of a [`SynLimiter`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SynLimitStats {
    /// SYNs admitted.
    pub allowed: u64,
    /// SYNs refused by the global limit.
    pub refused_global: u64,
    /// SYNs refused by their source's limit.
    pub refused_source: u64,
    /// Per-source buckets evicted before they were full because the table was full.
    pub evicted: u64,
}

/// Global and per-source token buckets for inbound SYNs; see the module docs.
#[derive(Debug)]
pub struct SynLimiter {
    global: Option<Rate>,
    per_source: Option<Rate>,
    global_tat: Option<Instant>,
    sources: HashMap<u32, Instant>,
    max_sources: usize,
    next_purge: Option<Instant>,
    stats: SynLimitStats,
}

impl SynLimiter {
    /// A limiter admitting `global_per_sec` SYNs per second in all and `per_source_per_sec`
    /// per source node, each with a burst of one second's worth; 0 means no limit. It tracks
    /// at most [`MAX_SOURCES`] sources.
    pub fn new(global_per_sec: u32, per_source_per_sec: u32) -> SynLimiter {
        SynLimiter {
            global: Rate::per_sec(global_per_sec),
            per_source: Rate::per_sec(per_source_per_sec),
            global_tat: None,
            sources: HashMap::new(),
            max_sources: MAX_SOURCES,
            next_purge: None,
            stats: SynLimitStats::default(),
        }
    }

    /// The same limiter tracking at most `max` sources (at least 1).
    pub fn with_max_sources(mut self, max: usize) -> SynLimiter {
        self.max_sources = max.max(1);
        self
    }

    /// Whether a SYN from `src_node` arriving at `now` may open a connection; if so, it is
    /// counted against both limits.
    pub fn allow(&mut self, now: Instant, src_node: u32) -> bool {
        self.check(now, src_node) == Verdict::Allowed
    }

    /// As [`SynLimiter::allow`], saying which limit refused.
    pub fn check(&mut self, now: Instant, src_node: u32) -> Verdict {
        if self.next_purge.is_none_or(|t| now >= t) {
            self.purge(now);
        }
        let global = match self.global {
            Some(r) => match r.take(self.global_tat, now) {
                Some(t) => Some(t),
                None => {
                    self.stats.refused_global += 1;
                    return Verdict::Global;
                }
            },
            None => None,
        };
        if let Some(r) = self.per_source {
            let Some(t) = r.take(self.sources.get(&src_node).copied(), now) else {
                self.stats.refused_source += 1;
                return Verdict::Source;
            };
            self.insert(now, src_node, t);
        }
        if global.is_some() {
            self.global_tat = global;
        }
        self.stats.allowed += 1;
        Verdict::Allowed
    }

    fn insert(&mut self, now: Instant, src: u32, tat: Instant) {
        if !self.sources.contains_key(&src) && self.sources.len() >= self.max_sources {
            self.purge(now);
            if self.sources.len() >= self.max_sources {
                let fullest = self
                    .sources
                    .iter()
                    .min_by_key(|(_, t)| **t)
                    .map(|(k, _)| *k);
                if let Some(k) = fullest {
                    self.sources.remove(&k);
                    self.stats.evicted += 1;
                }
            }
        }
        self.sources.insert(src, tat);
    }

    /// Drops the per-source buckets that are full again.
    fn purge(&mut self, now: Instant) {
        self.sources.retain(|_, tat| *tat > now);
        self.next_purge = now.checked_add(PURGE_INTERVAL);
    }

    /// Sources tracked now (buckets not known to be full).
    pub fn tracked(&self) -> usize {
        self.sources.len()
    }

    /// The counters.
    pub fn stats(&self) -> SynLimitStats {
        self.stats
    }
}

impl Default for SynLimiter {
    /// The v1 limits: [`GLOBAL_PER_SEC`] and [`PER_SOURCE_PER_SEC`].
    fn default() -> SynLimiter {
        SynLimiter::new(GLOBAL_PER_SEC, PER_SOURCE_PER_SEC)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn global_burst_then_one_per_interval() {
        let t = Instant::now();
        let mut l = SynLimiter::default();
        for src in 0..100 {
            assert!(l.allow(t, src), "{src}");
        }
        assert_eq!(l.check(t, 100), Verdict::Global);
        assert_eq!(l.check(t + ms(9), 101), Verdict::Global);
        assert!(l.allow(t + ms(10), 102));
        assert!(!l.allow(t + ms(10), 103));
        assert!(l.allow(t + ms(20), 104));
        let s = l.stats();
        assert_eq!((s.allowed, s.refused_global, s.refused_source), (102, 3, 0));
    }

    #[test]
    fn per_source_burst_then_one_per_interval() {
        let t = Instant::now();
        let mut l = SynLimiter::default();
        for _ in 0..10 {
            assert!(l.allow(t, 7));
        }
        assert_eq!(l.check(t, 7), Verdict::Source);
        assert!(l.allow(t, 8), "other sources are not affected");
        assert!(!l.allow(t + ms(99), 7));
        assert!(l.allow(t + ms(100), 7));
        assert!(!l.allow(t + ms(100), 7));
    }

    #[test]
    fn sustained_rate_is_burst_plus_rate() {
        let t = Instant::now();
        let mut l = SynLimiter::default();
        let allowed = (0..=10_000).filter(|&i| l.allow(t + ms(i), 1)).count();
        assert_eq!(allowed, 10 + 100);
        let s = l.stats();
        assert_eq!(s.refused_source, 10_001 - 110);
        assert_eq!(s.refused_global, 0);
    }

    #[test]
    fn a_flooding_source_does_not_drain_the_global_bucket() {
        let t = Instant::now();
        let mut l = SynLimiter::default();
        for _ in 0..1000 {
            l.allow(t, 1);
        }
        assert_eq!(l.stats().allowed, 10);
        for src in 2..92 {
            assert!(l.allow(t, src), "{src}");
        }
        assert!(!l.allow(t, 92));
    }

    #[test]
    fn a_global_refusal_does_not_take_a_source_token() {
        let t = Instant::now();
        let mut l = SynLimiter::new(2, 2);
        assert!(l.allow(t, 1) && l.allow(t, 3));
        for _ in 0..50 {
            assert_eq!(l.check(t, 2), Verdict::Global);
        }
        // Half a second later the global bucket has one token again; source 2's bucket was
        // never touched, so it is admitted.
        assert!(l.allow(t + ms(500), 2));
        assert_eq!(l.check(t + ms(500), 2), Verdict::Global);
        assert_eq!(l.stats().refused_source, 0);
    }

    #[test]
    fn zero_means_no_limit() {
        let t = Instant::now();
        let mut l = SynLimiter::new(0, 0);
        assert!((0..100_000).all(|i| l.allow(t, i % 3)));
        assert_eq!(l.tracked(), 0);
        let mut l = SynLimiter::new(0, 2);
        assert!(l.allow(t, 1) && l.allow(t, 1) && !l.allow(t, 1));
        let mut l = SynLimiter::new(2, 0);
        assert!(l.allow(t, 1) && l.allow(t, 2) && !l.allow(t, 3));
    }

    #[test]
    fn full_buckets_are_purged() {
        let t = Instant::now();
        let mut l = SynLimiter::default();
        for src in 0..50 {
            l.allow(t, src);
        }
        assert_eq!(l.tracked(), 50);
        // Each source took one token: full again after 100 ms; the purge runs once a second.
        assert!(l.allow(t + ms(500), 1000));
        assert_eq!(l.tracked(), 51);
        // At 1 s every earlier bucket is full (source 1000's since 600 ms): only the new one
        // stays.
        assert!(l.allow(t + ms(1000), 1001));
        assert_eq!(l.tracked(), 1);
    }

    #[test]
    fn the_table_is_bounded_and_evicts_the_fullest_bucket() {
        let t = Instant::now();
        let mut l = SynLimiter::new(0, 10).with_max_sources(64);
        for _ in 0..10 {
            assert!(l.allow(t, 0));
        }
        for src in 1..100_000 {
            l.allow(t + ms(1), src);
            assert!(l.tracked() <= 64);
        }
        assert_eq!(l.tracked(), 64);
        assert_eq!(l.stats().evicted, 100_000 - 64);
        // Source 0's empty bucket was never the fullest, so it is still refused.
        assert!(!l.allow(t + ms(1), 0));
        // Full buckets are purged before anything is evicted.
        let later = t + Duration::from_secs(1);
        let before = l.stats().evicted;
        assert!(l.allow(later, 999_999));
        assert_eq!(l.stats().evicted, before);
        assert_eq!(l.tracked(), 1);
    }
}
