//! The hairpin NAT table: entries keyed by their outer tuple and by their fake address, the
//! per-packet rewrite, FIN/RST tracking and the linger timers.
//!
//! Invariants: every entry is in `entries`, in `by_outer` under its outer tuple and in
//! `by_fake` under its fake index, and nowhere else; `lingers` may hold stale deadlines (of
//! removed entries, or entries whose deadline differs), which are skipped when popped.

use core::net::{Ipv6Addr, SocketAddrV6};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::Instant;

use super::packet::{
    self, build_dest_unreachable, build_tcp, icmp, parse_ipv6, parse_tcp, parse_udp, proto,
    tcp_flags, BuildError, ChecksumMode, Ipv6View, TcpView, ICMPV6_HEADER_LEN, UDP_HEADER_LEN,
};
use super::{
    dns, fake_addr, fake_index, Direction, DropReason, FlowInfo, FlowKey, HairpinConfig,
    HairpinError, HairpinStats, Refusal, Verdict, LINGER, MAX_HELD_SYN, PROBE_INDEX,
};
use crate::addr::Addr;
use crate::ula;

/// The outer tuple as seen from the application: its port, the peer's ULA and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct OuterKey {
    local_port: u16,
    peer: Ipv6Addr,
    peer_port: u16,
}

/// The two senders of a hairpinned connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// The kernel application (outer tuple, `own:a -> peer:b`).
    App = 0,
    /// pilotd's kernel socket (inner tuple, `own:c -> fake:d`).
    Pilotd = 1,
}

#[derive(Debug, Clone)]
enum State {
    /// Outbound, waiting for the caller's dial; holds the application's SYN (complete
    /// checksum).
    Pending { syn: [u8; MAX_HELD_SYN], len: usize },
    /// Inbound, waiting for pilotd's SYN to `fake:d`.
    Reserved,
    /// Carrying a connection.
    Live,
    /// Closed or reset: still rewriting, freed at the deadline.
    Lingering(Instant),
}

#[derive(Debug, Clone)]
struct Entry {
    direction: Direction,
    peer: Addr,
    outer: OuterKey,
    fake_index: u32,
    fake_port: u16,
    /// `c`: known from the start for outbound entries, learned from pilotd's SYN for inbound.
    inner_port: Option<u16>,
    state: State,
    /// Sequence number after each side's FIN, once seen.
    fin_end: [Option<u32>; 2],
    /// Whether each side's FIN has been acknowledged by the other.
    fin_acked: [bool; 2],
}

impl Entry {
    fn fake(&self) -> SocketAddrV6 {
        SocketAddrV6::new(fake_addr(self.fake_index), self.fake_port, 0, 0)
    }

    fn peer_sock(&self) -> SocketAddrV6 {
        SocketAddrV6::new(self.outer.peer, self.outer.peer_port, 0, 0)
    }

    fn info(&self, key: FlowKey) -> FlowInfo {
        FlowInfo {
            key,
            direction: self.direction,
            peer: self.peer,
            peer_port: self.outer.peer_port,
            local_port: self.outer.local_port,
            fake: self.fake(),
        }
    }

    fn carries_connection(&self) -> bool {
        matches!(self.state, State::Live | State::Lingering(_))
    }

    /// Follows FIN, ACK and RST of a segment from `side`; returns the linger deadline when
    /// the connection has just ended.
    fn track(&mut self, side: Side, tcp: &TcpView, now: Instant) -> Option<Instant> {
        if !matches!(self.state, State::Live) {
            return None;
        }
        let me = side as usize;
        let other = 1 - me;
        let ended = if tcp.has(tcp_flags::RST) {
            true
        } else {
            if tcp.has(tcp_flags::FIN) {
                self.fin_end[me] = Some(tcp.seq.wrapping_add(tcp.seg_len()));
            }
            if tcp.has(tcp_flags::ACK) {
                if let Some(end) = self.fin_end[other] {
                    // RFC 9293 §3.4: sequence comparison modulo 2^32.
                    if tcp.ack.wrapping_sub(end) as i32 >= 0 {
                        self.fin_acked[other] = true;
                    }
                }
            }
            self.fin_acked == [true, true]
        };
        if !ended {
            return None;
        }
        let deadline = now + LINGER;
        self.state = State::Lingering(deadline);
        Some(deadline)
    }
}

/// The hairpin NAT of one node (see the [module docs](super)).
#[derive(Debug)]
pub struct Hairpin {
    own: Ipv6Addr,
    config: HairpinConfig,
    entries: HashMap<FlowKey, Entry>,
    by_outer: HashMap<OuterKey, FlowKey>,
    by_fake: HashMap<u32, FlowKey>,
    next_key: u64,
    next_fake: u32,
    lingers: BinaryHeap<Reverse<(Instant, FlowKey)>>,
    stats: HairpinStats,
}

impl Hairpin {
    /// An empty table for the node `config.own`. `max_entries` is clamped below 2^32 so a free
    /// fake index always exists.
    pub fn new(mut config: HairpinConfig) -> Self {
        config.max_entries = config.max_entries.min(u32::MAX as usize - 1);
        Hairpin {
            own: ula::to_ipv6(config.own),
            config,
            entries: HashMap::new(),
            by_outer: HashMap::new(),
            by_fake: HashMap::new(),
            next_key: 1,
            next_fake: 0,
            lingers: BinaryHeap::new(),
            stats: HairpinStats::default(),
        }
    }

    /// This node's ULA.
    pub fn own_ip(&self) -> Ipv6Addr {
        self.own
    }

    /// The counters, with the current entry counts.
    pub fn stats(&self) -> HairpinStats {
        let mut s = self.stats;
        s.entries = self.entries.len();
        s.live = self
            .entries
            .values()
            .filter(|e| e.carries_connection())
            .count();
        s
    }

    /// Number of entries in the table.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the table holds no entry.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry `key`, if it exists.
    pub fn flow(&self, key: FlowKey) -> Option<FlowInfo> {
        self.entries.get(&key).map(|e| e.info(key))
    }

    /// Classifies a packet read from the TUN and, for hairpinned TCP, rewrites it in place.
    /// `mode` says what its transport checksum holds (from the virtio-net header when TUN
    /// offloads are on). Never panics; every drop is counted.
    pub fn handle_packet(
        &mut self,
        now: Instant,
        packet: &mut [u8],
        mode: ChecksumMode,
    ) -> Verdict {
        let verdict = self.classify(now, packet, mode);
        match &verdict {
            Verdict::Rewritten { .. } => self.stats.rewritten += 1,
            Verdict::Reply { .. } => self.stats.table_full += 1,
            Verdict::Connect(_) => self.stats.outbound += 1,
            Verdict::SynRetransmit(_) => self.stats.syn_retransmits += 1,
            Verdict::Datagram { .. } => self.stats.datagrams += 1,
            Verdict::EchoRequest { .. } => self.stats.echo_requests += 1,
            Verdict::DnsQuery { .. } => self.stats.dns_queries += 1,
            Verdict::ProbeSynAck { .. } => self.stats.probe_answers += 1,
            Verdict::Drop(reason) => self.stats.count(*reason),
        }
        verdict
    }

    fn classify(&mut self, now: Instant, p: &mut [u8], mode: ChecksumMode) -> Verdict {
        let ip = match parse_ipv6(p) {
            Ok(ip) => ip,
            Err(reason) => return Verdict::Drop(reason),
        };
        let echo = if ip.next == proto::ICMPV6 {
            match packet::echo_fields(p, &ip) {
                Ok((icmp::ECHO_REQUEST, ident, seq)) => Some((ident, seq)),
                Ok(_) => return Verdict::Drop(DropReason::IcmpControl),
                Err(reason) => return Verdict::Drop(reason),
            }
        } else {
            None
        };
        if ip.src != self.own {
            return Verdict::Drop(DropReason::ForeignSource);
        }
        match ip.next {
            proto::TCP => self.classify_tcp(now, p, &ip, mode),
            proto::UDP if ip.dst == dns::RESOLVER => match parse_udp(p, &ip) {
                Ok((client_port, dns::PORT)) => Verdict::DnsQuery {
                    client_port,
                    payload: ip.l4 + UDP_HEADER_LEN..ip.end,
                },
                Ok(_) => Verdict::Drop(DropReason::NotPilot),
                Err(reason) => Verdict::Drop(reason),
            },
            proto::UDP => {
                let peer = match self.pilot_peer(&ip.dst) {
                    Ok(peer) => peer,
                    Err(reason) => return Verdict::Drop(reason),
                };
                let (local_port, peer_port) = match parse_udp(p, &ip) {
                    Ok(ports) => ports,
                    Err(reason) => return Verdict::Drop(reason),
                };
                let payload = ip.l4 + UDP_HEADER_LEN..ip.end;
                if payload.len() > self.config.max_datagram {
                    return Verdict::Drop(DropReason::DatagramTooLarge);
                }
                Verdict::Datagram {
                    peer,
                    peer_port,
                    local_port,
                    payload,
                }
            }
            _ => {
                let peer = match self.pilot_peer(&ip.dst) {
                    Ok(peer) => peer,
                    Err(reason) => return Verdict::Drop(reason),
                };
                // Invariant: parse_ipv6 only yields TCP, UDP or ICMPv6, and ICMPv6 other than
                // an echo request returned above.
                let Some((ident, seq)) = echo else {
                    return Verdict::Drop(DropReason::Protocol);
                };
                Verdict::EchoRequest {
                    peer,
                    ident,
                    seq,
                    payload: ip.l4 + ICMPV6_HEADER_LEN..ip.end,
                }
            }
        }
    }

    /// The Pilot address behind a destination ULA, if it is one and not this node.
    fn pilot_peer(&self, dst: &Ipv6Addr) -> Result<Addr, DropReason> {
        match ula::from_ipv6(*dst) {
            Ok(addr) if *dst != self.own => Ok(addr),
            _ => Err(DropReason::NotPilot),
        }
    }

    fn classify_tcp(
        &mut self,
        now: Instant,
        p: &mut [u8],
        ip: &Ipv6View,
        mode: ChecksumMode,
    ) -> Verdict {
        let tcp = match parse_tcp(p, ip) {
            Ok(tcp) => tcp,
            Err(reason) => return Verdict::Drop(reason),
        };
        if let Some(index) = fake_index(&ip.dst) {
            if index == PROBE_INDEX {
                return match tcp.flags & (tcp_flags::SYN | tcp_flags::ACK | tcp_flags::RST) {
                    f if f == tcp_flags::SYN | tcp_flags::ACK => Verdict::ProbeSynAck {
                        port: tcp.src_port,
                        probe_port: tcp.dst_port,
                        ack: tcp.ack,
                    },
                    _ => Verdict::Drop(DropReason::TcpNoFlow),
                };
            }
            return self.classify_inner(now, p, ip, &tcp, index, mode);
        }
        let peer = match self.pilot_peer(&ip.dst) {
            Ok(peer) => peer,
            Err(reason) => return Verdict::Drop(reason),
        };
        let outer = OuterKey {
            local_port: tcp.src_port,
            peer: ip.dst,
            peer_port: tcp.dst_port,
        };
        if let Some(&key) = self.by_outer.get(&outer) {
            if let Some(entry) = self.entries.get_mut(&key) {
                match entry.state {
                    State::Pending { .. } if tcp.is_syn() => return Verdict::SynRetransmit(key),
                    State::Pending { .. } | State::Reserved => {
                        return Verdict::Drop(DropReason::TcpNoFlow)
                    }
                    // The application reuses the port pair of a finished connection.
                    State::Lingering(_) if tcp.is_syn() => {
                        self.remove(key);
                    }
                    State::Live | State::Lingering(_) => {
                        let Some(inner_port) = entry.inner_port else {
                            return Verdict::Drop(DropReason::TcpNoFlow);
                        };
                        let src = entry.fake();
                        let dst = SocketAddrV6::new(self.own, inner_port, 0, 0);
                        packet::rewrite_tcp(p, ip, src, dst, mode);
                        if let Some(deadline) = entry.track(Side::App, &tcp, now) {
                            self.lingers.push(Reverse((deadline, key)));
                        }
                        return Verdict::Rewritten { len: ip.end };
                    }
                }
            }
        }
        if !tcp.is_syn() {
            return Verdict::Drop(DropReason::TcpNoFlow);
        }
        if self.entries.len() >= self.config.max_entries {
            // RFC 9293 §3.10.7.1: a RST answering a segment without ACK carries seq 0 and
            // acknowledges the whole segment.
            let from = SocketAddrV6::new(ip.dst, tcp.dst_port, 0, 0);
            let to = SocketAddrV6::new(self.own, tcp.src_port, 0, 0);
            let ack = tcp.seq.wrapping_add(tcp.seg_len());
            return match build_tcp(from, to, 0, ack, tcp_flags::RST | tcp_flags::ACK, p) {
                Ok(len) => Verdict::Reply { len },
                Err(_) => Verdict::Drop(DropReason::Malformed),
            };
        }
        if ip.end > MAX_HELD_SYN {
            return Verdict::Drop(DropReason::SynTooLarge);
        }
        let mut syn = [0u8; MAX_HELD_SYN];
        syn[..ip.end].copy_from_slice(&p[..ip.end]);
        if mode == ChecksumMode::Partial {
            packet::complete_tcp_checksum(&mut syn[..ip.end], ip);
        }
        let key = self.insert(
            Direction::Outbound,
            peer,
            outer,
            Some(self.config.listener_port),
            State::Pending { syn, len: ip.end },
        );
        match self.flow(key) {
            Some(info) => Verdict::Connect(info),
            None => Verdict::Drop(DropReason::TcpNoFlow),
        }
    }

    /// A segment from pilotd's socket `own:c` to `fake:d`.
    fn classify_inner(
        &mut self,
        now: Instant,
        p: &mut [u8],
        ip: &Ipv6View,
        tcp: &TcpView,
        index: u32,
        mode: ChecksumMode,
    ) -> Verdict {
        let Some(&key) = self.by_fake.get(&index) else {
            return Verdict::Drop(DropReason::TcpNoFlow);
        };
        let Some(entry) = self.entries.get_mut(&key) else {
            return Verdict::Drop(DropReason::TcpNoFlow);
        };
        if tcp.dst_port != entry.fake_port {
            return Verdict::Drop(DropReason::TcpNoFlow);
        }
        match entry.state {
            State::Reserved if tcp.is_syn() => {
                entry.inner_port = Some(tcp.src_port);
                entry.state = State::Live;
            }
            State::Live | State::Lingering(_) if entry.inner_port == Some(tcp.src_port) => {}
            _ => return Verdict::Drop(DropReason::TcpNoFlow),
        }
        let src = entry.peer_sock();
        let dst = SocketAddrV6::new(self.own, entry.outer.local_port, 0, 0);
        packet::rewrite_tcp(p, ip, src, dst, mode);
        if let Some(deadline) = entry.track(Side::Pilotd, tcp, now) {
            self.lingers.push(Reverse((deadline, key)));
        }
        Verdict::Rewritten { len: ip.end }
    }

    fn insert(
        &mut self,
        direction: Direction,
        peer: Addr,
        outer: OuterKey,
        inner_port: Option<u16>,
        state: State,
    ) -> FlowKey {
        let key = FlowKey(self.next_key);
        self.next_key += 1;
        // Skip indices in use and the probe's: with at most 2^32 - 2 entries one is always free.
        let mut index = self.next_fake;
        while index == PROBE_INDEX || self.by_fake.contains_key(&index) {
            index = index.wrapping_add(1);
        }
        self.next_fake = index.wrapping_add(1);
        let entry = Entry {
            direction,
            peer,
            outer,
            fake_index: index,
            // A kernel socket cannot connect to port 0.
            fake_port: outer.peer_port.max(1),
            inner_port,
            state,
            fin_end: [None; 2],
            fin_acked: [false; 2],
        };
        self.entries.insert(key, entry);
        self.by_outer.insert(outer, key);
        self.by_fake.insert(index, key);
        key
    }

    fn pending_syn(&self, key: FlowKey) -> Result<(&Entry, &[u8]), HairpinError> {
        let entry = self
            .entries
            .get(&key)
            .ok_or(HairpinError::UnknownFlow(key))?;
        match &entry.state {
            State::Pending { syn, len } => Ok((entry, &syn[..*len])),
            _ => Err(HairpinError::NotPending(key)),
        }
    }

    /// The dial of the pending outbound connection `key` succeeded: writes the held SYN,
    /// rewritten to `fake:d -> own:c` (complete checksum), into `out` for the caller to write to
    /// the TUN, and makes the entry live. Returns the packet's length.
    pub fn accept_outbound(&mut self, key: FlowKey, out: &mut [u8]) -> Result<usize, HairpinError> {
        let (entry, syn) = self.pending_syn(key)?;
        let len = syn.len();
        if out.len() < len {
            return Err(BuildError::BufferTooSmall {
                needed: len,
                have: out.len(),
            }
            .into());
        }
        let src = entry.fake();
        let dst = SocketAddrV6::new(self.own, self.config.listener_port, 0, 0);
        out[..len].copy_from_slice(syn);
        // Invariant: the held SYN parsed when it was captured.
        let ip = parse_ipv6(&out[..len]).map_err(|_| HairpinError::NotPending(key))?;
        packet::rewrite_tcp(&mut out[..len], &ip, src, dst, ChecksumMode::Complete);
        if let Some(entry) = self.entries.get_mut(&key) {
            entry.state = State::Live;
        }
        self.stats.accepted += 1;
        Ok(len)
    }

    /// The dial of the pending outbound connection `key` failed: writes the answer to the
    /// application into `out` (a RST from `peer:b`, or an ICMPv6 destination unreachable from
    /// the peer's ULA quoting the SYN) and removes the entry. Returns the packet's length; on
    /// error the entry stays.
    pub fn refuse_outbound(
        &mut self,
        key: FlowKey,
        refusal: Refusal,
        out: &mut [u8],
    ) -> Result<usize, HairpinError> {
        let (entry, syn) = self.pending_syn(key)?;
        let peer = entry.outer.peer;
        let len = match refusal {
            Refusal::Reset => {
                // Invariant: the held SYN parsed when it was captured.
                let ip = parse_ipv6(syn).map_err(|_| HairpinError::NotPending(key))?;
                let tcp = parse_tcp(syn, &ip).map_err(|_| HairpinError::NotPending(key))?;
                let from = SocketAddrV6::new(peer, tcp.dst_port, 0, 0);
                let to = SocketAddrV6::new(self.own, tcp.src_port, 0, 0);
                let ack = tcp.seq.wrapping_add(tcp.seg_len());
                build_tcp(from, to, 0, ack, tcp_flags::RST | tcp_flags::ACK, out)?
            }
            Refusal::Unreachable => {
                build_dest_unreachable(peer, self.own, icmp::CODE_ADDRESS_UNREACHABLE, syn, out)?
            }
            Refusal::Prohibited => {
                build_dest_unreachable(peer, self.own, icmp::CODE_PROHIBITED, syn, out)?
            }
        };
        self.remove(key);
        self.stats.refused += 1;
        Ok(len)
    }

    /// The outbound entry whose fake address is `inner_peer`: the peer address of a socket
    /// pilotd's hairpin listener accepted.
    pub fn outbound_for(&self, inner_peer: SocketAddrV6) -> Option<FlowInfo> {
        let key = *self.by_fake.get(&fake_index(inner_peer.ip())?)?;
        let entry = self.entries.get(&key)?;
        (entry.direction == Direction::Outbound && entry.fake_port == inner_peer.port())
            .then(|| entry.info(key))
    }

    /// Reserves an entry for a Pilot peer `peer` (its ULA and source port) connecting to local
    /// port `local_port`. pilotd then connects a kernel socket bound to its own ULA to
    /// `FlowInfo::fake`; that SYN makes the entry live and reaches the listener on `local_port`
    /// as coming from `peer`.
    pub fn prepare_inbound(
        &mut self,
        peer: SocketAddrV6,
        local_port: u16,
    ) -> Result<FlowInfo, HairpinError> {
        let ip = *peer.ip();
        let addr = self
            .pilot_peer(&ip)
            .map_err(|_| HairpinError::NotPilot(ip))?;
        let outer = OuterKey {
            local_port,
            peer: ip,
            peer_port: peer.port(),
        };
        if self.by_outer.contains_key(&outer) {
            return Err(HairpinError::TupleInUse { local_port, peer });
        }
        if self.entries.len() >= self.config.max_entries {
            self.stats.table_full += 1;
            return Err(HairpinError::TableFull);
        }
        let key = self.insert(Direction::Inbound, addr, outer, None, State::Reserved);
        self.stats.inbound += 1;
        self.flow(key).ok_or(HairpinError::UnknownFlow(key))
    }

    /// Removes the entry whose fake address is `fake` (an inbound connection pilotd gave up
    /// on). Returns whether one existed.
    pub fn cancel_inbound(&mut self, fake: SocketAddrV6) -> bool {
        let key = fake_index(fake.ip()).and_then(|i| self.by_fake.get(&i).copied());
        match key {
            Some(key) => self.remove(key),
            None => false,
        }
    }

    /// Removes the entry `key` now. Returns whether it existed.
    pub fn remove(&mut self, key: FlowKey) -> bool {
        let Some(entry) = self.entries.remove(&key) else {
            return false;
        };
        self.by_outer.remove(&entry.outer);
        self.by_fake.remove(&entry.fake_index);
        true
    }

    /// Frees the entries whose linger period ended by `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(&Reverse((deadline, key))) = self.lingers.peek() {
            if deadline > now {
                break;
            }
            self.lingers.pop();
            if self.lingers_until(key, deadline) {
                self.remove(key);
                self.stats.expired += 1;
            }
        }
    }

    /// The next linger deadline, if any.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        while let Some(&Reverse((deadline, key))) = self.lingers.peek() {
            if self.lingers_until(key, deadline) {
                return Some(deadline);
            }
            self.lingers.pop();
        }
        None
    }

    fn lingers_until(&self, key: FlowKey, deadline: Instant) -> bool {
        matches!(
            self.entries.get(&key).map(|e| &e.state),
            Some(State::Lingering(d)) if *d == deadline
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_index_wraps_and_skips_indices_in_use() {
        let own = Addr::new(1, 1);
        let mut h = Hairpin::new(HairpinConfig::new(own, 4000));
        let peer = ula::to_ipv6(Addr::new(1, 2));
        let at_zero = h
            .prepare_inbound(SocketAddrV6::new(peer, 1, 0, 0), 22)
            .unwrap();
        assert_eq!(fake_index(at_zero.fake.ip()), Some(0));
        h.next_fake = u32::MAX - 1;
        let last = h
            .prepare_inbound(SocketAddrV6::new(peer, 2, 0, 0), 22)
            .unwrap();
        assert_eq!(fake_index(last.fake.ip()), Some(u32::MAX - 1));
        // The probe's index is never given out, and index 0 is still in use: the counter wraps
        // past both.
        let next = h
            .prepare_inbound(SocketAddrV6::new(peer, 3, 0, 0), 22)
            .unwrap();
        assert_eq!(fake_index(next.fake.ip()), Some(1));
        assert!(ula::from_ipv6(*next.fake.ip()).is_err());
    }
}
