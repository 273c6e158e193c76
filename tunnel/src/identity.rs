//! A node's long-term Ed25519 identity and its file (v1 wire §9.1).
//!
//! The file is v1's `identity.json`: pretty-printed JSON with two standard-base64 fields,
//!
//! ```text
//! {
//!   "private_key": base64(32-byte seed || 32-byte public key),   Go's ed25519.PrivateKey
//!   "public_key":  base64(32-byte public key)
//! }
//! ```
//!
//! Loading checks that `public_key` is the key derived from the seed, and refuses a file that
//! group or others can access (the private key would be exposed). Saving writes a temporary
//! file with mode 0600 in the same directory, fsyncs it, renames it over the target and fsyncs
//! the directory, so a crash leaves either the old file or the new one, never a torn one. The
//! directory is created with mode 0700.
//!
//! This module reads and writes files, the one kind of I/O the `tunnel` crate does; it opens no
//! socket and reads no clock.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ed25519_dalek::{SigningKey, VerifyingKey, PUBLIC_KEY_LENGTH, SECRET_KEY_LENGTH};
use rand_core::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

/// File mode of the identity file.
pub const FILE_MODE: u32 = 0o600;
/// File mode of a directory the identity file creates.
pub const DIR_MODE: u32 = 0o700;
/// Largest identity file accepted (a real one is about 150 bytes).
pub const MAX_FILE_LEN: u64 = 64 * 1024;

/// What is wrong with the contents of an identity file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityFormatError {
    /// Not the expected JSON object (also covers truncation).
    #[error("not a valid identity JSON object: {0}")]
    Json(String),
    /// A field is not standard base64.
    #[error("field {0:?} is not valid base64")]
    Base64(&'static str),
    /// A field decodes to the wrong number of bytes.
    #[error("field {field:?} has {got} bytes, expected {expected}")]
    Length {
        /// The field.
        field: &'static str,
        /// Bytes expected.
        expected: usize,
        /// Bytes found.
        got: usize,
    },
    /// `public_key`, or the second half of `private_key`, is not the key of the seed.
    #[error("public key does not match the private key")]
    PublicKeyMismatch,
}

/// Why an identity file could not be loaded or saved. Every variant names the path.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// There is no file (first run).
    #[error("identity file {0} does not exist")]
    NotFound(PathBuf),
    /// A filesystem operation failed.
    #[error("identity file {path}: {op}: {source}")]
    Io {
        /// The path concerned.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The file is readable or writable by group or others.
    #[error(
        "identity file {path} has mode {mode:04o}: the private key must not be accessible to \
         group or others (chmod 600 {path})"
    )]
    Permissions {
        /// The path.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file is larger than any identity file.
    #[error("identity file {path} is {len} bytes, too large to be an identity file")]
    TooLarge {
        /// The path.
        path: PathBuf,
        /// Its size.
        len: u64,
    },
    /// The contents are invalid.
    #[error("identity file {path} is corrupt: {source}")]
    Format {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: IdentityFormatError,
    },
}

impl IdentityError {
    fn io(path: &Path, op: &'static str, source: io::Error) -> Self {
        IdentityError::Io {
            path: path.to_owned(),
            op,
            source,
        }
    }
}

/// The file's JSON object. Unknown fields are ignored, as v1's decoder ignores them.
#[derive(Serialize, Deserialize)]
struct IdentityFile {
    private_key: String,
    public_key: String,
}

impl Drop for IdentityFile {
    fn drop(&mut self) {
        self.private_key.zeroize();
    }
}

/// A node's Ed25519 identity key pair.
#[derive(Clone)]
pub struct Identity {
    signing: SigningKey,
}

impl core::fmt::Debug for Identity {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Identity")
            .field("public_key", &B64.encode(self.public_key().as_bytes()))
            .finish_non_exhaustive()
    }
}

fn decode_exact<const N: usize>(
    field: &'static str,
    text: &str,
) -> Result<Zeroizing<[u8; N]>, IdentityFormatError> {
    let bytes = Zeroizing::new(
        B64.decode(text.trim())
            .map_err(|_| IdentityFormatError::Base64(field))?,
    );
    let mut out = Zeroizing::new([0u8; N]);
    if bytes.len() != N {
        return Err(IdentityFormatError::Length {
            field,
            expected: N,
            got: bytes.len(),
        });
    }
    out.copy_from_slice(&bytes);
    Ok(out)
}

impl Identity {
    /// A new random identity.
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        Identity {
            signing: SigningKey::generate(rng),
        }
    }

    /// An identity from a 32-byte Ed25519 seed.
    pub fn from_seed(seed: &[u8; SECRET_KEY_LENGTH]) -> Self {
        Identity {
            signing: SigningKey::from_bytes(seed),
        }
    }

    /// The signing key.
    pub fn signing_key(&self) -> &SigningKey {
        &self.signing
    }

    /// The public key (what the registry holds for this node).
    pub fn public_key(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }

    /// The public key in standard base64, as the registry and v1 files carry it.
    pub fn public_key_base64(&self) -> String {
        B64.encode(self.public_key().as_bytes())
    }

    /// The v1 file contents: pretty-printed JSON, 2-space indent, trailing newline.
    pub fn to_json(&self) -> Zeroizing<String> {
        let mut go_private = Zeroizing::new([0u8; SECRET_KEY_LENGTH + PUBLIC_KEY_LENGTH]);
        go_private[..SECRET_KEY_LENGTH].copy_from_slice(self.signing.as_bytes());
        go_private[SECRET_KEY_LENGTH..].copy_from_slice(self.public_key().as_bytes());
        let file = IdentityFile {
            private_key: B64.encode(&go_private[..]),
            public_key: self.public_key_base64(),
        };
        let mut text = Zeroizing::new(
            // Serializing two strings into a String cannot fail.
            serde_json::to_string_pretty(&file).unwrap_or_default(),
        );
        text.push('\n');
        text
    }

    /// Parses the v1 file contents.
    pub fn from_json(bytes: &[u8]) -> Result<Self, IdentityFormatError> {
        let file: IdentityFile =
            serde_json::from_slice(bytes).map_err(|e| IdentityFormatError::Json(e.to_string()))?;
        let private = decode_exact::<{ SECRET_KEY_LENGTH + PUBLIC_KEY_LENGTH }>(
            "private_key",
            &file.private_key,
        )?;
        let public = decode_exact::<PUBLIC_KEY_LENGTH>("public_key", &file.public_key)?;
        let mut seed = Zeroizing::new([0u8; SECRET_KEY_LENGTH]);
        seed.copy_from_slice(&private[..SECRET_KEY_LENGTH]);
        let id = Identity::from_seed(&seed);
        let derived = id.public_key().to_bytes();
        if derived != *public || derived[..] != private[SECRET_KEY_LENGTH..] {
            return Err(IdentityFormatError::PublicKeyMismatch);
        }
        Ok(id)
    }

    /// Loads an identity file. A missing file is [`IdentityError::NotFound`].
    pub fn load(path: &Path) -> Result<Self, IdentityError> {
        let file = match fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(IdentityError::NotFound(path.to_owned()))
            }
            Err(e) => return Err(IdentityError::io(path, "open", e)),
        };
        let meta = file
            .metadata()
            .map_err(|e| IdentityError::io(path, "stat", e))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(IdentityError::Permissions {
                path: path.to_owned(),
                mode,
            });
        }
        if meta.len() > MAX_FILE_LEN {
            return Err(IdentityError::TooLarge {
                path: path.to_owned(),
                len: meta.len(),
            });
        }
        let mut bytes = Zeroizing::new(Vec::with_capacity(meta.len() as usize));
        io::Read::take(file, MAX_FILE_LEN)
            .read_to_end(&mut bytes)
            .map_err(|e| IdentityError::io(path, "read", e))?;
        Identity::from_json(&bytes).map_err(|source| IdentityError::Format {
            path: path.to_owned(),
            source,
        })
    }

    /// Writes the identity file atomically with mode 0600 (see the module docs).
    pub fn save(&self, path: &Path) -> Result<(), IdentityError> {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(dir)
            .map_err(|e| IdentityError::io(dir, "create directory", e))?;
        let name = path
            .file_name()
            .ok_or_else(|| {
                IdentityError::io(
                    path,
                    "save",
                    io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"),
                )
            })?
            .to_string_lossy();
        let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
        let result = (|| {
            // O_EXCL: never write the key through a file (or symlink) someone else put at
            // the temporary path; a stale one from a crash is removed first.
            let create = || {
                fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(FILE_MODE)
                    .open(&tmp)
            };
            let mut f = match create() {
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    fs::remove_file(&tmp)
                        .map_err(|e| IdentityError::io(&tmp, "remove stale", e))?;
                    create()
                }
                other => other,
            }
            .map_err(|e| IdentityError::io(&tmp, "create", e))?;
            // The mode given to open is filtered by the umask; set it exactly.
            f.set_permissions(fs::Permissions::from_mode(FILE_MODE))
                .map_err(|e| IdentityError::io(&tmp, "chmod", e))?;
            f.write_all(self.to_json().as_bytes())
                .map_err(|e| IdentityError::io(&tmp, "write", e))?;
            f.sync_all()
                .map_err(|e| IdentityError::io(&tmp, "fsync", e))?;
            fs::rename(&tmp, path).map_err(|e| IdentityError::io(path, "rename", e))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
            return result;
        }
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| IdentityError::io(dir, "fsync directory", e))
    }

    /// Loads the identity at `path`, or creates and saves a new one when there is no file.
    /// Returns the identity and whether it was created. Any other problem (a corrupt file,
    /// wrong permissions) is an error: an existing identity is never replaced.
    pub fn load_or_create<R: RngCore + CryptoRng>(
        path: &Path,
        rng: &mut R,
    ) -> Result<(Self, bool), IdentityError> {
        match Identity::load(path) {
            Ok(id) => Ok((id, false)),
            Err(IdentityError::NotFound(_)) => {
                let id = Identity::generate(rng);
                id.save(path)?;
                Ok((id, true))
            }
            Err(e) => Err(e),
        }
    }
}
