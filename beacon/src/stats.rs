//! Counters: every handled and every dropped datagram is counted, dropped ones by reason.
//!
//! The counters are atomics shared between the packet loop (the only writer) and any number of
//! readers taking [`Stats`] snapshots, so reading them never stops the loop. Drops are also
//! logged, at most one warning per reason per [`LOG_EVERY`], with the number suppressed since.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Least time between two warnings for the same drop reason.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

macro_rules! reasons {
    ($($(#[$doc:meta])* $name:ident = $s:literal,)*) => {
        /// Why a datagram (or the part of it that would change state) was refused.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[non_exhaustive]
        pub enum DropReason {
            $($(#[$doc])* $name,)*
        }

        impl DropReason {
            /// Every reason, in counter order.
            pub const ALL: &'static [DropReason] = &[$(DropReason::$name,)*];

            /// Stable snake_case name, for logs and metrics.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(DropReason::$name => $s,)*
                }
            }
        }
    };
}

reasons! {
    /// Not a beacon message, or truncated.
    Parse = "parse",
    /// A message only a beacon sends (DiscoverReply, PunchCommand, RelayDeliver).
    UnexpectedType = "unexpected_type",
    /// Node 0 or a node punching itself where a real pair is needed.
    Invalid = "invalid",
    /// The authority does not know the node.
    UnknownNode = "unknown_node",
    /// A signed Discover whose time is outside the accepted window.
    Stale = "stale",
    /// A signed Discover not newer than the last one accepted for the node.
    Replayed = "replayed",
    /// A signed Discover whose signature does not verify under the node's key.
    BadSignature = "bad_signature",
    /// Too many signature checks this second (CPU protection).
    VerifyBudget = "verify_budget",
    /// A plain Discover for a node that holds an unexpired signed entry.
    WeakVsStrong = "weak_vs_strong",
    /// The node table is full.
    TableFull = "table_full",
    /// A PunchRequest or Relay from an address other than the sender's recorded endpoint.
    SpoofedSender = "spoofed_sender",
    /// A Relay from a node with no unexpired entry.
    UnknownSender = "unknown_sender",
    /// The authority says the sender may not reach the target.
    NotAllowed = "not_allowed",
    /// The authority had no answer yet (its cache is being filled) and waiting gave up.
    AuthorityPending = "authority_pending",
    /// The sender exceeded its relay or punch rate.
    RateLimited = "rate_limited",
    /// No unexpired entry for the target, locally or from gossip.
    UnknownDest = "unknown_dest",
    /// A Sync, or a relay claiming to come from a beacon, from an address that is not a
    /// configured peer.
    NotPeer = "not_peer",
    /// The queue of messages waiting for the authority is full.
    DeferOverflow = "defer_overflow",
    /// The socket refused to send a reply or a relayed datagram.
    SendFailed = "send_failed",
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

const N: usize = DropReason::ALL.len();

/// The live counters. Cheap to clone; every clone is the same set.
#[derive(Debug, Clone, Default)]
pub struct StatsHandle {
    inner: Arc<Counters>,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) drops: [AtomicU64; N],
    pub(crate) datagrams: AtomicU64,
    pub(crate) probes: AtomicU64,
    pub(crate) discovers_plain: AtomicU64,
    pub(crate) discovers_signed: AtomicU64,
    pub(crate) punches: AtomicU64,
    pub(crate) relayed_packets: AtomicU64,
    pub(crate) relayed_bytes: AtomicU64,
    pub(crate) forwarded_packets: AtomicU64,
    pub(crate) syncs_received: AtomicU64,
    pub(crate) syncs_sent: AtomicU64,
    pub(crate) deferred: AtomicU64,
    pub(crate) nodes_strong: AtomicU64,
    pub(crate) nodes_weak: AtomicU64,
    pub(crate) gossip_nodes: AtomicU64,
}

impl Counters {
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }
}

/// A snapshot of the counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Dropped datagrams, indexed like [`DropReason::ALL`]; see [`Stats::dropped`].
    pub drops: [u64; N],
    /// Datagrams received.
    pub datagrams: u64,
    /// Discovers with node 0 (address probes), answered and not stored.
    pub probes: u64,
    /// Plain Discovers (and PunchRequests) that created or refreshed a weak entry.
    pub discovers_plain: u64,
    /// Signed Discovers that created or refreshed a strong entry.
    pub discovers_signed: u64,
    /// PunchRequests answered with PunchCommands.
    pub punches: u64,
    /// Relay datagrams delivered to a local node.
    pub relayed_packets: u64,
    /// Bytes of those RelayDelivers.
    pub relayed_bytes: u64,
    /// Relay datagrams forwarded to a peer beacon.
    pub forwarded_packets: u64,
    /// Sync messages accepted from peers.
    pub syncs_received: u64,
    /// Sync messages sent to peers.
    pub syncs_sent: u64,
    /// Messages deferred until the authority had an answer.
    pub deferred: u64,
    /// Unexpired signed entries at the last sweep.
    pub nodes_strong: u64,
    /// Unexpired unsigned entries at the last sweep.
    pub nodes_weak: u64,
    /// Nodes known from peers' gossip at the last sweep.
    pub gossip_nodes: u64,
}

impl Stats {
    /// Datagrams dropped for `reason`.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize]
    }

    /// Datagrams dropped for any reason.
    pub fn dropped_total(&self) -> u64 {
        self.drops.iter().sum()
    }

    /// `(reason, count)` for every reason with a non-zero count.
    pub fn drops_by_reason(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL
            .iter()
            .map(|&r| (r, self.dropped(r)))
            .filter(|&(_, n)| n > 0)
    }
}

impl StatsHandle {
    pub(crate) fn counters(&self) -> &Counters {
        &self.inner
    }

    /// Counts one drop without logging it (the caller logs).
    pub(crate) fn count_drop(&self, reason: DropReason) {
        Counters::add(&self.inner.drops[reason as usize], 1);
    }

    /// The counters now.
    pub fn snapshot(&self) -> Stats {
        let c = &*self.inner;
        let mut drops = [0u64; N];
        for (d, a) in drops.iter_mut().zip(&c.drops) {
            *d = a.load(Relaxed);
        }
        Stats {
            drops,
            datagrams: c.datagrams.load(Relaxed),
            probes: c.probes.load(Relaxed),
            discovers_plain: c.discovers_plain.load(Relaxed),
            discovers_signed: c.discovers_signed.load(Relaxed),
            punches: c.punches.load(Relaxed),
            relayed_packets: c.relayed_packets.load(Relaxed),
            relayed_bytes: c.relayed_bytes.load(Relaxed),
            forwarded_packets: c.forwarded_packets.load(Relaxed),
            syncs_received: c.syncs_received.load(Relaxed),
            syncs_sent: c.syncs_sent.load(Relaxed),
            deferred: c.deferred.load(Relaxed),
            nodes_strong: c.nodes_strong.load(Relaxed),
            nodes_weak: c.nodes_weak.load(Relaxed),
            gossip_nodes: c.gossip_nodes.load(Relaxed),
        }
    }
}

/// Counts drops and rate-limits their warnings. Owned by the packet loop.
#[derive(Debug)]
pub(crate) struct DropLog {
    stats: StatsHandle,
    last_warn: [Option<Instant>; N],
    suppressed: [u64; N],
}

impl DropLog {
    pub(crate) fn new(stats: StatsHandle) -> DropLog {
        DropLog {
            stats,
            last_warn: [None; N],
            suppressed: [0; N],
        }
    }

    pub(crate) fn stats(&self) -> &StatsHandle {
        &self.stats
    }

    /// Counts one drop; warns if this reason has not warned for [`LOG_EVERY`].
    pub(crate) fn record(
        &mut self,
        now: Instant,
        reason: DropReason,
        endpoint: std::net::SocketAddr,
        node: u32,
    ) {
        let i = reason as usize;
        Counters::add(&self.stats.counters().drops[i], 1);
        tracing::trace!(%reason, %endpoint, node, "dropped");
        let due = self.last_warn[i].is_none_or(|t| now.saturating_duration_since(t) >= LOG_EVERY);
        if due {
            tracing::warn!(
                %reason,
                %endpoint,
                node,
                suppressed = self.suppressed[i],
                "dropped beacon datagram"
            );
            self.last_warn[i] = Some(now);
            self.suppressed[i] = 0;
        } else {
            self.suppressed[i] += 1;
        }
    }
}
