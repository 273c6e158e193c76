//! Commands for the built-in services: a peer's data exchange (port 1001), event stream
//! (port 1002) and nameserver (port 53), and the local inbox, received files and name records.

use std::time::Duration;

use std::fmt::Write as _;

use pilot_driver::services::dataexchange::{self, SendError, DATA_PORT};
use pilot_driver::services::eventstream::{self, EVENT_STREAM_PORT};
use pilot_driver::services::nameserver;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tunnel::ipc::{code, ExtRequest};
use tunnel::services::dataexchange::{BadMessageType, FrameType};
use tunnel::services::eventstream::{check_payload_len, check_topic_len, WILDCARD};
use tunnel::services::nameserver::{parse_request, Request, Response, ERR_NOT_FOUND};
use tunnel::SocketAddr;

use crate::cli::{NamesCmd, TasksCmd};
use crate::commands::{
    driver_and_peer, ext, io_error, output, progress_bar, read_stdin, timed, Ctx, Stdin, Stdout,
    DIAL_TIMEOUT,
};
use crate::{CtlError, Output};

/// The nameserver's virtual port.
const NAMESERVER_PORT: u16 = 53;

/// The message: the argument, else stdin (at most [`MAX_STDIN_MESSAGE`] bytes).
async fn message_or_stdin(data: Option<String>, stdin: Stdin<'_>) -> Result<Vec<u8>, CtlError> {
    match data {
        Some(d) => Ok(d.into_bytes()),
        None => read_stdin(stdin).await,
    }
}

/// Text from a peer, safe to print on a terminal: control characters other than newline
/// and tab are shown escaped.
pub(crate) fn clean(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() && c != '\n' && c != '\t' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

fn stream_error(what: &str, e: impl std::fmt::Display) -> CtlError {
    CtlError::new(code::REFUSED, format!("{what}: {e}"))
}

/// Subscribes to `topic` (`*` for all) on the peer's broker and prints what arrives.
pub(crate) async fn subscribe(
    ctx: &Ctx,
    peer: &str,
    topic: &str,
    count: Option<u64>,
    timeout: Option<Duration>,
    stdout: Stdout<'_>,
) -> Result<Output, CtlError> {
    if ctx.json && count.is_none() && timeout.is_none() {
        return Err(CtlError::new(
            code::BAD_REQUEST,
            "with --json, give --count or --timeout so that subscribe ends",
        ));
    }
    if count == Some(0) {
        return Err(CtlError::new(
            code::BAD_REQUEST,
            "--count must be at least 1",
        ));
    }
    check_topic_len(topic.len()).map_err(|e| CtlError::new(code::BAD_REQUEST, e.to_string()))?;
    let (d, peer) = driver_and_peer(ctx, peer).await?;
    let dst = SocketAddr::new(peer.addr, EVENT_STREAM_PORT);
    let mut stream = timed(DIAL_TIMEOUT, &format!("connect to {dst}"), d.dial(dst)).await?;
    eventstream::subscribe(&mut stream, topic)
        .await
        .map_err(|e| stream_error("subscribe", e))?;
    let frame_len = subscription_frame_len(topic)?;
    tokio::time::timeout(DIAL_TIMEOUT, acknowledged(&d, stream.conn_id(), frame_len))
        .await
        .map_err(|_| {
            CtlError::new(
                code::TIMEOUT,
                format!("the broker at {dst} did not acknowledge the subscription in time"),
            )
        })??;
    if !ctx.json {
        let _ = writeln!(stdout, "Subscribed to {topic:?} on {}", peer.label());
        let _ = stdout.flush();
    }
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let mut events = Vec::new();
    let mut received = 0u64;
    let mut timed_out = false;
    let mut ended = false;
    while count.is_none_or(|c| received < c) {
        let next = eventstream::next_event(&mut stream);
        let got = match deadline {
            Some(at) => match tokio::time::timeout_at(at, next).await {
                Ok(r) => r,
                Err(_) => {
                    timed_out = true;
                    break;
                }
            },
            None => next.await,
        };
        let Some((t, payload)) = got.map_err(|e| stream_error("event stream", e))? else {
            ended = true;
            break;
        };
        let text = String::from_utf8_lossy(&payload).into_owned();
        received += 1;
        if ctx.json {
            events.push(json!({"topic": t, "data": text, "bytes": payload.len()}));
        } else {
            let _ = writeln!(stdout, "[{}] {}", clean(&t), clean(&text));
            let _ = stdout.flush();
        }
    }
    let n = received;
    let data = json!({
        "target": peer.label(),
        "topic": topic,
        "events": events,
        "total": n,
        "timeout": timed_out,
        "closed": ended,
    });
    if ended {
        return Err(CtlError::new(
            code::REFUSED,
            format!(
                "the subscription to {topic:?} on {} ended: the broker closed the stream \
                 after {n} event(s)",
                peer.label()
            ),
        ));
    }
    Ok(output(data, String::new()))
}

/// How often [`acknowledged`] asks the daemon about the connection.
const ACK_POLL: Duration = Duration::from_millis(2);

/// Bytes of the subscription frame [`eventstream::subscribe`] sends for `topic`.
fn subscription_frame_len(topic: &str) -> Result<u64, CtlError> {
    tunnel::services::eventstream::encode_frame_header(topic, 0)
        .map(|h| h.len() as u64)
        .map_err(|e| CtlError::new(code::BAD_REQUEST, e.to_string()))
}

/// Waits until the peer has acknowledged, at the transport level, every byte of connection
/// `conn` and at least `sent` bytes were sent on it: the subscription frame has reached the
/// broker's node. The event stream protocol has no acknowledgement of its own (v1 wire §8.3),
/// so this is the closest wire-compatible sign that the subscription is live; what remains
/// is the time the broker takes to read the frame it already holds.
async fn acknowledged(d: &pilot_driver::Driver, conn: u32, sent: u64) -> Result<(), CtlError> {
    loop {
        let v = ext(d, ExtRequest::Connections).await?;
        let r: tunnel::ipc::ConnectionsReply = crate::commands::decode(&v)?;
        let Some(c) = r.connections.iter().find(|c| c.id == conn) else {
            return Err(CtlError::new(
                code::REFUSED,
                "the connection to the broker ended before it acknowledged the subscription",
            ));
        };
        // The engine names states by their Debug form; anything past Established means
        // the connection is closing.
        if !c.state.eq_ignore_ascii_case("established") {
            return Err(CtlError::new(
                code::REFUSED,
                format!(
                    "the connection to the broker is {} before it acknowledged the subscription",
                    c.state
                ),
            ));
        }
        if c.bytes_sent >= sent && c.unacked == 0 {
            return Ok(());
        }
        tokio::time::sleep(ACK_POLL).await;
    }
}

/// Publishes one event on the peer's broker (as v1: subscribe to the topic, then publish).
pub(crate) async fn publish(
    ctx: &Ctx,
    peer: &str,
    topic: &str,
    data: Option<String>,
    stdin: Stdin<'_>,
) -> Result<Output, CtlError> {
    if topic == WILDCARD {
        return Err(CtlError::new(
            code::BAD_REQUEST,
            "publish to a named topic; `*` only subscribes",
        ));
    }
    check_topic_len(topic.len()).map_err(|e| CtlError::new(code::BAD_REQUEST, e.to_string()))?;
    let payload = message_or_stdin(data, stdin).await?;
    check_payload_len(payload.len() as u64)
        .map_err(|e| CtlError::new(code::BAD_REQUEST, e.to_string()))?;
    let (d, peer) = driver_and_peer(ctx, peer).await?;
    let dst = SocketAddr::new(peer.addr, EVENT_STREAM_PORT);
    let mut stream = timed(DIAL_TIMEOUT, &format!("connect to {dst}"), d.dial(dst)).await?;
    eventstream::subscribe(&mut stream, topic)
        .await
        .map_err(|e| stream_error("subscribe", e))?;
    eventstream::publish(&mut stream, topic, &payload)
        .await
        .map_err(|e| stream_error("publish", e))?;
    stream
        .shutdown()
        .await
        .map_err(|e| io_error("publish", e))?;
    let data = json!({"target": peer.label(), "topic": topic, "bytes": payload.len()});
    let text = format!(
        "Published {} bytes to {topic:?} on {}",
        payload.len(),
        peer.label()
    );
    Ok(output(data, text))
}

pub(crate) async fn names(ctx: &Ctx, cmd: NamesCmd) -> Result<Output, CtlError> {
    match cmd {
        NamesCmd::List => {
            let d = ctx.driver().await?;
            let v = ext(&d, ExtRequest::NameList).await?;
            let mut text = String::new();
            for r in v["records"].as_array().into_iter().flatten() {
                text.push_str(&record_line(r));
                text.push('\n');
            }
            if text.is_empty() {
                text = "No records".into();
            }
            Ok(output(v, text))
        }
        NamesCmd::Add { record } => {
            let d = ctx.driver().await?;
            let v = ext(
                &d,
                ExtRequest::NameAdd {
                    record: record.join(" "),
                },
            )
            .await?;
            let text = format!("Added {}", record_line(&v));
            Ok(output(v, text))
        }
        NamesCmd::Remove { record } => {
            let d = ctx.driver().await?;
            let joined = record.join(" ");
            let v = ext(
                &d,
                ExtRequest::NameRemove {
                    record: joined.clone(),
                },
            )
            .await?;
            if v["removed"] != true {
                return Err(CtlError::new(
                    code::NOT_FOUND,
                    format!("no record {joined}"),
                ));
            }
            Ok(output(v, format!("Removed {joined}")))
        }
        NamesCmd::Query { peer, query } => query_peer(ctx, &peer, &query.join(" ")).await,
    }
}

fn record_line(r: &Value) -> String {
    let s = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
    let origin = match r["origin"].as_str() {
        Some("remote") => format!(" (from {}, expires {})", s("owner"), r["expires"]),
        _ => String::new(),
    };
    match r["type"].as_str() {
        Some("A") => format!("A {} {}{origin}", s("name"), s("address")),
        Some("N") => format!("N {} {}{origin}", s("name"), r["network_id"]),
        Some("S") => format!(
            "S {} {} network {} port {}{origin}",
            s("name"),
            s("address"),
            r["network_id"],
            r["port"]
        ),
        _ => r.to_string(),
    }
}

/// Asks a peer's nameserver: `A <name>`, `N <name>` or `S <net_id> <port>`.
async fn query_peer(ctx: &Ctx, peer: &str, query: &str) -> Result<Output, CtlError> {
    let req = parse_request(&format!("QUERY {query}")).map_err(|e| {
        CtlError::new(
            code::BAD_REQUEST,
            format!("query {query:?}: {e} (write `A <name>`, `N <name>` or `S <net_id> <port>`)"),
        )
    })?;
    if matches!(req, Request::Register(_)) {
        return Err(CtlError::new(code::BAD_REQUEST, "not a query"));
    }
    let (d, peer) = driver_and_peer(ctx, peer).await?;
    let dst = SocketAddr::new(peer.addr, NAMESERVER_PORT);
    let mut stream = timed(DIAL_TIMEOUT, &format!("connect to {dst}"), d.dial(dst)).await?;
    let resp = tokio::time::timeout(DIAL_TIMEOUT, nameserver::query(&mut stream, &req))
        .await
        .map_err(|_| CtlError::new(code::TIMEOUT, format!("{dst} did not answer")))?
        .map_err(|e| stream_error("nameserver", e))?;
    let (data, text) = match resp {
        Response::Err(m) if m == ERR_NOT_FOUND => {
            return Err(CtlError::new(
                code::NOT_FOUND,
                format!("{}: {query}: {m}", peer.label()),
            ))
        }
        Response::Err(m) => {
            return Err(CtlError::new(
                code::REFUSED,
                format!("{}: {m}", peer.label()),
            ))
        }
        other => (
            json!({"target": peer.label(), "answer": response_json(&other)}),
            other.to_text(),
        ),
    };
    Ok(output(data, text))
}

fn response_json(r: &Response) -> Value {
    match r {
        Response::A { name, addr } => {
            json!({"type": "A", "name": name, "address": addr.to_string()})
        }
        Response::N { name, network } => json!({"type": "N", "name": name, "network_id": network}),
        Response::S(entries) => json!({"type": "S", "providers": entries.iter().map(|e| json!({
            "name": e.name, "address": e.addr.to_string(), "port": e.port})).collect::<Vec<_>>()}),
        Response::Ok => json!({"type": "OK"}),
        Response::Err(m) => json!({"type": "ERR", "message": m}),
    }
}

fn send_error(peer: &str, e: SendError) -> CtlError {
    match e {
        SendError::Invalid(m) => CtlError::new(code::BAD_REQUEST, m),
        SendError::Io(e) => io_error(&format!("send to {peer}"), e),
        SendError::File(e) => CtlError::new(code::BAD_REQUEST, format!("reading the file: {e}")),
        SendError::Refused(m) => CtlError::new(code::REFUSED, format!("{peer} refused: {m}")),
        SendError::Unsupported(m) => CtlError::new(
            code::UNSUPPORTED,
            format!("{peer} does not accept files over 16 MiB (it answered {m:?})"),
        ),
        SendError::Protocol(m) => CtlError::new(code::BAD_REPLY, format!("{peer}: {m}")),
    }
}

/// Sends a typed message to the peer's data exchange service (port 1001).
pub(crate) async fn send_message(
    ctx: &Ctx,
    peer: &str,
    data: Option<String>,
    kind: &str,
    timeout: Duration,
    stdin: Stdin<'_>,
) -> Result<Output, CtlError> {
    let kind: FrameType = kind
        .parse()
        .map_err(|e: BadMessageType| CtlError::new(code::BAD_REQUEST, e.to_string()))?;
    let payload = message_or_stdin(data, stdin).await?;
    if kind == FrameType::Json && serde_json::from_slice::<Value>(&payload).is_err() {
        return Err(CtlError::new(
            code::BAD_REQUEST,
            "--type json needs a valid JSON document",
        ));
    }
    let (d, peer) = driver_and_peer(ctx, peer).await?;
    let dst = SocketAddr::new(peer.addr, DATA_PORT);
    let label = peer.label();
    let work = async {
        let mut stream = timed(DIAL_TIMEOUT, &format!("connect to {dst}"), d.dial(dst)).await?;
        let ack = dataexchange::send_message(&mut stream, kind, &payload)
            .await
            .map_err(|e| send_error(&label, e))?;
        let _ = stream.shutdown().await;
        Ok::<_, CtlError>(ack)
    };
    let ack = tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| CtlError::new(code::TIMEOUT, format!("{label} did not acknowledge")))??;
    let data =
        json!({"target": label, "type": kind.to_string(), "bytes": payload.len(), "ack": ack});
    Ok(output(data, format!("{ack} ({label})")))
}

/// Sends a file to the peer's data exchange service (port 1001).
pub(crate) async fn send_file(
    ctx: &Ctx,
    peer: &str,
    path: &std::path::Path,
    name: Option<String>,
    timeout: Option<Duration>,
) -> Result<Output, CtlError> {
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| CtlError::new(code::BAD_REQUEST, format!("{}: {e}", path.display())))?;
    let meta = file
        .metadata()
        .await
        .map_err(|e| CtlError::new(code::BAD_REQUEST, format!("{}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(CtlError::new(
            code::BAD_REQUEST,
            format!("{} is not a regular file", path.display()),
        ));
    }
    let size = meta.len();
    let name = match name {
        Some(n) => n,
        None => path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| CtlError::new(code::BAD_REQUEST, "the path names no file"))?,
    };
    let (d, peer) = driver_and_peer(ctx, peer).await?;
    let dst = SocketAddr::new(peer.addr, DATA_PORT);
    let label = peer.label();
    let bar = progress_bar(ctx, size, &name);
    let t0 = std::time::Instant::now();
    let work = async {
        let mut stream = timed(DIAL_TIMEOUT, &format!("connect to {dst}"), d.dial(dst)).await?;
        let reader = tokio::io::BufReader::with_capacity(256 * 1024, file);
        let ack = dataexchange::send_file(&mut stream, &name, reader, size, |n| {
            if let Some(b) = &bar {
                b.set_position(n);
            }
        })
        .await
        .map_err(|e| send_error(&label, e))?;
        let _ = stream.shutdown().await;
        Ok::<_, CtlError>(ack)
    };
    let r = match timeout {
        Some(t) => tokio::time::timeout(t, work)
            .await
            .map_err(|_| CtlError::new(code::TIMEOUT, format!("{label} did not acknowledge")))?,
        None => work.await,
    };
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let ack = r?;
    let secs = t0.elapsed().as_secs_f64();
    let mbps = size as f64 / secs.max(1e-9) / 1e6;
    let data = json!({"target": label, "filename": name, "bytes": size, "ack": ack,
                      "secs": secs, "mbps": mbps});
    Ok(output(
        data,
        format!("Sent {name} ({size} bytes) to {label} in {secs:.2} s ({mbps:.1} MB/s): {ack}"),
    ))
}

/// Messages received by the local data exchange and stdio services.
pub(crate) async fn inbox(ctx: &Ctx, clear: bool) -> Result<Output, CtlError> {
    let d = ctx.driver().await?;
    let v = ext(&d, ExtRequest::Inbox { clear }).await?;
    if clear {
        let text = format!("Deleted {} messages", v["cleared"]);
        return Ok(output(v, text));
    }
    let mut text = String::new();
    for m in v["messages"].as_array().into_iter().flatten() {
        let _ = writeln!(
            text,
            "{}  {}  from {}  {} bytes\n  {}",
            m["received_at"].as_str().unwrap_or_default(),
            m["type"].as_str().unwrap_or_default(),
            m["from"].as_str().unwrap_or_default(),
            m["bytes"],
            clean(m["data"].as_str().unwrap_or_default())
        );
    }
    if v["omitted"].as_u64().unwrap_or(0) > 0 {
        let _ = writeln!(
            text,
            "({} older messages not shown; the reply has a size limit)",
            v["omitted"]
        );
    }
    if text.is_empty() {
        text = "No messages".into();
    }
    Ok(output(v, text))
}

/// Files received by the local data exchange service.
pub(crate) async fn received(ctx: &Ctx, clear: bool) -> Result<Output, CtlError> {
    let d = ctx.driver().await?;
    let v = ext(&d, ExtRequest::Received { clear }).await?;
    if clear {
        let text = format!("Deleted {} files", v["cleared"]);
        return Ok(output(v, text));
    }
    let mut text = String::new();
    for f in v["files"].as_array().into_iter().flatten() {
        let _ = writeln!(
            text,
            "{}  {:>12} bytes  {}",
            f["modified"].as_str().unwrap_or_default(),
            f["bytes"],
            clean(f["path"].as_str().unwrap_or_default())
        );
    }
    if v["omitted"].as_u64().unwrap_or(0) > 0 {
        let _ = writeln!(text, "({} older files not shown)", v["omitted"]);
    }
    if text.is_empty() {
        text = "No files".into();
    }
    Ok(output(v, text))
}

pub(crate) async fn tasks(ctx: &Ctx, cmd: TasksCmd) -> Result<Output, CtlError> {
    let d = ctx.driver().await?;
    match cmd {
        TasksCmd::Submit { peer, description } => {
            let target = crate::parse::parse_target(&peer)?;
            let peer = crate::commands::resolve(&d, &target).await?;
            let v = ext(
                &d,
                ExtRequest::TaskSubmit {
                    node_id: peer.node(),
                    description: description.join(" "),
                },
            )
            .await?;
            if v["accepted"] != true {
                return Err(CtlError::new(
                    code::REFUSED,
                    format!(
                        "{} refused the task: {}",
                        peer.label(),
                        v["message"].as_str().unwrap_or_default()
                    ),
                ));
            }
            let text = format!(
                "Task {} queued at {} ({}); it runs once they accept it",
                v["task_id"].as_str().unwrap_or_default(),
                peer.label(),
                v["message"].as_str().unwrap_or_default()
            );
            Ok(output(v, text))
        }
        TasksCmd::List { kind } => {
            let v = ext(&d, ExtRequest::TaskList { kind }).await?;
            let mut text = String::new();
            for t in v["tasks"].as_array().into_iter().flatten() {
                let s = |k: &str| clean(t[k].as_str().unwrap_or_default());
                let _ = writeln!(
                    text,
                    "{}  {:<10} {:<9} from {} to {}\n  {}",
                    s("task_id"),
                    s("status"),
                    s("category"),
                    s("from"),
                    s("to"),
                    s("description")
                );
                if let Some(f) = t["result_file"].as_str().filter(|f| !f.is_empty()) {
                    let _ = writeln!(text, "  results in {}", clean(f));
                }
            }
            if text.is_empty() {
                text = "No tasks".into();
            }
            Ok(output(v, text))
        }
        TasksCmd::Queue => {
            let v = ext(&d, ExtRequest::TaskQueue).await?;
            let mut text = String::new();
            for t in v["queue"].as_array().into_iter().flatten() {
                let _ = writeln!(
                    text,
                    "{}  from {}  {}",
                    t["task_id"].as_str().unwrap_or_default(),
                    t["from"].as_str().unwrap_or_default(),
                    clean(t["description"].as_str().unwrap_or_default())
                );
            }
            if text.is_empty() {
                text = "The queue is empty".into();
            }
            Ok(output(v, text))
        }
        TasksCmd::Accept { task_id } => {
            status_output(ext(&d, ExtRequest::TaskAccept { task_id }).await?)
        }
        TasksCmd::Decline {
            task_id,
            justification,
        } => status_output(
            ext(
                &d,
                ExtRequest::TaskDecline {
                    task_id,
                    justification: justification.join(" "),
                },
            )
            .await?,
        ),
        TasksCmd::Cancel { task_id } => {
            status_output(ext(&d, ExtRequest::TaskCancel { task_id }).await?)
        }
        TasksCmd::Execute => {
            let v = ext(&d, ExtRequest::TaskExecute).await?;
            let text = format!(
                "Executing {} from {}: {}",
                v["task_id"].as_str().unwrap_or_default(),
                v["from"].as_str().unwrap_or_default(),
                v["task_description"].as_str().unwrap_or_default()
            );
            Ok(output(v, text))
        }
        TasksCmd::Results {
            task_id,
            text,
            file,
        } => {
            let file = match file {
                Some(p) => Some(
                    std::fs::canonicalize(&p)
                        .map_err(|e| {
                            CtlError::new(code::BAD_REQUEST, format!("{}: {e}", p.display()))
                        })?
                        .to_string_lossy()
                        .into_owned(),
                ),
                None => None,
            };
            let v = ext(
                &d,
                ExtRequest::TaskResults {
                    task_id,
                    text,
                    file,
                },
            )
            .await?;
            let text = format!(
                "Results of {} sent to {}",
                v["task_id"].as_str().unwrap_or_default(),
                v["sent_to"].as_str().unwrap_or_default()
            );
            Ok(output(v, text))
        }
    }
}

fn status_output(v: Value) -> Result<Output, CtlError> {
    let mut text = format!(
        "Task {} is {}",
        v["task_id"].as_str().unwrap_or_default(),
        v["status"].as_str().unwrap_or_default()
    );
    if v["notified"] == false {
        text.push_str(" (the other side could not be told yet)");
    }
    Ok(output(v, text))
}
