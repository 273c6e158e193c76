//! DNS queries to pilotd's resolver: parsing arbitrary bytes never panics; every answer built
//! for a parsed query decodes (with hickory-proto), echoes the ID and the question, and stays
//! within the client's limit and the 1232-byte buffer; refused queries get a 12-byte header.
#![no_main]
use hickory_proto::op::Message;
use libfuzzer_sys::fuzz_target;
use tunnel::inside::dns::{self, Rcode};

fuzz_target!(|data: &[u8]| {
    let mut out = [0u8; dns::MAX_UDP_PAYLOAD];
    let q = match dns::parse(data) {
        Ok(q) => q,
        Err(e) => {
            if let Some(rcode) = e.rcode() {
                let n = dns::answer_header_only(data, rcode, &mut out);
                assert!(matches!(n, Ok(Some(12))), "{n:?}");
            }
            return;
        }
    };
    let _ = q.kind();
    let _ = q.name();
    let ip = tunnel::ula::to_ipv6(tunnel::Addr::new(0, 42));
    let ttl = dns::POSITIVE_TTL;
    let builders: [&dyn Fn(&mut [u8]) -> Result<usize, dns::BuildError>; 7] = [
        &|o| dns::answer_aaaa(&q, ip, ttl, o),
        &|o| dns::answer_ptr(&q, "bob.pilot", ttl, o),
        &|o| dns::answer_empty(&q, o),
        &|o| dns::answer_nxdomain(&q, o),
        &|o| dns::answer_error(&q, Rcode::Refused, o),
        &|o| dns::answer_error(&q, Rcode::ServFail, o),
        &|o| dns::answer_error(&q, Rcode::FormErr, o),
    ];
    for build in builders {
        let n = build(&mut out).expect("a parsed question always fits 1232 bytes");
        assert!(n <= q.max_response_len() && n <= dns::MAX_UDP_PAYLOAD);
        let m = Message::from_vec(&out[..n]).expect("answer decodes");
        assert_eq!(m.metadata.id, q.id);
        assert_eq!(m.queries.len(), 1);
        assert_eq!(u16::from(m.queries[0].query_type), q.qtype);
    }
});
