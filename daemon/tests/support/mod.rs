//! Shared by the daemon's integration tests.
#![allow(clippy::unwrap_used)]

use pilot_registry::store::RedbStore;
use pilot_registry::{Config as RegistryConfig, Registry};

/// Starts an in-memory registry with every rate limit off on a loopback port; returns its
/// address.
pub async fn registry() -> String {
    let reg = Registry::open(
        Box::new(RedbStore::in_memory().unwrap()),
        RegistryConfig {
            register_per_minute: 0,
            requests_per_ip: 0,
            requests_per_node: 0,
            ..RegistryConfig::default()
        },
    )
    .unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(reg.serve(l, None, std::future::pending()));
    addr.to_string()
}
