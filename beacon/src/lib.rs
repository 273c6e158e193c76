//! The Pilot beacon: endpoint discovery, hole-punch coordination and relay over UDP (v1 wire
//! §5), stricter than v1 about who may punch or relay to whom.

/// What the beacon needs to know from the registry. Implementations answer from memory: the
/// beacon calls them on its packet path and must never wait on the network there.
pub trait Authority: Send + Sync + 'static {
    /// The Ed25519 public key registered for `node`, if the node is known.
    fn node_key(&self, node: u32) -> Option<[u8; 32]>;
    /// Whether `from` may learn `to`'s endpoint and send it relayed traffic: the registry's
    /// resolve rule (`to` is public, the two share a non-backbone network, or they hold a
    /// mutual trust pair).
    fn may_reach(&self, from: u32, to: u32) -> bool;
}
