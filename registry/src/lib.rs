//! The Pilot registry: node addresses and keys, hostnames, visibility, networks, trust pairs
//! and the handshake relay, over v1's `[u32 length][JSON]` protocol (wire §4), with
//! session authentication, mutual-consent trust, rate limits and a transactional store.
//!
//! - [`proto`]: frames and the typed request catalogue;
//! - [`names`]: hostname, tag and network-name rules;
//! - [`auth`]: signature forms (v1 fixed strings, session nonces, registration proofs);
//! - [`state`]: the rules, over in-memory state, without I/O;
//! - [`store`]: the durable [`store::Store`] trait and its embedded implementation;
//! - [`server`]: connections, sessions, group commit, pushes, reaping, TLS, metrics;
//! - [`client`]: a client for tests, tools and the daemon;
//! - [`import`]: one-shot import of a v1 JSON snapshot.

pub mod auth;
pub mod client;
pub mod import;
pub mod metrics;
pub mod names;
pub mod proto;
pub mod server;
pub mod state;
pub mod store;

pub use server::{Config, Registry};
