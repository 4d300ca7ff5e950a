//! The miss path through the public [`Client`], against the in-process fake API over real HTTP:
//! hits and misses, retries and `retry-after`, stale answers, fallback, the breaker, single
//! flight, the retry budget, the concurrency limit, controls and key partitions.
//!
//! Every test asserts how many times the upstream was called (the mock's counters). None bounds
//! how long anything takes on the wall clock: the machine running them may be slow and busy.
//! A wait the client must make is checked from below ("retried no sooner than retry-after
//! said"); a wait it must not make, by what it did instead (attempts, the delays it chose and
//! logged, see [`Retries`]). Freshness is a function of the clock and of an entry's times, so
//! a test that needs an old entry makes it old ([`backdate`]) instead of waiting; the breaker's
//! cooldown is passed on tokio's clock ([`skip`]).

use std::time::{Duration, Instant, SystemTime};

use fallthrough::entry::now_millis;
use fallthrough::error::DiskError;
use fallthrough::mock::{MockConfig, MockServer, Scripted};
use fallthrough::upstream::breaker::BreakerState;
use fallthrough::{
    Client, ClientBuilder, Config, Controls, Error, Outcome, Request, Response, UpstreamError,
    UpstreamErrorKind,
};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

mod support;
use support::backdate;

const MODEL: &str = "claude-sonnet-4-6";

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn body(model: &str, prompt: &str) -> Value {
    json!({
        "model": model,
        "max_tokens": 256,
        "messages": [{"role": "user", "content": prompt}],
    })
}

/// A builder aimed at `mock`, with short retry delays: timing is not the point unless a test
/// says so (and then it sets the delays itself).
fn fast(mock: &MockServer) -> ClientBuilder {
    // No default chains: each test names the fallbacks it means.
    Client::builder()
        .without_fallbacks()
        .upstream(mock.url())
        .credential("sk-test")
        .retries(4, ms(10), ms(100))
}

/// Starts a fake with `config` and a memory-only client on it, adjusted by `adjust`.
async fn start(
    config: MockConfig,
    adjust: impl FnOnce(ClientBuilder) -> ClientBuilder,
) -> (MockServer, Client) {
    let mock = MockServer::start(config).await.expect("mock starts");
    let client = adjust(fast(&mock).memory_only())
        .build()
        .await
        .expect("client builds");
    (mock, client)
}

/// Upstream answers for `model` with `status`.
fn calls(mock: &MockServer, model: &str, status: u16) -> u64 {
    let stats = mock.stats();
    stats
        .by_model
        .get(model)
        .and_then(|by_status| by_status.get(&status).copied())
        .unwrap_or(0)
}

/// Upstream requests for `model`, whatever their answer.
fn attempts_for(mock: &MockServer, model: &str) -> u64 {
    mock.stats()
        .by_model
        .get(model)
        .map_or(0, |by_status| by_status.values().sum())
}

fn upstream_error(result: Result<Response, Error>) -> UpstreamError {
    match result {
        Err(Error::Upstream(e)) => e,
        other => panic!("expected an upstream error, got {other:?}"),
    }
}

fn error_json(e: &UpstreamError) -> Value {
    serde_json::from_slice(&e.body).expect("the error body is JSON")
}

fn overloaded(models: &[&str]) -> MockConfig {
    MockConfig {
        overloaded_models: models.iter().map(|m| m.to_string()).collect(),
        ..MockConfig::default()
    }
}

fn only_if_cached() -> Controls {
    Controls {
        only_if_cached: true,
        ..Controls::default()
    }
}

/// Opens a client on `dir`, waiting while the previous client's last task lets go of it.
async fn reopen(mock: &MockServer, dir: &std::path::Path) -> Client {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        match fast(mock).cache_dir(dir).build().await {
            Ok(client) => return client,
            Err(Error::Disk(DiskError::Locked { .. })) => tokio::time::sleep(ms(20)).await,
            Err(e) => panic!("reopening failed: {e}"),
        }
    }
    panic!("the cache directory stayed locked for 60 s after the client was dropped");
}

/// Moves tokio's clock, which the breaker's cooldown is measured on, forward by `by` at once.
/// The clock is paused only for the jump, while no request is in flight: a paused clock also
/// jumps by itself whenever the runtime waits, for sockets too, and would fire the requests'
/// timeouts early. Needs the current-thread runtime of a plain `#[tokio::test]`.
async fn skip(by: Duration) {
    tokio::time::pause();
    tokio::time::advance(by).await;
    tokio::time::resume();
}

/// The delays of the retries the client decided on, from its "retrying" log events (field
/// `delay_ms`): how long it chose to wait, checked without timing the wait; and the waits of
/// requests for a rescue slot ("waiting for a rescue slot", `wait_ms`), so that a test can
/// see a request is waiting before it moves the clock.
///
/// One subscriber for the whole test binary, installed once, that keeps each thread's events
/// apart: in a plain `#[tokio::test]` every task of the test runs on its thread. (A scoped
/// subscriber per test would race with the other tests' threads over tracing's per-callsite
/// cache of interest, and now and then miss an event.)
struct Retries;

thread_local! {
    static RETRIES: std::cell::RefCell<Vec<Duration>> = const { std::cell::RefCell::new(Vec::new()) };
    static RESCUE_WAITS: std::cell::RefCell<Vec<Duration>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Retries {
    /// Starts recording this thread's retries and rescue waits afresh.
    fn record() -> Retries {
        static INSTALLED: std::sync::Once = std::sync::Once::new();
        INSTALLED.call_once(|| {
            let subscriber = tracing_subscriber::registry().with(RetryLayer);
            tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");
        });
        RETRIES.with(|r| r.borrow_mut().clear());
        RESCUE_WAITS.with(|r| r.borrow_mut().clear());
        Retries
    }

    fn delays(&self) -> Vec<Duration> {
        RETRIES.with(|r| r.borrow().clone())
    }

    fn rescue_waits(&self) -> Vec<Duration> {
        RESCUE_WAITS.with(|r| r.borrow().clone())
    }
}

struct RetryLayer;

impl<S: tracing::Subscriber> Layer<S> for RetryLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        #[derive(Default)]
        struct Fields {
            message: String,
            delay_ms: Option<u64>,
            wait_ms: Option<u64>,
        }
        impl tracing::field::Visit for Fields {
            fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
                match field.name() {
                    "delay_ms" => self.delay_ms = Some(value),
                    "wait_ms" => self.wait_ms = Some(value),
                    _ => {}
                }
            }
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.message = format!("{value:?}");
                }
            }
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        match (fields.message.as_str(), fields.delay_ms, fields.wait_ms) {
            ("retrying", Some(delay), _) => RETRIES.with(|r| r.borrow_mut().push(ms(delay))),
            ("waiting for a rescue slot", _, Some(wait)) => {
                RESCUE_WAITS.with(|r| r.borrow_mut().push(ms(wait)))
            }
            _ => {}
        }
    }
}

#[tokio::test]
async fn miss_then_memory_hit_then_disk_hit_after_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockServer::start(MockConfig::default()).await.unwrap();
    let client = fast(&mock).cache_dir(dir.path()).build().await.unwrap();
    let request = body(MODEL, "Hello");

    let miss = client.send(&request).await.unwrap();
    assert_eq!(miss.outcome, Outcome::Miss);
    assert_eq!(
        (miss.attempts, miss.age, miss.model.as_str()),
        (1, None, MODEL)
    );
    assert_eq!(miss.json().unwrap()["type"], "message");

    let hit = client.send(&request).await.unwrap();
    assert_eq!(hit.outcome, Outcome::Memory);
    assert_eq!(hit.attempts, 0);
    assert!(hit.age.is_some());
    assert_eq!(hit.body, miss.body);
    assert_eq!(hit.key, miss.key);
    assert_eq!(calls(&mock, MODEL, 200), 1);

    client.flush().await.unwrap();
    drop(client);
    let client = reopen(&mock, dir.path()).await;
    let disk = client.send(&request).await.unwrap();
    assert_eq!(disk.outcome, Outcome::Disk);
    assert_eq!((disk.attempts, disk.model.as_str()), (0, MODEL));
    assert_eq!(disk.body, miss.body);
    let promoted = client.send(&request).await.unwrap();
    assert_eq!(promoted.outcome, Outcome::Memory);
    assert_eq!(promoted.body, miss.body);
    assert_eq!(
        mock.stats().requests,
        1,
        "only the first call went upstream"
    );
}

#[tokio::test]
async fn overloaded_twice_then_answered_in_three_attempts() {
    let (mock, client) = start(MockConfig::default(), |b| b).await;
    let overloaded = Scripted::Status {
        status: 529,
        retry_after: None,
    };
    mock.script(
        Some(MODEL),
        vec![overloaded.clone(), overloaded, Scripted::Ok],
    );
    let r = client.send(&body(MODEL, "retry me")).await.unwrap();
    assert_eq!(r.outcome, Outcome::Miss);
    assert_eq!(r.attempts, 3);
    assert_eq!(r.json().unwrap()["type"], "message");
    assert_eq!(calls(&mock, MODEL, 529), 2);
    assert_eq!(calls(&mock, MODEL, 200), 1);
}

#[tokio::test]
async fn a_client_error_passes_through_once_and_is_not_cached() {
    let (mock, client) = start(MockConfig::default(), |b| b).await;
    let request = body(MODEL, "bad?");
    mock.script(
        Some(MODEL),
        vec![Scripted::Status {
            status: 400,
            retry_after: None,
        }],
    );
    let e = upstream_error(client.send(&request).await);
    assert_eq!(
        (e.status, e.kind, e.attempts),
        (400, UpstreamErrorKind::Client, 1)
    );
    let json = error_json(&e);
    assert_eq!(json["type"], "error");
    assert_eq!(json["error"]["type"], "invalid_request_error");
    assert!(
        json["request_id"]
            .as_str()
            .is_some_and(|id| id.starts_with("req_")),
        "the mock's own body is passed on: {json}"
    );
    assert_eq!(calls(&mock, MODEL, 400), 1);

    // Not cached: the same request reaches the upstream again (and now succeeds).
    let r = client.send(&request).await.unwrap();
    assert_eq!((r.outcome, r.attempts), (Outcome::Miss, 1));
    assert_eq!(calls(&mock, MODEL, 200), 1);

    // A request the API itself refuses: same story, and never retried.
    let invalid = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]});
    for round in 1..=2 {
        let e = upstream_error(client.send(&invalid).await);
        assert_eq!((e.status, e.attempts), (400, 1));
        let message = error_json(&e)["error"]["message"].to_string();
        assert!(message.contains("max_tokens"), "{message}");
        assert_eq!(calls(&mock, MODEL, 400), 1 + round);
    }
}

#[tokio::test]
async fn a_spend_limit_is_not_retried_but_a_rate_limit_is() {
    let (mock, client) = start(MockConfig::default(), |b| b).await;
    mock.script(Some(MODEL), vec![Scripted::SpendLimit]);
    let e = upstream_error(client.send(&body(MODEL, "spend")).await);
    assert_eq!(
        (e.status, e.kind, e.attempts),
        (429, UpstreamErrorKind::SpendLimit, 1)
    );
    assert_eq!(
        error_json(&e)["error"]["details"]["error_code"],
        "enforced_spend_limit_reached"
    );
    assert_eq!(mock.stats().requests, 1, "no second attempt");

    // An ordinary 429 (with a retry-after) is retried.
    mock.script(
        Some(MODEL),
        vec![
            Scripted::Status {
                status: 429,
                retry_after: Some("0".into()),
            },
            Scripted::Ok,
        ],
    );
    let r = client.send(&body(MODEL, "rate limited")).await.unwrap();
    assert_eq!(r.attempts, 2);
    assert_eq!(calls(&mock, MODEL, 200), 1);
    assert_eq!(calls(&mock, MODEL, 429), 2);
}

#[tokio::test]
async fn retry_after_of_one_second_is_waited_out() {
    let (mock, client) = start(MockConfig::default(), |b| b).await;
    mock.script(
        Some(MODEL),
        vec![
            Scripted::Status {
                status: 529,
                retry_after: Some("1".into()),
            },
            Scripted::Ok,
        ],
    );
    let retries = Retries::record();
    let started = Instant::now();
    let r = client.send(&body(MODEL, "wait")).await.unwrap();
    let took = started.elapsed();
    assert_eq!(r.attempts, 2);
    assert_eq!(
        retries.delays(),
        [ms(1000)],
        "the wait retry-after asked for"
    );
    assert!(
        took >= ms(900),
        "retried after {took:?}, before retry-after"
    );
    assert_eq!(calls(&mock, MODEL, 529), 1);
    assert_eq!(calls(&mock, MODEL, 200), 1);
}

#[tokio::test]
async fn retry_after_of_an_hour_is_not_waited_out() {
    let (mock, client) = start(MockConfig::default(), |b| b).await;
    mock.script(
        Some(MODEL),
        vec![
            Scripted::Status {
                status: 529,
                retry_after: Some("3600".into()),
            },
            Scripted::Ok,
        ],
    );
    let retries = Retries::record();
    let e = upstream_error(client.send(&body(MODEL, "an hour")).await);
    // Not waited out: the 529 is the answer, after one attempt, with no retry decided on.
    assert_eq!((e.status, e.attempts), (529, 1));
    assert_eq!(retries.delays(), []);
    assert_eq!(e.retry_after, Some(Duration::from_secs(3600)));
    assert_eq!(error_json(&e)["error"]["type"], "overloaded_error");
    assert_eq!(calls(&mock, MODEL, 529), 1);
    assert_eq!(calls(&mock, MODEL, 200), 0);
}

#[tokio::test]
async fn retry_after_as_an_http_date_is_honoured() {
    let (mock, client) = start(MockConfig::default(), |b| b).await;
    // Whole seconds: the date is 1 to 2 s after `started`, which comes first so that the wait
    // for the date can only make `took` longer.
    let started = Instant::now();
    let when = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(2));
    mock.script(
        Some(MODEL),
        vec![
            Scripted::Status {
                status: 529,
                retry_after: Some(when),
            },
            Scripted::Ok,
        ],
    );
    let retries = Retries::record();
    let r = client.send(&body(MODEL, "a date")).await.unwrap();
    let took = started.elapsed();
    assert_eq!(r.attempts, 2);
    let delays = retries.delays();
    assert!(
        delays.len() == 1 && delays[0] <= ms(2000),
        "one wait, until the date: {delays:?}"
    );
    assert!(took >= ms(900), "retried after {took:?}, before the date");
    assert_eq!(calls(&mock, MODEL, 529), 1);
}

#[tokio::test]
async fn a_stale_entry_is_served_at_once_under_overload_then_refreshed() {
    // Default retry delays: the stale answer must not wait through any backoff.
    let (mock, client) = start(MockConfig::default(), |b| {
        b.ttl(ms(200), Duration::from_secs(3600))
            .retries(4, ms(500), Duration::from_secs(30))
    })
    .await;
    let request = body(MODEL, "stale me");
    let first = client.send(&request).await.unwrap();
    assert_eq!(first.outcome, Outcome::Miss);
    let old = backdate(&client, &first.key, ms(400)).await;

    mock.set_config(overloaded(&[MODEL]));
    let retries = Retries::record();
    let stale = client.send(&request).await.unwrap();
    assert_eq!(stale.outcome, Outcome::Stale);
    // At once: one attempt, and no backoff waited before the stale answer.
    assert_eq!(stale.attempts, 1);
    assert_eq!(retries.delays(), []);
    assert_eq!(stale.body, first.body);
    assert_eq!(stale.model, MODEL);
    assert!(stale.age.unwrap() >= ms(400), "age {:?}", stale.age);
    assert!(calls(&mock, MODEL, 529) >= 1);

    // The upstream recovers: the background refresh renews the entry, without a caller.
    // Waited for as the refresh's end, not by polling for a fresh entry: the renewed entry
    // is fresh for only 200 ms, and a poll that came later would never see it.
    mock.set_config(MockConfig::default());
    tokio::time::timeout(Duration::from_secs(60), client.settled())
        .await
        .expect("the background refresh ends");
    let entry = client
        .cache()
        .get(&first.key, now_millis())
        .await
        .unwrap()
        .entry;
    assert!(entry.stored_at > old.stored_at, "a new entry was stored");
    assert_eq!(calls(&mock, MODEL, 200), 2);
}

#[tokio::test]
async fn fallback_answers_and_is_stored_under_its_own_key_only() {
    let (mock, client) = start(overloaded(&["a"]), |b| {
        b.fallback("a", ["b"])
            .before_fallback(0, ms(100))
            .breaker(2, Duration::from_secs(30))
    })
    .await;
    let for_a = body("a", "Which model?");
    let for_b = body("b", "Which model?");

    let r = client.send(&for_a).await.unwrap();
    assert_eq!(r.outcome, Outcome::Miss);
    assert_eq!(r.model, "b");
    assert_eq!(r.json().unwrap()["model"], "b");
    assert_eq!(
        r.attempts, 2,
        "1 attempt at a (no retries before a fallback), 1 at b"
    );
    assert_eq!(calls(&mock, "a", 529), 1);
    assert_eq!(calls(&mock, "b", 200), 1);

    // Stored under b's key ...
    let hit = client.send(&for_b).await.unwrap();
    assert_eq!((hit.outcome, hit.model.as_str()), (Outcome::Memory, "b"));
    assert_eq!(hit.body, r.body);
    // ... and not under a's.
    let key_a = client.key(&Request::json(&for_a)).unwrap();
    assert_eq!(key_a, r.key);
    assert!(client.cache().get(&key_a, now_millis()).await.is_none());
    let not_cached = client
        .execute(Request::json(&for_a).controls(only_if_cached()))
        .await;
    assert!(
        matches!(not_cached, Err(Error::NotCached)),
        "{not_cached:?}"
    );

    // a is asked again (its second failure opens its breaker), then b's fresh entry answers.
    let again = client.send(&for_a).await.unwrap();
    assert_eq!(
        (again.outcome, again.model.as_str(), again.attempts),
        (Outcome::Memory, "b", 1)
    );
    assert_eq!(again.body, r.body);
    assert_eq!(calls(&mock, "a", 529), 2);
    // While a's breaker blocks, a is skipped altogether.
    let skipped = client.send(&for_a).await.unwrap();
    assert_eq!(
        (skipped.outcome, skipped.model.as_str(), skipped.attempts),
        (Outcome::Memory, "b", 0)
    );
    let new = client.send(&body("a", "Another question")).await.unwrap();
    assert_eq!(
        (new.outcome, new.model.as_str(), new.attempts),
        (Outcome::Miss, "b", 1)
    );
    assert_eq!(
        calls(&mock, "a", 529),
        2,
        "no call to a while its breaker blocks"
    );
    assert_eq!(calls(&mock, "b", 200), 2);
}

/// When the primary has no entry and fails, a fallback's stale entry stands in for the
/// fallback as the primary's stands in for the primary: the fallback is tried once, without
/// retries, and its failure serves the entry, stale, as the fallback's answer.
#[tokio::test]
async fn a_fallbacks_stale_entry_stands_in_when_the_fallback_fails_too() {
    let (mock, client) = start(MockConfig::default(), |b| {
        b.fallback("a", ["b"]).before_fallback(0, ms(100))
    })
    .await;
    let stored = client.send(&body("b", "asked of b")).await.unwrap();
    backdate(&client, &stored.key, Duration::from_secs(2 * 24 * 3600)).await;

    mock.set_config(overloaded(&["a", "b"]));
    let r = client.send(&body("a", "asked of b")).await.unwrap();
    assert_eq!(
        (r.outcome, r.model.as_str(), r.attempts),
        (Outcome::Stale, "b", 2)
    );
    assert_eq!(r.body, stored.body);
    assert_eq!(
        (calls(&mock, "a", 529), calls(&mock, "b", 529)),
        (1, 1),
        "b is tried once: its stale entry answers its failure at once"
    );

    // A question b has no entry for gets b's whole retry policy, and the error.
    let e = upstream_error(client.send(&body("a", "new")).await);
    assert_eq!(e.status, 529);
    assert_eq!(calls(&mock, "b", 529), 1 + 5);
}

#[tokio::test]
async fn a_model_with_a_fallback_gets_one_quick_retry_by_default() {
    // Default retry settings (500 ms base delay): the retry before a fallback is capped at
    // 100 ms, so the fallback's answer comes quickly.
    let (mock, client) = start(overloaded(&["a"]), |b| {
        b.fallback("a", ["b"])
            .retries(4, ms(500), Duration::from_secs(30))
    })
    .await;
    let retries = Retries::record();
    let r = client.send(&body("a", "Quickly")).await.unwrap();
    let delays = retries.delays();
    assert!(
        delays.len() == 1 && delays[0] <= ms(100),
        "one retry of a, at most 100 ms: {delays:?}"
    );
    assert_eq!((r.model.as_str(), r.attempts), ("b", 3));
    assert_eq!(calls(&mock, "a", 529), 2);
    assert_eq!(calls(&mock, "b", 200), 1);
}

#[tokio::test]
async fn retries_before_fallback_are_configurable() {
    let (mock, client) = start(overloaded(&["a"]), |b| {
        b.fallback("a", ["b"]).before_fallback(2, ms(20))
    })
    .await;
    let r = client.send(&body("a", "Try harder")).await.unwrap();
    assert_eq!((r.model.as_str(), r.attempts), ("b", 4));
    assert_eq!(calls(&mock, "a", 529), 3);
    assert_eq!(calls(&mock, "b", 200), 1);
}

#[tokio::test]
async fn everything_overloaded_gives_the_upstreams_529_within_the_deadline() {
    let (mock, client) = start(overloaded(&["a", "b"]), |b| {
        b.fallback("a", ["b"])
            .retries(4, ms(500), Duration::from_secs(30))
            .deadline(Duration::from_secs(2))
    })
    .await;
    let retries = Retries::record();
    let e = upstream_error(client.send(&body("a", "anyone?")).await);
    // Only retries whose wait ends before the deadline were made.
    let waited: Duration = retries.delays().iter().sum();
    assert!(
        waited < Duration::from_secs(2),
        "waited {waited:?} with a 2 s deadline"
    );
    assert_eq!((e.status, e.kind), (529, UpstreamErrorKind::Overloaded));
    assert_eq!(e.model, "b", "the last error is the last model's");
    let json = error_json(&e);
    assert_eq!(json["type"], "error");
    assert_eq!(json["error"]["type"], "overloaded_error");
    assert!(
        json["request_id"].is_string(),
        "the upstream's body: {json}"
    );
    assert!(e.retry_after.unwrap() >= Duration::from_secs(1));
    assert!(calls(&mock, "a", 529) >= 1);
    assert!(calls(&mock, "b", 529) >= 1);
    assert_eq!(
        e.attempts as u64,
        attempts_for(&mock, "a") + attempts_for(&mock, "b")
    );
}

#[tokio::test]
async fn the_breaker_stops_calls_during_its_cooldown_then_probes() {
    // Long, and crossed only by `skip`: the real time the test takes never ends it.
    let cooldown = Duration::from_secs(600);
    // Rescues are the next test's: here a held model is held.
    let (mock, client) = start(overloaded(&[MODEL]), |b| {
        b.breaker(3, cooldown)
            .breaker_rescue_interval(Duration::ZERO)
    })
    .await;

    let e = upstream_error(client.send(&body(MODEL, "0")).await);
    assert_eq!((e.status, e.attempts), (529, 3));
    assert_eq!(calls(&mock, MODEL, 529), 3, "the third failure opened it");
    assert_eq!(
        client.breaker_states(),
        [(MODEL.to_owned(), BreakerState::Blocking)]
    );

    let retries = Retries::record();
    for n in 1..=5 {
        let e = upstream_error(client.send(&body(MODEL, &n.to_string())).await);
        assert_eq!(
            (e.status, e.kind, e.attempts),
            (529, UpstreamErrorKind::Overloaded, 0)
        );
        assert_eq!(error_json(&e)["error"]["type"], "overloaded_error");
        let wait = e.retry_after.unwrap();
        assert!(
            wait >= Duration::from_secs(1) && wait <= cooldown,
            "{wait:?}"
        );
    }
    assert_eq!(retries.delays(), [], "blocked requests fail at once");
    assert_eq!(
        calls(&mock, MODEL, 529),
        3,
        "no upstream calls while blocking"
    );

    // After the cooldown one probe goes through; it fails, so the breaker blocks again.
    skip(cooldown).await;
    let e = upstream_error(client.send(&body(MODEL, "probe")).await);
    assert_eq!((e.status, e.attempts), (529, 1));
    assert_eq!(calls(&mock, MODEL, 529), 4);
    upstream_error(client.send(&body(MODEL, "blocked")).await);
    assert_eq!(calls(&mock, MODEL, 529), 4);

    // Healthy again: after the next cooldown the probe succeeds and requests flow.
    mock.set_config(MockConfig::default());
    skip(cooldown).await;
    let r = client.send(&body(MODEL, "probe 2")).await.unwrap();
    assert_eq!((r.outcome, r.attempts), (Outcome::Miss, 1));
    assert_eq!(
        client.breaker_states(),
        [(MODEL.to_owned(), BreakerState::Passing)]
    );
    for n in 0..3 {
        let r = client
            .send(&body(MODEL, &format!("flow {n}")))
            .await
            .unwrap();
        assert_eq!(r.attempts, 1);
    }
    assert_eq!(calls(&mock, MODEL, 200), 4);
}

/// After a total outage (both models of the chain held by their breakers), a request with
/// nowhere else to go may still try a held model once a rescue interval: the first new question
/// after the recovery is answered within one interval, not after the cooldown, and its answer
/// closes the breaker. Timed on tokio's clock ([`skip`]): the interval and the cooldown are
/// long (10 s, 10 min) and only `skip` moves the clock past them.
#[tokio::test]
async fn a_recovery_is_noticed_within_one_rescue_interval_not_after_the_cooldown() {
    let interval = Duration::from_secs(10);
    let (mock, client) = start(overloaded(&["a", "b"]), |b| {
        b.fallback("a", ["b"])
            .breaker(2, Duration::from_secs(600))
            .breaker_rescue_interval(interval)
    })
    .await;
    let e = upstream_error(client.send(&body("a", "the outage begins")).await);
    assert_eq!(e.status, 529);
    assert_eq!(
        client.breaker_states(),
        [
            ("a".to_owned(), BreakerState::Blocking),
            ("b".to_owned(), BreakerState::Blocking)
        ]
    );
    let before = (attempts_for(&mock, "a"), attempts_for(&mock, "b"));

    // Held everywhere: one rescue per model and interval, the primary's first.
    let first = upstream_error(client.send(&body("a", "rescue of a")).await);
    let second = upstream_error(client.send(&body("a", "rescue of b")).await);
    assert_eq!((first.attempts, second.attempts), (1, 1));
    assert_eq!((first.model.as_str(), second.model.as_str()), ("a", "b"));
    assert_eq!(
        (attempts_for(&mock, "a"), attempts_for(&mock, "b")),
        (before.0 + 1, before.1 + 1),
        "a failed rescue is one call, without retries"
    );

    // Both slots taken: the next request waits for the first to open (a's), not for the
    // cooldown; it goes when the clock gets there.
    let waits = Retries::record();
    let waiting = client.clone();
    let third = tokio::spawn(async move { waiting.send(&body("a", "waits for a slot")).await });
    support::eventually("the third request waits for a rescue slot", || {
        !waits.rescue_waits().is_empty()
    })
    .await;
    let wait = waits.rescue_waits()[0];
    assert!(wait > Duration::ZERO && wait <= interval, "{wait:?}");
    skip(interval).await;
    let third = upstream_error(third.await.unwrap());
    assert_eq!((third.attempts, third.model.as_str()), (1, "a"));
    assert_eq!(third.status, 529);

    // The upstream recovers. b's slot is open again (a's was just used); the rescue's head,
    // streamed, closes b's breaker as a probe's does, 10 s into a 10 min cooldown.
    mock.set_config(MockConfig::default());
    let r = client
        .stream(Request::json(&body("a", "the first new question")))
        .await
        .unwrap();
    assert_eq!(
        (r.outcome, r.model.as_str(), r.attempts),
        (Outcome::Miss, "b", 1)
    );
    assert_eq!(
        client.breaker_states(),
        [
            ("a".to_owned(), BreakerState::Blocking),
            ("b".to_owned(), BreakerState::Passing)
        ],
        "the rescue closed b's breaker long before its cooldown would have"
    );
    let events: Vec<_> = r.events.collect().await;
    assert!(events.iter().all(|e| e.is_ok()));
    let r = client.send(&body("a", "and the next")).await.unwrap();
    assert_eq!((r.model.as_str(), r.attempts), ("b", 1));
    assert_eq!(calls(&mock, "b", 200), 2);
    assert_eq!(
        calls(&mock, "a", 200),
        0,
        "a is not a rescue's while b answers"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_identical_misses_share_one_upstream_call() {
    let latency = MockConfig {
        latency_ms: 500,
        ..MockConfig::default()
    };
    let (mock, client) = start(latency, |b| b).await;

    let together = |request: Value| {
        let tasks: Vec<_> = (0..32)
            .map(|_| {
                let client = client.clone();
                let request = request.clone();
                tokio::spawn(async move { client.send(&request).await })
            })
            .collect();
        futures_util::future::join_all(tasks)
    };

    let results = together(body(MODEL, "everyone at once")).await;
    let first = results[0].as_ref().unwrap().as_ref().unwrap().body.clone();
    for r in results {
        let r = r.unwrap().expect("every caller gets the answer");
        assert_eq!(r.body, first);
        assert_eq!(r.outcome, Outcome::Miss);
    }
    assert_eq!(mock.stats().requests, 1);

    // When the one call fails, every caller gets its error.
    mock.script(
        Some(MODEL),
        vec![Scripted::Status {
            status: 400,
            retry_after: None,
        }],
    );
    for r in together(body(MODEL, "everyone fails")).await {
        let e = upstream_error(r.unwrap());
        assert_eq!(e.status, 400);
    }
    assert_eq!(calls(&mock, MODEL, 400), 1);
    assert_eq!(mock.stats().requests, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_stay_within_the_budget_when_everything_fails() {
    let failing = MockConfig {
        overload_rate: 1.0,
        ..MockConfig::default()
    };
    // A breaker that never opens, so that only the budget limits retries.
    let (mock, client) = start(failing, |b| {
        b.retries(4, ms(1), ms(5)).breaker(1_000_000, ms(10))
    })
    .await;
    let requests = 100u64;
    let results: Vec<_> = futures_util::stream::iter(0..requests)
        .map(|n| {
            let client = client.clone();
            async move { client.send(&body(MODEL, &format!("storm {n}"))).await }
        })
        .buffer_unordered(10)
        .collect()
        .await;
    for r in results {
        assert_eq!(upstream_error(r).status, 529);
    }
    let attempts = attempts_for(&mock, MODEL);
    let bound = requests * 12 / 10 + 10; // 20% of first attempts, plus the floor
    assert!(
        attempts <= bound + 2,
        "{attempts} attempts for {requests} requests"
    );
    assert!(attempts > requests, "some retries were made: {attempts}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_concurrency_limit_queues_upstream_requests() {
    let latency = MockConfig {
        latency_ms: 300,
        ..MockConfig::default()
    };
    let (mock, client) = start(latency, |b| b.max_concurrency(2)).await;
    let started = Instant::now();
    let tasks: Vec<_> = (0..6)
        .map(|n| {
            let client = client.clone();
            tokio::spawn(async move { client.send(&body(MODEL, &format!("q{n}"))).await })
        })
        .collect();
    for r in futures_util::future::join_all(tasks).await {
        assert_eq!(r.unwrap().unwrap().outcome, Outcome::Miss);
    }
    let took = started.elapsed();
    assert!(
        took >= ms(850),
        "6 requests, 2 at a time, 300 ms each: {took:?}"
    );
    assert_eq!(
        mock.stats().max_in_flight,
        2,
        "never more than the limit upstream"
    );
    assert_eq!(calls(&mock, MODEL, 200), 6);
}

#[tokio::test]
async fn controls_only_if_cached_no_store_no_cache_max_age() {
    let (mock, client) = start(MockConfig::default(), |b| b).await;
    let request = body(MODEL, "controls");
    let with = |controls: Controls| client.execute(Request::json(&request).controls(controls));

    let r = with(only_if_cached()).await;
    assert!(matches!(r, Err(Error::NotCached)), "{r:?}");
    assert_eq!(
        mock.stats().requests,
        0,
        "only-if-cached never calls upstream"
    );

    let no_store = Controls {
        no_store: true,
        ..Controls::default()
    };
    assert_eq!(with(no_store).await.unwrap().outcome, Outcome::Miss);
    assert!(matches!(
        with(only_if_cached()).await,
        Err(Error::NotCached)
    ));
    assert_eq!(mock.stats().requests, 1);

    let stored = with(Controls::default()).await.unwrap();
    let key = stored.key;
    assert_eq!(stored.outcome, Outcome::Miss);
    assert_eq!(
        with(only_if_cached()).await.unwrap().outcome,
        Outcome::Memory
    );
    assert_eq!(mock.stats().requests, 2);

    let no_cache = Controls {
        no_cache: true,
        ..Controls::default()
    };
    let r = with(no_cache).await.unwrap();
    assert_eq!((r.outcome, r.attempts), (Outcome::Bypass, 1));
    assert_eq!(mock.stats().requests, 3, "no-cache fetches again");
    assert_eq!(
        with(Controls::default()).await.unwrap().outcome,
        Outcome::Memory
    );

    let old = backdate(&client, &key, ms(300)).await;
    let young = |age| Controls {
        max_age: Some(age),
        ..Controls::default()
    };
    assert_eq!(
        with(young(Duration::from_secs(3600)))
            .await
            .unwrap()
            .outcome,
        Outcome::Memory
    );
    assert_eq!(mock.stats().requests, 3);
    let r = with(young(ms(100))).await.unwrap();
    assert_eq!(
        (r.outcome, r.attempts),
        (Outcome::Miss, 1),
        "an older entry is not fresh"
    );
    assert_eq!(mock.stats().requests, 4);
    // The re-fetch renewed the entry: now it is young enough.
    let r = with(young(Duration::from_secs(60))).await.unwrap();
    assert_eq!(r.outcome, Outcome::Memory);
    let entry = client.cache().get(&key, now_millis()).await.unwrap().entry;
    assert!(
        entry.stored_at > old.stored_at,
        "the re-fetch stored a new entry"
    );
}

/// A credential that is not valid header text is keyed by its bytes: two such never share a
/// partition, nor one with the client's own credential.
#[tokio::test]
async fn credentials_that_are_not_text_each_have_a_partition() {
    let (_mock, client) = start(MockConfig::default(), |b| b).await;
    let odd = |bytes: &[u8]| {
        let mut r = Request::json(&body(MODEL, "odd"));
        let value = http::HeaderValue::from_bytes(bytes).unwrap();
        r.headers.insert("x-api-key", value);
        client.key(&r).unwrap()
    };
    let own = client.key(&Request::json(&body(MODEL, "odd"))).unwrap();
    let (a, b) = (odd(b"sk-\xff"), odd(b"sk-\xfe"));
    assert_ne!(a, b);
    assert_ne!(a, own);
    assert_ne!(b, own);
    assert_eq!(a, odd(b"sk-\xff"), "the same bytes, the same partition");
}

#[tokio::test]
async fn credentials_and_namespaces_partition_the_cache() {
    let (mock, client) = start(MockConfig::default(), |b| b).await;
    let request = body(MODEL, "partitioned");

    assert_eq!(client.send(&request).await.unwrap().outcome, Outcome::Miss);
    assert_eq!(mock.stats().last_api_key.as_deref(), Some("sk-test"));
    let other_key = Request::json(&request).header("x-api-key", "sk-other");
    let r = client.execute(other_key.clone()).await.unwrap();
    assert_eq!(
        r.outcome,
        Outcome::Miss,
        "another API key has its own entries"
    );
    assert_eq!(mock.stats().last_api_key.as_deref(), Some("sk-other"));
    assert_eq!(
        client.execute(other_key).await.unwrap().outcome,
        Outcome::Memory
    );

    let mut namespaced = Request::json(&request);
    namespaced.namespace = Some("team-a".into());
    let r = client.execute(namespaced.clone()).await.unwrap();
    assert_eq!(
        r.outcome,
        Outcome::Miss,
        "another namespace has its own entries"
    );
    assert_eq!(
        client.execute(namespaced).await.unwrap().outcome,
        Outcome::Memory
    );
    assert_eq!(calls(&mock, MODEL, 200), 3);

    // Shared across credentials: one entry for both keys.
    let config = Config {
        shared_across_credentials: true,
        ..Config::default()
    };
    let shared = ClientBuilder::from_config(config)
        .upstream(mock.url())
        .credential("sk-test")
        .memory_only()
        .build()
        .await
        .unwrap();
    mock.reset_stats();
    let other = body(MODEL, "shared");
    assert_eq!(shared.send(&other).await.unwrap().outcome, Outcome::Miss);
    let r = shared
        .execute(Request::json(&other).header("x-api-key", "sk-other"))
        .await
        .unwrap();
    assert_eq!(r.outcome, Outcome::Memory);
    assert_eq!(mock.stats().requests, 1);
}

#[tokio::test]
async fn a_501_is_not_retried() {
    let (mock, client) = start(MockConfig::default(), |b| b).await;
    mock.script(
        Some(MODEL),
        vec![Scripted::Status {
            status: 501,
            retry_after: None,
        }],
    );
    let e = upstream_error(client.send(&body(MODEL, "not implemented")).await);
    assert_eq!((e.status, e.attempts), (501, 1));
    assert_eq!(attempts_for(&mock, MODEL), 1);
}

#[tokio::test]
async fn stream_asks_upstream_for_a_stream_and_stores_the_message() {
    let (mock, client) = start(MockConfig::default(), |b| b).await;
    let plain = body(MODEL, "stream me, though I did not say so");
    let streamed = client.stream(Request::json(&plain)).await.unwrap();
    assert_eq!(streamed.outcome, Outcome::Miss);
    let mut bytes = Vec::new();
    let mut events = streamed.events;
    while let Some(chunk) = events.next().await {
        bytes.extend_from_slice(&chunk.unwrap());
    }
    let message = fallthrough::sse::assemble(&bytes).expect("a valid event stream");
    // Stored when the stream ended: the plain request is now a hit with the same Message.
    let hit = client.send(&plain).await.unwrap();
    assert_eq!(hit.outcome, Outcome::Memory);
    assert_eq!(hit.json().unwrap(), message);
    assert_eq!(attempts_for(&mock, MODEL), 1);
}

#[tokio::test]
async fn an_absurd_retry_after_is_not_waited_and_does_not_wedge_the_key() {
    let (mock, client) = start(MockConfig::default(), |b| b).await;
    mock.script(
        Some(MODEL),
        vec![Scripted::Status {
            status: 529,
            retry_after: Some("99999999999999999999999".into()),
        }],
    );
    let question = body(MODEL, "absurd");
    let retries = Retries::record();
    let e = upstream_error(client.send(&question).await);
    assert_eq!((e.status, e.attempts), (529, 1));
    assert_eq!(retries.delays(), [], "not waited");
    // The key is not left joined to a dead flight: the next call goes upstream and answers.
    let r = client.send(&question).await.unwrap();
    assert_eq!(r.outcome, Outcome::Miss);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_identical_streamed_misses_share_one_upstream_call() {
    let (mock, client) = start(
        MockConfig {
            latency_ms: 200,
            ..Default::default()
        },
        |b| b,
    )
    .await;
    let mut question = body(MODEL, "Stream to all of us");
    question["stream"] = json!(true);
    let calls: Vec<_> = (0..16)
        .map(|i| {
            let client = client.clone();
            let request = if i % 4 == 0 {
                // Some plain callers join the streamed flight too.
                Request::json(&body(MODEL, "Stream to all of us"))
            } else {
                Request::json(&question)
            };
            tokio::spawn(async move {
                match client.call(request).await.unwrap() {
                    fallthrough::client::Reply::Plain(r) => r.json().unwrap(),
                    fallthrough::client::Reply::Stream(s) => {
                        let mut bytes = Vec::new();
                        let mut events = s.events;
                        while let Some(chunk) = events.next().await {
                            bytes.extend_from_slice(&chunk.unwrap());
                        }
                        fallthrough::sse::assemble(&bytes).unwrap()
                    }
                }
            })
        })
        .collect();
    let mut messages = Vec::new();
    for call in calls {
        messages.push(call.await.unwrap());
    }
    assert!(messages.iter().all(|m| *m == messages[0]));
    assert_eq!(
        attempts_for(&mock, MODEL),
        1,
        "one upstream call for all 16"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flights_are_shared_only_between_requests_with_the_same_controls() {
    let (mock, client) = start(
        MockConfig {
            latency_ms: 200,
            overloaded_models: vec!["a".into()],
            ..Default::default()
        },
        |b| {
            b.fallback("a", ["b"])
                .before_fallback(0, ms(10))
                .retries(0, ms(10), ms(10))
        },
    )
    .await;
    let question = body("a", "Who answers?");
    let own_model_only = Controls {
        no_cache: true,
        no_fallback: true,
        ..Controls::default()
    };
    let spawn = |controls: Controls| {
        let client = client.clone();
        let request = Request::json(&question).controls(controls);
        tokio::spawn(async move { client.execute(request).await })
    };
    let plain: Vec<_> = (0..4).map(|_| spawn(Controls::default())).collect();
    let strict: Vec<_> = (0..4).map(|_| spawn(own_model_only)).collect();
    for call in plain {
        assert_eq!(
            call.await.unwrap().unwrap().model,
            "b",
            "the fallback answers"
        );
    }
    for call in strict {
        let e = upstream_error(call.await.unwrap());
        assert_eq!(
            (e.status, e.model.as_str()),
            (529, "a"),
            "no fallback when asked"
        );
    }
    // One shared call per kind of request: a twice (once each), b once.
    assert_eq!(calls(&mock, "a", 529), 2);
    assert_eq!(calls(&mock, "b", 200), 1);
}

#[tokio::test]
async fn a_streamed_request_answered_from_the_fallbacks_fresh_entry_is_a_hit_not_stale() {
    let (_mock, client) = start(overloaded(&["a"]), |b| {
        b.fallback("a", ["b"]).before_fallback(0, ms(10))
    })
    .await;
    // b's answer to the question is cached, fresh.
    client.send(&body("b", "Cached for b")).await.unwrap();
    let mut question = body("a", "Cached for b");
    question["stream"] = json!(true);
    let r = client.stream(Request::json(&question)).await.unwrap();
    assert_eq!(
        (r.outcome, r.model.as_str(), r.attempts),
        (Outcome::Memory, "b", 1)
    );
}

/// Regression: a flight's answer used to be sent before the flight left the map, so a request
/// made right after an identical one could be handed that earlier answer with no upstream call
/// of its own (a `no-cache` request included): the engine bench timed 353,385 "misses" that
/// made 21,888 upstream calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_to_back_no_cache_requests_each_reach_the_upstream() {
    let (mock, client) = start(MockConfig::default(), |b| b).await;
    let no_cache = Controls {
        no_cache: true,
        ..Controls::default()
    };
    const N: u64 = 300;
    for _ in 0..N {
        let r = client
            .execute(Request::json(&body(MODEL, "again")).controls(no_cache))
            .await
            .expect("answered");
        assert_eq!(r.outcome, Outcome::Bypass);
        assert_eq!(r.attempts, 1);
    }
    assert_eq!(calls(&mock, MODEL, 200), N, "one upstream call per request");
    // The streamed path ends its flights the same way.
    for _ in 0..N {
        let r = client
            .stream(Request::json(&body(MODEL, "again")).controls(no_cache))
            .await
            .expect("answered");
        assert_eq!(r.outcome, Outcome::Bypass);
        let events: Vec<_> = r.events.collect().await;
        assert!(!events.is_empty());
    }
    assert_eq!(
        calls(&mock, MODEL, 200),
        2 * N,
        "one upstream call per request"
    );
}

/// Regression: a request whose look-up missed just before an identical flight stored its answer
/// and left the map used to lead a second upstream call (the engine bench counted 28 extra
/// calls in 24,295 rounds of 32). A lead now checks the cache before going upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_misses_racing_a_finished_flight_make_no_second_call() {
    let (mock, client) = start(MockConfig::default(), |b| b).await;
    const ROUNDS: u64 = 3000;
    for round in 0..ROUNDS {
        let request = body(MODEL, &format!("round {round}"));
        let calls: Vec<_> = (0..8)
            .map(|_| {
                let client = client.clone();
                let request = request.clone();
                tokio::spawn(async move { client.execute(Request::json(&request)).await })
            })
            .collect();
        for call in calls {
            call.await.expect("task").expect("answered");
        }
    }
    assert_eq!(
        calls(&mock, MODEL, 200),
        ROUNDS,
        "one upstream call a round"
    );
}

/// Failures that arrive mid-stream (an `error` event after a 200's head) count against the
/// model's breaker like a 529 before the head: an overload of streamed traffic opens it.
#[tokio::test]
async fn mid_stream_errors_open_the_breaker() {
    // No rescues: the held request below must not be let through as one.
    let (mock, client) = start(MockConfig::default(), |b| {
        b.breaker(3, Duration::from_secs(30))
            .breaker_rescue_interval(Duration::ZERO)
    })
    .await;
    mock.script(
        Some(MODEL),
        vec![Scripted::StreamError { after_events: 2 }; 3],
    );
    for n in 0..3 {
        let r = client
            .stream(Request::json(&body(MODEL, &format!("streamed {n}"))))
            .await
            .expect("the head is a 200");
        let events: Vec<_> = r.events.collect().await;
        let bytes: Vec<u8> = events
            .into_iter()
            .flat_map(|e| e.unwrap().to_vec())
            .collect();
        assert!(String::from_utf8_lossy(&bytes).contains("overloaded_error"));
    }
    // The pump tells the breaker once the stream has ended.
    support::eventually("the breaker to open", || {
        client.breaker_states() == [(MODEL.to_owned(), BreakerState::Blocking)]
    })
    .await;
    let before = attempts_for(&mock, MODEL);
    let held = client.stream(Request::json(&body(MODEL, "held"))).await;
    assert!(held.is_err(), "a held model is not called");
    assert_eq!(attempts_for(&mock, MODEL), before);
}

#[tokio::test]
async fn a_deadline_spent_on_the_primary_charges_no_fallback() {
    // The primary answers in a minute; the request's deadline is 1 s.
    let slow = MockConfig {
        latency_ms: 60_000,
        ..MockConfig::default()
    };
    let (mock, client) = start(slow, |b| {
        b.fallback("a", ["b"])
            .deadline(Duration::from_secs(1))
            .breaker(1, Duration::from_secs(600))
    })
    .await;
    let e = upstream_error(client.send(&body("a", "slow")).await);
    assert_eq!(e.kind, UpstreamErrorKind::Timeout);
    assert_eq!(e.model, "a", "the fallback was not tried past the deadline");
    assert_eq!(attempts_for(&mock, "b"), 0);
    assert!(
        !client
            .breaker_states()
            .iter()
            .any(|(model, _)| model == "b"),
        "the fallback's breaker was charged: {:?}",
        client.breaker_states()
    );
}

#[tokio::test]
async fn a_cancelled_streamed_probe_lets_the_next_request_probe() {
    let cooldown = Duration::from_secs(600);
    let (mock, client) = start(overloaded(&[MODEL]), |b| {
        b.breaker(1, cooldown)
            .breaker_rescue_interval(Duration::ZERO)
            .retries(0, ms(1), ms(1))
    })
    .await;
    upstream_error(client.send(&body(MODEL, "opens it")).await);
    assert_eq!(
        client.breaker_states(),
        [(MODEL.to_owned(), BreakerState::Blocking)]
    );
    skip(cooldown).await;

    // The probe is a stream whose head takes a minute; its caller goes away before it comes.
    mock.set_config(MockConfig {
        latency_ms: 60_000,
        ..MockConfig::default()
    });
    let probe = tokio::spawn({
        let client = client.clone();
        async move {
            let question = Request::json(&body(MODEL, "the probe, abandoned"));
            client.stream(question).await.map(drop)
        }
    });
    support::eventually("the request is let through as the probe", || {
        client.breaker_states() == [(MODEL.to_owned(), BreakerState::Probing)]
    })
    .await;
    probe.abort();
    assert!(probe.await.unwrap_err().is_cancelled());

    // Nothing was learnt: the next request probes at once, not after another cooldown.
    mock.set_config(MockConfig::default());
    let r = client.send(&body(MODEL, "the next probe")).await.unwrap();
    assert_eq!((r.outcome, r.attempts), (Outcome::Miss, 1));
    assert_eq!(
        client.breaker_states(),
        [(MODEL.to_owned(), BreakerState::Passing)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joiners_of_a_streamed_lead_that_ends_without_an_answer_fetch_together() {
    // Heads take 500 ms: time for plain requests to join the streamed lead's flight.
    let slow = MockConfig {
        latency_ms: 500,
        ..MockConfig::default()
    };
    let (mock, client) = start(slow, |b| b).await;
    let question = body(MODEL, "asked by a stream, then by four");
    let lead = tokio::spawn({
        let client = client.clone();
        let mut streamed = question.clone();
        streamed["stream"] = json!(true);
        async move { client.stream(Request::json(&streamed)).await.map(drop) }
    });
    // The lead's attempt holds an upstream slot: its flight is open to joiners.
    support::eventually_async("the streamed lead's attempt is in flight", || async {
        client
            .render_metrics()
            .await
            .contains("fallthrough_upstream_in_flight 1")
    })
    .await;
    let joiners: Vec<_> = (0..4)
        .map(|_| {
            let (client, question) = (client.clone(), question.clone());
            tokio::spawn(async move { client.send(&question).await })
        })
        .collect();
    tokio::task::yield_now().await;
    // The stream's caller goes away before the first byte: the flight ends without a word.
    lead.abort();
    for joiner in joiners {
        let r = joiner.await.unwrap().expect("every joiner is answered");
        assert_eq!(r.outcome, Outcome::Miss);
    }
    client.settled().await;
    // The abandoned stream's call, perhaps, and one for the four: not one each.
    let answered = calls(&mock, MODEL, 200);
    assert!(answered <= 2, "{answered} upstream calls");
}
