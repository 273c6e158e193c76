//! `pilotctl`: the command-line client of `pilotd`. It talks to the daemon over the IPC socket
//! (v1 wire §7) through [`pilot_driver::Driver`], mostly with the JSON extension requests of
//! [`tunnel::ipc::ExtRequest`], whose failures carry stable error codes.
//!
//! The binary is a thin wrapper around [`main_entry`]; tests call [`run`] or [`run_captured`]
//! inside their own runtime.
//!
//! # Output
//!
//! Text for people by default. With `--json`, exactly one JSON object on stdout, on success
//! `{"status":"ok","data":{…}}` and on failure `{"status":"error","code":"…","message":"…"}`.
//! Exit status: [`EXIT_OK`], [`EXIT_ERROR`] or [`EXIT_USAGE`] (bad flags or arguments; with
//! `--json` these also print an error object, code `bad_request`).
//!
//! # Error codes
//!
//! Stable strings; scripts match on the code, never on the message. They are the codes of
//! [`tunnel::ipc::code`], which the daemon uses in its extension replies.
//!
//! | Code | Meaning |
//! |---|---|
//! | `daemon_down` | pilotd is not running, or its socket cannot be reached |
//! | `bad_address` | a peer, address, node ID or port does not parse |
//! | `unknown_peer` | the node is not a tunnel peer, or the connection ID is unknown |
//! | `untrusted` | the operation needs trust the peer has not granted |
//! | `invalid_hostname` | the hostname breaks the naming rules or is taken |
//! | `not_found` | no such node, hostname, network or pending request |
//! | `bad_request` | an argument is invalid; also every usage error |
//! | `unsupported` | the daemon does not know the operation (it is older than pilotctl, or is not pilotd: a v1 daemon) |
//! | `timeout` | the peer, registry or daemon did not answer in time |
//! | `refused` | the peer or registry refused (connection refused, registry rejection) |
//! | `unavailable` | the registry or the trust service cannot be reached right now |
//! | `bad_reply` | the daemon's answer does not decode |
//! | `short_echo` | the peer echoed back fewer bytes than were sent (`bench`) |
//! | `internal` | an unexpected local failure |

pub mod cli;
mod commands;
mod daemon;
pub mod parse;
mod services;
mod whois;

use std::ffi::OsString;
use std::io::Write;
use std::time::Duration;

use clap::Parser;
use serde_json::Value;
use tokio::io::AsyncRead;

pub use cli::{Cli, Command, DaemonCmd, NamesCmd, NetworksCmd, TasksCmd};
pub use tunnel::ipc::code;

/// Exit status on success.
pub const EXIT_OK: i32 = 0;
/// Exit status when the command failed.
pub const EXIT_ERROR: i32 = 1;
/// Exit status for bad flags or arguments.
pub const EXIT_USAGE: i32 = 2;

/// Every error code pilotctl reports, in the order of the table above.
pub const ERROR_CODES: &[&str] = &[
    code::DAEMON_DOWN,
    code::BAD_ADDRESS,
    code::UNKNOWN_PEER,
    code::UNTRUSTED,
    code::INVALID_HOSTNAME,
    code::NOT_FOUND,
    code::BAD_REQUEST,
    code::UNSUPPORTED,
    code::TIMEOUT,
    code::REFUSED,
    code::UNAVAILABLE,
    code::BAD_REPLY,
    code::SHORT_ECHO,
    code::INTERNAL,
];

/// A failed command: a stable code from [`ERROR_CODES`] and a message for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtlError {
    /// One of [`ERROR_CODES`].
    pub code: String,
    /// What went wrong, and what to do about it where that is known.
    pub message: String,
}

impl CtlError {
    /// Builds an error.
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        CtlError {
            code: code.to_owned(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for CtlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

impl std::error::Error for CtlError {}

/// The standard streams a command uses. Tests pass buffers.
pub struct Io<'a> {
    /// Input for `connect` and `send` without a message argument.
    pub stdin: Box<dyn AsyncRead + Unpin + Send + 'a>,
    /// Results.
    pub stdout: &'a mut (dyn Write + Send),
    /// Errors in text mode.
    pub stderr: &'a mut (dyn Write + Send),
}

impl std::fmt::Debug for Io<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Io").finish_non_exhaustive()
    }
}

/// What a command produced: the `data` of the JSON envelope and, for text mode, what to print
/// (commands that stream their output print it themselves and leave `text` empty).
#[derive(Debug, Clone, Default)]
pub struct Output {
    /// The JSON `data`.
    pub data: Value,
    /// The text form.
    pub text: String,
}

/// Runs pilotctl with `args` (the first one is the program name), printing to `io`; returns
/// the exit status.
pub async fn run<I, T>(args: I, io: Io<'_>) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let json_flag = wants_json(&args);
    let cli = match Cli::try_parse_from(&args) {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = write!(io.stdout, "{}", e.render());
                return EXIT_OK;
            }
            if json_flag {
                print_error(
                    io.stdout,
                    &CtlError::new(code::BAD_REQUEST, usage_message(&e)),
                );
            } else {
                let _ = write!(io.stderr, "{}", e.render());
            }
            return EXIT_USAGE;
        }
    };
    let json = cli.json;
    let Io {
        stdin,
        stdout,
        stderr,
    } = io;
    let result = commands::execute(cli, stdin, stdout).await;
    match result {
        Ok(out) => {
            if json {
                // Written by hand so that "status" comes first.
                let _ = writeln!(stdout, "{{\"status\":\"ok\",\"data\":{}}}", out.data);
            } else if !out.text.is_empty() {
                let _ = write!(stdout, "{}", out.text);
                if !out.text.ends_with('\n') {
                    let _ = writeln!(stdout);
                }
            }
            let _ = stdout.flush();
            EXIT_OK
        }
        // An empty message means the command reports by its exit status alone.
        Err(e) if e.message.is_empty() => EXIT_ERROR,
        Err(e) => {
            if json {
                print_error(stdout, &e);
            } else {
                let _ = writeln!(stderr, "pilotctl: {} [{}]", e.message, e.code);
            }
            let _ = stdout.flush();
            EXIT_ERROR
        }
    }
}

/// A clap error as one line: the text before the usage section, whitespace collapsed.
fn usage_message(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let head = text
        .split("\n\nUsage:")
        .next()
        .unwrap_or_default()
        .split("\n\nFor more information")
        .next()
        .unwrap_or_default();
    let head = head.strip_prefix("error: ").unwrap_or(head);
    let line = head.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.is_empty() {
        "usage error".to_owned()
    } else {
        line
    }
}

/// Whether `--json` appears before a `--` separator.
fn wants_json(args: &[OsString]) -> bool {
    args.iter()
        .skip(1)
        .take_while(|a| a.as_os_str() != "--")
        .any(|a| a.as_os_str() == "--json")
}

fn print_error(out: &mut (dyn Write + Send), e: &CtlError) {
    let _ = writeln!(
        out,
        "{{\"status\":\"error\",\"code\":{},\"message\":{}}}",
        Value::from(e.code.as_str()),
        Value::from(e.message.as_str())
    );
}

/// The result of [`run_captured`].
#[derive(Debug, Clone)]
pub struct Captured {
    /// Exit status.
    pub status: i32,
    /// Everything printed on stdout.
    pub stdout: String,
    /// Everything printed on stderr.
    pub stderr: String,
}

impl Captured {
    /// Stdout as JSON (for runs with `--json`); `Value::Null` if it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim()).unwrap_or(Value::Null)
    }
}

/// Runs pilotctl with `args` (without the program name), an empty stdin, and captured output.
pub async fn run_captured(args: &[&str]) -> Captured {
    run_captured_with_stdin(args, Vec::new()).await
}

/// Like [`run_captured`], with `stdin` as the input.
pub async fn run_captured_with_stdin(args: &[&str], stdin: Vec<u8>) -> Captured {
    let mut out = Vec::new();
    let mut err = Vec::new();
    let argv = std::iter::once("pilotctl").chain(args.iter().copied());
    let status = run(
        argv,
        Io {
            stdin: Box::new(std::io::Cursor::new(stdin)),
            stdout: &mut out,
            stderr: &mut err,
        },
    )
    .await;
    Captured {
        status,
        stdout: String::from_utf8_lossy(&out).into_owned(),
        stderr: String::from_utf8_lossy(&err).into_owned(),
    }
}

/// The binary's entry point: runs pilotctl on the process arguments and standard streams.
pub fn main_entry() -> i32 {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pilotctl: cannot start the async runtime: {e}");
            return EXIT_ERROR;
        }
    };
    let status = rt.block_on(async {
        let mut stdout = std::io::stdout();
        let mut stderr = std::io::stderr();
        run(
            std::env::args_os(),
            Io {
                stdin: Box::new(tokio::io::stdin()),
                stdout: &mut stdout,
                stderr: &mut stderr,
            },
        )
        .await
    });
    // A read of stdin may still be blocked in a helper thread; do not wait for it.
    rt.shutdown_timeout(Duration::from_millis(100));
    status
}
