//! What the daemon and its clients agree on outside the IPC messages: where the daemon puts
//! its socket, and the duration syntax of its flags and config file (`pilotctl` takes the
//! same). Pure values and functions: nothing here touches the file system.

use std::time::Duration;

/// Where state lives when the daemon runs as root.
pub const SYSTEM_HOME: &str = "/var/lib/pilot";
/// The IPC socket when the daemon runs as root.
pub const SYSTEM_SOCKET: &str = "/run/pilot/pilotd.sock";
/// The socket's file name in the daemon's home directory when it does not run as root.
pub const SOCKET_FILE: &str = "pilotd.sock";

/// Why a duration does not parse; the text names the input and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DurationError(String);

/// Parses a duration: a number with a unit (`500ms`, `30s`, `2m`, `1h`, or Go's `1m30s`), or a
/// bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let s = s.trim();
    if s.is_empty() {
        return Err(DurationError("empty duration".into()));
    }
    if let Ok(secs) = s.parse::<f64>() {
        return secs_to_duration(secs);
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| DurationError(format!("{s:?}: missing unit (ms, s, m, h)")))?;
        if num_len == 0 {
            return Err(DurationError(format!(
                "{s:?} is not a duration (like 30s or 2m)"
            )));
        }
        let n: f64 = rest[..num_len]
            .parse()
            .map_err(|_| DurationError(format!("{s:?} is not a duration")))?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            u => {
                return Err(DurationError(format!(
                    "{s:?}: unknown unit {u:?} (use ms, s, m or h)"
                )))
            }
        };
        rest = &rest[unit_len..];
        total += n * scale;
    }
    secs_to_duration(total)
}

fn secs_to_duration(secs: f64) -> Result<Duration, DurationError> {
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(DurationError(format!("{secs} seconds is out of range")));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("-3").is_err());
        assert!(parse_duration("").is_err());
    }
}
