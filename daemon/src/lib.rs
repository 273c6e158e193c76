//! `pilotd`, the Pilot daemon: identity, registry link, encrypted UDP tunnels with NAT
//! traversal, the stream and datagram engine, trust, and the IPC socket agents use.

pub mod config;
pub mod dataexchange;
pub mod desired;
pub mod engine;
pub mod events;
pub mod eventstream;
pub mod fsutil;
pub mod identity;
pub mod inside;
pub mod ipc_server;
pub mod local;
pub mod nameserver;
pub mod node;
pub mod peer_cache;
pub mod ratelog;
pub mod registry_link;
pub mod service;
pub mod services;
pub mod stdio;
pub mod tasks;
pub mod trust;
pub mod trust_api;
pub mod udp;
pub mod webhook;

/// The peer table and the SYN limiter moved to the sans-IO core; their old paths stay.
pub use tunnel::node::{synlimit, tunnels};
