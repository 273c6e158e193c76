//! What the node has learned from the registry about other nodes (hostname, key, endpoint,
//! visibility), kept so that peers it already knows stay reachable by name while the
//! registry is unreachable.
//!
//! # Layer and invariants
//!
//! - Daemon layer, pure data: no I/O, no clock. The registry link owns it, feeds it every
//!   successful `lookup`, `resolve` and `resolve_hostname` answer, and asks it only when the
//!   registry cannot be asked (the registry is the authority whenever it answers).
//! - A hostname maps to at most one node and a node has at most one hostname: learning that
//!   a name moved removes the old mapping.
//! - At most [`MAX_PEERS`] nodes are kept; learning one more forgets the one learned least
//!   recently.
//! - Answers built from the cache carry `"stale": true`, so a caller can tell them from the
//!   registry's.

use std::collections::HashMap;
use std::net::SocketAddr;

use serde_json::{json, Value};
use tunnel::registry::auth::{b64, decode_key};
use tunnel::Addr;

/// Most nodes remembered.
pub const MAX_PEERS: usize = 4096;

/// What is known of one node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerEntry {
    /// Its hostname.
    pub hostname: Option<String>,
    /// Its registered Ed25519 key.
    pub key: Option<[u8; 32]>,
    /// Its UDP endpoint, as the registry last resolved it.
    pub endpoint: Option<SocketAddr>,
    /// Whether it is public.
    pub public: Option<bool>,
    /// When it was last learned (a counter, for eviction).
    learned: u64,
}

/// The cache. See the module docs.
#[derive(Debug, Default)]
pub struct PeerCache {
    nodes: HashMap<u32, PeerEntry>,
    names: HashMap<String, u32>,
    tick: u64,
}

fn node_of(v: &Value) -> Option<u32> {
    v.get("node_id")
        .and_then(Value::as_u64)
        .and_then(|n| u32::try_from(n).ok())
        .filter(|&n| n != 0)
}

impl PeerCache {
    /// An empty cache.
    pub fn new() -> PeerCache {
        PeerCache::default()
    }

    /// How many nodes are known.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether no node is known.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// What is known of `node`.
    pub fn get(&self, node: u32) -> Option<&PeerEntry> {
        self.nodes.get(&node)
    }

    fn entry(&mut self, node: u32) -> &mut PeerEntry {
        self.tick += 1;
        if !self.nodes.contains_key(&node) && self.nodes.len() >= MAX_PEERS {
            let oldest = self
                .nodes
                .iter()
                .min_by_key(|(_, e)| e.learned)
                .map(|(&n, _)| n);
            if let Some(n) = oldest {
                self.forget(n);
            }
        }
        let tick = self.tick;
        let e = self.nodes.entry(node).or_default();
        e.learned = tick;
        e
    }

    fn forget(&mut self, node: u32) {
        if let Some(h) = self.nodes.remove(&node).and_then(|e| e.hostname) {
            if self.names.get(&h) == Some(&node) {
                self.names.remove(&h);
            }
        }
    }

    fn set_hostname(&mut self, node: u32, hostname: Option<String>) {
        let old = self.entry(node).hostname.take();
        if let Some(o) = old {
            if self.names.get(&o) == Some(&node) {
                self.names.remove(&o);
            }
        }
        if let Some(h) = hostname.filter(|h| !h.is_empty()) {
            if let Some(prev) = self.names.insert(h.clone(), node) {
                if prev != node {
                    if let Some(e) = self.nodes.get_mut(&prev) {
                        e.hostname = None;
                    }
                }
            }
            self.entry(node).hostname = Some(h);
        }
    }

    /// Learns from the registry's answer `reply` to the request `req`.
    pub fn learn(&mut self, req: &Value, reply: &Value) {
        match req.get("type").and_then(Value::as_str).unwrap_or_default() {
            "lookup" => {
                let Some(node) = node_of(reply) else { return };
                let key = reply
                    .get("public_key")
                    .and_then(Value::as_str)
                    .and_then(|k| decode_key(k).ok());
                let public = reply.get("public").and_then(Value::as_bool);
                let hostname = reply
                    .get("hostname")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                self.set_hostname(node, hostname);
                let e = self.entry(node);
                if key.is_some() {
                    e.key = key;
                }
                if public.is_some() {
                    e.public = public;
                }
                if let Some(ep) = reply
                    .get("real_addr")
                    .and_then(Value::as_str)
                    .and_then(|a| a.parse().ok())
                {
                    e.endpoint = Some(ep);
                }
            }
            "resolve" => {
                let Some(node) = node_of(reply).or_else(|| node_of(req)) else {
                    return;
                };
                if let Some(ep) = reply
                    .get("real_addr")
                    .and_then(Value::as_str)
                    .and_then(|a| a.parse().ok())
                {
                    self.learn_endpoint(node, ep);
                }
            }
            "resolve_hostname" => {
                let Some(node) = node_of(reply) else { return };
                let hostname = reply
                    .get("hostname")
                    .or_else(|| req.get("hostname"))
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                self.set_hostname(node, hostname);
                if let Some(p) = reply.get("public").and_then(Value::as_bool) {
                    self.entry(node).public = Some(p);
                }
            }
            _ => {}
        }
    }

    /// Learns a node's registered key.
    pub fn learn_key(&mut self, node: u32, key: [u8; 32]) {
        self.entry(node).key = Some(key);
    }

    /// Learns a node's endpoint.
    pub fn learn_endpoint(&mut self, node: u32, endpoint: SocketAddr) {
        self.entry(node).endpoint = Some(endpoint);
    }

    /// The node holding `hostname`, if known.
    pub fn node_named(&self, hostname: &str) -> Option<u32> {
        self.names.get(hostname).copied()
    }

    /// The answer the registry would give to `req`, built from what is known and marked
    /// `"stale": true`; `None` when the request is not a lookup of a known node or name.
    pub fn answer(&self, req: &Value) -> Option<Value> {
        match req.get("type").and_then(Value::as_str)? {
            "lookup" => {
                let node = node_of(req)?;
                let e = self.nodes.get(&node)?;
                let key = e.key?;
                let mut v = json!({
                    "type": "lookup_ok",
                    "node_id": node,
                    "address": Addr::new(0, node).to_string(),
                    "public_key": b64(&key),
                    "public": e.public.unwrap_or(false),
                    "stale": true,
                });
                if let Some(h) = &e.hostname {
                    v["hostname"] = json!(h);
                }
                Some(v)
            }
            "resolve" => {
                let node = node_of(req)?;
                let ep = self.nodes.get(&node)?.endpoint?;
                Some(json!({
                    "type": "resolve_ok",
                    "node_id": node,
                    "real_addr": ep.to_string(),
                    "stale": true,
                }))
            }
            "resolve_hostname" => {
                let name = req.get("hostname").and_then(Value::as_str)?;
                let node = self.node_named(name)?;
                let mut v = json!({
                    "type": "resolve_hostname_ok",
                    "node_id": node,
                    "address": Addr::new(0, node).to_string(),
                    "hostname": name,
                    "stale": true,
                });
                if let Some(p) = self.nodes.get(&node).and_then(|e| e.public) {
                    v["public"] = json!(p);
                }
                Some(v)
            }
            _ => None,
        }
    }

    /// What a request the cache cannot answer was about, for the error (`"bob"`, `node 7`);
    /// `None` for requests that are not lookups.
    pub fn subject(req: &Value) -> Option<String> {
        match req.get("type").and_then(Value::as_str)? {
            "resolve_hostname" => Some(format!(
                "{:?}",
                req.get("hostname")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
            )),
            "lookup" | "resolve" => Some(format!("node {}", node_of(req)?)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn key(b: u8) -> String {
        b64(&[b; 32])
    }

    #[test]
    fn lookups_teach_names_keys_and_endpoints_and_answers_are_stale() {
        let mut c = PeerCache::new();
        c.learn(
            &json!({"type": "lookup", "node_id": 7}),
            &json!({"type": "lookup_ok", "node_id": 7, "public_key": key(1), "public": false,
                    "hostname": "bob"}),
        );
        c.learn(
            &json!({"type": "resolve", "node_id": 7, "requester_id": 3}),
            &json!({"type": "resolve_ok", "node_id": 7, "real_addr": "10.0.0.2:4000"}),
        );
        let r = c
            .answer(&json!({"type": "resolve_hostname", "hostname": "bob"}))
            .unwrap();
        assert_eq!(r["node_id"], 7);
        assert_eq!(r["stale"], true);
        assert_eq!(r["public"], false);
        let l = c.answer(&json!({"type": "lookup", "node_id": 7})).unwrap();
        assert_eq!(l["public_key"], key(1));
        assert_eq!(l["hostname"], "bob");
        let e = c
            .answer(&json!({"type": "resolve", "node_id": 7, "requester_id": 3}))
            .unwrap();
        assert_eq!(e["real_addr"], "10.0.0.2:4000");
        assert!(c
            .answer(&json!({"type": "resolve_hostname", "hostname": "eve"}))
            .is_none());
        assert!(c.answer(&json!({"type": "lookup", "node_id": 8})).is_none());
        assert!(c
            .answer(&json!({"type": "set_hostname", "hostname": "bob"}))
            .is_none());
    }

    #[test]
    fn a_name_that_moves_leaves_its_old_node() {
        let mut c = PeerCache::new();
        c.learn(
            &json!({"type": "resolve_hostname", "hostname": "bob"}),
            &json!({"type": "resolve_hostname_ok", "node_id": 7, "hostname": "bob", "public": true}),
        );
        c.learn(
            &json!({"type": "resolve_hostname", "hostname": "bob"}),
            &json!({"type": "resolve_hostname_ok", "node_id": 9, "hostname": "bob"}),
        );
        assert_eq!(c.node_named("bob"), Some(9));
        assert_eq!(c.get(7).unwrap().hostname, None);
        // Node 9 renamed: the old name is free.
        c.learn(
            &json!({"type": "lookup", "node_id": 9}),
            &json!({"type": "lookup_ok", "node_id": 9, "public_key": key(2), "hostname": "robert"}),
        );
        assert_eq!(c.node_named("bob"), None);
        assert_eq!(c.node_named("robert"), Some(9));
    }

    #[test]
    fn the_least_recently_learned_node_is_forgotten_when_full() {
        let mut c = PeerCache::new();
        for n in 1..=MAX_PEERS as u32 {
            c.learn_key(n, [1; 32]);
        }
        c.learn(
            &json!({"type": "resolve_hostname", "hostname": "first"}),
            &json!({"type": "resolve_hostname_ok", "node_id": 1, "hostname": "first"}),
        );
        c.learn_key(MAX_PEERS as u32 + 1, [2; 32]);
        assert_eq!(c.len(), MAX_PEERS);
        // Node 1 was learned again, so node 2 went.
        assert!(c.get(1).is_some());
        assert!(c.get(2).is_none());
        assert_eq!(c.node_named("first"), Some(1));
    }

    #[test]
    fn malformed_answers_teach_nothing() {
        let mut c = PeerCache::new();
        c.learn(
            &json!({"type": "lookup", "node_id": 7}),
            &json!({"node_id": "seven"}),
        );
        c.learn(
            &json!({"type": "resolve_hostname", "hostname": "x"}),
            &json!({"node_id": 0}),
        );
        c.learn(
            &json!({"type": "resolve", "node_id": 7}),
            &json!({"real_addr": "not an address"}),
        );
        assert!(c.get(7).is_none_or(|e| e.endpoint.is_none()));
        assert_eq!(c.node_named("x"), None);
    }
}
