//! Task delegation on virtual port 1003 (v1 wire §8.4): one node submits a task description
//! to another, which accepts or declines it, executes it and sends the results back.
//!
//! # Wire
//!
//! ```text
//!  0               4               8
//! +---------------+---------------+------------------------+
//! | type (u32 BE) | length (u32 BE)| JSON body (length bytes)|
//! +---------------+---------------+------------------------+
//! type 1 SUBMIT         {"task_id","task_description","from_addr","to_addr"}
//!      reply, type 1    {"task_id","status":200|400,"message"}
//! type 2 RESULT         legacy; refused
//! type 3 STATUS_UPDATE  {"task_id","status","justification"}
//! type 4 SEND_RESULTS   {"task_id","result_type":"text"|"file","result_text"?,"filename"?,
//!                        "file_data"? (base64),"completed_at","time_idle_ms"?,
//!                        "time_staged_ms"?,"time_cpu_ms"?}
//! ```
//!
//! A length above [`MAX_FRAME`] (16 MiB, as v1), or above the cap of its type
//! ([`max_body`]), is refused from the 8-byte header, before anything is allocated.
//!
//! # Who may do what
//!
//! v1 trusts the JSON: task IDs and file names from the peer go into paths, the submitter
//! recorded is the client-supplied `from_addr`, and any peer may rewrite any task. Here:
//!
//! - A task ID from a peer must be exactly `8-4-4-4-12` lowercase hex ([`valid_task_id`]);
//!   nothing else ever reaches a path. A result file name is reduced by
//!   [`sanitize_filename`] (base name, no control characters, no leading dots, at most
//!   [`MAX_FILENAME`] bytes).
//! - The submitter of a received task is the tunnel-authenticated remote node of the SUBMIT
//!   connection; `from_addr` and `to_addr` are ignored.
//! - STATUS_UPDATE and SEND_RESULTS for a task we submitted are taken only from the node we
//!   submitted it to. The submitter may withdraw a task it submitted to us with a CANCELLED
//!   STATUS_UPDATE, and nothing else. Any other update is answered 400 "unknown task", the
//!   same answer as for an ID that does not exist, so IDs cannot be probed.
//! - A node accepts submissions only while task execution is enabled ([`TaskHandle::set_enabled`],
//!   persisted in `<home>/tasks/settings.json`), and then only if the registry says
//!   `polo(submitter) ≥ polo(receiver)` (v1's reputation gate; scores cached for
//!   [`POLO_CACHE_TTL`]; the registry call runs on the connection's own task, never on the
//!   packet path).
//! - Pending tasks are bounded ([`MAX_PENDING`], [`MAX_PENDING_PER_PEER`]), records on disk too
//!   ([`MAX_RECORDS`] per direction; the oldest finished ones are pruned first), and so are
//!   concurrent connections ([`MAX_CONNS`]), frames per connection, bytes of frame bodies
//!   held at once ([`BODY_BUDGET`]) and results ([`MAX_RESULT_BYTES`]).
//!
//! # Replies to updates and results
//!
//! v1 answers only SUBMIT. This service also answers STATUS_UPDATE and SEND_RESULTS with a
//! frame of the same type carrying `{"task_id","status":200|400,"message"}`; v1 clients never
//! read it. A client here reads it when it comes and takes end-of-stream (a v1 daemon) as
//! "delivered, not confirmed". Several frames may follow each other on one connection (v1
//! pilotctl sends SEND_RESULTS then a SUCCEEDED STATUS_UPDATE on one connection; v1 reads only
//! the first).
//!
//! # State
//!
//! `<home>/tasks/{received,submitted}/<task_id>.json` hold the v1 task file JSON (one extra
//! key, `result_file`, on submitted tasks whose results arrived); results go to
//! `<home>/tasks/results/<task_id>_<name>` (text results: `<task_id>_result.txt`). Every file
//! is written through a temporary file and a rename, mode 0600, directories 0700. Everything
//! is loaded at start; memory and disk always agree.
//!
//! # Timers
//!
//! The receiver cancels a task left NEW for [`TaskConfig::new_timeout`] (10 min; v1: 1 min,
//! too short for a human in the loop), expires one left ACCEPTED for
//! [`TaskConfig::queue_timeout`] (1 h, as v1, counted from acceptance) or EXECUTING for
//! [`TaskConfig::exec_timeout`] (24 h; v1 has none), and tells the submitter with a
//! STATUS_UPDATE. The submitter applies the same timeouts doubled to its own copies, in case
//! that update never arrives. No polo score is changed by the daemon (v1 changes them with
//! unauthenticated registry calls; this registry refuses score changes without an admin
//! token).

use std::collections::HashMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tunnel::{Addr, SocketAddr as PilotAddr};

use crate::engine::{BindError, Cmd, EngineHandle};
use crate::events::Events;
use crate::fsutil::write_atomic;
use crate::local::{self, LocalListener, LocalStream};
use crate::ratelog::LogGate;
use crate::registry_link::{LinkCmd, LinkError};
use crate::trust::{format_rfc3339, parse_rfc3339};

// ---------------------------------------------------------------------------------------
// Wire constants (v1 wire §8.4)

/// The task port.
pub const TASK_PORT: u16 = 1003;
/// Bytes of a frame header: type and length, both u32 big-endian.
pub const FRAME_HEADER_LEN: usize = 8;
/// Largest frame body v1 reads (16 MiB, inclusive).
pub const MAX_FRAME: u32 = 1 << 24;
/// Reply status: accepted.
pub const STATUS_OK: i64 = 200;
/// Reply status: refused.
pub const STATUS_REFUSED: i64 = 400;

/// Frame types.
pub mod frame_type {
    /// Task submission, and its reply.
    pub const SUBMIT: u32 = 1;
    /// Legacy result frame (unused by v1's own tools; refused here).
    pub const RESULT: u32 = 2;
    /// A status change of a task.
    pub const STATUS_UPDATE: u32 = 3;
    /// Results of a task.
    pub const SEND_RESULTS: u32 = 4;
}

// ---------------------------------------------------------------------------------------
// Implementation limits

/// Largest body of a SUBMIT or STATUS_UPDATE frame (a description of [`MAX_DESCRIPTION`]
/// bytes may grow sixfold as escaped JSON).
pub const MAX_SMALL_FRAME: u32 = 1 << 20;
/// Largest task description, in bytes.
pub const MAX_DESCRIPTION: usize = 64 * 1024;
/// Largest justification kept; a longer one from a peer is cut at a character boundary.
pub const MAX_JUSTIFICATION: usize = 4096;
/// Largest result (text, or file bytes after base64 decoding): fits a 16 MiB frame as base64.
pub const MAX_RESULT_BYTES: usize = 8 << 20;
/// Longest result file name kept, in bytes.
pub const MAX_FILENAME: usize = 128;
/// Received tasks not yet finished (NEW, ACCEPTED, EXECUTING), from all peers together.
pub const MAX_PENDING: usize = 256;
/// Received tasks not yet finished from one peer.
pub const MAX_PENDING_PER_PEER: usize = 32;
/// Task records kept per direction (received, submitted); the oldest finished ones are pruned
/// to make room.
pub const MAX_RECORDS: usize = 4096;
/// Connections served at once; further ones are closed at once.
pub const MAX_CONNS: usize = 64;
/// Frames read from one connection.
pub const MAX_FRAMES_PER_CONN: usize = 4;
/// Bytes of frame bodies held in memory by all connections together.
pub const BODY_BUDGET: u32 = 4 * MAX_FRAME;
/// How long a polo score read from the registry is reused.
pub const POLO_CACHE_TTL: Duration = Duration::from_secs(60);
/// Largest reply frame a client reads.
const MAX_REPLY: u32 = 64 * 1024;
/// Largest task file read at start.
const MAX_TASK_FILE: u64 = 16 << 20;
/// Polo scores cached at once.
const POLO_CACHE_MAX: usize = 1024;

/// Result file extensions `send_results` accepts (v1 pilotctl's list).
pub const ALLOWED_RESULT_EXTENSIONS: &[&str] = &[
    "md",
    "txt",
    "rtf",
    "docx",
    "pdf",
    "pptx",
    "pth",
    "pt",
    "onnx",
    "h5",
    "pb",
    "ckpt",
    "safetensors",
    "bin",
    "csv",
    "parquet",
    "xlsx",
    "xls",
    "jpg",
    "jpeg",
    "png",
    "svg",
    "gif",
    "webp",
];

// ---------------------------------------------------------------------------------------
// Task model

/// Status of a task (v1 names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum TaskStatus {
    /// Received, not yet accepted or declined.
    New,
    /// Accepted: waiting in the queue for `execute`.
    Accepted,
    /// Declined by the receiver (final).
    Declined,
    /// Being executed.
    Executing,
    /// Results received (submitter side).
    Completed,
    /// Results delivered (final).
    Succeeded,
    /// Withdrawn, or not answered in time (final).
    Cancelled,
    /// Not executed, or not finished, in time (final).
    Expired,
}

impl TaskStatus {
    /// The v1 name.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::New => "NEW",
            TaskStatus::Accepted => "ACCEPTED",
            TaskStatus::Declined => "DECLINED",
            TaskStatus::Executing => "EXECUTING",
            TaskStatus::Completed => "COMPLETED",
            TaskStatus::Succeeded => "SUCCEEDED",
            TaskStatus::Cancelled => "CANCELLED",
            TaskStatus::Expired => "EXPIRED",
        }
    }

    /// Reads a v1 name.
    pub fn parse(s: &str) -> Option<TaskStatus> {
        Some(match s {
            "NEW" => TaskStatus::New,
            "ACCEPTED" => TaskStatus::Accepted,
            "DECLINED" => TaskStatus::Declined,
            "EXECUTING" => TaskStatus::Executing,
            "COMPLETED" => TaskStatus::Completed,
            "SUCCEEDED" => TaskStatus::Succeeded,
            "CANCELLED" => TaskStatus::Cancelled,
            "EXPIRED" => TaskStatus::Expired,
            _ => return None,
        })
    }

    /// Nothing more happens to a task in this status.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TaskStatus::Declined
                | TaskStatus::Succeeded
                | TaskStatus::Cancelled
                | TaskStatus::Expired
        )
    }

    /// Whether a receiver may report `next` for a task whose submitter copy is `self`.
    fn receiver_may_report(self, next: TaskStatus) -> bool {
        use TaskStatus::*;
        matches!(
            (self, next),
            (New, Accepted | Declined | Executing | Cancelled | Expired)
                | (Accepted, Executing | Cancelled | Expired)
                | (Executing, Cancelled | Expired)
                | (Completed, Succeeded)
        )
    }
}

impl std::fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A task record as stored on disk (v1 task file JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskFile {
    /// The task ID (`8-4-4-4-12` lowercase hex).
    pub task_id: String,
    /// What to do.
    pub task_description: String,
    /// When it was recorded (RFC 3339 UTC).
    pub created_at: String,
    /// When it was recorded, in nanoseconds since the Unix epoch: orders tasks recorded in the
    /// same second after a restart (extension; absent in v1 files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_ns: Option<u64>,
    /// Its status.
    pub status: TaskStatus,
    /// Why it has that status.
    #[serde(default)]
    pub status_justification: String,
    /// The submitter's address; for a received task, the authenticated remote node.
    #[serde(default)]
    pub from: String,
    /// The receiver's address.
    #[serde(default)]
    pub to: String,
    /// When it was accepted or declined.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub accepted_at: String,
    /// When it joined the execution queue.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub staged_at: String,
    /// When execution started.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub execute_started_at: String,
    /// When results were sent or received.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub completed_at: String,
    /// Milliseconds from creation to accept or decline.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub time_idle_ms: i64,
    /// Milliseconds queued before execution.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub time_staged_ms: i64,
    /// Milliseconds of execution.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub time_cpu_ms: i64,
    /// Where the results were saved (submitted tasks; not a v1 key).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub result_file: String,
}

impl TaskFile {
    /// A NEW task from `from` to `to`, recorded now.
    fn new(task_id: String, task_description: String, from: Addr, to: Addr) -> TaskFile {
        TaskFile {
            task_id,
            task_description,
            created_at: format_rfc3339(now_secs()),
            created_ns: Some(now_nanos()),
            status: TaskStatus::New,
            status_justification: "A new task was created".into(),
            from: from.to_string(),
            to: to.to_string(),
            accepted_at: String::new(),
            staged_at: String::new(),
            execute_started_at: String::new(),
            completed_at: String::new(),
            time_idle_ms: 0,
            time_staged_ms: 0,
            time_cpu_ms: 0,
            result_file: String::new(),
        }
    }
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// Which side of a task this node is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    /// Submitted to this node by a peer.
    Received,
    /// Submitted by this node to a peer.
    Submitted,
}

impl TaskKind {
    fn dir(self) -> &'static str {
        match self {
            TaskKind::Received => "received",
            TaskKind::Submitted => "submitted",
        }
    }
}

// ---------------------------------------------------------------------------------------
// Validation

/// Whether `s` is a task ID in v1's form: 16 bytes as `8-4-4-4-12` lowercase hex.
pub fn valid_task_id(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, &c)| match i {
            8 | 13 | 18 | 23 => c == b'-',
            _ => c.is_ascii_digit() || (b'a'..=b'f').contains(&c),
        })
}

/// A fresh random task ID.
pub fn new_task_id() -> String {
    use rand_core::RngCore;
    let mut b = [0u8; 16];
    rand_core::OsRng.fill_bytes(&mut b);
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A peer-supplied file name made safe to join to a directory: its last path component
/// (either separator), without control characters, without leading dots or spaces, at most
/// [`MAX_FILENAME`] bytes (cut at a character boundary). `None` if nothing is left.
pub fn sanitize_filename(name: &str) -> Option<String> {
    let base = name.rsplit(['/', '\\']).next().unwrap_or_default();
    let cleaned: String = base.chars().filter(|c| !c.is_control()).collect();
    let trimmed = cleaned.trim_start_matches(['.', ' ']).trim_end();
    let mut out = String::new();
    for c in trimmed.chars() {
        if out.len() + c.len_utf8() > MAX_FILENAME {
            break;
        }
        out.push(c);
    }
    (!out.is_empty()).then_some(out)
}

fn extension(name: &str) -> Option<String> {
    let (stem, ext) = name.rsplit_once('.')?;
    (!stem.is_empty()).then(|| ext.to_ascii_lowercase())
}

fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

// ---------------------------------------------------------------------------------------
// Frames

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Fewer bytes than the header or the length announce.
    #[error("truncated frame")]
    Truncated,
    /// A type this service does not take.
    #[error("frame type {0} is not accepted")]
    UnknownType(u32),
    /// Longer than its type allows.
    #[error("frame of {len} bytes is larger than {max}")]
    TooLarge {
        /// Announced length.
        len: u32,
        /// The cap of its type.
        max: u32,
    },
    /// The body is not the JSON object of its type.
    #[error("malformed JSON: {0}")]
    Json(String),
    /// The task ID is not `8-4-4-4-12` lowercase hex.
    #[error("invalid task id")]
    BadTaskId,
    /// A field breaks a rule.
    #[error("{0}")]
    Invalid(&'static str),
}

/// The largest body a frame of type `kind` may have; `None` for types this service refuses.
pub fn max_body(kind: u32) -> Option<u32> {
    match kind {
        frame_type::SUBMIT | frame_type::STATUS_UPDATE => Some(MAX_SMALL_FRAME),
        frame_type::SEND_RESULTS => Some(MAX_FRAME),
        _ => None,
    }
}

/// A frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// The frame type.
    pub kind: u32,
    /// Body length.
    pub len: u32,
}

impl FrameHeader {
    /// Reads a header and checks the type and the length against [`max_body`].
    pub fn parse(b: [u8; FRAME_HEADER_LEN]) -> Result<FrameHeader, FrameError> {
        let kind = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        let len = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
        let max = max_body(kind).ok_or(FrameError::UnknownType(kind))?;
        if len > max {
            return Err(FrameError::TooLarge { len, max });
        }
        Ok(FrameHeader { kind, len })
    }
}

/// A whole frame: header and `body`.
pub fn encode_frame(kind: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + body.len());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn json_frame(kind: u32, v: &impl Serialize) -> Vec<u8> {
    encode_frame(kind, &serde_json::to_vec(v).unwrap_or_default())
}

/// SUBMIT body (v1 `SubmitRequest`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SubmitRequest {
    /// Chosen by the submitter.
    #[serde(default)]
    pub task_id: String,
    /// What to do.
    #[serde(default)]
    pub task_description: String,
    /// The submitter's address as it claims it (ignored by this receiver).
    #[serde(default)]
    pub from_addr: String,
    /// The receiver's address (ignored by this receiver).
    #[serde(default)]
    pub to_addr: String,
}

/// The reply to every request (v1 `SubmitResponse`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Reply {
    /// The task concerned.
    #[serde(default)]
    pub task_id: String,
    /// [`STATUS_OK`] or [`STATUS_REFUSED`].
    #[serde(default)]
    pub status: i64,
    /// Why.
    #[serde(default)]
    pub message: String,
}

/// STATUS_UPDATE body (v1 `TaskStatusUpdate`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StatusUpdate {
    /// The task.
    #[serde(default)]
    pub task_id: String,
    /// The new status (v1 name).
    #[serde(default)]
    pub status: String,
    /// Why.
    #[serde(default)]
    pub justification: String,
}

/// SEND_RESULTS body (v1 `TaskResultMessage`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ResultMessage {
    /// The task.
    #[serde(default)]
    pub task_id: String,
    /// `text` or `file`.
    #[serde(default)]
    pub result_type: String,
    /// Text results.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub result_text: String,
    /// Name of the result file.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub filename: String,
    /// The file, standard base64 (Go's `[]byte` in JSON).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub file_data: String,
    /// When the results were sent (RFC 3339).
    #[serde(default)]
    pub completed_at: String,
    /// Milliseconds from creation to accept, as the receiver measured.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub time_idle_ms: i64,
    /// Milliseconds queued, as the receiver measured.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub time_staged_ms: i64,
    /// Milliseconds of execution, as the receiver measured.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub time_cpu_ms: i64,
}

/// Results: text, or a named file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResultData {
    /// Text.
    Text(String),
    /// A file: its (sanitized) name and bytes.
    File {
        /// File name.
        name: String,
        /// Contents.
        data: Vec<u8>,
    },
}

/// A request from a peer, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// A task submission.
    Submit {
        /// Task ID.
        task_id: String,
        /// Description (non-empty, at most [`MAX_DESCRIPTION`] bytes).
        description: String,
    },
    /// A status change.
    StatusUpdate {
        /// Task ID.
        task_id: String,
        /// New status (never NEW).
        status: TaskStatus,
        /// Why (at most [`MAX_JUSTIFICATION`] bytes).
        justification: String,
    },
    /// Results.
    SendResults {
        /// Task ID.
        task_id: String,
        /// The results (at most [`MAX_RESULT_BYTES`]).
        result: ResultData,
        /// Reported completion time (Unix seconds), if it parsed.
        completed_at: Option<i64>,
        /// Reported idle, staged and execution milliseconds (never negative).
        times: [i64; 3],
    },
}

fn json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, FrameError> {
    serde_json::from_slice(body).map_err(|e| FrameError::Json(e.to_string()))
}

fn task_id(s: String) -> Result<String, FrameError> {
    if valid_task_id(&s) {
        Ok(s)
    } else {
        Err(FrameError::BadTaskId)
    }
}

/// Checks the body of a frame of type `kind` (whose length passed [`FrameHeader::parse`]).
pub fn parse_request(kind: u32, body: &[u8]) -> Result<Request, FrameError> {
    match kind {
        frame_type::SUBMIT => {
            let r: SubmitRequest = json(body)?;
            let task_id = task_id(r.task_id)?;
            if r.task_description.trim().is_empty() {
                return Err(FrameError::Invalid("empty task description"));
            }
            if r.task_description.len() > MAX_DESCRIPTION {
                return Err(FrameError::Invalid("task description too long"));
            }
            Ok(Request::Submit {
                task_id,
                description: r.task_description,
            })
        }
        frame_type::STATUS_UPDATE => {
            let r: StatusUpdate = json(body)?;
            let task_id = task_id(r.task_id)?;
            let status = match TaskStatus::parse(&r.status) {
                Some(TaskStatus::New) | None => return Err(FrameError::Invalid("invalid status")),
                Some(s) => s,
            };
            Ok(Request::StatusUpdate {
                task_id,
                status,
                justification: cut(&r.justification, MAX_JUSTIFICATION),
            })
        }
        frame_type::SEND_RESULTS => {
            let r: ResultMessage = json(body)?;
            let task_id = task_id(r.task_id)?;
            // v1: a file result without data is saved as text.
            let result = match r.result_type.as_str() {
                "file" if !r.file_data.is_empty() => {
                    if r.file_data.len() / 4 * 3 > MAX_RESULT_BYTES + 2 {
                        return Err(FrameError::Invalid("result too large"));
                    }
                    let data = b64::decode(&r.file_data)
                        .ok_or(FrameError::Invalid("file_data is not base64"))?;
                    if data.len() > MAX_RESULT_BYTES {
                        return Err(FrameError::Invalid("result too large"));
                    }
                    let name = sanitize_filename(&r.filename)
                        .ok_or(FrameError::Invalid("invalid file name"))?;
                    ResultData::File { name, data }
                }
                "file" | "text" => {
                    if r.result_text.len() > MAX_RESULT_BYTES {
                        return Err(FrameError::Invalid("result too large"));
                    }
                    ResultData::Text(r.result_text)
                }
                _ => return Err(FrameError::Invalid("result_type must be text or file")),
            };
            Ok(Request::SendResults {
                task_id,
                result,
                completed_at: parse_rfc3339(&r.completed_at).ok(),
                times: [
                    r.time_idle_ms.max(0),
                    r.time_staged_ms.max(0),
                    r.time_cpu_ms.max(0),
                ],
            })
        }
        other => Err(FrameError::UnknownType(other)),
    }
}

/// Parses one whole frame at the start of `buf`: header, length check, body checks. Returns
/// the request and the bytes consumed. The fuzz target's entry point.
pub fn parse_frame(buf: &[u8]) -> Result<(Request, usize), FrameError> {
    let head: [u8; FRAME_HEADER_LEN] = buf
        .get(..FRAME_HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or(FrameError::Truncated)?;
    let h = FrameHeader::parse(head)?;
    let end = FRAME_HEADER_LEN + h.len as usize;
    let body = buf
        .get(FRAME_HEADER_LEN..end)
        .ok_or(FrameError::Truncated)?;
    Ok((parse_request(h.kind, body)?, end))
}

/// The task ID of a body whose checks failed, to echo in the refusal (v1 echoes it); empty
/// when it cannot be had or is not a valid ID.
fn id_of(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Id {
        #[serde(default)]
        task_id: String,
    }
    serde_json::from_slice::<Id>(body)
        .ok()
        .map(|i| i.task_id)
        .filter(|i| valid_task_id(i))
        .unwrap_or_default()
}

/// Reads a header; `None` on a clean end of stream before its first byte.
async fn read_header<R: AsyncRead + Unpin>(
    r: &mut R,
) -> std::io::Result<Option<[u8; FRAME_HEADER_LEN]>> {
    let mut h = [0u8; FRAME_HEADER_LEN];
    let mut got = 0;
    while got < FRAME_HEADER_LEN {
        let n = r.read(&mut h[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
    }
    Ok(Some(h))
}

// ---------------------------------------------------------------------------------------
// Base64 (standard alphabet, as Go encodes `[]byte` in JSON)

mod b64 {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    /// Standard base64 with padding.
    pub fn encode(data: &[u8]) -> String {
        let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
        for chunk in data.chunks(3) {
            let b = [
                chunk.first().copied().unwrap_or(0),
                chunk.get(1).copied().unwrap_or(0),
                chunk.get(2).copied().unwrap_or(0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    fn value(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }

    /// Standard base64; padding optional, CR and LF skipped (as Go's decoder).
    pub fn decode(s: &str) -> Option<Vec<u8>> {
        let body = s.trim_end_matches(['\r', '\n']);
        let mut digits: Vec<u8> = Vec::with_capacity(body.len());
        let mut pad = 0;
        for &c in body.as_bytes() {
            match c {
                b'\r' | b'\n' => {}
                b'=' => pad += 1,
                _ if pad > 0 => return None,
                _ => digits.push(c),
            }
        }
        if pad > 2 || (pad > 0 && (digits.len() + pad) % 4 != 0) || digits.len() % 4 == 1 {
            return None;
        }
        let mut out = Vec::with_capacity(digits.len() / 4 * 3 + 2);
        for chunk in digits.chunks(4) {
            let mut n = 0u32;
            for (i, &c) in chunk.iter().enumerate() {
                n |= value(c)? << (18 - 6 * i);
            }
            let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
            let keep = chunk.len() - 1;
            // Non-canonical trailing bits are refused, as Go's strict decoding would.
            let spare = match keep {
                1 => n & 0xFFFF,
                2 => n & 0xFF,
                _ => 0,
            };
            if spare != 0 {
                return None;
            }
            out.extend_from_slice(&bytes[..keep]);
        }
        Some(out)
    }
}

// ---------------------------------------------------------------------------------------
// Public API types

/// Settings of the task service.
#[derive(Debug, Clone)]
pub struct TaskConfig {
    /// The daemon's state directory; tasks live in `<home>/tasks`.
    pub home: PathBuf,
    /// Accept submissions: `Some` sets (and persists) it at start; `None` keeps the persisted
    /// setting, or off when there is none.
    pub enabled: Option<bool>,
    /// Check `polo(submitter) ≥ polo(receiver)` at the registry before accepting.
    pub polo_gate: bool,
    /// A received task left NEW this long is cancelled.
    pub new_timeout: Duration,
    /// A received task left ACCEPTED this long (from acceptance) expires.
    pub queue_timeout: Duration,
    /// A received task left EXECUTING this long expires.
    pub exec_timeout: Duration,
    /// How often the timeouts are checked.
    pub sweep_every: Duration,
    /// Dialing a peer, an exchange with it, and each frame read by the service.
    pub io_timeout: Duration,
}

impl TaskConfig {
    /// Defaults for a daemon whose state directory is `home`.
    pub fn new(home: &Path) -> TaskConfig {
        TaskConfig {
            home: home.to_path_buf(),
            enabled: None,
            polo_gate: true,
            new_timeout: Duration::from_secs(10 * 60),
            queue_timeout: Duration::from_secs(60 * 60),
            exec_timeout: Duration::from_secs(24 * 60 * 60),
            sweep_every: Duration::from_secs(10),
            io_timeout: Duration::from_secs(60),
        }
    }
}

/// Why a task operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TaskError {
    /// A bad argument from the caller.
    #[error("{0}")]
    InvalidArgument(String),
    /// No such task.
    #[error("task not found: {0}")]
    NotFound(String),
    /// The task is not in a status that allows this.
    #[error("task {id} is {status}")]
    InvalidState {
        /// The task.
        id: String,
        /// Its status.
        status: TaskStatus,
    },
    /// The task ran out of time before this.
    #[error("task {0} has expired")]
    Expired(String),
    /// Too many tasks.
    #[error("{0}")]
    Full(String),
    /// This node has no address yet.
    #[error("this node is not registered yet")]
    NotRegistered,
    /// The peer could not be reached, or the exchange broke.
    #[error("cannot reach {peer}: {reason}")]
    Connection {
        /// The peer.
        peer: String,
        /// Why.
        reason: String,
    },
    /// The peer did not answer in time.
    #[error("{0} did not answer in time")]
    Timeout(String),
    /// The peer refused.
    #[error("{peer} refused: {message}")]
    Refused {
        /// The peer.
        peer: String,
        /// Its message.
        message: String,
    },
    /// A task file could not be read or written.
    #[error("{path}: {reason}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The service is gone.
    #[error("the task service has stopped")]
    Stopped,
}

impl TaskError {
    /// The pilotctl error code (v1 wire §7.4).
    pub fn code(&self) -> &'static str {
        match self {
            TaskError::InvalidArgument(_) => "invalid_argument",
            TaskError::NotFound(_) => "not_found",
            TaskError::InvalidState { .. } => "invalid_state",
            TaskError::Expired(_) => "expired",
            TaskError::Full(_) | TaskError::NotRegistered | TaskError::Stopped => "unavailable",
            TaskError::Connection { .. } | TaskError::Refused { .. } => "connection_failed",
            TaskError::Timeout(_) => "timeout",
            TaskError::Io { .. } => "internal",
        }
    }
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> TaskError {
    TaskError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// The outcome of [`TaskHandle::submit`] (pilotctl `task submit` data keys).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubmitOutcome {
    /// The receiver's address.
    pub target: String,
    /// The new task's ID.
    pub task_id: String,
    /// The description.
    pub task: String,
    /// The receiver's status code (200 or 400).
    pub status: i64,
    /// The receiver's message.
    pub message: String,
    /// Whether the receiver took it.
    pub accepted: bool,
}

/// The outcome of accept, decline and cancel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusOutcome {
    /// The task.
    pub task_id: String,
    /// Its new status.
    pub status: TaskStatus,
    /// What happened.
    pub message: String,
    /// The justification given, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub justification: Option<String>,
    /// Whether the other side was told (it confirmed, or it is a v1 node that never
    /// confirms).
    pub notified: bool,
}

/// The outcome of [`TaskHandle::execute`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecuteOutcome {
    /// The task.
    pub task_id: String,
    /// What to do.
    pub task_description: String,
    /// EXECUTING.
    pub status: TaskStatus,
    /// The submitter.
    pub from: String,
    /// Whether the submitter was told.
    pub notified: bool,
}

/// Results to send with [`TaskHandle::send_results`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResultInput {
    /// Text.
    Text(String),
    /// A file: its name (only the base name is sent) and bytes.
    File {
        /// File name; its extension must be in [`ALLOWED_RESULT_EXTENSIONS`].
        name: String,
        /// Contents.
        data: Vec<u8>,
    },
}

/// The outcome of [`TaskHandle::send_results`] (pilotctl `task send-results` data keys).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultsOutcome {
    /// The task.
    pub task_id: String,
    /// SUCCEEDED.
    pub status: TaskStatus,
    /// The submitter.
    pub sent_to: String,
    /// `text` or `file`.
    pub sent_type: String,
    /// The file name sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
    /// The file size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file_size: Option<usize>,
    /// Whether the submitter confirmed (a v1 submitter never does).
    pub confirmed: bool,
}

/// One line of [`TaskHandle::list`] (pilotctl `task list` keys, plus a few).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSummary {
    /// The task.
    pub task_id: String,
    /// What to do.
    pub description: String,
    /// Its status.
    pub status: TaskStatus,
    /// Why it has that status.
    pub status_justification: String,
    /// The submitter.
    pub from: String,
    /// The receiver.
    pub to: String,
    /// When it was recorded.
    pub created_at: String,
    /// `received` or `submitted`.
    pub category: TaskKind,
    /// Where its results were saved (submitted tasks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result_file: Option<String>,
}

/// One line of [`TaskHandle::queue`] (pilotctl `task queue` keys).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueEntry {
    /// The task.
    pub task_id: String,
    /// What to do.
    pub description: String,
    /// Its status (NEW or ACCEPTED).
    pub status: TaskStatus,
    /// The submitter.
    pub from: String,
    /// When it arrived.
    pub created_at: String,
}

/// Counters of refused input.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStats {
    /// Frames refused from their header (type or length).
    pub bad_headers: u64,
    /// Frames whose body failed its checks.
    pub bad_bodies: u64,
    /// Submissions refused.
    pub submits_refused: u64,
    /// Status updates and results refused.
    pub updates_refused: u64,
    /// Connections closed at once because too many were open, or read errors.
    pub conns_dropped: u64,
}

// ---------------------------------------------------------------------------------------
// Store

#[derive(Debug)]
struct Entry {
    file: TaskFile,
    /// Arrival order.
    seq: u64,
    /// The other side, parsed from `from` (received) or `to` (submitted).
    peer: Option<Addr>,
}

#[derive(Debug)]
struct Store {
    dir: PathBuf,
    received: HashMap<String, Entry>,
    submitted: HashMap<String, Entry>,
    next_seq: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Settings {
    #[serde(default)]
    accept_tasks: bool,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn now_secs() -> i64 {
    now_ms() / 1000
}

/// Nanoseconds since the Unix epoch (0 before it).
fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Milliseconds from an RFC 3339 time to now; 0 if it does not parse.
fn ms_since(t: &str, now_ms: i64) -> i64 {
    parse_rfc3339(t)
        .map(|s| now_ms.saturating_sub(s.saturating_mul(1000)).max(0))
        .unwrap_or(0)
}

impl Store {
    fn open(dir: PathBuf) -> Result<Store, TaskError> {
        for sub in ["received", "submitted", "results"] {
            let d = dir.join(sub);
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&d)
                .map_err(|e| io_err(&d, e))?;
        }
        let mut st = Store {
            dir,
            received: HashMap::new(),
            submitted: HashMap::new(),
            next_seq: 0,
        };
        for kind in [TaskKind::Received, TaskKind::Submitted] {
            let mut files = st.load_dir(kind)?;
            files.sort_by(|a, b| {
                let t = |f: &TaskFile| parse_rfc3339(&f.created_at).unwrap_or(0);
                t(a).cmp(&t(b))
                    .then_with(|| a.created_ns.cmp(&b.created_ns))
                    .then_with(|| a.task_id.cmp(&b.task_id))
            });
            for f in files {
                st.put(kind, f);
            }
        }
        Ok(st)
    }

    fn load_dir(&self, kind: TaskKind) -> Result<Vec<TaskFile>, TaskError> {
        let dir = self.dir.join(kind.dir());
        let mut out = Vec::new();
        for ent in std::fs::read_dir(&dir).map_err(|e| io_err(&dir, e))? {
            let Ok(ent) = ent else { continue };
            let name = ent.file_name().to_string_lossy().into_owned();
            let path = ent.path();
            if name.starts_with('.') && name.ends_with(".tmp") {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let Some(id) = name.strip_suffix(".json").filter(|i| valid_task_id(i)) else {
                continue;
            };
            match std::fs::symlink_metadata(&path) {
                Ok(m) if m.is_file() && m.len() <= MAX_TASK_FILE => {}
                _ => {
                    tracing::warn!(path = %path.display(), "task file skipped: not a regular file of sane size");
                    continue;
                }
            }
            let parsed = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<TaskFile>(&b).map_err(|e| e.to_string()));
            match parsed {
                Ok(f) if f.task_id == id => out.push(f),
                Ok(_) => {
                    tracing::warn!(path = %path.display(), "task file skipped: task_id differs from its name")
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "task file skipped")
                }
            }
        }
        Ok(out)
    }

    fn book(&self, kind: TaskKind) -> &HashMap<String, Entry> {
        match kind {
            TaskKind::Received => &self.received,
            TaskKind::Submitted => &self.submitted,
        }
    }

    fn book_mut(&mut self, kind: TaskKind) -> &mut HashMap<String, Entry> {
        match kind {
            TaskKind::Received => &mut self.received,
            TaskKind::Submitted => &mut self.submitted,
        }
    }

    fn put(&mut self, kind: TaskKind, file: TaskFile) {
        let peer = match kind {
            TaskKind::Received => file.from.parse().ok(),
            TaskKind::Submitted => file.to.parse().ok(),
        };
        let seq = match self.book(kind).get(&file.task_id) {
            Some(e) => e.seq,
            None => {
                self.next_seq += 1;
                self.next_seq
            }
        };
        self.book_mut(kind)
            .insert(file.task_id.clone(), Entry { file, seq, peer });
    }

    fn path(&self, kind: TaskKind, id: &str) -> PathBuf {
        self.dir.join(kind.dir()).join(format!("{id}.json"))
    }

    /// Writes the record, then keeps it in memory.
    fn save(&mut self, kind: TaskKind, file: TaskFile) -> Result<(), TaskError> {
        let path = self.path(kind, &file.task_id);
        let mut bytes = serde_json::to_vec_pretty(&file).map_err(|e| io_err(&path, e))?;
        bytes.push(b'\n');
        write_atomic(&path, &bytes).map_err(|e| io_err(&path, e))?;
        self.put(kind, file);
        Ok(())
    }

    fn remove(&mut self, kind: TaskKind, id: &str) {
        let _ = std::fs::remove_file(self.path(kind, id));
        self.book_mut(kind).remove(id);
    }

    fn get(&self, kind: TaskKind, id: &str) -> Option<&Entry> {
        self.book(kind).get(id)
    }

    /// Makes room for one more record of `kind`, pruning the oldest finished one if full.
    fn make_room(&mut self, kind: TaskKind) -> Result<(), String> {
        if self.book(kind).len() < MAX_RECORDS {
            return Ok(());
        }
        let oldest = self
            .book(kind)
            .values()
            .filter(|e| e.file.status.is_final() || e.file.status == TaskStatus::Completed)
            .min_by_key(|e| e.seq)
            .map(|e| e.file.task_id.clone());
        match oldest {
            Some(id) => {
                self.remove(kind, &id);
                Ok(())
            }
            None => Err("task store is full".into()),
        }
    }

    /// Whether a new submission `id` from `from` may be recorded: `Ok(true)` if the same
    /// submission is already recorded (a retry), `Ok(false)` if it is new.
    fn admit(&mut self, id: &str, description: &str, from: Addr) -> Result<bool, String> {
        if let Some(e) = self.received.get(id) {
            return if e.peer == Some(from)
                && e.file.task_description == description
                && e.file.status == TaskStatus::New
            {
                Ok(true)
            } else {
                Err("task id already in use".into())
            };
        }
        let pending = self.received.values().filter(|e| !e.file.status.is_final());
        let (mut all, mut mine) = (0, 0);
        for e in pending {
            all += 1;
            if e.peer == Some(from) {
                mine += 1;
            }
        }
        if all >= MAX_PENDING {
            return Err("too many pending tasks on this node".into());
        }
        if mine >= MAX_PENDING_PER_PEER {
            return Err("too many pending tasks from your node".into());
        }
        self.make_room(TaskKind::Received)?;
        Ok(false)
    }

    fn settings_path(&self) -> PathBuf {
        self.dir.join("settings.json")
    }
}

// ---------------------------------------------------------------------------------------
// Service

#[derive(Debug, Default)]
struct Counters {
    bad_headers: AtomicU64,
    bad_bodies: AtomicU64,
    submits_refused: AtomicU64,
    updates_refused: AtomicU64,
    conns_dropped: AtomicU64,
}

#[derive(Debug)]
struct Inner {
    config: TaskConfig,
    engine: EngineHandle,
    link: mpsc::Sender<LinkCmd>,
    events: Events,
    store: Mutex<Store>,
    enabled: AtomicBool,
    polo: Mutex<HashMap<u32, (i64, Instant)>>,
    conns: Arc<Semaphore>,
    budget: Arc<Semaphore>,
    counters: Counters,
    log: LogGate,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the IPC server calls. Cheap to clone.
#[derive(Debug, Clone)]
pub struct TaskHandle {
    inner: Arc<Inner>,
}

/// The running service: its listener on [`TASK_PORT`] and its timer.
#[derive(Debug)]
pub struct TaskService {
    handle: TaskHandle,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl TaskService {
    /// Loads `<home>/tasks`, listens on [`TASK_PORT`] and starts the timeout sweep.
    pub async fn start(
        config: TaskConfig,
        engine: EngineHandle,
        link: mpsc::Sender<LinkCmd>,
        events: Events,
    ) -> Result<TaskService, TaskError> {
        let dir = config.home.join("tasks");
        let forced = config.enabled;
        let (store, enabled) = tokio::task::spawn_blocking(move || {
            let mut store = Store::open(dir)?;
            let path = store.settings_path();
            let enabled = match forced {
                Some(on) => {
                    save_settings(&mut store, on)?;
                    on
                }
                None => match std::fs::read(&path) {
                    Ok(b) => serde_json::from_slice::<Settings>(&b)
                        .map(|s| s.accept_tasks)
                        .unwrap_or(false),
                    Err(_) => false,
                },
            };
            Ok::<_, TaskError>((store, enabled))
        })
        .await
        .map_err(|_| TaskError::Stopped)??;
        let listener =
            LocalListener::bind(&engine, TASK_PORT)
                .await
                .map_err(|e| TaskError::Connection {
                    peer: format!("port {TASK_PORT}"),
                    reason: e.to_string(),
                })?;
        let inner = Arc::new(Inner {
            config,
            engine,
            link,
            events,
            store: Mutex::new(store),
            enabled: AtomicBool::new(enabled),
            polo: Mutex::new(HashMap::new()),
            conns: Arc::new(Semaphore::new(MAX_CONNS)),
            budget: Arc::new(Semaphore::new(BODY_BUDGET as usize)),
            counters: Counters::default(),
            log: LogGate::new(Duration::from_secs(1)),
        });
        let tasks = vec![
            tokio::spawn(serve(inner.clone(), listener)),
            tokio::spawn(sweeper(inner.clone())),
        ];
        tracing::info!(port = TASK_PORT, enabled, "task service listening");
        Ok(TaskService {
            handle: TaskHandle { inner },
            tasks,
        })
    }

    /// The handle for the IPC server.
    pub fn handle(&self) -> TaskHandle {
        self.handle.clone()
    }

    /// Stops serving and the sweep, and returns once [`TASK_PORT`] is free again. The handle
    /// keeps answering local calls from the files' last state.
    pub async fn stop(self) {
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks {
            let _ = t.await;
        }
        // The listener's drop unbinds the port from a spawned task; wait for it, so a service
        // started next on the same engine is not unbound by it.
        let engine = &self.handle.inner.engine;
        for _ in 0..200 {
            let (tx, _rx) = mpsc::channel(1);
            match engine.listen(TASK_PORT, tx).await {
                Ok(()) => {
                    let _ = engine
                        .send(Cmd::Unlisten {
                            port: TASK_PORT,
                            owner: None,
                        })
                        .await;
                    let _ = engine.info().await;
                    return;
                }
                Err(BindError::Taken(_)) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(_) => return,
            }
        }
    }
}

fn save_settings(store: &mut Store, on: bool) -> Result<(), TaskError> {
    let path = store.settings_path();
    let bytes =
        serde_json::to_vec_pretty(&Settings { accept_tasks: on }).map_err(|e| io_err(&path, e))?;
    write_atomic(&path, &bytes).map_err(|e| io_err(&path, e))
}

impl Inner {
    async fn with_store<R: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut Store) -> R + Send + 'static,
    ) -> Result<R, TaskError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || f(&mut lock(&me.store)))
            .await
            .map_err(|_| TaskError::Stopped)
    }

    fn me(&self) -> Result<Addr, TaskError> {
        match self.engine.node() {
            0 => Err(TaskError::NotRegistered),
            n => Ok(Addr::new(0, n)),
        }
    }

    fn refused(&self, what: &str, remote: PilotAddr, why: &str) {
        if let Some(suppressed) = self.log.allow() {
            tracing::info!(peer = %remote.addr, what, why, suppressed, "task request refused");
        }
    }

    fn emit_status(&self, file: &TaskFile, kind: TaskKind) {
        self.events.emit(
            "task.status",
            json!({
                "task_id": file.task_id,
                "status": file.status,
                "justification": file.status_justification,
                "category": kind,
                "from": file.from,
                "to": file.to,
            }),
        );
    }

    // -- Serving ------------------------------------------------------------------------

    async fn handle(self: &Arc<Self>, kind: u32, body: &[u8], remote: PilotAddr) -> Reply {
        let req = match parse_request(kind, body) {
            Ok(r) => r,
            Err(e) => {
                self.counters.bad_bodies.fetch_add(1, Ordering::Relaxed);
                self.refused("frame", remote, &e.to_string());
                return Reply {
                    task_id: id_of(body),
                    status: STATUS_REFUSED,
                    message: e.to_string(),
                };
            }
        };
        let r = match req {
            Request::Submit {
                task_id,
                description,
            } => {
                let r = self.on_submit(&task_id, description, remote).await;
                reply(task_id, r, "Task received with status NEW", || {
                    self.counters
                        .submits_refused
                        .fetch_add(1, Ordering::Relaxed);
                })
            }
            Request::StatusUpdate {
                task_id,
                status,
                justification,
            } => {
                let r = self
                    .on_status(task_id.clone(), status, justification, remote)
                    .await;
                reply(task_id, r, "Status updated", || {
                    self.counters
                        .updates_refused
                        .fetch_add(1, Ordering::Relaxed);
                })
            }
            Request::SendResults {
                task_id,
                result,
                completed_at,
                times,
            } => {
                let r = self
                    .on_results(task_id.clone(), result, completed_at, times, remote)
                    .await;
                reply(task_id, r, "Results received", || {
                    self.counters
                        .updates_refused
                        .fetch_add(1, Ordering::Relaxed);
                })
            }
        };
        if r.status != STATUS_OK {
            self.refused("request", remote, &r.message);
        }
        r
    }

    async fn on_submit(
        self: &Arc<Self>,
        id: &str,
        description: String,
        remote: PilotAddr,
    ) -> Result<(), String> {
        if !self.enabled.load(Ordering::Relaxed) {
            return Err("task execution is disabled on this node".into());
        }
        let me = self.me().map_err(|e| e.to_string())?;
        let from = remote.addr;
        let (i, d) = (id.to_owned(), description.clone());
        if self
            .with_store(move |st| st.admit(&i, &d, from))
            .await
            .map_err(|e| e.to_string())??
        {
            return Ok(());
        }
        if self.config.polo_gate {
            let submitter = self
                .polo(from.node)
                .await
                .map_err(|_| "Failed to verify polo score".to_owned())?;
            let receiver = self
                .polo(me.node)
                .await
                .map_err(|_| "Failed to verify polo score".to_owned())?;
            if submitter < receiver {
                return Err(format!(
                    "Polo score too low: submitter={submitter}, receiver={receiver}"
                ));
            }
        }
        let file = TaskFile::new(id.to_owned(), description, from, me);
        let saved = file.clone();
        let retry = self
            .with_store(move |st| {
                // Checked again: another connection may have taken the room meanwhile.
                if st.admit(&saved.task_id, &saved.task_description, from)? {
                    return Ok(true);
                }
                st.save(TaskKind::Received, saved)
                    .map(|()| false)
                    .map_err(|e| {
                        tracing::warn!(error = %e, "task not saved");
                        "task could not be stored".to_owned()
                    })
            })
            .await
            .map_err(|e| e.to_string())??;
        if !retry {
            tracing::info!(task = %file.task_id, peer = %from, "task received");
            self.events.emit(
                "task.received",
                json!({
                    "task_id": file.task_id,
                    "from": file.from,
                    "description": file.task_description,
                }),
            );
        }
        Ok(())
    }

    async fn on_status(
        self: &Arc<Self>,
        id: String,
        status: TaskStatus,
        justification: String,
        remote: PilotAddr,
    ) -> Result<(), String> {
        let peer = remote.addr;
        let changed = self
            .with_store(move |st| -> Result<Option<(TaskFile, TaskKind)>, String> {
                let now = now_ms();
                if let Some(e) = st
                    .get(TaskKind::Submitted, &id)
                    .filter(|e| e.peer == Some(peer))
                {
                    let mut f = e.file.clone();
                    if f.status == status {
                        return Ok(None);
                    }
                    if !f.status.receiver_may_report(status) {
                        return Err(format!("task is {}", f.status));
                    }
                    f.status = status;
                    f.status_justification = justification;
                    match status {
                        TaskStatus::Accepted | TaskStatus::Declined => {
                            f.accepted_at = format_rfc3339(now / 1000);
                            f.time_idle_ms = ms_since(&f.created_at, now);
                        }
                        TaskStatus::Executing => f.execute_started_at = format_rfc3339(now / 1000),
                        _ => {}
                    }
                    st.save(TaskKind::Submitted, f.clone())
                        .map_err(|_| "task could not be stored".to_owned())?;
                    return Ok(Some((f, TaskKind::Submitted)));
                }
                if let Some(e) = st
                    .get(TaskKind::Received, &id)
                    .filter(|e| e.peer == Some(peer))
                {
                    let mut f = e.file.clone();
                    if status != TaskStatus::Cancelled {
                        return Err("a submitter may only cancel".into());
                    }
                    if f.status == status {
                        return Ok(None);
                    }
                    if f.status.is_final() {
                        return Err(format!("task is {}", f.status));
                    }
                    f.status = status;
                    f.status_justification = justification;
                    st.save(TaskKind::Received, f.clone())
                        .map_err(|_| "task could not be stored".to_owned())?;
                    return Ok(Some((f, TaskKind::Received)));
                }
                Err("unknown task".into())
            })
            .await
            .map_err(|e| e.to_string())??;
        if let Some((f, kind)) = changed {
            tracing::info!(task = %f.task_id, status = %f.status, peer = %peer, "task status from peer");
            self.emit_status(&f, kind);
        }
        Ok(())
    }

    async fn on_results(
        self: &Arc<Self>,
        id: String,
        result: ResultData,
        completed_at: Option<i64>,
        times: [i64; 3],
        remote: PilotAddr,
    ) -> Result<(), String> {
        let peer = remote.addr;
        let (file, bytes, result_type) = self
            .with_store(
                move |st| -> Result<(TaskFile, usize, &'static str), String> {
                    let e = st
                        .get(TaskKind::Submitted, &id)
                        .filter(|e| e.peer == Some(peer))
                        .ok_or("unknown task")?;
                    let mut f = e.file.clone();
                    if !matches!(
                        f.status,
                        TaskStatus::New | TaskStatus::Accepted | TaskStatus::Executing
                    ) {
                        return Err(format!("task is {}", f.status));
                    }
                    let (name, data, result_type) = match &result {
                        ResultData::Text(t) => ("result.txt".to_owned(), t.as_bytes(), "text"),
                        ResultData::File { name, data } => (name.clone(), data.as_slice(), "file"),
                    };
                    let path = st.dir.join("results").join(format!("{id}_{name}"));
                    write_atomic(&path, data).map_err(|e| {
                        tracing::warn!(path = %path.display(), error = %e, "result not saved");
                        "results could not be stored".to_owned()
                    })?;
                    f.status = TaskStatus::Completed;
                    f.status_justification = "Task completed with results".into();
                    f.completed_at = format_rfc3339(completed_at.unwrap_or_else(now_secs));
                    [f.time_idle_ms, f.time_staged_ms, f.time_cpu_ms] = times;
                    f.result_file = path.display().to_string();
                    st.save(TaskKind::Submitted, f.clone())
                        .map_err(|_| "task could not be stored".to_owned())?;
                    Ok((f, data.len(), result_type))
                },
            )
            .await
            .map_err(|e| e.to_string())??;
        tracing::info!(task = %file.task_id, peer = %peer, bytes, "task results received");
        self.events.emit(
            "task.result",
            json!({
                "task_id": file.task_id,
                "from": file.to,
                "result_type": result_type,
                "path": file.result_file,
                "size": bytes,
            }),
        );
        self.emit_status(&file, TaskKind::Submitted);
        Ok(())
    }

    /// A node's polo score, from the cache or the registry.
    async fn polo(&self, node: u32) -> Result<i64, LinkError> {
        if let Some((score, at)) = lock(&self.polo).get(&node) {
            if at.elapsed() < POLO_CACHE_TTL {
                return Ok(*score);
            }
        }
        let (tx, rx) = oneshot::channel();
        let req = json!({"type": "get_polo_score", "node_id": node});
        let t = self.config.io_timeout;
        tokio::time::timeout(t, self.link.send(LinkCmd::Call(req, tx)))
            .await
            .map_err(|_| LinkError::Busy)?
            .map_err(|_| LinkError::Stopped)?;
        let v = tokio::time::timeout(t, rx)
            .await
            .map_err(|_| LinkError::Timeout)?
            .map_err(|_| LinkError::Stopped)??;
        let score = v
            .get("polo_score")
            .and_then(Value::as_i64)
            .ok_or_else(|| LinkError::BadReply("no polo_score".into()))?;
        let mut cache = lock(&self.polo);
        if cache.len() >= POLO_CACHE_MAX {
            cache.clear();
        }
        cache.insert(node, (score, Instant::now()));
        Ok(score)
    }

    // -- Talking to peers ---------------------------------------------------------------

    /// Sends `frames` to `dst`'s task port one at a time, reading each reply. Stops at the
    /// first refusal or end of stream (a v1 daemon answers only SUBMIT, then closes).
    async fn exchange(&self, dst: Addr, frames: &[Vec<u8>]) -> Result<Vec<Reply>, TaskError> {
        let peer = dst.to_string();
        let t = self.config.io_timeout;
        let conn_err = |e: String| TaskError::Connection {
            peer: peer.clone(),
            reason: e,
        };
        let mut s: LocalStream =
            tokio::time::timeout(t, local::dial(&self.engine, PilotAddr::new(dst, TASK_PORT)))
                .await
                .map_err(|_| TaskError::Timeout(peer.clone()))?
                .map_err(|e| conn_err(e.to_string()))?;
        let mut replies = Vec::new();
        for f in frames {
            let one = async {
                s.write_all(f).await.map_err(|e| e.to_string())?;
                s.flush().await.map_err(|e| e.to_string())?;
                read_reply(&mut s).await
            };
            match tokio::time::timeout(t, one).await {
                Err(_) => return Err(TaskError::Timeout(peer)),
                Ok(Err(e)) if replies.is_empty() => return Err(conn_err(e)),
                Ok(Err(_)) | Ok(Ok(None)) => break,
                Ok(Ok(Some(r))) => {
                    let refused = r.status != STATUS_OK;
                    replies.push(r);
                    if refused {
                        break;
                    }
                }
            }
        }
        Ok(replies)
    }

    /// Tells `peer` about a status change; whether it was delivered (confirmed, or taken
    /// without an answer as a v1 daemon does).
    async fn notify(&self, peer: Option<Addr>, id: &str, status: TaskStatus, why: &str) -> bool {
        let Some(peer) = peer else { return false };
        let frame = json_frame(
            frame_type::STATUS_UPDATE,
            &StatusUpdate {
                task_id: id.to_owned(),
                status: status.as_str().to_owned(),
                justification: why.to_owned(),
            },
        );
        match self.exchange(peer, &[frame]).await {
            Ok(r) => match r.first() {
                Some(r) if r.status != STATUS_OK => {
                    tracing::info!(task = id, peer = %peer, message = %r.message, "status update refused");
                    false
                }
                _ => true,
            },
            Err(e) => {
                tracing::info!(task = id, peer = %peer, error = %e, "status update not delivered");
                false
            }
        }
    }

    // -- Timers -------------------------------------------------------------------------

    /// Applies the timeouts; returns the received tasks whose submitter should be told.
    fn sweep(&self, st: &mut Store) -> Vec<(Option<Addr>, TaskFile)> {
        let now = now_ms();
        let c = &self.config;
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        let due = |f: &TaskFile, doubled: bool| -> Option<(TaskStatus, String)> {
            let k = if doubled { 2 } else { 1 };
            let (since, limit, next, why) = match f.status {
                TaskStatus::New => (
                    &f.created_at,
                    c.new_timeout,
                    TaskStatus::Cancelled,
                    "Task cancelled: not accepted in time",
                ),
                TaskStatus::Accepted => (
                    if f.staged_at.is_empty() {
                        &f.accepted_at
                    } else {
                        &f.staged_at
                    },
                    c.queue_timeout,
                    TaskStatus::Expired,
                    "Task expired: not executed in time",
                ),
                TaskStatus::Executing => (
                    &f.execute_started_at,
                    c.exec_timeout,
                    TaskStatus::Expired,
                    "Task expired: no results in time",
                ),
                _ => return None,
            };
            let since = if since.is_empty() {
                &f.created_at
            } else {
                since
            };
            (ms_since(since, now) > ms(limit).saturating_mul(k)).then(|| (next, why.to_owned()))
        };
        let mut out = Vec::new();
        for kind in [TaskKind::Received, TaskKind::Submitted] {
            let changes: Vec<(TaskFile, Option<Addr>)> = st
                .book(kind)
                .values()
                .filter_map(|e| {
                    let (status, why) = due(&e.file, kind == TaskKind::Submitted)?;
                    let mut f = e.file.clone();
                    f.status = status;
                    f.status_justification = why;
                    Some((f, e.peer))
                })
                .collect();
            for (f, peer) in changes {
                if let Err(e) = st.save(kind, f.clone()) {
                    tracing::warn!(error = %e, "task timeout not saved");
                    continue;
                }
                tracing::info!(task = %f.task_id, status = %f.status, "task timed out");
                self.emit_status(&f, kind);
                if kind == TaskKind::Received {
                    out.push((peer, f));
                }
            }
        }
        out
    }
}

fn reply(task_id: String, r: Result<(), String>, ok: &str, on_refusal: impl FnOnce()) -> Reply {
    match r {
        Ok(()) => Reply {
            task_id,
            status: STATUS_OK,
            message: ok.to_owned(),
        },
        Err(message) => {
            on_refusal();
            Reply {
                task_id,
                status: STATUS_REFUSED,
                message,
            }
        }
    }
}

/// Reads one reply frame; `None` at end of stream.
async fn read_reply(s: &mut LocalStream) -> Result<Option<Reply>, String> {
    let Some(h) = read_header(s).await.map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
    if len > MAX_REPLY {
        return Err(format!("reply of {len} bytes is too large"));
    }
    let mut body = vec![0u8; len as usize];
    s.read_exact(&mut body).await.map_err(|e| e.to_string())?;
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(|e| format!("malformed reply: {e}"))
}

async fn serve(inner: Arc<Inner>, mut listener: LocalListener) {
    while let Some((stream, remote)) = listener.accept().await {
        match inner.conns.clone().try_acquire_owned() {
            Ok(permit) => {
                tokio::spawn(serve_conn(inner.clone(), stream, remote, permit));
            }
            Err(_) => {
                inner.counters.conns_dropped.fetch_add(1, Ordering::Relaxed);
                inner.refused("connection", remote, "too many connections");
            }
        }
    }
}

async fn serve_conn(
    inner: Arc<Inner>,
    mut s: LocalStream,
    remote: PilotAddr,
    _permit: OwnedSemaphorePermit,
) {
    let t = inner.config.io_timeout;
    for _ in 0..MAX_FRAMES_PER_CONN {
        let head = match tokio::time::timeout(t, read_header(&mut s)).await {
            Ok(Ok(Some(h))) => h,
            Ok(Ok(None)) => return,
            Ok(Err(_)) | Err(_) => {
                inner.counters.conns_dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let h = match FrameHeader::parse(head) {
            Ok(h) => h,
            Err(e) => {
                // Refused before anything is allocated; the connection ends here.
                inner.counters.bad_headers.fetch_add(1, Ordering::Relaxed);
                inner.refused("frame", remote, &e.to_string());
                let kind = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
                let kind = if (1..=4).contains(&kind) {
                    kind
                } else {
                    frame_type::SUBMIT
                };
                let r = Reply {
                    task_id: String::new(),
                    status: STATUS_REFUSED,
                    message: e.to_string(),
                };
                let _ = tokio::time::timeout(t, s.write_all(&json_frame(kind, &r))).await;
                return;
            }
        };
        let Ok(Ok(budget)) =
            tokio::time::timeout(t, inner.budget.clone().acquire_many_owned(h.len)).await
        else {
            inner.counters.conns_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let mut body = vec![0u8; h.len as usize];
        if !matches!(
            tokio::time::timeout(t, s.read_exact(&mut body)).await,
            Ok(Ok(_))
        ) {
            inner.counters.conns_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let r = inner.handle(h.kind, &body, remote).await;
        drop(body);
        drop(budget);
        let out = json_frame(h.kind, &r);
        if !matches!(tokio::time::timeout(t, s.write_all(&out)).await, Ok(Ok(()))) {
            return;
        }
    }
}

async fn sweeper(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(inner.config.sweep_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let me = inner.clone();
        let Ok(notes) = inner.with_store(move |st| me.sweep(st)).await else {
            return;
        };
        for (peer, f) in notes {
            let me = inner.clone();
            tokio::spawn(async move {
                me.notify(peer, &f.task_id, f.status, &f.status_justification)
                    .await;
            });
        }
    }
}

// ---------------------------------------------------------------------------------------
// Local API (IPC)

impl TaskHandle {
    /// Whether this node accepts submissions.
    pub fn enabled(&self) -> bool {
        self.inner.enabled.load(Ordering::Relaxed)
    }

    /// Turns accepting submissions on or off, and persists it.
    pub async fn set_enabled(&self, on: bool) -> Result<(), TaskError> {
        self.inner
            .with_store(move |st| save_settings(st, on))
            .await??;
        self.inner.enabled.store(on, Ordering::Relaxed);
        tracing::info!(enabled = on, "task execution");
        Ok(())
    }

    /// Counters of refused input.
    pub fn stats(&self) -> TaskStats {
        let c = &self.inner.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        TaskStats {
            bad_headers: l(&c.bad_headers),
            bad_bodies: l(&c.bad_bodies),
            submits_refused: l(&c.submits_refused),
            updates_refused: l(&c.updates_refused),
            conns_dropped: l(&c.conns_dropped),
        }
    }

    /// Where task state lives (`<home>/tasks`).
    pub fn dir(&self) -> PathBuf {
        lock(&self.inner.store).dir.clone()
    }

    /// Submits `description` to `target`'s task port. A refusal by the receiver is not an
    /// error: the outcome carries its status 400 and message.
    pub async fn submit(
        &self,
        target: Addr,
        description: &str,
    ) -> Result<SubmitOutcome, TaskError> {
        if description.trim().is_empty() {
            return Err(TaskError::InvalidArgument("empty task description".into()));
        }
        if description.len() > MAX_DESCRIPTION {
            return Err(TaskError::InvalidArgument(format!(
                "task description longer than {MAX_DESCRIPTION} bytes"
            )));
        }
        let me = self.inner.me()?;
        let id = new_task_id();
        let file = TaskFile::new(id.clone(), description.to_owned(), me, target);
        // Recorded first, so a status update that races the reply finds it.
        let saved = file.clone();
        self.inner
            .with_store(move |st| {
                st.make_room(TaskKind::Submitted).map_err(TaskError::Full)?;
                st.save(TaskKind::Submitted, saved)
            })
            .await??;
        let frame = json_frame(
            frame_type::SUBMIT,
            &SubmitRequest {
                task_id: id.clone(),
                task_description: description.to_owned(),
                from_addr: me.to_string(),
                to_addr: target.to_string(),
            },
        );
        let reply = match self.inner.exchange(target, &[frame]).await {
            Ok(mut replies) if !replies.is_empty() => replies.swap_remove(0),
            Ok(_) => {
                self.forget(&id).await;
                return Err(TaskError::Connection {
                    peer: target.to_string(),
                    reason: "closed without a reply".into(),
                });
            }
            Err(e) => {
                self.forget(&id).await;
                return Err(e);
            }
        };
        // A reply about another task ID is not an acceptance of this one.
        let accepted = reply.status == STATUS_OK && reply.task_id == id;
        if accepted {
            tracing::info!(task = %id, peer = %target, "task submitted");
            self.inner.events.emit(
                "task.submitted",
                json!({"task_id": id, "to": target.to_string(), "description": description}),
            );
        } else {
            self.forget(&id).await;
        }
        Ok(SubmitOutcome {
            target: target.to_string(),
            task_id: id,
            task: description.to_owned(),
            status: if accepted { STATUS_OK } else { STATUS_REFUSED },
            message: reply.message,
            accepted,
        })
    }

    /// Drops the record of a submission its receiver did not take.
    async fn forget(&self, id: &str) {
        let i = id.to_owned();
        let _ = self
            .inner
            .with_store(move |st| st.remove(TaskKind::Submitted, &i))
            .await;
    }

    /// Tasks of one kind, or both, in arrival order.
    pub fn list(&self, kind: Option<TaskKind>) -> Vec<TaskSummary> {
        let st = lock(&self.inner.store);
        let mut out: Vec<(u64, TaskKind, TaskSummary)> = Vec::new();
        for k in [TaskKind::Received, TaskKind::Submitted] {
            if kind.is_some_and(|want| want != k) {
                continue;
            }
            for e in st.book(k).values() {
                let f = &e.file;
                out.push((
                    e.seq,
                    k,
                    TaskSummary {
                        task_id: f.task_id.clone(),
                        description: f.task_description.clone(),
                        status: f.status,
                        status_justification: f.status_justification.clone(),
                        from: f.from.clone(),
                        to: f.to.clone(),
                        created_at: f.created_at.clone(),
                        category: k,
                        result_file: (!f.result_file.is_empty()).then(|| f.result_file.clone()),
                    },
                ));
            }
        }
        out.sort_by_key(|(seq, k, _)| (*k == TaskKind::Submitted, *seq));
        out.into_iter().map(|(_, _, s)| s).collect()
    }

    /// One task's whole record.
    pub fn get(&self, kind: TaskKind, id: &str) -> Option<TaskFile> {
        lock(&self.inner.store)
            .get(kind, id)
            .map(|e| e.file.clone())
    }

    /// Received tasks waiting for a decision or for execution (NEW and ACCEPTED), in
    /// arrival order.
    pub fn queue(&self) -> Vec<QueueEntry> {
        let st = lock(&self.inner.store);
        let mut q: Vec<&Entry> = st
            .received
            .values()
            .filter(|e| matches!(e.file.status, TaskStatus::New | TaskStatus::Accepted))
            .collect();
        q.sort_by_key(|e| e.seq);
        q.into_iter()
            .map(|e| QueueEntry {
                task_id: e.file.task_id.clone(),
                description: e.file.task_description.clone(),
                status: e.file.status,
                from: e.file.from.clone(),
                created_at: e.file.created_at.clone(),
            })
            .collect()
    }

    /// Changes a task of ours locally under `check`, then tells the other side.
    async fn transition(
        &self,
        kind: TaskKind,
        id: &str,
        check: impl FnOnce(&mut TaskFile, i64) -> Result<(), TaskError> + Send + 'static,
    ) -> Result<(TaskFile, Option<Addr>), TaskError> {
        if !valid_task_id(id) {
            return Err(TaskError::NotFound(id.to_owned()));
        }
        let i = id.to_owned();
        let (f, peer) = self
            .inner
            .with_store(move |st| {
                let e = st
                    .get(kind, &i)
                    .ok_or_else(|| TaskError::NotFound(i.clone()))?;
                let (mut f, peer) = (e.file.clone(), e.peer);
                check(&mut f, now_ms())?;
                st.save(kind, f.clone())?;
                Ok::<_, TaskError>((f, peer))
            })
            .await??;
        self.inner.emit_status(&f, kind);
        Ok((f, peer))
    }

    /// Accepts a received NEW task; it joins the execution queue. The submitter is told.
    pub async fn accept(&self, id: &str) -> Result<StatusOutcome, TaskError> {
        let timeout = self.inner.config.new_timeout;
        let (f, peer) = self
            .transition(TaskKind::Received, id, move |f, now| {
                if f.status != TaskStatus::New {
                    return Err(TaskError::InvalidState {
                        id: f.task_id.clone(),
                        status: f.status,
                    });
                }
                let idle = ms_since(&f.created_at, now);
                if idle > i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX) {
                    return Err(TaskError::Expired(f.task_id.clone()));
                }
                f.status = TaskStatus::Accepted;
                f.status_justification = "Task accepted".into();
                f.accepted_at = format_rfc3339(now / 1000);
                f.staged_at = f.accepted_at.clone();
                f.time_idle_ms = idle;
                Ok(())
            })
            .await?;
        let notified = self
            .inner
            .notify(peer, &f.task_id, f.status, &f.status_justification)
            .await;
        Ok(StatusOutcome {
            task_id: f.task_id,
            status: f.status,
            message: "Task accepted".into(),
            justification: None,
            notified,
        })
    }

    /// Declines a received NEW task with a justification. The submitter is told.
    pub async fn decline(&self, id: &str, justification: &str) -> Result<StatusOutcome, TaskError> {
        if justification.trim().is_empty() {
            return Err(TaskError::InvalidArgument(
                "a justification is required".into(),
            ));
        }
        if justification.len() > MAX_JUSTIFICATION {
            return Err(TaskError::InvalidArgument(format!(
                "justification longer than {MAX_JUSTIFICATION} bytes"
            )));
        }
        let why = justification.to_owned();
        let (f, peer) = self
            .transition(TaskKind::Received, id, move |f, now| {
                if f.status != TaskStatus::New {
                    return Err(TaskError::InvalidState {
                        id: f.task_id.clone(),
                        status: f.status,
                    });
                }
                f.status = TaskStatus::Declined;
                f.status_justification = why;
                f.accepted_at = format_rfc3339(now / 1000);
                f.time_idle_ms = ms_since(&f.created_at, now);
                Ok(())
            })
            .await?;
        let notified = self
            .inner
            .notify(peer, &f.task_id, f.status, &f.status_justification)
            .await;
        Ok(StatusOutcome {
            task_id: f.task_id,
            status: f.status,
            message: "Task declined".into(),
            justification: Some(f.status_justification),
            notified,
        })
    }

    /// Withdraws a task this node submitted (not yet finished). The receiver is told.
    pub async fn cancel(&self, id: &str) -> Result<StatusOutcome, TaskError> {
        let (f, peer) = self
            .transition(TaskKind::Submitted, id, |f, _| {
                if f.status.is_final() || f.status == TaskStatus::Completed {
                    return Err(TaskError::InvalidState {
                        id: f.task_id.clone(),
                        status: f.status,
                    });
                }
                f.status = TaskStatus::Cancelled;
                f.status_justification = "Task cancelled by the submitter".into();
                Ok(())
            })
            .await?;
        let notified = self
            .inner
            .notify(peer, &f.task_id, f.status, &f.status_justification)
            .await;
        Ok(StatusOutcome {
            task_id: f.task_id,
            status: f.status,
            message: "Task cancelled".into(),
            justification: None,
            notified,
        })
    }

    /// Takes the first accepted task in arrival order and marks it EXECUTING. The submitter
    /// is told.
    pub async fn execute(&self) -> Result<ExecuteOutcome, TaskError> {
        let (f, peer) = self
            .inner
            .with_store(|st| {
                let e = st
                    .received
                    .values()
                    .filter(|e| e.file.status == TaskStatus::Accepted)
                    .min_by_key(|e| e.seq)
                    .ok_or_else(|| TaskError::NotFound("no accepted tasks to execute".into()))?;
                let (mut f, peer) = (e.file.clone(), e.peer);
                let now = now_ms();
                f.status = TaskStatus::Executing;
                f.status_justification = "Task execution started".into();
                f.execute_started_at = format_rfc3339(now / 1000);
                let staged = if f.staged_at.is_empty() {
                    &f.accepted_at
                } else {
                    &f.staged_at
                };
                f.time_staged_ms = ms_since(staged, now);
                st.save(TaskKind::Received, f.clone())?;
                Ok::<_, TaskError>((f, peer))
            })
            .await??;
        self.inner.emit_status(&f, TaskKind::Received);
        let notified = self
            .inner
            .notify(peer, &f.task_id, f.status, &f.status_justification)
            .await;
        Ok(ExecuteOutcome {
            task_id: f.task_id,
            task_description: f.task_description,
            status: f.status,
            from: f.from,
            notified,
        })
    }

    /// Sends results of a received ACCEPTED or EXECUTING task to its submitter, then a
    /// SUCCEEDED status update on the same connection (as v1 pilotctl); the task becomes
    /// SUCCEEDED here once the submitter took them.
    pub async fn send_results(
        &self,
        id: &str,
        result: ResultInput,
    ) -> Result<ResultsOutcome, TaskError> {
        let (sent_type, filename, file_size) = match &result {
            ResultInput::Text(t) => {
                if t.len() > MAX_RESULT_BYTES {
                    return Err(TaskError::InvalidArgument(format!(
                        "results larger than {MAX_RESULT_BYTES} bytes"
                    )));
                }
                ("text", None, None)
            }
            ResultInput::File { name, data } => {
                let name = check_result_name(name)?;
                if data.len() > MAX_RESULT_BYTES {
                    return Err(TaskError::InvalidArgument(format!(
                        "result file larger than {MAX_RESULT_BYTES} bytes"
                    )));
                }
                ("file", Some(name), Some(data.len()))
            }
        };
        if !valid_task_id(id) {
            return Err(TaskError::NotFound(id.to_owned()));
        }
        let i = id.to_owned();
        let (f, peer) = self
            .inner
            .with_store(move |st| {
                let e = st
                    .get(TaskKind::Received, &i)
                    .ok_or_else(|| TaskError::NotFound(i.clone()))?;
                if !matches!(e.file.status, TaskStatus::Accepted | TaskStatus::Executing) {
                    return Err(TaskError::InvalidState {
                        id: i,
                        status: e.file.status,
                    });
                }
                Ok((e.file.clone(), e.peer))
            })
            .await??;
        let peer = peer.ok_or_else(|| TaskError::Connection {
            peer: f.from.clone(),
            reason: "the submitter's address does not parse".into(),
        })?;
        let now = now_ms();
        let cpu = if f.execute_started_at.is_empty() {
            0
        } else {
            ms_since(&f.execute_started_at, now)
        };
        let mut msg = ResultMessage {
            task_id: f.task_id.clone(),
            completed_at: format_rfc3339(now / 1000),
            time_idle_ms: f.time_idle_ms,
            time_staged_ms: f.time_staged_ms,
            time_cpu_ms: cpu,
            ..ResultMessage::default()
        };
        match result {
            ResultInput::Text(t) => {
                msg.result_type = "text".into();
                msg.result_text = t;
            }
            ResultInput::File { data, .. } => {
                msg.result_type = "file".into();
                msg.filename = filename.clone().unwrap_or_default();
                msg.file_data = b64::encode(&data);
            }
        }
        let frames = [
            json_frame(frame_type::SEND_RESULTS, &msg),
            json_frame(
                frame_type::STATUS_UPDATE,
                &StatusUpdate {
                    task_id: f.task_id.clone(),
                    status: TaskStatus::Succeeded.as_str().into(),
                    justification: "Results sent successfully".into(),
                },
            ),
        ];
        drop(msg);
        let replies = self.inner.exchange(peer, &frames).await?;
        if let Some(r) = replies.first().filter(|r| r.status != STATUS_OK) {
            return Err(TaskError::Refused {
                peer: peer.to_string(),
                message: r.message.clone(),
            });
        }
        let confirmed = !replies.is_empty();
        let (f, _) = self
            .transition(TaskKind::Received, id, move |f, _| {
                if f.status.is_final() {
                    return Err(TaskError::InvalidState {
                        id: f.task_id.clone(),
                        status: f.status,
                    });
                }
                f.status = TaskStatus::Succeeded;
                f.status_justification = "Results sent successfully".into();
                f.completed_at = format_rfc3339(now / 1000);
                f.time_cpu_ms = cpu;
                Ok(())
            })
            .await?;
        Ok(ResultsOutcome {
            task_id: f.task_id,
            status: f.status,
            sent_to: peer.to_string(),
            sent_type: sent_type.into(),
            filename,
            file_size,
            confirmed,
        })
    }
}

/// The base name of a result file, if its extension is one v1 allows for results.
fn check_result_name(name: &str) -> Result<String, TaskError> {
    let clean = sanitize_filename(name)
        .ok_or_else(|| TaskError::InvalidArgument(format!("invalid file name {name:?}")))?;
    match extension(&clean) {
        Some(ext) if ALLOWED_RESULT_EXTENSIONS.contains(&ext.as_str()) => Ok(clean),
        Some(ext) => Err(TaskError::InvalidArgument(format!(
            "file type .{ext} not allowed for results"
        ))),
        None => Err(TaskError::InvalidArgument(
            "result files need an extension".into(),
        )),
    }
}

/// Reads a result file for [`TaskHandle::send_results`] (pilotctl runs on the daemon's host
/// and may pass a path): checks the extension and the size before reading.
pub fn read_result_file(path: &Path) -> Result<ResultInput, TaskError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = check_result_name(&name)?;
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => TaskError::NotFound(path.display().to_string()),
        _ => io_err(path, e),
    })?;
    if !meta.is_file() || meta.len() > MAX_RESULT_BYTES as u64 {
        return Err(TaskError::InvalidArgument(format!(
            "{} is not a regular file of at most {MAX_RESULT_BYTES} bytes",
            path.display()
        )));
    }
    let mut data = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| {
            std::io::Read::read_to_end(
                &mut std::io::Read::take(f, MAX_RESULT_BYTES as u64 + 1),
                &mut data,
            )
        })
        .map_err(|e| io_err(path, e))?;
    if data.len() > MAX_RESULT_BYTES {
        return Err(TaskError::InvalidArgument("result file too large".into()));
    }
    Ok(ResultInput::File { name, data })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn task_ids_are_exactly_v1_form() {
        let id = new_task_id();
        assert!(valid_task_id(&id), "{id}");
        assert!(valid_task_id("0123abcd-ef01-2345-6789-abcdef012345"));
        for bad in [
            "",
            "../../x",
            "0123ABCD-ef01-2345-6789-abcdef012345",
            "0123abcd-ef01-2345-6789-abcdef01234",
            "0123abcd-ef01-2345-6789-abcdef0123456",
            "0123abcdef01-2345-6789-abcdef012345-",
            "0123abcd/ef01-2345-6789-abcdef012345",
            "0123abcd-ef01-2345-6789-abcdef01234\u{e9}",
        ] {
            assert!(!valid_task_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn file_names_are_reduced_to_safe_base_names() {
        assert_eq!(
            sanitize_filename("report.pdf").as_deref(),
            Some("report.pdf")
        );
        assert_eq!(
            sanitize_filename("../../etc/passwd").as_deref(),
            Some("passwd")
        );
        assert_eq!(sanitize_filename("..\\..\\x.txt").as_deref(), Some("x.txt"));
        assert_eq!(sanitize_filename(".bashrc").as_deref(), Some("bashrc"));
        assert_eq!(
            sanitize_filename("a\nb\u{7}.csv").as_deref(),
            Some("ab.csv")
        );
        assert_eq!(sanitize_filename(".."), None);
        assert_eq!(sanitize_filename("dir/"), None);
        assert_eq!(sanitize_filename(""), None);
        let long = format!("{}.txt", "\u{e9}".repeat(200));
        let s = sanitize_filename(&long).unwrap();
        assert!(s.len() <= MAX_FILENAME && !s.contains('/'));
    }

    #[test]
    fn headers_are_refused_before_the_body_is_read() {
        let h = |k: u32, l: u32| {
            let mut b = [0u8; 8];
            b[..4].copy_from_slice(&k.to_be_bytes());
            b[4..].copy_from_slice(&l.to_be_bytes());
            FrameHeader::parse(b)
        };
        assert_eq!(h(4, MAX_FRAME).unwrap().len, MAX_FRAME);
        assert!(matches!(
            h(4, MAX_FRAME + 1),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(matches!(
            h(1, MAX_SMALL_FRAME + 1),
            Err(FrameError::TooLarge { .. })
        ));
        assert_eq!(h(2, 10), Err(FrameError::UnknownType(2)));
        assert_eq!(h(0, 0), Err(FrameError::UnknownType(0)));
    }

    #[test]
    fn frames_parse_and_check_their_fields() {
        let id = "0123abcd-ef01-2345-6789-abcdef012345";
        let f = encode_frame(
            1,
            format!(r#"{{"task_id":"{id}","task_description":"sum","from_addr":"x"}}"#).as_bytes(),
        );
        let (r, n) = parse_frame(&f).unwrap();
        assert_eq!(n, f.len());
        assert_eq!(
            r,
            Request::Submit {
                task_id: id.into(),
                description: "sum".into()
            }
        );
        assert_eq!(parse_frame(&f[..f.len() - 1]), Err(FrameError::Truncated));
        let bad = encode_frame(1, br#"{"task_id":"../../x","task_description":"d"}"#);
        assert_eq!(parse_frame(&bad), Err(FrameError::BadTaskId));
        let new = encode_frame(
            3,
            format!(r#"{{"task_id":"{id}","status":"NEW"}}"#).as_bytes(),
        );
        assert!(matches!(parse_frame(&new), Err(FrameError::Invalid(_))));
        let file = encode_frame(
            4,
            format!(
                r#"{{"task_id":"{id}","result_type":"file","filename":"../a.txt","file_data":"aGVsbG8=","time_cpu_ms":-5}}"#
            )
            .as_bytes(),
        );
        match parse_frame(&file).unwrap().0 {
            Request::SendResults { result, times, .. } => {
                assert_eq!(
                    result,
                    ResultData::File {
                        name: "a.txt".into(),
                        data: b"hello".to_vec()
                    }
                );
                assert_eq!(times, [0, 0, 0]);
            }
            other => panic!("{other:?}"),
        }
        assert!(parse_frame(&encode_frame(4, b"[1,2]")).is_err());
        assert!(parse_frame(&encode_frame(4, b"{\"task_id\":7}")).is_err());
    }

    #[test]
    fn base64_round_trips_and_refuses_junk() {
        for n in 0..20usize {
            let data: Vec<u8> = (0..n).map(|i| (i * 37 + 11) as u8).collect();
            let e = b64::encode(&data);
            assert_eq!(b64::decode(&e).unwrap(), data, "{e}");
            assert_eq!(b64::decode(e.trim_end_matches('=')).unwrap(), data);
        }
        assert_eq!(b64::encode(b"hello"), "aGVsbG8=");
        for bad in ["a", "a===", "aGVsbG8=x", "aG!s", "aGVsbG9="] {
            assert!(b64::decode(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn receiver_reports_follow_the_lifecycle() {
        use TaskStatus::*;
        assert!(New.receiver_may_report(Accepted));
        assert!(Accepted.receiver_may_report(Executing));
        assert!(Completed.receiver_may_report(Succeeded));
        assert!(!Executing.receiver_may_report(Succeeded));
        assert!(!Declined.receiver_may_report(Accepted));
        assert!(!Cancelled.receiver_may_report(Executing));
        assert!(!Succeeded.receiver_may_report(Expired));
    }

    #[test]
    fn task_files_keep_v1_keys() {
        let f = TaskFile {
            created_at: "2024-01-01T00:00:00Z".into(),
            created_ns: None,
            ..TaskFile::new(
                "0123abcd-ef01-2345-6789-abcdef012345".into(),
                "d".into(),
                Addr::new(0, 1),
                Addr::new(0, 2),
            )
        };
        let v = serde_json::to_value(&f).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys.len(),
            7,
            "only v1's always-present keys when nothing else is set: {keys:?}"
        );
        assert_eq!(v["status"], "NEW");
        // A v1 file with every key loads.
        let v1 = r#"{"task_id":"0123abcd-ef01-2345-6789-abcdef012345","task_description":"d",
            "created_at":"2024-01-01T00:00:00Z","status":"EXECUTING","status_justification":"",
            "from":"0:0000.0000.0001","to":"0:0000.0000.0002","accepted_at":"2024-01-01T00:00:01Z",
            "staged_at":"2024-01-01T00:00:01Z","execute_started_at":"2024-01-01T00:00:02Z",
            "time_idle_ms":1000,"time_staged_ms":1000}"#;
        let g: TaskFile = serde_json::from_str(v1).unwrap();
        assert_eq!(g.status, TaskStatus::Executing);
        assert_eq!(g.time_staged_ms, 1000);
    }
}
