//! `pilotd` as a system service: readiness and status for systemd, the IPC socket shared with
//! a group, and SIGHUP reloads of the settings that are safe to change while running.
//!
//! Layer: process glue above [`crate::node`]; nothing here touches the engine's state.
//! Invariants: without `$NOTIFY_SOCKET` every notification is a no-op; a reload never changes
//! a setting that the running node has already acted on (addresses, sockets, identity,
//! interface): those are reported as needing a restart.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::config::{Cli, Config};

/// Why the IPC socket cannot be shared with its group.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    /// The group does not exist (any more).
    #[error("socket-group: no group named {0:?}")]
    NoGroup(String),
    /// Looking the group up failed.
    #[error("socket-group: looking up {group:?}: {source}")]
    Lookup {
        /// The group.
        group: String,
        /// Why.
        source: nix::Error,
    },
    /// Changing the socket's group or mode failed.
    #[error("socket-group: giving {path} to group {group:?} with mode 0660: {source}")]
    Apply {
        /// The socket.
        path: String,
        /// The group.
        group: String,
        /// Why.
        source: std::io::Error,
    },
}

/// The group ID of `name`.
pub fn group_id(name: &str) -> Result<u32, ShareError> {
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(ShareError::NoGroup(name.to_owned())),
        Err(source) => Err(ShareError::Lookup {
            group: name.to_owned(),
            source,
        }),
    }
}

/// Gives the IPC socket at `path` to `group` with mode 0660, so that the group's members
/// (pilotctl, agents) may connect without root. The daemon must own the socket and, without
/// CAP_CHOWN, be a member of the group (the unit's `SupplementaryGroups=`).
pub fn share_socket(path: &Path, group: &str) -> Result<(), ShareError> {
    let gid = group_id(group)?;
    let apply = |source| ShareError::Apply {
        path: path.display().to_string(),
        group: group.to_owned(),
        source,
    };
    std::os::unix::fs::chown(path, None, Some(gid)).map_err(apply)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(apply)?;
    Ok(())
}

/// Reports the running state to the service manager; a failure is only logged.
pub fn notify_ready(status: &str) {
    if let Err(e) = pilot_service::notify::ready(status) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

/// Tells the service manager the daemon stops.
pub fn notify_stopping() {
    let _ = pilot_service::notify::stopping();
}

/// The one-line status of a running node: its address and, with `pilotd up`, the interface.
pub fn status_line(node_id: u32, iface: Option<(&str, std::net::Ipv6Addr)>) -> String {
    let addr = tunnel::addr::Addr::new(0, node_id);
    match iface {
        Some((name, ula)) => format!("node {addr} registered; {name} up with {ula}"),
        None => format!("node {addr} registered"),
    }
}

/// Sets the log filter of the running subscriber.
pub type SetLogFilter = Box<dyn Fn(tracing_subscriber::EnvFilter) -> Result<(), String> + Send>;

/// Settings that a reload applies; every other changed setting needs a restart.
pub const RELOADABLE: &[&str] = &["log-level"];

/// What a reload did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// Settings applied now.
    pub applied: Vec<&'static str>,
    /// Settings that changed in the file but keep their running value until a restart.
    pub need_restart: Vec<String>,
}

/// Why a reload applied nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The configuration no longer validates; the running one stays.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The new log filter does not parse or could not be set.
    #[error("log-level {filter:?}: {reason}")]
    LogLevel {
        /// The filter.
        filter: String,
        /// Why.
        reason: String,
    },
}

/// Reads the configuration again (same flags and environment, the file as it is now) and
/// applies what is safe to change while running: the log filter. Returns what it applied and
/// which other settings changed; `running` becomes the configuration in effect.
pub fn reload(
    cli: &Cli,
    running: &mut Config,
    set_filter: &SetLogFilter,
) -> Result<Reloaded, ReloadError> {
    let new = cli.resolve()?;
    let mut out = Reloaded::default();
    if new.log_level != running.log_level {
        let filter = tracing_subscriber::EnvFilter::try_new(&new.log_level).map_err(|e| {
            ReloadError::LogLevel {
                filter: new.log_level.clone(),
                reason: e.to_string(),
            }
        })?;
        set_filter(filter).map_err(|reason| ReloadError::LogLevel {
            filter: new.log_level.clone(),
            reason,
        })?;
        running.log_level = new.log_level.clone();
        out.applied.push("log-level");
    }
    out.need_restart = changed_keys(running, &new);
    Ok(out)
}

/// The settings (as config keys) whose values differ between `a` and `b`.
fn changed_keys(a: &Config, b: &Config) -> Vec<String> {
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(a), serde_json::to_value(b))
    else {
        return Vec::new();
    };
    a.iter()
        .filter(|(k, v)| b.get(*k) != Some(*v))
        .map(|(k, _)| k.replace('_', "-"))
        .collect()
}

/// Builds the log subscriber (text or JSON lines on stderr, colour only on a terminal) with a
/// filter that [`reload`] can change; installs it as the global default.
pub fn init_logs(filter: tracing_subscriber::EnvFilter, json: bool) -> SetLogFilter {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        let b = builder.json().with_filter_reloading();
        let handle = b.reload_handle();
        b.init();
        Box::new(move |f| handle.reload(f).map_err(|e| e.to_string()))
    } else {
        let b = builder.with_filter_reloading();
        let handle = b.reload_handle();
        b.init();
        Box::new(move |f| handle.reload(f).map_err(|e| e.to_string()))
    }
}

/// Takes over SIGHUP from its default action (which ends the process): call it early in the
/// runtime, so that a SIGHUP that comes before the daemon is ready is held for
/// [`spawn_reloader`] instead.
pub fn hangups() -> Option<tokio::signal::unix::Signal> {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "no SIGHUP handler: reloading is off");
            None
        }
    }
}

/// Reloads on every SIGHUP of `hup` until the process ends: re-reads the configuration,
/// applies what [`reload`] may, logs the rest, and tells the service manager.
pub fn spawn_reloader(
    hup: Option<tokio::signal::unix::Signal>,
    cli: Cli,
    mut running: Config,
    set_filter: SetLogFilter,
    status: String,
) {
    let Some(mut hup) = hup else { return };
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let _ = pilot_service::notify::reloading();
            match reload(&cli, &mut running, &set_filter) {
                Ok(r) => {
                    tracing::info!(applied = ?r.applied, "configuration reloaded");
                    if !r.need_restart.is_empty() {
                        tracing::warn!(
                            settings = ?r.need_restart,
                            "changed settings keep their running values until pilotd restarts"
                        );
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "reload refused; the running configuration stays")
                }
            }
            notify_ready(&status);
        }
    });
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use clap::Parser;
    use std::sync::{Arc, Mutex};

    #[test]
    fn reload_applies_the_log_level_and_names_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pilotd.json");
        std::fs::write(&f, r#"{"log-level": "info", "mtu": 9000}"#).unwrap();
        let cli = Cli::try_parse_from([
            "pilotd",
            "--config",
            f.to_str().unwrap(),
            "--home",
            dir.path().to_str().unwrap(),
        ])
        .unwrap();
        let mut running = cli.resolve().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let set: SetLogFilter = Box::new(move |f| {
            s.lock().unwrap().push(f.to_string());
            Ok(())
        });
        std::fs::write(&f, r#"{"log-level": "debug", "mtu": 1500}"#).unwrap();
        let r = reload(&cli, &mut running, &set).unwrap();
        assert_eq!(r.applied, ["log-level"]);
        assert_eq!(r.need_restart, ["mtu"]);
        assert_eq!(running.log_level, "debug");
        assert_eq!(running.mtu, 9000);
        assert_eq!(*seen.lock().unwrap(), ["debug"]);
        std::fs::write(&f, r#"{"mtu": "huge"}"#).unwrap();
        let e = reload(&cli, &mut running, &set).unwrap_err();
        assert!(e.to_string().starts_with("mtu:"), "{e}");
        assert_eq!(running.log_level, "debug");
    }

    #[test]
    fn status_names_the_address_and_interface() {
        let ula = "fd06:3fcd:b33d::2a".parse().unwrap();
        assert_eq!(
            status_line(42, Some(("pilot0", ula))),
            "node 0:0000.0000.002A registered; pilot0 up with fd06:3fcd:b33d::2a"
        );
        assert_eq!(status_line(42, None), "node 0:0000.0000.002A registered");
    }

    #[test]
    fn unknown_group_is_named() {
        let e = group_id("no-such-group-pilot-test").unwrap_err();
        assert!(e.to_string().contains("no-such-group-pilot-test"), "{e}");
        assert_eq!(group_id("root").unwrap(), 0);
    }
}
