use super::*;

use hickory_proto::op::{Edns, Message as Msg, ResponseCode};
use hickory_proto::rr::{DNSClass, Name as DnsName, RData, RecordType};
use proptest::prelude::*;

const ID: u16 = 0x4242;

/// A query built with hickory-proto.
fn query_bytes(name: &str, rtype: RecordType, edns: Option<u16>) -> Vec<u8> {
    let mut m = Msg::new(ID, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    // Raw labels: hickory-proto's text parser refuses some names the server must classify.
    let mut name =
        DnsName::from_labels(name.split('.').filter(|l| !l.is_empty()).map(str::as_bytes))
            .expect("test name");
    name.set_fqdn(true);
    m.add_query(hickory_proto::op::Query::query(name, rtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m.to_vec().expect("encode test query")
}

fn parsed(name: &str, rtype: RecordType) -> Query {
    parse(&query_bytes(name, rtype, None)).expect("valid query")
}

/// Parses an answer with hickory-proto and checks what every answer shares with its query.
fn decode_answer(query: &Query, bytes: &[u8]) -> Msg {
    assert!(bytes.len() <= query.max_response_len());
    let m = Msg::from_vec(bytes).expect("answer decodes");
    assert_eq!(m.metadata.id, query.id);
    assert_eq!(m.metadata.message_type, MessageType::Response);
    assert_eq!(m.metadata.op_code, OpCode::Query);
    assert_eq!(m.metadata.recursion_desired, query.recursion_desired);
    assert!(!m.metadata.recursion_available);
    assert_eq!(m.queries.len(), 1);
    assert_eq!(u16::from(m.queries[0].query_type), query.qtype);
    assert_eq!(u16::from(m.queries[0].query_class), query.qclass);
    assert_eq!(m.edns.is_some(), query.edns_payload.is_some());
    // The question is echoed byte for byte.
    assert_eq!(&bytes[12..12 + query.question.len()], &query.question[..]);
    m
}

fn node42() -> Addr {
    Addr::new(0, 42)
}

#[test]
fn resolver_is_never_a_node_nor_a_fake() {
    assert!(ula::in_prefix(RESOLVER));
    assert!(matches!(
        ula::from_ipv6(RESOLVER),
        Err(ula::UlaError::ReservedBits(_))
    ));
    assert_eq!(super::super::fake_index(&RESOLVER), None);
    assert_eq!(RESOLVER.to_string(), "fd06:3fcd:b33d:0:fffe::53");
}

#[test]
fn hostname_aaaa_round_trip() {
    let q = parsed("bob.pilot.", RecordType::AAAA);
    assert_eq!(q.id, ID);
    assert!(q.recursion_desired);
    assert_eq!(q.qtype, rtype::AAAA);
    assert_eq!(q.edns_payload, None);
    assert_eq!(q.name(), "bob.pilot");
    assert_eq!(q.kind(), Name::Hostname("bob".into()));
    let ip = ula::to_ipv6(node42());
    let mut out = [0u8; MAX_UDP_PAYLOAD];
    let n = answer_aaaa(&q, ip, POSITIVE_TTL, &mut out).expect("fits");
    let m = decode_answer(&q, &out[..n]);
    assert!(m.metadata.authoritative);
    assert!(!m.metadata.truncation);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(m.answers.len(), 1);
    let rr = &m.answers[0];
    assert_eq!(rr.name, DnsName::from_ascii("bob.pilot.").expect("name"));
    assert_eq!(rr.ttl, 60);
    assert_eq!(rr.dns_class, DNSClass::IN);
    match &rr.data {
        RData::AAAA(a) => assert_eq!(a.0, ip),
        other => panic!("expected AAAA, got {other:?}"),
    }
}

#[test]
fn question_case_is_echoed_and_name_is_lowercased() {
    let q = parsed("BoB.PiLoT.", RecordType::AAAA);
    assert_eq!(q.kind(), Name::Hostname("bob".into()));
    let mut out = [0u8; 512];
    let n = answer_aaaa(&q, ula::to_ipv6(node42()), POSITIVE_TTL, &mut out).expect("fits");
    let m = decode_answer(&q, &out[..n]);
    assert_eq!(m.queries[0].name.to_ascii(), "BoB.PiLoT.");
}

#[test]
fn hand_made_query_bytes() {
    // ID 0x1234, RD, one question: "bob.pilot" AAAA IN.
    let bytes = [
        0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, //
        3, b'b', b'o', b'b', 5, b'p', b'i', b'l', b'o', b't', 0, //
        0, 28, 0, 1,
    ];
    let q = parse(&bytes).expect("valid");
    assert_eq!(q.id, 0x1234);
    assert_eq!(q.kind(), Name::Hostname("bob".into()));
    let mut out = [0u8; 512];
    let n = answer_aaaa(&q, ula::to_ipv6(node42()), POSITIVE_TTL, &mut out).expect("fits");
    let expected_tail = [
        0xc0, 0x0c, 0, 28, 0, 1, 0, 0, 0, 60, 0, 16, //
        0xfd, 0x06, 0x3f, 0xcd, 0xb3, 0x3d, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x2a,
    ];
    assert_eq!(&out[..2], &[0x12, 0x34]);
    // QR, AA, RD; NOERROR.
    assert_eq!(&out[2..4], &[0x85, 0x00]);
    assert_eq!(&out[4..12], &[0, 1, 0, 1, 0, 0, 0, 0]);
    assert_eq!(&out[12..bytes.len()], &bytes[12..]);
    assert_eq!(&out[bytes.len()..n], &expected_tail);
}

#[test]
fn numeric_form() {
    let q = parsed("0-0000-0000-002a.pilot.", RecordType::AAAA);
    assert_eq!(q.kind(), Name::Address(node42()));
    let q = parsed("1-0001-F291-0004.PILOT.", RecordType::AAAA);
    let a: Addr = "1:0001.F291.0004".parse().expect("addr");
    assert_eq!(q.kind(), Name::Address(a));
    assert_eq!(numeric_name(a), "1-0001-f291-0004.pilot");
    assert_eq!(
        parsed(&format!("{}.", numeric_name(a)), RecordType::AAAA).kind(),
        Name::Address(a)
    );
    // Right shape, wrong address: never a hostname.
    for bad in ["1-0002-0000-0001", "70000-1170-0000-0001"] {
        let q = parsed(&format!("{bad}.pilot."), RecordType::AAAA);
        assert_eq!(q.kind(), Name::NotFound, "{bad}");
    }
    // Not the numeric shape: read as hostnames.
    for host in ["0-000-0000-002a", "0-0000-0000-002a-1", "a-0000-0000-002a"] {
        let q = parsed(&format!("{host}.pilot."), RecordType::AAAA);
        assert_eq!(q.kind(), Name::Hostname(host.into()), "{host}");
    }
}

#[test]
fn classification() {
    let cases: &[(&str, Name)] = &[
        ("pilot.", Name::Empty),
        ("x.bob.pilot.", Name::NotFound),
        ("-bob.pilot.", Name::NotFound),
        ("bob-.pilot.", Name::NotFound),
        ("b_b.pilot.", Name::NotFound),
        ("localhost.pilot.", Name::NotFound),
        ("example.com.", Name::Other),
        ("pilot.example.", Name::Other),
        (".", Name::Other),
        ("ip6.arpa.", Name::Other),
        ("f.ip6.arpa.", Name::Other),
        (REVERSE_ZONE, Name::Empty),
        ("0.d.3.3.b.d.c.f.3.6.0.d.f.ip6.arpa.", Name::Empty),
        ("x.d.3.3.b.d.c.f.3.6.0.d.f.ip6.arpa.", Name::NotFound),
        ("00.d.3.3.b.d.c.f.3.6.0.d.f.ip6.arpa.", Name::NotFound),
        (
            "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.ip6.arpa.",
            Name::Other,
        ),
    ];
    for (name, kind) in cases {
        let name = if name.ends_with('.') {
            name.to_string()
        } else {
            format!("{name}.")
        };
        assert_eq!(&parsed(&name, RecordType::AAAA).kind(), kind, "{name}");
    }
    // Too many nibbles.
    let long = format!("0.{}.", reverse_name(ula::to_ipv6(node42())));
    assert_eq!(parsed(&long, RecordType::PTR).kind(), Name::NotFound);
    // A class other than IN is refused.
    let mut m = Msg::new(1, MessageType::Query, OpCode::Query);
    let mut hq = hickory_proto::op::Query::query(
        DnsName::from_ascii("bob.pilot.").expect("n"),
        RecordType::AAAA,
    );
    hq.set_query_class(DNSClass::CH);
    m.add_query(hq);
    let q = parse(&m.to_vec().expect("encode")).expect("valid");
    assert_eq!(q.kind(), Name::Other);
}

#[test]
fn reverse_ptr_round_trip() {
    let ip = ula::to_ipv6(node42());
    let rev = reverse_name(ip);
    // Independently computed by hickory-proto.
    assert_eq!(
        format!("{rev}."),
        DnsName::from(ip).to_ascii().to_ascii_lowercase()
    );
    assert!(rev.ends_with(REVERSE_ZONE));
    // The zone is the last 12 nibbles of the prefix's reverse name.
    let prefix_rev = reverse_name(ula::PREFIX_ADDR);
    assert_eq!(&prefix_rev[20 * 2..], REVERSE_ZONE);
    let q = parsed(&format!("{rev}."), RecordType::PTR);
    assert_eq!(q.kind(), Name::Reverse(node42()));
    let mut out = [0u8; MAX_UDP_PAYLOAD];
    let n = answer_ptr(&q, "bob.pilot.", POSITIVE_TTL, &mut out).expect("fits");
    let m = decode_answer(&q, &out[..n]);
    assert_eq!(m.answers.len(), 1);
    match &m.answers[0].data {
        RData::PTR(p) => assert_eq!(p.0, DnsName::from_ascii("bob.pilot.").expect("n")),
        other => panic!("expected PTR, got {other:?}"),
    }
    // The reverse names of the resolver and of a fake are in the zone but never nodes.
    for ip in [RESOLVER, super::super::fake_addr(7)] {
        let q = parsed(&format!("{}.", reverse_name(ip)), RecordType::PTR);
        assert_eq!(q.kind(), Name::NotFound, "{ip}");
    }
    // A node with a large network and node number.
    let a = Addr::new(0xfffe, 0xdead_beef);
    let q = parsed(
        &format!("{}.", reverse_name(ula::to_ipv6(a)).to_uppercase()),
        RecordType::PTR,
    );
    assert_eq!(q.kind(), Name::Reverse(a));
}

#[test]
fn bad_ptr_targets_are_refused() {
    let q = parsed(
        &format!("{}.", reverse_name(ula::to_ipv6(node42()))),
        RecordType::PTR,
    );
    let mut out = [0u8; 512];
    for bad in ["", ".", "a..pilot", "a b.pilot", &"x".repeat(64)] {
        assert!(
            matches!(
                answer_ptr(&q, bad, POSITIVE_TTL, &mut out),
                Err(BuildError::BadName(_))
            ),
            "{bad:?}"
        );
    }
}

fn check_negative(q: &Query, bytes: &[u8], rcode: ResponseCode, zone: &str) {
    let m = decode_answer(q, bytes);
    assert_eq!(m.metadata.response_code, rcode);
    assert!(m.metadata.authoritative);
    assert!(m.answers.is_empty());
    assert_eq!(m.authorities.len(), 1);
    let soa = &m.authorities[0];
    assert_eq!(soa.name, DnsName::from_ascii(zone).expect("zone"));
    assert_eq!(soa.ttl, 10);
    match &soa.data {
        RData::SOA(s) => assert_eq!(s.minimum, 10),
        other => panic!("expected SOA, got {other:?}"),
    }
}

#[test]
fn a_query_and_unknown_type_are_nodata() {
    let mut out = [0u8; 512];
    for rt in [RecordType::A, RecordType::MX, RecordType::Unknown(65_000)] {
        let q = parsed("bob.pilot.", rt);
        assert_eq!(q.kind(), Name::Hostname("bob".into()));
        let n = answer_empty(&q, &mut out).expect("fits");
        check_negative(&q, &out[..n], ResponseCode::NoError, "pilot.");
    }
    let q = parsed(
        &format!("{}.", reverse_name(ula::to_ipv6(node42()))),
        RecordType::AAAA,
    );
    let n = answer_empty(&q, &mut out).expect("fits");
    check_negative(
        &q,
        &out[..n],
        ResponseCode::NoError,
        &format!("{REVERSE_ZONE}."),
    );
}

#[test]
fn nxdomain_carries_soa() {
    let q = parsed("nobody.pilot.", RecordType::AAAA);
    let mut out = [0u8; 512];
    let n = answer_nxdomain(&q, &mut out).expect("fits");
    check_negative(&q, &out[..n], ResponseCode::NXDomain, "pilot.");
}

#[test]
fn errors() {
    let mut out = [0u8; 512];
    let q = parsed("example.com.", RecordType::AAAA);
    assert_eq!(q.kind(), Name::Other);
    for (rcode, expect) in [
        (Rcode::Refused, ResponseCode::Refused),
        (Rcode::ServFail, ResponseCode::ServFail),
        (Rcode::FormErr, ResponseCode::FormErr),
    ] {
        let n = answer_error(&q, rcode, &mut out).expect("fits");
        let m = decode_answer(&q, &out[..n]);
        assert_eq!(m.metadata.response_code, expect);
        assert!(!m.metadata.authoritative);
        assert!(m.answers.is_empty() && m.authorities.is_empty());
    }
}

#[test]
fn parse_errors_and_header_only_answers() {
    assert_eq!(parse(&[0; 11]), Err(ParseError::TooShort(11)));
    let mut out = [0u8; 64];
    assert_eq!(
        answer_header_only(&[0; 11], Rcode::FormErr, &mut out),
        Ok(None)
    );

    let good = query_bytes("bob.pilot.", RecordType::AAAA, None);
    // A response is never answered.
    let mut resp = good.clone();
    resp[2] |= 0x80;
    assert_eq!(parse(&resp), Err(ParseError::Response));
    assert_eq!(parse(&resp).err().and_then(|e| e.rcode()), None);
    assert_eq!(
        answer_header_only(&resp, Rcode::FormErr, &mut out),
        Ok(None)
    );

    // NOTIFY (opcode 4): NOTIMP, opcode and RD copied.
    let mut notify = good.clone();
    notify[2] = (notify[2] & !0x78) | (4 << 3);
    let err = parse(&notify).expect_err("notify");
    assert_eq!(err, ParseError::Opcode(4));
    assert_eq!(err.rcode(), Some(Rcode::NotImp));
    let n = answer_header_only(&notify, Rcode::NotImp, &mut out)
        .expect("fits")
        .expect("answered");
    let m = Msg::from_vec(&out[..n]).expect("decodes");
    assert_eq!(m.metadata.id, ID);
    assert_eq!(m.metadata.message_type, MessageType::Response);
    assert_eq!(m.metadata.op_code, OpCode::Notify);
    assert!(m.metadata.recursion_desired);
    assert_eq!(m.metadata.response_code, ResponseCode::NotImp);
    assert!(m.queries.is_empty());

    // Two questions, or none: FORMERR.
    let mut two = good.clone();
    two[5] = 2;
    assert_eq!(parse(&two), Err(ParseError::QuestionCount(2)));
    let mut none = good.clone();
    none[5] = 0;
    assert_eq!(
        parse(&none).err().and_then(|e| e.rcode()),
        Some(Rcode::FormErr)
    );

    // Counts the datagram cannot hold.
    let mut counts = good.clone();
    counts[10] = 0xff;
    assert_eq!(parse(&counts), Err(ParseError::Counts(good.len())));

    // Cut in the middle of the question.
    let err = parse(&good[..good.len() - 3]).expect_err("short question");
    assert!(matches!(err, ParseError::Malformed(_)), "{err:?}");
    assert_eq!(err.rcode(), Some(Rcode::FormErr));

    // The header-only answer needs 12 bytes of room.
    assert!(matches!(
        answer_header_only(&good, Rcode::FormErr, &mut out[..11]),
        Err(BuildError::BufferTooSmall { need: 12, have: 11 })
    ));
}

#[test]
fn edns_size_and_opt_echo() {
    let q = parse(&query_bytes("bob.pilot.", RecordType::AAAA, Some(4096))).expect("valid");
    assert_eq!(q.edns_payload, Some(4096));
    assert_eq!(q.max_response_len(), MAX_UDP_PAYLOAD);
    let mut out = [0u8; 4096];
    let n = answer_aaaa(&q, ula::to_ipv6(node42()), POSITIVE_TTL, &mut out).expect("fits");
    let m = decode_answer(&q, &out[..n]);
    assert_eq!(
        m.edns.as_ref().map(|e| e.max_payload()),
        Some(MAX_UDP_PAYLOAD as u16)
    );
    assert_eq!(m.answers.len(), 1);
    // Sizes below 512 mean 512 (RFC 6891 §6.2.5).
    let q = parse(&query_bytes("bob.pilot.", RecordType::AAAA, Some(100))).expect("valid");
    assert_eq!(q.max_response_len(), CLASSIC_UDP_PAYLOAD);
}

#[test]
fn truncation_sets_tc_and_keeps_question() {
    let q = parsed("bob.pilot.", RecordType::AAAA);
    let min = 12 + q.question.len();
    // Room for the header and question, not for the answer.
    let mut out = vec![0u8; min + 10];
    let n =
        answer_aaaa(&q, ula::to_ipv6(node42()), POSITIVE_TTL, &mut out).expect("fits truncated");
    assert_eq!(n, min);
    let m = decode_answer(&q, &out[..n]);
    assert!(m.metadata.truncation);
    assert!(m.answers.is_empty());
    let n = answer_nxdomain(&q, &mut out).expect("fits truncated");
    let m = decode_answer(&q, &out[..n]);
    assert!(m.metadata.truncation);
    assert!(m.authorities.is_empty());
    // Less than the header and question is an error.
    assert!(matches!(
        answer_empty(&q, &mut out[..min - 1]),
        Err(BuildError::BufferTooSmall { .. })
    ));

    // A long question against the 512-byte classic limit: a PTR answer to a 255-byte target
    // does not fit beside a 255-byte question.
    let label = "a".repeat(63);
    let long_q = format!("{label}.{label}.{label}.{}.pilot.", "b".repeat(55));
    let q = parsed(&long_q, RecordType::PTR);
    assert_eq!(q.question.len(), 255 + 4);
    let target = format!("{label}.{label}.{label}.{}.pilot", "c".repeat(55));
    let mut out = [0u8; MAX_UDP_PAYLOAD];
    let n = answer_ptr(&q, &target, POSITIVE_TTL, &mut out).expect("fits truncated");
    assert!(n <= CLASSIC_UDP_PAYLOAD);
    let m = decode_answer(&q, &out[..n]);
    assert!(m.metadata.truncation);
}

#[test]
fn cache_expiry() {
    let t0 = Instant::now();
    let mut c = DnsCache::default();
    let key = CacheKey::Hostname("bob".into());
    let ip = ula::to_ipv6(node42());
    c.insert(t0, key.clone(), CacheValue::Ula(ip), POSITIVE_TTL);
    let (v, ttl) = c.get(t0 + Duration::from_secs(15), &key).expect("live");
    assert_eq!(v, &CacheValue::Ula(ip));
    assert_eq!(ttl, Duration::from_secs(45));
    assert!(c.get(t0 + POSITIVE_TTL, &key).is_none());
    assert!(c.is_empty());

    // Replacing a value keeps one entry and takes the new TTL.
    let nkey = CacheKey::Address(node42());
    c.insert(t0, nkey.clone(), CacheValue::Negative, NEGATIVE_TTL);
    c.insert(
        t0,
        nkey.clone(),
        CacheValue::Hostname("bob".into()),
        POSITIVE_TTL,
    );
    assert_eq!(c.len(), 1);
    let (v, _) = c.get(t0 + NEGATIVE_TTL, &nkey).expect("live");
    assert_eq!(v, &CacheValue::Hostname("bob".into()));
    c.purge(t0 + POSITIVE_TTL);
    assert!(c.is_empty());
}

#[test]
fn cache_bound_evicts_soonest_expiring() {
    let t0 = Instant::now();
    let mut c = DnsCache::new(3);
    let k = |i: u32| CacheKey::Address(Addr::new(0, i));
    c.insert(t0, k(1), CacheValue::Negative, Duration::from_secs(30));
    c.insert(t0, k(2), CacheValue::Negative, Duration::from_secs(10));
    c.insert(t0, k(3), CacheValue::Negative, Duration::from_secs(20));
    c.insert(t0, k(4), CacheValue::Negative, Duration::from_secs(40));
    assert_eq!(c.len(), 3);
    assert!(c.get(t0, &k(2)).is_none());
    for i in [1, 3, 4] {
        assert!(c.get(t0, &k(i)).is_some(), "{i}");
    }
    // Expired entries go first, whatever their order.
    c.insert(
        t0 + Duration::from_secs(25),
        k(5),
        CacheValue::Negative,
        Duration::from_secs(1),
    );
    assert!(c.get(t0 + Duration::from_secs(25), &k(3)).is_none());
    assert_eq!(c.len(), 3);
    // Many inserts never exceed the bound.
    for i in 0..100 {
        c.insert(
            t0,
            k(100 + i),
            CacheValue::Negative,
            Duration::from_secs(u64::from(i)),
        );
        assert!(c.len() <= 3);
    }
}

/// Builds every answer the query allows and checks each decodes and respects the limit.
fn answer_everything(q: &Query) {
    let mut out = [0u8; MAX_UDP_PAYLOAD];
    let _ = q.kind();
    let _ = q.name();
    let ip = ula::to_ipv6(node42());
    let results = [
        answer_aaaa(q, ip, POSITIVE_TTL, &mut out).map(|n| out[..n].to_vec()),
        answer_ptr(q, "bob.pilot", POSITIVE_TTL, &mut out).map(|n| out[..n].to_vec()),
        answer_empty(q, &mut out).map(|n| out[..n].to_vec()),
        answer_nxdomain(q, &mut out).map(|n| out[..n].to_vec()),
        answer_error(q, Rcode::Refused, &mut out).map(|n| out[..n].to_vec()),
    ];
    for r in results {
        let bytes = r.expect("a parsed question always fits 1232 bytes");
        assert!(bytes.len() <= q.max_response_len());
        Msg::from_vec(&bytes).expect("answer decodes");
    }
}

proptest! {
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        match parse(&bytes) {
            Ok(q) => answer_everything(&q),
            Err(e) => {
                let mut out = [0u8; 64];
                if let Some(rcode) = e.rcode() {
                    let n = answer_header_only(&bytes, rcode, &mut out);
                    prop_assert!(matches!(n, Ok(Some(12))));
                }
            }
        }
    }

    #[test]
    fn mutated_queries_never_panic(
        edns in proptest::option::of(any::<u16>()),
        mutations in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in any::<usize>(),
    ) {
        let mut bytes = query_bytes("bob.pilot.", RecordType::AAAA, edns);
        for (at, b) in mutations {
            let i = at % bytes.len();
            bytes[i] = b;
        }
        bytes.truncate(cut % (bytes.len() + 1));
        if let Ok(q) = parse(&bytes) {
            answer_everything(&q);
        }
    }

    #[test]
    fn numeric_names_round_trip(network in any::<u16>(), node in any::<u32>()) {
        let a = Addr::new(network, node);
        let q = parsed(&format!("{}.", numeric_name(a)), RecordType::AAAA);
        prop_assert_eq!(q.kind(), Name::Address(a));
        let q = parsed(&format!("{}.", reverse_name(ula::to_ipv6(a))), RecordType::PTR);
        prop_assert_eq!(q.kind(), Name::Reverse(a));
    }
}
