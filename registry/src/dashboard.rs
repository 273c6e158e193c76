//! The registry's dashboard data (layer: registry service, HTTP side): the `/api/stats` JSON
//! of v1's `rendezvous -http` (wire §4.10) and the request-rate window behind it.
//!
//! Invariants:
//! - No IP address, endpoint, key, owner or hostname is ever part of [`Stats`]: nodes appear
//!   only by their virtual address ([`NodeStats::address`]).
//! - v1's field names are kept exactly; the extensions ([`Stats::request_rate`],
//!   [`Stats::nodes_truncated`], [`Stats::edges_truncated`], [`NodeStats::networks`]) are extra
//!   fields, which v1 tooling ignores.
//! - The lists are bounded ([`Limits`]): a registry of any size is summarised in one pass
//!   under the state lock (see `State::dashboard`), and only the listed nodes are copied.
//!   The totals always cover every node.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Most nodes listed in [`Stats::nodes`] by default (the lowest addresses).
pub const MAX_LISTED_NODES: usize = 5_000;
/// Most trust pairs listed in [`Stats::edges`] by default (pairs between listed nodes).
pub const MAX_LISTED_EDGES: usize = 20_000;
/// The window [`RateWindow`] averages the request rate over.
pub const RATE_WINDOW: Duration = Duration::from_secs(60);

/// Bounds of the lists in [`Stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most nodes listed.
    pub nodes: usize,
    /// Most edges listed.
    pub edges: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            nodes: MAX_LISTED_NODES,
            edges: MAX_LISTED_EDGES,
        }
    }
}

/// `/api/stats` (v1 wire §4.10, field names as v1 spells them).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Registered nodes.
    pub total_nodes: u64,
    /// Registered nodes heard from within 3 minutes.
    pub active_nodes: u64,
    /// Mutual trust pairs.
    pub total_trust_links: u64,
    /// Requests handled since start (every type, refusals included).
    pub total_requests: u64,
    /// Distinct tags over the registered nodes.
    pub unique_tags: u64,
    /// Registered nodes advertising task execution.
    pub task_executors: u64,
    /// Every network, the backbone (every registered node) first.
    pub networks: Vec<NetworkStats>,
    /// Registered nodes sorted by address; at most [`Limits::nodes`], the lowest addresses.
    pub nodes: Vec<NodeStats>,
    /// Trust pairs between listed nodes, `source` < `target`, sorted; at most
    /// [`Limits::edges`].
    pub edges: Vec<Edge>,
    /// Seconds since the registry started.
    pub uptime_secs: u64,
    /// Extension: requests per second over the last minute.
    #[serde(default)]
    pub request_rate: f64,
    /// Extension: `nodes` omits registered nodes (the limit was reached).
    #[serde(default)]
    pub nodes_truncated: bool,
    /// Extension: `edges` omits trust pairs between listed nodes (the limit was reached).
    #[serde(default)]
    pub edges_truncated: bool,
}

/// One network in [`Stats::networks`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkStats {
    /// Network ID (0: the backbone).
    pub id: u16,
    /// Network name.
    pub name: String,
    /// Members (for the backbone: every registered node).
    pub members: u64,
    /// Members heard from within 3 minutes.
    pub online_members: u64,
}

/// One node in [`Stats::nodes`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStats {
    /// Virtual address on the backbone, e.g. `0:0000.0000.002A`.
    pub address: String,
    /// Tags.
    pub tags: Vec<String>,
    /// Heard from within 3 minutes.
    pub online: bool,
    /// Mutual trust pairs the node is part of.
    pub trust_links: u64,
    /// Advertises task execution.
    pub task_exec: bool,
    /// Reputation.
    pub polo_score: i64,
    /// Extension: the networks the node is a member of, the backbone left out.
    #[serde(default)]
    pub networks: Vec<u16>,
}

/// One trust pair in [`Stats::edges`], by virtual address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Edge {
    /// The pair's lower address.
    pub source: String,
    /// The pair's higher address.
    pub target: String,
}

/// Samples of the request counter, for a rate over the last [`RATE_WINDOW`]. Time is passed
/// in.
#[derive(Debug, Default)]
pub struct RateWindow {
    samples: VecDeque<(Instant, u64)>,
}

impl RateWindow {
    /// A window with no samples.
    pub fn new() -> RateWindow {
        RateWindow::default()
    }

    /// Records the counter's value `total` at `now`; samples older than the window are
    /// dropped, except the newest of them (the window's start).
    pub fn sample(&mut self, now: Instant, total: u64) {
        self.samples.push_back((now, total));
        while self.samples.len() > 1
            && self
                .samples
                .get(1)
                .is_some_and(|(t, _)| now.saturating_duration_since(*t) >= RATE_WINDOW)
        {
            self.samples.pop_front();
        }
    }

    /// Requests per second between the oldest kept sample and (`now`, `total`); 0 without a
    /// sample at least one second old.
    pub fn rate(&self, now: Instant, total: u64) -> f64 {
        let Some((t, n)) = self.samples.front() else {
            return 0.0;
        };
        let secs = now.saturating_duration_since(*t).as_secs_f64();
        if secs < 1.0 {
            return 0.0;
        }
        total.saturating_sub(*n) as f64 / secs
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::auth::b64;
    use crate::proto::Request;
    use crate::state::{Ctx, Policy, State, STALE_MS};
    use crate::store::{JoinRule, NetworkRecord, NodeRecord, Snapshot};

    /// The fields of v1's `/api/stats` (wire §4.10) and the extensions, nothing else.
    const TOP_KEYS: [&str; 13] = [
        "active_nodes",
        "edges",
        "edges_truncated",
        "networks",
        "nodes",
        "nodes_truncated",
        "request_rate",
        "task_executors",
        "total_nodes",
        "total_requests",
        "total_trust_links",
        "unique_tags",
        "uptime_secs",
    ];

    fn key_of(id: u32) -> [u8; 32] {
        let mut k = [0x5Au8; 32];
        k[..4].copy_from_slice(&id.to_be_bytes());
        k
    }

    fn ip_of(id: u32) -> String {
        format!("198.51.{}.{}", (id >> 8) & 0xFF, id & 0xFF)
    }

    fn node(id: u32, active: bool) -> NodeRecord {
        NodeRecord {
            id,
            public_key: key_of(id),
            owner: Some(format!("owner{id}@example.com")),
            real_addr: Some(format!("{}:4000", ip_of(id)).parse().unwrap()),
            public: id % 2 == 0,
            hostname: Some(format!("secret-host-{id}")),
            tags: Vec::new(),
            polo_score: 0,
            task_exec: false,
            session_auth: false,
            active,
        }
    }

    fn network(id: u16, name: &str) -> NetworkRecord {
        NetworkRecord {
            id,
            name: name.into(),
            join_rule: JoinRule::Open,
            token: Some("join-token-secret".into()),
            created: 1,
            creator: 1,
        }
    }

    fn heartbeat(st: &mut State, node_id: u32, now_ms: u64) {
        let ctx = Ctx {
            peer: "203.0.113.9:5000".parse().unwrap(),
            authed: Some(node_id),
            register_proven: false,
            now_ms,
            unix: 1_000,
            conn: 0,
        };
        let req = Request::Heartbeat {
            node_id,
            signature: String::new(),
            instance: None,
        };
        st.handle(req, &ctx).reply.unwrap().unwrap();
    }

    fn json_keys(v: &serde_json::Value) -> Vec<String> {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    }

    #[test]
    fn an_empty_registry_has_only_the_backbone() {
        let st = State::from_snapshot(Snapshot::default(), Policy::default(), 0);
        let s = st.dashboard(0, Limits::default());
        assert_eq!(
            s,
            Stats {
                networks: vec![NetworkStats {
                    id: 0,
                    name: "backbone".into(),
                    members: 0,
                    online_members: 0,
                }],
                ..Stats::default()
            }
        );
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(json_keys(&v), TOP_KEYS);
        assert_eq!(v["nodes"], serde_json::json!([]));
        assert_eq!(v["edges"], serde_json::json!([]));
    }

    /// Six nodes (6 deregistered), networks "lab" {1, 2, 3} and "ops" {4}; mutual trust
    /// 1-2, 2-3, 1-4 and 1-6, one-sided 5->1; 2 and 4 heard from recently.
    fn sample() -> (State, u64) {
        let mut snap = Snapshot::default();
        for id in 1..=6 {
            let mut n = node(id, id != 6);
            match id {
                1 => n.tags = vec!["gpu".into(), "vision".into()],
                2 => n.tags = vec!["gpu".into()],
                3 => n.task_exec = true,
                4 => n.polo_score = 7,
                6 => n.tags = vec!["gone".into()],
                _ => {}
            }
            snap.nodes.insert(id, n);
        }
        snap.networks.insert(1, network(1, "lab"));
        snap.networks.insert(2, network(2, "ops"));
        snap.members = vec![(1, 1), (1, 2), (1, 3), (2, 4)];
        for (a, b) in [(1, 2), (2, 3), (1, 4), (1, 6)] {
            snap.consents.insert((a, b), 1);
            snap.consents.insert((b, a), 1);
        }
        snap.consents.insert((5, 1), 1);
        let mut st = State::from_snapshot(snap, Policy::default(), 0);
        let now = STALE_MS + 60_000;
        heartbeat(&mut st, 2, now);
        heartbeat(&mut st, 4, now);
        (st, now)
    }

    #[test]
    fn counts_networks_nodes_and_trust() {
        let (st, now) = sample();
        let s = st.dashboard(now, Limits::default());
        assert_eq!(s.total_nodes, 5);
        assert_eq!(s.active_nodes, 2);
        assert_eq!(s.total_trust_links, 4, "every mutual pair, 1-6 included");
        assert_eq!(s.unique_tags, 2, "tags of registered nodes only");
        assert_eq!(s.task_executors, 1);
        let nets: Vec<(u16, &str, u64, u64)> = s
            .networks
            .iter()
            .map(|n| (n.id, n.name.as_str(), n.members, n.online_members))
            .collect();
        assert_eq!(
            nets,
            [(0, "backbone", 5, 2), (1, "lab", 3, 1), (2, "ops", 1, 1)]
        );
        let addrs: Vec<&str> = s.nodes.iter().map(|n| n.address.as_str()).collect();
        assert_eq!(
            addrs,
            [
                "0:0000.0000.0001",
                "0:0000.0000.0002",
                "0:0000.0000.0003",
                "0:0000.0000.0004",
                "0:0000.0000.0005"
            ]
        );
        let n1 = &s.nodes[0];
        assert_eq!(n1.tags, ["gpu", "vision"]);
        assert_eq!(n1.trust_links, 3);
        assert!(!n1.online);
        assert_eq!(n1.networks, [1]);
        assert!(s.nodes[1].online && s.nodes[3].online && !s.nodes[4].online);
        assert!(s.nodes[2].task_exec);
        assert_eq!(s.nodes[3].polo_score, 7);
        assert_eq!(s.nodes[4].trust_links, 0, "a one-sided consent is no link");
        let edges: Vec<(&str, &str)> = s
            .edges
            .iter()
            .map(|e| (e.source.as_str(), e.target.as_str()))
            .collect();
        assert_eq!(
            edges,
            [
                ("0:0000.0000.0001", "0:0000.0000.0002"),
                ("0:0000.0000.0001", "0:0000.0000.0004"),
                ("0:0000.0000.0002", "0:0000.0000.0003"),
            ],
            "pairs between registered nodes, sorted"
        );
        assert!(!s.nodes_truncated && !s.edges_truncated);
        // Every node and network object has exactly v1's fields plus the extension.
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(json_keys(&v), TOP_KEYS);
        assert_eq!(
            json_keys(&v["nodes"][0]),
            [
                "address",
                "networks",
                "online",
                "polo_score",
                "tags",
                "task_exec",
                "trust_links"
            ]
        );
        assert_eq!(
            json_keys(&v["networks"][1]),
            ["id", "members", "name", "online_members"]
        );
        assert_eq!(json_keys(&v["edges"][0]), ["source", "target"]);
    }

    #[test]
    fn no_ip_key_owner_hostname_or_token_in_the_json() {
        let (st, now) = sample();
        let text = serde_json::to_string(&st.dashboard(now, Limits::default())).unwrap();
        for id in 1..=6u32 {
            let key = key_of(id);
            for secret in [
                b64(&key),
                key.iter().map(|b| format!("{b:02x}")).collect(),
                ip_of(id),
                format!("owner{id}"),
                format!("secret-host-{id}"),
            ] {
                assert!(!text.contains(&secret), "{secret} appears in {text}");
            }
        }
        for word in [
            "203.0.113.9",
            "join-token-secret",
            "real_addr",
            "public_key",
            "hostname",
            "owner",
            "endpoint",
        ] {
            assert!(!text.contains(word), "{word} appears in {text}");
        }
    }

    #[test]
    fn lists_are_bounded_and_totals_are_not() {
        const N: u32 = 100_000;
        let mut snap = Snapshot::default();
        for id in 1..=N {
            let mut n = node(id, true);
            n.tags = vec![format!("t{}", id % 1000)];
            snap.nodes.insert(id, n);
        }
        // A chain of trust over every node.
        for id in 1..N {
            snap.consents.insert((id, id + 1), 1);
            snap.consents.insert((id + 1, id), 1);
        }
        let st = State::from_snapshot(snap, Policy::default(), 0);
        let limits = Limits {
            nodes: 1000,
            edges: 500,
        };
        let t = Instant::now();
        let s = st.dashboard(1, limits);
        let took = t.elapsed();
        println!("dashboard of {N} nodes and {} pairs: {took:?}", N - 1);
        assert_eq!(s.total_nodes, u64::from(N));
        assert_eq!(s.active_nodes, u64::from(N));
        assert_eq!(s.total_trust_links, u64::from(N - 1));
        assert_eq!(s.unique_tags, 1000);
        assert_eq!(s.nodes.len(), 1000);
        assert!(s.nodes_truncated);
        assert_eq!(s.nodes[0].address, "0:0000.0000.0001");
        assert_eq!(s.nodes[999].address, "0:0000.0000.03E8");
        assert!(s.nodes.windows(2).all(|w| w[0].address < w[1].address));
        // The last listed node's pair with an unlisted one still counts for it.
        assert_eq!(s.nodes[999].trust_links, 2);
        assert_eq!(s.edges.len(), 500);
        assert!(s.edges_truncated);
        assert_eq!(s.edges[499].target, "0:0000.0000.01F5");
        // One pass over the state: far below a second even unoptimised.
        assert!(took < Duration::from_secs(2), "{took:?}");
    }

    #[test]
    fn rate_is_over_the_last_minute() {
        let t0 = Instant::now();
        let mut w = RateWindow::new();
        assert_eq!(w.rate(t0, 100), 0.0);
        w.sample(t0, 0);
        assert_eq!(w.rate(t0, 50), 0.0, "less than a second of history");
        // 10 requests per second for 30 s.
        for s in 1..=30u64 {
            w.sample(t0 + Duration::from_secs(s), s * 10);
        }
        assert!((w.rate(t0 + Duration::from_secs(30), 300) - 10.0).abs() < 1e-9);
        // Then 100 per second for two minutes: the first phase leaves the window.
        for s in 31..=150u64 {
            w.sample(t0 + Duration::from_secs(s), 300 + (s - 30) * 100);
        }
        let now = t0 + Duration::from_secs(150);
        assert!((w.rate(now, 300 + 120 * 100) - 100.0).abs() < 1e-9);
        assert!(w.samples.len() <= 62, "{} samples kept", w.samples.len());
    }
}
