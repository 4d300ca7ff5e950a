//! The fault-injecting fake of the Messages API (`fallthrough mock`).
//!
//! It owns one thing: answering like `api.anthropic.com` would, including its failures, so that
//! the proxy, the engine and users' own code can be tested against overloads, rate limits,
//! broken streams and slow answers without a real key.
//!
//! - Answers are deterministic functions of the request body (without `stream`): the same request
//!   gives the same Message, `id` included, whether it is streamed or not.
//! - Faults are decided in a fixed order: validation (400), the scripted queue (model-specific
//!   first, then any-model), `overloaded_models`, then random faults (529 at the model's rate,
//!   then 429, then 500).
//! - A random fault is a pure function of the seed, the request (endpoint and body without
//!   `stream`) and its ordinal: how many identical requests reached the random faults before it
//!   since the configuration was set. The 3rd attempt at a request gets the same answer in
//!   every run with that seed, however other requests interleave with it; one RNG stream drawn
//!   in arrival order would hand the faults out by timing. Only identical requests racing each
//!   other can swap their answers (which of them is the 3rd).
//! - Tests use [`MockServer`] in-process; the CLI uses [`serve`]. Both expose the same HTTP
//!   control routes: `GET /mock/stats`, `GET|POST /mock/config`, `POST /mock/script`,
//!   `POST /mock/reset`.

mod answer;
mod batches;
mod routes;
mod state;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt;
use axum::Router;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use routes::dispatch;
use state::{lock, Shared};

/// The faults the fake injects; every field defaults to "no fault".
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct MockConfig {
    /// Probability of a 529 `overloaded_error`, for every model without its own rate.
    pub overload_rate: f64,
    /// Models that always answer 529.
    pub overloaded_models: Vec<String>,
    /// Per-model probability of a 529; overrides `overload_rate` for that model.
    pub model_overload_rate: HashMap<String, f64>,
    /// Probability of a 429 `rate_limit_error`.
    pub rate_limit_rate: f64,
    /// Probability of a 500 `api_error`.
    pub server_error_rate: f64,
    /// Seconds, sent as `retry-after` on 429 and 529 when set. A random 429 always carries one
    /// (1 when unset), as the real API's do.
    pub retry_after: Option<u64>,
    /// Added before every `/v1` answer (before the first byte of a stream).
    pub latency_ms: u64,
    /// Seeds the random faults (see the module docs). Replacing the config starts the schedule
    /// afresh: every request's ordinal counts from 0 again.
    pub seed: u64,
    /// How long a Message Batch takes to end, from its creation.
    pub batch_latency_ms: u64,
    /// Probability that a batched request ends `expired` rather than answered.
    pub batch_expire_rate: f64,
}

/// One queued answer, served before any random fault (see [`MockServer::script`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Scripted {
    /// A normal answer.
    Ok,
    /// An error in the API's shape for that status (a status below 400 is a normal answer);
    /// `retry_after` is sent verbatim as the `retry-after` header when set.
    Status {
        status: u16,
        #[serde(default)]
        retry_after: Option<String>,
    },
    /// An error in the API's shape for that status, with `x-should-retry: false`: the
    /// upstream saying that trying this request again will not help.
    NoRetry { status: u16 },
    /// 429 `rate_limit_error` with `error.details.error_code = "enforced_spend_limit_reached"`
    /// and no `retry-after`.
    SpendLimit,
    /// Streams: 200, then after `after_events` events an `overloaded_error` error event, and the
    /// stream ends. Plain requests: 529.
    StreamError { after_events: usize },
    /// Streams: 200, then the body breaks off after `after_events` events. Plain requests: 500.
    StreamCut { after_events: usize },
    /// A normal answer after an extra delay.
    Delay { ms: u64 },
}

/// What the fake has seen, for assertions; `GET /mock/stats` serves the same.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct MockStats {
    /// Every request to `/v1/*`.
    pub requests: u64,
    /// model -> status -> count, for `POST /v1/messages` and `count_tokens`.
    pub by_model: BTreeMap<String, BTreeMap<u16, u64>>,
    /// `/v1` path -> count.
    pub by_path: BTreeMap<String, u64>,
    /// The query string of the last `/v1` request, if it had one (`beta=true`).
    pub last_query: Option<String>,
    /// `x-api-key` (else `authorization`) of the last `/v1` request, to check forwarding.
    pub last_api_key: Option<String>,
    /// The other headers of the last `/v1` request (names lowercase), credentials left out.
    pub last_headers: BTreeMap<String, String>,
    /// The most `/v1` requests being answered at once (from arrival until the answer's head is
    /// sent, its latency included), to check a caller's concurrency limit.
    pub max_in_flight: u64,
}

/// Body of `POST /mock/script`.
#[derive(Debug, serde::Deserialize)]
struct ScriptRequest {
    #[serde(default)]
    model: Option<String>,
    responses: Vec<Scripted>,
}

/// A running fake; dropping it or calling [`MockServer::shutdown`] stops it.
#[derive(Debug)]
pub struct MockServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<io::Result<()>>>,
}

impl MockServer {
    /// Starts a fake on `127.0.0.1`, on a port the system picks.
    pub async fn start(config: MockConfig) -> io::Result<MockServer> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        Self::start_on(listener, config).await
    }

    /// Starts a fake on a listener the caller bound.
    pub async fn start_on(
        listener: tokio::net::TcpListener,
        config: MockConfig,
    ) -> io::Result<MockServer> {
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(config));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(run(listener, shared.clone(), async move {
            let _ = stopped.await;
        }));
        Ok(MockServer {
            addr,
            shared,
            stop: Some(stop),
            task: Some(task),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash: a base URL for an SDK or the proxy.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A copy of the counters, the same data as `GET /mock/stats`.
    pub fn stats(&self) -> MockStats {
        lock(&self.shared.stats).clone()
    }

    /// Replaces the faults while running (phases of a scenario); the random faults' schedule
    /// starts afresh from the new seed.
    pub fn set_config(&self, config: MockConfig) {
        self.shared.set_config(config);
    }

    /// Queues answers served, first in first out, before any random fault. `model: None` queues
    /// for any model; a model's own queue is used before the any-model queue.
    pub fn script(&self, model: Option<&str>, responses: Vec<Scripted>) {
        self.shared.script(model, responses);
    }

    /// Zeroes the counters.
    pub fn reset_stats(&self) {
        *lock(&self.shared.stats) = MockStats::default();
    }

    /// Stops accepting, lets in-flight answers finish (at most 5 s), and returns.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut task) = self.task.take() {
            if tokio::time::timeout(Duration::from_secs(5), &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Runs the fake on `listener` until `shutdown` completes; for `fallthrough mock`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: MockConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    run(listener, Arc::new(Shared::new(config)), shutdown).await
}

async fn run(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let app = Router::new().fallback(dispatch).with_state(shared);
    // No Nagle, like the real API: a stream is many small writes (see `server::serve`).
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
