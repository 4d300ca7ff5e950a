//! The load benchmark's ceiling (`benches/load.sh`): a bare HTTP server (hyper 1 under axum)
//! answering every request with one fixed ~2 KB Messages API answer from memory — no parsing,
//! no lookup, no logging. What `fallthrough serve` does on a memory hit, minus the cache.
//!
//! The body is a valid, complete Message, so the script can also use this server as the
//! upstream that warms the caches it compares (nginx `proxy_cache`, `fallthrough serve`): every
//! hit scenario then returns these very bytes.
//!
//! ```sh
//! cargo run --release --example fixed_body -- 127.0.0.1:0   # prints `fixed body listening on http://ADDR`
//! ```

use std::io::Write;

use axum::body::Bytes;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Router;

/// Size the answer's text is padded to, so that the whole body is about 2 KB.
const TARGET_BYTES: usize = 2048;

/// A complete Message (type, content, stop_reason), about [`TARGET_BYTES`] long.
fn fixed_body() -> Bytes {
    let build = |text: &str| {
        serde_json::json!({
            "id": "msg_01FixedBodyBenchmark0000",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-6",
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "stop_sequence": null,
            "usage": {
                "input_tokens": 512,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "output_tokens": 400,
                "service_tier": "standard",
            },
        })
        .to_string()
    };
    let overhead = build("").len();
    let words = "The quick brown fox jumps over the lazy dog. ";
    let text: String = words
        .chars()
        .cycle()
        .take(TARGET_BYTES.saturating_sub(overhead))
        .collect();
    Bytes::from(build(&text))
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".to_owned());
    let body = fixed_body();
    let app = Router::new().fallback(move || {
        // A clone of `Bytes` is a reference count, not a copy.
        let body = body.clone();
        async move { answer(body) }
    });
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("fixed body listening on http://{}", listener.local_addr()?);
    std::io::stdout().flush()?;
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
}

fn answer(body: Bytes) -> Response {
    let mut out = body.into_response();
    out.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    out
}
