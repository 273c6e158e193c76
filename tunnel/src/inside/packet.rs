//! IPv6, TCP, UDP and ICMPv6 as they cross the TUN interface: bounds-checked views, the
//! Internet checksum (RFC 1071) with its incremental update (RFC 1624), and builders for the
//! packets pilotd writes to the TUN.
//!
//! Layer: inside (TUN) wire formats. The parser is hand-written: every read is bounds-checked
//! against the IPv6 payload length, and nothing here panics on any input.
//!
//! ```text
//! IPv6 fixed header (RFC 8200 §3), 40 bytes:
//!  0               1               2               3
//! +-------+-------+---------------+-------------------------------+
//! |version| traffic class |           flow label                  |  0
//! +-------+---------------+-------+---------------+---------------+
//! |        payload length         |  next header  |   hop limit   |  4
//! +-------------------------------+---------------+---------------+
//! |                  source address (16 bytes)                    |  8
//! |                destination address (16 bytes)                 | 24
//! +---------------------------------------------------------------+
//! then extension headers (hop-by-hop 0, routing 43, destination options 60: next header,
//! length in 8-byte units not counting the first 8), then TCP (6), UDP (17) or ICMPv6 (58).
//! ```
//!
//! Checksums: TCP, UDP and ICMPv6 all cover the IPv6 pseudo-header (source, destination,
//! upper-layer length, next header; RFC 8200 §8.1). Packets read from a TUN with offloads on
//! may carry a *partial* checksum (Linux `CHECKSUM_PARTIAL`): the field then holds the folded,
//! uncomplemented pseudo-header sum and the device (here: the kernel, once the packet is
//! written back) completes it over the transport header and payload. [`ChecksumMode`] says
//! which case applies; the rewrite keeps the packet in the mode it came in.

use core::net::{Ipv6Addr, SocketAddrV6};

use super::DropReason;

/// Length of the IPv6 fixed header.
pub const IPV6_HEADER_LEN: usize = 40;
/// Length of a TCP header without options.
pub const TCP_HEADER_LEN: usize = 20;
/// Length of the UDP header.
pub const UDP_HEADER_LEN: usize = 8;
/// Length of the ICMPv6 header of echo and error messages (type, code, checksum, 4 bytes).
pub const ICMPV6_HEADER_LEN: usize = 8;
/// IPv6 minimum link MTU; ICMPv6 errors never exceed it (RFC 4443 §2.4 (c)).
pub const IPV6_MIN_MTU: usize = 1280;
/// Hop limit of the packets built here.
pub const HOP_LIMIT: u8 = 64;
/// Largest UDP payload an IPv6 packet without jumbogram option carries.
pub const MAX_UDP_PAYLOAD: usize = u16::MAX as usize - UDP_HEADER_LEN;

/// Next-header values (IANA protocol numbers).
pub mod proto {
    /// Hop-by-hop options.
    pub const HOP_BY_HOP: u8 = 0;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// Routing header.
    pub const ROUTING: u8 = 43;
    /// Fragment header.
    pub const FRAGMENT: u8 = 44;
    /// ICMPv6.
    pub const ICMPV6: u8 = 58;
    /// No next header.
    pub const NO_NEXT: u8 = 59;
    /// Destination options.
    pub const DEST_OPTS: u8 = 60;
}

/// ICMPv6 types and codes used here (RFC 4443).
pub mod icmp {
    /// Destination unreachable.
    pub const DEST_UNREACHABLE: u8 = 1;
    /// Code: communication administratively prohibited.
    pub const CODE_PROHIBITED: u8 = 1;
    /// Code: address unreachable.
    pub const CODE_ADDRESS_UNREACHABLE: u8 = 3;
    /// Echo request.
    pub const ECHO_REQUEST: u8 = 128;
    /// Echo reply.
    pub const ECHO_REPLY: u8 = 129;
}

/// TCP flag bits (byte 13 of the TCP header).
pub mod tcp_flags {
    /// No more data from the sender.
    pub const FIN: u8 = 0x01;
    /// Synchronize sequence numbers.
    pub const SYN: u8 = 0x02;
    /// Reset the connection.
    pub const RST: u8 = 0x04;
    /// Push.
    pub const PSH: u8 = 0x08;
    /// The acknowledgment field is significant.
    pub const ACK: u8 = 0x10;
}

mod field {
    use core::ops::Range;
    pub const PAYLOAD_LEN: Range<usize> = 4..6;
    pub const NEXT_HEADER: usize = 6;
    pub const HOP_LIMIT: usize = 7;
    pub const SRC: Range<usize> = 8..24;
    pub const DST: Range<usize> = 24..40;
    // Offsets inside the TCP header.
    pub const TCP_SRC_PORT: Range<usize> = 0..2;
    pub const TCP_DST_PORT: Range<usize> = 2..4;
    pub const TCP_SEQ: Range<usize> = 4..8;
    pub const TCP_ACK: Range<usize> = 8..12;
    pub const TCP_DATA_OFF: usize = 12;
    pub const TCP_FLAGS: usize = 13;
    pub const TCP_WINDOW: Range<usize> = 14..16;
    pub const TCP_CHECKSUM: Range<usize> = 16..18;
    // UDP header.
    pub const UDP_LEN: Range<usize> = 4..6;
    pub const UDP_CHECKSUM: Range<usize> = 6..8;
    // ICMPv6 header.
    pub const ICMP_CHECKSUM: Range<usize> = 2..4;
}

/// Offset of the checksum field inside a TCP header.
pub const TCP_CHECKSUM_OFFSET: usize = field::TCP_CHECKSUM.start;

/// What the transport checksum field of a packet holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChecksumMode {
    /// A complete checksum (no offload, or the virtio-net header does not ask for one).
    #[default]
    Complete,
    /// `CHECKSUM_PARTIAL` (virtio-net header flag `NEEDS_CSUM`): the field holds the folded,
    /// uncomplemented IPv6 pseudo-header sum; whoever transmits the packet completes it over
    /// the transport header and payload.
    Partial,
}

/// Why a packet could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// The output buffer is too small.
    #[error("output buffer too small: need {needed} bytes, have {have}")]
    BufferTooSmall {
        /// Bytes the packet needs.
        needed: usize,
        /// Bytes the buffer has.
        have: usize,
    },
    /// The payload does not fit in one IPv6 packet.
    #[error("payload of {0} bytes does not fit in one packet")]
    PayloadTooLarge(usize),
}

// ---------------------------------------------------------------------------------------------
// Checksums

/// Adds `bytes` as big-endian 16-bit words (an odd last byte is padded with zero) to `acc`.
fn add_bytes(mut acc: u64, bytes: &[u8]) -> u64 {
    let mut chunks = bytes.chunks_exact(2);
    for w in &mut chunks {
        acc += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

/// Folds a wide sum into 16 bits with end-around carry.
fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    // Invariant: the loop leaves at most 16 significant bits.
    acc as u16
}

/// The IPv6 pseudo-header sum (RFC 8200 §8.1), unfolded.
fn pseudo_header(src: &Ipv6Addr, dst: &Ipv6Addr, len: usize, next: u8) -> u64 {
    let mut acc = add_bytes(0, &src.octets());
    acc = add_bytes(acc, &dst.octets());
    acc += (len as u64 >> 16) + (len as u64 & 0xffff);
    acc + u64::from(next)
}

/// The complete transport checksum of `l4` (header and payload, its checksum field included
/// as it stands: zero it first) under the IPv6 pseudo-header.
pub fn transport_checksum(src: &Ipv6Addr, dst: &Ipv6Addr, next: u8, l4: &[u8]) -> u16 {
    !fold(add_bytes(pseudo_header(src, dst, l4.len(), next), l4))
}

/// True when the transport checksum of `l4` (checksum field included) verifies.
pub fn transport_checksum_ok(src: &Ipv6Addr, dst: &Ipv6Addr, next: u8, l4: &[u8]) -> bool {
    fold(add_bytes(pseudo_header(src, dst, l4.len(), next), l4)) == 0xffff
}

/// The folded, uncomplemented pseudo-header sum a `CHECKSUM_PARTIAL` packet carries.
pub fn partial_checksum(src: &Ipv6Addr, dst: &Ipv6Addr, next: u8, l4_len: usize) -> u16 {
    fold(pseudo_header(src, dst, l4_len, next))
}

/// RFC 1624 eqn. 3 building block: removes the words of `old` from and adds the words of
/// `new` to the ones-complement sum `acc`.
fn replace_words(mut acc: u64, old: &[u8], new: &[u8]) -> u64 {
    for w in old.chunks_exact(2) {
        acc += u64::from(!u16::from_be_bytes([w[0], w[1]]));
    }
    add_bytes(acc, new)
}

// ---------------------------------------------------------------------------------------------
// Parsing

/// An IPv6 packet whose extension headers have been walked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ipv6View {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    /// Upper-layer protocol.
    pub next: u8,
    /// Offset of the upper-layer header.
    pub l4: usize,
    /// End of the packet (40 + payload length); bytes after it are ignored.
    pub end: usize,
}

fn ipv6_at(p: &[u8], r: core::ops::Range<usize>) -> Ipv6Addr {
    let mut o = [0u8; 16];
    o.copy_from_slice(&p[r]);
    Ipv6Addr::from(o)
}

fn be16(p: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([p[at], p[at + 1]])
}

fn be32(p: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]])
}

/// Parses the IPv6 header and walks hop-by-hop, routing (segments left 0 only) and
/// destination-options headers. Fragments are refused: reassembly is not done here.
pub(crate) fn parse_ipv6(p: &[u8]) -> Result<Ipv6View, DropReason> {
    let Some(&first) = p.first() else {
        return Err(DropReason::Malformed);
    };
    match first >> 4 {
        6 => {}
        4 => return Err(DropReason::Ipv4),
        _ => return Err(DropReason::Malformed),
    }
    if p.len() < IPV6_HEADER_LEN {
        return Err(DropReason::Malformed);
    }
    let payload_len = usize::from(be16(p, field::PAYLOAD_LEN.start));
    let end = IPV6_HEADER_LEN + payload_len;
    // A zero payload length announces a jumbogram (RFC 2675), which a TUN never carries.
    if payload_len == 0 || end > p.len() {
        return Err(DropReason::Malformed);
    }
    let mut next = p[field::NEXT_HEADER];
    let mut off = IPV6_HEADER_LEN;
    loop {
        match next {
            proto::HOP_BY_HOP | proto::ROUTING | proto::DEST_OPTS => {
                if off + 8 > end {
                    return Err(DropReason::Malformed);
                }
                // RFC 8200 §4.4: a routing header with segments left names a different final
                // destination than the header's, and the pseudo-header would not match it.
                if next == proto::ROUTING && p[off + 3] != 0 {
                    return Err(DropReason::ExtensionHeader);
                }
                let len = (usize::from(p[off + 1]) + 1) * 8;
                next = p[off];
                off += len;
                if off > end {
                    return Err(DropReason::Malformed);
                }
            }
            proto::FRAGMENT => return Err(DropReason::Fragment),
            proto::TCP | proto::UDP | proto::ICMPV6 => break,
            proto::NO_NEXT => return Err(DropReason::ExtensionHeader),
            _ => return Err(DropReason::Protocol),
        }
    }
    Ok(Ipv6View {
        src: ipv6_at(p, field::SRC),
        dst: ipv6_at(p, field::DST),
        next,
        l4: off,
        end,
    })
}

/// The TCP header fields the hairpin reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TcpView {
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    /// Payload bytes after the header and options.
    pub payload_len: usize,
}

impl TcpView {
    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    /// A connection request: SYN without ACK or RST.
    pub fn is_syn(&self) -> bool {
        self.flags & (tcp_flags::SYN | tcp_flags::ACK | tcp_flags::RST) == tcp_flags::SYN
    }

    /// Sequence space the segment occupies (RFC 9293 §3.4: SYN and FIN count one each).
    pub fn seg_len(&self) -> u32 {
        let mut n = self.payload_len as u32;
        if self.has(tcp_flags::SYN) {
            n = n.wrapping_add(1);
        }
        if self.has(tcp_flags::FIN) {
            n = n.wrapping_add(1);
        }
        n
    }
}

pub(crate) fn parse_tcp(p: &[u8], ip: &Ipv6View) -> Result<TcpView, DropReason> {
    let seg = &p[ip.l4..ip.end];
    if seg.len() < TCP_HEADER_LEN {
        return Err(DropReason::Malformed);
    }
    let data_off = usize::from(seg[field::TCP_DATA_OFF] >> 4) * 4;
    if data_off < TCP_HEADER_LEN || data_off > seg.len() {
        return Err(DropReason::Malformed);
    }
    Ok(TcpView {
        src_port: be16(seg, field::TCP_SRC_PORT.start),
        dst_port: be16(seg, field::TCP_DST_PORT.start),
        seq: be32(seg, field::TCP_SEQ.start),
        ack: be32(seg, field::TCP_ACK.start),
        flags: seg[field::TCP_FLAGS],
        payload_len: seg.len() - data_off,
    })
}

/// The UDP header of a datagram whose length field matches the IPv6 payload.
pub(crate) fn parse_udp(p: &[u8], ip: &Ipv6View) -> Result<(u16, u16), DropReason> {
    let seg = &p[ip.l4..ip.end];
    if seg.len() < UDP_HEADER_LEN || usize::from(be16(seg, field::UDP_LEN.start)) != seg.len() {
        return Err(DropReason::Malformed);
    }
    Ok((be16(seg, 0), be16(seg, 2)))
}

// ---------------------------------------------------------------------------------------------
// Rewriting

/// Rewrites the addresses and ports of the TCP packet `p` (already parsed as `ip`) in place
/// and updates its checksum incrementally (RFC 1624 eqn. 3).
///
/// With [`ChecksumMode::Partial`] the field holds the uncomplemented pseudo-header sum: only
/// the address change enters it (the ports are summed by whoever completes the checksum).
pub(crate) fn rewrite_tcp(
    p: &mut [u8],
    ip: &Ipv6View,
    src: SocketAddrV6,
    dst: SocketAddrV6,
    mode: ChecksumMode,
) {
    let l4 = ip.l4;
    let ck = l4 + field::TCP_CHECKSUM.start;
    let old_check = u64::from(be16(p, ck));
    let mut old = [0u8; 36];
    old[..32].copy_from_slice(&p[field::SRC.start..field::DST.end]);
    old[32..].copy_from_slice(&p[l4..l4 + 4]);
    let mut new = [0u8; 36];
    new[..16].copy_from_slice(&src.ip().octets());
    new[16..32].copy_from_slice(&dst.ip().octets());
    new[32..34].copy_from_slice(&src.port().to_be_bytes());
    new[34..36].copy_from_slice(&dst.port().to_be_bytes());
    let check = match mode {
        ChecksumMode::Complete => !fold(replace_words(u64::from(!(old_check as u16)), &old, &new)),
        ChecksumMode::Partial => fold(replace_words(old_check, &old[..32], &new[..32])),
    };
    p[field::SRC.start..field::DST.end].copy_from_slice(&new[..32]);
    p[l4..l4 + 4].copy_from_slice(&new[32..]);
    p[ck..ck + 2].copy_from_slice(&check.to_be_bytes());
}

/// Completes the partial checksum of the TCP packet `p` (the held SYN is kept complete).
pub(crate) fn complete_tcp_checksum(p: &mut [u8], ip: &Ipv6View) {
    let ck = ip.l4 + field::TCP_CHECKSUM.start;
    p[ck..ck + 2].fill(0);
    let c = transport_checksum(&ip.src, &ip.dst, proto::TCP, &p[ip.l4..ip.end]);
    p[ck..ck + 2].copy_from_slice(&c.to_be_bytes());
}

// ---------------------------------------------------------------------------------------------
// Builders

fn check_room(out: &[u8], needed: usize) -> Result<(), BuildError> {
    if out.len() < needed {
        return Err(BuildError::BufferTooSmall {
            needed,
            have: out.len(),
        });
    }
    Ok(())
}

/// Writes an IPv6 fixed header with no extension headers.
fn put_ipv6(out: &mut [u8], src: &Ipv6Addr, dst: &Ipv6Addr, next: u8, payload_len: usize) {
    out[..4].copy_from_slice(&[0x60, 0, 0, 0]);
    // Invariant: callers check payload_len <= u16::MAX.
    out[field::PAYLOAD_LEN].copy_from_slice(&(payload_len as u16).to_be_bytes());
    out[field::NEXT_HEADER] = next;
    out[field::HOP_LIMIT] = HOP_LIMIT;
    out[field::SRC].copy_from_slice(&src.octets());
    out[field::DST].copy_from_slice(&dst.octets());
}

/// Builds an IPv6 UDP datagram from `src` to `dst` into `out`; returns its length. The
/// checksum is complete and never zero (RFC 8200 §8.1: a computed zero is sent as `0xffff`).
pub fn build_udp(
    src: SocketAddrV6,
    dst: SocketAddrV6,
    payload: &[u8],
    out: &mut [u8],
) -> Result<usize, BuildError> {
    if payload.len() > MAX_UDP_PAYLOAD {
        return Err(BuildError::PayloadTooLarge(payload.len()));
    }
    let l4_len = UDP_HEADER_LEN + payload.len();
    let total = IPV6_HEADER_LEN + l4_len;
    check_room(out, total)?;
    put_ipv6(out, src.ip(), dst.ip(), proto::UDP, l4_len);
    let l4 = &mut out[IPV6_HEADER_LEN..total];
    l4[0..2].copy_from_slice(&src.port().to_be_bytes());
    l4[2..4].copy_from_slice(&dst.port().to_be_bytes());
    l4[field::UDP_LEN].copy_from_slice(&(l4_len as u16).to_be_bytes());
    l4[field::UDP_CHECKSUM].fill(0);
    l4[UDP_HEADER_LEN..].copy_from_slice(payload);
    let c = match transport_checksum(src.ip(), dst.ip(), proto::UDP, l4) {
        0 => 0xffff,
        c => c,
    };
    l4[field::UDP_CHECKSUM].copy_from_slice(&c.to_be_bytes());
    Ok(total)
}

/// Builds an ICMPv6 echo reply (RFC 4443 §4.2) from `src` to `dst` into `out`; returns its
/// length.
pub fn build_echo_reply(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    ident: u16,
    seq: u16,
    payload: &[u8],
    out: &mut [u8],
) -> Result<usize, BuildError> {
    if payload.len() > u16::MAX as usize - ICMPV6_HEADER_LEN {
        return Err(BuildError::PayloadTooLarge(payload.len()));
    }
    let mut head = [0u8; ICMPV6_HEADER_LEN];
    head[0] = icmp::ECHO_REPLY;
    head[4..6].copy_from_slice(&ident.to_be_bytes());
    head[6..8].copy_from_slice(&seq.to_be_bytes());
    build_icmp(src, dst, head, payload, out)
}

/// Builds an ICMPv6 destination unreachable error (RFC 4443 §3.1) with `code`, from `src` to
/// `dst`, quoting as much of `invoking` as keeps the packet within 1280 bytes.
pub fn build_dest_unreachable(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    code: u8,
    invoking: &[u8],
    out: &mut [u8],
) -> Result<usize, BuildError> {
    let quote = invoking
        .len()
        .min(IPV6_MIN_MTU - IPV6_HEADER_LEN - ICMPV6_HEADER_LEN);
    let mut head = [0u8; ICMPV6_HEADER_LEN];
    head[0] = icmp::DEST_UNREACHABLE;
    head[1] = code;
    build_icmp(src, dst, head, &invoking[..quote], out)
}

fn build_icmp(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    head: [u8; ICMPV6_HEADER_LEN],
    body: &[u8],
    out: &mut [u8],
) -> Result<usize, BuildError> {
    let l4_len = ICMPV6_HEADER_LEN + body.len();
    let total = IPV6_HEADER_LEN + l4_len;
    check_room(out, total)?;
    put_ipv6(out, &src, &dst, proto::ICMPV6, l4_len);
    let l4 = &mut out[IPV6_HEADER_LEN..total];
    l4[..ICMPV6_HEADER_LEN].copy_from_slice(&head);
    l4[ICMPV6_HEADER_LEN..].copy_from_slice(body);
    let c = transport_checksum(&src, &dst, proto::ICMPV6, l4);
    l4[field::ICMP_CHECKSUM].copy_from_slice(&c.to_be_bytes());
    Ok(total)
}

/// Builds a bare TCP segment (no options, no payload, window 0) from `src` to `dst` with a
/// complete checksum; returns its length (60).
pub fn build_tcp(
    src: SocketAddrV6,
    dst: SocketAddrV6,
    seq: u32,
    ack: u32,
    flags: u8,
    out: &mut [u8],
) -> Result<usize, BuildError> {
    let total = IPV6_HEADER_LEN + TCP_HEADER_LEN;
    check_room(out, total)?;
    put_ipv6(out, src.ip(), dst.ip(), proto::TCP, TCP_HEADER_LEN);
    let l4 = &mut out[IPV6_HEADER_LEN..total];
    l4[field::TCP_SRC_PORT].copy_from_slice(&src.port().to_be_bytes());
    l4[field::TCP_DST_PORT].copy_from_slice(&dst.port().to_be_bytes());
    l4[field::TCP_SEQ].copy_from_slice(&seq.to_be_bytes());
    l4[field::TCP_ACK].copy_from_slice(&ack.to_be_bytes());
    l4[field::TCP_DATA_OFF] = ((TCP_HEADER_LEN / 4) as u8) << 4;
    l4[field::TCP_FLAGS] = flags;
    l4[field::TCP_WINDOW].fill(0);
    l4[field::TCP_CHECKSUM].fill(0);
    l4[18..20].fill(0);
    let c = transport_checksum(src.ip(), dst.ip(), proto::TCP, l4);
    l4[field::TCP_CHECKSUM].copy_from_slice(&c.to_be_bytes());
    Ok(total)
}

/// Reads the echo identifier and sequence number of an ICMPv6 message at `l4`.
pub(crate) fn echo_fields(p: &[u8], ip: &Ipv6View) -> Result<(u8, u16, u16), DropReason> {
    let msg = &p[ip.l4..ip.end];
    if msg.len() < ICMPV6_HEADER_LEN {
        return Err(DropReason::Malformed);
    }
    Ok((msg[0], be16(msg, 4), be16(msg, 6)))
}
