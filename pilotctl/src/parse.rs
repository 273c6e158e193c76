//! Parsing of user input: peers (address, node ID or hostname), endpoints with a port, the
//! node names `whois` takes (those plus ULAs, with or without a port), byte sizes and
//! durations. Nothing here asks the daemon; every failure is a [`CtlError`] with code
//! `bad_address`.

use std::net::{IpAddr, Ipv6Addr};
use std::time::Duration;

use tunnel::ipc::code;
use tunnel::{ula, Addr, SocketAddr};

use crate::CtlError;

/// A peer as the user named it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A full address, or a decimal node ID taken as network 0.
    Addr(Addr),
    /// A hostname the registry resolves.
    Hostname(String),
}

/// Classifies a peer name without asking anyone: `N:NNNN.HHHH.LLLL`, a decimal node ID, or a
/// hostname. Text with a colon that is not an address, and text with spaces or control
/// characters, is a `bad_address` error.
pub fn parse_target(text: &str) -> Result<Target, CtlError> {
    let t = text.trim();
    if t.is_empty() {
        return Err(CtlError::new(code::BAD_ADDRESS, "empty peer name"));
    }
    if t.bytes().all(|b| b.is_ascii_digit()) {
        return t
            .parse::<u32>()
            .map(|n| Target::Addr(Addr::new(0, n)))
            .map_err(|_| CtlError::new(code::BAD_ADDRESS, format!("node ID {t} is out of range")));
    }
    match t.parse::<Addr>() {
        Ok(a) => Ok(Target::Addr(a)),
        Err(e) if t.contains(':') => Err(CtlError::new(
            code::BAD_ADDRESS,
            format!("{t:?} is not an address (N:NNNN.HHHH.LLLL): {e}"),
        )),
        Err(_) => {
            if t.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(CtlError::new(
                    code::BAD_ADDRESS,
                    format!("{t:?} is neither an address, a node ID nor a hostname"),
                ));
            }
            Ok(Target::Hostname(t.to_owned()))
        }
    }
}

/// Splits `peer:port`, `N:NNNN.HHHH.LLLL:port` or `peer` plus a separate port into the peer and
/// the port. `default_port` applies when neither form names one.
pub fn parse_endpoint(
    text: &str,
    port: Option<u16>,
    default_port: Option<u16>,
) -> Result<(Target, u16), CtlError> {
    let t = text.trim();
    if let Ok(sa) = t.parse::<SocketAddr>() {
        if port.is_some_and(|p| p != sa.port) {
            return Err(CtlError::new(
                code::BAD_ADDRESS,
                format!("{t} already names port {}", sa.port),
            ));
        }
        return Ok((Target::Addr(sa.addr), sa.port));
    }
    let whole = match parse_target(t) {
        Ok(target) => {
            let port = port.or(default_port).ok_or_else(|| {
                CtlError::new(
                    code::BAD_ADDRESS,
                    format!("no port: write {t}:PORT or give the port as an argument"),
                )
            })?;
            return Ok((target, port));
        }
        Err(e) => e,
    };
    // `hostname:port` or `nodeid:port`.
    if let Some((left, right)) = t.rsplit_once(':') {
        if !left.contains(':') && !right.is_empty() && right.bytes().all(|b| b.is_ascii_digit()) {
            let p: u16 = right
                .parse()
                .map_err(|_| CtlError::new(code::BAD_ADDRESS, format!("bad port {right:?}")))?;
            if port.is_some_and(|x| x != p) {
                return Err(CtlError::new(
                    code::BAD_ADDRESS,
                    format!("{t} already names port {p}"),
                ));
            }
            return Ok((parse_target(left)?, p));
        }
    }
    Err(whole)
}

/// What `whois` was asked about: a node, and the remote port of a connection when the text
/// named one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WhoisQuery {
    /// The node.
    pub target: Target,
    /// The port of the node's end of a connection (`[ULA]:PORT`, `ADDRESS:PORT`, …).
    pub port: Option<u16>,
}

/// Parses what `whois` accepts, without asking anyone:
///
/// - a ULA in the Pilot prefix, `fd06:3fcd:b33d:0::2a`, optionally in brackets;
/// - `[ULA]:PORT`, and `ULA:PORT` when the whole text is not itself an IPv6 address (so
///   `fd06:3fcd:b33d::2a:51234` is a port, but `fd06:3fcd:b33d::2a:1234` is one address:
///   write brackets to be sure);
/// - a Pilot address `N:NNNN.HHHH.LLLL`, a decimal node ID or a hostname, each optionally
///   followed by `:PORT`.
///
/// A ULA outside `fd06:3fcd:b33d::/48`, an IPv4 address, a malformed address or port is a
/// `bad_address` error.
pub fn parse_whois(text: &str) -> Result<WhoisQuery, CtlError> {
    let t = text.trim();
    if t.is_empty() {
        return Err(CtlError::new(code::BAD_ADDRESS, "empty node name"));
    }
    if let Some(rest) = t.strip_prefix('[') {
        let (ip, after) = rest.split_once(']').ok_or_else(|| {
            CtlError::new(code::BAD_ADDRESS, format!("{t:?}: no closing bracket"))
        })?;
        let addr = ula_addr(ip)?;
        let port = match after {
            "" => None,
            p => match p.strip_prefix(':') {
                Some(p) => Some(parse_port(t, p)?),
                None => {
                    return Err(CtlError::new(
                        code::BAD_ADDRESS,
                        format!("{t:?}: expected [ULA]:PORT"),
                    ))
                }
            },
        };
        return Ok(WhoisQuery {
            target: Target::Addr(addr),
            port,
        });
    }
    if t.parse::<Ipv6Addr>().is_ok() {
        return Ok(WhoisQuery {
            target: Target::Addr(ula_addr(t)?),
            port: None,
        });
    }
    // `ULA:PORT` without brackets: at least two colons, an IPv6 address before the last.
    if let Some((ip, p)) = t.rsplit_once(':') {
        if ip.contains(':') && ip.parse::<Ipv6Addr>().is_ok() {
            return Ok(WhoisQuery {
                target: Target::Addr(ula_addr(ip)?),
                port: Some(parse_port(t, p)?),
            });
        }
    }
    if let Ok(IpAddr::V4(v4)) = t.rsplit_once(':').map_or(t, |(ip, _)| ip).parse::<IpAddr>() {
        return Err(CtlError::new(
            code::BAD_ADDRESS,
            format!("{v4} is an IPv4 address, not a Pilot address or ULA"),
        ));
    }
    if let Ok(target) = parse_target(t) {
        return Ok(WhoisQuery { target, port: None });
    }
    let (target, port) = parse_endpoint(t, None, None)?;
    Ok(WhoisQuery {
        target,
        port: Some(port),
    })
}

/// The Pilot address of a ULA in text form.
fn ula_addr(text: &str) -> Result<Addr, CtlError> {
    let ip: Ipv6Addr = text.parse().map_err(|_| {
        CtlError::new(
            code::BAD_ADDRESS,
            format!("{text:?} is not an IPv6 address"),
        )
    })?;
    ula::from_ipv6(ip).map_err(|e| CtlError::new(code::BAD_ADDRESS, e.to_string()))
}

/// A decimal port; `whole` names the input in the error.
fn parse_port(whole: &str, p: &str) -> Result<u16, CtlError> {
    if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
        return Err(CtlError::new(
            code::BAD_ADDRESS,
            format!("{whole:?}: bad port {p:?}"),
        ));
    }
    p.parse().map_err(|_| {
        CtlError::new(
            code::BAD_ADDRESS,
            format!("{whole:?}: port {p} is out of range"),
        )
    })
}

/// Parses a byte size: a number with an optional binary suffix, `K`, `M`, `G` or `T` (also
/// written `KB`/`KiB` and so on, any case; all powers of 1024). `1G` is 1,073,741,824 bytes;
/// fractions such as `1.5M` are allowed.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!("{s:?} is not a size (like 4096, 64K, 10M or 1G)"));
    }
    let shift: u32 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        u => return Err(format!("{s:?}: unknown size unit {u:?} (use K, M, G or T)")),
    };
    let scale = 1u64 << shift;
    if let Ok(n) = num.parse::<u64>() {
        return n
            .checked_mul(scale)
            .ok_or_else(|| format!("{s:?} is too large"));
    }
    let f: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (like 4096, 64K, 10M or 1G)"))?;
    let bytes = (f * scale as f64).round();
    if !bytes.is_finite() || bytes < 0.0 || bytes >= u64::MAX as f64 {
        return Err(format!("{s:?} is too large"));
    }
    Ok(bytes as u64)
}

/// Parses a duration: `500ms`, `30s`, `2m`, `1h`, `1m30s`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    pilot_driver::config::parse_duration(s).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("1.5M"), Ok(3 << 19));
        assert_eq!(parse_size("100"), Ok(100));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn targets() {
        assert_eq!(
            parse_target("0:0000.0000.0005"),
            Ok(Target::Addr(Addr::new(0, 5)))
        );
        assert_eq!(parse_target("42"), Ok(Target::Addr(Addr::new(0, 42))));
        assert_eq!(parse_target("alice"), Ok(Target::Hostname("alice".into())));
        let e = parse_target("0:zz").unwrap_err();
        assert_eq!(e.code, code::BAD_ADDRESS);
        assert!(parse_target("99999999999").is_err());
        assert!(parse_target("a b").is_err());
    }

    #[test]
    fn endpoints() {
        let a5 = Target::Addr(Addr::new(0, 5));
        assert_eq!(
            parse_endpoint("0:0000.0000.0005:7", None, None),
            Ok((a5.clone(), 7))
        );
        assert_eq!(
            parse_endpoint("0:0000.0000.0005", Some(80), None),
            Ok((a5.clone(), 80))
        );
        assert_eq!(parse_endpoint("5:7", None, None), Ok((a5.clone(), 7)));
        assert_eq!(
            parse_endpoint("bob:1000", None, None),
            Ok((Target::Hostname("bob".into()), 1000))
        );
        assert_eq!(
            parse_endpoint("bob", None, Some(1000)),
            Ok((Target::Hostname("bob".into()), 1000))
        );
        assert!(parse_endpoint("bob", None, None).is_err());
        assert!(parse_endpoint("0:0000.0000.0005:7", Some(8), None).is_err());
    }

    fn q(target: Target, port: Option<u16>) -> WhoisQuery {
        WhoisQuery { target, port }
    }

    #[test]
    fn whois_forms() {
        let n42 = Target::Addr(Addr::new(0, 42));
        // The ULA is computed from the address, so the test does not restate the mapping.
        let ula42 = ula::to_ipv6(Addr::new(0, 42)).to_string();
        assert_eq!(ula42, "fd06:3fcd:b33d::2a");
        assert_eq!(parse_whois(&ula42), Ok(q(n42.clone(), None)));
        assert_eq!(
            parse_whois("fd06:3fcd:b33d:0:0:0:0:2a"),
            Ok(q(n42.clone(), None))
        );
        assert_eq!(parse_whois(&format!("[{ula42}]")), Ok(q(n42.clone(), None)));
        assert_eq!(
            parse_whois(&format!("[{ula42}]:51234")),
            Ok(q(n42.clone(), Some(51234)))
        );
        // Without brackets a trailing group that cannot be IPv6 is the port.
        assert_eq!(
            parse_whois(&format!("{ula42}:51234")),
            Ok(q(n42.clone(), Some(51234)))
        );
        // ... and one that can is part of the address (node 0x2a0050 here).
        assert_eq!(
            parse_whois("fd06:3fcd:b33d::2a:50"),
            Ok(q(Target::Addr(Addr::new(0, 0x002a_0050)), None))
        );
        // Other networks map to their subnet ID.
        assert_eq!(
            parse_whois("fd06:3fcd:b33d:7::1:2"),
            Ok(q(Target::Addr(Addr::new(7, 0x0001_0002)), None))
        );
        assert_eq!(parse_whois("0:0000.0000.002A"), Ok(q(n42.clone(), None)));
        assert_eq!(
            parse_whois("0:0000.0000.002A:7"),
            Ok(q(n42.clone(), Some(7)))
        );
        assert_eq!(parse_whois(" 42 "), Ok(q(n42.clone(), None)));
        assert_eq!(parse_whois("42:80"), Ok(q(n42, Some(80))));
        assert_eq!(
            parse_whois("alice"),
            Ok(q(Target::Hostname("alice".into()), None))
        );
        assert_eq!(
            parse_whois("alice:8080"),
            Ok(q(Target::Hostname("alice".into()), Some(8080)))
        );
    }

    #[test]
    fn whois_rejects_garbage() {
        for bad in [
            "",
            "   ",
            "fd00::1",
            "::1",
            "fd06:3fcd:b33d::1:0:0:2a",
            "[fd06:3fcd:b33d::2a",
            "[fd06:3fcd:b33d::2a]80",
            "[fd06:3fcd:b33d::2a]:",
            "[fd06:3fcd:b33d::2a]:70000",
            "[fd06:3fcd:b33d::2a]:-1",
            "[not-an-ip]:80",
            "fd06:3fcd:b33d::2a:99999",
            "10.0.0.1",
            "10.0.0.1:80",
            "0:zz",
            "99999999999",
            "a b",
            "alice:port",
            "alice:",
        ] {
            let e = parse_whois(bad).expect_err(bad);
            assert_eq!(e.code, code::BAD_ADDRESS, "{bad}: {e}");
        }
    }
}
