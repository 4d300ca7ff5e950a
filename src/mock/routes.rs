//! The HTTP face: one dispatcher, the `/v1` routes with their faults, the control routes,
//! and answers and errors in the API's shape.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::Response;
use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::error::{error_body, error_type_for_status};
use crate::key::canonical_body;
use crate::sse;

use super::answer::*;
use super::state::*;
use super::{MockConfig, MockStats, ScriptRequest, Scripted};

/// The real API's body limit for messages and count_tokens.
pub(super) const MAX_BODY_BYTES: usize = crate::config::API_MAX_BODY_BYTES as usize;

pub(super) const MODELS: &[(&str, &str, &str)] = &[
    ("claude-opus-4-6", "Claude Opus 4.6", "2025-08-05T00:00:00Z"),
    (
        "claude-sonnet-4-6",
        "Claude Sonnet 4.6",
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
pub(super) async fn dispatch(
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
        shared.record_request(&path, uri.query(), &headers);
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
    if is_api {
        // As the API sends them on every answer; the fake does not count.
        let limit = HeaderValue::from_static("4000");
        (response.headers_mut()).insert("anthropic-ratelimit-requests-limit", limit);
    }
    response
}

/// `/v1/*`; returns the answer and the model it was for, when the body named one. Answers
/// depend only on the body; headers are only recorded in the stats.
pub(super) async fn api_route(
    shared: &Shared,
    method: &Method,
    path: &str,
    body: Bytes,
    request_id: &str,
) -> (Response, Option<String>) {
    if let Some(response) = super::batches::route(shared, method, path, &body, request_id).await {
        return (response, None);
    }
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
pub(super) enum Endpoint {
    Messages,
    CountTokens,
}

pub(super) async fn messages(
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
        Some(Scripted::NoRetry { status }) => Some(Fault::NoRetry(status)),
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
        Some(Fault::NoRetry(status)) => {
            let mut response = status_error(status, None, request_id);
            let no = HeaderValue::from_static("false");
            response.headers_mut().insert("x-should-retry", no);
            response
        }
        Some(Fault::SpendLimit) => spend_limit(request_id),
        Some(Fault::StreamError(_)) if !stream => status_error(529, None, request_id),
        Some(Fault::StreamCut(_)) if !stream => status_error(500, None, request_id),
        fault => match endpoint {
            Endpoint::CountTokens => {
                let tokens = input_tokens(&canonical_body(&request));
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
pub(super) fn validate(request: &Value, endpoint: Endpoint) -> Result<(), String> {
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

pub(super) fn control_route(
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

pub(super) fn models_list() -> Response {
    let data: Vec<Value> = MODELS.iter().map(|m| model_json(*m)).collect();
    let body = json!({
        "data": data,
        "has_more": false,
        "first_id": MODELS.first().map(|m| m.0),
        "last_id": MODELS.last().map(|m| m.0),
    });
    json_response(200, body.to_string())
}

pub(super) fn model_get(id: &str, request_id: &str) -> Response {
    match MODELS.iter().find(|m| m.0 == id) {
        Some(m) => json_response(200, model_json(*m).to_string()),
        None => api_error(404, &format!("model: {id}"), request_id),
    }
}

pub(super) fn model_json((id, display_name, created_at): (&str, &str, &str)) -> Value {
    json!({"type": "model", "id": id, "display_name": display_name, "created_at": created_at})
}

pub(super) fn json_response(status: u16, body: String) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// `{"type":"error","error":{"type":..,"message":..},"request_id":..}` with the status's type.
pub(super) fn api_error(status: u16, message: &str, request_id: &str) -> Response {
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

pub(super) fn not_found(path: &str, request_id: &str) -> Response {
    api_error(404, &format!("Not found: {path}"), request_id)
}

pub(super) fn status_error(status: u16, retry_after: Option<&str>, request_id: &str) -> Response {
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

pub(super) fn spend_limit(request_id: &str) -> Response {
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
pub(super) enum StreamEnd {
    Complete,
    /// After N events, an `overloaded_error` event, then the end of the body.
    Error(usize),
    /// After N events, the body breaks off (hyper drops the connection mid-body).
    Cut(usize),
}

/// Sends `message` as the API's event stream, one event per body chunk, with a `ping` after
/// `message_start` as the real API does. A fault's N is capped below the event count so the
/// fault always happens before `message_stop`.
pub(super) fn stream_response(message: &Value, end: StreamEnd) -> Response {
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
