//! The node core, sans-IO: one node's peer table ([`tunnels`]), connection table
//! ([`Endpoint`]), trust gate, SYN limiter ([`synlimit`]) and own-address delivery, behind
//! one state machine, [`Node`]. The daemon is a thin adapter around it: a UDP socket on the
//! outside, applications on the inside, the registry on the control side.
//!
//! ```text
//!  datagram in --handle_outside--> Tunnels (open in place) --packet--> SYN limit, trust gate
//!                                                                   --> Endpoint --> events
//!  app: listen / dial / write / read / shutdown / close / abort / send_datagram
//!  poll_transmit(buf) <-- Tunnels control datagrams, queued packets
//!                     <-- datagrams and Endpoint packets, sealed in place in `buf`
//!                          (packets to our own address are delivered inside, never sent)
//!  control side: NeedKey / NeedEndpoint events --> key_found / endpoint_resolved / ...
//! ```
//!
//! # Calling order
//!
//! Nothing here opens a socket or reads a clock: time (`now`) comes in with every call and
//! randomness from the generator `R` given at construction. A driver:
//!
//! 1. feeds inputs: [`Node::handle_outside`] for each datagram received, the application
//!    commands ([`Node::listen`], [`Node::dial`], [`Node::write`], [`Node::read`],
//!    [`Node::shutdown`], [`Node::close`], [`Node::abort`], [`Node::send_datagram`]) and the
//!    control side's answers ([`Node::key_found`], [`Node::endpoint_resolved`], ...);
//! 2. at [`Node::poll_timeout`] calls [`Node::handle_timeout`];
//! 3. after any input, drains [`Node::poll_event`] and then [`Node::poll_transmit`] until
//!    each returns `None` (transmitting can deliver packets to our own address and so make
//!    events: drain events again after transmitting, until both are empty).
//!
//! # Invariants
//!
//! - Work is proportional to what happened: a connection is looked at (its events drained,
//!   its release checked) only when a segment, a timer, or an application call touched it;
//!   [`NodeStats::serviced`] counts those looks. Idle connections cost nothing per wake.
//! - A connection's [`ConnId`] stays valid until it is closed ([`Event::Closed`], reported
//!   once) and everything received was read; then the node releases it and calls on the ID
//!   return `UnknownConnection`. IDs are not reused while in use.
//! - Packets to our own address never reach the tunnel layer or the trust gate.
//! - Input from the network never panics.

pub mod synlimit;
pub mod tunnels;

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use ed25519_dalek::{SigningKey, VerifyingKey};
use rand_core::{CryptoRng, RngCore};

use crate::addr::{Addr, SocketAddr as PilotAddr};
use crate::stream::{
    ConnError, ConnHandle, ConnectError, DropReason, Endpoint, EndpointConfig, Event as ConnEvent,
    Incoming, State, Stats as ConnStats,
};
use crate::wire::header::{Flags, Packet, Protocol, HEADER_LEN};
use synlimit::SynLimiter;
use tunnels::{Drop, PeerView, Received, Sent, TunnelConfig, Tunnels, HEADROOM, TAILROOM};

pub use crate::stream::{DeferredError as IncomingError, DeferredId as IncomingId};
pub use tunnels::Transmit;

/// Largest Pilot packet (header and payload) the node builds or accepts.
pub const MAX_PACKET: usize = 65_535;
/// Bytes a [`Node::poll_transmit`] buffer needs: room for the largest packet, its PILS
/// framing and a relay header.
pub const TRANSMIT_BUFFER: usize = HEADROOM + MAX_PACKET + TAILROOM;
/// Datagrams waiting to be sent; more are refused.
pub const MAX_QUEUED_DATAGRAMS: usize = 1024;
/// Packets delivered to our own address per [`Node::poll_transmit`] call before it yields, so
/// a local transfer never holds the driver from its other work.
pub const LOOPBACK_BUDGET: usize = 256;

/// A connection as applications name it (v1 IPC `conn_id`; never 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u32);

impl std::fmt::Display for ConnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Decides whether a peer may open a connection to, or send a datagram to, a local port.
/// Asked on the packet path for every new inbound connection and every datagram: answer from
/// memory.
pub trait TrustGate: std::fmt::Debug + Send + Sync + 'static {
    /// Whether `peer` may reach local `port`.
    fn allows(&self, peer: u32, port: u16) -> bool;
}

/// How a listened port takes connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ListenMode {
    /// The connection table answers each SYN at once; established connections are reported
    /// as [`Event::Accepted`]. (Ports no one listens on can go to the fallback listener,
    /// [`Node::listen_fallback`], which defers each SYN to its owner.)
    #[default]
    Accept,
}

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CloseReason {
    /// Both sides finished (or we closed and the peer acknowledged).
    #[error("connection closed")]
    Finished,
    /// The peer answered our SYN with RST (nothing listens, or it does not trust us).
    #[error("connection refused")]
    Refused,
    /// The peer reset the connection.
    #[error("connection reset by peer")]
    Reset,
    /// Retransmissions went unacknowledged.
    #[error("connection timed out (no acknowledgment after retries)")]
    TimedOut,
    /// Nothing arrived for the idle timeout.
    #[error("connection idle timeout")]
    IdleTimeout,
    /// Aborted locally.
    #[error("connection aborted locally")]
    Aborted,
    /// The peer's node could not be resolved.
    #[error("node unreachable")]
    Unreachable,
}

impl CloseReason {
    fn of(error: Option<ConnError>, unreachable: bool) -> CloseReason {
        match error {
            None => CloseReason::Finished,
            Some(ConnError::Refused) => CloseReason::Refused,
            Some(ConnError::Reset) => CloseReason::Reset,
            Some(ConnError::TimedOut) => CloseReason::TimedOut,
            Some(ConnError::Idle) => CloseReason::IdleTimeout,
            Some(ConnError::Aborted) if unreachable => CloseReason::Unreachable,
            Some(ConnError::Aborted) => CloseReason::Aborted,
        }
    }
}

impl From<ConnError> for CloseReason {
    /// The reason for a connection that failed with `e` (an abort is a local one).
    fn from(e: ConnError) -> CloseReason {
        CloseReason::of(Some(e), false)
    }
}

/// Something for the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A connection to a listened port is established and now the caller's.
    Accepted {
        /// The connection.
        conn: ConnId,
        /// The listened port.
        port: u16,
        /// The remote end.
        remote: PilotAddr,
    },
    /// A dialed connection completed its handshake.
    Connected(ConnId),
    /// Bytes, or the end of the stream, can be read.
    Readable(ConnId),
    /// The send buffer has room again after a write was refused.
    Writable(ConnId),
    /// The connection ended (reported once). Bytes still unread can be read; then the ID is
    /// released.
    Closed {
        /// The connection.
        conn: ConnId,
        /// Why.
        reason: CloseReason,
    },
    /// A connection attempt to a port no listener holds, taken by the fallback listener
    /// ([`Node::listen_fallback`]). Nothing was answered yet: [`Node::accept_incoming`] sends
    /// the SYN-ACK, [`Node::refuse_incoming`] an RST; undecided, it is refused with an RST after
    /// [`crate::stream::DEFERRED_TIMEOUT`].
    Incoming {
        /// Names the attempt in the decision.
        id: IncomingId,
        /// The local port the SYN asked for.
        port: u16,
        /// The remote end.
        remote: PilotAddr,
    },
    /// A datagram, to any port: the driver hands it to the port's owner if one listens
    /// (datagrams to ports no one listens on are also counted in
    /// [`NodeStats::datagrams_unlistened`]).
    Datagram {
        /// Sender.
        src: PilotAddr,
        /// The port it was sent to.
        dst_port: u16,
        /// Payload.
        data: Vec<u8>,
    },
    /// The registered key of this node is needed: answer with [`Node::key_found`] or
    /// [`Node::key_unavailable`]. Asked once until answered.
    NeedKey(u32),
    /// The endpoint of this node is needed: answer with [`Node::endpoint_resolved`] or
    /// [`Node::resolve_failed`]. Asked once until answered; asked again (at most every 10 s
    /// per peer) for a direct peer gone silent and for a relayed peer whose endpoint is
    /// unknown, so a refused look-up is retried.
    NeedEndpoint(u32),
    /// The beacon reported our public endpoint (reported when it changes).
    Discovered(SocketAddr),
    /// A new connection attempt from `peer` went over the SYN rate limits and was dropped.
    SynRateLimited {
        /// The tunnel-authenticated peer.
        peer: u32,
        /// The source the packet named.
        src: PilotAddr,
    },
    /// The trust gate refused `peer` on `port` (a SYN answered with RST, or a datagram
    /// dropped).
    Untrusted {
        /// The peer.
        peer: u32,
        /// The local port.
        port: u16,
    },
}

/// Why [`Node::listen`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ListenError {
    /// Another listener has the port.
    #[error("port {0} is already bound")]
    AlreadyBound(u16),
    /// Another owner has the fallback listener.
    #[error("the fallback listener is already taken")]
    FallbackTaken,
}

/// Why [`Node::dial`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DialError {
    /// We have no node ID yet.
    #[error("not registered yet")]
    NotRegistered,
    /// Every ephemeral port is in use.
    #[error("no free ephemeral port")]
    NoPorts,
    /// The connection limit is reached.
    #[error("too many connections ({0})")]
    TooMany(usize),
}

impl From<ConnectError> for DialError {
    fn from(e: ConnectError) -> Self {
        match e {
            ConnectError::NoPorts => DialError::NoPorts,
            ConnectError::TooMany(n) => DialError::TooMany(n),
        }
    }
}

/// Why [`Node::write`] took nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// No such connection (never opened, or released).
    #[error("unknown connection")]
    UnknownConnection,
    /// The send buffer is full (or the handshake is not done): wait for
    /// [`Event::Writable`] or [`Event::Connected`].
    #[error("send buffer full")]
    Blocked,
    /// The write side was shut down.
    #[error("connection shut down for writing")]
    Closed,
    /// The connection failed.
    #[error(transparent)]
    Failed(ConnError),
}

/// Why [`Node::read`] returned no bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// No such connection (never opened, or released).
    #[error("unknown connection")]
    UnknownConnection,
    /// Nothing to read yet: wait for [`Event::Readable`].
    #[error("no data available yet")]
    Blocked,
    /// The connection failed.
    #[error(transparent)]
    Failed(ConnError),
}

/// A call named a connection the node does not hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unknown connection")]
pub struct UnknownConnection;

/// Why [`Node::send_datagram`] refused a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DatagramError {
    /// Empty, or larger than a packet can carry.
    #[error("datagram of {0} bytes (1..={max} allowed)", max = MAX_PACKET - HEADER_LEN)]
    Size(usize),
    /// Too many datagrams wait to be sent.
    #[error("datagram queue full")]
    QueueFull,
}

/// Counters of a node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeStats {
    /// Datagrams handed to [`Node::handle_outside`].
    pub pkts_in: u64,
    /// Their bytes.
    pub bytes_in: u64,
    /// Datagrams written by [`Node::poll_transmit`].
    pub pkts_out: u64,
    /// Their bytes.
    pub bytes_out: u64,
    /// Connection attempts and datagrams refused by the trust gate.
    pub untrusted: u64,
    /// Connection attempts dropped by the SYN rate limits.
    pub syn_limited: u64,
    /// Datagrams received for a port nobody listens on (dropped).
    pub datagrams_unlistened: u64,
    /// Datagrams refused because the send queue was full.
    pub datagrams_refused: u64,
    /// Packets delivered to our own address.
    pub loopback: u64,
    /// Times a connection was looked at (events drained, release checked).
    pub serviced: u64,
}

/// What a status report shows of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnInfo {
    /// The connection.
    pub conn: ConnId,
    /// Local port.
    pub local_port: u16,
    /// Remote end.
    pub remote: PilotAddr,
    /// State.
    pub state: State,
    /// Counters.
    pub stats: ConnStats,
    /// Bytes written and not yet acknowledged.
    pub unacked: u64,
}

/// Settings of a node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Connection table settings (its `ephemeral_seed` is drawn from the node's generator).
    pub endpoint: EndpointConfig,
    /// Tunnel settings.
    pub tunnels: TunnelConfig,
    /// New inbound connections accepted per second from all peers together (0: no limit).
    pub syn_per_sec: u32,
    /// New inbound connections accepted per second from one peer (0: no limit).
    pub syn_per_peer_per_sec: u32,
}

/// The node's view of one connection in the table.
#[derive(Debug)]
struct Slot {
    id: ConnId,
    /// Handed to the caller (dialed, or accepted and reported).
    owned: bool,
    /// Dialed by us: `Connected` is reported.
    dialed: bool,
    /// On the service queue.
    queued: bool,
    /// On the list of closed connections waiting to be drained.
    closing: bool,
    /// `Closed` was reported.
    closed: bool,
    /// Aborted because the peer could not be resolved.
    unreachable: bool,
}

/// One node: see the module docs.
pub struct Node<R> {
    tunnels: Tunnels<R>,
    endpoint: Endpoint,
    gate: Option<Arc<dyn TrustGate>>,
    syn_limit: SynLimiter,
    /// Indexed by the connection table's handle.
    slots: Vec<Option<Slot>>,
    ids: HashMap<ConnId, ConnHandle>,
    next_id: u32,
    /// Connections to look at.
    pending: VecDeque<ConnHandle>,
    /// Closed connections waiting for their last packet to go before release.
    closing: Vec<ConnHandle>,
    /// Reused list of connections whose timers ran.
    scratch: Vec<ConnHandle>,
    events: VecDeque<Event>,
    datagrams: VecDeque<(PilotAddr, Option<u16>, Vec<u8>)>,
    looking_up: HashSet<u32>,
    resolving: HashSet<u32>,
    public_endpoint: Option<SocketAddr>,
    /// When the beacon last answered a discover.
    last_discovered: Option<Instant>,
    /// `poll_transmit` stopped early (loopback budget): wake again at once.
    yielded: bool,
    last_now: Option<Instant>,
    stats: NodeStats,
}

impl<R: RngCore + CryptoRng> std::fmt::Debug for Node<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("node", &self.tunnels.node())
            .field("conns", &self.ids.len())
            .finish_non_exhaustive()
    }
}

impl<R: RngCore + CryptoRng> Node<R> {
    /// A node `me` (0 until registered) with `identity`; `rng` supplies every key, session
    /// and the start of the ephemeral port range.
    pub fn new(me: u32, identity: SigningKey, config: NodeConfig, mut rng: R) -> Self {
        // A random start for ephemeral ports, so a restarted node does not reuse the 4-tuples
        // its peers may still hold from before.
        let endpoint = Endpoint::new(
            Addr::new(0, me),
            EndpointConfig {
                ephemeral_seed: rng.next_u64(),
                ..config.endpoint
            },
        );
        Node {
            tunnels: Tunnels::new(me, identity, config.tunnels, rng),
            endpoint,
            gate: None,
            syn_limit: SynLimiter::new(config.syn_per_sec, config.syn_per_peer_per_sec),
            slots: Vec::new(),
            ids: HashMap::new(),
            next_id: 1,
            pending: VecDeque::new(),
            closing: Vec::new(),
            scratch: Vec::new(),
            events: VecDeque::new(),
            datagrams: VecDeque::new(),
            looking_up: HashSet::new(),
            resolving: HashSet::new(),
            public_endpoint: None,
            last_discovered: None,
            yielded: false,
            last_now: None,
            stats: NodeStats::default(),
        }
    }

    // ---- identity and control side ------------------------------------------------------

    /// Our node ID (0 until registered).
    pub fn node(&self) -> u32 {
        self.tunnels.node()
    }

    /// Sets our node ID (after registration). Sessions name the old ID, so a change drops
    /// them; existing connections keep their addresses.
    pub fn set_node(&mut self, me: u32) {
        self.tunnels.set_node(me);
        self.endpoint.set_local(Addr::new(0, me));
    }

    /// Replaces our identity key (a rotation): every tunnel is re-keyed under it.
    pub fn set_identity(&mut self, now: Instant, identity: SigningKey) {
        self.tunnels.set_identity(now, identity);
    }

    /// Enforces `gate` on new inbound connections and datagrams from now on (`None`: let
    /// everyone in).
    pub fn set_gate(&mut self, gate: Option<Arc<dyn TrustGate>>) {
        self.gate = gate;
    }

    /// Queues a signed Discover to the beacon (sent by [`Node::poll_transmit`]).
    pub fn discover(&mut self, unix_ms: u64) {
        self.tunnels.discover(unix_ms);
    }

    /// The beacon, if any.
    pub fn beacon(&self) -> Option<SocketAddr> {
        self.tunnels.beacon()
    }

    /// Our public endpoint as the beacon last reported it.
    pub fn public_endpoint(&self) -> Option<SocketAddr> {
        self.public_endpoint
    }

    /// Whether a direct peer we have a session with stopped answering since the last call
    /// (see [`Tunnels::take_unanswered`]): our own mapping may have moved, and a discover
    /// shows it.
    pub fn take_peers_unanswered(&mut self) -> bool {
        self.tunnels.take_unanswered()
    }

    /// When the beacon last answered a discover (any answer, changed endpoint or not).
    pub fn last_discovered(&self) -> Option<Instant> {
        self.last_discovered
    }

    /// The registry's answer to [`Event::NeedKey`].
    pub fn key_found(&mut self, now: Instant, node: u32, key: VerifyingKey) {
        self.looking_up.remove(&node);
        self.tunnels.set_key(now, node, key);
    }

    /// The registry has no (valid) key for `node`.
    pub fn key_unavailable(&mut self, node: u32) {
        self.looking_up.remove(&node);
        self.tunnels.key_unavailable(node);
    }

    /// The registry's answer to [`Event::NeedEndpoint`]: starts the key exchange.
    pub fn endpoint_resolved(&mut self, now: Instant, node: u32, endpoint: SocketAddr) {
        self.resolving.remove(&node);
        self.tunnels.set_endpoint(now, node, endpoint);
    }

    /// `node` cannot be resolved. When nothing else reaches it (no session, no endpoint:
    /// the tunnel forgets it), dials to it that are not yet connected end with
    /// [`CloseReason::Unreachable`] and this returns `true`. A peer still reached otherwise
    /// (a session through the relay, an endpoint it was heard from) keeps its dials and its
    /// entry, whose endpoint is looked up again later (the registry may not allow the
    /// look-up yet): this returns `false`. Costs a pass over the connections when dials end
    /// (rare).
    pub fn resolve_failed(&mut self, now: Instant, node: u32) -> bool {
        self.resolving.remove(&node);
        if !self.tunnels.remove_if_unknown(node) {
            return false;
        }
        let dials: Vec<ConnHandle> = self
            .ids
            .values()
            .copied()
            .filter(|&h| {
                self.endpoint
                    .connection(h)
                    .is_some_and(|c| c.remote().addr.node == node && c.state() == State::SynSent)
            })
            .collect();
        for h in dials {
            if let Some(Some(s)) = self.slots.get_mut(h.0) {
                s.unreachable = true;
            }
            if let Some(mut c) = self.endpoint.connection(h) {
                c.abort(now);
            }
            self.touch(h);
        }
        true
    }

    /// Forgets everything about `node`'s tunnel (its trust was revoked).
    pub fn forget_peer(&mut self, node: u32) {
        self.tunnels.remove(node);
    }

    /// Trust with `node` ended (either side revoked): the peer may have dropped its keys for
    /// us (a v1 daemon does), so the next packets to it go out behind our PILA until it
    /// answers (see [`Tunnels::rekey`]). The session is kept: open streams go on, and the
    /// peer's new streams still reach the gate at once.
    pub fn rekey_peer(&mut self, node: u32) {
        self.tunnels.rekey(node);
    }

    /// Whether packets to `node` still go out behind our PILA (see [`Node::rekey_peer`]).
    pub fn rekey_pending(&self, node: u32) -> bool {
        self.tunnels.rekey_pending(node)
    }

    // ---- applications ---------------------------------------------------------------------

    /// Listens on `port` for connections and datagrams.
    pub fn listen(&mut self, port: u16, mode: ListenMode) -> Result<(), ListenError> {
        match mode {
            ListenMode::Accept => self.endpoint.listen(port, None).map_err(
                |crate::stream::ListenError::AlreadyBound(p)| ListenError::AlreadyBound(p),
            ),
        }
    }

    /// Takes SYNs to every port no listener holds (an ordinary listener always wins). Each is
    /// reported as [`Event::Incoming`] and answered only when the owner decides; datagrams to
    /// such ports are still dropped and counted. One fallback at a time.
    pub fn listen_fallback(&mut self) -> Result<(), ListenError> {
        self.endpoint
            .enable_fallback()
            .map_err(|_| ListenError::FallbackTaken)
    }

    /// Stops the fallback listener; attempts still undecided are refused with an RST.
    pub fn unlisten_fallback(&mut self) {
        self.endpoint.disable_fallback();
    }

    /// Accepts an attempt reported by [`Event::Incoming`]: its SYN-ACK goes out with the next
    /// [`Node::poll_transmit`], and [`Event::Connected`] follows once the handshake completes.
    /// The connection is the caller's from now on (it may write at once: the bytes wait for
    /// the handshake).
    pub fn accept_incoming(
        &mut self,
        now: Instant,
        id: IncomingId,
    ) -> Result<ConnId, IncomingError> {
        let h = self.endpoint.accept_deferred(now, id)?;
        let conn = self.insert_slot(h, true);
        self.touch(h);
        Ok(conn)
    }

    /// Refuses an attempt reported by [`Event::Incoming`]: the peer gets an RST, as from a
    /// port no one listens on.
    pub fn refuse_incoming(&mut self, id: IncomingId) -> Result<(), IncomingError> {
        self.endpoint.refuse_deferred(id)
    }

    /// Stops listening on `port`; connections not yet reported are reset.
    pub fn unlisten(&mut self, now: Instant, port: u16) {
        self.endpoint.unlisten(now, port);
    }

    /// Whether something listens on `port`.
    pub fn is_listening(&self, port: u16) -> bool {
        self.endpoint.is_listening(port)
    }

    /// Opens a connection to `dst`; [`Event::Connected`] or [`Event::Closed`] follows.
    pub fn dial(&mut self, now: Instant, dst: PilotAddr) -> Result<ConnId, DialError> {
        if self.node() == 0 {
            return Err(DialError::NotRegistered);
        }
        let h = self.endpoint.connect(now, dst)?;
        let id = self.insert_slot(h, true);
        self.touch(h);
        Ok(id)
    }

    /// Queues bytes on `conn`; returns how many were taken.
    pub fn write(&mut self, conn: ConnId, data: &[u8]) -> Result<usize, WriteError> {
        let h = *self.ids.get(&conn).ok_or(WriteError::UnknownConnection)?;
        let r = {
            let mut c = self
                .endpoint
                .connection(h)
                .ok_or(WriteError::UnknownConnection)?;
            c.write(data)
        };
        r.map_err(|e| match e {
            crate::stream::WriteError::Blocked => WriteError::Blocked,
            crate::stream::WriteError::Closed => WriteError::Closed,
            crate::stream::WriteError::Failed(e) => WriteError::Failed(e),
        })
    }

    /// Reads in-order bytes of `conn` into `buf`. `Ok(0)` for a non-empty `buf` means the
    /// peer finished sending.
    pub fn read(&mut self, conn: ConnId, buf: &mut [u8]) -> Result<usize, ReadError> {
        let h = *self.ids.get(&conn).ok_or(ReadError::UnknownConnection)?;
        let (r, done) = {
            let mut c = self
                .endpoint
                .connection(h)
                .ok_or(ReadError::UnknownConnection)?;
            let r = c.read(buf);
            (r, c.state() == State::Closed && c.readable() == 0)
        };
        if done {
            // Read out after the end: the release check runs.
            self.touch(h);
        }
        r.map_err(|e| match e {
            crate::stream::ReadError::Blocked => ReadError::Blocked,
            crate::stream::ReadError::Failed(e) => ReadError::Failed(e),
        })
    }

    /// Bytes `conn` has ready to read.
    pub fn readable(&mut self, conn: ConnId) -> Result<usize, UnknownConnection> {
        let h = *self.ids.get(&conn).ok_or(UnknownConnection)?;
        let c = self.endpoint.connection(h).ok_or(UnknownConnection)?;
        Ok(c.readable())
    }

    /// Finishes our direction of `conn`: FIN once everything written is delivered. Reading
    /// stays possible.
    pub fn shutdown(&mut self, now: Instant, conn: ConnId) -> Result<(), UnknownConnection> {
        self.with_conn(conn, |c| c.shutdown(now))
    }

    /// Shuts `conn` down and stops reading it (what arrives is discarded).
    pub fn close(&mut self, now: Instant, conn: ConnId) -> Result<(), UnknownConnection> {
        self.with_conn(conn, |c| c.close(now))
    }

    /// Resets `conn` now.
    pub fn abort(&mut self, now: Instant, conn: ConnId) -> Result<(), UnknownConnection> {
        self.with_conn(conn, |c| c.abort(now))
    }

    fn with_conn(
        &mut self,
        conn: ConnId,
        f: impl FnOnce(&mut crate::stream::Connection),
    ) -> Result<(), UnknownConnection> {
        let h = *self.ids.get(&conn).ok_or(UnknownConnection)?;
        {
            let mut c = self.endpoint.connection(h).ok_or(UnknownConnection)?;
            f(&mut c);
        }
        self.touch(h);
        Ok(())
    }

    /// Queues a datagram to `dst` from `src_port` (a fresh ephemeral port if `None`, as v1
    /// does).
    pub fn send_datagram(
        &mut self,
        dst: PilotAddr,
        src_port: Option<u16>,
        data: &[u8],
    ) -> Result<(), DatagramError> {
        if data.is_empty() || data.len() > MAX_PACKET - HEADER_LEN {
            return Err(DatagramError::Size(data.len()));
        }
        if self.datagrams.len() >= MAX_QUEUED_DATAGRAMS {
            self.stats.datagrams_refused += 1;
            return Err(DatagramError::QueueFull);
        }
        self.datagrams.push_back((dst, src_port, data.to_vec()));
        Ok(())
    }

    // ---- status ---------------------------------------------------------------------------

    /// Counters.
    pub fn stats(&self) -> NodeStats {
        self.stats
    }

    /// The tunnel layer's drop counters, by reason.
    pub fn tunnel_drops(&self) -> Vec<(Drop, u64)> {
        self.tunnels.drops()
    }

    /// The peers, for status output.
    pub fn peers(&self) -> Vec<PeerView> {
        self.tunnels.peers()
    }

    /// Connections the caller holds.
    pub fn connection_count(&self) -> usize {
        self.ids.len()
    }

    /// What a status report shows of `conn`.
    pub fn connection_info(&mut self, conn: ConnId) -> Option<ConnInfo> {
        let h = *self.ids.get(&conn)?;
        let c = self.endpoint.connection(h)?;
        Some(ConnInfo {
            conn,
            local_port: c.local().port,
            remote: c.remote(),
            state: c.state(),
            stats: c.stats(),
            unacked: c.unacked(),
        })
    }

    /// Every connection's status (for status reports: a pass over all of them).
    pub fn connection_infos(&mut self) -> Vec<ConnInfo> {
        let mut ids: Vec<ConnId> = self.ids.keys().copied().collect();
        ids.sort();
        ids.into_iter()
            .filter_map(|id| self.connection_info(id))
            .collect()
    }

    // ---- outside --------------------------------------------------------------------------

    /// Handles one datagram from `src` (opened in place in `buf`). Returns why the tunnel
    /// layer dropped it, if it did (already counted).
    pub fn handle_outside(
        &mut self,
        now: Instant,
        src: SocketAddr,
        buf: &mut [u8],
    ) -> Option<Drop> {
        self.last_now = Some(now);
        self.stats.pkts_in += 1;
        self.stats.bytes_in += buf.len() as u64;
        match self.tunnels.handle(now, src, buf) {
            Received::Packet { peer, range } => {
                if let Some(packet) = buf.get(range) {
                    self.on_packet(now, peer, packet, false);
                }
                None
            }
            Received::Discovered(ep) => {
                self.last_discovered = Some(now);
                if self.public_endpoint != Some(ep) {
                    // Not the first answer: we moved. Peers learn it from us at once.
                    if self.public_endpoint.is_some() {
                        self.tunnels.announce_moved();
                    }
                    self.public_endpoint = Some(ep);
                    self.events.push_back(Event::Discovered(ep));
                }
                None
            }
            Received::NeedKey(node) => {
                self.need_key(node);
                None
            }
            Received::Handled => None,
            Received::Dropped(why) => Some(why),
        }
    }

    /// Runs every timer due at `now`: connections whose timers ran are looked at, no others.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.last_now = Some(now);
        self.yielded = false;
        let mut ran = std::mem::take(&mut self.scratch);
        self.endpoint.handle_timeout_each(now, |h| ran.push(h));
        for h in ran.drain(..) {
            self.touch(h);
        }
        self.scratch = ran;
        if self.tunnels.poll_timeout().is_some_and(|t| t <= now) {
            self.tunnels.handle_timeout(now);
            while let Some(node) = self.tunnels.poll_resolve() {
                self.need_endpoint(node);
            }
        }
    }

    /// Whether [`Node::poll_event`] has something (an event, or a connection to look at).
    pub fn has_events(&self) -> bool {
        !self.events.is_empty() || !self.pending.is_empty()
    }

    /// The earliest time [`Node::handle_timeout`] has work (at once while events wait).
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        if self.yielded || self.has_events() {
            return self.last_now;
        }
        match (self.endpoint.poll_timeout(), self.tunnels.poll_timeout()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Writes the next datagram to send into `buf` (at least [`TRANSMIT_BUFFER`] bytes for
    /// packets of every size) and says where it is and where it goes. Consecutive data
    /// datagrams to one destination come out back to back, so the caller may batch them
    /// (GSO).
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<Transmit> {
        self.last_now = Some(now);
        let mut looped = 0;
        loop {
            if let Some(t) = self.tunnels.poll_transmit(now, buf) {
                return Some(self.count_out(t));
            }
            let end = buf.len().checked_sub(TAILROOM)?;
            let area = buf.get_mut(HEADROOM..end)?;
            let (n, dst) = if let Some((dst, src_port, data)) = self.datagrams.pop_front() {
                let Some(payload) = area.get_mut(HEADER_LEN..HEADER_LEN + data.len()) else {
                    continue;
                };
                payload.copy_from_slice(&data);
                match self.endpoint.emit_datagram(dst, src_port, data.len(), area) {
                    Ok(n) => (n, dst),
                    Err(_) => continue,
                }
            } else if let Some(x) = self.endpoint.poll_transmit(now, area) {
                x
            } else {
                self.release_closing();
                return None;
            };
            let node = dst.addr.node;
            if self.is_me(node) {
                self.stats.loopback += 1;
                let me = self.node();
                if let Some(packet) = buf.get(HEADROOM..HEADROOM + n) {
                    self.on_packet(now, me, packet, true);
                }
                looped += 1;
                if looped == LOOPBACK_BUDGET {
                    // Enough for one call: the driver comes back at once (poll_timeout).
                    self.yielded = true;
                    return None;
                }
                continue;
            }
            match self.tunnels.seal(now, node, buf, n) {
                Sent::Now { dst, range } => {
                    return Some(self.count_out(Transmit {
                        dst,
                        offset: range.0,
                        len: range.1 - range.0,
                    }))
                }
                Sent::NeedEndpoint => {
                    self.need_endpoint(node);
                    if !self.tunnels.has_key(node) {
                        self.need_key(node);
                    }
                }
                Sent::Queued => {
                    if !self.tunnels.has_key(node) {
                        self.need_key(node);
                    }
                }
                Sent::Dropped => {}
            }
        }
    }

    fn count_out(&mut self, t: Transmit) -> Transmit {
        self.stats.pkts_out += 1;
        self.stats.bytes_out += t.len as u64;
        t
    }

    /// The next event: connection events first come from the connections touched since the
    /// last call.
    pub fn poll_event(&mut self) -> Option<Event> {
        loop {
            if let Some(e) = self.events.pop_front() {
                return Some(e);
            }
            let h = self.pending.pop_front()?;
            self.service(h);
        }
    }

    // ---- inside the node ------------------------------------------------------------------

    fn is_me(&self, node: u32) -> bool {
        node != 0 && node == self.node()
    }

    fn need_key(&mut self, node: u32) {
        if self.looking_up.insert(node) {
            self.events.push_back(Event::NeedKey(node));
        }
    }

    fn need_endpoint(&mut self, node: u32) {
        if self.resolving.insert(node) {
            self.events.push_back(Event::NeedEndpoint(node));
        }
    }

    /// One packet from `peer` (authenticated by the tunnel, or ourselves when `local`).
    fn on_packet(&mut self, now: Instant, peer: u32, packet: &[u8], local: bool) {
        if !local && (self.syn_limited(now, peer, packet) || self.untrusted(peer, packet)) {
            return;
        }
        match self.endpoint.handle(now, packet) {
            Incoming::Stream(h) => self.touch(h),
            Incoming::Datagram(d) => {
                // Reported whether or not anything listens (v1 reports every datagram, for
                // example to webhooks); the driver hands it to the port's owner, if any.
                if !self.endpoint.is_listening(d.dst_port) {
                    self.stats.datagrams_unlistened += 1;
                }
                self.events.push_back(Event::Datagram {
                    src: d.src,
                    dst_port: d.dst_port,
                    data: d.data.to_vec(),
                });
            }
            Incoming::Dropped(DropReason::Deferred) => {
                while let Some(d) = self.endpoint.poll_deferred() {
                    self.events.push_back(Event::Incoming {
                        id: d.id,
                        port: d.local_port,
                        remote: d.remote,
                    });
                }
            }
            Incoming::Control(..) | Incoming::Refused | Incoming::Dropped(_) => {}
        }
    }

    /// Whether `packet` is a new connection attempt over the SYN rate limits; it is then
    /// dropped without an answer (v1 does the same) and counted.
    fn syn_limited(&mut self, now: Instant, peer: u32, packet: &[u8]) -> bool {
        let Ok(p) = Packet::new_checked(packet) else {
            return false;
        };
        let f = p.flags();
        let src = PilotAddr::new(p.src_addr(), p.src_port());
        let port = p.dst_port();
        // A SYN the fallback listener would take is a new attempt too, unless it repeats one
        // still waiting for its owner's decision.
        let taken = self.endpoint.is_listening(port)
            || self.endpoint.has_fallback() && !self.endpoint.is_deferred(port, src);
        let new_attempt = p.protocol() == Protocol::Stream
            && f.contains(Flags::SYN)
            && !f.contains(Flags::ACK)
            && !f.contains(Flags::RST)
            && taken
            && !self.endpoint.has_connection(port, src);
        // The limiter is keyed on the tunnel-authenticated peer, not the header's source.
        if !new_attempt || self.syn_limit.allow(now, peer) {
            return false;
        }
        self.stats.syn_limited += 1;
        self.events.push_back(Event::SynRateLimited { peer, src });
        true
    }

    /// Whether the trust gate refuses `packet` (a new connection or a datagram); a refused
    /// SYN is answered with RST at once, as for a closed port, so the peer's dial does not
    /// retry for half a minute.
    fn untrusted(&mut self, peer: u32, packet: &[u8]) -> bool {
        let Some(gate) = &self.gate else {
            return false;
        };
        let Ok(p) = Packet::new_checked(packet) else {
            return false;
        };
        let opens = match p.protocol() {
            Protocol::Stream => {
                let f = p.flags();
                f.contains(Flags::SYN) && !f.contains(Flags::ACK)
            }
            Protocol::Datagram => true,
            _ => false,
        };
        let port = p.dst_port();
        if !opens || self.is_me(peer) || gate.allows(peer, port) {
            return false;
        }
        self.stats.untrusted += 1;
        self.events.push_back(Event::Untrusted { peer, port });
        self.endpoint.refuse_syn(packet);
        true
    }

    fn alloc_id(&mut self) -> ConnId {
        loop {
            let id = ConnId(self.next_id);
            self.next_id = self.next_id.wrapping_add(1).max(1);
            if !self.ids.contains_key(&id) {
                return id;
            }
        }
    }

    fn insert_slot(&mut self, h: ConnHandle, dialed: bool) -> ConnId {
        let id = self.alloc_id();
        if self.slots.len() <= h.0 {
            self.slots.resize_with(h.0 + 1, || None);
        }
        self.slots[h.0] = Some(Slot {
            id,
            owned: dialed,
            dialed,
            queued: false,
            closing: false,
            closed: false,
            unreachable: false,
        });
        if dialed {
            self.ids.insert(id, h);
        }
        id
    }

    /// Queues `h` to be looked at; a handle the node has not seen is a new passive
    /// connection.
    fn touch(&mut self, h: ConnHandle) {
        if !matches!(self.slots.get(h.0), Some(Some(_))) {
            self.insert_slot(h, false);
        }
        if let Some(Some(s)) = self.slots.get_mut(h.0) {
            if !s.queued {
                s.queued = true;
                self.pending.push_back(h);
            }
        }
    }

    /// Looks at one touched connection: reports what happened to it, hands newly
    /// established passive connections to their listener's owner, and releases it once it is
    /// closed, reported and read out.
    fn service(&mut self, h: ConnHandle) {
        self.stats.serviced += 1;
        let Some(Some(slot)) = self.slots.get_mut(h.0) else {
            return;
        };
        slot.queued = false;
        let (owned, id) = (slot.owned, slot.id);
        let Some(conn) = self.endpoint.connection(h) else {
            self.forget_slot(h);
            return;
        };
        if !owned {
            let state = conn.state();
            let port = conn.local().port;
            drop(conn);
            if state == State::Closed {
                self.release_if_drained(h);
            } else if state != State::SynReceived {
                self.accept_ready(port);
            }
            return;
        }
        let mut conn = conn;
        let (mut connected, mut readable, mut writable, mut closed) = (false, false, false, false);
        while let Some(ev) = conn.poll_event() {
            match ev {
                ConnEvent::Connected => connected = true,
                ConnEvent::Readable => readable = true,
                ConnEvent::Writable => writable = true,
                ConnEvent::Closed => closed = true,
            }
        }
        let error = conn.error();
        let state = conn.state();
        drop(conn);
        let Some(Some(slot)) = self.slots.get_mut(h.0) else {
            return;
        };
        if connected && slot.dialed {
            self.events.push_back(Event::Connected(id));
        }
        if writable {
            self.events.push_back(Event::Writable(id));
        }
        if readable {
            self.events.push_back(Event::Readable(id));
        }
        if (closed || state == State::Closed) && !slot.closed {
            // Reported now, released at the earliest on a later look: the caller handles this
            // and the events before it (and reads the end or the error) with the ID valid.
            slot.closed = true;
            let reason = CloseReason::of(error, slot.unreachable);
            self.events.push_back(Event::Closed { conn: id, reason });
            if !slot.closing {
                slot.closing = true;
                self.closing.push(h);
            }
        } else if slot.closed {
            self.release_if_drained(h);
        }
    }

    /// Reports every established connection waiting on `port`'s accept queue.
    fn accept_ready(&mut self, port: u16) {
        while let Some(a) = self.endpoint.accept(port) {
            let remote = match self.endpoint.connection(a) {
                Some(c) => c.remote(),
                None => continue,
            };
            if !matches!(self.slots.get(a.0), Some(Some(_))) {
                self.insert_slot(a, false);
            }
            let Some(Some(s)) = self.slots.get_mut(a.0) else {
                continue;
            };
            s.owned = true;
            let conn = s.id;
            self.ids.insert(conn, a);
            self.events
                .push_back(Event::Accepted { conn, port, remote });
            // Data or the end may have come with the handshake: look at it again.
            self.touch(a);
        }
    }

    /// Releases a closed connection whose last packet went and whose bytes were read (or
    /// that failed, or that no one owns). One whose last packet waits goes on the closing
    /// list, looked at again after the next transmission round; one with bytes unread waits
    /// for the read that empties it (which touches it).
    fn release_if_drained(&mut self, h: ConnHandle) {
        let Some(Some(slot)) = self.slots.get(h.0) else {
            return;
        };
        let (owned, closing) = (slot.owned, slot.closing);
        let (drained, unread) = match self.endpoint.connection(h) {
            None => (true, false),
            Some(c) => (
                c.is_drained(),
                owned && c.readable() > 0 && c.error().is_none(),
            ),
        };
        if drained && !unread {
            self.endpoint.release(h);
            self.forget_slot(h);
        } else if !drained && !closing {
            if let Some(Some(slot)) = self.slots.get_mut(h.0) {
                slot.closing = true;
            }
            self.closing.push(h);
        }
    }

    /// After a transmission round: closed connections whose last packet went are looked at.
    fn release_closing(&mut self) {
        if self.closing.is_empty() {
            return;
        }
        for h in std::mem::take(&mut self.closing) {
            if let Some(Some(s)) = self.slots.get_mut(h.0) {
                s.closing = false;
                self.touch(h);
            }
        }
    }

    fn forget_slot(&mut self, h: ConnHandle) {
        if let Some(slot) = self.slots.get_mut(h.0).and_then(Option::take) {
            if self.ids.get(&slot.id) == Some(&h) {
                self.ids.remove(&slot.id);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)] // test code: a panic is a failed test
    use super::*;
    use rand_core::{CryptoRng, RngCore};

    /// A seeded stand-in for the system's generator: the same keys on every run.
    pub(crate) struct SeededRng(pub u64);

    impl RngCore for SeededRng {
        fn next_u32(&mut self) -> u32 {
            self.next_u64() as u32
        }
        fn next_u64(&mut self) -> u64 {
            // SplitMix64.
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        fn fill_bytes(&mut self, dest: &mut [u8]) {
            for c in dest.chunks_mut(8) {
                let v = self.next_u64().to_le_bytes();
                c.copy_from_slice(&v[..c.len()]);
            }
        }
        fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
            self.fill_bytes(dest);
            Ok(())
        }
    }

    impl CryptoRng for SeededRng {}

    fn node(me: u32) -> Node<SeededRng> {
        node_with(me, true)
    }

    fn node_with(me: u32, refuse_plaintext: bool) -> Node<SeededRng> {
        Node::new(
            me,
            SigningKey::from_bytes(&[me as u8; 32]),
            NodeConfig {
                endpoint: EndpointConfig::default(),
                tunnels: TunnelConfig {
                    refuse_plaintext,
                    beacon: None,
                },
                syn_per_sec: 0,
                syn_per_peer_per_sec: 0,
            },
            SeededRng(u64::from(me)),
        )
    }

    /// Runs a node with nothing outside (every datagram it would send is a failure) from
    /// `now` for `secs` of its timers. Returns the time reached.
    fn settle(
        n: &mut Node<SeededRng>,
        mut now: Instant,
        secs: u64,
        events: &mut Vec<Event>,
    ) -> Instant {
        let end = now + std::time::Duration::from_secs(secs);
        let mut buf = vec![0u8; TRANSMIT_BUFFER];
        loop {
            while let Some(e) = n.poll_event() {
                events.push(e);
            }
            if let Some(t) = n.poll_transmit(now, &mut buf) {
                panic!("nothing should leave the node: {t:?}");
            }
            if !n.events.is_empty() || !n.pending.is_empty() {
                continue;
            }
            match n.poll_timeout() {
                Some(t) if t <= end => {
                    now = now.max(t);
                    n.handle_timeout(now);
                }
                _ => return now,
            }
        }
    }

    #[test]
    fn own_address_streams_and_datagrams_stay_inside_and_pass_no_gate() {
        #[derive(Debug)]
        struct Nobody;
        impl TrustGate for Nobody {
            fn allows(&self, _: u32, _: u16) -> bool {
                false
            }
        }
        let mut n = node(5);
        n.set_gate(Some(Arc::new(Nobody)));
        let now = Instant::now();
        let mut ev = Vec::new();
        n.listen(80, ListenMode::Accept).unwrap();
        let c = n.dial(now, PilotAddr::new(Addr::new(0, 5), 80)).unwrap();
        n.send_datagram(PilotAddr::new(Addr::new(0, 5), 80), Some(9), b"dgram")
            .unwrap();
        settle(&mut n, now, 1, &mut ev);
        assert!(ev.contains(&Event::Connected(c)));
        let accepted = ev
            .iter()
            .find_map(|e| match e {
                Event::Accepted { conn, port: 80, .. } => Some(*conn),
                _ => None,
            })
            .unwrap();
        assert!(ev.contains(&Event::Datagram {
            src: PilotAddr::new(Addr::new(0, 5), 9),
            dst_port: 80,
            data: b"dgram".to_vec()
        }));
        assert_eq!(n.write(c, b"hello").unwrap(), 5);
        n.shutdown(now, c).unwrap();
        ev.clear();
        let now = settle(&mut n, now, 1, &mut ev);
        assert!(ev.contains(&Event::Readable(accepted)));
        let mut got = [0u8; 16];
        assert_eq!(n.read(accepted, &mut got).unwrap(), 5);
        assert_eq!(&got[..5], b"hello");
        assert_eq!(n.read(accepted, &mut got), Ok(0), "the end of the stream");
        n.shutdown(now, accepted).unwrap();
        ev.clear();
        // Both ends linger in TIME_WAIT (10 s), then close and, read out, are released.
        settle(&mut n, now, 30, &mut ev);
        assert!(ev.contains(&Event::Closed {
            conn: c,
            reason: CloseReason::Finished
        }));
        assert!(ev.contains(&Event::Closed {
            conn: accepted,
            reason: CloseReason::Finished
        }));
        assert_eq!(
            n.read(accepted, &mut got),
            Err(ReadError::UnknownConnection)
        );
        assert_eq!(n.connection_count(), 0);
        assert_eq!(n.stats().untrusted, 0);
        assert!(n.stats().loopback > 0);
        assert!(n.peers().is_empty(), "no tunnel to ourselves");
    }

    #[test]
    fn a_datagram_to_an_unlistened_port_is_counted_and_reported() {
        let mut n = node(6);
        let now = Instant::now();
        n.send_datagram(PilotAddr::new(Addr::new(0, 6), 81), None, b"x")
            .unwrap();
        let mut ev = Vec::new();
        settle(&mut n, now, 1, &mut ev);
        assert!(
            matches!(&ev[..], [Event::Datagram { dst_port: 81, data, .. }] if data == b"x"),
            "{ev:?}"
        );
        assert_eq!(n.stats().datagrams_unlistened, 1);
        assert_eq!(
            n.send_datagram(PilotAddr::new(Addr::new(0, 6), 81), None, b""),
            Err(DatagramError::Size(0))
        );
    }

    /// A stream SYN from node 1 (a v1 daemon with encryption off) to `to` port 7, as PILT.
    fn plaintext_syn(to: u32) -> Vec<u8> {
        use crate::wire::frame::MAGIC_PLAIN;
        use crate::wire::header::PacketRepr;
        let mut f = vec![0u8; 4 + HEADER_LEN];
        f[..4].copy_from_slice(&MAGIC_PLAIN);
        PacketRepr {
            flags: Flags::SYN,
            protocol: Protocol::Stream,
            src: PilotAddr::new(Addr::new(0, 1), 49152),
            dst: PilotAddr::new(Addr::new(0, to), 7),
            seq: 0,
            ack: 0,
            window: 512,
            payload_len: 0,
        }
        .emit(&mut f[4..])
        .unwrap();
        f
    }

    #[test]
    fn a_plaintext_peer_reaches_a_listener_only_with_plaintext_allowed() {
        use crate::wire::frame::Frame;
        let v1: SocketAddr = "127.0.0.1:4001".parse().unwrap();
        let now = Instant::now();
        let mut buf = vec![0u8; TRANSMIT_BUFFER];

        // Refused (the default): dropped and counted, nothing answered.
        let mut n = node_with(8, true);
        n.listen(7, ListenMode::Accept).unwrap();
        assert_eq!(
            n.handle_outside(now, v1, &mut plaintext_syn(8)),
            Some(Drop::Plaintext)
        );
        assert!(n.poll_transmit(now, &mut buf).is_none());
        assert_eq!(n.tunnel_drops(), vec![(Drop::Plaintext, 1)]);

        // Allowed: the SYN is answered with a SYN-ACK in plaintext, after our PILA.
        let mut n = node_with(8, false);
        n.listen(7, ListenMode::Accept).unwrap();
        assert_eq!(n.handle_outside(now, v1, &mut plaintext_syn(8)), None);
        let mut frames = Vec::new();
        while let Some(t) = n.poll_transmit(now, &mut buf) {
            assert_eq!(t.dst, v1);
            frames.push(buf[t.range()].to_vec());
        }
        assert!(
            matches!(Frame::parse(&frames[0]), Ok(Frame::AuthKeyExchange(_))),
            "{frames:?}"
        );
        let synack = frames
            .iter()
            .find_map(|f| match Frame::parse(f) {
                Ok(Frame::Plain(p)) => Some(Packet::new_checked(p.to_vec()).unwrap()),
                _ => None,
            })
            .expect("a PILT answer");
        assert_eq!(synack.flags(), Flags::SYN | Flags::ACK);
        assert_eq!(synack.ack(), 1);
        assert_eq!(synack.dst_addr().node, 1);
        assert!(n.tunnel_drops().is_empty());
        assert!(n.peers()[0].plaintext);
    }
}
