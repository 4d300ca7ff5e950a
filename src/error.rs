//! The library's typed errors, and the Messages API's error shape that every front end speaks.

use std::time::Duration;

use bytes::Bytes;
use serde_json::json;

/// Everything that can go wrong in the library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The upstream answered with an error, or could not be reached, and nothing could stand in.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The request itself is unusable (not JSON, no `model`, ...); it never reached the upstream.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// `only-if-cached` was asked and the cache had no usable entry.
    #[error("not in the cache and only-if-cached was asked")]
    NotCached,
    /// The disk tier failed (I/O, or the directory is held by another process).
    #[error("disk cache")]
    Disk(#[from] DiskError),
    /// The shared tier cannot be used as configured (its URL), or an admin command on it failed.
    #[error("shared tier")]
    Shared(#[from] SharedError),
    /// Something that should not happen did; the message says what.
    #[error("internal error: {0}")]
    Internal(String),
    /// A setting is out of range; the message says which and why.
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// Errors of the disk tier.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiskError {
    /// Another process has the cache directory open; sled holds an exclusive lock on it.
    #[error(
        "the cache directory {dir} is in use by another process (a running `fallthrough serve`?); \
         send the requests through that server with `--server URL`, or use another `--cache-dir`"
    )]
    Locked { dir: String },
    /// The cache directory's path names something that is not a directory.
    #[error(
        "the cache directory {dir} is a file, not a directory; point --cache-dir (or \
         `cache_dir` in the configuration) at a directory, or move the file away"
    )]
    NotADirectory { dir: String },
    /// The storage engine under the tier failed (its own error is the source).
    #[error("the disk cache's storage failed")]
    Storage(#[source] StorageError),
    #[error("I/O")]
    Io(#[source] std::io::Error),
    /// The tier is not open at this moment: still opening at the start, or being opened again
    /// after its storage failed. An operation that must reach it (a purge) cannot be done now.
    #[error(
        "the disk cache {dir} is not open right now (still opening, or being opened again after \
         a failure); try again in a few seconds"
    )]
    Unavailable { dir: String },
    /// The blocking thread that ran a disk operation panicked or was cancelled.
    #[error("the disk tier's worker thread failed: {0}")]
    Worker(String),
}

/// Errors of the shared tier that reach a caller: a URL that cannot work, and the admin
/// commands' failures. On the request path the tier's failures are misses, never errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SharedError {
    /// `shared.url` does not parse or names something the client cannot use.
    #[error("shared.url {url} cannot be used: {reason}")]
    Url { url: String, reason: String },
    /// `shared.ca_file` cannot be read.
    #[error("shared.ca_file {path} cannot be read: {reason}")]
    CaFile { path: String, reason: String },
    /// The server did not answer, or answered with an error.
    #[error("the shared tier's server failed: {0}")]
    Server(String),
}

/// A failure of the storage engine under the disk tier, opaque so that the engine's own error
/// type (sled's) is not part of this crate's API and can change without breaking callers; its
/// message and source chain say what happened.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StorageError(#[source] Box<dyn std::error::Error + Send + Sync>);

impl StorageError {
    pub(crate) fn new(e: impl std::error::Error + Send + Sync + 'static) -> StorageError {
        StorageError(Box::new(e))
    }
}

impl DiskError {
    /// A storage engine's error as a [`DiskError::Storage`]; `map_err(DiskError::storage)`.
    pub(crate) fn storage(e: impl std::error::Error + Send + Sync + 'static) -> DiskError {
        DiskError::Storage(StorageError::new(e))
    }

    /// A blocking task that did not return, as a [`DiskError::Worker`].
    pub(crate) fn worker(e: tokio::task::JoinError) -> DiskError {
        DiskError::Worker(e.to_string())
    }
}

/// What kind of failure the upstream gave; decides retry, stale service and the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum UpstreamErrorKind {
    /// 529 `overloaded_error`.
    Overloaded,
    /// 429 that a wait can cure.
    RateLimited,
    /// 429 saying a spend limit was reached: waiting does not help.
    SpendLimit,
    /// 408, 500, 502, 503, 504 and other 5xx.
    Server,
    /// The request did not complete in time.
    Timeout,
    /// No connection, or it broke before an answer.
    Connect,
    /// Any other 4xx: the request is at fault and passes through unchanged.
    Client,
}

/// An upstream failure, keeping the status and the error JSON so a proxy can pass it on as is.
#[derive(Debug, Clone, thiserror::Error)]
#[error("upstream {model}: {}", self.describe())]
pub struct UpstreamError {
    pub kind: UpstreamErrorKind,
    /// The model whose call failed last.
    pub model: String,
    /// The HTTP status; for transport failures the one a proxy answers with (502 or 504).
    pub status: u16,
    /// The body as the upstream sent it, or an API-shaped body made here for transport failures.
    pub body: Bytes,
    /// How long the upstream (or the breaker) says to wait before trying again.
    pub retry_after: Option<Duration>,
    /// Upstream attempts made for the request before giving up.
    pub attempts: u32,
    /// The upstream's response headers (`request-id`, `retry-after`, `x-should-retry`, ...),
    /// for a proxy to pass on; empty when no answer came. Boxed: errors travel in every
    /// `Result` of the request path, and a header map would triple their size.
    pub headers: Box<http::HeaderMap>,
    /// What the upstream's `x-should-retry` said, when it said it: it decides before the
    /// status does.
    pub should_retry: Option<bool>,
}

impl UpstreamError {
    /// Whether another attempt may succeed. The upstream's `x-should-retry` decides when it was
    /// sent; else SPEC retries 529, 429 (not a spend limit), 408, 500, 502, 503, 504, timeouts
    /// and connection failures; other 5xx (501, 505, ...) say the request cannot be served,
    /// however often it is sent.
    pub fn is_retryable(&self) -> bool {
        self.should_retry
            .unwrap_or_else(|| self.retryable_by_kind())
    }

    /// Whether the engine owned retrying this error: it retried it, or would have, had the
    /// budget, the deadline, the breaker or the upstream's `x-should-retry: false` allowed. A
    /// proxy that returns such an error tells its caller not to retry on top (one retry
    /// layer); any other error passes through exactly as the upstream sent it.
    pub fn retried_by_engine(&self) -> bool {
        self.retryable_by_kind() || self.should_retry == Some(true)
    }

    fn retryable_by_kind(&self) -> bool {
        match self.kind {
            UpstreamErrorKind::Client | UpstreamErrorKind::SpendLimit => false,
            UpstreamErrorKind::Server => matches!(self.status, 408 | 500 | 502 | 503 | 504),
            _ => true,
        }
    }

    /// Whether a stale entry may stand in for this failure (SPEC: 529, 429, 5xx, timeout,
    /// connection failure).
    pub fn allows_stale(&self) -> bool {
        matches!(
            self.kind,
            UpstreamErrorKind::Overloaded
                | UpstreamErrorKind::RateLimited
                | UpstreamErrorKind::Server
                | UpstreamErrorKind::Timeout
                | UpstreamErrorKind::Connect
        )
    }

    fn describe(&self) -> String {
        let message = serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
            .unwrap_or_default();
        format!("{} {:?} {}", self.status, self.kind, message)
    }
}

/// An error and its sources, joined by `: `, for logs and messages (each level names only
/// itself, so nothing repeats).
pub fn report(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The `error.type` the Messages API uses for a status.
pub fn error_type_for_status(status: u16) -> &'static str {
    match status {
        400 => "invalid_request_error",
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        405 => "invalid_request_error",
        409 => "conflict_error",
        413 => "request_too_large",
        415 => "invalid_request_error",
        431 => "invalid_request_error",
        429 => "rate_limit_error",
        408 | 504 => "timeout_error",
        529 => "overloaded_error",
        _ => "api_error",
    }
}

/// An error body in the Messages API's shape, so the official SDKs parse it.
pub fn error_body(error_type: &str, message: &str) -> Bytes {
    let body = json!({
        "type": "error",
        "error": { "type": error_type, "message": message },
    });
    Bytes::from(body.to_string())
}
