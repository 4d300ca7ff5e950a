//! The proxy (`fallthrough serve`): HTTP in front of a [`Client`]. Each room owns one part:
//!
//! - this file: the routes, serving with a bounded drain, `/metrics`, and which of the
//!   caller's headers go upstream;
//! - `messages`: `/v1/messages` and `count_tokens`, mapping headers and `cache-control` onto
//!   a [`crate::Request`] and the answer onto headers (`x-fallthrough-*`, `age`);
//! - `pass`: every other path, sent upstream as it is through the engine's limits;
//! - `errors`: every failure in the API's own error shape.

mod access;
mod admin;
mod conn;
mod errors;
mod messages;
mod pass;

pub use access::{new_token, token_sha256};

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;
use tracing::{error, info, warn};

use crate::client::{Client, X_API_KEY};

pub(super) const X_CACHE: HeaderName = HeaderName::from_static("x-fallthrough-cache");
pub(super) const X_KEY: HeaderName = HeaderName::from_static("x-fallthrough-key");
pub(super) const X_MODEL: HeaderName = HeaderName::from_static("x-fallthrough-model");
pub(super) const X_ATTEMPTS: HeaderName = HeaderName::from_static("x-fallthrough-attempts");
pub(super) const X_NAMESPACE: HeaderName = HeaderName::from_static("x-fallthrough-namespace");
pub(super) const X_FALLBACK: HeaderName = HeaderName::from_static("x-fallthrough-fallback");
pub(super) const JSON: HeaderValue = HeaderValue::from_static("application/json");

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

/// Response headers of the upstream never passed back: hop-by-hop, and the length, which the
/// server sets itself.
const NOT_RETURNED: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::CONTENT_LENGTH,
    header::TRAILER,
    header::UPGRADE,
];

/// Whether a body is passed on as the upstream encoded it, or was read (and decoded) first.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Encoding {
    AsSent,
    Decoded,
}

/// Copies the upstream's response headers (`request-id`, `anthropic-ratelimit-*`, ...) onto a
/// reply, less hop-by-hop ones and the length; `content-encoding` too when the body was read.
/// Headers the proxy sets itself are inserted after, over these.
pub(super) fn copy_upstream_headers(from: &HeaderMap, to: &mut HeaderMap, encoding: Encoding) {
    for (name, value) in from {
        let skip = NOT_RETURNED.contains(name)
            || (encoding == Encoding::Decoded && name == header::CONTENT_ENCODING);
        if !skip {
            to.append(name, value.clone());
        }
    }
}

/// How long a shutdown waits for in-flight requests.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);

struct App {
    client: Client,
    access: access::Access,
}

/// Whether `config` lets a proxy listen on `listen` ([`serve`] checks the same): an error
/// naming `access.tokens` when it would listen open beyond loopback.
pub fn check_access(
    config: &crate::config::AccessConfig,
    listen: std::net::SocketAddr,
) -> Result<(), crate::Error> {
    access::Access::new(config, listen, &crate::metrics::Metrics::default()).map(drop)
}

/// The paths the cache answers; every other one is passed through.
pub(super) fn is_cached_route(path: &str) -> bool {
    matches!(path, "/v1/messages" | "/v1/messages/count_tokens")
}

/// The proxy's routes, every one behind admission ([`access::admit`]).
fn router(app: Arc<App>) -> Router {
    let max_body = app.client.config().max_body_bytes.as_u64() as usize;
    Router::new()
        .route("/v1/messages", post(messages::messages))
        .route("/v1/messages/count_tokens", post(messages::messages))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .nest(
            "/fallthrough",
            Router::new()
                .route("/stats", get(admin::stats))
                .route("/entries/{key}", get(admin::entry))
                .route("/purge", post(admin::purge))
                .layer(axum::middleware::from_fn_with_state(
                    app.clone(),
                    admin::only_admins,
                )),
        )
        .fallback(pass::pass_through)
        // A wrong method on the proxy's own routes is refused in the API's error shape.
        .method_not_allowed_fallback(
            |method: axum::http::Method, uri: axum::http::Uri| async move {
                errors::api_error(405, &format!("{method} is not allowed on {}", uri.path()))
            },
        )
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            access::admit,
        ))
        .layer(axum::middleware::from_fn(conn::header_limits))
        .with_state(app)
}

/// Serves until `shutdown` resolves, then finishes in-flight requests and flushes the disk tier.
pub async fn serve(
    listener: TcpListener,
    client: Client,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    let access = access::Access::new(&client.config().access, addr, client.metrics())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
    let app = router(Arc::new(App {
        client: client.clone(),
        access,
    }));
    let (draining, drain_started) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        let _ = draining.send(());
    };
    let server = conn::serve(
        listener,
        app,
        client.config().server.clone(),
        client.metrics(),
        signal,
    );
    // In-flight requests get DRAIN_LIMIT to finish; a stream that never ends must not keep the
    // process (and the disk tier's flush) waiting for ever.
    let drain_limit = async {
        match drain_started.await {
            Ok(()) => tokio::time::sleep(DRAIN_LIMIT).await,
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        () = server => {}
        _ = drain_limit => warn!(limit = ?DRAIN_LIMIT, "requests still in flight; stopping anyway"),
    }
    info!("draining done; flushing the disk cache");
    // Every answer was served; a disk that cannot take the last writes (full, failing) loses
    // those, and says so, but does not make the shutdown a failure.
    if let Err(e) = client.flush().await {
        error!(error = %crate::error::report(&e), "the disk cache could not be flushed; its last writes may be lost");
    }
    Ok(())
}

/// The caller's headers less those never forwarded (taken in place: no copy per request),
/// credentials marked sensitive so that no `Debug` of them ever prints them.
pub(super) fn forwarded(mut headers: HeaderMap) -> HeaderMap {
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

/// A request taken apart, its body read whole ([`read_body`]); else the refusal to answer.
async fn read_request(
    app: &App,
    request: axum::extract::Request,
) -> Result<(axum::http::request::Parts, bytes::Bytes), HttpResponse> {
    let (parts, body) = request.into_parts();
    Ok((parts, read_body(app, body).await?))
}

/// A request's body, read within `server.body_timeout` and `max_body_bytes`; else the
/// refusal to answer (413, or 408 with the connection closed: a caller that sends its body
/// this slowly is let go).
async fn read_body(app: &App, body: axum::body::Body) -> Result<bytes::Bytes, HttpResponse> {
    let config = app.client.config();
    let limit = config.max_body_bytes;
    let timeout = config.server.body_timeout;
    let read = axum::body::to_bytes(body, limit.as_u64() as usize);
    match tokio::time::timeout(timeout, read).await {
        Ok(Ok(body)) => Ok(body),
        Ok(Err(e)) if is_too_large(&e) => Err(errors::api_error(
            413,
            &format!("request body is larger than {limit}"),
        )),
        Ok(Err(e)) => Err(errors::api_error(
            400,
            &format!("cannot read the request body: {e}"),
        )),
        Err(_) => {
            let mut out = errors::api_error(
                408,
                &format!(
                    "the request body did not arrive within {timeout:?} (server.body_timeout)"
                ),
            );
            out.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            Err(out)
        }
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

pub(super) fn header_text(headers: &HeaderMap, name: HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

pub(super) fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

async fn metrics(State(app): State<Arc<App>>) -> HttpResponse {
    let text = app.client.render_metrics().await;
    let mut out = text.into_response();
    out.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    out
}
