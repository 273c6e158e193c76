//! Pilot protocol core, sans-IO.
//!
//! This crate holds everything about Pilot that is pure protocol: addresses and their IPv6
//! mapping, the packet header and tunnel frame codecs, the tunnel crypto sessions, the node
//! identity file, and the daemon's local IPC messages (`ipc`). It opens no socket, spawns no
//! task and reads no clock; randomness comes in from the caller as an `RngCore + CryptoRng`.
//! The daemon, registry, beacon and CLI build on it.
//!
//! Wire facts follow Pilot v1 (the public Go implementation) so v1 peers interoperate; where
//! v1 is unsafe this crate is stricter in what it accepts, and each such place is listed in
//! `docs/COMPAT.md`.

pub mod addr;
pub mod crypto;
pub mod identity;
pub mod inside;
pub mod ipc;
pub mod node;
pub mod registry;
pub mod secure;
pub mod services;
pub mod stream;
pub mod ula;
pub mod wire;

pub use addr::{Addr, AddrParseError, SocketAddr};
pub use identity::{Identity, IdentityError};
