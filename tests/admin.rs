//! The cache's administration over a running proxy: the admin endpoints, and `fallthrough
//! cache stats|get|purge --server URL`, which a user runs when `serve` holds the directory.

mod support;

use std::process::Stdio;

use fallthrough::mock::{MockConfig, MockServer};
use fallthrough::server::token_sha256;
use serde_json::Value;
use support::bin;
use support::proxy::request;

struct Serve {
    child: std::process::Child,
    url: String,
    cache: tempfile::TempDir,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(mock: &MockServer, config: &str) -> Serve {
    let cache = tempfile::tempdir().unwrap();
    let file = cache.path().join("fallthrough.toml");
    std::fs::write(&file, config).unwrap();
    let (child, url) = support::spawn_serve(&mock.url(), &cache.path().join("cache"), |cmd| {
        cmd.arg("--config")
            .arg(&file)
            .env("RUST_LOG", "warn")
            .env("ANTHROPIC_API_KEY", "sk-ant-proxy-key")
            .stderr(Stdio::null());
    });
    Serve { child, url, cache }
}

async fn ask(url: &str, key: &str, text: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{url}/v1/messages"))
        .header("x-api-key", key)
        .json(&request(text))
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_get_and_purge_through_a_running_proxy() {
    let mock = MockServer::start(MockConfig::default()).await.unwrap();
    let s = serve(&mock, "");
    let mut keys = Vec::new();
    for n in 0..3 {
        let r = ask(&s.url, "sk-ant-caller", &format!("admin question {n}")).await;
        assert_eq!(r.status(), 200);
        keys.push(
            r.headers()["x-fallthrough-key"]
                .to_str()
                .unwrap()
                .to_owned(),
        );
    }
    // The directory is held: the CLI says to use --server, and with it, works.
    let held = bin()
        .args(["cache", "stats", "--cache-dir"])
        .arg(s.cache.path().join("cache"))
        .output()
        .unwrap();
    assert!(!held.status.success());
    assert!(String::from_utf8_lossy(&held.stderr).contains("--server"));
    let out = bin()
        .args(["cache", "stats", "--json", "--server", &s.url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stats: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stats["entries"], 3);
    assert_eq!(stats["fresh"], 3);

    let got = bin()
        .args(["cache", "--server", &s.url, "get", &keys[0]])
        .output()
        .unwrap();
    assert!(got.status.success());
    let body: Value = serde_json::from_slice(&got.stdout).unwrap();
    assert_eq!(body["type"], "message");
    assert!(String::from_utf8_lossy(&got.stderr).contains("fresh"));
    let missing = bin()
        .args(["cache", "--server", &s.url, "get", &"0".repeat(64)])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));

    let purged = bin()
        .args(["cache", "purge", "--all", "--server", &s.url])
        .output()
        .unwrap();
    assert!(purged.status.success());
    assert!(String::from_utf8_lossy(&purged.stdout).contains("removed 3"));
    // Gone from memory too: the same question is a miss again.
    let again = ask(&s.url, "sk-ant-caller", "admin question 0").await;
    assert_eq!(again.headers()["x-fallthrough-cache"], "miss");
    let by_namespace = reqwest::Client::new()
        .post(format!("{}/fallthrough/purge", s.url))
        .json(&serde_json::json!({"namespace": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(by_namespace.status(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tokens_only_admin_tokens_administer() {
    let mock = MockServer::start(MockConfig::default()).await.unwrap();
    let config = format!(
        "[access]\nrequire_token = true\n\
         [[access.tokens]]\nname = \"ops\"\nsha256 = \"{}\"\nadmin = true\n\
         [[access.tokens]]\nname = \"app\"\nsha256 = \"{}\"\n",
        token_sha256("ft-ops"),
        token_sha256("ft-app")
    );
    let s = serve(&mock, &config);
    assert_eq!(
        ask(&s.url, "ft-app", "tokened question").await.status(),
        200
    );
    let stats_as = |key: Option<&str>| {
        let mut cmd = bin();
        cmd.args(["cache", "stats", "--json", "--server", &s.url]);
        if let Some(key) = key {
            cmd.env("ANTHROPIC_API_KEY", key);
        }
        cmd.output().unwrap()
    };
    for (key, refused) in [(None, "401"), (Some("ft-app"), "403")] {
        let out = stats_as(key);
        assert_eq!(out.status.code(), Some(1), "{key:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(refused), "{key:?}: {stderr}");
    }
    let out = stats_as(Some("ft-ops"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stats: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stats["entries"], 1);
}
