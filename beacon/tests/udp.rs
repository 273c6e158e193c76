#![allow(clippy::unwrap_used)]
//! The beacon over real loopback UDP sockets: discovery, punching, relay bytes, drop
//! counters, dual-stack, and the registry-backed authority against a real registry.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ed25519_dalek::SigningKey;
use pilot_beacon::{
    Authority, CacheConfig, Config, DropReason, RegistryAddrs, RegistryAuthority, Server,
    StaticAuthority, Stats, StatsHandle,
};
use serde_json::json;
use tokio::net::UdpSocket;
use tokio::sync::oneshot;
use tunnel::wire::beacon::{signed_discover, BeaconMessage};

const A: u32 = 11;
const B: u32 = 12;
const C: u32 = 13;

fn key(node: u32) -> SigningKey {
    let mut seed = [9u8; 32];
    seed[..4].copy_from_slice(&node.to_be_bytes());
    SigningKey::from_bytes(&seed)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

struct Running {
    addr: SocketAddr,
    stats: StatsHandle,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Running {
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
    }

    /// Waits until `f` holds for the counters (the beacon handles datagrams asynchronously).
    async fn until(&self, what: &str, f: impl Fn(&Stats) -> bool) -> Stats {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let s = self.stats.snapshot();
            if f(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {s:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

async fn start_on(bind: &str, authority: Arc<dyn Authority>, config: Config) -> Running {
    let socket = pilot_beacon::bind(bind.parse().unwrap()).unwrap();
    let server = Server::new(socket, authority, config);
    let mut addr = server.local_addr().unwrap();
    if addr.ip().is_unspecified() {
        addr.set_ip("127.0.0.1".parse().unwrap());
    }
    let stats = server.stats();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async move {
        let _ = rx.await;
    }));
    Running {
        addr,
        stats,
        stop: Some(tx),
        task,
    }
}

async fn start(authority: Arc<dyn Authority>) -> Running {
    start_on("127.0.0.1:0", authority, Config::default()).await
}

async fn node_socket() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").await.unwrap()
}

async fn recv(s: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = vec![0u8; 65_536];
    let (n, from) = tokio::time::timeout(Duration::from_secs(5), s.recv_from(&mut buf))
        .await
        .expect("no datagram within 5 s")
        .unwrap();
    buf.truncate(n);
    (buf, from)
}

async fn nothing(s: &UdpSocket) {
    let mut buf = [0u8; 2048];
    let r = tokio::time::timeout(Duration::from_millis(200), s.recv_from(&mut buf)).await;
    assert!(
        r.is_err(),
        "unexpected datagram: {:?}",
        r.map(|r| r.map(|(n, _)| buf[..n].to_vec()))
    );
}

fn authority() -> Arc<StaticAuthority> {
    let a = Arc::new(StaticAuthority::new());
    for n in [A, B, C] {
        a.add_node(n, key(n).verifying_key().to_bytes());
    }
    a.allow(A, B);
    a
}

/// Signs a Discover for `node` from `s`, waits for the reply, returns the observed endpoint.
async fn discover(s: &UdpSocket, beacon: SocketAddr, node: u32) -> SocketAddr {
    s.send_to(&signed_discover(&key(node), node, unix_ms()), beacon)
        .await
        .unwrap();
    let (reply, from) = recv(s).await;
    assert_eq!(from, beacon);
    match BeaconMessage::parse(&reply).unwrap() {
        BeaconMessage::DiscoverReply { endpoint } => endpoint,
        m => panic!("expected DiscoverReply, got {m:?}"),
    }
}

fn relay_msg(sender: u32, dest: u32, payload: &[u8]) -> Vec<u8> {
    BeaconMessage::Relay {
        sender,
        dest,
        payload,
    }
    .emit_vec()
}

trait EmitVec {
    fn emit_vec(&self) -> Vec<u8>;
}

impl EmitVec for BeaconMessage<'_> {
    fn emit_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.buffer_len()];
        self.emit(&mut v).unwrap();
        v
    }
}

#[tokio::test]
async fn discover_reply_reflects_the_source() {
    let b = start(authority()).await;
    let a = node_socket().await;
    assert_eq!(discover(&a, b.addr, A).await, a.local_addr().unwrap());
    // The node-0 probe gets the same answer and is not stored.
    a.send_to(&[1, 0, 0, 0, 0], b.addr).await.unwrap();
    let (reply, _) = recv(&a).await;
    assert_eq!(
        BeaconMessage::parse(&reply).unwrap(),
        BeaconMessage::DiscoverReply {
            endpoint: a.local_addr().unwrap()
        }
    );
    let s = b.until("two discovers", |s| s.datagrams == 2).await;
    assert_eq!((s.discovers_signed, s.probes), (1, 1));
    b.stop().await;
}

#[tokio::test]
async fn dual_stack_socket_answers_ipv4_as_ipv4() {
    let Ok(socket) = std::net::UdpSocket::bind("[::]:0") else {
        eprintln!("no IPv6 on this host; skipped");
        return;
    };
    drop(socket);
    let b = start_on("[::]:0", authority(), Config::default()).await;
    let a = node_socket().await;
    assert_eq!(discover(&a, b.addr, A).await, a.local_addr().unwrap());
    b.stop().await;
}

#[tokio::test]
async fn punch_reaches_both_sides() {
    let b = start(authority()).await;
    let (a, bb) = (node_socket().await, node_socket().await);
    let ea = discover(&a, b.addr, A).await;
    let eb = discover(&bb, b.addr, B).await;
    let req = BeaconMessage::PunchRequest {
        requester: A,
        target: B,
    }
    .emit_vec();
    a.send_to(&req, b.addr).await.unwrap();
    let (to_a, _) = recv(&a).await;
    let (to_b, _) = recv(&bb).await;
    assert_eq!(
        BeaconMessage::parse(&to_a).unwrap(),
        BeaconMessage::PunchCommand { endpoint: eb }
    );
    assert_eq!(
        BeaconMessage::parse(&to_b).unwrap(),
        BeaconMessage::PunchCommand { endpoint: ea }
    );
    // A may not reach C: nothing is sent to anyone.
    let c = node_socket().await;
    discover(&c, b.addr, C).await;
    let req = BeaconMessage::PunchRequest {
        requester: A,
        target: C,
    }
    .emit_vec();
    a.send_to(&req, b.addr).await.unwrap();
    b.until("not_allowed", |s| s.dropped(DropReason::NotAllowed) == 1)
        .await;
    nothing(&a).await;
    nothing(&c).await;
    assert_eq!(b.stats.snapshot().punches, 1);
    b.stop().await;
}

#[tokio::test]
async fn relay_delivers_exact_bytes() {
    let b = start(authority()).await;
    let (a, bb) = (node_socket().await, node_socket().await);
    discover(&a, b.addr, A).await;
    discover(&bb, b.addr, B).await;
    for len in [0usize, 1, 64, 1400, 8000, 65_000] {
        let payload: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
        a.send_to(&relay_msg(A, B, &payload), b.addr).await.unwrap();
        let (got, from) = recv(&bb).await;
        assert_eq!(from, b.addr);
        let mut want = vec![6u8];
        want.extend_from_slice(&A.to_be_bytes());
        want.extend_from_slice(&payload);
        assert_eq!(got, want, "payload of {len} bytes");
    }
    // And back.
    bb.send_to(&relay_msg(B, A, b"PILS-back"), b.addr)
        .await
        .unwrap();
    assert_eq!(recv(&a).await.0, b"\x06\x00\x00\x00\x0cPILS-back");
    let s = b.until("relayed", |s| s.relayed_packets == 7).await;
    assert_eq!(s.dropped_total(), 0);
    b.stop().await;
}

#[tokio::test]
async fn refused_relays_are_counted_by_reason() {
    let b = start(authority()).await;
    let (a, bb, c) = (
        node_socket().await,
        node_socket().await,
        node_socket().await,
    );
    discover(&a, b.addr, A).await;
    discover(&bb, b.addr, B).await;
    discover(&c, b.addr, C).await;
    // C claims to be A.
    c.send_to(&relay_msg(A, B, b"forged"), b.addr)
        .await
        .unwrap();
    // A to C: not allowed.
    a.send_to(&relay_msg(A, C, b"x"), b.addr).await.unwrap();
    // A forged plain discover for A from C's socket.
    c.send_to(&[1, 0, 0, 0, A as u8], b.addr).await.unwrap();
    recv(&c).await;
    // Garbage.
    c.send_to(&[0x42, 1, 2, 3], b.addr).await.unwrap();
    let s = b.until("four drops", |s| s.dropped_total() == 4).await;
    assert_eq!(s.dropped(DropReason::SpoofedSender), 1);
    assert_eq!(s.dropped(DropReason::NotAllowed), 1);
    assert_eq!(s.dropped(DropReason::WeakVsStrong), 1);
    assert_eq!(s.dropped(DropReason::Parse), 1);
    nothing(&bb).await;
    // A's entry is intact: relays from A still reach B.
    a.send_to(&relay_msg(A, B, b"ok"), b.addr).await.unwrap();
    assert_eq!(recv(&bb).await.0, b"\x06\x00\x00\x00\x0bok");
    b.stop().await;
}

#[tokio::test]
async fn relay_rate_limit_drops_the_excess() {
    let config = Config {
        relay_packets_per_sec: 10,
        relay_burst: Duration::from_secs(1),
        ..Config::default()
    };
    let b = start_on("127.0.0.1:0", authority(), config).await;
    let (a, bb) = (node_socket().await, node_socket().await);
    discover(&a, b.addr, A).await;
    discover(&bb, b.addr, B).await;
    for _ in 0..30 {
        a.send_to(&relay_msg(A, B, b"x"), b.addr).await.unwrap();
    }
    let s = b
        .until("30 relays handled", |s| {
            s.relayed_packets + s.dropped(DropReason::RateLimited) == 30
        })
        .await;
    // 10 in the burst, plus whatever the rate refilled while sending.
    assert!((10..=12).contains(&s.relayed_packets), "{s:?}");
    b.stop().await;
}

#[tokio::test]
async fn embedded_registry_is_an_authority() {
    let store = pilot_registry::store::RedbStore::in_memory().unwrap();
    let reg =
        pilot_registry::Registry::open(Box::new(store), pilot_registry::Config::default()).unwrap();
    let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let (ka, kb) = (key(100), key(200));
    let na = register(&reg, &ka, peer).await;
    let nb = register(&reg, &kb, peer).await;
    let b = start(Arc::new(EmbeddedRegistry(reg.clone()))).await;
    let (a, bb) = (node_socket().await, node_socket().await);
    a.send_to(&signed_discover(&ka, na, unix_ms()), b.addr)
        .await
        .unwrap();
    recv(&a).await;
    bb.send_to(&signed_discover(&kb, nb, unix_ms()), b.addr)
        .await
        .unwrap();
    recv(&bb).await;
    b.until("two strong entries", |s| s.discovers_signed == 2)
        .await;
    // Both private, no trust: no relay.
    a.send_to(&relay_msg(na, nb, b"x"), b.addr).await.unwrap();
    b.until("not allowed", |s| s.dropped(DropReason::NotAllowed) == 1)
        .await;
    nothing(&bb).await;
    b.stop().await;
}

/// A registry in the same process, answering from its own state (held in memory).
struct EmbeddedRegistry(pilot_registry::Registry);

impl Authority for EmbeddedRegistry {
    fn node_key(&self, node: u32) -> Option<[u8; 32]> {
        self.0.node_key(node)
    }

    fn may_reach(&self, from: u32, to: u32) -> bool {
        self.0.may_reach(from, to)
    }
}

/// Registers `key` through the in-process request path and returns the node ID.
async fn register(reg: &pilot_registry::Registry, key: &SigningKey, peer: SocketAddr) -> u32 {
    // v1 registration without proof: enough for an in-process registry.
    let pk = tunnel::registry::auth::b64(key.verifying_key().as_bytes());
    let req = json!({"type": "register", "listen_addr": ":4000", "public_key": pk});
    let v = reg.request(req.to_string().as_bytes(), peer).await;
    v["node_id"]
        .as_u64()
        .unwrap_or_else(|| panic!("register: {v}")) as u32
}

#[tokio::test]
async fn registry_authority_over_tcp() {
    let token = "beacon-token-0123456789";
    let mut config = pilot_registry::Config::default();
    config.policy.beacon_token = Some(token.into());
    let store = pilot_registry::store::RedbStore::in_memory().unwrap();
    let reg = pilot_registry::Registry::open(Box::new(store), config).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let reg_addr = listener.local_addr().unwrap();
    let (stop_reg, reg_stopped) = oneshot::channel::<()>();
    tokio::spawn(reg.clone().serve(listener, None, async move {
        let _ = reg_stopped.await;
    }));

    // Two nodes register over TCP; B makes itself public so A may reach it.
    let (ka, kb) = (key(300), key(400));
    let mut ca = pilot_registry_client::Client::connect(reg_addr)
        .await
        .unwrap();
    let na = ca.register_proven(&ka, ":4000", None).await.unwrap()["node_id"]
        .as_u64()
        .unwrap() as u32;
    let mut cb = pilot_registry_client::Client::connect(reg_addr)
        .await
        .unwrap();
    let nb = cb.register_proven(&kb, ":4000", None).await.unwrap()["node_id"]
        .as_u64()
        .unwrap() as u32;
    cb.call(&json!({"type": "set_visibility", "node_id": nb, "public": true}))
        .await
        .unwrap();

    let auth = RegistryAuthority::spawn(CacheConfig::new(RegistryAddrs::single(reg_addr), token));
    let b = start(Arc::new(auth.clone())).await;
    let (a, bb) = (node_socket().await, node_socket().await);
    // The first discovers miss the cache: answered at once, stored once the keys arrive.
    a.send_to(&signed_discover(&ka, na, unix_ms()), b.addr)
        .await
        .unwrap();
    recv(&a).await;
    bb.send_to(&signed_discover(&kb, nb, unix_ms()), b.addr)
        .await
        .unwrap();
    recv(&bb).await;
    let s = b
        .until("keys fetched, entries strong", |s| s.discovers_signed == 2)
        .await;
    assert_eq!(s.deferred, 2);

    // A punches B: the reachability answer is fetched, then both sides hear.
    let req = BeaconMessage::PunchRequest {
        requester: na,
        target: nb,
    }
    .emit_vec();
    a.send_to(&req, b.addr).await.unwrap();
    let (to_a, _) = recv(&a).await;
    let (to_b, _) = recv(&bb).await;
    assert!(matches!(
        BeaconMessage::parse(&to_a).unwrap(),
        BeaconMessage::PunchCommand { .. }
    ));
    assert_eq!(
        BeaconMessage::parse(&to_b).unwrap(),
        BeaconMessage::PunchCommand {
            endpoint: a.local_addr().unwrap()
        }
    );
    // Relay A -> B is allowed (cached now); B -> A is not (A is private).
    a.send_to(&relay_msg(na, nb, b"hello"), b.addr)
        .await
        .unwrap();
    let (got, _) = recv(&bb).await;
    assert_eq!(&got[5..], b"hello");
    let held_before = b.stats.snapshot().deferred;
    bb.send_to(&relay_msg(nb, na, b"x"), b.addr).await.unwrap();
    // The first attempt finds no answer yet (pending): the Relay is held, then refused once
    // the answer, a "no", arrives; later ones find the cached "no".
    b.until("held", |s| s.deferred > held_before).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.stats.snapshot().dropped(DropReason::NotAllowed) == 0 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
        bb.send_to(&relay_msg(nb, na, b"x"), b.addr).await.unwrap();
    }
    nothing(&a).await;
    // Unknown node: not stored.
    let c = node_socket().await;
    c.send_to(&signed_discover(&key(999), 999_999, unix_ms()), b.addr)
        .await
        .unwrap();
    recv(&c).await;
    b.until("unknown node", |s| s.dropped(DropReason::UnknownNode) == 1)
        .await;
    assert!(auth.cached().0 >= 3);
    b.stop().await;
    let _ = stop_reg.send(());
}

/// The beacon's registry authority over TLS pinned to the registry's certificate: keys are
/// fetched with the right pin, never with a wrong one.
#[tokio::test]
async fn registry_authority_over_pinned_tls() {
    let token = "beacon-token-0123456789";
    let mut config = pilot_registry::Config::default();
    config.policy.beacon_token = Some(token.into());
    let store = pilot_registry::store::RedbStore::in_memory().unwrap();
    let reg = pilot_registry::Registry::open(Box::new(store), config).unwrap();
    let (cert, key_pem, fp) = pilot_registry::server::self_signed().unwrap();
    let tls = pilot_registry::server::tls_from_pem(cert.as_bytes(), key_pem.as_bytes()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let reg_addr = listener.local_addr().unwrap();
    tokio::spawn(
        reg.clone()
            .serve(listener, Some(tls), std::future::pending()),
    );
    let k = key(500);
    let n = register(&reg, &k, "127.0.0.1:5000".parse().unwrap()).await;

    let authority = |fp: &str| {
        let pin: pilot_registry_client::Fingerprint = fp.parse().unwrap();
        RegistryAuthority::spawn(CacheConfig {
            transport: pilot_registry_client::Transport::TlsPinned(pin),
            ..CacheConfig::new(RegistryAddrs::single(reg_addr), token)
        })
    };
    let right = authority(&fp);
    let wrong = authority(&"ab".repeat(32));
    let want = *k.verifying_key().as_bytes();
    let deadline = Instant::now() + Duration::from_secs(10);
    while right.node_key(n) != Some(want) {
        assert!(Instant::now() < deadline, "no key over pinned TLS");
        assert_eq!(wrong.node_key(n), None);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(wrong.node_key(n), None);
}
