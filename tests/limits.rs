//! Slow, stalled and too many callers (SPEC, "Limits"), through HTTP on real sockets: none of
//! them wedges the proxy, holds an upstream slot, or makes up an error.
//!
//! Every wait here is for an event (a byte, a close, a count), bounded generously; no test
//! asserts that something took less than a wall-clock time.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use fallthrough::mock::{MockConfig, MockServer};
use fallthrough::Config;
use serde_json::{json, Value};
use support::proxy::{assemble, error_of, header, request, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::timeout;

/// The bound on waiting for an event that must happen.
const EVENTUALLY: Duration = Duration::from_secs(60);
const MODEL: &str = "claude-sonnet-4-5";

/// An upstream whose answers wait at a gate the test opens: a stream sends its head at once,
/// then its text (`deltas` events of 64 KiB) once the gate is open; a plain answer waits for
/// the gate whole.
struct GatedUpstream {
    url: String,
    calls: Arc<AtomicU64>,
    gate: watch::Sender<bool>,
}

impl GatedUpstream {
    async fn start(deltas: usize, open: bool) -> GatedUpstream {
        let calls = Arc::new(AtomicU64::new(0));
        let (gate, opened) = watch::channel(open);
        let counted = calls.clone();
        let app = axum::Router::new().route(
            "/v1/messages",
            axum::routing::post(move |body: Bytes| {
                counted.fetch_add(1, Ordering::SeqCst);
                let mut opened = opened.clone();
                async move {
                    let request: Value = serde_json::from_slice(&body).unwrap();
                    if request["stream"] != json!(true) {
                        let _ = opened.wait_for(|open| *open).await;
                        let message = json!({"id": "msg_plain", "type": "message", "role": "assistant",
                            "model": MODEL, "content": [{"type": "text", "text": "plain"}],
                            "stop_reason": "end_turn", "stop_sequence": null,
                            "usage": {"input_tokens": 3, "output_tokens": 1}});
                        return ([("content-type", "application/json")], Body::from(message.to_string()));
                    }
                    let head = futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from(sse_head()))]);
                    let rest = futures_util::stream::once(async move {
                        let _ = opened.wait_for(|open| *open).await;
                        futures_util::stream::iter((0..deltas).map(|_| Ok(Bytes::from(sse_delta()))).chain([Ok(Bytes::from(sse_tail()))]))
                    });
                    use futures_util::StreamExt;
                    let stream = head.chain(rest.flatten());
                    ([("content-type", "text/event-stream")], Body::from_stream(stream))
                }
            }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        GatedUpstream { url, calls, gate }
    }

    fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    fn open(&self) {
        self.gate.send_replace(true);
    }
}

fn sse(event: &str, data: Value) -> String {
    format!("event: {event}\ndata: {data}\n\n")
}

fn sse_head() -> String {
    let start = json!({"type": "message_start", "message": {"id": "msg_1", "type": "message",
        "role": "assistant", "model": MODEL, "content": [], "stop_reason": null,
        "stop_sequence": null, "usage": {"input_tokens": 3, "output_tokens": 1}}});
    let block = json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}});
    sse("message_start", start) + &sse("content_block_start", block)
}

fn sse_delta() -> String {
    let text = "x".repeat(64 * 1024);
    sse(
        "content_block_delta",
        json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}),
    )
}

fn sse_tail() -> String {
    sse(
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
    ) + &sse(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 9}}),
    ) + &sse("message_stop", json!({"type": "message_stop"}))
}

async fn proxy_on(upstream: &str, config: Config, concurrency: usize) -> Proxy {
    let mock = MockServer::start(MockConfig::default()).await.unwrap();
    let upstream = upstream.to_owned();
    Proxy::start_full(mock, config, move |b| {
        b.without_fallbacks()
            .upstream(upstream)
            .max_concurrency(concurrency)
    })
    .await
}

fn limits(tune: impl FnOnce(&mut fallthrough::config::ServerConfig)) -> Config {
    let mut config = Config::default();
    tune(&mut config.server);
    config
}

fn addr(p: &Proxy) -> String {
    p.url.trim_start_matches("http://").to_owned()
}

/// A raw HTTP/1.1 request for `body` (streamed or not), as bytes.
fn raw_request(body: &Value) -> Vec<u8> {
    let body = body.to_string();
    format!(
        "POST /v1/messages HTTP/1.1\r\nhost: 127.0.0.1\r\nx-api-key: sk-ant-caller-key\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Reads until the peer closes (or resets) the connection; returns the bytes read.
async fn read_to_close(tcp: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    timeout(EVENTUALLY, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("the proxy closes the connection");
    all
}

/// `fallthrough_connections_cut_total{reason}` from the proxy's `/metrics`.
async fn cuts(p: &Proxy, reason: &str) -> u64 {
    let metrics = p.metrics().await;
    let line = format!("fallthrough_connections_cut_total{{reason=\"{reason}\"}} ");
    let value = metrics
        .lines()
        .find_map(|l| l.strip_prefix(&line))
        .unwrap_or_else(|| panic!("no {line} in /metrics:\n{metrics}"));
    value.parse().unwrap()
}

fn streamed(text: &str) -> Value {
    let mut body = request(text);
    body["stream"] = json!(true);
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_senders_are_cut_and_everyone_else_is_served() {
    let config = limits(|s| {
        s.header_timeout = Duration::from_millis(500);
        s.body_timeout = Duration::from_millis(500);
    });
    let p = Proxy::start_full(
        MockServer::start(MockConfig::default()).await.unwrap(),
        config,
        |b| b.without_fallbacks(),
    )
    .await;
    let body = request("served while others dawdle");
    assert_eq!(
        p.post("/v1/messages", &body).send().await.unwrap().status(),
        200
    );

    // Slowloris: heads sent a byte at a time, and connections that send nothing at all.
    let mut slow = Vec::new();
    for i in 0..30 {
        let mut tcp = TcpStream::connect(addr(&p)).await.unwrap();
        if i % 2 == 0 {
            tcp.write_all(b"POST /v1/messages HTTP/1.1\r\nho")
                .await
                .unwrap();
        }
        slow.push(tcp);
    }
    let dribbling = tokio::spawn(async move {
        // Keep dribbling until the proxy has cut every one of them.
        for tcp in &mut slow {
            let _ = tcp.write_all(b"s").await;
        }
        let mut cut = 0;
        for tcp in &mut slow {
            read_to_close(tcp).await;
            cut += 1;
        }
        cut
    });
    // Meanwhile hits and /healthz answer.
    for _ in 0..5 {
        let hit = p.post("/v1/messages", &body).send().await.unwrap();
        assert_eq!(header(&hit, "x-fallthrough-cache"), "memory");
        let health = reqwest::get(format!("{}/healthz", p.url)).await.unwrap();
        assert_eq!(health.status(), 200);
    }
    assert_eq!(
        dribbling.await.unwrap(),
        30,
        "every slow sender was disconnected"
    );
    assert_eq!(cuts(&p, "header_timeout").await, 30);
    assert_eq!(cuts(&p, "write_timeout").await, 0);

    // A body that never ends: 408 in the API's shape, the connection closed, nothing upstream.
    let before = p.mock.stats().requests;
    let mut tcp = TcpStream::connect(addr(&p)).await.unwrap();
    tcp.write_all(b"POST /v1/messages HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"model\":")
        .await
        .unwrap();
    let answer = String::from_utf8(read_to_close(&mut tcp).await).unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"type\":\"error\""), "{answer}");
    assert!(answer.contains("body_timeout"), "{answer}");
    assert_eq!(p.mock.stats().requests, before);

    // The admin purge's body too: a busy connection has no other timer.
    let mut tcp = TcpStream::connect(addr(&p)).await.unwrap();
    tcp.write_all(b"POST /fallthrough/purge HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"all\":")
        .await
        .unwrap();
    let answer = String::from_utf8(read_to_close(&mut tcp).await).unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_timeout"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_close_and_the_cap_holds_new_ones_back() {
    // Long enough that the few statements between an answer and the next step never outlast
    // it, even on a loaded machine: the test waits it out once, at the end.
    let config = limits(|s| {
        s.idle_timeout = Duration::from_secs(2);
        s.max_connections = 1;
    });
    let p = Proxy::start_full(
        MockServer::start(MockConfig::default()).await.unwrap(),
        config,
        |b| b.without_fallbacks(),
    )
    .await;
    let health = b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n";
    let mut first = TcpStream::connect(addr(&p)).await.unwrap();
    first.write_all(health).await.unwrap();
    let mut buf = [0u8; 1024];
    let n = first.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));

    // The cap: a second connection is not served while the first is open...
    let second = tokio::spawn({
        let addr = addr(&p);
        async move {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n")
                .await
                .unwrap();
            read_to_close(&mut tcp).await
        }
    });
    // ...and the open one is (keep-alive).
    first.write_all(health).await.unwrap();
    let n = first.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    assert!(
        !second.is_finished(),
        "a connection past the cap was served"
    );
    // The first goes idle and is closed by the proxy; then the second is served.
    read_to_close(&mut first).await;
    let answer = timeout(EVENTUALLY, second).await.unwrap().unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert_eq!(cuts(&p, "idle_timeout").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_holds_no_upstream_slot() {
    // 16 MiB streams: more than the sockets' buffers hold, so a caller that does not read
    // stalls the proxy's writes.
    let upstream = GatedUpstream::start(256, true).await;
    let config = limits(|s| s.write_timeout = Duration::from_secs(2));
    let p = proxy_on(&upstream.url, config, 2).await;
    let mut readers = Vec::new();
    for i in 0..2 {
        let mut tcp = TcpStream::connect(addr(&p)).await.unwrap();
        tcp.write_all(&raw_request(&streamed(&format!("slow reader {i}"))))
            .await
            .unwrap();
        readers.push(tcp); // and never read
    }
    support::eventually("both slow streams reached the upstream", || {
        upstream.calls() == 2
    })
    .await;
    // Both slots are taken by streams nobody reads; a third caller's miss still goes through.
    let third = timeout(
        EVENTUALLY,
        p.post("/v1/messages", &request("a third caller")).send(),
    )
    .await
    .expect("a third caller is answered")
    .unwrap();
    assert_eq!(third.status(), 200);
    assert_eq!(upstream.calls(), 3);
    // Each slow reader's answer is read and stored at the upstream's pace...
    for i in 0..2 {
        let (p, body) = (&p, &streamed(&format!("slow reader {i}")));
        let stored = || async move { p.cached(body).await.status() == 200 };
        support::eventually_async(&format!("slow reader {i}'s answer stored"), stored).await;
    }
    // ...and the readers, which took nothing, are disconnected before the end. Waited for as
    // the event itself: reading first would let the stalled writes go on, and a reader that
    // took the whole answer is kept alive, not cut.
    support::eventually_async("both slow readers cut by the write timeout", || async {
        cuts(&p, "write_timeout").await == 2
    })
    .await;
    for mut tcp in readers {
        let got = read_to_close(&mut tcp).await;
        assert!(
            got.len() < 256 * 64 * 1024,
            "a stalled reader was sent everything"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misses_past_the_queue_bound_are_refused_at_once() {
    let upstream = GatedUpstream::start(0, false).await;
    let config = limits(|s| s.max_queued = 1);
    let p = Arc::new(proxy_on(&upstream.url, config, 1).await);
    let send = |text: &'static str| {
        let p = p.clone();
        tokio::spawn(async move { p.post("/v1/messages", &request(text)).send().await.unwrap() })
    };
    let first = send("holds the only slot");
    support::eventually("the first miss reached the upstream", || {
        upstream.calls() == 1
    })
    .await;
    let second = send("waits in the queue");
    let queued = || async { p.metrics().await.contains("fallthrough_upstream_queued 1") };
    support::eventually_async("the second miss to queue", queued).await;
    let refused = p
        .post("/v1/messages", &request("one too many"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 529);
    assert_eq!(header(&refused, "x-should-retry"), "false");
    assert_eq!(header(&refused, "retry-after"), "1");
    assert_eq!(
        error_of(refused).await,
        (529, "overloaded_error".to_owned())
    );
    // The refused miss made no call; the queued ones are answered once the slot frees.
    assert_eq!(upstream.calls(), 1);
    upstream.open();
    for waiting in [first, second] {
        assert_eq!(waiting.await.unwrap().status(), 200);
    }
    assert_eq!(upstream.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joiners_of_a_streamed_miss_are_fed_live_and_no_store_makes_up_no_error() {
    let upstream = GatedUpstream::start(4, false).await;
    let p = Arc::new(proxy_on(&upstream.url, Config::default(), 8).await);
    let body = streamed("one generation, four readers");
    let start = |no_store: bool| {
        let p = p.clone();
        let body = body.clone();
        async move {
            let mut r = p.post("/v1/messages", &body);
            if no_store {
                r = r.header("cache-control", "no-store");
            }
            let mut response = timeout(EVENTUALLY, r.send())
                .await
                .expect("a live head")
                .unwrap();
            assert_eq!(response.status(), 200);
            // Bytes arrive while the upstream still holds the rest of the answer back.
            let first = timeout(EVENTUALLY, response.chunk())
                .await
                .expect("live bytes")
                .unwrap();
            (response, first.unwrap())
        }
    };
    for no_store in [true, false] {
        let before = upstream.calls();
        upstream.gate.send_replace(false);
        let lead = start(no_store).await;
        let mut readers = vec![lead];
        for _ in 0..3 {
            readers.push(start(no_store).await);
        }
        assert_eq!(
            upstream.calls(),
            before + 1,
            "the joiners made no call of their own"
        );
        // A plain request joining the same flight gets the whole answer, not an error.
        let plain = {
            let p = p.clone();
            let mut body = body.clone();
            body["stream"] = json!(false);
            tokio::spawn(async move {
                let mut r = p.post("/v1/messages", &body);
                if no_store {
                    r = r.header("cache-control", "no-store");
                }
                r.send().await.unwrap()
            })
        };
        upstream.open();
        for (mut response, first) in readers {
            let mut all = first.to_vec();
            while let Some(chunk) = response.chunk().await.unwrap() {
                all.extend_from_slice(&chunk);
            }
            let message = assemble(&all);
            assert_eq!(message["stop_reason"], "end_turn");
            assert_eq!(
                message["content"][0]["text"].as_str().unwrap().len(),
                4 * 64 * 1024
            );
        }
        let plain = plain.await.unwrap();
        assert_eq!(plain.status(), 200, "no-store = {no_store}");
        let plain: Value = plain.json().await.unwrap();
        assert_eq!(plain["type"], "message");
        assert!(upstream.calls() <= before + 2);
    }
}
