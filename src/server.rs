//! The proxy (`fallthrough serve`): HTTP in front of a [`Client`]. Maps headers and
//! `cache-control` onto a [`Request`], the answer onto headers (`x-fallthrough-*`, `age`), and
//! every failure onto the API's own error shape. Other paths pass through uncached.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::client::{Client, Controls, Reply, Request, Response, StreamResponse};
use crate::error::{error_body, error_type_for_status, Error};
use crate::outcome::Outcome;

/// Request headers never forwarded upstream: hop-by-hop, those the HTTP client sets itself,
/// and the proxy's own controls. `accept-encoding` goes too: a compressed body would be stored
/// as it came.
const NOT_FORWARDED: [&str; 14] = [
    "host",
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "accept-encoding",
    "cache-control",
    "x-fallthrough-namespace",
    "x-fallthrough-fallback",
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
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    info!("draining done; flushing the disk cache");
    client.flush().await.map_err(std::io::Error::other)?;
    Ok(())
}

async fn messages(
    State(app): State<Arc<App>>,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> HttpResponse {
    let body = match body {
        Ok(body) => body,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            let limit = app.client.config().max_body_bytes;
            return api_error(413, &format!("request body is larger than {limit}"));
        }
        Err(rejection) => return api_error(400, &rejection.body_text()),
    };
    let request = Request {
        path: uri.path().to_owned(),
        body,
        controls: controls(&headers),
        namespace: header_text(&headers, "x-fallthrough-namespace").map(str::to_owned),
        headers: forwarded(&headers),
    };
    match app.client.call(request).await {
        Ok(Reply::Plain(response)) => plain(response),
        Ok(Reply::Stream(response)) => streamed(response),
        Err(e) => error_response(e),
    }
}

fn plain(r: Response) -> HttpResponse {
    let mut out = (StatusCode::OK, r.body).into_response();
    let h = out.headers_mut();
    h.insert("content-type", HeaderValue::from_static("application/json"));
    cache_headers(
        h,
        r.outcome,
        &r.key.to_string(),
        &r.model,
        r.attempts,
        r.age,
    );
    out
}

fn streamed(r: StreamResponse) -> HttpResponse {
    let mut out = (StatusCode::OK, Body::from_stream(r.events)).into_response();
    let h = out.headers_mut();
    h.insert(
        "content-type",
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    h.insert("cache-control", HeaderValue::from_static("no-cache"));
    cache_headers(
        h,
        r.outcome,
        &r.key.to_string(),
        &r.model,
        r.attempts,
        r.age,
    );
    out
}

fn cache_headers(
    h: &mut HeaderMap,
    outcome: Outcome,
    key: &str,
    model: &str,
    attempts: u32,
    age: Option<Duration>,
) {
    h.insert(
        "x-fallthrough-cache",
        HeaderValue::from_static(outcome.as_str()),
    );
    if let Ok(v) = HeaderValue::from_str(key) {
        h.insert("x-fallthrough-key", v);
    }
    if let Ok(v) = HeaderValue::from_str(model) {
        h.insert("x-fallthrough-model", v);
    }
    h.insert("x-fallthrough-attempts", HeaderValue::from(attempts));
    if let (Some(age), true) = (age, outcome.is_hit()) {
        h.insert("age", HeaderValue::from(age.as_secs()));
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
                h.insert("retry-after", HeaderValue::from(secs));
            }
            h.insert("x-fallthrough-attempts", HeaderValue::from(e.attempts));
            h.insert("x-fallthrough-model", header_value(&e.model));
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
    out.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    out
}

/// An error of the proxy's own, in the API's shape.
fn api_error(status: u16, message: &str) -> HttpResponse {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = error_body(error_type_for_status(status), message);
    let mut out = (code, body).into_response();
    out.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    out
}

/// `cache-control` request directives, as SPEC lists them, and `x-fallthrough-fallback: off`.
fn controls(headers: &HeaderMap) -> Controls {
    let mut c = Controls {
        no_fallback: header_text(headers, "x-fallthrough-fallback")
            .is_some_and(|v| v.eq_ignore_ascii_case("off")),
        ..Controls::default()
    };
    for value in headers.get_all("cache-control") {
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

fn forwarded(headers: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        if !NOT_FORWARDED.contains(&name.as_str()) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
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
    let mut headers = forwarded(&headers);
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
            out.header("x-fallthrough-cache", "bypass")
                .body(Body::from_stream(response.bytes_stream()))
                .unwrap_or_else(|_| api_error(502, "upstream sent an unusable response"))
        }
        Err(e) => error_response(Error::Upstream(e)),
    }
}
