//! The interface between the trust service and its callers (the IPC server, pilotctl through
//! it): one command per handshake operation (v1 wire §6.4), answered with the JSON body of the
//! IPC `HandshakeOk` reply (`tunnel::ipc::HandshakeStatus`, `PendingList`, `TrustedList`),
//! or a [`TrustOpError`]. [`TrustOpError::code`] is the one place a trust failure becomes an
//! IPC error code.

use tokio::sync::{mpsc, oneshot};
use tunnel::ipc::code;

use tunnel::node::CloseReason;

use crate::engine::{DialError, Stopped};
use crate::registry_link::LinkError;

/// A trust operation, owned (the IPC `HandshakeOp` borrows from its frame).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrustOp {
    /// Ask `peer` for trust, with a justification (may be empty).
    Request {
        /// The peer.
        peer: u32,
        /// Why.
        justification: String,
    },
    /// Approve `peer`'s pending request.
    Approve {
        /// The peer.
        peer: u32,
    },
    /// Reject `peer`'s pending request, with a reason (may be empty).
    Reject {
        /// The peer.
        peer: u32,
        /// Why.
        reason: String,
    },
    /// List pending requests.
    Pending,
    /// List trusted peers.
    Trusted,
    /// Withdraw trust in `peer`.
    Revoke {
        /// The peer.
        peer: u32,
    },
}

impl From<tunnel::ipc::HandshakeOp<'_>> for TrustOp {
    fn from(op: tunnel::ipc::HandshakeOp<'_>) -> Self {
        use tunnel::ipc::HandshakeOp as H;
        match op {
            H::Request {
                node,
                justification,
            } => TrustOp::Request {
                peer: node,
                justification: justification.to_owned(),
            },
            H::Approve { node } => TrustOp::Approve { peer: node },
            H::Reject { node, reason } => TrustOp::Reject {
                peer: node,
                reason: reason.to_owned(),
            },
            H::Pending => TrustOp::Pending,
            H::Trusted => TrustOp::Trusted,
            H::Revoke { node } => TrustOp::Revoke { peer: node },
        }
    }
}

/// Why a message to a peer's handshake port was not delivered.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The message is empty or larger than one handshake message may be.
    #[error("message of {0} bytes cannot be sent")]
    Size(usize),
    /// The peer did not accept the connection in time.
    #[error("dialing node {0} timed out")]
    DialTimeout(u32),
    /// The dial failed.
    #[error(transparent)]
    Dial(#[from] DialError),
    /// The engine stopped during the write.
    #[error(transparent)]
    Stopped(#[from] Stopped),
    /// The connection failed before the peer took the message.
    #[error(transparent)]
    Closed(CloseReason),
}

/// Why a trust operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TrustOpError {
    /// The daemon runs without a trust service, or it could not take the command.
    #[error("trust service not running")]
    NotRunning,
    /// The trust service ended before it answered.
    #[error("trust service stopped")]
    Stopped,
    /// The node has no node ID yet.
    #[error("not registered with the registry yet")]
    NotRegistered,
    /// Node 0 was named as the peer.
    #[error("node 0 is not a peer")]
    ZeroPeer,
    /// The node named itself as the peer.
    #[error("a node cannot trust itself")]
    SelfPeer,
    /// A justification or reason exceeds the limit.
    #[error("{what} longer than {max} bytes")]
    TooLong {
        /// `justification` or `reason`.
        what: &'static str,
        /// The limit in bytes.
        max: usize,
    },
    /// There is no pending request from the peer to approve or reject.
    #[error("no pending trust request from node {0}")]
    NoPending(u32),
    /// Revoke of a peer that is not trusted.
    #[error("node {0} is not trusted")]
    NotTrusted(u32),
    /// `trust.json` could not be written.
    #[error("saving {path}: {reason}")]
    Save {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// A reply or the trust file did not serialize.
    #[error("{0}")]
    Encode(String),
    /// A trust request reached the peer neither through the registry nor directly.
    #[error("trust request to node {peer} not delivered: registry: {registry}; direct: {direct}")]
    NotDelivered {
        /// The peer.
        peer: u32,
        /// Why the registry did not relay it.
        registry: LinkError,
        /// Why the direct message failed.
        direct: DeliveryError,
    },
}

impl TrustOpError {
    /// The stable IPC error code ([`tunnel::ipc::code`]) of this failure.
    pub fn code(&self) -> &'static str {
        match self {
            TrustOpError::NotRunning | TrustOpError::Stopped | TrustOpError::NotRegistered => {
                code::UNAVAILABLE
            }
            TrustOpError::ZeroPeer | TrustOpError::SelfPeer | TrustOpError::TooLong { .. } => {
                code::BAD_REQUEST
            }
            TrustOpError::NoPending(_) => code::NOT_FOUND,
            TrustOpError::NotTrusted(_) => code::UNTRUSTED,
            TrustOpError::Save { .. } | TrustOpError::Encode(_) => code::INTERNAL,
            TrustOpError::NotDelivered {
                registry, direct, ..
            } => match (registry, direct) {
                // The registry does not know the node: nothing else can reach it.
                (r, _) if r.code() == code::NOT_FOUND => code::NOT_FOUND,
                (LinkError::Timeout, _) | (_, DeliveryError::DialTimeout(_)) => code::TIMEOUT,
                _ => code::REFUSED,
            },
        }
    }
}

/// What a trust operation is answered with.
pub type TrustReply = Result<serde_json::Value, TrustOpError>;

/// One operation and where its answer goes: the `HandshakeOk` JSON body, or why it failed.
#[derive(Debug)]
pub struct TrustCmd {
    /// The operation.
    pub op: TrustOp,
    /// The answer.
    pub reply: oneshot::Sender<TrustReply>,
}

/// How callers reach the trust service.
pub type TrustSender = mpsc::Sender<TrustCmd>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_trust_failure_maps_to_its_code() {
        let cases: Vec<(TrustOpError, &str)> = vec![
            (TrustOpError::NotRunning, code::UNAVAILABLE),
            (TrustOpError::Stopped, code::UNAVAILABLE),
            (TrustOpError::NotRegistered, code::UNAVAILABLE),
            (TrustOpError::ZeroPeer, code::BAD_REQUEST),
            (TrustOpError::SelfPeer, code::BAD_REQUEST),
            (
                TrustOpError::TooLong {
                    what: "reason",
                    max: 1024,
                },
                code::BAD_REQUEST,
            ),
            (TrustOpError::NoPending(7), code::NOT_FOUND),
            (TrustOpError::NotTrusted(7), code::UNTRUSTED),
            (
                TrustOpError::Save {
                    path: "trust.json".into(),
                    reason: "disk full".into(),
                },
                code::INTERNAL,
            ),
            (TrustOpError::Encode("x".into()), code::INTERNAL),
            (
                TrustOpError::NotDelivered {
                    peer: 7,
                    registry: LinkError::Timeout,
                    direct: DeliveryError::Closed(CloseReason::Reset),
                },
                code::TIMEOUT,
            ),
            (
                TrustOpError::NotDelivered {
                    peer: 7,
                    registry: LinkError::Unreachable,
                    direct: DeliveryError::DialTimeout(7),
                },
                code::TIMEOUT,
            ),
            (
                TrustOpError::NotDelivered {
                    peer: 7,
                    registry: LinkError::Unreachable,
                    direct: DeliveryError::Closed(CloseReason::Refused),
                },
                code::REFUSED,
            ),
            (
                TrustOpError::NotDelivered {
                    peer: 99,
                    registry: LinkError::Refused {
                        code: LinkError::REGISTRY_NOT_FOUND.into(),
                        message: "node 99 is not registered".into(),
                    },
                    direct: DeliveryError::DialTimeout(99),
                },
                code::NOT_FOUND,
            ),
        ];
        for (e, want) in cases {
            assert_eq!(e.code(), want, "{e}");
        }
    }

    #[test]
    fn trust_failures_keep_their_texts() {
        assert_eq!(
            TrustOpError::NoPending(7).to_string(),
            "no pending trust request from node 7"
        );
        assert_eq!(
            TrustOpError::NotTrusted(7).to_string(),
            "node 7 is not trusted"
        );
        assert_eq!(
            TrustOpError::TooLong {
                what: "justification",
                max: 1024
            }
            .to_string(),
            "justification longer than 1024 bytes"
        );
        let e = TrustOpError::NotDelivered {
            peer: 9,
            registry: LinkError::Unreachable,
            direct: DeliveryError::DialTimeout(9),
        };
        assert_eq!(
            e.to_string(),
            "trust request to node 9 not delivered: registry: registry unreachable; direct: \
             dialing node 9 timed out"
        );
    }
}
