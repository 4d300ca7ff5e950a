//! Requests on paths the cache does not answer (`/v1/models`, batches, files, …): sent as they
//! are, answered as the upstream answers, never stored, never retried. They still go through
//! the engine's limits, so that a caller cannot get round them by choosing another path: a
//! concurrency permit (held until the body has been read), the named model's breaker, a deposit
//! in the retry budget (they are first attempts), and the attempt and request metrics.

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, Method, StatusCode};
use tokio::time::Instant;

use super::attempt::{breaker_error, verdict_of};
use super::stream::EventStream;
use super::Engine;
use crate::error::Error;
use crate::outcome::Outcome;
use crate::upstream;
use crate::upstream::breaker::{Admission, Verdict};

/// Label of the attempt metric for a passed-through request that names no model.
const NO_MODEL: &str = "none";

/// A request sent upstream as it is.
#[derive(Debug, Clone)]
pub struct PassThrough {
    pub method: Method,
    /// Path and query, e.g. `/v1/models?limit=5`.
    pub path_and_query: String,
    /// Headers forwarded as they are; the client's credential fills in when none is given.
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// The upstream's answer to a [`PassThrough`], whatever its status.
pub struct Passed {
    pub status: StatusCode,
    /// The upstream's headers, as it sent them.
    pub headers: HeaderMap,
    /// The body as it arrives; the concurrency permit is given back when it ends or is dropped.
    pub body: EventStream,
}

impl std::fmt::Debug for Passed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Passed")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .finish_non_exhaustive()
    }
}

impl super::Client {
    /// Sends `request` upstream as it is, through the engine's limits (see the module's doc).
    /// An error only when no answer came (a transport failure, the deadline, an open breaker):
    /// the upstream's own error statuses are answers here, passed back unchanged.
    pub async fn pass_through(&self, request: PassThrough) -> Result<Passed, Error> {
        let started = Instant::now();
        let result = self.engine.pass_through(request).await;
        match &result {
            Ok(_) => self
                .engine
                .metrics
                .request(Outcome::Bypass, started.elapsed()),
            Err(_) => self.engine.metrics.request_failed(started.elapsed()),
        }
        result.map_err(Error::Upstream)
    }
}

impl Engine {
    async fn pass_through(
        &self,
        request: PassThrough,
    ) -> Result<Passed, crate::error::UpstreamError> {
        let PassThrough {
            method,
            path_and_query,
            mut headers,
            body,
        } = request;
        let model = named_model(&body);
        let label = model.as_deref().unwrap_or(NO_MODEL);
        let deadline = Instant::now() + self.config.retry.deadline;
        let permit = self.upstream_slot(label, deadline).await?;
        let admission = match &model {
            Some(model) => match self.breakers.admit(model, self.clock.instant()) {
                Admission::Reject { retry_in, cause } => {
                    return Err(breaker_error(model, retry_in, cause))
                }
                admission => Some(admission),
            },
            None => None,
        };
        self.budget.deposit(self.clock.instant());
        self.add_credential(&mut headers);
        let result = self
            .upstream
            .pass_through(method, &path_and_query, headers, body, deadline)
            .await;
        let (status, verdict) = match &result {
            Ok(r) if r.status().is_success() => (r.status().as_u16(), Verdict::Answered),
            // By the same rules as a miss's answers.
            Ok(r) => {
                let status = r.status().as_u16();
                (status, verdict_of(upstream::kind_of_status(status, false)))
            }
            Err(e) => (e.status, verdict_of(e.kind)),
        };
        self.metrics.attempt(label, status);
        if let (Some(model), Some(admission)) = (&model, admission) {
            let now = self.clock.instant();
            self.breakers.record(model, admission, verdict, now);
        }
        // The one try was made: its failure says so (and is the caller's to retry).
        let response = result.map_err(|e| crate::error::UpstreamError { attempts: 1, ..e })?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response
            .bytes_stream()
            .map(move |chunk| {
                let _held = &permit;
                chunk.map_err(std::io::Error::other)
            })
            .boxed();
        Ok(Passed {
            status,
            headers,
            body,
        })
    }
}

/// The `model` a JSON body names, if it names one: its breaker then admits the request.
fn named_model(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Named {
        model: String,
    }
    serde_json::from_slice::<Named>(body).ok().map(|n| n.model)
}
