//! The registry wire protocol (v1 wire §4.1-§4.3): `[u32 BE length][JSON object]` frames of
//! at most 1 MiB in both directions, one response per request, requests tagged by `"type"`.
//!
//! This module is pure: an incremental frame decoder, the frame encoder, the typed request
//! catalogue, and the ASCII challenge strings v1 signs. The server and the daemon's client both
//! build on it.
//!
//! ```text
//! +----------------+--------------------------------------+
//! | length u32 BE  | JSON object, UTF-8, `length` bytes   |   length <= 1,048,576
//! +----------------+--------------------------------------+
//! ```

use serde::{Deserialize, Serialize};

/// Largest JSON body of one frame.
pub const MAX_FRAME: usize = 1 << 20;
/// Bytes of the length prefix.
pub const LEN_PREFIX: usize = 4;
/// Longest daemon instance ID (extension). A daemon picks a random ID at start and sends it
/// with `register`, `heartbeat` and `deregister` once `hello` succeeded, never to a v1
/// registry; the registry refuses a second live instance of one node (`duplicate_instance`).
pub const MAX_INSTANCE: usize = 64;

/// Why a frame was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length prefix announces more than [`MAX_FRAME`] bytes.
    #[error("frame of {0} bytes exceeds the 1 MiB limit")]
    TooLarge(usize),
}

/// Reassembles frames from a byte stream. Bytes go in as they arrive; whole bodies come out.
/// Memory is bounded by one frame: an oversized length is refused before any body is kept.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        FrameDecoder::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame body, if one has arrived.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        let Some(prefix) = self.buf.get(..LEN_PREFIX) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        if len > MAX_FRAME {
            return Err(FrameError::TooLarge(len));
        }
        if self.buf.len() < LEN_PREFIX + len {
            return Ok(None);
        }
        let body = self.buf[LEN_PREFIX..LEN_PREFIX + len].to_vec();
        self.buf.drain(..LEN_PREFIX + len);
        Ok(Some(body))
    }

    /// Bytes held that do not yet form a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

/// Appends one frame carrying `body` to `out`.
pub fn encode_frame(body: &[u8], out: &mut Vec<u8>) -> Result<(), FrameError> {
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    Ok(())
}

/// A registry request, as v1 sends it (§4.3). Node IDs, ports and network IDs are JSON
/// integers. `signature` is standard base64 of an Ed25519 signature over
/// [`Request::challenge`]; it may be absent for the unsigned operations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// Registers a node with its self-generated key.
    Register {
        /// `host:port` of the node's tunnel socket; the registry keeps only the port.
        #[serde(default)]
        listen_addr: String,
        /// Standard base64 of the 32-byte Ed25519 public key.
        public_key: String,
        /// Optional owner string.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<String>,
        /// Optional hostname, applied in the same step.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        hostname: Option<String>,
        /// Proof of key possession over the session nonce (extension; see [`super::auth`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        proof: Option<String>,
        /// The registering daemon process (extension; see [`MAX_INSTANCE`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        instance: Option<String>,
    },
    /// Public facts about a node.
    Lookup {
        /// The node.
        node_id: u32,
    },
    /// A node's real endpoint, subject to privacy and trust.
    Resolve {
        /// The target.
        node_id: u32,
        /// The node asking.
        requester_id: u32,
        /// Signature by the requester.
        #[serde(default)]
        signature: String,
    },
    /// Liveness.
    Heartbeat {
        /// The node.
        node_id: u32,
        /// Signature.
        #[serde(default)]
        signature: String,
        /// The daemon process sending it (extension; see [`MAX_INSTANCE`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        instance: Option<String>,
    },
    /// Removes the node.
    Deregister {
        /// The node.
        node_id: u32,
        /// Signature.
        #[serde(default)]
        signature: String,
        /// The daemon process sending it (extension; see [`MAX_INSTANCE`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        instance: Option<String>,
    },
    /// Public or private.
    SetVisibility {
        /// The node.
        node_id: u32,
        /// True for public.
        public: bool,
        /// Signature.
        #[serde(default)]
        signature: String,
    },
    /// Sets or clears ("") the hostname.
    SetHostname {
        /// The node.
        node_id: u32,
        /// The name.
        hostname: String,
        /// Signature.
        #[serde(default)]
        signature: String,
    },
    /// Replaces the tag list.
    SetTags {
        /// The node.
        node_id: u32,
        /// The tags (`null` clears).
        #[serde(default)]
        tags: Option<Vec<String>>,
        /// Signature.
        #[serde(default)]
        signature: String,
    },
    /// Advertises task execution.
    SetTaskExec {
        /// The node.
        node_id: u32,
        /// On or off.
        enabled: bool,
        /// Signature.
        #[serde(default)]
        signature: String,
    },
    /// Node for a hostname.
    ResolveHostname {
        /// The name.
        hostname: String,
    },
    /// Reports trust in a peer.
    ReportTrust {
        /// The reporter.
        node_id: u32,
        /// The peer.
        peer_id: u32,
        /// Signature.
        #[serde(default)]
        signature: String,
    },
    /// Withdraws trust.
    RevokeTrust {
        /// The node.
        node_id: u32,
        /// The peer.
        peer_id: u32,
        /// Signature.
        #[serde(default)]
        signature: String,
    },
    /// Asks a node for trust through the registry.
    RequestHandshake {
        /// The requester.
        from_node_id: u32,
        /// The target.
        to_node_id: u32,
        /// Why.
        #[serde(default)]
        justification: String,
        /// Signature by the requester.
        #[serde(default)]
        signature: String,
    },
    /// Drains the node's handshake inboxes.
    PollHandshakes {
        /// The node.
        node_id: u32,
        /// Signature.
        #[serde(default)]
        signature: String,
    },
    /// Answers a handshake request.
    RespondHandshake {
        /// The responder.
        node_id: u32,
        /// The requester.
        peer_id: u32,
        /// Accepted or not.
        accept: bool,
        /// Signature.
        #[serde(default)]
        signature: String,
    },
    /// Replaces the node's key, signed by the current one.
    RotateKey {
        /// The node.
        node_id: u32,
        /// Signature by the current key.
        #[serde(default)]
        signature: String,
        /// Standard base64 of the new key.
        new_public_key: String,
    },
    /// Both endpoints of a pair of nodes (v1 exposes them without a privacy check).
    Punch {
        /// The node asking; must be one of the two.
        requester_id: u32,
        /// First node.
        node_a: u32,
        /// Second node.
        node_b: u32,
        /// Signature by the requester.
        #[serde(default)]
        signature: String,
    },
    /// Reputation score.
    GetPoloScore {
        /// The node.
        node_id: u32,
    },
    /// Adds to the score (unauthenticated in v1).
    UpdatePoloScore {
        /// The node.
        node_id: u32,
        /// The change.
        delta: i64,
        /// Administration token.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        admin_token: Option<String>,
    },
    /// Sets the score (unauthenticated in v1).
    SetPoloScore {
        /// The node.
        node_id: u32,
        /// The score.
        polo_score: i64,
        /// Administration token.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        admin_token: Option<String>,
    },
    /// Every network.
    ListNetworks {},
    /// Members of a network.
    ListNodes {
        /// The network.
        network_id: u16,
    },
    /// Creates a network.
    CreateNetwork {
        /// The creator.
        node_id: u32,
        /// Its name.
        name: String,
        /// `open`, `token` or `invite`.
        #[serde(default)]
        join_rule: String,
        /// Join token for `token` networks.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
        /// Administration token, when the registry has one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        admin_token: Option<String>,
        /// Signature by the node (extension; or an authenticated session).
        #[serde(default)]
        signature: String,
    },
    /// Joins a network.
    JoinNetwork {
        /// The node.
        node_id: u32,
        /// The network.
        network_id: u16,
        /// Join token.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
        /// Inviting member for `invite` networks.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        inviter_id: Option<u32>,
        /// Administration token.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        admin_token: Option<String>,
        /// Signature by the node (extension; or an authenticated session).
        #[serde(default)]
        signature: String,
    },
    /// Leaves a network.
    LeaveNetwork {
        /// The node.
        node_id: u32,
        /// The network.
        network_id: u16,
        /// Administration token.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        admin_token: Option<String>,
        /// Signature by the node (extension; or an authenticated session).
        #[serde(default)]
        signature: String,
    },
    /// A beacon announces itself.
    BeaconRegister {
        /// Non-zero beacon ID.
        beacon_id: u32,
        /// Its UDP address.
        addr: String,
    },
    /// Every live beacon.
    BeaconList {},
    /// A member invites a node into an invite-only network (extension).
    InviteNetwork {
        /// The inviting member.
        node_id: u32,
        /// The network.
        network_id: u16,
        /// The invited node.
        target_id: u32,
        /// Signature by the member (or an authenticated session).
        #[serde(default)]
        signature: String,
    },
    /// Opens session authentication: the reply carries a fresh nonce (extension).
    Hello {},
    /// Binds the connection to a node by signing the session nonce (extension).
    Auth {
        /// The node.
        node_id: u32,
        /// Signature over [`super::auth::session_message`].
        signature: String,
    },
    /// Turns an authenticated connection into a stream of pushed handshake events
    /// (extension).
    Watch {},
    /// Whether `from` may reach `to`; asked by beacons holding the beacon token (extension).
    Reachable {
        /// The node asking for a punch or relay.
        from: u32,
        /// Its target.
        to: u32,
        /// Shared beacon token.
        #[serde(default)]
        beacon_token: String,
    },
    /// Hot-standby stream (§4.9).
    SubscribeReplication {
        /// Shared token.
        token: String,
    },
}

impl Request {
    /// The ASCII string v1 signs for this request (§4.3; node IDs in decimal), or `None` for
    /// unsigned operations.
    pub fn challenge(&self) -> Option<String> {
        use Request::*;
        Some(match self {
            Resolve {
                node_id,
                requester_id,
                ..
            } => format!("resolve:{requester_id}:{node_id}"),
            Heartbeat { node_id, .. } => format!("heartbeat:{node_id}"),
            Deregister { node_id, .. } => format!("deregister:{node_id}"),
            SetVisibility { node_id, .. } => format!("set_visibility:{node_id}"),
            SetHostname { node_id, .. } => format!("set_hostname:{node_id}"),
            SetTags { node_id, .. } => format!("set_tags:{node_id}"),
            SetTaskExec { node_id, .. } => format!("set_task_exec:{node_id}"),
            ReportTrust {
                node_id, peer_id, ..
            } => format!("report_trust:{node_id}:{peer_id}"),
            RevokeTrust {
                node_id, peer_id, ..
            } => format!("revoke_trust:{node_id}:{peer_id}"),
            RequestHandshake {
                from_node_id,
                to_node_id,
                ..
            } => format!("handshake:{from_node_id}:{to_node_id}"),
            PollHandshakes { node_id, .. } => format!("poll_handshakes:{node_id}"),
            RespondHandshake {
                node_id, peer_id, ..
            } => format!("respond:{node_id}:{peer_id}"),
            RotateKey { node_id, .. } => format!("rotate:{node_id}"),
            Punch { node_a, node_b, .. } => format!("punch:{node_a}:{node_b}"),
            CreateNetwork { node_id, name, .. } => format!("create_network:{node_id}:{name}"),
            JoinNetwork {
                node_id,
                network_id,
                ..
            } => format!("join_network:{node_id}:{network_id}"),
            LeaveNetwork {
                node_id,
                network_id,
                ..
            } => format!("leave_network:{node_id}:{network_id}"),
            InviteNetwork {
                node_id,
                network_id,
                target_id,
                ..
            } => format!("invite_network:{node_id}:{network_id}:{target_id}"),
            _ => return None,
        })
    }

    /// The node that must have signed this request (the one [`Request::challenge`] speaks
    /// for), or `None` for unsigned operations.
    pub fn signer(&self) -> Option<u32> {
        use Request::*;
        Some(match self {
            Resolve { requester_id, .. } | Punch { requester_id, .. } => *requester_id,
            RequestHandshake { from_node_id, .. } => *from_node_id,
            Heartbeat { node_id, .. }
            | Deregister { node_id, .. }
            | SetVisibility { node_id, .. }
            | SetHostname { node_id, .. }
            | SetTags { node_id, .. }
            | SetTaskExec { node_id, .. }
            | ReportTrust { node_id, .. }
            | RevokeTrust { node_id, .. }
            | PollHandshakes { node_id, .. }
            | RespondHandshake { node_id, .. }
            | RotateKey { node_id, .. }
            | CreateNetwork { node_id, .. }
            | JoinNetwork { node_id, .. }
            | LeaveNetwork { node_id, .. }
            | InviteNetwork { node_id, .. } => *node_id,
            _ => return None,
        })
    }

    /// The daemon instance named by a `register`, `heartbeat` or `deregister` (extension).
    pub fn instance(&self) -> Option<&str> {
        use Request::*;
        match self {
            Register { instance, .. }
            | Heartbeat { instance, .. }
            | Deregister { instance, .. } => instance.as_deref(),
            _ => None,
        }
    }

    /// The request's `signature` field, if it has one.
    pub fn signature(&self) -> Option<&str> {
        use Request::*;
        match self {
            Resolve { signature, .. }
            | Punch { signature, .. }
            | RequestHandshake { signature, .. }
            | Heartbeat { signature, .. }
            | Deregister { signature, .. }
            | SetVisibility { signature, .. }
            | SetHostname { signature, .. }
            | SetTags { signature, .. }
            | SetTaskExec { signature, .. }
            | ReportTrust { signature, .. }
            | RevokeTrust { signature, .. }
            | PollHandshakes { signature, .. }
            | RespondHandshake { signature, .. }
            | RotateKey { signature, .. }
            | CreateNetwork { signature, .. }
            | JoinNetwork { signature, .. }
            | LeaveNetwork { signature, .. }
            | InviteNetwork { signature, .. } => Some(signature),
            _ => None,
        }
    }

    /// The `type` string of this request.
    pub fn kind(&self) -> &'static str {
        use Request::*;
        match self {
            Register { .. } => "register",
            Lookup { .. } => "lookup",
            Resolve { .. } => "resolve",
            Heartbeat { .. } => "heartbeat",
            Deregister { .. } => "deregister",
            SetVisibility { .. } => "set_visibility",
            SetHostname { .. } => "set_hostname",
            SetTags { .. } => "set_tags",
            SetTaskExec { .. } => "set_task_exec",
            ResolveHostname { .. } => "resolve_hostname",
            ReportTrust { .. } => "report_trust",
            RevokeTrust { .. } => "revoke_trust",
            RequestHandshake { .. } => "request_handshake",
            PollHandshakes { .. } => "poll_handshakes",
            RespondHandshake { .. } => "respond_handshake",
            RotateKey { .. } => "rotate_key",
            Punch { .. } => "punch",
            GetPoloScore { .. } => "get_polo_score",
            UpdatePoloScore { .. } => "update_polo_score",
            SetPoloScore { .. } => "set_polo_score",
            ListNetworks {} => "list_networks",
            ListNodes { .. } => "list_nodes",
            CreateNetwork { .. } => "create_network",
            JoinNetwork { .. } => "join_network",
            LeaveNetwork { .. } => "leave_network",
            InviteNetwork { .. } => "invite_network",
            Hello {} => "hello",
            Auth { .. } => "auth",
            Watch {} => "watch",
            Reachable { .. } => "reachable",
            BeaconRegister { .. } => "beacon_register",
            BeaconList {} => "beacon_list",
            SubscribeReplication { .. } => "subscribe_replication",
        }
    }
}

/// The one error body v1 sends for every failure (§4.2).
pub const V1_ERROR: &str = r#"{"type":"error","error":"request failed"}"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_reassemble_from_any_split() {
        let mut wire = Vec::new();
        encode_frame(br#"{"type":"lookup","node_id":7}"#, &mut wire).unwrap();
        encode_frame(br#"{"type":"beacon_list"}"#, &mut wire).unwrap();
        assert_eq!(&wire[..4], &[0, 0, 0, 29]);
        for split in 0..wire.len() {
            let mut d = FrameDecoder::new();
            d.push(&wire[..split]);
            let mut got = Vec::new();
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
            d.push(&wire[split..]);
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
            assert_eq!(got.len(), 2, "split at {split}");
            assert_eq!(d.buffered(), 0);
        }
    }

    #[test]
    fn oversized_frames_are_refused_before_buffering() {
        let mut d = FrameDecoder::new();
        d.push(&((MAX_FRAME as u32) + 1).to_be_bytes());
        assert_eq!(d.next_frame(), Err(FrameError::TooLarge(MAX_FRAME + 1)));
        let mut out = Vec::new();
        assert!(encode_frame(&vec![b' '; MAX_FRAME + 1], &mut out).is_err());
        assert!(encode_frame(&vec![b' '; MAX_FRAME], &mut out).is_ok());
    }

    #[test]
    fn v1_requests_parse_and_challenges_match() {
        let cases: &[(&str, Option<&str>)] = &[
            (
                r#"{"type":"register","listen_addr":"0.0.0.0:4000","public_key":"6kpsY+KcUgq+9VB7Ey7F+ZVHdq6+vnuSQh7qaRRG0iw="}"#,
                None,
            ),
            (r#"{"type":"lookup","node_id":7}"#, None),
            (
                r#"{"type":"resolve","node_id":9,"requester_id":7,"signature":"c2ln"}"#,
                Some("resolve:7:9"),
            ),
            (
                r#"{"type":"heartbeat","node_id":7,"signature":"c2ln"}"#,
                Some("heartbeat:7"),
            ),
            (
                r#"{"type":"request_handshake","from_node_id":7,"to_node_id":9,"justification":"hi","signature":"c2ln"}"#,
                Some("handshake:7:9"),
            ),
            (
                r#"{"type":"respond_handshake","node_id":9,"peer_id":7,"accept":true,"signature":"c2ln"}"#,
                Some("respond:9:7"),
            ),
            (
                r#"{"type":"rotate_key","node_id":7,"signature":"c2ln","new_public_key":"AAAA"}"#,
                Some("rotate:7"),
            ),
            (
                r#"{"type":"punch","requester_id":7,"node_a":7,"node_b":9,"signature":"c2ln"}"#,
                Some("punch:7:9"),
            ),
            (
                r#"{"type":"set_tags","node_id":7,"tags":null,"signature":"c2ln"}"#,
                Some("set_tags:7"),
            ),
            (r#"{"type":"list_networks"}"#, None),
            (
                r#"{"type":"heartbeat","node_id":7,"signature":"","instance":"00ff"}"#,
                Some("heartbeat:7"),
            ),
            (
                r#"{"type":"beacon_register","beacon_id":2,"addr":":9001"}"#,
                None,
            ),
        ];
        for (json, challenge) in cases {
            let r: Request = serde_json::from_str(json).unwrap_or_else(|e| panic!("{json}: {e}"));
            assert_eq!(r.challenge().as_deref(), *challenge, "{json}");
            assert!(json.contains(&format!(r#""type":"{}""#, r.kind())));
            // What we send parses back to the same request.
            let again: Request = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
            assert_eq!(again, r);
        }
    }

    #[test]
    fn malformed_requests_are_errors_not_panics() {
        for bad in [
            r#"{}"#,
            r#"{"type":"nope"}"#,
            r#"{"type":"lookup"}"#,
            r#"{"type":"lookup","node_id":-1}"#,
            r#"{"type":"lookup","node_id":4294967296}"#,
            r#"{"type":"lookup","node_id":"7"}"#,
            r#"[1,2]"#,
            "\u{0}",
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }
}
