//! What a replay measured: the [`Report`], and the running [`Tally`] it is built from.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::jsonl::InvalidLine;
use crate::outcome::Outcome;

/// Latency of one outcome, in microseconds; the percentiles are `null` when no request had
/// that outcome.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50: Option<u64>,
    pub p95: Option<u64>,
    pub p99: Option<u64>,
    pub max: Option<u64>,
    pub mean: Option<f64>,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            count: h.len(),
            p50: Some(h.value_at_quantile(0.50)),
            p95: Some(h.value_at_quantile(0.95)),
            p99: Some(h.value_at_quantile(0.99)),
            max: Some(h.max()),
            mean: Some(h.mean()),
        }
    }
}

/// The result of a bench run; `--json` prints it as one object with these fields.
///
/// Counts of requests (a request is one line sent once; `requests = lines × repeat`):
/// - `requests`, `answered` (an answer, from anywhere), `errors` (no answer);
///   `errors_by_status`: errors by the upstream's HTTP status (`"529"`, `"429"`, ...), or
///   `"stream"` (a stream that broke off before `message_stop`), `"invalid"` (the client refused
///   the body), `"internal"`, `"disk"`.
/// - by outcome: `memory`, `disk` (fresh hits of each tier; `hits` is their sum), `stale` (a
///   stale entry stood in for a failed upstream), `misses` (the upstream answered), `bypass`.
///   `hits + stale + misses + bypass + errors == requests`.
/// - rates over `requests`: `hit_rate` (memory + disk + stale: answered from the cache),
///   `memory_rate`, `disk_rate`, `stale_rate`, `miss_rate`, `error_rate`.
///
/// Savings and the upstream:
/// - `upstream_attempts`: the sum of the attempts each request reports (failed ones, retries
///   and fallbacks included). Requests that shared one fetch (single flight) each count it,
///   and background refreshes are not counted; `mock_requests` is the exact count when known.
/// - `mock_requests`, `mock_by_status` (status -> count): what the in-process fake received
///   (`--mock`); `null` otherwise.
/// - `calls_saved`: answers from the cache (`hit_rate`'s numerator), each a paid call not made.
/// - `tokens_saved`: `usage.input_tokens + usage.output_tokens` summed over those answers.
/// - `fallback_answers`: answers from a model other than the one asked for.
///
/// The workload and the run: `file` (when set by the caller), `lines` (valid lines),
/// `invalid_lines` (their 1-based numbers), `invalid` (each with its `line` and `reason`), `distinct_requests` (distinct cache keys among the
/// lines), `streamed` (requests sent with `"stream": true`), `repeat`, `concurrency` (1 in a
/// reproducible replay), `logical_step_ms` (the logical clock's step of a reproducible replay;
/// `null` for a live run), `wall_time_s`, `throughput_rps` (requests per second of wall time).
///
/// `latency_us`: for each of `memory`, `disk`, `stale`, `miss`, `bypass`, `error`: `count`,
/// `p50`, `p95`, `p99`, `max` and `mean`, in microseconds from the call to the end of the
/// answer (a stream's last byte).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub file: Option<String>,
    pub lines: usize,
    pub invalid_lines: Vec<usize>,
    pub invalid: Vec<InvalidLine>,
    pub distinct_requests: usize,
    pub repeat: usize,
    pub concurrency: usize,
    pub logical_step_ms: Option<u64>,
    pub requests: u64,
    pub streamed: u64,
    pub answered: u64,
    pub errors: u64,
    pub errors_by_status: BTreeMap<String, u64>,
    pub hits: u64,
    pub memory: u64,
    pub disk: u64,
    pub shared: u64,
    pub stale: u64,
    pub misses: u64,
    pub bypass: u64,
    pub hit_rate: f64,
    pub memory_rate: f64,
    pub disk_rate: f64,
    pub shared_rate: f64,
    pub stale_rate: f64,
    pub miss_rate: f64,
    pub error_rate: f64,
    pub upstream_attempts: u64,
    pub mock_requests: Option<u64>,
    pub mock_by_status: Option<BTreeMap<String, u64>>,
    pub calls_saved: u64,
    pub tokens_saved: u64,
    pub fallback_answers: u64,
    pub wall_time_s: f64,
    pub throughput_rps: f64,
    pub latency_us: BTreeMap<String, Latency>,
}

/// The name of an outcome in the report, errors included.
pub(super) const ERROR: &str = "error";

/// What one request came to.
pub(super) struct Sample {
    /// `Ok(outcome)`, or `Err(label)` for `errors_by_status`.
    pub(super) result: Result<Outcome, String>,
    pub(super) latency: Duration,
    pub(super) attempts: u32,
    /// `usage` input + output tokens of the answer.
    pub(super) tokens: u64,
    pub(super) fallback: bool,
    pub(super) streamed: bool,
}

/// Running counts while the replay goes.
pub(super) struct Tally {
    report: Report,
    /// Latency by outcome name, in µs: 1 µs to 1 hour, 3 significant digits.
    latency: BTreeMap<&'static str, Histogram<u64>>,
}

impl Tally {
    pub(super) fn new() -> Tally {
        let names = Outcome::ALL.iter().map(|o| o.as_str()).chain([ERROR]);
        let latency = names
            .map(|name| {
                let h = Histogram::new_with_bounds(1, 3_600_000_000, 3)
                    .expect("constant bounds are valid");
                (name, h)
            })
            .collect();
        Tally {
            report: Report::default(),
            latency,
        }
    }

    pub(super) fn add(&mut self, sample: Sample) {
        let r = &mut self.report;
        r.requests += 1;
        r.streamed += u64::from(sample.streamed);
        r.upstream_attempts += u64::from(sample.attempts);
        let name = match &sample.result {
            Ok(outcome) => {
                r.answered += 1;
                match outcome {
                    Outcome::Memory => r.memory += 1,
                    Outcome::Disk => r.disk += 1,
                    Outcome::Shared => r.shared += 1,
                    Outcome::Stale => r.stale += 1,
                    Outcome::Miss => r.misses += 1,
                    Outcome::Bypass => r.bypass += 1,
                }
                r.tokens_saved += sample.tokens;
                r.fallback_answers += u64::from(sample.fallback);
                outcome.as_str()
            }
            Err(label) => {
                r.errors += 1;
                *r.errors_by_status.entry(label.clone()).or_default() += 1;
                ERROR
            }
        };
        let micros = u64::try_from(sample.latency.as_micros()).unwrap_or(u64::MAX);
        if let Some(h) = self.latency.get_mut(name) {
            h.saturating_record(micros.max(1));
        }
    }

    pub(super) fn report(self, wall: Duration) -> Report {
        let mut r = self.report;
        r.hits = r.memory + r.disk + r.shared;
        r.calls_saved = r.hits + r.stale;
        let share = |n: u64| match r.requests {
            0 => 0.0,
            total => n as f64 / total as f64,
        };
        r.hit_rate = share(r.hits + r.stale);
        r.memory_rate = share(r.memory);
        r.disk_rate = share(r.disk);
        r.shared_rate = share(r.shared);
        r.stale_rate = share(r.stale);
        r.miss_rate = share(r.misses);
        r.error_rate = share(r.errors);
        r.wall_time_s = wall.as_secs_f64();
        r.throughput_rps = match wall.as_secs_f64() {
            s if s > 0.0 => r.requests as f64 / s,
            _ => 0.0,
        };
        r.latency_us = self
            .latency
            .iter()
            .map(|(name, h)| ((*name).to_owned(), Latency::of(h)))
            .collect();
        r
    }
}
