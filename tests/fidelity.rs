//! Between a client and the API the proxy adds what it promises and takes nothing away: the
//! upstream's headers on misses and errors, one retry layer (`x-should-retry: false` on what it
//! retried, the upstream's own `x-should-retry` obeyed), a breaker's refusal that names what
//! opened it, the query string forwarded and keyed, the default fallback chains.

use std::sync::atomic::Ordering;
use std::time::Duration;

use fallthrough::mock::{MockConfig, MockServer, Scripted};
use fallthrough::Config;
use serde_json::{json, Value};

mod support;
use support::proxy::*;

#[tokio::test]
async fn upstream_headers_reach_the_caller_on_misses_and_errors_not_on_hits() {
    let proxy = Proxy::start().await;
    let body = request("headers");
    let miss = proxy.post("/v1/messages", &body).send().await.unwrap();
    assert_eq!(header(&miss, "x-fallthrough-cache"), "miss");
    assert!(header(&miss, "request-id").starts_with("req_"), "{miss:?}");
    assert_eq!(header(&miss, "anthropic-ratelimit-requests-limit"), "4000");
    assert_eq!(header(&miss, "content-type"), "application/json");

    let hit = proxy.post("/v1/messages", &body).send().await.unwrap();
    assert_eq!(header(&hit, "x-fallthrough-cache"), "memory");
    assert_eq!(
        header(&hit, "request-id"),
        "",
        "a hit carries no upstream headers"
    );

    let mut streamed = request("headers, streamed");
    streamed["stream"] = json!(true);
    let live = proxy.post("/v1/messages", &streamed).send().await.unwrap();
    assert_eq!(header(&live, "x-fallthrough-cache"), "miss");
    assert!(header(&live, "request-id").starts_with("req_"));
    assert!(header(&live, "content-type").starts_with("text/event-stream"));
    live.bytes().await.unwrap();

    proxy.mock.script(
        Some(MODEL),
        vec![Scripted::Status {
            status: 400,
            retry_after: None,
        }],
    );
    let refused = proxy
        .post("/v1/messages", &request("a bad one"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    assert!(header(&refused, "request-id").starts_with("req_"));
    assert_eq!(
        header(&refused, "x-should-retry"),
        "",
        "an error the proxy does not retry passes as it came"
    );
}

#[tokio::test]
async fn an_error_the_proxy_retried_tells_the_caller_not_to_retry() {
    let proxy = Proxy::start().await;
    let overloaded = Scripted::Status {
        status: 529,
        retry_after: None,
    };
    proxy.mock.script(Some(MODEL), vec![overloaded; 3]);
    let r = proxy
        .post("/v1/messages", &request("storm"))
        .header("x-fallthrough-fallback", "off")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 529);
    assert_eq!(header(&r, "x-should-retry"), "false");
    assert!(header(&r, "retry-after").parse::<u64>().unwrap() >= 1);
    assert!(header(&r, "request-id").starts_with("req_"));
    assert_eq!(header(&r, "x-fallthrough-attempts"), "3");
    assert_eq!(proxy.calls(MODEL), 3, "the first try and two retries");
}

#[tokio::test]
async fn the_upstreams_x_should_retry_false_is_obeyed() {
    let proxy = Proxy::start().await;
    proxy
        .mock
        .script(Some(MODEL), vec![Scripted::NoRetry { status: 529 }]);
    let r = proxy
        .post("/v1/messages", &request("do not retry"))
        .header("x-fallthrough-fallback", "off")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 529);
    assert_eq!(proxy.calls(MODEL), 1, "not retried");
    assert_eq!(header(&r, "x-should-retry"), "false");
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_502_before_and_after_the_breaker_opens() {
    let (_held, closed) = support::refusing_address();
    let mock = MockServer::start(MockConfig::default()).await.unwrap();
    let proxy = Proxy::start_on(mock, move |b| {
        b.upstream(format!("http://{closed}"))
            .breaker(1, Duration::from_secs(600))
    })
    .await;
    for round in ["before", "after"] {
        let r = proxy
            .post("/v1/messages", &request("anyone there?"))
            .send()
            .await
            .unwrap();
        assert_eq!(header(&r, "x-should-retry"), "false");
        let (status, kind) = error_of(r).await;
        assert_eq!(
            (status, kind.as_str()),
            (502, "api_error"),
            "{round} the breaker opened"
        );
    }
}

#[tokio::test]
async fn the_query_is_forwarded_and_keyed() {
    let proxy = Proxy::start().await;
    let body = request("beta");
    let beta = proxy
        .post("/v1/messages?beta=true", &body)
        .send()
        .await
        .unwrap();
    assert_eq!(beta.status(), 200);
    assert_eq!(proxy.mock.stats().last_query.as_deref(), Some("beta=true"));
    let plain = proxy.post("/v1/messages", &body).send().await.unwrap();
    assert_eq!(header(&plain, "x-fallthrough-cache"), "miss");
    assert_ne!(
        header(&plain, "x-fallthrough-key"),
        header(&beta, "x-fallthrough-key")
    );
    assert_eq!(proxy.mock.stats().last_query, None);
    let again = proxy
        .post("/v1/messages?beta=true", &body)
        .send()
        .await
        .unwrap();
    assert_eq!(header(&again, "x-fallthrough-cache"), "memory");
}

#[tokio::test]
async fn the_default_chains_stand_in_without_a_config_file() {
    let overloaded = MockConfig {
        overloaded_models: vec![MODEL.to_owned()],
        ..MockConfig::default()
    };
    let mock = MockServer::start(overloaded).await.unwrap();
    let proxy = Proxy::start_full(mock, Config::default(), |b| b).await;
    let r = proxy
        .post("/v1/messages", &request("sonnet is busy"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-fallthrough-model"), "claude-haiku-4-5");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["model"], "claude-haiku-4-5");
}

#[tokio::test]
async fn a_streamed_hit_is_the_plain_answer_field_for_field_in_the_upstreams_order() {
    let (url, calls) = fixed_upstream(FAITHFUL).await;
    let mock = MockServer::start(MockConfig::default()).await.unwrap();
    let proxy = Proxy::start_on(mock, move |b| b.upstream(url)).await;
    let body = request("faithful");
    let plain = proxy.post("/v1/messages", &body).send().await.unwrap();
    assert_eq!(header(&plain, "x-fallthrough-cache"), "miss");
    assert_eq!(
        plain.text().await.unwrap(),
        FAITHFUL,
        "a miss is passed as it came"
    );

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let hit = proxy.post("/v1/messages", &streamed).send().await.unwrap();
    assert_eq!(header(&hit, "x-fallthrough-cache"), "memory");
    let events = hit.bytes().await.unwrap();
    let message = assemble(&events);
    assert_eq!(
        message.to_string(),
        FAITHFUL,
        "assembled from the replay: the same fields, in the same order"
    );
    let text = String::from_utf8_lossy(&events);
    let delta_line = text
        .lines()
        .find(|l| l.starts_with("data: {\"type\":\"message_delta\""))
        .expect("a message_delta event");
    let delta: Value = serde_json::from_str(&delta_line["data: ".len()..]).unwrap();
    assert_eq!(delta["delta"]["stop_details"]["category"], "cyber");
    assert!(delta["usage"].get("cache_creation").is_none(), "{delta}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_answer_that_cannot_be_replayed_is_passed_on_but_not_stored() {
    const BROKEN: &str = r#"{"id":"msg_02","type":"message","role":"assistant","model":"claude-sonnet-4-6","content":[{"type":"text"}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":1,"output_tokens":1}}"#;
    let (url, calls) = fixed_upstream(BROKEN).await;
    let mock = MockServer::start(MockConfig::default()).await.unwrap();
    let proxy = Proxy::start_on(mock, move |b| b.upstream(url)).await;
    let body = request("broken");
    for _ in 0..2 {
        let r = proxy.post("/v1/messages", &body).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-fallthrough-cache"), "miss");
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "never stored, so never a hit"
    );
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let r = proxy.post("/v1/messages", &streamed).send().await.unwrap();
    assert_ne!(r.status(), 500, "no stored entry to fail on");
}

#[tokio::test]
async fn the_upstreams_userinfo_never_reaches_a_caller() {
    let (_held, closed) = support::refusing_address();
    let mock = MockServer::start(MockConfig::default()).await.unwrap();
    let proxy = Proxy::start_on(mock, move |b| {
        b.upstream(format!("http://gateway-user:hunter2@{closed}"))
    })
    .await;
    for path in ["/v1/messages", "/v1/models"] {
        let r = proxy.post(path, &request("secret?")).send().await.unwrap();
        assert_eq!(r.status(), 502);
        let text = r.text().await.unwrap();
        assert!(!text.contains("hunter2"), "{path}: {text}");
    }
}
