//! The Message Batches API, faked: create, retrieve, list, cancel and results (PROTOCOL.md,
//! "Message Batches"). A batch ends `batch_latency_ms` after it was created (the setting as it
//! is when the batch is looked at, so a test can end a long batch by shortening it); its results are
//! decided then, each request answered exactly as `POST /v1/messages` would answer it (the
//! same deterministic Message, the same faults per request, an error as `errored`), or
//! `expired` at `batch_expire_rate`. Batched requests are not counted as `/v1/messages`
//! calls: the stats count them under the batches' paths.

use std::time::{Duration, SystemTime};

use axum::http::Method;
use axum::response::Response;
use rand::Rng;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::routes::{api_error, json_response, messages, not_found, Endpoint};
use super::state::{fault_rng, lock, Shared};

/// Requests a batch may hold.
pub const MAX_REQUESTS: usize = 100_000;

/// One batch as the fake keeps it.
#[derive(Debug)]
pub(super) struct Batch {
    id: String,
    created_at: SystemTime,
    created: Instant,
    requests: Vec<(String, Value)>,
    /// The results, once decided (at the end, or at a cancel).
    results: Option<Vec<Value>>,
    ended_at: Option<SystemTime>,
    canceled: bool,
}

/// Routes under `/v1/messages/batches`; `None` for another path.
pub(super) async fn route(
    shared: &Shared,
    method: &Method,
    path: &str,
    body: &[u8],
    request_id: &str,
) -> Option<Response> {
    let rest = path.strip_prefix("/v1/messages/batches")?;
    let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
    Some(match (method.as_str(), parts.as_slice()) {
        ("POST", []) => create(shared, body, request_id),
        ("GET", []) => list(shared).await,
        ("GET", [id]) => match settled(shared, id).await {
            Some(batch) => json_response(200, batch.to_string()),
            None => not_found(path, request_id),
        },
        ("POST", [id, "cancel"]) => cancel(shared, id, path, request_id).await,
        ("GET", [id, "results"]) => results(shared, id, path, request_id).await,
        _ => api_error(
            405,
            &format!("Method {method} is not allowed for {path}"),
            request_id,
        ),
    })
}

/// `POST /v1/messages/batches`: checks the requests as the API does, then queues them.
fn create(shared: &Shared, body: &[u8], request_id: &str) -> Response {
    let requests = match parse_requests(body) {
        Ok(requests) => requests,
        Err(message) => return api_error(400, &message, request_id),
    };
    let mut batches = lock(&shared.batches);
    let id = format!("msgbatch_{:024x}", rand::random::<u128>() >> 32);
    batches.push(Batch {
        id: id.clone(),
        created_at: SystemTime::now(),
        created: Instant::now(),
        requests,
        results: None,
        ended_at: None,
        canceled: false,
    });
    let batch = batches.last().expect("just pushed");
    json_response(200, describe(batch).to_string())
}

fn parse_requests(body: &[u8]) -> Result<Vec<(String, Value)>, String> {
    let body: Value = serde_json::from_slice(body)
        .map_err(|e| format!("There was an error parsing the body of your request: {e}"))?;
    let Some(list) = body.get("requests").and_then(Value::as_array) else {
        return Err("requests: Field required".into());
    };
    if list.is_empty() || list.len() > MAX_REQUESTS {
        return Err(format!(
            "requests: a batch holds 1 to {MAX_REQUESTS} requests"
        ));
    }
    let mut seen = std::collections::HashSet::new();
    let mut requests = Vec::with_capacity(list.len());
    for (i, r) in list.iter().enumerate() {
        let id = r.get("custom_id").and_then(Value::as_str).unwrap_or("");
        let valid = (1..=64).contains(&id.len())
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !valid {
            return Err(format!(
                "requests.{i}.custom_id: 1 to 64 characters of a-z, A-Z, 0-9, _ and -"
            ));
        }
        if !seen.insert(id) {
            return Err(format!("requests.{i}.custom_id: {id} is used twice"));
        }
        let Some(params) = r.get("params").filter(|p| p.is_object()) else {
            return Err(format!("requests.{i}.params: Field required"));
        };
        if params.get("stream") == Some(&Value::Bool(true)) {
            return Err(format!(
                "requests.{i}.params.stream: streaming is not supported in a batch"
            ));
        }
        super::routes::validate(params, Endpoint::Messages)
            .map_err(|m| format!("requests.{i}.params.{m}"))?;
        requests.push((id.to_owned(), params.clone()));
    }
    Ok(requests)
}

/// The batch `id` as the API shows it, its results decided first if it has ended.
async fn settled(shared: &Shared, id: &str) -> Option<Value> {
    decide_if_ended(shared, id).await?;
    let batches = lock(&shared.batches);
    batches.iter().find(|b| b.id == id).map(describe)
}

/// `GET /v1/messages/batches`: every batch, newest first, on one page.
async fn list(shared: &Shared) -> Response {
    let ids: Vec<String> = lock(&shared.batches).iter().map(|b| b.id.clone()).collect();
    let mut data = Vec::new();
    for id in ids.iter().rev() {
        if let Some(batch) = settled(shared, id).await {
            data.push(batch);
        }
    }
    let page = json!({
        "data": data,
        "has_more": false,
        "first_id": ids.last(),
        "last_id": ids.first(),
    });
    json_response(200, page.to_string())
}

/// `POST …/{id}/cancel`: a batch not yet ended ends now, every request `canceled`.
async fn cancel(shared: &Shared, id: &str, path: &str, request_id: &str) -> Response {
    if decide_if_ended(shared, id).await.is_none() {
        return not_found(path, request_id);
    }
    {
        let mut batches = lock(&shared.batches);
        let batch = batches
            .iter_mut()
            .find(|b| b.id == id)
            .expect("found above");
        if batch.results.is_none() {
            batch.canceled = true;
            let canceled = (batch.requests.iter())
                .map(|(custom_id, _)| json!({"custom_id": custom_id, "result": {"type": "canceled"}}))
                .collect();
            batch.results = Some(canceled);
            batch.ended_at = Some(SystemTime::now());
        }
    }
    match settled(shared, id).await {
        Some(batch) => json_response(200, batch.to_string()),
        None => not_found(path, request_id),
    }
}

/// `GET …/{id}/results`: JSONL, once the batch has ended.
async fn results(shared: &Shared, id: &str, path: &str, request_id: &str) -> Response {
    if decide_if_ended(shared, id).await.is_none() {
        return not_found(path, request_id);
    }
    let batches = lock(&shared.batches);
    let batch = batches.iter().find(|b| b.id == id).expect("found above");
    let Some(results) = &batch.results else {
        let message = format!("Batch {id} is still in progress; its results are not ready");
        return api_error(400, &message, request_id);
    };
    let mut text = String::new();
    for line in results {
        text.push_str(&line.to_string());
        text.push('\n');
    }
    let mut response = json_response(200, text);
    let jsonl = axum::http::HeaderValue::from_static("application/binary");
    response
        .headers_mut()
        .insert(axum::http::header::CONTENT_TYPE, jsonl);
    response
}

/// Decides the results of batch `id` if its time has come. `None` when there is no such batch.
async fn decide_if_ended(shared: &Shared, id: &str) -> Option<()> {
    let latency = Duration::from_millis(lock(&shared.config).batch_latency_ms);
    let requests = {
        let batches = lock(&shared.batches);
        let batch = batches.iter().find(|b| b.id == id)?;
        if batch.results.is_some() || batch.created.elapsed() < latency {
            return Some(());
        }
        batch.requests.clone()
    };
    let (seed, expire_rate) = {
        let config = lock(&shared.config);
        (config.seed, config.batch_expire_rate)
    };
    let mut results = Vec::with_capacity(requests.len());
    for (custom_id, params) in requests {
        let subject = *blake3::hash(custom_id.as_bytes()).as_bytes();
        let result = if fault_rng(seed, &subject, 0).random_bool(expire_rate.clamp(0.0, 1.0)) {
            json!({"type": "expired"})
        } else {
            answered(shared, &params).await
        };
        results.push(json!({"custom_id": custom_id, "result": result}));
    }
    let mut batches = lock(&shared.batches);
    let batch = batches.iter_mut().find(|b| b.id == id)?;
    if batch.results.is_none() {
        batch.results = Some(results);
        batch.ended_at = Some(SystemTime::now());
    }
    Some(())
}

/// What `POST /v1/messages` would answer `params`: a succeeded Message, or the error.
async fn answered(shared: &Shared, params: &Value) -> Value {
    let body = params.to_string();
    let (response, _) = messages(shared, Endpoint::Messages, body.as_bytes(), "batch").await;
    let status = response.status().as_u16();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap_or_default();
    let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    match status {
        200 => json!({"type": "succeeded", "message": value}),
        _ => json!({"type": "errored", "error": value}),
    }
}

/// A batch as the API describes it.
fn describe(batch: &Batch) -> Value {
    let rfc3339 = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
    let count = |kind: &str| {
        (batch.results.iter().flatten())
            .filter(|r| r["result"]["type"] == kind)
            .count()
    };
    let ended = batch.results.is_some();
    json!({
        "id": batch.id,
        "type": "message_batch",
        "processing_status": if ended { "ended" } else if batch.canceled { "canceling" } else { "in_progress" },
        "request_counts": {
            "processing": if ended { 0 } else { batch.requests.len() },
            "succeeded": count("succeeded"),
            "errored": count("errored"),
            "canceled": count("canceled"),
            "expired": count("expired"),
        },
        "created_at": rfc3339(batch.created_at),
        "ended_at": batch.ended_at.map(rfc3339),
        "expires_at": rfc3339(batch.created_at + Duration::from_secs(24 * 3600)),
        "cancel_initiated_at": Value::Null,
        "results_url": ended.then(|| format!("/v1/messages/batches/{}/results", batch.id)),
    })
}
