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

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::Response;
use axum::serve::ListenerExt;
use axum::Router;
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

use crate::error::{error_body, error_type_for_status};
use crate::sse;

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

/// State shared by the handlers and the [`MockServer`] handle.
///
/// Plain `std` mutexes: every critical section is a few map operations and never spans an
/// `.await`, so an async mutex would only add cost (mini-redis `db.rs` argues the same).
#[derive(Debug)]
struct Shared {
    config: Mutex<MockConfig>,
    /// Requests seen by the random faults since the config was set, by [`fault_subject`]: the
    /// ordinal that, with the seed, decides the next identical request's fault. One entry per
    /// distinct request (40 bytes): a fake serves test traffic, not years of it.
    seen: Mutex<HashMap<[u8; 32], u64>>,
    scripts: Mutex<Scripts>,
    stats: Mutex<MockStats>,
    /// `/v1` requests being answered now; its peak is [`MockStats::max_in_flight`].
    in_flight: Mutex<u64>,
}

/// One `/v1` request being answered, counted in [`Shared::in_flight`] until dropped.
struct InFlight<'a>(&'a Shared);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        *lock(&self.0.in_flight) -= 1;
    }
}

#[derive(Debug, Default)]
struct Scripts {
    by_model: HashMap<String, VecDeque<Scripted>>,
    any: VecDeque<Scripted>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks cannot leave the data half-updated in a way that
    // matters to a fake; keep serving.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn new(config: MockConfig) -> Self {
        Shared {
            seen: Mutex::default(),
            config: Mutex::new(config),
            scripts: Mutex::default(),
            stats: Mutex::default(),
            in_flight: Mutex::new(0),
        }
    }

    fn set_config(&self, config: MockConfig) {
        lock(&self.seen).clear();
        *lock(&self.config) = config;
    }

    fn script(&self, model: Option<&str>, responses: Vec<Scripted>) {
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

    fn next_scripted(&self, model: &str) -> Option<Scripted> {
        let mut scripts = lock(&self.scripts);
        scripts
            .by_model
            .get_mut(model)
            .and_then(VecDeque::pop_front)
            .or_else(|| scripts.any.pop_front())
    }

    /// Counts a `/v1` request in until the guard drops, and raises the peak.
    fn enter(&self) -> InFlight<'_> {
        let mut in_flight = lock(&self.in_flight);
        *in_flight += 1;
        let mut stats = lock(&self.stats);
        stats.max_in_flight = stats.max_in_flight.max(*in_flight);
        InFlight(self)
    }

    fn record_request(&self, path: &str, headers: &HeaderMap) {
        let mut stats = lock(&self.stats);
        stats.requests += 1;
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

    fn record_status(&self, model: Option<&str>, status: u16) {
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
    fn random_fault(
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
fn fault_subject(endpoint: Endpoint, request: &Value) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(match endpoint {
        Endpoint::Messages => b"messages\n",
        Endpoint::CountTokens => b"count_tokens\n",
    });
    hasher.update(canonical_request(request).as_bytes());
    *hasher.finalize().as_bytes()
}

/// The RNG that decides the random faults of the `ordinal`th request (from 0) with `subject`.
fn fault_rng(seed: u64, subject: &[u8; 32], ordinal: u64) -> StdRng {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"fallthrough mock faults v2\n");
    hasher.update(&seed.to_le_bytes());
    hasher.update(subject);
    hasher.update(&ordinal.to_le_bytes());
    StdRng::from_seed(*hasher.finalize().as_bytes())
}

/// What one `/v1/messages` or `count_tokens` request gets, once decided.
#[derive(Debug)]
enum Fault {
    Status {
        status: u16,
        retry_after: Option<String>,
    },
    SpendLimit,
    StreamError(usize),
    StreamCut(usize),
}

impl Fault {
    fn overloaded(config: &MockConfig) -> Fault {
        Fault::Status {
            status: 529,
            retry_after: config.retry_after.map(|s| s.to_string()),
        }
    }
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

/// The real API's body limit for messages and count_tokens.
const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

const MODELS: &[(&str, &str, &str)] = &[
    ("claude-opus-4-1", "Claude Opus 4.1", "2025-08-05T00:00:00Z"),
    (
        "claude-sonnet-4-5",
        "Claude Sonnet 4.5",
        "2025-09-29T00:00:00Z",
    ),
    (
        "claude-haiku-4-5",
        "Claude Haiku 4.5",
        "2025-10-15T00:00:00Z",
    ),
];

/// One handler for every route: the table is small, and it keeps every answer (404 and 405
/// included) in the API's shape with a `request-id`.
async fn dispatch(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let request_id = new_request_id();
    let path = uri.path().to_owned();
    let is_api = path == "/v1" || path.starts_with("/v1/");
    let body = match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
        Ok(body) => Ok(body),
        Err(_) => Err(api_error(
            413,
            "Request exceeds the maximum allowed number of bytes.",
            &request_id,
        )),
    };
    let mut response = if is_api {
        let _in_flight = shared.enter();
        shared.record_request(&path, &headers);
        let latency = lock(&shared.config).latency_ms;
        let (response, model) = match body {
            Err(too_large) => (too_large, None),
            Ok(body) => api_route(&shared, &method, &path, body, &request_id).await,
        };
        if latency > 0 {
            tokio::time::sleep(Duration::from_millis(latency)).await;
        }
        let status = response.status().as_u16();
        if path == "/v1/messages" || path == "/v1/messages/count_tokens" {
            shared.record_status(model.as_deref(), status);
        }
        tracing::debug!(%method, %path, model = model.as_deref().unwrap_or("-"), status, %request_id, "mock answered");
        response
    } else {
        match body {
            Err(too_large) => too_large,
            Ok(body) => control_route(&shared, &method, &path, body, &request_id),
        }
    };
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("request-id", value);
    }
    response
}

/// `/v1/*`; returns the answer and the model it was for, when the body named one. Answers
/// depend only on the body; headers are only recorded in the stats.
async fn api_route(
    shared: &Shared,
    method: &Method,
    path: &str,
    body: Bytes,
    request_id: &str,
) -> (Response, Option<String>) {
    let endpoint = match path {
        "/v1/messages" => Endpoint::Messages,
        "/v1/messages/count_tokens" => Endpoint::CountTokens,
        "/v1/models" if method == Method::GET => return (models_list(), None),
        _ if method == Method::GET && path.starts_with("/v1/models/") => {
            return (model_get(&path["/v1/models/".len()..], request_id), None)
        }
        _ => return (not_found(path, request_id), None),
    };
    if method != Method::POST {
        return (
            api_error(
                405,
                &format!("Method {method} is not allowed for {path}"),
                request_id,
            ),
            None,
        );
    }
    messages(shared, endpoint, &body, request_id).await
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Messages,
    CountTokens,
}

async fn messages(
    shared: &Shared,
    endpoint: Endpoint,
    body: &[u8],
    request_id: &str,
) -> (Response, Option<String>) {
    let request: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            let message = format!("There was an error parsing the body of your request: {e}");
            return (api_error(400, &message, request_id), None);
        }
    };
    let model = request
        .get("model")
        .and_then(Value::as_str)
        .map(str::to_owned);
    if let Err(message) = validate(&request, endpoint) {
        return (api_error(400, &message, request_id), model);
    }
    let model = model.unwrap_or_default();
    let config = lock(&shared.config).clone();

    let mut extra_delay = 0;
    let fault = match shared.next_scripted(&model) {
        Some(Scripted::Ok) => None,
        Some(Scripted::Delay { ms }) => {
            extra_delay = ms;
            None
        }
        Some(Scripted::Status { status, .. }) if status < 400 => None,
        Some(Scripted::Status {
            status,
            retry_after,
        }) => Some(Fault::Status {
            status,
            retry_after,
        }),
        Some(Scripted::SpendLimit) => Some(Fault::SpendLimit),
        Some(Scripted::StreamError { after_events }) => Some(Fault::StreamError(after_events)),
        Some(Scripted::StreamCut { after_events }) => Some(Fault::StreamCut(after_events)),
        None if config.overloaded_models.contains(&model) => Some(Fault::overloaded(&config)),
        None => shared.random_fault(&config, &model, || fault_subject(endpoint, &request)),
    };
    if extra_delay > 0 {
        tokio::time::sleep(Duration::from_millis(extra_delay)).await;
    }

    let stream =
        endpoint == Endpoint::Messages && request.get("stream") == Some(&Value::Bool(true));
    let response = match fault {
        Some(Fault::Status {
            status,
            retry_after,
        }) => status_error(status, retry_after.as_deref(), request_id),
        Some(Fault::SpendLimit) => spend_limit(request_id),
        Some(Fault::StreamError(_)) if !stream => status_error(529, None, request_id),
        Some(Fault::StreamCut(_)) if !stream => status_error(500, None, request_id),
        fault => match endpoint {
            Endpoint::CountTokens => {
                let tokens = input_tokens(&canonical_request(&request));
                json_response(200, json!({ "input_tokens": tokens }).to_string())
            }
            Endpoint::Messages => {
                let message = answer(&request);
                if stream {
                    let end = match fault {
                        Some(Fault::StreamError(n)) => StreamEnd::Error(n),
                        Some(Fault::StreamCut(n)) => StreamEnd::Cut(n),
                        _ => StreamEnd::Complete,
                    };
                    stream_response(&message, end)
                } else {
                    json_response(200, message.to_string())
                }
            }
        },
    };
    (response, Some(model))
}

/// The checks the real API makes before anything else, with messages in its style.
fn validate(request: &Value, endpoint: Endpoint) -> Result<(), String> {
    let Some(obj) = request.as_object() else {
        return Err("The request body must be a JSON object".into());
    };
    match obj.get("model") {
        Some(Value::String(m)) if !m.is_empty() => {}
        Some(_) => return Err("model: Input should be a valid string".into()),
        None => return Err("model: Field required".into()),
    }
    match obj.get("messages") {
        None => return Err("messages: Field required".into()),
        Some(Value::Array(list)) if list.is_empty() => {
            return Err("messages: at least one message is required".into())
        }
        Some(Value::Array(list)) => {
            for (i, m) in list.iter().enumerate() {
                let role = m.get("role").and_then(Value::as_str);
                if !matches!(role, Some("user" | "assistant")) {
                    return Err(format!(
                        "messages.{i}.role: Input should be 'user' or 'assistant'"
                    ));
                }
                if m.get("content").is_none() {
                    return Err(format!("messages.{i}.content: Field required"));
                }
            }
        }
        Some(_) => return Err("messages: Input should be a valid list".into()),
    }
    if endpoint == Endpoint::Messages {
        match obj.get("max_tokens") {
            None => return Err("max_tokens: Field required".into()),
            Some(v) if v.as_u64().is_some_and(|n| n >= 1) => {}
            Some(_) => return Err("max_tokens: Input should be an integer greater than 0".into()),
        }
    }
    Ok(())
}

fn control_route(
    shared: &Shared,
    method: &Method,
    path: &str,
    body: Bytes,
    request_id: &str,
) -> Response {
    let bad = |e: serde_json::Error| api_error(400, &e.to_string(), request_id);
    let ok = || json_response(200, json!({"ok": true}).to_string());
    match (method.as_str(), path) {
        ("GET", "/mock/stats") => {
            let stats = lock(&shared.stats).clone();
            json_response(200, serde_json::to_string(&stats).unwrap_or_default())
        }
        ("GET", "/mock/config") => {
            let config = lock(&shared.config).clone();
            json_response(200, serde_json::to_string(&config).unwrap_or_default())
        }
        ("POST", "/mock/config") => match serde_json::from_slice::<MockConfig>(&body) {
            Ok(config) => {
                shared.set_config(config);
                ok()
            }
            Err(e) => bad(e),
        },
        ("POST", "/mock/script") => match serde_json::from_slice::<ScriptRequest>(&body) {
            Ok(script) => {
                shared.script(script.model.as_deref(), script.responses);
                ok()
            }
            Err(e) => bad(e),
        },
        ("POST", "/mock/reset") => {
            *lock(&shared.stats) = MockStats::default();
            ok()
        }
        _ => not_found(path, request_id),
    }
}

fn models_list() -> Response {
    let data: Vec<Value> = MODELS.iter().map(|m| model_json(*m)).collect();
    let body = json!({
        "data": data,
        "has_more": false,
        "first_id": MODELS.first().map(|m| m.0),
        "last_id": MODELS.last().map(|m| m.0),
    });
    json_response(200, body.to_string())
}

fn model_get(id: &str, request_id: &str) -> Response {
    match MODELS.iter().find(|m| m.0 == id) {
        Some(m) => json_response(200, model_json(*m).to_string()),
        None => api_error(404, &format!("model: {id}"), request_id),
    }
}

fn model_json((id, display_name, created_at): (&str, &str, &str)) -> Value {
    json!({"type": "model", "id": id, "display_name": display_name, "created_at": created_at})
}

fn json_response(status: u16, body: String) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// `{"type":"error","error":{"type":..,"message":..},"request_id":..}` with the status's type.
fn api_error(status: u16, message: &str, request_id: &str) -> Response {
    let mut body: Value =
        serde_json::from_slice(&error_body(error_type_for_status(status), message))
            .unwrap_or_else(|_| json!({}));
    body["request_id"] = json!(request_id);
    let mut response = json_response(status, body.to_string());
    if response.status().as_u16() != status {
        *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    }
    response
}

fn not_found(path: &str, request_id: &str) -> Response {
    api_error(404, &format!("Not found: {path}"), request_id)
}

fn status_error(status: u16, retry_after: Option<&str>, request_id: &str) -> Response {
    let message = match status {
        529 => "Overloaded".to_owned(),
        429 => "This request would exceed the rate limit for your organization (mock).".into(),
        500 => "Internal server error".into(),
        _ => format!("Mock error with status {status}"),
    };
    let mut response = api_error(status, &message, request_id);
    if let Some(value) = retry_after.and_then(|v| HeaderValue::from_str(v).ok()) {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

fn spend_limit(request_id: &str) -> Response {
    let body = json!({
        "type": "error",
        "error": {
            "type": "rate_limit_error",
            "message": "You have reached your specified workspace API usage limits. \
                        You will regain access when the limit resets.",
            "details": {"error_code": "enforced_spend_limit_reached"},
        },
        "request_id": request_id,
    });
    json_response(429, body.to_string())
}

/// How a streamed answer ends.
#[derive(Debug, Clone, Copy)]
enum StreamEnd {
    Complete,
    /// After N events, an `overloaded_error` event, then the end of the body.
    Error(usize),
    /// After N events, the body breaks off (hyper drops the connection mid-body).
    Cut(usize),
}

/// Sends `message` as the API's event stream, one event per body chunk, with a `ping` after
/// `message_start` as the real API does. A fault's N is capped below the event count so the
/// fault always happens before `message_stop`.
fn stream_response(message: &Value, end: StreamEnd) -> Response {
    let mut frames = match sse::replay_frames(message) {
        Ok(frames) => frames,
        Err(e) => {
            let body = error_body("api_error", &e.to_string());
            return json_response(500, String::from_utf8_lossy(&body).into_owned());
        }
    };
    frames.insert(1, ("ping".to_owned(), json!({"type": "ping"})));
    let total = frames.len();
    let (keep, tail) = match end {
        StreamEnd::Complete => (total, None),
        StreamEnd::Error(n) => (n.min(total - 1), Some(true)),
        StreamEnd::Cut(n) => (n.min(total - 1), Some(false)),
    };
    frames.truncate(keep);

    // Capacity 1: the producer waits for hyper to take each chunk, so events leave one by one.
    let (tx, rx) = mpsc::channel::<Result<Bytes, io::Error>>(1);
    tokio::spawn(async move {
        for (event, data) in frames {
            if tx.send(Ok(sse::encode_event(&event, &data))).await.is_err() {
                return; // the client went away
            }
            tokio::task::yield_now().await;
        }
        let last = match tail {
            None => return,
            Some(true) => Ok(sse::encode_event(
                "error",
                &json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
            )),
            Some(false) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "mock: stream cut",
            )),
        };
        let _ = tx.send(last).await;
    });
    let mut response = Response::new(Body::from_stream(ReceiverStream::new(rx)));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

// ---- Deterministic answers --------------------------------------------------------------------

const WORDS: &[&str] = &[
    "the",
    "cache",
    "answers",
    "quickly",
    "while",
    "upstream",
    "models",
    "rest",
    "a",
    "stream",
    "of",
    "tokens",
    "flows",
    "through",
    "quiet",
    "servers",
    "and",
    "every",
    "request",
    "finds",
    "its",
    "way",
    "home",
    "under",
    "bright",
    "autumn",
    "skies",
    "with",
    "patient",
    "retries",
    "gentle",
    "backoff",
    "keeps",
    "traffic",
    "calm",
    "when",
    "load",
    "rises",
    "fallback",
    "paths",
    "stay",
    "open",
    "for",
    "careful",
    "clients",
    "who",
    "measure",
    "latency",
    "in",
    "small",
    "steps",
    "rivers",
    "carry",
    "old",
    "answers",
    "to",
    "new",
    "questions",
    "so",
    "nothing",
    "waits",
    "long",
    "today",
    "again",
];

const ALPHANUMERIC: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// The request without `stream`, as JSON with object keys sorted at every depth.
fn canonical_request(request: &Value) -> String {
    fn write(v: &Value, out: &mut String) {
        match v {
            Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                out.push('{');
                for (i, k) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::String(k.clone()).to_string());
                    out.push(':');
                    write(&map[k], out);
                }
                out.push('}');
            }
            Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(item, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut request = request.clone();
    if let Some(obj) = request.as_object_mut() {
        obj.remove("stream");
    }
    let mut out = String::new();
    write(&request, &mut out);
    out
}

/// About four characters per token, as a rough tokenizer would give.
fn input_tokens(canonical: &str) -> u64 {
    (canonical.len() as u64 / 4).max(1)
}

fn id_from(rng: &mut StdRng, prefix: &str, len: usize) -> String {
    let mut id = String::with_capacity(prefix.len() + len);
    id.push_str(prefix);
    for _ in 0..len {
        id.push(ALPHANUMERIC[rng.random_range(0..ALPHANUMERIC.len())] as char);
    }
    id
}

fn new_request_id() -> String {
    let mut rng = StdRng::from_rng(&mut rand::rng());
    id_from(&mut rng, "req_011C", 20)
}

fn sentence(rng: &mut StdRng, words: u64) -> String {
    let mut text = String::new();
    for i in 0..words {
        let word = WORDS[rng.random_range(0..WORDS.len())];
        if i == 0 {
            let mut chars = word.chars();
            if let Some(first) = chars.next() {
                text.extend(first.to_uppercase());
                text.push_str(chars.as_str());
            }
        } else {
            text.push(' ');
            text.push_str(word);
        }
    }
    text.push('.');
    text
}

/// The Message for a valid `/v1/messages` request: a pure function of the body without `stream`.
fn answer(request: &Value) -> Value {
    let canonical = canonical_request(request);
    let mut rng = StdRng::from_seed(*blake3::hash(canonical.as_bytes()).as_bytes());
    let id = id_from(&mut rng, "msg_01", 22);
    let natural: u64 = rng.random_range(12..=30);
    let max_tokens = request["max_tokens"].as_u64().unwrap_or(natural).max(1);
    let truncated = max_tokens < natural;
    let words = natural.min(max_tokens);
    let mut output_tokens = words;
    let mut content = Vec::new();

    if request["thinking"]["type"] == "enabled" {
        let thinking_words = rng.random_range(8..=16);
        output_tokens += thinking_words;
        let thinking = format!("Let me think. {}", sentence(&mut rng, thinking_words));
        let signature = format!("{}=", id_from(&mut rng, "Eq", 62));
        content.push(json!({"type": "thinking", "thinking": thinking, "signature": signature}));
    }
    content.push(json!({"type": "text", "text": sentence(&mut rng, words)}));

    let first_tool = request["tools"].as_array().and_then(|t| t.first());
    let stop_reason = match first_tool {
        _ if truncated => "max_tokens",
        Some(tool) => {
            let name = tool["name"].as_str().unwrap_or("tool");
            let pick = |rng: &mut StdRng| WORDS[rng.random_range(0..WORDS.len())];
            let input = json!({
                "query": pick(&mut rng),
                "options": {
                    "limit": rng.random_range(1..=10),
                    "tags": [pick(&mut rng), pick(&mut rng)],
                    "exact": rng.random_bool(0.5),
                },
            });
            content.push(json!({
                "type": "tool_use",
                "id": id_from(&mut rng, "toolu_01", 22),
                "name": name,
                "input": input,
            }));
            output_tokens += 12;
            "tool_use"
        }
        None => "end_turn",
    };

    json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": request["model"],
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": null,
        "usage": {
            "input_tokens": input_tokens(&canonical),
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": output_tokens,
            "service_tier": "standard",
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_pure_functions_of_the_body_without_stream() {
        let a = json!({"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]});
        let b = json!({"messages": [{"content": "hi", "role": "user"}], "stream": true, "max_tokens": 100, "model": "m"});
        assert_eq!(answer(&a), answer(&b));
        let c = json!({"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "ho"}]});
        assert_ne!(answer(&a)["id"], answer(&c)["id"]);
        let short =
            json!({"model": "m", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]});
        let short = answer(&short);
        assert_eq!(short["stop_reason"], "max_tokens");
        assert_eq!(short["usage"]["output_tokens"], 3);
    }

    #[test]
    fn scripts_prefer_the_model_queue() {
        let shared = Shared::new(MockConfig::default());
        shared.script(None, vec![Scripted::Ok]);
        shared.script(Some("a"), vec![Scripted::SpendLimit]);
        assert_eq!(shared.next_scripted("a"), Some(Scripted::SpendLimit));
        assert_eq!(shared.next_scripted("a"), Some(Scripted::Ok));
        assert_eq!(shared.next_scripted("a"), None);
    }
}
