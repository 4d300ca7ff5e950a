//! The proxy (`fallthrough serve`): HTTP in front of a [`Client`]. Each room owns one part:
//!
//! - this file: the routes, serving with a bounded drain, `/metrics`, and which of the
//!   caller's headers go upstream;
//! - `messages`: `/v1/messages` and `count_tokens`, mapping headers and `cache-control` onto
//!   a [`crate::Request`] and the answer onto headers (`x-fallthrough-*`, `age`);
//! - `pass`: every other path, sent upstream as it is through the engine's limits;
//! - `errors`: every failure in the API's own error shape.

mod access;
mod errors;
mod messages;
mod pass;

pub use access::{new_token, token_sha256};

use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::Router;
use tokio::net::TcpListener;
use tracing::{info, warn};

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
    access::Access::new(config, listen).map(drop)
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
        .with_state(app)
}

/// Serves until `shutdown` resolves, then finishes in-flight requests and flushes the disk tier.
pub async fn serve(
    listener: TcpListener,
    client: Client,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let access = access::Access::new(&client.config().access, listener.local_addr()?)
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
