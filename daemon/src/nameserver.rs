//! The nameserver on virtual port 53 (v1 wire §8.6): A records (name → address), N records
//! (name → network), S records (service: name, address, network, port), the record store
//! (`nameserver.json` in the home directory) and the operator API the IPC server calls. The
//! line protocol (requests, responses, records) is [`tunnel::services::nameserver`]; the
//! client that queries a remote nameserver is `pilot_driver::services::nameserver`.
//!
//! # Wire
//!
//! One request per connection: one line (a terminating `\n` is optional, as v1 clients send
//! none), one response, then the server closes. Fields are separated by whitespace; command
//! and record type are case-insensitive; fields beyond those a request needs are ignored.
//! The request and response forms are listed in [`tunnel::services::nameserver`].
//!
//! A request is complete at its `\n`, at the end of the client's sending side, or when no
//! more bytes came for [`REQUEST_QUIET`] after the first ones (v1 clients write the line in
//! one piece and then wait). Requests longer than [`MAX_REQUEST`] bytes are refused. Names
//! are 1 to [`MAX_NAME`] printable ASCII characters.
//!
//! # Who may register what
//!
//! Records registered over the wire belong to the node the connection comes from; that
//! node is the one the tunnel authenticated (an encrypted frame's inner source must be its
//! tunnel peer). v1 means to check this but never does (§8.6, §11.2). Here:
//!
//! - an A or S record must name an address of the registering node itself (any network,
//!   same node ID);
//! - a name (A or N) held by another node, or by the operator, cannot be taken over until
//!   its record expires; re-registering one's own record refreshes it;
//! - a node holds at most [`NameLimits::max_per_node`] records, and the table at most
//!   [`NameLimits::max_records`].
//!
//! # Lifetimes
//!
//! Records registered over the wire live [`RECORD_TTL`] (5 minutes, as v1) unless
//! registered again; expired records are ignored at once and removed every
//! [`REAP_EVERY`]. Records the operator adds through the API ([`Nameserver::add`]) are
//! permanent and override a remote record with the same key.
//!
//! # Store
//!
//! `nameserver.json` keeps v1's layout (`a_records`, `n_records`, `s_records` with v1's
//! field names) and adds optional fields: `local: true` for operator records, `owner` (the
//! registering node) and `expires` (unix seconds) for remote ones. A v1 file loads as
//! remote records with a fresh TTL, as v1 does; the owner of its A and S records is the node
//! of their address. Changes are written through a temporary file and a rename: operator
//! changes before the call returns, remote ones within [`SAVE_DELAY`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;
use tunnel::services::nameserver::{
    check_name, parse_request_bytes, Record, RecordKey, Request, RequestError, Response,
    ServiceEntry, ERR_NOT_FOUND, MAX_REQUEST,
};
pub use tunnel::services::nameserver::{MAX_NAME, NAMESERVER_PORT};
use tunnel::{Addr, SocketAddr as PilotAddr};

use crate::engine::EngineHandle;
use crate::fsutil::write_atomic;
use crate::local::LocalListener;
use crate::ratelog::LogGate;
use crate::services::PortError;

// ---------------------------------------------------------------------------------------
// Constants

/// Lifetime of a record registered over the wire (v1: 5 minutes).
pub const RECORD_TTL: Duration = Duration::from_secs(300);
/// Interval between two removals of expired records (v1: 60 s).
pub const REAP_EVERY: Duration = Duration::from_secs(60);
/// The store's file name in the home directory.
pub const STORE_FILE: &str = "nameserver.json";
/// Time a client has to send its request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Silence after the first bytes of a request that ends it (for clients that send no `\n`).
pub const REQUEST_QUIET: Duration = Duration::from_millis(100);
/// Delay before remote changes are written, so that a burst is written once.
pub const SAVE_DELAY: Duration = Duration::from_millis(100);
/// Least interval between two warnings of one kind.
const LOG_EVERY: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// Records

/// Who registered a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The operator, through the API: permanent.
    Local,
    /// A node, over the wire: expires unless registered again. Node 0 means unknown (an N
    /// record loaded from a v1 store), which any node may take over.
    Remote(u32),
}

/// A record with its origin and expiry, as the operator lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordInfo {
    /// The record.
    pub record: Record,
    /// Who registered it.
    pub origin: Origin,
    /// When it expires (unix seconds); `None` for permanent records.
    pub expires: Option<u64>,
}

impl RecordInfo {
    /// JSON for the IPC reply: `{"type":"A","name","address","origin":"local"|"remote",
    /// "owner"?,"expires"?}` (S records add `network_id` and `port`, N records have
    /// `network_id` instead of `address`).
    pub fn to_json(&self) -> Value {
        let mut v = match &self.record {
            Record::A { name, addr } => {
                json!({"type": "A", "name": name, "address": addr.to_string()})
            }
            Record::N { name, network } => {
                json!({"type": "N", "name": name, "network_id": network})
            }
            Record::S {
                name,
                addr,
                network,
                port,
            } => json!({"type": "S", "name": name, "address": addr.to_string(),
                "network_id": network, "port": port}),
        };
        if let Some(obj) = v.as_object_mut() {
            match self.origin {
                Origin::Local => {
                    obj.insert("origin".into(), json!("local"));
                }
                Origin::Remote(node) => {
                    obj.insert("origin".into(), json!("remote"));
                    obj.insert("owner".into(), json!(node));
                }
            }
            if let Some(e) = self.expires {
                obj.insert("expires".into(), json!(e));
            }
        }
        v
    }
}

/// Bounds of the record table.
#[derive(Debug, Clone)]
pub struct NameLimits {
    /// Records in the table.
    pub max_records: usize,
    /// Records one remote node may hold.
    pub max_per_node: usize,
    /// Lifetime of a remote record.
    pub ttl: Duration,
}

impl Default for NameLimits {
    fn default() -> Self {
        NameLimits {
            max_records: 10_000,
            max_per_node: 64,
            ttl: RECORD_TTL,
        }
    }
}

/// Why a registration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    /// A remote node named an address that is not its own.
    #[error("cannot register an address of another node")]
    NotYourAddress,
    /// The name or key is held by another node or by the operator.
    #[error("name is registered by someone else")]
    Taken,
    /// The table is full.
    #[error("record table full")]
    TableFull,
    /// The node holds too many records.
    #[error("too many records for this node")]
    TooManyForNode,
    /// The name is invalid.
    #[error("{0}")]
    BadName(RequestError),
}

#[derive(Debug, Clone)]
struct Entry {
    record: Record,
    origin: Origin,
    expires: Option<u64>,
}

impl Entry {
    fn live(&self, now: u64) -> bool {
        self.expires.is_none_or(|e| e > now)
    }
}

/// The record table, without I/O: time comes in as unix seconds.
#[derive(Debug, Clone, Default)]
pub struct NameTable {
    records: BTreeMap<RecordKey, Entry>,
    limits: NameLimits,
}

impl NameTable {
    /// An empty table.
    pub fn new(limits: NameLimits) -> NameTable {
        NameTable {
            records: BTreeMap::new(),
            limits,
        }
    }

    /// Records in the table (expired ones included until reaped).
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// True when the table holds no record.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Adds or refreshes a record. `Ok(true)` when the table changed beyond an expiry.
    pub fn register(
        &mut self,
        record: Record,
        origin: Origin,
        now: u64,
    ) -> Result<bool, RegisterError> {
        check_name(record.name()).map_err(RegisterError::BadName)?;
        if let Origin::Remote(node) = origin {
            if node == 0 || record.addr().is_some_and(|a| a.node != node) {
                return Err(RegisterError::NotYourAddress);
            }
        }
        let key = record.key();
        // The live record with this key: its origin, and whether it is this very record.
        let existing = self
            .records
            .get(&key)
            .filter(|e| e.live(now))
            .map(|e| (e.origin, e.record == record && e.origin == origin));
        if let (Origin::Remote(node), Some((held_by, _))) = (origin, existing) {
            match held_by {
                Origin::Remote(owner) if owner == node || owner == 0 => {}
                _ => return Err(RegisterError::Taken),
            }
        }
        if existing.is_none() {
            let live = |e: &&Entry| e.live(now);
            if self.records.len() >= self.limits.max_records {
                self.reap(now);
                if self.records.len() >= self.limits.max_records {
                    return Err(RegisterError::TableFull);
                }
            }
            if let Origin::Remote(node) = origin {
                let held = self
                    .records
                    .values()
                    .filter(live)
                    .filter(|e| e.origin == Origin::Remote(node))
                    .count();
                if held >= self.limits.max_per_node {
                    return Err(RegisterError::TooManyForNode);
                }
            }
        }
        let expires = match origin {
            Origin::Local => None,
            Origin::Remote(_) => Some(now.saturating_add(self.limits.ttl.as_secs())),
        };
        let changed = existing.is_none_or(|(_, same)| !same);
        self.records.insert(
            key,
            Entry {
                record,
                origin,
                expires,
            },
        );
        Ok(changed)
    }

    /// Removes the record with `key`; true if there was one.
    pub fn remove(&mut self, key: &RecordKey) -> bool {
        self.records.remove(key).is_some()
    }

    /// Removes expired records; returns how many.
    pub fn reap(&mut self, now: u64) -> usize {
        let before = self.records.len();
        self.records.retain(|_, e| e.live(now));
        before - self.records.len()
    }

    /// The address of `name`.
    pub fn lookup_a(&self, name: &str, now: u64) -> Option<Addr> {
        match self.live(&RecordKey::A(name.to_owned()), now)? {
            Record::A { addr, .. } => Some(*addr),
            _ => None,
        }
    }

    /// The network of `name`.
    pub fn lookup_n(&self, name: &str, now: u64) -> Option<u16> {
        match self.live(&RecordKey::N(name.to_owned()), now)? {
            Record::N { network, .. } => Some(*network),
            _ => None,
        }
    }

    /// The providers of the service on `port` in `network`.
    pub fn lookup_s(&self, network: u16, port: u16, now: u64) -> Vec<ServiceEntry> {
        let lo = RecordKey::S {
            network,
            addr: Addr::new(0, 0),
            port: 0,
        };
        let hi = RecordKey::S {
            network,
            addr: Addr::new(u16::MAX, u32::MAX),
            port: u16::MAX,
        };
        self.records
            .range(lo..=hi)
            .filter(|(_, e)| e.live(now))
            .filter_map(|(_, e)| match &e.record {
                Record::S {
                    name,
                    addr,
                    port: p,
                    ..
                } if *p == port => Some(ServiceEntry {
                    name: name.clone(),
                    addr: *addr,
                    port: *p,
                }),
                _ => None,
            })
            .collect()
    }

    fn live(&self, key: &RecordKey, now: u64) -> Option<&Record> {
        self.records
            .get(key)
            .filter(|e| e.live(now))
            .map(|e| &e.record)
    }

    /// Every live record.
    pub fn list(&self, now: u64) -> Vec<RecordInfo> {
        self.records
            .values()
            .filter(|e| e.live(now))
            .map(|e| RecordInfo {
                record: e.record.clone(),
                origin: e.origin,
                expires: e.expires,
            })
            .collect()
    }

    /// Answers a request from the node `remote` (registrations belong to it).
    pub fn handle(&mut self, req: Request, remote: u32, now: u64) -> (Response, bool) {
        let not_found = || Response::Err(ERR_NOT_FOUND.to_owned());
        match req {
            Request::QueryA { name } => match self.lookup_a(&name, now) {
                Some(addr) => (Response::A { name, addr }, false),
                None => (not_found(), false),
            },
            Request::QueryN { name } => match self.lookup_n(&name, now) {
                Some(network) => (Response::N { name, network }, false),
                None => (not_found(), false),
            },
            Request::QueryS { network, port } => {
                (Response::S(self.lookup_s(network, port, now)), false)
            }
            Request::Register(record) => match self.register(record, Origin::Remote(remote), now) {
                Ok(changed) => (Response::Ok, changed),
                Err(e) => (Response::Err(e.to_string()), false),
            },
        }
    }

    /// The store file's JSON (live records only).
    pub fn to_store_json(&self, now: u64) -> Vec<u8> {
        let mut file = StoreFile::default();
        for e in self.records.values().filter(|e| e.live(now)) {
            let (local, owner) = match e.origin {
                Origin::Local => (true, None),
                Origin::Remote(n) => (false, Some(n).filter(|&n| n != 0)),
            };
            let meta = StoreMeta {
                local,
                owner,
                expires: e.expires,
            };
            match &e.record {
                Record::A { name, addr } => file.a_records.push(StoreA {
                    name: name.clone(),
                    address: addr.to_string(),
                    meta,
                }),
                Record::N { name, network } => file.n_records.push(StoreN {
                    name: name.clone(),
                    network_id: *network,
                    meta,
                }),
                Record::S {
                    name,
                    addr,
                    network,
                    port,
                } => file.s_records.push(StoreS {
                    name: name.clone(),
                    address: addr.to_string(),
                    network_id: *network,
                    port: *port,
                    meta,
                }),
            }
        }
        let mut out = serde_json::to_vec_pretty(&file).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// Loads a store file's JSON. Invalid and expired records are skipped; the count of
    /// skipped invalid ones is returned with the table.
    pub fn from_store_json(
        bytes: &[u8],
        limits: NameLimits,
        now: u64,
    ) -> Result<(NameTable, usize), serde_json::Error> {
        let file: StoreFile = serde_json::from_slice(bytes)?;
        let mut table = NameTable::new(limits);
        let mut skipped = 0;
        let ttl = table.limits.ttl.as_secs();
        let mut load = |record: Option<Record>, meta: StoreMeta| {
            let Some(record) = record else {
                skipped += 1;
                return;
            };
            if check_name(record.name()).is_err() || table.records.len() >= table.limits.max_records
            {
                skipped += 1;
                return;
            }
            let (origin, expires) = if meta.local {
                (Origin::Local, None)
            } else {
                let owner = meta.owner.or(record.addr().map(|a| a.node)).unwrap_or(0);
                let expires = meta.expires.unwrap_or(now.saturating_add(ttl));
                (Origin::Remote(owner), Some(expires))
            };
            let entry = Entry {
                record,
                origin,
                expires,
            };
            if entry.live(now) {
                table.records.insert(entry.record.key(), entry);
            }
        };
        for a in file.a_records {
            let r = a
                .address
                .parse()
                .ok()
                .map(|addr| Record::A { name: a.name, addr });
            load(r, a.meta);
        }
        for n in file.n_records {
            load(
                Some(Record::N {
                    name: n.name,
                    network: n.network_id,
                }),
                n.meta,
            );
        }
        for s in file.s_records {
            let r = s.address.parse().ok().map(|addr| Record::S {
                name: s.name,
                addr,
                network: s.network_id,
                port: s.port,
            });
            load(r, s.meta);
        }
        Ok((table, skipped))
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StoreFile {
    #[serde(default)]
    a_records: Vec<StoreA>,
    #[serde(default)]
    n_records: Vec<StoreN>,
    #[serde(default)]
    s_records: Vec<StoreS>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StoreMeta {
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    local: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    owner: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
struct StoreA {
    name: String,
    address: String,
    #[serde(flatten)]
    meta: StoreMeta,
}

#[derive(Debug, Serialize, Deserialize)]
struct StoreN {
    name: String,
    network_id: u16,
    #[serde(flatten)]
    meta: StoreMeta,
}

#[derive(Debug, Serialize, Deserialize)]
struct StoreS {
    name: String,
    address: String,
    network_id: u16,
    port: u16,
    #[serde(flatten)]
    meta: StoreMeta,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// The service

/// Why the nameserver could not load or save its store.
#[derive(Debug, thiserror::Error)]
pub enum NameserverError {
    /// Reading or writing the store failed.
    #[error("{path}: {source}")]
    Io {
        /// The store file.
        path: String,
        /// What failed.
        source: std::io::Error,
    },
    /// The store is not valid JSON of the expected shape.
    #[error("{path}: {source}")]
    Parse {
        /// The store file.
        path: String,
        /// What failed.
        source: serde_json::Error,
    },
    /// An operator record was refused.
    #[error("{0}")]
    Register(#[from] RegisterError),
}

/// Counters of the service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct NameserverStats {
    /// Live and not yet reaped records.
    pub records: usize,
    /// Requests answered.
    pub requests: u64,
    /// Requests refused as malformed, too long or too slow.
    pub bad_requests: u64,
    /// Registrations refused (another node's address, a taken name, a limit).
    pub refused: u64,
    /// Store writes that failed.
    pub save_errors: u64,
}

/// The nameserver: cheap to clone; every clone is the same service.
#[derive(Debug, Clone)]
pub struct Nameserver {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    table: Mutex<NameTable>,
    path: PathBuf,
    /// Serialises store writes; each write takes its snapshot while holding it, so the
    /// last write is always the newest state.
    write: Mutex<()>,
    dirty: Notify,
    requests: AtomicU64,
    bad_requests: AtomicU64,
    refused: AtomicU64,
    save_errors: AtomicU64,
    log_bad: LogGate,
    log_save: LogGate,
}

impl Nameserver {
    /// Opens the store `home/nameserver.json` (an absent file is an empty table).
    pub fn open(home: &Path, limits: NameLimits) -> Result<Nameserver, NameserverError> {
        let path = home.join(STORE_FILE);
        let shown = path.display().to_string();
        let table = match std::fs::read(&path) {
            Ok(bytes) => {
                let (t, skipped) =
                    NameTable::from_store_json(&bytes, limits, now_unix()).map_err(|source| {
                        NameserverError::Parse {
                            path: shown.clone(),
                            source,
                        }
                    })?;
                if skipped > 0 {
                    tracing::warn!(path = %shown, skipped, "nameserver: invalid records skipped");
                }
                t
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => NameTable::new(limits),
            Err(source) => {
                return Err(NameserverError::Io {
                    path: shown,
                    source,
                })
            }
        };
        Ok(Nameserver {
            inner: Arc::new(Inner {
                table: Mutex::new(table),
                path,
                write: Mutex::new(()),
                dirty: Notify::new(),
                requests: AtomicU64::new(0),
                bad_requests: AtomicU64::new(0),
                refused: AtomicU64::new(0),
                save_errors: AtomicU64::new(0),
                log_bad: LogGate::new(LOG_EVERY),
                log_save: LogGate::new(LOG_EVERY),
            }),
        })
    }

    /// Serves port [`NAMESERVER_PORT`] on the engine until it stops, removes expired
    /// records every [`REAP_EVERY`] and writes remote changes to the store.
    pub async fn start(&self, engine: &EngineHandle) -> Result<(), PortError> {
        let mut listener = LocalListener::bind(engine, NAMESERVER_PORT)
            .await
            .map_err(PortError::on(NAMESERVER_PORT))?;
        let ns = self.clone();
        tokio::spawn(async move {
            let mut reap = tokio::time::interval(REAP_EVERY);
            // A burst of changes is written once, SAVE_DELAY after its first change.
            let mut save_at: Option<tokio::time::Instant> = None;
            loop {
                let save_deadline = save_at.unwrap_or_else(tokio::time::Instant::now);
                tokio::select! {
                    conn = listener.accept() => match conn {
                        Some((stream, remote)) => ns.serve(stream, remote),
                        None => break,
                    },
                    _ = reap.tick() => {
                        if ns.inner.lock().reap(now_unix()) > 0 {
                            ns.inner.dirty.notify_one();
                        }
                    }
                    () = ns.inner.dirty.notified(), if save_at.is_none() => {
                        save_at = Some(tokio::time::Instant::now() + SAVE_DELAY);
                    }
                    () = tokio::time::sleep_until(save_deadline), if save_at.is_some() => {
                        save_at = None;
                        let ns = ns.clone();
                        tokio::spawn(async move { ns.save_logged().await });
                    }
                }
            }
            ns.save_logged().await;
        });
        Ok(())
    }

    /// Answers one connection from `remote` on a task of its own.
    pub fn serve<S>(&self, stream: S, remote: PilotAddr)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let ns = self.clone();
        tokio::spawn(async move { ns.serve_conn(stream, remote).await });
    }

    async fn serve_conn<S>(&self, mut stream: S, remote: PilotAddr)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let response = match read_request(&mut stream).await {
            Ok(Some(buf)) => match parse_request_bytes(&buf) {
                Ok(req) => self.answer(req, remote),
                Err(e) => self.bad_request(remote, &e),
            },
            Ok(None) => return,
            Err(e) => self.bad_request(remote, &e),
        };
        let _ = stream.write_all(response.to_text().as_bytes()).await;
        let _ = stream.shutdown().await;
    }

    fn bad_request(&self, remote: PilotAddr, e: &RequestError) -> Response {
        self.inner.bad_requests.fetch_add(1, Ordering::Relaxed);
        if self.inner.log_bad.allow().is_some() {
            tracing::warn!(peer = %remote, error = %e, "nameserver: bad request");
        }
        Response::Err(e.to_string())
    }

    /// Answers a parsed request from `remote` as the wire server does.
    pub fn answer(&self, req: Request, remote: PilotAddr) -> Response {
        self.inner.requests.fetch_add(1, Ordering::Relaxed);
        let register = matches!(req, Request::Register(_));
        let (resp, changed) = self.inner.lock().handle(req, remote.addr.node, now_unix());
        if changed {
            self.inner.dirty.notify_one();
        }
        if register && matches!(resp, Response::Err(_)) {
            self.inner.refused.fetch_add(1, Ordering::Relaxed);
            if self.inner.log_bad.allow().is_some() {
                tracing::warn!(peer = %remote, response = %resp.to_text(),
                    "nameserver: registration refused");
            }
        }
        resp
    }

    /// Every live record.
    pub fn list(&self) -> Vec<RecordInfo> {
        self.inner.lock().list(now_unix())
    }

    /// Adds a permanent operator record (replacing any record with its key) and writes the
    /// store.
    pub async fn add(&self, record: Record) -> Result<(), NameserverError> {
        self.inner
            .lock()
            .register(record, Origin::Local, now_unix())?;
        self.flush().await
    }

    /// Removes the record with `key` and writes the store; false if there was none.
    pub async fn remove(&self, key: &RecordKey) -> Result<bool, NameserverError> {
        let removed = self.inner.lock().remove(key);
        if removed {
            self.flush().await?;
        }
        Ok(removed)
    }

    /// The address of `name`.
    pub fn lookup_a(&self, name: &str) -> Option<Addr> {
        self.inner.lock().lookup_a(name, now_unix())
    }

    /// The network of `name`.
    pub fn lookup_n(&self, name: &str) -> Option<u16> {
        self.inner.lock().lookup_n(name, now_unix())
    }

    /// The providers of the service on `port` in `network`.
    pub fn lookup_s(&self, network: u16, port: u16) -> Vec<ServiceEntry> {
        self.inner.lock().lookup_s(network, port, now_unix())
    }

    /// Writes the store now.
    pub async fn flush(&self) -> Result<(), NameserverError> {
        let inner = self.inner.clone();
        let r = tokio::task::spawn_blocking(move || inner.save())
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|r| r);
        r.map_err(|source| NameserverError::Io {
            path: self.inner.path.display().to_string(),
            source,
        })
    }

    async fn save_logged(&self) {
        if let Err(e) = self.flush().await {
            self.inner.save_errors.fetch_add(1, Ordering::Relaxed);
            if self.inner.log_save.allow().is_some() {
                tracing::warn!(error = %e, "nameserver: store not written");
            }
        }
    }

    /// Current counters.
    pub fn stats(&self) -> NameserverStats {
        let i = &self.inner;
        NameserverStats {
            records: i.lock().len(),
            requests: i.requests.load(Ordering::Relaxed),
            bad_requests: i.bad_requests.load(Ordering::Relaxed),
            refused: i.refused.load(Ordering::Relaxed),
            save_errors: i.save_errors.load(Ordering::Relaxed),
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, NameTable> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn save(&self) -> std::io::Result<()> {
        let _w = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let bytes = self.lock().to_store_json(now_unix());
        write_atomic(&self.path, &bytes)
    }
}

/// Reads one request: up to `\n`, the end of the stream, or [`REQUEST_QUIET`] of silence
/// after the first bytes. `Ok(None)` when the client sent nothing.
async fn read_request<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<Option<Vec<u8>>, RequestError> {
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let wait = if buf.is_empty() {
            left
        } else {
            left.min(REQUEST_QUIET)
        };
        let n = match tokio::time::timeout(wait, stream.read(&mut chunk)).await {
            Err(_) | Ok(Err(_)) | Ok(Ok(0)) => break,
            Ok(Ok(n)) => n,
        };
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
        if let Some(end) = buf.iter().position(|&b| b == b'\n') {
            buf.truncate(end);
            break;
        }
        if buf.len() > MAX_REQUEST {
            return Err(RequestError::TooLong);
        }
    }
    if buf.is_empty() {
        return Ok(None);
    }
    Ok(Some(buf))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn a(node: u32) -> Addr {
        Addr::new(0, node)
    }

    #[test]
    fn ownership_ttl_and_limits() {
        let mut t = NameTable::new(NameLimits {
            max_records: 4,
            max_per_node: 2,
            ttl: Duration::from_secs(300),
        });
        let rec = |name: &str, node| Record::A {
            name: name.into(),
            addr: a(node),
        };
        // Only one's own address.
        assert_eq!(
            t.register(rec("x", 6), Origin::Remote(5), 0),
            Err(RegisterError::NotYourAddress)
        );
        assert_eq!(t.register(rec("x", 5), Origin::Remote(5), 0), Ok(true));
        // Refreshing changes only the expiry.
        assert_eq!(t.register(rec("x", 5), Origin::Remote(5), 100), Ok(false));
        // Someone else cannot take the name while it lives, can once it expired.
        assert_eq!(
            t.register(rec("x", 6), Origin::Remote(6), 399),
            Err(RegisterError::Taken)
        );
        assert_eq!(t.lookup_a("x", 399), Some(a(5)));
        assert_eq!(t.lookup_a("x", 400), None);
        assert_eq!(t.register(rec("x", 6), Origin::Remote(6), 400), Ok(true));
        // Per-node limit.
        assert_eq!(t.register(rec("y", 6), Origin::Remote(6), 400), Ok(true));
        assert_eq!(
            t.register(rec("z", 6), Origin::Remote(6), 400),
            Err(RegisterError::TooManyForNode)
        );
        // The operator overrides and is permanent; remotes cannot take its names.
        assert_eq!(t.register(rec("y", 9), Origin::Local, 400), Ok(true));
        assert_eq!(
            t.register(rec("y", 6), Origin::Remote(6), 400),
            Err(RegisterError::Taken)
        );
        assert_eq!(t.lookup_a("y", u64::MAX), Some(a(9)));
        // Table limit (x, y, then two more).
        assert_eq!(t.register(rec("p", 7), Origin::Remote(7), 400), Ok(true));
        assert_eq!(t.register(rec("q", 7), Origin::Remote(7), 400), Ok(true));
        assert_eq!(
            t.register(rec("r", 8), Origin::Remote(8), 400),
            Err(RegisterError::TableFull)
        );
        // Reaping frees room.
        assert_eq!(t.reap(10_000), 3);
        assert_eq!(t.register(rec("r", 8), Origin::Remote(8), 10_000), Ok(true));
    }

    #[test]
    fn services_are_keyed_by_provider_and_listed_by_network_and_port() {
        let mut t = NameTable::default();
        let s = |name: &str, node, net, port| Record::S {
            name: name.into(),
            addr: Addr::new(net, node),
            network: net,
            port,
        };
        t.register(s("web", 5, 3, 80), Origin::Remote(5), 0)
            .unwrap();
        t.register(s("web2", 5, 3, 80), Origin::Remote(5), 0)
            .unwrap();
        t.register(s("web", 6, 3, 80), Origin::Remote(6), 0)
            .unwrap();
        t.register(s("ssh", 6, 3, 22), Origin::Remote(6), 0)
            .unwrap();
        t.register(s("web", 7, 4, 80), Origin::Remote(7), 0)
            .unwrap();
        let got = t.lookup_s(3, 80, 1);
        assert_eq!(
            got.iter()
                .map(|e| (e.name.as_str(), e.addr.node))
                .collect::<Vec<_>>(),
            [("web2", 5), ("web", 6)]
        );
    }

    #[test]
    fn the_store_keeps_v1_fields_and_loads_v1_files() {
        let mut t = NameTable::default();
        t.register(
            Record::A {
                name: "me".into(),
                addr: a(1),
            },
            Origin::Local,
            0,
        )
        .unwrap();
        t.register(
            Record::N {
                name: "lab".into(),
                network: 3,
            },
            Origin::Remote(5),
            0,
        )
        .unwrap();
        let json = t.to_store_json(0);
        let v: Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(v["a_records"][0]["address"], "0:0000.0000.0001");
        assert_eq!(v["a_records"][0]["local"], true);
        assert_eq!(v["n_records"][0]["network_id"], 3);
        assert_eq!(v["n_records"][0]["owner"], 5);
        assert_eq!(v["n_records"][0]["expires"], 300);
        let (back, skipped) = NameTable::from_store_json(&json, NameLimits::default(), 10).unwrap();
        assert_eq!(skipped, 0);
        assert_eq!(back.list(10), t.list(10));
        // Expired remote records are not loaded.
        let (late, _) = NameTable::from_store_json(&json, NameLimits::default(), 300).unwrap();
        assert_eq!(late.len(), 1);

        let v1 = br#"{"a_records":[{"name":"x","address":"0:0000.0000.0007"},
            {"name":"bad","address":"nope"}],"n_records":[{"name":"n","network_id":2}],
            "s_records":[{"name":"s","address":"0:0000.0000.0007","network_id":0,"port":80}]}"#;
        let (t1, skipped) = NameTable::from_store_json(v1, NameLimits::default(), 1000).unwrap();
        assert_eq!(skipped, 1);
        assert_eq!(t1.lookup_a("x", 1299), Some(a(7)));
        assert_eq!(t1.lookup_a("x", 1300), None);
        let info = t1.list(1000);
        assert!(info.iter().any(|i| i.origin == Origin::Remote(7)));
        assert!(info.iter().any(|i| i.origin == Origin::Remote(0)));
    }
}
