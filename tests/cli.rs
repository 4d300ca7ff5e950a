//! The binary's script-facing subcommands: `prewarm`, `cache`, `key`, run as a user would,
//! against the in-process mock.

use std::path::Path;
use std::process::{Child, Stdio};

use fallthrough::mock::{MockConfig, MockServer};
use serde_json::{json, Value};

mod support;
use support::bin;

const MODEL: &str = "claude-sonnet-4-6";

fn line(text: &str) -> String {
    json!({"model": MODEL, "max_tokens": 32, "messages": [{"role": "user", "content": text}]})
        .to_string()
}

/// A workload of `n` distinct requests, plus one invalid line (line 3) and one blank line.
fn workload(dir: &Path, n: usize) -> std::path::PathBuf {
    let mut lines: Vec<String> = (0..n).map(|i| line(&format!("question {i}"))).collect();
    lines.insert(2, "{ not json".into());
    lines.insert(4, String::new());
    let path = dir.join("workload.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

/// A config with quick retries, so failing lines fail fast.
fn quick_config(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("fallthrough.toml");
    std::fs::write(
        &path,
        "[retry]\nmax_retries = 1\nbase_delay = \"10ms\"\nmax_delay = \"20ms\"\n",
    )
    .unwrap();
    path
}

fn calls(mock: &MockServer) -> u64 {
    mock.stats()
        .by_model
        .values()
        .flat_map(|s| s.values())
        .sum()
}

fn json_out(output: &std::process::Output) -> Value {
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stdout)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prewarm_fetches_resumes_and_reports_invalid_lines() {
    let mock = MockServer::start(MockConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = workload(dir.path(), 12);
    let cache = dir.path().join("cache");
    let url = mock.url();
    let args = |extra: &[&str]| {
        let mut a = vec!["prewarm", "--upstream", &url, "--cache-dir"];
        a.push(cache.to_str().unwrap());
        a.extend_from_slice(extra);
        a.push(file.to_str().unwrap());
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };

    let dry = bin().args(args(&["--dry-run", "--json"])).output().unwrap();
    assert!(dry.status.success());
    let summary = json_out(&dry);
    assert_eq!(summary["missing"], 12);
    assert_eq!(summary["invalid_lines"], json!([3]));
    assert_eq!(calls(&mock), 0, "a dry run calls nothing upstream");

    let first = bin()
        .args(args(&["--json", "--concurrency", "4"]))
        .output()
        .unwrap();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let summary = json_out(&first);
    assert_eq!(summary["fetched"], 12);
    assert_eq!(summary["already_cached"], 0);
    assert_eq!(summary["failed"], json!([]));
    assert_eq!(calls(&mock), 12);

    let again = bin().args(args(&[])).output().unwrap();
    assert!(again.status.success());
    let text = String::from_utf8_lossy(&again.stdout);
    assert!(text.contains("already cached   12"), "{text}");
    assert!(text.contains("line 3: not JSON ("), "{text}");
    assert_eq!(calls(&mock), 12, "a rerun fetches nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prewarm_exits_1_when_lines_fail_and_uses_no_fallback() {
    let mock = MockServer::start(MockConfig {
        overloaded_models: vec![MODEL.into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fallthrough.toml");
    std::fs::write(
        &config,
        "[retry]\nmax_retries = 1\nbase_delay = \"10ms\"\nmax_delay = \"20ms\"\n\
         [fallback]\n\"claude-sonnet-4-6\" = [\"claude-haiku-4-5\"]\n",
    )
    .unwrap();
    let file = dir.path().join("w.jsonl");
    std::fs::write(&file, line("a") + "\n" + &line("b") + "\n").unwrap();
    let out = bin()
        .args(["prewarm", "--json", "--upstream", &mock.url(), "--config"])
        .arg(&config)
        .arg("--cache-dir")
        .arg(dir.path().join("cache"))
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let summary = json_out(&out);
    assert_eq!(summary["failed"].as_array().unwrap().len(), 2);
    assert_eq!(summary["failed"][0]["status"], 529);
    assert_eq!(summary["failed"][0]["line"], 1);
    // Retried by the engine (2 attempts each), and the fallback was never asked.
    assert_eq!(mock.stats().by_model[MODEL][&529], 4);
    assert!(!mock.stats().by_model.contains_key("claude-haiku-4-5"));
}

/// A `fallthrough serve` child process, killed on drop.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(upstream: &str, cache: &Path) -> Server {
        let (child, url) = support::spawn_serve(upstream, cache, |cmd| {
            cmd.env("RUST_LOG", "warn").stderr(Stdio::null());
        });
        Server { child, url }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prewarmed_entries_answer_while_the_upstream_is_overloaded() {
    let mock = MockServer::start(MockConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = workload(dir.path(), 8);
    let cache = dir.path().join("cache");
    bin()
        .args(["prewarm", "--upstream", &mock.url(), "--cache-dir"])
        .arg(&cache)
        .arg(&file)
        .assert()
        .success();
    mock.set_config(MockConfig {
        overload_rate: 1.0,
        ..Default::default()
    });
    mock.reset_stats();
    let server = Server::start(&mock.url(), &cache);
    let http = reqwest::Client::new();
    for i in 0..8 {
        let r = http
            .post(format!("{}/v1/messages", server.url))
            .header("content-type", "application/json")
            .body(line(&format!("question {i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "request {i}");
        let outcome = r.headers()["x-fallthrough-cache"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(outcome == "disk" || outcome == "memory", "{outcome}");
    }
    assert_eq!(calls(&mock), 0, "only hits");

    // The directory is held: prewarm says to use --server, and --server works.
    let out = bin()
        .args(["prewarm", "--upstream", &mock.url(), "--cache-dir"])
        .arg(&cache)
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--server"));
    mock.set_config(MockConfig::default());
    std::fs::write(
        dir.path().join("more.jsonl"),
        line("new one") + "\n" + &line("question 1"),
    )
    .unwrap();
    let out = bin()
        .args(["prewarm", "--json", "--server", &server.url])
        .arg(dir.path().join("more.jsonl"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = json_out(&out);
    assert_eq!(summary["fetched"], 1);
    assert_eq!(summary["already_cached"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_stats_get_purge_export_import() {
    let mock = MockServer::start(MockConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = workload(dir.path(), 5);
    let cache = dir.path().join("cache");
    let quick = quick_config(dir.path());
    bin()
        .args(["prewarm", "--upstream", &mock.url(), "--config"])
        .arg(&quick)
        .arg("--cache-dir")
        .arg(&cache)
        .arg(&file)
        .assert()
        .success();
    let cache_cmd = |args: &[&str]| {
        let mut c = bin();
        c.arg("cache").arg("--cache-dir").arg(&cache).args(args);
        c
    };
    let stats = json_out(&cache_cmd(&["stats", "--json"]).output().unwrap());
    assert_eq!(stats["entries"], 5);
    assert_eq!(stats["fresh"], 5);
    assert_eq!(stats["by_model"][MODEL], 5);

    // get: the key the proxy would use, as `key` prints it.
    std::fs::write(dir.path().join("q0.json"), line("question 0")).unwrap();
    let key_of = |cache: &Path| {
        let out = bin()
            .arg("key")
            .arg(dir.path().join("q0.json"))
            .arg("--cache-dir")
            .arg(cache)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap()
            .to_owned()
    };
    let key = key_of(&cache);
    let got = cache_cmd(&["get", &key]).output().unwrap();
    assert!(got.status.success());
    let body: Value = serde_json::from_slice(&got.stdout).unwrap();
    assert_eq!(body["model"], MODEL);
    cache_cmd(&["get", &"0".repeat(64)]).assert().failure();

    // export, then import into another directory: the same entries, byte for byte.
    let export = dir.path().join("export.jsonl");
    cache_cmd(&["export"]).arg(&export).assert().success();
    // The key secret's line, then one line an entry.
    assert_eq!(std::fs::read_to_string(&export).unwrap().lines().count(), 6);
    let other = dir.path().join("other");
    bin()
        .args(["cache", "--cache-dir"])
        .arg(&other)
        .arg("import")
        .arg(&export)
        .assert()
        .success()
        .stdout(predicates::str::contains("imported 5"));
    // The empty cache took the export's key secret: its keys are the exporter's.
    assert_eq!(key_of(&other), key);
    let again = dir.path().join("again.jsonl");
    bin()
        .args(["cache", "--cache-dir"])
        .arg(&other)
        .arg("export")
        .arg(&again)
        .assert()
        .success();
    let sorted = |p: &Path| {
        let mut l: Vec<String> = std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(String::from)
            .collect();
        l.sort();
        l
    };
    assert_eq!(sorted(&export), sorted(&again));

    // An invalid import line is reported by number and fails the command.
    std::fs::write(dir.path().join("bad.jsonl"), "{\"key\":\"zz\"}\n").unwrap();
    bin()
        .args(["cache", "--cache-dir"])
        .arg(&other)
        .arg("import")
        .arg(dir.path().join("bad.jsonl"))
        .assert()
        .failure()
        .stdout(predicates::str::contains("[1]"));

    // purge
    cache_cmd(&["purge", "--expired"])
        .assert()
        .success()
        .stdout(predicates::str::contains("removed 0"));
    cache_cmd(&["purge", "--older-than", "1h"])
        .assert()
        .success()
        .stdout(predicates::str::contains("removed 0"));
    // Entries written by an earlier process are older than 0 s (a process starts in more
    // than the clock's millisecond): no need to wait for them to age.
    cache_cmd(&["purge", "--older-than", "0s"])
        .assert()
        .success()
        .stdout(predicates::str::contains("removed 5"));
    bin()
        .args(["cache", "--cache-dir"])
        .arg(&other)
        .args(["purge", "--all"])
        .assert()
        .success()
        .stdout(predicates::str::contains("removed 5"));
    let stats = json_out(&cache_cmd(&["stats", "--json"]).output().unwrap());
    assert_eq!(stats["entries"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_matches_the_proxy_and_diff_names_the_field() {
    let mock = MockServer::start(MockConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let a = json!({"model": MODEL, "max_tokens": 32, "temperature": 1, "messages": [{"role": "user", "content": "hi"}]});
    let b = json!({"messages": [{"content": "hi", "role": "user"}], "max_tokens": 32, "temperature": 1.0, "model": MODEL, "stream": true});
    let c = json!({"model": MODEL, "max_tokens": 32, "temperature": 0.5, "messages": [{"role": "user", "content": "hi"}]});
    for (name, v) in [("a", &a), ("b", &b), ("c", &c)] {
        std::fs::write(dir.path().join(format!("{name}.json")), v.to_string()).unwrap();
    }
    let cache = dir.path().join("cache");
    let out = bin()
        .arg("key")
        .arg(dir.path().join("a.json"))
        .args(["--header", "x-api-key: sk-ant-key-1", "--cache-dir"])
        .arg(&cache)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut lines = text.lines();
    let canonical: Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(canonical["body"]["temperature"], 1);
    assert!(!text.contains("sk-ant-key-1"), "the credential is printed");
    let key = lines.next().unwrap();
    assert_eq!(key.len(), 64);

    // The proxy computes the same key for the same request and credential on that cache (keyed
    // with its secret); another cache's secret gives another key.
    let server = Server::start(&mock.url(), &cache);
    let r = reqwest::Client::new()
        .post(format!("{}/v1/messages", server.url))
        .header("x-api-key", "sk-ant-key-1")
        .header("content-type", "application/json")
        .body(a.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-fallthrough-key"].to_str().unwrap(), key);
    let elsewhere = bin()
        .arg("key")
        .arg(dir.path().join("a.json"))
        .args(["--header", "x-api-key: sk-ant-key-1", "--cache-dir"])
        .arg(dir.path().join("elsewhere"))
        .output()
        .unwrap();
    let elsewhere = String::from_utf8_lossy(&elsewhere.stdout).to_string();
    assert_ne!(
        elsewhere.lines().nth(1),
        Some(key),
        "a key depends on its cache's secret"
    );

    bin()
        .arg("key")
        .arg(dir.path().join("a.json"))
        .arg("--diff")
        .arg(dir.path().join("b.json"))
        .arg("--cache-dir")
        .arg(&cache)
        .assert()
        .success()
        .stdout(predicates::str::contains("same key"));
    let out = bin()
        .arg("key")
        .arg(dir.path().join("a.json"))
        .arg("--diff")
        .arg(dir.path().join("c.json"))
        .arg("--cache-dir")
        .arg(&cache)
        .arg("--json")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let report = json_out(&out);
    assert_eq!(report["same"], false);
    assert_eq!(report["differences"][0]["path"], "body.temperature");
    assert_eq!(report["differences"].as_array().unwrap().len(), 1);
}
