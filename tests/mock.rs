//! The fake API over real HTTP: answers, streams, injected faults, validation, stats, controls.

use std::time::{Duration, Instant};

use fallthrough::mock::{MockConfig, MockServer, Scripted};
use fallthrough::sse::{Assembler, FrameParser, SseError};
use futures_util::StreamExt;
use reqwest::header::HeaderMap;
use serde_json::{json, Value};

struct Answer {
    status: u16,
    headers: HeaderMap,
    body: Value,
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn post_raw(server: &MockServer, path: &str, body: impl Into<reqwest::Body>) -> Answer {
    let response = client()
        .post(format!("{}{path}", server.url()))
        .header("content-type", "application/json")
        .header("x-api-key", "sk-test-123")
        .header("anthropic-version", "2023-06-01")
        .body(body)
        .send()
        .await
        .expect("send");
    finish(response).await
}

async fn post(server: &MockServer, path: &str, body: &Value) -> Answer {
    post_raw(server, path, body.to_string()).await
}

async fn get(server: &MockServer, path: &str) -> Answer {
    let response = client()
        .get(format!("{}{path}", server.url()))
        .send()
        .await
        .expect("send");
    finish(response).await
}

async fn finish(response: reqwest::Response) -> Answer {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.expect("body");
    let body = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "body is not JSON ({e}): {}",
            String::from_utf8_lossy(&bytes)
        )
    });
    Answer {
        status,
        headers,
        body,
    }
}

fn request(model: &str, prompt: &str) -> Value {
    json!({
        "model": model,
        "max_tokens": 1024,
        "messages": [{"role": "user", "content": prompt}],
    })
}

fn tools_request() -> Value {
    let mut r = request("claude-sonnet-4-6", "What is the weather in Paris?");
    r["tools"] = json!([{"name": "get_weather", "description": "Weather for a city",
        "input_schema": {"type": "object", "properties": {
            "city": {"type": "string"},
            "units": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "options": {"type": "object", "properties": {"days": {"type": "integer", "minimum": 1},
                "hourly": {"type": "boolean"}}, "required": ["days"]},
            "note": {"type": "string"}},
            "required": ["city", "units", "options"]}}]);
    r
}

fn thinking_request() -> Value {
    let mut r = request("claude-opus-4-6", "Write a haiku.");
    r["thinking"] = json!({"type": "enabled", "budget_tokens": 2048});
    r
}

fn header<'a>(a: &'a Answer, name: &str) -> Option<&'a str> {
    a.headers.get(name).and_then(|v| v.to_str().ok())
}

/// Asserts the API's exact error shape, its type, and the `request-id` header that matches it.
fn assert_api_error(a: &Answer, status: u16, error_type: &str) {
    assert_eq!(a.status, status, "{}", a.body);
    let obj = a.body.as_object().expect("error body is an object");
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(keys, ["error", "request_id", "type"], "{}", a.body);
    assert_eq!(a.body["type"], "error");
    assert_eq!(a.body["error"]["type"], error_type, "{}", a.body);
    assert!(a.body["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
    let request_id = header(a, "request-id").expect("request-id header");
    assert!(request_id.starts_with("req_"), "{request_id}");
    assert_eq!(a.body["request_id"], request_id);
}

/// A streamed call: the status, headers, body chunks as received, and the raw bytes.
struct Streamed {
    status: u16,
    headers: HeaderMap,
    chunks: usize,
    bytes: Vec<u8>,
    /// Whether reading the body failed (a cut stream).
    broken: bool,
}

async fn post_stream(server: &MockServer, body: &Value) -> Streamed {
    let mut body = body.clone();
    body["stream"] = json!(true);
    let response = client()
        .post(format!("{}/v1/messages", server.url()))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("send");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let mut stream = response.bytes_stream();
    let (mut chunks, mut bytes, mut broken) = (0, Vec::new(), false);
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(chunk) => {
                chunks += 1;
                bytes.extend_from_slice(&chunk);
            }
            Err(_) => {
                broken = true;
                break;
            }
        }
    }
    Streamed {
        status,
        headers,
        chunks,
        bytes,
        broken,
    }
}

/// Parses in 7-byte pieces and assembles: `Ok(Some(message))` at message_stop, `Ok(None)` if the
/// stream ended before it.
fn assemble(bytes: &[u8]) -> Result<Option<Value>, SseError> {
    let mut parser = FrameParser::new();
    let mut assembler = Assembler::new();
    for piece in bytes.chunks(7) {
        for frame in parser.push(piece) {
            if let Some(message) = assembler.feed(&frame)? {
                return Ok(Some(message));
            }
        }
    }
    Ok(None)
}

fn event_names(bytes: &[u8]) -> Vec<String> {
    FrameParser::new()
        .push(bytes)
        .into_iter()
        .map(|f| f.event)
        .collect()
}

#[tokio::test]
async fn plain_answers_have_the_api_shape_and_are_deterministic() {
    let server = MockServer::start(MockConfig::default()).await.unwrap();
    let body = request("claude-haiku-4-5", "Hello there");
    let a = post(&server, "/v1/messages", &body).await;
    assert_eq!(a.status, 200);
    assert!(header(&a, "request-id").unwrap().starts_with("req_"));
    assert_eq!(header(&a, "content-type"), Some("application/json"));
    let m = &a.body;
    assert!(m["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(m["type"], "message");
    assert_eq!(m["role"], "assistant");
    assert_eq!(m["model"], "claude-haiku-4-5");
    assert_eq!(m["stop_reason"], "end_turn");
    assert_eq!(m["stop_sequence"], Value::Null);
    assert_eq!(m["content"][0]["type"], "text");
    let text = m["content"][0]["text"].as_str().unwrap();
    assert!(text.split_whitespace().count() >= 5, "{text}");
    let usage = &m["usage"];
    assert!(usage["input_tokens"].as_u64().unwrap() > 0);
    assert_eq!(
        usage["output_tokens"].as_u64().unwrap(),
        text.split_whitespace().count() as u64
    );
    assert_eq!(usage["cache_creation_input_tokens"], 0);
    assert_eq!(usage["cache_read_input_tokens"], 0);
    assert_eq!(usage["service_tier"], "standard");

    let again = post(&server, "/v1/messages", &body).await;
    assert_eq!(again.body, a.body, "same request, same answer");
    assert_ne!(header(&again, "request-id"), header(&a, "request-id"));

    let other = post(&server, "/v1/messages", &request("claude-haiku-4-5", "Bye")).await;
    assert_ne!(other.body["id"], a.body["id"]);
    assert_ne!(other.body["content"], a.body["content"]);
    let other_model = post(
        &server,
        "/v1/messages",
        &request("claude-opus-4-6", "Hello there"),
    )
    .await;
    assert_eq!(other_model.body["model"], "claude-opus-4-6");

    // A small max_tokens is respected (loosely) and reported.
    let mut short = body.clone();
    short["max_tokens"] = json!(3);
    let short = post(&server, "/v1/messages", &short).await;
    assert_eq!(short.body["stop_reason"], "max_tokens");
    let words = short.body["content"][0]["text"]
        .as_str()
        .unwrap()
        .split_whitespace()
        .count();
    assert_eq!(words, 3);
}

#[tokio::test]
async fn tools_and_thinking_requests_get_matching_blocks() {
    let server = MockServer::start(MockConfig::default()).await.unwrap();
    let a = post(&server, "/v1/messages", &tools_request()).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body["stop_reason"], "tool_use");
    let content = a.body["content"].as_array().unwrap();
    assert_eq!(content[0]["type"], "text");
    assert_eq!(content[1]["type"], "tool_use");
    assert_eq!(content[1]["name"], "get_weather");
    assert!(content[1]["id"].as_str().unwrap().starts_with("toolu_"));
    // The input fits the tool's schema: its required properties, each of its type.
    let input = &content[1]["input"];
    assert!(input["city"].is_string(), "{input}");
    assert_eq!(input["units"], "celsius", "the first of an enum");
    assert!(
        input["options"]["days"].as_i64().is_some_and(|d| d >= 1),
        "{input}"
    );
    assert!(
        input.get("note").is_none(),
        "optional properties are left out: {input}"
    );

    // Given the tool's result, the agent's turn ends in words.
    let mut follow_up = tools_request();
    let messages = follow_up["messages"].as_array_mut().unwrap();
    messages.push(json!({"role": "assistant", "content": [content[1].clone()]}));
    messages.push(json!({"role": "user", "content": [{"type": "tool_result",
        "tool_use_id": content[1]["id"], "content": "12 degrees"}]}));
    let done = post(&server, "/v1/messages", &follow_up).await;
    assert_eq!(done.status, 200);
    assert_eq!(done.body["stop_reason"], "end_turn");
    assert_eq!(done.body["content"][0]["type"], "text");

    // Offered many tools, none asked for by name: words. Named in the prompt: that tool.
    let mut many = tools_request();
    let weather = many["tools"][0].clone();
    let mut search = weather.clone();
    search["name"] = json!("web_search");
    many["tools"] = json!([weather, search]);
    let words = post(&server, "/v1/messages", &many).await;
    assert_eq!(words.body["stop_reason"], "end_turn", "{}", words.body);
    many["messages"][0]["content"] = json!("Use web_search for the weather in Paris.");
    let asked = post(&server, "/v1/messages", &many).await;
    assert_eq!(asked.body["stop_reason"], "tool_use");
    assert_eq!(asked.body["content"][1]["name"], "web_search");

    let t = post(&server, "/v1/messages", &thinking_request()).await;
    assert_eq!(t.status, 200);
    let content = t.body["content"].as_array().unwrap();
    assert_eq!(content[0]["type"], "thinking");
    assert!(!content[0]["thinking"].as_str().unwrap().is_empty());
    assert!(!content[0]["signature"].as_str().unwrap().is_empty());
    assert_eq!(content[1]["type"], "text");
    assert_eq!(t.body["stop_reason"], "end_turn");
}

#[tokio::test]
async fn streams_reassemble_into_exactly_the_plain_answer() {
    let server = MockServer::start(MockConfig::default()).await.unwrap();
    for body in [
        request("claude-sonnet-4-6", "Tell me about caches"),
        tools_request(),
        thinking_request(),
    ] {
        let plain = post(&server, "/v1/messages", &body).await;
        assert_eq!(plain.status, 200);
        let s = post_stream(&server, &body).await;
        assert_eq!(s.status, 200);
        assert!(!s.broken);
        let content_type = s.headers.get("content-type").unwrap().to_str().unwrap();
        assert_eq!(content_type, "text/event-stream; charset=utf-8");
        assert_eq!(s.headers.get("cache-control").unwrap(), "no-cache");
        assert!(s.headers.get("request-id").is_some());
        assert!(
            s.chunks > 3,
            "events arrive as separate chunks ({})",
            s.chunks
        );

        // Every frame has its event line, and the JSON's type equals it.
        let text = String::from_utf8(s.bytes.clone()).unwrap();
        let frames: Vec<&str> = text.split("\n\n").filter(|f| !f.is_empty()).collect();
        for frame in &frames {
            let mut lines = frame.lines();
            let event = lines.next().unwrap().strip_prefix("event: ");
            let event = event.unwrap_or_else(|| panic!("frame without an event line: {frame}"));
            let data = lines.next().unwrap().strip_prefix("data: ").unwrap();
            let data: Value = serde_json::from_str(data).unwrap();
            assert_eq!(data["type"], event);
        }
        let names = event_names(&s.bytes);
        assert_eq!(names.first().map(String::as_str), Some("message_start"));
        assert_eq!(names.last().map(String::as_str), Some("message_stop"));
        assert!(names.iter().any(|n| n == "content_block_delta"));

        let message = assemble(&s.bytes).unwrap().expect("message_stop");
        assert_eq!(message, plain.body, "stream of {body}");
    }
}

#[tokio::test]
async fn overload_rate_and_overloaded_models_answer_529() {
    let server = MockServer::start(MockConfig {
        overload_rate: 1.0,
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let a = post(&server, "/v1/messages", &request("claude-sonnet-4-6", "hi")).await;
    assert_api_error(&a, 529, "overloaded_error");
    assert_eq!(a.body["error"]["message"], "Overloaded");
    assert_eq!(
        header(&a, "retry-after"),
        None,
        "no retry-after unless configured"
    );

    server.set_config(MockConfig {
        overload_rate: 1.0,
        retry_after: Some(3),
        ..MockConfig::default()
    });
    let a = post(&server, "/v1/messages", &request("claude-sonnet-4-6", "hi")).await;
    assert_api_error(&a, 529, "overloaded_error");
    assert_eq!(header(&a, "retry-after"), Some("3"));

    server.set_config(MockConfig {
        overloaded_models: vec!["claude-opus-4-6".into()],
        ..MockConfig::default()
    });
    for _ in 0..3 {
        let a = post(&server, "/v1/messages", &request("claude-opus-4-6", "hi")).await;
        assert_api_error(&a, 529, "overloaded_error");
        let b = post(&server, "/v1/messages", &request("claude-haiku-4-5", "hi")).await;
        assert_eq!(b.status, 200);
    }

    // A per-model rate overrides the global one, both ways.
    server.set_config(MockConfig {
        overload_rate: 1.0,
        model_overload_rate: [("claude-haiku-4-5".to_owned(), 0.0)].into(),
        ..MockConfig::default()
    });
    assert_eq!(
        post(&server, "/v1/messages", &request("claude-haiku-4-5", "x"))
            .await
            .status,
        200
    );
    assert_eq!(
        post(&server, "/v1/messages", &request("claude-opus-4-6", "x"))
            .await
            .status,
        529
    );
    server.set_config(MockConfig {
        model_overload_rate: [("claude-opus-4-6".to_owned(), 1.0)].into(),
        ..MockConfig::default()
    });
    assert_eq!(
        post(&server, "/v1/messages", &request("claude-haiku-4-5", "x"))
            .await
            .status,
        200
    );
    assert_eq!(
        post(&server, "/v1/messages", &request("claude-opus-4-6", "x"))
            .await
            .status,
        529
    );
}

#[tokio::test]
async fn rate_limits_and_server_errors() {
    let server = MockServer::start(MockConfig {
        rate_limit_rate: 1.0,
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let a = post(&server, "/v1/messages", &request("claude-sonnet-4-6", "hi")).await;
    assert_api_error(&a, 429, "rate_limit_error");
    assert_eq!(
        header(&a, "retry-after"),
        Some("1"),
        "a 429 always has a retry-after"
    );

    server.set_config(MockConfig {
        rate_limit_rate: 1.0,
        retry_after: Some(7),
        ..MockConfig::default()
    });
    let a = post(&server, "/v1/messages", &request("claude-sonnet-4-6", "hi")).await;
    assert_api_error(&a, 429, "rate_limit_error");
    assert_eq!(header(&a, "retry-after"), Some("7"));

    server.set_config(MockConfig {
        server_error_rate: 1.0,
        ..MockConfig::default()
    });
    let a = post(&server, "/v1/messages", &request("claude-sonnet-4-6", "hi")).await;
    assert_api_error(&a, 500, "api_error");
    assert_eq!(header(&a, "retry-after"), None);

    // Faults apply to count_tokens too.
    let c = post(
        &server,
        "/v1/messages/count_tokens",
        &request("claude-sonnet-4-6", "hi"),
    )
    .await;
    assert_api_error(&c, 500, "api_error");
}

#[tokio::test]
async fn the_seed_makes_random_faults_reproducible() {
    /// Sends each of `order`'s questions twice in a row; the statuses, by question.
    async fn run(
        order: impl Iterator<Item = usize>,
    ) -> std::collections::BTreeMap<usize, [u16; 2]> {
        let server = MockServer::start(MockConfig {
            overload_rate: 0.5,
            seed: 42,
            ..MockConfig::default()
        })
        .await
        .unwrap();
        let mut statuses = std::collections::BTreeMap::new();
        for i in order {
            let body = request("claude-sonnet-4-6", &format!("q{i}"));
            let first = post(&server, "/v1/messages", &body).await.status;
            let again = post(&server, "/v1/messages", &body).await.status;
            statuses.insert(i, [first, again]);
        }
        statuses
    }
    let first = run(0..24).await;
    let all: Vec<u16> = first.values().flatten().copied().collect();
    assert!(all.contains(&200) && all.contains(&529), "{first:?}");
    assert!(
        first.values().any(|[a, b]| a != b),
        "a retry of a request is not bound to its first answer: {first:?}"
    );
    assert_eq!(run(0..24).await, first);
    // A fault depends on the request and its ordinal, not on what came before it.
    assert_eq!(run((0..24).rev()).await, first, "in another order");
}

#[tokio::test]
async fn scripted_answers_come_first_in_order() {
    let server = MockServer::start(MockConfig {
        overload_rate: 1.0,
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let date = "Wed, 21 Oct 2015 07:28:00 GMT";
    server.script(
        None,
        vec![
            Scripted::Status {
                status: 503,
                retry_after: Some(date.into()),
            },
            Scripted::SpendLimit,
            Scripted::Ok,
        ],
    );
    server.script(
        Some("claude-opus-4-6"),
        vec![Scripted::Status {
            status: 429,
            retry_after: Some("2".into()),
        }],
    );
    let opus = request("claude-opus-4-6", "hi");
    let haiku = request("claude-haiku-4-5", "hi");

    // The model's own queue first, then the any-model queue, then the random faults.
    let a = post(&server, "/v1/messages", &opus).await;
    assert_api_error(&a, 429, "rate_limit_error");
    assert_eq!(header(&a, "retry-after"), Some("2"));
    let a = post(&server, "/v1/messages", &opus).await;
    assert_api_error(&a, 503, "api_error");
    assert_eq!(header(&a, "retry-after"), Some(date));
    let a = post(&server, "/v1/messages", &haiku).await;
    assert_api_error(&a, 429, "rate_limit_error");
    assert_eq!(
        a.body["error"]["details"]["error_code"],
        "enforced_spend_limit_reached"
    );
    assert_eq!(
        header(&a, "retry-after"),
        None,
        "a spend-limit 429 has no retry-after"
    );
    let a = post(&server, "/v1/messages", &haiku).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body["type"], "message");
    let a = post(&server, "/v1/messages", &haiku).await;
    assert_api_error(&a, 529, "overloaded_error");

    // Other statuses get their API error type; no retry-after unless scripted.
    server.set_config(MockConfig::default());
    for (status, kind) in [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (404, "not_found_error"),
        (413, "request_too_large"),
        (504, "timeout_error"),
        (529, "overloaded_error"),
    ] {
        server.script(
            None,
            vec![Scripted::Status {
                status,
                retry_after: None,
            }],
        );
        let a = post(&server, "/v1/messages", &haiku).await;
        assert_api_error(&a, status, kind);
        assert_eq!(header(&a, "retry-after"), None);
    }
}

#[tokio::test]
async fn stream_faults_break_the_stream_after_n_events() {
    let server = MockServer::start(MockConfig::default()).await.unwrap();
    let body = request("claude-sonnet-4-6", "A long enough answer please");

    server.script(None, vec![Scripted::StreamError { after_events: 3 }]);
    let s = post_stream(&server, &body).await;
    assert_eq!(s.status, 200);
    assert!(!s.broken);
    let names = event_names(&s.bytes);
    assert_eq!(names.len(), 4, "{names:?}");
    assert_eq!(names[0], "message_start");
    assert_eq!(names[3], "error");
    match assemble(&s.bytes) {
        Err(SseError::Upstream(error)) => {
            assert_eq!(error["type"], "error");
            assert_eq!(error["error"]["type"], "overloaded_error");
            assert_eq!(error["error"]["message"], "Overloaded");
        }
        other => panic!("expected an upstream error event, got {other:?}"),
    }

    server.script(None, vec![Scripted::StreamCut { after_events: 4 }]);
    let s = post_stream(&server, &body).await;
    assert_eq!(s.status, 200);
    assert!(s.broken, "the body must end abruptly, not cleanly");
    let names = event_names(&s.bytes);
    assert_eq!(names.len(), 4, "{names:?}");
    assert!(!names.iter().any(|n| n == "message_stop" || n == "error"));
    assert!(matches!(assemble(&s.bytes), Ok(None)));

    // A large N still fails before message_stop.
    server.script(
        None,
        vec![Scripted::StreamError {
            after_events: 10_000,
        }],
    );
    let s = post_stream(&server, &body).await;
    let names = event_names(&s.bytes);
    assert_eq!(names.last().map(String::as_str), Some("error"));
    assert!(!names.iter().any(|n| n == "message_stop"));

    // For plain requests, the same scripts are plain errors.
    server.script(
        None,
        vec![
            Scripted::StreamError { after_events: 2 },
            Scripted::StreamCut { after_events: 2 },
        ],
    );
    assert_api_error(
        &post(&server, "/v1/messages", &body).await,
        529,
        "overloaded_error",
    );
    assert_api_error(
        &post(&server, "/v1/messages", &body).await,
        500,
        "api_error",
    );

    // Random faults on a stream come before the first byte, as plain errors.
    server.set_config(MockConfig {
        overload_rate: 1.0,
        ..MockConfig::default()
    });
    let s = post_stream(&server, &body).await;
    assert_eq!(s.status, 529);
    let error: Value = serde_json::from_slice(&s.bytes).unwrap();
    assert_eq!(error["error"]["type"], "overloaded_error");
}

#[tokio::test]
async fn malformed_bodies_get_400_in_the_api_shape() {
    let server = MockServer::start(MockConfig {
        overload_rate: 1.0, // validation comes before faults
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let bad: Vec<String> = vec![
        "{not json".into(),
        "".into(),
        "[1, 2]".into(),
        json!({"max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}).to_string(),
        json!({"model": 7, "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]})
            .to_string(),
        json!({"model": "m", "max_tokens": 10}).to_string(),
        json!({"model": "m", "max_tokens": 10, "messages": []}).to_string(),
        json!({"model": "m", "max_tokens": 10, "messages": "hi"}).to_string(),
        json!({"model": "m", "max_tokens": 10, "messages": [{"role": "robot", "content": "hi"}]})
            .to_string(),
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).to_string(),
        json!({"model": "m", "max_tokens": 0, "messages": [{"role": "user", "content": "hi"}]})
            .to_string(),
    ];
    for body in bad {
        let a = post_raw(&server, "/v1/messages", body.clone()).await;
        assert_eq!(a.status, 400, "{body}");
        assert_api_error(&a, 400, "invalid_request_error");
    }
    // count_tokens needs no max_tokens, but the rest is checked.
    let a = post(&server, "/v1/messages/count_tokens", &json!({"model": "m"})).await;
    assert_api_error(&a, 400, "invalid_request_error");
}

#[tokio::test]
async fn stats_count_by_model_status_and_path() {
    let server = MockServer::start(MockConfig {
        overloaded_models: vec!["claude-opus-4-6".into()],
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let haiku = request("claude-haiku-4-5", "hi");
    post(&server, "/v1/messages", &haiku).await;
    post_stream(&server, &haiku).await;
    post(&server, "/v1/messages", &request("claude-opus-4-6", "hi")).await;
    post(&server, "/v1/messages/count_tokens", &haiku).await;
    post_raw(&server, "/v1/messages", "nope").await;
    let mut no_tokens = haiku.clone();
    no_tokens.as_object_mut().unwrap().remove("max_tokens");
    post(&server, "/v1/messages", &no_tokens).await;
    get(&server, "/v1/models").await;

    let stats = server.stats();
    assert_eq!(stats.requests, 7);
    assert_eq!(stats.by_model["claude-haiku-4-5"][&200], 3);
    assert_eq!(stats.by_model["claude-haiku-4-5"][&400], 1);
    assert_eq!(stats.by_model["claude-opus-4-6"][&529], 1);
    assert_eq!(stats.by_model.len(), 2, "{:?}", stats.by_model);
    assert_eq!(stats.by_path["/v1/messages"], 5);
    assert_eq!(stats.by_path["/v1/messages/count_tokens"], 1);
    assert_eq!(stats.by_path["/v1/models"], 1);
    assert_eq!(
        stats.last_api_key, None,
        "the last request had no credential"
    );

    post(&server, "/v1/messages", &haiku).await;
    let stats = server.stats();
    assert_eq!(stats.last_api_key.as_deref(), Some("sk-test-123"));
    assert_eq!(stats.last_headers["anthropic-version"], "2023-06-01");
    assert!(!stats.last_headers.contains_key("x-api-key"));

    // The HTTP view is the same data; /mock routes are not counted.
    let http = get(&server, "/mock/stats").await;
    assert_eq!(http.status, 200);
    assert_eq!(http.body["requests"], 8);
    assert_eq!(http.body["by_model"]["claude-haiku-4-5"]["200"], 4);
    assert_eq!(http.body["last_api_key"], "sk-test-123");
    assert_eq!(server.stats().requests, 8);

    server.reset_stats();
    assert_eq!(server.stats().requests, 0);
    post(&server, "/v1/messages", &haiku).await;
    let a = post(&server, "/mock/reset", &json!({})).await;
    assert_eq!(a.status, 200);
    assert_eq!(server.stats().requests, 0);
    assert!(server.stats().by_model.is_empty());
}

#[tokio::test]
async fn configuration_and_scripts_change_at_run_time() {
    let server = MockServer::start(MockConfig::default()).await.unwrap();
    let body = request("claude-sonnet-4-6", "phases");
    assert_eq!(post(&server, "/v1/messages", &body).await.status, 200);
    server.set_config(MockConfig {
        overload_rate: 1.0,
        ..MockConfig::default()
    });
    assert_eq!(post(&server, "/v1/messages", &body).await.status, 529);
    server.set_config(MockConfig::default());
    assert_eq!(post(&server, "/v1/messages", &body).await.status, 200);

    // The same over HTTP, as the CLI's users do; partial configs take defaults.
    let a = post(
        &server,
        "/mock/config",
        &json!({"rate_limit_rate": 1.0, "retry_after": 9}),
    )
    .await;
    assert_eq!(a.status, 200);
    let a = post(&server, "/v1/messages", &body).await;
    assert_api_error(&a, 429, "rate_limit_error");
    assert_eq!(header(&a, "retry-after"), Some("9"));
    let config = get(&server, "/mock/config").await;
    assert_eq!(config.body["rate_limit_rate"], 1.0);
    assert_eq!(config.body["overload_rate"], 0.0);

    post(&server, "/mock/config", &json!({})).await;
    let a = post(
        &server,
        "/mock/script",
        &json!({"model": "claude-sonnet-4-6", "responses": [
            {"kind": "status", "status": 529, "retry_after": "4"},
            {"kind": "spend_limit"},
            {"kind": "ok"},
        ]}),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let a = post(&server, "/v1/messages", &body).await;
    assert_api_error(&a, 529, "overloaded_error");
    assert_eq!(header(&a, "retry-after"), Some("4"));
    let a = post(&server, "/v1/messages", &body).await;
    assert_eq!(
        a.body["error"]["details"]["error_code"],
        "enforced_spend_limit_reached"
    );
    assert_eq!(post(&server, "/v1/messages", &body).await.status, 200);
    // A script for another model does not touch this one.
    post(
        &server,
        "/mock/script",
        &json!({"model": "other", "responses": [{"kind": "status", "status": 500}]}),
    )
    .await;
    assert_eq!(post(&server, "/v1/messages", &body).await.status, 200);

    let bad = post_raw(&server, "/mock/config", "{\"overload_rate\": \"high\"}").await;
    assert_api_error(&bad, 400, "invalid_request_error");
}

#[tokio::test]
async fn latency_and_delays_are_applied() {
    let server = MockServer::start(MockConfig {
        latency_ms: 600,
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let body = request("claude-sonnet-4-6", "slow");
    let t = Instant::now();
    assert_eq!(post(&server, "/v1/messages", &body).await.status, 200);
    assert!(
        t.elapsed() >= Duration::from_millis(600),
        "{:?}",
        t.elapsed()
    );

    let t = Instant::now();
    let s = post_stream(&server, &body).await;
    assert_eq!(s.status, 200);
    assert!(
        t.elapsed() >= Duration::from_millis(600),
        "{:?}",
        t.elapsed()
    );

    // A new config replaces the latency (what it reads back is what it applies).
    server.set_config(MockConfig::default());
    let config: serde_json::Value = client()
        .get(format!("{}/mock/config", server.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(config["latency_ms"], 0, "{config}");

    server.script(None, vec![Scripted::Delay { ms: 400 }]);
    let t = Instant::now();
    let a = post(&server, "/v1/messages", &body).await;
    assert_eq!(a.status, 200);
    assert!(
        t.elapsed() >= Duration::from_millis(400),
        "{:?}",
        t.elapsed()
    );

    // A client timeout shorter than the delay fails: what timeout tests rely on.
    server.script(None, vec![Scripted::Delay { ms: 2_000 }]);
    let result = client()
        .post(format!("{}/v1/messages", server.url()))
        .timeout(Duration::from_millis(200))
        .body(body.to_string())
        .send()
        .await;
    assert!(result.is_err_and(|e| e.is_timeout()));
}

#[tokio::test]
async fn count_tokens_models_and_unknown_paths() {
    let server = MockServer::start(MockConfig::default()).await.unwrap();
    let small = post(
        &server,
        "/v1/messages/count_tokens",
        &request("claude-haiku-4-5", "hi"),
    )
    .await;
    assert_eq!(small.status, 200);
    let obj = small.body.as_object().unwrap();
    assert_eq!(obj.len(), 1, "{}", small.body);
    let n = small.body["input_tokens"].as_u64().unwrap();
    assert!(n > 0);
    let long = request("claude-haiku-4-5", &"many words here ".repeat(100));
    let big = post(&server, "/v1/messages/count_tokens", &long).await;
    assert!(big.body["input_tokens"].as_u64().unwrap() > n + 300);
    // The plain answer's input_tokens agree with count_tokens for the same body.
    let answer = post(&server, "/v1/messages", &long).await;
    let counted = big.body["input_tokens"].as_u64().unwrap();
    let used = answer.body["usage"]["input_tokens"].as_u64().unwrap();
    assert!(used.abs_diff(counted) < 10, "{used} vs {counted}");

    let models = get(&server, "/v1/models").await;
    assert_eq!(models.status, 200);
    let data = models.body["data"].as_array().unwrap();
    assert!(!data.is_empty());
    for m in data {
        assert_eq!(m["type"], "model");
        assert!(
            m["id"].is_string() && m["display_name"].is_string() && m["created_at"].is_string()
        );
    }
    assert_eq!(models.body["has_more"], false);
    assert_eq!(models.body["first_id"], data[0]["id"]);
    assert_eq!(models.body["last_id"], data[data.len() - 1]["id"]);
    assert!(header(&models, "request-id").is_some());

    let one = get(
        &server,
        &format!("/v1/models/{}", data[0]["id"].as_str().unwrap()),
    )
    .await;
    assert_eq!(one.body, data[0]);

    assert_api_error(&get(&server, "/v1/nothing").await, 404, "not_found_error");
    assert_api_error(&get(&server, "/elsewhere").await, 404, "not_found_error");
    assert_api_error(
        &get(&server, "/v1/models/claude-nope").await,
        404,
        "not_found_error",
    );
}

#[tokio::test]
async fn shutdown_stops_the_server() {
    let server = MockServer::start(MockConfig::default()).await.unwrap();
    let url = server.url();
    assert!(url.starts_with("http://127.0.0.1:") && !url.ends_with('/'));
    assert_eq!(url, format!("http://{}", server.addr()));
    assert_eq!(get(&server, "/v1/models").await.status, 200);
    server.shutdown().await;
    let fresh = reqwest::Client::new();
    assert!(fresh.get(format!("{url}/v1/models")).send().await.is_err());
}

#[tokio::test]
async fn serve_runs_until_its_shutdown_future_completes() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(fallthrough::mock::serve(
        listener,
        MockConfig::default(),
        async {
            let _ = stopped.await;
        },
    ));
    let response = reqwest::Client::new()
        .get(format!("http://{addr}/mock/stats"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    drop(response);
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .expect("serve returns after shutdown")
        .unwrap()
        .unwrap();
}

fn batch_request(custom_id: &str, text: &str) -> Value {
    json!({"custom_id": custom_id, "params": {"model": "claude-sonnet-4-6", "max_tokens": 16,
        "messages": [{"role": "user", "content": text}]}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_batches_are_created_listed_canceled_and_answered_as_messages_would_be() {
    let server = MockServer::start(MockConfig {
        batch_latency_ms: 3_600_000,
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let created = post(
        &server,
        "/v1/messages/batches",
        &json!({"requests": [batch_request("a", "one"), batch_request("b", "two")]}),
    )
    .await;
    assert_eq!(created.status, 200);
    let id = created.body["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("msgbatch_"));
    assert_eq!(created.body["processing_status"], "in_progress");
    assert_eq!(created.body["request_counts"]["processing"], 2);
    let early = get(&server, &format!("/v1/messages/batches/{id}/results")).await;
    assert_eq!(early.status, 400, "no results before the end");

    // A second batch, canceled: it ends at once, every request canceled.
    let other = post(
        &server,
        "/v1/messages/batches",
        &json!({"requests": [batch_request("c", "three")]}),
    )
    .await;
    let other_id = other.body["id"].as_str().unwrap().to_owned();
    let canceled = post(
        &server,
        &format!("/v1/messages/batches/{other_id}/cancel"),
        &json!({}),
    )
    .await;
    assert_eq!(canceled.body["processing_status"], "ended");
    assert_eq!(canceled.body["request_counts"]["canceled"], 1);
    let list = get(&server, "/v1/messages/batches").await;
    let ids: Vec<&str> = (list.body["data"].as_array().unwrap().iter())
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [other_id.as_str(), id.as_str()], "newest first");

    // The first ends when its processing time is shortened; each answer is /v1/messages's.
    server.set_config(MockConfig::default());
    let ended = get(&server, &format!("/v1/messages/batches/{id}")).await;
    assert_eq!(ended.body["processing_status"], "ended");
    assert_eq!(ended.body["request_counts"]["succeeded"], 2);
    let url = ended.body["results_url"].as_str().unwrap();
    let results = client()
        .get(format!("{}{url}", server.url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let direct = post(
        &server,
        "/v1/messages",
        &batch_request("a", "one")["params"],
    )
    .await;
    let line: Value = (results.lines())
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|l| l["custom_id"] == "a")
        .unwrap();
    assert_eq!(line["result"]["type"], "succeeded");
    assert_eq!(
        line["result"]["message"], direct.body,
        "the same Message as /v1/messages"
    );

    let streamed = post(
        &server,
        "/v1/messages/batches",
        &json!({"requests": [{"custom_id": "s", "params": {"model": "m", "max_tokens": 1,
            "stream": true, "messages": [{"role": "user", "content": "x"}]}}]}),
    )
    .await;
    assert_eq!(streamed.status, 400, "streaming is not allowed in a batch");
    let twice = post(
        &server,
        "/v1/messages/batches",
        &json!({"requests": [batch_request("d", "x"), batch_request("d", "y")]}),
    )
    .await;
    assert_eq!(twice.status, 400, "custom_ids are unique in a batch");
}
