#![allow(clippy::unwrap_used)]
//! Real `pilotd` processes, a registry and a beacon (in this process), over loopback UDP and
//! TCP. Agents reach each daemon only through [`Driver`] on its IPC socket.
//!
//! Covered: an echo round trip, 64 MiB each way with SHA-256 checks, 100 concurrent streams,
//! trust (request, approve, reject, mutual, revoke, persistence across a restart), privacy of
//! private nodes, the beacon relay when the direct path is blocked (root and `nft` only: those
//! tests are ignored by default and run by the root section of `scripts/test.sh`),
//! re-keying after a peer restarts, and garbage on the UDP and IPC sockets.
//!
//! The tests run one at a time (they share the machine's CPU and the relay test blocks
//! loopback ports), each with its own registry, beacon and daemons.

use crate::support;

use std::io::Write as _;
use std::net::{SocketAddr as NetAddr, UdpSocket as StdUdp};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pilot_beacon::{Authority, StatsHandle};
use pilot_driver::{Driver, PilotStream};
use pilot_registry::store::RedbStore;
use pilot_registry::{Config as RegistryConfig, Registry};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tunnel::ipc::{
    ExtReply, ExtRequest, HandshakeOp, HandshakeStatus, Info, PendingList, TrustedList,
};
use tunnel::{Addr, SocketAddr as PilotAddr};

/// One test at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A port the daemons listen on for the echo service of these tests (the stdio service
/// yields it to them).
const ECHO_PORT: u16 = 1000;
/// A port no built-in service uses.
const KNOCK_PORT: u16 = 4242;

// ---------------------------------------------------------------------------------------------
// Registry, beacon and daemon processes
// ---------------------------------------------------------------------------------------------

/// The in-process registry as the beacon's authority, answering from its own state.
struct EmbeddedRegistry(Registry);

impl Authority for EmbeddedRegistry {
    fn node_key(&self, node: u32) -> Option<[u8; 32]> {
        self.0.node_key(node)
    }

    fn may_reach(&self, from: u32, to: u32) -> bool {
        self.0.may_reach(from, to)
    }
}

/// A registry and a beacon serving in this process; the beacon asks the same registry.
struct Cluster {
    registry: String,
    beacon: NetAddr,
    beacon_stats: StatsHandle,
    dir: tempfile::TempDir,
}

impl Cluster {
    async fn start() -> Cluster {
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
        let registry = l.local_addr().unwrap().to_string();
        let authority: Arc<dyn Authority> = Arc::new(EmbeddedRegistry(reg.clone()));
        tokio::spawn(reg.serve(l, None, std::future::pending()));
        let sock = pilot_beacon::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let server = pilot_beacon::Server::new(sock, authority, pilot_beacon::Config::default());
        let beacon = server.local_addr().unwrap();
        let beacon_stats = server.stats();
        tokio::spawn(server.run(std::future::pending()));
        Cluster {
            registry,
            beacon,
            beacon_stats,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// Starts a daemon and waits until it is registered.
    async fn daemon(&self, name: &str, public: bool) -> Pilotd {
        let home = self.dir.path().join(name);
        std::fs::create_dir_all(&home).unwrap();
        let mut d = Pilotd {
            name: name.into(),
            socket: home.join("pilotd.sock"),
            home,
            port: support::free_udp_port(),
            public,
            registry: self.registry.clone(),
            beacon: self.beacon.to_string(),
            child: None,
            node_id: 0,
        };
        d.start().await;
        d
    }
}

/// The daemons' log filter: `PILOT_TEST_LOG_LEVEL`, else info.
fn log_level() -> String {
    std::env::var("PILOT_TEST_LOG_LEVEL").unwrap_or_else(|_| "info".into())
}

/// A `pilotd` child process. Dropping it kills the process; after a panic its log is printed.
struct Pilotd {
    name: String,
    home: PathBuf,
    socket: PathBuf,
    port: u16,
    public: bool,
    registry: String,
    beacon: String,
    child: Option<Child>,
    node_id: u32,
}

impl Pilotd {
    fn log_path(&self) -> PathBuf {
        self.home.join("pilotd.log")
    }

    /// Spawns the process (same home, socket and port every time) and waits for registration.
    async fn start(&mut self) {
        assert!(self.child.is_none(), "{} already runs", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let t0 = Instant::now();
        let child = Command::new(env!("CARGO_BIN_EXE_pilotd"))
            .arg("--home")
            .arg(&self.home)
            .arg("--socket")
            .arg(&self.socket)
            .args(["--registry", &self.registry])
            .args(["--beacon", &self.beacon])
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .args(["--public", if self.public { "true" } else { "false" }])
            .args(["--log-level", &log_level()])
            .env_remove("PILOT_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        self.child = Some(child);
        let id = self.wait_registered(Duration::from_secs(20)).await;
        eprintln!(
            "pilotd {}: spawn to registered in {} ms (node {id})",
            self.name,
            t0.elapsed().as_millis()
        );
        if self.node_id != 0 {
            assert_eq!(id, self.node_id, "{}: node ID changed", self.name);
        }
        self.node_id = id;
    }

    async fn wait_registered(&mut self, timeout: Duration) -> u32 {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("pilotd {} exited: {st}\n{}", self.name, self.log_tail());
            }
            if let Ok(d) = Driver::connect(&self.socket).await {
                if let Ok(info) = d.info().await {
                    if info.node_id != 0 {
                        return info.node_id;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "pilotd {} not registered after {timeout:?}\n{}",
                self.name,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the process with SIGTERM and waits for a clean exit.
    async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let st = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success(), "kill -TERM failed");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                assert!(
                    st.success(),
                    "pilotd {} exit status {st}\n{}",
                    self.name,
                    self.log_tail()
                );
                return;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("pilotd {} ignored SIGTERM\n{}", self.name, self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn restart(&mut self) {
        self.stop().await;
        self.start().await;
    }

    async fn driver(&self) -> Driver {
        Driver::connect(&self.socket).await.unwrap()
    }

    fn addr(&self, port: u16) -> PilotAddr {
        PilotAddr::new(Addr::new(0, self.node_id), port)
    }

    fn udp(&self) -> NetAddr {
        NetAddr::from(([127, 0, 0, 1], self.port))
    }

    fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        let from = lines.len().saturating_sub(60);
        if std::env::var_os("PILOT_TEST_KEEP_LOGS").is_some() {
            let _ = std::fs::copy(self.log_path(), format!("/tmp/pilotd-{}.log", self.name));
        }
        format!(
            "--- last lines of {} ---\n{}",
            self.log_path().display(),
            lines[from..].join("\n")
        )
    }
}

impl Drop for Pilotd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "pilotd {} (node {})\n{}",
                self.name,
                self.node_id,
                self.log_tail()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Traffic helpers
// ---------------------------------------------------------------------------------------------

/// Deterministic pseudo-random bytes (xorshift64*).
struct Prng(u64);

impl Prng {
    fn new(seed: u64) -> Prng {
        Prng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0; n];
        self.fill(&mut v);
        v
    }
}

/// Echoes every connection to `port` of `driver`'s daemon.
async fn echo_server(driver: &Driver, port: u16) -> tokio::task::JoinHandle<()> {
    let mut l = driver.listen(port).await.unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tokio::io::split(s);
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    })
}

/// Sends `data` on a new stream to `dst` and returns what comes back before EOF.
async fn round_trip(driver: &Driver, dst: PilotAddr, data: &[u8]) -> Result<Vec<u8>, String> {
    let s = driver.dial(dst).await.map_err(|e| format!("dial: {e}"))?;
    exchange(s, data).await
}

/// Writes `data` then FIN while reading the peer's bytes until its EOF.
async fn exchange(s: PilotStream, data: &[u8]) -> Result<Vec<u8>, String> {
    let (mut r, mut w) = tokio::io::split(s);
    let data = data.to_vec();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await?;
        w.shutdown().await?;
        Ok::<_, std::io::Error>(w)
    });
    let mut got = Vec::new();
    r.read_to_end(&mut got)
        .await
        .map_err(|e| format!("read: {e}"))?;
    let _w = writer.await.unwrap().map_err(|e| format!("write: {e}"))?;
    Ok(got)
}

/// An echo round trip of `n` bytes that must come back intact within `timeout`.
async fn echo_ok(
    driver: &Driver,
    dst: PilotAddr,
    n: usize,
    timeout: Duration,
) -> Result<(), String> {
    let data = Prng::new(n as u64 ^ u64::from(dst.port)).bytes(n);
    match tokio::time::timeout(timeout, round_trip(driver, dst, &data)).await {
        Err(_) => Err(format!("no echo within {timeout:?}")),
        Ok(Err(e)) => Err(e),
        Ok(Ok(got)) if got == data => Ok(()),
        Ok(Ok(got)) => Err(format!("echo differs: {} bytes back of {n}", got.len())),
    }
}

/// An echo from `from` that must fail; returns why, and logs how long failing took. It uses
/// its own driver: a dial that hangs would hold up the replies to later requests of a shared
/// one.
async fn echo_fails(from: &Pilotd, dst: PilotAddr, within: Duration) -> String {
    let driver = from.driver().await;
    let t0 = Instant::now();
    let e = echo_ok(&driver, dst, 64, within)
        .await
        .expect_err("the echo worked");
    eprintln!("echo to {dst} failed after {:?}: {e}", t0.elapsed());
    e
}

/// Retries an echo round trip until it works or `within` has passed; returns the time taken.
async fn echo_eventually(driver: &Driver, dst: PilotAddr, within: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        let left = within.saturating_sub(t0.elapsed());
        match echo_ok(driver, dst, 4096, left.max(Duration::from_millis(100))).await {
            Ok(()) => return t0.elapsed(),
            Err(e) if t0.elapsed() >= within => panic!("echo to {dst} never worked: {e}"),
            Err(e) => {
                eprintln!("echo to {dst} at {:?}: {e}; retrying", t0.elapsed());
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Polls `f` until it yields `Some` or `within` has passed.
async fn eventually<T, F, Fut>(what: &str, within: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let t0 = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(t0.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn info_json(d: &Driver) -> Value {
    d.info_json().await.unwrap()
}

async fn peer_relay(d: &Driver, node: u32) -> Option<bool> {
    let info: Info = d.info().await.ok()?;
    info.peer_list
        .iter()
        .find(|p| p.node_id == node)
        .map(|p| p.relay)
}

async fn pending(d: &Driver) -> PendingList {
    serde_json::from_value(d.handshake(HandshakeOp::Pending).await.unwrap()).unwrap()
}

async fn trusted(d: &Driver) -> TrustedList {
    serde_json::from_value(d.handshake(HandshakeOp::Trusted).await.unwrap()).unwrap()
}

async fn handshake_status(d: &Driver, op: HandshakeOp<'_>) -> HandshakeStatus {
    serde_json::from_value(d.handshake(op).await.unwrap()).unwrap()
}

/// Sends `total` bytes from `seed` while reading the peer's bytes to EOF; returns the
/// SHA-256 of what was sent, of what was received, and the received length.
async fn pump(s: PilotStream, seed: u64, total: usize) -> ([u8; 32], [u8; 32], usize) {
    const CHUNK: usize = 256 * 1024;
    let (mut r, mut w) = tokio::io::split(s);
    let writer = tokio::spawn(async move {
        let mut rng = Prng::new(seed);
        let mut h = Sha256::new();
        let mut buf = vec![0u8; CHUNK];
        let mut left = total;
        while left > 0 {
            let n = left.min(CHUNK);
            rng.fill(&mut buf[..n]);
            h.update(&buf[..n]);
            w.write_all(&buf[..n]).await.unwrap();
            left -= n;
        }
        w.shutdown().await.unwrap();
        (<[u8; 32]>::from(h.finalize()), w)
    });
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0;
    loop {
        let n = r.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        got += n;
    }
    let (sent, _w) = writer.await.unwrap();
    (sent, h.finalize().into(), got)
}

// ---------------------------------------------------------------------------------------------
// 1. Echo
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_round_trip() {
    let _serial = SERIAL.lock().await;
    let c = Cluster::start().await;
    let a = c.daemon("a", true).await;
    let b = c.daemon("b", true).await;
    let db = b.driver().await;
    let _echo = echo_server(&db, ECHO_PORT).await;
    let da = a.driver().await;
    let data = b"hello through two pilotd processes".repeat(100);
    let t0 = Instant::now();
    let got = tokio::time::timeout(
        Duration::from_secs(10),
        round_trip(&da, b.addr(ECHO_PORT), &data),
    )
    .await
    .unwrap()
    .unwrap();
    eprintln!("echo round trip (first contact): {:?}", t0.elapsed());
    assert_eq!(got, data);
    let info = da.info().await.unwrap();
    let peer = info
        .peer_list
        .iter()
        .find(|p| p.node_id == b.node_id)
        .unwrap();
    assert!(peer.encrypted && peer.authenticated, "{peer:?}");
    assert!(!peer.relay, "{peer:?}");
    assert_eq!(peer.endpoint, b.udp().to_string());
}

// ---------------------------------------------------------------------------------------------
// 2. Bulk transfer
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_each_way() {
    const TOTAL: usize = 64 << 20;
    let _serial = SERIAL.lock().await;
    let c = Cluster::start().await;
    let a = c.daemon("a", true).await;
    let b = c.daemon("b", true).await;
    let db = b.driver().await;
    let mut l = db.listen(ECHO_PORT).await.unwrap();
    let da = a.driver().await;
    let t0 = Instant::now();
    let server = tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        pump(s, 2, TOTAL).await
    });
    let s = da.dial(b.addr(ECHO_PORT)).await.unwrap();
    let client = tokio::spawn(pump(s, 1, TOTAL));
    let (a_sent, a_recv, a_len, b_sent, b_recv, b_len) =
        tokio::time::timeout(Duration::from_secs(180), async {
            let (a_sent, a_recv, a_len) = client.await.unwrap();
            let (b_sent, b_recv, b_len) = server.await.unwrap();
            (a_sent, a_recv, a_len, b_sent, b_recv, b_len)
        })
        .await
        .expect("64 MiB each way did not finish within 180 s");
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "64 MiB each way in {secs:.2} s: {:.1} MB/s per direction, {:.1} MB/s total",
        TOTAL as f64 / 1e6 / secs,
        2.0 * TOTAL as f64 / 1e6 / secs
    );
    assert_eq!(a_len, TOTAL);
    assert_eq!(b_len, TOTAL);
    assert_eq!(a_sent, b_recv, "A->B SHA-256 differs");
    assert_eq!(b_sent, a_recv, "B->A SHA-256 differs");
}

// ---------------------------------------------------------------------------------------------
// 3. Concurrent streams
// ---------------------------------------------------------------------------------------------

/// Opens 100 streams A->B (at most `dial_parallelism` dials in flight), waits until all are
/// open, then echoes distinct content on every one at once.
async fn concurrent_streams(dial_parallelism: usize) {
    const STREAMS: usize = 100;
    let _serial = SERIAL.lock().await;
    let c = Cluster::start().await;
    let a = c.daemon("a", true).await;
    let b = c.daemon("b", true).await;
    let db = b.driver().await;
    let _echo = echo_server(&db, ECHO_PORT).await;
    let da = a.driver().await;
    // Warm the tunnel so the dials do not all wait for the key exchange.
    echo_ok(&da, b.addr(ECHO_PORT), 16, Duration::from_secs(10))
        .await
        .unwrap();
    let t0 = Instant::now();
    let dials = Arc::new(tokio::sync::Semaphore::new(dial_parallelism));
    let all_open = Arc::new(tokio::sync::Barrier::new(STREAMS));
    let mut set = tokio::task::JoinSet::new();
    for i in 0..STREAMS {
        let da = da.clone();
        let dst = b.addr(ECHO_PORT);
        let dials = dials.clone();
        let all_open = all_open.clone();
        set.spawn(async move {
            let permit = dials.acquire().await.unwrap();
            let s = da.dial(dst).await;
            drop(permit);
            all_open.wait().await;
            let s = s.map_err(|e| format!("dial: {e}"))?;
            let mut data = format!("stream {i} ").into_bytes();
            data.extend(Prng::new(1000 + i as u64).bytes(16_384 + 97 * i));
            let got = exchange(s, &data).await?;
            if got != data {
                return Err(format!(
                    "echo differs ({} bytes of {})",
                    got.len(),
                    data.len()
                ));
            }
            Ok::<_, String>(())
        });
    }
    let mut ok = 0;
    let mut failed = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(j) = set.join_next().await {
            match j.unwrap() {
                Ok(()) => ok += 1,
                Err(e) => failed.push(e),
            }
        }
    })
    .await;
    assert!(r.is_ok(), "only {ok} of {STREAMS} streams finished in 60 s");
    assert!(
        failed.is_empty(),
        "{} streams failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    eprintln!(
        "{STREAMS} concurrent streams ({dial_parallelism} dials in flight) echoed in {:?}",
        t0.elapsed()
    );
    assert_eq!(ok, STREAMS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_streams() {
    concurrent_streams(32).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_simultaneous_dials() {
    concurrent_streams(100).await;
}

// ---------------------------------------------------------------------------------------------
// 4. Trust
// ---------------------------------------------------------------------------------------------

fn outgoing_requests(home: &Path) -> Vec<u64> {
    let s = std::fs::read_to_string(home.join("trust.json")).unwrap_or_default();
    let v: Value = serde_json::from_str(&s).unwrap_or(Value::Null);
    v.get("outgoing")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|o| o.get("node_id").and_then(Value::as_u64))
                .collect()
        })
        .unwrap_or_default()
}

async fn is_trusted(d: &Driver, node: u32) -> bool {
    trusted(d).await.trusted.iter().any(|t| t.node_id == node)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_lifecycle() {
    let _serial = SERIAL.lock().await;
    let c = Cluster::start().await;
    let a = c.daemon("a", false).await;
    let b = c.daemon("b", false).await;
    let mut cc = c.daemon("c", false).await;
    let (da, db, dc) = (a.driver().await, b.driver().await, cc.driver().await);
    let _echo_a = echo_server(&da, ECHO_PORT).await;
    let _echo_b = echo_server(&db, ECHO_PORT).await;
    let _echo_c = echo_server(&dc, ECHO_PORT).await;
    let short = Duration::from_secs(5);
    let t0 = Instant::now();

    // Without trust, A cannot open a stream to B's private port.
    echo_fails(&a, b.addr(ECHO_PORT), short).await;

    eprintln!("trust phase at {:?}", t0.elapsed());
    // Request: B sees it pending, with the justification.
    let why = "agent a wants to read b's reports";
    let st = handshake_status(
        &da,
        HandshakeOp::Request {
            node: b.node_id,
            justification: why,
        },
    )
    .await;
    assert_eq!(st.status, HandshakeStatus::SENT);
    assert_eq!(st.node_id, b.node_id);
    let entry = eventually("request pending at B", Duration::from_secs(10), || async {
        pending(&db)
            .await
            .pending
            .into_iter()
            .find(|p| p.node_id == a.node_id)
    })
    .await;
    assert_eq!(entry.justification, why);
    assert!(!is_trusted(&db, a.node_id).await);
    echo_fails(&a, b.addr(ECHO_PORT), short).await;

    eprintln!("trust phase at {:?}", t0.elapsed());
    // Approve: both sides trust each other and the private port opens.
    let st = handshake_status(&db, HandshakeOp::Approve { node: a.node_id }).await;
    assert_eq!(st.status, HandshakeStatus::APPROVED);
    assert!(is_trusted(&db, a.node_id).await);
    assert!(pending(&db).await.pending.is_empty());
    eventually(
        "A trusts B after approval",
        Duration::from_secs(10),
        || async { is_trusted(&da, b.node_id).await.then_some(()) },
    )
    .await;
    let t = echo_eventually(&da, b.addr(ECHO_PORT), Duration::from_secs(10)).await;
    eprintln!("stream to a private port works {t:?} after approval");

    eprintln!("trust phase at {:?}", t0.elapsed());
    // Reject with a reason: C's request is dropped on both sides and the port stays closed.
    let st = handshake_status(
        &dc,
        HandshakeOp::Request {
            node: b.node_id,
            justification: "c asks too",
        },
    )
    .await;
    assert_eq!(st.status, HandshakeStatus::SENT);
    assert_eq!(outgoing_requests(&cc.home), vec![u64::from(b.node_id)]);
    eventually(
        "C's request pending at B",
        Duration::from_secs(10),
        || async {
            pending(&db)
                .await
                .pending
                .iter()
                .any(|p| p.node_id == cc.node_id && p.justification == "c asks too")
                .then_some(())
        },
    )
    .await;
    let st = handshake_status(
        &db,
        HandshakeOp::Reject {
            node: cc.node_id,
            reason: "not this week",
        },
    )
    .await;
    assert_eq!(st.status, HandshakeStatus::REJECTED);
    assert!(pending(&db).await.pending.is_empty());
    assert!(!is_trusted(&db, cc.node_id).await);
    eventually(
        "C learns of the rejection",
        Duration::from_secs(10),
        || async { outgoing_requests(&cc.home).is_empty().then_some(()) },
    )
    .await;
    assert!(!is_trusted(&dc, b.node_id).await);
    echo_fails(&cc, b.addr(ECHO_PORT), short).await;

    eprintln!("trust phase at {:?}", t0.elapsed());
    // Mutual requests approve themselves.
    handshake_status(
        &da,
        HandshakeOp::Request {
            node: cc.node_id,
            justification: "a to c",
        },
    )
    .await;
    handshake_status(
        &dc,
        HandshakeOp::Request {
            node: a.node_id,
            justification: "c to a",
        },
    )
    .await;
    eventually(
        "A and C trust each other",
        Duration::from_secs(10),
        || async {
            (is_trusted(&da, cc.node_id).await && is_trusted(&dc, a.node_id).await).then_some(())
        },
    )
    .await;
    assert!(pending(&da).await.pending.is_empty());
    assert!(pending(&dc).await.pending.is_empty());
    echo_eventually(&da, cc.addr(ECHO_PORT), Duration::from_secs(10)).await;
    echo_eventually(&dc, a.addr(ECHO_PORT), Duration::from_secs(10)).await;

    eprintln!("trust phase at {:?}", t0.elapsed());
    // Revoke: new streams from A to B are refused.
    let st = handshake_status(&db, HandshakeOp::Revoke { node: a.node_id }).await;
    assert_eq!(st.status, HandshakeStatus::REVOKED);
    assert!(!is_trusted(&db, a.node_id).await);
    echo_fails(&a, b.addr(ECHO_PORT), short).await;
    eventually(
        "A drops its trust in B",
        Duration::from_secs(10),
        || async { (!is_trusted(&da, b.node_id).await).then_some(()) },
    )
    .await;

    eprintln!("trust phase at {:?}", t0.elapsed());
    // Restart C: same node, trust intact, streams work again.
    let before = trusted(&dc).await;
    drop(dc);
    cc.restart().await;
    let dc = cc.driver().await;
    let after = trusted(&dc).await;
    assert_eq!(before, after, "trusted list changed across the restart");
    assert!(after.trusted.iter().any(|t| t.node_id == a.node_id));
    let _echo_c = echo_server(&dc, ECHO_PORT).await;
    let t = echo_eventually(&da, cc.addr(ECHO_PORT), Duration::from_secs(15)).await;
    eprintln!("stream to the restarted node works after {t:?}");
    echo_eventually(&dc, a.addr(ECHO_PORT), Duration::from_secs(10)).await;
}

// ---------------------------------------------------------------------------------------------
// 5. Privacy
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_node_is_hidden_without_trust() {
    let _serial = SERIAL.lock().await;
    let c = Cluster::start().await;
    let d = c.daemon("d", false).await;
    let e = c.daemon("e", true).await;
    let (dd, de) = (d.driver().await, e.driver().await);
    let _echo_d = echo_server(&dd, ECHO_PORT).await;

    // Lookup: the record, without an endpoint.
    match de
        .ext(&ExtRequest::Lookup { node_id: d.node_id })
        .await
        .unwrap()
    {
        ExtReply::Ok { data } => {
            assert_eq!(data["node_id"], d.node_id);
            assert_eq!(data["public"], false);
            assert!(data.get("real_addr").is_none(), "endpoint leaked: {data}");
        }
        ExtReply::Error { code, message } => eprintln!("lookup refused: {code}: {message}"),
    }
    // The public node's endpoint is visible, for comparison.
    match dd
        .ext(&ExtRequest::Lookup { node_id: e.node_id })
        .await
        .unwrap()
    {
        ExtReply::Ok { data } => assert_eq!(data["real_addr"], e.udp().to_string(), "{data}"),
        other => panic!("lookup of a public node: {other:?}"),
    }
    // Resolve: no endpoint either.
    match de
        .ext(&ExtRequest::Resolve {
            target: d.node_id.to_string(),
        })
        .await
        .unwrap()
    {
        ExtReply::Ok { data } => {
            assert_eq!(data["node_id"], d.node_id);
            for k in ["real_addr", "endpoint"] {
                assert!(data.get(k).is_none(), "endpoint leaked: {data}");
            }
        }
        ExtReply::Error { code, message } => eprintln!("resolve refused: {code}: {message}"),
    }
    // Not reachable: no stream, no datagram, and no tunnel to it.
    let why = echo_fails(&e, d.addr(ECHO_PORT), Duration::from_secs(5)).await;
    assert!(why.contains("dial"), "{why}");
    let _knock = dd.listen(KNOCK_PORT).await.unwrap();
    de.send_to(d.addr(KNOCK_PORT), b"knock").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(1), dd.recv_from()).await;
    assert!(got.is_err(), "a datagram reached the private node: {got:?}");
    let info = de.info().await.unwrap();
    assert!(
        info.peer_list
            .iter()
            .all(|p| p.node_id != d.node_id || (p.endpoint.is_empty() && !p.encrypted)),
        "{:?}",
        info.peer_list
    );

    // With trust (mutual requests) the same stream works.
    handshake_status(
        &dd,
        HandshakeOp::Request {
            node: e.node_id,
            justification: "",
        },
    )
    .await;
    handshake_status(
        &de,
        HandshakeOp::Request {
            node: d.node_id,
            justification: "",
        },
    )
    .await;
    let t = echo_eventually(&de, d.addr(ECHO_PORT), Duration::from_secs(10)).await;
    eprintln!("private node reachable {t:?} after mutual trust");
}

// ---------------------------------------------------------------------------------------------
// 6. Relay through the beacon
// ---------------------------------------------------------------------------------------------

/// An nftables table in the root namespace, deleted on drop.
struct NftTable {
    name: String,
}

impl NftTable {
    fn nft(args: &[&str], stdin: Option<&str>) -> Result<(), String> {
        let mut cmd = Command::new("nft");
        cmd.args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| e.to_string())?;
        if let Some(s) = stdin {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(s.as_bytes())
                .map_err(|e| e.to_string())?;
        }
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Drops UDP between loopback ports `p` and `q`, both directions.
    fn block(name: &str, p: u16, q: u16) -> Result<NftTable, String> {
        let script = format!(
            "table inet {name} {{\n  chain out {{\n    type filter hook output priority 0; policy accept;\n    \
             udp sport {p} udp dport {q} drop\n    udp sport {q} udp dport {p} drop\n  }}\n}}\n"
        );
        let t = NftTable { name: name.into() };
        NftTable::nft(&["-f", "-"], Some(&script))?;
        Ok(t)
    }

    /// Deletes the rules (the table stays until drop).
    fn unblock(&self) {
        NftTable::nft(&["flush", "chain", "inet", &self.name, "out"], None).unwrap();
    }
}

impl Drop for NftTable {
    fn drop(&mut self) {
        if let Err(e) = NftTable::nft(&["delete", "table", "inet", &self.name], None) {
            eprintln!("deleting nft table {}: {e}", self.name);
        }
    }
}

/// Echo round trips on one stream every 100 ms; the count of completed ones is published.
fn keep_echoing(
    s: PilotStream,
) -> (
    tokio::sync::watch::Receiver<u64>,
    tokio::task::JoinHandle<Result<(), String>>,
) {
    let (tx, rx) = tokio::sync::watch::channel(0u64);
    let task = tokio::spawn(async move {
        let r = echo_loop(s, tx).await;
        if let Err(e) = &r {
            eprintln!("echo loop: {e}");
        }
        r
    });
    (rx, task)
}

async fn echo_loop(s: PilotStream, tx: tokio::sync::watch::Sender<u64>) -> Result<(), String> {
    {
        let (mut r, mut w) = tokio::io::split(s);
        let mut rng = Prng::new(77);
        let mut back = vec![0u8; 1024];
        for n in 1.. {
            let data = rng.bytes(1024);
            let t0 = Instant::now();
            let once = async {
                w.write_all(&data).await?;
                r.read_exact(&mut back).await?;
                Ok::<_, std::io::Error>(())
            };
            match tokio::time::timeout(Duration::from_secs(20), once).await {
                Err(_) => return Err(format!("round trip {n} took over 20 s")),
                Ok(Err(e)) => return Err(format!("round trip {n}: {e}")),
                Ok(Ok(())) => {}
            }
            if back != data {
                return Err(format!("round trip {n}: echo differs"));
            }
            if t0.elapsed() > Duration::from_secs(2) {
                eprintln!("round trip {n} took {:?}", t0.elapsed());
            }
            if tx.send(n).is_err() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }
}

/// Waits until `n` more round trips completed.
async fn more_round_trips(rx: &mut tokio::sync::watch::Receiver<u64>, n: u64, within: Duration) {
    let start = *rx.borrow();
    tokio::time::timeout(within, rx.wait_for(|&c| c >= start + n))
        .await
        .unwrap_or_else(|_| panic!("fewer than {n} round trips in {within:?}"))
        .expect("the echo loop ended");
}

fn have_nft() -> bool {
    Command::new("nft")
        .args(["list", "tables"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
}

/// Blocks UDP between two daemons: traffic must go through the beacon; unblocks it: the path
/// must return to direct while a stream keeps working. With `established_first`, the stream
/// is opened on the direct path before the block and must survive the switch to the relay.
/// Without `back_to_direct`, the stream must keep working after the unblock, on either path.
async fn relay_test(established_first: bool, back_to_direct: bool) {
    // Ignored unless asked for (`scripts/test.sh` asks only as root): asked for where it
    // cannot run, the test fails rather than passing.
    assert!(
        running_as_root() && have_nft(),
        "the relay tests cannot run here: they need root and a working `nft`"
    );
    let _serial = SERIAL.lock().await;
    let c = Cluster::start().await;
    let a = c.daemon("a", true).await;
    let b = c.daemon("b", true).await;
    let (da, db) = (a.driver().await, b.driver().await);
    let _echo = echo_server(&db, ECHO_PORT).await;
    let name = format!("pilot_test_{}", std::process::id());
    let mut table = None;
    if !established_first {
        table = Some(NftTable::block(&name, a.port, b.port).unwrap());
    }
    let t0 = Instant::now();
    let s = da.dial(b.addr(ECHO_PORT)).await.unwrap();
    eprintln!("dial took {:?}", t0.elapsed());
    let (mut count, task) = keep_echoing(s);
    more_round_trips(&mut count, 3, Duration::from_secs(20)).await;
    let relayed0 = c.beacon_stats.snapshot().relayed_packets;
    if established_first {
        assert_eq!(peer_relay(&da, b.node_id).await, Some(false));
        table = Some(NftTable::block(&name, a.port, b.port).unwrap());
    }
    let table = table.unwrap();
    eventually("A relays to B", Duration::from_secs(20), || async {
        (peer_relay(&da, b.node_id).await == Some(true)).then_some(())
    })
    .await;
    eprintln!("direct path blocked: relayed after {:?}", t0.elapsed());
    more_round_trips(&mut count, 5, Duration::from_secs(30)).await;
    let st = c.beacon_stats.snapshot();
    assert!(
        st.relayed_packets > relayed0 || (!established_first && st.relayed_packets > 0),
        "the beacon relayed nothing: {st:?}"
    );
    eprintln!(
        "beacon relayed {} packets ({} bytes); B relays to A: {:?}",
        st.relayed_packets,
        st.relayed_bytes,
        peer_relay(&db, a.node_id).await
    );
    // A new stream works through the relay too.
    echo_ok(&da, b.addr(ECHO_PORT), 100_000, Duration::from_secs(20))
        .await
        .unwrap();

    table.unblock();
    let t1 = Instant::now();
    if !back_to_direct {
        more_round_trips(&mut count, 20, Duration::from_secs(20)).await;
        echo_ok(&da, b.addr(ECHO_PORT), 100_000, Duration::from_secs(20))
            .await
            .unwrap();
        eprintln!(
            "rules deleted: {:?} later A relays to B: {:?}",
            t1.elapsed(),
            peer_relay(&da, b.node_id).await
        );
        drop(count);
        let r = tokio::time::timeout(Duration::from_secs(25), task).await;
        r.unwrap().unwrap().unwrap();
        return;
    }
    eventually(
        "A back on the direct path",
        Duration::from_secs(30),
        || async { (peer_relay(&da, b.node_id).await == Some(false)).then_some(()) },
    )
    .await;
    eprintln!("rules deleted: direct again after {:?}", t1.elapsed());
    more_round_trips(&mut count, 5, Duration::from_secs(20)).await;
    let relayed = c.beacon_stats.snapshot().relayed_packets;
    more_round_trips(&mut count, 5, Duration::from_secs(20)).await;
    let after = c.beacon_stats.snapshot().relayed_packets;
    eprintln!("relayed packets while direct: {}", after - relayed);
    echo_ok(&da, b.addr(ECHO_PORT), 100_000, Duration::from_secs(20))
        .await
        .unwrap();
    drop(count);
    let r = tokio::time::timeout(Duration::from_secs(25), task).await;
    r.unwrap().unwrap().unwrap();
    drop(table);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: nftables rules on loopback"]
async fn relay_when_direct_path_is_blocked() {
    relay_test(false, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: nftables rules on loopback"]
async fn relayed_peer_returns_to_direct_path() {
    relay_test(false, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: nftables rules on loopback"]
async fn established_stream_survives_the_move_to_the_relay() {
    relay_test(true, true).await;
}

// ---------------------------------------------------------------------------------------------
// 7. Re-keying after a restart
// ---------------------------------------------------------------------------------------------

/// Restarts B (same home and port) and checks streams both ways within a few seconds. With
/// `first_try`, the first dial after each restart must already work.
async fn rekey_test(first_try: bool) {
    let _serial = SERIAL.lock().await;
    let c = Cluster::start().await;
    let a = c.daemon("a", true).await;
    let mut b = c.daemon("b", true).await;
    let da = a.driver().await;
    let _echo_a = echo_server(&da, ECHO_PORT).await;
    {
        let db = b.driver().await;
        let _echo_b = echo_server(&db, ECHO_PORT).await;
        echo_ok(&da, b.addr(ECHO_PORT), 10_000, Duration::from_secs(10))
            .await
            .unwrap();
        echo_ok(&db, a.addr(ECHO_PORT), 10_000, Duration::from_secs(10))
            .await
            .unwrap();
    }
    b.restart().await;
    let db = b.driver().await;
    let _echo_b = echo_server(&db, ECHO_PORT).await;
    // The restarted side dials first: A holds a stale session for B.
    if first_try {
        echo_ok(&db, a.addr(ECHO_PORT), 4096, Duration::from_secs(5))
            .await
            .unwrap();
    }
    let t = echo_eventually(&db, a.addr(ECHO_PORT), Duration::from_secs(10)).await;
    eprintln!("restarted B reached A after {t:?}");
    let t = echo_eventually(&da, b.addr(ECHO_PORT), Duration::from_secs(10)).await;
    eprintln!("A reached restarted B after {t:?}");

    // And the other way round: restart again, then the side holding the stale session dials.
    drop(_echo_b);
    drop(db);
    b.restart().await;
    let db = b.driver().await;
    let _echo_b = echo_server(&db, ECHO_PORT).await;
    if first_try {
        echo_ok(&da, b.addr(ECHO_PORT), 4096, Duration::from_secs(5))
            .await
            .unwrap();
    }
    let t = echo_eventually(&da, b.addr(ECHO_PORT), Duration::from_secs(10)).await;
    eprintln!("A reached restarted B (A first) after {t:?}");
    if first_try {
        echo_ok(&db, a.addr(ECHO_PORT), 4096, Duration::from_secs(5))
            .await
            .unwrap();
    }
    let t = echo_eventually(&db, a.addr(ECHO_PORT), Duration::from_secs(10)).await;
    eprintln!("restarted B reached A after {t:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_peer_rekeys() {
    rekey_test(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_dial_after_restart_works() {
    rekey_test(true).await;
}

// ---------------------------------------------------------------------------------------------
// 8. Garbage
// ---------------------------------------------------------------------------------------------

fn drops_total(info: &Value) -> u64 {
    info["drops"]
        .as_array()
        .map(|a| a.iter().filter_map(|d| d["count"].as_u64()).sum())
        .unwrap_or(0)
}

/// Writes `bytes` on a raw connection to the IPC socket and reads until the daemon closes it
/// (or a second of silence).
async fn raw_ipc(socket: &Path, bytes: &[u8], close_write: bool) -> Vec<u8> {
    let mut s = tokio::net::UnixStream::connect(socket).await.unwrap();
    let _ = s.write_all(bytes).await;
    if close_write {
        let _ = s.shutdown().await;
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_is_dropped_and_counted() {
    let _serial = SERIAL.lock().await;
    let c = Cluster::start().await;
    let a = c.daemon("a", true).await;
    let b = c.daemon("b", true).await;
    let (da, db) = (a.driver().await, b.driver().await);
    let _echo = echo_server(&db, ECHO_PORT).await;
    echo_ok(&da, b.addr(ECHO_PORT), 1000, Duration::from_secs(10))
        .await
        .unwrap();
    let before = info_json(&db).await;

    // UDP: random datagrams, and truncated frames of every kind.
    let udp = StdUdp::bind("127.0.0.1:0").unwrap();
    let mut rng = Prng::new(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    );
    let mut sent = 0u64;
    for i in 0..300 {
        let len = 1 + (rng.next() % 1400) as usize;
        let mut d = rng.bytes(len);
        // Never a valid magic by accident: those are counted under their own reasons.
        if d.first() == Some(&b'P') {
            d[0] = b'X';
        }
        if i % 50 == 0 {
            d.clear();
        }
        udp.send_to(&d, b.udp()).unwrap();
        sent += 1;
    }
    for magic in [b"PILS", b"PILA", b"PILT", b"PILK", b"PILP"] {
        for cut in [0usize, 1, 3, 8, 20, 40] {
            let mut d = magic.to_vec();
            d.extend(rng.bytes(cut));
            udp.send_to(&d, b.udp()).unwrap();
            sent += 1;
        }
    }
    let after = eventually("UDP garbage counted", Duration::from_secs(5), || async {
        let i = info_json(&db).await;
        (drops_total(&i) >= drops_total(&before) + sent).then_some(i)
    })
    .await;
    eprintln!(
        "{sent} garbage datagrams; drops before {} after {}",
        before["drops"], after["drops"]
    );

    // IPC: an unknown command, a malformed Dial, a reply sent as a request, then a length
    // prefix over 1 MiB (the client is dropped).
    let mut frames = Vec::new();
    frames.extend_from_slice(&[0, 0, 0, 3, 0x7F, 1, 2]);
    frames.extend_from_slice(&[0, 0, 0, 3, 0x03, 0, 1]);
    frames.extend_from_slice(&[0, 0, 0, 3, 0x0E, b'{', b'}']);
    frames.extend_from_slice(&[0xFF, 0xFF, 0xFF, 0xFF, 0x01]);
    let replies = raw_ipc(&b.socket, &frames, false).await;
    assert!(!replies.is_empty(), "no Error replies");
    // Random bytes, a truncated frame, and a client that sends nothing.
    raw_ipc(&b.socket, &rng.bytes(8192), true).await;
    raw_ipc(&b.socket, &[0, 0, 0, 10, 0x0D, 1], true).await;
    raw_ipc(&b.socket, &[], true).await;
    let ipc = info_json(&db).await["ipc"].clone();
    eprintln!("IPC counters: {ipc}");
    assert!(ipc["unknown_commands"].as_u64().unwrap() >= 2, "{ipc}");
    assert!(ipc["malformed"].as_u64().unwrap() >= 1, "{ipc}");
    assert!(ipc["oversized"].as_u64().unwrap() >= 1, "{ipc}");
    assert!(ipc["clients_dropped"].as_u64().unwrap() >= 1, "{ipc}");

    // Still serving.
    echo_ok(&da, b.addr(ECHO_PORT), 100_000, Duration::from_secs(10))
        .await
        .unwrap();
    let db2 = b.driver().await;
    assert_eq!(db2.info().await.unwrap().node_id, b.node_id);
}

// ---------------------------------------------------------------------------------------------
// Registry state across restarts
// ---------------------------------------------------------------------------------------------

/// An extension request that must succeed; its data.
async fn ext_ok(d: &Driver, req: ExtRequest) -> Value {
    match d.ext(&req).await.unwrap() {
        ExtReply::Ok { data } => data,
        other => panic!("{req:?}: {other:?}"),
    }
}

/// What the registry holds for `node`, asked through `asker`.
async fn registry_record(asker: &Driver, node: u32) -> Value {
    ext_ok(asker, ExtRequest::Lookup { node_id: node }).await
}

/// Hostname, visibility, tags, task advert and a network set through `pilotctl`'s requests
/// survive a clean stop (SIGTERM) and a `kill -9` of the daemon, as another node sees them
/// in the registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_keep_the_registry_state() {
    let _serial = SERIAL.lock().await;
    let c = Cluster::start().await;
    let mut a = c.daemon("a", false).await;
    let b = c.daemon("b", true).await;
    let da = a.driver().await;
    ext_ok(
        &da,
        ExtRequest::SetHostname {
            hostname: "alice-lab".into(),
        },
    )
    .await;
    ext_ok(&da, ExtRequest::SetVisibility { public: true }).await;
    ext_ok(
        &da,
        ExtRequest::SetTags {
            tags: vec!["gpu".into(), "eu".into()],
        },
    )
    .await;
    ext_ok(&da, ExtRequest::SetTaskExec { enabled: true }).await;
    let net = ext_ok(
        &da,
        ExtRequest::NetworkCreate {
            name: "lab".into(),
            join_rule: None,
            token: None,
        },
    )
    .await["id"]
        .as_u64()
        .unwrap();
    drop(da);

    let node = a.node_id;
    let check = |when: &'static str| {
        let b = &b;
        async move {
            let db = b.driver().await;
            let r = registry_record(&db, node).await;
            assert_eq!(r["hostname"], "alice-lab", "{when}: {r}");
            assert_eq!(r["public"], true, "{when}: {r}");
            assert_eq!(r["tags"], serde_json::json!(["gpu", "eu"]), "{when}: {r}");
            assert_eq!(r["task_exec"], true, "{when}: {r}");
            let nets: Vec<u64> = r["networks"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(Value::as_u64)
                .collect();
            assert!(nets.contains(&net), "{when}: {r}");
            let found = ext_ok(
                &db,
                ExtRequest::Resolve {
                    target: "alice-lab".into(),
                },
            )
            .await;
            assert_eq!(found["node_id"], node, "{when}: {found}");
        }
    };
    check("before").await;

    a.restart().await;
    check("after SIGTERM and a start").await;
    let info = info_json(&a.driver().await).await;
    assert_eq!(info["hostname"], "alice-lab", "{info}");

    if let Some(mut child) = a.child.take() {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    a.start().await;
    check("after kill -9 and a start").await;
}
