//! Tunnel frames: what one UDP datagram on the tunnel socket carries (v1 wire §2.1).
//!
//! ```text
//! byte 0 < 0x10      beacon message (type byte, then its body; see the beacon codec)
//! "PILT" packet      plaintext Pilot packet (34-byte header + payload)       >= 38 bytes
//! "PILK" node pub    anonymous key exchange                                  >= 40 bytes
//!        [u32 node][32 X25519 public key]
//! "PILA" ...         authenticated key exchange                              >= 136 bytes
//!        [u32 node][32 X25519 public key][32 Ed25519 public key][64 signature]
//! "PILS" ...         encrypted packet                                        >= 36 bytes
//!        [u32 node][12 nonce = 4 prefix + u64 counter][ciphertext][16 GCM tag]
//! "PILP"             NAT punch, exactly 4 bytes when sent, ignored when received
//! ```
//!
//! Bytes after the fixed part of PILK and PILA are ignored, as v1 does. Every view is
//! checked before use, so accessors never panic on input from the network.

use crate::wire::header::HEADER_LEN;

/// Magic of a plaintext packet.
pub const MAGIC_PLAIN: [u8; 4] = *b"PILT";
/// Magic of an anonymous key exchange.
pub const MAGIC_KEY_EXCHANGE: [u8; 4] = *b"PILK";
/// Magic of an authenticated key exchange.
pub const MAGIC_AUTH_KEY_EXCHANGE: [u8; 4] = *b"PILA";
/// Magic of an encrypted packet.
pub const MAGIC_ENCRYPTED: [u8; 4] = *b"PILS";
/// Magic (and whole body) of a punch packet.
pub const MAGIC_PUNCH: [u8; 4] = *b"PILP";
/// A first byte below this marks a beacon message.
pub const BEACON_TYPE_LIMIT: u8 = 0x10;

/// Length of the magic.
pub const MAGIC_LEN: usize = 4;
/// Length of an X25519 public key.
pub const X25519_KEY_LEN: usize = 32;
/// Length of an Ed25519 public key.
pub const ED25519_KEY_LEN: usize = 32;
/// Length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;
/// Length of the AES-GCM nonce.
pub const NONCE_LEN: usize = 12;
/// Length of the random nonce prefix.
pub const NONCE_PREFIX_LEN: usize = 4;
/// Length of the AES-GCM tag.
pub const TAG_LEN: usize = 16;

/// Smallest PILT frame.
pub const PLAIN_MIN_LEN: usize = MAGIC_LEN + HEADER_LEN;
/// Length of a PILK frame.
pub const KEY_EXCHANGE_LEN: usize = MAGIC_LEN + 4 + X25519_KEY_LEN;
/// Length of a PILA frame.
pub const AUTH_KEY_EXCHANGE_LEN: usize =
    MAGIC_LEN + 4 + X25519_KEY_LEN + ED25519_KEY_LEN + SIGNATURE_LEN;
/// Bytes of a PILS frame before the ciphertext.
pub const ENCRYPTED_HEADER_LEN: usize = MAGIC_LEN + 4 + NONCE_LEN;
/// Bytes a PILS frame adds around the sealed packet.
pub const ENCRYPTED_OVERHEAD: usize = ENCRYPTED_HEADER_LEN + TAG_LEN;
/// Smallest PILS frame (empty ciphertext).
pub const ENCRYPTED_MIN_LEN: usize = ENCRYPTED_OVERHEAD;

mod field {
    use core::ops::Range;
    pub const MAGIC: Range<usize> = 0..4;
    pub const NODE: Range<usize> = 4..8;
    pub const X25519: Range<usize> = 8..40;
    pub const ED25519: Range<usize> = 40..72;
    pub const SIGNATURE: Range<usize> = 72..136;
    pub const NONCE: Range<usize> = 8..20;
    pub const NONCE_PREFIX: Range<usize> = 8..12;
    pub const NONCE_COUNTER: Range<usize> = 12..20;
}

/// Which kind of frame, for errors and counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameKind {
    /// A beacon message.
    Beacon,
    /// PILT.
    Plain,
    /// PILK.
    KeyExchange,
    /// PILA.
    AuthKeyExchange,
    /// PILS.
    Encrypted,
    /// PILP.
    Punch,
}

/// Why a datagram is not a tunnel frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The datagram is empty.
    #[error("empty datagram")]
    Empty,
    /// The datagram is shorter than its kind needs.
    #[error("{kind:?} frame too short: need {needed} bytes, have {have}")]
    Truncated {
        /// The kind the magic announced.
        kind: FrameKind,
        /// Bytes needed.
        needed: usize,
        /// Bytes present.
        have: usize,
    },
    /// The first four bytes are no known magic.
    #[error("unknown frame magic {0:02x?}")]
    UnknownMagic([u8; 4]),
}

fn node_at(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[field::NODE]);
    u32::from_be_bytes(a)
}

fn array_at<const N: usize>(b: &[u8], r: core::ops::Range<usize>) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[r]);
    a
}

/// A checked view of a PILK frame.
#[derive(Debug, Clone, Copy)]
pub struct KeyExchange<T: AsRef<[u8]>>(T);

impl<T: AsRef<[u8]>> KeyExchange<T> {
    /// Checks the length (the magic is the caller's concern, see [`Frame::parse`]).
    pub fn new_checked(buf: T) -> Result<Self, FrameError> {
        check(buf.as_ref(), FrameKind::KeyExchange, KEY_EXCHANGE_LEN)?;
        Ok(KeyExchange(buf))
    }
    /// Sender node ID.
    pub fn node(&self) -> u32 {
        node_at(self.0.as_ref())
    }
    /// Sender X25519 public key.
    pub fn x25519_public(&self) -> [u8; X25519_KEY_LEN] {
        array_at(self.0.as_ref(), field::X25519)
    }
}

/// A checked view of a PILA frame.
#[derive(Debug, Clone, Copy)]
pub struct AuthKeyExchange<T: AsRef<[u8]>>(T);

impl<T: AsRef<[u8]>> AuthKeyExchange<T> {
    /// Checks the length (the magic is the caller's concern, see [`Frame::parse`]).
    pub fn new_checked(buf: T) -> Result<Self, FrameError> {
        check(
            buf.as_ref(),
            FrameKind::AuthKeyExchange,
            AUTH_KEY_EXCHANGE_LEN,
        )?;
        Ok(AuthKeyExchange(buf))
    }
    /// Sender node ID.
    pub fn node(&self) -> u32 {
        node_at(self.0.as_ref())
    }
    /// Sender X25519 public key.
    pub fn x25519_public(&self) -> [u8; X25519_KEY_LEN] {
        array_at(self.0.as_ref(), field::X25519)
    }
    /// Sender Ed25519 identity key.
    pub fn ed25519_public(&self) -> [u8; ED25519_KEY_LEN] {
        array_at(self.0.as_ref(), field::ED25519)
    }
    /// Signature over `"auth" || node || X25519 public key`.
    pub fn signature(&self) -> [u8; SIGNATURE_LEN] {
        array_at(self.0.as_ref(), field::SIGNATURE)
    }
}

/// A checked view of a PILS frame.
#[derive(Debug, Clone, Copy)]
pub struct Encrypted<T: AsRef<[u8]>>(T);

impl<T: AsRef<[u8]>> Encrypted<T> {
    /// Checks the length (the magic is the caller's concern, see [`Frame::parse`]).
    pub fn new_checked(buf: T) -> Result<Self, FrameError> {
        check(buf.as_ref(), FrameKind::Encrypted, ENCRYPTED_MIN_LEN)?;
        Ok(Encrypted(buf))
    }
    /// Sender node ID.
    pub fn node(&self) -> u32 {
        node_at(self.0.as_ref())
    }
    /// The whole 12-byte nonce.
    pub fn nonce(&self) -> [u8; NONCE_LEN] {
        array_at(self.0.as_ref(), field::NONCE)
    }
    /// The sender's random nonce prefix.
    pub fn nonce_prefix(&self) -> [u8; NONCE_PREFIX_LEN] {
        array_at(self.0.as_ref(), field::NONCE_PREFIX)
    }
    /// The sender's counter.
    pub fn counter(&self) -> u64 {
        u64::from_be_bytes(array_at(self.0.as_ref(), field::NONCE_COUNTER))
    }
    /// Length of the sealed packet (ciphertext without tag).
    pub fn plaintext_len(&self) -> usize {
        self.0.as_ref().len() - ENCRYPTED_OVERHEAD
    }
    /// Gives back the buffer.
    pub fn into_inner(self) -> T {
        self.0
    }
}

fn check(b: &[u8], kind: FrameKind, needed: usize) -> Result<(), FrameError> {
    if b.len() < needed {
        return Err(FrameError::Truncated {
            kind,
            needed,
            have: b.len(),
        });
    }
    Ok(())
}

/// One demultiplexed datagram from the tunnel socket.
#[derive(Debug, Clone, Copy)]
pub enum Frame<'a> {
    /// A beacon message: the whole datagram, type byte first.
    Beacon(&'a [u8]),
    /// PILT: the inner packet bytes (header + payload, not yet checked).
    Plain(&'a [u8]),
    /// PILK.
    KeyExchange(KeyExchange<&'a [u8]>),
    /// PILA.
    AuthKeyExchange(AuthKeyExchange<&'a [u8]>),
    /// PILS.
    Encrypted(Encrypted<&'a [u8]>),
    /// PILP.
    Punch,
}

impl<'a> Frame<'a> {
    /// Classifies a datagram (v1 wire §2.1) and checks the length its kind needs.
    pub fn parse(buf: &'a [u8]) -> Result<Self, FrameError> {
        let Some(&first) = buf.first() else {
            return Err(FrameError::Empty);
        };
        if first < BEACON_TYPE_LIMIT {
            return Ok(Frame::Beacon(buf));
        }
        let Some(magic) = buf.get(field::MAGIC) else {
            return Err(FrameError::Truncated {
                kind: FrameKind::Plain,
                needed: MAGIC_LEN,
                have: buf.len(),
            });
        };
        let magic: [u8; 4] = array_at(magic, 0..4);
        Ok(match magic {
            MAGIC_PLAIN => {
                check(buf, FrameKind::Plain, PLAIN_MIN_LEN)?;
                Frame::Plain(&buf[MAGIC_LEN..])
            }
            MAGIC_KEY_EXCHANGE => Frame::KeyExchange(KeyExchange::new_checked(buf)?),
            MAGIC_AUTH_KEY_EXCHANGE => Frame::AuthKeyExchange(AuthKeyExchange::new_checked(buf)?),
            MAGIC_ENCRYPTED => Frame::Encrypted(Encrypted::new_checked(buf)?),
            MAGIC_PUNCH => Frame::Punch,
            other => return Err(FrameError::UnknownMagic(other)),
        })
    }

    /// The kind of this frame.
    pub fn kind(&self) -> FrameKind {
        match self {
            Frame::Beacon(_) => FrameKind::Beacon,
            Frame::Plain(_) => FrameKind::Plain,
            Frame::KeyExchange(_) => FrameKind::KeyExchange,
            Frame::AuthKeyExchange(_) => FrameKind::AuthKeyExchange,
            Frame::Encrypted(_) => FrameKind::Encrypted,
            Frame::Punch => FrameKind::Punch,
        }
    }
}

/// Writes the PILT magic in front of a packet that the caller placed at `buf[MAGIC_LEN..]`.
/// Returns the frame length.
pub fn emit_plain(buf: &mut [u8], packet_len: usize) -> Option<usize> {
    let total = MAGIC_LEN.checked_add(packet_len)?;
    buf.get_mut(..total)?[field::MAGIC].copy_from_slice(&MAGIC_PLAIN);
    Some(total)
}

/// A PILK frame's contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyExchangeRepr {
    /// Sender node ID.
    pub node: u32,
    /// Sender X25519 public key.
    pub x25519_public: [u8; X25519_KEY_LEN],
}

impl KeyExchangeRepr {
    /// Reads a checked view.
    pub fn parse<T: AsRef<[u8]>>(v: &KeyExchange<T>) -> Self {
        KeyExchangeRepr {
            node: v.node(),
            x25519_public: v.x25519_public(),
        }
    }

    /// The frame bytes.
    pub fn to_bytes(&self) -> [u8; KEY_EXCHANGE_LEN] {
        let mut b = [0u8; KEY_EXCHANGE_LEN];
        b[field::MAGIC].copy_from_slice(&MAGIC_KEY_EXCHANGE);
        b[field::NODE].copy_from_slice(&self.node.to_be_bytes());
        b[field::X25519].copy_from_slice(&self.x25519_public);
        b
    }
}

/// A PILA frame's contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthKeyExchangeRepr {
    /// Sender node ID.
    pub node: u32,
    /// Sender X25519 public key.
    pub x25519_public: [u8; X25519_KEY_LEN],
    /// Sender Ed25519 identity key.
    pub ed25519_public: [u8; ED25519_KEY_LEN],
    /// Ed25519 signature over [`AuthKeyExchangeRepr::signed_message`].
    pub signature: [u8; SIGNATURE_LEN],
}

/// Length of the message a PILA signs.
pub const AUTH_SIGNED_LEN: usize = 4 + 4 + X25519_KEY_LEN;

impl AuthKeyExchangeRepr {
    /// Reads a checked view.
    pub fn parse<T: AsRef<[u8]>>(v: &AuthKeyExchange<T>) -> Self {
        AuthKeyExchangeRepr {
            node: v.node(),
            x25519_public: v.x25519_public(),
            ed25519_public: v.ed25519_public(),
            signature: v.signature(),
        }
    }

    /// The 40 signed bytes: ASCII `auth` (no colon) || node (u32 BE) || X25519 public key
    /// (v1 wire §2.3).
    pub fn signed_message(
        node: u32,
        x25519_public: &[u8; X25519_KEY_LEN],
    ) -> [u8; AUTH_SIGNED_LEN] {
        let mut m = [0u8; AUTH_SIGNED_LEN];
        m[..4].copy_from_slice(b"auth");
        m[4..8].copy_from_slice(&node.to_be_bytes());
        m[8..].copy_from_slice(x25519_public);
        m
    }

    /// The frame bytes.
    pub fn to_bytes(&self) -> [u8; AUTH_KEY_EXCHANGE_LEN] {
        let mut b = [0u8; AUTH_KEY_EXCHANGE_LEN];
        b[field::MAGIC].copy_from_slice(&MAGIC_AUTH_KEY_EXCHANGE);
        b[field::NODE].copy_from_slice(&self.node.to_be_bytes());
        b[field::X25519].copy_from_slice(&self.x25519_public);
        b[field::ED25519].copy_from_slice(&self.ed25519_public);
        b[field::SIGNATURE].copy_from_slice(&self.signature);
        b
    }
}

/// Writes the PILS header (magic, node, nonce) into `buf[..ENCRYPTED_HEADER_LEN]`.
pub(crate) fn emit_encrypted_header(
    buf: &mut [u8; ENCRYPTED_HEADER_LEN],
    node: u32,
    nonce: &[u8; NONCE_LEN],
) {
    buf[field::MAGIC].copy_from_slice(&MAGIC_ENCRYPTED);
    buf[field::NODE].copy_from_slice(&node.to_be_bytes());
    buf[field::NONCE].copy_from_slice(nonce);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demultiplexes() {
        assert_eq!(Frame::parse(&[]).err(), Some(FrameError::Empty));
        assert!(matches!(Frame::parse(&[0x01, 0, 0, 0, 7]), Ok(Frame::Beacon(b)) if b.len() == 5));
        assert!(matches!(Frame::parse(&[0x0F]), Ok(Frame::Beacon(_))));
        assert!(matches!(Frame::parse(b"PILP"), Ok(Frame::Punch)));
        assert!(matches!(
            Frame::parse(b"PIL"),
            Err(FrameError::Truncated { needed: 4, .. })
        ));
        assert_eq!(
            Frame::parse(b"XXXXyy").err(),
            Some(FrameError::UnknownMagic(*b"XXXX"))
        );
        let mut t = [0u8; 38];
        t[..4].copy_from_slice(b"PILT");
        assert!(matches!(Frame::parse(&t), Ok(Frame::Plain(p)) if p.len() == 34));
        assert!(matches!(
            Frame::parse(&t[..37]),
            Err(FrameError::Truncated {
                kind: FrameKind::Plain,
                needed: 38,
                have: 37
            })
        ));
    }

    #[test]
    fn golden_pilk() {
        let r = KeyExchangeRepr {
            node: 0x0102_0304,
            x25519_public: [0xAB; 32],
        };
        let b = r.to_bytes();
        assert_eq!(&b[..8], b"PILK\x01\x02\x03\x04");
        assert_eq!(b[8..], [0xAB; 32]);
        let Ok(Frame::KeyExchange(v)) = Frame::parse(&b) else {
            panic!("not a PILK");
        };
        assert_eq!(KeyExchangeRepr::parse(&v), r);
        assert!(Frame::parse(&b[..39]).is_err());
    }

    #[test]
    fn golden_pila() {
        let r = AuthKeyExchangeRepr {
            node: 7,
            x25519_public: [1; 32],
            ed25519_public: [2; 32],
            signature: [3; 64],
        };
        let mut b = r.to_bytes().to_vec();
        assert_eq!(b.len(), 136);
        assert_eq!(&b[..8], b"PILA\x00\x00\x00\x07");
        assert_eq!(b[8..40], [1; 32]);
        assert_eq!(b[40..72], [2; 32]);
        assert_eq!(b[72..136], [3; 64]);
        b.extend_from_slice(b"extra bytes are ignored");
        let Ok(Frame::AuthKeyExchange(v)) = Frame::parse(&b) else {
            panic!("not a PILA");
        };
        assert_eq!(AuthKeyExchangeRepr::parse(&v), r);
        assert!(matches!(
            Frame::parse(&b[..135]),
            Err(FrameError::Truncated {
                kind: FrameKind::AuthKeyExchange,
                ..
            })
        ));
        let m = AuthKeyExchangeRepr::signed_message(7, &[1; 32]);
        assert_eq!(&m[..8], b"auth\x00\x00\x00\x07");
    }

    #[test]
    fn pils_view() {
        let mut b = [0u8; 36];
        let mut h = [0u8; ENCRYPTED_HEADER_LEN];
        let nonce = [9, 8, 7, 6, 0, 0, 0, 0, 0, 0, 1, 2];
        emit_encrypted_header(&mut h, 42, &nonce);
        b[..20].copy_from_slice(&h);
        assert_eq!(&b[..8], b"PILS\x00\x00\x00\x2a");
        let Ok(Frame::Encrypted(v)) = Frame::parse(&b) else {
            panic!("not a PILS");
        };
        assert_eq!(v.node(), 42);
        assert_eq!(v.nonce_prefix(), [9, 8, 7, 6]);
        assert_eq!(v.counter(), 0x0102);
        assert_eq!(v.plaintext_len(), 0);
        assert!(Frame::parse(&b[..35]).is_err());
    }
}
