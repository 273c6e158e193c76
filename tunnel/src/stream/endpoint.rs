//! The connection table: routes each received packet to its connection in O(1), answers SYNs
//! for listening ports, keeps accept queues, enforces connection limits, and allocates
//! ephemeral ports.
//!
//! A connection is identified by (local port, remote address, remote port) (v1 wire §3.2).
//! The destination address of a packet is not checked: v1 peers may send an unexpected one
//! (v1 wire §11.5 item 3); binding the source to the authenticated tunnel peer is the
//! caller's job.
//!
//! Calling order: [`Endpoint::handle`] for each decrypted packet; the application works on
//! connections through [`Endpoint::connection`] and takes new ones with [`Endpoint::accept`];
//! then [`Endpoint::poll_transmit`] until `None` sends everything any connection (or the table
//! itself: RST, FIN|ACK) has ready, and at [`Endpoint::poll_timeout`] the driver calls
//! [`Endpoint::handle_timeout`]. Both cost O(log n) per connection that needs them, not a scan
//! of the table. [`Endpoint::release`] drops a connection once it is drained.
//!
//! # Fallback listening and deferred accept
//!
//! [`Endpoint::enable_fallback`] installs the one fallback listener: it takes SYNs to every
//! port that has no ordinary listener (an ordinary listener, bound before or after, always wins
//! for new SYNs). Such a SYN is *deferred*: nothing is sent and no connection exists yet;
//! [`Endpoint::handle`] returns `Incoming::Dropped(DropReason::Deferred)` and the request
//! waits, with its local port and remote address, for the caller:
//!
//! 1. after [`Endpoint::handle`], [`Endpoint::poll_deferred`] until `None` reports each new
//!    request once, as a [`Deferred`] carrying a [`DeferredId`];
//! 2. the caller decides, in any order and at any later time:
//!    [`Endpoint::accept_deferred`] creates the connection (its SYN-ACK goes out with the next
//!    [`Endpoint::poll_transmit`]; from then on it is an ordinary passive connection, driven
//!    through the returned handle and never put on an accept queue), or
//!    [`Endpoint::refuse_deferred`] answers the dialer with the RST a closed port gets;
//! 3. [`Endpoint::poll_transmit`] sends the RSTs and SYN-ACKs as usual, and
//!    [`Endpoint::poll_timeout`] includes the expiry of the oldest request.
//!
//! Invariants of the deferred table: at most [`MAX_DEFERRED`] requests (SYNs beyond are
//! dropped unanswered and counted, so the dialer retransmits); at most one request per
//! (local port, remote address, remote port); a retransmitted SYN for a request adds nothing
//! and sends nothing; an RST from the dialer withdraws its request silently; any other
//! segment for it is ignored; a request left undecided for [`DEFERRED_TIMEOUT`] is refused
//! with RST; ids are never reused, so deciding on a withdrawn or expired request is a typed
//! error ([`DeferredError::Unknown`]), never a decision about another one.
//! [`Endpoint::disable_fallback`] refuses every pending request.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use slab::Slab;

use super::{Config, Connection, Segment, State};
use crate::addr::{port, Addr, SocketAddr};
use crate::wire::header::{Flags, HeaderError, Packet, PacketRepr, Protocol, HEADER_LEN};

/// Table-wide settings.
#[derive(Debug, Clone, Copy)]
pub struct EndpointConfig {
    /// Settings for every connection.
    pub stream: Config,
    /// Most connections on one local port (v1: 1024).
    pub max_conns_per_port: usize,
    /// Most connections in total (v1: 4096).
    pub max_conns: usize,
    /// Accept-queue length of a listener when none is given (v1: 64).
    pub default_backlog: usize,
    /// Most endpoint replies (RSTs) queued; more are dropped.
    pub max_pending_replies: usize,
    /// Picks where ephemeral port allocation starts in the ephemeral range (offset `seed`
    /// modulo the range's size), so a restarted node does not reuse the 4-tuples of its
    /// previous run. The caller supplies it (random in the daemon); the default, 0, starts at
    /// [`port::EPHEMERAL_START`].
    pub ephemeral_seed: u64,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        EndpointConfig {
            stream: Config::default(),
            max_conns_per_port: 1024,
            max_conns: 4096,
            default_backlog: 64,
            max_pending_replies: 256,
            ephemeral_seed: 0,
        }
    }
}

/// A connection's key in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnHandle(pub usize);

/// Why `listen` failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ListenError {
    /// Another listener has the port.
    #[error("port {0} already bound")]
    AlreadyBound(u16),
}

/// Why `enable_fallback` failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FallbackError {
    /// The fallback listener is already enabled (there is at most one).
    #[error("a fallback listener is already enabled")]
    AlreadyEnabled,
}

/// Most connection requests taken by the fallback listener and not yet decided on; SYNs
/// beyond it are dropped unanswered ([`DropReason::DeferredFull`]) and counted.
pub const MAX_DEFERRED: usize = 1024;

/// How long a deferred request waits for the caller's decision before it is refused with
/// RST. A dialer (v1 or ours, without a beacon) sends its SYN at 0, 1, 3, 7, 15, 23 and 31 s
/// and gives up at about 39 s (v1 wire §3.1), so an undecided request is answered while the
/// dialer still listens: it fails at once as refused, instead of timing out or having its
/// next retransmission taken as a new request.
pub const DEFERRED_TIMEOUT: Duration = Duration::from_secs(30);

/// Names one deferred connection request. Ids are never reused within an [`Endpoint`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeferredId(pub u64);

/// A connection request taken by the fallback listener, waiting for
/// [`Endpoint::accept_deferred`] or [`Endpoint::refuse_deferred`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deferred {
    /// Names the request in the decision calls.
    pub id: DeferredId,
    /// The port the SYN was sent to (ours).
    pub local_port: u16,
    /// The dialer.
    pub remote: SocketAddr,
}

/// Why a decision on a deferred request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DeferredError {
    /// No such pending request: already decided, withdrawn by the dialer's RST, expired
    /// (refused after [`DEFERRED_TIMEOUT`]), refused by `disable_fallback`, or never issued.
    #[error("no pending connection request {0:?}")]
    Unknown(DeferredId),
    /// Accepting would exceed a connection limit (the per-port or the total one); the request
    /// was refused with RST.
    #[error("too many connections ({0}); the request was refused")]
    TooMany(usize),
    /// A connection with the same 4-tuple was opened locally meanwhile; the request was
    /// dropped without an answer (an RST would reach that connection's peer).
    #[error("a connection already holds this 4-tuple")]
    InUse,
}

/// Counters of the deferred table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeferredStats {
    /// Requests waiting for a decision now.
    pub pending: usize,
    /// Requests taken in total.
    pub deferred: u64,
    /// Requests accepted.
    pub accepted: u64,
    /// Requests refused by the caller (including by `disable_fallback` and limits at accept).
    pub refused: u64,
    /// Requests refused after [`DEFERRED_TIMEOUT`] without a decision.
    pub expired: u64,
    /// Requests withdrawn by the dialer's RST.
    pub withdrawn: u64,
    /// SYNs dropped because [`MAX_DEFERRED`] requests were pending.
    pub overflow: u64,
}

/// Why `connect` failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    /// Every ephemeral port is in use.
    #[error("no free ephemeral port")]
    NoPorts,
    /// The connection limit is reached.
    #[error("too many connections ({0})")]
    TooMany(usize),
}

/// A received datagram (protocol 0x02), borrowing the packet.
#[derive(Debug, Clone, Copy)]
pub struct Datagram<'a> {
    /// Sender.
    pub src: SocketAddr,
    /// Destination port.
    pub dst_port: u16,
    /// Payload.
    pub data: &'a [u8],
}

/// What [`Endpoint::handle`] did with a packet.
#[derive(Debug)]
pub enum Incoming<'a> {
    /// Routed to (or created) this connection: drive it.
    Stream(ConnHandle),
    /// A datagram for the application.
    Datagram(Datagram<'a>),
    /// A control packet (protocol 0x03) for the caller.
    Control(PacketRepr, &'a [u8]),
    /// A SYN was refused with RST (no listener, or a limit reached).
    Refused,
    /// Dropped: malformed, an unknown connection, or an unknown protocol.
    Dropped(DropReason),
}

/// Why a packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Header malformed or checksum wrong.
    Malformed(HeaderError),
    /// A stream segment for no known connection.
    UnknownConnection,
    /// A datagram with no payload (v1 drops those too).
    EmptyDatagram,
    /// A protocol byte this implementation does not know.
    UnknownProtocol(u8),
    /// A SYN for a listener whose accept queue is full; the peer retransmits it.
    AcceptQueueFull,
    /// Not dropped but held: a SYN the fallback listener took as a new deferred request
    /// (see [`Endpoint::poll_deferred`]), or any segment for a request still pending (a
    /// retransmitted SYN, an RST withdrawing it, or something ignored). Nothing was sent.
    Deferred,
    /// A SYN for the fallback listener while [`MAX_DEFERRED`] requests were pending; the peer
    /// retransmits it.
    DeferredFull,
}

type Tuple = (u16, Addr, u16);

#[derive(Debug)]
struct Listener {
    backlog: usize,
    /// Established, not yet accepted.
    ready: VecDeque<ConnHandle>,
    /// Handshake in progress.
    embryonic: usize,
}

#[derive(Debug)]
struct Entry {
    conn: Connection,
    tuple: Tuple,
    /// Passive connection not yet on its listener's ready queue.
    embryonic: bool,
    /// The one live timer-heap entry of this connection.
    scheduled: Option<Instant>,
    /// On the queue of connections that may have something to send.
    dirty: bool,
}

/// A SYN taken by the fallback listener, waiting for the caller's decision.
#[derive(Debug)]
struct PendingSyn {
    tuple: Tuple,
    /// The dialer's ISN and window, for the connection an acceptance creates.
    seq: u32,
    window: u16,
    expires: Instant,
}

/// Deferred connection requests: by id (ids grow with arrival, so this is arrival order and,
/// with one timeout for all, expiry order) and by 4-tuple.
#[derive(Debug, Default)]
struct DeferredTable {
    by_id: BTreeMap<u64, PendingSyn>,
    by_tuple: HashMap<Tuple, u64>,
    next_id: u64,
    /// The first id [`Endpoint::poll_deferred`] has not reported.
    next_report: u64,
    stats: DeferredStats,
}

impl DeferredTable {
    fn remove(&mut self, id: u64) -> Option<PendingSyn> {
        let p = self.by_id.remove(&id)?;
        self.by_tuple.remove(&p.tuple);
        Some(p)
    }
}

/// Which connections need the driver: a min-heap of timer deadlines (one live entry per
/// connection, stale ones skipped when popped) and a queue of connections that may have
/// something to send.
#[derive(Debug, Default)]
struct Schedule {
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    dirty: VecDeque<usize>,
}

impl Schedule {
    /// Keeps the connection's earliest deadline in the heap.
    fn reschedule(&mut self, key: usize, e: &mut Entry) {
        if let Some(d) = e.conn.poll_timeout() {
            if e.scheduled.is_none_or(|s| d < s) {
                self.timers.push(Reverse((d, key)));
                e.scheduled = Some(d);
            }
        }
    }

    /// After anything touched a connection: keep its earliest deadline in the heap and queue
    /// it for transmission.
    fn touched(&mut self, key: usize, e: &mut Entry) {
        self.reschedule(key, e);
        if !e.dirty {
            e.dirty = true;
            self.dirty.push_back(key);
        }
    }
}

/// A connection borrowed from the table. When it is dropped the table notes that the
/// connection may have new deadlines and something to send, so [`Endpoint::poll_timeout`] and
/// [`Endpoint::poll_transmit`] see every change made through it.
#[derive(Debug)]
pub struct ConnMut<'a> {
    key: usize,
    entry: &'a mut Entry,
    schedule: &'a mut Schedule,
}

impl core::ops::Deref for ConnMut<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.entry.conn
    }
}

impl core::ops::DerefMut for ConnMut<'_> {
    fn deref_mut(&mut self) -> &mut Connection {
        &mut self.entry.conn
    }
}

impl Drop for ConnMut<'_> {
    fn drop(&mut self) {
        self.schedule.touched(self.key, self.entry);
    }
}

/// The first ephemeral port for `seed`: `seed` modulo the range's size, from its start.
fn ephemeral_start(seed: u64) -> u16 {
    let span = u64::from(port::EPHEMERAL_END - port::EPHEMERAL_START) + 1;
    // The offset is below `span` (at most 2^16), so it fits and the sum stays in range.
    port::EPHEMERAL_START + (seed % span) as u16
}

/// The connection table of one node.
#[derive(Debug)]
pub struct Endpoint {
    local: Addr,
    config: EndpointConfig,
    conns: Slab<Entry>,
    by_tuple: HashMap<Tuple, ConnHandle>,
    listeners: HashMap<u16, Listener>,
    port_use: HashMap<u16, usize>,
    next_ephemeral: u16,
    replies: VecDeque<PacketRepr>,
    schedule: Schedule,
    /// SYNs to ports without a listener are deferred rather than refused.
    fallback: bool,
    deferred: DeferredTable,
}

impl Endpoint {
    /// An empty table for the node at `local`.
    pub fn new(local: Addr, config: EndpointConfig) -> Self {
        Endpoint {
            local,
            config,
            conns: Slab::new(),
            by_tuple: HashMap::new(),
            listeners: HashMap::new(),
            port_use: HashMap::new(),
            next_ephemeral: ephemeral_start(config.ephemeral_seed),
            replies: VecDeque::new(),
            schedule: Schedule::default(),
            fallback: false,
            deferred: DeferredTable::default(),
        }
    }

    /// Our address.
    pub fn local(&self) -> Addr {
        self.local
    }

    /// Changes our address (after a re-registration); existing connections keep theirs.
    pub fn set_local(&mut self, local: Addr) {
        self.local = local;
    }

    /// Number of connections in the table.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// True when the table is empty.
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// The connection behind a handle, borrowed through a guard that tells the table, when
    /// dropped, to look at the connection's timers and transmissions again.
    pub fn connection(&mut self, h: ConnHandle) -> Option<ConnMut<'_>> {
        let entry = self.conns.get_mut(h.0)?;
        Some(ConnMut {
            key: h.0,
            entry,
            schedule: &mut self.schedule,
        })
    }

    /// The earliest time [`Endpoint::handle_timeout`] must run: a connection's timer or the
    /// expiry of the oldest deferred request.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        let conns = self.poll_conn_timeout();
        let deferred = self.deferred.by_id.values().next().map(|p| p.expires);
        match (conns, deferred) {
            (Some(c), Some(d)) => Some(c.min(d)),
            (c, d) => c.or(d),
        }
    }

    /// The earliest deadline of a connection.
    fn poll_conn_timeout(&mut self) -> Option<Instant> {
        while let Some(&Reverse((t, key))) = self.schedule.timers.peek() {
            let Some(e) = self.conns.get_mut(key) else {
                self.schedule.timers.pop();
                continue;
            };
            if e.scheduled != Some(t) {
                // Stale: a newer, earlier entry superseded it.
                self.schedule.timers.pop();
                continue;
            }
            let current = e.conn.poll_timeout();
            if current == Some(t) {
                return Some(t);
            }
            // The deadline moved: replace the live entry.
            self.schedule.timers.pop();
            e.scheduled = None;
            if let Some(c) = current {
                self.schedule.timers.push(Reverse((c, key)));
                e.scheduled = Some(c);
            }
        }
        None
    }

    /// Runs the timers of every connection due at `now`, and refuses the deferred requests
    /// that waited [`DEFERRED_TIMEOUT`].
    pub fn handle_timeout(&mut self, now: Instant) {
        self.handle_timeout_each(now, |_| {});
    }

    /// Runs the timers due at `now`, like [`Endpoint::handle_timeout`] (undecided deferred
    /// requests past their deadline are refused), and names each connection whose timer ran,
    /// so the caller looks at those and no others.
    pub fn handle_timeout_each(&mut self, now: Instant, mut ran: impl FnMut(ConnHandle)) {
        while let Some((&id, p)) = self.deferred.by_id.iter().next() {
            if p.expires > now {
                break;
            }
            if let Some(p) = self.deferred.remove(id) {
                self.deferred.stats.expired += 1;
                self.refuse_pending(&p);
            }
        }
        while self.poll_conn_timeout().is_some_and(|t| t <= now) {
            let Some(Reverse((_, key))) = self.schedule.timers.pop() else {
                break;
            };
            if let Some(e) = self.conns.get_mut(key) {
                e.scheduled = None;
                e.conn.handle_timeout(now);
                self.schedule.touched(key, e);
                ran(ConnHandle(key));
            }
        }
    }

    /// Every handle in the table.
    pub fn handles(&self) -> impl Iterator<Item = ConnHandle> + '_ {
        self.conns.iter().map(|(k, _)| ConnHandle(k))
    }

    /// Starts listening on `port`, queueing at most `backlog` established connections
    /// (`None`: the configured default).
    pub fn listen(&mut self, port: u16, backlog: Option<usize>) -> Result<(), ListenError> {
        if self.listeners.contains_key(&port) {
            return Err(ListenError::AlreadyBound(port));
        }
        self.listeners.insert(
            port,
            Listener {
                backlog: backlog.unwrap_or(self.config.default_backlog).max(1),
                ready: VecDeque::new(),
                embryonic: 0,
            },
        );
        Ok(())
    }

    /// Stops listening; queued connections that were never accepted are reset.
    pub fn unlisten(&mut self, now: Instant, port: u16) {
        if let Some(l) = self.listeners.remove(&port) {
            for h in l.ready {
                if let Some(mut c) = self.connection(h) {
                    c.abort(now);
                }
            }
        }
    }

    /// True when something listens on `port`.
    pub fn is_listening(&self, port: u16) -> bool {
        self.listeners.contains_key(&port)
    }

    /// True when a connection holds local `port` with `remote` (a SYN for it is a
    /// retransmission or a restarted peer, not a new connection attempt).
    pub fn has_connection(&self, port: u16, remote: SocketAddr) -> bool {
        self.by_tuple
            .contains_key(&(port, remote.addr, remote.port))
    }

    /// Takes the next established connection of a listener.
    pub fn accept(&mut self, port: u16) -> Option<ConnHandle> {
        self.listeners.get_mut(&port)?.ready.pop_front()
    }

    /// Enables the fallback listener: from now on a SYN to a port with no ordinary listener is
    /// deferred for the caller's decision instead of refused (see the module docs).
    pub fn enable_fallback(&mut self) -> Result<(), FallbackError> {
        if self.fallback {
            return Err(FallbackError::AlreadyEnabled);
        }
        self.fallback = true;
        Ok(())
    }

    /// Disables the fallback listener; every pending deferred request is refused with RST.
    /// SYNs to ports without a listener are refused again. Does nothing when not enabled.
    pub fn disable_fallback(&mut self) {
        if !self.fallback {
            return;
        }
        self.fallback = false;
        while let Some((&id, _)) = self.deferred.by_id.iter().next() {
            if let Some(p) = self.deferred.remove(id) {
                self.deferred.stats.refused += 1;
                self.refuse_pending(&p);
            }
        }
    }

    /// True when the fallback listener is enabled.
    pub fn has_fallback(&self) -> bool {
        self.fallback
    }

    /// Reports the next deferred request not reported before, oldest first. Requests that
    /// were withdrawn or expired before being reported are skipped.
    pub fn poll_deferred(&mut self) -> Option<Deferred> {
        let (&id, p) = self
            .deferred
            .by_id
            .range(self.deferred.next_report..)
            .next()?;
        self.deferred.next_report = id + 1;
        let (local_port, addr, port) = p.tuple;
        Some(Deferred {
            id: DeferredId(id),
            local_port,
            remote: SocketAddr::new(addr, port),
        })
    }

    /// True when a deferred request from `remote` to local `port` is pending (a SYN for it is a
    /// retransmission).
    pub fn is_deferred(&self, port: u16, remote: SocketAddr) -> bool {
        self.deferred
            .by_tuple
            .contains_key(&(port, remote.addr, remote.port))
    }

    /// Accepts deferred request `id`: creates its connection, whose SYN-ACK goes out with the
    /// next [`Endpoint::poll_transmit`]. The connection then completes the handshake like any
    /// passive one ([`super::Event::Connected`]); it is driven through the returned handle and
    /// never appears on an accept queue. When a connection limit is reached the request is
    /// refused with RST instead.
    pub fn accept_deferred(
        &mut self,
        now: Instant,
        id: DeferredId,
    ) -> Result<ConnHandle, DeferredError> {
        let p = self
            .deferred
            .remove(id.0)
            .ok_or(DeferredError::Unknown(id))?;
        if self.by_tuple.contains_key(&p.tuple) {
            return Err(DeferredError::InUse);
        }
        if let Err(limit) = self.check_limits(p.tuple.0) {
            self.deferred.stats.refused += 1;
            self.refuse_pending(&p);
            return Err(DeferredError::TooMany(limit));
        }
        let (local_port, addr, port) = p.tuple;
        let syn = Segment {
            flags: Flags::SYN,
            seq: p.seq,
            ack: 0,
            window: p.window,
            payload: &[],
        };
        let local = SocketAddr::new(self.local, local_port);
        let remote = SocketAddr::new(addr, port);
        let conn = Connection::accept(now, self.config.stream, local, remote, &syn);
        self.deferred.stats.accepted += 1;
        Ok(self.insert(conn, p.tuple, false))
    }

    /// Refuses deferred request `id`: the dialer gets the RST a closed port gets.
    pub fn refuse_deferred(&mut self, id: DeferredId) -> Result<(), DeferredError> {
        let p = self
            .deferred
            .remove(id.0)
            .ok_or(DeferredError::Unknown(id))?;
        self.deferred.stats.refused += 1;
        self.refuse_pending(&p);
        Ok(())
    }

    /// Counters of the deferred table.
    pub fn deferred_stats(&self) -> DeferredStats {
        DeferredStats {
            pending: self.deferred.by_id.len(),
            ..self.deferred.stats
        }
    }

    fn allocate_port(&mut self) -> Option<u16> {
        let span = u32::from(port::EPHEMERAL_END - port::EPHEMERAL_START) + 1;
        for _ in 0..span {
            let p = self.next_ephemeral;
            // Wraps within the ephemeral range, never into reserved ports.
            self.next_ephemeral = if p == port::EPHEMERAL_END {
                port::EPHEMERAL_START
            } else {
                p + 1
            };
            if !self.port_use.contains_key(&p) && !self.listeners.contains_key(&p) {
                return Some(p);
            }
        }
        None
    }

    /// Opens a connection to `remote` from a fresh ephemeral port.
    pub fn connect(
        &mut self,
        now: Instant,
        remote: SocketAddr,
    ) -> Result<ConnHandle, ConnectError> {
        if self.conns.len() >= self.config.max_conns {
            return Err(ConnectError::TooMany(self.config.max_conns));
        }
        let local_port = self.allocate_port().ok_or(ConnectError::NoPorts)?;
        let local = SocketAddr::new(self.local, local_port);
        let conn = Connection::connect(now, self.config.stream, local, remote);
        Ok(self.insert(conn, (local_port, remote.addr, remote.port), false))
    }

    fn insert(&mut self, conn: Connection, tuple: Tuple, embryonic: bool) -> ConnHandle {
        let key = self.conns.insert(Entry {
            conn,
            tuple,
            embryonic,
            scheduled: None,
            dirty: false,
        });
        if let Some(e) = self.conns.get_mut(key) {
            self.schedule.touched(key, e);
        }
        let h = ConnHandle(key);
        self.by_tuple.insert(tuple, h);
        *self.port_use.entry(tuple.0).or_insert(0) += 1;
        h
    }

    /// Removes a connection (normally once [`Connection::is_drained`]). Returns it.
    pub fn release(&mut self, h: ConnHandle) -> Option<Connection> {
        let e = self.conns.try_remove(h.0)?;
        if self.by_tuple.get(&e.tuple) == Some(&h) {
            self.by_tuple.remove(&e.tuple);
        }
        if let Some(n) = self.port_use.get_mut(&e.tuple.0) {
            *n -= 1;
            if *n == 0 {
                self.port_use.remove(&e.tuple.0);
            }
        }
        if let Some(l) = self.listeners.get_mut(&e.tuple.0) {
            if e.embryonic {
                l.embryonic = l.embryonic.saturating_sub(1);
            }
            l.ready.retain(|x| *x != h);
        }
        Some(e.conn)
    }

    /// Refuses a connection request the caller will not let in (a policy the table does not
    /// know, such as trust): queues the same RST a closed port gets. Anything but a bare SYN
    /// is ignored, so nothing else can be made to draw a reply.
    pub fn refuse_syn(&mut self, packet: &[u8]) {
        let Ok(repr) = Packet::new_checked(packet).and_then(|p| PacketRepr::parse(&p)) else {
            return;
        };
        if repr.protocol == Protocol::Stream
            && repr.flags.contains(Flags::SYN)
            && !repr.flags.intersects(Flags::ACK | Flags::RST)
        {
            self.refuse(&repr);
        }
    }

    fn refuse(&mut self, repr: &PacketRepr) {
        // v1 wire §3.3: RST with seq 0, ack 0, window 0.
        self.reply(repr, Flags::RST, 0);
    }

    /// Queues a header-only answer to `repr` (bounded; beyond the bound replies are dropped).
    fn reply(&mut self, repr: &PacketRepr, flags: Flags, ack: u32) {
        let limit = self.config.max_pending_replies;
        self.queue_reply(repr.dst.port, repr.src, flags, ack, limit);
    }

    /// Queues a header-only packet from our `local_port` to `remote`, unless `limit` replies
    /// are queued already.
    fn queue_reply(
        &mut self,
        local_port: u16,
        remote: SocketAddr,
        flags: Flags,
        ack: u32,
        limit: usize,
    ) {
        if self.replies.len() >= limit {
            return;
        }
        self.replies.push_back(PacketRepr {
            flags,
            protocol: Protocol::Stream,
            src: SocketAddr::new(self.local, local_port),
            dst: remote,
            seq: 0,
            ack,
            window: 0,
            payload_len: 0,
        });
    }

    /// Answers a deferred request with the RST a closed port gets (v1 wire §3.3: seq 0,
    /// ack 0, window 0). These replies have room beyond `max_pending_replies`: every request
    /// gets its answer, and the deferred table bounds how many there are.
    fn refuse_pending(&mut self, p: &PendingSyn) {
        let (local_port, addr, port) = p.tuple;
        let limit = self.config.max_pending_replies.saturating_add(MAX_DEFERRED);
        self.queue_reply(
            local_port,
            SocketAddr::new(addr, port),
            Flags::RST,
            0,
            limit,
        );
    }

    /// Writes the next packet of the table (its own replies, then the connections that may
    /// have something to send) into `buf`; returns its length and destination. `buf` must hold
    /// a header plus one segment.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<(usize, SocketAddr)> {
        if buf.len() < HEADER_LEN {
            return None;
        }
        if let Some(repr) = self.replies.pop_front() {
            return repr.emit(buf).ok().map(|n| (n, repr.dst));
        }
        while let Some(&key) = self.schedule.dirty.front() {
            let Some(e) = self.conns.get_mut(key) else {
                self.schedule.dirty.pop_front();
                continue;
            };
            if let Some(n) = e.conn.poll_transmit(now, buf) {
                return Some((n, e.conn.remote()));
            }
            // Nothing more to send: off the queue; sending may have armed timers.
            self.schedule.dirty.pop_front();
            e.dirty = false;
            self.schedule.reschedule(key, e);
        }
        None
    }

    /// Routes one decrypted packet (header and payload).
    pub fn handle<'a>(&mut self, now: Instant, packet: &'a [u8]) -> Incoming<'a> {
        let parsed =
            Packet::new_checked(packet).and_then(|p| PacketRepr::parse(&p).map(|r| (p, r)));
        let (p, repr) = match parsed {
            Ok(x) => x,
            Err(e) => return Incoming::Dropped(DropReason::Malformed(e)),
        };
        let payload = &packet[HEADER_LEN..p.total_len()];
        match repr.protocol {
            Protocol::Stream => self.handle_stream(now, &repr, payload),
            Protocol::Datagram => {
                if payload.is_empty() {
                    return Incoming::Dropped(DropReason::EmptyDatagram);
                }
                Incoming::Datagram(Datagram {
                    src: repr.src,
                    dst_port: repr.dst.port,
                    data: payload,
                })
            }
            Protocol::Control => Incoming::Control(repr, payload),
            Protocol::Unknown(v) => Incoming::Dropped(DropReason::UnknownProtocol(v)),
        }
    }

    fn handle_stream<'a>(
        &mut self,
        now: Instant,
        repr: &PacketRepr,
        payload: &'a [u8],
    ) -> Incoming<'a> {
        let tuple = (repr.dst.port, repr.src.addr, repr.src.port);
        let seg = Segment::new(repr, payload);
        if let Some(&h) = self.by_tuple.get(&tuple) {
            let superseded = self
                .conns
                .get(h.0)
                .is_some_and(|e| e.conn.syn_opens_new_connection(now, &seg));
            if !superseded {
                if let Some(e) = self.conns.get_mut(h.0) {
                    e.conn.handle_segment(now, &seg);
                    self.schedule.touched(h.0, e);
                    self.after_segment(now, h);
                }
                return Incoming::Stream(h);
            }
            self.supersede(now, h);
        }
        if let Some(&id) = self.deferred.by_tuple.get(&tuple) {
            self.deferred_segment(id, repr);
            return Incoming::Dropped(DropReason::Deferred);
        }
        if repr.flags == Flags::FIN {
            // A FIN for a connection we no longer hold: the peer missed our FIN|ACK. Answering
            // (FIN|ACK is never answered back) lets it finish instead of timing out.
            self.reply(repr, Flags::FIN | Flags::ACK, repr.seq.wrapping_add(1));
            return Incoming::Dropped(DropReason::UnknownConnection);
        }
        let is_syn = repr.flags.contains(Flags::SYN) && !repr.flags.contains(Flags::ACK);
        if !is_syn || repr.flags.contains(Flags::RST) {
            return Incoming::Dropped(DropReason::UnknownConnection);
        }
        let port = repr.dst.port;
        let Some(l) = self.listeners.get(&port) else {
            if self.fallback {
                return self.defer(now, tuple, repr);
            }
            self.refuse(repr);
            return Incoming::Refused;
        };
        if l.ready.len() >= l.backlog {
            // The application is behind: drop, and the peer retransmits its SYN (v1 wire
            // §3.1) until the queue has room. Handshakes in progress do not count, so a burst
            // of dials is not refused while the application accepts promptly.
            return Incoming::Dropped(DropReason::AcceptQueueFull);
        }
        if self.check_limits(port).is_err() {
            self.refuse(repr);
            return Incoming::Refused;
        }
        let local = SocketAddr::new(self.local, port);
        let conn = Connection::accept(now, self.config.stream, local, repr.src, &seg);
        let h = self.insert(conn, tuple, true);
        if let Some(l) = self.listeners.get_mut(&port) {
            l.embryonic += 1;
        }
        Incoming::Stream(h)
    }

    /// Takes a SYN for the fallback listener as a new deferred request.
    fn defer<'a>(&mut self, now: Instant, tuple: Tuple, repr: &PacketRepr) -> Incoming<'a> {
        if self.deferred.by_id.len() >= MAX_DEFERRED {
            // Like a full accept queue: silence, and the dialer retransmits.
            self.deferred.stats.overflow += 1;
            return Incoming::Dropped(DropReason::DeferredFull);
        }
        if self.check_limits(tuple.0).is_err() {
            // Accepting could not succeed; answer now as an ordinary listener would.
            self.refuse(repr);
            return Incoming::Refused;
        }
        let id = self.deferred.next_id;
        self.deferred.next_id += 1;
        self.deferred.by_id.insert(
            id,
            PendingSyn {
                tuple,
                seq: repr.seq,
                window: repr.window,
                expires: now + DEFERRED_TIMEOUT,
            },
        );
        self.deferred.by_tuple.insert(tuple, id);
        self.deferred.stats.deferred += 1;
        Incoming::Dropped(DropReason::Deferred)
    }

    /// A segment for the 4-tuple of pending request `id`. A retransmitted SYN refreshes the
    /// ISN and window an acceptance will use (a v1 dialer always repeats ISN 0) and sends
    /// nothing; an RST from the dialer withdraws the request; anything else is ignored: before
    /// our SYN-ACK, the dialer has nothing else to send.
    fn deferred_segment(&mut self, id: u64, repr: &PacketRepr) {
        let f = repr.flags;
        if f.contains(Flags::RST) {
            let Some(p) = self.deferred.by_id.get(&id) else {
                return;
            };
            // Acceptable like an RST in SYN_RECEIVED: its seq lies in our receive window,
            // which starts right after the dialer's ISN.
            let off = repr.seq.wrapping_sub(p.seq.wrapping_add(1));
            let window = u32::try_from(self.config.stream.recv_buffer).unwrap_or(u32::MAX);
            if off <= window.max(1) {
                self.deferred.remove(id);
                self.deferred.stats.withdrawn += 1;
            }
            return;
        }
        if f.contains(Flags::SYN) && !f.contains(Flags::ACK) {
            if let Some(p) = self.deferred.by_id.get_mut(&id) {
                p.seq = repr.seq;
                p.window = repr.window;
            }
        }
    }

    /// `Err(limit)` when one more connection on local `port` would exceed the per-port or the
    /// total connection limit.
    fn check_limits(&self, port: u16) -> Result<(), usize> {
        let on_port = self.port_use.get(&port).copied().unwrap_or(0);
        if on_port >= self.config.max_conns_per_port {
            return Err(self.config.max_conns_per_port);
        }
        if self.conns.len() >= self.config.max_conns {
            return Err(self.config.max_conns);
        }
        Ok(())
    }

    /// Ends connection `h` because its peer opened a new one on the same 4-tuple (see
    /// [`Connection::syn_opens_new_connection`]): the tuple is freed for the new connection.
    /// The old one stays in the table, closed, until released; if it was never accepted it is
    /// released at once, since no one else holds its handle.
    fn supersede(&mut self, now: Instant, h: ConnHandle) {
        let Some(e) = self.conns.get_mut(h.0) else {
            return;
        };
        e.conn.supersede(now);
        self.schedule.touched(h.0, e);
        let tuple = e.tuple;
        self.by_tuple.remove(&tuple);
        let queued = self
            .listeners
            .get(&tuple.0)
            .is_some_and(|l| l.ready.contains(&h));
        if queued {
            self.release(h);
        }
    }

    /// Moves a passive connection onto its listener's queue once established.
    fn after_segment(&mut self, now: Instant, h: ConnHandle) {
        let Some(e) = self.conns.get_mut(h.0) else {
            return;
        };
        if !e.embryonic || matches!(e.conn.state(), State::SynReceived) {
            return;
        }
        e.embryonic = false;
        let port = e.tuple.0;
        let established = e.conn.state() != State::Closed;
        match self.listeners.get_mut(&port) {
            Some(l) => {
                l.embryonic = l.embryonic.saturating_sub(1);
                if established {
                    l.ready.push_back(h);
                }
            }
            None => {
                e.conn.abort(now);
                self.schedule.touched(h.0, e);
            }
        }
    }

    /// Builds a datagram whose payload (`len` bytes) the caller placed at
    /// `buf[HEADER_LEN..]`. Without `src_port`, a fresh ephemeral port is used, as v1 does.
    pub fn emit_datagram(
        &mut self,
        dst: SocketAddr,
        src_port: Option<u16>,
        len: usize,
        buf: &mut [u8],
    ) -> Result<usize, HeaderError> {
        let src_port = match src_port {
            Some(p) => p,
            None => self.allocate_port().unwrap_or(port::EPHEMERAL_START),
        };
        let payload_len = u16::try_from(len).map_err(|_| HeaderError::PayloadTooLong(len))?;
        PacketRepr {
            flags: Flags::empty(),
            protocol: Protocol::Datagram,
            src: SocketAddr::new(self.local, src_port),
            dst,
            seq: 0,
            ack: 0,
            window: 0,
            payload_len,
        }
        .emit(buf)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a panic is a failed test

    use super::*;
    use std::time::Duration;

    const A: Addr = Addr::new(0, 1);
    const B: Addr = Addr::new(0, 2);

    /// A packet from A:`src_port` to B:80, as a v1 peer builds it.
    fn pkt(src_port: u16, flags: Flags, seq: u32, ack: u32, payload: &[u8]) -> Vec<u8> {
        pkt_to(src_port, 80, flags, seq, ack, payload)
    }

    /// A packet from A:`src_port` to B:`dst_port`, as a v1 peer builds it.
    fn pkt_to(
        src_port: u16,
        dst_port: u16,
        flags: Flags,
        seq: u32,
        ack: u32,
        payload: &[u8],
    ) -> Vec<u8> {
        let repr = PacketRepr {
            flags,
            protocol: Protocol::Stream,
            src: SocketAddr::new(A, src_port),
            dst: SocketAddr::new(B, dst_port),
            seq,
            ack,
            window: 512,
            payload_len: payload.len() as u16,
        };
        let mut buf = vec![0u8; HEADER_LEN + payload.len()];
        repr.emit_with_payload(&mut buf, payload).unwrap();
        buf
    }

    /// Everything the table sends now, parsed.
    fn sent(ep: &mut Endpoint, now: Instant) -> Vec<PacketRepr> {
        let mut buf = vec![0u8; HEADER_LEN + 65_536];
        let mut out = Vec::new();
        while let Some((n, _)) = ep.poll_transmit(now, &mut buf) {
            let p = Packet::new_checked(&buf[..n]).unwrap();
            out.push(PacketRepr::parse(&p).unwrap());
        }
        out
    }

    fn stream(r: Incoming<'_>) -> ConnHandle {
        match r {
            Incoming::Stream(h) => h,
            other => panic!("expected a stream, got {other:?}"),
        }
    }

    /// B, listening on 80, completes a v1 dial from A:`src_port`.
    fn handshake(ep: &mut Endpoint, now: Instant, src_port: u16) -> ConnHandle {
        let h = stream(ep.handle(now, &pkt(src_port, Flags::SYN, 0, 0, &[])));
        sent(ep, now);
        assert_eq!(
            stream(ep.handle(now, &pkt(src_port, Flags::ACK, 1, 1, &[]))),
            h
        );
        assert_eq!(ep.connection(h).unwrap().state(), State::Established);
        h
    }

    fn first_port(seed: u64) -> u16 {
        let config = EndpointConfig {
            ephemeral_seed: seed,
            ..EndpointConfig::default()
        };
        let mut ep = Endpoint::new(A, config);
        let h = ep.connect(Instant::now(), SocketAddr::new(B, 80)).unwrap();
        let port = ep.connection(h).unwrap().local().port;
        port
    }

    #[test]
    fn ephemeral_start_follows_the_seed_and_wraps_within_the_range() {
        assert_eq!(first_port(0), port::EPHEMERAL_START);
        assert_ne!(first_port(1), first_port(12_345));
        for seed in [1, 7, 12_345, 0xdead_beef, u64::MAX] {
            let p = first_port(seed);
            assert!((port::EPHEMERAL_START..=port::EPHEMERAL_END).contains(&p));
        }
        let span = u64::from(port::EPHEMERAL_END - port::EPHEMERAL_START) + 1;
        assert_eq!(first_port(span), port::EPHEMERAL_START);
        // Starting at the last port, the next allocation wraps to the first.
        let config = EndpointConfig {
            ephemeral_seed: span - 1,
            ..EndpointConfig::default()
        };
        let mut ep = Endpoint::new(A, config);
        let now = Instant::now();
        let a = ep.connect(now, SocketAddr::new(B, 80)).unwrap();
        let b = ep.connect(now, SocketAddr::new(B, 80)).unwrap();
        assert_eq!(ep.connection(a).unwrap().local().port, port::EPHEMERAL_END);
        assert_eq!(
            ep.connection(b).unwrap().local().port,
            port::EPHEMERAL_START
        );
    }

    #[test]
    fn syn_for_a_time_wait_tuple_opens_a_new_connection() {
        let now = Instant::now();
        let mut ep = Endpoint::new(B, EndpointConfig::default());
        ep.listen(80, None).unwrap();
        let old = handshake(&mut ep, now, 50_000);
        assert_eq!(ep.accept(80), Some(old));
        // We close first; the peer acknowledges and closes too.
        ep.connection(old).unwrap().shutdown(now);
        sent(&mut ep, now);
        ep.handle(now, &pkt(50_000, Flags::FIN | Flags::ACK, 1, 2, &[]));
        ep.handle(now, &pkt(50_000, Flags::FIN, 1, 2, &[]));
        sent(&mut ep, now);
        assert_eq!(ep.connection(old).unwrap().state(), State::TimeWait);

        let new = stream(ep.handle(now, &pkt(50_000, Flags::SYN, 0, 0, &[])));
        assert_ne!(new, old);
        let old_conn = ep.connection(old).unwrap();
        assert_eq!((old_conn.state(), old_conn.error()), (State::Closed, None));
        drop(old_conn);
        let out = sent(&mut ep, now);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].flags, Flags::SYN | Flags::ACK);
        assert_eq!(
            stream(ep.handle(now, &pkt(50_000, Flags::ACK, 1, 1, &[]))),
            new
        );
        assert_eq!(ep.accept(80), Some(new));
        assert_eq!(ep.connection(new).unwrap().state(), State::Established);
        // Releasing the old connection leaves the new one routable.
        assert!(ep.release(old).is_some());
        assert_eq!(
            stream(ep.handle(now, &pkt(50_000, Flags::ACK, 1, 1, b"x"))),
            new
        );
    }

    #[test]
    fn syn_from_a_restarted_peer_replaces_an_established_connection() {
        let now = Instant::now();
        let mut ep = Endpoint::new(B, EndpointConfig::default());
        ep.listen(80, None).unwrap();
        let old = handshake(&mut ep, now, 50_000);
        assert_eq!(ep.accept(80), Some(old));
        // A duplicate SYN right after the handshake is a retransmission: answered, same
        // connection.
        assert_eq!(
            stream(ep.handle(now, &pkt(50_000, Flags::SYN, 0, 0, &[]))),
            old
        );
        let out = sent(&mut ep, now);
        assert!(out.iter().all(|r| r.flags == Flags::SYN | Flags::ACK));
        assert_eq!(ep.connection(old).unwrap().state(), State::Established);

        ep.handle(now, &pkt(50_000, Flags::ACK, 1, 1, b"hello"));
        sent(&mut ep, now);
        // The peer restarted and dials again from the same port with ISN 0.
        let later = now + Duration::from_millis(1);
        let new = stream(ep.handle(later, &pkt(50_000, Flags::SYN, 0, 0, &[])));
        assert_ne!(new, old);
        assert_eq!(ep.connection(old).unwrap().state(), State::Closed);
        assert_eq!(
            ep.connection(old).unwrap().error(),
            Some(super::super::ConnError::Reset)
        );
        // No RST: it would refuse the peer's new dial. Only the new SYN-ACK goes out.
        let out = sent(&mut ep, later);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].flags, out[0].ack), (Flags::SYN | Flags::ACK, 1));
        ep.handle(later, &pkt(50_000, Flags::ACK, 1, 1, &[]));
        assert_eq!(ep.accept(80), Some(new));
    }

    #[test]
    fn a_burst_of_dials_beyond_the_backlog_is_established() {
        let now = Instant::now();
        let mut ep = Endpoint::new(B, EndpointConfig::default());
        ep.listen(80, Some(64)).unwrap();
        let handles: Vec<_> = (0..100u16)
            .map(|i| stream(ep.handle(now, &pkt(50_000 + i, Flags::SYN, 0, 0, &[]))))
            .collect();
        let out = sent(&mut ep, now);
        assert_eq!(out.len(), 100);
        assert!(out.iter().all(|r| r.flags == Flags::SYN | Flags::ACK));
        let mut accepted = Vec::new();
        for i in 0..100u16 {
            ep.handle(now, &pkt(50_000 + i, Flags::ACK, 1, 1, &[]));
            while let Some(h) = ep.accept(80) {
                accepted.push(h);
            }
        }
        assert_eq!(accepted, handles);
        for h in handles {
            assert_eq!(ep.connection(h).unwrap().state(), State::Established);
        }
    }

    #[test]
    fn a_full_accept_queue_drops_syns_without_rst() {
        let now = Instant::now();
        let mut ep = Endpoint::new(B, EndpointConfig::default());
        ep.listen(80, Some(2)).unwrap();
        handshake(&mut ep, now, 50_000);
        handshake(&mut ep, now, 50_001);
        sent(&mut ep, now);
        let syn = pkt(50_002, Flags::SYN, 0, 0, &[]);
        assert!(matches!(
            ep.handle(now, &syn),
            Incoming::Dropped(DropReason::AcceptQueueFull)
        ));
        assert!(sent(&mut ep, now).is_empty(), "dropped silently");
        // Once the application accepts, the retransmitted SYN gets through.
        assert!(ep.accept(80).is_some());
        let h = stream(ep.handle(now, &syn));
        let out = sent(&mut ep, now);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].flags, Flags::SYN | Flags::ACK);
        ep.handle(now, &pkt(50_002, Flags::ACK, 1, 1, &[]));
        let queued: Vec<_> = std::iter::from_fn(|| ep.accept(80)).collect();
        assert_eq!(queued.len(), 2);
        assert_eq!(queued[1], h);
    }

    fn deferred(r: Incoming<'_>) {
        assert!(
            matches!(r, Incoming::Dropped(DropReason::Deferred)),
            "expected a deferred SYN, got {r:?}"
        );
    }

    /// The RST v1 sends for a closed port (seq 0, ack 0, window 0), from B:`port` to
    /// A:`peer_port`.
    fn assert_v1_rst(r: &PacketRepr, port: u16, peer_port: u16) {
        assert_eq!(r.flags, Flags::RST);
        assert_eq!((r.seq, r.ack, r.window, r.payload_len), (0, 0, 0, 0));
        assert_eq!(r.src, SocketAddr::new(B, port));
        assert_eq!(r.dst, SocketAddr::new(A, peer_port));
    }

    fn fallback_endpoint() -> Endpoint {
        let mut ep = Endpoint::new(B, EndpointConfig::default());
        ep.enable_fallback().unwrap();
        ep
    }

    #[test]
    fn fallback_is_exclusive_and_off_by_default() {
        let mut ep = Endpoint::new(B, EndpointConfig::default());
        assert!(!ep.has_fallback());
        let now = Instant::now();
        assert!(matches!(
            ep.handle(now, &pkt(50_000, Flags::SYN, 0, 0, &[])),
            Incoming::Refused
        ));
        assert_eq!(ep.enable_fallback(), Ok(()));
        assert!(ep.has_fallback());
        assert_eq!(ep.enable_fallback(), Err(FallbackError::AlreadyEnabled));
        ep.disable_fallback();
        assert!(!ep.has_fallback());
        assert_eq!(ep.enable_fallback(), Ok(()));
    }

    #[test]
    fn fallback_defers_a_syn_and_sends_the_syn_ack_only_once_accepted() {
        let now = Instant::now();
        let mut ep = fallback_endpoint();
        deferred(ep.handle(now, &pkt_to(50_000, 7777, Flags::SYN, 0, 0, &[])));
        assert!(sent(&mut ep, now).is_empty(), "nothing before the decision");
        assert_eq!(ep.len(), 0, "no connection before the decision");
        assert!(ep.is_deferred(7777, SocketAddr::new(A, 50_000)));
        let d = ep.poll_deferred().unwrap();
        assert_eq!(d.local_port, 7777);
        assert_eq!(d.remote, SocketAddr::new(A, 50_000));
        assert_eq!(ep.poll_deferred(), None, "reported once");

        let later = now + Duration::from_millis(5);
        let h = ep.accept_deferred(later, d.id).unwrap();
        assert!(!ep.is_deferred(7777, SocketAddr::new(A, 50_000)));
        let out = sent(&mut ep, later);
        assert_eq!(out.len(), 1);
        let r = &out[0];
        assert_eq!((r.flags, r.seq, r.ack), (Flags::SYN | Flags::ACK, 0, 1));
        assert_eq!(r.src, SocketAddr::new(B, 7777));
        assert_eq!(r.dst, SocketAddr::new(A, 50_000));
        assert_eq!(
            stream(ep.handle(later, &pkt_to(50_000, 7777, Flags::ACK, 1, 1, b"ping"))),
            h
        );
        let mut c = ep.connection(h).unwrap();
        assert_eq!(c.state(), State::Established);
        let mut buf = [0u8; 8];
        assert_eq!(c.read(&mut buf), Ok(4));
        assert_eq!(&buf[..4], b"ping");
        assert_eq!(c.write(b"pong"), Ok(4));
        drop(c);
        let out = sent(&mut ep, later);
        assert!(out
            .iter()
            .any(|r| r.payload_len == 4 && r.seq == 1 && r.ack == 5));
        // Never on an accept queue: the caller holds the handle already.
        assert_eq!(ep.accept(7777), None);
        let stats = ep.deferred_stats();
        assert_eq!((stats.deferred, stats.accepted, stats.pending), (1, 1, 0));
    }

    #[test]
    fn an_ordinary_listener_wins_over_the_fallback() {
        let now = Instant::now();
        let mut ep = fallback_endpoint();
        ep.listen(80, None).unwrap();
        let h = stream(ep.handle(now, &pkt(50_000, Flags::SYN, 0, 0, &[])));
        let out = sent(&mut ep, now);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].flags, Flags::SYN | Flags::ACK);
        assert_eq!(ep.poll_deferred(), None);
        ep.handle(now, &pkt(50_000, Flags::ACK, 1, 1, &[]));
        assert_eq!(ep.accept(80), Some(h));
        // Other ports still go to the fallback.
        deferred(ep.handle(now, &pkt_to(50_001, 81, Flags::SYN, 0, 0, &[])));
        assert_eq!(ep.poll_deferred().map(|d| d.local_port), Some(81));
        // Once unbound, port 80 goes to the fallback; bound again, to its listener.
        ep.unlisten(now, 80);
        deferred(ep.handle(now, &pkt(50_002, Flags::SYN, 0, 0, &[])));
        assert_eq!(ep.poll_deferred().map(|d| d.local_port), Some(80));
        ep.listen(80, None).unwrap();
        stream(ep.handle(now, &pkt(50_003, Flags::SYN, 0, 0, &[])));
        assert_eq!(ep.poll_deferred(), None);
    }

    #[test]
    fn a_retransmitted_syn_while_pending_adds_nothing_and_sends_nothing() {
        let now = Instant::now();
        let mut ep = fallback_endpoint();
        let syn = pkt(50_000, Flags::SYN, 0, 0, &[]);
        deferred(ep.handle(now, &syn));
        let d = ep.poll_deferred().unwrap();
        for s in 1..=3 {
            deferred(ep.handle(now + Duration::from_secs(s), &syn));
            assert!(sent(&mut ep, now + Duration::from_secs(s)).is_empty());
        }
        // A stray ACK or FIN for the pending tuple is ignored too (no FIN|ACK either).
        deferred(ep.handle(now, &pkt(50_000, Flags::ACK, 1, 1, b"x")));
        deferred(ep.handle(now, &pkt(50_000, Flags::FIN, 1, 0, &[])));
        assert!(sent(&mut ep, now).is_empty());
        assert_eq!(ep.poll_deferred(), None);
        assert_eq!(ep.deferred_stats().pending, 1);
        assert_eq!(ep.deferred_stats().deferred, 1);
        // Retransmissions do not extend the decision time.
        assert_eq!(ep.poll_timeout(), Some(now + DEFERRED_TIMEOUT));
        // The stray ACK did not establish anything: accepting still sends the SYN-ACK.
        let h = ep.accept_deferred(now, d.id).unwrap();
        assert_eq!(ep.connection(h).unwrap().state(), State::SynReceived);
        let out = sent(&mut ep, now);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].flags, Flags::SYN | Flags::ACK);
        // After acceptance the SYN is the connection's: answered with the SYN-ACK again.
        assert_eq!(stream(ep.handle(now, &syn)), h);
        let out = sent(&mut ep, now);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].flags, Flags::SYN | Flags::ACK);
    }

    #[test]
    fn refusing_a_deferred_request_sends_the_closed_port_rst() {
        let now = Instant::now();
        let mut ep = fallback_endpoint();
        deferred(ep.handle(now, &pkt(50_000, Flags::SYN, 0, 0, &[])));
        let d = ep.poll_deferred().unwrap();
        assert_eq!(ep.refuse_deferred(d.id), Ok(()));
        let out = sent(&mut ep, now);
        assert_eq!(out.len(), 1);
        assert_v1_rst(&out[0], 80, 50_000);
        assert_eq!(ep.refuse_deferred(d.id), Err(DeferredError::Unknown(d.id)));
        assert_eq!(
            ep.accept_deferred(now, d.id),
            Err(DeferredError::Unknown(d.id))
        );
        assert_eq!(ep.len(), 0);
        assert_eq!(ep.deferred_stats().refused, 1);
        // The same dialer trying again is a new request with a new id.
        deferred(ep.handle(now, &pkt(50_000, Flags::SYN, 0, 0, &[])));
        let again = ep.poll_deferred().unwrap();
        assert_ne!(again.id, d.id);
    }

    #[test]
    fn an_undecided_request_is_refused_after_the_timeout() {
        let now = Instant::now();
        let mut ep = fallback_endpoint();
        deferred(ep.handle(now, &pkt(50_000, Flags::SYN, 0, 0, &[])));
        let second = now + Duration::from_secs(1);
        deferred(ep.handle(second, &pkt(50_001, Flags::SYN, 0, 0, &[])));
        let first = ep.poll_deferred().unwrap();
        assert_eq!(ep.poll_timeout(), Some(now + DEFERRED_TIMEOUT));
        ep.handle_timeout(now + DEFERRED_TIMEOUT - Duration::from_millis(1));
        assert!(sent(&mut ep, now).is_empty());
        assert_eq!(ep.deferred_stats().pending, 2);

        ep.handle_timeout(now + DEFERRED_TIMEOUT);
        let out = sent(&mut ep, now + DEFERRED_TIMEOUT);
        assert_eq!(out.len(), 1);
        assert_v1_rst(&out[0], 80, 50_000);
        assert_eq!(
            ep.accept_deferred(now + DEFERRED_TIMEOUT, first.id),
            Err(DeferredError::Unknown(first.id))
        );
        assert_eq!(ep.poll_timeout(), Some(second + DEFERRED_TIMEOUT));
        ep.handle_timeout(second + DEFERRED_TIMEOUT);
        let out = sent(&mut ep, second + DEFERRED_TIMEOUT);
        assert_eq!(out.len(), 1);
        assert_v1_rst(&out[0], 80, 50_001);
        // Expired before being reported: never reported.
        assert_eq!(ep.poll_deferred(), None);
        assert_eq!(ep.poll_timeout(), None);
        let stats = ep.deferred_stats();
        assert_eq!((stats.expired, stats.pending), (2, 0));
    }

    #[test]
    fn the_deferred_table_is_bounded() {
        let now = Instant::now();
        let mut ep = fallback_endpoint();
        for i in 0..MAX_DEFERRED as u16 {
            deferred(ep.handle(now, &pkt(10_000 + i, Flags::SYN, 0, 0, &[])));
        }
        let over = pkt(10_000 + MAX_DEFERRED as u16, Flags::SYN, 0, 0, &[]);
        assert!(matches!(
            ep.handle(now, &over),
            Incoming::Dropped(DropReason::DeferredFull)
        ));
        assert!(sent(&mut ep, now).is_empty(), "dropped silently");
        let stats = ep.deferred_stats();
        assert_eq!((stats.pending, stats.overflow), (MAX_DEFERRED, 1));
        // Room again after a decision: the retransmitted SYN is taken.
        let d = ep.poll_deferred().unwrap();
        ep.refuse_deferred(d.id).unwrap();
        deferred(ep.handle(now, &over));
        assert_eq!(ep.deferred_stats().pending, MAX_DEFERRED);
        // A retransmission of a pending SYN is no new request, even when full.
        deferred(ep.handle(now, &pkt(10_001, Flags::SYN, 0, 0, &[])));
        assert_eq!(ep.deferred_stats().overflow, 1);
    }

    #[test]
    fn an_rst_from_the_dialer_withdraws_its_request() {
        let now = Instant::now();
        let mut ep = fallback_endpoint();
        deferred(ep.handle(now, &pkt(50_000, Flags::SYN, 0, 0, &[])));
        let d = ep.poll_deferred().unwrap();
        // Out of the window: ignored.
        deferred(ep.handle(now, &pkt(50_000, Flags::RST, 0x8000_0000, 0, &[])));
        assert_eq!(ep.deferred_stats().pending, 1);
        // What a dialer whose SYNs timed out sends: seq ISN + 1.
        deferred(ep.handle(now, &pkt(50_000, Flags::RST, 1, 1, &[])));
        assert!(sent(&mut ep, now).is_empty(), "an RST is never answered");
        assert_eq!(ep.deferred_stats().withdrawn, 1);
        assert_eq!(
            ep.accept_deferred(now, d.id),
            Err(DeferredError::Unknown(d.id))
        );
        assert_eq!(ep.poll_timeout(), None);
    }

    #[test]
    fn disabling_the_fallback_refuses_pending_requests() {
        let now = Instant::now();
        let mut ep = fallback_endpoint();
        deferred(ep.handle(now, &pkt(50_000, Flags::SYN, 0, 0, &[])));
        deferred(ep.handle(now, &pkt(50_001, Flags::SYN, 0, 0, &[])));
        ep.disable_fallback();
        let out = sent(&mut ep, now);
        assert_eq!(out.len(), 2);
        assert_v1_rst(&out[0], 80, 50_000);
        assert_v1_rst(&out[1], 80, 50_001);
        assert_eq!(ep.poll_deferred(), None);
        assert!(matches!(
            ep.handle(now, &pkt(50_002, Flags::SYN, 0, 0, &[])),
            Incoming::Refused
        ));
    }

    #[test]
    fn accepting_beyond_the_connection_limit_refuses() {
        let now = Instant::now();
        let config = EndpointConfig {
            max_conns: 1,
            ..EndpointConfig::default()
        };
        let mut ep = Endpoint::new(B, config);
        ep.enable_fallback().unwrap();
        deferred(ep.handle(now, &pkt(50_000, Flags::SYN, 0, 0, &[])));
        deferred(ep.handle(now, &pkt(50_001, Flags::SYN, 0, 0, &[])));
        let a = ep.poll_deferred().unwrap();
        let b = ep.poll_deferred().unwrap();
        ep.accept_deferred(now, a.id).unwrap();
        assert_eq!(
            ep.accept_deferred(now, b.id),
            Err(DeferredError::TooMany(1))
        );
        let out = sent(&mut ep, now);
        assert_eq!(out.len(), 2);
        assert_v1_rst(&out[0], 80, 50_001);
        assert_eq!(out[1].flags, Flags::SYN | Flags::ACK);
        // While full, new SYNs are refused at once rather than deferred.
        assert!(matches!(
            ep.handle(now, &pkt(50_002, Flags::SYN, 0, 0, &[])),
            Incoming::Refused
        ));
    }
}
