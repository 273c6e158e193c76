//! Encrypted stream throughput between two daemons on loopback (registry in process, no
//! beacon). Prints MB/s for one stream one way, the same bytes pushed through a plain loopback
//! TCP socket in the same run as a baseline, and the ratio: through the engine API with UDP
//! segmentation offload (GSO/GRO) on and off, and through the driver library (the IPC socket
//! an agent uses, `PilotStream`) with offload on. The engine path runs once more with
//! `PILOT_BENCH_IDLE` (default 10,000) idle connections open between the two daemons, and prints
//! its ratio to the run without them.
//!
//! `cargo bench -p pilotd --bench throughput` (`PILOT_BENCH_MB` sets the size, default 256;
//! `PILOT_BENCH_ONLY=driver` or `=engine` runs one path; `PILOT_BENCH_IDLE=0` skips the idle
//! run).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pilot_driver::Driver;
use pilot_registry::store::RedbStore;
use pilot_registry::{Config as RegistryConfig, Registry};
use pilotd::config::Cli;
use pilotd::engine::{AppEvent, Cmd};
use pilotd::node::{Daemon, Node};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, Semaphore};
use tunnel::{Addr, SocketAddr as PilotAddr};

/// Idle connections the connection limits must leave room for, beside the measured stream.
const IDLE_HEADROOM: usize = 64;

fn cli(registry: &str, home: &std::path::Path, offload: bool, idle: usize) -> Cli {
    let limits = (idle > 0).then_some(idle + IDLE_HEADROOM);
    Cli {
        max_conns_per_port: limits,
        max_conns_total: limits,
        // The idle connections are opened as fast as the two daemons can: no SYN limit.
        syn_rate_limit: (idle > 0).then_some(0),
        syn_rate_limit_per_peer: (idle > 0).then_some(0),
        udp_offload: Some(offload),
        registry: vec![registry.into()],
        beacon: Some(String::new()),
        listen: Some("127.0.0.1:0".into()),
        home: Some(home.into()),
        public: Some(true),
        log_level: Some("warn".into()),
        socket: Some(home.join("pilotd.sock")),
        ..Cli::default()
    }
}

async fn daemon(
    registry: &str,
    home: &std::path::Path,
    offload: bool,
    idle: usize,
) -> Option<Daemon> {
    Daemon::start(&cli(registry, home, offload, idle).resolve().ok()?)
        .await
        .ok()
}

/// Opens `n` connections from `a` to `b`'s port 9001 and leaves them idle; the receivers of
/// their events are returned so that the connections stay open.
async fn open_idle(
    a: &Daemon,
    b: &Daemon,
    nb: u32,
    n: usize,
) -> Option<Vec<mpsc::Receiver<AppEvent>>> {
    let (tx, mut rx) = mpsc::channel(1024);
    b.engine.listen(9001, tx).await.ok()?;
    // B keeps every accepted connection's credit, and counts them.
    let (count_tx, mut count_rx) = tokio::sync::watch::channel(0usize);
    tokio::spawn(async move {
        let mut credits = Vec::new();
        while let Some(ev) = rx.recv().await {
            if let AppEvent::Accepted { credit, .. } = ev {
                credits.push(credit);
                let _ = count_tx.send(credits.len());
            }
        }
    });
    let mut keep = Vec::with_capacity(n);
    let dst = PilotAddr::new(Addr::new(0, nb), 9001);
    let mut pending = tokio::task::JoinSet::new();
    let mut opened = 0;
    while opened < n {
        while pending.len() < 256 && opened + pending.len() < n {
            let engine = a.engine.clone();
            pending.spawn(async move {
                let (etx, erx) = mpsc::channel(4);
                engine.dial(dst, etx).await.ok().map(|_| erx)
            });
        }
        keep.push(pending.join_next().await?.ok()??);
        opened += 1;
    }
    tokio::time::timeout(Duration::from_secs(60), count_rx.wait_for(|k| *k >= n))
        .await
        .ok()?
        .ok()?;
    Some(keep)
}

fn rusage_cpu() -> f64 {
    let r = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF);
    match r {
        Ok(r) => {
            let u = r.user_time();
            let s = r.system_time();
            (u.tv_sec() + s.tv_sec()) as f64 + (u.tv_usec() + s.tv_usec()) as f64 / 1e6
        }
        Err(_) => 0.0,
    }
}

async fn registry() -> Option<String> {
    let reg = Registry::open(
        Box::new(RedbStore::in_memory().ok()?),
        RegistryConfig {
            register_per_minute: 0,
            requests_per_ip: 0,
            requests_per_node: 0,
            ..RegistryConfig::default()
        },
    )
    .ok()?;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.ok()?;
    let raddr = l.local_addr().ok()?.to_string();
    tokio::spawn(reg.serve(l, None, std::future::pending()));
    Some(raddr)
}

async fn pilot(total: usize, offload: bool, idle: usize) -> Option<(f64, f64)> {
    let raddr = registry().await?;
    let dir = tempfile::tempdir().ok()?;
    let a = daemon(&raddr, &dir.path().join("a"), offload, idle).await?;
    let b = daemon(&raddr, &dir.path().join("b"), offload, idle).await?;
    a.registered(Duration::from_secs(10)).await?;
    let nb = b.registered(Duration::from_secs(10)).await?;
    let _idle = if idle > 0 {
        let t = Instant::now();
        let keep = open_idle(&a, &b, nb, idle).await?;
        eprintln!(
            "{idle} idle connections open in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        Some(keep)
    } else {
        None
    };

    // B counts bytes and reports when the stream ends.
    let (tx, mut rx) = mpsc::channel(256);
    b.engine.listen(9000, tx).await.ok()?;
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut n = 0usize;
        let mut credits: HashMap<u32, Arc<Semaphore>> = HashMap::new();
        while let Some(ev) = rx.recv().await {
            match ev {
                AppEvent::Accepted { conn, credit, .. } => {
                    credits.insert(conn, credit);
                }
                AppEvent::Data { data, .. } => n += data.len(),
                AppEvent::Closed { .. } => break,
                AppEvent::Datagram { .. } | AppEvent::Incoming { .. } => {}
            }
        }
        let _ = done_tx.send(n);
    });
    let (etx, _erx) = mpsc::channel(256);
    let (conn, credit) = a
        .engine
        .dial(PilotAddr::new(Addr::new(0, nb), 9000), etx)
        .await
        .ok()?;
    let chunk = vec![0x5au8; 64 * 1024];
    let cpu0 = rusage_cpu();
    let t = Instant::now();
    let mut sent = 0;
    while sent < total {
        a.engine.write(conn, &credit, &chunk).await.ok()?;
        sent += chunk.len();
    }
    a.engine.send(Cmd::Close { conn }).await.ok()?;
    let got = done_rx.await.ok()?;
    let secs = t.elapsed().as_secs_f64();
    let cpu = rusage_cpu() - cpu0;
    if got != sent {
        eprintln!("received {got} of {sent} bytes");
        return None;
    }
    a.shutdown().await;
    b.shutdown().await;
    Some((sent as f64 / secs / 1e6, cpu / (sent as f64 / 1e9)))
}

/// One stream through the driver library: agent A's `PilotStream` writes into its daemon's IPC
/// socket, agent B reads from its daemon's.
async fn driver(total: usize) -> Option<(f64, f64)> {
    let raddr = registry().await?;
    let dir = tempfile::tempdir().ok()?;
    let start = |name: &str| {
        let c = cli(&raddr, &dir.path().join(name), true, 0).resolve();
        async move { Node::start(&c.ok()?).await.ok() }
    };
    let a = start("a").await?;
    let b = start("b").await?;
    a.daemon.registered(Duration::from_secs(10)).await?;
    let nb = b.daemon.registered(Duration::from_secs(10)).await?;
    let da = Driver::connect(a.ipc.path()).await.ok()?;
    let db = Driver::connect(b.ipc.path()).await.ok()?;
    let mut l = db.listen(9000).await.ok()?;
    let reader = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.ok()?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut n = 0usize;
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return Some(n),
                Ok(k) => n += k,
            }
        }
    });
    let mut s = da.dial(PilotAddr::new(Addr::new(0, nb), 9000)).await.ok()?;
    let chunk = vec![0x5au8; 256 * 1024];
    let cpu0 = rusage_cpu();
    let t = Instant::now();
    let mut sent = 0;
    while sent < total {
        s.write_all(&chunk).await.ok()?;
        sent += chunk.len();
    }
    s.shutdown().await.ok()?;
    let got = reader.await.ok()??;
    let secs = t.elapsed().as_secs_f64();
    let cpu = rusage_cpu() - cpu0;
    if got != sent {
        eprintln!("received {got} of {sent} bytes");
        return None;
    }
    drop(s);
    a.shutdown().await;
    b.shutdown().await;
    Some((sent as f64 / secs / 1e6, cpu / (sent as f64 / 1e9)))
}

async fn tcp(total: usize) -> Option<f64> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.ok()?;
    let addr = l.local_addr().ok()?;
    let server = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.ok()?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut n = 0usize;
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return Some(n),
                Ok(k) => n += k,
            }
        }
    });
    let mut c = tokio::net::TcpStream::connect(addr).await.ok()?;
    let chunk = vec![0x5au8; 64 * 1024];
    let t = Instant::now();
    let mut sent = 0;
    while sent < total {
        c.write_all(&chunk).await.ok()?;
        sent += chunk.len();
    }
    drop(c);
    let got = server.await.ok()??;
    (got == sent).then(|| sent as f64 / t.elapsed().as_secs_f64() / 1e6)
}

fn main() {
    let mb: usize = std::env::var("PILOT_BENCH_MB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    let total = mb << 20;
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            std::process::exit(1);
        }
    };
    let only = std::env::var("PILOT_BENCH_ONLY").unwrap_or_default();
    let idle: usize = std::env::var("PILOT_BENCH_IDLE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    rt.block_on(async {
        let mut results = Vec::new();
        let mut with_idle = None;
        if only != "driver" {
            for offload in [true, false] {
                let Some(r) = pilot(total, offload, 0).await else {
                    eprintln!("pilot transfer failed (offload {offload})");
                    std::process::exit(1);
                };
                results.push((offload, r));
            }
            if idle > 0 {
                let Some(r) = pilot(total, true, idle).await else {
                    eprintln!("pilot transfer with {idle} idle connections failed");
                    std::process::exit(1);
                };
                with_idle = Some(r);
            }
        }
        let mut through_driver = None;
        if only != "engine" {
            let Some(r) = driver(total).await else {
                eprintln!("pilot transfer through the driver failed");
                std::process::exit(1);
            };
            through_driver = Some(r);
        }
        let Some(base) = tcp(total).await else {
            eprintln!("tcp baseline failed");
            std::process::exit(1);
        };
        for &(offload, (mbps, cpu_per_gb)) in &results {
            let mode = if offload { "GSO/GRO on " } else { "GSO/GRO off" };
            println!("pilot encrypted stream, {mb} MiB one way, {mode}: {mbps:.1} MB/s, {cpu_per_gb:.2} CPU s/GB (both daemons, one process), ratio to TCP {:.3}", mbps / base);
        }
        if let (Some((mbps, cpu_per_gb)), Some((_, (alone, _)))) = (with_idle, results.first()) {
            println!("pilot encrypted stream, {mb} MiB one way, GSO/GRO on, {idle} idle connections open: {mbps:.1} MB/s, {cpu_per_gb:.2} CPU s/GB, ratio to the same stream without them {:.3}, ratio to TCP {:.3}", mbps / alone, mbps / base);
        }
        if let Some((mbps, cpu_per_gb)) = through_driver {
            println!("pilot encrypted stream, {mb} MiB one way, through the driver (IPC socket, PilotStream), GSO/GRO on: {mbps:.1} MB/s, {cpu_per_gb:.2} CPU s/GB (both daemons and agents, one process), ratio to TCP {:.3}", mbps / base);
        }
        println!("loopback TCP baseline, same bytes: {base:.1} MB/s");
    });
}
