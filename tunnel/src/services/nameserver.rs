//! Nameserver line protocol (virtual port 53, v1 wire §8.6), sans-IO: requests,
//! responses and the records they carry. The server and its record table are
//! `pilotd::nameserver`; the client call is `pilot_driver::services::nameserver::query`.
//!
//! # Wire
//!
//! One request per connection: one line (a terminating `\n` is optional, as v1 clients send
//! none), one response, then the server closes. Fields are separated by whitespace; command
//! and record type are case-insensitive; fields beyond those a request needs are ignored.
//!
//! ```text
//! QUERY A <name>                               -> A <name> <addr>        | ERR not found
//! QUERY N <name>                               -> N <name> <net_id>      | ERR not found
//! QUERY S <net_id> <port>                      -> S <name> <addr> <port> (one line each) | S
//! REGISTER A <name> <addr>                     -> OK | ERR <msg>
//! REGISTER N <name> <net_id>                   -> OK | ERR <msg>
//! REGISTER S <name> <addr> <net_id> <port>     -> OK | ERR <msg>
//! ```
//!
//! Names are 1 to [`MAX_NAME`] printable ASCII characters; a request is at most
//! [`MAX_REQUEST`] bytes and a response at most [`MAX_RESPONSE`].

use crate::Addr;

// ---------------------------------------------------------------------------------------
// Constants

/// The nameserver port.
pub const NAMESERVER_PORT: u16 = crate::addr::port::NAMESERVER;
/// Longest request line, in bytes.
pub const MAX_REQUEST: usize = 1024;
/// Longest response a client reads (v1 clients read at most 65535 bytes).
pub const MAX_RESPONSE: usize = 65535;
/// Longest name, in bytes.
pub const MAX_NAME: usize = 253;

// ---------------------------------------------------------------------------------------
// Requests

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `QUERY A <name>`.
    QueryA {
        /// The name.
        name: String,
    },
    /// `QUERY N <name>`.
    QueryN {
        /// The name.
        name: String,
    },
    /// `QUERY S <net_id> <port>`.
    QueryS {
        /// The network.
        network: u16,
        /// The service port.
        port: u16,
    },
    /// `REGISTER A <name> <addr>`, `REGISTER N <name> <net_id>` or
    /// `REGISTER S <name> <addr> <net_id> <port>`.
    Register(Record),
}

/// Why a request line was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The request is longer than [`MAX_REQUEST`].
    #[error("request too long")]
    TooLong,
    /// The request is not UTF-8.
    #[error("request is not UTF-8")]
    NotUtf8,
    /// Fields are missing.
    #[error("{0}")]
    Usage(&'static str),
    /// The command is neither QUERY nor REGISTER.
    #[error("unknown command: {0}")]
    UnknownCommand(String),
    /// The record type is not A, N or S.
    #[error("unknown record type: {0}")]
    UnknownType(String),
    /// A name is empty, too long, or not printable ASCII.
    #[error("invalid name: {0}")]
    BadName(String),
    /// An address does not parse.
    #[error("invalid address: {0}")]
    BadAddr(String),
    /// A network or port is not a decimal number from 0 to 65535.
    #[error("invalid {0}: {1}")]
    BadNumber(&'static str, String),
}

/// Shows at most 64 characters of peer-supplied text, printable ASCII only.
fn show(s: &str) -> String {
    s.chars()
        .take(64)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect()
}

/// Checks a name: 1 to [`MAX_NAME`] printable ASCII characters.
pub fn check_name(name: &str) -> Result<(), RequestError> {
    if name.is_empty() || name.len() > MAX_NAME || !name.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(RequestError::BadName(show(name)));
    }
    Ok(())
}

fn parse_u16(what: &'static str, s: &str) -> Result<u16, RequestError> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(RequestError::BadNumber(what, show(s)));
    }
    s.parse()
        .map_err(|_| RequestError::BadNumber(what, show(s)))
}

fn parse_addr(s: &str) -> Result<Addr, RequestError> {
    s.parse().map_err(|_| RequestError::BadAddr(show(s)))
}

/// Parses a request from the bytes a client sent (one line; a trailing `\n` or `\r\n` is
/// allowed).
pub fn parse_request_bytes(buf: &[u8]) -> Result<Request, RequestError> {
    if buf.len() > MAX_REQUEST {
        return Err(RequestError::TooLong);
    }
    let line = std::str::from_utf8(buf).map_err(|_| RequestError::NotUtf8)?;
    parse_request(line)
}

/// Parses a request line.
pub fn parse_request(line: &str) -> Result<Request, RequestError> {
    if line.len() > MAX_REQUEST {
        return Err(RequestError::TooLong);
    }
    let f: Vec<&str> = line.split_whitespace().take(6).collect();
    let (Some(cmd), Some(kind)) = (f.first(), f.get(1)) else {
        return Err(RequestError::Usage("too few fields"));
    };
    let field = |i: usize, usage: &'static str| f.get(i).copied().ok_or(RequestError::Usage(usage));
    let name = |i: usize, usage: &'static str| -> Result<String, RequestError> {
        let n = field(i, usage)?;
        check_name(n)?;
        Ok(n.to_owned())
    };
    let cmd = cmd.to_ascii_uppercase();
    let kind = kind.to_ascii_uppercase();
    match (cmd.as_str(), kind.as_str()) {
        ("QUERY", "A") => Ok(Request::QueryA {
            name: name(2, "QUERY A requires <name>")?,
        }),
        ("QUERY", "N") => Ok(Request::QueryN {
            name: name(2, "QUERY N requires <name>")?,
        }),
        ("QUERY", "S") => {
            const U: &str = "QUERY S requires <net_id> <port>";
            Ok(Request::QueryS {
                network: parse_u16("net_id", field(2, U)?)?,
                port: parse_u16("port", field(3, U)?)?,
            })
        }
        ("REGISTER", "A") => {
            const U: &str = "REGISTER A requires <name> <address>";
            Ok(Request::Register(Record::A {
                name: name(2, U)?,
                addr: parse_addr(field(3, U)?)?,
            }))
        }
        ("REGISTER", "N") => {
            const U: &str = "REGISTER N requires <name> <net_id>";
            Ok(Request::Register(Record::N {
                name: name(2, U)?,
                network: parse_u16("net_id", field(3, U)?)?,
            }))
        }
        ("REGISTER", "S") => {
            const U: &str = "REGISTER S requires <name> <address> <net_id> <port>";
            Ok(Request::Register(Record::S {
                name: name(2, U)?,
                addr: parse_addr(field(3, U)?)?,
                network: parse_u16("net_id", field(4, U)?)?,
                port: parse_u16("port", field(5, U)?)?,
            }))
        }
        ("QUERY" | "REGISTER", _) => Err(RequestError::UnknownType(show(&kind))),
        _ => Err(RequestError::UnknownCommand(show(&cmd))),
    }
}

impl Request {
    /// The request line (without `\n`).
    pub fn to_line(&self) -> String {
        match self {
            Request::QueryA { name } => format!("QUERY A {name}"),
            Request::QueryN { name } => format!("QUERY N {name}"),
            Request::QueryS { network, port } => format!("QUERY S {network} {port}"),
            Request::Register(Record::A { name, addr }) => format!("REGISTER A {name} {addr}"),
            Request::Register(Record::N { name, network }) => {
                format!("REGISTER N {name} {network}")
            }
            Request::Register(Record::S {
                name,
                addr,
                network,
                port,
            }) => format!("REGISTER S {name} {addr} {network} {port}"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Responses

/// One provider of a service, as an S answer lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceEntry {
    /// The service name.
    pub name: String,
    /// The provider.
    pub addr: Addr,
    /// The provider's port.
    pub port: u16,
}

/// The message of the `ERR` a query for an unknown name is answered with.
pub const ERR_NOT_FOUND: &str = "not found";

/// A response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// `A <name> <addr>`.
    A {
        /// The name.
        name: String,
        /// Its address.
        addr: Addr,
    },
    /// `N <name> <net_id>`.
    N {
        /// The name.
        name: String,
        /// Its network.
        network: u16,
    },
    /// `S ...` lines (a bare `S` when empty).
    S(Vec<ServiceEntry>),
    /// `OK`.
    Ok,
    /// `ERR <msg>`.
    Err(String),
}

/// Why a response did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed nameserver response: {0}")]
pub struct ResponseError(String);

impl ResponseError {
    /// An error that says `why` the response is refused.
    pub fn new(why: impl Into<String>) -> Self {
        ResponseError(why.into())
    }
}

impl Response {
    /// The response text, as sent (no trailing newline, as v1).
    pub fn to_text(&self) -> String {
        match self {
            Response::A { name, addr } => format!("A {name} {addr}"),
            Response::N { name, network } => format!("N {name} {network}"),
            Response::S(entries) if entries.is_empty() => "S".to_owned(),
            Response::S(entries) => entries
                .iter()
                .map(|e| format!("S {} {} {}", e.name, e.addr, e.port))
                .collect::<Vec<_>>()
                .join("\n"),
            Response::Ok => "OK".to_owned(),
            Response::Err(msg) => format!("ERR {msg}"),
        }
    }
}

/// Parses a response.
pub fn parse_response(text: &str) -> Result<Response, ResponseError> {
    let text = text.trim();
    let first = text.lines().next().unwrap_or("").trim();
    if first == "OK" {
        return Ok(Response::Ok);
    }
    if first == "ERR" || first.starts_with("ERR ") {
        return Ok(Response::Err(
            first.get(4..).unwrap_or("").trim().to_owned(),
        ));
    }
    let bad = || ResponseError(show(first));
    let f: Vec<&str> = first.split_whitespace().take(4).collect();
    match f.first().copied() {
        Some("A") => {
            let (Some(name), Some(addr)) = (f.get(1), f.get(2)) else {
                return Err(bad());
            };
            Ok(Response::A {
                name: (*name).to_owned(),
                addr: addr.parse().map_err(|_| bad())?,
            })
        }
        Some("N") => {
            let (Some(name), Some(net)) = (f.get(1), f.get(2)) else {
                return Err(bad());
            };
            Ok(Response::N {
                name: (*name).to_owned(),
                network: parse_u16("net_id", net).map_err(|_| bad())?,
            })
        }
        Some("S") => {
            let mut entries = Vec::new();
            for line in text.lines() {
                let g: Vec<&str> = line.split_whitespace().take(5).collect();
                match g.as_slice() {
                    [] | ["S"] => {}
                    ["S", name, addr, port, ..] => entries.push(ServiceEntry {
                        name: (*name).to_owned(),
                        addr: addr.parse().map_err(|_| ResponseError(show(line)))?,
                        port: parse_u16("port", port).map_err(|_| ResponseError(show(line)))?,
                    }),
                    _ => return Err(ResponseError(show(line))),
                }
            }
            Ok(Response::S(entries))
        }
        _ => Err(bad()),
    }
}

// ---------------------------------------------------------------------------------------
// Records

/// A record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// Name → address.
    A {
        /// The name.
        name: String,
        /// The address.
        addr: Addr,
    },
    /// Name → network.
    N {
        /// The name.
        name: String,
        /// The network.
        network: u16,
    },
    /// A service provider.
    S {
        /// The service name.
        name: String,
        /// The provider.
        addr: Addr,
        /// The network the service is offered in.
        network: u16,
        /// The provider's port.
        port: u16,
    },
}

/// What identifies a record: a record with the same key replaces it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RecordKey {
    /// The A record of a name.
    A(String),
    /// The N record of a name.
    N(String),
    /// The S record of a provider (v1 keeps one per address and port in each network).
    S {
        /// The network.
        network: u16,
        /// The provider.
        addr: Addr,
        /// The provider's port.
        port: u16,
    },
}

impl Record {
    /// Its key.
    pub fn key(&self) -> RecordKey {
        match self {
            Record::A { name, .. } => RecordKey::A(name.clone()),
            Record::N { name, .. } => RecordKey::N(name.clone()),
            Record::S {
                addr,
                network,
                port,
                ..
            } => RecordKey::S {
                network: *network,
                addr: *addr,
                port: *port,
            },
        }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        match self {
            Record::A { name, .. } | Record::N { name, .. } | Record::S { name, .. } => name,
        }
    }

    /// The address an A or S record names.
    pub fn addr(&self) -> Option<Addr> {
        match self {
            Record::A { addr, .. } | Record::S { addr, .. } => Some(*addr),
            Record::N { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn a(node: u32) -> Addr {
        Addr::new(0, node)
    }

    #[test]
    fn requests_parse_and_print_like_v1() {
        let lines = [
            "QUERY A alice",
            "QUERY N lab",
            "QUERY S 3 80",
            "REGISTER A alice 0:0000.0000.0005",
            "REGISTER N lab 3",
            "REGISTER S web 3:0003.0000.0005 3 80",
        ];
        for l in lines {
            assert_eq!(parse_request(l).unwrap().to_line(), l);
        }
        assert_eq!(
            parse_request("query a  alice extra\n").unwrap(),
            Request::QueryA {
                name: "alice".into()
            }
        );
        assert_eq!(
            parse_request("QUERY S 70000 1"),
            Err(RequestError::BadNumber("net_id", "70000".into()))
        );
        assert!(matches!(
            parse_request("QUERY"),
            Err(RequestError::Usage(_))
        ));
        assert!(matches!(
            parse_request("QUERY X a"),
            Err(RequestError::UnknownType(_))
        ));
        assert!(matches!(
            parse_request("DROP A a"),
            Err(RequestError::UnknownCommand(_))
        ));
        assert!(matches!(
            parse_request("REGISTER A x nonsense"),
            Err(RequestError::BadAddr(_))
        ));
        assert!(matches!(
            parse_request(&format!("QUERY A {}", "n".repeat(MAX_NAME + 1))),
            Err(RequestError::BadName(_))
        ));
        assert_eq!(
            parse_request_bytes(&[b'Q'; MAX_REQUEST + 1]),
            Err(RequestError::TooLong)
        );
        assert_eq!(
            parse_request_bytes(&[0xFF, 0xFE]),
            Err(RequestError::NotUtf8)
        );
    }

    #[test]
    fn responses_round_trip() {
        let rs = [
            Response::A {
                name: "x".into(),
                addr: a(5),
            },
            Response::N {
                name: "lab".into(),
                network: 3,
            },
            Response::S(vec![]),
            Response::S(vec![
                ServiceEntry {
                    name: "web".into(),
                    addr: a(5),
                    port: 80,
                },
                ServiceEntry {
                    name: "web".into(),
                    addr: a(6),
                    port: 80,
                },
            ]),
            Response::Ok,
            Response::Err("not found".into()),
        ];
        for r in rs {
            assert_eq!(parse_response(&r.to_text()).unwrap(), r);
        }
        assert_eq!(Response::S(vec![]).to_text(), "S");
        assert!(parse_response("A onlyname").is_err());
        assert!(parse_response("").is_err());
    }
}
