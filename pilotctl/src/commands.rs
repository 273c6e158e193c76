//! What each command does: the daemon requests it makes and how it reports the result.

use std::fmt::Write as _;
use std::future::Future;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pilot_driver::config::{SOCKET_FILE, SYSTEM_SOCKET};
use pilot_driver::{Driver, DriverError};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tunnel::ipc::{self, code, ExtReply, ExtRequest};
use tunnel::{Addr, SocketAddr};

use crate::cli::{Cli, Command, NetworksCmd};
use crate::parse::{parse_endpoint, parse_target, Target};
use crate::{CtlError, Output};

/// Longest wait for a plain daemon request.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for a stream connection to open (the daemon's own dial limit is about 30 s).
pub(crate) const DIAL_TIMEOUT: Duration = Duration::from_secs(45);
/// Longest wait for the round trip that confirms earlier messages reached the daemon.
const SYNC_TIMEOUT: Duration = Duration::from_secs(10);
/// Most received bytes kept for a JSON result.
const MAX_CAPTURE: usize = 16 << 20;
/// Most bytes read from one stream connection by `listen`.
const MAX_STREAM_MESSAGE: usize = 1 << 20;
/// Most bytes read from stdin for `send`.
pub(crate) const MAX_STDIN_MESSAGE: u64 = 16 << 20;
/// Bytes per write in `bench`.
const BENCH_CHUNK: usize = 256 * 1024;
/// Default port of `connect` (the stdio service).
const DEFAULT_CONNECT_PORT: u16 = 1000;

pub(crate) type Stdin<'a> = Box<dyn AsyncRead + Unpin + Send + 'a>;
pub(crate) type Stdout<'a> = &'a mut (dyn Write + Send);

/// Runs one parsed command line.
pub(crate) async fn execute(
    cli: Cli,
    stdin: Stdin<'_>,
    stdout: Stdout<'_>,
) -> Result<Output, CtlError> {
    let ctx = Ctx {
        socket: socket_path(cli.socket.as_deref()),
        json: cli.json,
    };
    match cli.command {
        Command::Info => info(&ctx).await,
        Command::Whois { node } => crate::whois::whois(&ctx, &node).await,
        Command::Status => crate::whois::status(&ctx).await,
        Command::SetHostname { name } => set_hostname(&ctx, name).await,
        Command::ClearHostname => set_hostname(&ctx, String::new()).await,
        Command::Find { name } => find(&ctx, &name).await,
        Command::SetPublic => set_visibility(&ctx, true).await,
        Command::SetPrivate => set_visibility(&ctx, false).await,
        Command::Tags { tags, clear } => {
            set_tags(&ctx, if clear { Vec::new() } else { tags }).await
        }
        Command::Lookup { peer } => lookup(&ctx, &peer).await,
        Command::Peers { search } => peers(&ctx, search).await,
        Command::Connections => connections(&ctx).await,
        Command::Disconnect { conn_id } => disconnect(&ctx, conn_id).await,
        Command::Handshake {
            peer,
            justification,
        } => handshake(&ctx, &peer, justification.join(" ")).await,
        Command::Pending => pending(&ctx).await,
        Command::Approve { peer } => trust_op(&ctx, &peer, TrustAction::Approve).await,
        Command::Reject { peer, reason } => {
            trust_op(&ctx, &peer, TrustAction::Reject(reason.join(" "))).await
        }
        Command::Trust => trusted(&ctx).await,
        Command::Untrust { peer } => trust_op(&ctx, &peer, TrustAction::Untrust).await,
        Command::Ping {
            peer,
            count,
            timeout,
        } => ping(&ctx, &peer, count, timeout).await,
        Command::Connect {
            target,
            port,
            message,
            timeout,
        } => connect(&ctx, &target, port, message, timeout, stdin, stdout).await,
        Command::Send {
            target,
            rest,
            datagram,
            no_wait,
            timeout,
        } => {
            let opts = SendOpts {
                datagram,
                no_wait,
                timeout,
            };
            send_message(&ctx, &target, &rest, opts, stdin).await
        }
        Command::Listen {
            port,
            count,
            timeout,
        } => listen(&ctx, port, count, timeout, stdout).await,
        Command::Bench {
            peer,
            size,
            port,
            timeout,
        } => bench(&ctx, &peer, size, port, timeout).await,
        Command::Deregister => deregister(&ctx).await,
        Command::Register => register(&ctx).await,
        Command::RotateKey => rotate_key(&ctx).await,
        Command::Traceroute {
            peer,
            count,
            timeout,
        } => traceroute(&ctx, &peer, count, timeout).await,
        Command::Completions { shell } => completions(&ctx, shell, stdout),
        Command::ManPage => man_page(stdout),
        Command::Daemon(cmd) => crate::daemon::run(&ctx, cmd).await,
        Command::Subscribe {
            peer,
            topic,
            count,
            timeout,
        } => crate::services::subscribe(&ctx, &peer, &topic, count, timeout, stdout).await,
        Command::Publish { peer, topic, data } => {
            crate::services::publish(&ctx, &peer, &topic, data, stdin).await
        }
        Command::Names(cmd) => crate::services::names(&ctx, cmd).await,
        Command::SendMessage {
            peer,
            message,
            kind,
            timeout,
        } => crate::services::send_message(&ctx, &peer, message, &kind, timeout, stdin).await,
        Command::SendFile {
            peer,
            path,
            name,
            timeout,
        } => crate::services::send_file(&ctx, &peer, &path, name, timeout).await,
        Command::Inbox { clear } => crate::services::inbox(&ctx, clear).await,
        Command::Tasks(cmd) => crate::services::tasks(&ctx, cmd).await,
        Command::Received { clear } => crate::services::received(&ctx, clear).await,
        Command::Networks(cmd) => networks(&ctx, cmd).await,
        Command::Webhook { url, clear } => {
            let url = if clear {
                String::new()
            } else {
                url.unwrap_or_default()
            };
            webhook(&ctx, url).await
        }
        Command::EnableTasks => task_exec(&ctx, true).await,
        Command::DisableTasks => task_exec(&ctx, false).await,
    }
}

// ---------------------------------------------------------------------------------------------
// Daemon access
// ---------------------------------------------------------------------------------------------

pub(crate) struct Ctx {
    pub(crate) socket: PathBuf,
    pub(crate) json: bool,
}

impl Ctx {
    /// A connection to the daemon, or `daemon_down` with what to do about it.
    pub(crate) async fn driver(&self) -> Result<Driver, CtlError> {
        match tokio::time::timeout(REQUEST_TIMEOUT, Driver::connect(&self.socket)).await {
            Err(_) => Err(CtlError::new(
                code::DAEMON_DOWN,
                format!(
                    "pilotd does not accept connections on {}",
                    self.socket.display()
                ),
            )),
            Ok(Ok(d)) => Ok(d),
            Ok(Err(e)) => Err(connect_error(&self.socket, e)),
        }
    }
}

/// The socket to use: the flag (or `PILOT_SOCKET`), else pilotd's own default for this user;
/// when that does not exist but the system socket does, the system socket.
fn socket_path(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    let env_path = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let own =
        daemon_socket(env_path("PILOT_HOME"), env_path("PILOT_CONFIG")).unwrap_or_else(|| {
            env_path("PILOT_HOME")
                .or_else(|| env_path("HOME").map(|h| h.join(".pilot")))
                .unwrap_or_else(|| PathBuf::from(".pilot"))
                .join(SOCKET_FILE)
        });
    let system = Path::new(SYSTEM_SOCKET);
    if !own.exists() && system.exists() {
        return system.to_path_buf();
    }
    own
}

/// The socket pilotd would use when started with this `PILOT_HOME` and `PILOT_CONFIG` and no
/// flags, resolved as pilotd does: the config file's `socket`, else [`SYSTEM_SOCKET`] as
/// root, else `<home>/pilotd.sock`, where home is `PILOT_HOME`, the file's `home`,
/// `/var/lib/pilot` as root, or `~/.pilot`. `None` when the config file cannot be read.
fn daemon_socket(home: Option<PathBuf>, config: Option<PathBuf>) -> Option<PathBuf> {
    let (file_home, file_socket) = match config {
        Some(path) => config_paths(&path)?,
        None => (None, None),
    };
    if let Some(socket) = file_socket {
        return Some(socket);
    }
    if nix::unistd::geteuid().is_root() {
        return Some(PathBuf::from(SYSTEM_SOCKET));
    }
    let home = home.or(file_home).unwrap_or_else(|| {
        match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
            Some(h) => PathBuf::from(h).join(".pilot"),
            None => PathBuf::from(".pilot"),
        }
    });
    Some(home.join(SOCKET_FILE))
}

/// The `home` and (non-empty) `socket` of a pilotd config file. Keys are flag names; as
/// pilotd reads them, leading dashes are dropped and `_` is the same as `-` (v1 files).
fn config_paths(path: &Path) -> Option<(Option<PathBuf>, Option<PathBuf>)> {
    let bytes = std::fs::read(path).ok()?;
    let Value::Object(map) = serde_json::from_slice(&bytes).ok()? else {
        return None;
    };
    let (mut home, mut socket) = (None, None);
    for (k, v) in map {
        let Value::String(s) = v else { continue };
        match k.trim_start_matches('-').replace('_', "-").as_str() {
            "home" => home = Some(PathBuf::from(s)),
            "socket" if !s.is_empty() => socket = Some(PathBuf::from(s)),
            _ => {}
        }
    }
    Some((home, socket))
}

fn connect_error(socket: &Path, e: DriverError) -> CtlError {
    let path = socket.display();
    let msg = match &e {
        DriverError::Connect { source, .. } => match source.kind() {
            io::ErrorKind::NotFound => {
                format!("pilotd is not running (no socket at {path}); start it with `sudo pilotd`")
            }
            io::ErrorKind::ConnectionRefused => format!(
                "pilotd is not running (the socket {path} refuses connections); start it \
                 with `sudo pilotd`"
            ),
            io::ErrorKind::PermissionDenied => format!(
                "permission denied on {path}: run pilotctl as the user pilotd runs as, or \
                 with sudo"
            ),
            _ => format!("cannot reach pilotd at {path}: {source}"),
        },
        other => other.to_string(),
    };
    CtlError::new(code::DAEMON_DOWN, msg)
}

/// The stable code for a driver failure: [`DriverError::code`] (a v1 Error message's code
/// is read from its text there, in `pilot_driver::v1_error_code`).
pub(crate) fn driver_error(e: DriverError) -> CtlError {
    let c = e.code();
    match e {
        DriverError::Connect { .. } | DriverError::DaemonDown(_) => {
            CtlError::new(c, format!("lost the connection to pilotd: {e}"))
        }
        DriverError::BadReply(m) | DriverError::Daemon(m) => CtlError::new(c, m),
        DriverError::TooLarge(e) => CtlError::new(c, e.to_string()),
    }
}

pub(crate) fn io_error(what: &str, e: io::Error) -> CtlError {
    let c = match e.kind() {
        io::ErrorKind::ConnectionRefused => code::REFUSED,
        io::ErrorKind::TimedOut => code::TIMEOUT,
        io::ErrorKind::BrokenPipe => code::DAEMON_DOWN,
        _ => code::INTERNAL,
    };
    CtlError::new(c, format!("{what}: {e}"))
}

/// Awaits a driver call for at most `limit`.
pub(crate) async fn timed<T>(
    limit: Duration,
    what: &str,
    fut: impl Future<Output = Result<T, DriverError>>,
) -> Result<T, CtlError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r.map_err(driver_error),
        Err(_) => Err(CtlError::new(
            code::TIMEOUT,
            format!("{what}: no answer within {}", fmt_duration(limit)),
        )),
    }
}

/// An extension request; its data, or its error code and message.
///
/// pilotd answers every extension request with an extension reply (code and message
/// included), so a v1-form Error in its place comes from a daemon without the extensions: a
/// v1 daemon answers the unknown command 0x40 with Error (v1 wire §7.2). That is
/// `unsupported`, whatever the Error's text would read as.
pub(crate) async fn ext_within(
    d: &Driver,
    req: ExtRequest,
    limit: Duration,
) -> Result<Value, CtlError> {
    let what = format!("pilotd request {}", req.op());
    let reply = match tokio::time::timeout(limit, d.ext(&req)).await {
        Ok(Ok(reply)) => reply,
        Ok(Err(DriverError::Daemon(m))) => return Err(not_pilotd(req.op(), &m)),
        Ok(Err(e)) => return Err(driver_error(e)),
        Err(_) => {
            return Err(CtlError::new(
                code::TIMEOUT,
                format!("{what}: no answer within {}", fmt_duration(limit)),
            ))
        }
    };
    match reply {
        ExtReply::Ok { data } => Ok(data),
        ExtReply::Error { code, message } => Err(CtlError { code, message }),
    }
}

/// The daemon answered extension request `op` with a v1 Error message (`answer`).
fn not_pilotd(op: &str, answer: &str) -> CtlError {
    CtlError::new(
        code::UNSUPPORTED,
        format!(
            "the daemon on this socket is not pilotd, or lacks pilotd's extension requests \
             (a v1 daemon): it answered {op} with \"{answer}\"; this command needs pilotd"
        ),
    )
}

pub(crate) async fn ext(d: &Driver, req: ExtRequest) -> Result<Value, CtlError> {
    ext_within(d, req, REQUEST_TIMEOUT).await
}

pub(crate) fn decode<T: DeserializeOwned>(v: &Value) -> Result<T, CtlError> {
    T::deserialize(v).map_err(|e| CtlError::new(code::BAD_REPLY, format!("pilotd's reply: {e}")))
}

/// Waits until every message queued before it has been handled by the daemon; an Error the
/// daemon sent for one of them (a failed datagram send) comes back here.
async fn sync(d: &Driver) -> Result<(), CtlError> {
    timed(SYNC_TIMEOUT, "pilotd", d.info_json()).await.map(drop)
}

/// A peer resolved to a node.
#[derive(Debug, Clone)]
pub(crate) struct Peer {
    pub(crate) addr: Addr,
    hostname: Option<String>,
}

impl Peer {
    pub(crate) fn node(&self) -> u32 {
        self.addr.node
    }

    pub(crate) fn label(&self) -> String {
        match &self.hostname {
            Some(h) => format!("{h} ({})", self.addr),
            None => self.addr.to_string(),
        }
    }
}

/// Turns a parsed target into a node, asking the registry (through the daemon) for hostnames.
/// All of stdin, refusing more than [`MAX_STDIN_MESSAGE`] bytes instead of cutting it.
pub(crate) async fn read_stdin(stdin: Stdin<'_>) -> Result<Vec<u8>, CtlError> {
    let mut buf = Vec::new();
    stdin
        .take(MAX_STDIN_MESSAGE + 1)
        .read_to_end(&mut buf)
        .await
        .map_err(|e| io_error("read stdin", e))?;
    if buf.len() as u64 > MAX_STDIN_MESSAGE {
        return Err(CtlError::new(
            code::BAD_REQUEST,
            format!("stdin holds more than {MAX_STDIN_MESSAGE} bytes; send it as a file"),
        ));
    }
    Ok(buf)
}

pub(crate) async fn resolve(d: &Driver, target: &Target) -> Result<Peer, CtlError> {
    let peer = match target {
        Target::Addr(a) => Peer {
            addr: *a,
            hostname: None,
        },
        Target::Hostname(h) => {
            let v = ext(
                d,
                ExtRequest::Resolve {
                    target: h.to_owned(),
                },
            )
            .await?;
            let r: ipc::ResolveReply = decode(&v)?;
            Peer {
                addr: r.address.parse().unwrap_or(Addr::new(0, r.node_id)),
                hostname: Some(h.to_owned()),
            }
        }
    };
    if peer.addr.node == 0 {
        return Err(CtlError::new(
            code::BAD_ADDRESS,
            format!("{} is not a node", peer.addr),
        ));
    }
    Ok(peer)
}

/// Parses `text`, connects, and resolves it.
pub(crate) async fn driver_and_peer(ctx: &Ctx, text: &str) -> Result<(Driver, Peer), CtlError> {
    let target = parse_target(text)?;
    let d = ctx.driver().await?;
    let peer = resolve(&d, &target).await?;
    Ok((d, peer))
}

pub(crate) fn output(data: Value, text: impl Into<String>) -> Output {
    Output {
        data,
        text: text.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// Status and registry
// ---------------------------------------------------------------------------------------------

async fn info(ctx: &Ctx) -> Result<Output, CtlError> {
    let d = ctx.driver().await?;
    let v = ext(&d, ExtRequest::Info).await?;
    let i: ipc::Info = decode(&v)?;
    let hostname = if i.hostname.is_empty() {
        "(none)"
    } else {
        &i.hostname
    };
    let uptime = Duration::from_secs_f64(i.uptime_secs.max(0.0));
    let uptime = if uptime.as_secs() == 0 {
        "<1s".to_owned()
    } else {
        fmt_duration(uptime)
    };
    let mut text = format!(
        "Node:         {} ({})\n\
         Hostname:     {hostname}\n\
         Public key:   {}\n\
         Encryption:   {}\n\
         Uptime:       {}\n\
         Peers:        {} ({} encrypted, {} authenticated)\n\
         Connections:  {} ({} ports bound)\n\
         Sent:         {} in {} packets\n\
         Received:     {} in {} packets\n",
        i.node_id,
        i.address,
        i.public_key,
        if i.encrypt { "on" } else { "off" },
        uptime,
        i.peers,
        i.encrypted_peers,
        i.authenticated_peers,
        i.connections,
        i.ports,
        fmt_bytes(i.bytes_sent),
        i.pkts_sent,
        fmt_bytes(i.bytes_recv),
        i.pkts_recv,
    );
    if let Some(r) = &i.registry {
        let since = fmt_duration(Duration::from_secs(r.since_secs));
        let at = r
            .address
            .as_deref()
            .map(|a| format!(" ({})", crate::services::clean(a)))
            .unwrap_or_default();
        let _ = match (r.connected, &r.error) {
            (true, _) => writeln!(text, "Registry:     connected for {since}{at}"),
            (false, Some(e)) => writeln!(
                text,
                "Registry:     NOT CONNECTED for {since}: {}; retrying",
                crate::services::clean(e)
            ),
            (false, None) => writeln!(text, "Registry:     connecting ({since})"),
        };
        if let Some(c) = &r.conflict {
            let _ = writeln!(
                text,
                "Conflict:     ANOTHER DAEMON WITH THIS IDENTITY: {}",
                crate::services::clean(c)
            );
        }
    }
    if i.registry_protocol == "v1" {
        text.push_str(
            "Registry:     v1 (no session extensions: fixed-string signatures, handshakes polled)\n",
        );
    }
    if let Some(n) = &i.inside {
        let exposed = if n.expose.is_empty() {
            "none (only trusted peers reach this host's listeners)".to_owned()
        } else {
            let ports: Vec<String> = n.expose.iter().map(u16::to_string).collect();
            format!("{} (other ports: trusted peers only)", ports.join(", "))
        };
        let _ = write!(
            text,
            "Interface:    {} {} (mtu {}), {} TCP flows\n\
             Exposed:      {exposed}\n",
            n.interface, n.ula, n.mtu, n.flows
        );
        if !n.dns.is_empty() {
            let _ = writeln!(text, "Names:        <hostname>.pilot answered at {}", n.dns);
        }
        if !n.dns_system.is_empty() {
            let _ = writeln!(text, "Resolver:     {}", n.dns_system);
        }
    }
    if let Some(b) = &i.beacon {
        let last = b
            .last_answer_secs
            .map(|s| format!("last answer {} ago", fmt_duration(Duration::from_secs(s))))
            .unwrap_or_else(|| "no answer yet".into());
        let state = match b.answering {
            Some(true) => "answering",
            Some(false) => "NOT ANSWERING: peers behind NATs cannot be punched or relayed",
            None => "starting",
        };
        let _ = writeln!(text, "Beacon:       {} ({state}; {last})", b.address);
    }
    Ok(output(v, text))
}

async fn set_hostname(ctx: &Ctx, name: String) -> Result<Output, CtlError> {
    let clearing = name.is_empty();
    let d = ctx.driver().await?;
    let v = ext(&d, ExtRequest::SetHostname { hostname: name }).await?;
    let r: ipc::HostnameReply = decode(&v)?;
    let text = if clearing || r.hostname.is_empty() {
        format!("Hostname of node {} cleared", r.node_id)
    } else {
        format!("Hostname of node {} is now {}", r.node_id, r.hostname)
    };
    Ok(output(v, text))
}

async fn find(ctx: &Ctx, name: &str) -> Result<Output, CtlError> {
    parse_target(name)?;
    let d = ctx.driver().await?;
    let v = ext(
        &d,
        ExtRequest::Resolve {
            target: name.trim().to_owned(),
        },
    )
    .await?;
    let mut r: ipc::ResolveReply = decode(&v)?;
    let mut v = v;
    if r.public.is_none() {
        // An address or node ID resolves without the registry; `find` asks it whether the
        // node exists.
        let l = ext(&d, ExtRequest::Lookup { node_id: r.node_id }).await?;
        let l: ipc::LookupReply = decode(&l)?;
        r.public = Some(l.public);
        r.hostname = l.hostname.filter(|h| !h.is_empty());
        v = serde_json::to_value(&r).map_err(|e| CtlError::new(code::INTERNAL, e.to_string()))?;
    }
    let visibility = match r.public {
        Some(true) => ", public",
        Some(false) => ", private",
        None => "",
    };
    let text = format!(
        "{} is node {}, address {}{visibility}",
        name.trim(),
        r.node_id,
        r.address
    );
    Ok(output(v, text))
}

async fn set_visibility(ctx: &Ctx, public: bool) -> Result<Output, CtlError> {
    let d = ctx.driver().await?;
    let v = ext(&d, ExtRequest::SetVisibility { public }).await?;
    let r: ipc::VisibilityReply = decode(&v)?;
    let text = if r.public {
        format!("Node {} is now public: anyone can reach it", r.node_id)
    } else {
        format!(
            "Node {} is now private: only trusted peers can reach it",
            r.node_id
        )
    };
    Ok(output(v, text))
}

async fn set_tags(ctx: &Ctx, tags: Vec<String>) -> Result<Output, CtlError> {
    if tags.len() > ipc::MAX_TAGS {
        return Err(CtlError::new(
            code::BAD_REQUEST,
            format!("at most {} tags, got {}", ipc::MAX_TAGS, tags.len()),
        ));
    }
    let d = ctx.driver().await?;
    let v = ext(&d, ExtRequest::SetTags { tags }).await?;
    let r: ipc::TagsReply = decode(&v)?;
    let text = if r.tags.is_empty() {
        format!("Tags of node {} cleared", r.node_id)
    } else {
        format!("Tags of node {}: {}", r.node_id, r.tags.join(", "))
    };
    Ok(output(v, text))
}

async fn lookup(ctx: &Ctx, peer: &str) -> Result<Output, CtlError> {
    let (d, peer) = driver_and_peer(ctx, peer).await?;
    let v = ext(
        &d,
        ExtRequest::Lookup {
            node_id: peer.node(),
        },
    )
    .await?;
    let r: ipc::LookupReply = decode(&v)?;
    let mut text = format!(
        "Node:        {} ({})\nHostname:    {}\nVisibility:  {}\nPublic key:  {}\n",
        r.node_id,
        r.address,
        r.hostname
            .as_deref()
            .filter(|h| !h.is_empty())
            .unwrap_or("(none)"),
        if r.public { "public" } else { "private" },
        r.public_key,
    );
    let _ = writeln!(
        text,
        "Tags:        {}",
        if r.tags.is_empty() {
            "(none)".to_owned()
        } else {
            r.tags.join(", ")
        }
    );
    let nets: Vec<String> = r.networks.iter().map(u16::to_string).collect();
    let _ = writeln!(text, "Networks:    {}", nets.join(", "));
    let _ = writeln!(
        text,
        "Task exec:   {}",
        if r.task_exec { "yes" } else { "no" }
    );
    if let Some(ep) = &r.real_addr {
        let _ = writeln!(text, "Endpoint:    {ep}");
    }
    Ok(output(v, text))
}

async fn deregister(ctx: &Ctx) -> Result<Output, CtlError> {
    let d = ctx.driver().await?;
    let v = ext(&d, ExtRequest::Deregister).await?;
    let r: ipc::NodeReply = decode(&v)?;
    Ok(output(
        v,
        format!(
            "Node {} removed from the registry; pilotd keeps running, unregistered until \
             `pilotctl register`",
            r.node_id
        ),
    ))
}

async fn register(ctx: &Ctx) -> Result<Output, CtlError> {
    let d = ctx.driver().await?;
    let v = ext(&d, ExtRequest::Register).await?;
    let r: ipc::RegisterReply = decode(&v)?;
    Ok(output(
        v,
        format!("Registered as node {} ({})", r.node_id, r.address),
    ))
}

async fn rotate_key(ctx: &Ctx) -> Result<Output, CtlError> {
    let d = ctx.driver().await?;
    let v = ext(&d, ExtRequest::RotateKey).await?;
    let r: ipc::RotateKeyReply = decode(&v)?;
    Ok(output(
        v,
        format!("Node {} now has the key {}", r.node_id, r.public_key),
    ))
}

/// `pilotctl man-page` (hidden; packaging renders pilotctl.1 with it).
fn man_page(stdout: Stdout<'_>) -> Result<Output, CtlError> {
    use clap::CommandFactory;
    let page = pilot_service::man::render(Cli::command(), "1")
        .map_err(|e| CtlError::new(code::INTERNAL, format!("rendering the man page: {e}")))?;
    match stdout.write_all(&page).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(CtlError::new(
            code::INTERNAL,
            format!("writing the man page: {e}"),
        )),
        _ => Ok(Output::default()),
    }
}

fn completions(
    ctx: &Ctx,
    shell: clap_complete::Shell,
    stdout: Stdout<'_>,
) -> Result<Output, CtlError> {
    if ctx.json {
        return Err(CtlError::new(
            code::BAD_REQUEST,
            "completions prints a shell script; run it without --json",
        ));
    }
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    // Into memory first: the generator panics on a write error, and a reader that closes the
    // pipe early (`| head`) is not an error of ours.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, "pilotctl", &mut script);
    match stdout.write_all(&script).and_then(|()| stdout.flush()) {
        Ok(()) => Ok(Output::default()),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(Output::default()),
        Err(e) => Err(CtlError::new(
            code::INTERNAL,
            format!("writing the completion script: {e}"),
        )),
    }
}

async fn webhook(ctx: &Ctx, url: String) -> Result<Output, CtlError> {
    if !(url.is_empty() || url.starts_with("http://") || url.starts_with("https://")) {
        return Err(CtlError::new(
            code::BAD_REQUEST,
            "the webhook URL must start with http:// or https://",
        ));
    }
    let d = ctx.driver().await?;
    let v = ext(&d, ExtRequest::SetWebhook { url }).await?;
    let r: ipc::WebhookReply = decode(&v)?;
    let text = if r.webhook.is_empty() {
        "Webhook disabled".to_owned()
    } else {
        format!("Events are now posted to {}", r.webhook)
    };
    Ok(output(v, text))
}

async fn task_exec(ctx: &Ctx, enabled: bool) -> Result<Output, CtlError> {
    let d = ctx.driver().await?;
    let v = ext(&d, ExtRequest::SetTaskExec { enabled }).await?;
    let r: ipc::TaskExecReply = decode(&v)?;
    let text = if r.enabled {
        format!("Node {} now advertises task execution", r.node_id)
    } else {
        format!("Node {} no longer advertises task execution", r.node_id)
    };
    Ok(output(v, text))
}

async fn networks(ctx: &Ctx, cmd: NetworksCmd) -> Result<Output, CtlError> {
    // Arguments are checked before the daemon is asked anything.
    let inviter = match &cmd {
        NetworksCmd::Join {
            inviter: Some(i), ..
        } => Some(parse_target(i)?),
        _ => None,
    };
    let invited = match &cmd {
        NetworksCmd::Invite { peer, .. } => Some(parse_target(peer)?),
        _ => None,
    };
    let d = ctx.driver().await?;
    match cmd {
        NetworksCmd::List => {
            let v = ext(&d, ExtRequest::NetworkList).await?;
            let r: ipc::NetworksReply = decode(&v)?;
            let mut text = String::new();
            if r.networks.is_empty() {
                text.push_str("No networks\n");
            } else {
                let _ = writeln!(text, "{:>6}  {:<24} {:>8}  JOIN", "ID", "NAME", "MEMBERS");
                for n in &r.networks {
                    let _ = writeln!(
                        text,
                        "{:>6}  {:<24} {:>8}  {}",
                        n.id, n.name, n.members, n.join_rule
                    );
                }
            }
            Ok(output(v, text))
        }
        NetworksCmd::Create {
            name,
            join_rule,
            token,
        } => {
            let v = ext(
                &d,
                ExtRequest::NetworkCreate {
                    name,
                    join_rule,
                    token,
                },
            )
            .await?;
            let r: ipc::NetworkInfo = decode(&v)?;
            let text = format!(
                "Network {} ({}) created, join rule {}",
                r.id, r.name, r.join_rule
            );
            Ok(output(v, text))
        }
        NetworksCmd::Join {
            network_id, token, ..
        } => {
            let inviter_id = match &inviter {
                Some(t) => Some(resolve(&d, t).await?.node()),
                None => None,
            };
            let v = ext(
                &d,
                ExtRequest::NetworkJoin {
                    network_id,
                    token,
                    inviter_id,
                },
            )
            .await?;
            let r: ipc::NetworkReply = decode(&v)?;
            Ok(output(
                v,
                format!("Node {} joined network {}", r.node_id, r.network_id),
            ))
        }
        NetworksCmd::Leave { network_id } => {
            let v = ext(&d, ExtRequest::NetworkLeave { network_id }).await?;
            let r: ipc::NetworkReply = decode(&v)?;
            Ok(output(
                v,
                format!("Node {} left network {}", r.node_id, r.network_id),
            ))
        }
        NetworksCmd::Invite { network_id, .. } => {
            let target = invited.ok_or_else(|| CtlError::new(code::INTERNAL, "no invitee"))?;
            let peer = resolve(&d, &target).await?;
            let v = ext(
                &d,
                ExtRequest::NetworkInvite {
                    network_id,
                    node_id: peer.node(),
                },
            )
            .await?;
            let r: ipc::NetworkReply = decode(&v)?;
            Ok(output(
                v,
                format!("Node {} invited to network {}", r.node_id, r.network_id),
            ))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Peers and connections
// ---------------------------------------------------------------------------------------------

async fn peers(ctx: &Ctx, search: Option<String>) -> Result<Output, CtlError> {
    let d = ctx.driver().await?;
    let mut v = ext(&d, ExtRequest::Peers { search }).await?;
    let r: ipc::PeersReply = decode(&v)?;
    // Name the path explicitly next to the daemon's `relay` flag.
    if let Some(list) = v.get_mut("peers").and_then(Value::as_array_mut) {
        for p in list {
            let relay = p.get("relay").and_then(Value::as_bool).unwrap_or(false);
            if let Some(o) = p.as_object_mut() {
                o.insert(
                    "path".into(),
                    json!(if relay { "relayed" } else { "direct" }),
                );
            }
        }
    }
    let mut text = String::new();
    if r.peers.is_empty() {
        text.push_str("No peers\n");
    } else {
        let _ = writeln!(
            text,
            "{:>10}  {:<18} {:<24} {:<8} {:<10} AUTHENTICATED",
            "NODE", "ADDRESS", "ENDPOINT", "PATH", "ENCRYPTED"
        );
        for p in &r.peers {
            let _ = writeln!(
                text,
                "{:>10}  {:<18} {:<24} {:<8} {:<10} {}",
                p.node_id,
                Addr::new(0, p.node_id).to_string(),
                p.endpoint,
                if p.relay { "relayed" } else { "direct" },
                yes_no(p.encrypted),
                yes_no(p.authenticated),
            );
        }
        let _ = writeln!(text, "{} peer(s)", r.total);
    }
    Ok(output(v, text))
}

async fn connections(ctx: &Ctx) -> Result<Output, CtlError> {
    let d = ctx.driver().await?;
    let v = ext(&d, ExtRequest::Connections).await?;
    let r: ipc::ConnectionsReply = decode(&v)?;
    let mut text = String::new();
    if r.connections.is_empty() {
        text.push_str("No connections\n");
    } else {
        let _ = writeln!(
            text,
            "{:>6}  {:>6}  {:<24} {:<12} {:>9} {:>10} {:>10} {:>12} {:>12} {:>6}",
            "ID",
            "LOCAL",
            "REMOTE",
            "STATE",
            "SRTT",
            "CWND",
            "IN FLIGHT",
            "SENT",
            "RECEIVED",
            "RETX"
        );
        let mut list: Vec<&ipc::ConnInfo> = r.connections.iter().collect();
        list.sort_by_key(|c| c.id);
        for c in list {
            let _ = writeln!(
                text,
                "{:>6}  {:>6}  {:<24} {:<12} {:>7.1}ms {:>10} {:>10} {:>12} {:>12} {:>6}",
                c.id,
                c.local_port,
                format!("{}:{}", c.remote_addr, c.remote_port),
                c.state,
                c.srtt_ms,
                c.cong_win,
                c.in_flight,
                c.bytes_sent,
                c.bytes_recv,
                c.retransmits,
            );
        }
        let _ = writeln!(text, "{} connection(s)", r.total);
    }
    Ok(output(v, text))
}

async fn disconnect(ctx: &Ctx, conn_id: u32) -> Result<Output, CtlError> {
    let d = ctx.driver().await?;
    let v = ext(&d, ExtRequest::Disconnect { conn_id }).await?;
    let r: ipc::ConnIdReply = decode(&v)?;
    Ok(output(v, format!("Connection {} closed", r.conn_id)))
}

// ---------------------------------------------------------------------------------------------
// Trust
// ---------------------------------------------------------------------------------------------

async fn handshake(ctx: &Ctx, peer: &str, justification: String) -> Result<Output, CtlError> {
    let (d, peer) = driver_and_peer(ctx, peer).await?;
    let v = ext(
        &d,
        ExtRequest::Handshake {
            node_id: peer.node(),
            justification,
        },
    )
    .await?;
    let r: ipc::HandshakeStatus = decode(&v)?;
    let text = format!(
        "Trust request to {}: {} (the peer sees it in `pilotctl pending`)",
        peer.label(),
        r.status,
    );
    Ok(output(v, text))
}

enum TrustAction {
    Approve,
    Reject(String),
    Untrust,
}

async fn trust_op(ctx: &Ctx, peer: &str, action: TrustAction) -> Result<Output, CtlError> {
    let (d, peer) = driver_and_peer(ctx, peer).await?;
    let node_id = peer.node();
    let req = match action {
        TrustAction::Approve => ExtRequest::Approve { node_id },
        TrustAction::Reject(reason) => ExtRequest::Reject { node_id, reason },
        TrustAction::Untrust => ExtRequest::Untrust { node_id },
    };
    let v = ext(&d, req).await?;
    let r: ipc::HandshakeStatus = decode(&v)?;
    let text = match r.status.as_str() {
        ipc::HandshakeStatus::APPROVED => format!("{} is now trusted", peer.label()),
        ipc::HandshakeStatus::REJECTED => format!("Request from {} rejected", peer.label()),
        ipc::HandshakeStatus::REVOKED => format!("{} is no longer trusted", peer.label()),
        other => format!("{}: {other}", peer.label()),
    };
    Ok(output(v, text))
}

async fn pending(ctx: &Ctx) -> Result<Output, CtlError> {
    let d = ctx.driver().await?;
    let v = ext(&d, ExtRequest::TrustPending).await?;
    let r: ipc::PendingList = decode(&v)?;
    let mut text = String::new();
    if r.pending.is_empty() {
        text.push_str("No pending trust requests\n");
    } else {
        let _ = writeln!(
            text,
            "{:>10}  {:<18} {:<24} {:<10} JUSTIFICATION",
            "NODE", "ADDRESS", "HOSTNAME", "RECEIVED"
        );
        for p in &r.pending {
            let name = hostname_of(&d, p.node_id).await;
            let _ = writeln!(
                text,
                "{:>10}  {:<18} {:<24} {:<10} {}",
                p.node_id,
                Addr::new(0, p.node_id).to_string(),
                name.as_deref().unwrap_or("-"),
                ago(p.received_at),
                p.justification
            );
        }
        text.push_str("Answer with `pilotctl approve NODE` or `pilotctl reject NODE [reason]`\n");
    }
    if !r.outgoing.is_empty() {
        text.push_str("\nThis node's requests:\n");
        for o in &r.outgoing {
            let name = hostname_of(&d, o.node_id).await;
            let who = match &name {
                Some(n) => format!("{} ({n})", Addr::new(0, o.node_id)),
                None => Addr::new(0, o.node_id).to_string(),
            };
            let state = match (o.status.as_str(), o.reason.as_str()) {
                (ipc::OutgoingEntry::REJECTED, "") => {
                    format!("rejected {}", o.answered_at.map(ago).unwrap_or_default())
                }
                (ipc::OutgoingEntry::REJECTED, why) => format!(
                    "rejected {}: {}",
                    o.answered_at.map(ago).unwrap_or_default(),
                    crate::services::clean(why)
                ),
                _ => format!("waiting since {}", ago(o.sent_at)),
            };
            let _ = writeln!(text, "  {who}: {state}");
        }
    }
    Ok(output(v, text))
}

/// The hostname the registry (or the daemon's memory of it) gives `node`, if any; a
/// failed lookup only leaves the name out.
async fn hostname_of(d: &pilot_driver::Driver, node: u32) -> Option<String> {
    let v = ext(d, ExtRequest::Lookup { node_id: node }).await.ok()?;
    let r: ipc::LookupReply = decode(&v).ok()?;
    r.hostname.filter(|h| !h.is_empty())
}

async fn trusted(ctx: &Ctx) -> Result<Output, CtlError> {
    let d = ctx.driver().await?;
    let v = ext(&d, ExtRequest::TrustList).await?;
    let r: ipc::TrustedList = decode(&v)?;
    let mut text = String::new();
    if r.trusted.is_empty() {
        text.push_str("No trusted peers\n");
    } else {
        let _ = writeln!(
            text,
            "{:>10}  {:<18} {:<24} {:<10} {:>7}  APPROVED",
            "NODE", "ADDRESS", "HOSTNAME", "ASKED BY", "NETWORK"
        );
        for t in &r.trusted {
            let name = hostname_of(&d, t.node_id).await;
            // v1's `mutual` records that this node had asked too when trust was set: true
            // at the requester, false at the approver of the same pair.
            let _ = writeln!(
                text,
                "{:>10}  {:<18} {:<24} {:<10} {:>7}  {}",
                t.node_id,
                Addr::new(0, t.node_id).to_string(),
                name.as_deref().unwrap_or("-"),
                if t.mutual { "this node" } else { "the peer" },
                t.network,
                ago(t.approved_at)
            );
        }
    }
    Ok(output(v, text))
}

// ---------------------------------------------------------------------------------------------
// Ping
// ---------------------------------------------------------------------------------------------

async fn ping(ctx: &Ctx, peer: &str, count: u32, timeout: Duration) -> Result<Output, CtlError> {
    if count == 0 {
        return Err(CtlError::new(
            code::BAD_REQUEST,
            "--count must be at least 1",
        ));
    }
    let (d, peer) = driver_and_peer(ctx, peer).await?;
    let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
    let limit = timeout
        .saturating_mul(count)
        .saturating_add(REQUEST_TIMEOUT);
    let mut v = ext_within(
        &d,
        ExtRequest::Ping {
            node_id: peer.node(),
            count,
            timeout_ms: Some(timeout_ms),
        },
        limit,
    )
    .await?;
    let r: ipc::PingReply = decode(&v)?;
    let rtts: Vec<f64> = r.results.iter().filter_map(|p| p.rtt_ms).collect();
    let sent = r.results.len();
    let received = rtts.len();
    let loss = if sent == 0 {
        100.0
    } else {
        100.0 * (sent - received) as f64 / sent as f64
    };
    let min = rtts.iter().copied().fold(f64::INFINITY, f64::min);
    let max = rtts.iter().copied().fold(0.0, f64::max);
    let avg = if received == 0 {
        0.0
    } else {
        rtts.iter().sum::<f64>() / received as f64
    };
    if received == 0 {
        let last = r
            .results
            .iter()
            .rev()
            .find_map(|p| p.error.clone())
            .unwrap_or_else(|| "no probe was sent".into());
        // A probe's error is the daemon's connection failure text, read like a v1 Error;
        // a probe that failed for no stated reason timed out.
        let c = match pilot_driver::v1_error_code(&last) {
            Some(c @ (code::REFUSED | code::UNTRUSTED | code::NOT_FOUND | code::UNAVAILABLE)) => c,
            _ => code::TIMEOUT,
        };
        return Err(CtlError::new(
            c,
            format!("no echo from {} in {sent} probe(s): {last}", peer.label()),
        ));
    }
    if let Some(o) = v.as_object_mut() {
        o.insert("target".into(), json!(peer.label()));
        o.insert(
            "summary".into(),
            json!({"sent": sent, "received": received, "loss_pct": loss,
                   "min_ms": min, "avg_ms": avg, "max_ms": max}),
        );
    }
    let mut text = format!("PING {} (node {})\n", peer.label(), r.node_id);
    for p in &r.results {
        match (p.rtt_ms, &p.error) {
            (Some(rtt), _) => {
                let path = match p.path {
                    Some(ipc::PathKind::Relayed) => "relayed",
                    Some(ipc::PathKind::Direct) => "direct",
                    None => "unknown path",
                };
                let _ = writeln!(text, "seq={} rtt={rtt:.3} ms ({path})", p.seq);
            }
            (None, e) => {
                let _ = writeln!(
                    text,
                    "seq={} error: {}",
                    p.seq,
                    e.as_deref().unwrap_or("no answer")
                );
            }
        }
    }
    let _ = writeln!(
        text,
        "{sent} probes, {received} answered, {loss:.0}% loss, rtt min/avg/max = \
         {min:.3}/{avg:.3}/{max:.3} ms"
    );
    Ok(output(v, text))
}

// ---------------------------------------------------------------------------------------------
// Data transfer
// ---------------------------------------------------------------------------------------------

async fn connect(
    ctx: &Ctx,
    target: &str,
    port: Option<u16>,
    message: Option<String>,
    timeout: Option<Duration>,
    mut stdin: Stdin<'_>,
    stdout: Stdout<'_>,
) -> Result<Output, CtlError> {
    let (target, port) = parse_endpoint(target, port, Some(DEFAULT_CONNECT_PORT))?;
    let d = ctx.driver().await?;
    let peer = resolve(&d, &target).await?;
    let dst = SocketAddr::new(peer.addr, port);
    let json = ctx.json;
    let mut captured = Vec::new();
    let mut truncated = false;
    let mut received = 0u64;
    let mut sent = 0u64;
    let mut send_error = None;
    let work = async {
        let stream = timed(DIAL_TIMEOUT, &format!("connect to {dst}"), d.dial(dst)).await?;
        let conn_id = stream.conn_id();
        let (mut rd, mut wr) = tokio::io::split(stream);
        let up = async {
            let n = match &message {
                Some(m) => {
                    wr.write_all(m.as_bytes()).await?;
                    m.len() as u64
                }
                None => tokio::io::copy(&mut stdin, &mut wr).await?,
            };
            wr.shutdown().await?;
            Ok::<u64, io::Error>(n)
        };
        let down = async {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = rd.read(&mut buf).await?;
                if n == 0 {
                    return Ok::<(), io::Error>(());
                }
                let chunk = buf.get(..n).unwrap_or_default();
                received += n as u64;
                if json {
                    let room = MAX_CAPTURE.saturating_sub(captured.len());
                    truncated |= n > room;
                    captured.extend_from_slice(chunk.get(..n.min(room)).unwrap_or_default());
                } else {
                    stdout.write_all(chunk)?;
                    stdout.flush()?;
                }
            }
        };
        tokio::pin!(up);
        tokio::pin!(down);
        let mut up_done = false;
        loop {
            tokio::select! {
                r = &mut up, if !up_done => {
                    up_done = true;
                    match r {
                        Ok(n) => sent = n,
                        Err(e) => send_error = Some(e.to_string()),
                    }
                }
                r = &mut down => {
                    r.map_err(|e| io_error("receive", e))?;
                    break;
                }
            }
        }
        Ok::<u32, CtlError>(conn_id)
    };
    let conn_id = match timeout {
        Some(t) => tokio::time::timeout(t, work).await.map_err(|_| {
            CtlError::new(
                code::TIMEOUT,
                format!("connection to {dst} still open after {}", fmt_duration(t)),
            )
        })??,
        None => work.await?,
    };
    sync(&d).await?;
    let mut data = json!({
        "target": peer.label(),
        "address": peer.addr.to_string(),
        "port": port,
        "conn_id": conn_id,
        "bytes_sent": sent,
        "bytes_received": received,
    });
    if json {
        data["response"] = json!(String::from_utf8_lossy(&captured));
        data["truncated"] = json!(truncated);
    }
    if let Some(e) = send_error {
        data["send_error"] = json!(e);
    }
    Ok(output(data, String::new()))
}

struct SendOpts {
    datagram: bool,
    no_wait: bool,
    timeout: Duration,
}

async fn send_message(
    ctx: &Ctx,
    target: &str,
    rest: &[String],
    opts: SendOpts,
    stdin: Stdin<'_>,
) -> Result<Output, CtlError> {
    let (target, port, message) = match parse_endpoint(target, None, None) {
        Ok((t, p)) => {
            if rest.len() > 1 {
                return Err(CtlError::new(
                    code::BAD_REQUEST,
                    format!("{target} names its port; give only the message after it"),
                ));
            }
            (t, p, rest.first())
        }
        Err(e) => {
            let Some(p) = rest.first() else {
                return Err(e);
            };
            let p: u16 = p.parse().map_err(|_| {
                CtlError::new(code::BAD_ADDRESS, format!("{p:?} is not a port (0-65535)"))
            })?;
            let (t, p) = parse_endpoint(target, Some(p), None)?;
            (t, p, rest.get(1))
        }
    };
    let payload = match message {
        Some(m) => m.clone().into_bytes(),
        None => read_stdin(stdin).await?,
    };
    let d = ctx.driver().await?;
    let peer = resolve(&d, &target).await?;
    let dst = SocketAddr::new(peer.addr, port);
    let mut data = json!({
        "target": peer.label(),
        "address": peer.addr.to_string(),
        "port": port,
        "mode": if opts.datagram { "datagram" } else { "stream" },
        "bytes": payload.len(),
    });
    if opts.datagram {
        d.send_to(dst, &payload).await.map_err(driver_error)?;
        // A failed send comes back as an Error, answering the next request.
        sync(&d).await?;
        let text = format!("Sent a {}-byte datagram to {dst}", payload.len());
        return Ok(output(data, text));
    }
    let deadline = Instant::now() + opts.timeout;
    let mut stream = timed(opts.timeout, &format!("connect to {dst}"), d.dial(dst)).await?;
    stream
        .write_all(&payload)
        .await
        .map_err(|e| io_error("send", e))?;
    stream.shutdown().await.map_err(|e| io_error("send", e))?;
    data["conn_id"] = json!(stream.conn_id());
    let mut text = format!("Sent {} bytes to {dst}", payload.len());
    if !opts.no_wait {
        let mut reply = Vec::new();
        let left = deadline.saturating_duration_since(Instant::now());
        let read = async {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    return Ok::<(), io::Error>(());
                }
                let room = MAX_CAPTURE.saturating_sub(reply.len());
                reply.extend_from_slice(buf.get(..n.min(room)).unwrap_or_default());
            }
        };
        let eof = match tokio::time::timeout(left, read).await {
            Ok(r) => {
                r.map_err(|e| io_error("receive", e))?;
                true
            }
            Err(_) => false,
        };
        data["reply"] = json!(String::from_utf8_lossy(&reply));
        data["reply_bytes"] = json!(reply.len());
        data["eof"] = json!(eof);
        if !reply.is_empty() {
            let _ = write!(
                text,
                "\nReply ({} bytes):\n{}",
                reply.len(),
                String::from_utf8_lossy(&reply)
            );
        }
        if !eof {
            let _ = write!(text, "\n(the peer kept the connection open)");
        }
    }
    drop(stream);
    sync(&d).await?;
    Ok(output(data, text))
}

/// A message `listen` received.
struct Received {
    kind: &'static str,
    src: SocketAddr,
    data: Vec<u8>,
    error: Option<String>,
}

async fn listen(
    ctx: &Ctx,
    port: u16,
    count: Option<u64>,
    timeout: Option<Duration>,
    stdout: Stdout<'_>,
) -> Result<Output, CtlError> {
    if ctx.json && count.is_none() && timeout.is_none() {
        return Err(CtlError::new(
            code::BAD_REQUEST,
            "with --json, give --count or --timeout so that listen ends",
        ));
    }
    if count == Some(0) {
        return Err(CtlError::new(
            code::BAD_REQUEST,
            "--count must be at least 1",
        ));
    }
    let d = ctx.driver().await?;
    let mut listener = timed(
        REQUEST_TIMEOUT,
        &format!("bind port {port}"),
        d.listen(port),
    )
    .await?;
    if !ctx.json {
        let _ = writeln!(stdout, "Listening on port {port}");
        let _ = stdout.flush();
    }
    let (tx, mut rx) = mpsc::channel::<Received>(64);
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let sleep = async {
        match deadline {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(sleep);
    let mut messages = Vec::new();
    let mut timed_out = false;
    loop {
        if count.is_some_and(|c| messages.len() as u64 >= c) {
            break;
        }
        let got = tokio::select! {
            _ = &mut sleep => {
                timed_out = true;
                break;
            }
            dg = d.recv_from() => {
                let dg = dg.map_err(driver_error)?;
                if dg.dst_port != port {
                    continue;
                }
                Received { kind: "datagram", src: dg.src, data: dg.data, error: None }
            }
            acc = listener.accept() => {
                let (mut stream, remote) = acc.map_err(driver_error)?;
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut data = Vec::new();
                    let r = (&mut stream)
                        .take(MAX_STREAM_MESSAGE as u64)
                        .read_to_end(&mut data)
                        .await;
                    let error = r.err().map(|e| e.to_string());
                    let _ = tx
                        .send(Received { kind: "stream", src: remote, data, error })
                        .await;
                });
                continue;
            }
            Some(m) = rx.recv() => m,
        };
        let seq = messages.len() + 1;
        let text = String::from_utf8_lossy(&got.data).into_owned();
        if !ctx.json {
            let _ = writeln!(
                stdout,
                "[{seq}] {} {} ({} bytes): {text}",
                got.src,
                got.kind,
                got.data.len()
            );
            let _ = stdout.flush();
        }
        let mut m = json!({
            "seq": seq,
            "kind": got.kind,
            "src_addr": got.src.addr.to_string(),
            "src_port": got.src.port,
            "data": text,
            "bytes": got.data.len(),
        });
        if let Some(e) = got.error {
            m["error"] = json!(e);
        }
        messages.push(m);
    }
    let total = messages.len();
    let text = if timed_out && !ctx.json {
        format!("{total} message(s); stopped at the timeout")
    } else {
        String::new()
    };
    Ok(output(
        json!({"port": port, "messages": messages, "total": total, "timeout": timed_out}),
        text,
    ))
}

/// One connection to the peer's echo port: its setup time, then `count` probes on it.
async fn traceroute(
    ctx: &Ctx,
    peer: &str,
    count: u32,
    timeout: Duration,
) -> Result<Output, CtlError> {
    if count == 0 || count > 100 {
        return Err(CtlError::new(
            code::BAD_REQUEST,
            "--count must be between 1 and 100",
        ));
    }
    let (d, peer) = driver_and_peer(ctx, peer).await?;
    let dst = SocketAddr::new(peer.addr, 7);
    let t0 = Instant::now();
    let mut stream = timed(timeout, &format!("connect to {dst}"), d.dial(dst)).await?;
    let setup = t0.elapsed();
    let mut samples = Vec::new();
    let mut text = format!(
        "traceroute to {} ({dst})
  setup  {:.3} ms
",
        peer.label(),
        ms(setup)
    );
    for i in 0..count {
        let probe = format!("pilot traceroute {i}");
        let t = Instant::now();
        let r = tokio::time::timeout(timeout, async {
            stream.write_all(probe.as_bytes()).await?;
            let mut back = vec![0u8; probe.len()];
            stream.read_exact(&mut back).await?;
            Ok::<_, io::Error>(back == probe.as_bytes())
        })
        .await;
        match r {
            Ok(Ok(true)) => {
                let rtt = ms(t.elapsed());
                let _ = writeln!(text, "  probe {i}  {rtt:.3} ms");
                samples.push(json!({"seq": i, "rtt_ms": rtt, "bytes": probe.len()}));
            }
            Ok(Ok(false)) => {
                return Err(CtlError::new(
                    code::BAD_REPLY,
                    format!("port 7 of {} answered with other bytes", peer.label()),
                ))
            }
            Ok(Err(e)) => return Err(io_error("probe", e)),
            Err(_) => {
                // A late echo would be read as the next probe's: stop here.
                let _ = writeln!(text, "  probe {i}  timeout (no further probes)");
                samples.push(json!({"seq": i, "error": "timeout"}));
                break;
            }
        }
    }
    drop(stream);
    let path = path_of(&d, peer.node()).await;
    let _ = write!(text, "  path   {path}");
    let data = json!({
        "target": peer.label(),
        "address": peer.addr.to_string(),
        "setup_ms": ms(setup),
        "rtt_samples": samples,
        "path": path,
    });
    Ok(output(data, text))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// "direct" or "relayed" for a tunnel peer, "unknown" when the daemon does not list it.
async fn path_of(d: &Driver, node: u32) -> &'static str {
    let Ok(v) = ext(
        d,
        ExtRequest::Peers {
            search: Some(node.to_string()),
        },
    )
    .await
    else {
        return "unknown";
    };
    let Ok(r) = decode::<ipc::PeersReply>(&v) else {
        return "unknown";
    };
    match r.peers.iter().find(|p| p.node_id == node) {
        Some(p) if p.relay => "relayed",
        Some(_) => "direct",
        None => "unknown",
    }
}

async fn bench(
    ctx: &Ctx,
    peer: &str,
    size: u64,
    port: u16,
    timeout: Duration,
) -> Result<Output, CtlError> {
    if size == 0 {
        return Err(CtlError::new(
            code::BAD_REQUEST,
            "--size must be at least 1 byte",
        ));
    }
    let (d, peer) = driver_and_peer(ctx, peer).await?;
    let dst = SocketAddr::new(peer.addr, port);
    let work = async {
        let stream = timed(DIAL_TIMEOUT, &format!("connect to {dst}"), d.dial(dst)).await?;
        let (mut rd, mut wr) = tokio::io::split(stream);
        let t0 = Instant::now();
        let chunk = vec![0x5Au8; BENCH_CHUNK];
        let bar = progress_bar(ctx, size, "sent");
        let up = async {
            let mut left = size;
            while left > 0 {
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(BENCH_CHUNK);
                wr.write_all(chunk.get(..n).unwrap_or_default()).await?;
                left -= n as u64;
                if let Some(b) = &bar {
                    b.inc(n as u64);
                }
            }
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            Ok::<Duration, io::Error>(t0.elapsed())
        };
        let down = async {
            let mut buf = vec![0u8; 256 * 1024];
            let mut got = 0u64;
            loop {
                let n = rd.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                got += n as u64;
                if got >= size {
                    break;
                }
            }
            Ok::<(u64, Duration), io::Error>((got, t0.elapsed()))
        };
        let (up, down) = tokio::join!(up, down);
        // Our direction ends only now, once every echoed byte is counted (or the echo
        // ended): a v1 echo takes our FIN as the end of both directions and drops what it
        // has not echoed yet (v1 wire §3.6).
        let _ = wr.shutdown().await;
        let send_time = up.map_err(|e| io_error("send", e))?;
        let (got, total_time) = down.map_err(|e| io_error("receive", e))?;
        Ok::<_, CtlError>((send_time, got, total_time))
    };
    let (send_time, got, total_time) =
        tokio::time::timeout(timeout, work).await.map_err(|_| {
            CtlError::new(
                code::TIMEOUT,
                format!("bench to {dst} not done after {}", fmt_duration(timeout)),
            )
        })??;
    if got < size {
        return Err(short_echo(&dst, got, size));
    }
    let mbps = |bytes: u64, t: Duration| bytes as f64 / t.as_secs_f64().max(1e-9) / 1e6;
    let send_mbps = mbps(size, send_time);
    let total_mbps = mbps(size, total_time);
    let data = json!({
        "target": peer.label(),
        "address": peer.addr.to_string(),
        "port": port,
        "size": size,
        "sent_bytes": size,
        "recv_bytes": got,
        "send_secs": send_time.as_secs_f64(),
        "total_secs": total_time.as_secs_f64(),
        "send_mbps": send_mbps,
        "total_mbps": total_mbps,
    });
    let text = format!(
        "Sent {} to {dst} in {:.3} s: {send_mbps:.1} MB/s\n\
         Echoed back in {:.3} s: {total_mbps:.1} MB/s round trip",
        fmt_bytes(size),
        send_time.as_secs_f64(),
        total_time.as_secs_f64()
    );
    Ok(output(data, text))
}

/// A bench whose echo ended (the peer closed) before every byte sent came back.
fn short_echo(dst: &SocketAddr, got: u64, size: u64) -> CtlError {
    CtlError::new(
        code::SHORT_ECHO,
        format!(
            "bench to {dst}: the peer echoed back {got} of {size} bytes ({} of {}) and closed; \
             is port {} an echo service?",
            fmt_bytes(got),
            fmt_bytes(size),
            dst.port
        ),
    )
}

// ---------------------------------------------------------------------------------------------
// Formatting
// ---------------------------------------------------------------------------------------------

/// A progress bar on stderr for `total` bytes, only for people: not with `--json` and not
/// when stderr is not a terminal.
pub(crate) fn progress_bar(ctx: &Ctx, total: u64, what: &str) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if ctx.json || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(total),
        indicatif::ProgressDrawTarget::stderr(),
    );
    let style = indicatif::ProgressStyle::with_template(
        "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} {msg} (eta {eta})",
    )
    .ok()?;
    bar.set_style(style);
    bar.set_message(what.to_owned());
    Some(bar)
}

pub(crate) fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

pub(crate) fn fmt_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS.get(u).copied().unwrap_or("B"))
    }
}

pub(crate) fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s == 0 {
        return format!("{} ms", d.as_millis());
    }
    let (h, m, s) = (s / 3600, (s / 60) % 60, s % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s:02}s"),
        _ => format!("{h}h{m:02}m{s:02}s"),
    }
}

/// How long ago a Unix time was, for tables.
pub(crate) fn ago(unix_secs: i64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    let delta = u64::try_from(now.saturating_sub(unix_secs)).unwrap_or(0);
    format!("{} ago", fmt_duration(Duration::from_secs(delta)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_daemon_socket_follows_pilotds_config_file_and_home() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("pilotd.json");
        std::fs::write(&cfg, br#"{"-socket": "/tmp/x/ctl.sock", "home": "/h"}"#).unwrap();
        assert_eq!(
            daemon_socket(Some("/env-home".into()), Some(cfg.clone())),
            Some(PathBuf::from("/tmp/x/ctl.sock"))
        );
        assert_eq!(
            config_paths(&cfg),
            Some((Some("/h".into()), Some("/tmp/x/ctl.sock".into())))
        );
        std::fs::write(&cfg, br#"{"home": "/h", "socket": ""}"#).unwrap();
        assert_eq!(config_paths(&cfg), Some((Some("/h".into()), None)));
        if !nix::unistd::geteuid().is_root() {
            assert_eq!(
                daemon_socket(Some("/env-home".into()), Some(cfg.clone())),
                Some(PathBuf::from("/env-home/pilotd.sock"))
            );
            assert_eq!(
                daemon_socket(None, Some(cfg.clone())),
                Some(PathBuf::from("/h/pilotd.sock"))
            );
        } else {
            // As root pilotd uses the system socket whatever the home.
            assert_eq!(
                daemon_socket(Some("/env-home".into()), Some(cfg.clone())),
                Some(PathBuf::from(SYSTEM_SOCKET))
            );
        }
        std::fs::write(&cfg, b"not json").unwrap();
        assert_eq!(daemon_socket(None, Some(cfg)), None);
        assert_eq!(daemon_socket(None, Some(dir.path().join("missing"))), None);
    }
}
