//! The interface between the trust service and its callers (the IPC server, pilotctl through
//! it): one command per handshake operation (v1 wire §6.4), answered with the JSON body of the
//! IPC `HandshakeOk` reply (`tunnel::ipc::HandshakeStatus`, `PendingList`, `TrustedList`).

use tokio::sync::{mpsc, oneshot};

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

/// One operation and where its answer goes: the `HandshakeOk` JSON body, or an error text.
#[derive(Debug)]
pub struct TrustCmd {
    /// The operation.
    pub op: TrustOp,
    /// The answer.
    pub reply: oneshot::Sender<Result<serde_json::Value, String>>,
}

/// How callers reach the trust service.
pub type TrustSender = mpsc::Sender<TrustCmd>;
