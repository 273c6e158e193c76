//! The node's Ed25519 identity as the running daemon holds it: loaded from (or created at) its
//! file, shared by the tunnels, the registry link, the trust service and the IPC server, and
//! replaced by a key rotation.
//!
//! A rotation survives a crash at any point:
//! 1. [`NodeIdentity::prepare`] writes the new key, with the node ID, to `<file>.next`;
//! 2. the registry link asks the registry to rotate (signed by the current key);
//! 3. on the registry's answer, [`NodeIdentity::commit`] makes the new key current and
//!    replaces the identity file with it (atomic rename), then removes `<file>.next`; on a
//!    refusal, [`NodeIdentity::abandon`] removes `<file>.next`.
//!
//! If the daemon stops between 1 and 3, or the registry connection breaks before the answer,
//! the link settles it on its next connection, before it registers: it looks the node up and
//! keeps whichever of the two keys the registry holds.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use ed25519_dalek::{SigningKey, VerifyingKey};
use tunnel::{Identity, IdentityError};
use zeroize::Zeroizing;

use crate::fsutil::write_atomic;

/// Why a rotation step failed.
#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    /// The identity lives only in memory (tests, embedded use).
    #[error("this identity has no file; a rotated key could not be kept")]
    NoFile,
    /// A rotation is already waiting to be settled with the registry.
    #[error("a key rotation is already in progress")]
    InProgress,
    /// The file step did not finish (its task was cancelled or panicked).
    #[error("identity file step failed: {0}")]
    Task(String),
    /// The identity file or the pending file could not be written or read.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
}

/// A new key written but not yet confirmed by the registry.
pub struct Pending {
    /// The node the rotation is for.
    pub node: u32,
    /// The new key.
    pub key: SigningKey,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("node", &self.node)
            .field("key", &self.key.verifying_key())
            .finish()
    }
}

/// The current identity key, and where it is kept.
pub struct NodeIdentity {
    path: Option<PathBuf>,
    key: RwLock<Arc<SigningKey>>,
}

impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("path", &self.path)
            .field("public_key", &self.public_key_base64())
            .finish()
    }
}

impl NodeIdentity {
    /// Loads the identity file at `path`, or creates one. Returns whether it was created.
    pub fn load_or_create(path: &Path) -> Result<(NodeIdentity, bool), IdentityError> {
        let (id, created) = Identity::load_or_create(path, &mut rand_core::OsRng)?;
        Ok((
            NodeIdentity {
                path: Some(path.to_owned()),
                key: RwLock::new(Arc::new(id.signing_key().clone())),
            },
            created,
        ))
    }

    /// An identity that is not kept in a file: it cannot be rotated.
    pub fn in_memory(key: SigningKey) -> NodeIdentity {
        NodeIdentity {
            path: None,
            key: RwLock::new(Arc::new(key)),
        }
    }

    /// The current key.
    pub fn key(&self) -> Arc<SigningKey> {
        match self.key.read() {
            Ok(k) => k.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// The current public key.
    pub fn public_key(&self) -> VerifyingKey {
        self.key().verifying_key()
    }

    /// The current public key, standard base64.
    pub fn public_key_base64(&self) -> String {
        tunnel::registry::auth::b64(self.public_key().as_bytes())
    }

    /// The file a rotation in progress is kept in.
    pub fn next_path(&self) -> Option<PathBuf> {
        self.path.as_ref().map(|p| {
            let mut name = p.as_os_str().to_owned();
            name.push(".next");
            PathBuf::from(name)
        })
    }

    /// Step 1 of a rotation: a fresh key for `node`, written to the pending file.
    pub fn prepare(&self, node: u32) -> Result<SigningKey, RotateError> {
        let next = self.next_path().ok_or(RotateError::NoFile)?;
        if next.exists() {
            return Err(RotateError::InProgress);
        }
        let id = Identity::generate(&mut rand_core::OsRng);
        let mut text = Zeroizing::new(format!("node_id {node}\n"));
        text.push_str(&id.to_json());
        write_atomic(&next, text.as_bytes()).map_err(|e| file_error(&next, e))?;
        Ok(id.signing_key().clone())
    }

    /// The rotation waiting to be settled, if any. A pending file that cannot be read is an
    /// error (it is left in place for the operator).
    pub fn pending(&self) -> Result<Option<Pending>, RotateError> {
        let Some(next) = self.next_path() else {
            return Ok(None);
        };
        let bytes = match std::fs::read(&next) {
            Ok(b) => Zeroizing::new(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(file_error(&next, e)),
        };
        let bad = |why: &str| RotateError::File {
            path: next.display().to_string(),
            reason: why.to_owned(),
        };
        let split = bytes
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| bad("no node line"))?;
        let (line, json) = bytes.split_at(split);
        let node = std::str::from_utf8(line)
            .ok()
            .and_then(|l| l.strip_prefix("node_id "))
            .and_then(|n| n.parse::<u32>().ok())
            .ok_or_else(|| bad("bad node line"))?;
        let id = Identity::from_json(json.get(1..).unwrap_or_default())
            .map_err(|e| bad(&e.to_string()))?;
        Ok(Some(Pending {
            node,
            key: id.signing_key().clone(),
        }))
    }

    /// Step 3 of a rotation, after the registry accepted `key`: it becomes the current key at
    /// once, then replaces the identity file. If the file cannot be written the pending file
    /// stays, so the next start settles the rotation with the registry again.
    pub fn commit(&self, key: SigningKey) -> Result<(), RotateError> {
        let seed = Zeroizing::new(key.to_bytes());
        match self.key.write() {
            Ok(mut k) => *k = Arc::new(key),
            Err(p) => *p.into_inner() = Arc::new(key),
        }
        let (Some(path), Some(next)) = (self.path.as_ref(), self.next_path()) else {
            return Err(RotateError::NoFile);
        };
        Identity::from_seed(&seed)
            .save(path)
            .map_err(|e| RotateError::File {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
        remove(&next)
    }

    /// A rotation the registry refused (or never saw): the pending key is discarded.
    pub fn abandon(&self) -> Result<(), RotateError> {
        match self.next_path() {
            Some(next) => remove(&next),
            None => Ok(()),
        }
    }
}

fn remove(path: &Path) -> Result<(), RotateError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(file_error(path, e)),
    }
}

fn file_error(path: &Path, e: std::io::Error) -> RotateError {
    RotateError::File {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn prepare_commit_replaces_the_file_and_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.json");
        let (id, created) = NodeIdentity::load_or_create(&path).unwrap();
        assert!(created);
        let old = id.public_key();
        let new = id.prepare(7).unwrap();
        assert!(matches!(id.prepare(7), Err(RotateError::InProgress)));
        let p = id.pending().unwrap().unwrap();
        assert_eq!(p.node, 7);
        assert_eq!(p.key.verifying_key(), new.verifying_key());
        assert_eq!(id.public_key(), old, "nothing changes before the commit");
        id.commit(new.clone()).unwrap();
        assert_eq!(id.public_key(), new.verifying_key());
        assert!(id.pending().unwrap().is_none());
        let (again, created) = NodeIdentity::load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(again.public_key(), new.verifying_key());
    }

    #[test]
    fn abandon_keeps_the_old_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.json");
        let (id, _) = NodeIdentity::load_or_create(&path).unwrap();
        let old = id.public_key();
        id.prepare(3).unwrap();
        id.abandon().unwrap();
        assert!(id.pending().unwrap().is_none());
        assert_eq!(
            NodeIdentity::load_or_create(&path).unwrap().0.public_key(),
            old
        );
    }

    #[test]
    fn a_damaged_pending_file_is_an_error_not_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.json");
        let (id, _) = NodeIdentity::load_or_create(&path).unwrap();
        let next = id.next_path().unwrap();
        for junk in [
            &b""[..],
            b"node_id x\n{}",
            b"node_id 5\n{\"private_key\":1}",
            b"\xff\n",
        ] {
            std::fs::write(&next, junk).unwrap();
            assert!(id.pending().is_err(), "{junk:?}");
        }
    }

    #[test]
    fn in_memory_cannot_rotate() {
        let id = NodeIdentity::in_memory(SigningKey::from_bytes(&[1; 32]));
        assert!(matches!(id.prepare(1), Err(RotateError::NoFile)));
        assert!(id.pending().unwrap().is_none());
    }
}
