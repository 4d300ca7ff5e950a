//! The chain of one miss, for both forms of answer: the primary model, then (unless a stale
//! entry stands in) its fallbacks in order, each after a look for an entry of its own (a fresh
//! one answers; a stale one stands in for the fallback as the primary's does for the primary:
//! one try, and its failure serves the entry), until one answers, one fails in a way no
//! fallback can mend, or all are exhausted. When no model was even tried (every one held by
//! its breaker), one may be tried anyway as a rescue (`upstream/breaker.rs` argues the rate):
//! the request has nowhere else to go. Before any of it, a lead takes the fleet's lease on the
//! key, or takes the answer of the instance that holds it (`cache/shared.rs`).

use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;
use tracing::{debug, info};

use crate::cache::shared::Lease;
use crate::cache::SharedFlight;
use crate::error::UpstreamError;
use crate::key::CacheKey;
use crate::upstream::retry::Spend;

use super::form::Form;
use super::store::hit_answer;
use super::{Answer, Call, Engine, Prepared, RetryPlan};
use crate::entry::Freshness;
use crate::Outcome;

/// How a chain ended.
pub(super) enum Reached<T> {
    /// A model answered: what it sent, under the key of the model that answered.
    Fetched {
        fetched: T,
        key: CacheKey,
        model: String,
        attempts: u32,
        /// The shared tier's lease on the request's key, if this instance leads the fleet's
        /// flight: to be dropped once the answer is stored, so that the other instances find
        /// the answer, not a free key.
        lease: Option<Lease>,
    },
    /// A stored answer stands in: an identical flight's (this instance's or another's), or a
    /// fallback's fresh entry.
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
        let lease = match self.fleet_flight(p).await {
            Ok(lease) => lease,
            Err(answer) => return Reached::Stored { answer, key: p.key },
        };
        let deadline = Instant::now() + self.config.retry.deadline;
        let mut attempts = 0;
        let mut last = None;
        for (position, model) in self.models(p).enumerate() {
            let (key, body) = model_request::<F>(p, position, model);
            // A fallback's own entry: a fresh one answers; a stale one stands in for it.
            let standby = match position {
                0 => None,
                _ => match self.own_entry(&key, p, attempts).await {
                    Some(Own::Fresh(answer)) => return Reached::Stored { answer, key },
                    Some(Own::Stale(answer)) => Some(answer),
                    None => None,
                },
            };
            if position > 0 && Instant::now() >= deadline {
                // The request's time ran out on an earlier model: this one gets no attempt (an
                // attempt past the deadline fails at once, and its breaker would be charged a
                // failure it never had). Its stale entry may still stand in.
                if let Some(answer) = standby {
                    return Reached::Stored {
                        answer: Answer { attempts, ..answer },
                        key,
                    };
                }
                break;
            }
            let stale_here = match position {
                0 => has_stale,
                _ => standby.is_some(),
            };
            let call = Call {
                model,
                body,
                deadline,
                plan: self.plan(p, position, stale_here),
                rescue: false,
            };
            match self.call_model::<F>(p, call, &mut attempts).await {
                Ok(fetched) => {
                    return Reached::Fetched {
                        fetched,
                        key,
                        model: model.clone(),
                        attempts,
                        lease,
                    }
                }
                Err(e) if stale_here && e.allows_stale() => {
                    let error = with_attempts(e, attempts);
                    return match standby {
                        Some(answer) => {
                            info!(key = %p.key, model, status = error.status, "upstream cannot answer; serving the fallback's stale entry");
                            Reached::Stored {
                                answer: Answer { attempts, ..answer },
                                key,
                            }
                        }
                        None => Reached::Stale { error, deadline },
                    };
                }
                Err(e) if !e.allows_stale() => {
                    return Reached::Failed(with_attempts(e, attempts));
                }
                Err(e) => last = Some(e),
            }
        }
        // Reached only without a stale entry: with one, the primary's failure returned above.
        if attempts == 0 {
            if let Some(reached) = self.rescue::<F>(p, deadline, lease).await {
                return reached;
            }
        }
        let last = last.expect("a chain has its primary, which sets `last` or returns");
        Reached::Failed(exhausted(last, attempts))
    }

    /// Every model of the chain refused without an attempt: the first whose breaker lets a
    /// rescue through is tried once, without retries. When every slot is taken, the request
    /// waits for the first to open again (at most one `rescue_interval`, within its deadline)
    /// and asks once more: by then the rescue in flight may have closed the breaker. `None`
    /// when no model lets it through.
    async fn rescue<F: Form>(
        &self,
        p: &Prepared,
        deadline: Instant,
        mut lease: Option<Lease>,
    ) -> Option<Reached<F::Fetched>> {
        if let Some(reached) = self.try_rescue::<F>(p, deadline, &mut lease).await {
            return Some(reached);
        }
        let now = Instant::now();
        let next = self
            .models(p)
            .filter_map(|model| self.breakers.next_rescue(model, now))
            .min()?;
        if next >= deadline {
            return None;
        }
        let wait_ms = (next - now).as_millis() as u64;
        debug!(key = %p.key, wait_ms, "waiting for a rescue slot");
        tokio::time::sleep_until(next).await;
        self.try_rescue::<F>(p, deadline, &mut lease).await
    }

    /// One pass of [`Self::rescue`] over the chain's models.
    async fn try_rescue<F: Form>(
        &self,
        p: &Prepared,
        deadline: Instant,
        lease: &mut Option<Lease>,
    ) -> Option<Reached<F::Fetched>> {
        let mut attempts = 0;
        for (position, model) in self.models(p).enumerate() {
            let (key, body) = model_request::<F>(p, position, model);
            let call = Call {
                model,
                body,
                deadline,
                plan: RetryPlan::NONE,
                rescue: true,
            };
            let result = self.call_model::<F>(p, call, &mut attempts).await;
            if attempts == 0 {
                continue;
            }
            debug!(key = %p.key, model, answered = result.is_ok(), "rescue");
            return Some(match result {
                Ok(fetched) => Reached::Fetched {
                    fetched,
                    key,
                    model: model.clone(),
                    attempts,
                    lease: lease.take(),
                },
                Err(e) => Reached::Failed(exhausted(e, attempts)),
            });
        }
        None
    }

    /// The request's place in the fleet's flight for its key (the shared tier's single
    /// flight): `Ok` with the lease when this instance leads (or `None` when there is no
    /// fleet to lead: no shared tier, or it did not answer), `Err` with another instance's
    /// answer when one landed while this one waited. `no-cache` requests fetch for
    /// themselves.
    async fn fleet_flight(&self, p: &Prepared) -> Result<Option<Lease>, Answer> {
        if p.controls.no_cache {
            return Ok(None);
        }
        match self
            .cache
            .shared_flight(&p.key, self.config.retry.deadline)
            .await
        {
            SharedFlight::Lead(lease) => Ok(Some(lease)),
            SharedFlight::Alone => Ok(None),
            SharedFlight::Answered(hit) => Err(hit_answer(&hit, self.clock.millis())),
        }
    }

    /// The request's model, then its fallbacks.
    fn models<'a>(&'a self, p: &'a Prepared) -> impl Iterator<Item = &'a String> {
        std::iter::once(&p.model).chain(self.chain(p))
    }

    /// The entry under a model's `key`, fresh or stale, as the answer after `attempts`.
    async fn own_entry(&self, key: &CacheKey, p: &Prepared, attempts: u32) -> Option<Own> {
        let now = self.clock.millis();
        let hit = self.cache.get(key, now).await?;
        let answer = Answer {
            attempts,
            ..hit_answer(&hit, now)
        };
        // Anything found and not fresh is stale: the cache never returns expired entries.
        Some(match hit.entry.freshness(now, p.controls.max_age) {
            Freshness::Fresh => Own::Fresh(answer),
            _ => Own::Stale(Answer {
                outcome: Outcome::Stale,
                ..answer
            }),
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
    /// With a stale entry of its own at hand, not at all: the entry answers at once. A model with a
    /// fallback after it gets `retries_before_fallback` quick retries, each waiting at most
    /// `before_fallback_delay` (a longer `retry-after` sends the request on to the fallback):
    /// the next model answers sooner than a long backoff, and the overloaded model is spared.
    /// The last model gets the full policy.
    pub(super) fn plan(&self, p: &Prepared, position: usize, has_stale: bool) -> RetryPlan {
        let policy = &self.config.retry;
        if has_stale {
            RetryPlan::NONE
        } else if position < self.chain(p).len() {
            RetryPlan {
                retries: policy.retries_before_fallback,
                max_delay: policy.before_fallback_delay,
                max_retry_after: policy.before_fallback_delay,
                spend: Spend::BeforeFallback,
            }
        } else {
            RetryPlan {
                retries: policy.max_retries,
                max_delay: policy.max_delay,
                max_retry_after: policy.max_retry_after,
                spend: Spend::LastChance,
            }
        }
    }
}

/// A model's own entry for a request.
enum Own {
    Fresh(Answer),
    Stale(Answer),
}

/// The key and body of the `position`th model of `p`'s chain (0: the request's own).
fn model_request<F: Form>(p: &Prepared, position: usize, model: &str) -> (CacheKey, Bytes) {
    match position {
        0 => (p.key, p.body(F::STREAM)),
        _ => p.for_model(model, F::STREAM),
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
