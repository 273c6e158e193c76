//! The engine: one task owning the UDP socket's peer table ([`Tunnels`]) and the connection
//! table ([`Endpoint`]). Applications (the IPC server, the driver, later the TUN front end)
//! talk to it through an [`EngineHandle`]; the registry link runs beside it.
//!
//! ```text
//!  UDP socket --recv--> Tunnels::handle --packet--> Endpoint::handle --> connection events
//!      ^                                                                    |
//!      +--send-- Tunnels::seal (in place) <-- Endpoint::poll_transmit <------+
//!  EngineHandle --Cmd--> engine          engine --AppEvent--> the owner of each connection
//!  registry link <--LinkCmd/LinkEvent--> engine (lookups never block the packet path)
//! ```
//!
//! Flow control never lets one slow reader stall the others: data for a connection whose
//! owner is not reading stays in that connection's receive buffer, whose window then closes;
//! writes take credit from a per-connection semaphore that the engine refills as the send
//! buffer drains.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tunnel::stream::{
    ConnHandle, Endpoint, EndpointConfig, Event, Incoming, ReadError, State, WriteError,
};
use tunnel::{Addr, SocketAddr as PilotAddr};

use crate::events::Events;
use crate::registry_link::{LinkCmd, LinkEvent};
use crate::udp;
use rand_core::OsRng;
use tunnel::node::synlimit::SynLimiter;
use tunnel::node::tunnels::{Received, Sent, Tunnels, HEADROOM, TAILROOM};

/// A connection's ID as applications see it (v1 IPC `conn_id`).
pub type ConnId = u32;

/// Where a dial's outcome goes: the connection and its write credit, or why not.
pub type DialReply = oneshot::Sender<Result<(ConnId, Arc<Semaphore>), String>>;

/// Bytes of write credit per connection: what may wait in the engine beyond the send buffer.
pub const WRITE_CREDIT: usize = 1 << 20;
/// Largest chunk handed to an application per event.
pub const READ_CHUNK: usize = 64 * 1024;
/// Events queued per application before its connections stop being read.
pub const APP_QUEUE: usize = 256;
/// Events queued per connection that has a channel of its own.
pub const CONN_QUEUE: usize = 64;
/// Datagrams read from the socket per wakeup.
const RECV_BATCH: usize = 64;
/// Largest UDP datagram handled.
const MAX_DATAGRAM: usize = 65_535;

/// Something for the application that owns a port or connection.
#[derive(Debug)]
pub enum AppEvent {
    /// A connection arrived on a listened port.
    Accepted {
        /// The listened port.
        port: u16,
        /// The new connection.
        conn: ConnId,
        /// The remote end.
        remote: PilotAddr,
        /// Write credit of the connection.
        credit: Arc<Semaphore>,
        /// The connection's own events (data, close), when the port was listened with
        /// [`EngineHandle::listen_per_conn`]; otherwise they arrive with the port's.
        events: Option<mpsc::Receiver<AppEvent>>,
    },
    /// Bytes from a connection, in order.
    Data {
        /// The connection.
        conn: ConnId,
        /// The bytes.
        data: Vec<u8>,
    },
    /// The remote finished sending, or the connection ended; nothing more will arrive.
    Closed {
        /// The connection.
        conn: ConnId,
        /// Why, if it failed.
        error: Option<String>,
    },
    /// A datagram to a listened port.
    Datagram {
        /// Sender.
        src: PilotAddr,
        /// The port it was sent to.
        dst_port: u16,
        /// Payload.
        data: Vec<u8>,
    },
}

/// A request to the engine.
#[derive(Debug)]
pub enum Cmd {
    /// Listen on a port (stream connections and datagrams).
    Listen {
        /// The port.
        port: u16,
        /// Where accepted connections and datagrams go.
        events: mpsc::Sender<AppEvent>,
        /// Give each accepted connection a channel of its own for its data and close, so
        /// one slow connection never holds up the port's others.
        per_conn: bool,
        /// Result.
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Stop listening.
    Unlisten {
        /// The port.
        port: u16,
        /// The event channel the port was listened with: the port is unbound only if it is
        /// still that listener's (a late unbind never takes a port someone bound since).
        /// `None` unbinds whoever holds it.
        owner: Option<mpsc::WeakSender<AppEvent>>,
    },
    /// Open a connection.
    Dial {
        /// Destination.
        dst: PilotAddr,
        /// Where the connection's events go.
        events: mpsc::Sender<AppEvent>,
        /// The connection and its write credit once established, or why not.
        reply: DialReply,
    },
    /// Bytes to send; the caller took `data.len()` permits of the connection's credit.
    Write {
        /// The connection.
        conn: ConnId,
        /// The bytes.
        data: Vec<u8>,
    },
    /// Finish sending (FIN once everything is delivered).
    Close {
        /// The connection.
        conn: ConnId,
    },
    /// Reset a connection now.
    Abort {
        /// The connection.
        conn: ConnId,
    },
    /// Send a datagram.
    SendTo {
        /// Destination.
        dst: PilotAddr,
        /// Our source port (an ephemeral one if `None`).
        src_port: Option<u16>,
        /// Payload.
        data: Vec<u8>,
    },
    /// Status (v1 Info JSON).
    Info {
        /// The JSON.
        reply: oneshot::Sender<Value>,
    },
    /// Enforce this gate from now on (see [`Engine::set_gate`]).
    SetGate(Arc<dyn TrustGate>),
    /// Stop: FIN to every connection, then exit.
    Shutdown,
}

/// A listened port.
#[derive(Debug)]
struct Listener {
    events: mpsc::Sender<AppEvent>,
    per_conn: bool,
}

/// Emits a connection's end as a webhook event.
fn emit_closed(events: &Events, name: &'static str, conn: &tunnel::stream::Connection, id: ConnId) {
    let (local, remote) = (conn.local(), conn.remote());
    events.emit(
        name,
        json!({"remote_addr": remote.addr.to_string(), "remote_port": remote.port,
               "local_port": local.port, "conn_id": id}),
    );
}

/// How applications reach the engine. Cheap to clone.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Cmd>,
    node: watch::Receiver<u32>,
}

/// Decides whether a peer may open a connection to, or send a datagram to, a local port.
/// Called on the packet path for every new inbound connection and every datagram: answer
/// from memory.
pub trait TrustGate: std::fmt::Debug + Send + Sync + 'static {
    /// Whether `peer` may reach local `port`.
    fn allows(&self, peer: u32, port: u16) -> bool;
}

/// The engine is gone.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the daemon engine has stopped")]
pub struct Stopped;

impl EngineHandle {
    /// Our node ID (0 until registered).
    pub fn node(&self) -> u32 {
        *self.node.borrow()
    }

    /// The node ID as it changes (0 until registered).
    pub fn node_watch(&self) -> watch::Receiver<u32> {
        self.node.clone()
    }

    /// Waits until the node is registered and returns its ID.
    pub async fn registered(&self) -> Result<u32, Stopped> {
        let mut rx = self.node.clone();
        let n = rx.wait_for(|&n| n != 0).await.map_err(|_| Stopped)?;
        Ok(*n)
    }

    /// Sends a command.
    pub async fn send(&self, cmd: Cmd) -> Result<(), Stopped> {
        self.tx.send(cmd).await.map_err(|_| Stopped)
    }

    /// Listens on `port`: its connections' events and its datagrams all go to `events`.
    pub async fn listen(&self, port: u16, events: mpsc::Sender<AppEvent>) -> Result<(), String> {
        self.listen_with(port, events, false).await
    }

    /// Listens on `port`; each accepted connection gets its own event channel (in
    /// [`AppEvent::Accepted`]), and `events` carries new connections and datagrams.
    pub async fn listen_per_conn(
        &self,
        port: u16,
        events: mpsc::Sender<AppEvent>,
    ) -> Result<(), String> {
        self.listen_with(port, events, true).await
    }

    async fn listen_with(
        &self,
        port: u16,
        events: mpsc::Sender<AppEvent>,
        per_conn: bool,
    ) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        self.send(Cmd::Listen {
            port,
            events,
            per_conn,
            reply,
        })
        .await
        .map_err(|e| e.to_string())?;
        rx.await.map_err(|_| Stopped.to_string())?
    }

    /// Opens a connection.
    pub async fn dial(
        &self,
        dst: PilotAddr,
        events: mpsc::Sender<AppEvent>,
    ) -> Result<(ConnId, Arc<Semaphore>), String> {
        let (reply, rx) = oneshot::channel();
        self.send(Cmd::Dial { dst, events, reply })
            .await
            .map_err(|e| e.to_string())?;
        rx.await.map_err(|_| Stopped.to_string())?
    }

    /// Writes `data` to `conn`, waiting for credit; large writes go in pieces.
    pub async fn write(
        &self,
        conn: ConnId,
        credit: &Semaphore,
        mut data: &[u8],
    ) -> Result<(), Stopped> {
        while !data.is_empty() {
            let n = data.len().min(READ_CHUNK);
            let permits = credit.acquire_many(n as u32).await.map_err(|_| Stopped)?;
            permits.forget();
            self.send(Cmd::Write {
                conn,
                data: data[..n].to_vec(),
            })
            .await?;
            data = &data[n..];
        }
        Ok(())
    }

    /// Enforces `gate` on new inbound connections and datagrams from now on.
    pub async fn set_gate(&self, gate: Arc<dyn TrustGate>) -> Result<(), Stopped> {
        self.send(Cmd::SetGate(gate)).await
    }

    /// The v1 Info JSON.
    pub async fn info(&self) -> Result<Value, Stopped> {
        let (reply, rx) = oneshot::channel();
        self.send(Cmd::Info { reply }).await?;
        rx.await.map_err(|_| Stopped)
    }
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Connection table settings.
    pub endpoint: EndpointConfig,
    /// The beacon.
    pub beacon: Option<SocketAddr>,
    /// Publish this endpoint instead of discovering one.
    pub endpoint_override: Option<SocketAddr>,
    /// Use UDP segmentation offload (GSO/GRO) where the kernel offers it.
    pub offload: bool,
    /// Where node, connection and datagram events go (webhooks).
    pub events: Events,
    /// New inbound connections accepted per second from all peers together (0: no limit).
    pub syn_per_sec: u32,
    /// New inbound connections accepted per second from one peer (0: no limit).
    pub syn_per_peer_per_sec: u32,
}

struct Conn {
    handle: ConnHandle,
    events: mpsc::Sender<AppEvent>,
    credit: Arc<Semaphore>,
    pending: VecDeque<Vec<u8>>,
    pending_off: usize,
    dial: Option<DialReply>,
    close_requested: bool,
    finished: bool,
    remote: PilotAddr,
}

/// Counters of the engine.
#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    pkts_sent: u64,
    pkts_recv: u64,
    bytes_sent: u64,
    bytes_recv: u64,
    send_errors: u64,
    untrusted: u64,
    syn_limited: u64,
    loopback_dropped: u64,
    /// When the last dropped-datagram warning was logged, and drops since.
    drop_log: Option<Instant>,
    drops_unlogged: u64,
}

/// Packets to our own address waiting to be delivered; more are dropped (the transport
/// retransmits).
const MAX_LOOPBACK: usize = 4096;
/// Delivery rounds of packets to our own address per flush, so that a local transfer never
/// holds the engine from its other work.
const LOOPBACK_ROUNDS: usize = 64;

/// At most one dropped-datagram warning per this interval.
const DROP_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The running engine.
pub struct Engine {
    socket: UdpSocket,
    tunnels: Tunnels<OsRng>,
    endpoint: Endpoint,
    config: EngineConfig,
    cmds: mpsc::Receiver<Cmd>,
    link: mpsc::Sender<LinkCmd>,
    link_events: mpsc::Receiver<LinkEvent>,
    conns: HashMap<ConnId, Conn>,
    by_handle: HashMap<ConnHandle, ConnId>,
    listeners: HashMap<u16, Listener>,
    next_conn: ConnId,
    resolving: HashSet<u32>,
    looking_up: HashSet<u32>,
    blocked: HashSet<ConnId>,
    /// Packets to our own address, delivered without a tunnel.
    loopback: VecDeque<Vec<u8>>,
    counters: Counters,
    started: Instant,
    registered: Option<Value>,
    public_endpoint: Option<SocketAddr>,
    sendbuf: Vec<u8>,
    batch: udp::Batch,
    offload: bool,
    shutting_down: bool,
    node_tx: watch::Sender<u32>,
    gate: Option<Arc<dyn TrustGate>>,
    syn_limit: SynLimiter,
    syn_log: Option<Instant>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("conns", &self.conns.len())
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// An engine on `socket`. Returns it and the handle applications use.
    pub fn new(
        socket: UdpSocket,
        tunnels: Tunnels<OsRng>,
        config: EngineConfig,
        link: mpsc::Sender<LinkCmd>,
        link_events: mpsc::Receiver<LinkEvent>,
    ) -> (Engine, EngineHandle) {
        let (tx, cmds) = mpsc::channel(1024);
        let (node_tx, node_rx) = watch::channel(tunnels.node());
        let offload = config.offload;
        let syn_limit = SynLimiter::new(config.syn_per_sec, config.syn_per_peer_per_sec);
        // A random start for ephemeral ports, so a restarted node does not reuse the 4-tuples
        // its peers may still hold from before.
        let endpoint = Endpoint::new(
            Addr::new(0, tunnels.node()),
            EndpointConfig {
                ephemeral_seed: rand_core::RngCore::next_u64(&mut rand_core::OsRng),
                ..config.endpoint
            },
        );
        let engine = Engine {
            socket,
            tunnels,
            endpoint,
            config,
            cmds,
            link,
            link_events,
            conns: HashMap::new(),
            by_handle: HashMap::new(),
            listeners: HashMap::new(),
            next_conn: 1,
            resolving: HashSet::new(),
            looking_up: HashSet::new(),
            blocked: HashSet::new(),
            loopback: VecDeque::new(),
            counters: Counters::default(),
            started: Instant::now(),
            registered: None,
            public_endpoint: None,
            sendbuf: vec![0u8; HEADROOM + MAX_DATAGRAM + TAILROOM],
            batch: udp::Batch::new(offload),
            offload,
            shutting_down: false,
            node_tx,
            gate: None,
            syn_limit,
            syn_log: None,
        };
        (engine, EngineHandle { tx, node: node_rx })
    }

    /// Enforces `gate` on new inbound connections and datagrams: refused ones are dropped and
    /// counted.
    pub fn set_gate(&mut self, gate: Arc<dyn TrustGate>) {
        self.gate = Some(gate);
    }

    /// Runs until [`Cmd::Shutdown`] and every connection has finished (or 3 s passed).
    pub async fn run(mut self) {
        let mut rbuf = vec![0u8; MAX_DATAGRAM];
        let mut cmsg = udp::cmsg_buffer();
        if self.offload && udp::enable_gro(&self.socket) {
            tracing::debug!("UDP receive offload on");
        }
        let mut shutdown_deadline: Option<Instant> = None;
        loop {
            let now = Instant::now();
            if let Some(d) = shutdown_deadline {
                if self.all_finished() || now >= d {
                    self.flush(now).await;
                    return;
                }
            }
            let mut deadline = self
                .endpoint
                .poll_timeout()
                .unwrap_or(now + Duration::from_secs(1));
            if let Some(t) = self.tunnels.poll_timeout() {
                deadline = deadline.min(t);
            }
            if !self.blocked.is_empty() {
                deadline = deadline.min(now + Duration::from_millis(2));
            }
            if !self.loopback.is_empty() {
                deadline = now;
            }
            tokio::select! {
                r = self.socket.readable() => {
                    let now = Instant::now();
                    if r.is_ok() {
                        for _ in 0..RECV_BATCH {
                            match udp::try_recv(&self.socket, &mut rbuf, &mut cmsg) {
                                Ok(got) => self.on_receive(now, got, &mut rbuf),
                                Err(_) => break,
                            }
                        }
                    }
                }
                c = self.cmds.recv() => {
                    let now = Instant::now();
                    match c {
                        Some(Cmd::Shutdown) | None => {
                            self.begin_shutdown(now);
                            shutdown_deadline = Some(now + Duration::from_secs(3));
                        }
                        Some(c) => self.on_cmd(now, c),
                    }
                    for _ in 0..64 {
                        match self.cmds.try_recv() {
                            Ok(Cmd::Shutdown) => {
                                self.begin_shutdown(now);
                                shutdown_deadline = Some(now + Duration::from_secs(3));
                            }
                            Ok(c) => self.on_cmd(now, c),
                            Err(_) => break,
                        }
                    }
                }
                e = self.link_events.recv() => {
                    if let Some(e) = e {
                        self.on_link(Instant::now(), e);
                    }
                }
                _ = tokio::time::sleep_until(deadline.into()) => {
                    let now = Instant::now();
                    self.endpoint.handle_timeout(now);
                    if self.tunnels.poll_timeout().is_some_and(|t| now >= t) {
                        self.tunnels.handle_timeout(now);
                        while let Some(node) = self.tunnels.poll_resolve() {
                            if self.resolving.insert(node) {
                                let _ = self.link.try_send(LinkCmd::Resolve(node));
                            }
                        }
                    }
                    let ids: Vec<ConnId> = self.conns.keys().copied().collect();
                    for id in ids {
                        self.service(now, id);
                    }
                }
            }
            self.flush(Instant::now()).await;
        }
    }

    /// Every connection has finished its side of the exchange (lingering in TIME_WAIT is
    /// not worth waiting for at shutdown).
    fn all_finished(&mut self) -> bool {
        self.conns.values().all(|c| {
            c.pending.is_empty()
                && self.endpoint.connection(c.handle).is_none_or(|x| {
                    matches!(x.state(), State::Closed | State::TimeWait)
                        || x.unacked() == 0 && c.finished
                })
        })
    }

    fn begin_shutdown(&mut self, now: Instant) {
        if self.shutting_down {
            return;
        }
        self.shutting_down = true;
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for id in ids {
            if let Some(c) = self.conns.get_mut(&id) {
                c.close_requested = true;
            }
            self.service(now, id);
        }
    }

    /// One receive, which may hold several datagrams coalesced by the kernel.
    fn on_receive(&mut self, now: Instant, got: udp::Received, rbuf: &mut [u8]) {
        let Some(buf) = rbuf.get_mut(..got.len) else {
            return;
        };
        match got.stride {
            Some(stride) if stride < got.len => {
                for d in buf.chunks_mut(stride) {
                    self.on_datagram(now, got.src, d);
                }
            }
            _ => self.on_datagram(now, got.src, buf),
        }
    }

    fn on_datagram(&mut self, now: Instant, src: SocketAddr, buf: &mut [u8]) {
        self.counters.pkts_recv += 1;
        self.counters.bytes_recv += buf.len() as u64;
        match self.tunnels.handle(now, src, buf) {
            Received::Packet { peer, range } => {
                let Some(packet) = buf.get(range) else { return };
                self.on_packet(now, peer, packet);
            }
            Received::Discovered(ep) => {
                if self.public_endpoint != Some(ep) {
                    tracing::info!(endpoint = %ep, "beacon sees us at");
                    self.public_endpoint = Some(ep);
                }
            }
            Received::NeedKey(node) => {
                if self.looking_up.insert(node) {
                    let _ = self.link.try_send(LinkCmd::Lookup(node));
                }
            }
            Received::Handled => {}
            Received::Dropped(why) => {
                tracing::trace!(%src, ?why, "datagram dropped");
                let c = &mut self.counters;
                c.drops_unlogged += 1;
                if c.drop_log
                    .is_none_or(|t| now.duration_since(t) >= DROP_LOG_INTERVAL)
                {
                    tracing::warn!(
                        %src,
                        reason = ?why,
                        dropped = c.drops_unlogged,
                        "dropping datagrams (this one, and the count since the last warning)"
                    );
                    c.drop_log = Some(now);
                    c.drops_unlogged = 0;
                }
            }
        }
    }

    fn on_packet(&mut self, now: Instant, peer: u32, packet: &[u8]) {
        if self.syn_limited(now, peer, packet) {
            return;
        }
        if let Some(gate) = &self.gate {
            if let Ok(p) = tunnel::wire::header::Packet::new_checked(packet) {
                use tunnel::wire::header::{Flags, Protocol};
                let opens = match p.protocol() {
                    Protocol::Stream => {
                        let f = p.flags();
                        f.contains(Flags::SYN) && !f.contains(Flags::ACK)
                    }
                    Protocol::Datagram => true,
                    _ => false,
                };
                if opens && !self.is_me(peer) && !gate.allows(peer, p.dst_port()) {
                    self.counters.untrusted += 1;
                    tracing::debug!(peer, port = p.dst_port(), "refused: peer is not trusted");
                    // The peer is authenticated by the tunnel: tell it at once (RST, as for a
                    // closed port) instead of letting its dial retry for half a minute.
                    self.endpoint.refuse_syn(packet);
                    return;
                }
            }
        }
        match self.endpoint.handle(now, packet) {
            Incoming::Stream(h) => {
                if let Some(&id) = self.by_handle.get(&h) {
                    self.service(now, id);
                } else {
                    self.accept_all(now);
                }
            }
            Incoming::Datagram(d) => {
                if self.config.events.wanted() {
                    self.config.events.emit(
                        "data.datagram",
                        json!({"src_addr": d.src.addr.to_string(), "src_port": d.src.port,
                               "dst_port": d.dst_port, "size": d.data.len()}),
                    );
                }
                if let Some(Listener { events, .. }) = self.listeners.get(&d.dst_port) {
                    let _ = events.try_send(AppEvent::Datagram {
                        src: d.src,
                        dst_port: d.dst_port,
                        data: d.data.to_vec(),
                    });
                }
            }
            Incoming::Control(..) | Incoming::Refused | Incoming::Dropped(_) => {}
        }
    }

    /// Whether `packet` is a new connection attempt over the SYN rate limits; it is then
    /// dropped without an answer (v1 does the same), counted and reported.
    fn syn_limited(&mut self, now: Instant, peer: u32, packet: &[u8]) -> bool {
        use tunnel::wire::header::{Flags, Packet, Protocol};
        let Ok(p) = Packet::new_checked(packet) else {
            return false;
        };
        let f = p.flags();
        let new_attempt = p.protocol() == Protocol::Stream
            && f.contains(Flags::SYN)
            && !f.contains(Flags::ACK)
            && !f.contains(Flags::RST)
            && self.endpoint.is_listening(p.dst_port())
            && !self
                .endpoint
                .has_connection(p.dst_port(), PilotAddr::new(p.src_addr(), p.src_port()));
        // The limiter is keyed on the tunnel-authenticated peer, not the header's source.
        if !new_attempt || self.syn_limit.allow(now, peer) {
            return false;
        }
        self.counters.syn_limited += 1;
        self.config.events.emit(
            "security.syn_rate_limited",
            json!({"src_addr": p.src_addr().to_string(), "src_port": p.src_port()}),
        );
        if self
            .syn_log
            .is_none_or(|t| now.duration_since(t) >= DROP_LOG_INTERVAL)
        {
            self.syn_log = Some(now);
            tracing::warn!(
                peer,
                total = self.counters.syn_limited,
                "dropping connection attempts over the SYN rate limit"
            );
        }
        true
    }

    fn accept_all(&mut self, now: Instant) {
        let ports: Vec<u16> = self.listeners.keys().copied().collect();
        for port in ports {
            while let Some(h) = self.endpoint.accept(port) {
                let Some(l) = self.listeners.get(&port) else {
                    break;
                };
                let (events, own) = if l.per_conn {
                    let (tx, rx) = mpsc::channel(CONN_QUEUE);
                    (tx, Some(rx))
                } else {
                    (l.events.clone(), None)
                };
                let port_events = l.events.clone();
                let remote = match self.endpoint.connection(h) {
                    Some(c) => c.remote(),
                    None => continue,
                };
                let id = self.alloc_id();
                let credit = Arc::new(Semaphore::new(WRITE_CREDIT));
                if port_events
                    .try_send(AppEvent::Accepted {
                        port,
                        conn: id,
                        remote,
                        credit: credit.clone(),
                        events: own,
                    })
                    .is_err()
                {
                    if let Some(mut c) = self.endpoint.connection(h) {
                        c.abort(now);
                    }
                    continue;
                }
                self.config.events.emit(
                    "conn.established",
                    json!({"src_addr": remote.addr.to_string(), "src_port": remote.port,
                           "dst_port": port, "conn_id": id}),
                );
                self.by_handle.insert(h, id);
                self.conns.insert(
                    id,
                    Conn {
                        handle: h,
                        events,
                        credit,
                        pending: VecDeque::new(),
                        pending_off: 0,
                        dial: None,
                        close_requested: false,
                        finished: false,
                        remote,
                    },
                );
                self.service(now, id);
            }
        }
    }

    fn alloc_id(&mut self) -> ConnId {
        loop {
            let id = self.next_conn;
            self.next_conn = self.next_conn.wrapping_add(1).max(1);
            if !self.conns.contains_key(&id) {
                return id;
            }
        }
    }

    /// Moves data between a connection and its owner, reports its events, and releases it
    /// once drained.
    fn service(&mut self, now: Instant, id: ConnId) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let Some(mut conn) = self.endpoint.connection(c.handle) else {
            self.conns.remove(&id);
            return;
        };
        while let Some(ev) = conn.poll_event() {
            match ev {
                Event::Connected => {
                    if let Some(d) = c.dial.take() {
                        let _ = d.send(Ok((id, c.credit.clone())));
                    }
                }
                Event::Closed => {
                    if let Some(d) = c.dial.take() {
                        let why = conn
                            .error()
                            .map(|e| e.to_string())
                            .unwrap_or_else(|| "connection closed".into());
                        let _ = d.send(Err(why));
                    }
                }
                Event::Readable | Event::Writable => {}
            }
        }
        // Application writes into the send buffer, credit back as it goes.
        while let Some(front) = c.pending.front() {
            let rest = &front[c.pending_off..];
            match conn.write(rest) {
                Ok(n) => {
                    c.credit.add_permits(n);
                    c.pending_off += n;
                    if c.pending_off == front.len() {
                        c.pending.pop_front();
                        c.pending_off = 0;
                    }
                }
                Err(WriteError::Blocked) => break,
                Err(_) => {
                    // Failed or shut: the bytes can never go; give the credit back.
                    let left: usize = c.pending.iter().map(Vec::len).sum::<usize>() - c.pending_off;
                    c.credit.add_permits(left);
                    c.pending.clear();
                    c.pending_off = 0;
                    break;
                }
            }
        }
        if c.close_requested && c.pending.is_empty() {
            conn.shutdown(now);
        }
        // Received bytes to the owner while it has room.
        self.blocked.remove(&id);
        if c.dial.is_none() && !c.finished {
            loop {
                let permit = match c.events.try_reserve() {
                    Ok(p) => p,
                    Err(mpsc::error::TrySendError::Full(())) => {
                        self.blocked.insert(id);
                        break;
                    }
                    Err(mpsc::error::TrySendError::Closed(())) => {
                        // The owner is gone: finish the connection.
                        conn.close(now);
                        c.finished = true;
                        break;
                    }
                };
                let n = conn.readable().min(READ_CHUNK);
                let mut data = vec![0u8; n.max(1)];
                match conn.read(&mut data) {
                    Ok(0) => {
                        emit_closed(&self.config.events, "conn.fin", &conn, id);
                        permit.send(AppEvent::Closed {
                            conn: id,
                            error: None,
                        });
                        c.finished = true;
                        break;
                    }
                    Ok(k) => {
                        data.truncate(k);
                        permit.send(AppEvent::Data { conn: id, data });
                    }
                    Err(ReadError::Blocked) => break,
                    Err(ReadError::Failed(e)) => {
                        let name = if e.to_string().contains("idle") {
                            "conn.idle_timeout"
                        } else {
                            "conn.rst"
                        };
                        emit_closed(&self.config.events, name, &conn, id);
                        permit.send(AppEvent::Closed {
                            conn: id,
                            error: Some(e.to_string()),
                        });
                        c.finished = true;
                        break;
                    }
                }
            }
        }
        let drained = conn.is_drained() && conn.state() == State::Closed;
        drop(conn);
        if drained {
            let h = c.handle;
            if !c.finished {
                let _ = c.events.try_send(AppEvent::Closed {
                    conn: id,
                    error: None,
                });
            }
            if let Some(d) = c.dial.take() {
                let _ = d.send(Err("connection closed".into()));
            }
            self.endpoint.release(h);
            self.by_handle.remove(&h);
            self.conns.remove(&id);
            self.blocked.remove(&id);
        }
    }

    fn on_cmd(&mut self, now: Instant, cmd: Cmd) {
        match cmd {
            Cmd::Listen {
                port,
                events,
                per_conn,
                reply,
            } => {
                let r = if self.listeners.contains_key(&port) {
                    Err(format!("port {port} is already bound"))
                } else {
                    self.endpoint
                        .listen(port, None)
                        .map(|()| {
                            self.listeners.insert(port, Listener { events, per_conn });
                        })
                        .map_err(|e| e.to_string())
                };
                let _ = reply.send(r);
            }
            Cmd::Unlisten { port, owner } => {
                let held = self.listeners.get(&port).is_some_and(|l| {
                    owner
                        .as_ref()
                        .is_none_or(|w| w.upgrade().is_some_and(|s| s.same_channel(&l.events)))
                });
                if held {
                    self.listeners.remove(&port);
                    self.endpoint.unlisten(now, port);
                }
            }
            Cmd::Dial { dst, events, reply } => {
                if self.tunnels.node() == 0 {
                    let _ = reply.send(Err("not registered yet".into()));
                    return;
                }
                match self.endpoint.connect(now, dst) {
                    Ok(h) => {
                        let id = self.alloc_id();
                        self.by_handle.insert(h, id);
                        self.conns.insert(
                            id,
                            Conn {
                                handle: h,
                                events,
                                credit: Arc::new(Semaphore::new(WRITE_CREDIT)),
                                pending: VecDeque::new(),
                                pending_off: 0,
                                dial: Some(reply),
                                close_requested: false,
                                finished: false,
                                remote: dst,
                            },
                        );
                        self.service(now, id);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.to_string()));
                    }
                }
            }
            Cmd::Write { conn, data } => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.pending.push_back(data);
                    self.service(now, conn);
                }
            }
            Cmd::Close { conn } => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.close_requested = true;
                    self.service(now, conn);
                }
            }
            Cmd::Abort { conn } => {
                if let Some(c) = self.conns.get(&conn) {
                    if let Some(mut x) = self.endpoint.connection(c.handle) {
                        x.abort(now);
                    }
                    self.service(now, conn);
                }
            }
            Cmd::SendTo {
                dst,
                src_port,
                data,
            } => self.send_datagram(now, dst, src_port, &data),
            Cmd::Info { reply } => {
                let _ = reply.send(self.info(now));
            }
            Cmd::SetGate(gate) => self.gate = Some(gate),
            Cmd::Shutdown => self.begin_shutdown(now),
        }
    }

    fn send_datagram(&mut self, now: Instant, dst: PilotAddr, src_port: Option<u16>, data: &[u8]) {
        let buf = &mut self.sendbuf;
        let packet = &mut buf[HEADROOM..];
        let Some(payload) = packet.get_mut(
            tunnel::wire::header::HEADER_LEN..tunnel::wire::header::HEADER_LEN + data.len(),
        ) else {
            return;
        };
        payload.copy_from_slice(data);
        let Ok(n) = self
            .endpoint
            .emit_datagram(dst, src_port, data.len(), packet)
        else {
            return;
        };
        let node = dst.addr.node;
        if self.is_me(node) {
            self.loop_back(n);
            return;
        }
        let sent = self.tunnels.seal(now, node, &mut self.sendbuf, n);
        self.after_seal(node, sent, true);
    }

    fn is_me(&self, node: u32) -> bool {
        node != 0 && node == self.tunnels.node()
    }

    /// Queues the packet at `sendbuf[HEADROOM..HEADROOM + n]`, addressed to ourselves, for
    /// delivery as if it had arrived through a tunnel.
    fn loop_back(&mut self, n: usize) {
        if self.loopback.len() >= MAX_LOOPBACK {
            self.counters.loopback_dropped += 1;
            return;
        }
        if let Some(p) = self.sendbuf.get(HEADROOM..HEADROOM + n) {
            self.loopback.push_back(p.to_vec());
        }
    }

    fn after_seal(
        &mut self,
        node: u32,
        sent: Sent,
        immediate: bool,
    ) -> Option<(SocketAddr, (usize, usize))> {
        match sent {
            Sent::Now { dst, range } => {
                if immediate {
                    match self
                        .socket
                        .try_send_to(&self.sendbuf[range.0..range.1], dst)
                    {
                        Ok(n) => {
                            self.counters.pkts_sent += 1;
                            self.counters.bytes_sent += n as u64;
                        }
                        Err(_) => self.counters.send_errors += 1,
                    }
                    None
                } else {
                    Some((dst, range))
                }
            }
            Sent::NeedEndpoint => {
                if self.resolving.insert(node) {
                    let _ = self.link.try_send(LinkCmd::Resolve(node));
                }
                if !self.tunnels.has_key(node) && self.looking_up.insert(node) {
                    let _ = self.link.try_send(LinkCmd::Lookup(node));
                }
                None
            }
            Sent::Queued => {
                if !self.tunnels.has_key(node) && self.looking_up.insert(node) {
                    let _ = self.link.try_send(LinkCmd::Lookup(node));
                }
                None
            }
            Sent::Dropped => None,
        }
    }

    fn on_link(&mut self, now: Instant, e: LinkEvent) {
        match e {
            LinkEvent::Registered { node, reply } => {
                self.config.events.emit(
                    "node.registered",
                    json!({"address": Addr::new(0, node).to_string(),
                           "endpoint": self.public_endpoint.map(|e| e.to_string())}),
                );
                let _ = self.node_tx.send(node);
                self.tunnels.set_node(node);
                self.endpoint.set_local(Addr::new(0, node));
                self.registered = Some(reply);
                self.discover();
            }
            LinkEvent::Heartbeat => self.discover(),
            LinkEvent::Key(node, key) => {
                self.looking_up.remove(&node);
                match key.and_then(|k| ed25519_dalek::VerifyingKey::from_bytes(&k).ok()) {
                    Some(k) => self.tunnels.set_key(now, node, k),
                    None => self.tunnels.key_unavailable(node),
                }
            }
            LinkEvent::Endpoint(node, r) => {
                self.resolving.remove(&node);
                match r {
                    Ok(ep) => self.tunnels.set_endpoint(now, node, ep),
                    Err(e) => {
                        tracing::debug!(node, error = %e, "cannot resolve peer");
                        self.fail_dials_to(node, &e);
                    }
                }
            }
            LinkEvent::Disconnected(_) => {}
            LinkEvent::Rotated(key) => {
                self.tunnels.set_identity(now, (*key).clone());
                self.config.events.emit(
                    "node.key_rotated",
                    json!({"public_key": tunnel::registry::auth::b64(key.verifying_key().as_bytes())}),
                );
            }
        }
    }

    fn fail_dials_to(&mut self, node: u32, why: &str) {
        let ids: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.remote.addr.node == node && c.dial.is_some())
            .map(|(&id, _)| id)
            .collect();
        let now = Instant::now();
        for id in ids {
            if let Some(c) = self.conns.get_mut(&id) {
                if let Some(d) = c.dial.take() {
                    let _ = d.send(Err(format!("resolve node {node}: {why}")));
                }
                if let Some(mut x) = self.endpoint.connection(c.handle) {
                    x.abort(now);
                }
            }
            self.service(now, id);
        }
    }

    /// Tells the beacon where we are, from the tunnel socket itself (sent with the next
    /// flush).
    fn discover(&mut self) {
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        self.tunnels.discover(unix_ms);
    }

    /// Sends everything the connection table and the tunnel layer have queued.
    fn count_flushed(&mut self, f: udp::Flushed) {
        self.counters.pkts_sent += f.datagrams;
        self.counters.bytes_sent += f.bytes;
        self.counters.send_errors += f.errors;
    }

    async fn flush(&mut self, now: Instant) {
        let mut rounds = 0;
        loop {
            self.flush_endpoint(now).await;
            if self.loopback.is_empty() || rounds == LOOPBACK_ROUNDS {
                break;
            }
            rounds += 1;
            let me = self.tunnels.node();
            for p in std::mem::take(&mut self.loopback) {
                self.on_packet(now, me, &p);
            }
        }
        if !self.batch.is_empty() {
            let f = self.batch.flush(&self.socket).await;
            self.count_flushed(f);
        }
        while let Some(tx) = self.tunnels.poll_transmit(now, &mut self.sendbuf) {
            let Some(bytes) = self.sendbuf.get(tx.range()) else {
                continue;
            };
            match self.socket.send_to(bytes, tx.dst).await {
                Ok(k) => {
                    self.counters.pkts_sent += 1;
                    self.counters.bytes_sent += k as u64;
                }
                Err(_) => self.counters.send_errors += 1,
            }
        }
    }

    /// Seals and batches what the connection table has queued; packets to ourselves go to
    /// the loopback queue.
    async fn flush_endpoint(&mut self, now: Instant) {
        while let Some((n, dst)) = self
            .endpoint
            .poll_transmit(now, &mut self.sendbuf[HEADROOM..])
        {
            let node = dst.addr.node;
            if self.is_me(node) {
                self.loop_back(n);
                continue;
            }
            let sent = self.tunnels.seal(now, node, &mut self.sendbuf, n);
            if let Some((ep, range)) = self.after_seal(node, sent, false) {
                if range.1 > self.sendbuf.len() || range.0 > range.1 {
                    continue;
                }
                if !self.batch.fits(ep, range.1 - range.0) {
                    let f = self.batch.flush(&self.socket).await;
                    self.count_flushed(f);
                }
                self.batch.push(ep, &self.sendbuf[range.0..range.1]);
            }
        }
    }

    fn info(&mut self, _now: Instant) -> Value {
        let node = self.tunnels.node();
        let peers = self.tunnels.peers();
        let mut conn_list = Vec::new();
        let mut live = 0;
        for (&id, c) in &self.conns {
            if let Some(x) = self.endpoint.connection(c.handle) {
                let st = x.stats();
                let state = x.state();
                if matches!(
                    state,
                    State::Established | State::SynSent | State::SynReceived
                ) {
                    live += 1;
                }
                conn_list.push(json!({
                    "id": id,
                    "local_port": x.local().port,
                    "remote_addr": x.remote().addr.to_string(),
                    "remote_port": x.remote().port,
                    "state": format!("{state:?}"),
                    "bytes_sent": st.bytes_sent,
                    "bytes_recv": st.bytes_received,
                    "segs_sent": st.segments_sent,
                    "segs_recv": st.segments_received,
                    "retransmits": st.retransmissions,
                    "unacked": x.unacked(),
                }));
            }
        }
        json!({
            "node_id": node,
            "address": Addr::new(0, node).to_string(),
            "hostname": self.registered.as_ref().and_then(|r| r.get("hostname")).cloned().unwrap_or(json!("")),
            "uptime_secs": self.started.elapsed().as_secs(),
            "connections": live,
            "ports": self.listeners.len(),
            "peers": peers.len(),
            "encrypted_peers": peers.iter().filter(|p| p.encrypted).count(),
            "authenticated_peers": peers.iter().filter(|p| p.authenticated).count(),
            "encrypt": true,
            "identity": true,
            "bytes_sent": self.counters.bytes_sent,
            "bytes_recv": self.counters.bytes_recv,
            "pkts_sent": self.counters.pkts_sent,
            "pkts_recv": self.counters.pkts_recv,
            "refused_untrusted": self.counters.untrusted,
            "refused_syn_rate": self.counters.syn_limited,
            "loopback_dropped": self.counters.loopback_dropped,
            "public_endpoint": self.public_endpoint.or(self.config.endpoint_override).map(|e| e.to_string()),
            "peer_list": peers.iter().map(|p| json!({
                "node_id": p.node,
                "endpoint": p.endpoint.map(|e| e.to_string()).unwrap_or_default(),
                "encrypted": p.encrypted,
                "authenticated": p.authenticated,
                "relay": p.path == tunnel::node::tunnels::Path::Relay,
            })).collect::<Vec<_>>(),
            "conn_list": conn_list,
            "drops": self.tunnels.drops().iter().map(|(d, n)| json!({"reason": d, "count": n})).collect::<Vec<_>>(),
        })
    }
}

/// Binds the tunnel socket: dual-stack when `addr` is the IPv6 wildcard, with large buffers.
pub fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let domain = if addr.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Dual-stack where the wildcard is asked for; an error leaves the system default.
        let _ = s.set_only_v6(false);
    }
    for size in [8 << 20, 4 << 20, 1 << 20] {
        if s.set_recv_buffer_size(size).is_ok() {
            break;
        }
    }
    for size in [8 << 20, 4 << 20, 1 << 20] {
        if s.set_send_buffer_size(size).is_ok() {
            break;
        }
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}
