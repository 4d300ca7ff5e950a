//! Failures of a tier that the request path shrugs off: each is counted (for the metrics), and
//! logged at most once a minute, with how many went unlogged since, so that a tier that fails
//! on every request neither floods the log nor goes unnoticed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::warn;

/// The least time between two log lines about one tier's failures.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// One tier's failures (see the module's doc).
pub(super) struct Failures {
    /// What the log line says, for example that answers are served without the tier.
    message: &'static str,
    count: AtomicU64,
    log: Mutex<LogState>,
}

#[derive(Default)]
struct LogState {
    last: Option<Instant>,
    unlogged: u64,
}

impl Failures {
    pub(super) fn new(message: &'static str) -> Self {
        Failures {
            message,
            count: AtomicU64::new(0),
            log: Mutex::new(LogState::default()),
        }
    }

    /// Counts a failure of `operation`, and logs it unless one was logged within a minute.
    pub(super) fn record(&self, operation: &str, why: &dyn std::fmt::Display) {
        self.count.fetch_add(1, Ordering::Relaxed);
        let mut log = self.log.lock().expect("failure log lock");
        if log.last.is_some_and(|at| at.elapsed() < LOG_EVERY) {
            log.unlogged += 1;
            return;
        }
        let also = std::mem::take(&mut log.unlogged);
        log.last = Some(Instant::now());
        drop(log);
        warn!(
            operation,
            error = %why,
            failures_since_last_message = also,
            "{}",
            self.message
        );
    }

    /// Failures since the start.
    pub(super) fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}
