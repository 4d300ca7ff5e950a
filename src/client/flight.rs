//! Single flight: identical misses share one upstream fetch. A miss joins the flight of an
//! identical request in progress, or leads one that the others wait for. A streamed lead goes
//! live once its head has arrived: streamed requests that join it from then on read its
//! events from the same [`Tape`] as they come, rather than after the end.

use std::sync::Arc;

use tokio::sync::watch;

use crate::error::UpstreamError;
use crate::key::CacheKey;

use super::store::hit_answer;
use super::tape::Tape;
use super::{Answer, Controls, Engine, Prepared};
use crate::entry::Freshness;

impl Engine {
    /// Joins the flight of an identical miss in progress, or leads a new one. A std mutex,
    /// held for this one map operation.
    pub(super) fn join_or_lead(self: &Arc<Self>, p: &Prepared) -> Flight {
        let mut flights = self.flights.lock().expect("flights lock");
        if let Some(rx) = flights.get(&p.flight_key()).filter(|rx| joinable(rx, p)) {
            return Flight::Joined(rx.clone());
        }
        let (tx, rx) = watch::channel(Progress::default());
        let entry = FlightEntry::new(self, p.flight_key(), &rx);
        flights.insert(p.flight_key(), rx);
        Flight::Lead(Lead {
            tx,
            _entry: Some(entry),
        })
    }

    /// The entry an identical flight stored between this request's look-up and its joining the
    /// flights (that flight had left the map by then): a flight's first step, so that
    /// concurrent identical misses make one upstream call however they interleave. `no-cache`
    /// requests fetch whatever the cache holds.
    pub(super) async fn raced_answer(&self, p: &Prepared) -> Option<Answer> {
        if p.controls.no_cache {
            return None;
        }
        let now = self.clock.millis();
        let hit = self.cache.just_stored(&p.key, now).await?;
        let fresh = hit.entry.freshness(now, p.controls.max_age) == Freshness::Fresh;
        fresh.then(|| hit_answer(&hit, now))
    }
}

pub(super) type FlightResult = Result<Answer, UpstreamError>;

/// What a flight has to show so far.
#[derive(Clone, Default)]
pub(super) struct Progress {
    /// A streamed lead's answer as it streams, from its head on.
    pub live: Option<LiveFlight>,
    /// How the flight ended.
    pub result: Option<FlightResult>,
}

/// A streamed lead's answer while it streams: enough for a joiner to answer as the lead does.
#[derive(Clone)]
pub(super) struct LiveFlight {
    pub tape: std::sync::Arc<Tape>,
    pub key: CacheKey,
    pub model: String,
    pub attempts: u32,
    pub headers: http::HeaderMap,
}

pub(super) type FlightRx = watch::Receiver<Progress>;

/// A miss's place in single flight.
pub(super) enum Flight {
    /// An identical miss leads: wait for its result ([`wait`], [`wait_live`]).
    Joined(FlightRx),
    /// This miss leads: identical ones wait for what it tells them.
    Lead(Lead),
}

/// The fetch that identical misses wait on. The flight stays in the map as long as its lead
/// lives (a stale refresh included, so that identical requests meanwhile serve their stale
/// entry without a try of their own), however it ends: a lead dropped without a word tells
/// the waiters nothing, and they fetch for themselves.
pub(super) struct Lead {
    /// `None` for a lead nobody can join (a fetch for one request alone). Declared first, so
    /// dropped first: the flight leaves the map before its joiners are woken by the sender's
    /// end, and a joiner that finds no result joins or leads a new flight, never this one.
    _entry: Option<FlightEntry>,
    tx: watch::Sender<Progress>,
}

impl Lead {
    /// A lead of a fetch for one request alone, outside the map.
    pub(super) fn solo() -> Self {
        Lead {
            tx: watch::channel(Progress::default()).0,
            _entry: None,
        }
    }

    /// The flight's result, as the waiters will get it.
    pub(super) fn subscribe(&self) -> FlightRx {
        self.tx.subscribe()
    }

    /// Tells the waiting requests how the flight ended.
    pub(super) fn tell(&self, result: FlightResult) {
        self.tx.send_modify(|p| p.result = Some(result));
    }

    /// Lets streamed requests join the answer as it streams.
    pub(super) fn go_live(&self, live: LiveFlight) {
        self.tx.send_modify(|p| p.live = Some(live));
    }
}

/// Identical requests share a flight only when their controls are identical too: controls
/// change what a fetch does (fallbacks, freshness) and stores.
pub(super) type FlightKey = (CacheKey, Controls);

/// Whether a request may take the answer of the flight `rx` in the map under its flight key.
/// A request that joins after the answer takes it as it would take the entry just stored. Not a `no-cache`
/// request: it asked for a fetch made for it, so it shares one still under way, never one that
/// had answered before it came. (Back-to-back `no-cache` requests were once handed the earlier
/// answer with no upstream call; the engine bench timed them as misses.)
pub(super) fn joinable(rx: &FlightRx, p: &Prepared) -> bool {
    !p.controls.no_cache || rx.borrow().result.is_none()
}

/// A flight's place in the map, removed when its lead is dropped, however that happens (a
/// panic included), so that no key is left joined to a flight that will never answer. A flight that
/// took its key's place (see [`joinable`]) is left where it is.
struct FlightEntry {
    engine: Arc<Engine>,
    key: FlightKey,
    rx: FlightRx,
}

impl FlightEntry {
    fn new(engine: &Arc<Engine>, key: FlightKey, rx: &FlightRx) -> Self {
        FlightEntry {
            engine: engine.clone(),
            key,
            rx: rx.clone(),
        }
    }
}

impl Drop for FlightEntry {
    fn drop(&mut self) {
        if let Ok(mut flights) = self.engine.flights.lock() {
            if flights
                .get(&self.key)
                .is_some_and(|rx| rx.same_channel(&self.rx))
            {
                flights.remove(&self.key);
            }
        }
        self.engine.flight_ended.notify_waiters();
    }
}

/// The flight's result; `None` when it ended without one.
pub(super) async fn wait(mut rx: FlightRx) -> Option<FlightResult> {
    rx.wait_for(|p| p.result.is_some())
        .await
        .ok()?
        .result
        .clone()
}

/// What a streamed request that joined a flight answers with.
pub(super) enum Joined {
    /// The flight's answer as it streams.
    Live(LiveFlight),
    /// How the flight ended (a complete answer replays as well as a live one).
    Done(FlightResult),
}

/// The flight's answer as it streams, or its result if that comes first (a plain lead's) or
/// is already there; `None` when it ended without either.
pub(super) async fn wait_live(mut rx: FlightRx) -> Option<Joined> {
    let progress = rx
        .wait_for(|p| p.result.is_some() || p.live.is_some())
        .await
        .ok()?;
    match (&progress.result, &progress.live) {
        (Some(result), _) => Some(Joined::Done(result.clone())),
        (None, live) => live.clone().map(Joined::Live),
    }
}
