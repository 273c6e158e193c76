//! Tunnel crypto (v1 wire §2.2, §2.3): X25519 key agreement, AES-256-GCM sessions sealing
//! whole Pilot packets into PILS frames, and the signed PILA key exchange.
//!
//! Key schedule, fixed by v1:
//!
//! ```text
//! shared = X25519(our static secret, peer public key)          32 bytes, must be contributory
//! key    = SHA-256("pilot-tunnel-v1:" || shared)                one key for both directions
//! nonce  = prefix (4 random bytes per session) || counter (u64 BE, first sent is 1)
//! frame  = "PILS" || our node (u32 BE) || nonce || AES-256-GCM(key, nonce, packet, aad = "")
//! ```
//!
//! Both directions share one key, so a frame could be reflected back at its sender. Each side
//! picks its own nonce prefix; a session refuses frames carrying its own sending prefix.
//!
//! The receive side follows the peer's sending prefix. A v1 peer recreates its context (new
//! prefix, counter back to 1, same key) every time it receives our PILA, so a new prefix is
//! accepted once a frame under it authenticates; it then gets a fresh replay window and the
//! previous prefixes are remembered and refused, so frames of an older context cannot be
//! replayed into the new one.
//!
//! Calling order: [`Session::new`] once per peer key, then any interleaving of
//! [`Session::seal`] and [`Session::open`]. Nothing allocates after `new`.

pub mod replay;

use aes_gcm::{AeadInOut, Aes256Gcm, KeyInit};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use rand_core::{CryptoRng, RngCore};
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroize;

use crate::wire::frame::{
    emit_encrypted_header, AuthKeyExchangeRepr, Encrypted, FrameError, ENCRYPTED_HEADER_LEN,
    ENCRYPTED_OVERHEAD, NONCE_LEN, NONCE_PREFIX_LEN, TAG_LEN, X25519_KEY_LEN,
};
use replay::{ReplayError, ReplayWindow};

/// Domain-separation prefix of the key derivation.
pub const KDF_LABEL: &[u8; 16] = b"pilot-tunnel-v1:";

/// How many earlier receive prefixes a session remembers and refuses.
const RETIRED_PREFIXES: usize = 8;

/// Why a session could not be created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// The peer's public key is a low-order point: the shared secret would be all zeros.
    #[error("peer X25519 key is a low-order point (non-contributory key agreement)")]
    NonContributory,
}

/// Why a packet could not be sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// The buffer cannot hold frame header, packet and tag.
    #[error("buffer of {have} bytes cannot hold a sealed frame of {needed}")]
    BufferTooSmall {
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        have: usize,
    },
    /// The send counter is used up; the session must be replaced by a new key exchange.
    #[error("send counter exhausted: a new key exchange is required")]
    CounterExhausted,
}

/// Why a PILS frame was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// Not a well-formed PILS frame.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The frame carries our own sending prefix: a reflection of our own traffic.
    #[error("frame carries our own nonce prefix (reflected)")]
    Reflected,
    /// The frame's prefix belongs to an earlier context of the peer.
    #[error("frame from a retired sender context")]
    RetiredPrefix,
    /// Replay window refusal.
    #[error(transparent)]
    Replay(#[from] ReplayError),
    /// The GCM tag did not verify.
    #[error("authentication failed")]
    Authentication,
}

/// Why a PILA was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The Ed25519 key in the frame is not the one the registry holds for that node.
    #[error("PILA identity key differs from the registered key of node {0}")]
    KeyMismatch(u32),
    /// The signature does not verify.
    #[error("PILA signature of node {0} does not verify")]
    BadSignature(u32),
}

/// Derives the AES-256-GCM key of a session (v1 wire §2.2).
fn derive_key(shared: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(KDF_LABEL);
    h.update(shared);
    h.finalize().into()
}

#[derive(Debug, Clone)]
struct Receive {
    prefix: Option<[u8; NONCE_PREFIX_LEN]>,
    window: ReplayWindow,
    retired: [[u8; NONCE_PREFIX_LEN]; RETIRED_PREFIXES],
    retired_len: usize,
    retired_next: usize,
}

impl Receive {
    fn is_retired(&self, prefix: &[u8; NONCE_PREFIX_LEN]) -> bool {
        self.retired[..self.retired_len].contains(prefix)
    }

    fn switch_to(&mut self, prefix: [u8; NONCE_PREFIX_LEN]) {
        if let Some(old) = self.prefix.replace(prefix) {
            self.retired[self.retired_next] = old;
            self.retired_next = (self.retired_next + 1) % RETIRED_PREFIXES;
            self.retired_len = (self.retired_len + 1).min(RETIRED_PREFIXES);
        }
        self.window = ReplayWindow::new();
    }
}

/// An encrypted tunnel session with one peer.
pub struct Session {
    cipher: Aes256Gcm,
    local_node: u32,
    send_prefix: [u8; NONCE_PREFIX_LEN],
    send_counter: u64,
    recv: Receive,
}

impl core::fmt::Debug for Session {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Session")
            .field("local_node", &self.local_node)
            .field("send_counter", &self.send_counter)
            .field("recv_highest", &self.recv.window.highest())
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Creates a session from our static X25519 secret and the peer's public key. `local_node`
    /// goes into every PILS header we send; `rng` picks the sending nonce prefix.
    pub fn new<R: RngCore + CryptoRng>(
        local_node: u32,
        secret: &StaticSecret,
        peer_public: &[u8; X25519_KEY_LEN],
        rng: &mut R,
    ) -> Result<Self, SessionError> {
        let shared = secret.diffie_hellman(&PublicKey::from(*peer_public));
        if !shared.was_contributory() {
            return Err(SessionError::NonContributory);
        }
        let mut key = derive_key(shared.as_bytes());
        let cipher = Aes256Gcm::new((&key).into());
        key.zeroize();
        let mut send_prefix = [0u8; NONCE_PREFIX_LEN];
        rng.fill_bytes(&mut send_prefix);
        Ok(Session {
            cipher,
            local_node,
            send_prefix,
            send_counter: 0,
            recv: Receive {
                prefix: None,
                window: ReplayWindow::new(),
                retired: [[0; NONCE_PREFIX_LEN]; RETIRED_PREFIXES],
                retired_len: 0,
                retired_next: 0,
            },
        })
    }

    /// The last counter sent (0 before the first seal).
    pub fn send_counter(&self) -> u64 {
        self.send_counter
    }

    /// Our sending nonce prefix.
    pub fn send_prefix(&self) -> [u8; NONCE_PREFIX_LEN] {
        self.send_prefix
    }

    /// Seals a packet in place into a PILS frame.
    ///
    /// The caller writes the marshaled packet (header and payload) at
    /// `buf[ENCRYPTED_HEADER_LEN..ENCRYPTED_HEADER_LEN + packet_len]`; the buffer must have
    /// [`TAG_LEN`] more bytes after it. Returns the frame length: send `buf[..len]`.
    pub fn seal(&mut self, buf: &mut [u8], packet_len: usize) -> Result<usize, SealError> {
        let needed = packet_len.saturating_add(ENCRYPTED_OVERHEAD);
        if buf.len() < needed {
            return Err(SealError::BufferTooSmall {
                needed,
                have: buf.len(),
            });
        }
        // A counter is never used twice: at u64::MAX the session is finished.
        let counter = self
            .send_counter
            .checked_add(1)
            .ok_or(SealError::CounterExhausted)?;
        self.send_counter = counter;
        let mut nonce = [0u8; NONCE_LEN];
        nonce[..NONCE_PREFIX_LEN].copy_from_slice(&self.send_prefix);
        nonce[NONCE_PREFIX_LEN..].copy_from_slice(&counter.to_be_bytes());

        let (head, rest) = buf.split_at_mut(ENCRYPTED_HEADER_LEN);
        let (body, tail) = rest.split_at_mut(packet_len);
        let tag = self
            .cipher
            .encrypt_inout_detached((&nonce).into(), b"", body.into())
            // Encryption fails only for inputs longer than 2^36 bytes, which a buffer of a
            // UDP datagram's size cannot hold; treat it like a full buffer.
            .map_err(|_| SealError::BufferTooSmall {
                needed,
                have: needed - 1,
            })?;
        tail[..TAG_LEN].copy_from_slice(&tag);
        let head: &mut [u8; ENCRYPTED_HEADER_LEN] = head
            .try_into()
            .map_err(|_| SealError::BufferTooSmall { needed, have: 0 })?;
        emit_encrypted_header(head, self.local_node, &nonce);
        Ok(needed)
    }

    /// Opens a PILS frame in place and returns the decrypted packet bytes (header and payload,
    /// not yet parsed). The frame's node ID is not checked here: the caller picked this
    /// session by it. Nothing changes unless the frame authenticates.
    pub fn open<'a>(&mut self, frame: &'a mut [u8]) -> Result<&'a mut [u8], OpenError> {
        self.open_ordered(frame).map(|(body, _)| body)
    }

    /// [`Session::open`], also telling whether the frame is the newest of the peer's yet: the
    /// first of a new sending context (nonce prefix), or a counter above every one opened
    /// before in the current one. A frame that is not the newest arrived late (reordered, or
    /// held back and sent on by someone else).
    pub fn open_ordered<'a>(
        &mut self,
        frame: &'a mut [u8],
    ) -> Result<(&'a mut [u8], bool), OpenError> {
        let view = Encrypted::new_checked(&*frame)?;
        let prefix = view.nonce_prefix();
        let counter = view.counter();
        let nonce = view.nonce();
        if prefix == self.send_prefix {
            return Err(OpenError::Reflected);
        }
        let same_context = self.recv.prefix == Some(prefix);
        if same_context {
            self.recv.window.check(counter)?;
        } else if self.recv.is_retired(&prefix) {
            return Err(OpenError::RetiredPrefix);
        } else if counter == 0 {
            return Err(OpenError::Replay(ReplayError::Zero));
        }

        let len = frame.len();
        let (body, tag) = frame[ENCRYPTED_HEADER_LEN..].split_at_mut(len - ENCRYPTED_OVERHEAD);
        // `new_checked` guarantees `len >= ENCRYPTED_OVERHEAD`, so the tail is exactly TAG_LEN.
        let tag: &[u8; TAG_LEN] = (&*tag).try_into().map_err(|_| OpenError::Authentication)?;
        self.cipher
            .decrypt_inout_detached((&nonce).into(), b"", body.into(), tag.into())
            .map_err(|_| OpenError::Authentication)?;

        // Authenticated: only now does the receive state move.
        let newest = !same_context || counter > self.recv.window.highest();
        if !same_context {
            self.recv.switch_to(prefix);
        }
        self.recv.window.record(counter)?;
        Ok((body, newest))
    }
}

/// Builds our PILA: Ed25519 signature by the identity key over
/// `"auth" || node || X25519 public key`.
pub fn build_auth_key_exchange(
    identity: &SigningKey,
    node: u32,
    x25519_public: &[u8; X25519_KEY_LEN],
) -> AuthKeyExchangeRepr {
    let msg = AuthKeyExchangeRepr::signed_message(node, x25519_public);
    AuthKeyExchangeRepr {
        node,
        x25519_public: *x25519_public,
        ed25519_public: identity.verifying_key().to_bytes(),
        signature: identity.sign(&msg).to_bytes(),
    }
}

/// Verifies a peer's PILA against the identity key the registry holds for that node
/// (v1 wire §2.3 steps 3-4). Uses strict verification: non-canonical or small-order keys
/// and malleable signatures are refused.
pub fn verify_auth_key_exchange(
    pila: &AuthKeyExchangeRepr,
    registered: &VerifyingKey,
) -> Result<(), AuthError> {
    if pila.ed25519_public != registered.to_bytes() {
        return Err(AuthError::KeyMismatch(pila.node));
    }
    let msg = AuthKeyExchangeRepr::signed_message(pila.node, &pila.x25519_public);
    let sig = ed25519_dalek::Signature::from_bytes(&pila.signature);
    registered
        .verify_strict(&msg, &sig)
        .map_err(|_| AuthError::BadSignature(pila.node))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kdf_golden() {
        // SHA-256("pilot-tunnel-v1:" || 32 zero bytes), computed with Python's hashlib.
        let k = derive_key(&[0u8; 32]);
        assert_eq!(
            k[..8],
            [0x4c, 0xd3, 0x4f, 0xec, 0xa0, 0x8a, 0xd9, 0x8a],
            "{k:02x?}"
        );
    }

    #[test]
    fn counter_never_wraps() {
        let a = StaticSecret::random_from_rng(rand_core::OsRng);
        let b = PublicKey::from(&StaticSecret::random_from_rng(rand_core::OsRng)).to_bytes();
        let mut s = Session::new(1, &a, &b, &mut rand_core::OsRng).unwrap();
        s.send_counter = u64::MAX - 1;
        let mut buf = [0u8; ENCRYPTED_OVERHEAD + 8];
        assert_eq!(s.seal(&mut buf, 8), Ok(ENCRYPTED_OVERHEAD + 8));
        assert_eq!(s.send_counter(), u64::MAX);
        assert_eq!(s.seal(&mut buf, 8), Err(SealError::CounterExhausted));
        assert_eq!(s.seal(&mut buf, 8), Err(SealError::CounterExhausted));
        assert_eq!(s.send_counter(), u64::MAX);
    }
}
