//! Single flight: identical misses share one upstream fetch. A miss joins the flight of an
//! identical request in progress, or leads one that the others wait for.

use std::sync::Arc;

use tokio::sync::watch;

use crate::error::UpstreamError;
use crate::key::CacheKey;

use super::{Answer, Controls, Engine, Prepared};

impl Engine {
    /// Joins the flight of an identical miss in progress, or leads a new one. A std mutex,
    /// held for this one map operation.
    pub(super) fn join_or_lead(self: &Arc<Self>, p: &Prepared) -> Flight {
        let mut flights = self.flights.lock().expect("flights lock");
        if let Some(rx) = flights.get(&p.flight_key()).filter(|rx| joinable(rx, p)) {
            return Flight::Joined(rx.clone());
        }
        let (tx, rx) = watch::channel(None);
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
        match p.controls.no_cache {
            true => None,
            false => self.fresh_answer(&p.key, p, 0).await,
        }
    }
}

pub(super) type FlightResult = Result<Answer, UpstreamError>;

/// A miss's place in single flight.
pub(super) enum Flight {
    /// An identical miss leads: wait for its result ([`wait`]).
    Joined(watch::Receiver<Option<FlightResult>>),
    /// This miss leads: identical ones wait for what it tells them.
    Lead(Lead),
}

/// The fetch that identical misses wait on. The flight stays in the map as long as its lead
/// lives (a stale refresh included, so that identical requests meanwhile serve their stale
/// entry without a try of their own), however it ends: a lead dropped without a word tells
/// the waiters nothing, and they fetch for themselves.
pub(super) struct Lead {
    tx: watch::Sender<Option<FlightResult>>,
    /// `None` for a lead nobody can join (a fetch for one request alone).
    _entry: Option<FlightEntry>,
}

impl Lead {
    /// A lead of a fetch for one request alone, outside the map.
    pub(super) fn solo() -> Self {
        Lead {
            tx: watch::channel(None).0,
            _entry: None,
        }
    }

    /// The flight's result, as the waiters will get it.
    pub(super) fn subscribe(&self) -> watch::Receiver<Option<FlightResult>> {
        self.tx.subscribe()
    }

    /// Tells the waiting requests how the flight ended.
    pub(super) fn tell(&self, result: FlightResult) {
        self.tx.send_replace(Some(result));
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
pub(super) fn joinable(rx: &watch::Receiver<Option<FlightResult>>, p: &Prepared) -> bool {
    !p.controls.no_cache || rx.borrow().is_none()
}

/// A flight's place in the map, removed when its lead is dropped, however that happens (a
/// panic included), so that no key is left joined to a flight that will never answer. A flight that
/// took its key's place (see [`joinable`]) is left where it is.
struct FlightEntry {
    engine: Arc<Engine>,
    key: FlightKey,
    rx: watch::Receiver<Option<FlightResult>>,
}

impl FlightEntry {
    fn new(
        engine: &Arc<Engine>,
        key: FlightKey,
        rx: &watch::Receiver<Option<FlightResult>>,
    ) -> Self {
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
pub(super) async fn wait(mut rx: watch::Receiver<Option<FlightResult>>) -> Option<FlightResult> {
    rx.wait_for(Option::is_some).await.ok()?.clone()
}
