//! The two forms an answer is fetched in: whole (a plain Message, read to its end) or live (an
//! event stream, relayed as it comes). The chain of models and each model's attempts are
//! written once, over [`Form`]; only what a successful attempt yields differs.

use std::future::Future;

use bytes::Bytes;
use http::HeaderMap;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use crate::error::UpstreamError;
use crate::upstream;
use crate::upstream::breaker::Admission;

/// How an upstream answer is asked for and taken.
pub(crate) trait Form {
    /// What a successful attempt yields.
    type Fetched: Send;
    /// Whether the upstream is asked for an event stream (`"stream": true`).
    const STREAM: bool;

    /// Takes a response whose head said success, within the attempt: a body that breaks off
    /// while it is read is a failed attempt like any other, retried and held against the
    /// model's breaker.
    fn take(
        response: reqwest::Response,
        permit: OwnedSemaphorePermit,
        model: &str,
        deadline: Instant,
    ) -> impl Future<Output = Result<Self::Fetched, UpstreamError>> + Send;

    /// Whether a successful attempt tells the model's breaker "answered" now. A whole body
    /// does; a live stream keeps its `admission` and tells the breaker how it ended, once it
    /// has (an `error` event after the head is a failure like a 529 before it).
    fn answered_now(fetched: &mut Self::Fetched, admission: Admission) -> bool;
}

/// A whole Message body; the concurrency permit is given back once it is read.
pub(crate) struct Whole;

/// A whole answer: its body, and the upstream's headers to pass on.
pub(crate) struct WholeResponse {
    pub body: Bytes,
    pub headers: HeaderMap,
}

impl Form for Whole {
    type Fetched = WholeResponse;
    const STREAM: bool = false;

    async fn take(
        response: reqwest::Response,
        _permit: OwnedSemaphorePermit,
        model: &str,
        deadline: Instant,
    ) -> Result<WholeResponse, UpstreamError> {
        let headers = response.headers().clone();
        let body = upstream::read_body(response, model, deadline).await?;
        Ok(WholeResponse { body, headers })
    }

    fn answered_now(_: &mut WholeResponse, _: Admission) -> bool {
        true
    }
}

/// A live event stream, from its head on: retries end once the head has arrived.
pub(crate) struct Live;

/// A response to relay, holding its concurrency permit until the stream ends.
pub(crate) struct LiveResponse {
    pub response: reqwest::Response,
    pub permit: OwnedSemaphorePermit,
    /// The breaker's admission of the attempt, for the verdict at the stream's end; `None`
    /// for a probe or a rescue, whose head already closed the breaker (a long stream must not
    /// hold the model in probing): then only a failure is told at the end.
    pub admission: Option<Admission>,
}

impl Form for Live {
    type Fetched = LiveResponse;
    const STREAM: bool = true;

    async fn take(
        response: reqwest::Response,
        permit: OwnedSemaphorePermit,
        _model: &str,
        _deadline: Instant,
    ) -> Result<LiveResponse, UpstreamError> {
        Ok(LiveResponse {
            response,
            permit,
            admission: None,
        })
    }

    fn answered_now(live: &mut LiveResponse, admission: Admission) -> bool {
        let decides = matches!(admission, Admission::Probe | Admission::Rescue);
        live.admission = (!decides).then_some(admission);
        decides
    }
}
