//! The inside (TUN) side of pilotd as a sans-IO machine: classification of the packets the
//! kernel routes to `pilot0`, the "kernel hairpin" NAT that terminates kernel TCP on pilotd's
//! own kernel sockets, and builders for the packets pilotd writes to the TUN.
//!
//! Layer: inside, sans-IO. Nothing here opens a socket or reads a clock: packets come in as
//! byte slices, time as an [`Instant`](std::time::Instant) argument, and every output is
//! written into a buffer the caller owns.
//!
//! # The hairpin
//!
//! `pilot0` carries `fd06:3fcd:b33d::/48` (see [`crate::ula`]). A TCP connection between a
//! kernel application and a Pilot peer is split in two kernel connections that meet in
//! pilotd. Each [`Hairpin`] entry links an *outer* tuple, the one the application sees
//! (`own:a <-> peer:b`, with `peer` the peer's ULA), to an *inner* tuple that ends on one of
//! pilotd's kernel sockets (`own:c <-> fake:d`, with `fake` from [`FAKE_PREFIX`], a range that
//! is never a Pilot address). Every TCP packet read from the TUN is rewritten by one rule and
//! written back to the TUN, so the kernel delivers it locally:
//!
//! ```text
//!   app socket own:a                                          pilotd socket own:c
//!        |  own:a -> peer:b        read, rewrite, write back       ^  fake:d -> own:c
//!        +------------------------> [ pilot0 | Hairpin ] ---------+
//!        ^  peer:b -> own:a                                        |  own:c -> fake:d
//!        +------------------------- [ pilot0 | Hairpin ] <--------+
//!                                                                  |
//!                                   pilotd <== Pilot stream ==> peer:b
//! ```
//!
//! * Outbound (an application connects to `peer:b`): its SYN creates a *pending* entry and is
//!   held; [`Verdict::Connect`] asks the caller to dial. [`Hairpin::accept_outbound`] then
//!   emits the held SYN rewritten to `fake:d -> own:c` (`c` is pilotd's hairpin listener), and
//!   the listener's accepted socket names the flow through [`Hairpin::outbound_for`].
//!   [`Hairpin::refuse_outbound`] answers the application with a RST or an ICMPv6 error.
//! * Inbound (a Pilot peer `X:sp` connects to our port `P`): [`Hairpin::prepare_inbound`]
//!   reserves `fake:d`; pilotd connects a kernel socket bound to `own` to `fake:d`, its SYN
//!   (`own:c -> fake:d`) teaches the entry `c` and comes out as `X:sp -> own:P`.
//!
//! Sequence numbers are never touched, so both halves share one sequence space; only
//! addresses, ports and the checksum change (RFC 1624 incremental update).
//!
//! # Lifetime of an entry
//!
//! Entries never expire while their connection lives (an idle session lasts hours). After a
//! RST, or once both FINs have been seen and acknowledged, an entry lingers for [`LINGER`]
//! (like TIME_WAIT) and is then freed by [`Hairpin::handle_timeout`]; the caller sleeps until
//! [`Hairpin::poll_timeout`]. Pending and reserved entries stay until the caller accepts,
//! refuses, cancels or [`Hairpin::remove`]s them. The table holds at most
//! [`HairpinConfig::max_entries`] entries; beyond it new SYNs are answered with a RST.
//!
//! # Calling order
//!
//! For every packet read from the TUN: [`Hairpin::handle_packet`], then act on the
//! [`Verdict`]. On a timer: [`Hairpin::handle_timeout`], then re-arm with
//! [`Hairpin::poll_timeout`].
//!
//! # What is not handled
//!
//! IPv6 fragments are dropped (no reassembly: the kernel does not fragment locally generated
//! TCP, and UDP applications on `pilot0` must stay within its MTU). IPv4, neighbour discovery,
//! MLD, router solicitations and all other ICMPv6 except echo requests are dropped with a
//! counted [`DropReason`]. Incoming checksums are not verified: the packets come from the local
//! kernel.

pub mod dns;
mod nat;
pub mod packet;

use core::net::{Ipv6Addr, SocketAddrV6};
use core::ops::Range;
use std::time::Duration;

use crate::addr::Addr;

pub use nat::Hairpin;
pub use packet::{
    build_dest_unreachable, build_echo_reply, build_tcp, build_udp, BuildError, ChecksumMode,
};

/// The fake-address range, `fd06:3fcd:b33d:0:ffff::/80`: network 0, interface-ID high bits
/// `0xffff0000`. It lies in the Pilot /48, so the kernel routes it to `pilot0`, but its reserved
/// interface-ID bits are never zero, so it is never a Pilot address ([`crate::ula::from_ipv6`]
/// rejects it). A fake address carries a 32-bit index in its last four bytes; bytes 10-11 are
/// zero.
pub const FAKE_PREFIX: Ipv6Addr = Ipv6Addr::new(0xfd06, 0x3fcd, 0xb33d, 0, 0xffff, 0, 0, 0);
/// Prefix length of [`FAKE_PREFIX`].
pub const FAKE_PREFIX_LEN: u8 = 80;
/// How long a closed or reset entry keeps rewriting stray segments before it is freed.
pub const LINGER: Duration = Duration::from_secs(60);
/// Default bound of the NAT table.
pub const DEFAULT_MAX_ENTRIES: usize = 65_536;
/// Largest SYN (IPv6 header, extension headers and TCP header with options) held while an
/// outbound connection is pending; larger SYNs are dropped.
pub const MAX_HELD_SYN: usize = 128;
/// Default largest UDP payload handed to the caller as a Pilot datagram: a Pilot packet's
/// payload ([`crate::node::MAX_PACKET`] minus the Pilot header).
pub const DEFAULT_MAX_DATAGRAM: usize = crate::node::MAX_PACKET - crate::wire::header::HEADER_LEN;

/// The fake address with index `index`.
pub const fn fake_addr(index: u32) -> Ipv6Addr {
    Ipv6Addr::new(
        0xfd06,
        0x3fcd,
        0xb33d,
        0,
        0xffff,
        0,
        (index >> 16) as u16,
        index as u16,
    )
}

/// The index of [`PROBE_ADDR`]; never given to a NAT entry.
pub const PROBE_INDEX: u32 = u32::MAX;
/// The fake address pilotd's firewall self-test sends its probes from. Segments the kernel sends
/// to it are never rewritten: an answer to a probe SYN is reported as
/// [`Verdict::ProbeSynAck`], anything else is dropped.
pub const PROBE_ADDR: Ipv6Addr = fake_addr(PROBE_INDEX);

/// The index of a fake address, or `None` if `ip` is not one.
pub fn fake_index(ip: &Ipv6Addr) -> Option<u32> {
    let o = ip.octets();
    if o[..12] != FAKE_PREFIX.octets()[..12] {
        return None;
    }
    Some(u32::from_be_bytes([o[12], o[13], o[14], o[15]]))
}

/// Construction parameters of a [`Hairpin`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HairpinConfig {
    /// This node's Pilot address; its ULA is `own`.
    pub own: Addr,
    /// Port of pilotd's hairpin listener (bound to `own`): the `c` of outbound entries.
    pub listener_port: u16,
    /// Most entries the table holds (pending, reserved, live and lingering).
    pub max_entries: usize,
    /// Largest UDP payload reported as a [`Verdict::Datagram`]; larger ones are dropped.
    pub max_datagram: usize,
}

impl HairpinConfig {
    /// A configuration with the default bounds.
    pub const fn new(own: Addr, listener_port: u16) -> Self {
        HairpinConfig {
            own,
            listener_port,
            max_entries: DEFAULT_MAX_ENTRIES,
            max_datagram: DEFAULT_MAX_DATAGRAM,
        }
    }
}

/// Names one NAT entry for as long as it exists; never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey(pub u64);

/// Which side opened the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// A kernel application connected to a Pilot peer.
    Outbound,
    /// A Pilot peer connected to a local port.
    Inbound,
}

/// What the caller needs to know about an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowInfo {
    /// The entry.
    pub key: FlowKey,
    /// Who opened the connection.
    pub direction: Direction,
    /// The Pilot peer.
    pub peer: Addr,
    /// The peer's port (`b`; for inbound entries the peer's source port).
    pub peer_port: u16,
    /// The local port the kernel application uses (`a`; for inbound entries the listener
    /// port `P`).
    pub local_port: u16,
    /// `fake:d`, the inner peer of pilotd's kernel socket.
    pub fake: SocketAddrV6,
}

/// How [`Hairpin::refuse_outbound`] answers the application.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A TCP RST (the peer refused the connection: `ECONNREFUSED`).
    Reset,
    /// ICMPv6 destination unreachable, code 3, address unreachable (`EHOSTUNREACH`).
    Unreachable,
    /// ICMPv6 destination unreachable, code 1, administratively prohibited (`EACCES`).
    Prohibited,
}

/// What the caller does with a packet read from the TUN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The packet was rewritten in place: write `packet[..len]` back to the TUN. Its checksum is
    /// in the [`ChecksumMode`] it arrived in, and no header moved, so a virtio-net header read
    /// with it (checksum start and offset, GSO fields) is still valid for the write.
    Rewritten {
        /// Length of the packet.
        len: usize,
    },
    /// `packet[..len]` was replaced by a reply with a complete checksum (a RST refusing a SYN
    /// at the table limit): write it to the TUN.
    Reply {
        /// Length of the reply.
        len: usize,
    },
    /// A new outbound connection, now pending: dial the peer, then call
    /// [`Hairpin::accept_outbound`] or [`Hairpin::refuse_outbound`].
    Connect(FlowInfo),
    /// A retransmitted SYN of a pending connection; dropped (the dial is already under way).
    SynRetransmit(FlowKey),
    /// A UDP datagram for a Pilot peer: send `packet[payload]` as a Pilot datagram.
    Datagram {
        /// The destination peer.
        peer: Addr,
        /// Its port.
        peer_port: u16,
        /// The application's source port.
        local_port: u16,
        /// Where the payload lies in the packet.
        payload: Range<usize>,
    },
    /// An ICMPv6 echo request to a Pilot peer.
    EchoRequest {
        /// The destination peer.
        peer: Addr,
        /// Echo identifier.
        ident: u16,
        /// Echo sequence number.
        seq: u16,
        /// Where the echo data lies in the packet.
        payload: Range<usize>,
    },
    /// A DNS query to [`dns::RESOLVER`] port 53, for the caller to answer (see [`dns`]).
    DnsQuery {
        /// The querying socket's port (on this node's ULA).
        client_port: u16,
        /// Where the DNS message lies in the packet.
        payload: Range<usize>,
    },
    /// The kernel answered a probe SYN sent from [`PROBE_ADDR`] with a SYN-ACK: the input path
    /// let the SYN through to a listener. Nothing is written back.
    ProbeSynAck {
        /// The listener's port.
        port: u16,
        /// The probe's port.
        probe_port: u16,
        /// The acknowledgment number: the probe's initial sequence number plus one.
        ack: u32,
    },
    /// Dropped; counted under the reason.
    Drop(DropReason),
}

/// Why a packet read from the TUN was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Truncated, inconsistent lengths, bad version or bad extension-header chain.
    Malformed,
    /// An IPv4 packet.
    Ipv4,
    /// An IPv6 fragment (no reassembly).
    Fragment,
    /// An extension header not handled (routing with segments left, no next header).
    ExtensionHeader,
    /// An upper-layer protocol other than TCP, UDP and ICMPv6.
    Protocol,
    /// ICMPv6 other than an echo request: neighbour discovery, MLD, router solicitation, ...
    IcmpControl,
    /// The source is not this node's ULA.
    ForeignSource,
    /// The destination is not a Pilot address (outside the prefix, reserved bits, multicast,
    /// this node itself).
    NotPilot,
    /// A TCP segment that belongs to no entry (or to one not ready for it).
    TcpNoFlow,
    /// A SYN larger than [`MAX_HELD_SYN`].
    SynTooLarge,
    /// A UDP payload larger than [`HairpinConfig::max_datagram`].
    DatagramTooLarge,
}

impl DropReason {
    /// Every reason, in counter order.
    pub const ALL: [DropReason; 11] = [
        DropReason::Malformed,
        DropReason::Ipv4,
        DropReason::Fragment,
        DropReason::ExtensionHeader,
        DropReason::Protocol,
        DropReason::IcmpControl,
        DropReason::ForeignSource,
        DropReason::NotPilot,
        DropReason::TcpNoFlow,
        DropReason::SynTooLarge,
        DropReason::DatagramTooLarge,
    ];

    /// A short label for metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::Ipv4 => "ipv4",
            DropReason::Fragment => "fragment",
            DropReason::ExtensionHeader => "extension_header",
            DropReason::Protocol => "protocol",
            DropReason::IcmpControl => "icmp_control",
            DropReason::ForeignSource => "foreign_source",
            DropReason::NotPilot => "not_pilot",
            DropReason::TcpNoFlow => "tcp_no_flow",
            DropReason::SynTooLarge => "syn_too_large",
            DropReason::DatagramTooLarge => "datagram_too_large",
        }
    }

    const fn index(self) -> usize {
        self as usize
    }
}

/// Counters of a [`Hairpin`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HairpinStats {
    /// TCP packets rewritten in place.
    pub rewritten: u64,
    /// Outbound connections reported ([`Verdict::Connect`]).
    pub outbound: u64,
    /// Retransmitted SYNs of pending connections.
    pub syn_retransmits: u64,
    /// Outbound connections accepted.
    pub accepted: u64,
    /// Outbound connections refused.
    pub refused: u64,
    /// Inbound connections prepared.
    pub inbound: u64,
    /// SYNs answered with a RST and inbound preparations refused at the table limit.
    pub table_full: u64,
    /// Entries freed after lingering.
    pub expired: u64,
    /// UDP datagrams reported.
    pub datagrams: u64,
    /// Echo requests reported.
    pub echo_requests: u64,
    /// DNS queries to the resolver address reported.
    pub dns_queries: u64,
    /// SYN-ACKs to the firewall probe address reported.
    pub probe_answers: u64,
    /// Dropped packets, indexed like [`DropReason::ALL`]; see [`HairpinStats::dropped`].
    pub drops: [u64; DropReason::ALL.len()],
    /// Entries in the table now.
    pub entries: usize,
    /// Of those, entries carrying a connection (live or lingering).
    pub live: usize,
}

impl HairpinStats {
    /// Packets dropped for `reason`.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()]
    }

    fn count(&mut self, reason: DropReason) {
        self.drops[reason.index()] += 1;
    }
}

/// Why a table operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HairpinError {
    /// No entry has this key.
    #[error("no hairpin entry {0:?}")]
    UnknownFlow(FlowKey),
    /// The entry is not a pending outbound connection.
    #[error("hairpin entry {0:?} is not pending")]
    NotPending(FlowKey),
    /// The table is full.
    #[error("hairpin table full")]
    TableFull,
    /// An entry already links this local port and peer.
    #[error("an entry already links local port {local_port} and peer {peer}")]
    TupleInUse {
        /// The local port.
        local_port: u16,
        /// The peer.
        peer: SocketAddrV6,
    },
    /// The peer address is not a Pilot ULA.
    #[error("{0} is not a Pilot address")]
    NotPilot(Ipv6Addr),
    /// The output could not be built.
    #[error(transparent)]
    Build(#[from] BuildError),
}

#[cfg(test)]
mod tests;
