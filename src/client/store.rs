//! Answers in and out of the cache: storing a complete answer, refreshing a stale one in the
//! background, and a cached entry as an answer.

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::cache::{Lookup, Tier};
use crate::entry::Entry;
use crate::key::CacheKey;
use crate::outcome::Outcome;

use super::{Answer, Engine, Prepared, Response};

impl Engine {
    pub(super) async fn store(
        &self,
        key: &CacheKey,
        body: Bytes,
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
        }
    }

    /// Retries the primary in the background after a stale entry was served, holding one of
    /// the [`MAX_REFRESHES`] slots (`_permit`); when none is free, no refresh is made.
    pub(super) async fn refresh(
        &self,
        p: &Prepared,
        deadline: Instant,
        _permit: OwnedSemaphorePermit,
    ) {
        let mut attempts = 0;
        if let Ok(body) = self
            .call_plain(
                p,
                &p.model,
                p.plain_body(),
                deadline,
                self.plan(p, usize::MAX, false),
                &mut attempts,
            )
            .await
        {
            debug!(key = %p.key, "stale entry refreshed");
            self.store(&p.key, body, &p.model, attempts, !p.controls.no_store)
                .await;
        }
    }
}

/// Only a complete answer is stored: a Message with content and a stop reason, or a
/// `count_tokens` answer. Anything else (a refusal in the shape of success, a cut body) is
/// passed on but never cached.
pub(super) fn is_complete_message(body: &[u8]) -> bool {
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => {
            (v["type"] == "message" && v["content"].is_array() && !v["stop_reason"].is_null())
                || v["input_tokens"].is_u64() && v.as_object().is_some_and(|o| o.len() <= 2)
        }
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
        },
        attempts: 0,
        age: Some(hit.entry.age(now)),
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
    }
}
