//! A multi-node simulator around the sans-IO node core ([`tunnel::node::Node`]): real Ed25519
//! identities, real X25519 / AES-GCM tunnels, UDP-level links with delay and seeded loss on a
//! virtual clock, a fake registry answering `NeedKey` / `NeedEndpoint` from memory (it may
//! refuse chosen resolutions, as the real one does without a trust pair), an optional beacon
//! that relays like the real one (a Relay frame rewritten in place to a RelayDeliver for the
//! destination's registered endpoint), and hosts behind a NAT that lets in only answers. No
//! sockets, no threads.
//!
//! Each node runs a small application: bulk senders ([`NodeNet::send`]) and sinks that hash
//! everything a listened port receives, so a test checks SHA-256 of what arrived.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ed25519_dalek::{SigningKey, VerifyingKey};
use rand_core::{CryptoRng, RngCore};
use sha2::{Digest, Sha256};
use tunnel::node::tunnels::TunnelConfig;
use tunnel::node::{
    CloseReason, ConnId, Event, IncomingId, ListenMode, Node, NodeConfig, TrustGate, WriteError,
    TRANSMIT_BUFFER,
};
use tunnel::stream::EndpointConfig;
use tunnel::wire::beacon::{self as bw, RELAY_HEADER_LEN};
use tunnel::{Addr, SocketAddr as PilotAddr};

use crate::sim::Rng;

/// The simulator's stand-in for the system's generator: seeded, so every run is identical.
#[derive(Debug, Clone)]
pub struct SeededRng(pub Rng);

impl RngCore for SeededRng {
    fn next_u32(&mut self) -> u32 {
        self.0.next_u64() as u32
    }
    fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for c in dest.chunks_mut(8) {
            let v = self.0.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

// Test double only: deterministic, not secret.
impl CryptoRng for SeededRng {}

/// A gate letting in only the listed peers.
#[derive(Debug, Default)]
pub struct AllowList(pub HashSet<u32>);

impl TrustGate for AllowList {
    fn allows(&self, peer: u32, _port: u16) -> bool {
        self.0.contains(&peer)
    }
}

/// Bytes a sink received on one connection.
#[derive(Debug, Default, Clone)]
pub struct Received {
    /// Bytes so far.
    pub len: u64,
    /// SHA-256 of them, once the stream ended.
    pub digest: Option<[u8; 32]>,
    hasher: Sha256,
}

/// A bulk sender on one connection.
#[derive(Debug)]
struct Sender {
    data: Vec<u8>,
    sent: usize,
    shut: bool,
}

/// One simulated host.
pub struct SimNode {
    /// The node core.
    pub node: Node<SeededRng>,
    /// Its UDP address.
    pub addr: SocketAddr,
    /// Node ID.
    pub id: u32,
    /// Identity.
    pub key: SigningKey,
    /// How each connection ended.
    pub closed: HashMap<ConnId, CloseReason>,
    /// What sinks received, per accepted connection.
    pub sinks: HashMap<ConnId, Received>,
    /// Datagrams received: (source, port, payload).
    pub datagrams: Vec<(PilotAddr, u16, Vec<u8>)>,
    /// Attempts the fallback listener reported, undecided: (id, port, remote).
    pub incoming: Vec<(IncomingId, u16, PilotAddr)>,
    /// Connections whose handshake completed (dialed or accepted from the fallback).
    pub connected: HashSet<ConnId>,
    /// Timer wakes handled.
    pub wakes: u64,
    senders: HashMap<ConnId, Sender>,
    up: bool,
}

impl std::fmt::Debug for SimNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimNode").field("id", &self.id).finish()
    }
}

struct InFlight {
    at: Instant,
    order: u64,
    src: SocketAddr,
    dst: SocketAddr,
    data: Vec<u8>,
}

impl PartialEq for InFlight {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.order) == (o.at, o.order)
    }
}
impl Eq for InFlight {}
impl PartialOrd for InFlight {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for InFlight {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.order).cmp(&(o.at, o.order))
    }
}

/// The simulated network of nodes.
pub struct NodeNet {
    /// Virtual time.
    pub now: Instant,
    /// The hosts.
    pub nodes: Vec<SimNode>,
    /// One-way delay of every datagram.
    pub delay: Duration,
    /// Probability a datagram is lost.
    pub loss: f64,
    /// The beacon's address, when there is one.
    pub beacon: Option<SocketAddr>,
    /// Pairs of UDP addresses between which direct datagrams are lost (a broken path).
    pub blocked: HashSet<(SocketAddr, SocketAddr)>,
    /// Hosts behind a NAT that lets a datagram in only from an address the host sent to
    /// before (the beacon's mapping is kept open by the host's Discovers).
    pub nat: HashSet<SocketAddr>,
    /// (requester, target) node IDs whose resolution the registry refuses (a private target
    /// without a trust pair).
    pub refused: HashSet<(u32, u32)>,
    /// Datagrams relayed by the beacon.
    pub relayed: u64,
    /// Connection settings of nodes made from now on.
    pub endpoint: EndpointConfig,
    registry: HashMap<u32, (VerifyingKey, SocketAddr)>,
    /// Resolutions asked, per (requester, target).
    resolves: HashMap<(u32, u32), u64>,
    /// (inside, outside) address pairs a NAT lets in: the inside host sent to the outside.
    opened: HashSet<(SocketAddr, SocketAddr)>,
    queue: BinaryHeap<Reverse<InFlight>>,
    order: u64,
    rng: Rng,
    buf: Vec<u8>,
}

impl std::fmt::Debug for NodeNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeNet")
            .field("nodes", &self.nodes.len())
            .finish()
    }
}

impl NodeNet {
    /// An empty network: `delay` each way, `loss` per datagram, randomness from `seed`.
    pub fn new(seed: u64, delay: Duration, loss: f64) -> Self {
        NodeNet {
            now: Instant::now(),
            nodes: Vec::new(),
            delay,
            loss,
            beacon: None,
            blocked: HashSet::new(),
            nat: HashSet::new(),
            refused: HashSet::new(),
            relayed: 0,
            endpoint: EndpointConfig::default(),
            registry: HashMap::new(),
            resolves: HashMap::new(),
            opened: HashSet::new(),
            queue: BinaryHeap::new(),
            order: 0,
            rng: Rng::new(seed),
            buf: vec![0u8; TRANSMIT_BUFFER],
        }
    }

    /// With a relaying beacon.
    pub fn with_beacon(mut self) -> Self {
        self.beacon = Some(SocketAddr::from(([10, 0, 0, 254], 9001)));
        self
    }

    fn make(&mut self, id: u32, key: SigningKey) -> Node<SeededRng> {
        let seed = self.rng.next_u64();
        Node::new(
            id,
            key,
            NodeConfig {
                endpoint: self.endpoint,
                tunnels: TunnelConfig {
                    refuse_plaintext: true,
                    beacon: self.beacon,
                },
                syn_per_sec: 0,
                syn_per_peer_per_sec: 0,
            },
            SeededRng(Rng::new(seed)),
        )
    }

    /// Adds a registered node; returns its index.
    pub fn add_node(&mut self, id: u32) -> usize {
        let mut seed = [0u8; 32];
        seed[..4].copy_from_slice(&id.to_be_bytes());
        seed[4..12].copy_from_slice(&self.rng.next_u64().to_le_bytes());
        let key = SigningKey::from_bytes(&seed);
        let addr = SocketAddr::from(([10, 0, 0, (self.nodes.len() + 1) as u8], 4000));
        self.registry.insert(id, (key.verifying_key(), addr));
        let node = self.make(id, key.clone());
        self.nodes.push(SimNode {
            node,
            addr,
            id,
            key,
            closed: HashMap::new(),
            sinks: HashMap::new(),
            datagrams: Vec::new(),
            incoming: Vec::new(),
            connected: HashSet::new(),
            wakes: 0,
            senders: HashMap::new(),
            up: true,
        });
        self.nodes.len() - 1
    }

    /// Restarts node `i`: same identity and address, a new process (new X25519 key, no
    /// sessions, no connections).
    pub fn restart(&mut self, i: usize) {
        let (id, key) = (self.nodes[i].id, self.nodes[i].key.clone());
        self.nodes[i].node = self.make(id, key);
        let n = &mut self.nodes[i];
        n.senders.clear();
        n.sinks.clear();
        n.closed.clear();
    }

    /// The Pilot address of node `i`.
    pub fn addr(&self, i: usize) -> Addr {
        Addr::new(0, self.nodes[i].id)
    }

    /// Node `i` listens on `port` and hashes what its connections receive.
    pub fn listen(&mut self, i: usize, port: u16) {
        self.nodes[i]
            .node
            .listen(port, ListenMode::Accept)
            .expect("a fresh port");
    }

    /// Node `i` accepts the fallback attempt `id` and hashes what the connection receives.
    pub fn accept_incoming(&mut self, i: usize, id: IncomingId) -> ConnId {
        let now = self.now;
        let n = &mut self.nodes[i];
        n.incoming.retain(|x| x.0 != id);
        let conn = n.node.accept_incoming(now, id).expect("a pending attempt");
        n.sinks.insert(conn, Received::default());
        conn
    }

    /// Resolutions of node `to`'s endpoint node `from` has asked the registry for.
    pub fn resolves(&self, from: usize, to: usize) -> u64 {
        let key = (self.nodes[from].id, self.nodes[to].id);
        self.resolves.get(&key).copied().unwrap_or(0)
    }

    /// Bytes node `from` has handed to its node on `conn` so far.
    pub fn sent(&self, from: usize, conn: ConnId) -> usize {
        self.nodes[from].senders.get(&conn).map_or(0, |s| s.sent)
    }

    /// Node `from` dials `to:port` and sends `data`, then finishes.
    pub fn send(&mut self, from: usize, to: usize, port: u16, data: Vec<u8>) -> ConnId {
        let dst = PilotAddr::new(self.addr(to), port);
        let now = self.now;
        let n = &mut self.nodes[from];
        let conn = n.node.dial(now, dst).expect("registered node dials");
        n.senders.insert(
            conn,
            Sender {
                data,
                sent: 0,
                shut: false,
            },
        );
        conn
    }

    /// Runs until `done` holds or `limit` of virtual time passed; returns whether `done`.
    pub fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&NodeNet) -> bool) -> bool {
        let end = self.now + limit;
        loop {
            self.settle();
            if done(self) {
                return true;
            }
            let next_packet = self.queue.peek().map(|Reverse(p)| p.at);
            let next_timer = self
                .nodes
                .iter_mut()
                .filter(|n| n.up)
                .filter_map(|n| n.node.poll_timeout())
                .min();
            let Some(next) = [next_packet, next_timer].into_iter().flatten().min() else {
                return false;
            };
            if next > end {
                return false;
            }
            self.now = self.now.max(next);
            let now = self.now;
            while self.queue.peek().is_some_and(|Reverse(p)| p.at <= now) {
                let Some(Reverse(p)) = self.queue.pop() else {
                    break;
                };
                self.deliver(p);
            }
            for n in self.nodes.iter_mut().filter(|n| n.up) {
                if n.node.poll_timeout().is_some_and(|t| t <= now) {
                    n.wakes += 1;
                    n.node.handle_timeout(now);
                }
            }
        }
    }

    fn deliver(&mut self, mut p: InFlight) {
        if Some(p.dst) == self.beacon {
            self.relay(p);
            return;
        }
        let now = self.now;
        if let Some(n) = self.nodes.iter_mut().find(|n| n.addr == p.dst && n.up) {
            n.node.handle_outside(now, p.src, &mut p.data);
        }
    }

    /// The beacon: a Relay frame becomes a RelayDeliver to the destination's registered
    /// endpoint (rewritten in place as the real beacon does); everything else is ignored.
    fn relay(&mut self, p: InFlight) {
        let Some(beacon) = self.beacon else { return };
        let d = &p.data;
        if d.len() < RELAY_HEADER_LEN || d[0] != bw::kind::RELAY {
            return;
        }
        let sender = u32::from_be_bytes([d[1], d[2], d[3], d[4]]);
        let dest = u32::from_be_bytes([d[5], d[6], d[7], d[8]]);
        let Some(&(_, ep)) = self.registry.get(&dest) else {
            return;
        };
        let mut out = p.data;
        let start = RELAY_HEADER_LEN - bw::RELAY_DELIVER_HEADER_LEN;
        out[start..RELAY_HEADER_LEN].copy_from_slice(&bw::relay_deliver_header(sender));
        out.drain(..start);
        self.relayed += 1;
        self.post(beacon, ep, out);
    }

    fn post(&mut self, src: SocketAddr, dst: SocketAddr, data: Vec<u8>) {
        if self.nat.contains(&src) {
            self.opened.insert((src, dst));
        }
        let filtered = self.nat.contains(&dst)
            && Some(src) != self.beacon
            && !self.opened.contains(&(dst, src));
        if self.rng.chance(self.loss) || self.blocked.contains(&(src, dst)) || filtered {
            return;
        }
        self.order += 1;
        self.queue.push(Reverse(InFlight {
            at: self.now + self.delay,
            order: self.order,
            src,
            dst,
            data,
        }));
    }

    /// Drains every node's events and transmissions at the current time.
    fn settle(&mut self) {
        loop {
            let mut any = false;
            for i in 0..self.nodes.len() {
                if !self.nodes[i].up {
                    continue;
                }
                any |= self.app(i);
                let now = self.now;
                let mut buf = std::mem::take(&mut self.buf);
                let src = self.nodes[i].addr;
                while let Some(t) = self.nodes[i].node.poll_transmit(now, &mut buf) {
                    any = true;
                    self.post(src, t.dst, buf[t.range()].to_vec());
                }
                self.buf = buf;
            }
            if !any {
                return;
            }
        }
    }

    /// Node `i`'s application and registry answers; returns whether anything happened.
    fn app(&mut self, i: usize) -> bool {
        let now = self.now;
        let mut any = false;
        while let Some(ev) = self.nodes[i].node.poll_event() {
            any = true;
            match ev {
                Event::NeedKey(node) => {
                    let key = self.registry.get(&node).map(|r| r.0);
                    let n = &mut self.nodes[i].node;
                    match key {
                        Some(k) => n.key_found(now, node, k),
                        None => n.key_unavailable(node),
                    }
                }
                Event::NeedEndpoint(node) => {
                    let requester = self.nodes[i].id;
                    *self.resolves.entry((requester, node)).or_default() += 1;
                    let ep = self
                        .registry
                        .get(&node)
                        .map(|r| r.1)
                        .filter(|_| !self.refused.contains(&(requester, node)));
                    let n = &mut self.nodes[i].node;
                    match ep {
                        Some(ep) => n.endpoint_resolved(now, node, ep),
                        None => {
                            n.resolve_failed(now, node);
                        }
                    }
                }
                Event::Accepted { conn, .. } => {
                    self.nodes[i].sinks.insert(conn, Received::default());
                    read_all(&mut self.nodes[i], conn);
                }
                Event::Readable(conn) => read_all(&mut self.nodes[i], conn),
                Event::Connected(conn) => {
                    self.nodes[i].connected.insert(conn);
                    write_all(&mut self.nodes[i], now, conn)
                }
                Event::Writable(conn) => write_all(&mut self.nodes[i], now, conn),
                Event::Incoming { id, port, remote } => {
                    self.nodes[i].incoming.push((id, port, remote))
                }
                Event::Closed { conn, reason } => {
                    read_all(&mut self.nodes[i], conn);
                    self.nodes[i].closed.insert(conn, reason);
                }
                Event::Datagram {
                    src,
                    dst_port,
                    data,
                } => self.nodes[i].datagrams.push((src, dst_port, data)),
                Event::Discovered(_) | Event::SynRateLimited { .. } | Event::Untrusted { .. } => {}
            }
        }
        any
    }
}

fn write_all(n: &mut SimNode, now: Instant, conn: ConnId) {
    let Some(s) = n.senders.get_mut(&conn) else {
        return;
    };
    while s.sent < s.data.len() {
        match n.node.write(conn, &s.data[s.sent..]) {
            Ok(k) => s.sent += k,
            Err(WriteError::Blocked) => return,
            Err(_) => return,
        }
    }
    if !s.shut {
        s.shut = true;
        let _ = n.node.shutdown(now, conn);
    }
}

fn read_all(n: &mut SimNode, conn: ConnId) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match n.node.read(conn, &mut buf) {
            Ok(0) => {
                if let Some(r) = n.sinks.get_mut(&conn) {
                    if r.digest.is_none() {
                        r.digest = Some(std::mem::take(&mut r.hasher).finalize().into());
                    }
                }
                return;
            }
            Ok(k) => {
                if let Some(r) = n.sinks.get_mut(&conn) {
                    r.len += k as u64;
                    r.hasher.update(&buf[..k]);
                }
            }
            Err(_) => return,
        }
    }
}

/// `len` seeded bytes.
pub fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut r = Rng::new(seed);
    let mut v = vec![0u8; len];
    for c in v.chunks_mut(8) {
        let x = r.next_u64().to_le_bytes();
        c.copy_from_slice(&x[..c.len()]);
    }
    v
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// The digests of every finished stream node `i` received.
pub fn digests(net: &NodeNet, i: usize) -> Vec<[u8; 32]> {
    let mut v: Vec<[u8; 32]> = net.nodes[i]
        .sinks
        .values()
        .filter_map(|r| r.digest)
        .collect();
    v.sort();
    v
}

impl SimNode {
    /// Takes the node down (datagrams to it are lost, its timers stop) or brings it back.
    pub fn set_up(&mut self, up: bool) {
        self.up = up;
    }
}
