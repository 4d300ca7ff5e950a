//! The disk tier's calls as the request path makes them: on tokio's blocking pool, at most
//! [`MAX_IN_FLIGHT`] at once, each given [`TIME_LIMIT`]. Whatever the disk does (fills up,
//! turns read-only, stalls, or panics inside sled), a call costs a request at most the time
//! limit and is then a miss (or a store that did not happen): it is counted
//! (`fallthrough_store_errors_total`), and logged at most once a minute. A call past its limit
//! goes on in the background, holding its place, so a disk that hangs takes at most
//! `MAX_IN_FLIGHT` threads; then calls are skipped at once until places free up.
//!
//! sled does not recover from a failed write (a full disk): every later call fails the same
//! way. So a tier whose storage failed is closed and opened again, at most every
//! [`REOPEN_EVERY`], in the background: once there is space again, storing resumes by itself.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tracing::info;

use super::failures::Failures;
use super::DiskTier;
use crate::error::{report, DiskError};

/// Disk calls in flight at once (stalled ones included).
pub(super) const MAX_IN_FLIGHT: usize = 64;
/// The longest a request waits for one disk call. Point reads and writes take microseconds;
/// a call this slow means the disk is in trouble, and the upstream is the better source.
pub(super) const TIME_LIMIT: Duration = Duration::from_secs(1);
/// The least time between two attempts to reopen a failed tier.
const REOPEN_EVERY: Duration = Duration::from_secs(5);

/// The disk tier behind its guard (see the module's doc).
pub(super) struct Guard {
    /// `None` while it is being reopened.
    tier: RwLock<Option<DiskTier>>,
    dir: PathBuf,
    max_bytes: u64,
    places: Arc<Semaphore>,
    failures: Failures,
    /// When a reopen was last tried; `Some` while one runs or has run.
    reopened_at: Mutex<Option<Instant>>,
}

impl Guard {
    pub(super) fn new(tier: DiskTier) -> Self {
        let guard = Self::opening(tier.dir().to_owned(), tier.max_bytes());
        guard.set(tier);
        guard
    }

    /// A guard whose tier is still being opened ([`Self::set`] brings it in).
    pub(super) fn opening(dir: PathBuf, max_bytes: u64) -> Self {
        Guard {
            dir,
            max_bytes,
            tier: RwLock::new(None),
            places: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            failures: Failures::new(
                "the disk cache failed; answering without it (misses are not stored meanwhile)",
            ),
            reopened_at: Mutex::new(None),
        }
    }

    pub(super) fn set(&self, tier: DiskTier) {
        *self.tier.write().expect("disk tier lock") = Some(tier);
    }

    pub(super) fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// The tier as it is now; `None` while it is being opened or reopened.
    pub(super) fn tier(&self) -> Option<DiskTier> {
        self.tier.read().expect("disk tier lock").clone()
    }

    /// Runs `op` on the tier as the module's doc says; `None` when it failed, panicked, took
    /// too long or could not start (or the tier is being reopened).
    pub(super) async fn call<T: Send + 'static>(
        self: &Arc<Self>,
        what: &'static str,
        op: impl FnOnce(&DiskTier) -> Result<T, DiskError> + Send + 'static,
    ) -> Option<T> {
        let disk = self.tier()?;
        let Ok(place) = self.places.clone().try_acquire_owned() else {
            self.failed(what, &"too many disk operations are stalled");
            return None;
        };
        let task = tokio::task::spawn_blocking(move || {
            let _place = place; // held until the call really ends
            op(&disk)
        });
        match tokio::time::timeout(TIME_LIMIT, task).await {
            Ok(Ok(Ok(value))) => Some(value),
            Ok(Ok(Err(e))) => {
                self.failed(what, &report(&e));
                self.reopen_later();
                None
            }
            Ok(Err(e)) => {
                self.failed(what, &format!("the disk worker failed: {e}"));
                self.reopen_later();
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

    /// Opens the tier in the background, again every [`REOPEN_EVERY`] until it opens: for a
    /// tier that could not be opened at the start.
    pub(super) fn retry_open(self: &Arc<Self>) {
        *self.reopened_at.lock().expect("reopen lock") = Some(Instant::now());
        let retry = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(REOPEN_EVERY).await;
            retry.reopen_later();
        });
    }

    /// Closes the tier and opens it again, in the background, unless that was tried less than
    /// [`REOPEN_EVERY`] ago. Calls meanwhile skip the disk.
    fn reopen_later(self: &Arc<Self>) {
        {
            let mut at = self.reopened_at.lock().expect("reopen lock");
            if at.is_some_and(|at| at.elapsed() < REOPEN_EVERY) {
                return;
            }
            *at = Some(Instant::now());
        }
        let guard = self.clone();
        tokio::spawn(async move {
            let old = guard.tier.write().expect("disk tier lock").take();
            // Dropping the last handle closes every sled database (a flush, joined threads):
            // blocking work, on a disk that just failed; not on a runtime worker.
            let _ = tokio::task::spawn_blocking(move || drop(old)).await;
            // Calls in flight hold the old tier; sled's lock is free once they end.
            guard.settled(TIME_LIMIT * 2).await;
            match DiskTier::open(&guard.dir, guard.max_bytes).await {
                Ok(tier) => {
                    info!(dir = %guard.dir.display(), "disk cache reopened");
                    *guard.tier.write().expect("disk tier lock") = Some(tier);
                }
                Err(e) => {
                    guard.failed("reopen", &report(&e));
                    guard.retry_open();
                }
            }
        });
    }

    /// Disk calls that failed, since the start.
    pub(super) fn failures(&self) -> u64 {
        self.failures.count()
    }

    fn failed(&self, what: &str, why: &dyn std::fmt::Display) {
        self.failures.record(what, why);
    }
}
