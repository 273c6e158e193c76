//! `pilot-registry-load`: a load generator for the Pilot registry.
//!
//! Two phases over a pool of TCP connections, each carrying many simulated nodes:
//!
//! 1. **Registration**: N nodes register with fresh Ed25519 keys (v1 form, no proof) as fast
//!    as the registry acknowledges them. A registration is acknowledged only after the store
//!    committed it, so the rate is a durable-write rate.
//! 2. **Steady state**: every node heartbeats once per interval (v1 fixed-string signature),
//!    spread uniformly, while lookups of random registered nodes run at a fixed rate. The
//!    schedule is open-loop: each request has a scheduled send time and its latency is measured
//!    from that time, so a stalled registry (or a full pipeline) shows up as latency instead of
//!    silently lowering the offered load (no coordinated omission).
//!
//! Requests are pipelined within a connection (the registry answers a connection's requests in
//! order), at most `--pipeline` in flight per connection.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use ed25519_dalek::SigningKey;
use pilot_registry::auth::b64;
use pilot_registry::proto::{encode_frame, FrameDecoder};
use pilot_registry_client::sign_v1;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Semaphore, TryAcquireError};

/// The issue's targets (stated for 100,000 nodes heartbeating every 30 s on 2 cores).
const TARGET_REGISTRATIONS_PER_SEC: f64 = 5000.0;
const TARGET_HEARTBEAT_P99_MS: f64 = 20.0;
const TARGET_BYTES_PER_NODE: f64 = 1024.0;
/// Linux reports process CPU time in these ticks per second (USER_HZ, 100 on every common
/// configuration).
const USER_HZ: f64 = 100.0;
/// Requests due within this long are written now: tokio's timer has millisecond granularity
/// and fires late rather than early, so waking this much ahead keeps timer lag out of the
/// measured latency. An early write is measured from when it was written, never from its
/// (later) scheduled time, so this cannot make latency look better than it is.
const EARLY: Duration = Duration::from_millis(1);

/// Load generator for the Pilot registry: registers N nodes, then has them heartbeat at a
/// fixed interval while lookups run, and reports rates, latency percentiles and the registry's
/// memory.
#[derive(Parser, Debug)]
#[command(
    name = "pilot-registry-load",
    version,
    about,
    long_about = "Load generator for the Pilot registry.\n\n\
Phase 1 registers --nodes nodes (fresh Ed25519 keys, v1 register without proof) as fast as \
the registry acknowledges them; every registration is acknowledged only after a durable \
commit, so the rate printed is a durable-write rate.\n\n\
Phase 2 lasts --duration: every registered node heartbeats once per --heartbeat-interval \
(spread uniformly, v1 fixed-string signature), and lookups of random registered nodes run at \
--lookups-per-sec. The schedule is open-loop: latency is measured from each request's \
scheduled send time, so registry stalls are not hidden by the generator slowing down.\n\n\
By default the generator starts its own pilot-registry (found next to this executable, or \
--registry-bin) on a free loopback port with a fresh durable store in a temporary directory \
and every rate limit disabled, and stops it at the end. With --registry it loads a registry \
that is already running instead (its rate limits then apply; give --registry-pid to report \
its memory).",
    after_help = "Exit status: 0 when every request succeeded; 1 when a request failed, the \
registry died or the run could not start; 3 with --enforce-targets when a target was missed.\n\n\
Quick check: pilot-registry-load --nodes 2000 --duration 5"
)]
struct Cli {
    /// Load an already running registry at HOST:PORT instead of starting one.
    #[arg(long, value_name = "HOST:PORT")]
    registry: Option<String>,
    /// Process ID of the registry given with --registry, to report its memory and CPU time.
    #[arg(long, value_name = "PID", requires = "registry")]
    registry_pid: Option<u32>,
    /// The pilot-registry binary to start (default: the one next to this executable).
    #[arg(long, value_name = "PATH", conflicts_with = "registry")]
    registry_bin: Option<PathBuf>,
    /// Store file of the started registry (default: a fresh file in a temporary directory,
    /// removed at exit). Its file system decides what a durable commit costs.
    #[arg(long, value_name = "PATH", conflicts_with = "registry")]
    store: Option<PathBuf>,
    /// Extra argument for the started registry; repeat for several (e.g.
    /// --registry-arg=--http).
    #[arg(
        long = "registry-arg",
        value_name = "ARG",
        allow_hyphen_values = true,
        conflicts_with = "registry"
    )]
    registry_args: Vec<String>,
    /// Keep the temporary directory of the started registry (store and log) and print its
    /// path.
    #[arg(long, conflicts_with = "registry")]
    keep: bool,
    /// Simulated nodes.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(1..))]
    nodes: u32,
    /// TCP connections; node i uses connection i mod C in both phases.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=65_535))]
    connections: u32,
    /// Requests in flight per connection (written before their replies are read).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pipeline: u32,
    /// Time between two heartbeats of the same node (seconds, or with a unit: 500ms, 30s, 2m).
    #[arg(long, default_value = "30", value_parser = parse_duration)]
    heartbeat_interval: Duration,
    /// Length of the heartbeat phase (seconds, or with a unit).
    #[arg(long, default_value = "60", value_parser = parse_duration)]
    duration: Duration,
    /// Lookups per second during the heartbeat phase, on random registered nodes (0: none).
    #[arg(long, default_value_t = 500.0, value_parser = parse_rate)]
    lookups_per_sec: f64,
    /// Give up waiting for a reply after this long (seconds, or with a unit).
    #[arg(long, default_value = "30", value_parser = parse_duration)]
    timeout: Duration,
    /// Seed from which node keys are derived (default: random, so the keys are new even to a
    /// long-lived registry).
    #[arg(long)]
    seed: Option<u64>,
    /// Runtime threads of the generator (1: a single-threaded runtime, leaving the other cores
    /// to the registry).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    threads: u32,
    /// Also print per-second latency of the heartbeat phase.
    #[arg(long)]
    timeline: bool,
    /// Print one JSON summary object on stdout; the human-readable lines go to stderr.
    #[arg(long)]
    json: bool,
    /// Exit with status 3 when a target (registrations/s, heartbeat p99, bytes per node) is
    /// missed.
    #[arg(long)]
    enforce_targets: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, unit) = if let Some(n) = t.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else {
        (t, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 30, 30s, 500ms, 2m)"))?;
    if !v.is_finite() || v <= 0.0 {
        return Err(format!("{s:?}: give a positive duration"));
    }
    Duration::try_from_secs_f64(v * unit).map_err(|e| format!("{s:?}: {e}"))
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("{s:?}: give a rate of 0 or more"));
    }
    Ok(v)
}

/// Where the human-readable report goes (stderr when stdout carries the JSON summary).
#[derive(Debug, Clone, Copy)]
struct Out {
    stderr: bool,
}

impl Out {
    fn line(&self, a: fmt::Arguments<'_>) {
        if self.stderr {
            eprintln!("{a}");
        } else {
            println!("{a}");
        }
    }
}

macro_rules! say {
    ($o:expr, $($t:tt)*) => { $o.line(format_args!($($t)*)) };
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = if cli.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cli.threads as usize)
            .enable_all()
            .build()
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pilot-registry-load: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pilot-registry-load: {e}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The registry under test.

/// A registry this generator started; killed (and its temporary directory removed) on drop,
/// including on early errors.
struct Spawned {
    child: Child,
    dir: PathBuf,
    keep: bool,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Spawned {
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("registry.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Why the registry is no longer running, if it is not.
    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(format!(
                "the registry exited ({status}); its log ends with:\n{}",
                self.log_tail()
            )),
            Ok(None) => None,
            Err(e) => Some(format!("waiting for the registry: {e}")),
        }
    }
}

struct Target {
    addr: SocketAddr,
    pid: Option<u32>,
    spawned: Option<Spawned>,
    store: Option<PathBuf>,
    description: String,
}

fn resolve(addr: &str) -> Result<SocketAddr, String> {
    addr.to_socket_addrs()
        .map_err(|e| format!("--registry {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("--registry {addr}: no address"))
}

async fn start_registry(cli: &Cli) -> Result<Target, String> {
    let bin = match &cli.registry_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()
            .map_err(|e| format!("locating this executable: {e}"))?
            .parent()
            .map(|d| d.join("pilot-registry"))
            .ok_or("this executable has no directory")?,
    };
    if !bin.is_file() {
        return Err(format!(
            "no registry binary at {}: build it (cargo build --release -p pilot-registry --bins), \
             pass --registry-bin PATH, or load a running one with --registry HOST:PORT",
            bin.display()
        ));
    }
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "pilot-registry-load-{}-{nanos:09}",
        std::process::id()
    ));
    std::fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let store = cli
        .store
        .clone()
        .unwrap_or_else(|| dir.join("registry.redb"));
    let log_path = dir.join("registry.log");
    let log = match std::fs::File::create(&log_path) {
        Ok(f) => f,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(format!("{}: {e}", log_path.display()));
        }
    };
    // A free loopback port: bind port 0, note it, release it for the registry.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("finding a free port: {e}"))?;
    let child = Command::new(&bin)
        .arg("--addr")
        .arg(addr.to_string())
        .arg("--store")
        .arg(&store)
        .args(["--register-per-minute", "0"])
        .args(["--requests-per-ip", "0"])
        .args(["--requests-per-node", "0"])
        .args(["--log-level", "warn"])
        .args(&cli.registry_args)
        .env_remove("PILOT_REGISTRY_EPHEMERAL")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn();
    let child = match child {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(format!("starting {}: {e}", bin.display()));
        }
    };
    let pid = child.id();
    let mut spawned = Spawned {
        child,
        dir: dir.clone(),
        keep: cli.keep,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(why) = spawned.exited() {
            return Err(why);
        }
        if TcpStream::connect(addr).await.is_ok() {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the registry did not accept on {addr} within 30 s; its log ends with:\n{}",
                spawned.log_tail()
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let fs = fs_type(&store).unwrap_or_else(|| "unknown file system".into());
    Ok(Target {
        addr,
        pid: Some(pid),
        spawned: Some(spawned),
        description: format!(
            "started {} (pid {pid}) on {addr}, durable store {} ({fs}), rate limits off",
            bin.display(),
            store.display()
        ),
        store: Some(store),
    })
}

/// The type of the file system holding `path` (longest matching mount point in
/// /proc/self/mounts).
fn fs_type(path: &Path) -> Option<String> {
    let dir = path.parent()?.canonicalize().ok()?;
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, mp, ty) = (f.next()?, f.next()?, f.next()?);
            let mp = mp.replace("\\040", " ");
            dir.starts_with(&mp).then(|| (mp.len(), ty.to_owned()))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, ty)| ty)
}

/// A `/proc/PID/status` field in KiB (VmRSS, VmHWM).
fn proc_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find_map(|l| {
        l.strip_prefix(field)?
            .strip_prefix(':')?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

fn rss_bytes(pid: Option<u32>) -> Option<u64> {
    pid.and_then(|p| proc_kib(p, "VmRSS")).map(|k| k * 1024)
}

/// User plus system CPU seconds of a process (`self` or a PID).
fn cpu_secs(pid: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / USER_HZ)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

// ---------------------------------------------------------------------------------------------
// Keys, signatures and frames.

/// Runs `f` over `0..n` on every core; results in index order.
fn par_map<T: Send, F: Fn(usize) -> T + Sync>(n: usize, f: F) -> Vec<T> {
    let threads = std::thread::available_parallelism()
        .map(|t| t.get())
        .unwrap_or(1)
        .clamp(1, n.max(1));
    let chunk = n.div_ceil(threads);
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    (t * chunk..((t + 1) * chunk).min(n))
                        .map(f)
                        .collect::<Vec<T>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

/// Node `i`'s key: SHA-256 of the run seed and the index.
fn node_key(seed: u64, i: u32) -> SigningKey {
    let mut h = Sha256::new();
    h.update(b"pilot-registry-load");
    h.update(seed.to_le_bytes());
    h.update(i.to_le_bytes());
    SigningKey::from_bytes(&h.finalize().into())
}

fn frame(body: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 4);
    // Bodies here are a few hundred bytes at most, far below the frame limit.
    if encode_frame(body.as_bytes(), &mut out).is_err() {
        out.clear();
    }
    out
}

/// A small fast generator for picking lookup targets.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

// ---------------------------------------------------------------------------------------------
// Connections, pipelining and measurement.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Register = 0,
    Heartbeat = 1,
    Lookup = 2,
}

impl Kind {
    fn expected(self) -> &'static str {
        match self {
            Kind::Register => "register_ok",
            Kind::Heartbeat => "heartbeat_ok",
            Kind::Lookup => "lookup_ok",
        }
    }
}

/// A request written and not yet answered.
struct Pending {
    kind: Kind,
    /// Node index (register) or node ID (lookup, heartbeat).
    node: u32,
    /// When it was due (open loop); `None`: when it was written.
    sched: Option<Instant>,
    sent: Instant,
}

#[derive(Default)]
struct KindStats {
    sent: u64,
    ok: u64,
    errors: BTreeMap<String, u64>,
    /// Microseconds from the scheduled send time to the reply, successful requests only.
    lat_us: Vec<u32>,
    /// Microseconds from the write to the reply.
    svc_us: Vec<u32>,
    /// Milliseconds from the phase start to the scheduled send time (for the timeline).
    at_ms: Vec<u32>,
}

impl KindStats {
    fn error(&mut self, code: &str) {
        *self.errors.entry(code.to_owned()).or_default() += 1;
    }

    fn failed(&self) -> u64 {
        self.errors.values().sum()
    }

    fn merge(&mut self, o: KindStats) {
        self.sent += o.sent;
        self.ok += o.ok;
        for (k, v) in o.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.lat_us.extend(o.lat_us);
        self.svc_us.extend(o.svc_us);
        self.at_ms.extend(o.at_ms);
    }
}

#[derive(Default)]
struct PhaseOut {
    kinds: [KindStats; 3],
    /// (node index, node ID) of successful registrations.
    registered: Vec<(u32, u32)>,
    /// Connections that failed while writing, by reason.
    write_errors: BTreeMap<String, u64>,
}

impl PhaseOut {
    fn merge(&mut self, o: PhaseOut) {
        for (a, b) in self.kinds.iter_mut().zip(o.kinds) {
            a.merge(b);
        }
        self.registered.extend(o.registered);
        for (k, v) in o.write_errors {
            *self.write_errors.entry(k).or_default() += v;
        }
    }
}

struct Conn {
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    dec: FrameDecoder,
    buf: Vec<u8>,
}

async fn connect(addr: SocketAddr) -> Result<Conn, String> {
    let s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    s.set_nodelay(true)
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    let (rd, wr) = s.into_split();
    Ok(Conn {
        rd,
        wr,
        dec: FrameDecoder::new(),
        buf: vec![0; 64 * 1024],
    })
}

enum WriteStop {
    /// The reader gave up on the connection (it counts the failure).
    Stopped,
    Io(String),
}

/// The writing side of one connection: frames are batched until the pipeline is full or the
/// schedule has nothing due, then written with one call.
struct Pipe<'a> {
    wr: &'a mut OwnedWriteHalf,
    tx: mpsc::UnboundedSender<Pending>,
    sem: &'a Semaphore,
    batch: Vec<u8>,
    pend: Vec<Pending>,
    sent: [u64; 3],
}

impl Pipe<'_> {
    /// Waits for room in the pipeline, writing what is batched first if there is none.
    async fn slot(&mut self) -> Result<(), WriteStop> {
        match self.sem.try_acquire() {
            Ok(p) => {
                p.forget();
                return Ok(());
            }
            Err(TryAcquireError::Closed) => return Err(WriteStop::Stopped),
            Err(TryAcquireError::NoPermits) => {}
        }
        self.flush().await?;
        match self.sem.acquire().await {
            Ok(p) => {
                p.forget();
                Ok(())
            }
            Err(_) => Err(WriteStop::Stopped),
        }
    }

    fn push(&mut self, kind: Kind, node: u32, sched: Option<Instant>, framed: &[u8]) {
        self.batch.extend_from_slice(framed);
        self.pend.push(Pending {
            kind,
            node,
            sched,
            sent: Instant::now(),
        });
    }

    async fn flush(&mut self) -> Result<(), WriteStop> {
        if self.pend.is_empty() {
            return Ok(());
        }
        let now = Instant::now();
        for mut p in self.pend.drain(..) {
            p.sent = now;
            self.sent[p.kind as usize] += 1;
            // The reader learns of the request before its reply can arrive.
            let _ = self.tx.send(p);
        }
        let r = self.wr.write_all(&self.batch).await;
        self.batch.clear();
        r.map_err(|e| WriteStop::Io(format!("write: {}", e.kind())))
    }
}

/// Shared inputs of the phases.
struct Shared {
    nodes: u32,
    conns: u32,
    /// Base64 public key of each node index.
    public_keys: Vec<String>,
    /// The heartbeat frame of each node index that registered.
    heartbeats: Vec<Option<Box<[u8]>>>,
    /// Node IDs that registered (lookup targets).
    ids: Vec<u32>,
}

#[derive(Clone, Copy)]
enum Plan {
    Register,
    Steady {
        interval: Duration,
        t0: Instant,
        end: Instant,
        lookups_per_sec: f64,
        rng: u64,
    },
}

async fn write_plan(
    pipe: &mut Pipe<'_>,
    c: u32,
    shared: &Shared,
    plan: Plan,
) -> Result<(), WriteStop> {
    match plan {
        Plan::Register => {
            for i in (c..shared.nodes).step_by(shared.conns as usize) {
                pipe.slot().await?;
                let pk = &shared.public_keys[i as usize];
                let f = frame(&format!(
                    r#"{{"type":"register","listen_addr":"0.0.0.0:4000","public_key":"{pk}"}}"#
                ));
                pipe.push(Kind::Register, i, None, &f);
                if pipe.batch.len() >= 64 * 1024 {
                    pipe.flush().await?;
                }
            }
        }
        Plan::Steady {
            interval,
            t0,
            end,
            lookups_per_sec,
            rng,
        } => steady(pipe, c, shared, interval, t0, end, lookups_per_sec, rng).await?,
    }
    pipe.flush().await
}

/// The open-loop schedule of one connection: node i (i mod C = c) heartbeats at
/// t0 + interval * (r + i / N) for rounds r = 0, 1, ..., and lookup k at t0 + (c + k C) / L,
/// so the whole pool offers N / interval heartbeats and L lookups per second, evenly spread.
#[allow(clippy::too_many_arguments)]
async fn steady(
    pipe: &mut Pipe<'_>,
    c: u32,
    shared: &Shared,
    interval: Duration,
    t0: Instant,
    end: Instant,
    lookups_per_sec: f64,
    rng: u64,
) -> Result<(), WriteStop> {
    let mine: Vec<u32> = (c..shared.nodes)
        .step_by(shared.conns as usize)
        .filter(|&i| shared.heartbeats[i as usize].is_some())
        .collect();
    let n = f64::from(shared.nodes);
    let interval = interval.as_secs_f64();
    let hb_at = |j: usize, round: u64| {
        t0 + Duration::from_secs_f64(interval * (round as f64 + f64::from(mine[j]) / n))
    };
    let (mut j, mut round) = (0usize, 0u64);
    let mut next_hb = (!mine.is_empty()).then(|| hb_at(0, 0));
    let lookups = lookups_per_sec > 0.0 && !shared.ids.is_empty();
    let lk_at = |k: u64| {
        t0 + Duration::from_secs_f64(
            (f64::from(c) + k as f64 * f64::from(shared.conns)) / lookups_per_sec,
        )
    };
    let mut k = 0u64;
    let mut next_lk = lookups.then(|| lk_at(0));
    let mut rng = SplitMix(rng);
    let mut now = Instant::now();
    loop {
        let (t, heartbeat) = match (next_hb, next_lk) {
            (Some(h), Some(l)) if h <= l => (h, true),
            (_, Some(l)) => (l, false),
            (Some(h), None) => (h, true),
            (None, None) => break,
        };
        if t >= end {
            break;
        }
        if t > now + EARLY {
            pipe.flush().await?;
            now = Instant::now();
            if t > now + EARLY {
                tokio::time::sleep_until((t - EARLY).into()).await;
                now = Instant::now();
            }
        }
        pipe.slot().await?;
        if heartbeat {
            let i = mine[j] as usize;
            if let Some(f) = &shared.heartbeats[i] {
                pipe.push(Kind::Heartbeat, i as u32, Some(t), f);
            }
            j += 1;
            if j == mine.len() {
                j = 0;
                round += 1;
            }
            next_hb = Some(hb_at(j, round));
        } else {
            let id = shared.ids[(rng.next() % shared.ids.len() as u64) as usize];
            let f = frame(&format!(r#"{{"type":"lookup","node_id":{id}}}"#));
            pipe.push(Kind::Lookup, id, Some(t), &f);
            k += 1;
            next_lk = Some(lk_at(k));
        }
    }
    Ok(())
}

/// The reply fields the generator looks at.
#[derive(Deserialize)]
struct Reply<'a> {
    #[serde(rename = "type", borrow)]
    ty: Option<&'a str>,
    #[serde(borrow)]
    code: Option<&'a str>,
    error: Option<serde::de::IgnoredAny>,
    node_id: Option<u64>,
}

/// `Ok(node ID of a registration)` or `Err(error code)`.
fn classify(frame: &[u8], kind: Kind) -> Result<Option<u32>, String> {
    let r: Reply<'_> = serde_json::from_slice(frame).map_err(|_| "reply_not_json".to_owned())?;
    if r.error.is_some() || r.ty == Some("error") {
        return Err(r.code.unwrap_or("request_failed").to_owned());
    }
    if r.ty != Some(kind.expected()) {
        return Err(format!("unexpected_reply_{}", r.ty.unwrap_or("untyped")));
    }
    if kind == Kind::Register {
        let id = r
            .node_id
            .and_then(|i| u32::try_from(i).ok())
            .ok_or("register_ok_without_node_id")?;
        return Ok(Some(id));
    }
    Ok(None)
}

async fn next_frame(
    rd: &mut OwnedReadHalf,
    dec: &mut FrameDecoder,
    buf: &mut [u8],
) -> Result<Vec<u8>, String> {
    loop {
        match dec.next_frame() {
            Ok(Some(f)) => return Ok(f),
            Ok(None) => {}
            Err(_) => return Err("oversized_reply".into()),
        }
        let n = rd
            .read(buf)
            .await
            .map_err(|e| format!("read: {}", e.kind()))?;
        if n == 0 {
            return Err("connection_closed".into());
        }
        dec.push(&buf[..n]);
    }
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

async fn read_replies(
    rd: &mut OwnedReadHalf,
    dec: &mut FrameDecoder,
    buf: &mut [u8],
    mut rx: mpsc::UnboundedReceiver<Pending>,
    sem: &Semaphore,
    (t0, timeout): (Instant, Duration),
    out: &mut PhaseOut,
) {
    let mut failed: Option<String> = None;
    while let Some(p) = rx.recv().await {
        if let Some(why) = &failed {
            out.kinds[p.kind as usize].error(why);
            continue;
        }
        let frame = match tokio::time::timeout(timeout, next_frame(rd, dec, buf)).await {
            Ok(Ok(f)) => f,
            Ok(Err(why)) => {
                sem.close();
                out.kinds[p.kind as usize].error(&why);
                failed = Some(why);
                continue;
            }
            Err(_) => {
                sem.close();
                out.kinds[p.kind as usize].error("timeout");
                failed = Some("timeout".into());
                continue;
            }
        };
        let now = Instant::now();
        sem.add_permits(1);
        let k = &mut out.kinds[p.kind as usize];
        match classify(&frame, p.kind) {
            Ok(id) => {
                // Open loop: from the scheduled time, or from the write if that was earlier.
                let sched = p.sched.map_or(p.sent, |s| s.min(p.sent));
                k.ok += 1;
                k.lat_us.push(micros(now.saturating_duration_since(sched)));
                k.svc_us.push(micros(now.saturating_duration_since(p.sent)));
                k.at_ms.push(
                    u32::try_from(sched.saturating_duration_since(t0).as_millis())
                        .unwrap_or(u32::MAX),
                );
                if let Some(id) = id {
                    out.registered.push((p.node, id));
                }
            }
            Err(code) => k.error(&code),
        }
    }
}

/// One connection through one phase: a writer following the plan and a reader matching
/// replies to requests in order, concurrently.
async fn conn_task(
    mut conn: Conn,
    c: u32,
    shared: Arc<Shared>,
    plan: Plan,
    pipeline: u32,
    timeout: Duration,
    t0: Instant,
) -> (Conn, PhaseOut) {
    let sem = Semaphore::new(pipeline as usize);
    let (tx, rx) = mpsc::unbounded_channel();
    let mut out = PhaseOut::default();
    let Conn { rd, wr, dec, buf } = &mut conn;
    let writer = async {
        let mut pipe = Pipe {
            wr,
            tx,
            sem: &sem,
            batch: Vec::with_capacity(16 * 1024),
            pend: Vec::new(),
            sent: [0; 3],
        };
        let r = write_plan(&mut pipe, c, &shared, plan).await;
        (r, pipe.sent)
        // The pipe, and with it the sender, is dropped here: the reader ends once it has
        // matched every reply.
    };
    let reader = read_replies(rd, dec, buf, rx, &sem, (t0, timeout), &mut out);
    let ((written, sent), ()) = tokio::join!(writer, reader);
    if let Err(WriteStop::Io(e)) = written {
        *out.write_errors.entry(e).or_default() += 1;
    }
    for (k, s) in out.kinds.iter_mut().zip(sent) {
        k.sent = s;
    }
    (conn, out)
}

async fn run_phase(
    conns: Vec<Conn>,
    shared: &Arc<Shared>,
    plan: impl Fn(u32) -> Plan,
    cli: &Cli,
    t0: Instant,
) -> Result<(Vec<Conn>, PhaseOut), String> {
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(c, conn)| {
            let c = c as u32;
            tokio::spawn(conn_task(
                conn,
                c,
                shared.clone(),
                plan(c),
                cli.pipeline,
                cli.timeout,
                t0,
            ))
        })
        .collect();
    let mut conns = Vec::with_capacity(tasks.len());
    let mut out = PhaseOut::default();
    for t in tasks {
        let (conn, o) = t.await.map_err(|e| format!("connection task: {e}"))?;
        conns.push(conn);
        out.merge(o);
    }
    Ok((conns, out))
}

// ---------------------------------------------------------------------------------------------
// Reporting.

#[derive(Debug, Clone, Copy)]
struct Lat {
    n: usize,
    p50: f64,
    p90: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

/// Percentiles in milliseconds (nearest rank).
fn summarize(v: &[u32]) -> Option<Lat> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_unstable();
    let q = |q: f64| {
        let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
        f64::from(s[rank - 1]) / 1000.0
    };
    Some(Lat {
        n: s.len(),
        p50: q(0.50),
        p90: q(0.90),
        p99: q(0.99),
        p999: q(0.999),
        max: f64::from(s[s.len() - 1]) / 1000.0,
    })
}

impl fmt::Display for Lat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
            self.p50, self.p90, self.p99, self.p999, self.max
        )
    }
}

fn lat_json(l: Option<Lat>) -> Value {
    match l {
        Some(l) => json!({
            "samples": l.n, "p50": l.p50, "p90": l.p90, "p99": l.p99, "p999": l.p999, "max": l.max,
        }),
        None => Value::Null,
    }
}

fn errors_text(e: &BTreeMap<String, u64>) -> String {
    if e.is_empty() {
        return "none".into();
    }
    e.iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Latency per second of the phase (by scheduled send time).
fn per_second(k: &KindStats) -> BTreeMap<u32, Vec<u32>> {
    let mut m: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for (&at, &lat) in k.at_ms.iter().zip(&k.lat_us) {
        m.entry(at / 1000).or_default().push(lat);
    }
    m
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn rss_text(b: Option<u64>) -> String {
    b.map(|b| format!("{:.1} MiB", mib(b)))
        .unwrap_or_else(|| "unknown (no PID: give --registry-pid)".into())
}

// ---------------------------------------------------------------------------------------------
// The run.

async fn run(cli: Cli) -> Result<ExitCode, String> {
    let out = Out { stderr: cli.json };
    let load_start = loadavg();
    let n = cli.nodes;

    // Keys first: it is CPU work of the generator only.
    let seed = cli.seed.unwrap_or_else(|| {
        let mut b = [0u8; 8];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
        u64::from_le_bytes(b)
    });
    let t = Instant::now();
    let keys: Vec<(SigningKey, String)> = par_map(n as usize, |i| {
        let k = node_key(seed, i as u32);
        let pk = b64(k.verifying_key().as_bytes());
        (k, pk)
    });
    let (keys, public_keys): (Vec<SigningKey>, Vec<String>) = keys.into_iter().unzip();
    let keygen_s = t.elapsed().as_secs_f64();

    let mut target = match &cli.registry {
        Some(a) => {
            let addr = resolve(a)?;
            Target {
                addr,
                pid: cli.registry_pid,
                spawned: None,
                store: None,
                description: format!(
                    "running registry at {addr}{} (its rate limits apply: throttled requests count as errors)",
                    cli.registry_pid
                        .map(|p| format!(" (pid {p})"))
                        .unwrap_or_default()
                ),
            }
        }
        None => start_registry(&cli).await?,
    };
    say!(out, "registry: {}", target.description);
    say!(
        out,
        "machine: {} cores, load average {load_start}",
        std::thread::available_parallelism()
            .map(|t| t.get())
            .unwrap_or(1)
    );
    say!(
        out,
        "keys: {n} Ed25519 keys derived from seed {seed} in {keygen_s:.2} s"
    );

    let mut conns = Vec::with_capacity(cli.connections as usize);
    for _ in 0..cli.connections {
        conns.push(connect(target.addr).await?);
    }
    say!(
        out,
        "pool: {} connections, up to {} requests in flight each, generator runtime {} thread(s)",
        cli.connections,
        cli.pipeline,
        cli.threads
    );
    let rss_base = rss_bytes(target.pid);
    say!(out, "registry RSS baseline: {}", rss_text(rss_base));

    // Phase 1: registrations.
    let mut shared = Arc::new(Shared {
        nodes: n,
        conns: cli.connections,
        public_keys,
        heartbeats: Vec::new(),
        ids: Vec::new(),
    });
    let reg_cpu0 = target.pid.and_then(|p| cpu_secs(&p.to_string()));
    let gen_cpu0 = cpu_secs("self");
    let t_reg = Instant::now();
    let (conns, reg) = run_phase(conns, &shared, |_| Plan::Register, &cli, t_reg).await?;
    let reg_s = t_reg.elapsed().as_secs_f64();
    let reg_cpu = target
        .pid
        .and_then(|p| cpu_secs(&p.to_string()))
        .zip(reg_cpu0)
        .map(|(a, b)| a - b);
    let gen_cpu_reg = cpu_secs("self").zip(gen_cpu0).map(|(a, b)| a - b);
    let rk = &reg.kinds[Kind::Register as usize];
    let reg_rate = rk.ok as f64 / reg_s;
    let reg_lat = summarize(&rk.svc_us);
    say!(
        out,
        "register: {} ok, {} failed in {reg_s:.2} s = {reg_rate:.0} registrations/s (each acknowledged after a durable commit)",
        rk.ok,
        rk.failed()
    );
    if let Some(l) = reg_lat {
        say!(
            out,
            "register latency (write to durable ack, queueing behind up to {} pipelined requests per connection included): {l}",
            cli.pipeline
        );
    }
    say!(out, "register errors: {}", errors_text(&rk.errors));
    let rss_reg = rss_bytes(target.pid);
    let per_node = |r: Option<u64>| {
        r.zip(rss_base)
            .map(|(r, b)| (r as f64 - b as f64) / f64::from(n))
    };
    say!(
        out,
        "registry RSS after registrations: {}{}",
        rss_text(rss_reg),
        per_node(rss_reg)
            .map(|p| format!(" ({p:.0} bytes/node over the baseline)"))
            .unwrap_or_default()
    );

    // Heartbeat signatures: v1 signs the fixed string "heartbeat:<id>", so each node's
    // signature (and whole frame) is computed once and replayed every interval.
    let mut ids_by_index: Vec<Option<u32>> = vec![None; n as usize];
    for &(i, id) in &reg.registered {
        ids_by_index[i as usize] = Some(id);
    }
    let t = Instant::now();
    let heartbeats: Vec<Option<Box<[u8]>>> = par_map(n as usize, |i| {
        let id = ids_by_index[i]?;
        let sig = sign_v1(&keys[i], &format!("heartbeat:{id}"));
        Some(
            frame(&format!(
                r#"{{"type":"heartbeat","node_id":{id},"signature":"{sig}"}}"#
            ))
            .into_boxed_slice(),
        )
    });
    let sign_s = t.elapsed().as_secs_f64();
    drop(keys);
    let mut ids: Vec<u32> = ids_by_index.iter().flatten().copied().collect();
    ids.sort_unstable();
    ids.dedup();
    let registered = heartbeats.iter().filter(|h| h.is_some()).count();
    if ids.len() != registered {
        say!(
            out,
            "warning: {registered} registrations returned only {} distinct node IDs",
            ids.len()
        );
    }
    say!(
        out,
        "heartbeat signatures: {registered} precomputed in {sign_s:.2} s (v1 \"heartbeat:<id>\" is a fixed string: signed once per node, replayed every interval)"
    );
    if let Some(s) = Arc::get_mut(&mut shared) {
        s.heartbeats = heartbeats;
        s.ids = ids;
    } else {
        return Err("internal: phase data still shared".into());
    }

    // Phase 2: heartbeats and lookups, open loop.
    let interval = cli.heartbeat_interval;
    let dur = cli.duration;
    let hb_offered = registered as f64 / interval.as_secs_f64();
    say!(
        out,
        "heartbeat phase: {:.1} s; {registered} nodes every {:.1} s = {hb_offered:.1} heartbeats/s offered, {:.1} lookups/s offered",
        dur.as_secs_f64(),
        interval.as_secs_f64(),
        cli.lookups_per_sec
    );
    let reg_cpu1 = target.pid.and_then(|p| cpu_secs(&p.to_string()));
    let gen_cpu1 = cpu_secs("self");
    let t0 = Instant::now() + Duration::from_millis(50);
    let end = t0 + dur;
    let lookups_per_sec = cli.lookups_per_sec;
    let (conns, st) = run_phase(
        conns,
        &shared,
        |c| Plan::Steady {
            interval,
            t0,
            end,
            lookups_per_sec,
            rng: seed ^ (u64::from(c) << 32) ^ 0x5eed,
        },
        &cli,
        t0,
    )
    .await?;
    let hb_wall = t0.elapsed().as_secs_f64();
    drop(conns);
    let reg_cpu_hb = target
        .pid
        .and_then(|p| cpu_secs(&p.to_string()))
        .zip(reg_cpu1)
        .map(|(a, b)| a - b);
    let gen_cpu_hb = cpu_secs("self").zip(gen_cpu1).map(|(a, b)| a - b);
    let rss_hb = rss_bytes(target.pid);
    let hwm = target
        .pid
        .and_then(|p| proc_kib(p, "VmHWM"))
        .map(|k| k * 1024);
    let secs = dur.as_secs_f64();
    let mut kind_json = BTreeMap::new();
    let mut hb_p99 = None;
    for (kind, name, offered) in [
        (Kind::Heartbeat, "heartbeat", hb_offered),
        (Kind::Lookup, "lookup", lookups_per_sec),
    ] {
        let k = &st.kinds[kind as usize];
        let lat = summarize(&k.lat_us);
        let svc = summarize(&k.svc_us);
        if kind == Kind::Heartbeat {
            hb_p99 = lat.map(|l| l.p99);
        }
        let worst = per_second(k)
            .into_iter()
            .filter_map(|(s, v)| summarize(&v).map(|l| (s, l)))
            .max_by(|a, b| a.1.p99.total_cmp(&b.1.p99));
        say!(
            out,
            "{name}: {} sent, {} ok, {} failed; {:.1}/s achieved of {offered:.1}/s offered",
            k.sent,
            k.ok,
            k.failed(),
            k.ok as f64 / secs
        );
        if let Some(l) = lat {
            say!(out, "{name} latency (from scheduled send): {l}");
        }
        if let Some(l) = svc {
            say!(out, "{name} latency (from write):          {l}");
        }
        if let Some((s, l)) = worst {
            say!(
                out,
                "{name} worst second: t={s} s, {} requests, p99 {:.2} ms, max {:.2} ms",
                l.n,
                l.p99,
                l.max
            );
        }
        say!(out, "{name} errors: {}", errors_text(&k.errors));
        kind_json.insert(
            name,
            json!({
                "offered_per_sec": offered,
                "sent": k.sent,
                "ok": k.ok,
                "failed": k.failed(),
                "achieved_per_sec": k.ok as f64 / secs,
                "errors": k.errors,
                "latency_ms": lat_json(lat),
                "service_ms": lat_json(svc),
                "worst_second": worst.map(|(s, l)| json!({"t": s, "samples": l.n, "p99": l.p99, "max": l.max})),
            }),
        );
    }
    if cli.timeline {
        let hb = per_second(&st.kinds[Kind::Heartbeat as usize]);
        let lk = per_second(&st.kinds[Kind::Lookup as usize]);
        say!(
            out,
            "timeline (by scheduled second): t  heartbeats p50/p99/max ms  lookups p50/p99/max ms"
        );
        let mut secs_seen: Vec<u32> = hb.keys().chain(lk.keys()).copied().collect();
        secs_seen.sort_unstable();
        secs_seen.dedup();
        for s in secs_seen {
            let f = |m: &BTreeMap<u32, Vec<u32>>| {
                m.get(&s)
                    .and_then(|v| summarize(v))
                    .map(|l| format!("{:>6} {:>7.2} {:>7.2} {:>8.2}", l.n, l.p50, l.p99, l.max))
                    .unwrap_or_else(|| format!("{:>6} {:>7} {:>7} {:>8}", 0, "-", "-", "-"))
            };
            say!(out, "  {s:>4}  {}   {}", f(&hb), f(&lk));
        }
    }
    if !st.write_errors.is_empty() || !reg.write_errors.is_empty() {
        say!(
            out,
            "connection write errors: registration {}; heartbeat phase {}",
            errors_text(&reg.write_errors),
            errors_text(&st.write_errors)
        );
    }
    say!(
        out,
        "registry RSS after heartbeat phase: {}{}{}",
        rss_text(rss_hb),
        per_node(rss_hb)
            .map(|p| format!(" ({p:.0} bytes/node over the baseline)"))
            .unwrap_or_default(),
        hwm.map(|h| format!(", peak {:.1} MiB", mib(h)))
            .unwrap_or_default()
    );
    let store_bytes = target
        .store
        .as_ref()
        .and_then(|s| std::fs::metadata(s).ok())
        .map(|m| m.len());
    if let Some(b) = store_bytes {
        say!(
            out,
            "store file: {:.1} MiB ({:.0} bytes/node)",
            mib(b),
            b as f64 / f64::from(n)
        );
    }
    let cpu = |c: Option<f64>, wall: f64| {
        c.map(|c| format!("{c:.1} s ({:.0}% of one core)", 100.0 * c / wall))
            .unwrap_or_else(|| "unknown".into())
    };
    say!(
        out,
        "CPU: registry {} during registration, {} during heartbeats; generator {} and {}",
        cpu(reg_cpu, reg_s),
        cpu(reg_cpu_hb, hb_wall),
        cpu(gen_cpu_reg, reg_s),
        cpu(gen_cpu_hb, hb_wall)
    );
    let load_end = loadavg();
    say!(
        out,
        "load average: {load_start} at start, {load_end} at end"
    );

    // The registry must have survived.
    let mut died = None;
    if let Some(s) = target.spawned.as_mut() {
        died = s.exited();
    }
    if let Some(why) = &died {
        say!(out, "error: {why}");
    }

    let mem_per_node = per_node(rss_reg)
        .into_iter()
        .chain(per_node(rss_hb))
        .reduce(f64::max);
    let targets = [
        (
            "registrations_per_sec",
            format!("registrations/s >= {TARGET_REGISTRATIONS_PER_SEC:.0}"),
            Some(reg_rate),
            Some(reg_rate >= TARGET_REGISTRATIONS_PER_SEC),
        ),
        (
            "heartbeat_p99_ms",
            format!("heartbeat p99 < {TARGET_HEARTBEAT_P99_MS:.0} ms"),
            hb_p99,
            hb_p99.map(|p| p < TARGET_HEARTBEAT_P99_MS),
        ),
        (
            "bytes_per_node",
            format!("registry memory < {TARGET_BYTES_PER_NODE:.0} bytes/node"),
            mem_per_node,
            mem_per_node.map(|m| m < TARGET_BYTES_PER_NODE),
        ),
    ];
    let at_scale = n >= 100_000 && interval <= Duration::from_secs(30);
    say!(
        out,
        "targets{}:",
        if at_scale {
            ""
        } else {
            " (stated for 100,000 nodes every 30 s; this run is smaller)"
        }
    );
    let mut missed = false;
    let mut targets_json = serde_json::Map::new();
    for (key, what, value, pass) in &targets {
        let verdict = match pass {
            Some(true) => "PASS",
            Some(false) => {
                missed = true;
                "FAIL"
            }
            None => "UNKNOWN",
        };
        say!(
            out,
            "  {what}: {verdict} ({})",
            value
                .map(|v| format!("{v:.2}"))
                .unwrap_or_else(|| "not measured".into())
        );
        targets_json.insert((*key).to_owned(), json!({"value": value, "pass": pass}));
    }

    let failures = rk.failed()
        + st.kinds.iter().map(KindStats::failed).sum::<u64>()
        + st.write_errors.values().sum::<u64>()
        + reg.write_errors.values().sum::<u64>();
    if cli.json {
        let summary = json!({
            "nodes": n,
            "connections": cli.connections,
            "pipeline": cli.pipeline,
            "generator_threads": cli.threads,
            "heartbeat_interval_s": interval.as_secs_f64(),
            "duration_s": secs,
            "lookups_per_sec": lookups_per_sec,
            "seed": seed,
            "registry": {
                "addr": target.addr.to_string(),
                "pid": target.pid,
                "spawned": target.spawned.is_some(),
                "store": target.store.as_ref().map(|s| s.display().to_string()),
                "store_fs": target.store.as_ref().and_then(|s| fs_type(s)),
                "store_bytes": store_bytes,
                "exited": died,
            },
            "keygen_s": keygen_s,
            "sign_s": sign_s,
            "register": {
                "ok": rk.ok,
                "failed": rk.failed(),
                "errors": rk.errors,
                "seconds": reg_s,
                "per_sec": reg_rate,
                "latency_ms": lat_json(reg_lat),
            },
            "heartbeat": kind_json.remove("heartbeat"),
            "lookup": kind_json.remove("lookup"),
            "write_errors": {"register": reg.write_errors, "heartbeat_phase": st.write_errors},
            "rss_bytes": {
                "baseline": rss_base,
                "after_register": rss_reg,
                "after_heartbeat": rss_hb,
                "peak": hwm,
            },
            "bytes_per_node": {
                "after_register": per_node(rss_reg),
                "after_heartbeat": per_node(rss_hb),
            },
            "cpu_s": {
                "registry_register": reg_cpu,
                "registry_heartbeat": reg_cpu_hb,
                "generator_register": gen_cpu_reg,
                "generator_heartbeat": gen_cpu_hb,
            },
            "loadavg": {"start": load_start, "end": load_end},
            "targets": targets_json,
            "failures": failures,
        });
        println!("{summary}");
    }
    if died.is_some() || failures > 0 {
        return Ok(ExitCode::FAILURE);
    }
    if cli.enforce_targets && missed {
        return Ok(ExitCode::from(3));
    }
    Ok(ExitCode::SUCCESS)
}
