//! The data path of `pilotd up`: kernel packets on the TUN interface to Pilot streams and
//! datagrams, and back.
//!
//! ```text
//!  app ──TCP──▶ pilot0 ──▶ [tun loop: Hairpin rewrite] ──▶ pilot0 ──▶ hairpin listener ──┐
//!                                                                                        │ splice
//!  kernel listener ◀── pilot0 ◀── [Hairpin rewrite] ◀── pilot0 ◀── connect(fake) ◀──┐    │
//!                                                                                   │    ▼
//!                                                   fallback listener (Incoming) ───┘  engine
//! ```
//!
//! - **Outbound TCP.** The tun loop hands a new SYN to [`Hairpin`], which holds it while the
//!   engine dials the peer. Once the Pilot handshake is done the SYN is released, rewritten so
//!   that it reaches this module's *hairpin listener* (bound to the node's ULA) from a fake
//!   address; the accepted kernel socket is spliced to the Pilot connection. A dial that fails
//!   answers the application with a TCP RST (refused), ICMPv6 administratively prohibited (the
//!   registry will not resolve the peer for us) or ICMPv6 address unreachable (anything else),
//!   so `connect()` never succeeds to a peer that is not there.
//! - **Inbound TCP.** Attempts to ports no one listens on reach the engine's fallback listener.
//!   Those from trusted peers (or to exposed ports) are offered to the kernel: a socket bound
//!   to the node's ULA connects to a fake address that the hairpin rewrites into the caller's
//!   ULA and port, so the kernel listener sees the caller as its peer. Only when the kernel
//!   accepted is the Pilot attempt accepted; a kernel RST refuses it.
//! - **UDP** to a peer's ULA is a Pilot datagram, port for port. Datagrams to ports no one
//!   listens on are written to the TUN as UDP from the sender's ULA when the sender may reach
//!   the port (trusted, or the port exposed) or answers a datagram sent to it from that port
//!   in the last [`UDP_FLOW_TIMEOUT`].
//! - **ICMPv6 echo** to a peer's ULA is a round trip through the peer's echo port (7), over one
//!   stream per peer kept open for its pings; the reply
//!   comes back as an ICMPv6 echo reply, so `ping` shows the real round-trip time.
//!
//! - **DNS for `.pilot`** is answered here, at [`dns::RESOLVER`] port 53 (no socket):
//!   `<hostname>.pilot` AAAA through the registry (whose privacy rules decide who may resolve a
//!   private node), the numeric form `0-0000-0000-002a.pilot` at once, and PTR for node ULAs;
//!   answers are cached for a short time ([`dns::POSITIVE_TTL`], [`dns::NEGATIVE_TTL`]).
//!
//! The tun loop allocates nothing per forwarded TCP packet: it classifies and rewrites in place
//! and writes the packet back (a UDP payload is copied once into the engine's command). Work
//! that waits (dials, echo round trips, kernel connects, registry lookups) runs in tasks of its
//! own, which write their packets to the device directly.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinHandle;
use tun_rs::AsyncDevice;
use tunnel::inside::dns::{self, CacheKey, CacheValue, DnsCache, Name, Query, Rcode};
use tunnel::inside::{
    build_echo_reply, build_udp, ChecksumMode, DropReason, FlowInfo, FlowKey, Hairpin,
    HairpinConfig, HairpinStats, Refusal, Verdict,
};
use tunnel::node::CloseReason;
use tunnel::{ula, Addr, SocketAddr as PilotAddr};

use crate::engine::{
    AppEvent, BindError, Cmd, ConnId, DialError, EngineHandle, CONN_QUEUE, READ_CHUNK,
};
use crate::ratelog::LogGate;
use crate::registry_link::{self, LinkCmd, LinkError};
use crate::trust::Gate;

/// How long a datagram sent from a local port lets the peer's answers to that port in.
pub const UDP_FLOW_TIMEOUT: Duration = Duration::from_secs(120);
/// Outbound UDP flows remembered for their answers.
const MAX_UDP_FLOWS: usize = 4_096;
/// How long an outbound dial may take before the application is told the peer is unreachable:
/// longer than the Pilot handshake's own retries, so a SYN the peer's rate limit dropped gets its
/// retransmissions (the kernel's own connect gives up after about two minutes).
const DIAL_TIMEOUT: Duration = Duration::from_secs(60);
/// Attempts and datagrams queued for the fallback loop: as many attempts as the node core keeps
/// undecided, so a burst of connections is not refused for want of queue room.
const FALLBACK_QUEUE: usize = tunnel::stream::MAX_DEFERRED;
/// How long the kernel may take to accept an inbound connection.
const KERNEL_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an echo round trip may take.
const ECHO_TIMEOUT: Duration = Duration::from_secs(5);
/// Echo round trips in flight at once; further requests are dropped (a ping flood must not
/// open a connection per packet without bound).
const MAX_ECHOES: usize = 64;
/// Peers with an echo stream kept open for their pings.
const MAX_ECHO_LINKS: usize = 256;
/// How long a dialed connection waits for the kernel's side to reach the hairpin listener
/// after its SYN was released; then it is aborted.
const HAIRPIN_ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest wait between two passes over the hairpin's timers.
const TIMER_PASS: Duration = Duration::from_secs(1);
/// One log line of a kind per this interval.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// Room for one packet of the largest MTU and its headers.
const PACKET_BUF: usize = 65_536 + 128;
/// Room for any packet the data path builds (an ICMPv6 error quotes at most 1,280 bytes).
const SMALL_BUF: usize = 1_280;

/// What the data path needs besides the device and the engine.
#[derive(Debug, Clone)]
pub struct InsideConfig {
    /// This node's Pilot address.
    pub own: Addr,
    /// The registry link, for names.
    pub link: mpsc::Sender<LinkCmd>,
    /// Ports any caller may reach on the kernel; others only trusted peers.
    pub expose: Vec<u16>,
    /// The trust gate (who is trusted).
    pub gate: Arc<Gate>,
}

/// Why the data path could not start.
#[derive(Debug, thiserror::Error)]
pub enum InsideError {
    /// The hairpin listener could not be bound on the node's ULA.
    #[error("binding the hairpin listener on [{addr}]:0: {source}")]
    Listener {
        /// The node's ULA.
        addr: Ipv6Addr,
        /// The error.
        source: io::Error,
    },
    /// The engine's fallback listener is taken or the engine stopped.
    #[error("taking the ports no one listens on: {0}")]
    Fallback(#[from] BindError),
}

/// Counters of the data path (besides the hairpin's own).
#[derive(Debug, Default)]
struct Counters {
    outbound_dials: AtomicU64,
    outbound_refused: AtomicU64,
    inbound_offered: AtomicU64,
    inbound_refused: AtomicU64,
    datagrams_out: AtomicU64,
    datagrams_in: AtomicU64,
    datagrams_refused: AtomicU64,
    echoes: AtomicU64,
    echoes_dropped: AtomicU64,
    dns_answers: AtomicU64,
    dns_dropped: AtomicU64,
    device_errors: AtomicU64,
}

/// A snapshot of the data path's counters.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct InsideStats {
    /// Outbound connections dialed.
    pub outbound_dials: u64,
    /// Outbound connections answered with a refusal (RST or ICMPv6).
    pub outbound_refused: u64,
    /// Inbound attempts offered to the kernel.
    pub inbound_offered: u64,
    /// Inbound attempts refused (not allowed, or the kernel refused).
    pub inbound_refused: u64,
    /// UDP datagrams sent as Pilot datagrams.
    pub datagrams_out: u64,
    /// Pilot datagrams written to the TUN as UDP.
    pub datagrams_in: u64,
    /// Pilot datagrams dropped: the sender may not reach the port.
    pub datagrams_refused: u64,
    /// Echo requests answered.
    pub echoes: u64,
    /// Echo requests dropped: too many round trips in flight.
    pub echoes_dropped: u64,
    /// DNS queries answered.
    pub dns_answers: u64,
    /// DNS queries dropped (unreadable, or a response).
    pub dns_dropped: u64,
    /// Reads or writes on the device that failed.
    pub device_errors: u64,
    /// Live hairpin entries.
    pub flows: usize,
    /// Packets dropped by the classifier, per reason.
    pub dropped: HashMap<&'static str, u64>,
}

/// A peer's echo stream (port 7), its pings' round trips one after the other.
#[derive(Debug)]
struct EchoLink {
    conn: ConnId,
    credit: Arc<Semaphore>,
    events: mpsc::Receiver<AppEvent>,
}

/// A peer's echo stream, once dialed; locked for the length of one round trip.
type EchoSlot = Arc<tokio::sync::Mutex<Option<EchoLink>>>;

/// An outbound connection dialed, waiting for the kernel's side to reach the hairpin listener.
#[derive(Debug)]
struct Dialed {
    conn: ConnId,
    credit: Arc<Semaphore>,
    events: mpsc::Receiver<AppEvent>,
}

struct Shared {
    device: Arc<AsyncDevice>,
    engine: EngineHandle,
    hairpin: Mutex<Hairpin>,
    dialed: Mutex<HashMap<FlowKey, Dialed>>,
    /// (local port, peer, peer port) of datagrams sent lately, and when.
    udp_flows: Mutex<HashMap<(u16, Addr, u16), Instant>>,
    /// Room for echo round trips in flight.
    echo_room: Arc<Semaphore>,
    /// One echo stream per peer, reused by its pings so a ping costs one round trip.
    echo_links: Mutex<HashMap<Addr, EchoSlot>>,
    /// Names resolved lately, for DNS answers.
    dns_cache: Mutex<DnsCache>,
    config: InsideConfig,
    own_ip: Ipv6Addr,
    counters: Counters,
    log_drop: LogGate,
    log_device: LogGate,
    /// The last answer to a firewall probe SYN (see [`Inside::probe_answers`]).
    probe: watch::Sender<Option<ProbeAnswer>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("own_ip", &self.own_ip)
            .field("config", &self.config)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A SYN-ACK the kernel sent to [`tunnel::inside::PROBE_ADDR`]: proof that a probe SYN passed
/// the host's input filtering and reached a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeAnswer {
    /// The listener's port.
    pub port: u16,
    /// The probe's source port.
    pub probe_port: u16,
    /// The probe's initial sequence number plus one.
    pub ack: u32,
}

/// The running data path; dropping it stops it.
#[derive(Debug)]
pub struct Inside {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl Inside {
    /// Starts the data path on `device` (the TUN interface carrying the node's ULA).
    pub async fn start(
        device: Arc<AsyncDevice>,
        engine: EngineHandle,
        config: InsideConfig,
    ) -> Result<Inside, InsideError> {
        let own_ip = ula::to_ipv6(config.own);
        let listener = TcpListener::bind(SocketAddr::V6(SocketAddrV6::new(own_ip, 0, 0, 0)))
            .await
            .map_err(|source| InsideError::Listener {
                addr: own_ip,
                source,
            })?;
        let port = listener
            .local_addr()
            .map_err(|source| InsideError::Listener {
                addr: own_ip,
                source,
            })?
            .port();
        let (ftx, frx) = mpsc::channel(FALLBACK_QUEUE);
        engine.listen_fallback(ftx).await?;
        let shared = Arc::new(Shared {
            device,
            engine,
            hairpin: Mutex::new(Hairpin::new(HairpinConfig::new(config.own, port))),
            dialed: Mutex::new(HashMap::new()),
            udp_flows: Mutex::new(HashMap::new()),
            echo_room: Arc::new(Semaphore::new(MAX_ECHOES)),
            echo_links: Mutex::new(HashMap::new()),
            dns_cache: Mutex::new(DnsCache::default()),
            config,
            own_ip,
            counters: Counters::default(),
            log_drop: LogGate::new(LOG_EVERY),
            log_device: LogGate::new(LOG_EVERY),
            probe: watch::channel(None).0,
        });
        tracing::info!(listener = port, ula = %own_ip, "data path started");
        let tasks = vec![
            tokio::spawn(tun_loop(shared.clone())),
            tokio::spawn(accept_loop(shared.clone(), listener)),
            tokio::spawn(fallback_loop(shared.clone(), frx)),
            tokio::spawn(timer_loop(shared.clone())),
        ];
        Ok(Inside { shared, tasks })
    }

    /// The data path's counters now.
    pub fn stats(&self) -> InsideStats {
        self.shared.stats()
    }

    /// The kernel's answers to probe SYNs from [`tunnel::inside::PROBE_ADDR`], newest first
    /// (the firewall self-test's TCP probe).
    pub fn probe_answers(&self) -> watch::Receiver<Option<ProbeAnswer>> {
        self.shared.probe.subscribe()
    }

    /// A source of the counters that does not keep the data path alive: `None` once it is gone.
    pub fn reporter(&self) -> impl Fn() -> Option<InsideStats> + Send + Sync + 'static {
        let shared = Arc::downgrade(&self.shared);
        move || shared.upgrade().map(|s| s.stats())
    }

    /// Stops the data path: the fallback listener is given up and the loops end. Spliced
    /// connections end with the engine's shutdown.
    pub async fn stop(self) {
        let _ = self.shared.engine.send(Cmd::UnlistenFallback).await;
    }
}

impl Drop for Inside {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Shared {
    /// Sends a DNS answer from the resolver address to the querying socket.
    async fn dns_reply(&self, client_port: u16, answer: &[u8]) {
        if answer.is_empty() {
            self.counters.dns_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut out = [0u8; dns::MAX_UDP_PAYLOAD + 64];
        let from = SocketAddrV6::new(dns::RESOLVER, dns::PORT, 0, 0);
        let to = SocketAddrV6::new(self.own_ip, client_port, 0, 0);
        if let Ok(n) = build_udp(from, to, answer, &mut out) {
            self.counters.dns_answers.fetch_add(1, Ordering::Relaxed);
            self.write(&out[..n]).await;
        }
    }

    fn stats(&self) -> InsideStats {
        let c = &self.counters;
        let h: HairpinStats = lock(&self.hairpin).stats();
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        InsideStats {
            outbound_dials: get(&c.outbound_dials),
            outbound_refused: get(&c.outbound_refused),
            inbound_offered: get(&c.inbound_offered),
            inbound_refused: get(&c.inbound_refused),
            datagrams_out: get(&c.datagrams_out),
            datagrams_in: get(&c.datagrams_in),
            datagrams_refused: get(&c.datagrams_refused),
            echoes: get(&c.echoes),
            echoes_dropped: get(&c.echoes_dropped),
            dns_answers: get(&c.dns_answers),
            dns_dropped: get(&c.dns_dropped),
            device_errors: get(&c.device_errors),
            flows: h.live,
            dropped: DropReason::ALL
                .iter()
                .map(|r| (r.as_str(), h.dropped(*r)))
                .filter(|(_, n)| *n > 0)
                .collect(),
        }
    }

    /// Whether `peer` may reach the kernel's `port`: trusted, or the port exposed.
    fn may_reach(&self, peer: Addr, port: u16) -> bool {
        self.config.expose.contains(&port) || self.config.gate.is_trusted(peer.node)
    }

    /// Remembers that `local_port` sent a datagram to `peer`, so its answers come in.
    fn udp_sent(&self, now: Instant, local_port: u16, peer: PilotAddr) {
        let mut flows = lock(&self.udp_flows);
        let key = (local_port, peer.addr, peer.port);
        if flows.len() >= MAX_UDP_FLOWS && !flows.contains_key(&key) {
            flows.retain(|_, t| now.duration_since(*t) < UDP_FLOW_TIMEOUT);
            if flows.len() >= MAX_UDP_FLOWS {
                return;
            }
        }
        flows.insert(key, now);
    }

    /// Whether a datagram from `peer` to `local_port` answers one sent lately.
    fn udp_answers(&self, now: Instant, local_port: u16, peer: PilotAddr) -> bool {
        lock(&self.udp_flows)
            .get(&(local_port, peer.addr, peer.port))
            .is_some_and(|t| now.duration_since(*t) < UDP_FLOW_TIMEOUT)
    }

    /// Writes one packet to the TUN; failures are counted and logged, rate-limited.
    async fn write(&self, packet: &[u8]) {
        if let Err(e) = self.device.send(packet).await {
            self.counters.device_errors.fetch_add(1, Ordering::Relaxed);
            if let Some(held) = self.log_device.allow() {
                tracing::warn!(error = %e, held_back = held, "writing to the TUN device failed");
            }
        }
    }
}

/// Reads the TUN: rewrites what the hairpin knows and writes it back, starts dials and echo
/// round trips, sends datagrams.
async fn tun_loop(shared: Arc<Shared>) {
    let mut buf = vec![0u8; PACKET_BUF];
    loop {
        let n = match shared.device.recv(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                shared
                    .counters
                    .device_errors
                    .fetch_add(1, Ordering::Relaxed);
                if let Some(held) = shared.log_device.allow() {
                    tracing::warn!(error = %e, held_back = held, "reading the TUN device failed");
                }
                if e.kind() == io::ErrorKind::Interrupted || e.kind() == io::ErrorKind::WouldBlock {
                    continue;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let verdict = lock(&shared.hairpin).handle_packet(
            Instant::now(),
            &mut buf[..n],
            ChecksumMode::Complete,
        );
        match verdict {
            Verdict::Rewritten { len } | Verdict::Reply { len } => shared.write(&buf[..len]).await,
            Verdict::Connect(info) => {
                shared
                    .counters
                    .outbound_dials
                    .fetch_add(1, Ordering::Relaxed);
                tokio::spawn(dial_outbound(shared.clone(), info));
            }
            Verdict::SynRetransmit(_) => {}
            Verdict::ProbeSynAck {
                port,
                probe_port,
                ack,
            } => {
                shared.probe.send_replace(Some(ProbeAnswer {
                    port,
                    probe_port,
                    ack,
                }));
            }
            Verdict::Datagram {
                peer,
                peer_port,
                local_port,
                payload,
            } => {
                shared
                    .counters
                    .datagrams_out
                    .fetch_add(1, Ordering::Relaxed);
                let dst = PilotAddr::new(peer, peer_port);
                shared.udp_sent(Instant::now(), local_port, dst);
                let cmd = Cmd::SendTo {
                    dst,
                    src_port: Some(local_port),
                    data: buf[payload].to_vec(),
                };
                if shared.engine.send(cmd).await.is_err() {
                    return;
                }
            }
            Verdict::EchoRequest {
                peer,
                ident,
                seq,
                payload,
            } => match shared.echo_room.clone().try_acquire_owned() {
                Ok(permit) => {
                    let data = buf[payload].to_vec();
                    tokio::spawn(echo(shared.clone(), peer, ident, seq, data, permit));
                }
                Err(_) => {
                    shared
                        .counters
                        .echoes_dropped
                        .fetch_add(1, Ordering::Relaxed);
                }
            },
            Verdict::DnsQuery {
                client_port,
                payload,
            } => {
                if let Some(task) = dns_query(&shared, client_port, &buf[payload]).await {
                    tokio::spawn(task);
                }
            }
            Verdict::Drop(reason) => {
                if let Some(held) = shared.log_drop.allow() {
                    tracing::debug!(
                        reason = reason.as_str(),
                        held_back = held,
                        "TUN packet dropped"
                    );
                }
            }
        }
    }
}

/// Frees hairpin entries whose linger ended.
async fn timer_loop(shared: Arc<Shared>) {
    loop {
        let next = {
            let mut h = lock(&shared.hairpin);
            let now = Instant::now();
            h.handle_timeout(now);
            h.poll_timeout()
                .map_or(now + TIMER_PASS, |t| t.min(now + TIMER_PASS))
        };
        tokio::time::sleep_until(next.into()).await;
    }
}

/// How an application is told that its outbound dial failed.
fn refusal_for(e: &DialError) -> Refusal {
    match e {
        DialError::Closed(CloseReason::Refused | CloseReason::Reset) => Refusal::Reset,
        e if e.is_forbidden() => Refusal::Prohibited,
        _ => Refusal::Unreachable,
    }
}

/// Dials the peer of a held SYN; releases the SYN towards the hairpin listener once the Pilot
/// connection is up, or answers the application with a refusal.
async fn dial_outbound(shared: Arc<Shared>, info: FlowInfo) {
    let (tx, rx) = mpsc::channel(CONN_QUEUE);
    let dst = PilotAddr::new(info.peer, info.peer_port);
    let dialed = tokio::time::timeout(DIAL_TIMEOUT, shared.engine.dial(dst, tx)).await;
    let mut out = [0u8; SMALL_BUF];
    let refusal = match dialed {
        Ok(Ok((conn, credit))) => {
            lock(&shared.dialed).insert(
                info.key,
                Dialed {
                    conn,
                    credit,
                    events: rx,
                },
            );
            let released = lock(&shared.hairpin).accept_outbound(info.key, &mut out);
            match released {
                Ok(n) => {
                    shared.write(&out[..n]).await;
                    // The kernel answers a released SYN at once; if its side never reaches
                    // the listener (the application went away), the connection is dropped.
                    tokio::time::sleep(HAIRPIN_ACCEPT_TIMEOUT).await;
                    let stale = lock(&shared.dialed).remove(&info.key);
                    if let Some(d) = stale {
                        tracing::debug!(peer = %dst, "the kernel's side never arrived; connection aborted");
                        let _ = shared.engine.send(Cmd::Abort { conn: d.conn }).await;
                    }
                    return;
                }
                Err(e) => {
                    // The application gave up meanwhile (its entry is gone).
                    tracing::debug!(peer = %dst, error = %e, "outbound connection dropped");
                    lock(&shared.dialed).remove(&info.key);
                    let _ = shared.engine.send(Cmd::Abort { conn }).await;
                    return;
                }
            }
        }
        Ok(Err(e)) => {
            tracing::debug!(peer = %dst, error = %e, "outbound dial failed");
            refusal_for(&e)
        }
        Err(_) => {
            tracing::debug!(peer = %dst, "outbound dial timed out");
            Refusal::Unreachable
        }
    };
    shared
        .counters
        .outbound_refused
        .fetch_add(1, Ordering::Relaxed);
    let answer = lock(&shared.hairpin).refuse_outbound(info.key, refusal, &mut out);
    if let Ok(n) = answer {
        shared.write(&out[..n]).await;
    }
}

/// Accepts the kernel's side of outbound connections and splices each to its Pilot connection.
async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                if let Some(held) = shared.log_device.allow() {
                    tracing::warn!(error = %e, held_back = held, "hairpin listener: accept failed");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let SocketAddr::V6(peer) = peer else {
            continue;
        };
        // Only connections the hairpin made reach this far with a known fake peer; anything
        // else (a local program connecting to the listener's port) is dropped.
        let Some(info) = lock(&shared.hairpin).outbound_for(peer) else {
            reset(stream);
            continue;
        };
        let Some(d) = lock(&shared.dialed).remove(&info.key) else {
            reset(stream);
            continue;
        };
        tokio::spawn(splice(shared.clone(), stream, d.conn, d.credit, d.events));
    }
}

/// Takes attempts and datagrams to ports no one listens on.
async fn fallback_loop(shared: Arc<Shared>, mut rx: mpsc::Receiver<AppEvent>) {
    let mut out = vec![0u8; PACKET_BUF];
    while let Some(ev) = rx.recv().await {
        match ev {
            AppEvent::Incoming { id, port, remote } => {
                if shared.may_reach(remote.addr, port) {
                    shared
                        .counters
                        .inbound_offered
                        .fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(inbound(shared.clone(), id, port, remote));
                } else {
                    shared
                        .counters
                        .inbound_refused
                        .fetch_add(1, Ordering::Relaxed);
                    if shared.engine.refuse_incoming(id).await.is_err() {
                        return;
                    }
                }
            }
            AppEvent::Datagram {
                src,
                dst_port,
                data,
            } => {
                if !shared.may_reach(src.addr, dst_port)
                    && !shared.udp_answers(Instant::now(), dst_port, src)
                {
                    shared
                        .counters
                        .datagrams_refused
                        .fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let from = SocketAddrV6::new(ula::to_ipv6(src.addr), src.port, 0, 0);
                let to = SocketAddrV6::new(shared.own_ip, dst_port, 0, 0);
                if let Ok(n) = build_udp(from, to, &data, &mut out) {
                    shared.counters.datagrams_in.fetch_add(1, Ordering::Relaxed);
                    shared.write(&out[..n]).await;
                }
            }
            AppEvent::Accepted { .. } | AppEvent::Data { .. } | AppEvent::Closed { .. } => {}
        }
    }
}

/// Offers an inbound attempt to the kernel listener on `port`, as from the caller's ULA; the
/// attempt is accepted only once the kernel accepted.
async fn inbound(shared: Arc<Shared>, id: tunnel::node::IncomingId, port: u16, remote: PilotAddr) {
    let caller = SocketAddrV6::new(ula::to_ipv6(remote.addr), remote.port, 0, 0);
    let prepared = lock(&shared.hairpin).prepare_inbound(caller, port);
    let info = match prepared {
        Ok(i) => i,
        Err(e) => {
            tracing::debug!(peer = %remote, port, error = %e, "inbound connection refused");
            shared
                .counters
                .inbound_refused
                .fetch_add(1, Ordering::Relaxed);
            let _ = shared.engine.refuse_incoming(id).await;
            return;
        }
    };
    let connected = async {
        let socket = TcpSocket::new_v6()?;
        socket.bind(SocketAddr::V6(SocketAddrV6::new(shared.own_ip, 0, 0, 0)))?;
        socket.connect(SocketAddr::V6(info.fake)).await
    };
    let stream = match tokio::time::timeout(KERNEL_CONNECT_TIMEOUT, connected).await {
        Ok(Ok(s)) => s,
        other => {
            let why = match other {
                Ok(Err(e)) => e.to_string(),
                _ => "timed out".to_owned(),
            };
            tracing::debug!(peer = %remote, port, error = %why, "the kernel refused an inbound connection");
            {
                let mut h = lock(&shared.hairpin);
                if !h.cancel_inbound(info.fake) {
                    h.remove(info.key);
                }
            }
            shared
                .counters
                .inbound_refused
                .fetch_add(1, Ordering::Relaxed);
            let _ = shared.engine.refuse_incoming(id).await;
            return;
        }
    };
    let (tx, rx) = mpsc::channel(CONN_QUEUE);
    match shared.engine.accept_incoming(id, tx).await {
        Ok((conn, credit)) => splice(shared, stream, conn, credit, rx).await,
        Err(e) => {
            tracing::debug!(peer = %remote, port, error = %e, "inbound connection lost before it was established");
            reset(stream);
        }
    }
}

/// Closes `stream` with an RST.
fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// Moves bytes both ways between a kernel socket and a Pilot connection until both directions
/// finished; a reset on either side resets the other.
async fn splice(
    shared: Arc<Shared>,
    stream: TcpStream,
    conn: ConnId,
    credit: Arc<Semaphore>,
    mut events: mpsc::Receiver<AppEvent>,
) {
    let _ = stream.set_nodelay(true);
    let engine = shared.engine.clone();
    let (mut rd, mut wr) = stream.into_split();
    let failed = {
        let up = async {
            let mut buf = vec![0u8; READ_CHUNK];
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) => {
                        let _ = engine.send(Cmd::Close { conn }).await;
                        return true;
                    }
                    Ok(n) => {
                        if engine.write(conn, &credit, &buf[..n]).await.is_err() {
                            return false;
                        }
                    }
                    Err(_) => {
                        let _ = engine.send(Cmd::Abort { conn }).await;
                        return false;
                    }
                }
            }
        };
        let down = async {
            while let Some(ev) = events.recv().await {
                match ev {
                    AppEvent::Data { data, .. } => {
                        if wr.write_all(&data).await.is_err() {
                            let _ = engine.send(Cmd::Abort { conn }).await;
                            return false;
                        }
                    }
                    AppEvent::Closed { error: None, .. } => {
                        let _ = wr.shutdown().await;
                        return true;
                    }
                    AppEvent::Closed { error: Some(_), .. } => return false,
                    AppEvent::Accepted { .. }
                    | AppEvent::Datagram { .. }
                    | AppEvent::Incoming { .. } => {}
                }
            }
            false
        };
        let (mut up, mut down) = (std::pin::pin!(up), std::pin::pin!(down));
        let (mut up_done, mut down_done) = (false, false);
        loop {
            tokio::select! {
                ok = &mut up, if !up_done => {
                    up_done = true;
                    if !ok { break true; }
                }
                ok = &mut down, if !down_done => {
                    down_done = true;
                    if !ok { break true; }
                }
            }
            if up_done && down_done {
                break false;
            }
        }
    };
    if failed {
        let _ = engine.send(Cmd::Abort { conn }).await;
        if let Ok(stream) = rd.reunite(wr) {
            reset(stream);
        }
    }
}

/// Answers an ICMPv6 echo request to `peer` with a round trip through its echo port.
async fn echo(
    shared: Arc<Shared>,
    peer: Addr,
    ident: u16,
    seq: u16,
    payload: Vec<u8>,
    _room: tokio::sync::OwnedSemaphorePermit,
) {
    let engine = shared.engine.clone();
    let (slot, stale) = {
        let mut links = lock(&shared.echo_links);
        let mut stale = Vec::new();
        if links.len() >= MAX_ECHO_LINKS && !links.contains_key(&peer) {
            // Drop the links no round trip holds now; their streams are closed below.
            links.retain(|_, l| {
                let busy = Arc::strong_count(l) > 1;
                if !busy {
                    if let Ok(mut l) = l.try_lock() {
                        stale.extend(l.take().map(|l| l.conn));
                    }
                }
                busy
            });
        }
        (links.entry(peer).or_default().clone(), stale)
    };
    for conn in stale {
        let _ = engine.send(Cmd::Close { conn }).await;
    }
    // One round trip at a time per peer: the echoed bytes of one ping are the next to arrive.
    let mut link = slot.lock().await;
    let round_trip = async {
        if link.is_none() {
            let (tx, events) = mpsc::channel(CONN_QUEUE);
            let (conn, credit) = engine
                .dial(PilotAddr::new(peer, crate::services::ECHO_PORT), tx)
                .await
                .ok()?;
            *link = Some(EchoLink {
                conn,
                credit,
                events,
            });
        }
        let l = link.as_mut()?;
        if payload.is_empty() {
            return Some(());
        }
        engine.write(l.conn, &l.credit, &payload).await.ok()?;
        let mut got = 0usize;
        while got < payload.len() {
            match l.events.recv().await? {
                AppEvent::Data { data, .. } => got += data.len(),
                AppEvent::Closed { .. } => return None,
                _ => {}
            }
        }
        (got == payload.len()).then_some(())
    };
    let answered = tokio::time::timeout(ECHO_TIMEOUT, round_trip)
        .await
        .ok()
        .flatten()
        .is_some();
    if !answered {
        // The stream's state is unknown now (bytes may still be on their way): start afresh.
        if let Some(l) = link.take() {
            let _ = engine.send(Cmd::Abort { conn: l.conn }).await;
        }
        return;
    }
    drop(link);
    let mut out = vec![0u8; payload.len() + 128];
    if let Ok(n) = build_echo_reply(
        ula::to_ipv6(peer),
        shared.own_ip,
        ident,
        seq,
        &payload,
        &mut out,
    ) {
        shared.counters.echoes.fetch_add(1, Ordering::Relaxed);
        shared.write(&out[..n]).await;
    }
}

/// How long a registry request for a DNS answer may take (resolvers retry after about 5 s).
const DNS_REGISTRY_TIMEOUT: Duration = Duration::from_secs(3);

/// Answers a DNS query from the tun loop: at once when the answer needs nothing or is cached;
/// otherwise returns the task that asks the registry and answers then.
async fn dns_query(
    shared: &Arc<Shared>,
    client_port: u16,
    message: &[u8],
) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
    let mut out = [0u8; dns::MAX_UDP_PAYLOAD];
    let query = match dns::parse(message) {
        Ok(q) => q,
        Err(e) => {
            let answer = match e.rcode() {
                Some(rcode) => dns::answer_header_only(message, rcode, &mut out)
                    .ok()
                    .flatten(),
                None => None,
            };
            match answer {
                Some(n) => shared.dns_reply(client_port, &out[..n]).await,
                None => {
                    shared.counters.dns_dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
            return None;
        }
    };
    let key = match query.kind() {
        Name::Address(addr) => {
            let n = dns_answer(&query, Some(&CacheValue::Ula(ula::to_ipv6(addr))), &mut out);
            shared.dns_reply(client_port, &out[..n]).await;
            return None;
        }
        Name::Hostname(h) => CacheKey::Hostname(h),
        Name::Reverse(addr) => CacheKey::Address(addr),
        Name::Empty => {
            let n = dns::answer_empty(&query, &mut out).unwrap_or(0);
            shared.dns_reply(client_port, &out[..n]).await;
            return None;
        }
        Name::NotFound => {
            let n = dns::answer_nxdomain(&query, &mut out).unwrap_or(0);
            shared.dns_reply(client_port, &out[..n]).await;
            return None;
        }
        Name::Other => {
            let n = dns::answer_error(&query, Rcode::Refused, &mut out).unwrap_or(0);
            shared.dns_reply(client_port, &out[..n]).await;
            return None;
        }
    };
    let cached = lock(&shared.dns_cache)
        .get(Instant::now(), &key)
        .map(|(v, _)| v.clone());
    if let Some(v) = cached {
        let n = dns_answer(&query, Some(&v), &mut out);
        shared.dns_reply(client_port, &out[..n]).await;
        return None;
    }
    let shared = shared.clone();
    Some(async move {
        let mut out = [0u8; dns::MAX_UDP_PAYLOAD];
        let n = match resolve(&shared, &key).await {
            Ok((value, ttl)) => {
                lock(&shared.dns_cache).insert(Instant::now(), key, value.clone(), ttl);
                dns_answer(&query, Some(&value), &mut out)
            }
            Err(_) => dns_answer(&query, None, &mut out),
        };
        shared.dns_reply(client_port, &out[..n]).await;
    })
}

/// The answer to `query` for what its name resolved to (`None`: the registry could not be
/// asked, SERVFAIL); its length in `out` (0 if it could not be built).
fn dns_answer(query: &Query, value: Option<&CacheValue>, out: &mut [u8]) -> usize {
    let r = match value {
        None => dns::answer_error(query, Rcode::ServFail, out),
        Some(CacheValue::Negative) => dns::answer_nxdomain(query, out),
        Some(CacheValue::Ula(ip)) if query.qtype == dns::rtype::AAAA => {
            dns::answer_aaaa(query, *ip, dns::POSITIVE_TTL, out)
        }
        Some(CacheValue::Hostname(h)) if query.qtype == dns::rtype::PTR => {
            dns::answer_ptr(query, &format!("{h}.{}", dns::ZONE), dns::POSITIVE_TTL, out)
        }
        // The name exists; not with this type.
        Some(_) => dns::answer_empty(query, out),
    };
    r.unwrap_or(0)
}

/// Asks the registry what `key` names: a hostname's node (as its ULA) or a node's hostname
/// (its numeric name when it has none). A name the registry does not know, or will not
/// resolve for this node, is negative; an unreachable registry is an error.
async fn resolve(shared: &Shared, key: &CacheKey) -> Result<(CacheValue, Duration), LinkError> {
    let request = match key {
        CacheKey::Hostname(h) => {
            serde_json::json!({"type": "resolve_hostname", "hostname": h, "requester_id": null})
        }
        CacheKey::Address(a) => serde_json::json!({"type": "lookup", "node_id": a.node}),
    };
    let ask = |request: serde_json::Value| {
        registry_link::request(
            &shared.config.link,
            |tx| LinkCmd::Call(request, tx),
            DNS_REGISTRY_TIMEOUT,
        )
    };
    let negative = Ok((CacheValue::Negative, dns::NEGATIVE_TTL));
    let v = match ask(request).await {
        Ok(v) => v,
        Err(LinkError::Refused { .. }) => return negative,
        Err(e) => return Err(e),
    };
    let value = match key {
        CacheKey::Hostname(_) => {
            let node = v
                .get("node_id")
                .and_then(serde_json::Value::as_u64)
                .and_then(|id| u32::try_from(id).ok())
                .filter(|id| *id != 0);
            let Some(node) = node else {
                return negative;
            };
            // The registry names any node; a private one's name resolves only for nodes the
            // registry lets resolve it (trust pair or shared network), as its endpoint does.
            if v.get("public").and_then(serde_json::Value::as_bool) == Some(false) {
                let resolve =
                    serde_json::json!({"type": "resolve", "node_id": node, "requester_id": null});
                match ask(resolve).await {
                    Ok(_) => {}
                    Err(LinkError::Refused { .. }) => return negative,
                    Err(e) => return Err(e),
                }
            }
            CacheValue::Ula(ula::to_ipv6(Addr::new(0, node)))
        }
        CacheKey::Address(a) => match v.get("hostname").and_then(serde_json::Value::as_str) {
            Some(h) if !h.is_empty() => CacheValue::Hostname(h.to_owned()),
            _ => {
                let numeric = dns::numeric_name(*a);
                let label = numeric
                    .strip_suffix(&format!(".{}", dns::ZONE))
                    .unwrap_or(&numeric);
                CacheValue::Hostname(label.to_owned())
            }
        },
    };
    let ttl = if value == CacheValue::Negative {
        dns::NEGATIVE_TTL
    } else {
        dns::POSITIVE_TTL
    };
    Ok((value, ttl))
}
