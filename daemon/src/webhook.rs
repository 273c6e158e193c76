//! The webhook poster (v1 wire §8.8): events from the feed ([`crate::events`]) go out as JSON
//! `POST`s to one HTTP URL, which can be changed or cleared at runtime (IPC SetWebhook).
//!
//! One task consumes the event queue and delivers one event at a time. Each delivery has a
//! deadline ([`TIMEOUT`], 5 s as in v1) covering name resolution, connecting, sending and
//! reading the response. There are no retries, with one exception: a request that fails on a
//! kept-alive connection before any byte of a response arrived is sent once more on a fresh
//! connection, because then the server had closed the idle connection and never saw it. A
//! status >= 400 counts as failed and is logged, rate-limited. A URL change cancels the
//! delivery in flight, so a hung server never holds events meant for the new URL.
//!
//! Emitters never wait for this task: the queue in [`crate::events`] drops (and counts) events
//! when it is full. With no URL set, events are taken off the queue and discarded.
//!
//! The HTTP/1.1 client is the subset a webhook needs. The server's answer is untrusted input:
//! the response head is read into a buffer of at most [`MAX_HEAD`] bytes and parsed by
//! `httparse`. The connection is kept for the next event only when the response is HTTP/1.1
//! without `Connection: close` and carries a `Content-Length` body of at most
//! [`MAX_KEPT_BODY`] bytes, which is read (waiting at most 1 s once the status is known) and
//! discarded; anything else closes it. Redirects
//! are not followed (a 3xx counts as delivered).
//!
//! Only `http://` URLs are accepted: `https://` is refused when the URL is set, because the
//! daemon carries no TLS root store.

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use crate::events::{Event, Events};
use crate::ratelog::LogGate;

/// Deadline of one delivery: resolve, connect, send, read the response (v1: 5 s).
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// Longest URL accepted.
pub const MAX_URL_LEN: usize = 2048;
/// Largest response head read from the server (status line and headers).
pub const MAX_HEAD: usize = 16 * 1024;
/// Largest response body read and discarded to keep the connection for the next event; a
/// longer body closes the connection instead.
pub const MAX_KEPT_BODY: u64 = 64 * 1024;
/// Response headers parsed at most; more make the response invalid.
const MAX_HEADERS: usize = 64;
/// Interim (1xx) responses skipped at most before the final one.
const MAX_INTERIM: usize = 4;
/// How long the rest of a response body is waited for once the status is known; a slower
/// body closes the connection instead (the status still counts).
const BODY_WAIT: Duration = Duration::from_secs(1);
/// Addresses of a resolved host tried at most.
const MAX_ADDRS: usize = 8;
/// A kept connection idle for longer than this is closed rather than reused.
const IDLE_KEEP: Duration = Duration::from_secs(30);
/// At most one delivery warning per this interval; the others are counted in the next one.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Why a webhook URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// Empty (to clear the webhook, use [`WebhookHandle::clear`] or set "").
    #[error("the webhook URL is empty")]
    Empty,
    /// Longer than [`MAX_URL_LEN`].
    #[error("the webhook URL is longer than {MAX_URL_LEN} bytes")]
    TooLong,
    /// A space, control character, non-ASCII byte or `#`.
    #[error("the webhook URL may contain only printable ASCII, without spaces or '#'")]
    Chars,
    /// Not `http://`.
    #[error("the webhook URL must look like http://host[:port]/path")]
    Scheme,
    /// `https://`, which this daemon cannot verify.
    #[error(
        "https webhook URLs are not supported (the daemon has no TLS root store); use http://"
    )]
    Https,
    /// `user@host`.
    #[error("user info (user@host) in a webhook URL is not supported")]
    UserInfo,
    /// No host, or one that is neither a DNS name nor an IP address.
    #[error("the webhook URL's host {0:?} is not a DNS name or IP address")]
    Host(String),
    /// A port that is not 1 to 65535.
    #[error("the webhook URL's port {0:?} is not a number from 1 to 65535")]
    Port(String),
}

/// A validated `http://host[:port]/path[?query]` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookUrl {
    text: String,
    /// `host[:port]` as written, for the `Host` header.
    authority: String,
    /// Host name or IP address (IPv6 without brackets), for resolution.
    host: String,
    port: u16,
    /// Path and query; at least "/".
    target: String,
}

impl WebhookUrl {
    /// Parses and checks a URL: `http://` (any case), a DNS name, IPv4 address or bracketed
    /// IPv6 address, an optional port, then an optional path and query. Refused: `https://`,
    /// user info, fragments, spaces, control characters and non-ASCII.
    pub fn parse(s: &str) -> Result<WebhookUrl, UrlError> {
        if s.is_empty() {
            return Err(UrlError::Empty);
        }
        if s.len() > MAX_URL_LEN {
            return Err(UrlError::TooLong);
        }
        if !s.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b'#') {
            return Err(UrlError::Chars);
        }
        let rest = if let Some(r) = strip_prefix_ci(s, "http://") {
            r
        } else if strip_prefix_ci(s, "https://").is_some() {
            return Err(UrlError::Https);
        } else {
            return Err(UrlError::Scheme);
        };
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        if authority.contains('@') {
            return Err(UrlError::UserInfo);
        }
        let bad_host = || UrlError::Host(authority.to_owned());
        let (host, port) = if let Some(r) = authority.strip_prefix('[') {
            let (h, after) = r.split_once(']').ok_or_else(bad_host)?;
            h.parse::<Ipv6Addr>().map_err(|_| bad_host())?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(bad_host)?),
            };
            (h, port)
        } else {
            let (h, port) = match authority.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            };
            if !valid_host(h) {
                return Err(bad_host());
            }
            (h, port)
        };
        let port = match port {
            None => 80,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n != 0 && p.bytes().all(|b| b.is_ascii_digit()) => n,
                _ => return Err(UrlError::Port(p.to_owned())),
            },
        };
        let target = match tail {
            "" => "/".to_owned(),
            t if t.starts_with('?') => format!("/{t}"),
            t => t.to_owned(),
        };
        Ok(WebhookUrl {
            text: s.to_owned(),
            authority: authority.to_owned(),
            host: host.to_owned(),
            port,
            target,
        })
    }

    /// The URL as given.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The host: a DNS name or an IP address (IPv6 without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port (80 if none was given).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The request target: path and query, at least "/".
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The whole request: head and body.
    fn request(&self, body: &[u8]) -> Vec<u8> {
        let head = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: pilotd/{}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.target,
            self.authority,
            env!("CARGO_PKG_VERSION"),
            body.len()
        );
        let mut r = Vec::with_capacity(head.len() + body.len());
        r.extend_from_slice(head.as_bytes());
        r.extend_from_slice(body);
        r
    }
}

impl FromStr for WebhookUrl {
    type Err = UrlError;
    fn from_str(s: &str) -> Result<WebhookUrl, UrlError> {
        WebhookUrl::parse(s)
    }
}

impl fmt::Display for WebhookUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// An IPv4 address or a DNS name: labels of letters, digits, `-` and `_`, not starting or
/// ending with `-`, at most 63 bytes each and 253 in all; one trailing dot allowed.
fn valid_host(h: &str) -> bool {
    if h.parse::<Ipv4Addr>().is_ok() {
        return true;
    }
    let name = h.strip_suffix('.').unwrap_or(h);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// `t` as RFC 3339 in UTC with nanoseconds, trailing zeros of the fraction removed (Go's
/// `time.RFC3339Nano`): `2024-02-29T12:34:56.5Z`, `2001-09-09T01:46:40Z`. Times before 1970
/// are written as 1970-01-01T00:00:00Z.
pub fn rfc3339_nano(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (y, m, day) = civil_from_days(secs / 86_400);
    let s = secs % 86_400;
    let mut out = format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}",
        s / 3600,
        s / 60 % 60,
        s % 60
    );
    let nanos = d.subsec_nanos();
    if nanos != 0 {
        let frac = format!("{nanos:09}");
        out.push('.');
        out.push_str(frac.trim_end_matches('0'));
    }
    out.push('Z');
    out
}

/// Year, month and day of the `days`-th day after 1970-01-01 (proleptic Gregorian; H.
/// Hinnant's `civil_from_days`).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

/// The request body of one event (v1 §8.8): `event`, `node_id`, `timestamp`, and `data` when
/// the event has fields.
fn event_body(ev: &Event, node_id: u32) -> Result<Vec<u8>, serde_json::Error> {
    #[derive(Serialize)]
    struct Body<'a> {
        event: &'a str,
        node_id: u32,
        timestamp: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        data: Option<&'a Value>,
    }
    serde_json::to_vec(&Body {
        event: ev.name,
        node_id,
        timestamp: rfc3339_nano(ev.at),
        data: ev.data.as_ref(),
    })
}

/// How deliveries are made.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Deadline of one delivery ([`TIMEOUT`] by default).
    pub timeout: Duration,
}

impl Default for WebhookConfig {
    fn default() -> WebhookConfig {
        WebhookConfig { timeout: TIMEOUT }
    }
}

#[derive(Debug, Default)]
struct Counters {
    delivered: AtomicU64,
    failed: AtomicU64,
    discarded: AtomicU64,
}

/// What the poster has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct WebhookStats {
    /// Events the server answered with a status below 400.
    pub delivered: u64,
    /// Events not delivered: no connection, timeout, bad response, status >= 400, or
    /// cancelled by a URL change.
    pub failed: u64,
    /// Events taken off the queue while no URL was set.
    pub discarded: u64,
}

/// The webhook poster; see the module docs.
#[derive(Debug)]
pub struct Webhook;

impl Webhook {
    /// Starts the delivery task with the default [`WebhookConfig`]; see [`Webhook::start_with`].
    pub fn start(
        events: mpsc::Receiver<Event>,
        url: Option<WebhookUrl>,
        node_id: watch::Receiver<u32>,
    ) -> WebhookHandle {
        Webhook::start_with(events, url, node_id, WebhookConfig::default())
    }

    /// Starts the delivery task on the current tokio runtime: it takes events off `events` and
    /// posts them to `url` (none: discards them), with `node_id`'s current value as
    /// `node_id`. The task ends when the event feed closes or every [`WebhookHandle`] is
    /// dropped.
    pub fn start_with(
        events: mpsc::Receiver<Event>,
        url: Option<WebhookUrl>,
        node_id: watch::Receiver<u32>,
        config: WebhookConfig,
    ) -> WebhookHandle {
        let (url_tx, url_rx) = watch::channel(url.map(Arc::new));
        let counters = Arc::new(Counters::default());
        let poster = Poster {
            node_id,
            timeout: config.timeout,
            counters: counters.clone(),
            conn: None,
            log: LogGate::new(LOG_INTERVAL),
        };
        tokio::spawn(poster.run(events, url_rx));
        WebhookHandle {
            url: Arc::new(url_tx),
            counters,
        }
    }
}

/// Controls a running poster: its URL and counters. Cheap to clone.
#[derive(Debug, Clone)]
pub struct WebhookHandle {
    url: Arc<watch::Sender<Option<Arc<WebhookUrl>>>>,
    counters: Arc<Counters>,
}

impl WebhookHandle {
    /// Sets the URL from text, as IPC SetWebhook does: "" clears it; anything else must pass
    /// [`WebhookUrl::parse`], and on error the URL in effect stays.
    pub fn set(&self, url: &str) -> Result<(), UrlError> {
        if url.is_empty() {
            self.set_url(None);
        } else {
            self.set_url(Some(WebhookUrl::parse(url)?));
        }
        Ok(())
    }

    /// Sets or clears the URL. A change applies to the next event and cancels the delivery
    /// in flight; setting the URL already in effect changes nothing.
    pub fn set_url(&self, url: Option<WebhookUrl>) {
        self.url.send_if_modified(|cur| {
            if cur.as_deref() == url.as_ref() {
                false
            } else {
                *cur = url.map(Arc::new);
                true
            }
        });
    }

    /// Clears the URL: events are discarded from now on.
    pub fn clear(&self) {
        self.set_url(None);
    }

    /// The URL in effect, if any.
    pub fn url(&self) -> Option<String> {
        self.url.borrow().as_ref().map(|u| u.as_str().to_owned())
    }

    /// The counters.
    pub fn stats(&self) -> WebhookStats {
        WebhookStats {
            delivered: self.counters.delivered.load(Ordering::Relaxed),
            failed: self.counters.failed.load(Ordering::Relaxed),
            discarded: self.counters.discarded.load(Ordering::Relaxed),
        }
    }

    /// Waits, at most `limit`, until the poster has taken every event `events` (its feed)
    /// had queued when called: delivered, failed or discarded. Returns whether it got there.
    /// For shutdown, so that the last events (the connections' ends) are still posted.
    pub async fn drain(&self, events: &Events, limit: Duration) -> bool {
        let target = events.queued();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let s = self.stats();
            if s.delivered + s.failed + s.discarded >= target {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The URL ("" if none) and counters as JSON for the daemon's info, with `dropped` taken
    /// from the event feed (events lost because the queue was full).
    pub fn to_json(&self, events: &Events) -> Value {
        let s = self.stats();
        json!({
            "url": self.url().unwrap_or_default(),
            "delivered": s.delivered,
            "failed": s.failed,
            "discarded": s.discarded,
            "dropped": events.dropped(),
        })
    }
}

/// Why one delivery failed.
#[derive(Debug, thiserror::Error)]
enum PostError {
    #[error("resolving {0}: {1}")]
    Resolve(String, io::Error),
    #[error("{0} resolves to no address")]
    NoAddress(String),
    #[error("connecting to {0}: {1}")]
    Connect(SocketAddr, io::Error),
    #[error("sending: {0}")]
    Send(io::Error),
    #[error("receiving: {0}")]
    Receive(io::Error),
    #[error("the server closed the connection without a response")]
    Closed,
    #[error("invalid response: {0}")]
    BadResponse(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("cancelled by a URL change")]
    Cancelled,
    #[error("encoding the event: {0}")]
    Encode(serde_json::Error),
}

/// A failed exchange, and whether it failed before the server could have seen the request
/// (a stale kept-alive connection), so sending it again on a fresh connection is safe.
struct ExchangeError {
    error: PostError,
    stale: bool,
}

/// The final response.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    status: u16,
    keep: bool,
}

/// A parsed response head.
#[derive(Debug, PartialEq, Eq)]
struct Head {
    len: usize,
    status: u16,
    /// The connection may carry the next request, once `body` bytes are read.
    keep: bool,
    /// Body length, when known and small enough to read to keep the connection.
    body: u64,
}

/// Parses a response head at the start of `buf`: `None` while incomplete.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, PostError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut r = httparse::Response::new(&mut headers);
    let len = match r.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(PostError::BadResponse(e.to_string())),
    };
    let status = r
        .code
        .ok_or_else(|| PostError::BadResponse("no status".to_owned()))?;
    let mut keep = r.version == Some(1);
    let mut length: Option<u64> = None;
    for h in r.headers.iter() {
        if h.name.eq_ignore_ascii_case("connection") {
            let close = h
                .value
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
            if close {
                keep = false;
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            keep = false;
        } else if h.name.eq_ignore_ascii_case("content-length") {
            let v = h.value.trim_ascii();
            let n = std::str::from_utf8(v)
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok());
            match (n, length) {
                (Some(n), None) => length = Some(n),
                (Some(n), Some(l)) if n == l => {}
                _ => keep = false,
            }
        }
    }
    let body = if (100..200).contains(&status) || status == 204 || status == 304 {
        0
    } else {
        match length {
            Some(n) if n <= MAX_KEPT_BODY => n,
            _ => {
                keep = false;
                0
            }
        }
    };
    Ok(Some(Head {
        len,
        status,
        keep,
        body,
    }))
}

/// Sends `request` on `s` and reads the response head (and, to keep the connection, its
/// body).
async fn exchange(s: &mut TcpStream, request: &[u8]) -> Result<Answer, ExchangeError> {
    if let Err(e) = s.write_all(request).await {
        return Err(ExchangeError {
            error: PostError::Send(e),
            stale: true,
        });
    }
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    let mut received = false;
    let mut interim = 0;
    loop {
        let head = parse_head(&buf).map_err(|error| ExchangeError {
            error,
            stale: false,
        })?;
        if let Some(head) = head {
            buf.drain(..head.len);
            if (100..200).contains(&head.status) && head.status != 101 {
                interim += 1;
                if interim > MAX_INTERIM {
                    return Err(ExchangeError {
                        error: PostError::BadResponse("too many 1xx responses".to_owned()),
                        stale: false,
                    });
                }
                continue;
            }
            if head.status == 101 {
                return Err(ExchangeError {
                    error: PostError::BadResponse("101 Switching Protocols".to_owned()),
                    stale: false,
                });
            }
            let keep = head.keep
                && tokio::time::timeout(BODY_WAIT, discard_body(s, &buf, head.body, &mut chunk))
                    .await
                    .unwrap_or(false);
            return Ok(Answer {
                status: head.status,
                keep,
            });
        }
        let room = MAX_HEAD.saturating_sub(buf.len()).min(chunk.len());
        if room == 0 {
            return Err(ExchangeError {
                error: PostError::BadResponse(format!("head longer than {MAX_HEAD} bytes")),
                stale: false,
            });
        }
        match s.read(&mut chunk[..room]).await {
            Ok(0) => {
                return Err(ExchangeError {
                    error: PostError::Closed,
                    stale: !received,
                })
            }
            Ok(n) => {
                received = true;
                buf.extend_from_slice(&chunk[..n]);
            }
            Err(e) => {
                let stale = !received
                    && matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset
                            | io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::BrokenPipe
                    );
                return Err(ExchangeError {
                    error: PostError::Receive(e),
                    stale,
                });
            }
        }
    }
}

/// Reads and drops the rest of a `len`-byte body of which `have` arrived with the head; true
/// if the connection is then clean for the next request.
async fn discard_body(s: &mut TcpStream, have: &[u8], len: u64, chunk: &mut [u8]) -> bool {
    let have = have.len() as u64;
    if have > len {
        return false;
    }
    let mut left = len - have;
    while left > 0 {
        let want = usize::try_from(left).unwrap_or(usize::MAX).min(chunk.len());
        match s.read(&mut chunk[..want]).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => left -= n as u64,
        }
    }
    true
}

/// Resolves the URL's host and connects to the first address that answers.
async fn connect(url: &WebhookUrl) -> Result<TcpStream, PostError> {
    let addrs = tokio::net::lookup_host((url.host.as_str(), url.port))
        .await
        .map_err(|e| PostError::Resolve(url.authority.clone(), e))?;
    let mut last = None;
    for a in addrs.take(MAX_ADDRS) {
        match TcpStream::connect(a).await {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = Some(PostError::Connect(a, e)),
        }
    }
    Err(last.unwrap_or_else(|| PostError::NoAddress(url.authority.clone())))
}

/// A connection kept for the next event.
#[derive(Debug)]
struct Conn {
    stream: TcpStream,
    url: Arc<WebhookUrl>,
    last_used: Instant,
}

impl Conn {
    /// Not idle too long, not closed by the server, and no unsolicited bytes waiting.
    fn reusable(&self, now: Instant) -> bool {
        if now.duration_since(self.last_used) > IDLE_KEEP {
            return false;
        }
        let mut probe = [0u8; 1];
        matches!(
            self.stream.try_read(&mut probe),
            Err(ref e) if e.kind() == io::ErrorKind::WouldBlock
        )
    }
}

/// Posts one request, on the kept connection if there is a usable one, and keeps the
/// connection afterwards if the response allows.
async fn post(
    conn: &mut Option<Conn>,
    url: &Arc<WebhookUrl>,
    request: &[u8],
) -> Result<u16, PostError> {
    if let Some(mut c) = conn.take() {
        if Arc::ptr_eq(&c.url, url) && c.reusable(Instant::now()) {
            match exchange(&mut c.stream, request).await {
                Ok(a) => {
                    if a.keep {
                        c.last_used = Instant::now();
                        *conn = Some(c);
                    }
                    return Ok(a.status);
                }
                // The server closed the idle connection before reading the request: send it
                // once more on a fresh connection below.
                Err(e) if e.stale => {}
                Err(e) => return Err(e.error),
            }
        }
    }
    let mut stream = connect(url).await?;
    let a = exchange(&mut stream, request).await.map_err(|e| e.error)?;
    if a.keep {
        *conn = Some(Conn {
            stream,
            url: url.clone(),
            last_used: Instant::now(),
        });
    }
    Ok(a.status)
}

/// The delivery task's state.
struct Poster {
    node_id: watch::Receiver<u32>,
    timeout: Duration,
    counters: Arc<Counters>,
    conn: Option<Conn>,
    log: LogGate,
}

impl Poster {
    async fn run(
        mut self,
        mut events: mpsc::Receiver<Event>,
        mut url: watch::Receiver<Option<Arc<WebhookUrl>>>,
    ) {
        loop {
            let ev = tokio::select! {
                ev = events.recv() => match ev {
                    Some(ev) => ev,
                    None => return,
                },
                changed = url.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    self.conn = None;
                    continue;
                }
            };
            let Some(target) = url.borrow_and_update().clone() else {
                self.counters.discarded.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let node_id = *self.node_id.borrow();
            let result = match event_body(&ev, node_id) {
                Err(e) => Err(PostError::Encode(e)),
                Ok(body) => {
                    let request = target.request(&body);
                    let timeout = self.timeout;
                    tokio::select! {
                        r = tokio::time::timeout(timeout, post(&mut self.conn, &target, &request)) => {
                            r.unwrap_or(Err(PostError::Timeout(timeout)))
                        }
                        _ = url.changed() => Err(PostError::Cancelled),
                    }
                }
            };
            self.finish(ev.name, &target, result);
        }
    }

    fn finish(&mut self, event: &str, url: &WebhookUrl, result: Result<u16, PostError>) {
        match result {
            Ok(status) if status < 400 => {
                self.counters.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Ok(status) => {
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                if let Some(suppressed) = self.log.allow() {
                    tracing::warn!(host = %url.authority, event, status, suppressed, "webhook answered with an error status");
                }
            }
            Err(e) => {
                self.conn = None;
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                if matches!(e, PostError::Cancelled) {
                    tracing::debug!(host = %url.authority, event, "webhook delivery cancelled by a URL change");
                } else if let Some(suppressed) = self.log.allow() {
                    tracing::warn!(host = %url.authority, event, suppressed, "webhook delivery failed: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn at(secs: u64, nanos: u32) -> SystemTime {
        UNIX_EPOCH + Duration::new(secs, nanos)
    }

    #[test]
    fn timestamps_match_known_dates() {
        // Values checked with `date -u -d @SECS`.
        let cases = [
            (0, 0, "1970-01-01T00:00:00Z"),
            (68_169_600, 0, "1972-02-29T00:00:00Z"),
            (951_782_400, 0, "2000-02-29T00:00:00Z"),
            (1_000_000_000, 0, "2001-09-09T01:46:40Z"),
            (1_234_567_890, 0, "2009-02-13T23:31:30Z"),
            (1_709_210_096, 0, "2024-02-29T12:34:56Z"),
            (4_102_444_799, 0, "2099-12-31T23:59:59Z"),
            (1_709_210_096, 123_456_789, "2024-02-29T12:34:56.123456789Z"),
            (1_709_210_096, 500_000_000, "2024-02-29T12:34:56.5Z"),
            (1_709_210_096, 1_000, "2024-02-29T12:34:56.000001Z"),
            (1_709_210_096, 1, "2024-02-29T12:34:56.000000001Z"),
        ];
        for (s, n, want) in cases {
            assert_eq!(rfc3339_nano(at(s, n)), want, "{s}.{n}");
        }
        assert_eq!(
            rfc3339_nano(UNIX_EPOCH - Duration::from_secs(1)),
            "1970-01-01T00:00:00Z"
        );
    }

    #[test]
    fn every_day_boundary_is_consistent() {
        // Day numbers map to strictly increasing dates with valid months and days.
        let mut prev = (1969, 12, 31);
        for d in 0..200_000 {
            let c = civil_from_days(d);
            assert!((1..=12).contains(&c.1) && (1..=31).contains(&c.2), "{c:?}");
            assert!(c > prev, "{d}: {c:?} after {prev:?}");
            prev = c;
        }
        assert_eq!(civil_from_days(59), (1970, 3, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn urls_parse_into_host_port_and_target() {
        let u = WebhookUrl::parse("http://example.com/hook").unwrap();
        assert_eq!(
            (u.host(), u.port(), u.target()),
            ("example.com", 80, "/hook")
        );
        assert_eq!(u.authority, "example.com");
        let u = WebhookUrl::parse("HTTP://127.0.0.1:8080").unwrap();
        assert_eq!((u.host(), u.port(), u.target()), ("127.0.0.1", 8080, "/"));
        assert_eq!(u.as_str(), "HTTP://127.0.0.1:8080");
        let u = WebhookUrl::parse("http://[::1]:9/a/b?token=x&y=1").unwrap();
        assert_eq!(
            (u.host(), u.port(), u.target()),
            ("::1", 9, "/a/b?token=x&y=1")
        );
        assert_eq!(u.authority, "[::1]:9");
        let u = WebhookUrl::parse("http://h?q=1").unwrap();
        assert_eq!(u.target(), "/?q=1");
        let u = WebhookUrl::parse("http://my_host.local./x").unwrap();
        assert_eq!(u.host(), "my_host.local.");
    }

    #[test]
    fn bad_urls_are_refused_with_a_reason() {
        use UrlError::*;
        let cases: &[(&str, UrlError)] = &[
            ("", Empty),
            ("https://example.com/", Https),
            ("ftp://example.com/", Scheme),
            ("example.com/hook", Scheme),
            ("http:/example.com", Scheme),
            ("http://", Host(String::new())),
            ("http:///path", Host(String::new())),
            ("http://user:pw@example.com/", UserInfo),
            ("http://exa mple.com/", Chars),
            ("http://example.com/a b", Chars),
            ("http://example.com/\r\nX: y", Chars),
            ("http://example.com/#frag", Chars),
            ("http://exämple.com/", Chars),
            ("http://example.com:0/", Port("0".into())),
            ("http://example.com:65536/", Port("65536".into())),
            ("http://example.com:/", Port(String::new())),
            ("http://example.com:+80/", Port("+80".into())),
            ("http://::1/", Host("::1".into())),
            ("http://[::1/", Host("[::1".into())),
            ("http://[nothost]/", Host("[nothost]".into())),
            ("http://[::1]x/", Host("[::1]x".into())),
            ("http://-bad.com/", Host("-bad.com".into())),
            ("http://a..b/", Host("a..b".into())),
            ("http://a%62c/", Host("a%62c".into())),
        ];
        for (s, want) in cases {
            assert_eq!(WebhookUrl::parse(s).as_ref(), Err(want), "{s:?}");
        }
        let long = format!("http://h/{}", "a".repeat(MAX_URL_LEN));
        assert_eq!(WebhookUrl::parse(&long), Err(TooLong));
        assert!(Https.to_string().contains("https"));
    }

    #[test]
    fn the_request_is_a_json_post() {
        let u = WebhookUrl::parse("http://h:81/p?q").unwrap();
        let r = String::from_utf8(u.request(b"{}")).unwrap();
        assert!(r.starts_with("POST /p?q HTTP/1.1\r\nHost: h:81\r\n"), "{r}");
        assert!(r.contains("\r\nContent-Type: application/json\r\n"), "{r}");
        assert!(r.ends_with("\r\nContent-Length: 2\r\n\r\n{}"), "{r}");
    }

    #[test]
    fn the_body_has_the_v1_shape() {
        let ev = Event {
            name: "message.received",
            at: at(1_709_210_096, 5_000),
            data: Some(json!({"type": "text", "size": 3})),
        };
        let v: Value = serde_json::from_slice(&event_body(&ev, 7).unwrap()).unwrap();
        assert_eq!(
            v,
            json!({"event": "message.received", "node_id": 7,
                   "timestamp": "2024-02-29T12:34:56.000005Z",
                   "data": {"type": "text", "size": 3}})
        );
        let bare = Event {
            name: "node.deregistered",
            at: at(0, 0),
            data: None,
        };
        let s = String::from_utf8(event_body(&bare, 1).unwrap()).unwrap();
        assert_eq!(
            s,
            r#"{"event":"node.deregistered","node_id":1,"timestamp":"1970-01-01T00:00:00Z"}"#
        );
    }

    #[test]
    fn response_heads_decide_keep_alive() {
        let h = |s: &str| parse_head(s.as_bytes()).unwrap();
        let head = h("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        assert_eq!(
            head,
            Some(Head {
                len: 38,
                status: 200,
                keep: true,
                body: 2
            })
        );
        assert_eq!(h("HTTP/1.1 200 OK\r\nContent-Len"), None);
        let keep = |s: &str| h(s).unwrap().keep;
        assert!(keep("HTTP/1.1 204 No Content\r\n\r\n"));
        assert!(keep("HTTP/1.1 500 Oops\r\ncontent-length: 0\r\n\r\n"));
        assert!(keep(
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n"
        ));
        assert!(!keep("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"));
        assert!(!keep(
            "HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 0\r\n\r\n"
        ));
        assert!(!keep(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        ));
        assert!(!keep("HTTP/1.1 200 OK\r\n\r\n"));
        assert!(!keep(
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n"
        ));
        assert!(!keep("HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n"));
        assert!(!keep(
            "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\n"
        ));
        assert!(!keep("HTTP/1.1 200 OK\r\nContent-Length: 65537\r\n\r\n"));
        assert!(parse_head(b"garbage\r\n\r\n").is_err());
        let many = format!(
            "HTTP/1.1 200 OK\r\n{}\r\n",
            "A: b\r\n".repeat(MAX_HEADERS + 1)
        );
        assert!(parse_head(many.as_bytes()).is_err());
    }
}
