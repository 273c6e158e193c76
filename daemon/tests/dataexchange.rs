#![allow(clippy::unwrap_used)]
//! The data exchange service (port 1001) between two whole nodes: messages through the
//! driver library, files through in-process streams, hostile names, limits and cut
//! transfers.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pilot_driver::services::dataexchange::{read_frame, send_file, send_message, SendError};
use pilot_driver::Driver;
use pilotd::dataexchange::{
    self, list_inbox, list_received, DataExchange, DataExchangeConfig, DATA_PORT,
};
use pilotd::events::{Event, Events};
use pilotd::local::dial;
use pilotd::node::Node;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::sync::mpsc;
use tunnel::services::dataexchange::{encode_file_prefix, FrameType};
use tunnel::{Addr, SocketAddr as PilotAddr};

use crate::support;
use support::registry;

/// Two registered nodes, A and B, with the data exchange service on B.
struct Pair {
    _dir: tempfile::TempDir,
    a: Node,
    b: Node,
    a_home: PathBuf,
    b_home: PathBuf,
    na: u32,
    nb: u32,
    dx: DataExchange,
    events: mpsc::Receiver<Event>,
}

impl Pair {
    async fn start(tune: impl FnOnce(&mut DataExchangeConfig)) -> Pair {
        let reg = registry().await;
        let dir = tempfile::tempdir().unwrap();
        let (a_home, b_home) = (dir.path().join("a"), dir.path().join("b"));
        let a = support::bare_node(&reg, &a_home).await;
        let b = support::bare_node(&reg, &b_home).await;
        let na = a.daemon.registered(Duration::from_secs(10)).await.unwrap();
        let nb = b.daemon.registered(Duration::from_secs(10)).await.unwrap();
        let mut cfg = DataExchangeConfig::new(&b_home);
        tune(&mut cfg);
        let (events, rx) = Events::channel();
        let dx = dataexchange::start(&b.daemon.engine, cfg, events)
            .await
            .unwrap();
        Pair {
            _dir: dir,
            a,
            b,
            a_home,
            b_home,
            na,
            nb,
            dx,
            events: rx,
        }
    }

    fn dst(&self) -> PilotAddr {
        PilotAddr::new(Addr::new(0, self.nb), DATA_PORT)
    }

    async fn stream(&self) -> pilotd::local::LocalStream {
        dial(&self.a.daemon.engine, self.dst()).await.unwrap()
    }

    fn received(&self) -> PathBuf {
        self.b_home.join("received")
    }

    /// Every entry of B's `received/`, temporary files included.
    fn received_entries(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.received())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    async fn shutdown(self) {
        self.dx.stop();
        self.a.shutdown().await;
        self.b.shutdown().await;
    }
}

/// A blocking `std::fs::File` as an `AsyncRead` (tokio's `fs` feature is not enabled);
/// reads come from the page cache, so blocking is brief.
struct BlockingFile(std::fs::File);

impl AsyncRead for BlockingFile {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = self.0.read(buf.initialize_unfilled())?;
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

fn sha256_file(path: &Path) -> ([u8; 32], u64) {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).unwrap();
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    (h.finalize().into(), n)
}

/// Writes `size` pseudo-random bytes to `path`.
fn make_file(path: &Path, size: usize) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for chunk in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        let k = left.min(buf.len());
        f.write_all(&buf[..k]).unwrap();
        left -= k;
    }
    f.flush().unwrap();
}

/// Waits until `cond` holds, for at most 10 s.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..100 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_and_files_land_safely_on_the_peer() {
    let mut p = Pair::start(|_| {}).await;

    // Messages through A's IPC socket, as pilotctl sends them.
    let driver = Driver::connect(p.a_home.join("pilotd.sock")).await.unwrap();
    let mut s = driver.dial(p.dst()).await.unwrap();
    let ack = send_message(&mut s, FrameType::Text, b"hello from A")
        .await
        .unwrap();
    assert_eq!(ack, "ACK TEXT 12 bytes");
    let ack = send_message(&mut s, FrameType::Json, br#"{"k":[1,2]}"#)
        .await
        .unwrap();
    assert_eq!(ack, "ACK JSON 11 bytes");
    s.shutdown().await.unwrap();
    drop(s);

    let msgs = list_inbox(&p.b_home).unwrap();
    assert_eq!(msgs.len(), 2);
    assert_eq!(
        (msgs[0].kind.as_str(), msgs[0].data.as_str()),
        ("TEXT", "hello from A")
    );
    assert_eq!(
        (msgs[1].kind.as_str(), msgs[1].data.as_str()),
        ("JSON", r#"{"k":[1,2]}"#)
    );
    let from = Addr::new(0, p.na).to_string();
    assert!(msgs.iter().all(|m| m.from == from), "{msgs:?}");
    assert!(msgs[0].id != msgs[1].id);
    assert!(p
        .b_home
        .join("inbox")
        .join(format!("{}.json", msgs[0].id))
        .is_file());
    for want in ["TEXT", "JSON"] {
        let ev = p.events.recv().await.unwrap();
        assert_eq!(ev.name, "message.received");
        let d = ev.data.unwrap();
        assert_eq!(
            (d["type"].as_str(), d["from"].as_str()),
            (Some(want), Some(&*from))
        );
    }

    // Hostile names stay inside received/, neutralized.
    let mut s = p.stream().await;
    for (name, body) in [
        ("../../etc/passwd", &b"root::0:0"[..]),
        ("..", b"dots"),
        ("a\0b\nc.txt", b"nul"),
        ("/abs/../../x/.profile", b"profile"),
    ] {
        let ack = send_file(&mut s, name, body, body.len() as u64, |_| {})
            .await
            .unwrap();
        assert!(ack.starts_with("ACK FILE "), "{ack}");
    }
    // The same name again gets a suffix and overwrites nothing.
    send_file(&mut s, "passwd", &b"second"[..], 6, |_| {})
        .await
        .unwrap();
    drop(s);
    assert_eq!(
        p.received_entries(),
        ["abc.txt", "file", "passwd", "passwd-1", "profile"]
    );
    let rd = p.received();
    assert_eq!(std::fs::read(rd.join("passwd")).unwrap(), b"root::0:0");
    assert_eq!(std::fs::read(rd.join("passwd-1")).unwrap(), b"second");
    assert_eq!(std::fs::read(rd.join("file")).unwrap(), b"dots");
    assert!(!p.b_home.join("etc").exists() && !p._dir.path().join("etc").exists());
    let listed = list_received(&p.b_home).unwrap();
    assert_eq!(listed.len(), 5);
    assert!(listed
        .iter()
        .all(|f| Path::new(&f.path).parent() == Some(rd.as_path())));
    let ev = p.events.recv().await.unwrap();
    assert_eq!(ev.name, "file.received");
    let d = ev.data.unwrap();
    assert_eq!(
        (d["filename"].as_str(), d["size"].as_u64()),
        (Some("passwd"), Some(9))
    );

    // A length over 16 MiB is refused at once (nothing is read or allocated for it: the
    // payload never comes) and the connection closed; the service serves on.
    let mut s = p.stream().await;
    s.write_all(&[0, 0, 0, 1, 0xFF, 0xFF, 0xFF, 0xFF])
        .await
        .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(10), read_frame(&mut s, 1 << 16))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let text = String::from_utf8(reply.payload).unwrap();
    assert!(text.starts_with("ERR TEXT frame too large"), "{text}");
    drop(s);
    let mut s = p.stream().await;
    assert_eq!(
        send_message(&mut s, FrameType::Text, b"still here")
            .await
            .unwrap(),
        "ACK TEXT 10 bytes"
    );
    assert_eq!(list_inbox(&p.b_home).unwrap().len(), 3);
    assert!(
        p.dx.stats()
            .bad_frames
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mib_file_arrives_intact() {
    let p = Pair::start(|_| {}).await;
    let src = p.a_home.join("big.bin");
    const SIZE: usize = 100 << 20;
    make_file(&src, SIZE);
    let (want, _) = sha256_file(&src);

    let mut s = p.stream().await;
    let mut last = 0;
    let mut calls = 0u32;
    let ack = tokio::time::timeout(
        Duration::from_secs(240),
        send_file(
            &mut s,
            "big.bin",
            BlockingFile(std::fs::File::open(&src).unwrap()),
            SIZE as u64,
            |n| {
                assert!(n > last);
                last = n;
                calls += 1;
            },
        ),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(ack, format!("ACK FILE {SIZE} bytes"));
    assert_eq!(last, SIZE as u64);
    assert!(calls > 1);
    drop(s);
    assert_eq!(p.received_entries(), ["big.bin"]);
    let (got, n) = sha256_file(&p.received().join("big.bin"));
    assert_eq!(n, SIZE as u64);
    assert_eq!(got, want, "SHA-256 differs");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_over_the_limit_and_cut_transfers_leave_nothing() {
    let p = Pair::start(|c| c.max_file_size = 1 << 20).await;

    // Over the limit in one v1 frame: refused, the connection stays usable.
    let mut s = p.stream().await;
    let big = vec![7u8; 2 << 20];
    let e = send_file(&mut s, "too-big.bin", &big[..], big.len() as u64, |_| {})
        .await
        .unwrap_err();
    assert!(
        matches!(&e, SendError::Refused(t) if t.starts_with("ERR FILE file too large")),
        "{e}"
    );
    let ack = send_file(&mut s, "ok.bin", &big[..1000], 1000, |_| {})
        .await
        .unwrap();
    assert_eq!(ack, format!("ACK FILE {} bytes", 2 + 6 + 1000));
    drop(s);

    // Over the limit as a stream (over 16 MiB): refused before the bytes go out.
    let mut s = p.stream().await;
    let e = tokio::time::timeout(
        Duration::from_secs(30),
        send_file(&mut s, "huge.bin", tokio::io::repeat(1), 40 << 20, |_| {}),
    )
    .await
    .unwrap()
    .unwrap_err();
    assert!(
        matches!(&e, SendError::Refused(t) if t.starts_with("ERR FILE file too large")),
        "{e}"
    );
    drop(s);
    assert_eq!(p.received_entries(), ["ok.bin"]);

    // A transfer cut short by the sender leaves no partial file.
    let mut s = p.stream().await;
    s.write_all(&encode_file_prefix(b"cut.bin", 900_000).unwrap())
        .await
        .unwrap();
    s.write_all(&vec![3u8; 400_000]).await.unwrap();
    // Wait until the receiver holds a partial (temporary) file, then cut the connection.
    eventually("a partial file", || p.received_entries().len() == 2).await;
    assert!(p.received_entries().iter().any(|n| n.starts_with('.')));
    drop(s);
    eventually("the partial file to go", || {
        p.received_entries() == ["ok.bin"]
    })
    .await;
    let stats = p.dx.stats();
    assert_eq!(stats.refused.load(std::sync::atomic::Ordering::Relaxed), 2);
    p.shutdown().await;
}
