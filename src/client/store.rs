//! Answers in and out of the cache: storing a complete answer, refreshing a stale one in the
//! background, and a cached entry as an answer.

use std::sync::Arc;

use bytes::Bytes;
use http::HeaderMap;
use serde_json::Value;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::cache::{Lookup, Tier};
use crate::entry::Entry;
use crate::error::UpstreamError;
use crate::key::CacheKey;
use crate::outcome::Outcome;

use super::form::Whole;
use super::{Answer, Call, Engine, Lead, Prepared, Response};

impl Engine {
    pub(super) async fn store(
        &self,
        key: &CacheKey,
        body: Bytes,
        headers: HeaderMap,
        model: &str,
        attempts: u32,
        store: bool,
    ) -> Answer {
        if store && is_complete_message(&body) {
            let now = self.clock.millis();
            let c = &self.config.cache;
            // A copy of exactly the body: `body` may be a slice of the HTTP client's read buffer,
            // which the memory tier would otherwise keep alive whole (kilobytes per entry, not
            // counted by its byte bound).
            let exact = Bytes::copy_from_slice(&body);
            let entry = Entry::new(exact, model, now, c.ttl, c.stale_for);
            self.cache.insert(*key, entry, now).await;
        }
        Answer {
            body,
            model: model.to_owned(),
            outcome: Outcome::Miss,
            attempts,
            age: None,
            headers,
        }
    }

    /// After the primary failed with a stale entry at hand: tells the waiters (each serves its
    /// stale entry), then refreshes the entry in the background, the flight staying in the
    /// map meanwhile so that identical requests serve theirs without a try of their own. The
    /// refresh's slot (one of [`MAX_REFRESHES`](super::MAX_REFRESHES)) is taken before anyone
    /// is told, so that once they are, [`Engine::settled`] sees the refresh; with no slot
    /// free, no refresh is made.
    pub(super) fn stale_then_refresh(
        self: &Arc<Self>,
        p: &Arc<Prepared>,
        lead: Lead,
        error: UpstreamError,
        deadline: Instant,
    ) {
        let permit = self.refreshes.clone().try_acquire_owned().ok();
        lead.tell(Err(error));
        let Some(permit) = permit else { return };
        let engine = self.clone();
        let p = p.clone();
        tokio::spawn(async move {
            engine.refresh(&p, deadline, permit).await;
            drop(lead);
        });
    }

    /// Retries the primary, plainly, holding a refresh slot (`_permit`), and stores the answer.
    async fn refresh(&self, p: &Prepared, deadline: Instant, _permit: OwnedSemaphorePermit) {
        let mut attempts = 0;
        let call = Call {
            model: &p.model,
            body: p.body(false),
            deadline,
            plan: self.plan(p, usize::MAX, false),
            rescue: false,
        };
        if let Ok(fetched) = self.call_model::<Whole>(p, call, &mut attempts).await {
            debug!(key = %p.key, "stale entry refreshed");
            let store = !p.controls.no_store;
            (self.store(
                &p.key,
                fetched.body,
                fetched.headers,
                &p.model,
                attempts,
                store,
            ))
            .await;
        }
    }
}

/// Only a complete answer is stored: a Message with content and a stop reason that replays as
/// an event stream (a stored entry is served both ways: a text block without `text` would be
/// a 500 for every streamed request of its lifetime), or a `count_tokens` answer. Anything
/// else (a refusal in the shape of success, a cut body) is passed on but never cached.
pub(super) fn is_complete_message(body: &[u8]) -> bool {
    match serde_json::from_slice::<Value>(body) {
        Ok(v) if v["type"] == "message" => {
            let complete = v["content"].is_array() && !v["stop_reason"].is_null();
            let replays = complete && crate::sse::replay_frames(&v).is_ok();
            if complete && !replays {
                warn!(
                    "upstream sent a Message that cannot be replayed as a stream; not storing it"
                );
            }
            replays
        }
        Ok(v) => v["input_tokens"].is_u64() && v.as_object().is_some_and(|o| o.len() <= 2),
        Err(_) => {
            warn!("upstream sent a 200 whose body is not JSON; not storing it");
            false
        }
    }
}

pub(super) fn hit_answer(hit: &Lookup, now: u64) -> Answer {
    Answer {
        body: hit.entry.body.clone(),
        model: hit.entry.model.clone(),
        outcome: match hit.tier {
            Tier::Memory => Outcome::Memory,
            Tier::Disk => Outcome::Disk,
            Tier::Shared => Outcome::Shared,
        },
        attempts: 0,
        age: Some(hit.entry.age(now)),
        headers: HeaderMap::new(),
    }
}

pub(super) fn hit_response(hit: &Lookup, key: &CacheKey, now: u64) -> Response {
    let a = hit_answer(hit, now);
    Response {
        body: a.body,
        outcome: a.outcome,
        model: a.model,
        attempts: 0,
        age: a.age,
        key: *key,
        upstream_headers: a.headers,
    }
}
