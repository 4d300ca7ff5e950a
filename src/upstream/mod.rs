//! The upstream: one HTTP attempt, and the classification of what came back.
//!
//! Retry policy, budget and breaker live beside this file; the loop that combines them is in
//! [`crate::client`].

pub mod breaker;
pub mod retry;

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use tokio::time::Instant;

use crate::error::{error_body, UpstreamError, UpstreamErrorKind};

/// Longest silence tolerated while reading an upstream answer.
pub const STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Largest error body read from the upstream; error bodies are small, this guards memory.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// An HTTP client for one upstream base URL.
#[derive(Clone, Debug)]
pub struct Upstream {
    http: reqwest::Client,
    base: String,
}

impl Upstream {
    pub fn new(base: &str) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            // An upstream that goes silent mid-answer (after the head, between events) must not
            // hold a caller, a concurrency permit and a task forever. The API sends `ping`
            // events on long streams, so minutes of silence mean it is gone.
            .read_timeout(STREAM_IDLE_TIMEOUT)
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            .build()?;
        Ok(Upstream {
            http,
            base: base.trim_end_matches('/').to_owned(),
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends one request and waits for the response's head (not its body), at most until
    /// `deadline`. A non-2xx answer is read and returned as a classified [`UpstreamError`].
    pub async fn send(
        &self,
        method: http::Method,
        path_and_query: &str,
        headers: HeaderMap,
        body: Bytes,
        model: &str,
        deadline: Instant,
    ) -> Result<reqwest::Response, UpstreamError> {
        let response = self
            .head(method, path_and_query, headers, body, model, deadline)
            .await?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let headers = response.headers().clone();
        let body = read_limited(response, MAX_ERROR_BODY, deadline).await;
        Err(classify(status, &headers, body, model))
    }

    /// Sends a request as it is, for paths that are passed through uncached: any status is
    /// the caller's to see.
    pub async fn pass_through(
        &self,
        method: http::Method,
        path_and_query: &str,
        headers: HeaderMap,
        body: Bytes,
        deadline: Instant,
    ) -> Result<reqwest::Response, UpstreamError> {
        self.head(method, path_and_query, headers, body, "", deadline)
            .await
    }

    /// The response's head, or the transport failure in the API's shape.
    async fn head(
        &self,
        method: http::Method,
        path_and_query: &str,
        headers: HeaderMap,
        body: Bytes,
        model: &str,
        deadline: Instant,
    ) -> Result<reqwest::Response, UpstreamError> {
        let url = format!("{}{}", self.base, path_and_query);
        let request = self.http.request(method, url).headers(headers).body(body);
        match tokio::time::timeout_at(deadline, request.send()).await {
            Err(_) => Err(transport_error(UpstreamErrorKind::Timeout, model)),
            Ok(Err(e)) => Err(reqwest_error(&e, model)),
            Ok(Ok(response)) => Ok(response),
        }
    }
}

/// Reads a whole body, failing as a transport error when it breaks off or runs past `deadline`.
pub async fn read_body(
    response: reqwest::Response,
    model: &str,
    deadline: Instant,
) -> Result<Bytes, UpstreamError> {
    match tokio::time::timeout_at(deadline, response.bytes()).await {
        Err(_) => Err(transport_error(UpstreamErrorKind::Timeout, model)),
        Ok(Err(e)) => Err(reqwest_error(&e, model)),
        Ok(Ok(b)) => Ok(b),
    }
}

/// At most `limit` bytes of a body; whatever arrived if it breaks off or runs late.
async fn read_limited(mut response: reqwest::Response, limit: usize, deadline: Instant) -> Bytes {
    let mut out = Vec::new();
    while out.len() < limit {
        match tokio::time::timeout_at(deadline, response.chunk()).await {
            Ok(Ok(Some(chunk))) => out.extend_from_slice(&chunk),
            _ => break,
        }
    }
    out.truncate(limit);
    Bytes::from(out)
}

/// Decides what an error answer means for retries, stale service and the breaker.
pub fn classify(
    status: StatusCode,
    headers: &HeaderMap,
    body: Bytes,
    model: &str,
) -> UpstreamError {
    let retry_after = retry::retry_after(headers, SystemTime::now());
    let spend_limit = status == 429 && is_spend_limit(&body) && retry_after.is_none();
    let kind = kind_of_status(status.as_u16(), spend_limit);
    let body = if serde_json::from_slice::<serde_json::Value>(&body).is_ok() {
        body
    } else {
        // Keep the API's shape even when a gateway in between answered with HTML or nothing.
        let message = format!("upstream answered {status} with a body that is not JSON");
        error_body(
            crate::error::error_type_for_status(status.as_u16()),
            &message,
        )
    };
    UpstreamError {
        kind,
        model: model.to_owned(),
        status: status.as_u16(),
        body,
        retry_after,
        attempts: 0,
        headers: Box::new(headers.clone()),
        should_retry: should_retry(headers),
    }
}

/// The upstream's `x-should-retry: true | false`, when it sent one.
fn should_retry(headers: &HeaderMap) -> Option<bool> {
    match headers.get("x-should-retry")?.to_str().ok()?.trim() {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}

/// What an error status means; `spend_limit`: a 429 that says a spend limit was reached.
pub fn kind_of_status(status: u16, spend_limit: bool) -> UpstreamErrorKind {
    match status {
        529 => UpstreamErrorKind::Overloaded,
        429 if spend_limit => UpstreamErrorKind::SpendLimit,
        429 => UpstreamErrorKind::RateLimited,
        408 | 500..=599 => UpstreamErrorKind::Server,
        _ => UpstreamErrorKind::Client,
    }
}

fn is_spend_limit(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v["error"]["details"]["error_code"]
                .as_str()
                .map(|c| c == "enforced_spend_limit_reached")
        })
        .unwrap_or(false)
}

fn reqwest_error(e: &reqwest::Error, model: &str) -> UpstreamError {
    let kind = if e.is_timeout() {
        UpstreamErrorKind::Timeout
    } else {
        UpstreamErrorKind::Connect
    };
    let mut err = transport_error(kind, model);
    // reqwest's message names the URL (its userinfo taken out below) but never headers.
    let mut detail = std::error::Error::source(e)
        .map(|s| s.to_string())
        .unwrap_or_else(|| e.to_string());
    // The URL's userinfo (an upstream given as https://user:secret@host) is never shown.
    if let Some(url) = e
        .url()
        .filter(|u| !u.username().is_empty() || u.password().is_some())
    {
        detail = detail.replace(url.as_str(), &crate::config::redacted(url.as_str()));
    }
    let message = format!("upstream could not be reached: {detail}");
    err.body = error_body("api_error", &message);
    err
}

/// A transport failure in the API's shape: 504 for a timeout, 502 when no answer came.
pub fn transport_error(kind: UpstreamErrorKind, model: &str) -> UpstreamError {
    let (status, error_type, message) = match kind {
        UpstreamErrorKind::Timeout => (504, "timeout_error", "upstream did not answer in time"),
        _ => (502, "api_error", "upstream could not be reached"),
    };
    UpstreamError {
        kind,
        model: model.to_owned(),
        status,
        body: error_body(error_type, message),
        retry_after: None,
        attempts: 0,
        headers: Box::default(),
        should_retry: None,
    }
}

/// A header value that is never printed: `Debug` shows `Sensitive`.
pub fn sensitive(value: &str) -> Option<HeaderValue> {
    let mut v = HeaderValue::from_str(value).ok()?;
    v.set_sensitive(true);
    Some(v)
}
