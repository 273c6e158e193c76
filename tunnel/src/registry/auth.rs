//! Signatures the registry checks.
//!
//! Two forms are accepted:
//!
//! - **v1 fixed strings** ([`super::proto::Request::challenge`], e.g. `heartbeat:7`): a
//!   signature over a string with no nonce, which anyone who saw it once can replay. Accepted
//!   only for nodes that have never authenticated a session.
//! - **Session authentication**: the server hands out a fresh random nonce (`hello`), the node
//!   signs [`session_message`] (`auth`), and every later request on that connection acts for
//!   that node without a per-request signature. Once a node has done this, its v1 fixed-string
//!   signatures are refused for good, so captured ones are worthless.
//!
//! A registration can carry a proof of key possession over the session nonce
//! ([`register_message`]).

use base64::Engine;
use ed25519_dalek::{Signature, VerifyingKey};

/// Domain string of session authentication.
pub const SESSION_DOMAIN: &str = "pilot-registry-session-v1";
/// Domain string of a registration proof.
pub const REGISTER_DOMAIN: &str = "pilot-registry-register-v1";

/// Why a signature or key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Not standard base64 of 32 bytes.
    #[error("public key is not base64 of 32 bytes")]
    BadKey,
    /// The key is not a usable Ed25519 point.
    #[error("public key is not a valid Ed25519 key")]
    WeakKey,
    /// Not standard base64 of 64 bytes.
    #[error("signature is not base64 of 64 bytes")]
    BadSignature,
    /// The signature does not verify.
    #[error("signature does not verify")]
    Mismatch,
}

/// Decodes a standard-base64 Ed25519 public key.
pub fn decode_key(s: &str) -> Result<[u8; 32], AuthError> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|_| AuthError::BadKey)?;
    let key: [u8; 32] = raw.try_into().map_err(|_| AuthError::BadKey)?;
    let vk = VerifyingKey::from_bytes(&key).map_err(|_| AuthError::WeakKey)?;
    if vk.is_weak() {
        return Err(AuthError::WeakKey);
    }
    Ok(key)
}

/// Standard base64 of a key or signature.
pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Verifies a standard-base64 signature by `key` over `msg` (strict: no malleable forms).
pub fn verify(key: &[u8; 32], msg: &[u8], signature: &str) -> Result<(), AuthError> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(signature)
        .map_err(|_| AuthError::BadSignature)?;
    let sig: [u8; 64] = raw.try_into().map_err(|_| AuthError::BadSignature)?;
    let vk = VerifyingKey::from_bytes(key).map_err(|_| AuthError::WeakKey)?;
    vk.verify_strict(msg, &Signature::from_bytes(&sig))
        .map_err(|_| AuthError::Mismatch)
}

/// What a node signs to authenticate a session: `pilot-registry-session-v1:<nonce b64>:<id>`.
pub fn session_message(nonce_b64: &str, node_id: u32) -> String {
    format!("{SESSION_DOMAIN}:{nonce_b64}:{node_id}")
}

/// What a registering node signs to prove it holds its key:
/// `pilot-registry-register-v1:<nonce b64>:<public key b64>`.
pub fn register_message(nonce_b64: &str, public_key_b64: &str) -> String {
    format!("{REGISTER_DOMAIN}:{nonce_b64}:{public_key_b64}")
}

/// Compares secrets in time independent of where they differ.
pub fn secret_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    #[test]
    fn signatures_verify_only_for_their_message_and_key() {
        let sk = SigningKey::from_bytes(&[7; 32]);
        let key = sk.verifying_key().to_bytes();
        let sig = b64(&sk.sign(b"heartbeat:7").to_bytes());
        assert_eq!(decode_key(&b64(&key)), Ok(key));
        assert_eq!(verify(&key, b"heartbeat:7", &sig), Ok(()));
        assert_eq!(verify(&key, b"heartbeat:8", &sig), Err(AuthError::Mismatch));
        let other = SigningKey::from_bytes(&[8; 32]).verifying_key().to_bytes();
        assert_eq!(
            verify(&other, b"heartbeat:7", &sig),
            Err(AuthError::Mismatch)
        );
        assert_eq!(verify(&key, b"x", "!!"), Err(AuthError::BadSignature));
        assert_eq!(
            verify(&key, b"x", &b64(&[0; 63])),
            Err(AuthError::BadSignature)
        );
        assert_eq!(decode_key("AAAA"), Err(AuthError::BadKey));
        // The identity point is a small-order key.
        let mut ident = [0u8; 32];
        ident[0] = 1;
        assert_eq!(decode_key(&b64(&ident)), Err(AuthError::WeakKey));
    }

    #[test]
    fn secrets_compare_exactly() {
        assert!(secret_eq("abc", "abc"));
        assert!(!secret_eq("abc", "abd"));
        assert!(!secret_eq("abc", "abcd"));
        assert!(secret_eq("", ""));
    }
}
