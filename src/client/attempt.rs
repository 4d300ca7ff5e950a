//! One model's part of a miss: the breaker's admission, the retry budget, a concurrency
//! permit, the attempts and the waits between them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tracing::{debug, info};

use crate::error::{error_body, UpstreamError, UpstreamErrorKind};
use crate::upstream;
use crate::upstream::breaker::{Admission, Cause, Verdict};
use crate::upstream::retry::{backoff, Spend};

use super::form::Form;
use super::{Engine, Prepared};

impl Engine {
    /// Calls one model: breaker, attempt, and retries as the policy, the budget and the deadline
    /// allow. A stream is returned once its head has arrived ([`super::form::Live`]): retries
    /// happen only before the first byte reaches the caller.
    pub(crate) async fn call_model<F: Form>(
        &self,
        p: &Prepared,
        call: Call<'_>,
        attempts: &mut u32,
    ) -> Result<F::Fetched, UpstreamError> {
        let Call {
            model,
            body,
            deadline,
            plan,
            rescue,
        } = call;
        let policy = &self.config.retry;
        let mut retry = 0;
        loop {
            let permit = self.upstream_slot(model, deadline).await?;
            let now = self.clock.instant();
            let admission = match rescue {
                false => self.breakers.admit(model, now),
                true => self.breakers.admit_rescue(model, now),
            };
            if let Admission::Reject { retry_in, cause } = admission {
                debug!(model, ?retry_in, ?cause, "breaker blocks the model");
                return Err(breaker_error(model, retry_in, cause));
            }
            if retry == 0 {
                self.budget.deposit(self.clock.instant());
            }
            *attempts += 1;
            let probing = ProbeWatch {
                engine: self,
                model,
                armed: admission == Admission::Probe,
            };
            let result = self
                .attempt::<F>(p, model, body.clone(), deadline, permit)
                .await;
            probing.ended();
            let error = match result {
                Ok(mut fetched) => {
                    if F::answered_now(&mut fetched, admission) {
                        let now = self.clock.instant();
                        self.breakers
                            .record(model, admission, Verdict::Answered, now);
                    }
                    return Ok(fetched);
                }
                Err(e) => e,
            };
            let now = self.clock.instant();
            self.breakers.record(model, admission, verdict(&error), now);
            if !error.is_retryable() || retry >= plan.retries {
                return Err(error);
            }
            let delay = match error.retry_after {
                Some(wait) if wait > plan.max_retry_after => {
                    info!(key = %p.key, model, status = error.status, ?wait, "retry-after too long; not waiting");
                    return Err(error);
                }
                Some(wait) => wait,
                None => backoff(policy.base_delay.min(plan.max_delay), plan.max_delay, retry),
            };
            if Instant::now() + delay >= deadline {
                return Err(error);
            }
            if !self.budget.try_withdraw(now, plan.spend) {
                info!(key = %p.key, model, status = error.status, "retry budget spent; not retrying");
                return Err(error);
            }
            retry += 1;
            info!(
                key = %p.key,
                model,
                status = error.status,
                delay_ms = delay.as_millis() as u64,
                retry,
                "retrying"
            );
            tokio::time::sleep(delay).await;
        }
    }

    /// A concurrency permit for one upstream request, waiting in a bounded queue when all are
    /// taken. Waiting here is local queueing, not the model's fault: a timeout or a full queue
    /// is never held against its breaker. A full queue answers at once, as an overload (529,
    /// `retry-after: 1`), so that a burst beyond `server.max_queued` neither waits out the
    /// deadline nor grows without bound; a stale entry still stands in for it.
    pub(super) async fn upstream_slot(
        &self,
        model: &str,
        deadline: Instant,
    ) -> Result<OwnedSemaphorePermit, UpstreamError> {
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            return Ok(permit);
        }
        let max = self.config.server.max_queued;
        let Some(_place) = Queued::enter(&self.queued, max) else {
            return Err(queue_full(model, max));
        };
        match tokio::time::timeout_at(deadline, self.permits.clone().acquire_owned()).await {
            Ok(permit) => Ok(permit.expect("the semaphore is never closed")),
            Err(_) => Err(upstream::transport_error(UpstreamErrorKind::Timeout, model)),
        }
    }

    /// One upstream attempt, holding a concurrency permit, taken in the call's form.
    async fn attempt<F: Form>(
        &self,
        p: &Prepared,
        model: &str,
        body: Bytes,
        deadline: Instant,
        permit: OwnedSemaphorePermit,
    ) -> Result<F::Fetched, UpstreamError> {
        let result = async {
            let response = self
                .upstream
                .send(
                    http::Method::POST,
                    &p.path,
                    self.upstream_headers(&p.headers),
                    body,
                    model,
                    deadline,
                )
                .await?;
            F::take(response, permit, model, deadline).await
        }
        .await;
        let status = match &result {
            Ok(_) => 200,
            Err(e) => e.status,
        };
        self.metrics.attempt(model, status);
        result
    }
}

/// A probe's attempt in progress: dropped before it ended (the request was cancelled, its
/// caller gone), it gives the probe back ([`crate::upstream::breaker::Breakers::abandon_probe`]).
struct ProbeWatch<'a> {
    engine: &'a Engine,
    model: &'a str,
    armed: bool,
}

impl ProbeWatch<'_> {
    /// The attempt ended: what it found is recorded by the caller (or, for a stream, by
    /// its relay).
    fn ended(mut self) {
        self.armed = false;
    }
}

impl Drop for ProbeWatch<'_> {
    fn drop(&mut self) {
        if self.armed {
            let now = self.engine.clock.instant();
            self.engine.breakers.abandon_probe(self.model, now);
        }
    }
}

/// A place in the queue for an upstream slot, given back when dropped.
struct Queued<'a>(&'a AtomicUsize);

impl<'a> Queued<'a> {
    fn enter(queued: &'a AtomicUsize, max: usize) -> Option<Self> {
        queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Queued(queued))
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn queue_full(model: &str, max: usize) -> UpstreamError {
    let message = format!(
        "fallthrough is overloaded: {max} requests already wait for an upstream slot \
         (server.max_queued)"
    );
    UpstreamError {
        kind: UpstreamErrorKind::Overloaded,
        model: model.to_owned(),
        status: 529,
        body: error_body("overloaded_error", &message),
        retry_after: Some(Duration::from_secs(1)),
        attempts: 0,
        headers: Box::default(),
        should_retry: None,
    }
}

/// One model's call, as [`Engine::call_model`] makes it.
pub(crate) struct Call<'a> {
    pub model: &'a str,
    pub body: Bytes,
    pub deadline: Instant,
    pub plan: RetryPlan,
    /// The request has nowhere else to go: a held model may let it through as a rescue
    /// ([`crate::upstream::breaker::Breakers::admit_rescue`]).
    pub rescue: bool,
}

/// How one model's call is retried.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RetryPlan {
    /// Retries after the first attempt.
    pub retries: u32,
    /// Cap of the backoff.
    pub max_delay: Duration,
    /// Longest `retry-after` waited out.
    pub max_retry_after: Duration,
    /// Which share of the retry budget its retries may use.
    pub spend: Spend,
}

impl RetryPlan {
    pub(super) const NONE: RetryPlan = RetryPlan {
        retries: 0,
        max_delay: Duration::ZERO,
        max_retry_after: Duration::ZERO,
        spend: Spend::LastChance,
    };
}

fn verdict(error: &UpstreamError) -> Verdict {
    verdict_of(error.kind)
}

/// What a failure of this kind tells the model's breaker.
pub(super) fn verdict_of(kind: UpstreamErrorKind) -> Verdict {
    match kind {
        UpstreamErrorKind::Overloaded => Verdict::Failed(Cause::Overloaded),
        UpstreamErrorKind::Server => Verdict::Failed(Cause::ServerError),
        UpstreamErrorKind::Timeout | UpstreamErrorKind::Connect => {
            Verdict::Failed(Cause::Unreachable)
        }
        UpstreamErrorKind::RateLimited => Verdict::Neutral,
        UpstreamErrorKind::SpendLimit | UpstreamErrorKind::Client => Verdict::Answered,
    }
}

/// What a caller gets while a model's breaker blocks it: the kind of failure that opened it
/// (SPEC: an overload as 529, an unreachable upstream as 502, never an overload it did not
/// see), saying when to retry.
pub(super) fn breaker_error(model: &str, retry_in: Duration, cause: Cause) -> UpstreamError {
    let secs = retry_in.as_secs_f64().ceil().max(1.0);
    let (kind, status, error_type, failure) = match cause {
        Cause::Overloaded => (
            UpstreamErrorKind::Overloaded,
            529,
            "overloaded_error",
            "is overloaded",
        ),
        Cause::ServerError => (
            UpstreamErrorKind::Server,
            500,
            "api_error",
            "answered server errors",
        ),
        Cause::Unreachable => (
            UpstreamErrorKind::Connect,
            502,
            "api_error",
            "could not be reached",
        ),
    };
    let message =
        format!("{model} {failure}: fallthrough's circuit breaker holds requests for {secs} s");
    UpstreamError {
        kind,
        model: model.to_owned(),
        status,
        body: error_body(error_type, &message),
        retry_after: Some(Duration::from_secs_f64(secs)),
        attempts: 0,
        headers: Box::default(),
        should_retry: None,
    }
}
