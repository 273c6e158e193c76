//! The node's desired registry state: what the operator asked the registry to hold for this
//! node (hostname, visibility, tags, network memberships, the task-executor advert), kept in
//! `<home>/registry-state.json` and applied again by the registry link after every
//! registration.
//!
//! The registry forgets a node's attributes when it is deregistered or reaped, and all of
//! them when it restarts without its store; the daemon is the one place that remembers them.
//! So a restart of the daemon (clean or not), a restart of the registry, or a
//! deregister/register ends with the registry holding the same state.
//!
//! # Layer and invariants
//!
//! - Daemon layer, no I/O but the state file. The registry link records a change only after
//!   the registry accepted it ([`Desired::record`]), so the file never holds a value the
//!   registry refused (a taken hostname, an invalid tag).
//! - Every change is written to the file before the caller is told (atomic replace, mode
//!   0600: a network's join token may be in it). Writes are ordered: the last change made is
//!   the last one written.
//! - [`Desired::current_hostname`] is the hostname the registry holds now, as last reported;
//!   it is not persisted.
//!
//! # Flags and runtime changes
//!
//! `--hostname` and `--public` (or their config keys) give the starting values. A change made
//! at run time through `pilotctl` is kept across restarts, until the flag itself changes: at
//! each start [`DesiredState::reconcile`] compares the flags with the values they had at the
//! previous start (recorded in the file) and lets a flag whose value changed win. In short,
//! the most recent change wins, whether it was made in the configuration or through
//! `pilotctl`. A removed `--hostname` keeps the hostname in effect.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::fsutil::write_atomic;

/// The state file's name in the daemon's home.
pub const FILE: &str = "registry-state.json";

/// Why the state file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum DesiredError {
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file does not hold a state.
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: String,
        /// Why.
        source: serde_json::Error,
    },
    /// The write was cancelled (the runtime is stopping).
    #[error("writing the registry state was cancelled")]
    Cancelled,
}

/// A network the node is a member of.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Membership {
    /// The join token it was joined with, for a network whose rule is `token`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// The flag values in effect at the last start.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Flags {
    /// `--hostname`.
    pub hostname: Option<String>,
    /// `--public`.
    pub public: Option<bool>,
}

/// What the registry should hold for this node. `None` means "never set": the registry's
/// default stays and nothing is sent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DesiredState {
    /// The hostname; `Some("")` once cleared.
    pub hostname: Option<String>,
    /// Whether the node is public.
    pub public: Option<bool>,
    /// The tags (the whole list).
    pub tags: Option<Vec<String>>,
    /// Whether the node advertises task execution.
    pub task_exec: Option<bool>,
    /// Networks joined or created, by ID (never 0).
    pub networks: BTreeMap<u16, Membership>,
    /// The flags at the last start (see the module docs).
    pub flags: Flags,
}

impl DesiredState {
    /// Lets `--hostname` and `--public` win where their value differs from the one recorded
    /// at the previous start (or on the first start), and records the values now in effect.
    pub fn reconcile(&mut self, hostname: Option<&str>, public: bool) {
        if let Some(h) = hostname {
            if self.flags.hostname.as_deref() != Some(h) {
                self.hostname = Some(h.to_owned());
            }
        }
        self.flags.hostname = hostname.map(str::to_owned);
        if self.flags.public != Some(public) {
            self.public = Some(public);
        }
        self.flags.public = Some(public);
    }

    /// Records the effect of a registry request `req` the registry answered with `reply`;
    /// whether anything changed.
    pub fn record(&mut self, req: &Value, reply: &Value) -> bool {
        let before = self.clone();
        let kind = req.get("type").and_then(Value::as_str).unwrap_or_default();
        let network = |v: &Value| {
            v.get("network_id")
                .and_then(Value::as_u64)
                .and_then(|n| u16::try_from(n).ok())
                .filter(|&n| n != 0)
        };
        let token = req
            .get("token")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .map(str::to_owned);
        match kind {
            "set_hostname" => {
                let h = reply
                    .get("hostname")
                    .or_else(|| req.get("hostname"))
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                self.hostname = Some(h.to_owned());
            }
            "set_visibility" => {
                if let Some(p) = req.get("public").and_then(Value::as_bool) {
                    self.public = Some(p);
                }
            }
            "set_tags" => {
                let tags = reply
                    .get("tags")
                    .or_else(|| req.get("tags"))
                    .and_then(|t| serde_json::from_value::<Option<Vec<String>>>(t.clone()).ok())
                    .flatten()
                    .unwrap_or_default();
                self.tags = Some(tags);
            }
            "set_task_exec" => {
                if let Some(e) = req.get("enabled").and_then(Value::as_bool) {
                    self.task_exec = Some(e);
                }
            }
            "create_network" => {
                if let Some(id) = network(reply) {
                    let token = token
                        .filter(|_| req.get("join_rule").and_then(Value::as_str) == Some("token"));
                    self.networks.insert(id, Membership { token });
                }
            }
            "join_network" => {
                if let Some(id) = network(req) {
                    self.networks.insert(id, Membership { token });
                }
            }
            "leave_network" => {
                if let Some(id) = network(req) {
                    self.networks.remove(&id);
                }
            }
            _ => {}
        }
        *self != before
    }
}

/// The desired state shared by the registry link, the IPC server and the node's start-up.
#[derive(Debug, Clone)]
pub struct Desired {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// The file; `None` keeps the state in memory only.
    path: Option<PathBuf>,
    state: Mutex<DesiredState>,
    current_hostname: Mutex<Option<String>>,
    /// Held while a write is under way, so writes land in the order of the changes.
    writing: tokio::sync::Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Desired {
    /// The state kept in `<home>/`[`FILE`]: an empty one when the file does not exist.
    pub fn load(home: &Path) -> Result<Desired, DesiredError> {
        let path = home.join(FILE);
        let state = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|source| DesiredError::Parse {
                path: path.display().to_string(),
                source,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => DesiredState::default(),
            Err(source) => {
                return Err(DesiredError::Io {
                    path: path.display().to_string(),
                    source,
                })
            }
        };
        Ok(Desired::with(Some(path), state))
    }

    /// A state held in memory only.
    pub fn in_memory(state: DesiredState) -> Desired {
        Desired::with(None, state)
    }

    fn with(path: Option<PathBuf>, state: DesiredState) -> Desired {
        Desired {
            inner: Arc::new(Inner {
                path,
                state: Mutex::new(state),
                current_hostname: Mutex::new(None),
                writing: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// The file, if the state has one.
    pub fn path(&self) -> Option<&Path> {
        self.inner.path.as_deref()
    }

    /// A copy of the state now.
    pub fn snapshot(&self) -> DesiredState {
        lock(&self.inner.state).clone()
    }

    /// Whether the node should be public (false if never set).
    pub fn public(&self) -> bool {
        lock(&self.inner.state).public.unwrap_or(false)
    }

    /// Changes the state with `f` and, if it changed, writes the file; whether it changed.
    pub async fn update(
        &self,
        f: impl FnOnce(&mut DesiredState) -> bool,
    ) -> Result<bool, DesiredError> {
        let changed = f(&mut lock(&self.inner.state));
        if changed {
            self.save().await?;
        }
        Ok(changed)
    }

    /// Records a request the registry accepted (see [`DesiredState::record`]).
    pub async fn record(&self, req: &Value, reply: &Value) -> Result<bool, DesiredError> {
        self.update(|s| s.record(req, reply)).await
    }

    /// Writes the state as it is now.
    pub async fn save(&self) -> Result<(), DesiredError> {
        let Some(path) = self.inner.path.clone() else {
            return Ok(());
        };
        let _order = self.inner.writing.lock().await;
        // Taken after the write lock: the last writer writes the latest state.
        let bytes = serde_json::to_vec_pretty(&self.snapshot()).map_err(|e| DesiredError::Io {
            path: path.display().to_string(),
            source: e.into(),
        })?;
        tokio::task::spawn_blocking(move || {
            write_atomic(&path, &bytes).map_err(|source| DesiredError::Io {
                path: path.display().to_string(),
                source,
            })
        })
        .await
        .map_err(|_| DesiredError::Cancelled)?
    }

    /// The hostname the registry holds for the node now, as last reported.
    pub fn current_hostname(&self) -> Option<String> {
        lock(&self.inner.current_hostname).clone()
    }

    /// Notes the hostname the registry holds now.
    pub fn set_current_hostname(&self, hostname: Option<String>) {
        *lock(&self.inner.current_hostname) = hostname;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn a_changed_flag_wins_an_unchanged_one_keeps_the_runtime_value() {
        let mut s = DesiredState::default();
        s.reconcile(Some("alpha"), false);
        assert_eq!(s.hostname.as_deref(), Some("alpha"));
        assert_eq!(s.public, Some(false));
        // Changed through pilotctl at run time.
        s.hostname = Some("beta".into());
        s.public = Some(true);
        // The same flags at the next start: the runtime values stay.
        s.reconcile(Some("alpha"), false);
        assert_eq!(s.hostname.as_deref(), Some("beta"));
        assert_eq!(s.public, Some(true));
        // The operator changed the flags: they win.
        s.reconcile(Some("gamma"), true);
        assert_eq!(s.hostname.as_deref(), Some("gamma"));
        s.public = Some(false);
        s.reconcile(Some("gamma"), true);
        assert_eq!(s.public, Some(false));
        // A removed --hostname keeps the hostname in effect.
        s.reconcile(None, true);
        assert_eq!(s.hostname.as_deref(), Some("gamma"));
        assert_eq!(s.flags.hostname, None);
    }

    #[test]
    fn accepted_requests_are_recorded() {
        let mut s = DesiredState::default();
        assert!(s.record(
            &json!({"type": "set_hostname", "node_id": 3, "hostname": "bob"}),
            &json!({"type": "set_hostname_ok", "node_id": 3, "hostname": "bob"})
        ));
        assert!(s.record(
            &json!({"type": "set_visibility", "node_id": 3, "public": true}),
            &json!({"type": "set_visibility_ok", "visibility": "public"})
        ));
        assert!(s.record(
            &json!({"type": "set_tags", "node_id": 3, "tags": ["gpu", "eu"]}),
            &json!({"type": "set_tags_ok", "tags": ["gpu", "eu"]})
        ));
        assert!(s.record(
            &json!({"type": "set_task_exec", "node_id": 3, "enabled": true}),
            &json!({"type": "set_task_exec_ok", "task_exec": true})
        ));
        assert!(s.record(
            &json!({"type": "create_network", "node_id": 3, "name": "lab", "join_rule": "token", "token": "s3cret"}),
            &json!({"type": "create_network_ok", "network_id": 5, "name": "lab"})
        ));
        assert!(s.record(
            &json!({"type": "join_network", "node_id": 3, "network_id": 7, "token": null}),
            &json!({"type": "join_network_ok", "network_id": 7})
        ));
        assert_eq!(s.hostname.as_deref(), Some("bob"));
        assert_eq!(s.public, Some(true));
        assert_eq!(s.tags, Some(vec!["gpu".to_owned(), "eu".to_owned()]));
        assert_eq!(s.task_exec, Some(true));
        assert_eq!(s.networks.get(&5).unwrap().token.as_deref(), Some("s3cret"));
        assert_eq!(s.networks.get(&7).unwrap().token, None);
        // The same again changes nothing; leaving and clearing do.
        assert!(!s.record(
            &json!({"type": "set_visibility", "public": true}),
            &json!({"type": "set_visibility_ok"})
        ));
        assert!(s.record(
            &json!({"type": "leave_network", "network_id": 7}),
            &json!({"type": "leave_network_ok", "network_id": 7})
        ));
        assert!(s.record(
            &json!({"type": "set_tags", "tags": []}),
            &json!({"type": "set_tags_ok", "tags": null})
        ));
        assert_eq!(s.tags, Some(vec![]));
        assert!(!s.networks.contains_key(&7));
        // Requests that hold no state are not recorded.
        assert!(!s.record(
            &json!({"type": "lookup", "node_id": 3}),
            &json!({"type": "lookup_ok"})
        ));
    }

    #[tokio::test]
    async fn the_state_survives_a_reload_and_a_missing_file_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let d = Desired::load(dir.path()).unwrap();
        assert_eq!(d.snapshot(), DesiredState::default());
        d.record(
            &json!({"type": "set_hostname", "hostname": "carol"}),
            &json!({"type": "set_hostname_ok", "hostname": "carol"}),
        )
        .await
        .unwrap();
        let again = Desired::load(dir.path()).unwrap();
        assert_eq!(again.snapshot().hostname.as_deref(), Some("carol"));
        std::fs::write(dir.path().join(FILE), b"{not json").unwrap();
        assert!(matches!(
            Desired::load(dir.path()),
            Err(DesiredError::Parse { .. })
        ));
    }
}
