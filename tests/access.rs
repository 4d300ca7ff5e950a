//! Who may use the proxy (SPEC, "Access"): access tokens, `require_token`, browser safety,
//! through HTTP and the CLI.

mod support;

use fallthrough::config::{AccessConfig, TokenConfig};
use fallthrough::mock::{MockConfig, MockServer};
use fallthrough::server::token_sha256;
use fallthrough::Config;
use serde_json::{json, Value};
use support::proxy::{error_of, header, request, Proxy};

const TOKEN_A: &str = "ft-token-of-team-a";
const TOKEN_B: &str = "ft-token-of-team-b";
const PROXY_KEY: &str = "sk-ant-proxy-default-key";

fn tokens(require_token: Option<bool>) -> Config {
    let token = |name: &str, token: &str| TokenConfig {
        name: name.into(),
        sha256: token_sha256(token),
        admin: false,
    };
    Config {
        access: AccessConfig {
            require_token,
            allowed_origins: vec!["http://localhost:3000".into()],
            tokens: vec![token("team-a", TOKEN_A), token("team-b", TOKEN_B)],
            ..AccessConfig::default()
        },
        ..Config::default()
    }
}

async fn proxy(config: Config) -> Proxy {
    let mock = MockServer::start(MockConfig::default()).await.unwrap();
    Proxy::start_full(mock, config, |b| b.without_fallbacks()).await
}

/// A POST with exactly the headers given (the harness's `post` sends a caller key).
async fn post_with(
    p: &Proxy,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> reqwest::Response {
    let mut r = reqwest::Client::new()
        .post(format!("{}{path}", p.url))
        .body(body.to_owned());
    for (name, value) in headers {
        r = r.header(*name, *value);
    }
    r.send().await.unwrap()
}

type Headers<'a> = &'a [(&'a str, &'a str)];

fn json_body(text: &str) -> String {
    request(text).to_string()
}

#[tokio::test]
async fn tokens_admit_partition_and_never_go_upstream() {
    let p = proxy(tokens(Some(true))).await;
    let body = json_body("who are you");
    let ct = ("content-type", "application/json");

    for refused in [vec![ct], vec![ct, ("x-api-key", "sk-ant-callers-own")]] {
        let r = post_with(&p, "/v1/messages", &refused, &body).await;
        let (status, kind) = error_of(r).await;
        assert_eq!((status, kind.as_str()), (401, "authentication_error"));
    }
    assert_eq!(
        p.mock.stats().requests,
        0,
        "a refused caller reaches nothing"
    );

    let a = post_with(&p, "/v1/messages", &[ct, ("x-api-key", TOKEN_A)], &body).await;
    assert_eq!(a.status(), 200);
    assert_eq!(header(&a, "x-fallthrough-cache"), "miss");
    assert_eq!(p.mock.stats().last_api_key.as_deref(), Some(PROXY_KEY));
    let bearer = format!("Bearer {TOKEN_A}");
    let again = post_with(&p, "/v1/messages", &[ct, ("authorization", &bearer)], &body).await;
    assert_eq!(header(&again, "x-fallthrough-cache"), "memory");
    // The token as the bearer next to a placeholder key (the SDKs send both when both are
    // configured): admitted, as team-a.
    let both = [ct, ("x-api-key", "placeholder"), ("authorization", &bearer)];
    let placeholder = post_with(&p, "/v1/messages", &both, &body).await;
    assert_eq!(header(&placeholder, "x-fallthrough-cache"), "memory");

    let b = post_with(&p, "/v1/messages", &[ct, ("x-api-key", TOKEN_B)], &body).await;
    assert_eq!(
        header(&b, "x-fallthrough-cache"),
        "miss",
        "two tokens never share"
    );
    assert_ne!(
        header(&a, "x-fallthrough-key"),
        header(&b, "x-fallthrough-key")
    );
    assert_eq!(p.mock.stats().requests, 2);

    // Passed-through paths are admitted the same way, and get the proxy's key too.
    let models = |key: Option<&'static str>| {
        let mut r = reqwest::Client::new().get(format!("{}/v1/models", p.url));
        if let Some(key) = key {
            r = r.header("x-api-key", key);
        }
        r.send()
    };
    assert_eq!(models(None).await.unwrap().status(), 401);
    assert_eq!(models(Some(TOKEN_B)).await.unwrap().status(), 200);
    assert_eq!(p.mock.stats().last_api_key.as_deref(), Some(PROXY_KEY));

    let metrics = reqwest::Client::new()
        .get(format!("{}/metrics", p.url))
        .header("authorization", format!("Bearer {TOKEN_B}"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"fallthrough_caller_requests_total{caller="team-a"} 3"#),
        "{metrics}"
    );
    assert!(!metrics.contains("ft-token"), "{metrics}");
    let dir = p.shutdown().await;
    assert_no_file_holds(dir.path(), &[TOKEN_A, TOKEN_B]);
}

#[tokio::test]
async fn without_require_token_a_caller_may_bring_its_own_key() {
    let p = proxy(tokens(Some(false))).await;
    let body = json_body("own key");
    let ct = ("content-type", "application/json");
    let own = post_with(
        &p,
        "/v1/messages",
        &[ct, ("x-api-key", "sk-ant-callers-own")],
        &body,
    )
    .await;
    assert_eq!(own.status(), 200);
    assert_eq!(
        p.mock.stats().last_api_key.as_deref(),
        Some("sk-ant-callers-own")
    );
    let none = post_with(&p, "/v1/messages", &[ct], &body).await;
    assert_eq!(none.status(), 200);
    assert_eq!(
        header(&none, "x-fallthrough-cache"),
        "miss",
        "no key is another partition"
    );
    assert_eq!(p.mock.stats().last_api_key.as_deref(), Some(PROXY_KEY));
    let token = post_with(&p, "/v1/messages", &[ct, ("x-api-key", TOKEN_A)], &body).await;
    assert_eq!(
        header(&token, "x-fallthrough-cache"),
        "miss",
        "a token is its own partition"
    );
    assert_eq!(p.mock.stats().last_api_key.as_deref(), Some(PROXY_KEY));
    assert_eq!(p.mock.stats().requests, 3);

    // One placeholder key, two bearers: two callers, two partitions.
    let with_bearer = |bearer: &'static str| {
        let headers = [ct, ("x-api-key", "placeholder"), ("authorization", bearer)];
        let (p, body) = (&p, &body);
        async move { post_with(p, "/v1/messages", &headers, body).await }
    };
    let first = with_bearer("Bearer sk-ant-oat-first").await;
    let second = with_bearer("Bearer sk-ant-oat-second").await;
    assert_eq!(header(&first, "x-fallthrough-cache"), "miss");
    assert_eq!(
        header(&second, "x-fallthrough-cache"),
        "miss",
        "a shared placeholder key does not share answers across bearers"
    );
}

#[tokio::test]
async fn browser_requests_are_refused_before_anything_is_spent() {
    let p = proxy(Config::default()).await;
    let body = json_body("from a web page");
    let key = ("x-api-key", "sk-ant-caller-key");
    let json = ("content-type", "application/json");
    let cases: [(Headers, u16, &str); 5] = [
        (
            &[key, ("content-type", "text/plain")],
            415,
            "invalid_request_error",
        ),
        (&[key], 415, "invalid_request_error"),
        (
            &[key, json, ("origin", "https://evil.example")],
            403,
            "permission_error",
        ),
        (
            &[key, json, ("host", "evil.example:8787")],
            403,
            "permission_error",
        ),
        (
            &[key, ("content-type", "application/x-www-form-urlencoded")],
            415,
            "invalid_request_error",
        ),
    ];
    for (headers, status, kind) in cases {
        let r = post_with(&p, "/v1/messages", headers, &body).await;
        assert_eq!(error_of(r).await, (status, kind.to_owned()), "{headers:?}");
    }
    // A rebinding page reading a passed-through path, or the metrics, is refused too.
    let rebound = reqwest::Client::new()
        .get(format!("{}/v1/models", p.url))
        .header("host", "evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(rebound.status(), 403);
    assert_eq!(
        p.mock.stats().requests,
        0,
        "no refusal reached the upstream"
    );

    // JSON with parameters, a loopback name, and a listed origin (which may read the answer).
    let ok = post_with(
        &p,
        "/v1/messages",
        &[
            key,
            ("content-type", "application/json; charset=utf-8"),
            ("host", "localhost"),
        ],
        &body,
    )
    .await;
    assert_eq!(ok.status(), 200);
    let mut config = Config::default();
    config.access.allowed_origins = vec!["http://localhost:3000/".into()];
    let p = proxy(config).await;
    let listed = post_with(
        &p,
        "/v1/messages",
        &[key, json, ("origin", "http://LOCALHOST:3000")],
        &body,
    )
    .await;
    assert_eq!(listed.status(), 200);
    assert_eq!(
        header(&listed, "access-control-allow-origin"),
        "http://LOCALHOST:3000"
    );
}

#[test]
fn serve_refuses_to_listen_open_beyond_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let out = support::bin()
        .args([
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--upstream",
            "http://127.0.0.1:9",
            "--cache-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("access.tokens"), "{stderr}");
    assert!(stderr.contains("require_token"), "{stderr}");
}

/// `fallthrough token` makes a token whose printed lines admit it; with `RUST_LOG=trace` the
/// token is in no log line and no cache file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_printed_token_admits_its_caller_and_is_never_logged() {
    let out = support::bin().args(["token", "ci"]).output().unwrap();
    assert!(out.status.success());
    let printed = String::from_utf8(out.stdout).unwrap();
    let token = printed.lines().next().unwrap().to_owned();
    assert!(token.starts_with("ft-") && token.len() > 40, "{printed}");
    let config_lines: String = printed.lines().skip(1).map(|l| format!("{l}\n")).collect();
    assert!(
        !config_lines.contains(&token),
        "the config lines hold no secret"
    );

    let mock = MockServer::start(MockConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fallthrough.toml");
    std::fs::write(
        &config,
        format!("[access]\nrequire_token = true\n{config_lines}"),
    )
    .unwrap();
    let cache = dir.path().join("cache");
    // The log goes to a file: at trace level sled alone writes more while opening than a pipe
    // holds before the address is printed, and a pipe read only after that would stall it.
    let log_path = dir.path().join("serve.log");
    let log_file = std::fs::File::create(&log_path).unwrap();
    let (mut child, url) = support::spawn_serve(&mock.url(), &cache, |cmd| {
        cmd.arg("--config")
            .arg(&config)
            .env("RUST_LOG", "trace")
            .env("ANTHROPIC_API_KEY", PROXY_KEY)
            .stderr(log_file);
    });

    let http = reqwest::Client::new();
    let send = |key: &str| {
        http.post(format!("{url}/v1/messages"))
            .header("x-api-key", key)
            .json(&request("token through the binary"))
            .send()
    };
    assert_eq!(send("ft-not-a-listed-token").await.unwrap().status(), 401);
    let r = send(&token).await.unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["type"], json!("message"));
    assert_eq!(mock.stats().last_api_key.as_deref(), Some(PROXY_KEY));

    // SIGTERM: drain, flush, exit 0 (and the log reader sees the end).
    support::terminate(&child);
    assert!(child.wait().unwrap().success());
    let logs = String::from_utf8_lossy(&std::fs::read(&log_path).unwrap()).into_owned();
    assert!(logs.contains("TRACE"), "trace logging was on");
    assert!(!logs.contains(&token), "the token is in the logs");
    assert!(!logs.contains(PROXY_KEY), "the proxy's key is in the logs");
    assert_no_file_holds(&cache, &[&token, PROXY_KEY]);
}

/// No file under `dir` holds any of `secrets`.
fn assert_no_file_holds(dir: &std::path::Path, secrets: &[&str]) {
    let mut stack = vec![dir.to_owned()];
    let mut files = 0;
    while let Some(path) = stack.pop() {
        if path.is_dir() {
            stack.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        files += 1;
        let bytes = std::fs::read(&path).unwrap();
        for secret in secrets {
            let found = bytes.windows(secret.len()).any(|w| w == secret.as_bytes());
            assert!(!found, "{} holds a secret", path.display());
        }
    }
    assert!(files > 0, "the cache wrote files");
}
