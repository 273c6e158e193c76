//! A deterministic network simulator for the sans-IO transport: nodes (each an
//! [`Endpoint`]) joined by one-way links with bandwidth, delay, a drop-tail queue, and seeded
//! loss, reordering, duplication and corruption, on a virtual clock. No sockets, no threads.
//!
//! The clock starts at one `Instant` read at construction and only moves forward by the
//! simulator; every timer in the transport sees virtual time.
//!
//! A link carries Pilot packets (34-byte header + payload); `overhead` adds the bytes of the
//! layers below (tunnel framing, UDP, IP) to what the link serializes.
//!
//! Several node pairs can share one link each way ([`Sim::connect_shared`]): their packets
//! wait in one drop-tail queue, as flows through one bottleneck router do. Every link records
//! the queueing delay of each packet it accepts ([`Sim::queue_delay_percentile`]).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use tunnel::stream::{Endpoint, EndpointConfig, Incoming};
use tunnel::wire::HEADER_LEN;
use tunnel::Addr;

/// SplitMix64: a small seeded generator, so every run of a scenario is identical.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        let unit = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        p > 0.0 && unit < p
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// One direction of a link.
#[derive(Debug, Clone, Copy)]
pub struct LinkConfig {
    /// Bits per second; 0 means infinitely fast.
    pub bandwidth: u64,
    /// One-way propagation delay.
    pub delay: Duration,
    /// Drop-tail queue limit in bytes waiting for serialization.
    pub queue: usize,
    /// Probability a packet is lost.
    pub loss: f64,
    /// Probability a packet is held back by up to `reorder_delay` extra.
    pub reorder: f64,
    /// Extra delay of a reordered packet (uniform up to this).
    pub reorder_delay: Duration,
    /// Probability a packet is delivered twice.
    pub duplicate: f64,
    /// Probability one byte of a packet is flipped.
    pub corrupt: f64,
    /// Bytes of the layers below added to each packet's size on the link.
    pub overhead: usize,
}

impl LinkConfig {
    /// A clean link of `mbit` Mbit/s with `rtt` round trip (half each way) and a queue of
    /// one bandwidth-delay product.
    pub fn new(mbit: u64, rtt: Duration) -> Self {
        let bandwidth = mbit * 1_000_000;
        let bdp = (bandwidth as f64 / 8.0 * rtt.as_secs_f64()) as usize;
        LinkConfig {
            bandwidth,
            delay: rtt / 2,
            queue: bdp.max(64 * 1024),
            loss: 0.0,
            reorder: 0.0,
            reorder_delay: Duration::ZERO,
            duplicate: 0.0,
            corrupt: 0.0,
            overhead: 0,
        }
    }

    /// With random loss.
    pub fn loss(mut self, p: f64) -> Self {
        self.loss = p;
        self
    }

    /// With reordering.
    pub fn reorder(mut self, p: f64, extra: Duration) -> Self {
        self.reorder = p;
        self.reorder_delay = extra;
        self
    }

    /// With duplication.
    pub fn duplicate(mut self, p: f64) -> Self {
        self.duplicate = p;
        self
    }

    /// With corruption.
    pub fn corrupt(mut self, p: f64) -> Self {
        self.corrupt = p;
        self
    }
}

#[derive(Debug)]
struct Link {
    cfg: LinkConfig,
    busy_until: Instant,
    rng: Rng,
    up: bool,
    /// Time each accepted packet waited behind earlier ones, in nanoseconds.
    queue_delays: Vec<u64>,
}

/// Counters of one link.
#[derive(Debug, Clone, Copy, Default)]
pub struct LinkStats {
    /// Packets offered to the link.
    pub offered: u64,
    /// Dropped at random.
    pub lost: u64,
    /// Dropped by the full queue.
    pub queue_drops: u64,
    /// Delivered (duplicates included).
    pub delivered: u64,
    /// Bytes delivered (link sizes).
    pub bytes: u64,
}

struct InFlight {
    at: Instant,
    order: u64,
    to: usize,
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

/// One simulated host.
#[derive(Debug)]
pub struct Node {
    /// The node's connection table.
    pub ep: Endpoint,
    /// Datagrams received: (source, destination port, payload).
    pub datagrams: Vec<(tunnel::SocketAddr, u16, Vec<u8>)>,
    /// Packets the endpoint dropped.
    pub dropped: u64,
}

/// The simulated network.
pub struct Sim {
    start: Instant,
    now: Instant,
    nodes: Vec<Node>,
    by_addr: HashMap<Addr, usize>,
    /// (from, to) -> index into `link_table`.
    links: HashMap<(usize, usize), usize>,
    link_table: Vec<Link>,
    link_stats: HashMap<(usize, usize), LinkStats>,
    queue: BinaryHeap<Reverse<InFlight>>,
    order: u64,
    seed: u64,
    buf: Vec<u8>,
    wake: Option<Instant>,
}

impl std::fmt::Debug for Sim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sim")
            .field("elapsed", &self.elapsed())
            .field("nodes", &self.nodes.len())
            .field("in_flight", &self.queue.len())
            .finish()
    }
}

impl Sim {
    /// An empty network; `seed` drives every random choice.
    pub fn new(seed: u64) -> Self {
        let start = Instant::now();
        Sim {
            start,
            now: start,
            nodes: Vec::new(),
            by_addr: HashMap::new(),
            links: HashMap::new(),
            link_table: Vec::new(),
            link_stats: HashMap::new(),
            queue: BinaryHeap::new(),
            order: 0,
            seed,
            buf: vec![0u8; HEADER_LEN + 65_536],
            wake: None,
        }
    }

    /// Virtual time now.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Virtual time since the start.
    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// Adds a host with address `addr`.
    pub fn add_node(&mut self, addr: Addr, config: EndpointConfig) -> usize {
        let i = self.nodes.len();
        self.nodes.push(Node {
            ep: Endpoint::new(addr, config),
            datagrams: Vec::new(),
            dropped: 0,
        });
        self.by_addr.insert(addr, i);
        i
    }

    /// A host.
    pub fn node(&mut self, i: usize) -> &mut Node {
        &mut self.nodes[i]
    }

    /// Joins `a` and `b` with a link each way, both with `cfg`.
    pub fn connect(&mut self, a: usize, b: usize, cfg: LinkConfig) {
        self.link_one_way(a, b, cfg);
        self.link_one_way(b, a, cfg);
    }

    /// Sets the link from `a` to `b`.
    pub fn link_one_way(&mut self, a: usize, b: usize, cfg: LinkConfig) {
        self.shared_one_way(&[(a, b)], cfg);
    }

    /// One link each way shared by every pair `(a, b)` in `pairs`: packets from any `a` to
    /// its `b` queue together, and so do the answers from each `b` to its `a`.
    pub fn connect_shared(&mut self, pairs: &[(usize, usize)], cfg: LinkConfig) {
        self.shared_one_way(pairs, cfg);
        let back: Vec<(usize, usize)> = pairs.iter().map(|&(a, b)| (b, a)).collect();
        self.shared_one_way(&back, cfg);
    }

    fn shared_one_way(&mut self, pairs: &[(usize, usize)], cfg: LinkConfig) {
        let Some(&(a, b)) = pairs.first() else {
            return;
        };
        let seed = self.seed ^ ((a as u64) << 32 | b as u64).wrapping_mul(0x2545_F491_4F6C_DD1D);
        let i = self.link_table.len();
        self.link_table.push(Link {
            cfg,
            busy_until: self.now,
            rng: Rng::new(seed),
            up: true,
            queue_delays: Vec::new(),
        });
        for &k in pairs {
            self.links.insert(k, i);
        }
    }

    /// Cuts (or restores) both directions between `a` and `b`: packets are silently lost.
    pub fn set_link_up(&mut self, a: usize, b: usize, up: bool) {
        for k in [(a, b), (b, a)] {
            if let Some(&i) = self.links.get(&k) {
                self.link_table[i].up = up;
            }
        }
    }

    /// The `p`-th percentile (0 to 100) of the queueing delay of packets the link from `a` to
    /// `b` accepted, zero when it accepted none.
    pub fn queue_delay_percentile(&self, a: usize, b: usize, p: f64) -> Duration {
        let Some(&i) = self.links.get(&(a, b)) else {
            return Duration::ZERO;
        };
        let mut d = self.link_table[i].queue_delays.clone();
        if d.is_empty() {
            return Duration::ZERO;
        }
        let k = ((p / 100.0 * (d.len() - 1) as f64).round() as usize).min(d.len() - 1);
        let (_, v, _) = d.select_nth_unstable(k);
        Duration::from_nanos(*v)
    }

    /// Counters of the link from `a` to `b`.
    pub fn link_stats(&self, a: usize, b: usize) -> LinkStats {
        self.link_stats.get(&(a, b)).copied().unwrap_or_default()
    }

    fn send(&mut self, from: usize, packet: &[u8], dst: Addr) {
        let Some(&to) = self.by_addr.get(&dst) else {
            return;
        };
        let stats = self.link_stats.entry((from, to)).or_default();
        stats.offered += 1;
        let Some(&li) = self.links.get(&(from, to)) else {
            return;
        };
        let link = &mut self.link_table[li];
        if !link.up || link.rng.chance(link.cfg.loss) {
            stats.lost += 1;
            return;
        }
        let size = packet.len() + link.cfg.overhead;
        let now = self.now;
        let depart = if link.cfg.bandwidth == 0 {
            now
        } else {
            let backlog = link.busy_until.saturating_duration_since(now);
            let queued = (backlog.as_secs_f64() * link.cfg.bandwidth as f64 / 8.0) as usize;
            if queued + size > link.cfg.queue {
                stats.queue_drops += 1;
                return;
            }
            link.queue_delays.push(backlog.as_nanos() as u64);
            let tx = Duration::from_nanos((size as u64 * 8 * 1_000_000_000) / link.cfg.bandwidth);
            link.busy_until = link.busy_until.max(now) + tx;
            link.busy_until
        };
        let mut copies = 1;
        if link.rng.chance(link.cfg.duplicate) {
            copies = 2;
        }
        for _ in 0..copies {
            let mut at = depart + link.cfg.delay;
            if link.rng.chance(link.cfg.reorder) {
                let extra = link.cfg.reorder_delay.as_nanos() as u64;
                at += Duration::from_nanos(link.rng.below(extra.max(1)));
            }
            let mut data = packet.to_vec();
            if link.rng.chance(link.cfg.corrupt) {
                let i = link.rng.below(data.len() as u64) as usize;
                data[i] ^= 1 << link.rng.below(8);
            }
            stats.delivered += 1;
            stats.bytes += size as u64;
            self.order += 1;
            self.queue.push(Reverse(InFlight {
                at,
                order: self.order,
                to,
                data,
            }));
        }
    }

    /// Sends everything every node has ready now.
    pub fn pump(&mut self) {
        let mut buf = std::mem::take(&mut self.buf);
        let now = self.now;
        for i in 0..self.nodes.len() {
            while let Some((n, dst)) = self.nodes[i].ep.poll_transmit(now, &mut buf) {
                self.send(i, &buf[..n], dst.addr);
            }
        }
        self.buf = buf;
    }

    /// Makes the next [`Sim::step`] stop no later than `t`, so an application can act then.
    /// A time not after now is ignored (time must move).
    pub fn wake_at(&mut self, t: Instant) {
        if t <= self.now {
            return;
        }
        self.wake = Some(self.wake.map_or(t, |w| w.min(t)));
    }

    fn next_deadline(&mut self) -> Option<Instant> {
        let mut next = self.queue.peek().map(|Reverse(p)| p.at);
        if let Some(w) = self.wake.take() {
            next = Some(next.map_or(w, |n| n.min(w)));
        }
        for node in &mut self.nodes {
            if let Some(t) = node.ep.poll_timeout() {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        }
        next
    }

    /// Sends what is ready, then advances to the next packet arrival or timer and processes
    /// everything due then. Returns false when nothing is pending at all.
    pub fn step(&mut self) -> bool {
        self.pump();
        let Some(t) = self.next_deadline() else {
            return false;
        };
        self.now = self.now.max(t);
        let now = self.now;
        while self.queue.peek().is_some_and(|Reverse(p)| p.at <= now) {
            let Some(Reverse(p)) = self.queue.pop() else {
                break;
            };
            let node = &mut self.nodes[p.to];
            match node.ep.handle(now, &p.data) {
                Incoming::Datagram(d) => node.datagrams.push((d.src, d.dst_port, d.data.to_vec())),
                Incoming::Dropped(_) => node.dropped += 1,
                Incoming::Stream(_) | Incoming::Refused | Incoming::Control(..) => {}
            }
        }
        for node in &mut self.nodes {
            node.ep.handle_timeout(now);
        }
        true
    }

    /// Steps until `done` holds or `limit` of virtual time passes; true if `done` held.
    pub fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&mut Sim) -> bool) -> bool {
        let deadline = self.now + limit;
        loop {
            if done(self) {
                return true;
            }
            if self.now > deadline || !self.step() {
                return done(self);
            }
        }
    }
}
