//! Shared by the daemon's integration tests.
#![allow(clippy::unwrap_used)]

use pilot_registry::store::RedbStore;
use pilot_registry::{Config as RegistryConfig, Registry};

/// Starts an in-memory registry with every rate limit off on a loopback port; returns its
/// address.
#[allow(dead_code)]
pub async fn registry() -> String {
    registry_at("127.0.0.1:0").await
}

/// An in-memory registry with every rate limit off, not yet serving.
#[allow(dead_code)]
pub fn in_memory_registry() -> Registry {
    Registry::open(
        Box::new(RedbStore::in_memory().unwrap()),
        RegistryConfig {
            register_per_minute: 0,
            requests_per_ip: 0,
            requests_per_node: 0,
            ..RegistryConfig::default()
        },
    )
    .unwrap()
}

/// Starts an in-memory registry as [`registry`] does, listening on `bind`.
#[allow(dead_code)]
pub async fn registry_at(bind: &str) -> String {
    let reg = in_memory_registry();
    let l = tokio::net::TcpListener::bind(bind).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(reg.serve(l, None, std::future::pending()));
    addr.to_string()
}

/// The settings of a test node: `registry`, no beacon, a loopback tunnel port, state and IPC
/// socket under `home`. Tests add what they need with struct update syntax.
#[allow(dead_code)]
pub fn loopback_cli(registry: &str, home: &std::path::Path) -> pilotd::config::Cli {
    pilotd::config::Cli {
        registry: vec![registry.into()],
        beacon: Some(String::new()),
        listen: Some("127.0.0.1:0".into()),
        home: Some(home.into()),
        socket: Some(home.join("pilotd.sock")),
        ..pilotd::config::Cli::default()
    }
}

/// A public node on loopback with none of the built-in services, for tests that start the
/// service under test on its engine themselves.
#[allow(dead_code)]
pub async fn bare_node(registry: &str, home: &std::path::Path) -> pilotd::node::Node {
    let cli = pilotd::config::Cli {
        public: Some(true),
        no_echo: Some(true),
        no_dataexchange: Some(true),
        no_stdio: Some(true),
        no_eventstream: Some(true),
        no_nameserver: Some(true),
        no_tasks: Some(true),
        ..loopback_cli(registry, home)
    };
    pilotd::node::Node::start(&cli.resolve().unwrap())
        .await
        .unwrap()
}

/// A UDP port free on loopback right now.
#[allow(dead_code)]
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One round trip through `node`'s built-in echo service (port 7) from `from`, within 10 s:
/// what came back, or what failed.
#[allow(dead_code)]
pub async fn echo(
    from: &pilot_driver::Driver,
    node: u32,
    payload: &[u8],
) -> Result<Vec<u8>, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dst = tunnel::SocketAddr::new(tunnel::Addr::new(0, node), 7);
    let run = async {
        let s = from.dial(dst).await.map_err(|e| format!("dial: {e}"))?;
        let (mut r, mut w) = tokio::io::split(s);
        w.write_all(payload).await.map_err(|e| e.to_string())?;
        w.shutdown().await.map_err(|e| e.to_string())?;
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.map_err(|e| e.to_string())?;
        Ok(got)
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), run)
        .await
        .map_err(|_| "no echo within 10 s".to_owned())?
}
