//! Beacon messages (v1 wire §5.1): endpoint discovery, hole punching and relay, on the same
//! UDP socket as the tunnel. The type byte is below 0x10, which is how a daemon tells them
//! from tunnel frames.
//!
//! ```text
//! 0x01 Discover       [u32 node]                              node -> beacon
//!      signed form    [u32 node][u64 unix_ms][64 B Ed25519 signature]   (77 bytes, extension)
//! 0x02 DiscoverReply  [u8 ip_len (4|16)][ip][u16 port]        beacon -> node
//! 0x03 PunchRequest   [u32 requester][u32 target]             node -> beacon
//! 0x04 PunchCommand   [u8 ip_len (4|16)][ip][u16 port]        beacon -> node
//! 0x05 Relay          [u32 sender][u32 dest][frame...]        node -> beacon, beacon -> beacon
//! 0x06 RelayDeliver   [u32 sender][frame...]                  beacon -> node
//! 0x07 Sync           [u32 beacon_id][u16 count][count x u32 node]   beacon <-> beacon
//! ```
//!
//! Endpoints are sent as 4 bytes for IPv4 (including v4-mapped IPv6) and 16 bytes otherwise.
//! Bytes after a fixed-size message are ignored, as v1 does. Parsing borrows the payload of
//! relay messages, so forwarding copies nothing.
//!
//! ## Signed Discover (extension)
//!
//! A v1 beacon reads the first 4 bytes after the type and ignores the rest, so a Discover can
//! carry a proof that the sender holds the node's registered key and still be accepted as a
//! plain Discover by v1 beacons. The proof is the sender's Unix time in milliseconds and an
//! Ed25519 signature over
//!
//! ```text
//! "pilot-beacon-discover-v1" || node (u32 BE) || unix_ms (u64 BE)
//! ```
//!
//! A Discover is signed exactly when it is [`SIGNED_DISCOVER_LEN`] (77) bytes long; any other
//! length of at least 5 is a plain v1 Discover and its extra bytes are ignored. The signature
//! does not cover the source endpoint (a node behind NAT does not know it): freshness and
//! replay rules belong to the beacon.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

/// Message type bytes.
pub mod kind {
    /// Discover.
    pub const DISCOVER: u8 = 0x01;
    /// DiscoverReply.
    pub const DISCOVER_REPLY: u8 = 0x02;
    /// PunchRequest.
    pub const PUNCH_REQUEST: u8 = 0x03;
    /// PunchCommand.
    pub const PUNCH_COMMAND: u8 = 0x04;
    /// Relay.
    pub const RELAY: u8 = 0x05;
    /// RelayDeliver.
    pub const RELAY_DELIVER: u8 = 0x06;
    /// Sync (beacon gossip).
    pub const SYNC: u8 = 0x07;
}

/// Bytes before the payload of a Relay message.
pub const RELAY_HEADER_LEN: usize = 9;
/// Bytes before the payload of a RelayDeliver message.
pub const RELAY_DELIVER_HEADER_LEN: usize = 5;
/// Most node IDs one Sync message can list and still fit a UDP datagram.
pub const MAX_SYNC_NODES: usize = (65_507 - 7) / 4;
/// Length of a plain v1 Discover as sent.
pub const DISCOVER_LEN: usize = 5;
/// Length of a signed Discover: type, node, Unix milliseconds, signature.
pub const SIGNED_DISCOVER_LEN: usize = 1 + 4 + 8 + 64;
/// Domain separation prefix of the signed-Discover signature.
pub const DISCOVER_SIGNATURE_CONTEXT: &[u8; 24] = b"pilot-beacon-discover-v1";
/// Length of the bytes a signed-Discover signature covers.
pub const DISCOVER_SIGNED_BYTES_LEN: usize = DISCOVER_SIGNATURE_CONTEXT.len() + 4 + 8;

/// Why a datagram is not a beacon message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BeaconError {
    /// Empty datagram.
    #[error("empty beacon message")]
    Empty,
    /// The type byte is not a beacon message type.
    #[error("unknown beacon message type {0:#04x}")]
    UnknownType(u8),
    /// Shorter than its type needs.
    #[error("beacon message type {kind:#04x} too short: need {needed} bytes, have {have}")]
    Truncated {
        /// The type byte.
        kind: u8,
        /// Bytes needed.
        needed: usize,
        /// Bytes present.
        have: usize,
    },
    /// An endpoint's IP length is neither 4 nor 16.
    #[error("endpoint IP length {0} is neither 4 nor 16")]
    IpLength(u8),
    /// A buffer is too small for the message being written.
    #[error("buffer too small: need {0} bytes")]
    BufferTooSmall(usize),
    /// The message is not of the type the operation needs.
    #[error("beacon message type {0:#04x} is not the expected type")]
    WrongType(u8),
}

/// Why a signed Discover's proof was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    /// The registered key is not a valid Ed25519 public key.
    #[error("registered key is not a valid Ed25519 public key")]
    BadKey,
    /// The signature does not verify (strictly) under the registered key.
    #[error("discover signature does not verify")]
    BadSignature,
}

/// The proof a signed Discover carries: when it was made and the node key's signature over
/// [`discover_signed_bytes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiscoverProof {
    /// The sender's Unix time in milliseconds when it signed.
    pub unix_ms: u64,
    /// Ed25519 signature by the node's registered key.
    pub signature: [u8; 64],
}

impl DiscoverProof {
    /// Makes the proof for `node` at `unix_ms` with the node's identity key.
    pub fn sign(key: &SigningKey, node: u32, unix_ms: u64) -> DiscoverProof {
        DiscoverProof {
            unix_ms,
            signature: key.sign(&discover_signed_bytes(node, unix_ms)).to_bytes(),
        }
    }

    /// Checks the signature against `key`, the key registered for `node`. Strict verification:
    /// small-order keys, non-canonical encodings and malleable signatures are refused.
    /// Freshness of [`DiscoverProof::unix_ms`] is the caller's business.
    pub fn verify(&self, node: u32, key: &[u8; 32]) -> Result<(), ProofError> {
        let vk = VerifyingKey::from_bytes(key).map_err(|_| ProofError::BadKey)?;
        vk.verify_strict(
            &discover_signed_bytes(node, self.unix_ms),
            &Signature::from_bytes(&self.signature),
        )
        .map_err(|_| ProofError::BadSignature)
    }
}

/// The bytes a signed-Discover signature covers:
/// `"pilot-beacon-discover-v1" || node (BE) || unix_ms (BE)`.
pub fn discover_signed_bytes(node: u32, unix_ms: u64) -> [u8; DISCOVER_SIGNED_BYTES_LEN] {
    let mut m = [0u8; DISCOVER_SIGNED_BYTES_LEN];
    let c = DISCOVER_SIGNATURE_CONTEXT.len();
    m[..c].copy_from_slice(DISCOVER_SIGNATURE_CONTEXT);
    m[c..c + 4].copy_from_slice(&node.to_be_bytes());
    m[c + 4..].copy_from_slice(&unix_ms.to_be_bytes());
    m
}

/// A complete signed Discover datagram for `node` at `unix_ms`, ready to send to a beacon.
/// v1 beacons read it as a plain Discover.
pub fn signed_discover(key: &SigningKey, node: u32, unix_ms: u64) -> [u8; SIGNED_DISCOVER_LEN] {
    let mut b = [0u8; SIGNED_DISCOVER_LEN];
    let m = BeaconMessage::Discover {
        node,
        proof: Some(DiscoverProof::sign(key, node, unix_ms)),
    };
    // The buffer is exactly the signed form's length, which `emit` needs and no more.
    let _ = m.emit(&mut b);
    b
}

/// One beacon message, borrowing variable-length parts from the datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BeaconMessage<'a> {
    /// Records the sender's observed endpoint under `node`.
    Discover {
        /// The node asking (0 for an anonymous probe).
        node: u32,
        /// Proof of the node's key, present exactly when the message is
        /// [`SIGNED_DISCOVER_LEN`] bytes long.
        proof: Option<DiscoverProof>,
    },
    /// The endpoint the beacon observed.
    DiscoverReply {
        /// Observed endpoint.
        endpoint: SocketAddr,
    },
    /// Asks the beacon to introduce `requester` and `target` to each other.
    PunchRequest {
        /// The node asking.
        requester: u32,
        /// The node to reach.
        target: u32,
    },
    /// Tells a node to send punch packets to `endpoint`.
    PunchCommand {
        /// Where to punch.
        endpoint: SocketAddr,
    },
    /// A tunnel frame to forward to `dest`.
    Relay {
        /// Claimed sender.
        sender: u32,
        /// Destination node.
        dest: u32,
        /// The tunnel frame.
        payload: &'a [u8],
    },
    /// A relayed tunnel frame from `sender`.
    RelayDeliver {
        /// Claimed sender.
        sender: u32,
        /// The tunnel frame.
        payload: &'a [u8],
    },
    /// The node IDs local to another beacon.
    Sync {
        /// Sending beacon.
        beacon_id: u32,
        /// `count x u32` node IDs, big-endian; see [`BeaconMessage::sync_nodes`].
        nodes: &'a [u8],
    },
}

fn need(b: &[u8], n: usize) -> Result<(), BeaconError> {
    if b.len() < n {
        return Err(BeaconError::Truncated {
            kind: b.first().copied().unwrap_or(0),
            needed: n,
            have: b.len(),
        });
    }
    Ok(())
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

fn parse_proof(b: &[u8]) -> Option<DiscoverProof> {
    if b.len() != SIGNED_DISCOVER_LEN {
        return None;
    }
    let mut ms = [0u8; 8];
    ms.copy_from_slice(&b[5..13]);
    let mut signature = [0u8; 64];
    signature.copy_from_slice(&b[13..SIGNED_DISCOVER_LEN]);
    Some(DiscoverProof {
        unix_ms: u64::from_be_bytes(ms),
        signature,
    })
}

fn parse_endpoint(b: &[u8]) -> Result<SocketAddr, BeaconError> {
    need(b, 2)?;
    let ip_len = b[1];
    let ip: IpAddr = match ip_len {
        4 => {
            need(b, 2 + 4 + 2)?;
            Ipv4Addr::new(b[2], b[3], b[4], b[5]).into()
        }
        16 => {
            need(b, 2 + 16 + 2)?;
            let mut o = [0u8; 16];
            o.copy_from_slice(&b[2..18]);
            // A v4-mapped address is the IPv4 endpoint (the form v1 itself sends).
            let v6 = Ipv6Addr::from(o);
            v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
        }
        other => return Err(BeaconError::IpLength(other)),
    };
    let p = 2 + usize::from(ip_len);
    Ok(SocketAddr::new(ip, u16::from_be_bytes([b[p], b[p + 1]])))
}

impl<'a> BeaconMessage<'a> {
    /// Parses one datagram.
    pub fn parse(b: &'a [u8]) -> Result<Self, BeaconError> {
        let &t = b.first().ok_or(BeaconError::Empty)?;
        Ok(match t {
            kind::DISCOVER => {
                need(b, DISCOVER_LEN)?;
                BeaconMessage::Discover {
                    node: u32_at(b, 1),
                    proof: parse_proof(b),
                }
            }
            kind::DISCOVER_REPLY => BeaconMessage::DiscoverReply {
                endpoint: parse_endpoint(b)?,
            },
            kind::PUNCH_REQUEST => {
                need(b, 9)?;
                BeaconMessage::PunchRequest {
                    requester: u32_at(b, 1),
                    target: u32_at(b, 5),
                }
            }
            kind::PUNCH_COMMAND => BeaconMessage::PunchCommand {
                endpoint: parse_endpoint(b)?,
            },
            kind::RELAY => {
                need(b, RELAY_HEADER_LEN)?;
                BeaconMessage::Relay {
                    sender: u32_at(b, 1),
                    dest: u32_at(b, 5),
                    payload: &b[RELAY_HEADER_LEN..],
                }
            }
            kind::RELAY_DELIVER => {
                need(b, RELAY_DELIVER_HEADER_LEN)?;
                BeaconMessage::RelayDeliver {
                    sender: u32_at(b, 1),
                    payload: &b[RELAY_DELIVER_HEADER_LEN..],
                }
            }
            kind::SYNC => {
                need(b, 7)?;
                let count = usize::from(u16::from_be_bytes([b[5], b[6]]));
                need(b, 7 + 4 * count)?;
                BeaconMessage::Sync {
                    beacon_id: u32_at(b, 1),
                    nodes: &b[7..7 + 4 * count],
                }
            }
            other => return Err(BeaconError::UnknownType(other)),
        })
    }

    /// The node IDs of a Sync message (empty for other messages).
    pub fn sync_nodes(&self) -> impl Iterator<Item = u32> + 'a {
        let nodes: &'a [u8] = match self {
            BeaconMessage::Sync { nodes, .. } => nodes,
            _ => &[],
        };
        nodes
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
    }

    /// Bytes [`BeaconMessage::emit`] writes.
    pub fn buffer_len(&self) -> usize {
        match self {
            BeaconMessage::Discover { proof: None, .. } => DISCOVER_LEN,
            BeaconMessage::Discover { proof: Some(_), .. } => SIGNED_DISCOVER_LEN,
            BeaconMessage::DiscoverReply { endpoint }
            | BeaconMessage::PunchCommand { endpoint } => 2 + ip_bytes(endpoint.ip()).1 + 2,
            BeaconMessage::PunchRequest { .. } => 9,
            BeaconMessage::Relay { payload, .. } => RELAY_HEADER_LEN + payload.len(),
            BeaconMessage::RelayDeliver { payload, .. } => RELAY_DELIVER_HEADER_LEN + payload.len(),
            BeaconMessage::Sync { nodes, .. } => 7 + nodes.len(),
        }
    }

    /// Writes the message into `buf`; returns its length.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize, BeaconError> {
        let len = self.buffer_len();
        if buf.len() < len {
            return Err(BeaconError::BufferTooSmall(len));
        }
        let b = &mut buf[..len];
        match *self {
            BeaconMessage::Discover { node, proof } => {
                b[0] = kind::DISCOVER;
                b[1..5].copy_from_slice(&node.to_be_bytes());
                if let Some(p) = proof {
                    b[5..13].copy_from_slice(&p.unix_ms.to_be_bytes());
                    b[13..].copy_from_slice(&p.signature);
                }
            }
            BeaconMessage::DiscoverReply { endpoint } => {
                emit_endpoint(kind::DISCOVER_REPLY, endpoint, b)
            }
            BeaconMessage::PunchCommand { endpoint } => {
                emit_endpoint(kind::PUNCH_COMMAND, endpoint, b)
            }
            BeaconMessage::PunchRequest { requester, target } => {
                b[0] = kind::PUNCH_REQUEST;
                b[1..5].copy_from_slice(&requester.to_be_bytes());
                b[5..9].copy_from_slice(&target.to_be_bytes());
            }
            BeaconMessage::Relay {
                sender,
                dest,
                payload,
            } => {
                b[0] = kind::RELAY;
                b[1..5].copy_from_slice(&sender.to_be_bytes());
                b[5..9].copy_from_slice(&dest.to_be_bytes());
                b[RELAY_HEADER_LEN..].copy_from_slice(payload);
            }
            BeaconMessage::RelayDeliver { sender, payload } => {
                b[..RELAY_DELIVER_HEADER_LEN].copy_from_slice(&relay_deliver_header(sender));
                b[RELAY_DELIVER_HEADER_LEN..].copy_from_slice(payload);
            }
            BeaconMessage::Sync { beacon_id, nodes } => {
                let count =
                    u16::try_from(nodes.len() / 4).map_err(|_| BeaconError::BufferTooSmall(len))?;
                b[0] = kind::SYNC;
                b[1..5].copy_from_slice(&beacon_id.to_be_bytes());
                b[5..7].copy_from_slice(&count.to_be_bytes());
                b[7..].copy_from_slice(nodes);
            }
        }
        Ok(len)
    }
}

/// IPv4 (also v4-mapped IPv6) as 4 bytes, anything else as 16.
fn ip_bytes(ip: IpAddr) -> ([u8; 16], usize) {
    let mut out = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => {
            out[..4].copy_from_slice(&v4.octets());
            (out, 4)
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => {
                out[..4].copy_from_slice(&v4.octets());
                (out, 4)
            }
            None => (v6.octets(), 16),
        },
    }
}

fn emit_endpoint(t: u8, ep: SocketAddr, b: &mut [u8]) {
    let (ip, n) = ip_bytes(ep.ip());
    b[0] = t;
    b[1] = n as u8;
    b[2..2 + n].copy_from_slice(&ip[..n]);
    b[2 + n..4 + n].copy_from_slice(&ep.port().to_be_bytes());
}

/// The 5-byte header that turns a relayed frame into a RelayDeliver.
pub fn relay_deliver_header(sender: u32) -> [u8; RELAY_DELIVER_HEADER_LEN] {
    let s = sender.to_be_bytes();
    [kind::RELAY_DELIVER, s[0], s[1], s[2], s[3]]
}

/// Rewrites a Relay datagram in place into a RelayDeliver and returns the offset at which the
/// RelayDeliver starts (`msg[offset..]` is the datagram to send). Only the header moves: the
/// 9-byte `[0x05][sender][dest]` becomes, at offset 4, the 5-byte `[0x06][sender]`.
///
/// ```text
/// before: 05 s s s s d d d d frame...
/// after:  05 s s s 06 s s s s frame...
///                  ^ offset 4
/// ```
pub fn relay_into_deliver(msg: &mut [u8]) -> Result<usize, BeaconError> {
    need(msg, RELAY_HEADER_LEN)?;
    if msg[0] != kind::RELAY {
        return Err(BeaconError::WrongType(msg[0]));
    }
    let off = RELAY_HEADER_LEN - RELAY_DELIVER_HEADER_LEN;
    msg.copy_within(1..5, off + 1);
    msg[off] = kind::RELAY_DELIVER;
    Ok(off)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(m: BeaconMessage<'_>, golden: &[u8]) {
        let mut buf = [0u8; 128];
        let n = m.emit(&mut buf).unwrap();
        assert_eq!(&buf[..n], golden);
        assert_eq!(BeaconMessage::parse(golden), Ok(m));
    }

    #[test]
    fn golden_messages() {
        round_trip(
            BeaconMessage::Discover {
                node: 0x0102_0304,
                proof: None,
            },
            &[1, 1, 2, 3, 4],
        );
        round_trip(
            BeaconMessage::DiscoverReply {
                endpoint: "203.0.113.7:4000".parse().unwrap(),
            },
            &[2, 4, 203, 0, 113, 7, 0x0F, 0xA0],
        );
        round_trip(
            BeaconMessage::PunchRequest {
                requester: 5,
                target: 6,
            },
            &[3, 0, 0, 0, 5, 0, 0, 0, 6],
        );
        let mut v6 = vec![4u8, 16];
        v6.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&[0x23, 0x29]);
        round_trip(
            BeaconMessage::PunchCommand {
                endpoint: "[2001:db8::1]:9001".parse().unwrap(),
            },
            &v6,
        );
        round_trip(
            BeaconMessage::Relay {
                sender: 1,
                dest: 2,
                payload: b"PILS..",
            },
            b"\x05\x00\x00\x00\x01\x00\x00\x00\x02PILS..",
        );
        round_trip(
            BeaconMessage::RelayDeliver {
                sender: 1,
                payload: b"PILA",
            },
            b"\x06\x00\x00\x00\x01PILA",
        );
        let sync = BeaconMessage::Sync {
            beacon_id: 9,
            nodes: &[0, 0, 0, 1, 0, 0, 0, 2],
        };
        round_trip(sync, &[7, 0, 0, 0, 9, 0, 2, 0, 0, 0, 1, 0, 0, 0, 2]);
        assert_eq!(sync.sync_nodes().collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn v4_mapped_is_sent_as_four_bytes() {
        let mapped: SocketAddr = "[::ffff:198.51.100.2]:1".parse().unwrap();
        let mut buf = [0u8; 32];
        let n = BeaconMessage::DiscoverReply { endpoint: mapped }
            .emit(&mut buf)
            .unwrap();
        assert_eq!(&buf[..n], &[2, 4, 198, 51, 100, 2, 0, 1]);
    }

    #[test]
    fn refusals() {
        assert_eq!(BeaconMessage::parse(&[]), Err(BeaconError::Empty));
        assert_eq!(
            BeaconMessage::parse(&[0x08]),
            Err(BeaconError::UnknownType(8))
        );
        assert!(matches!(
            BeaconMessage::parse(&[1, 0, 0]),
            Err(BeaconError::Truncated { needed: 5, .. })
        ));
        assert_eq!(
            BeaconMessage::parse(&[2, 5, 1, 2, 3, 4, 5, 0, 0]),
            Err(BeaconError::IpLength(5))
        );
        assert!(BeaconMessage::parse(&[2, 16, 0, 0]).is_err());
        // Sync claiming more nodes than it carries.
        assert!(BeaconMessage::parse(&[7, 0, 0, 0, 1, 0, 3, 0, 0, 0, 1]).is_err());
        assert!(BeaconMessage::parse(&[5, 0, 0, 0, 1, 0, 0, 0]).is_err());
    }

    /// Seed `[7; 32]`, node 0x01020304, unix_ms 1_700_000_000_123; public key and datagram
    /// computed independently with Python's `cryptography` (Ed25519 is deterministic).
    const GOLDEN_PUBLIC: &str = "ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22c";
    const GOLDEN_SIGNED: &str = "01010203040000018bcfe5687ba4783cca8c454f12d34e06342de105c29dce0e\
                                 7a4e359c24c5b178b7a3ad72b351aa6e8abe9007b989e6e9afcfd6ca3ed4c5da\
                                 e4fe4c704ccd73dc984282ec0f";

    fn unhex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn golden_key() -> SigningKey {
        SigningKey::from_bytes(&[7; 32])
    }

    #[test]
    fn signed_discover_golden() {
        let key = golden_key();
        let public: [u8; 32] = unhex(GOLDEN_PUBLIC).try_into().unwrap();
        assert_eq!(key.verifying_key().to_bytes(), public);
        let golden = unhex(GOLDEN_SIGNED);
        let dg = signed_discover(&key, 0x0102_0304, 1_700_000_000_123);
        assert_eq!(dg.as_slice(), golden.as_slice());

        let m = BeaconMessage::parse(&golden).unwrap();
        let BeaconMessage::Discover {
            node,
            proof: Some(proof),
        } = m
        else {
            panic!("not a signed discover: {m:?}");
        };
        assert_eq!(node, 0x0102_0304);
        assert_eq!(proof.unix_ms, 1_700_000_000_123);
        assert_eq!(proof.verify(node, &public), Ok(()));
        round_trip(m, &golden);

        let signed = discover_signed_bytes(node, proof.unix_ms);
        assert_eq!(&signed[..24], b"pilot-beacon-discover-v1");
        assert_eq!(&signed[24..], &golden[1..13]);
    }

    #[test]
    fn signed_discover_is_a_v1_discover_prefix() {
        // What a v1 beacon reads: the first five bytes.
        let dg = signed_discover(&golden_key(), 42, 1);
        assert_eq!(&dg[..5], &[1, 0, 0, 0, 42]);
    }

    #[test]
    fn other_discover_lengths_are_plain() {
        let dg = signed_discover(&golden_key(), 42, 1);
        for len in (DISCOVER_LEN..SIGNED_DISCOVER_LEN).chain([SIGNED_DISCOVER_LEN + 1]) {
            let mut b = dg.to_vec();
            b.resize(len, 0xAA);
            assert_eq!(
                BeaconMessage::parse(&b),
                Ok(BeaconMessage::Discover {
                    node: 42,
                    proof: None
                }),
                "length {len}"
            );
        }
    }

    #[test]
    fn signed_discover_refusals() {
        let key = golden_key();
        let public = key.verifying_key().to_bytes();
        let proof = DiscoverProof::sign(&key, 9, 1_000);
        assert_eq!(proof.verify(9, &public), Ok(()));
        // Another node, another time, another key, a flipped bit.
        assert_eq!(proof.verify(10, &public), Err(ProofError::BadSignature));
        let later = DiscoverProof {
            unix_ms: 1_001,
            ..proof
        };
        assert_eq!(later.verify(9, &public), Err(ProofError::BadSignature));
        let other = SigningKey::from_bytes(&[8; 32]).verifying_key().to_bytes();
        assert_eq!(proof.verify(9, &other), Err(ProofError::BadSignature));
        let mut flipped = proof;
        flipped.signature[40] ^= 1;
        assert_eq!(flipped.verify(9, &public), Err(ProofError::BadSignature));
        // The identity point is a small-order key: strict verification refuses it.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert!(proof.verify(9, &identity).is_err());
        // Not a point at all (y = 2 is not on the curve).
        let mut off_curve = [0u8; 32];
        off_curve[0] = 2;
        assert!(proof.verify(9, &off_curve).is_err());
    }

    #[test]
    fn relay_rewritten_in_place() {
        let mut dg = *b"\x05\x00\x00\x00\x07\x00\x00\x00\x09PILS..";
        let off = relay_into_deliver(&mut dg).unwrap();
        assert_eq!(off, 4);
        assert_eq!(&dg[off..], b"\x06\x00\x00\x00\x07PILS..");
        assert_eq!(
            BeaconMessage::parse(&dg[off..]),
            Ok(BeaconMessage::RelayDeliver {
                sender: 7,
                payload: b"PILS.."
            })
        );
        assert!(relay_into_deliver(&mut [5, 0, 0, 0, 1, 0, 0, 0]).is_err());
        assert_eq!(
            relay_into_deliver(&mut [6, 0, 0, 0, 1, 0, 0, 0, 2]),
            Err(BeaconError::WrongType(6))
        );
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics_and_round_trips(data in proptest::collection::vec(proptest::num::u8::ANY, 0..100)) {
            if let Ok(m) = BeaconMessage::parse(&data) {
                let mut out = vec![0u8; m.buffer_len()];
                let n = m.emit(&mut out).unwrap();
                proptest::prop_assert_eq!(BeaconMessage::parse(&out[..n]), Ok(m));
            }
        }

        #[test]
        fn signed_discover_round_trips(node: u32, unix_ms: u64, seed: [u8; 32]) {
            let key = SigningKey::from_bytes(&seed);
            let dg = signed_discover(&key, node, unix_ms);
            let Ok(BeaconMessage::Discover { node: n, proof: Some(p) }) = BeaconMessage::parse(&dg) else {
                return Err(proptest::test_runner::TestCaseError::fail("not a signed discover"));
            };
            proptest::prop_assert_eq!(n, node);
            proptest::prop_assert_eq!(p.unix_ms, unix_ms);
            proptest::prop_assert_eq!(p.verify(node, &key.verifying_key().to_bytes()), Ok(()));
        }
    }
}
