//! The Pilot beacon: endpoint discovery, hole-punch coordination and relay over UDP (v1 wire
//! §5), stricter than v1 about who may punch or relay to whom, and still spoken by v1
//! daemons unchanged.
//!
//! - [`state`]: the rules over the node table, sans-IO ([`Beacon`]): time comes in as an
//!   argument, datagrams come in as byte buffers, what to send comes out as [`Output`];
//! - [`authority`]: where answers about nodes come from ([`Authority`], [`OpenAuthority`],
//!   [`StaticAuthority`]);
//! - [`registry_authority`]: [`RegistryAuthority`], a background-filled cache of a remote
//!   registry;
//! - [`limit`]: allocation-free rate limits;
//! - [`stats`]: counters, drop reasons, rate-limited drop logging;
//! - [`server`]: the tokio UDP driver ([`serve`], [`Server`]).
//!
//! The rules, and what can and cannot be authenticated while staying v1-compatible, are in
//! `docs/BEACON.md`.

pub mod authority;
pub mod limit;
pub mod registry_authority;
pub mod server;
pub mod state;
pub mod stats;

pub use authority::{Answer, Authority, OpenAuthority, StaticAuthority};
pub use pilot_registry_client::RegistryAddrs;
pub use registry_authority::{check_token, CacheConfig, RegistryAuthority, TokenCheck};
pub use server::{bind, serve, Server};
pub use state::{Beacon, Config, NodeEntry, Now, Output};
pub use stats::{DropReason, Stats, StatsHandle};
