//! Single flight: identical misses share one upstream fetch. A miss joins the flight of an
//! identical request in progress, or leads one that the others wait for.

use std::sync::Arc;

use tokio::sync::watch;

use crate::error::{UpstreamError, UpstreamErrorKind};
use crate::key::CacheKey;
use crate::upstream;

use super::{Answer, Controls, Engine, Prepared};

impl Engine {
    /// Single flight: identical concurrent misses (same key, same controls) share one upstream
    /// fetch.
    pub(super) async fn join_or_start_flight(
        self: &Arc<Self>,
        p: &Arc<Prepared>,
        has_stale: bool,
    ) -> FlightResult {
        let rx = {
            let mut flights = self.flights.lock().expect("flights lock");
            match flights.get(&p.flight_key()).filter(|rx| joinable(rx, p)) {
                Some(rx) => rx.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    flights.insert(p.flight_key(), rx.clone());
                    let entry = FlightEntry::new(self, p.flight_key(), &rx);
                    let engine = self.clone();
                    let p = p.clone();
                    // Spawned, so the fetch completes and is stored even if every caller goes away.
                    tokio::spawn(async move {
                        let _entry = entry;
                        engine.clone().fly(p.clone(), has_stale, tx).await;
                    });
                    rx
                }
            }
        };
        match wait(rx).await {
            Some(result) => result,
            // The flight ended without a word (a streamed lead whose caller went away before
            // the first byte): fetch for ourselves.
            None => self.fly_solo(p, has_stale).await,
        }
    }

    /// A fetch for this request alone.
    pub(super) async fn fly_solo(
        self: &Arc<Self>,
        p: &Arc<Prepared>,
        has_stale: bool,
    ) -> FlightResult {
        let (tx, rx) = watch::channel(None);
        tokio::spawn(self.clone().fly(p.clone(), has_stale, tx));
        wait(rx).await.unwrap_or_else(|| {
            // Only if the spawned task panicked.
            Err(upstream::transport_error(
                UpstreamErrorKind::Connect,
                &p.model,
            ))
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

/// Identical requests share a flight only when their controls are identical too: controls
/// change what a fetch does (fallbacks, freshness) and stores.
pub(super) type FlightKey = (CacheKey, Controls);

/// Whether a request may take the answer of the flight `rx` in the map under its flight key.
/// A flight stays in the map until its task ends (a stale refresh included, so that identical
/// requests meanwhile serve their stale entry without a try of their own), and a request that
/// joins after the answer takes it as it would take the entry just stored. Not a `no-cache`
/// request: it asked for a fetch made for it, so it shares one still under way, never one that
/// had answered before it came. (Back-to-back `no-cache` requests were once handed the earlier
/// answer with no upstream call; the engine bench timed them as misses.)
pub(super) fn joinable(rx: &watch::Receiver<Option<FlightResult>>, p: &Prepared) -> bool {
    !p.controls.no_cache || rx.borrow().is_none()
}

/// A flight's place in the map, removed when the flight's task ends, however it ends (a panic
/// included), so that no key is left joined to a flight that will never answer. A flight that
/// took its key's place (see [`joinable`]) is left where it is.
pub(super) struct FlightEntry {
    engine: Arc<Engine>,
    key: FlightKey,
    rx: watch::Receiver<Option<FlightResult>>,
}

impl FlightEntry {
    pub(super) fn new(
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
