//! DNS for `.pilot` names, answered by pilotd itself inside the TUN data path: the sans-IO
//! core (query parsing, name classification, answer builders and a bounded TTL cache).
//!
//! Layer: inside, sans-IO. Nothing here opens a socket or reads a clock: a query comes in as
//! the UDP payload of a packet the kernel routed to [`RESOLVER`]`:53`, time as an [`Instant`]
//! argument, and every answer is written into a buffer the caller owns. The caller (the
//! daemon) asks the registry for what it does not have cached and wraps the answer in IPv6/UDP
//! from `[RESOLVER]:53` to the client's address and port with
//! [`build_udp`](super::packet::build_udp).
//!
//! # Names
//!
//! ```text
//! bob.pilot                              AAAA -> ULA of the node registered as "bob"
//! 0-0000-0000-002a.pilot                 AAAA -> ULA of 0:0000.0000.002A (no lookup)
//! a.2.0.0. ... .d.3.3.b.d.c.f.3.6.0.d.f.ip6.arpa   PTR -> "<hostname>.pilot"
//! ```
//!
//! The numeric form follows the text form `N:NNNN.HHHH.LLLL` of [`Addr`] with `-` for `:` and
//! `.`: `N` decimal, the three groups exactly four hex digits, case-insensitive, and the
//! decimal and hex networks must agree. A label of that shape is never read as a hostname.
//! Hostnames follow the registry's rules ([`validate_hostname`]). See [`Name`] for how every
//! name is classified and which answer each class gets.
//!
//! # Answer layout
//!
//! ```text
//! +--------+---------------------------+------------------+-------------------+----------+
//! | header | question (as sent)        | answer (0 or 1)  | authority (0/1)   | OPT (0/1)|
//! | 12 B   | name, type, class         | c0 0c, type,     | SOA of the zone   | if the   |
//! | QR AA? | (<= 259 B)                | class IN, TTL,   | (NXDOMAIN and     | query    |
//! | RD TC? |                           | rdlen, AAAA/PTR  | NODATA only)      | had EDNS |
//! +--------+---------------------------+------------------+-------------------+----------+
//! ```
//!
//! A truncated answer (TC) keeps the header, the question and the OPT record.
//!
//! # Calling order
//!
//! For every UDP payload sent to `[RESOLVER]:53`: [`parse`]. On an error, answer with
//! [`answer_header_only`] when [`ParseError::rcode`] gives a code, else drop the datagram.
//! On a [`Query`], match [`Query::kind`] and answer with one of [`answer_aaaa`],
//! [`answer_ptr`], [`answer_empty`], [`answer_nxdomain`] or [`answer_error`], consulting a
//! [`DnsCache`] first and filling it from the registry's answers.
//!
//! # Invariants
//!
//! Every query is hostile input: parsing never panics, its work is bounded by the datagram's
//! length (section counts are checked against it before decoding), and every answer fits both
//! the caller's buffer and the client's limit ([`Query::max_response_len`]); an answer that
//! does not fit is sent truncated (TC set, header, question and OPT only, RFC 1035 §4.1.1,
//! RFC 6891 §7). Answers echo the question byte for byte (so resolvers that randomise the
//! case of names, "0x20", accept them), copy ID, opcode and RD, set QR, set AA on answers from
//! our zones, and leave RA clear: this server never recurses.
//!
//! Negative answers (NXDOMAIN and NODATA) carry the zone's SOA in the authority section, with
//! [`NEGATIVE_TTL`] as both its TTL and its MINIMUM, so resolvers cache them that long
//! (RFC 2308 §3). An EDNS query gets an OPT record back advertising [`MAX_UDP_PAYLOAD`]; an
//! EDNS version above 0 is answered as version 0 (no BADVERS).

use core::net::Ipv6Addr;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode};

use crate::addr::Addr;
use crate::registry::names::validate_hostname;
use crate::ula;

/// The resolver's address, `fd06:3fcd:b33d:0:fffe::53`: network 0, interface-ID high bits
/// `0xfffe0000`. It lies in the Pilot /48, so the kernel routes it to `pilot0`, but its
/// reserved interface-ID bits are not zero, so it is never a Pilot node
/// ([`ula::from_ipv6`] rejects it), and it lies outside [`FAKE_PREFIX`](super::FAKE_PREFIX)
/// (`…:0:ffff::/80`), so no hairpin fake ever takes it. pilotd answers UDP port [`PORT`] there.
pub const RESOLVER: Ipv6Addr = Ipv6Addr::new(0xfd06, 0x3fcd, 0xb33d, 0, 0xfffe, 0, 0, 0x53);
/// The UDP port the resolver answers on.
pub const PORT: u16 = 53;
/// The forward zone.
pub const ZONE: &str = "pilot";
/// The reverse zone of the Pilot /48 (`fd06:3fcd:b33d::/48`).
pub const REVERSE_ZONE: &str = "d.3.3.b.d.c.f.3.6.0.d.f.ip6.arpa";
/// TTL of positive answers and of positive cache entries.
pub const POSITIVE_TTL: Duration = Duration::from_secs(60);
/// TTL of negative answers (the SOA's TTL and MINIMUM) and of negative cache entries.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(10);
/// The UDP payload size this server advertises in OPT records and the most it ever sends
/// (the DNS Flag Day 2020 value: fits the IPv6 minimum MTU).
pub const MAX_UDP_PAYLOAD: usize = 1232;
/// The limit of a client that sends no EDNS (RFC 1035 §4.2.1).
pub const CLASSIC_UDP_PAYLOAD: usize = 512;
/// Default bound of a [`DnsCache`].
pub const DEFAULT_CACHE_ENTRIES: usize = 4096;

/// DNS wire constants (RFC 1035 §4.1, RFC 3596, RFC 6891).
mod wire {
    use core::ops::Range;

    pub const HEADER_LEN: usize = 12;
    pub const ID: Range<usize> = 0..2;
    pub const FLAGS: Range<usize> = 2..4;
    pub const QDCOUNT: Range<usize> = 4..6;
    pub const ANCOUNT: Range<usize> = 6..8;
    pub const NSCOUNT: Range<usize> = 8..10;
    pub const ARCOUNT: Range<usize> = 10..12;
    /// Flag bits of the 16-bit flags word.
    pub const QR: u16 = 0x8000;
    pub const OPCODE_SHIFT: u16 = 11;
    pub const OPCODE_MASK: u16 = 0x7800;
    pub const AA: u16 = 0x0400;
    pub const TC: u16 = 0x0200;
    pub const RD: u16 = 0x0100;
    /// A compression pointer to offset 12: the question's name.
    pub const PTR_TO_QNAME: [u8; 2] = [0xc0, 0x0c];
    /// Fixed part of a resource record after its name: type, class, TTL, RDLENGTH.
    pub const RR_FIXED_LEN: usize = 10;
    /// The smallest resource record: root name plus the fixed part.
    pub const MIN_RR_LEN: usize = 1 + RR_FIXED_LEN;
    pub const CLASS_IN: u16 = 1;
    pub const TYPE_OPT: u16 = 41;
    pub const MAX_NAME_LEN: usize = 255;
    pub const MAX_LABEL_LEN: usize = 63;
    pub const OPCODE_QUERY: u8 = 0;
}

/// Record types this module names.
pub mod rtype {
    /// IPv4 address.
    pub const A: u16 = 1;
    /// Start of authority.
    pub const SOA: u16 = 6;
    /// Domain name pointer.
    pub const PTR: u16 = 12;
    /// IPv6 address (RFC 3596).
    pub const AAAA: u16 = 28;
    /// Any type.
    pub const ANY: u16 = 255;
}

/// A DNS response code (RFC 1035 §4.1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Rcode {
    /// No error.
    NoError = 0,
    /// The query could not be interpreted.
    FormErr = 1,
    /// The server could not answer (the registry is unreachable).
    ServFail = 2,
    /// The name does not exist.
    NxDomain = 3,
    /// The opcode is not supported.
    NotImp = 4,
    /// The server will not answer for this name.
    Refused = 5,
}

/// Why a datagram is not a query this server answers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Shorter than a DNS header: not answerable, drop it.
    #[error("{0} bytes is shorter than a DNS header")]
    TooShort(usize),
    /// A response (QR set): never answered, so two resolvers cannot loop.
    #[error("message is a response, not a query")]
    Response,
    /// An opcode other than QUERY: answer NOTIMP.
    #[error("opcode {0} is not supported")]
    Opcode(u8),
    /// Not exactly one question: answer FORMERR.
    #[error("{0} questions (exactly 1 is answered)")]
    QuestionCount(u16),
    /// The header announces more records than the datagram can hold: answer FORMERR.
    #[error("section counts exceed what {0} bytes can hold")]
    Counts(usize),
    /// The message does not decode: answer FORMERR.
    #[error("malformed message: {0}")]
    Malformed(String),
}

impl ParseError {
    /// The code to answer with through [`answer_header_only`], or `None` when the datagram
    /// must be dropped.
    pub fn rcode(&self) -> Option<Rcode> {
        match self {
            Self::TooShort(_) | Self::Response => None,
            Self::Opcode(_) => Some(Rcode::NotImp),
            Self::QuestionCount(_) | Self::Counts(_) | Self::Malformed(_) => Some(Rcode::FormErr),
        }
    }
}

/// Why an answer could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// The buffer cannot hold even the truncated answer.
    #[error("buffer of {have} bytes is too small (need {need})")]
    BufferTooSmall {
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// A name to put in an answer is not a valid domain name.
    #[error("{0:?} is not a valid domain name")]
    BadName(String),
}

/// A parsed query: the one question and what the answer must copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// Transaction ID.
    pub id: u16,
    /// RD (recursion desired), copied to the answer.
    pub recursion_desired: bool,
    /// The question's type.
    pub qtype: u16,
    /// The question's class.
    pub qclass: u16,
    /// The EDNS UDP payload size, when the query carries an OPT record.
    pub edns_payload: Option<u16>,
    /// The question as sent (name uncompressed, in its original case; type; class).
    question: Vec<u8>,
    /// The name's labels, ASCII-lowercased.
    labels: Vec<Vec<u8>>,
}

/// What a question's name is, and how to answer it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Name {
    /// `<hostname>.pilot` (lowercase, valid under the registry's rules): AAAA from the
    /// registry, NODATA for other types of a known name, NXDOMAIN for an unknown one.
    Hostname(String),
    /// `<N>-<NNNN>-<HHHH>-<LLLL>.pilot`: AAAA is the address's ULA without any lookup; other
    /// types NODATA.
    Address(Addr),
    /// The PTR name of a node's ULA in [`REVERSE_ZONE`]: PTR `<hostname>.pilot` from the
    /// registry (or the numeric form when it has none); other types NODATA.
    Reverse(Addr),
    /// The apex of one of our zones, or a name above a node in the reverse zone (fewer than
    /// 32 nibbles): exists, has no records here. Answer NODATA ([`answer_empty`]).
    Empty,
    /// A name in one of our zones that can never exist (breaks the hostname rules, has more
    /// labels, or the reverse name of an address that is not a node, such as [`RESOLVER`]):
    /// answer NXDOMAIN.
    NotFound,
    /// Outside our zones, or a class other than IN: answer REFUSED.
    Other,
}

/// A cache key: what was asked of the registry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CacheKey {
    /// A lowercase hostname (without `.pilot`) to resolve.
    Hostname(String),
    /// An address whose hostname to find (for PTR).
    Address(Addr),
}

/// A cached registry answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheValue {
    /// The hostname resolved to this ULA.
    Ula(Ipv6Addr),
    /// The address has this hostname.
    Hostname(String),
    /// The registry knows no such name or address.
    Negative,
}

/// Parses a DNS query (a UDP payload sent to [`RESOLVER`]).
pub fn parse(query: &[u8]) -> Result<Query, ParseError> {
    if query.len() < wire::HEADER_LEN {
        return Err(ParseError::TooShort(query.len()));
    }
    let word =
        |r: core::ops::Range<usize>| u16::from_be_bytes([query[r.start], query[r.start + 1]]);
    let flags = word(wire::FLAGS);
    if flags & wire::QR != 0 {
        return Err(ParseError::Response);
    }
    let opcode = ((flags & wire::OPCODE_MASK) >> wire::OPCODE_SHIFT) as u8;
    if opcode != wire::OPCODE_QUERY {
        return Err(ParseError::Opcode(opcode));
    }
    let qdcount = word(wire::QDCOUNT);
    if qdcount != 1 {
        return Err(ParseError::QuestionCount(qdcount));
    }
    // Bound the decoder's work by the datagram: every record needs at least MIN_RR_LEN bytes.
    let records = usize::from(word(wire::ANCOUNT))
        + usize::from(word(wire::NSCOUNT))
        + usize::from(word(wire::ARCOUNT));
    if records * wire::MIN_RR_LEN > query.len() - wire::HEADER_LEN {
        return Err(ParseError::Counts(query.len()));
    }
    let msg = Message::from_vec(query).map_err(|e| ParseError::Malformed(e.to_string()))?;
    if msg.metadata.message_type != MessageType::Query || msg.metadata.op_code != OpCode::Query {
        return Err(ParseError::Malformed("header changed in decoding".into()));
    }
    let [q] = &msg.queries[..] else {
        return Err(ParseError::QuestionCount(msg.queries.len() as u16));
    };
    let mut question = Vec::with_capacity(q.name.len() + 6);
    let mut labels = Vec::with_capacity(usize::from(q.name.num_labels()));
    for label in q.name.iter() {
        // hickory-proto only decodes labels of 1..=63 bytes in names of at most 255 bytes.
        question.push(label.len() as u8);
        question.extend_from_slice(label);
        labels.push(label.to_ascii_lowercase());
    }
    question.push(0);
    if question.len() > wire::MAX_NAME_LEN {
        return Err(ParseError::Malformed("name longer than 255 bytes".into()));
    }
    let qtype = u16::from(q.query_type);
    let qclass = u16::from(q.query_class);
    question.extend_from_slice(&qtype.to_be_bytes());
    question.extend_from_slice(&qclass.to_be_bytes());
    Ok(Query {
        id: msg.metadata.id,
        recursion_desired: msg.metadata.recursion_desired,
        qtype,
        qclass,
        edns_payload: msg.edns.as_ref().map(|e| e.max_payload()),
        question,
        labels,
    })
}

impl Query {
    /// The name in presentation form, lowercase, without the trailing dot (`bob.pilot`);
    /// bytes other than letters, digits, `-` and `_` are written `\DDD` (RFC 1035 §5.1).
    pub fn name(&self) -> String {
        let mut s = String::new();
        for (i, label) in self.labels.iter().enumerate() {
            if i > 0 {
                s.push('.');
            }
            for &b in label {
                if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                    s.push(char::from(b));
                } else {
                    s.push_str(&format!("\\{b:03}"));
                }
            }
        }
        s
    }

    /// Classifies the question's name (and class).
    pub fn kind(&self) -> Name {
        if self.qclass != wire::CLASS_IN {
            return Name::Other;
        }
        classify(&self.labels)
    }

    /// The most bytes an answer may have: the client's EDNS size (at least 512) capped at
    /// [`MAX_UDP_PAYLOAD`], or 512 without EDNS.
    pub fn max_response_len(&self) -> usize {
        match self.edns_payload {
            Some(n) => usize::from(n).clamp(CLASSIC_UDP_PAYLOAD, MAX_UDP_PAYLOAD),
            None => CLASSIC_UDP_PAYLOAD,
        }
    }

    /// True for a reverse-zone question (its negative answers carry the reverse zone's SOA).
    fn in_reverse_zone(&self) -> bool {
        strip_zone(&self.labels, REVERSE_ZONE).is_some()
    }
}

/// The labels before `zone` when `labels` end with it.
fn strip_zone<'l>(labels: &'l [Vec<u8>], zone: &str) -> Option<&'l [Vec<u8>]> {
    let n = zone.split('.').count();
    let split = labels.len().checked_sub(n)?;
    let (below, tail) = labels.split_at(split);
    tail.iter()
        .zip(zone.split('.'))
        .all(|(l, z)| l[..] == *z.as_bytes())
        .then_some(below)
}

fn classify(labels: &[Vec<u8>]) -> Name {
    match labels {
        [zone] if zone == ZONE.as_bytes() => Name::Empty,
        [label, zone] if zone == ZONE.as_bytes() => classify_forward(label),
        [.., zone] if zone == ZONE.as_bytes() => Name::NotFound,
        _ => match strip_zone(labels, REVERSE_ZONE) {
            Some(nibbles) => classify_reverse(nibbles),
            None => Name::Other,
        },
    }
}

/// Classifies the one label below `pilot`.
fn classify_forward(label: &[u8]) -> Name {
    let Ok(label) = core::str::from_utf8(label) else {
        return Name::NotFound;
    };
    if let Some(numeric) = numeric_form(label) {
        return numeric.map_or(Name::NotFound, Name::Address);
    }
    match validate_hostname(label) {
        Ok(()) => Name::Hostname(label.to_owned()),
        Err(_) => Name::NotFound,
    }
}

/// `Some` when `label` has the numeric shape `<digits>-<4 hex>-<4 hex>-<4 hex>`; inside it
/// the address, or `None` when the shape is right but the address is not (network out of
/// range, or decimal and hex networks disagree).
fn numeric_form(label: &str) -> Option<Option<Addr>> {
    let mut parts = label.split('-');
    let (Some(n), Some(g0), Some(g1), Some(g2), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return None;
    };
    let hex4 = |g: &str| g.len() == 4 && g.bytes().all(|b| b.is_ascii_hexdigit());
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) || ![g0, g1, g2].into_iter().all(hex4)
    {
        return None;
    }
    Some(format!("{n}:{g0}.{g1}.{g2}").parse::<Addr>().ok())
}

/// Classifies the labels before [`REVERSE_ZONE`]: nibbles, least significant first.
fn classify_reverse(nibble_labels: &[Vec<u8>]) -> Name {
    // An address has 32 nibbles; the /48 fixes the first 12.
    const NIBBLES_BELOW: usize = 32 - 12;
    if nibble_labels.len() > NIBBLES_BELOW {
        return Name::NotFound;
    }
    let mut octets = ula::PREFIX_ADDR.octets();
    for (i, label) in nibble_labels.iter().rev().enumerate() {
        let nibble = match label[..] {
            [c] => match char::from(c).to_digit(16) {
                Some(v) => v as u8,
                None => return Name::NotFound,
            },
            _ => return Name::NotFound,
        };
        // Nibble index counted from the most significant nibble of the address.
        let pos = 12 + i;
        let byte = &mut octets[pos / 2];
        *byte |= if pos % 2 == 0 { nibble << 4 } else { nibble };
    }
    if nibble_labels.len() < NIBBLES_BELOW {
        return Name::Empty;
    }
    match ula::from_ipv6(Ipv6Addr::from(octets)) {
        Ok(addr) => Name::Reverse(addr),
        Err(_) => Name::NotFound,
    }
}

/// The reverse (PTR) name of an address, without the trailing dot.
pub fn reverse_name(ip: Ipv6Addr) -> String {
    let mut s = String::with_capacity(72);
    for b in ip.octets().iter().rev() {
        for nibble in [b & 0x0f, b >> 4] {
            s.push(char::from_digit(u32::from(nibble), 16).unwrap_or('0'));
            s.push('.');
        }
    }
    s.push_str("ip6.arpa");
    s
}

/// The numeric name of an address, without the trailing dot (`0-0000-0000-002a.pilot`).
pub fn numeric_name(addr: Addr) -> String {
    format!(
        "{}-{:04x}-{:04x}-{:04x}.{ZONE}",
        addr.network,
        addr.network,
        addr.node >> 16,
        addr.node & 0xffff
    )
}

/// A section record to write after the question.
enum Record<'a> {
    Aaaa(Ipv6Addr, u32),
    /// PTR to a name already encoded in wire form.
    Ptr(&'a [u8], u32),
}

/// Writes a DNS answer into `out`; see the module docs for the header rules.
struct Answer<'q> {
    query: &'q Query,
    rcode: Rcode,
    authoritative: bool,
}

impl Answer<'_> {
    /// Writes header, question, `answer`, the SOA when `soa` and OPT when the query had EDNS;
    /// truncates when it does not fit.
    fn emit(
        &self,
        answer: Option<Record<'_>>,
        soa: bool,
        out: &mut [u8],
    ) -> Result<usize, BuildError> {
        let q = self.query;
        let opt_len = if q.edns_payload.is_some() {
            wire::MIN_RR_LEN
        } else {
            0
        };
        let min = wire::HEADER_LEN + q.question.len() + opt_len;
        let limit = q.max_response_len().min(out.len());
        if min > limit {
            return Err(BuildError::BufferTooSmall {
                need: min,
                have: limit,
            });
        }
        let soa_rr = if soa { Some(soa_record(q)) } else { None };
        let answer_len = match &answer {
            None => 0,
            Some(Record::Aaaa(..)) => 2 + wire::RR_FIXED_LEN + 16,
            Some(Record::Ptr(name, _)) => 2 + wire::RR_FIXED_LEN + name.len(),
        };
        let soa_len = soa_rr.as_ref().map_or(0, Vec::len);
        let truncated = min + answer_len + soa_len > limit;

        let mut flags = wire::QR | u16::from(wire::OPCODE_QUERY) << wire::OPCODE_SHIFT;
        flags |= self.rcode as u16;
        if self.authoritative {
            flags |= wire::AA;
        }
        if q.recursion_desired {
            flags |= wire::RD;
        }
        if truncated {
            flags |= wire::TC;
        }
        let an = u16::from(!truncated && answer.is_some());
        let ns = u16::from(!truncated && soa_rr.is_some());
        let ar = u16::from(opt_len > 0);
        out[wire::ID].copy_from_slice(&q.id.to_be_bytes());
        out[wire::FLAGS].copy_from_slice(&flags.to_be_bytes());
        out[wire::QDCOUNT].copy_from_slice(&1u16.to_be_bytes());
        out[wire::ANCOUNT].copy_from_slice(&an.to_be_bytes());
        out[wire::NSCOUNT].copy_from_slice(&ns.to_be_bytes());
        out[wire::ARCOUNT].copy_from_slice(&ar.to_be_bytes());
        let mut w = Writer {
            out,
            pos: wire::HEADER_LEN,
        };
        w.put(&q.question);
        if !truncated {
            match answer {
                None => {}
                Some(Record::Aaaa(ip, ttl)) => {
                    w.put(&wire::PTR_TO_QNAME);
                    w.rr_fixed(rtype::AAAA, wire::CLASS_IN, ttl, 16);
                    w.put(&ip.octets());
                }
                Some(Record::Ptr(name, ttl)) => {
                    w.put(&wire::PTR_TO_QNAME);
                    // Names are at most 255 bytes.
                    w.rr_fixed(rtype::PTR, wire::CLASS_IN, ttl, name.len() as u16);
                    w.put(name);
                }
            }
            if let Some(rr) = &soa_rr {
                w.put(rr);
            }
        }
        if opt_len > 0 {
            // RFC 6891 §6.1.2: root name, TYPE 41, CLASS = our UDP payload size, TTL =
            // extended RCODE 0, version 0, no flags; no options.
            w.put(&[0]);
            w.rr_fixed(wire::TYPE_OPT, MAX_UDP_PAYLOAD as u16, 0, 0);
        }
        Ok(w.pos)
    }
}

/// A cursor over a buffer the caller sized beforehand.
struct Writer<'a> {
    out: &'a mut [u8],
    pos: usize,
}

impl Writer<'_> {
    /// Invariant: `Answer::emit` checks the total length against `out` before writing.
    fn put(&mut self, bytes: &[u8]) {
        self.out[self.pos..self.pos + bytes.len()].copy_from_slice(bytes);
        self.pos += bytes.len();
    }

    fn rr_fixed(&mut self, rtype: u16, class: u16, ttl: u32, rdlen: u16) {
        self.put(&rtype.to_be_bytes());
        self.put(&class.to_be_bytes());
        self.put(&ttl.to_be_bytes());
        self.put(&rdlen.to_be_bytes());
    }
}

/// Encodes a presentation name (`bob.pilot` or `bob.pilot.`) in wire form: ASCII letters, digits, `-` and `_` only.
fn encode_name(name: &str) -> Result<Vec<u8>, BuildError> {
    let bad = || BuildError::BadName(name.to_owned());
    let trimmed = name.strip_suffix('.').unwrap_or(name);
    if trimmed.is_empty() {
        return Err(bad());
    }
    let mut out = Vec::with_capacity(trimmed.len() + 2);
    for label in trimmed.split('.') {
        let ok = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
        if label.is_empty() || label.len() > wire::MAX_LABEL_LEN || !label.bytes().all(ok) {
            return Err(bad());
        }
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    if out.len() > wire::MAX_NAME_LEN {
        return Err(bad());
    }
    Ok(out)
}

/// The SOA record of the zone the query falls in (RFC 1035 §3.3.13), for negative answers.
fn soa_record(q: &Query) -> Vec<u8> {
    let zone = if q.in_reverse_zone() {
        REVERSE_ZONE
    } else {
        ZONE
    };
    // Invariant: the zone names and these fixed names are valid.
    let owner = encode_name(zone).unwrap_or_default();
    let mname = encode_name("resolver.pilot").unwrap_or_default();
    let rname = encode_name("hostmaster.pilot").unwrap_or_default();
    let negative = NEGATIVE_TTL.as_secs() as u32;
    let fields: [u32; 5] = [1, 3600, 600, 86_400, negative]; // serial, refresh, retry, expire, minimum
    let rdlen = mname.len() + rname.len() + 20;
    let mut rr = Vec::with_capacity(owner.len() + wire::RR_FIXED_LEN + rdlen);
    rr.extend_from_slice(&owner);
    rr.extend_from_slice(&rtype::SOA.to_be_bytes());
    rr.extend_from_slice(&wire::CLASS_IN.to_be_bytes());
    rr.extend_from_slice(&negative.to_be_bytes());
    rr.extend_from_slice(&(rdlen as u16).to_be_bytes());
    rr.extend_from_slice(&mname);
    rr.extend_from_slice(&rname);
    for f in fields {
        rr.extend_from_slice(&f.to_be_bytes());
    }
    rr
}

fn ttl_secs(ttl: Duration) -> u32 {
    u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX)
}

/// Answers with one AAAA record (NOERROR, AA). Returns the answer's length.
pub fn answer_aaaa(
    query: &Query,
    ip: Ipv6Addr,
    ttl: Duration,
    out: &mut [u8],
) -> Result<usize, BuildError> {
    let a = Answer {
        query,
        rcode: Rcode::NoError,
        authoritative: true,
    };
    a.emit(Some(Record::Aaaa(ip, ttl_secs(ttl))), false, out)
}

/// Answers with one PTR record naming `target` (e.g. `bob.pilot`, trailing dot optional;
/// ASCII letters, digits, `-` and `_` per label). Returns the answer's length.
pub fn answer_ptr(
    query: &Query,
    target: &str,
    ttl: Duration,
    out: &mut [u8],
) -> Result<usize, BuildError> {
    let name = encode_name(target)?;
    let a = Answer {
        query,
        rcode: Rcode::NoError,
        authoritative: true,
    };
    a.emit(Some(Record::Ptr(&name, ttl_secs(ttl))), false, out)
}

/// Answers NOERROR with no records (NODATA: the name exists, not with this type), with the
/// zone's SOA in authority. Returns the answer's length.
pub fn answer_empty(query: &Query, out: &mut [u8]) -> Result<usize, BuildError> {
    let a = Answer {
        query,
        rcode: Rcode::NoError,
        authoritative: true,
    };
    a.emit(None, true, out)
}

/// Answers NXDOMAIN with the zone's SOA in authority. Returns the answer's length.
pub fn answer_nxdomain(query: &Query, out: &mut [u8]) -> Result<usize, BuildError> {
    let a = Answer {
        query,
        rcode: Rcode::NxDomain,
        authoritative: true,
    };
    a.emit(None, true, out)
}

/// Answers with `rcode` and no records (AA clear): SERVFAIL when the registry cannot be
/// reached, REFUSED for [`Name::Other`], FORMERR or NOTIMP. Returns the answer's length.
pub fn answer_error(query: &Query, rcode: Rcode, out: &mut [u8]) -> Result<usize, BuildError> {
    let a = Answer {
        query,
        rcode,
        authoritative: false,
    };
    a.emit(None, false, out)
}

/// Answers a datagram that [`parse`] refused but whose header is readable (at least 12
/// bytes): the header alone, with ID, opcode and RD copied, QR set, all counts zero, and
/// `rcode`. Returns `None` for datagrams never answered (shorter than a header, or
/// responses), else the answer's length.
pub fn answer_header_only(
    query: &[u8],
    rcode: Rcode,
    out: &mut [u8],
) -> Result<Option<usize>, BuildError> {
    if query.len() < wire::HEADER_LEN {
        return Ok(None);
    }
    let flags = u16::from_be_bytes([query[2], query[3]]);
    if flags & wire::QR != 0 {
        return Ok(None);
    }
    if out.len() < wire::HEADER_LEN {
        return Err(BuildError::BufferTooSmall {
            need: wire::HEADER_LEN,
            have: out.len(),
        });
    }
    let flags = wire::QR | (flags & (wire::OPCODE_MASK | wire::RD)) | rcode as u16;
    out[wire::ID].copy_from_slice(&query[wire::ID]);
    out[wire::FLAGS].copy_from_slice(&flags.to_be_bytes());
    out[wire::QDCOUNT.start..wire::HEADER_LEN].fill(0);
    Ok(Some(wire::HEADER_LEN))
}

/// A bounded cache of registry answers with per-entry TTLs. Time comes in as an argument.
///
/// At most `max_entries` entries; inserting into a full cache first drops expired entries,
/// then the entry that expires soonest. Every operation is O(log n).
#[derive(Debug)]
pub struct DnsCache {
    entries: HashMap<CacheKey, CacheEntry>,
    /// Expiry order: (deadline, insertion sequence) -> key.
    by_expiry: BTreeMap<(Instant, u64), CacheKey>,
    max_entries: usize,
    seq: u64,
}

#[derive(Debug)]
struct CacheEntry {
    value: CacheValue,
    expires: Instant,
    seq: u64,
}

impl Default for DnsCache {
    fn default() -> Self {
        Self::new(DEFAULT_CACHE_ENTRIES)
    }
}

impl DnsCache {
    /// A cache of at most `max_entries` entries (at least one).
    pub fn new(max_entries: usize) -> Self {
        Self {
            entries: HashMap::new(),
            by_expiry: BTreeMap::new(),
            max_entries: max_entries.max(1),
            seq: 0,
        }
    }

    /// Number of entries, expired ones included until they are touched or evicted.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The live value for `key` and its remaining TTL (to use as the answer's TTL); an
    /// expired entry is removed.
    pub fn get(&mut self, now: Instant, key: &CacheKey) -> Option<(&CacheValue, Duration)> {
        let expires = self.entries.get(key)?.expires;
        if expires <= now {
            self.remove(key);
            return None;
        }
        let entry = self.entries.get(key)?;
        Some((&entry.value, expires - now))
    }

    /// Stores `value` for `key` for `ttl` from `now`, replacing an older entry.
    pub fn insert(&mut self, now: Instant, key: CacheKey, value: CacheValue, ttl: Duration) {
        self.remove(&key);
        if self.entries.len() >= self.max_entries {
            self.purge(now);
        }
        while self.entries.len() >= self.max_entries {
            let Some(((_, _), victim)) = self.by_expiry.pop_first() else {
                break;
            };
            self.entries.remove(&victim);
        }
        let Some(expires) = now.checked_add(ttl) else {
            return;
        };
        self.seq += 1;
        self.by_expiry.insert((expires, self.seq), key.clone());
        self.entries.insert(
            key,
            CacheEntry {
                value,
                expires,
                seq: self.seq,
            },
        );
    }

    /// Drops every entry expired at `now`.
    pub fn purge(&mut self, now: Instant) {
        while let Some(entry) = self.by_expiry.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let key = entry.remove();
            self.entries.remove(&key);
        }
    }

    fn remove(&mut self, key: &CacheKey) {
        if let Some(old) = self.entries.remove(key) {
            self.by_expiry.remove(&(old.expires, old.seq));
        }
    }
}

#[cfg(test)]
mod tests;
