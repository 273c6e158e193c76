//! Prometheus metrics of the registry (text format 0.0.4), served on an optional HTTP listener
//! bound to loopback by default.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::state::Counts;

type Labels = Vec<(String, String)>;

const LATENCY_BUCKETS: [f64; 13] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

fn latency() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// The registry's metrics. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
    requests: Family<Labels, Counter>,
    errors: Family<Labels, Counter>,
    duration: Family<Labels, Histogram, fn() -> Histogram>,
    dropped: Family<Labels, Counter>,
    commits: Counter,
    committed_mutations: Counter,
    commit_seconds: Histogram,
    nodes: Gauge,
    online: Gauge,
    trust_pairs: Gauge,
    networks: Gauge,
    pending: Gauge,
    connections: Gauge,
    uptime: Gauge,
    /// Requests of every type, for the dashboard.
    total: Arc<AtomicU64>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let mut r = Registry::default();
        let m = Metrics {
            registry: Arc::new(Mutex::new(Registry::default())),
            requests: Family::default(),
            errors: Family::default(),
            duration: Family::new_with_constructor(latency as fn() -> Histogram),
            dropped: Family::default(),
            commits: Counter::default(),
            committed_mutations: Counter::default(),
            commit_seconds: latency(),
            nodes: Gauge::default(),
            online: Gauge::default(),
            trust_pairs: Gauge::default(),
            networks: Gauge::default(),
            pending: Gauge::default(),
            connections: Gauge::default(),
            uptime: Gauge::default(),
            total: Arc::default(),
        };
        r.register("pilot_requests", "Requests by type", m.requests.clone());
        r.register("pilot_errors", "Refused requests by type", m.errors.clone());
        r.register(
            "pilot_request_duration_seconds",
            "Request handling time by type, commit included",
            m.duration.clone(),
        );
        r.register(
            "pilot_dropped",
            "Connections or requests dropped, by reason",
            m.dropped.clone(),
        );
        r.register(
            "pilot_store_commits",
            "Store transactions",
            m.commits.clone(),
        );
        r.register(
            "pilot_store_mutations",
            "Mutations committed",
            m.committed_mutations.clone(),
        );
        r.register(
            "pilot_store_commit_seconds",
            "Store transaction time",
            m.commit_seconds.clone(),
        );
        r.register("pilot_nodes_total", "Registered nodes", m.nodes.clone());
        r.register(
            "pilot_nodes_online",
            "Nodes heard from within 3 minutes",
            m.online.clone(),
        );
        r.register(
            "pilot_trust_links",
            "Mutual trust pairs",
            m.trust_pairs.clone(),
        );
        r.register(
            "pilot_networks",
            "Networks, the backbone included",
            m.networks.clone(),
        );
        r.register(
            "pilot_handshake_requests_pending",
            "Trust requests waiting in inboxes",
            m.pending.clone(),
        );
        r.register(
            "pilot_connections",
            "Open client connections",
            m.connections.clone(),
        );
        r.register(
            "pilot_uptime_seconds",
            "Seconds since start",
            m.uptime.clone(),
        );
        *m.registry.lock().unwrap_or_else(|p| p.into_inner()) = r;
        m
    }

    /// Records one handled request.
    pub fn request(&self, kind: &str, ok: bool, started: Instant) {
        self.total.fetch_add(1, Ordering::Relaxed);
        let l = vec![("type".to_owned(), kind.to_owned())];
        self.requests.get_or_create(&l).inc();
        if !ok {
            self.errors.get_or_create(&l).inc();
        }
        self.duration
            .get_or_create(&l)
            .observe(started.elapsed().as_secs_f64());
    }

    /// Requests handled since start, every type.
    pub fn requests_total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Counts something dropped.
    pub fn dropped(&self, reason: &str) {
        self.dropped
            .get_or_create(&vec![("reason".to_owned(), reason.to_owned())])
            .inc();
    }

    /// Records one store transaction.
    pub fn commit(&self, mutations: usize, _jobs: usize, took: Duration) {
        self.commits.inc();
        self.committed_mutations.inc_by(mutations as u64);
        self.commit_seconds.observe(took.as_secs_f64());
    }

    /// Renders every metric, with gauges set from `counts`.
    pub fn render(&self, counts: Counts, connections: usize, uptime: u64) -> String {
        self.nodes.set(counts.nodes as i64);
        self.online.set(counts.online as i64);
        self.trust_pairs.set(counts.trust_pairs as i64);
        self.networks.set(counts.networks as i64);
        self.pending.set(counts.pending_requests as i64);
        self.connections.set(connections as i64);
        self.uptime.set(uptime as i64);
        let mut out = String::new();
        let r = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        if encode(&mut out, &r).is_err() {
            out.clear();
        }
        out
    }
}
