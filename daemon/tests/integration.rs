//! pilotd's integration tests: each file of this directory is one module of this single test
//! binary, so the shared helpers are built once and the crate links one test executable.
//! Run one area with a name filter, e.g. `cargo test --test integration -- daemons::`.

mod netns;
mod support;

mod daemons;
mod dataexchange;
mod duplicate_identity;
mod engine;
mod eventstream;
mod ipc;
mod nameserver;
mod registry_failover;
mod registry_state;
mod registry_tls;
mod registry_v1;
mod rotate;
mod service;
mod services;
mod tasks;
mod trust;
mod tun_dns;
mod tun_firewall;
mod tun_iface;
mod tun_mixed;
mod tun_path;
mod tun_resolved;
mod webhook;
