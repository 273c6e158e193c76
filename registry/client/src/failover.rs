//! Several registry addresses and the order a client tries them in. Used by the daemon's
//! registry link and the beacon's registry authority; no I/O and no clock here: callers
//! connect, sleep, and draw the random samples ([`jitter_sample`]).
//!
//! - [`RegistryAddrs`] is a non-empty list of distinct `host:port` entries, in order of
//!   preference, parsed from a comma-separated string (`--registry a:9000,b:9000`), from
//!   several values (a repeated flag, a JSON list in a config file), or both. Every entry is
//!   checked when it is parsed, so a mistyped address stops a daemon at start rather than
//!   showing later as a registry that never answers.
//! - [`Rotation`] says which address to use and how long to wait before the next attempt.
//!   A failure (a connect that fails, a session that is lost) moves to the next address after
//!   a short jittered pause ([`Backoff::hop`]); once every address has failed in a row (a
//!   round), the wait grows exponentially up to a cap, with random jitter
//!   ([`Backoff::delay`]), so a fleet that lost its registry at once does not come back in
//!   lockstep. A success resets the rounds and the client stays on the address that works:
//!   it does not go back to the first one on its own (the instances of one registry are
//!   equivalent; a preferred one is taken again at the next failure that rotates to it).
//!
//! With one address every failure ends a round, which is the plain exponential backoff of a
//! single registry, jittered.

use std::fmt;
use std::net::Ipv6Addr;
use std::time::Duration;

/// Why a registry address list is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrListError {
    /// No address at all.
    #[error("a registry address is required (host:port; several separated by commas)")]
    Empty,
    /// One entry is not `host:port`.
    #[error("registry address {entry:?} (entry {position} of the list): {reason}")]
    Entry {
        /// The entry as given.
        entry: String,
        /// Its position, from 1.
        position: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The same address twice.
    #[error("registry address {0:?} is listed twice")]
    Duplicate(String),
}

/// A non-empty list of distinct registry addresses (`host:port`), first preferred.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryAddrs(Vec<String>);

impl RegistryAddrs {
    /// Parses values each holding one address or several separated by commas (blank
    /// entries between commas are refused, surrounding spaces are not significant; nothing
    /// but blanks is [`AddrListError::Empty`]).
    pub fn parse_all<S: AsRef<str>>(
        values: impl IntoIterator<Item = S>,
    ) -> Result<RegistryAddrs, AddrListError> {
        let values: Vec<S> = values.into_iter().collect();
        if values.iter().all(|v| v.as_ref().trim().is_empty()) {
            return Err(AddrListError::Empty);
        }
        let mut out: Vec<String> = Vec::new();
        for value in values {
            for entry in value.as_ref().split(',') {
                let entry = entry.trim();
                let position = out.len() + 1;
                let bad = |reason| AddrListError::Entry {
                    entry: entry.to_owned(),
                    position,
                    reason,
                };
                check_entry(entry).map_err(bad)?;
                if out.iter().any(|a| a == entry) {
                    return Err(AddrListError::Duplicate(entry.to_owned()));
                }
                out.push(entry.to_owned());
            }
        }
        if out.is_empty() {
            return Err(AddrListError::Empty);
        }
        Ok(RegistryAddrs(out))
    }

    /// Parses one value: an address, or several separated by commas.
    pub fn parse(value: &str) -> Result<RegistryAddrs, AddrListError> {
        RegistryAddrs::parse_all([value])
    }

    /// The list of one socket address (always valid).
    pub fn single(addr: std::net::SocketAddr) -> RegistryAddrs {
        RegistryAddrs(vec![addr.to_string()])
    }

    /// The addresses, first preferred.
    pub fn as_slice(&self) -> &[String] {
        &self.0
    }

    /// The `i`th address, wrapping around the list.
    pub fn get(&self, i: usize) -> &str {
        &self.0[i % self.0.len()]
    }

    /// The number of addresses (at least one).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always false: a list holds at least one address.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// The addresses separated by commas, as `--registry` takes them.
impl fmt::Display for RegistryAddrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join(","))
    }
}

impl std::str::FromStr for RegistryAddrs {
    type Err = AddrListError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RegistryAddrs::parse(s)
    }
}

/// Checks that `entry` is `host:port`: a port from 1 to 65535, and a host name, an IPv4
/// address or a bracketed IPv6 address.
fn check_entry(entry: &str) -> Result<(), &'static str> {
    if entry.is_empty() {
        return Err("empty (two commas in a row, or one at an end?)");
    }
    let Some((host, port)) = entry.rsplit_once(':') else {
        return Err("no port: write host:port");
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return Err("the port is not a number from 1 to 65535"),
    }
    if let Some(inner) = host.strip_prefix('[') {
        let ip = inner
            .strip_suffix(']')
            .ok_or("an unclosed '[' in the host")?;
        ip.parse::<Ipv6Addr>()
            .map_err(|_| "not an IPv6 address between the brackets")?;
        return Ok(());
    }
    if host.is_empty() {
        return Err("no host before the port");
    }
    if host.contains(':') {
        return Err("an IPv6 address needs brackets: [addr]:port");
    }
    if !host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err("the host is not a name or an IP address");
    }
    Ok(())
}

/// Waits between attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The wait after the first round of failures (before jitter), and the bound of the
    /// pause between addresses inside a round.
    pub base: Duration,
    /// The longest wait.
    pub cap: Duration,
}

impl Backoff {
    /// The wait after round `round` (from 0) failed: `base * 2^round`, at most `cap`, then
    /// scaled by a factor from 1/2 to 1 drawn from `sample` (uniform over `u64`). Never
    /// more than `cap`, never less than half of the unjittered wait.
    pub fn delay(&self, round: u32, sample: u64) -> Duration {
        let full = self
            .base
            .checked_mul(1u32.checked_shl(round.min(31)).unwrap_or(u32::MAX))
            .unwrap_or(self.cap)
            .min(self.cap);
        full / 2 + scale(full / 2, sample)
    }

    /// The pause before trying the next address inside a round: from 0 up to `base / 2`,
    /// drawn from `sample`.
    pub fn hop(&self, sample: u64) -> Duration {
        scale(self.base / 2, sample)
    }
}

/// `d * sample / 2^64`.
fn scale(d: Duration, sample: u64) -> Duration {
    let nanos = d.as_nanos().saturating_mul(u128::from(sample)) >> 64;
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// Which address to try and how long to wait: the calling order is
/// [`Rotation::current`], connect, then [`Rotation::handle_success`] once the session is
/// established or [`Rotation::handle_failure`] / [`Rotation::handle_refusal`] when it fails
/// or ends, then wait the returned time.
#[derive(Debug, Clone)]
pub struct Rotation {
    len: usize,
    current: usize,
    /// Failures in a row since the round began (below `len`).
    failed: usize,
    /// Rounds that failed in a row.
    round: u32,
    backoff: Backoff,
}

impl Rotation {
    /// Starts at the first of `len` addresses (`len` of 0 counts as 1).
    pub fn new(len: usize, backoff: Backoff) -> Rotation {
        Rotation {
            len: len.max(1),
            current: 0,
            failed: 0,
            round: 0,
            backoff,
        }
    }

    /// The index of the address to use.
    pub fn current(&self) -> usize {
        self.current
    }

    /// Rounds that failed in a row.
    pub fn rounds_failed(&self) -> u32 {
        self.round
    }

    /// The address answered: stay on it, and the next failure starts a new round.
    pub fn handle_success(&mut self) {
        self.failed = 0;
        self.round = 0;
    }

    /// The address failed (no connection, or a session lost): move to the next one and
    /// return how long to wait first. After a whole round of failures, that is the
    /// exponential backoff; inside a round, a short pause.
    pub fn handle_failure(&mut self, sample: u64) -> Duration {
        self.current = (self.current + 1) % self.len;
        self.failed += 1;
        if self.failed >= self.len {
            self.failed = 0;
            let wait = self.backoff.delay(self.round, sample);
            self.round = self.round.saturating_add(1);
            wait
        } else {
            self.backoff.hop(sample)
        }
    }

    /// The registry answered but refused (it is up; another instance would answer alike):
    /// stay on this address and back off as after a failed round.
    pub fn handle_refusal(&mut self, sample: u64) -> Duration {
        self.failed = 0;
        let wait = self.backoff.delay(self.round, sample);
        self.round = self.round.saturating_add(1);
        wait
    }
}

/// A random `u64` for jitter, from the standard library's randomly keyed hasher (not for
/// keys or nonces: only to spread reconnections of many clients apart).
pub fn jitter_sample() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const B: Backoff = Backoff {
        base: Duration::from_millis(250),
        cap: Duration::from_secs(10),
    };

    #[test]
    fn lists_parse_from_commas_and_repeated_values_in_order() {
        let a = RegistryAddrs::parse("10.0.0.1:9000").unwrap();
        assert_eq!(a.as_slice(), ["10.0.0.1:9000"]);
        assert_eq!(a.to_string(), "10.0.0.1:9000");
        let a = RegistryAddrs::parse_all(["a.example:9000, b.example:9000", "[::1]:9000"]).unwrap();
        assert_eq!(
            a.as_slice(),
            ["a.example:9000", "b.example:9000", "[::1]:9000"]
        );
        assert_eq!(a.to_string(), "a.example:9000,b.example:9000,[::1]:9000");
        assert_eq!((a.get(0), a.get(4)), ("a.example:9000", "b.example:9000"));
    }

    #[test]
    fn a_bad_entry_is_refused_by_position_and_reason() {
        let cases = [
            ("a:1,,b:2", 2, "empty"),
            ("a:1,b", 2, "no port"),
            ("a:1,b:0", 2, "port"),
            ("a:1,b:70000", 2, "port"),
            ("a:x", 1, "port"),
            (":9000", 1, "no host"),
            ("::1:9000", 1, "brackets"),
            ("[::1:9000", 1, "unclosed"),
            ("[nope]:9000", 1, "IPv6"),
            ("a b:9000", 1, "not a name"),
        ];
        for (list, at, why) in cases {
            match RegistryAddrs::parse(list) {
                Err(AddrListError::Entry {
                    position, reason, ..
                }) => {
                    assert_eq!(position, at, "{list}");
                    assert!(reason.contains(why), "{list}: {reason}");
                }
                other => panic!("{list}: {other:?}"),
            }
        }
        assert_eq!(RegistryAddrs::parse(" "), Err(AddrListError::Empty));
        assert_eq!(
            RegistryAddrs::parse_all(Vec::<String>::new()),
            Err(AddrListError::Empty)
        );
        assert_eq!(
            RegistryAddrs::parse("a:1, a:1"),
            Err(AddrListError::Duplicate("a:1".into()))
        );
        let e = RegistryAddrs::parse("a:1,b").unwrap_err().to_string();
        assert_eq!(
            e,
            "registry address \"b\" (entry 2 of the list): no port: write host:port"
        );
    }

    #[test]
    fn the_delay_doubles_to_the_cap_and_jitter_stays_in_its_half() {
        for round in 0..40 {
            let full = (B.base * 2u32.saturating_pow(round.min(20))).min(B.cap);
            let lo = B.delay(round, 0);
            let hi = B.delay(round, u64::MAX);
            let mid = B.delay(round, u64::MAX / 2);
            assert_eq!(lo, full / 2, "round {round}");
            assert!(
                hi <= full && hi + Duration::from_nanos(1) >= full,
                "round {round}"
            );
            assert!(lo <= mid && mid <= hi, "round {round}");
            assert!(hi <= B.cap);
        }
        assert_eq!(B.delay(0, 0), Duration::from_millis(125));
        assert_eq!(B.delay(3, 0), Duration::from_secs(1));
        assert_eq!(B.delay(30, 0), Duration::from_secs(5));
        assert_eq!(
            B.delay(u32::MAX, u64::MAX / 2 + 1),
            Duration::from_millis(7500)
        );
        // Different samples spread the waits.
        assert_ne!(B.delay(2, 1 << 60), B.delay(2, 3 << 62));
        assert!(B.hop(u64::MAX) <= B.base / 2);
        assert_eq!(B.hop(0), Duration::ZERO);
    }

    #[test]
    fn failures_walk_the_list_and_back_off_after_each_round() {
        let mut r = Rotation::new(3, B);
        let half = u64::MAX / 2 + 1;
        let mut seen = Vec::new();
        for _ in 0..9 {
            let at = r.current();
            let wait = r.handle_failure(half);
            seen.push((at, wait));
        }
        let hop = B.hop(half);
        let ms = |m: u64| Duration::from_micros(m * 750);
        assert_eq!(
            seen,
            [
                (0, hop),
                (1, hop),
                (2, ms(250)), // round 0: 250 ms * 3/4
                (0, hop),
                (1, hop),
                (2, ms(500)), // round 1
                (0, hop),
                (1, hop),
                (2, ms(1000)), // round 2
            ]
        );
        assert_eq!(r.rounds_failed(), 3);
        // A success on the second address: stay there; the next failure starts a new round.
        r.handle_failure(half);
        assert_eq!(r.current(), 1);
        r.handle_success();
        assert_eq!((r.current(), r.rounds_failed()), (1, 0));
        assert_eq!(r.handle_failure(half), hop);
        assert_eq!(r.current(), 2);
        assert_eq!(r.handle_failure(half), hop);
        assert_eq!(r.handle_failure(half), ms(250));
        assert_eq!(r.current(), 1);
    }

    #[test]
    fn one_address_backs_off_on_every_failure_up_to_the_cap() {
        let mut r = Rotation::new(1, B);
        let waits: Vec<Duration> = (0..10).map(|_| r.handle_failure(u64::MAX)).collect();
        assert_eq!(r.current(), 0);
        for w in waits.windows(2) {
            assert!(w[1] >= w[0] && w[1] <= B.cap, "{waits:?}");
        }
        assert!(waits[9] + Duration::from_nanos(1) >= B.cap);
        // A refusal keeps the address and grows the wait too.
        let mut r = Rotation::new(2, B);
        assert_eq!(r.handle_refusal(0), Duration::from_millis(125));
        assert_eq!(r.handle_refusal(0), Duration::from_millis(250));
        assert_eq!(r.current(), 0);
    }

    #[test]
    fn jitter_samples_differ() {
        let s: std::collections::HashSet<u64> = (0..16).map(|_| jitter_sample()).collect();
        assert!(s.len() > 1);
    }
}
