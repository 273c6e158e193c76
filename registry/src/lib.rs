//! The Pilot registry: node addresses and keys, hostnames, visibility, networks, trust pairs
//! and the handshake relay, over v1's `[u32 length][JSON]` protocol (wire §4), with
//! session authentication, mutual-consent trust, rate limits and a transactional store.
//!
//! - [`proto`], [`names`], [`auth`]: frames and the typed request catalogue, hostname, tag and
//!   network-name rules, signature forms (v1 fixed strings, session nonces, registration
//!   proofs); re-exported from the sans-IO [`tunnel::registry`], which nodes share;
//! - [`state`]: the rules, over in-memory state, without I/O;
//! - [`store`]: the durable [`store::Store`] trait and its embedded implementation;
//! - [`server`]: connections, sessions, group commit, pushes, reaping, TLS, metrics;
//! - [`http`], [`dashboard`]: the HTTP listener: the dashboard page, `/api/stats` (v1's
//!   fields), `/metrics`;
//! - [`import`]: one-shot import of a v1 JSON snapshot.
//!
//! The client (tests, tools, the daemon and the beacon) is the separate crate
//! `pilot-registry-client`, so nodes link none of this server.

pub mod dashboard;
pub mod http;
pub mod import;
pub mod metrics;
pub mod server;
pub mod state;
pub mod store;

pub use tunnel::registry::{auth, names, proto};

pub use server::{Config, Registry};
