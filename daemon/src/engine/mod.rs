//! The engine: the async adapter around the sans-IO node core ([`tunnel::node::Node`]). One
//! task owns the node and moves bytes between it and three sides, each in its own module:
//!
//! ```text
//!  UDP socket (outside.rs) --handle_outside--> Node --poll_transmit--> batches (GSO) --> UDP
//!  applications (apps.rs)  --Cmd-->  Node commands;  Node events --AppEvent--> their owners
//!  registry link (control.rs) <--LinkCmd / LinkEvent--> NeedKey / NeedEndpoint and answers
//! ```
//!
//! Everything is driven by what happened: a wake handles the datagrams, commands, link events
//! or timers that woke it, then drains the node's events (which name only the connections
//! touched) and its transmissions. No wake looks at every connection, and a connection whose
//! owner is not reading waits for its channel to have room (a waiter task per blocked
//! connection), not for a polling timer.
//!
//! Flow control never lets one slow reader stall the others: data for a connection whose
//! owner is not reading stays in that connection's receive buffer, whose window then closes;
//! writes take credit from a per-connection semaphore that the engine refills as the send
//! buffer takes the bytes.

mod apps;
mod control;
mod outside;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand_core::OsRng;
use serde_json::{json, Value};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tunnel::node::tunnels::Path;
use tunnel::node::{CloseReason, Event, IncomingError, IncomingId, Node};
use tunnel::stream::{EndpointConfig, State};
use tunnel::{Addr, SocketAddr as PilotAddr};

use crate::events::Events;
use crate::registry_link::{LinkCmd, LinkError, LinkEvent};

pub use outside::bind_udp;
pub use tunnel::node::TrustGate;

/// A connection's ID as applications see it (v1 IPC `conn_id`).
pub type ConnId = u32;

/// Where a dial's outcome goes: the connection and its write credit, or why not.
pub type DialReply = oneshot::Sender<Result<(ConnId, Arc<Semaphore>), DialError>>;

/// Bytes of write credit per connection: what may wait in the engine beyond the send buffer.
pub const WRITE_CREDIT: usize = 1 << 20;
/// Largest chunk handed to an application per event.
pub const READ_CHUNK: usize = 64 * 1024;
/// Events queued per application before its connections stop being read.
pub const APP_QUEUE: usize = 256;
/// Events queued per connection that has a channel of its own.
pub const CONN_QUEUE: usize = 64;

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
        error: Option<CloseReason>,
    },
    /// A connection attempt to a port no one listens on, for the fallback listener
    /// ([`EngineHandle::listen_fallback`]): answer it with
    /// [`EngineHandle::accept_incoming`] or [`EngineHandle::refuse_incoming`] (undecided
    /// attempts are refused after the node core's deferral timeout).
    Incoming {
        /// Names the attempt in the decision.
        id: IncomingId,
        /// The local port asked for.
        port: u16,
        /// The dialer.
        remote: PilotAddr,
    },
    /// A datagram to a listened port (or, for the fallback listener, to a port no one
    /// listens on).
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
        reply: oneshot::Sender<Result<(), BindError>>,
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
    /// Take connection attempts and datagrams to every port no one listens on.
    ListenFallback {
        /// Where [`AppEvent::Incoming`] and the datagrams go.
        events: mpsc::Sender<AppEvent>,
        /// Result.
        reply: oneshot::Sender<Result<(), BindError>>,
    },
    /// Give the fallback listener up; undecided attempts are refused.
    UnlistenFallback,
    /// Accept an attempt reported by [`AppEvent::Incoming`].
    AcceptIncoming {
        /// The attempt.
        id: IncomingId,
        /// Where the connection's events go.
        events: mpsc::Sender<AppEvent>,
        /// The connection and its write credit once the handshake completes, or why not.
        reply: DialReply,
    },
    /// Refuse an attempt reported by [`AppEvent::Incoming`]: the dialer gets an RST.
    RefuseIncoming {
        /// The attempt.
        id: IncomingId,
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
    /// Trust with `node` ended: the next packets to it go out behind our PILA until it
    /// answers, since a v1 peer drops its keys for us then (see `tunnel::node::Node::rekey_peer`).
    /// The session stays (open streams go on; the gate still refuses new ones at once).
    Rekey {
        /// The node.
        node: u32,
    },
    /// Stop: FIN to every connection, then exit.
    Shutdown,
}

/// How applications reach the engine. Cheap to clone.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Cmd>,
    node: watch::Receiver<u32>,
}

/// The engine is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the daemon engine has stopped")]
pub struct Stopped;

/// Why a port could not be listened on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BindError {
    /// Someone holds the port (or the fallback listener).
    #[error(transparent)]
    Taken(#[from] tunnel::node::ListenError),
    /// The engine is gone.
    #[error(transparent)]
    Stopped(#[from] Stopped),
}

/// Why a dial failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DialError {
    /// The node core could not start the connection (not registered, no port, too many).
    #[error(transparent)]
    Start(#[from] tunnel::node::DialError),
    /// The peer's node could not be resolved to an endpoint.
    #[error("resolve node {node}: {reason}")]
    Resolve {
        /// The node dialed.
        node: u32,
        /// The registry link's reason (`not_found`, `forbidden`, unreachable ...).
        reason: Arc<LinkError>,
    },
    /// The connection ended before it was established (refused, timed out ...).
    #[error(transparent)]
    Closed(#[from] tunnel::node::CloseReason),
    /// An incoming attempt could not be accepted (withdrawn, expired, over a limit).
    #[error(transparent)]
    Incoming(#[from] IncomingError),
    /// The engine is gone.
    #[error(transparent)]
    Stopped(#[from] Stopped),
}

impl DialError {
    /// The peer is known not to let us in: the registry refused to resolve it for privacy or
    /// trust (`forbidden`).
    pub fn is_forbidden(&self) -> bool {
        match self {
            DialError::Resolve { reason, .. } => {
                matches!(&**reason, LinkError::Refused { code, .. } if code == "forbidden")
            }
            _ => false,
        }
    }
}

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
    pub async fn listen(&self, port: u16, events: mpsc::Sender<AppEvent>) -> Result<(), BindError> {
        self.listen_with(port, events, false).await
    }

    /// Listens on `port`; each accepted connection gets its own event channel (in
    /// [`AppEvent::Accepted`]), and `events` carries new connections and datagrams.
    pub async fn listen_per_conn(
        &self,
        port: u16,
        events: mpsc::Sender<AppEvent>,
    ) -> Result<(), BindError> {
        self.listen_with(port, events, true).await
    }

    async fn listen_with(
        &self,
        port: u16,
        events: mpsc::Sender<AppEvent>,
        per_conn: bool,
    ) -> Result<(), BindError> {
        let (reply, rx) = oneshot::channel();
        self.send(Cmd::Listen {
            port,
            events,
            per_conn,
            reply,
        })
        .await?;
        rx.await.map_err(|_| Stopped)?
    }

    /// Opens a connection.
    pub async fn dial(
        &self,
        dst: PilotAddr,
        events: mpsc::Sender<AppEvent>,
    ) -> Result<(ConnId, Arc<Semaphore>), DialError> {
        let (reply, rx) = oneshot::channel();
        self.send(Cmd::Dial { dst, events, reply }).await?;
        rx.await.map_err(|_| Stopped)?
    }

    /// Takes connection attempts ([`AppEvent::Incoming`]) and datagrams to every port no one
    /// listens on; one owner at a time. The fallback is given up when `events` closes.
    pub async fn listen_fallback(&self, events: mpsc::Sender<AppEvent>) -> Result<(), BindError> {
        let (reply, rx) = oneshot::channel();
        self.send(Cmd::ListenFallback { events, reply }).await?;
        rx.await.map_err(|_| Stopped)?
    }

    /// Accepts an attempt reported by [`AppEvent::Incoming`]: answers once the handshake
    /// completed, with the connection and its write credit.
    pub async fn accept_incoming(
        &self,
        id: IncomingId,
        events: mpsc::Sender<AppEvent>,
    ) -> Result<(ConnId, Arc<Semaphore>), DialError> {
        let (reply, rx) = oneshot::channel();
        self.send(Cmd::AcceptIncoming { id, events, reply }).await?;
        rx.await.map_err(|_| Stopped)?
    }

    /// Refuses an attempt reported by [`AppEvent::Incoming`] (the dialer gets an RST).
    pub async fn refuse_incoming(&self, id: IncomingId) -> Result<(), Stopped> {
        self.send(Cmd::RefuseIncoming { id }).await
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

/// At most one dropped-datagram (or SYN-limit) warning per this interval.
const DROP_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Commands handled per wake before the node's outputs are drained.
const CMD_BATCH: usize = 64;

/// The running engine.
pub struct Engine {
    node: Node<OsRng>,
    config: EngineConfig,
    cmds: mpsc::Receiver<Cmd>,
    outside: outside::Outside,
    apps: apps::Apps,
    control: control::Control,
    link_events: mpsc::Receiver<LinkEvent>,
    started: Instant,
    registered: Option<Value>,
    /// The protocol the registry spoke at the last registration (Info `registry_protocol`).
    registry_protocol: Option<pilot_registry_client::RegistryProtocol>,
    /// The registry link's state (Info `registry`).
    registry_link: LinkState,
    shutting_down: bool,
    node_tx: watch::Sender<u32>,
    /// When the last dropped-datagram warning was logged, and drops since.
    drop_log: Option<Instant>,
    drops_unlogged: u64,
    syn_log: Option<Instant>,
    beacon_watch: BeaconWatch,
}

/// Whether the registry link has a session, since when, and why not.
#[derive(Debug)]
struct LinkState {
    connected: bool,
    /// When it entered this state (start, while it never connected).
    since: Instant,
    /// Why the last attempt or session failed, while not connected.
    error: Option<String>,
    /// Another daemon with this node's identity, as the registry explained it.
    conflict: Option<String>,
    /// The registry address of the current session (of the last one, while not connected).
    address: Option<String>,
}

/// Discovers the beacon left unanswered in a row before pilotd warns that it is silent.
const BEACON_SILENT_AFTER: u32 = 3;
/// Between registry heartbeats, a discover goes out when none did for this long: our NAT's
/// mapping can change under us (a new public address, a NAT restart) with nothing else to
/// tell us, and until a discover's answer shows it, peers' packets go to the dead mapping and
/// the beacon refuses to relay ours from the new one. It also keeps the mapping to the beacon
/// open on NATs that forget idle UDP mappings sooner than the heartbeat.
const MAPPING_CHECK: Duration = Duration::from_secs(10);
/// Least time between two discovers sent early, on a hint that our mapping moved (the
/// registry connection broke, a peer stopped answering).
const REDISCOVER_MIN: Duration = Duration::from_secs(2);

/// Whether the beacon answers the discovers sent at each heartbeat: one warning when it falls
/// silent, one line when it answers again.
#[derive(Debug, Default)]
struct BeaconWatch {
    /// When the last discover was sent.
    last_sent: Option<Instant>,
    /// Discovers sent since the last answer.
    unanswered: u32,
    /// The warning was logged for this silence.
    warned: bool,
}

impl BeaconWatch {
    /// A discover is about to be sent; `answered` is when the beacon last answered one.
    /// Returns what to log, if anything.
    fn on_send(&mut self, now: Instant, answered: Option<Instant>) -> Option<BeaconNews> {
        let got_answer = match (self.last_sent, answered) {
            (Some(sent), Some(a)) => a >= sent,
            _ => false,
        };
        let news = if got_answer || self.last_sent.is_none() {
            let back = self.warned && got_answer;
            self.unanswered = 0;
            self.warned = false;
            back.then_some(BeaconNews::Answering)
        } else {
            self.unanswered += 1;
            if self.unanswered >= BEACON_SILENT_AFTER && !self.warned {
                self.warned = true;
                Some(BeaconNews::Silent(self.unanswered))
            } else {
                None
            }
        };
        self.last_sent = Some(now);
        news
    }

    /// Whether the beacon is answering (`None` until a discover could have been answered).
    fn answering(&self) -> Option<bool> {
        self.last_sent?;
        Some(!self.warned)
    }
}

/// What changed about the beacon.
#[derive(Debug, PartialEq, Eq)]
enum BeaconNews {
    /// This many discovers in a row went unanswered.
    Silent(u32),
    /// It answers again after a silence.
    Answering,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("conns", &self.apps.len())
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// An engine on `socket` around `node`. Returns it and the handle applications use.
    pub fn new(
        socket: UdpSocket,
        node: Node<OsRng>,
        config: EngineConfig,
        link: mpsc::Sender<LinkCmd>,
        link_events: mpsc::Receiver<LinkEvent>,
    ) -> (Engine, EngineHandle) {
        let (tx, cmds) = mpsc::channel(1024);
        let (node_tx, node_rx) = watch::channel(node.node());
        let engine = Engine {
            outside: outside::Outside::new(socket, config.offload),
            node,
            config,
            cmds,
            apps: apps::Apps::default(),
            control: control::Control::new(link),
            link_events,
            started: Instant::now(),
            registered: None,
            registry_protocol: None,
            registry_link: LinkState {
                connected: false,
                since: Instant::now(),
                error: None,
                conflict: None,
                address: None,
            },
            shutting_down: false,
            node_tx,
            drop_log: None,
            drops_unlogged: 0,
            syn_log: None,
            beacon_watch: BeaconWatch::default(),
        };
        (engine, EngineHandle { tx, node: node_rx })
    }

    /// Enforces `gate` on new inbound connections and datagrams: refused ones are dropped and
    /// counted.
    pub fn set_gate(&mut self, gate: Arc<dyn TrustGate>) {
        self.node.set_gate(Some(gate));
    }

    /// Runs until [`Cmd::Shutdown`] and every connection has finished (or 3 s passed).
    pub async fn run(mut self) {
        self.outside.start();
        let mut shutdown_deadline: Option<Instant> = None;
        loop {
            let now = Instant::now();
            if let Some(d) = shutdown_deadline {
                if self.apps.all_finished(&mut self.node) || now >= d {
                    self.drain(now).await;
                    return;
                }
            }
            let mut deadline = self
                .node
                .poll_timeout()
                .unwrap_or(now + Duration::from_secs(1));
            if let Some(check) = self.next_mapping_check() {
                deadline = deadline.min(check);
            }
            if let Some(d) = shutdown_deadline {
                // Shutdown checks again at least this often.
                deadline = deadline.min(d).min(now + Duration::from_millis(20));
            }
            tokio::select! {
                r = self.outside.readable() => {
                    if r.is_ok() {
                        let (log, unlogged) = (&mut self.drop_log, &mut self.drops_unlogged);
                        self.outside.receive(Instant::now(), &mut self.node, |why, src, now| {
                            log_drop(log, unlogged, why, src, now)
                        });
                    }
                }
                c = self.cmds.recv() => {
                    let now = Instant::now();
                    // The one received, then up to CMD_BATCH - 1 more already waiting: every
                    // command taken off the channel is handled here.
                    let mut next = c;
                    let mut handled = 0;
                    loop {
                        match next {
                            Some(Cmd::Shutdown) | None => {
                                self.begin_shutdown(now);
                                shutdown_deadline.get_or_insert(now + Duration::from_secs(3));
                            }
                            Some(c) => self.on_cmd(now, c),
                        }
                        handled += 1;
                        if handled == CMD_BATCH {
                            break;
                        }
                        match self.cmds.try_recv() {
                            Ok(c) => next = Some(c),
                            Err(_) => break,
                        }
                    }
                }
                e = self.link_events.recv() => {
                    if let Some(e) = e {
                        self.on_link(Instant::now(), e);
                    }
                }
                Some(w) = self.apps.next_room(), if self.apps.has_waiters() => {
                    self.apps.on_room(Instant::now(), &mut self.node, &self.config.events, w);
                }
                permit = self.control.room(), if self.control.has_unsent() => {
                    self.control.on_room(permit);
                }
                _ = tokio::time::sleep_until(deadline.into()) => {
                    let now = Instant::now();
                    self.node.handle_timeout(now);
                    if self.node.take_peers_unanswered() {
                        self.discover_soon(now);
                    }
                    if self.next_mapping_check().is_some_and(|t| t <= now) {
                        self.discover();
                    }
                }
            }
            self.drain(Instant::now()).await;
        }
    }

    /// Drains the node: its events to their owners, its datagrams to the socket, until both
    /// are empty (delivering to our own address can make more events).
    async fn drain(&mut self, now: Instant) {
        loop {
            let mut any = false;
            while let Some(e) = self.node.poll_event() {
                any = true;
                self.on_event(now, e);
            }
            any |= self.outside.transmit(now, &mut self.node).await;
            if !any && !self.node.has_events() {
                break;
            }
        }
    }

    fn on_event(&mut self, now: Instant, e: Event) {
        let events = &self.config.events;
        match e {
            Event::NeedKey(node) => self.control.request(LinkCmd::Lookup(node)),
            Event::NeedEndpoint(node) => self.control.request(LinkCmd::Resolve(node)),
            Event::Discovered(ep) => tracing::info!(endpoint = %ep, "beacon sees us at"),
            Event::SynRateLimited { peer, src } => {
                events.emit(
                    "security.syn_rate_limited",
                    json!({"src_addr": src.addr.to_string(), "src_port": src.port}),
                );
                if self
                    .syn_log
                    .is_none_or(|t| now.duration_since(t) >= DROP_LOG_INTERVAL)
                {
                    self.syn_log = Some(now);
                    tracing::warn!(
                        peer,
                        total = self.node.stats().syn_limited,
                        "dropping connection attempts over the SYN rate limit"
                    );
                }
            }
            Event::Untrusted { peer, port } => {
                tracing::debug!(peer, port, "refused: peer is not trusted");
            }
            other => self.apps.on_event(now, &mut self.node, events, other),
        }
    }

    fn begin_shutdown(&mut self, now: Instant) {
        if self.shutting_down {
            return;
        }
        self.shutting_down = true;
        self.apps.close_all(now, &mut self.node);
    }

    fn on_cmd(&mut self, now: Instant, cmd: Cmd) {
        match cmd {
            Cmd::Info { reply } => {
                let _ = reply.send(self.info());
            }
            Cmd::SetGate(gate) => self.node.set_gate(Some(gate)),
            Cmd::Rekey { node } => self.node.rekey_peer(node),
            Cmd::Shutdown => self.begin_shutdown(now),
            other => self.apps.on_cmd(now, &mut self.node, other),
        }
    }

    fn on_link(&mut self, now: Instant, e: LinkEvent) {
        match e {
            LinkEvent::Registered {
                node,
                reply,
                protocol,
                registry,
            } => {
                self.config.events.emit(
                    "node.registered",
                    json!({"address": Addr::new(0, node).to_string(),
                           "endpoint": self.node.public_endpoint().map(|e| e.to_string())}),
                );
                let _ = self.node_tx.send(node);
                self.node.set_node(node);
                self.registered = Some(reply);
                self.registry_protocol = Some(protocol);
                self.registry_link = LinkState {
                    connected: true,
                    since: Instant::now(),
                    error: None,
                    conflict: self.registry_link.conflict.take(),
                    address: Some(registry),
                };
                self.discover();
            }
            LinkEvent::Heartbeat => self.discover(),
            LinkEvent::Key(node, key) => {
                match key.and_then(|k| ed25519_dalek::VerifyingKey::from_bytes(&k).ok()) {
                    Some(k) => self.node.key_found(now, node, k),
                    None => self.node.key_unavailable(node),
                }
            }
            LinkEvent::Endpoint(node, r) => match r {
                Ok(ep) => self.node.endpoint_resolved(now, node, ep),
                Err(e) => {
                    tracing::debug!(node, error = %e, "cannot resolve peer");
                    // Dials end only when nothing else reaches the peer; a peer reached
                    // through the relay keeps them, and its endpoint is asked again later.
                    if self.node.resolve_failed(now, node) {
                        self.apps.fail_dials_to(node, Arc::new(e));
                    }
                }
            },
            LinkEvent::Disconnected(why) => {
                let l = &mut self.registry_link;
                if l.connected {
                    l.connected = false;
                    l.since = Instant::now();
                }
                l.error = Some(why);
                // A broken registry connection may be our mapping moving (the NAT forgot
                // its state with its old address).
                self.discover_soon(now);
            }
            LinkEvent::Conflict(c) => self.registry_link.conflict = c,
            LinkEvent::Rotated(key) => {
                self.node.set_identity(now, (*key).clone());
                self.config.events.emit(
                    "node.key_rotated",
                    json!({"public_key": tunnel::registry::auth::b64(key.verifying_key().as_bytes())}),
                );
            }
        }
    }

    /// When the next discover of [`MAPPING_CHECK`] is due: registered, with a beacon and no
    /// fixed public endpoint.
    fn next_mapping_check(&self) -> Option<Instant> {
        if self.registered.is_none()
            || self.node.beacon().is_none()
            || self.config.endpoint_override.is_some()
        {
            return None;
        }
        Some(self.beacon_watch.last_sent? + MAPPING_CHECK)
    }

    /// A discover now, on a hint that our mapping moved, unless one went out within
    /// [`REDISCOVER_MIN`]. Only once registered (the first discover follows registration).
    fn discover_soon(&mut self, now: Instant) {
        if self.registered.is_none() || self.node.beacon().is_none() {
            return;
        }
        if self
            .beacon_watch
            .last_sent
            .is_none_or(|t| now.duration_since(t) >= REDISCOVER_MIN)
        {
            tracing::debug!("our mapping may have moved: discovering now");
            self.discover();
        }
    }

    /// Tells the beacon where we are, from the tunnel socket itself (sent with the next
    /// drain).
    fn discover(&mut self) {
        if let Some(beacon) = self.node.beacon() {
            let news = self
                .beacon_watch
                .on_send(Instant::now(), self.node.last_discovered());
            match news {
                Some(BeaconNews::Silent(n)) => tracing::warn!(
                    %beacon,
                    "the beacon has not answered the last {n} discovers: peers behind NATs \
                     cannot be hole-punched or relayed until it does"
                ),
                Some(BeaconNews::Answering) => {
                    tracing::info!(%beacon, "the beacon answers again")
                }
                None => {}
            }
        }
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        self.node.discover(unix_ms);
    }

    fn info(&mut self) -> Value {
        let node = self.node.node();
        let peers = self.node.peers();
        let stats = self.node.stats();
        let mut conn_list = Vec::new();
        let mut live = 0;
        for x in self.node.connection_infos() {
            if matches!(
                x.state,
                State::Established | State::SynSent | State::SynReceived
            ) {
                live += 1;
            }
            conn_list.push(json!({
                "id": x.conn.0,
                "local_port": x.local_port,
                "remote_addr": x.remote.addr.to_string(),
                "remote_port": x.remote.port,
                "state": format!("{:?}", x.state),
                "bytes_sent": x.stats.bytes_sent,
                "bytes_recv": x.stats.bytes_received,
                "segs_sent": x.stats.segments_sent,
                "segs_recv": x.stats.segments_received,
                "retransmits": x.stats.retransmissions,
                "unacked": x.unacked,
                "cong_win": x.stats.cwnd,
                "ssthresh": x.stats.ssthresh,
                "in_flight": x.stats.bytes_in_flight,
                "srtt_ms": x.stats.srtt.as_secs_f64() * 1000.0,
                "rttvar_ms": x.stats.rttvar.as_secs_f64() * 1000.0,
                "peer_recv_win": x.stats.peer_window,
                "recv_win": x.stats.recv_window,
                "in_recovery": x.stats.recovery != tunnel::stream::Recovery::Open,
            }));
        }
        let out = self.outside.stats();
        json!({
            "node_id": node,
            "address": Addr::new(0, node).to_string(),
            "hostname": self.registered.as_ref().and_then(|r| r.get("hostname")).cloned().unwrap_or(json!("")),
            "registry_protocol": self.registry_protocol.map(|p| p.as_str()).unwrap_or_default(),
            "registry": json!({
                "connected": self.registry_link.connected,
                "since_secs": self.registry_link.since.elapsed().as_secs(),
                "error": self.registry_link.error,
                "conflict": self.registry_link.conflict,
                "address": self.registry_link.address,
            }),
            "uptime_secs": self.started.elapsed().as_secs(),
            "connections": live,
            "ports": self.apps.ports(),
            "peers": peers.len(),
            "encrypted_peers": peers.iter().filter(|p| p.encrypted).count(),
            "authenticated_peers": peers.iter().filter(|p| p.authenticated).count(),
            "encrypt": true,
            "identity": true,
            "bytes_sent": out.bytes,
            "bytes_recv": stats.bytes_in,
            "pkts_sent": out.datagrams,
            "pkts_recv": stats.pkts_in,
            "send_errors": out.errors,
            "refused_untrusted": stats.untrusted,
            "refused_syn_rate": stats.syn_limited,
            "loopback": stats.loopback,
            "datagrams_unlistened": stats.datagrams_unlistened,
            "serviced": stats.serviced,
            "public_endpoint": self.node.public_endpoint().or(self.config.endpoint_override).map(|e| e.to_string()),
            "beacon": self.node.beacon().map(|b| json!({
                "address": b.to_string(),
                "answering": self.beacon_watch.answering(),
                "last_answer_secs": self.node.last_discovered().map(|t| t.elapsed().as_secs()),
            })),
            "peer_list": peers.iter().map(|p| json!({
                "node_id": p.node,
                "endpoint": p.endpoint.map(|e| e.to_string()).unwrap_or_default(),
                "encrypted": p.encrypted,
                "authenticated": p.authenticated,
                "plaintext": p.plaintext,
                "relay": p.path == Path::Relay,
            })).collect::<Vec<_>>(),
            "conn_list": conn_list,
            "drops": self.node.tunnel_drops().iter().map(|(d, n)| json!({"reason": d, "count": n})).collect::<Vec<_>>(),
        })
    }
}

/// Whether a dropped datagram says something is wrong. Punch packets are dropped by design
/// (they only open NAT mappings); they are counted, never warned about.
fn worth_a_warning(why: tunnel::node::tunnels::Drop) -> bool {
    !matches!(why, tunnel::node::tunnels::Drop::Punch)
}

/// Logs a dropped datagram, at most one warning per interval with the count since.
fn log_drop(
    last: &mut Option<Instant>,
    unlogged: &mut u64,
    why: tunnel::node::tunnels::Drop,
    src: SocketAddr,
    now: Instant,
) {
    tracing::trace!(%src, ?why, "datagram dropped");
    if !worth_a_warning(why) {
        return;
    }
    *unlogged += 1;
    if last.is_none_or(|t| now.duration_since(t) >= DROP_LOG_INTERVAL) {
        tracing::warn!(
            %src,
            reason = ?why,
            dropped = *unlogged,
            "dropping datagrams (this one, and the count since the last warning)"
        );
        *last = Some(now);
        *unlogged = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tunnel::node::tunnels::Drop;

    #[test]
    fn a_silent_beacon_is_reported_once_and_its_return_once() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut w = BeaconWatch::default();
        assert_eq!(w.answering(), None);
        // Answered each time.
        assert_eq!(w.on_send(at(0), None), None);
        assert_eq!(w.on_send(at(30), Some(at(1))), None);
        assert_eq!(w.answering(), Some(true));
        // Then silent: the third unanswered discover warns, later ones do not.
        assert_eq!(w.on_send(at(60), Some(at(31))), None);
        assert_eq!(w.on_send(at(90), Some(at(31))), None);
        assert_eq!(w.on_send(at(120), Some(at(31))), None);
        assert_eq!(
            w.on_send(at(150), Some(at(31))),
            Some(BeaconNews::Silent(3))
        );
        assert_eq!(w.answering(), Some(false));
        assert_eq!(w.on_send(at(180), Some(at(31))), None);
        // It answers again.
        assert_eq!(
            w.on_send(at(210), Some(at(181))),
            Some(BeaconNews::Answering)
        );
        assert_eq!(w.answering(), Some(true));
        assert_eq!(w.on_send(at(240), Some(at(211))), None);
    }

    #[test]
    fn punch_packets_are_counted_not_warned_about() {
        assert!(!worth_a_warning(Drop::Punch));
        for why in [Drop::Undecryptable, Drop::Replayed, Drop::Malformed] {
            assert!(worth_a_warning(why), "{why:?}");
        }
    }
}
