//! The registry protocol as both ends speak it, sans-IO: what the registry server
//! (`pilot-registry`), its client (`pilot-registry-client`), the daemon and the beacon share.
//!
//! - [`proto`]: `[u32 length][JSON]` frames (wire §4.1-§4.2) and the typed request catalogue
//!   with v1's challenge strings (§4.3);
//! - [`auth`]: base64 keys and signatures, signature verification, and the strings signed
//!   for session authentication and registration proofs;
//! - [`names`]: hostname, tag and network-name rules (§4.4).
//!
//! Nothing here does I/O: frames come in and go out as byte buffers, and every input from
//! the network is refused with a typed error rather than a panic.

pub mod auth;
pub mod names;
pub mod proto;
