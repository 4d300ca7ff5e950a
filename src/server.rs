//! The proxy (`fallthrough serve`): HTTP in front of a [`Client`]. Maps headers and
//! `cache-control` onto a [`Request`], the answer onto headers (`x-fallthrough-*`, `age`), and
//! every failure onto the API's own error shape. Other paths pass through uncached.

use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::Router;
use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::client::{Client, Controls, Reply, Request, Response, StreamResponse, X_API_KEY};
use crate::error::{error_body, error_type_for_status, Error};
use crate::key::CacheKey;
use crate::outcome::Outcome;

const X_CACHE: HeaderName = HeaderName::from_static("x-fallthrough-cache");
const X_KEY: HeaderName = HeaderName::from_static("x-fallthrough-key");
const X_MODEL: HeaderName = HeaderName::from_static("x-fallthrough-model");
const X_ATTEMPTS: HeaderName = HeaderName::from_static("x-fallthrough-attempts");
const X_NAMESPACE: HeaderName = HeaderName::from_static("x-fallthrough-namespace");
const X_FALLBACK: HeaderName = HeaderName::from_static("x-fallthrough-fallback");
const JSON: HeaderValue = HeaderValue::from_static("application/json");

/// Request headers never forwarded upstream: hop-by-hop, those the HTTP client sets itself,
/// and the proxy's own controls. `accept-encoding` goes too: a compressed body would be stored
/// as it came. (Names built once: parsing them per request shows in profiles.)
const NOT_FORWARDED: [HeaderName; 14] = [
    header::HOST,
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::CONTENT_LENGTH,
    header::ACCEPT_ENCODING,
    header::CACHE_CONTROL,
    X_NAMESPACE,
    X_FALLBACK,
];

/// Response headers of the upstream never passed back (hop-by-hop and length, which the
/// server sets itself).
const NOT_RETURNED: [&str; 6] = [
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "trailer",
    "upgrade",
];

/// How long a shutdown waits for in-flight requests.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);

struct App {
    client: Client,
    /// Deadline for passed-through requests.
    deadline: Duration,
}

/// The proxy's routes, over `client`.
pub fn router(client: Client) -> Router {
    let max_body = client.config().max_body_bytes.as_u64() as usize;
    let deadline = client.config().retry.deadline;
    let app = Arc::new(App { client, deadline });
    Router::new()
        .route("/v1/messages", post(messages))
        .route("/v1/messages/count_tokens", post(messages))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .fallback(pass_through)
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(app)
}

/// Serves until `shutdown` resolves, then finishes in-flight requests and flushes the disk tier.
pub async fn serve(
    listener: TcpListener,
    client: Client,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(client.clone());
    let (draining, drain_started) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        let _ = draining.send(());
    };
    // No Nagle: a relayed stream is many small writes, and Nagle's wait for the caller's
    // delayed ACK held each streamed answer back by ~40 ms.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let server = axum::serve(listener, app).with_graceful_shutdown(signal);
    // In-flight requests get DRAIN_LIMIT to finish; a stream that never ends must not keep the
    // process (and the disk tier's flush) waiting for ever.
    let drain_limit = async {
        match drain_started.await {
            Ok(()) => tokio::time::sleep(DRAIN_LIMIT).await,
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        served = server.into_future() => served?,
        _ = drain_limit => warn!(limit = ?DRAIN_LIMIT, "requests still in flight; stopping anyway"),
    }
    info!("draining done; flushing the disk cache");
    client.flush().await.map_err(std::io::Error::other)?;
    Ok(())
}

async fn messages(State(app): State<Arc<App>>, request: axum::extract::Request) -> HttpResponse {
    // Taken apart rather than extracted piece by piece: axum's header and URI extractors clone.
    let (parts, body) = request.into_parts();
    let limit = app.client.config().max_body_bytes;
    let body = match axum::body::to_bytes(body, limit.as_u64() as usize).await {
        Ok(body) => body,
        Err(e) if is_too_large(&e) => {
            return api_error(413, &format!("request body is larger than {limit}"));
        }
        Err(e) => return api_error(400, &format!("cannot read the request body: {e}")),
    };
    let headers = parts.headers;
    let namespace = match headers.get(X_NAMESPACE).map(|v| v.to_str()) {
        None => None,
        Some(Ok(namespace)) => Some(namespace.to_owned()),
        Some(Err(_)) => return api_error(400, "x-fallthrough-namespace must be visible ASCII"),
    };
    let request = Request {
        path: parts.uri.path().to_owned(),
        body,
        controls: controls(&headers),
        namespace,
        headers: forwarded(headers),
    };
    match app.client.call(request).await {
        Ok(Reply::Plain(response)) => plain(response),
        Ok(Reply::Stream(response)) => streamed(response),
        Err(e) => error_response(e),
    }
}

/// Whether reading a body failed on the size limit.
fn is_too_large(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = s.source();
    }
    false
}

fn plain(r: Response) -> HttpResponse {
    let mut out = (StatusCode::OK, r.body).into_response();
    let h = out.headers_mut();
    h.insert(header::CONTENT_TYPE, JSON);
    cache_headers(h, r.outcome, &r.key, &r.model, r.attempts, r.age);
    out
}

fn streamed(r: StreamResponse) -> HttpResponse {
    let mut out = (StatusCode::OK, Body::from_stream(r.events)).into_response();
    let h = out.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    cache_headers(h, r.outcome, &r.key, &r.model, r.attempts, r.age);
    out
}

fn cache_headers(
    h: &mut HeaderMap,
    outcome: Outcome,
    key: &CacheKey,
    model: &str,
    attempts: u32,
    age: Option<Duration>,
) {
    h.insert(X_CACHE, HeaderValue::from_static(outcome.as_str()));
    if let Ok(v) = HeaderValue::from_bytes(&key.to_hex()) {
        h.insert(X_KEY, v);
    }
    if let Ok(v) = HeaderValue::from_str(model) {
        h.insert(X_MODEL, v);
    }
    h.insert(X_ATTEMPTS, HeaderValue::from(attempts));
    if let (Some(age), true) = (age, outcome.is_hit()) {
        h.insert(header::AGE, HeaderValue::from(age.as_secs()));
    }
}

/// Every library error as the API's error shape, with the upstream's own status and body when
/// it was the upstream's error, and a `retry-after` so that the caller's SDK waits.
fn error_response(e: Error) -> HttpResponse {
    let mut out = match e {
        Error::Upstream(e) => {
            let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_GATEWAY);
            let mut out = (status, e.body.clone()).into_response();
            let h = out.headers_mut();
            if let Some(wait) = e.retry_after {
                let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
                h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            h.insert(X_ATTEMPTS, HeaderValue::from(e.attempts));
            h.insert(X_MODEL, header_value(&e.model));
            out
        }
        Error::InvalidRequest(message) => api_error(400, &message),
        Error::NotCached => api_error(
            504,
            "not in the cache, and the request said cache-control: only-if-cached",
        ),
        other => {
            let message = crate::error::report(&other);
            warn!(error = %message, "request failed inside the proxy");
            api_error(500, &message)
        }
    };
    out.headers_mut().insert(header::CONTENT_TYPE, JSON);
    out
}

/// An error of the proxy's own, in the API's shape.
fn api_error(status: u16, message: &str) -> HttpResponse {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = error_body(error_type_for_status(status), message);
    let mut out = (code, body).into_response();
    out.headers_mut().insert(header::CONTENT_TYPE, JSON);
    out
}

/// `cache-control` request directives, as SPEC lists them, and `x-fallthrough-fallback: off`.
fn controls(headers: &HeaderMap) -> Controls {
    let mut c = Controls {
        no_fallback: header_text(headers, X_FALLBACK)
            .is_some_and(|v| v.eq_ignore_ascii_case("off")),
        ..Controls::default()
    };
    for value in headers.get_all(header::CACHE_CONTROL) {
        let Ok(value) = value.to_str() else { continue };
        for directive in value.split(',').map(str::trim) {
            let (name, arg) = directive.split_once('=').unwrap_or((directive, ""));
            match name.to_ascii_lowercase().as_str() {
                "no-cache" => c.no_cache = true,
                "no-store" => c.no_store = true,
                "only-if-cached" => c.only_if_cached = true,
                "max-age" => {
                    if let Ok(secs) = arg.trim_matches('"').parse::<u64>() {
                        c.max_age = Some(Duration::from_secs(secs));
                    }
                }
                _ => {}
            }
        }
    }
    c
}

/// The caller's headers less those never forwarded (taken in place: no copy per request),
/// credentials marked sensitive so that no `Debug` of them ever prints them.
fn forwarded(mut headers: HeaderMap) -> HeaderMap {
    for name in NOT_FORWARDED {
        headers.remove(name);
    }
    for name in [header::AUTHORIZATION, X_API_KEY] {
        if let Some(value) = headers.get_mut(&name) {
            value.set_sensitive(true);
        }
    }
    headers
}

fn header_text(headers: &HeaderMap, name: HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

async fn metrics(State(app): State<Arc<App>>) -> HttpResponse {
    let usage = app.client.cache().usage().await;
    let text = app
        .client
        .metrics()
        .render(&app.client.breaker_states(), usage);
    let mut out = text.into_response();
    out.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    out
}

/// Any other path: sent upstream as it is, answered as the upstream answers, never cached.
async fn pass_through(
    State(app): State<Arc<App>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> HttpResponse {
    let Ok(body) = body else {
        return api_error(413, "request body is too large");
    };
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut headers = forwarded(headers);
    app.client.add_credential(&mut headers);
    let deadline = Instant::now() + app.deadline;
    let upstream = app.client.upstream();
    match upstream
        .pass_through(method, path, headers, body, deadline)
        .await
    {
        Ok(response) => {
            let status = response.status();
            let mut out = HttpResponse::builder().status(status.as_u16());
            for (name, value) in response.headers() {
                if !NOT_RETURNED.contains(&name.as_str()) {
                    if let Ok(name) = HeaderName::from_bytes(name.as_str().as_bytes()) {
                        out = out.header(name, value.as_bytes());
                    }
                }
            }
            out.header(X_CACHE, "bypass")
                .body(Body::from_stream(response.bytes_stream()))
                .unwrap_or_else(|_| api_error(502, "upstream sent an unusable response"))
        }
        Err(e) => error_response(Error::Upstream(e)),
    }
}
