//! Names the registry accepts (v1 wire §4.4): hostnames, tags and network names, and the
//! default hostname of a node that sets none.
//!
//! ```text
//! hostname, network name   ^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$   (1..=63 bytes)
//! tag                      ^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$   (1..=32 bytes, leading '#' dropped)
//! ```

use sha2::{Digest, Sha256};

/// Hostnames no node may take.
pub const RESERVED_HOSTNAMES: [&str; 3] = ["localhost", "backbone", "broadcast"];
/// The network name no one may create.
pub const RESERVED_NETWORK: &str = "backbone";
/// Most tags one node carries.
pub const MAX_TAGS: usize = 10;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Empty.
    #[error("name is empty")]
    Empty,
    /// Longer than allowed.
    #[error("{0:?} is longer than {1} characters")]
    TooLong(String, usize),
    /// A character outside `a-z`, `0-9`, `-`, or a `-` at either end.
    #[error("{0:?} may use only a-z, 0-9 and inner '-'")]
    Invalid(String),
    /// Reserved.
    #[error("{0:?} is reserved")]
    Reserved(String),
    /// Too many tags.
    #[error("at most {MAX_TAGS} tags")]
    TooManyTags,
}

/// Characters of a refused name that an error repeats; the rest is cut (a refused name may be
/// any size, and errors travel back to whoever sent it and into logs).
const SHOWN: usize = 80;

/// `name` as an error shows it: at most [`SHOWN`] characters, then `…`.
fn shown(name: &str) -> String {
    match name.char_indices().nth(SHOWN) {
        Some((cut, _)) => format!("{}…", &name[..cut]),
        None => name.to_owned(),
    }
}

/// Checks the shared label shape: 1..=max bytes of `a-z0-9-`, not starting or ending with `-`.
fn check_label(name: &str, max: usize) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > max {
        return Err(NameError::TooLong(shown(name), max));
    }
    let ok_char = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-';
    let bytes = name.as_bytes();
    if !bytes.iter().all(|&b| ok_char(b)) || bytes[0] == b'-' || bytes[bytes.len() - 1] == b'-' {
        return Err(NameError::Invalid(shown(name)));
    }
    Ok(())
}

/// Validates a hostname ("" is not a hostname: it clears one, which the caller handles).
pub fn validate_hostname(name: &str) -> Result<(), NameError> {
    check_label(name, 63)?;
    if RESERVED_HOSTNAMES.contains(&name) {
        return Err(NameError::Reserved(name.to_owned()));
    }
    Ok(())
}

/// Validates a network name.
pub fn validate_network_name(name: &str) -> Result<(), NameError> {
    check_label(name, 63)?;
    if name == RESERVED_NETWORK {
        return Err(NameError::Reserved(name.to_owned()));
    }
    Ok(())
}

/// Normalizes and validates a tag list: a leading `#` is dropped from each tag.
pub fn normalize_tags(tags: &[String]) -> Result<Vec<String>, NameError> {
    if tags.len() > MAX_TAGS {
        return Err(NameError::TooManyTags);
    }
    tags.iter()
        .map(|t| {
            let t = t.strip_prefix('#').unwrap_or(t);
            check_label(t, 32).map(|()| t.to_owned())
        })
        .collect()
}

/// The hostname a node gets when it sets none: `pilot-` and the first 8 lowercase hex digits of
/// SHA-256 over its raw 32-byte public key.
pub fn default_hostname(public_key: &[u8; 32]) -> String {
    let digest = Sha256::digest(public_key);
    let mut name = String::from("pilot-");
    for b in &digest[..4] {
        name.push_str(&format!("{b:02x}"));
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames() {
        for ok in ["a", "agent-7", "0", &"x".repeat(63)] {
            assert_eq!(validate_hostname(ok), Ok(()), "{ok}");
        }
        assert_eq!(validate_hostname(""), Err(NameError::Empty));
        assert!(matches!(
            validate_hostname(&"x".repeat(64)),
            Err(NameError::TooLong(_, 63))
        ));
        for bad in ["-a", "a-", "A", "a_b", "a.b", "é", "a b"] {
            assert!(
                matches!(validate_hostname(bad), Err(NameError::Invalid(_))),
                "{bad}"
            );
        }
        for r in RESERVED_HOSTNAMES {
            assert!(matches!(validate_hostname(r), Err(NameError::Reserved(_))));
        }
        assert!(validate_network_name("backbone").is_err());
        assert_eq!(validate_network_name("lab-1"), Ok(()));
    }

    #[test]
    fn a_huge_refused_name_is_not_repeated_whole() {
        let huge = "x".repeat(100_000);
        let e = validate_hostname(&huge).unwrap_err().to_string();
        assert!(e.len() < 200, "{} bytes: {e:.120}", e.len());
        assert!(e.contains("longer than 63"), "{e}");
        let e = validate_hostname(&format!("{}_", "é".repeat(50_000)))
            .unwrap_err()
            .to_string();
        assert!(e.len() < 400, "{} bytes", e.len());
    }

    #[test]
    fn tags() {
        let tags: Vec<String> = ["#gpu", "llm", "eu-west"].map(String::from).to_vec();
        assert_eq!(
            normalize_tags(&tags),
            Ok(vec!["gpu".into(), "llm".into(), "eu-west".into()])
        );
        assert!(normalize_tags(&["x".repeat(33)]).is_err());
        assert!(normalize_tags(&["#".into()]).is_err());
        assert_eq!(
            normalize_tags(&vec!["a".to_string(); 11]),
            Err(NameError::TooManyTags)
        );
    }

    #[test]
    fn default_hostname_is_a_valid_hostname() {
        // SHA-256 of 32 zero bytes starts 66687aad (Python's hashlib).
        assert_eq!(default_hostname(&[0; 32]), "pilot-66687aad");
        assert_eq!(validate_hostname(&default_hostname(&[7; 32])), Ok(()));
    }
}
