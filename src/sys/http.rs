//! The HTTP listener of `[metrics] bind`: `/metrics`, `/` (the status page) and
//! `/api/status`, over hyper's HTTP/1 server. Bounded: at most `metrics.max_connections`
//! connections at once (more are closed unanswered), one request per connection, its headers
//! within 16 KiB, the whole exchange within `metrics.request_timeout_secs`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tracing::{debug, warn};

use super::status::Reporter;

/// Largest request head read (hyper's smallest buffer is 8 KiB).
const MAX_REQUEST: usize = 16 * 1024;

/// The status page: one file, its CSS and script inline, nothing fetched but `/api/status`
/// (it must work on a gateway without Internet access).
const STATUS_PAGE: &str = include_str!("status.html");

/// What the page may do: run its own inline script and style, fetch from this listener.
const PAGE_POLICY: &str =
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:";

pub(super) async fn serve(listener: TcpListener, reporter: Arc<Reporter>, mut shutdown: watch::Receiver<bool>) {
    let cfg = &reporter.broker.config.metrics;
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    let limit = Duration::from_secs(cfg.request_timeout_secs);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = super::stopped(&mut shutdown) => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, "metrics listener: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            debug!(%peer, "metrics listener: metrics.max_connections reached, connection closed");
            continue;
        };
        let reporter = Arc::clone(&reporter);
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |req| {
                let reporter = Arc::clone(&reporter);
                async move { Ok::<_, Infallible>(respond(&reporter, &req).await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limit)
                .keep_alive(false)
                .max_buf_size(MAX_REQUEST)
                .serve_connection(TokioIo::new(stream), service);
            if let Ok(Err(e)) = tokio::time::timeout(limit, conn).await {
                debug!(%peer, error = %e, "metrics listener: connection failed");
            }
        });
    }
}

async fn respond(reporter: &Arc<Reporter>, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        r.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match req.uri().path() {
        "/metrics" => {
            let r = Arc::clone(reporter);
            // Gathering stats walks the sessions: off the async workers.
            match tokio::task::spawn_blocking(move || super::prometheus::render((*r.stats()).clone())).await {
                Ok(Ok(body)) => with_type(StatusCode::OK, body, super::prometheus::CONTENT_TYPE),
                _ => text(StatusCode::INTERNAL_SERVER_ERROR, "metrics could not be encoded\n"),
            }
        }
        "/api/status" => {
            let r = Arc::clone(reporter);
            match tokio::task::spawn_blocking(move || r.status_json()).await {
                Ok(body) => with_type(StatusCode::OK, body, "application/json"),
                Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "status unavailable\n"),
            }
        }
        "/" | "/index.html" => {
            let mut r = with_type(StatusCode::OK, STATUS_PAGE, "text/html; charset=utf-8");
            r.headers_mut().insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(PAGE_POLICY));
            r
        }
        _ => text(StatusCode::NOT_FOUND, "not found: try /, /metrics or /api/status\n"),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    with_type(status, body, "text/plain; charset=utf-8")
}

fn with_type(status: StatusCode, body: impl Into<Bytes>, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}
