//! `pilotd`, the Pilot daemon: identity, registry link, encrypted UDP tunnels with NAT
//! traversal, the stream and datagram engine, trust, and the IPC socket agents use.

pub mod config;
pub mod engine;
pub mod node;
pub mod registry_link;
pub mod trust;
pub mod trust_api;
pub mod tunnels;
