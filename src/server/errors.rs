//! Every failure in the API's own error shape.

use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response as HttpResponse};
use tracing::warn;

use super::{copy_upstream_headers, header_value, Encoding, JSON, X_ATTEMPTS, X_MODEL};
use crate::error::{error_body, error_type_for_status, Error, UpstreamError};

const X_SHOULD_RETRY: HeaderName = HeaderName::from_static("x-should-retry");

/// Every library error as the API's error shape, with the upstream's own status, body and
/// headers when it was the upstream's error. One retry layer: an error the engine retried (or
/// would have, had its budget, breaker or deadline allowed) says `x-should-retry: false`, which
/// the official SDKs obey before their own rules, and a whole-second `retry-after` saying when
/// trying again makes sense; any other upstream error passes through as the upstream sent it.
pub(super) fn error_response(e: Error) -> HttpResponse {
    error_response_with(e, UpstreamError::retried_by_engine)
}

/// As [`error_response`], for a request passed through: it gets one try, never retried, so a
/// try that failed (no connection, a timeout) leaves the caller's SDK its own retry rules
/// instead of `x-should-retry: false`; only the proxy's own refusals, made without a try (an
/// open breaker, a full queue), say not to retry.
pub(super) fn passed_error_response(e: Error) -> HttpResponse {
    error_response_with(e, |e| e.attempts == 0 && e.retried_by_engine())
}

fn error_response_with(e: Error, retried: impl Fn(&UpstreamError) -> bool) -> HttpResponse {
    let mut out = match e {
        Error::Upstream(e) => {
            let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_GATEWAY);
            let mut out = (status, e.body.clone()).into_response();
            let h = out.headers_mut();
            copy_upstream_headers(&e.headers, h, Encoding::Decoded);
            if retried(&e) {
                let wait = e.retry_after.unwrap_or_default();
                let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
                h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
                h.insert(X_SHOULD_RETRY, HeaderValue::from_static("false"));
                // The upstream's retry-after-ms would contradict the proxy's own wait.
                h.remove("retry-after-ms");
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
pub(super) fn api_error(status: u16, message: &str) -> HttpResponse {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = error_body(error_type_for_status(status), message);
    let mut out = (code, body).into_response();
    out.headers_mut().insert(header::CONTENT_TYPE, JSON);
    out
}
