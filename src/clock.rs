//! Where the engine reads the time: the system's clocks, or a logical clock that moves only
//! when told to.
//!
//! Everything the engine decides by the time (an entry's freshness, the retry budget's window,
//! a breaker's cooldown) reads it here. Real use never leaves the system clocks; a reproducible
//! replay (`bench --mock`, [`crate::bench::Options::logical_step`]) switches to the logical clock
//! and advances it by a fixed step per request, so that those decisions depend on the order of
//! requests, never on how fast the machine ran them. Timeouts, backoff sleeps and the request
//! deadline stay on the real clock: they bound waiting, they decide no count.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::entry::{now_millis, UnixMillis};

/// The engine's clock. Reading it costs one atomic load.
#[derive(Debug)]
pub(crate) struct Clock {
    /// The two system clocks read together when the engine was built: a logical time in
    /// [`UnixMillis`] maps onto a monotonic [`Instant`] through this pair.
    origin: (Instant, UnixMillis),
    /// The logical time, or [`SYSTEM`] while the system clocks are used.
    logical: AtomicU64,
}

/// [`Clock::logical`]'s value while the system clocks are in use (no logical time is 0: it
/// starts at the wall-clock time it is switched on).
const SYSTEM: u64 = 0;

impl Clock {
    pub(crate) fn system() -> Clock {
        Clock {
            origin: (Instant::now(), now_millis()),
            logical: AtomicU64::new(SYSTEM),
        }
    }

    /// Wall-clock time, for entries.
    pub(crate) fn millis(&self) -> UnixMillis {
        match self.logical.load(Ordering::Acquire) {
            SYSTEM => now_millis(),
            logical => logical,
        }
    }

    /// Monotonic time, for the retry budget and the breakers.
    pub(crate) fn instant(&self) -> Instant {
        match self.logical.load(Ordering::Acquire) {
            SYSTEM => Instant::now(),
            logical => self.origin.0 + Duration::from_millis(logical.saturating_sub(self.origin.1)),
        }
    }

    #[cfg(any(test, feature = "bench"))]
    /// Switches to the logical clock, starting at the wall-clock time now; `false` switches
    /// back to the system clocks.
    pub(crate) fn set_logical(&self, on: bool) {
        let value = if on { now_millis().max(1) } else { SYSTEM };
        self.logical.store(value, Ordering::Release);
    }

    #[cfg(any(test, feature = "bench"))]
    /// Moves the logical clock on by `step`; nothing while the system clocks are in use.
    pub(crate) fn advance(&self, step: Duration) {
        let step = u64::try_from(step.as_millis()).unwrap_or(u64::MAX);
        let _ = self
            .logical
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                (t != SYSTEM).then(|| t.saturating_add(step))
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_logical_clock_moves_only_when_told() {
        let clock = Clock::system();
        clock.set_logical(true);
        let (millis, instant) = (clock.millis(), clock.instant());
        // tokio's clock moves (the system clock may not have): the logical one stays.
        tokio::time::advance(Duration::from_millis(5)).await;
        assert_eq!((clock.millis(), clock.instant()), (millis, instant));
        clock.advance(Duration::from_millis(250));
        assert_eq!(clock.millis(), millis + 250);
        assert_eq!(clock.instant(), instant + Duration::from_millis(250));
        clock.set_logical(false);
        let reads_the_system_clock = || {
            let before = now_millis();
            let read = clock.millis();
            before <= read && read <= now_millis()
        };
        assert!(reads_the_system_clock());
        clock.advance(Duration::from_secs(60));
        assert!(reads_the_system_clock(), "the system clock is not advanced");
    }
}
