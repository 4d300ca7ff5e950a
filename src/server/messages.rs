//! `/v1/messages` and `/v1/messages/count_tokens`: the cached paths.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response as HttpResponse};

use super::access::Caller;
use super::errors::{api_error, error_response};
use super::{
    copy_upstream_headers, forwarded, header_text, read_request, App, Encoding, JSON, X_ATTEMPTS,
    X_CACHE, X_FALLBACK, X_KEY, X_MODEL, X_NAMESPACE,
};
use crate::client::{Controls, Reply, Request, Response, StreamResponse};
use crate::key::CacheKey;
use crate::outcome::Outcome;

pub(super) async fn messages(
    State(app): State<Arc<App>>,
    request: axum::extract::Request,
) -> HttpResponse {
    // Taken apart rather than extracted piece by piece: axum's header and URI extractors clone.
    let (parts, body) = match read_request(&app, request).await {
        Ok(read) => read,
        Err(refusal) => return refusal,
    };
    let headers = parts.headers;
    let partition = parts.extensions.get::<Caller>().and_then(Caller::partition);
    let namespace = match headers.get(X_NAMESPACE).map(|v| v.to_str()) {
        None => None,
        Some(Ok(namespace)) => Some(namespace.to_owned()),
        Some(Err(_)) => return api_error(400, "x-fallthrough-namespace must be visible ASCII"),
    };
    let request = Request {
        path: parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned(),
        body,
        controls: controls(&headers),
        namespace,
        partition,
        headers: forwarded(headers),
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
    copy_upstream_headers(&r.upstream_headers, h, Encoding::Decoded);
    h.insert(header::CONTENT_TYPE, JSON);
    cache_headers(h, r.outcome, &r.key, &r.model, r.attempts, r.age);
    out
}

fn streamed(r: StreamResponse) -> HttpResponse {
    let mut out = (StatusCode::OK, Body::from_stream(r.events)).into_response();
    let h = out.headers_mut();
    copy_upstream_headers(&r.upstream_headers, h, Encoding::Decoded);
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    cache_headers(h, r.outcome, &r.key, &r.model, r.attempts, r.age);
    out
}

pub(super) fn cache_headers(
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
