//! Prometheus metrics: requests by outcome, upstream attempts by model and status, latency
//! histograms, breaker state by model, entries and bytes per tier.

use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
pub use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::outcome::Outcome;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum OutcomeValue {
    memory,
    disk,
    shared,
    miss,
    stale,
    bypass,
    error,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: OutcomeValue,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttemptLabels {
    model: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabel {
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallerLabel {
    caller: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TierLabel {
    tier: &'static str,
}

/// The gauges' readings at a scrape, gathered by the engine from the breakers and the tiers:
/// this file renders numbers and knows neither.
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    /// Each model with a breaker reading: 0 passing, 1 blocking, 2 probing. Models the metrics
    /// have seen without a reading (they never failed) are shown 0.
    pub breakers: Vec<(String, i64)>,
    pub tiers: Vec<TierUsage>,
    /// Upstream requests holding a concurrency slot (streams until they end).
    pub upstream_in_flight: u64,
    /// Requests waiting for a slot (at most `server.max_queued`).
    pub upstream_queued: u64,
    /// Disk tier operations that failed, timed out or could not start, since the start.
    pub store_errors: u64,
    /// Shared tier operations that failed or timed out, since the start.
    pub shared_errors: u64,
    /// The disk tier's files, as last measured.
    pub disk_files_bytes: u64,
}

/// Entries and bytes held by one cache tier.
#[derive(Debug, Clone, Copy)]
pub struct TierUsage {
    /// `memory` or `disk`.
    pub tier: &'static str,
    pub entries: u64,
    pub bytes: u64,
}

/// The breaker gauge of a model that has no reading: passing.
const PASSING: i64 = 0;

/// Distinct model labels kept before the rest are counted as `other`.
const MAX_MODEL_LABELS: usize = 64;

type HistogramFamily = Family<OutcomeLabel, Histogram, fn() -> Histogram>;

/// The registry and the handles the engine updates.
pub struct Metrics {
    registry: Registry,
    requests: Family<OutcomeLabel, Counter>,
    latency: HistogramFamily,
    attempts: Family<AttemptLabels, Counter>,
    breaker: Family<ModelLabel, Gauge>,
    entries: Family<TierLabel, Gauge>,
    bytes: Family<TierLabel, Gauge>,
    callers: Family<CallerLabel, Counter>,
    cut: Family<ReasonLabel, Counter>,
    in_flight: Gauge,
    queued: Gauge,
    store_errors: Counter,
    shared_errors: Counter,
    disk_files: Gauge,
    /// Model labels in use. A std mutex: held for one set operation, on the miss path only.
    models: std::sync::Mutex<std::collections::HashSet<String>>,
    /// One scrape at a time: a scrape rebuilds the breaker gauges, which another one must not
    /// see half done.
    rendering: std::sync::Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("fallthrough");
        let requests = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by outcome",
            requests.clone(),
        );
        let latency: HistogramFamily =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.000_05, 2.5, 16)));
        registry.register(
            "request_duration_seconds",
            "Time to answer a request, by outcome",
            latency.clone(),
        );
        let attempts = Family::<AttemptLabels, Counter>::default();
        registry.register(
            "upstream_attempts",
            "Upstream attempts, by model and HTTP status (502/504 for transport failures)",
            attempts.clone(),
        );
        let breaker = Family::<ModelLabel, Gauge>::default();
        registry.register(
            "breaker_state",
            "Circuit breaker per model: 0 passing (closed), 1 blocking (open), 2 probing (half-open)",
            breaker.clone(),
        );
        let entries = Family::<TierLabel, Gauge>::default();
        registry.register("cache_entries", "Entries held, by tier", entries.clone());
        let bytes = Family::<TierLabel, Gauge>::default();
        registry.register("cache_bytes", "Bytes held, by tier", bytes.clone());
        let callers = Family::<CallerLabel, Counter>::default();
        registry.register(
            "caller_requests",
            "Requests admitted by an access token, by the token's name",
            callers.clone(),
        );
        let cut = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "connections_cut",
            "Connections the proxy closed on a caller, by which server timeout ran out \
             (idle_timeout, header_timeout, write_timeout)",
            cut.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "upstream_in_flight",
            "Upstream requests holding a concurrency slot (max_concurrency)",
            in_flight.clone(),
        );
        let queued = Gauge::default();
        registry.register(
            "upstream_queued",
            "Requests waiting for an upstream slot (at most server.max_queued)",
            queued.clone(),
        );
        let store_errors = Counter::default();
        registry.register(
            "store_errors",
            "Disk cache operations that failed, timed out or were skipped (the answer was served, not stored)",
            store_errors.clone(),
        );
        let shared_errors = Counter::default();
        registry.register(
            "shared_errors",
            "Shared tier operations that failed or timed out (each was a miss of the tier, or a store that did not happen)",
            shared_errors.clone(),
        );
        let disk_files = Gauge::default();
        registry.register(
            "disk_files_bytes",
            "The disk tier's files as last measured, what disk_bytes bounds (at most disk_bytes + 10% + 16 MiB)",
            disk_files.clone(),
        );
        Metrics {
            registry,
            shared_errors,
            disk_files,
            in_flight,
            queued,
            store_errors,
            requests,
            latency,
            attempts,
            breaker,
            entries,
            bytes,
            callers,
            cut,
            models: Default::default(),
            rendering: Default::default(),
        }
    }
}

impl Metrics {
    pub fn request(&self, outcome: Outcome, elapsed: Duration) {
        let label = OutcomeLabel {
            outcome: match outcome {
                Outcome::Memory => OutcomeValue::memory,
                Outcome::Disk => OutcomeValue::disk,
                Outcome::Shared => OutcomeValue::shared,
                Outcome::Miss => OutcomeValue::miss,
                Outcome::Stale => OutcomeValue::stale,
                Outcome::Bypass => OutcomeValue::bypass,
            },
        };
        self.observe(label, elapsed);
    }

    pub fn request_failed(&self, elapsed: Duration) {
        self.observe(
            OutcomeLabel {
                outcome: OutcomeValue::error,
            },
            elapsed,
        );
    }

    fn observe(&self, label: OutcomeLabel, elapsed: Duration) {
        self.latency
            .get_or_create(&label)
            .observe(elapsed.as_secs_f64());
        self.requests.get_or_create(&label).inc();
    }

    /// The counter of requests admitted by the access token named `name` (names come from
    /// the configuration, so the labels are bounded). Taken once per token, so that counting
    /// a request is one atomic add.
    pub fn caller_counter(&self, name: &str) -> Counter {
        let label = CallerLabel {
            caller: name.to_owned(),
        };
        self.callers.get_or_create(&label).clone()
    }

    /// The counter of connections closed on their caller because the server timeout named
    /// `reason` ran out (`idle_timeout`, `header_timeout`, `write_timeout`). Taken once per
    /// reason, so that counting a cut is one atomic add.
    pub fn connections_cut(&self, reason: &'static str) -> Counter {
        self.cut.get_or_create(&ReasonLabel { reason }).clone()
    }

    /// Counts an upstream attempt. Model names come from callers, so past
    /// `MAX_MODEL_LABELS` (64) distinct ones the rest are counted as `other`.
    pub fn attempt(&self, model: &str, status: u16) {
        let model = {
            let mut seen = self.models.lock().expect("metrics lock");
            if seen.contains(model) || seen.len() < MAX_MODEL_LABELS {
                seen.insert(model.to_owned());
                model.to_owned()
            } else {
                "other".to_owned()
            }
        };
        self.attempts
            .get_or_create(&AttemptLabels { model, status })
            .inc();
    }

    /// The text exposition, with the gauges read at this moment.
    pub fn render(&self, gauges: &Gauges) -> String {
        let _one_at_a_time = self.rendering.lock().expect("metrics render lock");
        let seen: Vec<String> = self
            .models
            .lock()
            .expect("metrics lock")
            .iter()
            .cloned()
            .collect();
        // Rebuilt at each scrape: a model the breakers no longer track leaves no label behind.
        self.breaker.clear();
        for model in seen {
            self.breaker
                .get_or_create(&ModelLabel { model })
                .set(PASSING);
        }
        for (model, state) in &gauges.breakers {
            self.breaker
                .get_or_create(&ModelLabel {
                    model: model.clone(),
                })
                .set(*state);
        }
        for usage in &gauges.tiers {
            let label = TierLabel { tier: usage.tier };
            self.entries.get_or_create(&label).set(usage.entries as i64);
            self.bytes.get_or_create(&label).set(usage.bytes as i64);
        }
        self.in_flight.set(gauges.upstream_in_flight as i64);
        self.queued.set(gauges.upstream_queued as i64);
        self.disk_files.set(gauges.disk_files_bytes as i64);
        // A counter the cache keeps: the registry's follows it.
        let seen = self.store_errors.get();
        self.store_errors
            .inc_by(gauges.store_errors.saturating_sub(seen));
        let seen = self.shared_errors.get();
        self.shared_errors
            .inc_by(gauges.shared_errors.saturating_sub(seen));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String never fails");
        out
    }
}
