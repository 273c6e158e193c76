//! [`RegistryAuthority`]: answers from a cache that background tasks fill from a remote
//! registry over TCP or pinned TLS ([`CacheConfig::transport`]), so the packet path never
//! waits on the network.
//!
//! ```text
//! packet path --node_key/may_reach--> cache (mutex, HashMaps) --miss--> fetch queue (bounded)
//!                                       ^                                    |
//!                                       +---- answer ---- workers (one TCP connection each):
//!                                                         lookup {node_id}
//!                                                         reachable {from, to, beacon_token}
//! ```
//!
//! - A miss answers [`Answer::Pending`] (so `node_key` is `None` and `may_reach` is `false`)
//!   and queues one fetch; a key already being fetched is not queued twice.
//! - Positive answers are kept for [`CacheConfig::positive_ttl`], negative ones for
//!   [`CacheConfig::negative_ttl`]. An expired answer is still served, while a refresh is
//!   fetched, for up to [`CacheConfig::stale_for`] more: a steady relay flow is not cut every
//!   time its answer expires. A revocation therefore takes effect within
//!   `positive_ttl + stale_for` plus one fetch.
//! - The cache holds at most [`CacheConfig::max_entries`] answers of each kind.
//! - Workers stop when the last [`RegistryAuthority`] handle is dropped.
//! - [`CacheConfig::registry`] may list several addresses of one registry, first preferred.
//!   Each worker keeps its connection to one of them; a failed fetch moves that worker to the
//!   next address, and once every address failed in a row it waits with a jittered backoff
//!   growing to [`BACKOFF`]'s cap ([`Rotation`]). A worker stays on an address that works.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use pilot_registry_client::{
    jitter_sample, Backoff, Client, ClientError, RegistryAddrs, RegistryStream, Rotation, Transport,
};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::authority::{Answer, Authority};

/// Settings of a [`RegistryAuthority`].
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Registry addresses (`host:port`), first preferred.
    pub registry: RegistryAddrs,
    /// Plain TCP, or TLS pinned to the registry's certificate.
    pub transport: Transport,
    /// The token the registry expects in `reachable` requests.
    pub beacon_token: String,
    /// How long a positive answer (a key, "allowed") is fresh.
    pub positive_ttl: Duration,
    /// How long a negative answer (unknown node, "not allowed") is fresh.
    pub negative_ttl: Duration,
    /// How long an expired answer is still served while its refresh is fetched.
    pub stale_for: Duration,
    /// Most cached answers of each kind (keys, pairs).
    pub max_entries: usize,
    /// Most fetches waiting for a worker; further misses stay pending until asked again.
    pub queue: usize,
    /// Parallel registry connections.
    pub workers: usize,
    /// Deadline of one registry request, connecting included.
    pub request_timeout: Duration,
}

impl CacheConfig {
    /// Defaults for `registry` and `beacon_token`.
    pub fn new(registry: RegistryAddrs, beacon_token: impl Into<String>) -> CacheConfig {
        CacheConfig {
            registry,
            transport: Transport::Tcp,
            beacon_token: beacon_token.into(),
            positive_ttl: Duration::from_secs(30),
            negative_ttl: Duration::from_secs(5),
            stale_for: Duration::from_secs(30),
            max_entries: 100_000,
            queue: 4096,
            workers: 4,
            request_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Fetch {
    Key(u32),
    Reach(u32, u32),
}

#[derive(Debug, Clone, Copy)]
struct Cached<T> {
    value: T,
    fresh_until: Instant,
    usable_until: Instant,
}

#[derive(Debug)]
struct Table<K, T> {
    map: HashMap<K, Cached<T>>,
    inflight: HashSet<K>,
}

impl<K: Hash + Eq + Copy, T: Copy> Table<K, T> {
    fn new() -> Self {
        Table {
            map: HashMap::new(),
            inflight: HashSet::new(),
        }
    }

    /// The cached answer and whether it needs a refresh.
    fn get(&self, k: &K, now: Instant) -> (Option<T>, bool) {
        match self.map.get(k) {
            Some(c) if now < c.fresh_until => (Some(c.value), false),
            Some(c) if now < c.usable_until => (Some(c.value), true),
            _ => (None, true),
        }
    }

    fn insert(&mut self, k: K, c: Cached<T>, max: usize, now: Instant) {
        if !self.map.contains_key(&k) && self.map.len() >= max {
            self.map.retain(|_, c| now < c.usable_until);
            if self.map.len() >= max {
                // Still full of usable answers: forget an arbitrary quarter rather than scan
                // again on every insert.
                let drop: Vec<K> = self.map.keys().take(max / 4 + 1).copied().collect();
                for d in drop {
                    self.map.remove(&d);
                }
            }
        }
        self.map.insert(k, c);
    }
}

#[derive(Debug)]
struct Cache {
    keys: Table<u32, Option<[u8; 32]>>,
    reach: Table<(u32, u32), bool>,
}

#[derive(Debug)]
struct Shared {
    cache: Mutex<Cache>,
    queue: mpsc::Sender<Fetch>,
    config: CacheConfig,
}

/// An [`Authority`] backed by a remote registry through a cache filled in the background.
#[derive(Debug, Clone)]
pub struct RegistryAuthority {
    shared: Arc<Shared>,
}

impl RegistryAuthority {
    /// Starts the fetch workers on the current tokio runtime. Nothing is fetched until the
    /// first miss; connection failures are logged and retried on later misses.
    pub fn spawn(config: CacheConfig) -> RegistryAuthority {
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        let shared = Arc::new(Shared {
            cache: Mutex::new(Cache {
                keys: Table::new(),
                reach: Table::new(),
            }),
            queue: tx,
            config,
        });
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        for worker in 0..shared.config.workers.max(1) {
            tokio::spawn(run_worker(
                worker,
                Arc::downgrade(&shared),
                rx.clone(),
                shared.config.clone(),
            ));
        }
        RegistryAuthority { shared }
    }

    fn cache(&self) -> MutexGuard<'_, Cache> {
        self.shared.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `f` unless it is already being fetched. Never waits.
    fn schedule<K: Hash + Eq + Copy, T>(&self, table: &mut Table<K, T>, k: K, f: Fetch) {
        if table.inflight.contains(&k) {
            return;
        }
        if self.shared.queue.try_send(f).is_ok() {
            table.inflight.insert(k);
        }
    }

    /// Number of cached answers (keys, pairs); for tests and diagnostics.
    pub fn cached(&self) -> (usize, usize) {
        let c = self.cache();
        (c.keys.map.len(), c.reach.map.len())
    }
}

impl Authority for RegistryAuthority {
    fn node_key(&self, node: u32) -> Option<[u8; 32]> {
        match self.node_key_answer(node) {
            Answer::Ready(k) => k,
            Answer::Pending => None,
        }
    }

    fn may_reach(&self, from: u32, to: u32) -> bool {
        matches!(self.may_reach_answer(from, to), Answer::Ready(true))
    }

    fn node_key_answer(&self, node: u32) -> Answer<Option<[u8; 32]>> {
        let now = Instant::now();
        let mut c = self.cache();
        let (v, refresh) = c.keys.get(&node, now);
        if refresh {
            self.schedule(&mut c.keys, node, Fetch::Key(node));
        }
        v.map_or(Answer::Pending, Answer::Ready)
    }

    fn may_reach_answer(&self, from: u32, to: u32) -> Answer<bool> {
        let now = Instant::now();
        let mut c = self.cache();
        let (v, refresh) = c.reach.get(&(from, to), now);
        if refresh {
            self.schedule(&mut c.reach, (from, to), Fetch::Reach(from, to));
        }
        v.map_or(Answer::Pending, Answer::Ready)
    }
}

impl Shared {
    fn complete(&self, f: Fetch, result: Option<Value>) {
        let now = Instant::now();
        let cfg = &self.config;
        let cached = |positive: bool| {
            let ttl = if positive {
                cfg.positive_ttl
            } else {
                cfg.negative_ttl
            };
            (now + ttl, now + ttl + cfg.stale_for)
        };
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        match f {
            Fetch::Key(node) => {
                c.keys.inflight.remove(&node);
                let Some(v) = result else { return };
                let value = key_from_lookup(&v);
                let (fresh_until, usable_until) = cached(value.is_some());
                let entry = Cached {
                    value,
                    fresh_until,
                    usable_until,
                };
                c.keys.insert(node, entry, cfg.max_entries, now);
            }
            Fetch::Reach(from, to) => {
                c.reach.inflight.remove(&(from, to));
                let Some(v) = result else { return };
                let value = v.get("allowed").and_then(Value::as_bool).unwrap_or(false);
                let (fresh_until, usable_until) = cached(value);
                let entry = Cached {
                    value,
                    fresh_until,
                    usable_until,
                };
                c.reach.insert((from, to), entry, cfg.max_entries, now);
            }
        }
    }
}

/// The key in a `lookup_ok` reply; `None` for a refusal (the node is not registered) or a
/// reply without a valid key.
fn key_from_lookup(v: &Value) -> Option<[u8; 32]> {
    if v.get("error").is_some() {
        return None;
    }
    let k = v.get("public_key").and_then(Value::as_str)?;
    tunnel::registry::auth::decode_key(k).ok()
}

enum Outcome {
    /// A reply to cache (a refusal included: it is a negative answer).
    Reply(Value),
    /// No answer this time (connection trouble, throttling): cache nothing.
    Failed(String),
}

/// A worker's wait after a failed fetch: after each round of failures (every address
/// failed), doubling from `base` to `cap`, jittered.
pub const BACKOFF: Backoff = Backoff {
    base: Duration::from_millis(200),
    cap: Duration::from_millis(6400),
};

async fn run_worker(
    worker: usize,
    shared: Weak<Shared>,
    rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Fetch>>>,
    config: CacheConfig,
) {
    let mut client: Option<Client<RegistryStream>> = None;
    let mut rotation = Rotation::new(config.registry.len(), BACKOFF);
    let mut last_warn: Option<Instant> = None;
    loop {
        let next = rx.lock().await.recv().await;
        let Some(f) = next else { return };
        let addr = config.registry.get(rotation.current());
        let outcome =
            tokio::time::timeout(config.request_timeout, fetch(&mut client, addr, &config, f))
                .await
                .unwrap_or_else(|_| Outcome::Failed("request timed out".into()));
        let mut wait = None;
        let result = match outcome {
            Outcome::Reply(v) => {
                rotation.handle_success();
                if v.get("code").and_then(Value::as_str) == Some("forbidden")
                    && matches!(f, Fetch::Reach(..))
                    && last_warn.is_none_or(|t| t.elapsed() >= crate::stats::LOG_EVERY)
                {
                    last_warn = Some(Instant::now());
                    tracing::error!(
                        registry = addr,
                        "registry refused the beacon token: every punch and relay is refused"
                    );
                }
                Some(v)
            }
            Outcome::Failed(e) => {
                client = None;
                wait = Some(rotation.handle_failure(jitter_sample()));
                if last_warn.is_none_or(|t| t.elapsed() >= crate::stats::LOG_EVERY) {
                    last_warn = Some(Instant::now());
                    let next = config.registry.get(rotation.current());
                    tracing::warn!(worker, registry = addr, next, error = %e, "registry fetch failed");
                }
                None
            }
        };
        let Some(s) = shared.upgrade() else { return };
        s.complete(f, result);
        drop(s);
        if let Some(wait) = wait {
            // Back off while the registry is unreachable; misses meanwhile stay pending.
            tokio::time::sleep(wait).await;
        }
    }
}

async fn fetch(
    client: &mut Option<Client<RegistryStream>>,
    addr: &str,
    config: &CacheConfig,
    f: Fetch,
) -> Outcome {
    if client.is_none() {
        match Client::connect_with(addr, &config.transport).await {
            Ok(c) => *client = Some(c),
            Err(e) => return Outcome::Failed(format!("connecting to {addr}: {e}")),
        }
    }
    let Some(c) = client.as_mut() else {
        return Outcome::Failed("no connection".into());
    };
    let req = match f {
        Fetch::Key(node) => json!({"type": "lookup", "node_id": node}),
        Fetch::Reach(from, to) => json!({
            "type": "reachable",
            "from": from,
            "to": to,
            "beacon_token": config.beacon_token,
        }),
    };
    match c.call_raw(&req).await {
        Ok(v) if v.get("code").and_then(Value::as_str) == Some("throttled") => {
            Outcome::Failed("registry throttled the beacon".into())
        }
        Ok(v) => Outcome::Reply(v),
        Err(ClientError::Refused { message, .. }) => Outcome::Failed(message),
        Err(e) => Outcome::Failed(e.to_string()),
    }
}

/// What a start-up check of the registry found.
#[derive(Debug, thiserror::Error)]
pub enum TokenCheck {
    /// The registry answered and refuses the token: nothing would ever be allowed.
    #[error("the registry at {registry} refuses this beacon's token: {reason}")]
    Refused {
        /// The registry asked.
        registry: String,
        /// Its answer.
        reason: String,
    },
    /// The registry could not be asked now; the beacon asks again as requests come.
    #[error("the registry at {registry} cannot be asked now: {reason}")]
    Unreachable {
        /// The registry asked.
        registry: String,
        /// Why.
        reason: String,
    },
}

/// Asks the registry once whether it takes [`CacheConfig::beacon_token`] (a `reachable`
/// question about node 0, which the registry answers only for a right token), within
/// [`CacheConfig::request_timeout`] per address: the addresses in order until one answers.
pub async fn check_token(config: &CacheConfig) -> Result<(), TokenCheck> {
    let mut last = None;
    for addr in config.registry.as_slice() {
        match tokio::time::timeout(config.request_timeout, check_one(config, addr)).await {
            Ok(Err(e @ TokenCheck::Unreachable { .. })) => last = Some(e),
            Ok(r) => return r,
            Err(_) => {
                last = Some(TokenCheck::Unreachable {
                    registry: addr.clone(),
                    reason: "no answer in time".into(),
                })
            }
        }
    }
    Err(last.unwrap_or_else(|| TokenCheck::Unreachable {
        registry: config.registry.to_string(),
        reason: "no address".into(),
    }))
}

/// [`check_token`] at one address.
async fn check_one(config: &CacheConfig, addr: &str) -> Result<(), TokenCheck> {
    let unreachable = |reason: String| TokenCheck::Unreachable {
        registry: addr.to_owned(),
        reason,
    };
    let mut c = Client::connect_with(addr, &config.transport)
        .await
        .map_err(|e| unreachable(format!("connecting: {e}")))?;
    let req = json!({"type": "reachable", "from": 0, "to": 0,
                     "beacon_token": config.beacon_token});
    let v = c
        .call_raw(&req)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    if v.get("type").and_then(Value::as_str) != Some("error") {
        return Ok(());
    }
    let text = |k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    if text("code") == "forbidden" {
        return Err(TokenCheck::Refused {
            registry: addr.to_owned(),
            reason: text("error"),
        });
    }
    // Anything else (a v1 registry without `reachable`, a throttled request) says nothing
    // about the token.
    Err(unreachable(format!("{} ({})", text("error"), text("code"))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_bounded_and_stale_served() {
        let now = Instant::now();
        let mut t: Table<u32, bool> = Table::new();
        let c = |s: u64| Cached {
            value: true,
            fresh_until: now + Duration::from_secs(s),
            usable_until: now + Duration::from_secs(2 * s),
        };
        for k in 0..100 {
            t.insert(k, c(10), 50, now);
        }
        assert!(t.map.len() <= 50);
        t.insert(1000, c(10), 50, now);
        assert_eq!(t.get(&1000, now), (Some(true), false));
        assert_eq!(
            t.get(&1000, now + Duration::from_secs(15)),
            (Some(true), true),
            "stale but usable: served, refresh wanted"
        );
        assert_eq!(t.get(&1000, now + Duration::from_secs(25)), (None, true));
    }

    #[test]
    fn lookup_reply_parsing() {
        let k = [7u8; 32];
        let vk = ed25519_dalek::SigningKey::from_bytes(&k).verifying_key();
        let b64 = tunnel::registry::auth::b64(vk.as_bytes());
        assert_eq!(
            key_from_lookup(&json!({"type": "lookup_ok", "public_key": b64})),
            Some(vk.to_bytes())
        );
        assert_eq!(
            key_from_lookup(&json!({"error": "node 3 is not registered"})),
            None
        );
        assert_eq!(
            key_from_lookup(&json!({"type": "lookup_ok", "public_key": "xx"})),
            None
        );
    }
}
