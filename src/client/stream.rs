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
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn, Instrument};

use super::{
    wait, with_attempts, Answer, Call, Engine, Fetched, FlightEntry, FlightResult, LookedUp,
    Prepared, Request, Response,
};
use crate::cache::Lookup;
use crate::error::Error;
use crate::error::UpstreamErrorKind;
use crate::key::CacheKey;
use crate::outcome::Outcome;
use crate::sse::{self, Assembler, FrameParser};
use crate::upstream;

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

/// The first of identical streamed misses: it holds the flight that the others wait on.
pub(super) struct Lead {
    tx: watch::Sender<Option<FlightResult>>,
    /// Removes the flight from the map when the lead is done with, however that happens.
    _entry: FlightEntry,
}

impl Lead {
    /// Tells the waiting requests how the flight ended (and ends it).
    fn finish(lead: Option<Lead>, result: FlightResult) {
        if let Some(lead) = lead {
            lead.tx.send_replace(Some(result));
        }
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
            return self
                .execute_prepared(prepared, started)
                .await
                .map(Reply::Plain);
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
        let span = super::request_span(&p);
        let result = self
            .engine
            .clone()
            .answer_stream(p)
            .instrument(span.clone())
            .await;
        let summary = result
            .as_ref()
            .map(|r| (r.outcome, r.model.as_str(), r.attempts));
        self.finish(&span, summary, started);
        result
    }
}

impl Engine {
    async fn answer_stream(self: Arc<Self>, p: Prepared) -> Result<StreamResponse, Error> {
        let now = self.clock.millis();
        let cached = match self.look_up(&p, now).await? {
            LookedUp::Fresh(hit) => return replay_hit(&hit, p.key, now, None),
            LookedUp::Miss { stale } => stale,
        };
        let p = Arc::new(p);
        // Single flight, as for plain requests: the first identical miss goes upstream and
        // relays live; the others wait for its stored answer and replay it.
        let joined = {
            let mut flights = self.flights.lock().expect("flights lock");
            match flights
                .get(&p.flight_key())
                .filter(|rx| super::joinable(rx, &p))
            {
                Some(rx) => Ok(rx.clone()),
                None => {
                    let (tx, rx) = watch::channel(None);
                    let _entry = FlightEntry::new(&self, p.flight_key(), &rx);
                    flights.insert(p.flight_key(), rx);
                    Err(Lead { tx, _entry })
                }
            }
        };
        let rx = match joined {
            Ok(rx) => rx,
            Err(lead) => return self.fetch_stream(p, cached, Some(lead)).await,
        };
        let Some(result) = wait(rx).await else {
            // The lead went away without a word (its caller left before the first byte).
            return self.fetch_stream(p, cached, None).await;
        };
        match (result, cached) {
            (Ok(answer), _) => replay(answer, p.key),
            (Err(e), Some(stale)) if e.allows_stale() => {
                replay_hit(&stale, p.key, self.clock.millis(), Some(e.attempts))
            }
            (Err(e), _) => Err(Error::Upstream(e)),
        }
    }

    /// The miss path of a stream: primary, then fallbacks, each retried until its head arrives.
    /// With a `lead`, identical requests wait on this one: they are told how it ended.
    async fn fetch_stream(
        self: Arc<Self>,
        p: Arc<Prepared>,
        stale: Option<Lookup>,
        mut lead: Option<Lead>,
    ) -> Result<StreamResponse, Error> {
        if let Some(answer) = self.raced_answer(&p).await {
            Lead::finish(lead, Ok(answer.clone()));
            return replay(answer, p.key);
        }
        let deadline = Instant::now() + self.config.retry.deadline;
        let mut attempts = 0;
        let call = Call {
            model: &p.model,
            body: p.stream_body(),
            deadline,
            stream: true,
            plan: self.plan(&p, 0, stale.is_some()),
        };
        let mut last = match self.call_model(&p, call, &mut attempts).await {
            Ok(fetched) => return Ok(self.relay(fetched, &p, p.key, &p.model, attempts, lead)),
            Err(e) if e.allows_stale() && stale.is_some() => {
                info!(key = %p.key, status = e.status, "upstream cannot answer; replaying stale");
                // Taken before anyone is answered, as on the plain path (see `fly`).
                let permit = self.refreshes.clone().try_acquire_owned().ok();
                Lead::finish(lead, Err(with_attempts(e, attempts)));
                if let Some(permit) = permit {
                    let engine = self.clone();
                    let refresh = p.clone();
                    tokio::spawn(async move { engine.refresh(&refresh, deadline, permit).await });
                }
                let stale = stale.expect("checked");
                return replay_hit(&stale, p.key, self.clock.millis(), Some(attempts));
            }
            Err(e) if !e.allows_stale() => {
                let e = with_attempts(e, attempts);
                Lead::finish(lead, Err(e.clone()));
                return Err(Error::Upstream(e));
            }
            Err(e) => e,
        };
        for (i, model) in self.chain(&p).iter().enumerate() {
            let (key, mut json) = p.for_model(model);
            if let Some(answer) = self.fresh_answer(&key, &p, attempts).await {
                Lead::finish(lead.take(), Ok(answer.clone()));
                return replay(answer, key);
            }
            json["stream"] = Value::Bool(true);
            let call = Call {
                model,
                body: Bytes::from(json.to_string()),
                deadline,
                stream: true,
                plan: self.plan(&p, i + 1, false),
            };
            match self.call_model(&p, call, &mut attempts).await {
                Ok(fetched) => return Ok(self.relay(fetched, &p, key, model, attempts, lead)),
                Err(e) if !e.allows_stale() => {
                    let e = with_attempts(e, attempts);
                    Lead::finish(lead, Err(e.clone()));
                    return Err(Error::Upstream(e));
                }
                Err(e) => last = e,
            }
        }
        let e = super::exhausted(last, attempts);
        Lead::finish(lead, Err(e.clone()));
        Err(Error::Upstream(e))
    }

    /// Relays a live upstream stream to the caller through a spawned task, which assembles the
    /// Message on the way and stores it at `message_stop`. The task reads to the end even if
    /// the caller goes away, so an answer already paid for is kept.
    fn relay(
        self: &Arc<Self>,
        fetched: Fetched,
        p: &Prepared,
        key: CacheKey,
        model: &str,
        attempts: u32,
        lead: Option<Lead>,
    ) -> StreamResponse {
        let Fetched::Stream(response, permit) = fetched else {
            unreachable!("a stream call returns a stream");
        };
        let (tx, rx) = mpsc::channel(64);
        let store = !p.controls.no_store;
        let engine = self.clone();
        let model_name = model.to_owned();
        tokio::spawn(async move {
            let message = pump(response, permit, &tx).await;
            let shared = match (message, store) {
                (Some(message), true) => {
                    let body = Bytes::from(message.to_string());
                    Ok(engine.store(&key, body, &model_name, attempts, true).await)
                }
                _ => Err(upstream::transport_error(
                    UpstreamErrorKind::Connect,
                    &model_name,
                )),
            };
            // Stored first, then the waiting requests are told and the flight leaves the map.
            Lead::finish(lead, shared);
            // Only now does the caller's stream end: a graceful shutdown, which waits for it,
            // cannot flush the disk tier before this answer is in it.
            drop(tx);
        });
        StreamResponse {
            events: Box::pin(ReceiverStream::new(rx)),
            outcome: if p.controls.no_cache {
                Outcome::Bypass
            } else {
                Outcome::Miss
            },
            model: model.to_owned(),
            attempts,
            age: None,
            key,
        }
    }
}

/// Copies the upstream's bytes to `tx`, assembling the Message as they pass. Returns it only
/// when the stream ended properly: an `error` event, a malformed stream or a cut gives `None`.
async fn pump(
    response: reqwest::Response,
    _permit: OwnedSemaphorePermit,
    tx: &mpsc::Sender<Result<Bytes, std::io::Error>>,
) -> Option<Value> {
    let mut body = response.bytes_stream();
    let mut parser = FrameParser::new();
    let mut assembler = Assembler::new();
    let mut message = None;
    let mut broken = false;
    let mut listening = true;
    while let Some(chunk) = body.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(e) => {
                warn!(error = %e, "upstream stream broke off; nothing stored");
                if listening {
                    let _ = tx.send(Err(std::io::Error::other(e))).await;
                }
                return None;
            }
        };
        if !broken && message.is_none() {
            for frame in parser.push(&chunk) {
                match assembler.feed(&frame) {
                    Ok(Some(done)) => message = Some(done),
                    Ok(None) => {}
                    Err(e) => {
                        debug!(error = %e, "stream will not be stored");
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
        if listening && tx.send(Ok(chunk)).await.is_err() {
            listening = false;
        }
    }
    if message.is_none() && !broken {
        warn!("upstream stream ended before message_stop; nothing stored");
    }
    message.filter(|_| !broken)
}

fn replay_hit(
    hit: &Lookup,
    key: CacheKey,
    now: u64,
    stale_attempts: Option<u32>,
) -> Result<StreamResponse, Error> {
    let mut answer = super::hit_answer(hit, now);
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
