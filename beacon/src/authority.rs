//! Where the beacon's answers about nodes come from.
//!
//! - [`OpenAuthority`]: v1 behaviour, no registry; every node may reach every other node.
//! - [`StaticAuthority`]: fixed keys and pairs held in memory, for tests, benchmarks and
//!   small fixed deployments.
//! - [`crate::RegistryAuthority`]: a cache of a remote registry.
//!
//! This crate does not link the registry server. A registry in the same process becomes an
//! authority through a newtype whose methods call `pilot_registry::Registry::node_key` and
//! `may_reach` (the beacon's tests do so).

use std::collections::{HashMap, HashSet};
use std::sync::RwLock;

/// An answer that may not be known yet because a cache is still fetching it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer<T> {
    /// The answer.
    Ready(T),
    /// A fetch is under way; ask again shortly.
    Pending,
}

/// What the beacon needs to know from the registry. Implementations answer from memory: the
/// beacon calls them on its packet path and must never wait on the network there.
pub trait Authority: Send + Sync + 'static {
    /// The Ed25519 public key registered for `node`, if the node is known.
    fn node_key(&self, node: u32) -> Option<[u8; 32]>;

    /// Whether `from` may learn `to`'s endpoint and send it relayed traffic: the registry's
    /// resolve rule (`to` is public, the two share a non-backbone network, or they hold a
    /// mutual trust pair).
    fn may_reach(&self, from: u32, to: u32) -> bool;

    /// Like [`Authority::node_key`], but tells "unknown" from "not fetched yet". The beacon
    /// holds a Discover or PunchRequest back for a few seconds on [`Answer::Pending`] instead
    /// of refusing it. Authorities with complete state keep this default.
    fn node_key_answer(&self, node: u32) -> Answer<Option<[u8; 32]>> {
        Answer::Ready(self.node_key(node))
    }

    /// Like [`Authority::may_reach`], but tells "no" from "not fetched yet".
    fn may_reach_answer(&self, from: u32, to: u32) -> Answer<bool> {
        Answer::Ready(self.may_reach(from, to))
    }

    /// Whether this authority knows the set of nodes. When it does (the default), the beacon
    /// stores entries only for nodes with a key. When it does not ([`OpenAuthority`]), every
    /// node ID is accepted and no Discover can be verified.
    fn knows_nodes(&self) -> bool {
        true
    }
}

/// Pilot v1's behaviour: no registry, no keys, everyone may reach everyone.
///
/// **Insecure**: every entry is weak (unsigned), so anyone who can send a UDP datagram to the
/// beacon can take over any node's entry and receive its punch and relay traffic, and any
/// node can make the beacon relay to any other. Use it only on networks where every sender is
/// trusted, or for compatibility tests.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenAuthority;

impl Authority for OpenAuthority {
    fn node_key(&self, _node: u32) -> Option<[u8; 32]> {
        None
    }

    fn may_reach(&self, _from: u32, _to: u32) -> bool {
        true
    }

    fn knows_nodes(&self) -> bool {
        false
    }
}

/// Fixed node keys and reachability held in memory. Replaces a registry in tests and
/// benchmarks; it can be changed while the beacon runs.
#[derive(Debug, Default)]
pub struct StaticAuthority {
    inner: RwLock<StaticInner>,
}

#[derive(Debug, Default)]
struct StaticInner {
    keys: HashMap<u32, [u8; 32]>,
    pairs: HashSet<(u32, u32)>,
    everyone: bool,
}

impl StaticAuthority {
    /// An authority that knows no nodes.
    pub fn new() -> StaticAuthority {
        StaticAuthority::default()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, StaticInner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, StaticInner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers `node` with its Ed25519 public key.
    pub fn add_node(&self, node: u32, key: [u8; 32]) -> &Self {
        self.write().keys.insert(node, key);
        self
    }

    /// Forgets `node`.
    pub fn remove_node(&self, node: u32) -> &Self {
        self.write().keys.remove(&node);
        self
    }

    /// Lets `a` and `b` reach each other (both directions).
    pub fn allow(&self, a: u32, b: u32) -> &Self {
        let mut w = self.write();
        w.pairs.insert((a, b));
        w.pairs.insert((b, a));
        self
    }

    /// Withdraws a pair added by [`StaticAuthority::allow`].
    pub fn deny(&self, a: u32, b: u32) -> &Self {
        let mut w = self.write();
        w.pairs.remove(&(a, b));
        w.pairs.remove(&(b, a));
        self
    }

    /// Lets every known node reach every other known node.
    pub fn allow_all(&self) -> &Self {
        self.write().everyone = true;
        self
    }
}

impl Authority for StaticAuthority {
    fn node_key(&self, node: u32) -> Option<[u8; 32]> {
        self.read().keys.get(&node).copied()
    }

    fn may_reach(&self, from: u32, to: u32) -> bool {
        let r = self.read();
        r.keys.contains_key(&from)
            && r.keys.contains_key(&to)
            && (r.everyone || from == to || r.pairs.contains(&(from, to)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_authority_rules() {
        let a = StaticAuthority::new();
        a.add_node(1, [1; 32])
            .add_node(2, [2; 32])
            .add_node(3, [3; 32]);
        assert!(!a.may_reach(1, 2));
        a.allow(1, 2);
        assert!(a.may_reach(1, 2) && a.may_reach(2, 1));
        assert!(!a.may_reach(1, 3));
        assert!(!a.may_reach(1, 9), "unknown target");
        a.allow_all();
        assert!(a.may_reach(1, 3));
        a.remove_node(3);
        assert!(!a.may_reach(1, 3));
        assert_eq!(a.node_key(2), Some([2; 32]));
        assert_eq!(a.node_key_answer(3), Answer::Ready(None));
        assert!(a.knows_nodes());
        assert!(!OpenAuthority.knows_nodes() && OpenAuthority.may_reach(5, 6));
    }
}
