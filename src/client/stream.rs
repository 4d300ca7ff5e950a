//! Streamed calls (`"stream": true`): a hit is replayed as an event stream; a miss relays the
//! upstream's events as they arrive and stores the assembled Message when `message_stop`
//! comes. Retries, the breaker, stale answers and fallbacks apply until the first byte reaches
//! the caller; after that the stream is the caller's, errors included.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use serde_json::Value;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::form::{Live, LiveResponse};
use super::store::hit_answer;
use super::tape::Tape;
use super::{
    wait_live, Answer, Engine, Flight, Joined, Lead, LiveFlight, LookedUp, Prepared, Reached,
    Request, Response,
};
use crate::cache::shared::Lease;
use crate::cache::Lookup;
use crate::error::Error;
use crate::key::CacheKey;
use crate::outcome::Outcome;
use crate::sse::{self, Assembler, FrameParser};
use crate::upstream::breaker::{Admission, Cause, Verdict};

/// Largest single event the relay assembles; a larger one (or bytes that never end a line)
/// is still relayed, but the stream is not stored.
const MAX_PENDING_FRAME: usize = 32 * 1024 * 1024;

/// The bytes of an event stream, as they become available.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<Bytes, std::io::Error>> + Send>>;

/// A streamed answer and how it was obtained.
pub struct StreamResponse {
    /// `text/event-stream` bytes: replayed for hits, relayed for misses.
    pub events: EventStream,
    pub outcome: Outcome,
    /// The model that produces the stream.
    pub model: String,
    pub attempts: u32,
    /// Age of the cached entry replayed; `None` for a live stream.
    pub age: Option<Duration>,
    pub key: CacheKey,
    /// The upstream's response headers when the stream comes from the upstream (live, or a
    /// joined flight's answer); empty for a replayed entry.
    pub upstream_headers: http::HeaderMap,
}

impl std::fmt::Debug for StreamResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamResponse")
            .field("outcome", &self.outcome)
            .field("model", &self.model)
            .field("attempts", &self.attempts)
            .field("age", &self.age)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// An answer in the form the request asked for.
#[derive(Debug)]
pub enum Reply {
    Plain(Response),
    Stream(StreamResponse),
}

impl super::Client {
    /// Answers `request` as an event stream, whatever its body says about `stream`.
    pub async fn stream(&self, request: Request) -> Result<StreamResponse, Error> {
        let started = Instant::now();
        let prepared = self.engine.prepare(request)?;
        self.stream_prepared(prepared, started).await
    }

    /// Answers `request` plainly or as a stream, as its body's `"stream": true` asks.
    pub async fn call(&self, request: Request) -> Result<Reply, Error> {
        let started = Instant::now();
        let prepared = self.engine.prepare(request)?;
        if !prepared.stream {
            let plain = self.traced(prepared, started, Engine::answer).await;
            return plain.map(Reply::Plain);
        }
        self.stream_prepared(prepared, started)
            .await
            .map(Reply::Stream)
    }

    async fn stream_prepared(
        &self,
        p: Prepared,
        started: Instant,
    ) -> Result<StreamResponse, Error> {
        self.traced(p, started, Engine::answer_stream).await
    }
}

impl super::Summary for StreamResponse {
    fn summary(&self) -> (Outcome, &str, u32) {
        (self.outcome, &self.model, self.attempts)
    }
}

impl Engine {
    /// The whole path of a streamed request after parsing. Single flight, as for plain
    /// requests: the first identical miss goes upstream and relays live; the others wait for
    /// its stored answer and replay it.
    async fn answer_stream(self: Arc<Self>, p: Prepared) -> Result<StreamResponse, Error> {
        let now = self.clock.millis();
        let cached = match self.look_up(&p, now).await? {
            LookedUp::Fresh(hit) => return replay_hit(&hit, p.key, now, None),
            LookedUp::Miss { stale } => stale,
        };
        let p = Arc::new(p);
        let lead = match self.join_or_lead(&p) {
            Flight::Lead(lead) => lead,
            Flight::Joined(rx) => match (wait_live(rx).await, cached) {
                (Some(Joined::Live(live)), _) => return Ok(joined_live(live, &p)),
                (Some(Joined::Done(Ok(answer))), _) => return replay(answer, p.key),
                (Some(Joined::Done(Err(e))), Some(stale)) if e.allows_stale() => {
                    return replay_hit(&stale, p.key, self.clock.millis(), Some(e.attempts))
                }
                (Some(Joined::Done(Err(e))), _) => return Err(Error::Upstream(e)),
                // The lead went away without a word (its caller left before the first byte).
                (None, cached) => return self.fetch_stream(p, cached, Lead::solo()).await,
            },
        };
        self.fetch_stream(p, cached, lead).await
    }

    /// The miss path of a stream: the chain, each model retried until its head arrives.
    /// Identical requests wait on `lead`: they are told how it ended.
    async fn fetch_stream(
        self: Arc<Self>,
        p: Arc<Prepared>,
        stale: Option<Lookup>,
        lead: Lead,
    ) -> Result<StreamResponse, Error> {
        match self.run_chain::<Live>(&p, stale.is_some()).await {
            Reached::Fetched {
                fetched,
                key,
                model,
                attempts,
                lease,
            } => {
                let flight = Flown {
                    key,
                    model,
                    attempts,
                    lead,
                    lease,
                };
                Ok(self.relay(fetched, &p, flight))
            }
            Reached::Stored { answer, key } => {
                lead.tell(Ok(answer.clone()));
                replay(answer, key)
            }
            Reached::Stale { error, deadline } => {
                info!(key = %p.key, status = error.status, "upstream cannot answer; replaying stale");
                let attempts = error.attempts;
                self.stale_then_refresh(&p, lead, error, deadline);
                let stale = stale.expect("a chain ends stale only with a stale entry at hand");
                replay_hit(&stale, p.key, self.clock.millis(), Some(attempts))
            }
            Reached::Failed(error) => {
                lead.tell(Err(error.clone()));
                Err(Error::Upstream(error))
            }
        }
    }

    /// Relays a live upstream stream through a spawned task onto a [`Tape`] that the caller,
    /// and any identical streamed request that joins, read at their own pace. The task reads
    /// the upstream to its end whatever the readers do, assembling the Message on the way: an
    /// answer already paid for is kept, and the upstream slot is given back at the upstream's
    /// pace, not the slowest caller's.
    fn relay(self: &Arc<Self>, live: LiveResponse, p: &Prepared, flown: Flown) -> StreamResponse {
        let Flown {
            key,
            model,
            attempts,
            lead,
            lease,
        } = flown;
        let tape = Tape::new();
        let flight = LiveFlight {
            tape: tape.clone(),
            key,
            model,
            attempts,
            headers: live.response.headers().clone(),
        };
        lead.go_live(flight.clone());
        let response = joined_live(flight.clone(), p);
        let store = !p.controls.no_store;
        let engine = self.clone();
        let LiveFlight {
            tape: recording,
            model,
            headers,
            ..
        } = flight;
        tokio::spawn(async move {
            let admission = live.admission;
            let (message, end, verdict) = pump(live, &recording).await;
            let now = engine.clock.instant();
            match admission {
                Some(admission) => engine.breakers.record(&model, admission, verdict, now),
                None if verdict != Verdict::Answered => {
                    engine
                        .breakers
                        .record(&model, Admission::Pass, verdict, now)
                }
                None => {}
            }
            if let Some(message) = message {
                let body = Bytes::from(message.to_string());
                let answer = engine
                    .store(&key, body, headers, &model, attempts, store)
                    .await;
                // Stored first, then the waiting requests are told. (A stream that did not end
                // properly tells them nothing: plain ones fetch for themselves rather than get
                // an error the upstream never sent.)
                lead.tell(Ok(answer));
            }
            drop(lease); // after the store: the fleet's waiters find the answer
            drop(lead);
            // Only now do the readers' streams end: a graceful shutdown, which waits for them,
            // cannot flush the disk tier before this answer is in it.
            recording.end(end);
        });
        response
    }
}

/// A streamed lead's answer as the chain gave it: whose it is, and whom to tell.
struct Flown {
    key: CacheKey,
    model: String,
    attempts: u32,
    lead: Lead,
    /// The shared tier's lease, held until the stream is stored.
    lease: Option<Lease>,
}

/// Copies the upstream's bytes onto `tape`, assembling the Message as they pass. Returns it
/// only when the stream ended properly (an `error` event, a malformed stream or a cut gives
/// `None`), how the tape ends, and what the stream tells the model's breaker: a stream is a
/// failure of the model when it carries an `error` event (an overload mid-stream is an
/// overload), breaks off, or ends before `message_stop`.
async fn pump(live: LiveResponse, tape: &Tape) -> (Option<Value>, Result<(), String>, Verdict) {
    // The permit is held until the stream has been read to its end.
    let LiveResponse {
        response,
        permit: _permit,
        ..
    } = live;
    let mut verdict = Verdict::Answered;
    let mut body = response.bytes_stream();
    let mut parser = FrameParser::new();
    let mut assembler = Assembler::new();
    let mut message = None;
    let mut broken = false;
    while let Some(chunk) = body.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(e) => {
                warn!(error = %e, "upstream stream broke off; nothing stored");
                let cut = Verdict::Failed(Cause::Unreachable);
                return (
                    None,
                    Err(format!("the upstream stream broke off: {e}")),
                    cut,
                );
            }
        };
        if !broken && message.is_none() {
            for frame in parser.push(&chunk) {
                match assembler.feed(&frame) {
                    Ok(Some(done)) => message = Some(done),
                    Ok(None) => {}
                    Err(e) => {
                        debug!(error = %e, "stream will not be stored");
                        verdict = verdict_of_event(&e);
                        broken = true;
                        break;
                    }
                }
            }
            if parser.pending_bytes() > MAX_PENDING_FRAME {
                warn!("upstream sent an event larger than {MAX_PENDING_FRAME} bytes; not storing");
                broken = true;
            }
        }
        tape.push(chunk);
    }
    if message.is_none() && !broken {
        warn!("upstream stream ended before message_stop; nothing stored");
        verdict = Verdict::Failed(Cause::ServerError);
    }
    (message.filter(|_| !broken), Ok(()), verdict)
}

/// What an event stream's fault tells the model's breaker: an `error` event of an overload or
/// a server error is a failure of that kind; a rate limit says nothing of the model's health;
/// anything else (a malformed stream of a model that did answer) counts as an answer.
fn verdict_of_event(e: &sse::SseError) -> Verdict {
    let sse::SseError::Upstream(event) = e else {
        return Verdict::Answered;
    };
    match event["error"]["type"].as_str() {
        Some("overloaded_error") => Verdict::Failed(Cause::Overloaded),
        Some("api_error" | "timeout_error") => Verdict::Failed(Cause::ServerError),
        Some("rate_limit_error") => Verdict::Neutral,
        _ => Verdict::Answered,
    }
}

/// A live flight's answer, read from its tape: the lead's caller's, and that of every
/// streamed request that joins it.
fn joined_live(live: LiveFlight, p: &Prepared) -> StreamResponse {
    StreamResponse {
        events: live.tape.reader(),
        outcome: if p.controls.no_cache {
            Outcome::Bypass
        } else {
            Outcome::Miss
        },
        model: live.model,
        attempts: live.attempts,
        age: None,
        key: live.key,
        upstream_headers: live.headers,
    }
}

fn replay_hit(
    hit: &Lookup,
    key: CacheKey,
    now: u64,
    stale_attempts: Option<u32>,
) -> Result<StreamResponse, Error> {
    let mut answer = hit_answer(hit, now);
    if let Some(attempts) = stale_attempts {
        answer.outcome = Outcome::Stale;
        answer.attempts = attempts;
    }
    replay(answer, key)
}

/// An answer that is already complete, as an event stream.
fn replay(answer: Answer, key: CacheKey) -> Result<StreamResponse, Error> {
    let message = parse(&answer.body)?;
    Ok(StreamResponse {
        events: once(sse::replay(&message).map_err(invalid)?),
        outcome: answer.outcome,
        model: answer.model,
        attempts: answer.attempts,
        age: answer.age,
        key,
        upstream_headers: answer.headers,
    })
}

fn once(bytes: Bytes) -> EventStream {
    Box::pin(futures_util::stream::once(async move { Ok(bytes) }))
}

fn parse(body: &[u8]) -> Result<Value, Error> {
    serde_json::from_slice(body).map_err(|e| Error::Internal(format!("stored body: {e}")))
}

fn invalid(e: sse::SseError) -> Error {
    Error::Internal(format!("stored body cannot be replayed as a stream: {e}"))
}
