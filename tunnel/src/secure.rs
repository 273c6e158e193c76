//! The v1 secure channel (v1 wire §8.5, port 443), sans-IO: key agreement, record sealing and
//! incremental record decoding. The handshake and the byte stream are driven by the caller
//! (`pilot_driver::secure` is the tokio adapter).
//!
//! Handshake, over a raw stream, 10 s deadline ([`HANDSHAKE_TIMEOUT`]):
//!
//! ```text
//! client -> server   client's ephemeral X25519 public key   32 bytes  (the client sends first)
//! server -> client   server's ephemeral X25519 public key   32 bytes  (after reading the client's)
//!
//! shared = X25519(own ephemeral secret, peer public key)     must be contributory
//! key    = SHA-256("pilot-secure-v1:" || shared)            one key for both directions
//! nonce  = role prefix || counter (u64 BE, first sent is 1)
//!          role prefix: server 00 00 00 01, client 00 00 00 02
//! ```
//!
//! Record, one per write:
//!
//! ```text
//!  0               1               2               3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +---------------------------------------------------------------+
//! |             length = 12 + len(ciphertext || tag)              |  0
//! +---------------------------------------------------------------+
//! |                  nonce prefix (sender's role)                 |  4
//! +---------------------------------------------------------------+
//! |                                                               |  8
//! +                  nonce counter (u64, from 1)                  +
//! |                                                               | 12
//! +---------------------------------------------------------------+
//! |        AES-256-GCM ciphertext (no AAD) ...  || 16-byte tag    | 16
//! +---------------------------------------------------------------+
//! ```
//!
//! v1 readers take any length in `12..=16 MiB`. This module is stricter where v1 is unsafe and
//! a v1 sender can never notice (each listed in `docs/COMPAT.md`):
//! - a length below 28 (no room for a tag) is refused when decoded, not at decryption;
//! - a record must carry the peer's role prefix (v1 does not check it): a record carrying our
//!   own prefix is our own traffic reflected back under the shared key;
//! - counters must strictly increase (v1 does not check them), so a record cannot be replayed;
//! - the sending counter never wraps (v1 would reuse nonces after 2^64 records);
//! - a low-order peer key is refused (v1's Go `crypto/ecdh` refuses it too).
//!
//! The channel has no identity: anyone in the path can sit in the middle. It exists so v1
//! agents that use it can talk to Rust agents; Pilot tunnels already encrypt every packet
//! under identity-bound keys.
//!
//! Calling order: [`establish`] once with the caller's ephemeral secret and the peer's public
//! key; then any interleaving of [`Sealer::seal`] and, for the bytes that arrive,
//! [`decode`] followed by [`Opener::open_in_place`] (or [`Opener::open`]) on each complete
//! record. Nothing allocates after `establish`; no state moves on a refused record.

use aes_gcm::{AeadInOut, Aes256Gcm, KeyInit};
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroize;

// ---- Spec constants (v1 wire §8.5) ----

/// Domain-separation prefix of the key derivation.
pub const KDF_LABEL: &[u8; 16] = b"pilot-secure-v1:";
/// Length of an X25519 public key sent in the handshake.
pub const PUBLIC_KEY_LEN: usize = 32;
/// The handshake deadline.
pub const HANDSHAKE_TIMEOUT: core::time::Duration = core::time::Duration::from_secs(10);
/// Length of the record's length field.
pub const LENGTH_LEN: usize = 4;
/// Length of the nonce: role prefix and counter.
pub const NONCE_LEN: usize = 12;
/// Length of the nonce's role prefix.
pub const NONCE_PREFIX_LEN: usize = 4;
/// Length of the AES-GCM tag.
pub const TAG_LEN: usize = 16;
/// Nonce prefix of records the server sends.
pub const SERVER_PREFIX: [u8; NONCE_PREFIX_LEN] = [0, 0, 0, 1];
/// Nonce prefix of records the client sends.
pub const CLIENT_PREFIX: [u8; NONCE_PREFIX_LEN] = [0, 0, 0, 2];
/// Smallest length field a v1 reader accepts (a nonce and nothing else).
pub const V1_MIN_LENGTH: u32 = NONCE_LEN as u32;
/// Largest length field a v1 reader accepts (16 MiB, inclusive).
pub const MAX_LENGTH: u32 = 16 * 1024 * 1024;

// ---- Derived sizes and this implementation's limits ----

/// Bytes before the ciphertext: length field and nonce.
pub const RECORD_HEADER_LEN: usize = LENGTH_LEN + NONCE_LEN;
/// Bytes a record adds to its plaintext.
pub const RECORD_OVERHEAD: usize = RECORD_HEADER_LEN + TAG_LEN;
/// Smallest length field accepted here: a nonce and a tag (an empty plaintext). Shorter
/// records, which v1 reads and then fails to decrypt, are refused when decoded.
pub const MIN_LENGTH: u32 = (NONCE_LEN + TAG_LEN) as u32;
/// Largest plaintext one record can carry.
pub const MAX_PLAINTEXT: usize = MAX_LENGTH as usize - NONCE_LEN - TAG_LEN;

mod field {
    use core::ops::Range;
    pub const LENGTH: Range<usize> = 0..4;
    pub const PREFIX: Range<usize> = 4..8;
    pub const COUNTER: Range<usize> = 8..16;
    pub const NONCE: Range<usize> = 4..16;
    pub const BODY: usize = 16;
}

/// Which end of the channel we are. Fixes who sends its key first and the nonce prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The dialling side: sends its public key first, nonce prefix `00 00 00 02`.
    Client,
    /// The accepting side: answers with its public key, nonce prefix `00 00 00 01`.
    Server,
}

impl Role {
    /// The nonce prefix of records this role sends.
    pub fn nonce_prefix(self) -> [u8; NONCE_PREFIX_LEN] {
        match self {
            Role::Client => CLIENT_PREFIX,
            Role::Server => SERVER_PREFIX,
        }
    }

    /// The other end's role.
    pub fn peer(self) -> Role {
        match self {
            Role::Client => Role::Server,
            Role::Server => Role::Client,
        }
    }

    /// Whether this role writes its public key before reading the peer's.
    pub fn sends_key_first(self) -> bool {
        self == Role::Client
    }
}

/// Why the channel could not be keyed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The peer's public key is a low-order point: the shared secret would be all zeros.
    #[error("peer X25519 key is a low-order point (non-contributory key agreement)")]
    NonContributory,
}

/// Why a record's framing was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The length field is below [`MIN_LENGTH`]: no room for nonce and tag.
    #[error("record length {0} is below the minimum of 28 (nonce and tag)")]
    TooShort(u32),
    /// The length field is above [`MAX_LENGTH`].
    #[error("record length {0} exceeds the maximum of 16 MiB")]
    TooLong(u32),
    /// The buffer holds less than the record the length field announces.
    #[error("truncated record: need {needed} bytes, have {have}")]
    Truncated {
        /// Bytes of the whole record, length field included.
        needed: usize,
        /// Bytes present.
        have: usize,
    },
}

/// Why a plaintext could not be sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// The plaintext is larger than one record can carry.
    #[error("plaintext of {0} bytes exceeds the record maximum of {MAX_PLAINTEXT}")]
    TooLong(usize),
    /// The buffer cannot hold the record.
    #[error("buffer of {have} bytes cannot hold a record of {needed}")]
    BufferTooSmall {
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        have: usize,
    },
    /// The send counter is used up; the channel must be replaced by a new handshake.
    #[error("send counter exhausted: a new handshake is required")]
    CounterExhausted,
}

/// Why a record was refused. Nothing in the opener changes on any of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// Malformed framing.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// The nonce prefix is not the peer's role prefix (our own prefix means reflection).
    #[error("record nonce prefix {got:02x?} is not the peer's {expected:02x?}")]
    WrongPrefix {
        /// The peer's role prefix.
        expected: [u8; NONCE_PREFIX_LEN],
        /// The prefix the record carries.
        got: [u8; NONCE_PREFIX_LEN],
    },
    /// The counter does not exceed the last accepted one: a replayed or reordered record.
    #[error("record counter {counter} does not exceed the last accepted {last}")]
    Replayed {
        /// The record's counter.
        counter: u64,
        /// The last counter accepted (0 before the first record).
        last: u64,
    },
    /// The GCM tag did not verify.
    #[error("authentication failed")]
    Authentication,
    /// The output buffer cannot hold the plaintext.
    #[error("buffer of {have} bytes cannot hold a plaintext of {needed}")]
    BufferTooSmall {
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        have: usize,
    },
}

/// Derives the channel key from the X25519 shared secret (v1 wire §8.5).
pub fn derive_key(shared: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(KDF_LABEL);
    h.update(shared);
    h.finalize().into()
}

/// Keys the channel once the public keys are exchanged: `secret` is our ephemeral secret
/// (drawn by the caller), `peer_public` the 32 bytes the peer sent. Returns the sending and
/// the receiving half.
pub fn establish(
    role: Role,
    secret: &StaticSecret,
    peer_public: &[u8; PUBLIC_KEY_LEN],
) -> Result<(Sealer, Opener), KeyError> {
    let shared = secret.diffie_hellman(&PublicKey::from(*peer_public));
    if !shared.was_contributory() {
        return Err(KeyError::NonContributory);
    }
    let mut key = derive_key(shared.as_bytes());
    let halves = (Sealer::new(role, &key), Opener::new(role, &key));
    key.zeroize();
    Ok(halves)
}

/// The sending half: seals plaintexts into records with our role's nonce prefix.
#[derive(Clone)]
pub struct Sealer {
    cipher: Aes256Gcm,
    prefix: [u8; NONCE_PREFIX_LEN],
    counter: u64,
}

impl core::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Sealer")
            .field("prefix", &self.prefix)
            .field("counter", &self.counter)
            .finish_non_exhaustive()
    }
}

impl Sealer {
    /// A sealer for `role` (our role) under an already derived key.
    pub fn new(role: Role, key: &[u8; 32]) -> Sealer {
        Sealer {
            cipher: Aes256Gcm::new(key.into()),
            prefix: role.nonce_prefix(),
            counter: 0,
        }
    }

    /// The last counter sent (0 before the first record).
    pub fn counter(&self) -> u64 {
        self.counter
    }

    /// Seals `plaintext` as one record into `out`. Returns the record length: send
    /// `out[..len]`.
    pub fn seal(&mut self, plaintext: &[u8], out: &mut [u8]) -> Result<usize, SealError> {
        let needed = plaintext.len().saturating_add(RECORD_OVERHEAD);
        let have = out.len();
        let body = out
            .get_mut(RECORD_HEADER_LEN..RECORD_HEADER_LEN + plaintext.len())
            .ok_or(SealError::BufferTooSmall { needed, have })?;
        body.copy_from_slice(plaintext);
        self.seal_in_place(out, plaintext.len())
    }

    /// Seals in place: the caller has written the plaintext at
    /// `buf[RECORD_HEADER_LEN..RECORD_HEADER_LEN + plaintext_len]`, with [`TAG_LEN`] more bytes
    /// after it. Returns the record length: send `buf[..len]`.
    pub fn seal_in_place(
        &mut self,
        buf: &mut [u8],
        plaintext_len: usize,
    ) -> Result<usize, SealError> {
        if plaintext_len > MAX_PLAINTEXT {
            return Err(SealError::TooLong(plaintext_len));
        }
        let needed = plaintext_len + RECORD_OVERHEAD;
        if buf.len() < needed {
            return Err(SealError::BufferTooSmall {
                needed,
                have: buf.len(),
            });
        }
        // v1 wire §8.5: the counter is pre-incremented, so the first record carries 1. A
        // counter is never used twice: at u64::MAX the channel is finished.
        let counter = self
            .counter
            .checked_add(1)
            .ok_or(SealError::CounterExhausted)?;
        let mut nonce = [0u8; NONCE_LEN];
        nonce[..NONCE_PREFIX_LEN].copy_from_slice(&self.prefix);
        nonce[NONCE_PREFIX_LEN..].copy_from_slice(&counter.to_be_bytes());

        let (head, rest) = buf.split_at_mut(RECORD_HEADER_LEN);
        let (body, tail) = rest.split_at_mut(plaintext_len);
        let tag = self
            .cipher
            .encrypt_inout_detached((&nonce).into(), b"", body.into())
            // Encryption fails only above 2^36 bytes; MAX_PLAINTEXT is 16 MiB.
            .map_err(|_| SealError::TooLong(plaintext_len))?;
        tail[..TAG_LEN].copy_from_slice(&tag);
        // needed - LENGTH_LEN <= MAX_LENGTH, checked above, so the cast is exact.
        head[field::LENGTH].copy_from_slice(&((needed - LENGTH_LEN) as u32).to_be_bytes());
        head[field::NONCE].copy_from_slice(&nonce);
        self.counter = counter;
        Ok(needed)
    }
}

/// What the start of a receive buffer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded {
    /// Not a whole record yet: the buffer must hold `needed` bytes before the next call can
    /// say more (4 until the length field is in, then the whole record).
    Partial {
        /// Bytes the buffer must hold.
        needed: usize,
    },
    /// A whole record of `len` bytes (length field included) starts the buffer.
    Complete {
        /// Bytes of the record.
        len: usize,
    },
}

/// Checks a record's length field; returns the bytes that follow it.
pub fn body_len(length_field: [u8; LENGTH_LEN]) -> Result<usize, RecordError> {
    let len = u32::from_be_bytes(length_field);
    if len < MIN_LENGTH {
        return Err(RecordError::TooShort(len));
    }
    if len > MAX_LENGTH {
        return Err(RecordError::TooLong(len));
    }
    Ok(len as usize)
}

/// Looks at the start of a receive buffer: how much of the next record is there. Refuses a
/// bad length field as soon as its 4 bytes arrive.
pub fn decode(buf: &[u8]) -> Result<Decoded, RecordError> {
    let Some(field) = buf.get(field::LENGTH) else {
        return Ok(Decoded::Partial { needed: LENGTH_LEN });
    };
    let mut length = [0u8; LENGTH_LEN];
    length.copy_from_slice(field);
    let total = LENGTH_LEN + body_len(length)?;
    if buf.len() < total {
        Ok(Decoded::Partial { needed: total })
    } else {
        Ok(Decoded::Complete { len: total })
    }
}

/// A zero-copy view of one record at the start of a buffer. Bytes after the record are not
/// part of the view.
#[derive(Debug, Clone)]
pub struct Record<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Record<T> {
    /// Checks the length field and that the whole record is present.
    pub fn new_checked(buffer: T) -> Result<Record<T>, RecordError> {
        let have = buffer.as_ref().len();
        match decode(buffer.as_ref())? {
            Decoded::Complete { .. } => Ok(Record { buffer }),
            Decoded::Partial { needed } => Err(RecordError::Truncated { needed, have }),
        }
    }

    fn bytes(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    /// The length field: nonce, ciphertext and tag.
    pub fn length(&self) -> u32 {
        let b = &self.bytes()[field::LENGTH];
        u32::from_be_bytes([b[0], b[1], b[2], b[3]])
    }

    /// The record's size on the wire, length field included.
    pub fn record_len(&self) -> usize {
        LENGTH_LEN + self.length() as usize
    }

    /// The 12-byte nonce.
    pub fn nonce(&self) -> [u8; NONCE_LEN] {
        let mut n = [0u8; NONCE_LEN];
        n.copy_from_slice(&self.bytes()[field::NONCE]);
        n
    }

    /// The nonce's role prefix.
    pub fn nonce_prefix(&self) -> [u8; NONCE_PREFIX_LEN] {
        let mut p = [0u8; NONCE_PREFIX_LEN];
        p.copy_from_slice(&self.bytes()[field::PREFIX]);
        p
    }

    /// The nonce's counter.
    pub fn counter(&self) -> u64 {
        let mut c = [0u8; 8];
        c.copy_from_slice(&self.bytes()[field::COUNTER]);
        u64::from_be_bytes(c)
    }

    /// The ciphertext, without the tag.
    pub fn ciphertext(&self) -> &[u8] {
        &self.bytes()[field::BODY..self.record_len() - TAG_LEN]
    }

    /// The GCM tag.
    pub fn tag(&self) -> &[u8] {
        &self.bytes()[self.record_len() - TAG_LEN..self.record_len()]
    }

    /// The underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }
}

/// The receiving half: checks and opens the peer's records.
#[derive(Clone)]
pub struct Opener {
    cipher: Aes256Gcm,
    peer_prefix: [u8; NONCE_PREFIX_LEN],
    last: u64,
}

impl core::fmt::Debug for Opener {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Opener")
            .field("peer_prefix", &self.peer_prefix)
            .field("last", &self.last)
            .finish_non_exhaustive()
    }
}

impl Opener {
    /// An opener for `role` (our role: records must carry the other role's prefix) under an
    /// already derived key.
    pub fn new(role: Role, key: &[u8; 32]) -> Opener {
        Opener {
            cipher: Aes256Gcm::new(key.into()),
            peer_prefix: role.peer().nonce_prefix(),
            last: 0,
        }
    }

    /// The last counter accepted (0 before the first record).
    pub fn last_counter(&self) -> u64 {
        self.last
    }

    /// Checks everything but the tag; returns the counter.
    fn check<T: AsRef<[u8]>>(&self, record: &Record<T>) -> Result<u64, OpenError> {
        let got = record.nonce_prefix();
        if got != self.peer_prefix {
            return Err(OpenError::WrongPrefix {
                expected: self.peer_prefix,
                got,
            });
        }
        let counter = record.counter();
        if counter <= self.last {
            return Err(OpenError::Replayed {
                counter,
                last: self.last,
            });
        }
        Ok(counter)
    }

    /// Opens the record at the start of `buf` in place and returns its plaintext (inside
    /// `buf`). Bytes after the record are not touched; [`decode`] says where it ends.
    pub fn open_in_place<'a>(&mut self, buf: &'a mut [u8]) -> Result<&'a mut [u8], OpenError> {
        let record = Record::new_checked(&*buf)?;
        let counter = self.check(&record)?;
        let nonce = record.nonce();
        let len = record.record_len();
        let (body, tag) = buf[field::BODY..len].split_at_mut(len - field::BODY - TAG_LEN);
        let tag: &[u8; TAG_LEN] = (&*tag).try_into().map_err(|_| OpenError::Authentication)?;
        self.cipher
            .decrypt_inout_detached((&nonce).into(), b"", body.into(), tag.into())
            .map_err(|_| OpenError::Authentication)?;
        // Authenticated: only now does the receive state move.
        self.last = counter;
        Ok(body)
    }

    /// Opens the record at the start of `record` into `out`. Returns the plaintext length.
    /// On error the contents of `out` are unspecified.
    pub fn open(&mut self, record: &[u8], out: &mut [u8]) -> Result<usize, OpenError> {
        let view = Record::new_checked(record)?;
        let counter = self.check(&view)?;
        let ct = view.ciphertext();
        let have = out.len();
        let plain = out.get_mut(..ct.len()).ok_or(OpenError::BufferTooSmall {
            needed: ct.len(),
            have,
        })?;
        plain.copy_from_slice(ct);
        let tag: &[u8; TAG_LEN] = view
            .tag()
            .try_into()
            .map_err(|_| OpenError::Authentication)?;
        if self
            .cipher
            .decrypt_inout_detached((&view.nonce()).into(), b"", plain.into(), tag.into())
            .is_err()
        {
            plain.zeroize();
            return Err(OpenError::Authentication);
        }
        self.last = counter;
        Ok(ct.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn unhex(s: &str) -> Vec<u8> {
        assert!(s.len() % 2 == 0, "odd hex length");
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("test vector is hex"))
            .collect()
    }

    fn arr32(s: &str) -> [u8; 32] {
        unhex(s).try_into().expect("32-byte test vector")
    }

    // Golden vectors from tunnel/tests/vectors/secure_channel.py (Python `cryptography`).
    const CLIENT_SECRET: [u8; 32] = {
        let mut s = [0u8; 32];
        let mut i = 0;
        while i < 32 {
            s[i] = 0x01 + i as u8;
            i += 1;
        }
        s
    };
    const SERVER_SECRET: [u8; 32] = {
        let mut s = [0u8; 32];
        let mut i = 0;
        while i < 32 {
            s[i] = 0x41 + i as u8;
            i += 1;
        }
        s
    };
    const CLIENT_PUBLIC: &str = "07a37cbc142093c8b755dc1b10e86cb426374ad16aa853ed0bdfc0b2b86d1c7c";
    const SERVER_PUBLIC: &str = "64b101b1d0be5a8704bd078f9895001fc03e8e9f9522f188dd128d9846d48466";
    const SHARED: &str = "26c2c17fdb82161cb21ad16e721315355b64d1763119b10bfc962530dc7cc163";
    const KEY: &str = "c904e977224e1bd0566ce191d766d50ac4ad349ff84847dcb3c2a7ad1f203834";
    const CLIENT_PLAINTEXTS: [&[u8]; 2] = [b"hello from the client", b""];
    const CLIENT_RECORDS: [&str; 2] = [
        "000000310000000200000000000000014d460dfc3d1e5448017736de984640b9312afc3e6cc2d84dac0f4a0ac0da17d6315b6a68c7",
        "0000001c000000020000000000000002923c118c7dafc0ce7c4b7d4e4eb50fb5",
    ];
    const SERVER_RECORDS: [&str; 2] = [
        "00000031000000010000000000000001087c53e53512501b2f57f9f98d65103decbf477d93f9d90988796eb914d1e57edf362c1637",
        "00000044000000010000000000000002de8f126e9355096ea623715dcecec813fb0ce766be3795916f4b6ea90b47c8298743f773f1d574e14e8f1282771afcd71d747f98c76413d6",
    ];

    fn server_plaintexts() -> [Vec<u8>; 2] {
        [b"hello from the server".to_vec(), (0u8..40).collect()]
    }

    fn pair() -> ((Sealer, Opener), (Sealer, Opener)) {
        let c = StaticSecret::from(CLIENT_SECRET);
        let s = StaticSecret::from(SERVER_SECRET);
        let client = establish(Role::Client, &c, &PublicKey::from(&s).to_bytes()).unwrap();
        let server = establish(Role::Server, &s, &PublicKey::from(&c).to_bytes()).unwrap();
        (client, server)
    }

    fn seal_vec(sealer: &mut Sealer, plaintext: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; plaintext.len() + RECORD_OVERHEAD];
        let n = sealer.seal(plaintext, &mut out).unwrap();
        out.truncate(n);
        out
    }

    #[test]
    fn golden_key_schedule() {
        let c = StaticSecret::from(CLIENT_SECRET);
        let s = StaticSecret::from(SERVER_SECRET);
        assert_eq!(PublicKey::from(&c).to_bytes(), arr32(CLIENT_PUBLIC));
        assert_eq!(PublicKey::from(&s).to_bytes(), arr32(SERVER_PUBLIC));
        let shared = c.diffie_hellman(&PublicKey::from(arr32(SERVER_PUBLIC)));
        assert_eq!(shared.as_bytes(), &arr32(SHARED));
        assert_eq!(derive_key(shared.as_bytes()), arr32(KEY));
    }

    #[test]
    fn golden_records_both_ways() {
        let ((mut c_tx, mut c_rx), (mut s_tx, mut s_rx)) = pair();
        for (pt, rec) in CLIENT_PLAINTEXTS.iter().zip(CLIENT_RECORDS) {
            let sealed = seal_vec(&mut c_tx, pt);
            assert_eq!(sealed, unhex(rec));
            let mut wire = unhex(rec);
            assert_eq!(s_rx.open_in_place(&mut wire).unwrap(), *pt);
        }
        for (pt, rec) in server_plaintexts().iter().zip(SERVER_RECORDS) {
            let sealed = seal_vec(&mut s_tx, pt);
            assert_eq!(sealed, unhex(rec));
            let mut out = [0u8; 64];
            let n = c_rx.open(&unhex(rec), &mut out).unwrap();
            assert_eq!(&out[..n], &pt[..]);
        }
        assert_eq!(c_tx.counter(), 2);
        assert_eq!(s_rx.last_counter(), 2);
    }

    #[test]
    fn record_view_fields() {
        let rec = unhex(CLIENT_RECORDS[0]);
        let view = Record::new_checked(&rec[..]).unwrap();
        assert_eq!(view.length(), 0x31);
        assert_eq!(view.record_len(), rec.len());
        assert_eq!(view.nonce_prefix(), CLIENT_PREFIX);
        assert_eq!(view.counter(), 1);
        assert_eq!(view.ciphertext().len(), CLIENT_PLAINTEXTS[0].len());
        assert_eq!(view.tag(), &rec[rec.len() - TAG_LEN..]);
    }

    #[test]
    fn length_bounds_are_typed_errors() {
        for len in [0u32, 11, 12, 27] {
            assert_eq!(decode(&len.to_be_bytes()), Err(RecordError::TooShort(len)));
        }
        assert_eq!(
            decode(&28u32.to_be_bytes()),
            Ok(Decoded::Partial { needed: 32 })
        );
        assert_eq!(
            decode(&MAX_LENGTH.to_be_bytes()),
            Ok(Decoded::Partial {
                needed: 4 + MAX_LENGTH as usize
            })
        );
        for len in [MAX_LENGTH + 1, u32::MAX] {
            assert_eq!(decode(&len.to_be_bytes()), Err(RecordError::TooLong(len)));
        }
        assert_eq!(decode(&[0, 0, 0]), Ok(Decoded::Partial { needed: 4 }));
        let rec = unhex(CLIENT_RECORDS[1]);
        assert_eq!(
            Record::new_checked(&rec[..rec.len() - 1]).unwrap_err(),
            RecordError::Truncated {
                needed: rec.len(),
                have: rec.len() - 1
            }
        );
    }

    #[test]
    fn refusals_leave_state_unchanged() {
        let ((mut c_tx, _), (_, mut s_rx)) = pair();
        let first = seal_vec(&mut c_tx, b"one");
        let second = seal_vec(&mut c_tx, b"two");

        // Corrupted tag.
        let mut bad = second.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(s_rx.open_in_place(&mut bad), Err(OpenError::Authentication));
        assert_eq!(s_rx.last_counter(), 0);

        // Wrong role prefix: the server's own prefix (reflection).
        let mut reflected = first.clone();
        reflected[field::PREFIX].copy_from_slice(&SERVER_PREFIX);
        assert_eq!(
            s_rx.open_in_place(&mut reflected),
            Err(OpenError::WrongPrefix {
                expected: CLIENT_PREFIX,
                got: SERVER_PREFIX
            })
        );

        // Out of order: the second record first is fine (counters may skip), the first after
        // it is refused, and so is the second again.
        assert_eq!(s_rx.open_in_place(&mut second.clone()).unwrap(), b"two");
        assert_eq!(
            s_rx.open_in_place(&mut first.clone()),
            Err(OpenError::Replayed {
                counter: 1,
                last: 2
            })
        );
        assert_eq!(
            s_rx.open_in_place(&mut second.clone()),
            Err(OpenError::Replayed {
                counter: 2,
                last: 2
            })
        );
        let mut small = [0u8; 2];
        let third = seal_vec(&mut c_tx, b"three");
        assert_eq!(
            s_rx.open(&third, &mut small),
            Err(OpenError::BufferTooSmall { needed: 5, have: 2 })
        );
        assert_eq!(s_rx.last_counter(), 2);
    }

    #[test]
    fn counter_never_wraps() {
        let ((mut c_tx, _), _) = pair();
        c_tx.counter = u64::MAX - 1;
        let mut buf = [0u8; RECORD_OVERHEAD + 1];
        assert_eq!(c_tx.seal(b"x", &mut buf), Ok(RECORD_OVERHEAD + 1));
        assert_eq!(c_tx.counter(), u64::MAX);
        assert_eq!(c_tx.seal(b"x", &mut buf), Err(SealError::CounterExhausted));
        assert_eq!(c_tx.counter(), u64::MAX);
    }

    #[test]
    fn seal_limits() {
        let ((mut c_tx, _), _) = pair();
        let mut buf = [0u8; RECORD_OVERHEAD + 3];
        assert_eq!(
            c_tx.seal(b"four", &mut buf),
            Err(SealError::BufferTooSmall {
                needed: RECORD_OVERHEAD + 4,
                have: RECORD_OVERHEAD + 3
            })
        );
        assert_eq!(
            c_tx.seal_in_place(&mut buf, MAX_PLAINTEXT + 1),
            Err(SealError::TooLong(MAX_PLAINTEXT + 1))
        );
        assert_eq!(c_tx.counter(), 0);
    }

    #[test]
    fn low_order_peer_key_refused() {
        let c = StaticSecret::from(CLIENT_SECRET);
        assert_eq!(
            establish(Role::Client, &c, &[0u8; 32]).unwrap_err(),
            KeyError::NonContributory
        );
    }

    #[test]
    fn roles() {
        assert!(Role::Client.sends_key_first());
        assert!(!Role::Server.sends_key_first());
        assert_eq!(Role::Client.peer().nonce_prefix(), SERVER_PREFIX);
        assert_eq!(Role::Server.peer().nonce_prefix(), CLIENT_PREFIX);
    }

    /// Feeds `stream` to a receiver in the given chunk sizes, decoding and opening records as
    /// they complete; returns the plaintexts.
    fn receive_chunked(opener: &mut Opener, stream: &[u8], chunks: &[usize]) -> Vec<Vec<u8>> {
        let mut buf = Vec::new();
        let mut out = Vec::new();
        let mut pos = 0;
        let mut sizes = chunks.iter().copied().cycle();
        while pos < stream.len() {
            let n = sizes.next().unwrap_or(1).max(1).min(stream.len() - pos);
            buf.extend_from_slice(&stream[pos..pos + n]);
            pos += n;
            while let Decoded::Complete { len } = decode(&buf).unwrap() {
                let pt = opener.open_in_place(&mut buf[..len]).unwrap().to_vec();
                out.push(pt);
                buf.drain(..len);
            }
        }
        assert!(buf.is_empty());
        out
    }

    proptest! {
        #[test]
        fn roundtrip_any_chunking(
            msgs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..12),
            chunks in proptest::collection::vec(1usize..64, 1..16),
            from_client in any::<bool>(),
        ) {
            let ((c_tx, c_rx), (s_tx, s_rx)) = pair();
            let (mut tx, mut rx) = if from_client { (c_tx, s_rx) } else { (s_tx, c_rx) };
            let mut stream = Vec::new();
            for m in &msgs {
                stream.extend_from_slice(&seal_vec(&mut tx, m));
            }
            prop_assert_eq!(receive_chunked(&mut rx, &stream, &chunks), msgs);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let ((_, _), (_, mut s_rx)) = pair();
            if let Ok(Decoded::Complete { len }) = decode(&bytes) {
                let mut b = bytes.clone();
                prop_assert!(s_rx.open_in_place(&mut b[..len]).is_err());
            }
            let mut out = [0u8; 80];
            prop_assert!(s_rx.open(&bytes, &mut out).is_err());
        }

        #[test]
        fn any_bit_flip_is_refused(pt in proptest::collection::vec(any::<u8>(), 0..64), bit in any::<usize>()) {
            let ((mut c_tx, _), (_, mut s_rx)) = pair();
            let mut rec = seal_vec(&mut c_tx, &pt);
            let bit = bit % (rec.len() * 8);
            rec[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(s_rx.open_in_place(&mut rec).is_err());
            prop_assert_eq!(s_rx.last_counter(), 0);
        }
    }
}
