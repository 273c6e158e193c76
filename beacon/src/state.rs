//! The beacon's rules over its node table, without sockets or clock reads (v1 wire §5, made
//! stricter; see `docs/BEACON.md`).
//!
//! ## Calling order
//!
//! ```text
//! for each datagram:  out = beacon.handle_datagram(now, src, &mut buf[..n])
//!                     for (to, bytes) in out.transmits(&buf[..n]) { send }
//! every TICK:         beacon.handle_timeout(now)
//!                     if let Some(peers) = beacon.poll_sync(now, &mut sync) { send sync to each }
//!                     while let Some(out) = beacon.poll_deferred(now, &mut buf) { send out }
//! ```
//!
//! Time comes in as [`Now`]: a monotonic instant for expiry and rate limits, and Unix
//! milliseconds only to judge the freshness of signed Discovers.
//!
//! ## Invariants
//!
//! - An entry is *live* while `now < last_seen + entry_ttl`; only live entries are used.
//! - A live strong (signed) entry changes only through a newer valid signed Discover.
//! - A node's last accepted signature time stays known for twice the signature window after
//!   it was accepted, even if the entry expires, so a captured signed Discover cannot be
//!   replayed after expiry.
//! - The relay path allocates nothing: the datagram is rewritten in place. The one exception
//!   is a Relay held while the authority's answer is pending (a copy, within
//!   [`Config::max_deferred_relay_bytes`]).
//! - Nothing here panics on network input.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tunnel::wire::beacon::{
    kind, relay_into_deliver, BeaconMessage, DiscoverProof, MAX_SYNC_NODES, SIGNED_DISCOVER_LEN,
};

use crate::authority::{Answer, Authority};
use crate::limit::{Gcra, Rate};
use crate::stats::{Counters, DropLog, DropReason, Stats, StatsHandle};

/// How often the driver should call [`Beacon::handle_timeout`] and the `poll_*` methods.
pub const TICK: Duration = Duration::from_millis(100);
/// How often expired entries are removed from memory.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(5);
/// How long a positive reachability answer is reused for a relaying sender's current target,
/// so the relay path asks the authority about once a second per flow.
pub const REACH_REUSE: Duration = Duration::from_secs(1);

/// Settings of a beacon. Rates of 0 mean unlimited.
#[derive(Debug, Clone)]
pub struct Config {
    /// This beacon's ID in the Sync messages it sends.
    pub beacon_id: u32,
    /// Peer beacons: the only sources of accepted Sync messages, and the only sources whose
    /// Relay messages are not bound to a recorded sender endpoint.
    pub peers: Vec<SocketAddr>,
    /// An entry not refreshed for this long expires (daemons refresh every 30 s).
    pub entry_ttl: Duration,
    /// A signed Discover is accepted when its time is within this of the beacon's clock.
    pub signed_window: Duration,
    /// Nodes learned from a peer's Sync are forgotten this long after its last Sync.
    pub gossip_ttl: Duration,
    /// How often the local node list is sent to each peer.
    pub sync_interval: Duration,
    /// Relay bytes per second per sender.
    pub relay_bytes_per_sec: u64,
    /// Relay datagrams per second per sender.
    pub relay_packets_per_sec: u64,
    /// How far ahead of its relay rates a sender may burst.
    pub relay_burst: Duration,
    /// PunchRequests per second per requester.
    pub punch_per_sec: u64,
    /// PunchRequests a requester may send at once.
    pub punch_burst: u64,
    /// Signature checks per second, all nodes together (each costs tens of microseconds).
    pub verify_per_sec: u64,
    /// Most entries in the node table.
    pub max_nodes: usize,
    /// Most messages waiting for a pending authority answer.
    pub max_deferred: usize,
    /// How long a message may wait for a pending authority answer.
    pub defer_for: Duration,
    /// Most bytes of Relay datagrams held, all together, while their authority answer is
    /// pending (they count in [`Config::max_deferred`] too).
    pub max_deferred_relay_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            beacon_id: 0,
            peers: Vec::new(),
            entry_ttl: Duration::from_secs(180),
            signed_window: Duration::from_secs(30),
            gossip_ttl: Duration::from_secs(30),
            sync_interval: Duration::from_secs(10),
            relay_bytes_per_sec: 12_500_000,
            relay_packets_per_sec: 20_000,
            relay_burst: Duration::from_millis(500),
            punch_per_sec: 2,
            punch_burst: 10,
            verify_per_sec: 5_000,
            max_nodes: 1 << 20,
            max_deferred: 4096,
            defer_for: Duration::from_secs(5),
            max_deferred_relay_bytes: 1 << 20,
        }
    }
}

/// The time a message is handled at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// Monotonic time: expiry and rate limits.
    pub instant: Instant,
    /// Wall-clock Unix milliseconds: freshness of signed Discovers only.
    pub unix_ms: u64,
}

impl Now {
    /// The system clocks now.
    pub fn system() -> Now {
        Now {
            instant: Instant::now(),
            unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                .unwrap_or(0),
        }
    }

    /// This time plus `d` on both clocks.
    pub fn after(self, d: Duration) -> Now {
        Now {
            instant: self.instant + d,
            unix_ms: self
                .unix_ms
                .saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        }
    }
}

/// A short beacon message (DiscoverReply or PunchCommand) held inline.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Small {
    len: u8,
    bytes: [u8; 20],
}

impl std::fmt::Debug for Small {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Small({:02x?})", self.as_bytes())
    }
}

impl Small {
    /// The message bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    fn endpoint(t: u8, endpoint: SocketAddr) -> Small {
        let m = if t == kind::PUNCH_COMMAND {
            BeaconMessage::PunchCommand { endpoint }
        } else {
            BeaconMessage::DiscoverReply { endpoint }
        };
        let mut s = Small {
            len: 0,
            bytes: [0; 20],
        };
        // An endpoint message is at most 2 + 16 + 2 = 20 bytes, the buffer's size.
        s.len = m.emit(&mut s.bytes).map_or(0, |n| n as u8);
        s
    }
}

/// What to send after handling a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Nothing.
    None,
    /// One short message.
    Reply {
        /// Destination.
        to: SocketAddr,
        /// Message.
        msg: Small,
    },
    /// PunchCommands to both sides of a punch.
    Punch {
        /// To the requester: the target's endpoint.
        requester: (SocketAddr, Small),
        /// To the target: the requester's endpoint.
        target: (SocketAddr, Small),
    },
    /// Part of the handled datagram's buffer (rewritten in place), e.g. a RelayDeliver.
    Send {
        /// Destination.
        to: SocketAddr,
        /// First byte to send.
        start: usize,
        /// One past the last byte to send.
        end: usize,
    },
}

impl Output {
    /// The datagrams to send; `buf` is the buffer the datagram was handled in.
    pub fn transmits<'a>(&'a self, buf: &'a [u8]) -> impl Iterator<Item = (SocketAddr, &'a [u8])> {
        let (a, b) = match self {
            Output::None => (None, None),
            Output::Reply { to, msg } => (Some((*to, msg.as_bytes())), None),
            Output::Punch { requester, target } => (
                Some((requester.0, requester.1.as_bytes())),
                Some((target.0, target.1.as_bytes())),
            ),
            Output::Send { to, start, end } => (buf.get(*start..*end).map(|b| (*to, b)), None),
        };
        a.into_iter().chain(b)
    }

    /// Whether there is nothing to send.
    pub fn is_none(&self) -> bool {
        matches!(self, Output::None)
    }
}

/// A node's entry as seen from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeEntry {
    /// Where the node was last seen.
    pub endpoint: SocketAddr,
    /// Recorded from a verified signed Discover.
    pub strong: bool,
    /// When it was last refreshed.
    pub last_seen: Instant,
}

#[derive(Debug)]
struct Entry {
    endpoint: SocketAddr,
    last_seen: Instant,
    strong: bool,
    /// Time of the last accepted signed Discover (0: none); the replay guard.
    last_signed_ms: u64,
    /// When that signed Discover was accepted.
    signed_at: Option<Instant>,
    relay_bytes: Gcra,
    relay_packets: Gcra,
    punch: Gcra,
    /// `reach_dest` may be reached until `reach_until` (the authority said so).
    reach_dest: u32,
    reach_until: Option<Instant>,
}

impl Entry {
    fn new(endpoint: SocketAddr, now: Instant) -> Entry {
        Entry {
            endpoint,
            last_seen: now,
            strong: false,
            last_signed_ms: 0,
            signed_at: None,
            relay_bytes: Gcra::default(),
            relay_packets: Gcra::default(),
            punch: Gcra::default(),
            reach_dest: 0,
            reach_until: None,
        }
    }

    fn live(&self, now: Instant, ttl: Duration) -> bool {
        now < self.last_seen + ttl
    }
}

#[derive(Debug)]
struct Peer {
    addr: SocketAddr,
    beacon_id: u32,
    /// Sorted node IDs from the last accepted Sync.
    nodes: Vec<u32>,
    heard: Option<Instant>,
}

#[derive(Debug)]
struct Deferred {
    src: SocketAddr,
    since: Instant,
    bytes: DeferredBytes,
}

/// A waiting message: Discovers and PunchRequests inline, Relays (any size) copied out.
#[derive(Debug)]
enum DeferredBytes {
    Small {
        len: u8,
        bytes: [u8; SIGNED_DISCOVER_LEN],
    },
    Relay(Box<[u8]>),
}

impl DeferredBytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            DeferredBytes::Small { len, bytes } => &bytes[..usize::from(*len)],
            DeferredBytes::Relay(b) => b,
        }
    }
}

/// Why an entry was not admitted.
enum Refusal {
    Drop(DropReason),
    Pending,
}

impl From<DropReason> for Refusal {
    fn from(r: DropReason) -> Self {
        Refusal::Drop(r)
    }
}

/// The beacon: node table, gossip, deferred messages and rate limits.
pub struct Beacon {
    authority: Arc<dyn Authority>,
    config: Config,
    epoch: Instant,
    nodes: HashMap<u32, Entry>,
    peers: Vec<Peer>,
    peer_addrs: Vec<SocketAddr>,
    deferred: VecDeque<Deferred>,
    /// Bytes of the Relays in `deferred`.
    deferred_relay_bytes: usize,
    retry_budget: usize,
    verify: Gcra,
    log: DropLog,
    next_sweep: Instant,
    next_sync: Instant,
    relay_bytes: Rate,
    relay_packets: Rate,
    punch: Rate,
    verify_rate: Rate,
}

impl std::fmt::Debug for Beacon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Beacon")
            .field("nodes", &self.nodes.len())
            .field("peers", &self.peer_addrs)
            .field("deferred", &self.deferred.len())
            .finish_non_exhaustive()
    }
}

/// The form the table uses for an address: v4-mapped IPv6 becomes IPv4, so a dual-stack
/// socket and an IPv4 configuration name a peer the same way.
pub fn canonical(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => a,
        },
        SocketAddr::V4(_) => a,
    }
}

impl Beacon {
    /// A beacon with an empty table; `now` starts its timers.
    pub fn new(authority: Arc<dyn Authority>, config: Config, now: Instant) -> Beacon {
        let mut peer_addrs: Vec<SocketAddr> = config.peers.iter().copied().map(canonical).collect();
        peer_addrs.sort_unstable();
        peer_addrs.dedup();
        let peers = peer_addrs
            .iter()
            .map(|&addr| Peer {
                addr,
                beacon_id: 0,
                nodes: Vec::new(),
                heard: None,
            })
            .collect();
        Beacon {
            relay_bytes: Rate::new(config.relay_bytes_per_sec, config.relay_burst),
            relay_packets: Rate::new(config.relay_packets_per_sec, config.relay_burst),
            punch: Rate::with_burst_units(config.punch_per_sec, config.punch_burst.max(1)),
            verify_rate: Rate::with_burst_units(config.verify_per_sec, config.verify_per_sec),
            authority,
            epoch: now,
            nodes: HashMap::new(),
            peers,
            peer_addrs,
            deferred: VecDeque::with_capacity(config.max_deferred.min(1 << 16)),
            deferred_relay_bytes: 0,
            retry_budget: 0,
            verify: Gcra::default(),
            log: DropLog::new(StatsHandle::default()),
            next_sweep: now + SWEEP_INTERVAL,
            next_sync: now,
            config,
        }
    }

    /// The live counters, shareable with other threads.
    pub fn stats_handle(&self) -> StatsHandle {
        self.log.stats().clone()
    }

    /// The counters now.
    pub fn stats(&self) -> Stats {
        self.log.stats().snapshot()
    }

    /// The settings.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// `node`'s live entry.
    pub fn node(&self, now: Instant, node: u32) -> Option<NodeEntry> {
        self.nodes
            .get(&node)
            .filter(|e| e.live(now, self.config.entry_ttl))
            .map(|e| NodeEntry {
                endpoint: e.endpoint,
                strong: e.strong,
                last_seen: e.last_seen,
            })
    }

    /// Entries held in memory, expired ones not yet swept included.
    pub fn table_len(&self) -> usize {
        self.nodes.len()
    }

    /// The peer beacon that last listed `node` in an unexpired Sync.
    pub fn gossip_peer(&self, now: Instant, node: u32) -> Option<SocketAddr> {
        self.peers
            .iter()
            .filter(|p| p.heard.is_some_and(|h| now < h + self.config.gossip_ttl))
            .filter(|p| p.nodes.binary_search(&node).is_ok())
            .max_by_key(|p| p.heard)
            .map(|p| p.addr)
    }

    fn now_ns(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    fn is_peer(&self, a: SocketAddr) -> bool {
        self.peer_addrs.binary_search(&a).is_ok()
    }

    fn counters(&self) -> &Counters {
        self.log.stats().counters()
    }

    fn dropped(&mut self, now: Now, reason: DropReason, src: SocketAddr, node: u32) -> Output {
        self.log.record(now.instant, reason, src, node);
        Output::None
    }

    /// Handles one datagram from `src`. `datagram` is exactly the bytes received; a relayed
    /// datagram is rewritten in place and [`Output::Send`] points into it.
    pub fn handle_datagram(&mut self, now: Now, src: SocketAddr, datagram: &mut [u8]) -> Output {
        Counters::add(&self.counters().datagrams, 1);
        self.handle(now, canonical(src), datagram, None)
    }

    fn handle(
        &mut self,
        now: Now,
        src: SocketAddr,
        buf: &mut [u8],
        deferred_since: Option<Instant>,
    ) -> Output {
        let msg = match BeaconMessage::parse(buf) {
            Ok(m) => m,
            Err(_) => return self.dropped(now, DropReason::Parse, src, 0),
        };
        match msg {
            BeaconMessage::Discover { node, proof } => {
                self.on_discover(now, src, node, proof, deferred_since)
            }
            BeaconMessage::PunchRequest { requester, target } => {
                self.on_punch(now, src, requester, target, deferred_since)
            }
            BeaconMessage::Relay { sender, dest, .. } => {
                self.on_relay(now, src, sender, dest, buf, deferred_since)
            }
            BeaconMessage::Sync { beacon_id, .. } => {
                self.on_sync(now, src, beacon_id, msg);
                Output::None
            }
            BeaconMessage::DiscoverReply { .. }
            | BeaconMessage::PunchCommand { .. }
            | BeaconMessage::RelayDeliver { .. } => {
                self.dropped(now, DropReason::UnexpectedType, src, 0)
            }
        }
    }

    /// Discover: always answer with the observed endpoint (it only reflects the sender's own
    /// address), then decide whether the entry changes.
    fn on_discover(
        &mut self,
        now: Now,
        src: SocketAddr,
        node: u32,
        proof: Option<DiscoverProof>,
        deferred_since: Option<Instant>,
    ) -> Output {
        // A retried message was answered when it first arrived.
        let reply = match deferred_since {
            None => Output::Reply {
                to: src,
                msg: Small::endpoint(kind::DISCOVER_REPLY, src),
            },
            Some(_) => Output::None,
        };
        if node == 0 {
            // The startup address probe: answered, never stored.
            Counters::add(&self.counters().probes, 1);
            return reply;
        }
        match self.admit(now, src, node, proof) {
            Ok(()) => {}
            Err(Refusal::Drop(r)) => {
                self.log.record(now.instant, r, src, node);
            }
            Err(Refusal::Pending) => {
                self.defer(
                    now,
                    src,
                    BeaconMessage::Discover { node, proof },
                    node,
                    deferred_since,
                );
            }
        }
        reply
    }

    /// Records `src` for `node`: strong with a valid proof, weak otherwise.
    fn admit(
        &mut self,
        now: Now,
        src: SocketAddr,
        node: u32,
        proof: Option<DiscoverProof>,
    ) -> Result<(), Refusal> {
        let key = if self.authority.knows_nodes() {
            match self.authority.node_key_answer(node) {
                Answer::Pending => return Err(Refusal::Pending),
                Answer::Ready(None) => return Err(DropReason::UnknownNode.into()),
                Answer::Ready(Some(k)) => Some(k),
            }
        } else {
            None
        };
        match (proof, key) {
            (Some(p), Some(key)) => self.admit_signed(now, src, node, p, &key)?,
            // Without keys (open authority) a signed Discover is a plain one.
            _ => self.admit_weak(now, src, node)?,
        }
        Ok(())
    }

    fn admit_signed(
        &mut self,
        now: Now,
        src: SocketAddr,
        node: u32,
        p: DiscoverProof,
        key: &[u8; 32],
    ) -> Result<(), DropReason> {
        let window = u64::try_from(self.config.signed_window.as_millis()).unwrap_or(u64::MAX);
        if p.unix_ms.abs_diff(now.unix_ms) > window {
            return Err(DropReason::Stale);
        }
        if self
            .nodes
            .get(&node)
            .is_some_and(|e| p.unix_ms <= e.last_signed_ms)
        {
            return Err(DropReason::Replayed);
        }
        let ns = self.now_ns(now.instant);
        if !self.verify.take(self.verify_rate, ns, 1) {
            return Err(DropReason::VerifyBudget);
        }
        p.verify(node, key).map_err(|_| DropReason::BadSignature)?;
        let e = self.entry_for(now.instant, node, src)?;
        e.endpoint = src;
        e.last_seen = now.instant;
        e.strong = true;
        e.last_signed_ms = p.unix_ms;
        e.signed_at = Some(now.instant);
        Counters::add(&self.counters().discovers_signed, 1);
        Ok(())
    }

    fn admit_weak(&mut self, now: Now, src: SocketAddr, node: u32) -> Result<(), DropReason> {
        let ttl = self.config.entry_ttl;
        if self
            .nodes
            .get(&node)
            .is_some_and(|e| e.strong && e.live(now.instant, ttl))
        {
            return Err(DropReason::WeakVsStrong);
        }
        let e = self.entry_for(now.instant, node, src)?;
        // Last writer wins among weak entries, as in v1 (see docs/BEACON.md for why there is
        // no hold-down).
        e.endpoint = src;
        e.last_seen = now.instant;
        e.strong = false;
        Counters::add(&self.counters().discovers_plain, 1);
        Ok(())
    }

    fn entry_for(
        &mut self,
        now: Instant,
        node: u32,
        src: SocketAddr,
    ) -> Result<&mut Entry, DropReason> {
        if !self.nodes.contains_key(&node) && self.nodes.len() >= self.config.max_nodes {
            return Err(DropReason::TableFull);
        }
        Ok(self
            .nodes
            .entry(node)
            .or_insert_with(|| Entry::new(src, now)))
    }

    /// PunchRequest: only between nodes that may reach each other, only from the requester's
    /// recorded endpoint (or as a weak refresh), within the requester's punch rate, and only
    /// when the target has a live entry.
    fn on_punch(
        &mut self,
        now: Now,
        src: SocketAddr,
        requester: u32,
        target: u32,
        deferred_since: Option<Instant>,
    ) -> Output {
        if requester == 0 || target == 0 || requester == target {
            return self.dropped(now, DropReason::Invalid, src, requester);
        }
        match self.authority.may_reach_answer(requester, target) {
            Answer::Ready(true) => {}
            Answer::Ready(false) => {
                return self.dropped(now, DropReason::NotAllowed, src, requester)
            }
            Answer::Pending => {
                let m = BeaconMessage::PunchRequest { requester, target };
                self.defer(now, src, m, requester, deferred_since);
                return Output::None;
            }
        }
        let ttl = self.config.entry_ttl;
        let strong = self
            .nodes
            .get(&requester)
            .filter(|e| e.strong && e.live(now.instant, ttl))
            .map(|e| e.endpoint);
        match strong {
            Some(ep) if ep != src => {
                return self.dropped(now, DropReason::SpoofedSender, src, requester);
            }
            // A strong entry is refreshed only by signed Discovers.
            Some(_) => {}
            None => match self.admit(now, src, requester, None) {
                Ok(()) => {}
                Err(Refusal::Drop(r)) => return self.dropped(now, r, src, requester),
                Err(Refusal::Pending) => {
                    let m = BeaconMessage::PunchRequest { requester, target };
                    self.defer(now, src, m, requester, deferred_since);
                    return Output::None;
                }
            },
        }
        let ns = self.now_ns(now.instant);
        let rate = self.punch;
        let allowed = self
            .nodes
            .get_mut(&requester)
            .is_some_and(|e| e.punch.take(rate, ns, 1));
        if !allowed {
            return self.dropped(now, DropReason::RateLimited, src, requester);
        }
        let Some(t) = self.node(now.instant, target) else {
            return self.dropped(now, DropReason::UnknownDest, src, requester);
        };
        Counters::add(&self.counters().punches, 1);
        Output::Punch {
            requester: (src, Small::endpoint(kind::PUNCH_COMMAND, t.endpoint)),
            target: (t.endpoint, Small::endpoint(kind::PUNCH_COMMAND, src)),
        }
    }

    /// Relay: the sender is bound to its recorded endpoint (or the datagram comes from a peer
    /// beacon), may reach the destination, and is within its rates. Delivered in place to a
    /// local destination, else forwarded unchanged to the peer that gossiped it. While the
    /// authority's answer is pending the datagram is held (like a Discover) and tried again.
    fn on_relay(
        &mut self,
        now: Now,
        src: SocketAddr,
        sender: u32,
        dest: u32,
        buf: &mut [u8],
        deferred_since: Option<Instant>,
    ) -> Output {
        let from_peer = self.is_peer(src);
        let ttl = self.config.entry_ttl;
        let ns = self.now_ns(now.instant);
        let len = buf.len() as u64;
        let checked: Result<(), DropReason> = if from_peer {
            match self.authority.may_reach_answer(sender, dest) {
                Answer::Ready(true) => Ok(()),
                Answer::Ready(false) => Err(DropReason::NotAllowed),
                Answer::Pending => Err(DropReason::AuthorityPending),
            }
        } else {
            let (rb, rp) = (self.relay_bytes, self.relay_packets);
            let authority = &self.authority;
            match self.nodes.get_mut(&sender) {
                None => Err(DropReason::UnknownSender),
                Some(e) if !e.live(now.instant, ttl) => Err(DropReason::UnknownSender),
                Some(e) if e.endpoint != src => Err(DropReason::SpoofedSender),
                Some(e) => {
                    let reused =
                        e.reach_dest == dest && e.reach_until.is_some_and(|u| now.instant < u);
                    let reach = if reused {
                        Ok(())
                    } else {
                        match authority.may_reach_answer(sender, dest) {
                            Answer::Ready(true) => {
                                e.reach_dest = dest;
                                e.reach_until = Some(now.instant + REACH_REUSE);
                                Ok(())
                            }
                            Answer::Ready(false) => Err(DropReason::NotAllowed),
                            Answer::Pending => Err(DropReason::AuthorityPending),
                        }
                    };
                    reach.and_then(|()| {
                        match (
                            e.relay_bytes.check(rb, ns, len),
                            e.relay_packets.check(rp, ns, 1),
                        ) {
                            (Some(b), Some(p)) => {
                                e.relay_bytes.commit(b);
                                e.relay_packets.commit(p);
                                Ok(())
                            }
                            _ => Err(DropReason::RateLimited),
                        }
                    })
                }
            }
        };
        match checked {
            Ok(()) => {}
            Err(DropReason::AuthorityPending) => {
                // The first Relay of a flow is often a key exchange a v1 daemon sends once
                // (v1 wire §2.3 step 8): hold it until the answer comes.
                self.defer_relay(now, src, sender, buf, deferred_since);
                return Output::None;
            }
            Err(r) => return self.dropped(now, r, src, sender),
        }
        if let Some(d) = self.node(now.instant, dest) {
            let Ok(start) = relay_into_deliver(buf) else {
                return self.dropped(now, DropReason::Parse, src, sender);
            };
            let c = self.counters();
            Counters::add(&c.relayed_packets, 1);
            Counters::add(&c.relayed_bytes, (buf.len() - start) as u64);
            return Output::Send {
                to: d.endpoint,
                start,
                end: buf.len(),
            };
        }
        // One hop between beacons at most: a relay from a peer is never forwarded again, so
        // stale gossip cannot make two beacons bounce a datagram.
        if !from_peer {
            if let Some(peer) = self.gossip_peer(now.instant, dest) {
                Counters::add(&self.counters().forwarded_packets, 1);
                return Output::Send {
                    to: peer,
                    start: 0,
                    end: buf.len(),
                };
            }
        }
        self.dropped(now, DropReason::UnknownDest, src, sender)
    }

    /// Sync: accepted only from configured peers; replaces everything that peer said before.
    fn on_sync(&mut self, now: Now, src: SocketAddr, beacon_id: u32, msg: BeaconMessage<'_>) {
        let Some(p) = self.peers.iter_mut().find(|p| p.addr == src) else {
            self.log.record(now.instant, DropReason::NotPeer, src, 0);
            return;
        };
        p.beacon_id = beacon_id;
        p.nodes.clear();
        p.nodes.extend(msg.sync_nodes());
        p.nodes.sort_unstable();
        p.nodes.dedup();
        p.heard = Some(now.instant);
        Counters::add(&self.counters().syncs_received, 1);
    }

    fn defer(
        &mut self,
        now: Now,
        src: SocketAddr,
        msg: BeaconMessage<'_>,
        node: u32,
        since: Option<Instant>,
    ) {
        let first = since.unwrap_or(now.instant);
        if now.instant.saturating_duration_since(first) >= self.config.defer_for {
            self.log
                .record(now.instant, DropReason::AuthorityPending, src, node);
            return;
        }
        if self.deferred.len() >= self.config.max_deferred {
            self.log
                .record(now.instant, DropReason::DeferOverflow, src, node);
            return;
        }
        let mut bytes = [0u8; SIGNED_DISCOVER_LEN];
        // Only Discover (at most 77 bytes) and PunchRequest (9) are deferred.
        let Ok(len) = msg.emit(&mut bytes) else {
            return;
        };
        if since.is_none() {
            Counters::add(&self.counters().deferred, 1);
        }
        self.deferred.push_back(Deferred {
            src,
            since: first,
            bytes: DeferredBytes::Small {
                len: len as u8,
                bytes,
            },
        });
    }

    /// Holds a Relay datagram (`datagram`, exactly as received) until the authority answers,
    /// within [`Config::defer_for`], [`Config::max_deferred`] and
    /// [`Config::max_deferred_relay_bytes`].
    fn defer_relay(
        &mut self,
        now: Now,
        src: SocketAddr,
        sender: u32,
        datagram: &[u8],
        since: Option<Instant>,
    ) {
        let first = since.unwrap_or(now.instant);
        if now.instant.saturating_duration_since(first) >= self.config.defer_for {
            self.log
                .record(now.instant, DropReason::AuthorityPending, src, sender);
            return;
        }
        if self.deferred.len() >= self.config.max_deferred
            || self.deferred_relay_bytes + datagram.len() > self.config.max_deferred_relay_bytes
        {
            self.log
                .record(now.instant, DropReason::DeferOverflow, src, sender);
            return;
        }
        if since.is_none() {
            Counters::add(&self.counters().deferred, 1);
        }
        self.deferred_relay_bytes += datagram.len();
        self.deferred.push_back(Deferred {
            src,
            since: first,
            bytes: DeferredBytes::Relay(datagram.into()),
        });
    }

    /// Housekeeping: removes expired entries (every [`SWEEP_INTERVAL`]), updates the gauges,
    /// and lets [`Beacon::poll_deferred`] retry every waiting message once.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.retry_budget = self.deferred.len();
        if now < self.next_sweep {
            return;
        }
        self.next_sweep = now + SWEEP_INTERVAL;
        let ttl = self.config.entry_ttl;
        let guard = self.config.signed_window * 2;
        let (mut strong, mut weak) = (0u64, 0u64);
        self.nodes.retain(|_, e| {
            if e.live(now, ttl) {
                if e.strong {
                    strong += 1;
                } else {
                    weak += 1;
                }
                return true;
            }
            // Keep the replay guard of a recently signed node.
            e.signed_at.is_some_and(|t| now < t + guard)
        });
        let gossip_ttl = self.config.gossip_ttl;
        let mut gossip = 0u64;
        for p in &mut self.peers {
            if p.heard.is_some_and(|h| now >= h + gossip_ttl) {
                p.heard = None;
                p.nodes.clear();
            }
            gossip += p.nodes.len() as u64;
        }
        let c = self.counters();
        c.nodes_strong
            .store(strong, std::sync::atomic::Ordering::Relaxed);
        c.nodes_weak
            .store(weak, std::sync::atomic::Ordering::Relaxed);
        c.gossip_nodes
            .store(gossip, std::sync::atomic::Ordering::Relaxed);
    }

    /// When a Sync is due: writes it into `out` (v1 format: every live local node, at most
    /// [`MAX_SYNC_NODES`]) and returns the peers to send it to.
    pub fn poll_sync(&mut self, now: Instant, out: &mut Vec<u8>) -> Option<&[SocketAddr]> {
        if self.peer_addrs.is_empty() || now < self.next_sync {
            return None;
        }
        self.next_sync = now + self.config.sync_interval;
        let ttl = self.config.entry_ttl;
        out.clear();
        out.push(kind::SYNC);
        out.extend_from_slice(&self.config.beacon_id.to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        let mut count = 0usize;
        for (&id, _) in self.nodes.iter().filter(|(_, e)| e.live(now, ttl)) {
            if count == MAX_SYNC_NODES {
                tracing::warn!(
                    limit = MAX_SYNC_NODES,
                    "too many nodes for one Sync; the rest are not gossiped"
                );
                break;
            }
            out.extend_from_slice(&id.to_be_bytes());
            count += 1;
        }
        // count <= MAX_SYNC_NODES < 65536.
        out[5..7].copy_from_slice(&(count as u16).to_be_bytes());
        Counters::add(&self.counters().syncs_sent, self.peer_addrs.len() as u64);
        Some(&self.peer_addrs)
    }

    /// Retries messages that waited for the authority; call after [`Beacon::handle_timeout`]
    /// until it returns `None`. `buf` (the receive buffer: a held Relay may be as large as
    /// any datagram; one that does not fit is dropped as `defer_overflow`) receives the
    /// retried message, and an [`Output::Send`] points into it.
    pub fn poll_deferred(&mut self, now: Now, buf: &mut [u8]) -> Option<Output> {
        while self.retry_budget > 0 {
            self.retry_budget -= 1;
            let d = self.deferred.pop_front()?;
            let bytes = d.bytes.as_slice();
            if let DeferredBytes::Relay(r) = &d.bytes {
                self.deferred_relay_bytes = self.deferred_relay_bytes.saturating_sub(r.len());
            }
            let Some(b) = buf.get_mut(..bytes.len()) else {
                self.log
                    .record(now.instant, DropReason::DeferOverflow, d.src, 0);
                continue;
            };
            b.copy_from_slice(bytes);
            let out = self.handle(now, d.src, b, Some(d.since));
            if !out.is_none() {
                return Some(out);
            }
        }
        None
    }

    /// Messages waiting for the authority.
    pub fn deferred_len(&self) -> usize {
        self.deferred.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authority::{OpenAuthority, StaticAuthority};
    use ed25519_dalek::SigningKey;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tunnel::wire::beacon::signed_discover;

    const A: u32 = 0x0001_0001;
    const B: u32 = 0x0001_0002;
    const C: u32 = 0x0001_0003;

    fn key(node: u32) -> SigningKey {
        let mut seed = [0u8; 32];
        seed[..4].copy_from_slice(&node.to_be_bytes());
        SigningKey::from_bytes(&seed)
    }

    fn ep(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    struct Fx {
        b: Beacon,
        auth: Arc<StaticAuthority>,
        now: Now,
    }

    impl Fx {
        fn with(config: Config) -> Fx {
            let auth = Arc::new(StaticAuthority::new());
            for n in [A, B, C] {
                auth.add_node(n, key(n).verifying_key().to_bytes());
            }
            auth.allow(A, B);
            let now = Now {
                instant: Instant::now(),
                unix_ms: 1_700_000_000_000,
            };
            Fx {
                b: Beacon::new(auth.clone(), config, now.instant),
                auth,
                now,
            }
        }

        fn new() -> Fx {
            Fx::with(Config::default())
        }

        fn advance(&mut self, d: Duration) {
            self.now = self.now.after(d);
        }

        fn send(&mut self, src: &str, dg: &[u8]) -> (Output, Vec<u8>) {
            let mut buf = dg.to_vec();
            let out = self.b.handle_datagram(self.now, ep(src), &mut buf);
            (out, buf)
        }

        fn plain(&mut self, src: &str, node: u32) -> Output {
            let mut m = [0u8; 5];
            m[0] = kind::DISCOVER;
            m[1..].copy_from_slice(&node.to_be_bytes());
            self.send(src, &m).0
        }

        fn signed_at(&mut self, src: &str, node: u32, unix_ms: u64) -> Output {
            let dg = signed_discover(&key(node), node, unix_ms);
            self.send(src, &dg).0
        }

        fn signed(&mut self, src: &str, node: u32) -> Output {
            let ms = self.now.unix_ms;
            self.signed_at(src, node, ms)
        }

        fn punch(&mut self, src: &str, requester: u32, target: u32) -> Output {
            let mut m = [0u8; 9];
            m[0] = kind::PUNCH_REQUEST;
            m[1..5].copy_from_slice(&requester.to_be_bytes());
            m[5..].copy_from_slice(&target.to_be_bytes());
            self.send(src, &m).0
        }

        fn relay(
            &mut self,
            src: &str,
            sender: u32,
            dest: u32,
            payload: &[u8],
        ) -> (Output, Vec<u8>) {
            let mut m = vec![kind::RELAY];
            m.extend_from_slice(&sender.to_be_bytes());
            m.extend_from_slice(&dest.to_be_bytes());
            m.extend_from_slice(payload);
            self.send(src, &m)
        }

        fn entry(&self, node: u32) -> Option<NodeEntry> {
            self.b.node(self.now.instant, node)
        }

        fn dropped(&self, r: DropReason) -> u64 {
            self.b.stats().dropped(r)
        }
    }

    fn sent(out: &Output, buf: &[u8]) -> Vec<(SocketAddr, Vec<u8>)> {
        out.transmits(buf).map(|(a, b)| (a, b.to_vec())).collect()
    }

    fn reply_to(src: &str) -> Output {
        Output::Reply {
            to: ep(src),
            msg: Small::endpoint(kind::DISCOVER_REPLY, ep(src)),
        }
    }

    #[test]
    fn signed_discover_makes_a_strong_entry_and_plain_a_weak_one() {
        let mut f = Fx::new();
        assert_eq!(
            f.signed("198.51.100.1:4000", A),
            reply_to("198.51.100.1:4000")
        );
        let e = f.entry(A).unwrap();
        assert!(e.strong);
        assert_eq!(e.endpoint, ep("198.51.100.1:4000"));
        assert_eq!(
            f.plain("198.51.100.2:5000", B),
            reply_to("198.51.100.2:5000")
        );
        let e = f.entry(B).unwrap();
        assert!(!e.strong);
        let s = f.b.stats();
        assert_eq!((s.discovers_signed, s.discovers_plain), (1, 1));
        // The reply reflects the source, as v1's does.
        let out = f.plain("203.0.113.9:7", B);
        assert_eq!(
            sent(&out, &[]),
            vec![(ep("203.0.113.9:7"), vec![2, 4, 203, 0, 113, 9, 0, 7])]
        );
    }

    #[test]
    fn forged_plain_discover_cannot_hijack_a_strong_entry() {
        let mut f = Fx::new();
        f.signed("198.51.100.1:4000", A);
        // The attacker's forged discover is still answered (it only learns its own address)...
        assert!(!f.plain("192.0.2.66:6666", A).is_none());
        // ...but changes nothing.
        assert_eq!(f.entry(A).unwrap().endpoint, ep("198.51.100.1:4000"));
        assert!(f.entry(A).unwrap().strong);
        assert_eq!(f.dropped(DropReason::WeakVsStrong), 1);
        // Nor does a PunchRequest from the attacker's address.
        assert!(f.punch("192.0.2.66:6666", A, B).is_none());
        assert_eq!(f.dropped(DropReason::SpoofedSender), 1);
        assert_eq!(f.entry(A).unwrap().endpoint, ep("198.51.100.1:4000"));
    }

    #[test]
    fn weak_entries_last_writer_wins_and_strong_replaces_weak() {
        let mut f = Fx::new();
        f.plain("192.0.2.66:6666", A);
        f.plain("198.51.100.1:4000", A);
        assert_eq!(f.entry(A).unwrap().endpoint, ep("198.51.100.1:4000"));
        f.plain("192.0.2.66:6666", A);
        assert_eq!(f.entry(A).unwrap().endpoint, ep("192.0.2.66:6666"));
        // The real node signs: the entry is its own from now on.
        f.signed("198.51.100.1:4000", A);
        assert!(f.entry(A).unwrap().strong);
        f.plain("192.0.2.66:6666", A);
        assert_eq!(f.entry(A).unwrap().endpoint, ep("198.51.100.1:4000"));
    }

    #[test]
    fn weak_may_take_over_once_the_strong_entry_expires() {
        let mut f = Fx::new();
        f.signed("198.51.100.1:4000", A);
        f.advance(Duration::from_secs(179));
        f.plain("198.51.100.7:4000", A);
        assert_eq!(f.entry(A).unwrap().endpoint, ep("198.51.100.1:4000"));
        f.advance(Duration::from_secs(1));
        assert_eq!(f.entry(A), None, "expired after 180 s");
        f.plain("198.51.100.7:4000", A);
        let e = f.entry(A).unwrap();
        assert!(!e.strong);
        assert_eq!(e.endpoint, ep("198.51.100.7:4000"));
    }

    #[test]
    fn signed_discover_moves_a_strong_entry() {
        let mut f = Fx::new();
        f.signed("198.51.100.1:4000", A);
        f.advance(Duration::from_secs(30));
        f.signed("198.51.100.1:4999", A);
        assert_eq!(f.entry(A).unwrap().endpoint, ep("198.51.100.1:4999"));
        assert_eq!(f.b.stats().discovers_signed, 2);
    }

    #[test]
    fn replayed_signed_discovers_are_refused() {
        let mut f = Fx::new();
        let ms = f.now.unix_ms;
        let dg = signed_discover(&key(A), A, ms);
        f.send("198.51.100.1:4000", &dg);
        // The same datagram from an attacker, at once and a few seconds later.
        f.send("192.0.2.66:6666", &dg);
        f.advance(Duration::from_secs(5));
        f.send("192.0.2.66:6666", &dg);
        assert_eq!(f.dropped(DropReason::Replayed), 2);
        // An older one captured earlier is refused too.
        f.signed_at("192.0.2.66:6666", A, ms - 1);
        assert_eq!(f.dropped(DropReason::Replayed), 3);
        assert_eq!(f.entry(A).unwrap().endpoint, ep("198.51.100.1:4000"));
    }

    #[test]
    fn stale_and_future_signatures_are_refused() {
        let mut f = Fx::new();
        let now = f.now.unix_ms;
        f.signed_at("198.51.100.1:4000", A, now - 30_001);
        f.signed_at("198.51.100.1:4000", A, now + 30_001);
        assert_eq!(f.dropped(DropReason::Stale), 2);
        assert_eq!(f.entry(A), None);
        // The window's edges are accepted.
        f.signed_at("198.51.100.1:4000", A, now - 30_000);
        assert!(f.entry(A).unwrap().strong);
        f.signed_at("198.51.100.1:4000", A, now + 30_000);
        assert_eq!(f.b.stats().discovers_signed, 2);
    }

    #[test]
    fn bad_signatures_are_refused() {
        let mut f = Fx::new();
        // Signed by B's key but claiming A.
        let mut dg = signed_discover(&key(B), B, f.now.unix_ms);
        dg[1..5].copy_from_slice(&A.to_be_bytes());
        f.send("192.0.2.66:6666", &dg);
        // A's own signature with a bit flipped.
        let mut dg = signed_discover(&key(A), A, f.now.unix_ms);
        dg[50] ^= 0x10;
        f.send("192.0.2.66:6666", &dg);
        assert_eq!(f.dropped(DropReason::BadSignature), 2);
        assert_eq!(f.entry(A), None);
        // A refused signature does not block the real one.
        f.signed("198.51.100.1:4000", A);
        assert!(f.entry(A).unwrap().strong);
    }

    #[test]
    fn replay_guard_survives_expiry_and_sweeps() {
        let mut f = Fx::with(Config {
            entry_ttl: Duration::from_secs(10),
            ..Config::default()
        });
        let dg = signed_discover(&key(A), A, f.now.unix_ms + 25_000);
        f.send("198.51.100.1:4000", &dg);
        f.advance(Duration::from_secs(20));
        f.b.handle_timeout(f.now.instant);
        assert_eq!(f.entry(A), None, "expired");
        // Still inside the signature window: a replay must not pass.
        f.send("192.0.2.66:6666", &dg);
        assert_eq!(f.dropped(DropReason::Replayed), 1);
        assert_eq!(f.entry(A), None);
        // After twice the window the guard is released with the entry.
        f.advance(Duration::from_secs(45));
        f.b.handle_timeout(f.now.instant);
        assert_eq!(f.b.table_len(), 0);
    }

    #[test]
    fn node_zero_probes_are_answered_not_stored() {
        let mut f = Fx::new();
        assert_eq!(
            f.plain("198.51.100.1:4000", 0),
            reply_to("198.51.100.1:4000")
        );
        let dg = signed_discover(&key(0), 0, f.now.unix_ms);
        assert!(!f.send("198.51.100.1:4000", &dg).0.is_none());
        assert_eq!(f.b.table_len(), 0);
        assert_eq!(f.b.stats().probes, 2);
    }

    #[test]
    fn unknown_nodes_are_not_stored() {
        let mut f = Fx::new();
        assert!(
            !f.plain("198.51.100.1:4000", 99).is_none(),
            "still answered"
        );
        f.signed("198.51.100.1:4000", 99);
        assert_eq!(f.b.table_len(), 0);
        assert_eq!(f.dropped(DropReason::UnknownNode), 2);
    }

    #[test]
    fn open_authority_stores_everything_weak() {
        let mut b = Beacon::new(Arc::new(OpenAuthority), Config::default(), Instant::now());
        let now = Now::system();
        let mut dg = signed_discover(&key(99), 99, now.unix_ms);
        b.handle_datagram(now, ep("198.51.100.1:4000"), &mut dg);
        let e = b.node(now.instant, 99).unwrap();
        assert!(!e.strong, "nothing to verify against: weak");
    }

    #[test]
    fn punch_needs_may_reach() {
        let mut f = Fx::new();
        f.signed("198.51.100.1:4000", A);
        f.signed("198.51.100.3:4000", C);
        assert!(f.punch("198.51.100.1:4000", A, C).is_none());
        assert_eq!(f.dropped(DropReason::NotAllowed), 1);
        assert_eq!(f.b.stats().punches, 0);
    }

    #[test]
    fn punch_introduces_both_sides() {
        let mut f = Fx::new();
        f.signed("198.51.100.1:4000", A);
        f.plain("[2001:db8::2]:5000", B);
        let out = f.punch("198.51.100.1:4000", A, B);
        let mut v6 = vec![4u8, 16];
        v6.extend_from_slice(
            &"2001:db8::2"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        v6.extend_from_slice(&5000u16.to_be_bytes());
        assert_eq!(
            sent(&out, &[]),
            vec![
                (ep("198.51.100.1:4000"), v6),
                (
                    ep("[2001:db8::2]:5000"),
                    vec![4, 4, 198, 51, 100, 1, 0x0F, 0xA0]
                ),
            ]
        );
        assert_eq!(f.b.stats().punches, 1);
    }

    #[test]
    fn punch_refreshes_a_weak_requester_and_needs_a_live_target() {
        let mut f = Fx::new();
        // No entry for A yet: the request records it, weak, like a plain discover.
        assert!(f.punch("198.51.100.1:4000", A, B).is_none());
        assert_eq!(f.dropped(DropReason::UnknownDest), 1);
        assert!(!f.entry(A).unwrap().strong);
        f.plain("198.51.100.2:4000", B);
        assert!(!f.punch("198.51.100.1:4000", A, B).is_none());
        f.advance(Duration::from_secs(181));
        f.plain("198.51.100.1:4000", A);
        assert!(
            f.punch("198.51.100.1:4000", A, B).is_none(),
            "target expired"
        );
        assert_eq!(f.dropped(DropReason::UnknownDest), 2);
        // Node 0 and self-punches are refused.
        assert!(f.punch("198.51.100.1:4000", A, A).is_none());
        assert!(f.punch("198.51.100.1:4000", 0, B).is_none());
        assert_eq!(f.dropped(DropReason::Invalid), 2);
    }

    #[test]
    fn punches_are_rate_limited_per_requester() {
        let mut f = Fx::new();
        f.signed("198.51.100.1:4000", A);
        f.signed("198.51.100.2:4000", B);
        let mut ok = 0;
        for _ in 0..20 {
            if !f.punch("198.51.100.1:4000", A, B).is_none() {
                ok += 1;
            }
        }
        assert_eq!(ok, 10, "burst of 10");
        assert_eq!(f.dropped(DropReason::RateLimited), 10);
        // B has its own budget.
        assert!(!f.punch("198.51.100.2:4000", B, A).is_none());
        f.advance(Duration::from_millis(500));
        assert!(
            !f.punch("198.51.100.1:4000", A, B).is_none(),
            "2 per second"
        );
        assert!(f.punch("198.51.100.1:4000", A, B).is_none());
    }

    #[test]
    fn relay_is_rewritten_in_place_and_delivered() {
        let mut f = Fx::new();
        f.signed("198.51.100.1:4000", A);
        f.plain("198.51.100.2:5000", B);
        let (out, buf) = f.relay("198.51.100.1:4000", A, B, b"PILS-frame");
        let mut want = vec![kind::RELAY_DELIVER];
        want.extend_from_slice(&A.to_be_bytes());
        want.extend_from_slice(b"PILS-frame");
        assert_eq!(
            out,
            Output::Send {
                to: ep("198.51.100.2:5000"),
                start: 4,
                end: buf.len()
            }
        );
        assert_eq!(sent(&out, &buf), vec![(ep("198.51.100.2:5000"), want)]);
        let s = f.b.stats();
        assert_eq!((s.relayed_packets, s.relayed_bytes), (1, 15));
    }

    #[test]
    fn relay_from_a_spoofed_source_is_dropped() {
        let mut f = Fx::new();
        f.signed("198.51.100.1:4000", A);
        f.plain("198.51.100.2:5000", B);
        assert!(f.relay("192.0.2.66:6666", A, B, b"x").0.is_none());
        assert_eq!(f.dropped(DropReason::SpoofedSender), 1);
        // A sender with no entry at all.
        f.auth.allow(C, B);
        assert!(f.relay("198.51.100.3:4000", C, B, b"x").0.is_none());
        assert_eq!(f.dropped(DropReason::UnknownSender), 1);
        assert_eq!(f.b.stats().relayed_packets, 0);
    }

    #[test]
    fn relay_needs_may_reach_and_a_live_destination() {
        let mut f = Fx::new();
        f.signed("198.51.100.1:4000", A);
        f.signed("198.51.100.3:4000", C);
        assert!(f.relay("198.51.100.1:4000", A, C, b"x").0.is_none());
        assert_eq!(f.dropped(DropReason::NotAllowed), 1);
        assert!(f.relay("198.51.100.1:4000", A, B, b"x").0.is_none());
        assert_eq!(f.dropped(DropReason::UnknownDest), 1);
    }

    #[test]
    fn withdrawn_reachability_takes_effect_after_the_reuse_period() {
        let mut f = Fx::new();
        f.signed("198.51.100.1:4000", A);
        f.signed("198.51.100.2:4000", B);
        assert!(!f.relay("198.51.100.1:4000", A, B, b"x").0.is_none());
        f.auth.deny(A, B);
        assert!(!f.relay("198.51.100.1:4000", A, B, b"x").0.is_none());
        f.advance(REACH_REUSE);
        assert!(f.relay("198.51.100.1:4000", A, B, b"x").0.is_none());
        assert_eq!(f.dropped(DropReason::NotAllowed), 1);
    }

    #[test]
    fn relay_is_rate_limited_per_sender_in_packets_and_bytes() {
        let mut f = Fx::with(Config {
            relay_packets_per_sec: 100,
            relay_bytes_per_sec: 10_000,
            relay_burst: Duration::from_secs(1),
            ..Config::default()
        });
        f.signed("198.51.100.1:4000", A);
        f.signed("198.51.100.2:4000", B);
        let ok = (0..150)
            .filter(|_| !f.relay("198.51.100.1:4000", A, B, b"tiny").0.is_none())
            .count();
        assert_eq!(ok, 100, "packet burst");
        f.advance(Duration::from_secs(10));
        let big = [0u8; 991]; // 1000 bytes with the header
        let ok = (0..20)
            .filter(|_| !f.relay("198.51.100.1:4000", A, B, &big).0.is_none())
            .count();
        assert_eq!(ok, 10, "byte burst");
        // B is not affected by A's limit.
        assert!(!f.relay("198.51.100.2:4000", B, A, &big).0.is_none());
        assert_eq!(f.dropped(DropReason::RateLimited), 60);
    }

    #[test]
    fn entries_expire_and_are_swept() {
        let mut f = Fx::new();
        f.plain("198.51.100.1:4000", A);
        f.advance(Duration::from_secs(100));
        f.plain("198.51.100.1:4000", A);
        f.plain("198.51.100.2:4000", B);
        f.advance(Duration::from_secs(100));
        assert!(f.entry(A).is_some(), "refreshed");
        f.b.handle_timeout(f.now.instant);
        assert_eq!(f.b.stats().nodes_weak, 2);
        f.advance(Duration::from_secs(81));
        assert!(f.entry(A).is_none() && f.entry(B).is_none());
        f.b.handle_timeout(f.now.instant);
        assert_eq!(f.b.table_len(), 0);
        assert_eq!(f.b.stats().nodes_weak, 0);
    }

    fn sync_msg(beacon_id: u32, nodes: &[u32]) -> Vec<u8> {
        let mut m = vec![kind::SYNC];
        m.extend_from_slice(&beacon_id.to_be_bytes());
        m.extend_from_slice(&(nodes.len() as u16).to_be_bytes());
        for n in nodes {
            m.extend_from_slice(&n.to_be_bytes());
        }
        m
    }

    fn with_peer() -> Fx {
        Fx::with(Config {
            beacon_id: 1,
            peers: vec![ep("10.0.0.2:9001")],
            ..Config::default()
        })
    }

    #[test]
    fn sync_only_from_peers() {
        let mut f = with_peer();
        f.send("192.0.2.66:9001", &sync_msg(2, &[B]));
        assert_eq!(f.dropped(DropReason::NotPeer), 1);
        assert_eq!(f.b.gossip_peer(f.now.instant, B), None);
        // A dual-stack socket reports the peer v4-mapped: still the peer.
        f.send("[::ffff:10.0.0.2]:9001", &sync_msg(2, &[B, C]));
        assert_eq!(f.b.gossip_peer(f.now.instant, B), Some(ep("10.0.0.2:9001")));
        assert_eq!(f.b.stats().syncs_received, 1);
        // A new Sync replaces the old list.
        f.send("10.0.0.2:9001", &sync_msg(2, &[C]));
        assert_eq!(f.b.gossip_peer(f.now.instant, B), None);
        // Gossip expires.
        f.advance(Duration::from_secs(30));
        assert_eq!(f.b.gossip_peer(f.now.instant, C), None);
    }

    #[test]
    fn relay_to_a_gossiped_node_is_forwarded_unchanged_once() {
        let mut f = with_peer();
        f.signed("198.51.100.1:4000", A);
        f.send("10.0.0.2:9001", &sync_msg(2, &[B]));
        let (out, buf) = f.relay("198.51.100.1:4000", A, B, b"frame");
        assert_eq!(
            sent(&out, &buf),
            vec![(
                ep("10.0.0.2:9001"),
                b"\x05\x00\x01\x00\x01\x00\x01\x00\x02frame".to_vec()
            )]
        );
        assert_eq!(f.b.stats().forwarded_packets, 1);
        // From the peer: sender trusted (A has no entry here), may_reach still checked, and a
        // non-local destination is not bounced back.
        let mut g = with_peer();
        g.signed("198.51.100.2:4000", B);
        let (out, buf) = g.relay("10.0.0.2:9001", A, B, b"frame");
        assert_eq!(
            sent(&out, &buf),
            vec![(
                ep("198.51.100.2:4000"),
                b"\x06\x00\x01\x00\x01frame".to_vec()
            )]
        );
        assert!(g.relay("10.0.0.2:9001", C, B, b"frame").0.is_none());
        assert_eq!(g.dropped(DropReason::NotAllowed), 1);
        g.send("10.0.0.2:9001", &sync_msg(2, &[A]));
        assert!(g.relay("10.0.0.2:9001", B, A, b"frame").0.is_none());
        assert_eq!(g.dropped(DropReason::UnknownDest), 1);
    }

    #[test]
    fn sync_lists_live_local_nodes_every_interval() {
        let mut f = with_peer();
        f.signed("198.51.100.1:4000", A);
        f.plain("198.51.100.2:4000", B);
        let mut out = Vec::new();
        let peers = f.b.poll_sync(f.now.instant, &mut out).unwrap().to_vec();
        assert_eq!(peers, vec![ep("10.0.0.2:9001")]);
        let m = BeaconMessage::parse(&out).unwrap();
        let mut nodes: Vec<u32> = m.sync_nodes().collect();
        nodes.sort_unstable();
        assert_eq!(nodes, vec![A, B]);
        assert!(matches!(m, BeaconMessage::Sync { beacon_id: 1, .. }));
        assert!(f.b.poll_sync(f.now.instant, &mut out).is_none());
        f.advance(Duration::from_secs(10));
        assert!(f.b.poll_sync(f.now.instant, &mut out).is_some());
        // No peers, no Sync.
        let mut g = Fx::new();
        assert!(g.b.poll_sync(g.now.instant, &mut out).is_none());
    }

    #[test]
    fn garbage_and_beacon_only_types_are_counted() {
        let mut f = Fx::new();
        f.send("192.0.2.1:1", &[]);
        f.send("192.0.2.1:1", &[0x09, 1, 2]);
        f.send("192.0.2.1:1", &[kind::RELAY, 0, 0]);
        f.send("192.0.2.1:1", &[2, 4, 1, 2, 3, 4, 0, 1]);
        f.send("192.0.2.1:1", &[6, 0, 0, 0, 1, b'P']);
        assert_eq!(f.dropped(DropReason::Parse), 3);
        assert_eq!(f.dropped(DropReason::UnexpectedType), 2);
        assert_eq!(f.b.stats().datagrams, 5);
    }

    #[test]
    fn table_is_bounded() {
        let mut b = Beacon::new(
            Arc::new(OpenAuthority),
            Config {
                max_nodes: 2,
                ..Config::default()
            },
            Instant::now(),
        );
        let now = Now::system();
        for n in 1..=3u32 {
            let mut m = [1, 0, 0, 0, 0];
            m[1..].copy_from_slice(&n.to_be_bytes());
            b.handle_datagram(now, ep("192.0.2.1:1"), &mut m);
        }
        assert_eq!(b.table_len(), 2);
        assert_eq!(b.stats().dropped(DropReason::TableFull), 1);
    }

    #[test]
    fn signature_checks_have_a_budget() {
        let mut f = Fx::with(Config {
            verify_per_sec: 3,
            ..Config::default()
        });
        for i in 0..5 {
            let ms = f.now.unix_ms + i;
            f.signed_at("198.51.100.1:4000", A, ms);
        }
        assert_eq!(f.b.stats().discovers_signed, 3);
        assert_eq!(f.dropped(DropReason::VerifyBudget), 2);
    }

    /// An authority whose answers are not fetched yet until `ready` is set.
    struct PendingAuthority {
        inner: StaticAuthority,
        ready: AtomicBool,
    }

    impl Authority for PendingAuthority {
        fn node_key(&self, node: u32) -> Option<[u8; 32]> {
            self.inner.node_key(node)
        }
        fn may_reach(&self, from: u32, to: u32) -> bool {
            self.inner.may_reach(from, to)
        }
        fn node_key_answer(&self, node: u32) -> Answer<Option<[u8; 32]>> {
            match self.ready.load(Ordering::Relaxed) {
                true => Answer::Ready(self.node_key(node)),
                false => Answer::Pending,
            }
        }
        fn may_reach_answer(&self, from: u32, to: u32) -> Answer<bool> {
            match self.ready.load(Ordering::Relaxed) {
                true => Answer::Ready(self.may_reach(from, to)),
                false => Answer::Pending,
            }
        }
    }

    #[test]
    fn pending_answers_defer_discovers_and_punches() {
        let auth = Arc::new(PendingAuthority {
            inner: StaticAuthority::new(),
            ready: AtomicBool::new(false),
        });
        auth.inner
            .add_node(A, key(A).verifying_key().to_bytes())
            .add_node(B, key(B).verifying_key().to_bytes())
            .allow(A, B);
        let mut now = Now::system();
        let mut b = Beacon::new(auth.clone(), Config::default(), now.instant);
        let mut dg = signed_discover(&key(A), A, now.unix_ms);
        let out = b.handle_datagram(now, ep("198.51.100.1:4000"), &mut dg);
        assert!(!out.is_none(), "answered at once");
        let mut m = [kind::DISCOVER, 0, 0, 0, 0];
        m[1..].copy_from_slice(&B.to_be_bytes());
        b.handle_datagram(now, ep("198.51.100.2:4000"), &mut m);
        assert_eq!(b.node(now.instant, A), None);
        assert_eq!(b.deferred_len(), 2);

        let mut buf = [0u8; 128];
        now = now.after(TICK);
        b.handle_timeout(now.instant);
        assert_eq!(b.poll_deferred(now, &mut buf), None, "still pending");
        assert_eq!(b.deferred_len(), 2);

        auth.ready.store(true, Ordering::Relaxed);
        now = now.after(TICK);
        b.handle_timeout(now.instant);
        assert_eq!(b.poll_deferred(now, &mut buf), None, "no second reply");
        assert!(b.node(now.instant, A).unwrap().strong);
        assert!(!b.node(now.instant, B).unwrap().strong);
        assert_eq!(b.stats().deferred, 2);

        // A punch waits too, and goes out when the answer arrives.
        auth.ready.store(false, Ordering::Relaxed);
        let mut p = [kind::PUNCH_REQUEST, 0, 0, 0, 0, 0, 0, 0, 0];
        p[1..5].copy_from_slice(&A.to_be_bytes());
        p[5..].copy_from_slice(&B.to_be_bytes());
        assert!(b
            .handle_datagram(now, ep("198.51.100.1:4000"), &mut p)
            .is_none());
        auth.ready.store(true, Ordering::Relaxed);
        b.handle_timeout(now.instant);
        let out = b.poll_deferred(now, &mut buf).unwrap();
        assert!(matches!(out, Output::Punch { .. }));

        // An answer that never comes: given up after `defer_for`.
        auth.ready.store(false, Ordering::Relaxed);
        let mut m = [kind::DISCOVER, 0, 0, 0, 0];
        m[1..].copy_from_slice(&C.to_be_bytes());
        b.handle_datagram(now, ep("198.51.100.3:4000"), &mut m);
        now = now.after(Duration::from_secs(5));
        b.handle_timeout(now.instant);
        assert_eq!(b.poll_deferred(now, &mut buf), None);
        assert_eq!(b.deferred_len(), 0);
        assert_eq!(b.stats().dropped(DropReason::AuthorityPending), 1);
    }

    #[test]
    fn pending_answers_hold_relays_until_the_answer_comes() {
        let auth = Arc::new(PendingAuthority {
            inner: StaticAuthority::new(),
            ready: AtomicBool::new(true),
        });
        auth.inner
            .add_node(A, key(A).verifying_key().to_bytes())
            .add_node(B, key(B).verifying_key().to_bytes())
            .allow(A, B);
        let mut now = Now::system();
        let config = Config {
            max_deferred_relay_bytes: 600,
            ..Config::default()
        };
        let mut b = Beacon::new(auth.clone(), config, now.instant);
        for (node, src) in [(A, "198.51.100.1:4000"), (B, "198.51.100.2:4000")] {
            let mut m = [kind::DISCOVER, 0, 0, 0, 0];
            m[1..].copy_from_slice(&node.to_be_bytes());
            b.handle_datagram(now, ep(src), &mut m);
        }
        assert!(b.node(now.instant, B).is_some());

        // The authority forgets (its cache expired): a v1 daemon's only PILA reply arrives.
        auth.ready.store(false, Ordering::Relaxed);
        let relay = |payload: &[u8]| {
            let mut r = vec![kind::RELAY];
            r.extend_from_slice(&A.to_be_bytes());
            r.extend_from_slice(&B.to_be_bytes());
            r.extend_from_slice(payload);
            r
        };
        let pila = relay(&[0x50; 136]);
        let mut dg = pila.clone();
        assert!(b
            .handle_datagram(now, ep("198.51.100.1:4000"), &mut dg)
            .is_none());
        assert_eq!(b.deferred_len(), 1);
        assert_eq!(b.stats().dropped(DropReason::AuthorityPending), 0);

        let mut buf = vec![0u8; 65_536];
        now = now.after(TICK);
        b.handle_timeout(now.instant);
        assert_eq!(b.poll_deferred(now, &mut buf), None, "still pending");
        assert_eq!(b.deferred_len(), 1);

        // The answer comes: the held Relay is delivered, byte for byte, as RelayDeliver.
        auth.ready.store(true, Ordering::Relaxed);
        now = now.after(TICK);
        b.handle_timeout(now.instant);
        let out = b.poll_deferred(now, &mut buf).unwrap();
        let Output::Send { to, start, end } = out else {
            panic!("{out:?}")
        };
        assert_eq!(to, ep("198.51.100.2:4000"));
        assert_eq!(buf[start], kind::RELAY_DELIVER);
        assert_eq!(buf[start + 1..start + 5], A.to_be_bytes());
        assert_eq!(buf[start + 5..end], pila[9..]);
        assert_eq!(b.poll_deferred(now, &mut buf), None);
        assert_eq!(b.deferred_len(), 0);
        assert_eq!(b.stats().relayed_packets, 1);

        // Bounded: relays over the byte budget are dropped, and an answer that never comes
        // drops the held ones after `defer_for`. (The positive answer is reused for a moment.)
        auth.ready.store(false, Ordering::Relaxed);
        now = now.after(REACH_REUSE);
        for _ in 0..5 {
            let mut dg = pila.clone();
            b.handle_datagram(now, ep("198.51.100.1:4000"), &mut dg);
        }
        assert_eq!(b.deferred_len(), 4, "4 x 145 bytes fit in 600");
        assert_eq!(b.stats().dropped(DropReason::DeferOverflow), 1);
        now = now.after(Duration::from_secs(5));
        b.handle_timeout(now.instant);
        assert_eq!(b.poll_deferred(now, &mut buf), None);
        assert_eq!(b.deferred_len(), 0);
        assert_eq!(b.stats().dropped(DropReason::AuthorityPending), 4);
        // The budget is free again.
        let mut dg = pila.clone();
        b.handle_datagram(now, ep("198.51.100.1:4000"), &mut dg);
        assert_eq!(b.deferred_len(), 1);
    }
}
