//! The disk tier's calls as the request path makes them: on tokio's blocking pool, at most
//! [`MAX_IN_FLIGHT`] at once, each given [`TIME_LIMIT`]. Whatever the disk does (fills up,
//! turns read-only, stalls, or panics inside sled), a call costs a request at most the time
//! limit and is then a miss (or a store that did not happen): it is counted
//! (`fallthrough_store_errors_total`), and logged at most once a minute. A call past its limit
//! goes on in the background, holding its place, so a disk that hangs takes at most
//! `MAX_IN_FLIGHT` threads; then calls are skipped at once until places free up.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tracing::warn;

use super::DiskTier;
use crate::error::{report, DiskError};

/// Disk calls in flight at once (stalled ones included).
pub(super) const MAX_IN_FLIGHT: usize = 64;
/// The longest a request waits for one disk call. Point reads and writes take microseconds;
/// a call this slow means the disk is in trouble, and the upstream is the better source.
pub(super) const TIME_LIMIT: Duration = Duration::from_secs(1);
/// The least time between two log lines about disk failures.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// See the module's doc. Cheap to share.
pub(super) struct Guard {
    places: Arc<Semaphore>,
    failures: AtomicU64,
    log: Mutex<LogState>,
}

#[derive(Default)]
struct LogState {
    last: Option<Instant>,
    unlogged: u64,
}

impl Default for Guard {
    fn default() -> Self {
        Guard {
            places: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            failures: AtomicU64::new(0),
            log: Mutex::new(LogState::default()),
        }
    }
}

impl Guard {
    /// Runs `op` on `disk` as the module's doc says; `None` when it failed, panicked, took
    /// too long or could not start.
    pub(super) async fn call<T: Send + 'static>(
        &self,
        disk: &DiskTier,
        what: &'static str,
        op: impl FnOnce(&DiskTier) -> Result<T, DiskError> + Send + 'static,
    ) -> Option<T> {
        let Ok(place) = self.places.clone().try_acquire_owned() else {
            self.failed(what, &"too many disk operations are stalled");
            return None;
        };
        let disk = disk.clone();
        let task = tokio::task::spawn_blocking(move || {
            let _place = place; // held until the call really ends
            op(&disk)
        });
        match tokio::time::timeout(TIME_LIMIT, task).await {
            Ok(Ok(Ok(value))) => Some(value),
            Ok(Ok(Err(e))) => {
                self.failed(what, &report(&e));
                None
            }
            Ok(Err(e)) => {
                self.failed(what, &format!("the disk worker failed: {e}"));
                None
            }
            Err(_) => {
                self.failed(what, &format!("no answer within {TIME_LIMIT:?}"));
                None
            }
        }
    }

    /// Waits (for at most `limit`) until no disk call is in flight.
    pub(super) async fn settled(&self, limit: Duration) {
        let all = self.places.acquire_many(MAX_IN_FLIGHT as u32);
        let _ = tokio::time::timeout(limit, all).await;
    }

    /// Disk calls that failed, since the start.
    pub(super) fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    fn failed(&self, what: &str, why: &dyn std::fmt::Display) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let mut log = self.log.lock().expect("disk log lock");
        let due = log.last.is_none_or(|at| at.elapsed() >= LOG_EVERY);
        if !due {
            log.unlogged += 1;
            return;
        }
        let also = std::mem::take(&mut log.unlogged);
        log.last = Some(Instant::now());
        drop(log);
        warn!(
            operation = what,
            error = %why,
            failures_since_last_message = also,
            "the disk cache failed; answering without it (misses are not stored meanwhile)"
        );
    }
}
