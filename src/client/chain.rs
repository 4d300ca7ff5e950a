//! The chain of one miss, for both forms of answer: the primary model, then (unless a stale
//! entry stands in) its fallbacks in order, each after a look for a fresh entry of its own,
//! until one answers, one fails in a way no fallback can mend, or all are exhausted.

use std::time::Duration;

use tokio::time::Instant;

use crate::error::UpstreamError;
use crate::key::CacheKey;

use super::form::Form;
use super::store::hit_answer;
use super::{Answer, Call, Engine, Prepared, RetryPlan};
use crate::entry::Freshness;

/// How a chain ended.
pub(super) enum Reached<T> {
    /// A model answered: what it sent, under the key of the model that answered.
    Fetched {
        fetched: T,
        key: CacheKey,
        model: String,
        attempts: u32,
    },
    /// A stored answer stands in: an identical flight's, or a fallback's fresh entry.
    Stored { answer: Answer, key: CacheKey },
    /// The primary failed while a stale entry is at hand: the caller is served that entry at
    /// once, and a refresh may go on until `deadline`.
    Stale {
        error: UpstreamError,
        deadline: Instant,
    },
    /// No model answered; the error says why (and how many attempts were made).
    Failed(UpstreamError),
}

impl Engine {
    /// Runs the chain of `p` in form `F`. `has_stale`: a stale entry is at hand, so the
    /// primary is tried once and its failure ends the chain ([`Reached::Stale`]).
    pub(super) async fn run_chain<F: Form>(
        &self,
        p: &Prepared,
        has_stale: bool,
    ) -> Reached<F::Fetched> {
        if let Some(answer) = self.raced_answer(p).await {
            return Reached::Stored { answer, key: p.key };
        }
        let deadline = Instant::now() + self.config.retry.deadline;
        let mut attempts = 0;
        let mut last = None;
        let models = std::iter::once(&p.model).chain(self.chain(p));
        for (position, model) in models.enumerate() {
            let (key, body) = match position {
                0 => (p.key, p.body(F::STREAM)),
                _ => p.for_model(model, F::STREAM),
            };
            if position > 0 {
                if let Some(answer) = self.fresh_answer(&key, p, attempts).await {
                    return Reached::Stored { answer, key };
                }
            }
            let call = Call {
                model,
                body,
                deadline,
                plan: self.plan(p, position, has_stale),
            };
            match self.call_model::<F>(p, call, &mut attempts).await {
                Ok(fetched) => {
                    return Reached::Fetched {
                        fetched,
                        key,
                        model: model.clone(),
                        attempts,
                    }
                }
                Err(e) if has_stale && e.allows_stale() => {
                    let error = with_attempts(e, attempts);
                    return Reached::Stale { error, deadline };
                }
                Err(e) if !e.allows_stale() => {
                    return Reached::Failed(with_attempts(e, attempts));
                }
                Err(e) => last = Some(e),
            }
        }
        let last = last.expect("a chain has its primary, which sets `last` or returns");
        Reached::Failed(exhausted(last, attempts))
    }

    /// A fresh entry under a fallback's `key`, as the answer after `attempts` upstream attempts.
    pub(super) async fn fresh_answer(
        &self,
        key: &CacheKey,
        p: &Prepared,
        attempts: u32,
    ) -> Option<Answer> {
        let now = self.clock.millis();
        let hit = self.cache.get(key, now).await?;
        (hit.entry.freshness(now, p.controls.max_age) == Freshness::Fresh).then(|| Answer {
            attempts,
            ..hit_answer(&hit, now)
        })
    }

    /// The fallback models of the request's model, unless the request wants its model only.
    fn chain<'a>(&'a self, p: &Prepared) -> &'a [String] {
        match p.controls.no_fallback {
            true => &[],
            false => self
                .config
                .fallback
                .get(&p.model)
                .map_or(&[], Vec::as_slice),
        }
    }

    /// How the `position`th model of the request's chain (0: the primary) is retried.
    /// With a stale entry at hand, not at all: the entry answers at once. A model with a
    /// fallback after it gets `retries_before_fallback` quick retries, each waiting at most
    /// `before_fallback_delay` (a longer `retry-after` sends the request on to the fallback):
    /// the next model answers sooner than a long backoff, and the overloaded model is spared.
    /// The last model gets the full policy.
    pub(super) fn plan(&self, p: &Prepared, position: usize, has_stale: bool) -> RetryPlan {
        let policy = &self.config.retry;
        if has_stale && position == 0 {
            RetryPlan::NONE
        } else if position < self.chain(p).len() {
            RetryPlan {
                retries: policy.retries_before_fallback,
                max_delay: policy.before_fallback_delay,
                max_retry_after: policy.before_fallback_delay,
            }
        } else {
            RetryPlan {
                retries: policy.max_retries,
                max_delay: policy.max_delay,
                max_retry_after: policy.max_retry_after,
            }
        }
    }
}

/// The error a caller gets when every model is exhausted: the last upstream error, saying when
/// trying again makes sense (at least a second).
fn exhausted(mut last: UpstreamError, attempts: u32) -> UpstreamError {
    last.retry_after = Some(
        last.retry_after
            .unwrap_or_default()
            .max(Duration::from_secs(1)),
    );
    with_attempts(last, attempts)
}

fn with_attempts(mut e: UpstreamError, attempts: u32) -> UpstreamError {
    e.attempts = attempts;
    e
}
