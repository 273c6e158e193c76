//! The Pilot packet header (v1 wire §1.3): 34 bytes, big-endian, then the payload.
//!
//! ```text
//!  0               1               2               3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-------+-------+---------------+-------------------------------+
//! |version| flags |   protocol    |        payload length         |  0
//! +-------+-------+---------------+-------------------------------+
//! |                    source address (6 bytes)                   |  4
//! +                               +-------------------------------+
//! |                               |                               |  8
//! +-------------------------------+                               +
//! |                 destination address (6 bytes)                 | 12
//! +-------------------------------+-------------------------------+
//! |          source port          |       destination port        | 16
//! +-------------------------------+-------------------------------+
//! |                        sequence number                        | 20
//! +---------------------------------------------------------------+
//! |                     acknowledgment number                     | 24
//! +-------------------------------+-------------------------------+
//! |            window             |        checksum (CRC-32)      | 28
//! +-------------------------------+                               +
//! |                               |                                 32
//! +-------------------------------+
//! ```
//!
//! The checksum is zlib CRC-32 over the 34 header bytes, with the checksum field zeroed, followed
//! by exactly `payload length` payload bytes. Bytes after the payload are ignored (v1 does the
//! same). Unlike v1, the version nibble is checked: only version 1 is accepted.

use bitflags::bitflags;

use crate::addr::{Addr, SocketAddr, ADDR_LEN};

/// Length of the packet header.
pub const HEADER_LEN: usize = 34;
/// The only protocol version.
pub const VERSION: u8 = 1;
/// Largest payload the 16-bit length field can describe.
pub const MAX_PAYLOAD: usize = u16::MAX as usize;

mod field {
    use core::ops::Range;
    pub const VER_FLAGS: usize = 0;
    pub const PROTOCOL: usize = 1;
    pub const LENGTH: Range<usize> = 2..4;
    pub const SRC_ADDR: Range<usize> = 4..10;
    pub const DST_ADDR: Range<usize> = 10..16;
    pub const SRC_PORT: Range<usize> = 16..18;
    pub const DST_PORT: Range<usize> = 18..20;
    pub const SEQ: Range<usize> = 20..24;
    pub const ACK: Range<usize> = 24..28;
    pub const WINDOW: Range<usize> = 28..30;
    pub const CHECKSUM: Range<usize> = 30..34;
}

bitflags! {
    /// Header flags: the low nibble of byte 0.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Flags: u8 {
        /// Synchronize: opens a stream.
        const SYN = 0x1;
        /// The acknowledgment number is valid.
        const ACK = 0x2;
        /// No more data from the sender.
        const FIN = 0x4;
        /// Reset the connection.
        const RST = 0x8;
    }
}

/// The protocol byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// Reliable stream (0x01).
    Stream,
    /// Unreliable datagram (0x02).
    Datagram,
    /// Control, e.g. ping (0x03).
    Control,
    /// Any other value; v1 parses it and then ignores the packet.
    Unknown(u8),
}

impl From<u8> for Protocol {
    fn from(v: u8) -> Self {
        match v {
            0x01 => Protocol::Stream,
            0x02 => Protocol::Datagram,
            0x03 => Protocol::Control,
            other => Protocol::Unknown(other),
        }
    }
}

impl From<Protocol> for u8 {
    fn from(p: Protocol) -> u8 {
        match p {
            Protocol::Stream => 0x01,
            Protocol::Datagram => 0x02,
            Protocol::Control => 0x03,
            Protocol::Unknown(v) => v,
        }
    }
}

/// Why a packet was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// The buffer is shorter than the header plus the declared payload.
    #[error("truncated packet: need {needed} bytes, have {have}")]
    Truncated {
        /// Bytes the header says the packet has.
        needed: usize,
        /// Bytes present.
        have: usize,
    },
    /// The version nibble is not 1.
    #[error("unsupported packet version {0}")]
    Version(u8),
    /// The CRC-32 does not match.
    #[error("bad checksum: header says {carried:#010x}, computed {computed:#010x}")]
    Checksum {
        /// The value in the header.
        carried: u32,
        /// The value computed over the bytes.
        computed: u32,
    },
    /// The payload does not fit the 16-bit length field or the buffer.
    #[error("payload of {0} bytes does not fit (at most 65535 and the buffer)")]
    PayloadTooLong(usize),
}

/// A zero-copy view of a Pilot packet (header and payload) in a buffer.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

fn be16(b: &[u8], r: core::ops::Range<usize>) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[r]);
    u16::from_be_bytes(a)
}

fn be32(b: &[u8], r: core::ops::Range<usize>) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[r]);
    u32::from_be_bytes(a)
}

fn addr_at(b: &[u8], r: core::ops::Range<usize>) -> Addr {
    let mut a = [0u8; ADDR_LEN];
    a.copy_from_slice(&b[r]);
    Addr::from_bytes(a)
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps a buffer without checking it. Accessors panic if it is shorter than the header;
    /// use [`Packet::new_checked`] for anything from the network.
    pub const fn new_unchecked(buffer: T) -> Self {
        Packet { buffer }
    }

    /// Wraps a buffer after checking the version and that the header and declared payload fit.
    /// The checksum is checked separately by [`Packet::verify_checksum`] (and by
    /// [`PacketRepr::parse`]).
    pub fn new_checked(buffer: T) -> Result<Self, HeaderError> {
        let p = Self::new_unchecked(buffer);
        p.check_len()?;
        if p.version() != VERSION {
            return Err(HeaderError::Version(p.version()));
        }
        Ok(p)
    }

    /// Checks that the buffer holds the header and the declared payload.
    pub fn check_len(&self) -> Result<(), HeaderError> {
        let have = self.buffer.as_ref().len();
        if have < HEADER_LEN {
            return Err(HeaderError::Truncated {
                needed: HEADER_LEN,
                have,
            });
        }
        let needed = self.total_len();
        if have < needed {
            return Err(HeaderError::Truncated { needed, have });
        }
        Ok(())
    }

    /// Gives back the buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// Header plus declared payload length.
    pub fn total_len(&self) -> usize {
        HEADER_LEN + usize::from(self.payload_len())
    }

    /// The version nibble.
    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[field::VER_FLAGS] >> 4
    }

    /// The flags nibble.
    pub fn flags(&self) -> Flags {
        Flags::from_bits_truncate(self.buffer.as_ref()[field::VER_FLAGS])
    }

    /// The protocol byte.
    pub fn protocol(&self) -> Protocol {
        Protocol::from(self.buffer.as_ref()[field::PROTOCOL])
    }

    /// The declared payload length.
    pub fn payload_len(&self) -> u16 {
        be16(self.buffer.as_ref(), field::LENGTH)
    }

    /// Source address.
    pub fn src_addr(&self) -> Addr {
        addr_at(self.buffer.as_ref(), field::SRC_ADDR)
    }

    /// Destination address.
    pub fn dst_addr(&self) -> Addr {
        addr_at(self.buffer.as_ref(), field::DST_ADDR)
    }

    /// Source port.
    pub fn src_port(&self) -> u16 {
        be16(self.buffer.as_ref(), field::SRC_PORT)
    }

    /// Destination port.
    pub fn dst_port(&self) -> u16 {
        be16(self.buffer.as_ref(), field::DST_PORT)
    }

    /// Sequence number.
    pub fn seq(&self) -> u32 {
        be32(self.buffer.as_ref(), field::SEQ)
    }

    /// Acknowledgment number.
    pub fn ack(&self) -> u32 {
        be32(self.buffer.as_ref(), field::ACK)
    }

    /// Advertised window (v1: free receive slots; 0 means no limit).
    pub fn window(&self) -> u16 {
        be16(self.buffer.as_ref(), field::WINDOW)
    }

    /// The checksum field.
    pub fn checksum(&self) -> u32 {
        be32(self.buffer.as_ref(), field::CHECKSUM)
    }

    /// The declared payload. Needs a length-checked packet.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..self.total_len()]
    }

    /// The CRC-32 of header (checksum zeroed) and payload. Needs a length-checked packet.
    pub fn compute_checksum(&self) -> u32 {
        let b = self.buffer.as_ref();
        let mut h = crc32fast::Hasher::new();
        h.update(&b[..field::CHECKSUM.start]);
        h.update(&[0u8; 4]);
        h.update(&b[field::CHECKSUM.end..self.total_len()]);
        h.finalize()
    }

    /// Checks the CRC-32. Needs a length-checked packet.
    pub fn verify_checksum(&self) -> Result<(), HeaderError> {
        let computed = self.compute_checksum();
        let carried = self.checksum();
        if computed == carried {
            Ok(())
        } else {
            Err(HeaderError::Checksum { carried, computed })
        }
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    fn put16(&mut self, r: core::ops::Range<usize>, v: u16) {
        self.buffer.as_mut()[r].copy_from_slice(&v.to_be_bytes());
    }

    fn put32(&mut self, r: core::ops::Range<usize>, v: u32) {
        self.buffer.as_mut()[r].copy_from_slice(&v.to_be_bytes());
    }

    /// Sets version and flags (byte 0).
    pub fn set_version_flags(&mut self, version: u8, flags: Flags) {
        self.buffer.as_mut()[field::VER_FLAGS] = (version << 4) | (flags.bits() & 0x0F);
    }

    /// Sets the protocol byte.
    pub fn set_protocol(&mut self, p: Protocol) {
        self.buffer.as_mut()[field::PROTOCOL] = p.into();
    }

    /// Sets the payload length.
    pub fn set_payload_len(&mut self, len: u16) {
        self.put16(field::LENGTH, len);
    }

    /// Sets the source address.
    pub fn set_src_addr(&mut self, a: Addr) {
        self.buffer.as_mut()[field::SRC_ADDR].copy_from_slice(&a.to_bytes());
    }

    /// Sets the destination address.
    pub fn set_dst_addr(&mut self, a: Addr) {
        self.buffer.as_mut()[field::DST_ADDR].copy_from_slice(&a.to_bytes());
    }

    /// Sets the source port.
    pub fn set_src_port(&mut self, p: u16) {
        self.put16(field::SRC_PORT, p);
    }

    /// Sets the destination port.
    pub fn set_dst_port(&mut self, p: u16) {
        self.put16(field::DST_PORT, p);
    }

    /// Sets the sequence number.
    pub fn set_seq(&mut self, v: u32) {
        self.put32(field::SEQ, v);
    }

    /// Sets the acknowledgment number.
    pub fn set_ack(&mut self, v: u32) {
        self.put32(field::ACK, v);
    }

    /// Sets the window.
    pub fn set_window(&mut self, v: u16) {
        self.put16(field::WINDOW, v);
    }

    /// Computes and stores the checksum. Needs a length-checked packet.
    pub fn fill_checksum(&mut self) {
        let c = self.compute_checksum();
        self.put32(field::CHECKSUM, c);
    }

    /// The payload, writable. Needs a length-checked packet.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let end = self.total_len();
        &mut self.buffer.as_mut()[HEADER_LEN..end]
    }
}

/// A parsed, checksum-verified header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketRepr {
    /// Flags.
    pub flags: Flags,
    /// Protocol.
    pub protocol: Protocol,
    /// Source socket address.
    pub src: SocketAddr,
    /// Destination socket address.
    pub dst: SocketAddr,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgment number.
    pub ack: u32,
    /// Window.
    pub window: u16,
    /// Payload length.
    pub payload_len: u16,
}

impl PacketRepr {
    /// Parses a length-checked packet and verifies its checksum.
    pub fn parse<T: AsRef<[u8]>>(packet: &Packet<T>) -> Result<Self, HeaderError> {
        packet.check_len()?;
        if packet.version() != VERSION {
            return Err(HeaderError::Version(packet.version()));
        }
        packet.verify_checksum()?;
        Ok(PacketRepr {
            flags: packet.flags(),
            protocol: packet.protocol(),
            src: SocketAddr::new(packet.src_addr(), packet.src_port()),
            dst: SocketAddr::new(packet.dst_addr(), packet.dst_port()),
            seq: packet.seq(),
            ack: packet.ack(),
            window: packet.window(),
            payload_len: packet.payload_len(),
        })
    }

    /// Header plus payload length.
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN + self.payload_len as usize
    }

    /// Writes the header into `buffer` and fills the checksum. The payload
    /// (`payload_len` bytes) must already sit at `buffer[HEADER_LEN..]`, so the data path
    /// never copies it. Returns the packet length.
    pub fn emit(&self, buffer: &mut [u8]) -> Result<usize, HeaderError> {
        let len = self.buffer_len();
        if buffer.len() < len {
            return Err(HeaderError::PayloadTooLong(usize::from(self.payload_len)));
        }
        let mut p = Packet::new_unchecked(&mut buffer[..len]);
        p.set_version_flags(VERSION, self.flags);
        p.set_protocol(self.protocol);
        p.set_payload_len(self.payload_len);
        p.set_src_addr(self.src.addr);
        p.set_dst_addr(self.dst.addr);
        p.set_src_port(self.src.port);
        p.set_dst_port(self.dst.port);
        p.set_seq(self.seq);
        p.set_ack(self.ack);
        p.set_window(self.window);
        p.fill_checksum();
        Ok(len)
    }

    /// Writes header and `payload` into `buffer` (a copying convenience for control paths).
    pub fn emit_with_payload(
        &self,
        buffer: &mut [u8],
        payload: &[u8],
    ) -> Result<usize, HeaderError> {
        let plen =
            u16::try_from(payload.len()).map_err(|_| HeaderError::PayloadTooLong(payload.len()))?;
        let end = HEADER_LEN + payload.len();
        if buffer.len() < end {
            return Err(HeaderError::PayloadTooLong(payload.len()));
        }
        buffer[HEADER_LEN..end].copy_from_slice(payload);
        PacketRepr {
            payload_len: plen,
            ..*self
        }
        .emit(buffer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SYN example of v1 SPEC.md: node 1 port 49152 to node 2 port 1000, window 512.
    /// CRC computed independently with Python's `zlib.crc32`.
    const SPEC_SYN: [u8; 34] = [
        0x11, 0x01, 0x00, 0x00, // ver|flags, protocol, length
        0x00, 0x00, 0x00, 0x00, 0x00, 0x01, // src 0:0000.0000.0001
        0x00, 0x00, 0x00, 0x00, 0x00, 0x02, // dst 0:0000.0000.0002
        0xC0, 0x00, 0x03, 0xE8, // ports 49152 -> 1000
        0x00, 0x00, 0x00, 0x00, // seq
        0x00, 0x00, 0x00, 0x00, // ack
        0x02, 0x00, // window 512
        0x14, 0x5E, 0xD8, 0x74, // crc32
    ];

    fn spec_syn_repr() -> PacketRepr {
        PacketRepr {
            flags: Flags::SYN,
            protocol: Protocol::Stream,
            src: SocketAddr::new(Addr::new(0, 1), 49152),
            dst: SocketAddr::new(Addr::new(0, 2), 1000),
            seq: 0,
            ack: 0,
            window: 512,
            payload_len: 0,
        }
    }

    #[test]
    fn golden_spec_syn() {
        let mut buf = [0u8; 34];
        assert_eq!(spec_syn_repr().emit(&mut buf), Ok(34));
        assert_eq!(buf, SPEC_SYN);
        let p = Packet::new_checked(&SPEC_SYN[..]).unwrap();
        assert_eq!(PacketRepr::parse(&p), Ok(spec_syn_repr()));
    }

    #[test]
    fn golden_with_payload() {
        // FIN|ACK data "hi" from 1:0001.0000.0007:7 to 1:0001.0000.0009:49153, seq 5, ack 9.
        // CRC computed with Python's zlib.crc32.
        let expected: [u8; 36] = [
            0x16, 0x02, 0x00, 0x02, 0x00, 0x01, 0x00, 0x00, 0x00, 0x07, 0x00, 0x01, 0x00, 0x00,
            0x00, 0x09, 0x00, 0x07, 0xC0, 0x01, 0x00, 0x00, 0x00, 0x05, 0x00, 0x00, 0x00, 0x09,
            0x00, 0x00, 0x59, 0xB6, 0x70, 0x01, b'h', b'i',
        ];
        let repr = PacketRepr {
            flags: Flags::FIN | Flags::ACK,
            protocol: Protocol::Datagram,
            src: SocketAddr::new(Addr::new(1, 7), 7),
            dst: SocketAddr::new(Addr::new(1, 9), 49153),
            seq: 5,
            ack: 9,
            window: 0,
            payload_len: 2,
        };
        let mut buf = [0u8; 40];
        assert_eq!(repr.emit_with_payload(&mut buf, b"hi"), Ok(36));
        assert_eq!(buf[..36], expected);
        // Trailing bytes are ignored, as v1 does.
        buf[36..].copy_from_slice(b"junk");
        let p = Packet::new_checked(&buf[..]).unwrap();
        assert_eq!(PacketRepr::parse(&p), Ok(repr));
        assert_eq!(p.payload(), b"hi");
    }

    #[test]
    fn rejects_damage() {
        let mut b = SPEC_SYN;
        b[25] ^= 1;
        let p = Packet::new_checked(&b[..]).unwrap();
        assert!(matches!(
            PacketRepr::parse(&p),
            Err(HeaderError::Checksum { .. })
        ));
        assert_eq!(
            Packet::new_checked(&SPEC_SYN[..33]).err(),
            Some(HeaderError::Truncated {
                needed: 34,
                have: 33
            })
        );
        let mut b = SPEC_SYN;
        b[3] = 1; // declares one payload byte that is not there
        assert_eq!(
            Packet::new_checked(&b[..]).err(),
            Some(HeaderError::Truncated {
                needed: 35,
                have: 34
            })
        );
        let mut b = SPEC_SYN;
        b[0] = 0x21;
        assert_eq!(
            Packet::new_checked(&b[..]).err(),
            Some(HeaderError::Version(2))
        );
    }

    #[test]
    fn protocol_bytes() {
        for v in 0..=255u8 {
            assert_eq!(u8::from(Protocol::from(v)), v);
        }
    }
}
