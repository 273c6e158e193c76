//! The tunnel layer: one UDP socket's worth of peers, their crypto sessions and their paths
//! (direct, or relayed through the beacon). Sans-IO: time comes in as an argument, randomness
//! from the caller's generator (`R`, owned by the table), and every datagram, data or control,
//! is written into a buffer the caller gives, so every rule here is tested without sockets.
//!
//! # Calling order
//!
//! - [`Tunnels::handle`] for every datagram received; a packet comes back as a range of the
//!   caller's buffer (opened in place).
//! - [`Tunnels::seal`] for every packet to send, in place in the caller's buffer.
//! - After either, and after the `set_*` inputs, [`Tunnels::poll_transmit`] until `None`:
//!   control datagrams (key exchanges, punches, beacon requests) and packets that waited for
//!   a session, each written into the caller's buffer. Nothing is allocated per control
//!   datagram: the queue holds what to write, not bytes.
//! - [`Tunnels::poll_timeout`] is the earliest deadline of any peer (path timeout, direct
//!   probe, re-resolve, key-exchange retry, idle expiry); at that time call
//!   [`Tunnels::handle_timeout`], then [`Tunnels::poll_resolve`] and `poll_transmit`.
//!
//! Invariant: the deadline [`Tunnels::poll_timeout`] returns is never later than the first
//! moment `handle_timeout` would act (every change that can make a peer due sooner lowers it);
//! it may be earlier, and a wake with nothing due recomputes it exactly.
//!
//! ```text
//! datagram in -> handle() -> beacon message   -> DiscoverReply / PunchCommand / RelayDeliver
//!                         -> PILA             -> verify against the registry key -> session
//!                         -> PILS             -> open in place -> inner packet (source bound)
//!                         -> PILT             -> refused unless plaintext is allowed; then the
//!                                                inner packet (its source names the peer)
//!                         -> PILK             -> refused; answered with our PILA
//! packet out -> seal() in place -> direct, or behind a 9-byte Relay header to the beacon
//! ```
//!
//! Stricter than v1 (docs/COMPAT.md): PILT is refused by default (with plaintext allowed, a
//! peer that sent PILT and has no session is answered in PILT, as a v1 daemon with encryption
//! off ignores key exchanges); the inner source node must
//! be the peer that sealed the frame; a replayed PILA never moves an endpoint or resets a
//! session (only a PILS, which is replay-protected, moves an endpoint: roaming, and only the
//! newest one yet, so a late or held-back frame never moves it back or elsewhere; a registry
//! answer does not replace an endpoint so learned until it goes silent, see
//! [`Tunnels::set_endpoint`]); an
//! undecryptable PILS is answered, rate-limited, with our PILA so a restarted peer re-keys;
//! a peer that leaves [`HALF_KEYED_PILAS`] of our PILAs unanswered while we have no session
//! gets a fresh X25519 key of ours (its own, apart from the table's), because a v1 peer
//! answers a PILA only when our key is new to it: if its one answer was lost (a relay that
//! dropped it), nothing else would ever key our side;
//! a peer that may have dropped its keys for us while we kept our session (trust with it
//! ended: a v1 peer removes its tunnel peer then; or our packets to it went unanswered) gets
//! our PILA ahead of the next packets, at most one a second and [`REKEY_PILAS`] in all, until
//! its verified PILA answers ([`Tunnels::rekey`]);
//! a relayed peer we talk to is probed for a direct path and moves back when one works; one
//! whose endpoint we do not know (the registry refused it, or it was only heard through the
//! relay) has it looked up in the registry instead, at most once per probe interval, and is
//! probed as soon as it is known.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::ops::Range;
use std::time::{Duration, Instant};

use crate::crypto::{build_auth_key_exchange, verify_auth_key_exchange, OpenError, Session};
use crate::wire::beacon::{self as bw, BeaconMessage, RELAY_HEADER_LEN};
use crate::wire::frame::{
    AuthKeyExchangeRepr, Frame, ENCRYPTED_HEADER_LEN, ENCRYPTED_OVERHEAD, MAGIC_LEN, MAGIC_PLAIN,
    MAGIC_PUNCH, TAG_LEN, X25519_KEY_LEN,
};
use crate::wire::header::{Flags, Packet, PacketRepr, Protocol, HEADER_LEN};
use crate::{Addr, SocketAddr as PilotAddr};
use ed25519_dalek::{SigningKey, VerifyingKey};
use rand_core::{CryptoRng, RngCore};
use x25519_dalek::{PublicKey, StaticSecret};

/// Bytes in front of a packet in a send buffer: room for a Relay header and the PILS header.
pub const HEADROOM: usize = RELAY_HEADER_LEN + ENCRYPTED_HEADER_LEN;
/// Bytes after a packet in a send buffer.
pub const TAILROOM: usize = TAG_LEN;

/// Without an answer on the direct path for this long, a peer is tried through the relay.
pub const DIRECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Least time between two registry look-ups of the endpoint of a direct peer that stopped
/// answering (it may have restarted on another port or moved without sending first).
pub const RERESOLVE_INTERVAL: Duration = Duration::from_secs(10);
/// How often a relayed peer is probed for a direct path (or, without an endpoint, has it
/// looked up in the registry).
pub const DIRECT_PROBE_INTERVAL: Duration = Duration::from_secs(10);
/// Least time between two PILA we send one peer unprompted or in answer.
pub const PILA_INTERVAL: Duration = Duration::from_secs(1);
/// A peer silent for this long in both directions is forgotten.
pub const PEER_IDLE: Duration = Duration::from_secs(600);
/// Packets queued per peer while its session is being set up.
pub const QUEUE_PER_PEER: usize = 64;
/// PILA held while the sender's key is looked up.
pub const MAX_PENDING_PILA: usize = 256;
/// Peers the table holds before a PILT from a node it does not know is dropped (nothing
/// authenticates PILT, so its node IDs cost a sender nothing).
pub const MAX_PLAINTEXT_PEERS: usize = 4096;
/// Our PILAs a peer may leave unanswered, while we have no session with it, before it gets a
/// fresh X25519 key of ours. v1 answers a PILA only when it had no session or our key changed
/// (v1 wire §2.3 step 8), and re-sends nothing; so when that one answer is lost, the peer
/// holds a session and we never get one. A new key makes it answer again.
pub const HALF_KEYED_PILAS: u32 = 3;
/// Least time between two fresh keys for one peer (a peer that is simply gone gets one at
/// most this often).
pub const FRESH_KEY_INTERVAL: Duration = Duration::from_secs(10);
/// Least time between two look-ups of a cached key that a PILA failed to verify against (the
/// peer may have rotated its key).
pub const KEY_REFETCH_INTERVAL: Duration = Duration::from_secs(10);
/// Our PILAs sent ahead of sealed packets to a peer that may have dropped its keys for us
/// (see [`Tunnels::rekey`]), at most one per [`PILA_INTERVAL`], before we trust our session
/// again without an answer. A peer that still holds our key never answers a PILA with an
/// unchanged key (v1 wire §2.3 step 8), so the count bounds how often we reset its context.
pub const REKEY_PILAS: u8 = 3;

/// How a peer is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Path {
    /// Straight to its endpoint.
    Direct,
    /// Through the beacon's relay.
    Relay,
}

#[derive(Debug)]
struct Peer {
    endpoint: Option<SocketAddr>,
    /// `endpoint` was set by an authenticated packet from the peer (a PILS, or a PILA with a
    /// new key), not by the registry or an unauthenticated frame: see
    /// [`Tunnels::set_endpoint`].
    endpoint_learned: bool,
    path: Path,
    session: Option<Session>,
    peer_x25519: Option<[u8; X25519_KEY_LEN]>,
    last_rx: Option<Instant>,
    last_direct_rx: Option<Instant>,
    last_tx: Instant,
    /// First send since the last thing we heard from the peer.
    unanswered_since: Option<Instant>,
    last_pila: Option<Instant>,
    /// When a punch from the peer's endpoint last made us send our PILA again.
    punch_pila: Option<Instant>,
    last_probe: Option<Instant>,
    last_resolve: Option<Instant>,
    queue: VecDeque<Vec<u8>>,
    /// The peer sent us PILT (accepted only while plaintext is allowed): without a session,
    /// packets to it go out as PILT.
    plaintext: bool,
    /// Our PILAs queued for the peer since its last verified PILA or our last fresh key.
    pilas_unanswered: u32,
    /// Our X25519 key for this peer when it is not the table's (see [`HALF_KEYED_PILAS`]).
    own_key: Option<Box<PeerKey>>,
    /// When `own_key` was made.
    last_fresh_key: Option<Instant>,
    /// The peer may have dropped its keys for us while we kept our session: our PILAs still
    /// to send ahead of sealed packets, until the peer's verified PILA answers one.
    rekey: u8,
    stats: PeerStats,
}

/// An X25519 key of ours for one peer, and our PILA carrying it.
struct PeerKey {
    secret: StaticSecret,
    pila: Vec<u8>,
}

impl std::fmt::Debug for PeerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerKey").finish_non_exhaustive()
    }
}

impl Peer {
    /// Drops the session; the next key exchange makes a new one.
    fn forget_session(&mut self) {
        self.session = None;
        self.peer_x25519 = None;
        self.rekey = 0;
    }

    /// Drops the session and any key of ours made for this peer (our identity, node ID or
    /// table key changed, so that key's PILA is stale).
    fn forget_keys(&mut self) {
        self.forget_session();
        self.own_key = None;
        self.pilas_unanswered = 0;
    }

    /// We talk to the peer: a session is held, or packets of ours wait for one. Only such a
    /// relayed peer is probed for a direct path (a peer made by frames we could not use is
    /// not worth a registry look-up).
    fn in_use(&self) -> bool {
        self.session.is_some() || !self.queue.is_empty()
    }

    /// Nothing was ever learned of the peer: no endpoint, no session.
    fn unknown(&self) -> bool {
        self.endpoint.is_none() && self.session.is_none()
    }
}

/// Counters of one peer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PeerStats {
    /// Packets sealed to the peer.
    pub pkts_sent: u64,
    /// Packets opened from the peer.
    pub pkts_recv: u64,
    /// Frame bytes sent.
    pub bytes_sent: u64,
    /// Frame bytes received.
    pub bytes_recv: u64,
    /// Times the path changed.
    pub path_changes: u64,
}

/// What the caller sees of a peer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PeerView {
    /// Node ID.
    pub node: u32,
    /// Direct endpoint, if known.
    pub endpoint: Option<SocketAddr>,
    /// Current path.
    pub path: Path,
    /// A session exists.
    pub encrypted: bool,
    /// The session's key exchange was signed by the registered key (always, when encrypted).
    pub authenticated: bool,
    /// The peer sent plaintext (PILT, accepted with plaintext allowed); without a session it
    /// is answered in plaintext.
    pub plaintext: bool,
    /// Counters.
    pub stats: PeerStats,
}

/// Why a datagram was dropped. Each has a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Drop {
    /// Not a frame at all, or truncated.
    Malformed,
    /// A beacon message from an address that is not the beacon.
    NotFromBeacon,
    /// A beacon message a node never receives.
    UnexpectedBeacon,
    /// PILT while plaintext is refused.
    Plaintext,
    /// PILT (plaintext allowed) from a node the table does not know while it holds
    /// [`MAX_PLAINTEXT_PEERS`] peers.
    PlaintextPeersFull,
    /// PILK (anonymous key exchange) while plaintext is refused.
    AnonymousKeyExchange,
    /// PILA whose key or signature is wrong.
    BadKeyExchange,
    /// PILA from ourselves, or carrying a low-order key.
    InvalidKeyExchange,
    /// PILA from a node whose key lookup is already pending and the table is full.
    PendingFull,
    /// PILS from a peer without a session.
    NoSession,
    /// PILS that does not open (forged, or sealed under a session we do not have).
    Undecryptable,
    /// PILS refused by the replay window or from a retired sender context.
    Replayed,
    /// The inner packet's source is not the peer that sealed it.
    SpoofedSource,
    /// The inner packet does not parse.
    BadInner,
    /// PILP (punch packets carry nothing).
    Punch,
    /// A frame addressed from our own node ID.
    FromSelf,
}

/// The outcome of one received datagram.
#[derive(Debug)]
pub enum Received {
    /// A packet for the stream engine: `buf[range]` holds it (header and payload), from `peer`.
    Packet {
        /// The authenticated peer.
        peer: u32,
        /// Where the packet is inside the caller's buffer.
        range: std::ops::Range<usize>,
    },
    /// The beacon reported our public endpoint.
    Discovered(SocketAddr),
    /// The key of `node` is needed to check its key exchange; look it up and call
    /// [`Tunnels::set_key`].
    NeedKey(u32),
    /// Handled inside (a key exchange, a punch command).
    Handled,
    /// Dropped and counted.
    Dropped(Drop),
}

/// What sending a packet did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// Sealed in place: send `buf[range]` to `dst`.
    Now {
        /// Where.
        dst: SocketAddr,
        /// The frame inside the caller's buffer.
        range: (usize, usize),
    },
    /// Queued until the session is ready; a key exchange is under way. Also: queued behind
    /// our PILA, which goes first (see [`Tunnels::rekey`]); both come from
    /// [`Tunnels::poll_transmit`].
    Queued,
    /// The peer's endpoint is unknown: resolve it and call [`Tunnels::set_endpoint`]; the
    /// packet is queued.
    NeedEndpoint,
    /// Dropped (queue full, or no way to reach the peer).
    Dropped,
}

/// One datagram written into the caller's buffer by [`Tunnels::poll_transmit`]: send
/// `buf[offset..offset + len]` to `dst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    /// Destination.
    pub dst: SocketAddr,
    /// Where the datagram starts in the caller's buffer.
    pub offset: usize,
    /// Its length.
    pub len: usize,
}

impl Transmit {
    /// The datagram's place in the caller's buffer.
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.len
    }
}

/// A datagram waiting for [`Tunnels::poll_transmit`]: what to write, not its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    /// Our PILA for `node` (its own key's, if it has one) to `dst`, behind a Relay header
    /// when relayed.
    Pila {
        node: u32,
        dst: SocketAddr,
        relayed: bool,
    },
    /// A punch packet (PILP).
    Punch(SocketAddr),
    /// A punch request to the beacon for `target`.
    PunchRequest { beacon: SocketAddr, target: u32 },
    /// A signed Discover to the beacon.
    Discover { beacon: SocketAddr, unix_ms: u64 },
    /// The next packet queued for `node` while its session was being set up.
    Flush(u32),
    /// An empty control packet to `node`, sealed: tells it where we are now (see
    /// [`Tunnels::announce_moved`]).
    Moved(u32),
}

/// The virtual port both ends of a moved notice carry ([`Tunnels::announce_moved`]): the
/// control port, where nothing listens. v1 answers only control packets to port 0 (pings) and
/// ignores the rest (v1 wire §3.8), as we do.
pub const MOVED_PORT: u16 = 1;

/// Least time between two wakes [`Tunnels::poll_timeout`] asks for, so a peer whose due work
/// cannot be done now (no node ID yet) never makes the caller spin.
const MIN_WAKE: Duration = Duration::from_millis(1);

/// Settings of the tunnel layer.
#[derive(Debug, Clone)]
pub struct TunnelConfig {
    /// Refuse PILT and PILK from peers (default true).
    pub refuse_plaintext: bool,
    /// The beacon, for discovery, punching and relay.
    pub beacon: Option<SocketAddr>,
}

/// The peer table of one node; `R` supplies the randomness (X25519 keys, session prefixes).
pub struct Tunnels<R> {
    rng: R,
    me: u32,
    identity: SigningKey,
    secret: StaticSecret,
    public: [u8; X25519_KEY_LEN],
    config: TunnelConfig,
    peers: HashMap<u32, Peer>,
    keys: HashMap<u32, VerifyingKey>,
    pending_pila: HashMap<u32, (SocketAddr, bool, AuthKeyExchangeRepr)>,
    /// When a cached key was last looked up again after a PILA failed against it.
    refetched: HashMap<u32, Instant>,
    out: VecDeque<Pending>,
    /// No peer needs [`Tunnels::handle_timeout`] before this.
    next_timeout: Option<Instant>,
    /// Peers whose endpoint should be looked up again.
    resolve: VecDeque<u32>,
    /// A direct peer with a session stopped answering since [`Tunnels::take_unanswered`]
    /// last looked (see there).
    unanswered: bool,
    drops: HashMap<Drop, u64>,
    /// Our PILA for the current node ID (it changes only with the node ID).
    pila: Vec<u8>,
}

impl<R> std::fmt::Debug for Tunnels<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnels")
            .field("me", &self.me)
            .field("peers", &self.peers.len())
            .finish_non_exhaustive()
    }
}

impl<R: RngCore + CryptoRng> Tunnels<R> {
    /// A peer table for node `me` (0 until registered) with a fresh X25519 key drawn from
    /// `rng`, which also supplies every later key and session.
    pub fn new(me: u32, identity: SigningKey, config: TunnelConfig, mut rng: R) -> Self {
        let secret = StaticSecret::random_from_rng(&mut rng);
        let public = PublicKey::from(&secret).to_bytes();
        Tunnels {
            rng,
            me,
            identity,
            secret,
            public,
            config,
            peers: HashMap::new(),
            keys: HashMap::new(),
            pending_pila: HashMap::new(),
            refetched: HashMap::new(),
            out: VecDeque::new(),
            next_timeout: None,
            resolve: VecDeque::new(),
            unanswered: false,
            drops: HashMap::new(),
            pila: Vec::new(),
        }
        .with_pila()
    }

    fn with_pila(mut self) -> Self {
        self.rebuild_pila();
        self
    }

    /// Signs our PILA again after the node ID, the identity or the X25519 key changed.
    fn rebuild_pila(&mut self) {
        self.pila = build_auth_key_exchange(&self.identity, self.me, &self.public)
            .to_bytes()
            .to_vec();
    }

    /// Our node ID.
    pub fn node(&self) -> u32 {
        self.me
    }

    /// Sets our node ID (after registration). Sessions name the old ID in their headers, so
    /// a change drops them all.
    pub fn set_node(&mut self, me: u32) {
        if me != self.me {
            self.me = me;
            self.rebuild_pila();
            self.peers.values_mut().for_each(Peer::forget_keys);
            self.reschedule_all();
        }
    }

    /// Replaces our identity key (a rotation). Every tunnel is re-keyed under it: a fresh
    /// X25519 key, all sessions dropped, and our new PILA sent to every peer we know how to
    /// reach, so nothing after the rotation is authenticated by the old key.
    pub fn set_identity(&mut self, now: Instant, identity: SigningKey) {
        self.identity = identity;
        self.secret = StaticSecret::random_from_rng(&mut self.rng);
        self.public = PublicKey::from(&self.secret).to_bytes();
        self.rebuild_pila();
        self.peers.values_mut().for_each(Peer::forget_keys);
        let nodes: Vec<u32> = self.peers.keys().copied().collect();
        for node in nodes {
            self.send_pila(now, node, true);
        }
        self.reschedule_all();
    }

    /// Queues a signed Discover for the beacon (v1 beacons read it as a plain one); nothing
    /// without a beacon or a node ID.
    pub fn discover(&mut self, unix_ms: u64) {
        if let (Some(beacon), true) = (self.config.beacon, self.me != 0) {
            self.out.push_back(Pending::Discover { beacon, unix_ms });
        }
    }

    /// A signed Discover for the beacon (v1 beacons read it as a plain one).
    pub fn signed_discover(&self, unix_ms: u64) -> [u8; bw::SIGNED_DISCOVER_LEN] {
        bw::signed_discover(&self.identity, self.me, unix_ms)
    }

    /// The beacon address.
    pub fn beacon(&self) -> Option<SocketAddr> {
        self.config.beacon
    }

    /// Records the registered key of `node`. A PILA that was waiting for it is processed now.
    pub fn set_key(&mut self, now: Instant, node: u32, key: VerifyingKey) {
        if self.keys.get(&node) != Some(&key) {
            // A rotated key invalidates the session made under the old one.
            if self.keys.insert(node, key).is_some() {
                if let Some(p) = self.peers.get_mut(&node) {
                    p.forget_session();
                }
            }
        }
        if let Some((src, relayed, pila)) = self.pending_pila.remove(&node) {
            let _ = self.accept_pila(now, src, relayed, &pila);
        }
        self.schedule(node);
    }

    /// Whether a PILA from `node` that failed against its cached key may trigger a new
    /// look-up now; records it if so. Bounded like the pending PILA.
    fn may_refetch(&mut self, now: Instant, node: u32) -> bool {
        if self
            .refetched
            .get(&node)
            .is_some_and(|&t| now.duration_since(t) < KEY_REFETCH_INTERVAL)
        {
            return false;
        }
        if self.pending_pila.len() >= MAX_PENDING_PILA && !self.pending_pila.contains_key(&node) {
            return false;
        }
        if self.refetched.len() >= MAX_PENDING_PILA {
            self.refetched
                .retain(|_, t| now.duration_since(*t) < KEY_REFETCH_INTERVAL);
            if self.refetched.len() >= MAX_PENDING_PILA {
                return false;
            }
        }
        self.refetched.insert(node, now);
        true
    }

    /// Whether the registered key of `node` is known.
    pub fn has_key(&self, node: u32) -> bool {
        self.keys.contains_key(&node)
    }

    /// Forgets a failed key lookup's waiting PILA.
    pub fn key_unavailable(&mut self, node: u32) {
        self.pending_pila.remove(&node);
    }

    /// Sets the direct endpoint of `node` (from the registry) and starts the key exchange:
    /// a punch request through the beacon and our PILA straight to the endpoint. A relayed
    /// peer is probed at once: the PILA goes straight to the endpoint, and the peer's direct
    /// answer moves the path back (see [`Tunnels::handle_timeout`]).
    ///
    /// An endpoint the peer itself showed us (its authenticated packets came from it) wins
    /// over the registry's while it is live: the registry holds what the peer registered (its
    /// listen port, or an endpoint its own discovery has not yet updated), which behind a NAT
    /// is often not where its packets come from. Such an endpoint gives way only once it went
    /// silent ([`Tunnels::endpoint_live`]): then the registry's answer is the fallback.
    /// Returns whether the endpoint was taken.
    pub fn set_endpoint(&mut self, now: Instant, node: u32, endpoint: SocketAddr) -> bool {
        let p = self.peer(now, node);
        if p.endpoint.is_some_and(|e| e != endpoint) && learned_endpoint_live(p, now) {
            return false;
        }
        if p.endpoint != Some(endpoint) {
            p.endpoint_learned = false;
        }
        p.endpoint = Some(endpoint);
        if p.path == Path::Relay {
            p.last_probe = Some(now);
            self.probe_direct(node, endpoint);
        } else {
            self.punch_request(node);
            self.send_pila(now, node, true);
        }
        self.schedule(node);
        true
    }

    /// Whether the endpoint of `node` was shown by its authenticated packets and has not
    /// gone silent: we have a session, reach it directly, and it answered within
    /// [`DIRECT_TIMEOUT`] of our first unanswered send (a peer we do not send to stays live).
    /// A registry answer does not replace such an endpoint ([`Tunnels::set_endpoint`]).
    pub fn endpoint_live(&self, now: Instant, node: u32) -> bool {
        self.peers
            .get(&node)
            .is_some_and(|p| learned_endpoint_live(p, now))
    }

    /// `node` may have dropped its keys for us while we keep our session: a v1 peer removes
    /// its tunnel peer (session and endpoint) when trust with us ends either way (v1 wire
    /// §2.5, §6.3), and then drops our sealed packets without a word (§2.4) until it has our
    /// key again. Our session is kept (open streams with a peer that kept its keys go on, and
    /// its new streams still reach our gate at once); the next packets to `node` go out behind
    /// our PILA, at most one per [`PILA_INTERVAL`] and [`REKEY_PILAS`] in all, until the
    /// peer's verified PILA answers. A v1 peer without keys makes its context from our PILA
    /// (same key, fresh replay window: our sealed packets open again) and answers it.
    pub fn rekey(&mut self, node: u32) {
        if let Some(p) = self.peers.get_mut(&node) {
            if p.session.is_some() {
                p.rekey = REKEY_PILAS;
                p.last_pila = None;
            }
        }
    }

    /// Whether packets to `node` still go out behind our PILA (see [`Tunnels::rekey`]).
    pub fn rekey_pending(&self, node: u32) -> bool {
        self.peers.get(&node).is_some_and(|p| p.rekey > 0)
    }

    /// Drops everything about `node` (trust revoked).
    pub fn remove(&mut self, node: u32) {
        self.peers.remove(&node);
        self.pending_pila.remove(&node);
    }

    /// Drops `node` if nothing was ever learned of it (no endpoint, no session): its
    /// resolution failed, and an entry kept would show as a peer that does not exist.
    /// Returns whether `node` is unknown (dropped now, or never held): nothing reaches it.
    /// A peer with a session (for example through the relay) is kept, and its endpoint is
    /// looked up again later.
    pub fn remove_if_unknown(&mut self, node: u32) -> bool {
        match self.peers.get(&node) {
            None => true,
            Some(p) if p.unknown() => {
                self.remove(node);
                true
            }
            Some(_) => false,
        }
    }

    /// The peers, for status output.
    pub fn peers(&self) -> Vec<PeerView> {
        let mut v: Vec<PeerView> = self
            .peers
            .iter()
            .map(|(&node, p)| PeerView {
                node,
                endpoint: p.endpoint,
                path: p.path,
                encrypted: p.session.is_some(),
                authenticated: p.session.is_some(),
                plaintext: p.plaintext,
                stats: p.stats,
            })
            .collect();
        v.sort_by_key(|p| p.node);
        v
    }

    /// The path to `node`, if it is a peer.
    pub fn path(&self, node: u32) -> Option<Path> {
        self.peers.get(&node).map(|p| p.path)
    }

    /// Drop counters.
    pub fn drops(&self) -> Vec<(Drop, u64)> {
        let mut v: Vec<_> = self.drops.iter().map(|(&k, &n)| (k, n)).collect();
        v.sort();
        v
    }

    /// Writes the next datagram waiting to go (a control datagram, or a packet that waited
    /// for its peer's session, sealed) into `buf` and says where it is and where it goes.
    /// `buf` must hold [`send_buffer_len`] of the largest packet; what does not fit is
    /// dropped.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<Transmit> {
        while let Some(p) = self.out.pop_front() {
            if let Some(t) = self.emit(now, p, buf) {
                return Some(t);
            }
        }
        None
    }

    /// Whether a datagram waits for [`Tunnels::poll_transmit`].
    pub fn has_transmit(&self) -> bool {
        !self.out.is_empty()
    }

    fn emit(&mut self, now: Instant, p: Pending, buf: &mut [u8]) -> Option<Transmit> {
        match p {
            Pending::Pila { node, dst, relayed } => {
                let pila = match self.peers.get(&node).and_then(|p| p.own_key.as_ref()) {
                    Some(k) => &k.pila,
                    None => &self.pila,
                };
                let body = pila.len();
                let offset = if relayed {
                    buf.get_mut(..RELAY_HEADER_LEN)?
                        .copy_from_slice(&relay_header(self.me, node));
                    RELAY_HEADER_LEN
                } else {
                    0
                };
                buf.get_mut(offset..offset + body)?.copy_from_slice(pila);
                Some(Transmit {
                    dst,
                    offset: 0,
                    len: offset + body,
                })
            }
            Pending::Punch(dst) => {
                buf.get_mut(..MAGIC_PUNCH.len())?
                    .copy_from_slice(&MAGIC_PUNCH);
                Some(Transmit {
                    dst,
                    offset: 0,
                    len: MAGIC_PUNCH.len(),
                })
            }
            Pending::PunchRequest { beacon, target } => {
                let m = BeaconMessage::PunchRequest {
                    requester: self.me,
                    target,
                };
                let len = m.emit(buf).ok()?;
                Some(Transmit {
                    dst: beacon,
                    offset: 0,
                    len,
                })
            }
            Pending::Discover { beacon, unix_ms } => {
                let msg = self.signed_discover(unix_ms);
                buf.get_mut(..msg.len())?.copy_from_slice(&msg);
                Some(Transmit {
                    dst: beacon,
                    offset: 0,
                    len: msg.len(),
                })
            }
            Pending::Flush(node) => {
                let p = self.peers.get_mut(&node)?;
                // Without a session (it went again) the packets wait for the next one.
                p.session.as_ref()?;
                let packet = p.queue.pop_front()?;
                if !p.queue.is_empty() {
                    self.out.push_front(Pending::Flush(node));
                }
                let len = packet.len();
                if buf.len() < HEADROOM + len + TAILROOM {
                    return None;
                }
                buf[HEADROOM..HEADROOM + len].copy_from_slice(&packet);
                match self.seal(now, node, buf, len) {
                    Sent::Now { dst, range } => Some(Transmit {
                        dst,
                        offset: range.0,
                        len: range.1 - range.0,
                    }),
                    _ => None,
                }
            }
            Pending::Moved(node) => {
                let p = self.peers.get(&node)?;
                if p.session.is_none() || p.path != Path::Direct {
                    return None;
                }
                let repr = PacketRepr {
                    flags: Flags::empty(),
                    protocol: Protocol::Control,
                    src: PilotAddr::new(Addr::new(0, self.me), MOVED_PORT),
                    dst: PilotAddr::new(Addr::new(0, node), MOVED_PORT),
                    seq: 0,
                    ack: 0,
                    window: 0,
                    payload_len: 0,
                };
                let len = repr.emit(buf.get_mut(HEADROOM..)?).ok()?;
                if buf.len() < HEADROOM + len + TAILROOM {
                    return None;
                }
                match self.seal(now, node, buf, len) {
                    Sent::Now { dst, range } => Some(Transmit {
                        dst,
                        offset: range.0,
                        len: range.1 - range.0,
                    }),
                    _ => None,
                }
            }
        }
    }

    /// Our public endpoint changed (the beacon sees us at a new address or port: our NAT's
    /// mapping, or our own address, moved). Every peer we reach directly over a session gets
    /// one sealed, empty control packet from the new endpoint, which it ignores as a packet but
    /// which, authenticated and newer than all before, moves its view of us at once, rather
    /// than when we next have something to send: until then its packets go to the old mapping,
    /// and the beacon's relay refuses ours from the new one until our discover reaches it.
    pub fn announce_moved(&mut self) {
        let nodes: Vec<u32> = self
            .peers
            .iter()
            .filter(|(_, p)| p.session.is_some() && p.path == Path::Direct)
            .map(|(&n, _)| n)
            .collect();
        self.out.extend(nodes.into_iter().map(Pending::Moved));
    }

    fn drop(&mut self, why: Drop) -> Received {
        *self.drops.entry(why).or_default() += 1;
        Received::Dropped(why)
    }

    fn peer(&mut self, now: Instant, node: u32) -> &mut Peer {
        self.peers.entry(node).or_insert_with(|| Peer {
            endpoint: None,
            endpoint_learned: false,
            path: Path::Direct,
            session: None,
            peer_x25519: None,
            last_rx: None,
            last_direct_rx: None,
            last_tx: now,
            unanswered_since: None,
            last_pila: None,
            punch_pila: None,
            last_probe: None,
            last_resolve: None,
            queue: VecDeque::new(),
            plaintext: false,
            pilas_unanswered: 0,
            own_key: None,
            last_fresh_key: None,
            rekey: 0,
            stats: PeerStats::default(),
        })
    }

    /// Handles one datagram from `src`. Decrypts in place: a packet is returned as a range of
    /// `buf`.
    pub fn handle(&mut self, now: Instant, src: SocketAddr, buf: &mut [u8]) -> Received {
        self.handle_at(now, src, buf, 0, false)
    }

    fn handle_at(
        &mut self,
        now: Instant,
        src: SocketAddr,
        buf: &mut [u8],
        offset: usize,
        relayed: bool,
    ) -> Received {
        let Some(frame_bytes) = buf.get(offset..) else {
            return self.drop(Drop::Malformed);
        };
        let frame = match Frame::parse(frame_bytes) {
            Ok(f) => f,
            Err(_) => return self.drop(Drop::Malformed),
        };
        match frame {
            Frame::Beacon(b) => {
                if relayed || Some(src) != self.config.beacon {
                    return self.drop(Drop::NotFromBeacon);
                }
                match BeaconMessage::parse(b) {
                    Ok(BeaconMessage::DiscoverReply { endpoint }) => Received::Discovered(endpoint),
                    Ok(BeaconMessage::PunchCommand { endpoint }) => {
                        for _ in 0..3 {
                            self.out.push_back(Pending::Punch(endpoint));
                        }
                        Received::Handled
                    }
                    Ok(BeaconMessage::RelayDeliver { sender, .. }) => {
                        if sender == self.me {
                            return self.drop(Drop::FromSelf);
                        }
                        self.handle_at(now, src, buf, offset + bw::RELAY_DELIVER_HEADER_LEN, true)
                    }
                    Ok(_) => self.drop(Drop::UnexpectedBeacon),
                    Err(_) => self.drop(Drop::Malformed),
                }
            }
            Frame::Punch => {
                if !relayed {
                    self.punched_by(now, src);
                }
                self.drop(Drop::Punch)
            }
            Frame::Plain(_) if self.config.refuse_plaintext => self.drop(Drop::Plaintext),
            Frame::Plain(inner) => {
                let start = offset + MAGIC_LEN;
                self.handle_plain(now, src, relayed, inner, start)
            }
            Frame::KeyExchange(k) => {
                // Anonymous key exchange: answer with our signed one so a v1 peer uses it.
                let node = k.node();
                if self.config.refuse_plaintext && node != self.me && node != 0 {
                    if relayed {
                        self.peer(now, node).path = Path::Relay;
                    } else if self.peers.get(&node).is_some_and(|p| p.endpoint.is_none()) {
                        self.peer(now, node).endpoint = Some(src);
                    }
                    self.send_pila(now, node, false);
                    self.schedule(node);
                }
                self.drop(Drop::AnonymousKeyExchange)
            }
            Frame::AuthKeyExchange(a) => {
                let pila = AuthKeyExchangeRepr::parse(&a);
                if pila.node == self.me || pila.node == 0 {
                    return self.drop(Drop::FromSelf);
                }
                if !self.keys.contains_key(&pila.node) {
                    if self.pending_pila.len() >= MAX_PENDING_PILA
                        && !self.pending_pila.contains_key(&pila.node)
                    {
                        return self.drop(Drop::PendingFull);
                    }
                    self.pending_pila.insert(pila.node, (src, relayed, pila));
                    return Received::NeedKey(pila.node);
                }
                match self.accept_pila(now, src, relayed, &pila) {
                    Ok(()) => Received::Handled,
                    Err(Drop::BadKeyExchange) if self.may_refetch(now, pila.node) => {
                        // The peer may have rotated its key: look it up again, at most once
                        // per interval, and try this PILA against the answer.
                        self.pending_pila.insert(pila.node, (src, relayed, pila));
                        Received::NeedKey(pila.node)
                    }
                    Err(d) => self.drop(d),
                }
            }
            Frame::Encrypted(e) => {
                let node = e.node();
                if node == self.me {
                    return self.drop(Drop::FromSelf);
                }
                let Some(peer) = self.peers.get_mut(&node) else {
                    self.answer_unknown_session(now, node, src, relayed);
                    return self.drop(Drop::NoSession);
                };
                let Some(session) = peer.session.as_mut() else {
                    self.answer_unknown_session(now, node, src, relayed);
                    return self.drop(Drop::NoSession);
                };
                let frame_len = frame_bytes.len();
                let Some(frame_mut) = buf.get_mut(offset..) else {
                    return self.drop(Drop::Malformed);
                };
                let (inner_len, newest) = match session.open_ordered(frame_mut) {
                    Ok((inner, newest)) => (inner.len(), newest),
                    Err(OpenError::Authentication) => {
                        self.answer_unknown_session(now, node, src, relayed);
                        return self.drop(Drop::Undecryptable);
                    }
                    Err(OpenError::Replay(_) | OpenError::RetiredPrefix) => {
                        return self.drop(Drop::Replayed)
                    }
                    Err(_) => return self.drop(Drop::Undecryptable),
                };
                let start = offset + ENCRYPTED_HEADER_LEN;
                let range = start..start + inner_len;
                let src_node = match buf.get(range.clone()).map(Packet::new_checked) {
                    Some(Ok(p)) => p.src_addr().node,
                    _ => return self.drop(Drop::BadInner),
                };
                if src_node != node {
                    return self.drop(Drop::SpoofedSource);
                }
                let peer = self.peer(now, node);
                peer.stats.pkts_recv += 1;
                peer.stats.bytes_recv += frame_len as u64;
                peer.last_rx = Some(now);
                peer.unanswered_since = None;
                if !relayed {
                    // An authenticated, replay-checked frame, the newest of the peer's yet: its
                    // source is where the peer is now (roaming), and the direct path works. A
                    // late frame (reordered, or held back and sent on from elsewhere) from
                    // another source moves nothing: it would move the peer back to where it
                    // was, or to whoever held it back.
                    if newest || peer.endpoint == Some(src) {
                        peer.last_direct_rx = Some(now);
                        peer.endpoint = Some(src);
                        peer.endpoint_learned = true;
                        if peer.path == Path::Relay {
                            peer.path = Path::Direct;
                            peer.stats.path_changes += 1;
                        }
                    }
                } else if peer.path == Path::Direct
                    && peer
                        .last_direct_rx
                        .is_none_or(|t| now.duration_since(t) > DIRECT_TIMEOUT)
                {
                    peer.path = Path::Relay;
                    peer.stats.path_changes += 1;
                }
                self.schedule(node);
                Received::Packet { peer: node, range }
            }
        }
    }

    /// A PILT while plaintext is allowed (v1 §2.4: a v1 daemon with encryption off sends
    /// only PILT, and one with encryption on sends PILT too until its key is ready). Nothing
    /// authenticates it: the inner packet's source names the peer. It never moves an endpoint
    /// we know; an unknown peer is recorded at the frame's source, as v1 does (§2.5). The peer
    /// is marked as speaking plaintext, and our PILA goes out (rate-limited) so a peer that
    /// encrypts makes a session.
    fn handle_plain(
        &mut self,
        now: Instant,
        src: SocketAddr,
        relayed: bool,
        inner: &[u8],
        start: usize,
    ) -> Received {
        let (node, inner_len) = match Packet::new_checked(inner) {
            Ok(p) => (p.src_addr().node, p.total_len()),
            Err(_) => return self.drop(Drop::BadInner),
        };
        if node == self.me || node == 0 {
            return self.drop(Drop::FromSelf);
        }
        if !self.peers.contains_key(&node) && self.peers.len() >= MAX_PLAINTEXT_PEERS {
            return self.drop(Drop::PlaintextPeersFull);
        }
        let frame_len = MAGIC_LEN + inner.len();
        let beacon = self.config.beacon.is_some();
        let p = self.peer(now, node);
        p.plaintext = true;
        p.stats.pkts_recv += 1;
        p.stats.bytes_recv += frame_len as u64;
        p.last_rx = Some(now);
        p.unanswered_since = None;
        if relayed {
            if p.session.is_none() && p.last_direct_rx.is_none() && beacon {
                p.path = Path::Relay;
            }
        } else if p.endpoint.is_none() {
            p.endpoint = Some(src);
        }
        if self.peers.get(&node).is_some_and(|p| p.session.is_none()) {
            self.send_pila(now, node, false);
        }
        self.schedule(node);
        Received::Packet {
            peer: node,
            range: start..start + inner_len,
        }
    }

    /// A PILS we cannot open: the peer has a session we lost (we restarted). Our PILA, at most
    /// once per interval, makes it re-key without waiting for us to send first.
    fn answer_unknown_session(&mut self, now: Instant, node: u32, src: SocketAddr, relayed: bool) {
        if !self.keys.contains_key(&node) && self.peers.len() > 4096 {
            return;
        }
        let p = self.peer(now, node);
        if relayed {
            p.path = Path::Relay;
        } else if p.endpoint.is_none() {
            p.endpoint = Some(src);
        }
        self.send_pila(now, node, false);
        self.schedule(node);
    }

    fn accept_pila(
        &mut self,
        now: Instant,
        src: SocketAddr,
        relayed: bool,
        pila: &AuthKeyExchangeRepr,
    ) -> Result<(), Drop> {
        let key = self.keys.get(&pila.node).ok_or(Drop::BadKeyExchange)?;
        verify_auth_key_exchange(pila, key).map_err(|_| Drop::BadKeyExchange)?;
        let me = self.me;
        let new_key = self
            .peers
            .get(&pila.node)
            .is_none_or(|p| p.peer_x25519 != Some(pila.x25519_public) || p.session.is_none());
        if new_key {
            let secret = match self.peers.get(&pila.node).and_then(|p| p.own_key.as_ref()) {
                Some(k) => &k.secret,
                None => &self.secret,
            };
            let session = Session::new(me, secret, &pila.x25519_public, &mut self.rng)
                .map_err(|_| Drop::InvalidKeyExchange)?;
            let p = self.peer(now, pila.node);
            p.session = Some(session);
            p.peer_x25519 = Some(pila.x25519_public);
            // A new key is a (re)started peer: its source is where it is. A replay of an old
            // PILA carries a key we already hold and moves nothing.
            if relayed {
                if p.last_direct_rx.is_none() {
                    p.path = Path::Relay;
                }
            } else {
                p.endpoint = Some(src);
                p.endpoint_learned = true;
            }
        } else if !relayed {
            let p = self.peer(now, pila.node);
            if p.endpoint.is_none() {
                p.endpoint = Some(src);
            }
        }
        let p = self.peer(now, pila.node);
        p.last_rx = Some(now);
        p.unanswered_since = None;
        p.pilas_unanswered = 0;
        // The peer has our key again (it answers a PILA only when it lacked it, or ours
        // changed): sealed packets go out alone again.
        p.rekey = 0;
        // A verified PILA straight from the peer's known endpoint while we relay: the direct
        // path works again (the peer's direct probe got through). Go back to it, and answer
        // directly at once so the peer moves back too.
        let back_to_direct = !relayed && p.path == Path::Relay && p.endpoint == Some(src);
        if back_to_direct {
            p.path = Path::Direct;
            p.last_direct_rx = Some(now);
            p.stats.path_changes += 1;
        }
        // Answer: at once for a new key, otherwise at most once per interval (the peer sends a
        // PILA when it lacks our key, so it probably lost it).
        if new_key || back_to_direct {
            p.last_pila = None;
        }
        // Never forced: two peers answering each other's PILA unconditionally would ping-pong
        // (and verify a signature per packet) forever.
        self.send_pila_via(now, pila.node, false, Some(src).filter(|_| !relayed));
        self.flush_queue(pila.node);
        self.schedule(pila.node);
        Ok(())
    }

    /// Sends our PILA to `node` over its path, at most once per [`PILA_INTERVAL`] unless
    /// `force`. Returns whether one was queued.
    fn send_pila(&mut self, now: Instant, node: u32, force: bool) -> bool {
        self.send_pila_via(now, node, force, None)
    }

    fn send_pila_via(
        &mut self,
        now: Instant,
        node: u32,
        force: bool,
        to: Option<SocketAddr>,
    ) -> bool {
        if self.me == 0 {
            return false;
        }
        let Some(p) = self.peers.get_mut(&node) else {
            return false;
        };
        if !force
            && p.last_pila
                .is_some_and(|t| now.duration_since(t) < PILA_INTERVAL)
        {
            return false;
        }
        p.last_pila = Some(now);
        let half_keyed = p.session.is_none()
            && p.pilas_unanswered >= HALF_KEYED_PILAS
            && p.last_fresh_key
                .is_none_or(|t| now.duration_since(t) >= FRESH_KEY_INTERVAL);
        if half_keyed {
            // The peer may hold a session for our key and never answer it again: a key new
            // to it makes it answer (v1 wire §2.3 step 8).
            let secret = StaticSecret::random_from_rng(&mut self.rng);
            let public = PublicKey::from(&secret).to_bytes();
            let pila = build_auth_key_exchange(&self.identity, self.me, &public)
                .to_bytes()
                .to_vec();
            p.own_key = Some(Box::new(PeerKey { secret, pila }));
            p.last_fresh_key = Some(now);
            p.pilas_unanswered = 0;
        }
        let dst = match (to, p.path, p.endpoint, self.config.beacon) {
            (Some(to), _, _, _) => Some((to, false)),
            (None, Path::Direct, Some(ep), _) => Some((ep, false)),
            (None, Path::Relay, _, Some(b)) => Some((b, true)),
            (None, Path::Direct, None, Some(b)) => Some((b, true)),
            _ => None,
        };
        match dst {
            Some((dst, relayed)) => {
                p.pilas_unanswered = p.pilas_unanswered.saturating_add(1);
                self.out.push_back(Pending::Pila { node, dst, relayed });
                true
            }
            None => false,
        }
    }

    fn punch_request(&mut self, target: u32) {
        if let (Some(beacon), true) = (self.config.beacon, self.me != 0) {
            self.out.push_back(Pending::PunchRequest { beacon, target });
        }
    }

    /// Seals the packet at `buf[HEADROOM..HEADROOM + len]` for `node` in place. The buffer
    /// needs [`TAILROOM`] bytes after the packet.
    pub fn seal(&mut self, now: Instant, node: u32, buf: &mut [u8], len: usize) -> Sent {
        let me = self.me;
        let beacon = self.config.beacon;
        let p = self.peer(now, node);
        p.last_tx = now;
        if p.unanswered_since.is_none() {
            p.unanswered_since = Some(now);
            // The direct-path timeout starts now.
            let d = peer_deadline(p, beacon.is_some(), me != 0);
            self.lower_timeout(d);
        }
        let allow_plain = !self.config.refuse_plaintext;
        let p = self.peer(now, node);
        if p.session.is_none() && p.plaintext && allow_plain {
            if let Some(sent) = seal_plain(p, me, node, beacon, buf, len) {
                // A peer that encrypts after all answers our key exchange with its own.
                self.send_pila(now, node, false);
                return sent;
            }
        }
        let p = self.peer(now, node);
        let rekey_due = p.session.is_some()
            && p.rekey > 0
            && p.last_pila
                .is_none_or(|t| now.duration_since(t) >= PILA_INTERVAL);
        if rekey_due && self.send_pila(now, node, false) {
            // Our PILA first, then this packet sealed behind it (from the queue, through
            // `poll_transmit`): a peer without our key makes its context before the packet
            // arrives.
            let p = self.peer(now, node);
            p.rekey -= 1;
            let Some(packet) = buf.get(HEADROOM..HEADROOM + len) else {
                return Sent::Dropped;
            };
            if p.queue.len() >= QUEUE_PER_PEER {
                p.queue.pop_front();
            }
            p.queue.push_back(packet.to_vec());
            self.flush_queue(node);
            return Sent::Queued;
        }
        let p = self.peer(now, node);
        let Some(session) = p.session.as_mut() else {
            if p.queue.len() >= QUEUE_PER_PEER {
                p.queue.pop_front();
            }
            let Some(packet) = buf.get(HEADROOM..HEADROOM + len) else {
                return Sent::Dropped;
            };
            let first = p.queue.is_empty();
            p.queue.push_back(packet.to_vec());
            if p.endpoint.is_none() && p.path == Path::Direct {
                return Sent::NeedEndpoint;
            }
            if first {
                // A relayed peer with packets waiting is probed for a direct path.
                self.schedule(node);
            }
            self.send_pila(now, node, false);
            return Sent::Queued;
        };
        let Some(frame_buf) = buf.get_mut(RELAY_HEADER_LEN..) else {
            return Sent::Dropped;
        };
        let Ok(n) = session.seal(frame_buf, len) else {
            // Counter exhausted: a new key exchange replaces the session.
            p.forget_session();
            return Sent::Dropped;
        };
        p.stats.pkts_sent += 1;
        p.stats.bytes_sent += n as u64;
        match (p.path, p.endpoint, beacon) {
            (Path::Direct, Some(ep), _) => Sent::Now {
                dst: ep,
                range: (RELAY_HEADER_LEN, RELAY_HEADER_LEN + n),
            },
            (_, _, Some(b)) => {
                buf[..RELAY_HEADER_LEN].copy_from_slice(&relay_header(me, node));
                p.stats.bytes_sent += RELAY_HEADER_LEN as u64;
                Sent::Now {
                    dst: b,
                    range: (0, RELAY_HEADER_LEN + n),
                }
            }
            _ => Sent::Dropped,
        }
    }

    /// Sends queued packets of `node` (from [`Tunnels::poll_transmit`]) now that its session
    /// is ready.
    fn flush_queue(&mut self, node: u32) {
        let queued = self.peers.get(&node).is_some_and(|p| !p.queue.is_empty());
        if queued && !self.out.contains(&Pending::Flush(node)) {
            self.out.push_back(Pending::Flush(node));
        }
    }

    /// Lowers the deadline to `d`.
    fn lower_timeout(&mut self, d: Instant) {
        if self.next_timeout.is_none_or(|t| d < t) {
            self.next_timeout = Some(d);
        }
    }

    /// Keeps the deadline no later than when `node` next needs the timer.
    /// A punch arrived from `src`: the peer there just opened its NAT towards us. Our first
    /// PILA to it, sent with the punch request, most likely reached that NAT before the
    /// punch and was dropped; a direct peer at `src` still without a session gets our PILA
    /// again now instead of at its next retry, at most once per [`PILA_INTERVAL`]. (The scan
    /// over the peers costs less than the signature check any PILA from anyone costs.)
    fn punched_by(&mut self, now: Instant, src: SocketAddr) {
        let found = self.peers.iter_mut().find(|(_, p)| {
            p.endpoint == Some(src) && p.path == Path::Direct && p.session.is_none()
        });
        let Some((&node, p)) = found else {
            return;
        };
        if p.punch_pila
            .is_some_and(|t| now.duration_since(t) < PILA_INTERVAL)
        {
            return;
        }
        p.punch_pila = Some(now);
        self.send_pila(now, node, true);
        self.schedule(node);
    }

    fn schedule(&mut self, node: u32) {
        let (beacon, me) = (self.config.beacon.is_some(), self.me != 0);
        if let Some(d) = self.peers.get(&node).map(|p| peer_deadline(p, beacon, me)) {
            self.lower_timeout(d);
        }
    }

    /// Recomputes the deadline from every peer.
    fn reschedule_all(&mut self) {
        let (beacon, me) = (self.config.beacon.is_some(), self.me != 0);
        self.next_timeout = self
            .peers
            .values()
            .map(|p| peer_deadline(p, beacon, me))
            .min();
    }

    /// When [`Tunnels::handle_timeout`] next has work: the earliest deadline of any peer.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_timeout
    }

    /// Runs timers: moves silent direct peers to the relay, probes relayed peers for a direct
    /// path (asking [`Tunnels::poll_resolve`] for the endpoint of one without), and forgets
    /// idle peers.
    pub fn handle_timeout(&mut self, now: Instant) {
        let beacon = self.config.beacon;
        let mut pila = Vec::new();
        let mut probe = Vec::new();
        self.peers.retain(|_, p| {
            let last = p.last_rx.unwrap_or(p.last_tx).max(p.last_tx);
            now.duration_since(last) < PEER_IDLE
        });
        for (&node, p) in self.peers.iter_mut() {
            match p.path {
                Path::Direct => {
                    let stuck = p
                        .unanswered_since
                        .is_some_and(|t| now.duration_since(t) >= DIRECT_TIMEOUT);
                    let direct_silent = p
                        .last_direct_rx
                        .is_none_or(|t| now.duration_since(t) >= DIRECT_TIMEOUT);
                    let resolve_due = p
                        .last_resolve
                        .is_none_or(|t| now.duration_since(t) >= RERESOLVE_INTERVAL);
                    if stuck && direct_silent && resolve_due && p.endpoint.is_some() {
                        p.last_resolve = Some(now);
                        self.resolve.push_back(node);
                        self.unanswered |= p.session.is_some();
                        // The peer may have dropped its keys for us without our knowing (a
                        // v1 peer's revoke that never reached us): the next packets go
                        // behind our PILA even if the registry refuses the look-up.
                        if p.session.is_some() {
                            p.rekey = REKEY_PILAS;
                        }
                    }
                    if stuck && direct_silent && beacon.is_some() {
                        p.path = Path::Relay;
                        p.stats.path_changes += 1;
                        p.last_probe = Some(now);
                        p.last_pila = None;
                        pila.push(node);
                    }
                }
                Path::Relay => {
                    let due = p
                        .last_probe
                        .is_none_or(|t| now.duration_since(t) >= DIRECT_PROBE_INTERVAL);
                    if due && p.in_use() {
                        if let Some(ep) = p.endpoint {
                            p.last_probe = Some(now);
                            probe.push((node, ep));
                        }
                    }
                    // Without an endpoint the probe starts with the registry: the look-up
                    // may have been refused before (no trust pair yet), or the peer was
                    // only ever heard through the relay.
                    let resolve_due = p
                        .last_resolve
                        .is_none_or(|t| now.duration_since(t) >= DIRECT_PROBE_INTERVAL);
                    if resolve_due && p.endpoint.is_none() && p.in_use() {
                        p.last_resolve = Some(now);
                        self.resolve.push_back(node);
                    }
                    if p.session.is_none() {
                        pila.push(node);
                    }
                }
            }
        }
        for node in pila {
            self.send_pila(now, node, false);
        }
        for (node, ep) in probe {
            self.probe_direct(node, ep);
        }
        self.reschedule_all();
        // Work that could not be done now (no node ID yet) waits a moment, never spins.
        if let Some(t) = self.next_timeout {
            self.next_timeout = Some(t.max(now + MIN_WAKE));
        }
    }

    /// Whether a direct peer we have a session with stopped answering (nothing heard for
    /// [`DIRECT_TIMEOUT`] while we send) since the last call, at most once per peer per
    /// [`RERESOLVE_INTERVAL`]. Either the peer moved, or we did: our NAT's mapping may have
    /// changed under us, which only the beacon's next discover answer shows.
    pub fn take_unanswered(&mut self) -> bool {
        std::mem::take(&mut self.unanswered)
    }

    /// A peer whose endpoint [`Tunnels::handle_timeout`] wants looked up again in the
    /// registry (the answer goes to [`Tunnels::set_endpoint`]).
    pub fn poll_resolve(&mut self) -> Option<u32> {
        self.resolve.pop_front()
    }

    /// Probes the direct path of a relayed peer at `ep`. A punch through the beacon opens
    /// both NATs; our PILA straight to the peer is answered directly, and a verified direct
    /// PILA from the endpoint or the first direct PILS moves the path back.
    fn probe_direct(&mut self, node: u32, ep: SocketAddr) {
        self.punch_request(node);
        if self.me != 0 {
            self.out.push_back(Pending::Pila {
                node,
                dst: ep,
                relayed: false,
            });
        }
    }
}

/// See [`Tunnels::endpoint_live`]: mirrors the silence test of [`Tunnels::handle_timeout`]
/// (nothing direct heard for [`DIRECT_TIMEOUT`] while a send waits as long for an answer).
fn learned_endpoint_live(p: &Peer, now: Instant) -> bool {
    let stuck = p
        .unanswered_since
        .is_some_and(|t| now.duration_since(t) >= DIRECT_TIMEOUT);
    let direct_silent = p
        .last_direct_rx
        .is_none_or(|t| now.duration_since(t) >= DIRECT_TIMEOUT);
    p.endpoint_learned
        && p.endpoint.is_some()
        && p.session.is_some()
        && p.path == Path::Direct
        && !(stuck && direct_silent)
}

/// The earliest time [`Tunnels::handle_timeout`] acts on `p`: mirrors its conditions. A
/// condition already met is due at `p.last_tx` (in the past). `beacon`: a beacon is
/// configured; `me`: we have a node ID (without one no PILA can be sent).
fn peer_deadline(p: &Peer, beacon: bool, me: bool) -> Instant {
    let last = p.last_rx.unwrap_or(p.last_tx).max(p.last_tx);
    let mut due = last + PEER_IDLE;
    match p.path {
        Path::Direct => {
            if let Some(u) = p.unanswered_since {
                // Stuck since `u` and nothing direct heard for DIRECT_TIMEOUT.
                let mut stuck = u + DIRECT_TIMEOUT;
                if let Some(r) = p.last_direct_rx {
                    stuck = stuck.max(r + DIRECT_TIMEOUT);
                }
                if beacon {
                    due = due.min(stuck);
                }
                if p.endpoint.is_some() {
                    let resolve = p
                        .last_resolve
                        .map_or(stuck, |t| stuck.max(t + RERESOLVE_INTERVAL));
                    due = due.min(resolve);
                }
            }
        }
        Path::Relay => {
            if p.in_use() {
                // A direct probe with an endpoint, a registry look-up without one.
                let tried = if p.endpoint.is_some() {
                    p.last_probe
                } else {
                    p.last_resolve
                };
                due = due.min(tried.map_or(p.last_tx, |t| t + DIRECT_PROBE_INTERVAL));
            }
            if p.session.is_none() && me {
                due = due.min(p.last_pila.map_or(p.last_tx, |t| t + PILA_INTERVAL));
            }
        }
    }
    due
}

/// Frames the packet at `buf[HEADROOM..HEADROOM + len]` as PILT in place, direct or behind a
/// Relay header; `None` when the peer cannot be reached (the packet then waits like any
/// other). Counted like a sealed packet.
fn seal_plain(
    p: &mut Peer,
    me: u32,
    node: u32,
    beacon: Option<SocketAddr>,
    buf: &mut [u8],
    len: usize,
) -> Option<Sent> {
    let start = HEADROOM - MAGIC_LEN;
    let end = HEADROOM + len;
    if buf.len() < end {
        return None;
    }
    let (dst, from) = match (p.path, p.endpoint, beacon) {
        (Path::Direct, Some(ep), _) => (ep, start),
        (_, _, Some(b)) => {
            buf[start - RELAY_HEADER_LEN..start].copy_from_slice(&relay_header(me, node));
            (b, start - RELAY_HEADER_LEN)
        }
        _ => return None,
    };
    buf[start..HEADROOM].copy_from_slice(&MAGIC_PLAIN);
    p.stats.pkts_sent += 1;
    p.stats.bytes_sent += (end - from) as u64;
    Some(Sent::Now {
        dst,
        range: (from, end),
    })
}

/// The 9-byte header that wraps a frame for the beacon's relay.
fn relay_header(me: u32, dest: u32) -> [u8; RELAY_HEADER_LEN] {
    let mut h = [0u8; RELAY_HEADER_LEN];
    h[0] = bw::kind::RELAY;
    h[1..5].copy_from_slice(&me.to_be_bytes());
    h[5..9].copy_from_slice(&dest.to_be_bytes());
    h
}

/// Bytes a send buffer needs for a packet of `len` bytes.
pub const fn send_buffer_len(len: usize) -> usize {
    HEADROOM + len + TAILROOM
}

/// The smallest datagram that can carry a PILS frame with a packet header.
pub const MIN_PILS: usize = ENCRYPTED_OVERHEAD + HEADER_LEN;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    use crate::node::tests::SeededRng;

    /// A datagram a test node sent.
    #[derive(Clone)]
    struct Out {
        dst: SocketAddr,
        bytes: Vec<u8>,
    }

    struct Node {
        t: Tunnels<SeededRng>,
        addr: SocketAddr,
        /// Datagrams sealed by `send`, ahead of what the table has queued since.
        sent: VecDeque<Out>,
    }

    impl Node {
        /// Moves what the table has queued behind what `send` sealed.
        fn drain_table(&mut self, now: Instant) {
            let mut buf = vec![0u8; send_buffer_len(65_535)];
            while let Some(t) = self.t.poll_transmit(now, &mut buf) {
                self.sent.push_back(Out {
                    dst: t.dst,
                    bytes: buf[t.range()].to_vec(),
                });
            }
        }

        /// The next datagram the node sends.
        fn poll(&mut self, now: Instant) -> Option<Out> {
            if let Some(o) = self.sent.pop_front() {
                return Some(o);
            }
            let mut buf = vec![0u8; send_buffer_len(65_535)];
            let t = self.t.poll_transmit(now, &mut buf)?;
            Some(Out {
                dst: t.dst,
                bytes: buf[t.range()].to_vec(),
            })
        }
    }

    static NODES_MADE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

    fn node(id: u32, seed: u8, port: u16, beacon: Option<SocketAddr>) -> Node {
        Node {
            t: Tunnels::new(
                id,
                SigningKey::from_bytes(&[seed; 32]),
                TunnelConfig {
                    refuse_plaintext: true,
                    beacon,
                },
                // Each node made is a new process: a new X25519 key, even for the same identity.
                SeededRng(NODES_MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed)),
            ),
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            sent: VecDeque::new(),
        }
    }

    fn pair() -> (Node, Node) {
        pair_via(None)
    }

    /// Nodes 1 and 2 (on ports 4001 and 4002), each knowing the other's key, with `beacon`.
    fn pair_via(beacon: Option<SocketAddr>) -> (Node, Node) {
        let mut a = node(1, 1, 4001, beacon);
        let mut b = node(2, 2, 4002, beacon);
        let now = Instant::now();
        a.t.set_key(now, 2, b.t.identity.verifying_key());
        b.t.set_key(now, 1, a.t.identity.verifying_key());
        (a, b)
    }

    /// A dials B directly and the handshake completes: both hold a session.
    fn handshake(now: Instant, a: &mut Node, b: &mut Node) {
        a.t.set_endpoint(now, 2, b.addr);
        pump(now, a, b);
        pump(now, b, a);
        pump(now, a, b);
    }

    fn packet(from: u32, to: u32, payload: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; send_buffer_len(HEADER_LEN + payload.len())];
        let repr = PacketRepr {
            flags: Flags::empty(),
            protocol: Protocol::Datagram,
            src: PilotAddr::new(Addr::new(0, from), 9),
            dst: PilotAddr::new(Addr::new(0, to), 9),
            seq: 0,
            ack: 0,
            window: 0,
            payload_len: payload.len() as u16,
        };
        let n = repr.emit(&mut buf[HEADROOM..]).unwrap();
        buf[HEADROOM + HEADER_LEN..HEADROOM + n].copy_from_slice(payload);
        buf
    }

    /// Delivers every control datagram `from` has queued to `to`, returning packets.
    /// Moves what `from` sends through the beacon at `beacon` to `to`, as the beacon would
    /// deliver it; everything sent directly is lost.
    fn relay_only(beacon: SocketAddr, now: Instant, from: &mut Node, to: &mut Node) {
        while let Some(tx) = from.poll(now) {
            if tx.dst == beacon && tx.bytes.first() == Some(&bw::kind::RELAY) {
                let mut d = bw::relay_deliver_header(from.t.me).to_vec();
                d.extend_from_slice(&tx.bytes[RELAY_HEADER_LEN..]);
                let _ = to.t.handle(now, beacon, &mut d);
            }
        }
    }

    fn pump(now: Instant, from: &mut Node, to: &mut Node) -> usize {
        let mut n = 0;
        while let Some(tx) = from.poll(now) {
            if tx.dst != to.addr {
                continue;
            }
            let mut b = tx.bytes.clone();
            if let Received::Packet { .. } = to.t.handle(now, from.addr, &mut b) {
                n += 1;
            }
        }
        n
    }

    fn send(now: Instant, from: &mut Node, to_id: u32, payload: &[u8]) -> Sent {
        let mut buf = packet(from.t.me, to_id, payload);
        let len = HEADER_LEN + payload.len();
        let r = from.t.seal(now, to_id, &mut buf, len);
        // What the table queued goes first, as it was queued before this packet.
        from.drain_table(now);
        if let Sent::Now { dst, range } = r {
            from.sent.push_back(Out {
                dst,
                bytes: buf[range.0..range.1].to_vec(),
            });
        }
        r
    }

    /// Counts the PILA frames `from` has queued for `to` and delivers them all.
    fn pump_pilas(now: Instant, from: &mut Node, to: &mut Node) -> usize {
        let mut pilas = 0;
        while let Some(tx) = from.poll(now) {
            if tx.dst != to.addr {
                continue;
            }
            if matches!(Frame::parse(&tx.bytes), Ok(Frame::AuthKeyExchange(_))) {
                pilas += 1;
            }
            let mut b = tx.bytes.clone();
            to.t.handle(now, from.addr, &mut b);
        }
        pilas
    }

    #[test]
    fn key_exchange_settles_instead_of_ping_ponging() {
        let (mut a, mut b) = pair();
        let now = Instant::now();
        a.t.set_endpoint(now, 2, b.addr);
        send(now, &mut a, 2, b"hello");
        let mut total = 0;
        for _ in 0..20 {
            total += pump_pilas(now, &mut a, &mut b);
            total += pump_pilas(now, &mut b, &mut a);
        }
        // A's PILA, B's answer, A's answer to B's new key; then silence.
        assert_eq!(total, 3, "PILA frames exchanged");
        assert!(a.t.peers()[0].encrypted && b.t.peers()[0].encrypted);
    }

    #[test]
    fn key_exchange_then_sealed_packets() {
        let (mut a, mut b) = pair();
        let now = Instant::now();
        assert_eq!(send(now, &mut a, 2, b"hello"), Sent::NeedEndpoint);
        a.t.set_endpoint(now, 2, b.addr);
        pump(now, &mut a, &mut b); // A's PILA
        let got = pump(now, &mut b, &mut a); // B's PILA answer
        assert_eq!(got, 0);
        // A's queued packet went out once A had B's PILA.
        assert_eq!(pump(now, &mut a, &mut b), 1);
        assert!(matches!(send(now, &mut b, 1, b"back"), Sent::Now { .. }));
        assert_eq!(pump(now, &mut b, &mut a), 1);
        let peers = a.t.peers();
        assert_eq!(peers[0].node, 2);
        assert!(peers[0].encrypted);
        assert_eq!(peers[0].endpoint, Some(b.addr));
    }

    /// One PILA from `from` to `to`, returning what `to` made of it.
    fn deliver_pila(now: Instant, from: &mut Node, to: &mut Node) -> Option<Received> {
        let mut last = None;
        while let Some(tx) = from.poll(now) {
            if tx.dst == to.addr && matches!(Frame::parse(&tx.bytes), Ok(Frame::AuthKeyExchange(_)))
            {
                let mut b = tx.bytes.clone();
                last = Some(to.t.handle(now, from.addr, &mut b));
            }
        }
        last
    }

    #[test]
    fn a_rotated_key_rekeys_tunnels_and_peers_look_it_up_again() {
        let (mut a, mut b) = pair();
        let now = Instant::now();
        a.t.set_endpoint(now, 2, b.addr);
        for _ in 0..4 {
            pump_pilas(now, &mut a, &mut b);
            pump_pilas(now, &mut b, &mut a);
        }
        assert!(a.t.peers()[0].encrypted && b.t.peers()[0].encrypted);

        let new = SigningKey::from_bytes(&[7; 32]);
        a.t.set_identity(now, new.clone());
        assert!(
            !a.t.peers()[0].encrypted,
            "sessions made under the old key are gone"
        );
        // B's cached key no longer verifies A's PILA: B asks for the key again...
        assert!(matches!(
            deliver_pila(now, &mut a, &mut b),
            Some(Received::NeedKey(1))
        ));
        // ...and the registry's answer completes the exchange held meanwhile.
        b.t.set_key(now, 1, new.verifying_key());
        assert!(b.t.peers()[0].encrypted);
        pump_pilas(now, &mut b, &mut a);
        assert!(a.t.peers()[0].encrypted);

        // A forger's PILA for A, signed by another key, triggers one look-up per interval at
        // most; the rest are dropped.
        let mut m = node(1, 9, 4009, None);
        m.t.set_key(now, 2, b.t.identity.verifying_key());
        m.t.set_endpoint(now, 2, b.addr);
        assert!(matches!(
            deliver_pila(now, &mut m, &mut b),
            Some(Received::Dropped(Drop::BadKeyExchange))
        ));
        let later = now + KEY_REFETCH_INTERVAL;
        m.t.set_endpoint(later, 2, b.addr);
        assert!(matches!(
            deliver_pila(later, &mut m, &mut b),
            Some(Received::NeedKey(1))
        ));
        b.t.set_key(later, 1, new.verifying_key());
        assert!(b.t.peers()[0].encrypted, "the forged PILA changed nothing");
        m.t.set_endpoint(later, 2, b.addr);
        assert!(matches!(
            deliver_pila(later, &mut m, &mut b),
            Some(Received::Dropped(Drop::BadKeyExchange))
        ));
    }

    #[test]
    fn a_silent_direct_peer_is_looked_up_again_once_per_interval() {
        let (mut a, b) = pair();
        let t0 = Instant::now();
        a.t.set_endpoint(t0, 2, b.addr);
        send(t0, &mut a, 2, b"unanswered");
        a.t.handle_timeout(t0);
        assert_eq!(a.t.poll_resolve(), None, "not silent long enough");
        let t1 = t0 + DIRECT_TIMEOUT;
        a.t.handle_timeout(t1);
        assert_eq!(a.t.poll_resolve(), Some(2));
        assert_eq!(a.t.poll_resolve(), None);
        assert!(
            !a.t.take_unanswered(),
            "no session: not a peer that stopped answering"
        );
        a.t.handle_timeout(t1 + Duration::from_secs(1));
        assert_eq!(a.t.poll_resolve(), None, "once per interval");
        a.t.handle_timeout(t1 + RERESOLVE_INTERVAL);
        assert_eq!(a.t.poll_resolve(), Some(2));
    }

    #[test]
    fn a_keyed_peer_that_stops_answering_is_reported_once_per_interval() {
        let (mut a, mut b) = pair();
        let t0 = Instant::now();
        handshake(t0, &mut a, &mut b);
        assert!(a.t.peers()[0].encrypted);
        let t1 = t0 + Duration::from_secs(1);
        send(t1, &mut a, 2, b"unanswered");
        a.t.handle_timeout(t1 + DIRECT_TIMEOUT - Duration::from_millis(1));
        assert!(!a.t.take_unanswered(), "not silent long enough");
        a.t.handle_timeout(t1 + DIRECT_TIMEOUT);
        assert!(a.t.take_unanswered());
        assert!(!a.t.take_unanswered(), "taken");
        a.t.handle_timeout(t1 + DIRECT_TIMEOUT + Duration::from_secs(1));
        assert!(!a.t.take_unanswered(), "once per interval");
        a.t.handle_timeout(t1 + DIRECT_TIMEOUT + RERESOLVE_INTERVAL);
        assert!(a.t.take_unanswered());
    }

    #[test]
    fn spoofed_inner_source_is_dropped() {
        let (mut a, mut b) = pair();
        let now = Instant::now();
        a.t.set_endpoint(now, 2, b.addr);
        pump(now, &mut a, &mut b);
        pump(now, &mut b, &mut a);
        // A seals a packet claiming to come from node 7.
        let mut buf = packet(7, 2, b"x");
        let r = a.t.seal(now, 2, &mut buf, HEADER_LEN + 1);
        let Sent::Now { range, .. } = r else {
            panic!("{r:?}")
        };
        let mut f = buf[range.0..range.1].to_vec();
        assert!(matches!(
            b.t.handle(now, a.addr, &mut f),
            Received::Dropped(Drop::SpoofedSource)
        ));
    }

    #[test]
    fn plaintext_and_forged_frames_are_refused() {
        let (mut a, mut b) = pair();
        let now = Instant::now();
        let mut pilt = b"PILT".to_vec();
        pilt.extend_from_slice(&packet(1, 2, b"x")[HEADROOM..HEADROOM + HEADER_LEN + 1]);
        assert!(matches!(
            b.t.handle(now, a.addr, &mut pilt),
            Received::Dropped(Drop::Plaintext)
        ));
        assert_eq!(b.t.drops(), vec![(Drop::Plaintext, 1)]);
        assert!(b.t.peers().is_empty(), "a refused PILT makes no peer");
        // A PILA signed by the wrong key: the first makes B look A's key up again (A may
        // have rotated it); against the same key it is refused, and so is the next.
        let mallory = SigningKey::from_bytes(&[9; 32]);
        let forged = build_auth_key_exchange(&mallory, 1, &[5; 32]).to_bytes();
        assert!(matches!(
            b.t.handle(now, a.addr, &mut forged.to_vec()),
            Received::NeedKey(1)
        ));
        b.t.set_key(now, 1, a.t.identity.verifying_key());
        assert!(b.t.peers().iter().all(|p| !p.encrypted));
        assert!(matches!(
            b.t.handle(now, a.addr, &mut forged.to_vec()),
            Received::Dropped(Drop::BadKeyExchange)
        ));
        // Garbage of every length never panics.
        for len in 0..200 {
            let mut g: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let _ = b.t.handle(now, a.addr, &mut g);
            let mut g2 = b"PILS".to_vec();
            g2.extend((0..len).map(|i| i as u8));
            let _ = b.t.handle(now, a.addr, &mut g2);
        }
        let _ = &mut a;
    }

    /// A PILT frame carrying a datagram from `from` to `to`.
    fn pilt(from: u32, to: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = MAGIC_PLAIN.to_vec();
        f.extend_from_slice(
            &packet(from, to, payload)[HEADROOM..HEADROOM + HEADER_LEN + payload.len()],
        );
        f
    }

    #[test]
    fn plaintext_allowed_is_accepted_and_answered_in_plaintext_until_a_session_exists() {
        let (mut a, mut b) = pair();
        b.t.config.refuse_plaintext = false;
        let now = Instant::now();
        // A v1 daemon with encryption off: PILT only, key exchanges ignored.
        let mut f = pilt(1, 2, b"hi");
        // Bytes after the packet are ignored (v1 §1).
        f.extend_from_slice(b"trailing");
        let Received::Packet { peer, range } = b.t.handle(now, a.addr, &mut f) else {
            panic!("PILT refused with plaintext allowed")
        };
        assert_eq!(peer, 1);
        let inner = Packet::new_checked(&f[range.clone()]).unwrap();
        assert_eq!(inner.payload(), b"hi");
        assert_eq!(range.len(), HEADER_LEN + 2);
        assert!(b.t.drops().is_empty());
        let v = &b.t.peers()[0];
        assert!(v.plaintext && !v.encrypted);
        assert_eq!(
            v.endpoint,
            Some(a.addr),
            "an unknown peer is recorded at the source"
        );

        // The answer goes out at once as PILT to the peer's endpoint, not queued...
        let r = send(now, &mut b, 1, b"back");
        let Sent::Now { dst, .. } = r else {
            panic!("{r:?}")
        };
        assert_eq!(dst, a.addr);
        let mut frames = Vec::new();
        while let Some(o) = b.poll(now) {
            frames.push(o.bytes);
        }
        // ...after our PILA, so a peer that encrypts makes a session.
        assert!(matches!(
            Frame::parse(&frames[0]),
            Ok(Frame::AuthKeyExchange(_))
        ));
        let Ok(Frame::Plain(p)) = Frame::parse(&frames[1]) else {
            panic!("not PILT: {:?}", &frames[1][..4])
        };
        assert_eq!(Packet::new_checked(p).unwrap().payload(), b"back");
        assert_eq!(frames.len(), 2);

        // A PILT never moves a known endpoint.
        let elsewhere: SocketAddr = "127.0.0.1:4999".parse().unwrap();
        let mut f = pilt(1, 2, b"moved?");
        assert!(matches!(
            b.t.handle(now, elsewhere, &mut f),
            Received::Packet { peer: 1, .. }
        ));
        assert_eq!(b.t.peers()[0].endpoint, Some(a.addr));

        // Once the peer keys (a v1 daemon with encryption on), packets go sealed.
        a.t.set_endpoint(now, 2, b.addr);
        pump_pilas(now, &mut a, &mut b);
        assert!(b.t.peers()[0].encrypted);
        let mut buf = packet(2, 1, b"sealed");
        let r = b.t.seal(now, 1, &mut buf, HEADER_LEN + 6);
        let Sent::Now { range, .. } = r else {
            panic!("{r:?}")
        };
        assert!(matches!(
            Frame::parse(&buf[range.0..range.1]),
            Ok(Frame::Encrypted(_))
        ));
        // A PILT of our own node or with a broken header is dropped and counted.
        let mut own = pilt(2, 2, b"x");
        assert!(matches!(
            b.t.handle(now, a.addr, &mut own),
            Received::Dropped(Drop::FromSelf)
        ));
        let mut short = pilt(1, 2, b"xyz");
        short.truncate(short.len() - 1);
        assert!(matches!(
            b.t.handle(now, a.addr, &mut short),
            Received::Dropped(Drop::BadInner)
        ));
    }

    #[test]
    fn plaintext_through_the_relay_is_answered_through_the_relay() {
        let beacon: SocketAddr = "127.0.0.1:9001".parse().unwrap();
        let mut b = node(2, 2, 4002, Some(beacon));
        b.t.config.refuse_plaintext = false;
        let now = Instant::now();
        let mut f = vec![bw::kind::RELAY_DELIVER];
        f.extend_from_slice(&1u32.to_be_bytes());
        f.extend_from_slice(&pilt(1, 2, b"via"));
        assert!(matches!(
            b.t.handle(now, beacon, &mut f),
            Received::Packet { peer: 1, .. }
        ));
        assert_eq!(b.t.path(1), Some(Path::Relay));
        let mut buf = packet(2, 1, b"back");
        let r = b.t.seal(now, 1, &mut buf, HEADER_LEN + 4);
        let Sent::Now { dst, range } = r else {
            panic!("{r:?}")
        };
        assert_eq!(dst, beacon);
        let frame = &buf[range.0..range.1];
        assert_eq!(frame[..RELAY_HEADER_LEN], relay_header(2, 1));
        assert!(matches!(
            Frame::parse(&frame[RELAY_HEADER_LEN..]),
            Ok(Frame::Plain(_))
        ));
    }

    /// `b` stands in for a v1 daemon: it answers a PILA only when the X25519 key in it is new
    /// to it (v1 wire §2.3 step 8) and sends nothing else unprompted. Its first answer is
    /// lost, as when a beacon dropped the first Relay of the flow.
    #[test]
    fn a_peer_whose_one_pila_answer_was_lost_gets_a_fresh_key_and_answers_it() {
        let (mut a, mut b) = pair();
        let t0 = Instant::now();
        a.t.set_endpoint(t0, 2, b.addr);
        let mut keys_seen = std::collections::HashSet::new();
        let mut answers = 0;
        let mut now = t0;
        let mut pilas_from_a = 0;
        let mut opened = 0;
        for _ in 0..30 {
            // The application's SYN, retransmitted every second while the tunnel is not ready.
            send(now, &mut a, 2, b"syn");
            while let Some(tx) = a.poll(now) {
                let Ok(Frame::AuthKeyExchange(k)) = Frame::parse(&tx.bytes) else {
                    // Packets A sealed once it had a session: B must open them.
                    let mut f = tx.bytes.clone();
                    if let Received::Packet { peer: 1, .. } = b.t.handle(now, a.addr, &mut f) {
                        opened += 1;
                    }
                    continue;
                };
                pilas_from_a += 1;
                let new_key = keys_seen.insert(k.x25519_public());
                let mut f = tx.bytes.clone();
                b.t.handle(now, a.addr, &mut f);
                while let Some(o) = b.poll(now) {
                    if !new_key || !matches!(Frame::parse(&o.bytes), Ok(Frame::AuthKeyExchange(_)))
                    {
                        continue;
                    }
                    answers += 1;
                    if answers > 1 {
                        let mut f = o.bytes.clone();
                        a.t.handle(now, b.addr, &mut f);
                    }
                }
            }
            if a.t.peers()[0].encrypted {
                break;
            }
            now += Duration::from_secs(1);
            a.t.handle_timeout(now);
        }
        assert!(
            a.t.peers()[0].encrypted,
            "still half-keyed after {pilas_from_a} PILAs and {answers} answers"
        );
        assert_eq!(keys_seen.len(), 2, "one fresh key was enough");
        assert!(
            now.duration_since(t0) <= Duration::from_secs(HALF_KEYED_PILAS as u64 + 1),
            "recovered after {:?}",
            now.duration_since(t0)
        );
        // Both ends hold the same session: what A queued opened at B.
        assert!(opened > 0, "nothing A sealed opened at B");
        // Other peers keep the table's key: only B's PILA carries the fresh one.
        let mut c = node(3, 3, 4003, None);
        a.t.set_key(now, 3, c.t.identity.verifying_key());
        c.t.set_key(now, 1, a.t.identity.verifying_key());
        a.t.set_endpoint(now, 3, c.addr);
        let to_c = std::iter::from_fn(|| a.poll(now))
            .find(|o| o.dst == c.addr)
            .unwrap();
        let Ok(Frame::AuthKeyExchange(k)) = Frame::parse(&to_c.bytes) else {
            panic!("not a PILA")
        };
        assert_eq!(k.x25519_public(), a.t.public, "C gets the table's key");
        assert!(keys_seen.contains(&a.t.public), "the key B saw first");
    }

    #[test]
    fn unknown_session_is_answered_with_our_key_exchange() {
        let (mut a, mut b) = pair();
        let now = Instant::now();
        handshake(now, &mut a, &mut b);
        // B restarts: new X25519 key, no sessions.
        let key_a = a.t.identity.verifying_key();
        b = node(2, 2, 4002, None);
        b.t.set_key(now, 1, key_a);
        assert!(matches!(
            send(now, &mut a, 2, b"after restart"),
            Sent::Now { .. }
        ));
        assert_eq!(pump(now, &mut a, &mut b), 0, "B cannot open it");
        // B answered with its PILA; A re-keys and B can read A's next packet.
        pump(now, &mut b, &mut a);
        pump(now, &mut a, &mut b);
        assert!(matches!(send(now, &mut a, 2, b"again"), Sent::Now { .. }));
        assert_eq!(pump(now, &mut a, &mut b), 1);
    }

    #[test]
    fn replayed_key_exchange_moves_nothing() {
        let (mut a, mut b) = pair();
        let now = Instant::now();
        a.t.set_endpoint(now, 2, b.addr);
        let pila = a.poll(now).unwrap();
        a.sent.push_front(pila.clone());
        pump(now, &mut a, &mut b);
        pump(now, &mut b, &mut a);
        pump(now, &mut a, &mut b);
        let attacker: SocketAddr = "203.0.113.5:666".parse().unwrap();
        let mut replay = pila.bytes.clone();
        let _ = b.t.handle(now, attacker, &mut replay);
        assert_eq!(b.t.peers()[0].endpoint, Some(a.addr));
        // Roaming: a fresh PILS from a new address moves the endpoint.
        let roamed: SocketAddr = "127.0.0.1:5001".parse().unwrap();
        a.addr = roamed;
        send(now, &mut a, 2, b"moved");
        assert_eq!(pump(now, &mut a, &mut b), 1);
        assert_eq!(b.t.peers()[0].endpoint, Some(roamed));
    }

    #[test]
    fn only_the_newest_pils_moves_an_endpoint() {
        let (mut a, mut b) = pair();
        let now = Instant::now();
        handshake(now, &mut a, &mut b);
        let old = a.addr;
        // Sealed at the old address and held back (reordered, or by someone on the path).
        let late: Vec<Out> = (0..2)
            .map(|_| {
                send(now, &mut a, 2, b"late");
                a.sent.pop_back().unwrap()
            })
            .collect();
        // A moves; its next frame moves B's view of it.
        let roamed: SocketAddr = "127.0.0.1:5001".parse().unwrap();
        a.addr = roamed;
        send(now, &mut a, 2, b"moved");
        assert_eq!(pump(now, &mut a, &mut b), 1);
        assert_eq!(b.t.peers()[0].endpoint, Some(roamed));
        // The held-back frames are still packets (inside the replay window), but they move A
        // neither back to its old address nor to a third one.
        let holder: SocketAddr = "203.0.113.5:666".parse().unwrap();
        for (from, frame) in [old, holder].into_iter().zip(&late) {
            let mut bytes = frame.bytes.clone();
            let got = b.t.handle(now, from, &mut bytes);
            assert!(matches!(got, Received::Packet { peer: 1, .. }), "{got:?}");
            assert_eq!(
                b.t.peers()[0].endpoint,
                Some(roamed),
                "moved by a late frame"
            );
        }
        // A frame newer than all before moves it again.
        a.addr = holder;
        send(now, &mut a, 2, b"again");
        assert_eq!(pump(now, &mut a, &mut b), 1);
        assert_eq!(b.t.peers()[0].endpoint, Some(holder));
    }

    #[test]
    fn a_moved_notice_moves_the_peers_view_and_is_an_ignored_control_packet() {
        let (mut a, mut b) = pair();
        let now = Instant::now();
        handshake(now, &mut a, &mut b);
        assert_eq!(b.t.peers()[0].endpoint, Some(a.addr));
        // A learns its mapping moved: B hears it from the new endpoint without A sending
        // anything else.
        a.addr = "127.0.0.1:5001".parse().unwrap();
        a.t.announce_moved();
        let tx = a.poll(now).expect("a notice for B");
        assert_eq!(tx.dst, b.addr);
        assert!(a.poll(now).is_none(), "one notice per peer");
        let mut bytes = tx.bytes.clone();
        let Received::Packet { peer: 1, range } = b.t.handle(now, a.addr, &mut bytes) else {
            panic!("the notice is not a packet from A");
        };
        assert_eq!(b.t.peers()[0].endpoint, Some(a.addr));
        let p = Packet::new_checked(&bytes[range]).unwrap();
        assert_eq!(p.protocol(), Protocol::Control);
        assert_eq!((p.src_port(), p.dst_port()), (MOVED_PORT, MOVED_PORT));
        assert_eq!(p.total_len(), HEADER_LEN);
        // A peer without a session gets none.
        let c = node(3, 3, 4003, None);
        a.t.set_key(now, 3, c.t.identity.verifying_key());
        a.t.set_endpoint(now, 3, c.addr);
        while a.poll(now).is_some() {}
        a.t.announce_moved();
        let notices: Vec<Out> = std::iter::from_fn(|| a.poll(now)).collect();
        assert_eq!(notices.len(), 1);
        assert_eq!(notices[0].dst, b.addr);
    }

    #[test]
    fn a_learned_endpoint_wins_over_the_registry_until_it_goes_silent() {
        let (mut a, mut b) = pair();
        let t0 = Instant::now();
        handshake(t0, &mut a, &mut b);
        // A moves; its moved notice, authenticated, moves B's view.
        a.addr = "127.0.0.1:5001".parse().unwrap();
        a.t.announce_moved();
        pump(t0, &mut a, &mut b);
        assert_eq!(b.t.peers()[0].endpoint, Some(a.addr));
        assert!(b.t.endpoint_live(t0, 1));
        // The registry still has A's listen port at its new address (B had asked while A's
        // old mapping was dead): the answer does not replace what A's packets showed.
        let registered: SocketAddr = "127.0.0.1:4001".parse().unwrap();
        assert!(!b.t.set_endpoint(t0, 1, registered));
        assert_eq!(b.t.peers()[0].endpoint, Some(a.addr));
        assert!(
            b.poll(t0).is_none(),
            "nothing sent toward the refused endpoint"
        );
        // B sends and A stops answering: before DIRECT_TIMEOUT the endpoint holds, then the
        // registry's answer is the fallback.
        let t1 = t0 + Duration::from_secs(5);
        send(t1, &mut b, 1, b"unanswered");
        while b.poll(t1).is_some() {}
        let almost = t1 + DIRECT_TIMEOUT - Duration::from_millis(1);
        assert!(!b.t.set_endpoint(almost, 1, registered));
        assert_eq!(b.t.peers()[0].endpoint, Some(a.addr));
        let silent = t1 + DIRECT_TIMEOUT;
        assert!(!b.t.endpoint_live(silent, 1));
        assert!(b.t.set_endpoint(silent, 1, registered));
        assert_eq!(b.t.peers()[0].endpoint, Some(registered));
        // A registry endpoint is no learned one: the next answer replaces it.
        let other: SocketAddr = "127.0.0.1:4444".parse().unwrap();
        assert!(b.t.set_endpoint(silent, 1, other));
        assert_eq!(b.t.peers()[0].endpoint, Some(other));
        // A's next authenticated packet shows where it is, and wins again.
        while b.poll(silent).is_some() {}
        send(silent, &mut a, 2, b"here");
        assert_eq!(pump(silent, &mut a, &mut b), 1);
        assert_eq!(b.t.peers()[0].endpoint, Some(a.addr));
        assert!(!b.t.set_endpoint(silent, 1, registered));
        assert_eq!(b.t.peers()[0].endpoint, Some(a.addr));
    }

    #[test]
    fn a_moved_notice_after_the_relay_fallback_moves_the_peer_back_to_direct() {
        let beacon: SocketAddr = "127.0.0.1:9001".parse().unwrap();
        let (mut a, mut b) = pair_via(Some(beacon));
        let t0 = Instant::now();
        handshake(t0, &mut a, &mut b);
        // A moves; B speaks first, into the old mapping: after DIRECT_TIMEOUT B relays and
        // asks the registry, whose answer (A's listen port at a stale address) it takes.
        let t1 = t0 + Duration::from_secs(2);
        send(t1, &mut b, 1, b"lost");
        while b.poll(t1).is_some() {}
        let t2 = t1 + DIRECT_TIMEOUT;
        b.t.handle_timeout(t2);
        assert_eq!(b.t.poll_resolve(), Some(1));
        assert_eq!(b.t.path(1), Some(Path::Relay));
        let stale: SocketAddr = "127.0.0.1:4999".parse().unwrap();
        assert!(b.t.set_endpoint(t2, 1, stale));
        while b.poll(t2).is_some() {}
        // A learns it moved: its notice moves B back to direct, at A's new endpoint, and a
        // later registry answer does not undo it.
        let t3 = t2 + Duration::from_secs(4);
        a.addr = "127.0.0.1:5001".parse().unwrap();
        a.t.announce_moved();
        pump(t3, &mut a, &mut b);
        assert_eq!(b.t.peers()[0].endpoint, Some(a.addr));
        assert_eq!(b.t.path(1), Some(Path::Direct));
        b.t.handle_timeout(t3 + Duration::from_secs(2));
        assert!(!b.t.set_endpoint(t3 + Duration::from_secs(2), 1, stale));
        assert_eq!(b.t.peers()[0].endpoint, Some(a.addr));
        assert_eq!(b.t.path(1), Some(Path::Direct));
        // B's next packet (behind its PILA: B went silent toward A) goes to A's new endpoint.
        let t4 = t3 + Duration::from_secs(2);
        send(t4, &mut b, 1, b"found");
        let outs: Vec<Out> = std::iter::from_fn(|| b.poll(t4)).collect();
        assert!(outs.iter().all(|o| o.dst == a.addr), "sent elsewhere");
        let packets = outs
            .iter()
            .filter(|o| {
                let mut bytes = o.bytes.clone();
                matches!(
                    a.t.handle(t4, b.addr, &mut bytes),
                    Received::Packet { peer: 2, .. }
                )
            })
            .count();
        assert_eq!(packets, 1, "A got B's packet");
    }

    #[test]
    fn an_unauthenticated_endpoint_gives_way_to_the_registry() {
        let (mut a, mut b) = pair();
        let now = Instant::now();
        // B has A's endpoint from the registry only: a later answer replaces it at once.
        b.t.set_endpoint(now, 1, "127.0.0.1:4999".parse().unwrap());
        assert!(!b.t.endpoint_live(now, 1));
        assert!(b.t.set_endpoint(now, 1, a.addr));
        assert_eq!(b.t.peers()[0].endpoint, Some(a.addr));
        // Keyed, B's view learned from A's PILA stays.
        while b.poll(now).is_some() {}
        a.t.set_endpoint(now, 2, b.addr);
        pump(now, &mut a, &mut b);
        assert!(b.t.endpoint_live(now, 1));
        assert!(!b.t.set_endpoint(now, 1, "127.0.0.1:4999".parse().unwrap()));
        assert_eq!(b.t.peers()[0].endpoint, Some(a.addr));
    }

    #[test]
    fn relayed_peers_return_to_direct_after_a_direct_probe() {
        let beacon: SocketAddr = "127.0.0.1:9001".parse().unwrap();
        let (mut a, mut b) = pair_via(Some(beacon));
        let t0 = Instant::now();
        a.t.set_endpoint(t0, 2, b.addr);
        b.t.set_endpoint(t0, 1, a.addr);
        // The direct path is down: everything direct is lost, relays get through.
        send(t0, &mut a, 2, b"hi");
        send(t0, &mut b, 1, b"hi");
        relay_only(beacon, t0, &mut a, &mut b);
        relay_only(beacon, t0, &mut b, &mut a);
        let mut t = t0 + DIRECT_TIMEOUT;
        for _ in 0..4 {
            a.t.handle_timeout(t);
            b.t.handle_timeout(t);
            relay_only(beacon, t, &mut a, &mut b);
            relay_only(beacon, t, &mut b, &mut a);
        }
        assert_eq!(a.t.path(2), Some(Path::Relay));
        assert_eq!(b.t.path(1), Some(Path::Relay));
        assert!(a.t.peers()[0].encrypted, "the relayed session works");
        // The path heals. A's next direct probe reaches B; B's direct answer reaches A.
        t += DIRECT_PROBE_INTERVAL;
        a.t.handle_timeout(t);
        pump(t, &mut a, &mut b);
        assert_eq!(b.t.path(1), Some(Path::Direct));
        pump(t, &mut b, &mut a);
        assert_eq!(a.t.path(2), Some(Path::Direct));
        assert!(matches!(send(t, &mut a, 2, b"direct"), Sent::Now { dst, .. } if dst == b.addr));
        assert_eq!(pump(t, &mut a, &mut b), 1);
    }

    #[test]
    fn a_relayed_peer_without_an_endpoint_is_looked_up_until_found_then_probed() {
        let beacon: SocketAddr = "127.0.0.1:9001".parse().unwrap();
        let (mut a, mut b) = pair_via(Some(beacon));
        let t0 = Instant::now();
        // A's own look-up of B was refused: a peer made only by our packets is forgotten.
        assert_eq!(send(t0, &mut a, 2, b"early"), Sent::NeedEndpoint);
        assert!(a.t.remove_if_unknown(2));
        assert!(a.t.peers().is_empty());
        while a.poll(t0).is_some() {}
        // B reaches A only through the relay: A has a session but no endpoint of B.
        b.t.peer(t0, 1).endpoint = Some(a.addr);
        b.t.peer(t0, 1).path = Path::Relay;
        send(t0, &mut b, 1, b"hi");
        relay_only(beacon, t0, &mut b, &mut a);
        relay_only(beacon, t0, &mut a, &mut b);
        relay_only(beacon, t0, &mut b, &mut a);
        assert_eq!(a.t.path(2), Some(Path::Relay));
        assert_eq!(a.t.peers()[0].endpoint, None);
        assert!(a.t.peers()[0].encrypted);
        // A looks B's endpoint up at once, then once per probe interval while refused.
        assert!(a.t.poll_timeout().is_some_and(|t| t <= t0));
        a.t.handle_timeout(t0);
        assert_eq!(a.t.poll_resolve(), Some(2));
        assert_eq!(a.t.poll_resolve(), None);
        assert!(!a.t.remove_if_unknown(2), "a refusal keeps a relayed peer");
        let t1 = t0 + Duration::from_secs(1);
        a.t.handle_timeout(t1);
        assert_eq!(a.t.poll_resolve(), None, "once per interval");
        let t2 = t0 + DIRECT_PROBE_INTERVAL;
        assert!(a.t.poll_timeout().is_some_and(|t| t <= t2));
        a.t.handle_timeout(t2);
        assert_eq!(a.t.poll_resolve(), Some(2));
        // The registry answers: A's PILA goes straight to B, whose direct answer moves both.
        a.t.set_endpoint(t2, 2, b.addr);
        let mut direct = 0;
        while let Some(tx) = a.poll(t2) {
            if tx.dst == b.addr {
                direct += 1;
                let mut d = tx.bytes.clone();
                let _ = b.t.handle(t2, a.addr, &mut d);
            }
        }
        assert_eq!(direct, 1, "one direct PILA");
        assert_eq!(b.t.path(1), Some(Path::Direct));
        pump(t2, &mut b, &mut a);
        assert_eq!(a.t.path(2), Some(Path::Direct));
        assert!(matches!(send(t2, &mut a, 2, b"direct"), Sent::Now { dst, .. } if dst == b.addr));
    }

    #[test]
    fn silent_direct_path_falls_back_to_relay_and_back() {
        let beacon: SocketAddr = "127.0.0.1:9001".parse().unwrap();
        let (mut a, mut b) = pair_via(Some(beacon));
        let t0 = Instant::now();
        a.t.set_endpoint(t0, 2, b.addr);
        send(t0, &mut a, 2, b"hi");
        while a.poll(t0).is_some() {} // direct traffic is lost
        let t1 = t0 + DIRECT_TIMEOUT;
        a.t.handle_timeout(t1);
        assert_eq!(a.t.path(2), Some(Path::Relay));
        // The PILA now goes to the beacon behind a Relay header; the beacon rewrites it.
        let tx = a.poll(t1).unwrap();
        assert_eq!(tx.dst, beacon);
        assert_eq!(tx.bytes[0], bw::kind::RELAY);
        let mut delivered = bw::relay_deliver_header(1).to_vec();
        delivered.extend_from_slice(&tx.bytes[RELAY_HEADER_LEN..]);
        let _ = b.t.handle(t1, beacon, &mut delivered);
        assert_eq!(b.t.path(1), Some(Path::Relay));
        // A direct PILS later moves both back.
        let answer = b.poll(t1).unwrap();
        assert_eq!(answer.dst, beacon);
        let mut d2 = bw::relay_deliver_header(2).to_vec();
        d2.extend_from_slice(&answer.bytes[RELAY_HEADER_LEN..]);
        let _ = a.t.handle(t1, beacon, &mut d2);
        let t2 = t1 + DIRECT_PROBE_INTERVAL;
        b.t.peer(t2, 1).endpoint = Some(a.addr);
        b.t.peer(t2, 1).path = Path::Direct;
        send(t2, &mut b, 1, b"direct again");
        assert_eq!(pump(t2, &mut b, &mut a), 1);
        assert_eq!(a.t.path(2), Some(Path::Direct));
    }

    #[test]
    fn a_punch_from_a_peer_without_a_session_brings_our_pila_again_at_once() {
        let beacon: SocketAddr = "127.0.0.1:9001".parse().unwrap();
        let mut a = node(1, 1, 4001, Some(beacon));
        let b = node(2, 2, 4002, Some(beacon));
        let t0 = Instant::now();
        a.t.set_key(t0, 2, b.t.identity.verifying_key());
        a.t.set_endpoint(t0, 2, b.addr);
        while a.poll(t0).is_some() {} // the punch request, and the PILA B's NAT drops
                                      // B's punch (the beacon told it to) arrives: our PILA goes out again now.
        let t1 = t0 + Duration::from_millis(20);
        let mut punch = MAGIC_PUNCH.to_vec();
        let _ = a.t.handle(t1, b.addr, &mut punch);
        let tx = a.poll(t1).expect("a PILA in answer to the punch");
        assert_eq!(tx.dst, b.addr);
        assert_eq!(
            tx.bytes[..MAGIC_LEN],
            crate::wire::frame::MAGIC_AUTH_KEY_EXCHANGE
        );
        assert!(a.poll(t1).is_none());
        // More punches within PILA_INTERVAL bring nothing more; nor does one from elsewhere.
        let mut punch = MAGIC_PUNCH.to_vec();
        let _ = a.t.handle(t1, b.addr, &mut punch);
        let mut punch = MAGIC_PUNCH.to_vec();
        let _ =
            a.t.handle(t1, "127.0.0.1:4999".parse().unwrap(), &mut punch);
        assert!(a.poll(t1).is_none());
    }
}
