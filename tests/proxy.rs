//! The proxy over real HTTP, in front of the in-process mock: headers, controls, streaming,
//! errors in the API's shape, pass-through, health, metrics, shutdown.

use std::sync::Arc;
use std::time::Duration;

use fallthrough::mock::{MockConfig, MockServer, Scripted};
use fallthrough::Config;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::Notify;

mod support;
use support::proxy::*;
use support::{backdate, eventually};

#[tokio::test]
async fn miss_then_hit_with_the_cache_headers() {
    let proxy = Proxy::start().await;
    let body = request("hello");
    let first = proxy.post("/v1/messages", &body).send().await.unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(header(&first, "x-fallthrough-cache"), "miss");
    assert_eq!(header(&first, "x-fallthrough-attempts"), "1");
    assert_eq!(header(&first, "x-fallthrough-model"), MODEL);
    assert!(first.headers().get("age").is_none());
    let key = header(&first, "x-fallthrough-key").to_owned();
    assert_eq!(key.len(), 64);
    let first_body = first.bytes().await.unwrap();

    let second = proxy.post("/v1/messages", &body).send().await.unwrap();
    assert_eq!(header(&second, "x-fallthrough-cache"), "memory");
    assert_eq!(header(&second, "x-fallthrough-attempts"), "0");
    assert_eq!(header(&second, "x-fallthrough-key"), key);
    assert!(header(&second, "age").parse::<u64>().is_ok());
    assert_eq!(second.bytes().await.unwrap(), first_body);
    assert_eq!(proxy.calls(MODEL), 1);
}

#[tokio::test]
async fn count_tokens_is_cached_and_other_paths_pass_through() {
    let proxy = Proxy::start().await;
    let body = request("count me");
    for expected in ["miss", "memory"] {
        let r = proxy
            .post("/v1/messages/count_tokens", &body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-fallthrough-cache"), expected);
        let v: Value = r.json().await.unwrap();
        assert!(v["input_tokens"].as_u64().unwrap() > 0);
    }
    for _ in 0..2 {
        let r = proxy
            .http
            .get(format!("{}/v1/models", proxy.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-fallthrough-cache"), "bypass");
        let v: Value = r.json().await.unwrap();
        assert!(v["data"].as_array().is_some_and(|d| !d.is_empty()));
    }
    assert_eq!(
        proxy.mock.stats().by_path["/v1/models"],
        2,
        "passed through each time"
    );
    // Unknown paths get the upstream's own 404.
    let r = proxy
        .http
        .get(format!("{}/v1/nothing", proxy.url))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(r).await, (404, "not_found_error".into()));
}

/// Pass-through is no way round the engine's limits: the concurrency limit holds it, a model's
/// open breaker holds a passed-through request that names the model, and its attempts and
/// requests are counted.
#[tokio::test]
async fn pass_through_goes_through_the_engines_limits() {
    let slow = MockConfig {
        latency_ms: 200,
        ..MockConfig::default()
    };
    let mock = MockServer::start(slow).await.unwrap();
    let proxy = Proxy::start_on(mock, |b| {
        b.max_concurrency(1)
            .breaker(1, Duration::from_secs(600))
            .retries(0, Duration::from_millis(10), Duration::from_millis(10))
    })
    .await;
    let gets: Vec<_> = (0..3)
        .map(|_| proxy.http.get(format!("{}/v1/models", proxy.url)).send())
        .collect();
    for r in futures_util::future::join_all(gets).await {
        assert_eq!(r.unwrap().status(), 200);
    }
    assert_eq!(
        proxy.mock.stats().max_in_flight,
        1,
        "one at a time upstream"
    );

    proxy.mock.script(
        Some(MODEL),
        vec![Scripted::Status {
            status: 529,
            retry_after: None,
        }],
    );
    let r = proxy
        .post("/v1/messages", &request("open it"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 529);
    let held = proxy
        .http
        .post(format!("{}/v1/messages/batches", proxy.url))
        .json(&json!({"model": MODEL, "requests": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(held.status(), 529, "the open breaker holds it");
    assert!(
        !proxy
            .mock
            .stats()
            .by_path
            .contains_key("/v1/messages/batches"),
        "no upstream call while the breaker is open"
    );

    let text = proxy.metrics().await;
    for needle in [
        "fallthrough_upstream_attempts_total{model=\"none\",status=\"200\"} 3",
        "fallthrough_requests_total{outcome=\"bypass\"} 3",
    ] {
        assert!(text.contains(needle), "{needle} missing from\n{text}");
    }
}

#[tokio::test]
async fn credentials_are_forwarded_and_never_stored() {
    let proxy = Proxy::start().await;
    let r = proxy
        .post("/v1/messages", &request("key check"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        proxy.mock.stats().last_api_key.as_deref(),
        Some("sk-ant-caller-key")
    );
    // No credential from the caller: the proxy's own (ANTHROPIC_API_KEY) is used.
    let r = proxy
        .http
        .post(format!("{}/v1/messages", proxy.url))
        .json(&request("no key"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        proxy.mock.stats().last_api_key.as_deref(),
        Some("sk-ant-proxy-default-key")
    );
    // Two keys never share an entry.
    let other = proxy
        .http
        .post(format!("{}/v1/messages", proxy.url))
        .header("x-api-key", "sk-ant-someone-else")
        .json(&request("key check"))
        .send()
        .await
        .unwrap();
    assert_eq!(header(&other, "x-fallthrough-cache"), "miss");
    let dir = proxy.shutdown().await;
    for file in walk(dir.path()) {
        let bytes = std::fs::read(&file).unwrap();
        for secret in [
            "sk-ant-caller-key",
            "sk-ant-proxy-default-key",
            "sk-ant-someone-else",
        ] {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{secret} found in {}",
                file.display()
            );
        }
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[tokio::test]
async fn cache_control_and_namespace() {
    let proxy = Proxy::start().await;
    let body = request("controls");
    // The request with one extra header; the answer's x-fallthrough-cache.
    let ask = |name: &'static str, value: &'static str| {
        let request = proxy.post("/v1/messages", &body).header(name, value);
        async move {
            let r = request.send().await.unwrap();
            header(&r, "x-fallthrough-cache").to_owned()
        }
    };
    // only-if-cached on a miss: 504 in the API's shape, upstream untouched.
    let r = proxy.cached(&body).await;
    assert_eq!(error_of(r).await.0, 504);
    assert_eq!(proxy.calls(MODEL), 0);
    // no-store: answered, not kept.
    assert_eq!(ask("cache-control", "no-store").await, "miss");
    assert_eq!(ask("x-unrelated", "1").await, "miss", "no-store stored");
    assert_eq!(ask("cache-control", "only-if-cached").await, "memory");
    // no-cache: skips the lookup, fetches, stores.
    assert_eq!(ask("cache-control", "no-cache").await, "bypass");
    assert_eq!(proxy.calls(MODEL), 3);
    // max-age: an entry older than asked is not fresh.
    let r = proxy.post("/v1/messages", &body).send().await.unwrap();
    let key = header(&r, "x-fallthrough-key").parse().unwrap();
    backdate(&proxy.client, &key, Duration::from_secs(2)).await;
    assert_eq!(ask("cache-control", "max-age=0").await, "miss");
    assert_eq!(ask("cache-control", "max-age=3600").await, "memory");
    // A namespace never sees another's entries.
    assert_eq!(ask("x-fallthrough-namespace", "tenant-b").await, "miss");
    assert_eq!(proxy.calls(MODEL), 5);
}

#[tokio::test]
async fn the_proxys_own_errors_are_api_shaped_and_it_keeps_serving() {
    let config = Config {
        max_body_bytes: bytesize::ByteSize::kib(64),
        ..Config::default()
    };
    let mock = MockServer::start(MockConfig::default()).await.unwrap();
    let proxy = Proxy::start_full(mock, config, |b| b).await;
    let send = |body: Vec<u8>| {
        proxy
            .http
            .post(format!("{}/v1/messages", proxy.url))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"not json".to_vec(), 400, "invalid_request_error"),
        (b"".to_vec(), 400, "invalid_request_error"),
        (b"[1,2,3]".to_vec(), 400, "invalid_request_error"),
        (br#"{"messages":[]}"#.to_vec(), 400, "invalid_request_error"),
        (br#"{"model":7}"#.to_vec(), 400, "invalid_request_error"),
        (vec![0xff, 0xfe, 0x00], 400, "invalid_request_error"),
        (vec![b' '; 100 * 1024], 413, "request_too_large"),
    ];
    for (body, status, kind) in cases {
        let r = send(body).await.unwrap();
        assert_eq!(error_of(r).await, (status, kind.to_owned()));
    }
    // A wrong method on the proxy's own routes: 405 in the API's shape.
    for (method, path) in [
        (reqwest::Method::GET, "/v1/messages"),
        (reqwest::Method::DELETE, "/v1/messages/count_tokens"),
        (reqwest::Method::POST, "/healthz"),
    ] {
        let r = proxy
            .http
            .request(method, format!("{}{path}", proxy.url))
            .send()
            .await
            .unwrap();
        assert_eq!(error_of(r).await, (405, "invalid_request_error".to_owned()));
    }
    // A namespace that is not visible ASCII is refused, not silently shared.
    let r = proxy
        .http
        .post(format!("{}/v1/messages", proxy.url))
        .header(
            "x-fallthrough-namespace",
            reqwest::header::HeaderValue::from_bytes(b"t\xe9nant").unwrap(),
        )
        .json(&request("namespaced"))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(r).await, (400, "invalid_request_error".to_owned()));
    let r = proxy
        .http
        .get(format!("{}/healthz", proxy.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    proxy.shutdown().await;
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_502() {
    let (_held, closed) = support::refusing_address();
    let dead = format!("http://{closed}");
    let proxy = Proxy::start_with(|b| b.upstream(dead)).await;
    let r = proxy
        .post("/v1/messages", &request("anyone?"))
        .send()
        .await
        .unwrap();
    // Retried by the proxy: the SDK must not retry on top.
    assert_eq!(header(&r, "x-should-retry"), "false");
    assert_eq!(error_of(r).await, (502, "api_error".into()));

    // Passed through, it had one try, never retried: the SDK keeps its own retry rules.
    let r = reqwest::Client::new()
        .get(format!("{}/v1/models", proxy.url))
        .header("x-api-key", "sk-ant-caller-key")
        .send()
        .await
        .unwrap();
    assert_eq!(header(&r, "x-should-retry"), "", "a try nobody retried");
    assert_eq!(header(&r, "x-fallthrough-attempts"), "1");
    assert_eq!(error_of(r).await, (502, "api_error".into()));
}

#[tokio::test]
async fn overload_exhausted_gives_529_with_retry_after() {
    let mock = MockServer::start(MockConfig {
        overloaded_models: vec![MODEL.into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let proxy = Proxy::start_on(mock, |b| b).await;
    let r = proxy
        .post("/v1/messages", &request("busy"))
        .send()
        .await
        .unwrap();
    let retry_after: u64 = header(&r, "retry-after").parse().unwrap();
    assert!(retry_after >= 1);
    assert_eq!(header(&r, "x-fallthrough-attempts"), "3");
    assert_eq!(error_of(r).await, (529, "overloaded_error".into()));
}

#[tokio::test]
async fn streamed_miss_is_stored_and_equals_the_plain_answer() {
    let proxy = Proxy::start().await;
    let tools =
        json!([{"name": "get_weather", "description": "w", "input_schema": {"type": "object"}}]);
    for body in [
        request("stream me"),
        json!({"model": MODEL, "max_tokens": 64, "tools": tools, "messages": [{"role": "user", "content": "weather?"}]}),
        json!({"model": MODEL, "max_tokens": 64, "thinking": {"type": "enabled", "budget_tokens": 1024}, "messages": [{"role": "user", "content": "think"}]}),
    ] {
        // What the upstream answers plainly, asked directly.
        let direct: Value = reqwest::Client::new()
            .post(format!("{}/v1/messages", proxy.mock.url()))
            .header("x-api-key", "sk-ant-caller-key")
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        let r = proxy.post("/v1/messages", &streamed).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-fallthrough-cache"), "miss");
        assert!(header(&r, "content-type").starts_with("text/event-stream"));
        let events = r.bytes().await.unwrap();
        assert_eq!(assemble(&events), direct);
        // The assembled Message was stored before the stream ended: the plain request is a
        // hit with the same answer.
        let r = proxy.cached(&body).await;
        assert_eq!(
            header(&r, "x-fallthrough-cache"),
            "memory",
            "stored at message_stop"
        );
        assert_eq!(r.json::<Value>().await.unwrap(), direct);
        // And a streamed hit is replayed as a stream that assembles to the same Message.
        let r = proxy.post("/v1/messages", &streamed).send().await.unwrap();
        assert_eq!(header(&r, "x-fallthrough-cache"), "memory");
        let replay = r.bytes().await.unwrap();
        assert!(std::str::from_utf8(&replay)
            .unwrap()
            .starts_with("event: message_start\n"));
        assert_eq!(assemble(&replay), direct);
    }
}

#[tokio::test]
async fn error_events_and_cut_streams_store_nothing() {
    let proxy = Proxy::start().await;
    for (script, text) in [
        (Scripted::StreamError { after_events: 3 }, "error event"),
        (Scripted::StreamCut { after_events: 3 }, "cut"),
    ] {
        proxy.mock.script(Some(MODEL), vec![script]);
        let mut body = request(text);
        body["stream"] = json!(true);
        let r = proxy.post("/v1/messages", &body).send().await.unwrap();
        assert_eq!(r.status(), 200, "the failure comes after the first byte");
        let _ = r.bytes().await; // a cut stream ends in a body error: fine
                                 // A stream is stored, if at all, before its last byte is relayed, and a cut one is
                                 // decided before the cut reaches the caller: the cache now holds what it ever will.
        proxy.client.settled().await;
        let before = proxy.calls(MODEL);
        let cached = proxy.cached(&body).await;
        assert_eq!(cached.status(), 504, "{text} was stored");
        let r = proxy.post("/v1/messages", &body).send().await.unwrap();
        assert_eq!(
            header(&r, "x-fallthrough-cache"),
            "miss",
            "{text} was stored"
        );
        let _ = r.bytes().await;
        assert_eq!(proxy.calls(MODEL), before + 1);
    }
}

/// An upstream that sends a stream's first event, then holds the others until `go` is
/// notified: a proxy that waited for the whole stream would never relay the first.
async fn held_stream_upstream(go: Arc<Notify>) -> String {
    use axum::body::Body;
    use axum::routing::post;
    let app = axum::Router::new().route(
        "/v1/messages",
        post(|| async move {
            let message = json!({"id":"msg_slow","type":"message","role":"assistant","model":MODEL,
                "content":[{"type":"text","text":"one two three four five six"}],
                "stop_reason":"end_turn","stop_sequence":null,
                "usage":{"input_tokens":5,"output_tokens":6}});
            let frames = fallthrough::sse::replay_frames(&message).unwrap();
            let stream = futures_util::stream::iter(frames.into_iter().enumerate()).then(
                move |(i, (event, data))| {
                    let go = go.clone();
                    async move {
                        if i == 1 {
                            go.notified().await;
                        }
                        Ok::<_, std::io::Error>(fallthrough::sse::encode_event(&event, &data))
                    }
                },
            );
            axum::response::Response::builder()
                .header("content-type", "text/event-stream")
                .body(Body::from_stream(stream))
                .unwrap()
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

use futures_util::StreamExt;

#[tokio::test]
async fn a_streamed_miss_relays_events_as_they_arrive() {
    let go = Arc::new(Notify::new());
    let upstream = held_stream_upstream(go.clone()).await;
    let proxy = Proxy::start_with(|b| b.upstream(upstream)).await;
    let mut body = request("slow");
    body["stream"] = json!(true);
    let r = proxy.post("/v1/messages", &body).send().await.unwrap();
    let mut chunks = r.bytes_stream();
    // The upstream sends nothing more until the first event has come through.
    let first = tokio::time::timeout(Duration::from_secs(60), chunks.next())
        .await
        .expect("the first event is relayed while the upstream holds the rest")
        .unwrap()
        .unwrap();
    let first = std::str::from_utf8(&first).unwrap().to_owned();
    assert!(first.contains("message_start"), "{first}");
    assert!(!first.contains("message_stop"), "{first}");
    go.notify_one();
    let mut all = first.into_bytes();
    while let Some(chunk) = chunks.next().await {
        all.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(assemble(&all)["id"], "msg_slow");
}

#[tokio::test]
async fn health_and_metrics() {
    let proxy = Proxy::start().await;
    let body = request("metrics");
    for _ in 0..2 {
        proxy.post("/v1/messages", &body).send().await.unwrap();
    }
    let r = proxy
        .http
        .get(format!("{}/healthz", proxy.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = proxy.metrics().await;
    for needle in [
        "fallthrough_requests_total{outcome=\"miss\"} 1",
        "fallthrough_requests_total{outcome=\"memory\"} 1",
        &format!("fallthrough_upstream_attempts_total{{model=\"{MODEL}\",status=\"200\"}} 1"),
        &format!("fallthrough_breaker_state{{model=\"{MODEL}\"}} 0"),
        "fallthrough_request_duration_seconds_bucket",
        "fallthrough_cache_entries{tier=\"memory\"} 1",
        "fallthrough_cache_entries{tier=\"disk\"} 1",
        "fallthrough_cache_bytes{tier=\"disk\"}",
    ] {
        assert!(text.contains(needle), "{needle} missing from\n{text}");
    }
}

#[tokio::test]
async fn shutdown_finishes_in_flight_requests_and_flushes() {
    let mock = MockServer::start(MockConfig {
        latency_ms: 500,
        ..Default::default()
    })
    .await
    .unwrap();
    let proxy = Proxy::start_on(mock, |b| b).await;
    let pending = tokio::spawn(proxy.post("/v1/messages", &request("in flight")).send());
    // In flight: the mock has it (and holds it 500 ms).
    eventually("the request to reach the mock", || {
        proxy.mock.stats().requests == 1
    })
    .await;
    let dir = proxy.shutdown().await;
    let r = pending.await.unwrap().unwrap();
    assert_eq!(r.status(), 200, "in-flight request was cut by shutdown");
    // The server flushed and let go of the directory: it opens again, with the entry.
    let cache = fallthrough::cache::Cache::open(dir.path().join("cache"), 1 << 20, 1 << 30)
        .await
        .unwrap();
    assert_eq!(cache.usage().await.disk_entries, 1);
}
