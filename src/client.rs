//! The engine every front end shares: [`Client`] looks a request up in the cache and, on a
//! miss, goes upstream through the breaker, retries with backoff and budget, and the fallback
//! chain, serving a stale entry when the upstream cannot answer.
//!
//! # Request path
//! key (`prepare`) -> memory -> disk (promote) -> single flight (`flight`) -> the chain
//! (`chain`) -> per model (`attempt`): permit, breaker, attempt, retry (backoff or
//! `retry-after`, budget, deadline) -> store (`store`) -> [`Response`]. A failure that allows
//! it, with a stale entry at hand, returns the stale entry at once and refreshes it behind.
//! This file holds the public types and the plain path's top; `stream` the streamed one.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tracing::{debug, debug_span, info, Instrument, Span};

use crate::cache::{Cache, Lookup};
use crate::clock::Clock;
use crate::config::Config;
use crate::entry::Freshness;
use crate::error::{Error, UpstreamErrorKind};
use crate::key::{CacheKey, CredentialFingerprint, KeySecret};
use crate::metrics::{Gauges, Metrics, TierUsage};
use crate::outcome::Outcome;
use crate::upstream::breaker::Breakers;
use crate::upstream::retry::RetryBudget;
use crate::upstream::{self, Upstream};

mod attempt;
mod builder;
mod chain;
mod fleet;
mod flight;
mod form;
mod pass;
mod prepare;
mod store;
mod stream;
mod tape;

pub(crate) use attempt::{Call, RetryPlan};
pub use builder::ClientBuilder;
use chain::Reached;
use flight::{
    wait, wait_live, Flight, FlightKey, FlightResult, FlightRx, Joined, Lead, LiveFlight,
};
use form::Whole;
pub use pass::{PassThrough, Passed};
pub(crate) use prepare::Prepared;
use store::hit_response;
pub use stream::{EventStream, Reply, StreamResponse};

/// Background refreshes of stale entries that may run at once; more are skipped, not queued.
const MAX_REFRESHES: usize = 8;
/// The API key header, also read by the proxy (`server`) to tell a caller's own credential.
pub(crate) const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
const ANTHROPIC_VERSION: HeaderName = HeaderName::from_static("anthropic-version");
const ANTHROPIC_BETA: HeaderName = HeaderName::from_static("anthropic-beta");

/// The `anthropic-version` sent when the caller sends none.
pub const DEFAULT_ANTHROPIC_VERSION: &str = "2023-06-01";

/// Per-request cache controls (the proxy maps `cache-control` onto these).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Controls {
    /// Skip the lookup; fetch and store.
    pub no_cache: bool,
    /// Do not store the answer.
    pub no_store: bool,
    /// Accept only entries younger than this as fresh.
    pub max_age: Option<Duration>,
    /// Never call upstream; [`Error::NotCached`] when there is no fresh entry.
    pub only_if_cached: bool,
    /// Use the requested model only, never its fallbacks (prewarm fills that model's entries).
    pub no_fallback: bool,
}

/// One request to the Messages API.
#[derive(Debug, Clone)]
pub struct Request {
    /// Endpoint path: `/v1/messages` or `/v1/messages/count_tokens`, with the query if any
    /// (`?beta=true`): it is keyed (parameters sorted) and forwarded.
    pub path: String,
    /// The JSON body as the caller wrote it; sent upstream byte for byte for the primary model.
    pub body: Bytes,
    /// Headers forwarded upstream: `anthropic-version`, `anthropic-beta`, credentials, and any
    /// others the caller sends. The client's own credential fills in when none is given.
    pub headers: HeaderMap,
    /// Overrides the configured namespace.
    pub namespace: Option<String>,
    /// Partitions the request's entries by this name instead of by its credential, and sends
    /// it upstream with the client's own credential: the proxy sets it to the name of the
    /// access token a caller was admitted by (whose headers then carry no credential).
    pub partition: Option<String>,
    pub controls: Controls,
}

/// How many flights that ended without a result a plain miss joins or leads again before
/// it fetches on its own ([`Engine::fetch_whole`]).
const REJOINS: usize = 3;

impl Request {
    /// A `POST /v1/messages` with `body`.
    pub fn messages(body: impl Into<Bytes>) -> Self {
        Request {
            path: "/v1/messages".into(),
            body: body.into(),
            headers: HeaderMap::new(),
            namespace: None,
            partition: None,
            controls: Controls::default(),
        }
    }

    /// A `POST /v1/messages` with a JSON value.
    pub fn json(body: &Value) -> Self {
        Self::messages(body.to_string())
    }

    /// Adds a header; names and values that are not valid HTTP are ignored. Credentials are
    /// marked sensitive, so that `Debug` never prints them.
    #[must_use]
    pub fn header(mut self, name: &str, value: &str) -> Self {
        if let (Ok(n), Ok(mut v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            v.set_sensitive(n == X_API_KEY || n == http::header::AUTHORIZATION);
            self.headers.append(n, v);
        }
        self
    }

    #[must_use]
    pub fn controls(mut self, controls: Controls) -> Self {
        self.controls = controls;
        self
    }
}

/// An answer, and how it was obtained.
#[derive(Debug, Clone)]
pub struct Response {
    /// The Message JSON (plain form).
    pub body: Bytes,
    pub outcome: Outcome,
    /// The model that produced the body: a fallback's name when a fallback answered.
    pub model: String,
    /// Upstream attempts made for this request (0 for a hit).
    pub attempts: u32,
    /// Age of the cached entry; `None` for a fresh upstream answer.
    pub age: Option<Duration>,
    /// The key the request was looked up under.
    pub key: CacheKey,
    /// The upstream's response headers (`request-id`, `anthropic-ratelimit-*`, ...) when this
    /// request's answer came from the upstream just now; empty for an answer from the cache.
    pub upstream_headers: HeaderMap,
}

impl Response {
    /// The body parsed as JSON.
    pub fn json(&self) -> Result<Value, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }
}

/// A caching, resilient client of the Messages API. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct Client {
    engine: Arc<Engine>,
}

/// What a flight (one upstream fetch shared by identical requests) produced.
#[derive(Debug, Clone)]
struct Answer {
    body: Bytes,
    model: String,
    outcome: Outcome,
    attempts: u32,
    age: Option<Duration>,
    /// The upstream's headers of a fresh answer; empty for a stored one.
    headers: HeaderMap,
}

pub(crate) struct Engine {
    config: Config,
    upstream: Upstream,
    cache: Cache,
    breakers: Breakers,
    budget: RetryBudget,
    /// Bounds upstream requests in flight; the rest wait here. A streamed answer holds its
    /// permit until the stream ends.
    permits: Arc<Semaphore>,
    /// Requests waiting for a permit, at most `server.max_queued`.
    queued: std::sync::atomic::AtomicUsize,
    /// Bounds background refreshes of stale entries.
    refreshes: Arc<Semaphore>,
    /// In-flight fetches by key. A std mutex: held for one map operation, never across an await.
    flights: Mutex<HashMap<FlightKey, FlightRx>>,
    /// Told whenever a flight leaves the map, for [`Engine::settled`].
    flight_ended: Notify,
    /// What freshness, the retry budget and the breakers read the time from: the system's
    /// clocks, except in a reproducible bench replay.
    clock: Clock,
    metrics: Arc<Metrics>,
    /// Sent as `x-api-key` when a request has no credential; marked sensitive so it is never
    /// printed.
    credential: Option<HeaderValue>,
    /// Its fingerprint, computed once: most library requests carry no credential of their own.
    credential_fingerprint: Option<CredentialFingerprint>,
    /// What every credential fingerprint is keyed with.
    key_secret: KeySecret,
}

/// One span per request: key, model asked for, and, once known, outcome, model that answered
/// and upstream attempts. At debug level, so that the default `info` costs the hit path
/// nothing; the retry and stale log lines carry the key themselves.
fn request_span(p: &Prepared) -> Span {
    debug_span!(
        "request",
        key = %p.key,
        model = %p.model,
        outcome = tracing::field::Empty,
        answered_by = tracing::field::Empty,
        attempts = tracing::field::Empty,
    )
}

impl Client {
    pub fn builder() -> ClientBuilder {
        ClientBuilder::from_config(Config::default())
    }

    /// Sends a Messages request body (JSON) with default headers and controls.
    pub async fn send(&self, body: &Value) -> Result<Response, Error> {
        self.execute(Request::json(body)).await
    }

    /// Answers `request` from the cache or the upstream.
    pub async fn execute(&self, request: Request) -> Result<Response, Error> {
        let started = Instant::now();
        let prepared = self.engine.prepare(request)?;
        self.traced(prepared, started, Engine::answer).await
    }

    /// Runs one request's `path` in its span, then records how it ended.
    async fn traced<T, F>(
        &self,
        p: Prepared,
        started: Instant,
        path: impl FnOnce(Arc<Engine>, Prepared) -> F,
    ) -> Result<T, Error>
    where
        T: Summary,
        F: Future<Output = Result<T, Error>>,
    {
        let span = request_span(&p);
        let result = path(self.engine.clone(), p).instrument(span.clone()).await;
        self.finish(&span, result.as_ref().map(Summary::summary), started);
        result
    }

    /// Records a request's end in its span and the metrics.
    fn finish(&self, span: &Span, result: Result<(Outcome, &str, u32), &Error>, started: Instant) {
        let elapsed = started.elapsed();
        match result {
            Ok((outcome, model, attempts)) => {
                span.record("outcome", outcome.as_str());
                span.record("answered_by", model);
                span.record("attempts", attempts);
                self.engine.metrics.request(outcome, elapsed);
            }
            Err(e) => {
                span.record("outcome", "error");
                debug!(parent: span, error = %crate::error::report(e), "request failed");
                self.engine.metrics.request_failed(elapsed);
            }
        }
    }

    /// The key `request` is cached under and the canonical form it hashes, without looking it
    /// up (for `fallthrough key`).
    pub fn canonical(&self, request: &Request) -> Result<(CacheKey, Value), Error> {
        let p = self.engine.prepare(request.clone())?;
        Ok((p.key, p.ctx.canonical_value(&p.json())))
    }

    /// The key `request` is cached under, without looking it up.
    pub fn key(&self, request: &Request) -> Result<CacheKey, Error> {
        Ok(self.engine.prepare(request.clone())?.key)
    }

    /// Stores `message`, a complete Message fetched some other way (a Message Batch's
    /// result), as the answer to `request`: under the key `request` has, fresh for `ttl`, as
    /// if the upstream had just answered it. Returns the key; an incomplete Message is refused.
    pub async fn store_answer(&self, request: &Request, message: Bytes) -> Result<CacheKey, Error> {
        let p = self.engine.prepare(request.clone())?;
        if !store::is_complete_message(&message) {
            return Err(Error::InvalidRequest(
                "not a complete Message (no stop_reason, or not a message)".into(),
            ));
        }
        let model = serde_json::from_slice::<Value>(&message)
            .ok()
            .and_then(|m| m["model"].as_str().map(str::to_owned))
            .unwrap_or_else(|| p.model.clone());
        let headers = http::HeaderMap::new();
        (self.engine)
            .store(&p.key, message, headers, &model, 0, true)
            .await;
        Ok(p.key)
    }

    /// The cache behind this client.
    pub fn cache(&self) -> &Cache {
        &self.engine.cache
    }

    pub fn config(&self) -> &Config {
        &self.engine.config
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.engine.metrics
    }

    /// The Prometheus text exposition: the counters, and the breakers' and tiers' gauges read
    /// now.
    pub async fn render_metrics(&self) -> String {
        let usage = self.engine.cache.usage().await;
        let gauges = Gauges {
            breakers: (self.engine.breakers.states().into_iter())
                .map(|(model, state)| (model, state.as_gauge()))
                .collect(),
            tiers: vec![
                TierUsage {
                    tier: "memory",
                    entries: usage.memory_entries,
                    bytes: usage.memory_bytes,
                },
                TierUsage {
                    tier: "disk",
                    entries: usage.disk_entries,
                    bytes: usage.disk_bytes,
                },
            ],
            upstream_in_flight: (self.engine.config.max_concurrency
                - self.engine.permits.available_permits()) as u64,
            store_errors: usage.disk_errors,
            shared_errors: usage.shared_errors,
            disk_files_bytes: usage.disk_files_bytes,
            upstream_queued: self
                .engine
                .queued
                .load(std::sync::atomic::Ordering::Relaxed) as u64,
        };
        self.engine.metrics.render(&gauges)
    }

    /// The breaker state of every model seen so far.
    pub fn breaker_states(&self) -> Vec<(String, crate::upstream::breaker::BreakerState)> {
        self.engine.breakers.states()
    }

    /// Writes the disk tier out (on shutdown), once an eviction pass that earlier answers
    /// started has ended, so the directory is left within its bound ([`Cache::flush`]).
    pub async fn flush(&self) -> Result<(), Error> {
        Ok(self.engine.cache.flush().await?)
    }

    /// The clock the engine decides by, for a reproducible replay (`crate::bench`).
    #[cfg(feature = "bench")]
    pub(crate) fn clock(&self) -> &Clock {
        &self.engine.clock
    }

    /// Waits until no upstream fetch of this client is in flight and no background refresh
    /// runs. After it, every answer fetched so far is stored (or was dropped for good: no-store,
    /// an error, a cut stream), and the cache holds what those requests will ever put in it:
    /// for tests, a reproducible replay ([`crate::bench`]), or before a last [`Self::flush`].
    /// Requests that start meanwhile are waited for too: call it once no more come.
    pub async fn settled(&self) {
        self.engine.settled().await;
    }
}

impl Engine {
    /// Waits until no fetch is in flight and no background refresh runs, so that what a
    /// request set going after its caller was answered (a refresh of a stale entry, a
    /// flight's last steps) is over before the next request of a reproducible replay starts.
    async fn settled(&self) {
        loop {
            let ended = self.flight_ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if self.flights.lock().expect("flights lock").is_empty() {
                break;
            }
            ended.await;
        }
        // A plain request's refresh runs inside its flight; a stream's runs on its own, holding
        // a refresh slot taken before the stream was answered.
        let all = self.refreshes.acquire_many(MAX_REFRESHES as u32).await;
        drop(all);
    }

    /// The cache's part of a request, as its controls allow: a fresh entry, or a miss with
    /// whatever may stand in if the upstream cannot answer.
    async fn look_up(&self, p: &Prepared, now: u64) -> Result<LookedUp, Error> {
        let cached = match p.controls.no_cache {
            true => None,
            false => self.cache.get(&p.key, now).await,
        };
        match cached {
            Some(hit) if hit.entry.freshness(now, p.controls.max_age) == Freshness::Fresh => {
                Ok(LookedUp::Fresh(hit))
            }
            _ if p.controls.only_if_cached => Err(Error::NotCached),
            // Anything found and not fresh is stale: the cache never returns expired entries.
            stale => Ok(LookedUp::Miss { stale }),
        }
    }

    /// The whole path of a plain request after parsing.
    async fn answer(self: Arc<Self>, p: Prepared) -> Result<Response, Error> {
        let now = self.clock.millis();
        let stale = match self.look_up(&p, now).await? {
            LookedUp::Fresh(hit) => return Ok(hit_response(&hit, &p.key, now)),
            LookedUp::Miss { stale } => stale,
        };
        let p = Arc::new(p);
        let result = self.fetch_whole(&p, stale.is_some()).await;
        match (result, stale) {
            (Ok(a), _) => Ok(Response {
                body: a.body,
                outcome: match (a.outcome, p.controls.no_cache) {
                    (Outcome::Miss, true) => Outcome::Bypass,
                    (outcome, _) => outcome,
                },
                model: a.model,
                attempts: a.attempts,
                age: a.age,
                key: p.key,
                upstream_headers: a.headers,
            }),
            (Err(e), Some(stale)) if e.allows_stale() => {
                info!(key = %p.key, status = e.status, "upstream cannot answer; serving stale");
                let mut r = hit_response(&stale, &p.key, self.clock.millis());
                r.outcome = Outcome::Stale;
                r.attempts = e.attempts;
                Ok(r)
            }
            (Err(e), _) => Err(Error::Upstream(e)),
        }
    }

    /// A plain miss through single flight: it waits for the flight it joins, or leads one.
    async fn fetch_whole(self: &Arc<Self>, p: &Arc<Prepared>, has_stale: bool) -> FlightResult {
        // A flight can end without a word: a streamed lead whose caller went away before the
        // first byte, or whose stream broke off. Its joiners then join or lead a new flight
        // together (one upstream call for all of them again, not one each, on a model that is
        // likely overloaded); after a few such ends, each fetches for itself.
        for _ in 0..REJOINS {
            let rx = match self.join_or_lead(p) {
                Flight::Joined(rx) => rx,
                Flight::Lead(lead) => self.spawn_fly(p, has_stale, lead),
            };
            if let Some(result) = wait(rx).await {
                return result;
            }
        }
        let rx = self.spawn_fly(p, has_stale, Lead::solo());
        wait(rx).await.unwrap_or_else(|| {
            // Only if the spawned task panicked.
            Err(upstream::transport_error(
                UpstreamErrorKind::Connect,
                &p.model,
            ))
        })
    }

    /// Fetches in a task of its own, so that the answer is stored even if every caller goes
    /// away; its result comes on the returned receiver.
    fn spawn_fly(self: &Arc<Self>, p: &Arc<Prepared>, has_stale: bool, lead: Lead) -> FlightRx {
        let rx = lead.subscribe();
        tokio::spawn(self.clone().fly(p.clone(), has_stale, lead));
        rx
    }

    /// One plain fetch down the chain; the result is told as soon as it is known (stored
    /// first). With a stale entry at hand, the first failure is the result (callers serve the
    /// stale entry), and a bounded background refresh carries on.
    async fn fly(self: Arc<Self>, p: Arc<Prepared>, has_stale: bool, lead: Lead) {
        match self.run_chain::<Whole>(&p, has_stale).await {
            Reached::Fetched {
                fetched,
                key,
                model,
                attempts,
                lease,
            } => {
                let store = !p.controls.no_store;
                let answer =
                    (self.store(&key, fetched.body, fetched.headers, &model, attempts, store))
                        .await;
                drop(lease); // stored: the fleet's waiters find the answer
                lead.tell(Ok(answer));
            }
            Reached::Stored { answer, .. } => lead.tell(Ok(answer)),
            Reached::Stale { error, deadline } => {
                self.stale_then_refresh(&p, lead, error, deadline);
            }
            Reached::Failed(error) => lead.tell(Err(error)),
        }
    }
}

/// What the cache had for a request.
enum LookedUp {
    Fresh(Lookup),
    Miss { stale: Option<Lookup> },
}

/// What a request's span and metrics record of its answer.
trait Summary {
    /// Outcome, model that answered, upstream attempts.
    fn summary(&self) -> (Outcome, &str, u32);
}

impl Summary for Response {
    fn summary(&self) -> (Outcome, &str, u32) {
        (self.outcome, &self.model, self.attempts)
    }
}
