//! The registry's HTTP listener (layer: registry service, beside the TCP protocol server):
//!
//! | Path | Content |
//! |---|---|
//! | `/` | the dashboard page ([`PAGE`], embedded in the binary) |
//! | `/api/stats` | v1's dashboard JSON ([`crate::dashboard::Stats`], wire §4.10), CORS `*` |
//! | `/metrics` | Prometheus text format 0.0.4 |
//!
//! Invariants:
//! - The page loads nothing from elsewhere: its script and style are inline, and its
//!   Content-Security-Policy allows connections to this listener only, so it works offline.
//! - Nothing served names an IP address or a key (metrics are counts by request type).
//! - The statistics are computed on a blocking thread, at most once per [`STATS_TTL`] however
//!   many clients ask, so neither the runtime nor the registry's state lock is held by
//!   dashboard viewers for more than one pass over the state per second.
//! - The request rate is sampled every [`RATE_SAMPLE`] while the listener runs.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;

use crate::dashboard::{Limits, RateWindow};
use crate::Registry;

/// The dashboard page.
pub const PAGE: &str = include_str!("dashboard.html");
/// How long one computation of `/api/stats` is served to every client.
pub const STATS_TTL: Duration = Duration::from_secs(1);
/// How often the request counter is sampled for the request rate.
pub const RATE_SAMPLE: Duration = Duration::from_secs(5);

/// The page's policy: inline script and style, connections to this origin only.
const PAGE_CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; \
    style-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; \
    form-action 'none'; frame-ancestors 'none'";

struct Shared {
    reg: Registry,
    rates: Mutex<RateWindow>,
    /// The last `/api/stats` body and when it was made.
    cache: Mutex<Option<(Instant, Bytes)>>,
}

impl Shared {
    /// The `/api/stats` body, from the cache when fresh. Blocking: call it off the runtime.
    fn stats_json(&self) -> Result<Bytes, serde_json::Error> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, body)) = cache.as_ref() {
            if at.elapsed() < STATS_TTL {
                return Ok(body.clone());
            }
        }
        let mut stats = self.reg.stats(Limits::default());
        let now = Instant::now();
        stats.request_rate = self
            .rates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .rate(now, stats.total_requests);
        let body = Bytes::from(serde_json::to_vec(&stats)?);
        *cache = Some((now, body.clone()));
        Ok(body)
    }

    fn sample_rate(&self) {
        let total = self.reg.requests_total();
        self.rates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .sample(Instant::now(), total);
    }
}

/// Serves the dashboard, `/api/stats` and `/metrics` on `listener` until `shutdown`
/// completes.
pub async fn serve(reg: Registry, listener: TcpListener, shutdown: impl Future<Output = ()>) {
    let shared = Arc::new(Shared {
        reg,
        rates: Mutex::new(RateWindow::new()),
        cache: Mutex::new(None),
    });
    let mut tick = tokio::time::interval(RATE_SAMPLE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        let sock = tokio::select! {
            _ = &mut shutdown => return,
            _ = tick.tick() => {
                shared.sample_rate();
                continue;
            }
            r = listener.accept() => match r {
                Ok((sock, _)) => sock,
                Err(e) => {
                    // Out of descriptors and similar: back off instead of spinning.
                    tracing::debug!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let shared = shared.clone();
                async move { Ok::<_, std::convert::Infallible>(respond(&shared, &req).await) }
            });
            let io = hyper_util::rt::TokioIo::new(sock);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await;
        });
    }
}

fn response(status: StatusCode, headers: &[(&str, &str)], body: Bytes) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    let h = r.headers_mut();
    for (k, v) in headers {
        if let (Ok(k), Ok(v)) = (
            hyper::header::HeaderName::from_bytes(k.as_bytes()),
            hyper::header::HeaderValue::from_str(v),
        ) {
            h.insert(k, v);
        }
    }
    h.insert(
        hyper::header::X_CONTENT_TYPE_OPTIONS,
        hyper::header::HeaderValue::from_static("nosniff"),
    );
    r
}

async fn respond<B>(shared: &Arc<Shared>, req: &Request<B>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return response(
            StatusCode::METHOD_NOT_ALLOWED,
            &[("allow", "GET, HEAD")],
            Bytes::from_static(b"method not allowed\n"),
        );
    }
    match req.uri().path() {
        "/" => response(
            StatusCode::OK,
            &[
                ("content-type", "text/html; charset=utf-8"),
                ("cache-control", "no-cache"),
                ("content-security-policy", PAGE_CSP),
            ],
            Bytes::from_static(PAGE.as_bytes()),
        ),
        "/api/stats" => {
            let s = shared.clone();
            match tokio::task::spawn_blocking(move || s.stats_json()).await {
                Ok(Ok(body)) => response(
                    StatusCode::OK,
                    &[
                        ("content-type", "application/json"),
                        ("cache-control", "no-cache"),
                        ("access-control-allow-origin", "*"),
                    ],
                    body,
                ),
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "encoding /api/stats failed");
                    response(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        &[],
                        Bytes::from_static(b"internal error\n"),
                    )
                }
                Err(e) => {
                    tracing::error!(error = %e, "computing /api/stats failed");
                    response(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        &[],
                        Bytes::from_static(b"internal error\n"),
                    )
                }
            }
        }
        "/metrics" => response(
            StatusCode::OK,
            &[("content-type", "text/plain; version=0.0.4; charset=utf-8")],
            Bytes::from(shared.reg.metrics_text()),
        ),
        _ => response(
            StatusCode::NOT_FOUND,
            &[],
            Bytes::from_static(b"not found\n"),
        ),
    }
}
