//! `pilotctl daemon start|stop|status`: run and check pilotd for the socket pilotctl uses.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::json;
use tunnel::ipc::{self, code, ExtRequest};

use crate::cli::DaemonCmd;
use crate::commands::{decode, ext, fmt_duration, output, Ctx};
use crate::{CtlError, Output};

/// Poll interval while waiting for the daemon to come up or go away.
const POLL: Duration = Duration::from_millis(50);

pub(crate) async fn run(ctx: &Ctx, cmd: DaemonCmd) -> Result<Output, CtlError> {
    match cmd {
        DaemonCmd::Start { log, wait, args } => start(ctx, log, wait, args).await,
        DaemonCmd::Stop { wait } => stop(ctx, wait).await,
        DaemonCmd::Status { check } => status(ctx, check).await,
    }
}

/// The daemon's status, if one answers on the socket.
async fn info(ctx: &Ctx) -> Result<ipc::Info, CtlError> {
    let d = ctx.driver().await?;
    let v = ext(&d, ExtRequest::Info).await?;
    decode(&v)
}

/// `$PILOTD_BIN`, else `pilotd` next to this executable, else `pilotd` from `PATH`.
fn pilotd_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("PILOTD_BIN").filter(|v| !v.is_empty()) {
        return PathBuf::from(p);
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            let sibling = dir.join("pilotd");
            if sibling.is_file() {
                return sibling;
            }
        }
    }
    PathBuf::from("pilotd")
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

async fn start(
    ctx: &Ctx,
    log: Option<PathBuf>,
    wait: Duration,
    args: Vec<String>,
) -> Result<Output, CtlError> {
    if let Ok(i) = info(ctx).await {
        return Err(CtlError::new(
            code::BAD_REQUEST,
            format!(
                "pilotd already runs on {} (pid {}, node {})",
                ctx.socket.display(),
                i.pid,
                i.address
            ),
        ));
    }
    let dir = ctx
        .socket
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    // Private: the daemon's state (its identity) may live here too.
    let made = {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
    };
    if let Err(e) = made {
        return Err(CtlError::new(
            code::INTERNAL,
            format!("cannot create {}: {e}", dir.display()),
        ));
    }
    let log = log.unwrap_or_else(|| dir.join("pilotd.log"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(|e| CtlError::new(code::INTERNAL, format!("log {}: {e}", log.display())))?;
    let err_file = file
        .try_clone()
        .map_err(|e| CtlError::new(code::INTERNAL, format!("log {}: {e}", log.display())))?;
    let bin = pilotd_binary();
    let mut command = std::process::Command::new(&bin);
    command
        .arg("--socket")
        .arg(&ctx.socket)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err_file);
    // Its own process group: a Ctrl-C meant for a later foreground job does not reach it.
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let mut child = command.spawn().map_err(|e| {
        CtlError::new(
            code::INTERNAL,
            format!(
                "cannot run {}: {e} (set PILOTD_BIN to pilotd's path)",
                bin.display()
            ),
        )
    })?;
    let pid = child.id();
    let deadline = Instant::now() + wait;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Err(CtlError::new(
                code::INTERNAL,
                format!(
                    "pilotd exited at start ({st}); last lines of {}:\n{}",
                    log.display(),
                    tail(&log, 10)
                ),
            ));
        }
        let answered = info(ctx).await.ok();
        // Registration follows the socket within milliseconds; report the node once it has.
        if let Some(i) = answered.filter(|i| i.node_id != 0 || Instant::now() >= deadline) {
            let data = json!({
                "pid": pid,
                "node_id": i.node_id,
                "address": i.address,
                "hostname": i.hostname,
                "socket": ctx.socket.display().to_string(),
                "log_file": log.display().to_string(),
            });
            let node = if i.node_id == 0 {
                "not registered yet (see the log)".to_owned()
            } else {
                format!("node {}", i.address)
            };
            let text = format!(
                "pilotd started (pid {pid}), {node} on {}; log {}",
                ctx.socket.display(),
                log.display()
            );
            return Ok(output(data, text));
        }
        if Instant::now() >= deadline {
            return Err(CtlError::new(
                code::TIMEOUT,
                format!(
                    "pilotd (pid {pid}) did not answer on {} within {}; it may still be \
                     starting (stop it with `kill {pid}`); see {}",
                    ctx.socket.display(),
                    fmt_duration(wait),
                    log.display()
                ),
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Whether the process exists and has not exited (a zombie, not yet reaped by its parent,
/// counts as exited).
fn alive(pid: Pid) -> bool {
    if kill(pid, None).is_err() {
        return false;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The state follows the parenthesised command name.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z" | "X"))
}

async fn stop(ctx: &Ctx, wait: Duration) -> Result<Output, CtlError> {
    let d = ctx.driver().await?;
    let i: ipc::Info = decode(&ext(&d, ExtRequest::Info).await?)?;
    // The kernel's word on who holds the socket, not the daemon's: the reported pid is from
    // the daemon's PID namespace, which may not be ours (a container with the socket mounted).
    let raw = match d.peer_pid() {
        Some(0) => {
            return Err(CtlError::new(
                code::UNSUPPORTED,
                "pilotd runs in another PID namespace; stop it with its service manager or \
                 from inside its container",
            ))
        }
        kernel => kernel.or_else(|| i32::try_from(i.pid).ok()),
    }
    .filter(|&p| p > 1)
    .ok_or_else(|| {
        CtlError::new(
            code::UNSUPPORTED,
            "the daemon's process ID is unknown; stop it with its service manager",
        )
    })?;
    drop(d);
    let pid = Pid::from_raw(raw);
    kill(pid, Signal::SIGTERM).map_err(|e| {
        CtlError::new(
            code::INTERNAL,
            format!("cannot signal pilotd (pid {raw}): {e}"),
        )
    })?;
    let deadline = Instant::now() + wait;
    let mut forced = false;
    while alive(pid) {
        if Instant::now() >= deadline {
            let _ = kill(pid, Signal::SIGKILL);
            forced = true;
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    let text = if forced {
        format!(
            "pilotd (pid {raw}) did not stop within {}; killed",
            fmt_duration(wait)
        )
    } else {
        format!("pilotd (pid {raw}) stopped")
    };
    Ok(output(json!({"pid": raw, "forced": forced}), text))
}

async fn status(ctx: &Ctx, check: bool) -> Result<Output, CtlError> {
    match info(ctx).await {
        Ok(i) => {
            if check {
                return Ok(Output::default());
            }
            let data = json!({
                "running": true,
                "responsive": true,
                "pid": i.pid,
                "version": i.version,
                "socket": ctx.socket.display().to_string(),
                "node_id": i.node_id,
                "address": i.address,
                "hostname": i.hostname,
                "uptime_secs": i.uptime_secs,
                "peers": i.peers,
                "connections": i.connections,
            });
            let text = format!(
                "pilotd is running (pid {}), node {}{}, up {}, {} peers, {} connections",
                i.pid,
                i.address,
                if i.hostname.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", i.hostname)
                },
                fmt_duration(Duration::try_from_secs_f64(i.uptime_secs).unwrap_or_default()),
                i.peers,
                i.connections
            );
            Ok(output(data, text))
        }
        // Nothing printed, exit status 1.
        Err(e) if check => Err(CtlError::new(&e.code, String::new())),
        Err(e) if e.code == code::DAEMON_DOWN => Ok(output(
            json!({"running": false, "socket": ctx.socket.display().to_string(),
                   "reason": e.message}),
            format!("pilotd is not running: {}", e.message),
        )),
        Err(e) => Err(e),
    }
}
