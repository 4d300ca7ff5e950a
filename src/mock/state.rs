//! What the fake remembers between requests: its config, scripted answers, counts, and the
//! schedule of random faults.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use axum::http::{header, HeaderMap};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use super::routes::Endpoint;
use super::{MockConfig, MockStats, Scripted};
use crate::key::canonical_body;

/// State shared by the handlers and the [`MockServer`] handle.
///
/// Plain `std` mutexes: every critical section is a few map operations and never spans an
/// `.await`, so an async mutex would only add cost (mini-redis `db.rs` argues the same).
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) config: Mutex<MockConfig>,
    /// Requests seen by the random faults since the config was set, by [`fault_subject`]: the
    /// ordinal that, with the seed, decides the next identical request's fault. One entry per
    /// distinct request (40 bytes): a fake serves test traffic, not years of it.
    pub(super) seen: Mutex<HashMap<[u8; 32], u64>>,
    pub(super) scripts: Mutex<Scripts>,
    pub(super) stats: Mutex<MockStats>,
    /// `/v1` requests being answered now; its peak is [`MockStats::max_in_flight`].
    pub(super) in_flight: Mutex<u64>,
    /// Message Batches created, oldest first.
    pub(super) batches: Mutex<Vec<super::batches::Batch>>,
}

/// One `/v1` request being answered, counted in [`Shared::in_flight`] until dropped.
pub(super) struct InFlight<'a>(&'a Shared);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        *lock(&self.0.in_flight) -= 1;
    }
}

#[derive(Debug, Default)]
pub(super) struct Scripts {
    by_model: HashMap<String, VecDeque<Scripted>>,
    any: VecDeque<Scripted>,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks cannot leave the data half-updated in a way that
    // matters to a fake; keep serving.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub(super) fn new(config: MockConfig) -> Self {
        Shared {
            seen: Mutex::default(),
            config: Mutex::new(config),
            scripts: Mutex::default(),
            stats: Mutex::default(),
            in_flight: Mutex::new(0),
            batches: Mutex::default(),
        }
    }

    pub(super) fn set_config(&self, config: MockConfig) {
        lock(&self.seen).clear();
        *lock(&self.config) = config;
    }

    pub(super) fn script(&self, model: Option<&str>, responses: Vec<Scripted>) {
        let mut scripts = lock(&self.scripts);
        match model {
            Some(model) => scripts
                .by_model
                .entry(model.to_owned())
                .or_default()
                .extend(responses),
            None => scripts.any.extend(responses),
        }
    }

    pub(super) fn next_scripted(&self, model: &str) -> Option<Scripted> {
        let mut scripts = lock(&self.scripts);
        scripts
            .by_model
            .get_mut(model)
            .and_then(VecDeque::pop_front)
            .or_else(|| scripts.any.pop_front())
    }

    /// Counts a `/v1` request in until the guard drops, and raises the peak.
    pub(super) fn enter(&self) -> InFlight<'_> {
        let mut in_flight = lock(&self.in_flight);
        *in_flight += 1;
        let mut stats = lock(&self.stats);
        stats.max_in_flight = stats.max_in_flight.max(*in_flight);
        InFlight(self)
    }

    pub(super) fn record_request(&self, path: &str, query: Option<&str>, headers: &HeaderMap) {
        let mut stats = lock(&self.stats);
        stats.requests += 1;
        stats.last_query = query.map(str::to_owned);
        *stats.by_path.entry(path.to_owned()).or_default() += 1;
        let credential = headers
            .get("x-api-key")
            .or_else(|| headers.get(header::AUTHORIZATION))
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        stats.last_api_key = credential;
        let mut recorded = BTreeMap::new();
        for (name, value) in headers {
            if name == "x-api-key" || name == header::AUTHORIZATION {
                continue;
            }
            let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
            recorded
                .entry(name.as_str().to_owned())
                .and_modify(|v: &mut String| {
                    v.push_str(", ");
                    v.push_str(&value);
                })
                .or_insert(value);
        }
        stats.last_headers = recorded;
    }

    pub(super) fn record_status(&self, model: Option<&str>, status: u16) {
        if let Some(model) = model {
            let mut stats = lock(&self.stats);
            *stats
                .by_model
                .entry(model.to_owned())
                .or_default()
                .entry(status)
                .or_default() += 1;
        }
    }

    /// Random faults, in order: 529 at the model's rate, 429, 500, drawn from an RNG seeded by
    /// the seed, `subject` ([`fault_subject`]) and the subject's ordinal. Draws only for rates
    /// above 0.
    pub(super) fn random_fault(
        &self,
        config: &MockConfig,
        model: &str,
        subject: impl FnOnce() -> [u8; 32],
    ) -> Option<Fault> {
        let overload = config
            .model_overload_rate
            .get(model)
            .copied()
            .unwrap_or(config.overload_rate);
        if overload <= 0.0 && config.rate_limit_rate <= 0.0 && config.server_error_rate <= 0.0 {
            return None;
        }
        let subject = subject();
        let ordinal = {
            let mut seen = lock(&self.seen);
            let count = seen.entry(subject).or_default();
            *count += 1;
            *count - 1
        };
        let mut rng = fault_rng(config.seed, &subject, ordinal);
        let mut hit = |p: f64| p > 0.0 && rng.random::<f64>() < p;
        if hit(overload) {
            Some(Fault::overloaded(config))
        } else if hit(config.rate_limit_rate) {
            Some(Fault::Status {
                status: 429,
                retry_after: Some(config.retry_after.unwrap_or(1).to_string()),
            })
        } else if hit(config.server_error_rate) {
            Some(Fault::Status {
                status: 500,
                retry_after: None,
            })
        } else {
            None
        }
    }
}

/// What the random faults know a request by: its endpoint and its body without `stream` (a
/// streamed request and its plain twin are one subject, as they are one cache entry).
pub(super) fn fault_subject(endpoint: Endpoint, request: &Value) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(match endpoint {
        Endpoint::Messages => b"messages\n",
        Endpoint::CountTokens => b"count_tokens\n",
    });
    hasher.update(canonical_body(request).as_bytes());
    *hasher.finalize().as_bytes()
}

/// The RNG that decides the random faults of the `ordinal`th request (from 0) with `subject`.
pub(super) fn fault_rng(seed: u64, subject: &[u8; 32], ordinal: u64) -> StdRng {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"fallthrough mock faults v2\n");
    hasher.update(&seed.to_le_bytes());
    hasher.update(subject);
    hasher.update(&ordinal.to_le_bytes());
    StdRng::from_seed(*hasher.finalize().as_bytes())
}

/// What one `/v1/messages` or `count_tokens` request gets, once decided.
#[derive(Debug)]
pub(super) enum Fault {
    Status {
        status: u16,
        retry_after: Option<String>,
    },
    NoRetry(u16),
    SpendLimit,
    StreamError(usize),
    StreamCut(usize),
}

impl Fault {
    pub(super) fn overloaded(config: &MockConfig) -> Fault {
        Fault::Status {
            status: 529,
            retry_after: config.retry_after.map(|s| s.to_string()),
        }
    }
}
