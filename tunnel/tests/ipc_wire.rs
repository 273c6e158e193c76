//! IPC codec: golden bytes for every command, framing limits, truncation, the JSON bodies, the
//! extension envelope, and property tests (round trip, no panic on arbitrary input).

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use proptest::prelude::*;
use serde_json::json;
use tunnel::ipc::{
    cmd, code, encode, handshake_sub, ConnInfo, ExtError, ExtReply, ExtRequest, FrameDecoder,
    FrameError, HandshakeOp, HandshakeStatus, Info, IpcError, Message, ParseError, PeerInfo,
    PeersReply, PendingEntry, PendingList, PingProbe, PingReply, TrustedEntry, TrustedList,
    WebhookReply, LEN_PREFIX, MAX_MESSAGE, MAX_PAYLOAD,
};
use tunnel::{Addr, SocketAddr};

const A: SocketAddr = SocketAddr::new(Addr::new(0x0001, 0x0203_0405), 0x0607);

/// Every command, with the exact bytes of its whole frame.
fn golden() -> Vec<(Message<'static>, Vec<u8>)> {
    fn frame(cmd: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = ((payload.len() + 1) as u32).to_be_bytes().to_vec();
        f.push(cmd);
        f.extend_from_slice(payload);
        f
    }
    let sa: &[u8] = &[0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07];
    let cat = |parts: &[&[u8]]| parts.concat();
    vec![
        (Message::Bind { port: 1000 }, frame(0x01, &[0x03, 0xE8])),
        (Message::BindOk { port: 1000 }, frame(0x02, &[0x03, 0xE8])),
        (Message::Dial { dst: A }, frame(0x03, sa)),
        (
            Message::DialOk {
                conn_id: 0xDEAD_BEEF,
            },
            frame(0x04, &[0xDE, 0xAD, 0xBE, 0xEF]),
        ),
        (
            Message::Accept {
                local_port: 80,
                conn_id: 9,
                remote: A,
            },
            frame(0x05, &cat(&[&[0x00, 0x50, 0, 0, 0, 9], sa])),
        ),
        (
            Message::Send {
                conn_id: 1,
                data: b"hi",
            },
            frame(0x06, &[0, 0, 0, 1, b'h', b'i']),
        ),
        (
            Message::Recv {
                conn_id: 2,
                data: b"",
            },
            frame(0x07, &[0, 0, 0, 2]),
        ),
        (Message::Close { conn_id: 3 }, frame(0x08, &[0, 0, 0, 3])),
        (Message::CloseOk { conn_id: 4 }, frame(0x09, &[0, 0, 0, 4])),
        (
            Message::Error {
                code: 1,
                message: "connection refused",
            },
            frame(0x0A, &cat(&[&[0, 1], b"connection refused"])),
        ),
        (
            Message::SendTo {
                dst: A,
                data: b"dg",
            },
            frame(0x0B, &cat(&[sa, b"dg"])),
        ),
        (
            Message::RecvFrom {
                src: A,
                dst_port: 0x0809,
                data: b"x",
            },
            frame(0x0C, &cat(&[sa, &[0x08, 0x09], b"x"])),
        ),
        (Message::Info, frame(0x0D, &[])),
        (
            Message::InfoOk {
                json: br#"{"node_id":1}"#,
            },
            frame(0x0E, br#"{"node_id":1}"#),
        ),
        (
            Message::Handshake(HandshakeOp::Request {
                node: 5,
                justification: "pls",
            }),
            frame(0x0F, &[0x01, 0, 0, 0, 5, b'p', b'l', b's']),
        ),
        (
            Message::Handshake(HandshakeOp::Approve { node: 6 }),
            frame(0x0F, &[0x02, 0, 0, 0, 6]),
        ),
        (
            Message::Handshake(HandshakeOp::Reject {
                node: 7,
                reason: "no",
            }),
            frame(0x0F, &[0x03, 0, 0, 0, 7, b'n', b'o']),
        ),
        (
            Message::Handshake(HandshakeOp::Pending),
            frame(0x0F, &[0x04]),
        ),
        (
            Message::Handshake(HandshakeOp::Trusted),
            frame(0x0F, &[0x05]),
        ),
        (
            Message::Handshake(HandshakeOp::Revoke { node: 0x0102_0304 }),
            frame(0x0F, &[0x06, 1, 2, 3, 4]),
        ),
        (
            Message::HandshakeOk {
                json: br#"{"status":"sent","node_id":5}"#,
            },
            frame(0x10, br#"{"status":"sent","node_id":5}"#),
        ),
        (
            Message::ResolveHostname { hostname: "alpha" },
            frame(0x11, b"alpha"),
        ),
        (
            Message::ResolveHostnameOk { json: b"{}" },
            frame(0x12, b"{}"),
        ),
        (Message::SetHostname { hostname: "" }, frame(0x13, b"")),
        (Message::SetHostnameOk { json: b"{}" }, frame(0x14, b"{}")),
        (
            Message::SetVisibility { public: true },
            frame(0x15, &[0x01]),
        ),
        (Message::SetVisibilityOk { json: b"{}" }, frame(0x16, b"{}")),
        (Message::Deregister, frame(0x17, &[])),
        (
            Message::DeregisterOk {
                json: br#"{"type":"deregister_ok"}"#,
            },
            frame(0x18, br#"{"type":"deregister_ok"}"#),
        ),
        (
            Message::SetTags {
                json: br#"["a","b"]"#,
            },
            frame(0x19, br#"["a","b"]"#),
        ),
        (Message::SetTagsOk { json: b"{}" }, frame(0x1A, b"{}")),
        (
            Message::SetWebhook { url: "http://h/x" },
            frame(0x1B, b"http://h/x"),
        ),
        (
            Message::SetWebhookOk {
                json: br#"{"webhook":""}"#,
            },
            frame(0x1C, br#"{"webhook":""}"#),
        ),
        (
            Message::SetTaskExec { enabled: false },
            frame(0x1D, &[0x00]),
        ),
        (Message::SetTaskExecOk { json: b"{}" }, frame(0x1E, b"{}")),
        (
            Message::Ext {
                json: br#"{"op":"info"}"#,
            },
            frame(0x40, br#"{"op":"info"}"#),
        ),
        (
            Message::ExtOk {
                json: br#"{"status":"ok","data":{}}"#,
            },
            frame(0x41, br#"{"status":"ok","data":{}}"#),
        ),
        (
            Message::ConnFailed {
                conn_id: 7,
                reason: "reset",
            },
            frame(0x42, b"\0\0\0\x07reset"),
        ),
    ]
}

/// Length of the fixed fields a payload must hold before any variable part.
fn fixed_len(m: &Message<'_>) -> usize {
    match m {
        Message::Send { .. } | Message::Recv { .. } => 4,
        Message::Error { .. } => 2,
        Message::ConnFailed { .. } => 4,
        Message::SendTo { .. } => 8,
        Message::RecvFrom { .. } => 10,
        Message::Handshake(HandshakeOp::Request { .. } | HandshakeOp::Reject { .. }) => 5,
        Message::InfoOk { .. }
        | Message::HandshakeOk { .. }
        | Message::ResolveHostname { .. }
        | Message::ResolveHostnameOk { .. }
        | Message::SetHostname { .. }
        | Message::SetHostnameOk { .. }
        | Message::SetVisibilityOk { .. }
        | Message::DeregisterOk { .. }
        | Message::SetTags { .. }
        | Message::SetTagsOk { .. }
        | Message::SetWebhook { .. }
        | Message::SetWebhookOk { .. }
        | Message::SetTaskExecOk { .. }
        | Message::Ext { .. }
        | Message::ExtOk { .. } => 0,
        fixed => fixed.payload_len(),
    }
}

#[test]
fn golden_bytes_for_every_command() {
    let table = golden();
    let mut seen: Vec<u8> = table.iter().map(|(m, _)| m.cmd()).collect();
    seen.dedup();
    let mut expected: Vec<u8> = (0x01..=0x1E).collect();
    expected.extend([cmd::EXT, cmd::EXT_OK, cmd::CONN_FAILED]);
    assert_eq!(
        seen, expected,
        "the table covers every command once, in order"
    );

    for (m, bytes) in &table {
        let mut out = Vec::new();
        m.encode(&mut out).unwrap();
        assert_eq!(&out, bytes, "{m:?}");
        assert_eq!(m.payload_len(), bytes.len() - LEN_PREFIX - 1, "{m:?}");
        assert_eq!(out[LEN_PREFIX], m.cmd());
        assert!(cmd::name(m.cmd()).is_some());

        let mut payload = Vec::new();
        m.emit_payload(&mut payload);
        let mut via_fn = Vec::new();
        encode(m.cmd(), &payload, &mut via_fn).unwrap();
        assert_eq!(&via_fn, bytes);

        let parsed = Message::parse(bytes[LEN_PREFIX], &bytes[LEN_PREFIX + 1..]).unwrap();
        assert_eq!(&parsed, m);
    }
}

#[test]
fn golden_stream_decodes_in_any_chunking() {
    let table = golden();
    let wire: Vec<u8> = table.iter().flat_map(|(_, b)| b.clone()).collect();
    for chunk in [1, 2, 3, 7, 64, wire.len()] {
        let mut d = FrameDecoder::new();
        let mut got = Vec::new();
        for piece in wire.chunks(chunk) {
            d.push(piece);
            while let Some((c, payload)) = d.next_frame().unwrap() {
                let mut f = Vec::new();
                encode(c, payload, &mut f).unwrap();
                got.push(f);
            }
        }
        assert_eq!(d.buffered(), 0);
        let want: Vec<Vec<u8>> = table.iter().map(|(_, b)| b.clone()).collect();
        assert_eq!(got, want, "chunk size {chunk}");
    }

    let mut d = FrameDecoder::new();
    d.push(&wire);
    for (m, _) in &table {
        assert_eq!(d.next_message().unwrap().as_ref(), Some(m));
    }
    assert_eq!(d.next_message(), Ok(None));
}

#[test]
fn truncated_payloads_are_errors() {
    for (m, bytes) in golden() {
        let c = bytes[LEN_PREFIX];
        let payload = &bytes[LEN_PREFIX + 1..];
        let fixed = fixed_len(&m);
        for cut in 0..payload.len() {
            let r = Message::parse(c, &payload[..cut]);
            if cut < fixed {
                assert!(
                    matches!(r, Err(ParseError::Truncated { cmd, needed, have })
                        if cmd == c && needed <= fixed && needed > cut && have == cut),
                    "{m:?} cut at {cut}: {r:?}"
                );
            } else {
                // Only the variable tail is shorter: a different, valid message.
                assert!(r.is_ok(), "{m:?} cut at {cut}: {r:?}");
            }
        }
    }
}

#[test]
fn fixed_payloads_refuse_trailing_bytes() {
    let mut checked = 0;
    for (m, bytes) in golden() {
        let has_tail = matches!(
            m,
            Message::Send { .. }
                | Message::Recv { .. }
                | Message::Error { .. }
                | Message::ConnFailed { .. }
                | Message::SendTo { .. }
                | Message::RecvFrom { .. }
                | Message::Handshake(HandshakeOp::Request { .. } | HandshakeOp::Reject { .. })
        ) || fixed_len(&m) == 0;
        if has_tail && !matches!(m, Message::Info | Message::Deregister) {
            continue;
        }
        let mut payload = bytes[LEN_PREFIX + 1..].to_vec();
        payload.push(0);
        let r = Message::parse(m.cmd(), &payload);
        assert_eq!(
            r,
            Err(ParseError::TrailingBytes {
                cmd: m.cmd(),
                expected: payload.len() - 1,
                have: payload.len()
            }),
            "{m:?}"
        );
        checked += 1;
    }
    assert_eq!(checked, 15);
}

#[test]
fn unknown_commands_and_sub_commands() {
    for c in [0x00, 0x1F, 0x20, 0x2B, 0x3F, 0x43, 0x7F, 0x80, 0xFF] {
        assert_eq!(Message::parse(c, b"x"), Err(ParseError::UnknownCommand(c)));
        assert_eq!(cmd::name(c), None);
    }
    assert!(cmd::EXT_RANGE.contains(&cmd::EXT) && cmd::EXT_RANGE.contains(&cmd::EXT_OK));
    assert_eq!(
        Message::parse(cmd::HANDSHAKE, &[0x07, 0, 0, 0, 1]),
        Err(ParseError::UnknownHandshakeOp(0x07))
    );
    assert_eq!(
        Message::parse(cmd::HANDSHAKE, &[0x00]),
        Err(ParseError::UnknownHandshakeOp(0x00))
    );
    assert_eq!(
        Message::parse(cmd::HANDSHAKE, &[]),
        Err(ParseError::Truncated {
            cmd: cmd::HANDSHAKE,
            needed: 1,
            have: 0
        })
    );
    assert_eq!(
        Message::parse(cmd::HANDSHAKE, &[handshake_sub::PENDING, 0]),
        Err(ParseError::TrailingBytes {
            cmd: cmd::HANDSHAKE,
            expected: 1,
            have: 2
        })
    );
}

#[test]
fn text_fields_must_be_utf8() {
    let bad = [0xFF, 0xFE];
    for (c, payload) in [
        (cmd::ERROR, [&[0u8, 1][..], &bad].concat()),
        (cmd::RESOLVE_HOSTNAME, bad.to_vec()),
        (cmd::SET_HOSTNAME, bad.to_vec()),
        (cmd::SET_WEBHOOK, bad.to_vec()),
        (cmd::HANDSHAKE, [&[1u8, 0, 0, 0, 1][..], &bad].concat()),
        (cmd::HANDSHAKE, [&[3u8, 0, 0, 0, 1][..], &bad].concat()),
    ] {
        assert_eq!(
            Message::parse(c, &payload),
            Err(ParseError::NotUtf8 { cmd: c })
        );
    }
    // Binary data and JSON bodies are not checked.
    assert!(Message::parse(cmd::SEND, &[0, 0, 0, 1, 0xFF]).is_ok());
    assert!(Message::parse(cmd::INFO_OK, &bad).is_ok());
}

#[test]
fn flag_bytes_follow_v1() {
    // v1: 1 means on, any other byte off.
    for (b, on) in [(0u8, false), (1, true), (2, false), (0xFF, false)] {
        assert_eq!(
            Message::parse(cmd::SET_VISIBILITY, &[b]),
            Ok(Message::SetVisibility { public: on })
        );
        assert_eq!(
            Message::parse(cmd::SET_TASK_EXEC, &[b]),
            Ok(Message::SetTaskExec { enabled: on })
        );
    }
}

#[test]
fn frame_limits() {
    // Exactly 1 MiB (command byte included) is accepted.
    let payload = vec![0xAB; MAX_PAYLOAD - 4];
    let m = Message::Recv {
        conn_id: 1,
        data: &payload,
    };
    let mut out = Vec::new();
    m.encode(&mut out).unwrap();
    assert_eq!(out.len(), LEN_PREFIX + MAX_MESSAGE);
    assert_eq!(&out[..4], &(MAX_MESSAGE as u32).to_be_bytes());
    let mut d = FrameDecoder::new();
    d.push(&out);
    assert_eq!(d.next_message(), Ok(Some(m)));

    // One byte more is refused by the encoder, which writes nothing.
    let big = vec![0; MAX_PAYLOAD - 3];
    let m = Message::Recv {
        conn_id: 1,
        data: &big,
    };
    let mut out = vec![9];
    assert_eq!(
        m.encode(&mut out),
        Err(FrameError::TooLarge(MAX_MESSAGE + 1))
    );
    assert_eq!(
        encode(cmd::SEND, &vec![0; MAX_PAYLOAD + 1], &mut out),
        Err(FrameError::TooLarge(MAX_MESSAGE + 1))
    );
    assert_eq!(out, [9]);

    // ... and by the decoder as soon as the prefix arrives, without buffering the body.
    let mut d = FrameDecoder::new();
    d.push(&((MAX_MESSAGE + 1) as u32).to_be_bytes());
    assert_eq!(d.next_frame(), Err(FrameError::TooLarge(MAX_MESSAGE + 1)));
    assert_eq!(d.next_frame(), Err(FrameError::TooLarge(MAX_MESSAGE + 1)));
    let mut d = FrameDecoder::new();
    d.push(&[0xFF; 4]);
    assert_eq!(
        d.next_message(),
        Err(IpcError::Frame(FrameError::TooLarge(u32::MAX as usize)))
    );

    // A zero length has no command byte; the prefix is consumed and the stream goes on.
    let mut d = FrameDecoder::new();
    d.push(&[0, 0, 0, 0, 0, 0, 0, 1, cmd::INFO]);
    assert_eq!(d.next_frame(), Err(FrameError::Empty));
    assert_eq!(d.next_message(), Ok(Some(Message::Info)));
    assert_eq!(d.next_message(), Ok(None));

    // A partial frame waits.
    let mut d = FrameDecoder::new();
    d.push(&[0, 0, 0, 3, cmd::BIND, 0]);
    assert_eq!(d.next_frame(), Ok(None));
    assert_eq!(d.buffered(), 6);
    d.push(&[7]);
    assert_eq!(d.next_message(), Ok(Some(Message::Bind { port: 7 })));

    // A bad payload in a good frame is a parse error; the next frame still decodes.
    let mut d = FrameDecoder::new();
    d.push(&[0, 0, 0, 2, cmd::BIND, 0, 0, 0, 0, 1, cmd::DEREGISTER]);
    assert!(matches!(
        d.next_message(),
        Err(IpcError::Parse(ParseError::Truncated { .. }))
    ));
    assert_eq!(d.next_message(), Ok(Some(Message::Deregister)));
}

#[test]
fn info_json_uses_v1_field_names() {
    let info = Info {
        peer_list: vec![PeerInfo::default()],
        conn_list: vec![ConnInfo::default()],
        ..Info::default()
    };
    let v = serde_json::to_value(&info).unwrap();
    let keys = |v: &serde_json::Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    let mut top = vec![
        "node_id",
        "address",
        "hostname",
        "uptime_secs",
        "connections",
        "ports",
        "peers",
        "encrypted_peers",
        "authenticated_peers",
        "encrypt",
        "identity",
        "public_key",
        "owner",
        "bytes_sent",
        "bytes_recv",
        "pkts_sent",
        "pkts_recv",
        "peer_list",
        "conn_list",
        // Extensions.
        "pid",
        "version",
        "registry_protocol",
    ];
    top.sort();
    assert_eq!(keys(&v), top);
    let mut peer = vec!["node_id", "endpoint", "encrypted", "authenticated", "relay"];
    peer.sort();
    assert_eq!(keys(&v["peer_list"][0]), peer);
    let mut conn = vec![
        "id",
        "local_port",
        "remote_addr",
        "remote_port",
        "state",
        "cong_win",
        "ssthresh",
        "in_flight",
        "srtt_ms",
        "rttvar_ms",
        "unacked",
        "ooo_buf",
        "peer_recv_win",
        "recv_win",
        "in_recovery",
        "bytes_sent",
        "bytes_recv",
        "segs_sent",
        "segs_recv",
        "retransmits",
        "fast_retx",
        "sack_recv",
        "sack_sent",
        "dup_acks",
    ];
    conn.sort();
    assert_eq!(keys(&v["conn_list"][0]), conn);
}

#[test]
fn info_json_from_a_v1_daemon() {
    // As a v1 daemon writes it: integral floats, no `relay`, nil lists as null.
    let v1 = json!({
        "node_id": 42, "address": "0:0000.0000.002A", "hostname": "", "uptime_secs": 12,
        "connections": 1, "ports": 2, "peers": 1, "encrypted_peers": 1,
        "authenticated_peers": 0, "encrypt": true, "identity": true,
        "public_key": "AAAA", "owner": "", "bytes_sent": 10, "bytes_recv": 20,
        "pkts_sent": 1, "pkts_recv": 2,
        "peer_list": [{"node_id": 7, "endpoint": "10.0.0.1:4000", "encrypted": true,
                       "authenticated": false}],
        "conn_list": null,
        "future_field": "ignored"
    });
    let info: Info = serde_json::from_value(v1).unwrap();
    assert_eq!(info.node_id, 42);
    assert_eq!(info.uptime_secs, 12.0);
    assert_eq!(
        info.peer_list,
        [PeerInfo {
            node_id: 7,
            endpoint: "10.0.0.1:4000".into(),
            encrypted: true,
            authenticated: false,
            relay: false,
        }]
    );
    assert!(info.conn_list.is_empty());
    let again: Info = serde_json::from_slice(&serde_json::to_vec(&info).unwrap()).unwrap();
    assert_eq!(again, info);
    let conn: ConnInfo =
        serde_json::from_value(json!({"id": 3, "state": "ESTABLISHED", "srtt_ms": 11})).unwrap();
    assert_eq!(
        (conn.id, conn.srtt_ms, conn.state.as_str()),
        (3, 11.0, "ESTABLISHED")
    );
}

#[test]
fn handshake_and_webhook_json_bodies() {
    assert_eq!(
        serde_json::to_string(&HandshakeStatus {
            status: HandshakeStatus::APPROVED.into(),
            node_id: 9
        })
        .unwrap(),
        r#"{"status":"approved","node_id":9}"#
    );
    let p: PendingList = serde_json::from_str(
        r#"{"pending":[{"node_id":3,"public_key":"k","justification":"j","received_at":1700000000}]}"#,
    )
    .unwrap();
    assert_eq!(
        p.pending,
        [PendingEntry {
            node_id: 3,
            public_key: "k".into(),
            justification: "j".into(),
            received_at: 1_700_000_000
        }]
    );
    let empty: PendingList = serde_json::from_str(r#"{"pending":null}"#).unwrap();
    assert!(empty.pending.is_empty());
    let t: TrustedList = serde_json::from_str(
        r#"{"trusted":[{"node_id":4,"public_key":"k","approved_at":5,"mutual":true,"network":0}]}"#,
    )
    .unwrap();
    assert_eq!(
        t.trusted,
        [TrustedEntry {
            node_id: 4,
            public_key: "k".into(),
            approved_at: 5,
            mutual: true,
            network: 0
        }]
    );
    assert_eq!(
        serde_json::to_string(&WebhookReply {
            webhook: "https://x/y".into()
        })
        .unwrap(),
        r#"{"webhook":"https://x/y"}"#
    );
}

/// One request of every op.
fn every_ext_request() -> Vec<ExtRequest> {
    vec![
        ExtRequest::Info,
        ExtRequest::Peers {
            search: Some("10.0".into()),
        },
        ExtRequest::Connections,
        ExtRequest::Disconnect { conn_id: 3 },
        ExtRequest::Lookup { node_id: 4 },
        ExtRequest::Register,
        ExtRequest::Deregister,
        ExtRequest::RotateKey,
        ExtRequest::NetworkList,
        ExtRequest::NetworkCreate {
            name: "lab".into(),
            join_rule: Some("token".into()),
            token: Some("s3cret".into()),
        },
        ExtRequest::NetworkJoin {
            network_id: 2,
            token: None,
            inviter_id: Some(8),
        },
        ExtRequest::NetworkLeave { network_id: 2 },
        ExtRequest::NetworkInvite {
            network_id: 2,
            node_id: 9,
        },
        ExtRequest::Resolve {
            target: "alpha".into(),
        },
        ExtRequest::Ping {
            node_id: 5,
            count: 4,
            timeout_ms: Some(3000),
        },
        ExtRequest::Handshake {
            node_id: 5,
            justification: "hello".into(),
        },
        ExtRequest::Approve { node_id: 5 },
        ExtRequest::Reject {
            node_id: 5,
            reason: "no".into(),
        },
        ExtRequest::Untrust { node_id: 5 },
        ExtRequest::TrustList,
        ExtRequest::TrustPending,
        ExtRequest::SetVisibility { public: true },
        ExtRequest::SetTags {
            tags: vec!["gpu".into()],
        },
        ExtRequest::SetHostname {
            hostname: "alpha".into(),
        },
        ExtRequest::SetWebhook { url: "".into() },
        ExtRequest::SetTaskExec { enabled: true },
        ExtRequest::ConnErrors,
        ExtRequest::NameList,
        ExtRequest::NameAdd {
            record: "A alice 0:0000.0000.0001".into(),
        },
        ExtRequest::NameRemove {
            record: "N lab 7".into(),
        },
        ExtRequest::Inbox { clear: false },
        ExtRequest::Received { clear: true },
        ExtRequest::TaskSubmit {
            node_id: 5,
            description: "sum 2 and 3".into(),
        },
        ExtRequest::TaskList {
            kind: Some("received".into()),
        },
        ExtRequest::TaskQueue,
        ExtRequest::TaskAccept {
            task_id: "0123abcd-0000-4000-8000-000000000001".into(),
        },
        ExtRequest::TaskDecline {
            task_id: "0123abcd-0000-4000-8000-000000000001".into(),
            justification: "busy".into(),
        },
        ExtRequest::TaskCancel {
            task_id: "0123abcd-0000-4000-8000-000000000001".into(),
        },
        ExtRequest::TaskExecute,
        ExtRequest::TaskResults {
            task_id: "0123abcd-0000-4000-8000-000000000001".into(),
            text: Some("5".into()),
            file: None,
        },
    ]
}

#[test]
fn ext_requests_round_trip_and_name_their_op() {
    let all = every_ext_request();
    let ops: Vec<&str> = all.iter().map(ExtRequest::op).collect();
    assert_eq!(
        ops,
        ExtRequest::OPS,
        "one sample per op, in declaration order"
    );
    for r in all {
        let json = r.to_json();
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(v["op"], r.op());
        assert_eq!(ExtRequest::from_json(&json), Ok(r));
    }
}

#[test]
fn ext_request_golden_json() {
    assert_eq!(ExtRequest::Info.to_json(), br#"{"op":"info"}"#);
    assert_eq!(
        ExtRequest::Peers { search: None }.to_json(),
        br#"{"op":"peers"}"#
    );
    assert_eq!(
        ExtRequest::Disconnect { conn_id: 7 }.to_json(),
        br#"{"op":"disconnect","conn_id":7}"#
    );
    assert_eq!(
        ExtRequest::Ping {
            node_id: 5,
            count: 2,
            timeout_ms: None
        }
        .to_json(),
        br#"{"op":"ping","node_id":5,"count":2}"#
    );
    assert_eq!(
        ExtRequest::from_json(br#"{"op":"handshake","node_id":5}"#),
        Ok(ExtRequest::Handshake {
            node_id: 5,
            justification: String::new()
        })
    );
}

#[test]
fn ext_request_errors_carry_stable_codes() {
    let code_of = |j: &[u8]| ExtRequest::from_json(j).unwrap_err().code;
    assert_eq!(code_of(b"not json"), code::BAD_REQUEST);
    assert_eq!(code_of(b"[]"), code::BAD_REQUEST);
    assert_eq!(code_of(br#"{"node_id":1}"#), code::BAD_REQUEST);
    assert_eq!(code_of(br#"{"op":7}"#), code::BAD_REQUEST);
    assert_eq!(code_of(br#"{"op":"teleport"}"#), code::UNSUPPORTED);
    assert_eq!(code_of(br#"{"op":"lookup"}"#), code::BAD_REQUEST);
    assert_eq!(
        code_of(br#"{"op":"lookup","node_id":"x"}"#),
        code::BAD_REQUEST
    );
    assert_eq!(
        code_of(br#"{"op":"lookup","node_id":4294967296}"#),
        code::BAD_REQUEST
    );
}

#[test]
fn ext_reply_envelope() {
    let data = PeersReply {
        peers: vec![PeerInfo {
            node_id: 2,
            endpoint: "1.2.3.4:5".into(),
            encrypted: true,
            authenticated: true,
            relay: true,
        }],
        total: 1,
    };
    let ok = ExtReply::ok(&data);
    let json = ok.to_json();
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&json).unwrap(),
        json!({"status": "ok", "data": {"peers": [{"node_id": 2, "endpoint": "1.2.3.4:5",
            "encrypted": true, "authenticated": true, "relay": true}], "total": 1}})
    );
    let back = ExtReply::from_json(&json).unwrap();
    assert_eq!(back.clone().into_result::<PeersReply>(), Ok(data));
    assert_eq!(
        back.into_result::<PingReply>().unwrap_err().code,
        code::BAD_REPLY
    );

    let err = ExtReply::error(code::UNKNOWN_PEER, "node 9 is not a peer");
    assert_eq!(
        err.to_json(),
        br#"{"status":"error","code":"unknown_peer","message":"node 9 is not a peer"}"#
    );
    assert_eq!(
        ExtReply::from_json(&err.to_json())
            .unwrap()
            .into_result::<PeersReply>(),
        Err(ExtError::new(code::UNKNOWN_PEER, "node 9 is not a peer"))
    );
    assert_eq!(
        ExtReply::from(ExtError::new(code::TIMEOUT, "t")),
        ExtReply::error(code::TIMEOUT, "t")
    );
    assert_eq!(
        ExtReply::from_json(br#"{"status":"maybe"}"#)
            .unwrap_err()
            .code,
        code::BAD_REPLY
    );

    let ping = PingReply {
        node_id: 5,
        address: "0:0000.0000.0005".into(),
        results: vec![
            PingProbe {
                seq: 1,
                rtt_ms: Some(1.5),
                path: Some(tunnel::ipc::PathKind::Relayed),
                error: None,
            },
            PingProbe {
                seq: 2,
                rtt_ms: None,
                path: None,
                error: Some("timeout".into()),
            },
        ],
    };
    assert_eq!(
        serde_json::to_value(&ping).unwrap()["results"],
        json!([{"seq": 1, "rtt_ms": 1.5, "path": "relayed"}, {"seq": 2, "error": "timeout"}])
    );
}

#[test]
fn error_codes_are_distinct() {
    let mut all = vec![
        code::BAD_REQUEST,
        code::UNSUPPORTED,
        code::BAD_ADDRESS,
        code::NOT_FOUND,
        code::UNKNOWN_PEER,
        code::UNTRUSTED,
        code::INVALID_HOSTNAME,
        code::TIMEOUT,
        code::REFUSED,
        code::UNAVAILABLE,
        code::INTERNAL,
        code::DAEMON_DOWN,
        code::BAD_REPLY,
    ];
    let n = all.len();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), n);
}

// ---------------------------------------------------------------------------------------------
// Property tests
// ---------------------------------------------------------------------------------------------

/// Number of distinct message shapes [`build`] makes (every variant, every handshake op).
const KINDS: u8 = 38;

/// Builds message shape `kind` from generated fields.
fn build<'a>(
    kind: u8,
    p: u16,
    c: u32,
    a: SocketAddr,
    data: &'a [u8],
    text: &'a str,
) -> Message<'a> {
    match kind {
        0 => Message::Bind { port: p },
        1 => Message::BindOk { port: p },
        2 => Message::Dial { dst: a },
        3 => Message::DialOk { conn_id: c },
        4 => Message::Accept {
            local_port: p,
            conn_id: c,
            remote: a,
        },
        5 => Message::Send { conn_id: c, data },
        6 => Message::Recv { conn_id: c, data },
        7 => Message::Close { conn_id: c },
        8 => Message::CloseOk { conn_id: c },
        9 => Message::Error {
            code: p,
            message: text,
        },
        10 => Message::SendTo { dst: a, data },
        11 => Message::RecvFrom {
            src: a,
            dst_port: p,
            data,
        },
        12 => Message::Info,
        13 => Message::InfoOk { json: data },
        14 => Message::Handshake(HandshakeOp::Request {
            node: c,
            justification: text,
        }),
        15 => Message::Handshake(HandshakeOp::Approve { node: c }),
        16 => Message::Handshake(HandshakeOp::Reject {
            node: c,
            reason: text,
        }),
        17 => Message::Handshake(HandshakeOp::Pending),
        18 => Message::Handshake(HandshakeOp::Trusted),
        19 => Message::Handshake(HandshakeOp::Revoke { node: c }),
        20 => Message::HandshakeOk { json: data },
        21 => Message::ResolveHostname { hostname: text },
        22 => Message::ResolveHostnameOk { json: data },
        23 => Message::SetHostname { hostname: text },
        24 => Message::SetHostnameOk { json: data },
        25 => Message::SetVisibility { public: c & 1 == 1 },
        26 => Message::SetVisibilityOk { json: data },
        27 => Message::Deregister,
        28 => Message::DeregisterOk { json: data },
        29 => Message::SetTags { json: data },
        30 => Message::SetTagsOk { json: data },
        31 => Message::SetWebhook { url: text },
        32 => Message::SetWebhookOk { json: data },
        33 => Message::SetTaskExec {
            enabled: c & 1 == 1,
        },
        34 => Message::SetTaskExecOk { json: data },
        35 => Message::Ext { json: data },
        36 => Message::ConnFailed {
            conn_id: c,
            reason: text,
        },
        _ => Message::ExtOk { json: data },
    }
}

fn sockaddr() -> impl Strategy<Value = SocketAddr> {
    (any::<u16>(), any::<u32>(), any::<u16>())
        .prop_map(|(n, h, p)| SocketAddr::new(Addr::new(n, h), p))
}

proptest! {
    #[test]
    fn parse_emit_round_trips(
        kind in 0..KINDS,
        p in any::<u16>(),
        c in any::<u32>(),
        a in sockaddr(),
        data in proptest::collection::vec(any::<u8>(), 0..300),
        text in "\\PC{0,40}",
    ) {
        let m = build(kind, p, c, a, &data, &text);
        let mut wire = Vec::new();
        m.encode(&mut wire).unwrap();
        prop_assert_eq!(wire.len(), LEN_PREFIX + 1 + m.payload_len());
        let mut d = FrameDecoder::new();
        d.push(&wire);
        prop_assert_eq!(d.next_message(), Ok(Some(m)));
        prop_assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn parse_never_panics_and_reencodes(cmd in any::<u8>(), payload in proptest::collection::vec(any::<u8>(), 0..64)) {
        if let Ok(m) = Message::parse(cmd, &payload) {
            prop_assert_eq!(m.cmd(), cmd);
            let mut again = Vec::new();
            m.emit_payload(&mut again);
            prop_assert_eq!(Message::parse(cmd, &again), Ok(m));
            // Only the two v1 flag bytes have more than one encoding.
            if cmd != tunnel::ipc::cmd::SET_VISIBILITY && cmd != tunnel::ipc::cmd::SET_TASK_EXEC {
                prop_assert_eq!(again, payload);
            }
        }
    }

    #[test]
    fn decoder_never_panics(stream in proptest::collection::vec(any::<u8>(), 0..512), chunk in 1usize..50) {
        let mut d = FrameDecoder::new();
        'outer: for piece in stream.chunks(chunk) {
            d.push(piece);
            loop {
                match d.next_message() {
                    Ok(Some(_)) | Err(IpcError::Parse(_)) | Err(IpcError::Frame(FrameError::Empty)) => {}
                    Ok(None) => break,
                    Err(IpcError::Frame(FrameError::TooLarge(_))) => break 'outer,
                }
            }
            prop_assert!(d.buffered() <= LEN_PREFIX + MAX_MESSAGE + chunk);
        }
    }

    #[test]
    fn ext_json_parsers_never_panic(s in "\\PC{0,80}") {
        let _ = ExtRequest::from_json(s.as_bytes());
        let _ = ExtReply::from_json(s.as_bytes());
        let _ = serde_json::from_str::<Info>(&s);
    }
}
