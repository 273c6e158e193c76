//! Pilot virtual addresses (48 bits) and socket addresses (address + 16-bit port).
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |          network (u16)        |        node (u32) high half   |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |        node (u32) low half    |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```
//!
//! Text form (v1 wire §1.1): `<network decimal>:<NNNN>.<HHHH>.<LLLL>` where `NNNN` repeats the
//! network in hex and `HHHH`/`LLLL` are the high and low halves of the node ID. Printing is
//! uppercase, zero-padded; parsing accepts either case but requires exactly four hex digits per
//! group and a first group equal to the decimal network. Socket addresses append `:<port>` and
//! split at the last colon.

use core::fmt;
use core::str::FromStr;

/// Length of an address on the wire.
pub const ADDR_LEN: usize = 6;

/// A 48-bit Pilot virtual address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Addr {
    /// Network ID. Network 0 is the backbone every node joins.
    pub network: u16,
    /// Node ID within the address space (assigned by the registry).
    pub node: u32,
}

impl Addr {
    /// The zero / unspecified address `0:0000.0000.0000`.
    pub const UNSPECIFIED: Addr = Addr::new(0, 0);
    /// Well-known node of the registry (`0:0000.0000.0001`). v1 defines it but never routes to it.
    pub const REGISTRY: Addr = Addr::new(0, 1);
    /// Well-known node of the beacon (`0:0000.0000.0002`). Defined, unused by v1.
    pub const BEACON: Addr = Addr::new(0, 2);
    /// Well-known node of the nameserver (`0:0000.0000.0003`). Defined, unused by v1.
    pub const NAMESERVER: Addr = Addr::new(0, 3);
    /// Node ID that means "every node of the network".
    pub const BROADCAST_NODE: u32 = 0xFFFF_FFFF;

    /// Builds an address from its parts.
    pub const fn new(network: u16, node: u32) -> Self {
        Addr { network, node }
    }

    /// The broadcast address of `network` (`N:NNNN.FFFF.FFFF`).
    pub const fn broadcast(network: u16) -> Self {
        Addr::new(network, Self::BROADCAST_NODE)
    }

    /// True for `0:0000.0000.0000`.
    pub const fn is_unspecified(&self) -> bool {
        self.network == 0 && self.node == 0
    }

    /// True when the node part is the broadcast node, on any network (as v1's `IsBroadcast`).
    pub const fn is_broadcast(&self) -> bool {
        self.node == Self::BROADCAST_NODE
    }

    /// The six wire bytes: network then node, big-endian.
    pub const fn to_bytes(&self) -> [u8; ADDR_LEN] {
        let n = self.network.to_be_bytes();
        let h = self.node.to_be_bytes();
        [n[0], n[1], h[0], h[1], h[2], h[3]]
    }

    /// Reads an address from its six wire bytes.
    pub const fn from_bytes(b: [u8; ADDR_LEN]) -> Self {
        Addr {
            network: u16::from_be_bytes([b[0], b[1]]),
            node: u32::from_be_bytes([b[2], b[3], b[4], b[5]]),
        }
    }

    /// The address as one 48-bit integer (network in the high 16 bits).
    pub const fn to_u64(&self) -> u64 {
        ((self.network as u64) << 32) | self.node as u64
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{:04X}.{:04X}.{:04X}",
            self.network,
            self.network,
            self.node >> 16,
            self.node & 0xFFFF
        )
    }
}

/// Why a text address or socket address was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrParseError {
    /// The text has no `:` separating network and node.
    #[error("missing ':' between network and node (expected N:NNNN.HHHH.LLLL)")]
    MissingColon,
    /// The decimal network is empty, not decimal, or larger than 65535.
    #[error("network {0:?} is not a decimal number from 0 to 65535")]
    BadNetwork(String),
    /// The node part does not have exactly three `.`-separated groups.
    #[error("expected 3 hex groups NNNN.HHHH.LLLL after ':', found {0}")]
    GroupCount(usize),
    /// A group is not exactly four hex digits.
    #[error("group {0:?} is not exactly 4 hex digits")]
    BadGroup(String),
    /// The first hex group differs from the decimal network.
    #[error("network mismatch: decimal {decimal} but hex group says {hex}")]
    NetworkMismatch {
        /// The decimal network before the colon.
        decimal: u16,
        /// The network in the first hex group.
        hex: u16,
    },
    /// A socket address has no `:port` suffix.
    #[error("missing ':port' after the address")]
    MissingPort,
    /// The port is not a decimal number from 0 to 65535.
    #[error("port {0:?} is not a decimal number from 0 to 65535")]
    BadPort(String),
}

fn parse_dec_u16(s: &str) -> Option<u16> {
    // v1 accepts leading zeros but no sign or whitespace; `u16::from_str` accepts a '+'.
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn parse_group(s: &str) -> Result<u16, AddrParseError> {
    if s.len() != 4 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(AddrParseError::BadGroup(s.to_owned()));
    }
    u16::from_str_radix(s, 16).map_err(|_| AddrParseError::BadGroup(s.to_owned()))
}

impl FromStr for Addr {
    type Err = AddrParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (net, rest) = s.split_once(':').ok_or(AddrParseError::MissingColon)?;
        let network = parse_dec_u16(net).ok_or_else(|| AddrParseError::BadNetwork(net.into()))?;
        let groups: Vec<&str> = rest.split('.').collect();
        let [g0, g1, g2] = groups[..] else {
            return Err(AddrParseError::GroupCount(groups.len()));
        };
        let hex_net = parse_group(g0)?;
        let high = parse_group(g1)?;
        let low = parse_group(g2)?;
        if hex_net != network {
            return Err(AddrParseError::NetworkMismatch {
                decimal: network,
                hex: hex_net,
            });
        }
        Ok(Addr::new(network, (u32::from(high) << 16) | u32::from(low)))
    }
}

/// A Pilot socket address: virtual address plus 16-bit port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SocketAddr {
    /// The virtual address.
    pub addr: Addr,
    /// The virtual port.
    pub port: u16,
}

impl SocketAddr {
    /// Builds a socket address.
    pub const fn new(addr: Addr, port: u16) -> Self {
        SocketAddr { addr, port }
    }
}

impl fmt::Display for SocketAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.addr, self.port)
    }
}

impl FromStr for SocketAddr {
    type Err = AddrParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, port) = s.rsplit_once(':').ok_or(AddrParseError::MissingPort)?;
        // An address alone has exactly one colon; without a second one there is no port.
        if !addr.contains(':') {
            return Err(AddrParseError::MissingPort);
        }
        let port = parse_dec_u16(port).ok_or_else(|| AddrParseError::BadPort(port.into()))?;
        Ok(SocketAddr::new(addr.parse()?, port))
    }
}

/// Virtual ports (v1 wire §1.2).
pub mod port {
    /// Control-protocol ping.
    pub const PING: u16 = 0;
    /// Echo service.
    pub const ECHO: u16 = 7;
    /// Nameserver.
    pub const NAMESERVER: u16 = 53;
    /// HTTP (an application convention).
    pub const HTTP: u16 = 80;
    /// Secure channel.
    pub const SECURE: u16 = 443;
    /// Trust handshake.
    pub const HANDSHAKE: u16 = 444;
    /// Stdio text stream.
    pub const STDIO: u16 = 1000;
    /// Data exchange.
    pub const DATA_EXCHANGE: u16 = 1001;
    /// Event stream (pub/sub).
    pub const EVENT_STREAM: u16 = 1002;
    /// Task delegation.
    pub const TASK: u16 = 1003;
    /// Ports below this are reserved / well-known.
    pub const REGISTERED_START: u16 = 1024;
    /// First ephemeral port.
    pub const EPHEMERAL_START: u16 = 49152;
    /// Last ephemeral port.
    pub const EPHEMERAL_END: u16 = 65535;

    /// True for 0..=1023.
    pub const fn is_reserved(port: u16) -> bool {
        port < REGISTERED_START
    }

    /// True for 49152..=65535.
    pub const fn is_ephemeral(port: u16) -> bool {
        port >= EPHEMERAL_START
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_like_v1() {
        assert_eq!(Addr::new(0, 42).to_string(), "0:0000.0000.002A");
        assert_eq!(Addr::new(1, 0xF291_0004).to_string(), "1:0001.F291.0004");
        assert_eq!(Addr::new(23, 1).to_string(), "23:0017.0000.0001");
        assert_eq!(
            Addr::new(65535, 0xFFFF_FFFF).to_string(),
            "65535:FFFF.FFFF.FFFF"
        );
        assert_eq!(Addr::broadcast(5).to_string(), "5:0005.FFFF.FFFF");
    }

    #[test]
    fn parses_v1_examples() {
        assert_eq!(
            "1:0001.f291.0004".parse::<Addr>(),
            Ok(Addr::new(1, 0xF291_0004))
        );
        assert_eq!("007:0007.0000.0001".parse::<Addr>(), Ok(Addr::new(7, 1)));
        assert_eq!(
            "0:0000.0000.0005:1000".parse::<SocketAddr>(),
            Ok(SocketAddr::new(Addr::new(0, 5), 1000))
        );
    }

    #[test]
    fn rejects_what_v1_rejects() {
        for bad in [
            "",
            "0",
            "0:0000",
            "0:0000.0000",
            "0:0000.0000.0000.0000",
            "0:000.0000.0000",
            "0:0000.000.0000",
            "99999:0000.0000.0000",
            "0:ZZZZ.0000.0000",
            "1:0000.0000.0001",
            "+1:0001.0000.0001",
            " 1:0001.0000.0001",
            "0:+000.0000.0001",
        ] {
            assert!(bad.parse::<Addr>().is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn errors_name_the_problem() {
        assert_eq!(
            "1:0000.0000.0001".parse::<Addr>(),
            Err(AddrParseError::NetworkMismatch { decimal: 1, hex: 0 })
        );
        assert_eq!(
            "0:0000.0000".parse::<Addr>(),
            Err(AddrParseError::GroupCount(2))
        );
        assert_eq!(
            "0:0000.0000.0001".parse::<SocketAddr>(),
            Err(AddrParseError::MissingPort)
        );
        assert_eq!(
            "0:0000.0000.0001:70000".parse::<SocketAddr>(),
            Err(AddrParseError::BadPort("70000".into()))
        );
    }

    #[test]
    fn special_addresses() {
        assert!(Addr::UNSPECIFIED.is_unspecified());
        assert!(!Addr::REGISTRY.is_unspecified());
        assert!(Addr::broadcast(9).is_broadcast());
        assert!(!Addr::NAMESERVER.is_broadcast());
        assert_eq!(Addr::BEACON.to_string(), "0:0000.0000.0002");
        assert_eq!(
            Addr::new(0x0102, 0x0304_0506).to_bytes(),
            [1, 2, 3, 4, 5, 6]
        );
        assert!(port::is_reserved(444) && !port::is_reserved(1024));
        assert!(port::is_ephemeral(49152) && !port::is_ephemeral(49151));
    }
}
