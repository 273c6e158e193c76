//! The mapping between Pilot addresses and IPv6 Unique Local Addresses, so that the kernel can
//! route to agents through the TUN interface.
//!
//! Every Pilot address lives in one fixed ULA /48, `fd06:3fcd:b33d::/48`:
//!
//! ```text
//! |  8 bits  |   40 bits    |  16 bits  |      32 bits      |     32 bits     |
//! +----------+--------------+-----------+-------------------+-----------------+
//! | 0xfd     | Global ID    | Subnet ID | Interface ID high | Interface ID low|
//! |          | 06:3fcd:b33d | = network | = 0 (reserved)    | = node          |
//! +----------+--------------+-----------+-------------------+-----------------+
//!
//! 1:0001.F291.0004  <->  fd06:3fcd:b33d:1::f291:4
//! ```
//!
//! The Global ID was generated once, as RFC 4193 §3.2.2 describes: SHA-1 over a 64-bit NTP
//! timestamp and an EUI-64, keeping the least significant 40 bits (`06 3f cd b3 3d`). It is a
//! protocol constant of this implementation: every pilot node uses the same prefix, so a ULA
//! names the same agent on every host.
//!
//! The upper half of the interface ID is reserved and must be zero; an address in the prefix
//! with non-zero reserved bits is not a Pilot address and is rejected, as is anything outside
//! the prefix.

use core::net::Ipv6Addr;

use crate::addr::Addr;

/// The 48-bit routing prefix (`fd06:3fcd:b33d::/48`) as its first six bytes.
pub const PREFIX: [u8; 6] = [0xfd, 0x06, 0x3f, 0xcd, 0xb3, 0x3d];

/// Prefix length of the Pilot ULA range.
pub const PREFIX_LEN: u8 = 48;

/// The Pilot ULA prefix as an address (`fd06:3fcd:b33d::`).
pub const PREFIX_ADDR: Ipv6Addr = Ipv6Addr::new(0xfd06, 0x3fcd, 0xb33d, 0, 0, 0, 0, 0);

/// Why an IPv6 address is not a Pilot address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UlaError {
    /// The address is outside `fd06:3fcd:b33d::/48`.
    #[error("{0} is outside the Pilot prefix fd06:3fcd:b33d::/48")]
    OutsidePrefix(Ipv6Addr),
    /// The reserved upper 32 bits of the interface ID are not zero.
    #[error(
        "{0} has non-zero reserved interface-ID bits (expected fd06:3fcd:b33d:NET::HHHH:LLLL)"
    )]
    ReservedBits(Ipv6Addr),
}

/// The ULA of a Pilot address.
pub const fn to_ipv6(addr: Addr) -> Ipv6Addr {
    let n = addr.network.to_be_bytes();
    let h = addr.node.to_be_bytes();
    let p = PREFIX;
    Ipv6Addr::new(
        u16::from_be_bytes([p[0], p[1]]),
        u16::from_be_bytes([p[2], p[3]]),
        u16::from_be_bytes([p[4], p[5]]),
        u16::from_be_bytes(n),
        0,
        0,
        u16::from_be_bytes([h[0], h[1]]),
        u16::from_be_bytes([h[2], h[3]]),
    )
}

/// The Pilot address a ULA stands for.
pub fn from_ipv6(ip: Ipv6Addr) -> Result<Addr, UlaError> {
    let o = ip.octets();
    if o[..6] != PREFIX {
        return Err(UlaError::OutsidePrefix(ip));
    }
    if o[8..12] != [0; 4] {
        return Err(UlaError::ReservedBits(ip));
    }
    Ok(Addr::new(
        u16::from_be_bytes([o[6], o[7]]),
        u32::from_be_bytes([o[12], o[13], o[14], o[15]]),
    ))
}

/// True when `ip` lies in the Pilot /48 (whether or not its reserved bits are zero).
pub fn in_prefix(ip: Ipv6Addr) -> bool {
    ip.octets()[..6] == PREFIX
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_example() {
        let a: Addr = "1:0001.F291.0004".parse().unwrap();
        let ip: Ipv6Addr = "fd06:3fcd:b33d:1::f291:4".parse().unwrap();
        assert_eq!(to_ipv6(a), ip);
        assert_eq!(from_ipv6(ip), Ok(a));
        assert_eq!(
            to_ipv6(Addr::new(0xFFFF, 0xFFFF_FFFF)).to_string(),
            "fd06:3fcd:b33d:ffff::ffff:ffff"
        );
        assert_eq!(PREFIX_ADDR.octets()[..6], PREFIX);
    }

    #[test]
    fn rejects_outside() {
        for s in ["fd06:3fcd:b33e:1::1", "fe80::1", "::1", "fd06:3fcd:b33c::"] {
            let ip: Ipv6Addr = s.parse().unwrap();
            assert_eq!(from_ipv6(ip), Err(UlaError::OutsidePrefix(ip)));
            assert!(!in_prefix(ip));
        }
        let ip: Ipv6Addr = "fd06:3fcd:b33d:0:0:1::1".parse().unwrap();
        assert_eq!(from_ipv6(ip), Err(UlaError::ReservedBits(ip)));
        assert!(in_prefix(ip));
    }
}
