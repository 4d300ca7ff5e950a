//! The proxy over real HTTP in front of the in-process mock, for the tests that drive it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fallthrough::mock::{MockConfig, MockServer};
use fallthrough::sse::{Assembler, FrameParser};
use fallthrough::{ClientBuilder, Config};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const MODEL: &str = "claude-sonnet-4-6";

pub struct Proxy {
    pub url: String,
    pub mock: MockServer,
    /// The proxy's own client, to reach its cache.
    pub client: fallthrough::Client,
    pub http: reqwest::Client,
    pub dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl Proxy {
    pub async fn start() -> Proxy {
        Self::start_with(|c| c).await
    }

    pub async fn start_with(tune: impl FnOnce(ClientBuilder) -> ClientBuilder) -> Proxy {
        let mock = MockServer::start(MockConfig::default()).await.unwrap();
        Self::start_on(mock, tune).await
    }

    /// A proxy on `mock` without the default fallback chains (the tests name the chains they
    /// mean), tuned by `tune`.
    pub async fn start_on(
        mock: MockServer,
        tune: impl FnOnce(ClientBuilder) -> ClientBuilder,
    ) -> Proxy {
        Self::start_full(mock, Config::default(), |b| tune(b.without_fallbacks())).await
    }

    pub async fn start_full(
        mock: MockServer,
        config: Config,
        tune: impl FnOnce(ClientBuilder) -> ClientBuilder,
    ) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let builder = ClientBuilder::from_config(config)
            .upstream(mock.url())
            .cache_dir(dir.path().join("cache"))
            .credential("sk-ant-proxy-default-key")
            .retries(2, Duration::from_millis(10), Duration::from_millis(50));
        let client = tune(builder).build().await.unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(fallthrough::server::serve(
            listener,
            client.clone(),
            async {
                let _ = stopped.await;
            },
        ));
        Proxy {
            url,
            mock,
            client,
            http: reqwest::Client::new(),
            dir,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn post(&self, path: &str, body: &Value) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}{path}", self.url))
            .header("x-api-key", "sk-ant-caller-key")
            .header("anthropic-version", "2023-06-01")
            .json(body)
    }

    /// `body` with `cache-control: only-if-cached`: what the cache holds, never an upstream call.
    pub async fn cached(&self, body: &Value) -> reqwest::Response {
        self.post("/v1/messages", body)
            .header("cache-control", "only-if-cached")
            .send()
            .await
            .unwrap()
    }

    pub fn calls(&self, model: &str) -> u64 {
        self.mock
            .stats()
            .by_model
            .get(model)
            .map_or(0, |by_status| by_status.values().sum())
    }

    /// Stops the server (draining, flushing) and hands back its directory.
    /// The proxy's `/metrics` text.
    pub async fn metrics(&self) -> String {
        let r = self.http.get(format!("{}/metrics", self.url)).send().await;
        r.unwrap().text().await.unwrap()
    }

    pub async fn shutdown(mut self) -> tempfile::TempDir {
        self.stop.take().unwrap().send(()).unwrap();
        self.task.take().unwrap().await.unwrap().unwrap();
        self.dir
    }
}

pub fn request(text: &str) -> Value {
    json!({"model": MODEL, "max_tokens": 64, "messages": [{"role": "user", "content": text}]})
}

pub fn header<'a>(r: &'a reqwest::Response, name: &str) -> &'a str {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

pub fn assemble(bytes: &[u8]) -> Value {
    let mut parser = FrameParser::new();
    let mut assembler = Assembler::new();
    for frame in parser.push(bytes) {
        if let Some(message) = assembler.feed(&frame).unwrap() {
            return message;
        }
    }
    panic!("stream ended without message_stop")
}

pub async fn error_of(r: reqwest::Response) -> (u16, String) {
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["type"], "error", "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
    (status, body["error"]["type"].as_str().unwrap().to_owned())
}

/// An upstream that answers every `/v1/messages` with `message` as it is written (key order
/// included), counting the calls.
pub async fn fixed_upstream(message: &'static str) -> (String, std::sync::Arc<AtomicU64>) {
    let calls = std::sync::Arc::new(AtomicU64::new(0));
    let counted = calls.clone();
    let app = axum::Router::new().route(
        "/v1/messages",
        axum::routing::post(move || {
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                ([("content-type", "application/json")], message)
            }
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, calls)
}

/// A refusal with `stop_details`, a tool input whose keys are not sorted, and the nested
/// `cache_creation` usage object: what a replay used to lose or move.
pub const FAITHFUL: &str = r#"{"id":"msg_01","type":"message","role":"assistant","model":"claude-sonnet-4-6","content":[{"type":"text","text":"I will look."},{"type":"tool_use","id":"toolu_01","name":"search","input":{"zeta":1,"alpha":{"y":2,"b":3}}}],"stop_reason":"refusal","stop_sequence":null,"stop_details":{"category":"cyber","explanation":"Not this one."},"usage":{"input_tokens":12,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"cache_creation":{"ephemeral_5m_input_tokens":0,"ephemeral_1h_input_tokens":0},"output_tokens":9,"service_tier":"standard"}}"#;
