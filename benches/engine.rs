//! The engine's hot paths, at 2 KB and 32 KB request bodies: the key, a memory hit and a disk
//! hit through `Client`, a miss through the in-process mock at zero latency (the engine's own
//! overhead), and single-flight fan-in of 32 identical misses.
//!
//! `cargo bench --bench engine`; one group: `cargo bench --bench engine -- key`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fallthrough::key::KeyContext;
use fallthrough::mock::{MockConfig, MockServer};
use fallthrough::{Client, Controls, Outcome, Request};
use serde_json::{json, Value};
use tokio::runtime::Runtime;

const SIZES: [(&str, usize); 2] = [("2KB", 2 * 1024), ("32KB", 32 * 1024)];

/// A realistic request of about `size` bytes: a system prompt, a few turns, a tool.
fn request(size: usize, n: u64) -> Value {
    let turn = "Could you summarise the quarterly report for the support team, keeping the \
                figures, and list three follow-up questions we should ask? ";
    let mut messages = Vec::new();
    let mut len = 600;
    let mut i = 0;
    while len < size {
        let role = if i % 2 == 0 { "user" } else { "assistant" };
        let text = format!("{turn} (turn {i}, request {n})");
        len += text.len() + 40;
        messages.push(json!({"role": role, "content": text}));
        i += 1;
    }
    if messages.len() % 2 == 0 {
        messages.push(json!({"role": "user", "content": format!("and request {n}?")}));
    }
    json!({
        "model": "claude-sonnet-4-6",
        "max_tokens": 1024,
        "temperature": 0.7,
        "system": "You are a concise assistant for an internal support team.",
        "tools": [{"name": "lookup", "description": "look a ticket up",
                   "input_schema": {"type": "object", "properties": {"id": {"type": "string"}}}}],
        "messages": messages,
    })
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn key(c: &mut Criterion) {
    let mut group = c.benchmark_group("key");
    let ctx = KeyContext {
        anthropic_version: Some("2023-06-01".into()),
        ..KeyContext::new("/v1/messages")
    };
    for (name, size) in SIZES {
        let body = request(size, 0).to_string();
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(
            BenchmarkId::new("parse+canonical+blake3", name),
            &body,
            |b, body| {
                b.iter(|| {
                    let value: Value = serde_json::from_str(body).unwrap();
                    ctx.key(&value)
                })
            },
        );
        group.bench_with_input(BenchmarkId::new("streaming", name), &body, |b, body| {
            b.iter(|| ctx.key_of_bytes(body.as_bytes()).unwrap())
        });
    }
    group.finish();
}

async fn client_on(mock: &MockServer, dir: &std::path::Path, memory_bytes: u64) -> Client {
    Client::builder()
        .upstream(mock.url())
        .credential("sk-bench")
        .cache_dir(dir)
        .memory_bytes(memory_bytes)
        .build()
        .await
        .unwrap()
}

/// One call that must end with `outcome` (a miss or bypass with at least one upstream attempt, a
/// hit with none), so that a bench can never time an error or an answer of another kind as if it
/// were what it names.
async fn expect(client: &Client, request: Request, outcome: Outcome) -> fallthrough::Response {
    let r = client
        .execute(request)
        .await
        .unwrap_or_else(|e| panic!("expected a {outcome} answer, got the error {e:#}"));
    assert_eq!(r.outcome, outcome, "expected a {outcome} answer");
    assert_eq!(
        r.attempts > 0,
        matches!(outcome, Outcome::Miss | Outcome::Bypass),
        "{outcome}: {} upstream attempts",
        r.attempts
    );
    r
}

/// Upstream calls the mock has answered, all paths and statuses.
fn mock_calls(mock: &MockServer) -> u64 {
    mock.stats().by_path.values().sum()
}

fn hits(c: &mut Criterion) {
    let rt = runtime();
    let mock = rt
        .block_on(MockServer::start(MockConfig::default()))
        .unwrap();
    let mut group = c.benchmark_group("hit");
    for (name, size) in SIZES {
        let body = request(size, 0).to_string();
        group.throughput(Throughput::Elements(1));

        let dir = tempfile::tempdir().unwrap();
        let client = rt.block_on(client_on(&mock, dir.path(), 64 << 20));
        rt.block_on(client.execute(Request::messages(body.clone())))
            .unwrap();
        let r = rt
            .block_on(client.execute(Request::messages(body.clone())))
            .unwrap();
        assert_eq!(r.outcome, Outcome::Memory);
        group.bench_function(BenchmarkId::new("memory", name), |b| {
            b.to_async(&rt)
                .iter(|| expect(&client, Request::messages(body.clone()), Outcome::Memory))
        });

        // No memory tier: every lookup goes to disk.
        let dir = tempfile::tempdir().unwrap();
        let client = rt.block_on(client_on(&mock, dir.path(), 0));
        rt.block_on(client.execute(Request::messages(body.clone())))
            .unwrap();
        let r = rt
            .block_on(client.execute(Request::messages(body.clone())))
            .unwrap();
        assert_eq!(r.outcome, Outcome::Disk);
        group.bench_function(BenchmarkId::new("disk", name), |b| {
            b.to_async(&rt)
                .iter(|| expect(&client, Request::messages(body.clone()), Outcome::Disk))
        });
    }
    group.finish();
}

fn misses(c: &mut Criterion) {
    let rt = runtime();
    let mock = rt
        .block_on(MockServer::start(MockConfig::default()))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let client = rt.block_on(client_on(&mock, dir.path(), 64 << 20));
    let mut group = c.benchmark_group("miss");
    group.measurement_time(Duration::from_secs(5));
    for (name, size) in SIZES {
        let body = request(size, 0).to_string();
        let controls = Controls {
            no_cache: true,
            no_store: true,
            ..Controls::default()
        };
        let before = mock_calls(&mock);
        let timed = AtomicU64::new(0);
        group.bench_function(BenchmarkId::new("through-mock", name), |b| {
            b.to_async(&rt).iter(|| {
                timed.fetch_add(1, Ordering::Relaxed);
                expect(
                    &client,
                    Request::messages(body.clone()).controls(controls),
                    // `no-cache`: a fetch that skips the look-up is reported as a bypass.
                    Outcome::Bypass,
                )
            })
        });
        // Every timed iteration was one upstream call: nothing was answered another way.
        assert_eq!(
            mock_calls(&mock) - before,
            timed.load(Ordering::Relaxed),
            "through-mock: upstream calls != timed misses"
        );
        // The same upstream called directly, for the engine's overhead by difference.
        let http = reqwest::Client::new();
        let url = format!("{}/v1/messages", mock.url());
        group.bench_function(BenchmarkId::new("mock-direct", name), |b| {
            b.to_async(&rt).iter(|| async {
                let r = http
                    .post(&url)
                    .header("x-api-key", "sk-bench")
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200, "mock-direct: the mock did not answer 200");
                r.bytes().await.unwrap()
            })
        });
    }
    group.finish();
}

fn single_flight(c: &mut Criterion) {
    let rt = runtime();
    let mock = rt
        .block_on(MockServer::start(MockConfig::default()))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let client = rt.block_on(client_on(&mock, dir.path(), 64 << 20));
    let counter = AtomicU64::new(1);
    let mut group = c.benchmark_group("single-flight");
    group.measurement_time(Duration::from_secs(5));
    for (name, size) in SIZES {
        let before = mock_calls(&mock);
        let timed = AtomicU64::new(0);
        group.bench_function(BenchmarkId::new("32-identical-misses", name), |b| {
            b.to_async(&rt).iter(|| {
                timed.fetch_add(1, Ordering::Relaxed);
                let body = request(size, counter.fetch_add(1, Ordering::Relaxed)).to_string();
                let client = client.clone();
                async move {
                    let calls: Vec<_> = (0..32)
                        .map(|_| {
                            tokio::spawn({
                                let client = client.clone();
                                let body = body.clone();
                                async move { client.execute(Request::messages(body)).await }
                            })
                        })
                        .collect();
                    for call in calls {
                        call.await.unwrap().expect("a single-flight miss");
                    }
                }
            })
        });
        // 32 callers, one upstream call each time: single flight held.
        assert_eq!(
            mock_calls(&mock) - before,
            timed.load(Ordering::Relaxed),
            "single flight: upstream calls != rounds of 32"
        );
    }
    group.finish();
}

criterion_group!(benches, key, hits, misses, single_flight);
criterion_main!(benches);
