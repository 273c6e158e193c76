//! A JSON config file for a daemon whose settings are the flags of a clap command.
//!
//! The file is one JSON object; its keys are long flag names (`"addr"`, `"log-level"`; `_`
//! is the same as `-`, leading dashes are dropped), its values strings, numbers, booleans, or
//! lists for flags that take several values. Keys that start with `#` are comments: a shipped
//! example documents each setting under `"# name"` next to the setting itself.
//!
//! Precedence: a flag on the command line, then its environment variable, then the file, then
//! clap's default. The file is merged by turning each of its settings that neither the command
//! line nor the environment gave into a flag placed before the user's arguments, and parsing
//! again: every value goes through the same clap parser and checks as a flag would.
//!
//! Invariant: a key that is not a visible long flag of the command (or is the config flag
//! itself) is an error naming the key; a value clap rejects is an error naming the key too.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, Command};
use serde_json::{Map, Value};

/// The conventional flag that prints the effective settings and exits; never a file key.
pub const CHECK_CONFIG: &str = "check-config";

/// Why a config file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The file could not be read.
    #[error("reading config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not one JSON object.
    #[error("config file {}: {reason}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A key is not a setting of this program.
    #[error("config file {}: unknown key {key:?}", path.display())]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// The key as written.
        key: String,
    },
    /// A value has a JSON type no flag takes.
    #[error("config file {}: {key}: {reason}", path.display())]
    Value {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// Why.
        reason: String,
    },
    /// clap rejected the settings of the file (its message names the flag, which is the key).
    #[error("config file {}: {message}", path.display())]
    Rejected {
        /// The file.
        path: PathBuf,
        /// clap's message.
        message: String,
    },
}

/// The outcome of [`parse`].
#[derive(Debug)]
pub enum Parsed<T> {
    /// The settings, merged from flags, environment and file.
    Ok(T),
    /// The command line itself is wrong, or asks for help or the version: the caller exits
    /// with [`clap::Error::exit`].
    Cli(clap::Error),
    /// The config file is wrong.
    File(ConfigFileError),
}

/// Parses `args` (with the program name first) into `T`, filling what the command line and
/// environment leave unset from the file given with `--<config_flag>`. The matches come back
/// too, for [`effective`].
pub fn parse<T: clap::Parser>(args: Vec<OsString>, config_flag: &str) -> Parsed<(T, ArgMatches)> {
    let cmd = T::command();
    let matches = match cmd.clone().try_get_matches_from(&args) {
        Ok(m) => m,
        Err(e) => return Parsed::Cli(e),
    };
    let path = match matches.get_raw(config_flag).and_then(|mut v| v.next()) {
        Some(p) => PathBuf::from(p),
        None => {
            return match T::from_arg_matches(&matches) {
                Ok(t) => Parsed::Ok((t, matches)),
                Err(e) => Parsed::Cli(e),
            }
        }
    };
    let extra = match file_args(&cmd, &matches, &path, config_flag) {
        Ok(a) => a,
        Err(e) => return Parsed::File(e),
    };
    let mut merged = Vec::with_capacity(args.len() + extra.len());
    let mut it = args.into_iter();
    merged.extend(it.next());
    merged.extend(extra);
    merged.extend(it);
    let rejected = |e: clap::Error| {
        Parsed::File(ConfigFileError::Rejected {
            path: path.clone(),
            message: first_line(&e.to_string()),
        })
    };
    match cmd.try_get_matches_from(merged) {
        Ok(m) => match T::from_arg_matches(&m) {
            Ok(t) => Parsed::Ok((t, m)),
            Err(e) => rejected(e),
        },
        Err(e) => rejected(e),
    }
}

/// Reads the file at `path` as a JSON object with normalized keys; comment keys (`#...`) are
/// dropped.
pub fn read(path: &Path) -> Result<Map<String, Value>, ConfigFileError> {
    let bytes = std::fs::read(path).map_err(|source| ConfigFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|e| ConfigFileError::Format {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let Value::Object(map) = v else {
        return Err(ConfigFileError::Format {
            path: path.to_owned(),
            reason: "the top level is not a JSON object".into(),
        });
    };
    Ok(map
        .into_iter()
        .filter(|(k, _)| !is_comment(k))
        .map(|(k, v)| (normalize(&k), v))
        .collect())
}

/// Whether a config file key is a comment.
pub fn is_comment(key: &str) -> bool {
    key.starts_with('#')
}

/// A key as a long flag name: leading dashes dropped, `_` as `-`.
pub fn normalize(key: &str) -> String {
    key.trim_start_matches('-').replace('_', "-")
}

/// The long flag names a config file may use for `cmd`: its visible long flags, less help,
/// version, `--check-config` (an action, not a setting) and the config flag itself.
pub fn keys(cmd: &Command, config_flag: &str) -> Vec<String> {
    cmd.get_arguments()
        .filter(|a| !a.is_hide_set())
        .filter(|a| {
            !matches!(
                a.get_action(),
                ArgAction::Help | ArgAction::HelpLong | ArgAction::HelpShort | ArgAction::Version
            )
        })
        .filter_map(|a| a.get_long())
        .filter(|l| *l != config_flag && *l != CHECK_CONFIG)
        .map(str::to_owned)
        .collect()
}

/// The file's settings as flags, for those that neither the command line nor the environment
/// set.
fn file_args(
    cmd: &Command,
    matches: &ArgMatches,
    path: &Path,
    config_flag: &str,
) -> Result<Vec<OsString>, ConfigFileError> {
    let file = read(path)?;
    let allowed = keys(cmd, config_flag);
    let mut out = Vec::new();
    for (key, value) in file {
        // A key is a flag's long name or one of its long aliases (a renamed flag keeps its old
        // name as an alias, so old files keep working).
        let arg = cmd
            .get_arguments()
            .find(|a| {
                a.get_long().is_some_and(|l| allowed.iter().any(|k| k == l))
                    && (a.get_long() == Some(&key)
                        || a.get_all_aliases()
                            .is_some_and(|al| al.contains(&key.as_str())))
            })
            .ok_or_else(|| ConfigFileError::UnknownKey {
                path: path.to_owned(),
                key: key.clone(),
            })?;
        let key = arg.get_long().unwrap_or(&key).to_owned();
        if matches!(
            matches.value_source(arg.get_id().as_str()),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        let bad = |reason: &str| ConfigFileError::Value {
            path: path.to_owned(),
            key: key.clone(),
            reason: reason.into(),
        };
        let switch = matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse);
        let scalars = match value {
            Value::Null => continue,
            Value::Array(items) => {
                if switch {
                    return Err(bad("expected true or false, not a list"));
                }
                items
            }
            Value::Object(_) => return Err(bad("expected a string, number, boolean or list")),
            v => vec![v],
        };
        for v in scalars {
            let text = match v {
                Value::String(s) => s,
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                _ => return Err(bad("list items must be strings, numbers or booleans")),
            };
            if switch {
                match text.as_str() {
                    "true" => out.push(OsString::from(format!("--{key}"))),
                    "false" => {}
                    other => return Err(bad(&format!("{other:?} is not true or false"))),
                }
            } else {
                out.push(OsString::from(format!("--{key}={text}")));
            }
        }
    }
    Ok(out)
}

/// The effective settings as a JSON object keyed by long flag name (for `--check-config`):
/// values as clap holds them, switches as booleans, unset settings as null.
pub fn effective(cmd: &Command, matches: &ArgMatches, config_flag: &str) -> Map<String, Value> {
    let mut out = Map::new();
    for key in keys(cmd, config_flag) {
        let Some(arg) = cmd.get_arguments().find(|a| a.get_long() == Some(&key)) else {
            continue;
        };
        let id = arg.get_id().as_str();
        let value = if matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse) {
            Value::Bool(matches.get_flag(id))
        } else {
            match matches.get_raw(id) {
                None => Value::Null,
                Some(vals) => {
                    let mut v: Vec<Value> = vals
                        .map(|s| Value::String(s.to_string_lossy().into_owned()))
                        .collect();
                    if matches!(arg.get_action(), ArgAction::Append) || v.len() > 1 {
                        Value::Array(v)
                    } else {
                        v.pop().unwrap_or(Value::Null)
                    }
                }
            }
        };
        out.insert(key, value);
    }
    out
}

fn first_line(s: &str) -> String {
    s.lines()
        .next()
        .unwrap_or_default()
        .trim_start_matches("error: ")
        .to_owned()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Debug, Parser)]
    struct Demo {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long, env = "PILOT_SERVICE_TEST_ADDR", default_value = "[::]:9000")]
        addr: std::net::SocketAddr,
        #[arg(long, default_value_t = 10, visible_alias = "max")]
        limit: u32,
        #[arg(long)]
        open: bool,
        #[arg(long, value_delimiter = ',')]
        peers: Vec<String>,
        #[arg(long, hide = true)]
        secret_switch: bool,
        #[arg(long)]
        check_config: bool,
    }

    fn args(a: &[&str]) -> Vec<OsString> {
        std::iter::once("demo")
            .chain(a.iter().copied())
            .map(OsString::from)
            .collect()
    }

    fn write(dir: &tempfile::TempDir, json: &str) -> String {
        let p = dir.path().join("demo.json");
        std::fs::write(&p, json).unwrap();
        p.to_string_lossy().into_owned()
    }

    #[test]
    fn file_fills_what_flags_leave_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(
            &dir,
            r##"{"# addr": "where to listen", "addr": "127.0.0.1:9100", "limit": 3,
                "open": true, "peers": ["a:1", "b:2"]}"##,
        );
        let Parsed::Ok((d, _)) = parse::<Demo>(args(&["--config", &f, "--limit", "7"]), "config")
        else {
            panic!("does not parse")
        };
        assert_eq!(d.addr, "127.0.0.1:9100".parse().unwrap());
        assert_eq!(d.limit, 7);
        assert!(d.open);
        assert_eq!(d.peers, ["a:1", "b:2"]);
        let f = write(&dir, r#"{"open": false}"#);
        let Parsed::Ok((d, _)) = parse::<Demo>(args(&["--config", &f]), "config") else {
            panic!("does not parse")
        };
        assert!(!d.open);
        assert_eq!(d.limit, 10);
    }

    #[test]
    fn a_flags_alias_is_a_key_too_and_flags_still_win() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(&dir, r#"{"max": 4}"#);
        let Parsed::Ok((d, _)) = parse::<Demo>(args(&["--config", &f]), "config") else {
            panic!("does not parse")
        };
        assert_eq!(d.limit, 4);
        let Parsed::Ok((d, _)) = parse::<Demo>(args(&["--config", &f, "--limit", "9"]), "config")
        else {
            panic!("does not parse")
        };
        assert_eq!(d.limit, 9);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (r#"{"colour": "blue"}"#, "unknown key \"colour\""),
            (
                r#"{"secret_switch": true}"#,
                "unknown key \"secret-switch\"",
            ),
            (r#"{"config": "x"}"#, "unknown key \"config\""),
            (r#"{"check-config": true}"#, "unknown key \"check-config\""),
            (r#"{"limit": "many"}"#, "--limit"),
            (r#"{"addr": "nowhere"}"#, "--addr"),
            (r#"{"open": "maybe"}"#, "open:"),
            (r#"{"limit": {"a": 1}}"#, "limit:"),
            ("[1]", "not a JSON object"),
            ("{", "EOF"),
        ];
        for (json, want) in cases {
            let f = write(&dir, json);
            match parse::<Demo>(args(&["--config", &f]), "config") {
                Parsed::File(e) => assert!(e.to_string().contains(want), "{json}: {e}"),
                other => panic!("{json}: {other:?}"),
            }
        }
        match parse::<Demo>(args(&["--config", "/nonexistent/demo.json"]), "config") {
            Parsed::File(ConfigFileError::Read { .. }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn effective_settings_list_every_key() {
        let cmd = Demo::command();
        let m = cmd.clone().try_get_matches_from(args(&["--open"])).unwrap();
        let e = effective(&cmd, &m, "config");
        assert_eq!(e["addr"], "[::]:9000");
        assert_eq!(e["limit"], "10");
        assert_eq!(e["open"], true);
        assert_eq!(e["peers"], Value::Null);
        for k in ["secret-switch", "config", "check-config"] {
            assert!(!e.contains_key(k), "{k}");
        }
    }
}
