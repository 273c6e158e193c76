#![allow(clippy::unwrap_used)]
//! Relay throughput on loopback: a sender blasts Relay datagrams through one beacon to a
//! receiver, against a baseline of the same sockets sending directly, measured in the same
//! run. Prints delivered packets/s and Mbit/s (UDP payload) and the ratio.
//!
//! `cargo bench -p pilot-beacon --bench relay` (about 15 s).

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ed25519_dalek::SigningKey;
use pilot_beacon::{Config, Server, StaticAuthority};
use tunnel::wire::beacon::{signed_discover, BeaconMessage};

const SENDER: u32 = 1;
const RECEIVER: u32 = 2;
const WARMUP: Duration = Duration::from_millis(300);
const MEASURE: Duration = Duration::from_secs(2);
const SIZES: [usize; 2] = [1400, 64];

fn key(node: u32) -> SigningKey {
    SigningKey::from_bytes(&[node as u8; 32])
}

fn socket() -> UdpSocket {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
    let _ = s.set_recv_buffer_size(8 << 20);
    let _ = s.set_send_buffer_size(8 << 20);
    s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    let s: UdpSocket = s.into();
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    s
}

#[derive(Default)]
struct Count {
    packets: AtomicU64,
    bytes: AtomicU64,
}

struct Measured {
    sent_pps: f64,
    pps: f64,
    mbit: f64,
}

/// Blasts `datagram` at `to` from `tx` while `rx` counts what arrives.
fn blast(tx: &UdpSocket, rx: &UdpSocket, to: SocketAddr, datagram: &[u8]) -> Measured {
    let stop = Arc::new(AtomicBool::new(false));
    let got = Arc::new(Count::default());
    let sent = Arc::new(AtomicU64::new(0));
    thread::scope(|s| {
        s.spawn(|| {
            let mut buf = vec![0u8; 65_536];
            while !stop.load(Relaxed) {
                if let Ok(n) = rx.recv(&mut buf) {
                    got.packets.fetch_add(1, Relaxed);
                    got.bytes.fetch_add(n as u64, Relaxed);
                }
            }
        });
        s.spawn(|| {
            let mut n = 0u64;
            while !stop.load(Relaxed) {
                for _ in 0..64 {
                    if tx.send_to(datagram, to).is_ok() {
                        n += 1;
                    }
                }
                sent.store(n, Relaxed);
            }
        });
        thread::sleep(WARMUP);
        let (p0, b0, s0, t0) = (
            got.packets.load(Relaxed),
            got.bytes.load(Relaxed),
            sent.load(Relaxed),
            Instant::now(),
        );
        thread::sleep(MEASURE);
        let (p1, b1, s1, dt) = (
            got.packets.load(Relaxed),
            got.bytes.load(Relaxed),
            sent.load(Relaxed),
            t0.elapsed().as_secs_f64(),
        );
        stop.store(true, Relaxed);
        Measured {
            sent_pps: (s1 - s0) as f64 / dt,
            pps: (p1 - p0) as f64 / dt,
            mbit: (b1 - b0) as f64 * 8.0 / dt / 1e6,
        }
    })
}

fn drain(s: &UdpSocket) {
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut buf = [0u8; 65_536];
    while s.recv(&mut buf).is_ok() {}
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let auth = Arc::new(StaticAuthority::new());
    auth.add_node(SENDER, key(SENDER).verifying_key().to_bytes())
        .add_node(RECEIVER, key(RECEIVER).verifying_key().to_bytes())
        .allow(SENDER, RECEIVER);
    let config = Config {
        relay_bytes_per_sec: 0,
        relay_packets_per_sec: 0,
        ..Config::default()
    };
    let (server, beacon) = rt.block_on(async {
        let socket = pilot_beacon::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let server = Server::new(socket, auth, config);
        let addr = server.local_addr().unwrap();
        (server, addr)
    });
    let stats = server.stats();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = rt.spawn(server.run(async move {
        let _ = stop_rx.await;
    }));

    let (tx, rx) = (socket(), socket());
    let unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let mut buf = [0u8; 64];
    for (s, node) in [(&tx, SENDER), (&rx, RECEIVER)] {
        s.send_to(&signed_discover(&key(node), node, unix_ms), beacon)
            .unwrap();
        s.recv(&mut buf).expect("no DiscoverReply");
    }

    println!("relay benchmark: loopback, one beacon task, {MEASURE:?} per case");
    println!(
        "{:>6}  {:<7} {:>12} {:>15} {:>10}",
        "bytes", "path", "offered/s", "delivered pkt/s", "Mbit/s"
    );
    for size in SIZES {
        let direct = blast(&tx, &rx, rx.local_addr().unwrap(), &vec![0xAB; size]);
        drain(&rx);
        let relay = BeaconMessage::Relay {
            sender: SENDER,
            dest: RECEIVER,
            payload: &vec![0xAB; size - 9],
        };
        let mut dg = vec![0u8; relay.buffer_len()];
        relay.emit(&mut dg).unwrap();
        let before = stats.snapshot();
        let via = blast(&tx, &rx, beacon, &dg);
        drain(&rx);
        let after = stats.snapshot();
        for (path, m) in [("direct", &direct), ("beacon", &via)] {
            println!(
                "{size:>6}  {path:<7} {:>12.0} {:>15.0} {:>10.1}",
                m.sent_pps, m.pps, m.mbit
            );
        }
        println!(
            "{size:>6}  ratio   beacon/direct = {:.2} (packets/s); beacon relayed {} and dropped {} in this case",
            via.pps / direct.pps,
            after.relayed_packets - before.relayed_packets,
            after.dropped_total() - before.dropped_total(),
        );
    }
    let _ = stop_tx.send(());
    rt.block_on(task).unwrap().unwrap();
}
