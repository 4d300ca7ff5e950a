//! Prewarming through the Message Batches API (SPEC, "Prewarming through the Message Batches
//! API"): `fallthrough prewarm --batch` against the fake's Batches API, then `serve` on the same
//! cache directory.

mod support;

use std::path::Path;
use std::process::Stdio;

use fallthrough::mock::{MockConfig, MockServer};
use serde_json::{json, Value};
use support::bin;

const KEY: &str = "sk-ant-batch-key";

fn line(model: &str, text: &str) -> String {
    json!({"model": model, "max_tokens": 32, "messages": [{"role": "user", "content": text}]})
        .to_string()
}

fn write_lines(dir: &Path, lines: &[String]) -> std::path::PathBuf {
    let file = dir.join("lines.jsonl");
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    file
}

/// `prewarm --batch --json` over `cache`; the exit code and the summary.
fn prewarm(mock: &MockServer, cache: &Path, file: &Path, more: &[&str]) -> (i32, Value) {
    let out = bin()
        .args(["prewarm", "--batch", "--json", "--poll-interval", "50ms"])
        .arg(file)
        .args(["--upstream", &mock.url(), "--cache-dir"])
        .arg(cache)
        .args(more)
        .env("ANTHROPIC_API_KEY", KEY)
        .output()
        .unwrap();
    let summary = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not a JSON summary ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), summary)
}

fn failed_lines(summary: &Value) -> Vec<(u64, String)> {
    (summary["failed"].as_array().unwrap().iter())
        .map(|f| {
            let result = f["result"].as_str().unwrap().to_owned();
            (f["line"].as_u64().unwrap(), result)
        })
        .collect()
}

/// `POST /v1/messages` calls the fake answered, of any status.
fn messages_calls(mock: &MockServer) -> u64 {
    mock.stats()
        .by_model
        .values()
        .flat_map(|by_status| by_status.values())
        .sum()
}

fn batch_creations(mock: &MockServer) -> u64 {
    mock.stats()
        .by_path
        .get("/v1/messages/batches")
        .copied()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_line_is_cached_from_batches_and_served_as_a_hit() {
    let mock = MockServer::start(MockConfig {
        batch_latency_ms: 1000,
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let mut streamed: Value = serde_json::from_str(&line("claude-sonnet-4-6", "streamed")).unwrap();
    streamed["stream"] = json!(true);
    let lines = [
        line("claude-sonnet-4-6", "first"),
        line("claude-haiku-4-5", "second"),
        streamed.to_string(),
        line("claude-sonnet-4-6", "first"),
    ];
    let file = write_lines(dir.path(), &lines);

    let (code, dry) = prewarm(&mock, &cache, &file, &["--dry-run"]);
    assert_eq!(code, 0);
    assert_eq!(
        (dry["would_submit"].as_u64(), dry["would_batches"].as_u64()),
        (Some(3), Some(1))
    );
    assert_eq!(batch_creations(&mock), 0, "a dry run submits nothing");

    let (code, summary) = prewarm(&mock, &cache, &file, &[]);
    assert_eq!(code, 0, "{summary}");
    assert_eq!(summary["submitted"], 3, "the repeated line goes once");
    assert_eq!(summary["duplicates"], 1);
    assert_eq!(summary["stored"], 3);
    assert_eq!(summary["counts"]["succeeded"], 3);
    assert_eq!(messages_calls(&mock), 0, "only the Batches API was called");

    let (mut child, url) = support::spawn_serve(&mock.url(), &cache, |cmd| {
        cmd.env("ANTHROPIC_API_KEY", KEY).stderr(Stdio::null());
    });
    for body in &lines {
        let r = reqwest::Client::new()
            .post(format!("{url}/v1/messages"))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let outcome = support::proxy::header(&r, "x-fallthrough-cache").to_owned();
        assert!(
            outcome == "disk" || outcome == "memory",
            "{outcome}: {body}"
        );
    }
    assert_eq!(messages_calls(&mock), 0, "every live request was a hit");
    support::terminate(&child);
    let _ = child.wait();

    let (code, again) = prewarm(&mock, &cache, &file, &[]);
    assert_eq!((code, again["already_cached"].as_u64()), (0, Some(3)));
    assert_eq!(again["duplicates"], 1);
    assert_eq!(batch_creations(&mock), 1, "nothing left to submit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errored_and_expired_lines_are_reported_and_a_rerun_submits_only_them() {
    let mock = MockServer::start(MockConfig {
        overloaded_models: vec!["claude-haiku-4-5".into()],
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let file = write_lines(
        dir.path(),
        &[
            line("claude-sonnet-4-6", "answered"),
            "not json".into(),
            line("claude-haiku-4-5", "overloaded"),
        ],
    );
    let (code, summary) = prewarm(&mock, &cache, &file, &[]);
    assert_eq!(code, 1, "{summary}");
    assert_eq!(failed_lines(&summary), [(3, "errored".to_owned())]);
    assert!(summary["failed"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("overloaded_error"));
    assert_eq!(summary["invalid_lines"], json!([2]));
    assert_eq!(summary["stored"], 1);

    // Every request expires now: the rerun sends only line 3, which expires.
    mock.set_config(MockConfig {
        batch_expire_rate: 1.0,
        ..MockConfig::default()
    });
    let (code, summary) = prewarm(&mock, &cache, &file, &[]);
    assert_eq!(code, 1);
    assert_eq!(
        (
            summary["submitted"].as_u64(),
            summary["already_cached"].as_u64()
        ),
        (Some(1), Some(1))
    );
    assert_eq!(failed_lines(&summary), [(3, "expired".to_owned())]);

    mock.set_config(MockConfig::default());
    let (code, summary) = prewarm(&mock, &cache, &file, &[]);
    assert_eq!((code, summary["submitted"].as_u64()), (0, Some(1)));
    assert_eq!(summary["stored"], 1);
    assert_eq!(batch_creations(&mock), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prewarm_killed_after_creating_its_batch_resumes_it_without_a_new_one() {
    let mock = MockServer::start(MockConfig {
        batch_latency_ms: 3_600_000,
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let file = write_lines(
        dir.path(),
        &[
            line("claude-sonnet-4-6", "one"),
            line("claude-sonnet-4-6", "two"),
        ],
    );
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("fallthrough"))
        .args(["prewarm", "--batch", "--poll-interval", "50ms"])
        .arg(&file)
        .args(["--upstream", &mock.url(), "--cache-dir"])
        .arg(&cache)
        .env("ANTHROPIC_API_KEY", KEY)
        .env_remove("FALLTHROUGH_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let records = cache.join("batches");
    // A record is written to a `.tmp` file, then renamed: only the renamed one counts.
    let record = || {
        std::fs::read_dir(&records)
            .ok()?
            .filter_map(Result::ok)
            .find(|e| e.path().extension().is_none_or(|x| x != "tmp"))
    };
    support::eventually("the batch is created and recorded", || {
        batch_creations(&mock) == 1 && record().is_some()
    })
    .await;
    let record = record().unwrap();
    let text = std::fs::read_to_string(record.path()).unwrap();
    assert!(
        !text.contains(KEY),
        "the record holds no credential: {text}"
    );
    let _ = child.kill();
    let _ = child.wait();

    // A dry run says it would resume the batch, and touches nothing.
    let (code, dry) = prewarm(&mock, &cache, &file, &["--dry-run"]);
    assert_eq!((code, dry["resumed"].as_bool()), (0, Some(true)));
    assert!(record.path().exists(), "the dry run left the record");

    // The batch ends; the rerun polls it instead of submitting again.
    mock.set_config(MockConfig::default());
    let (code, summary) = prewarm(&mock, &cache, &file, &[]);
    assert_eq!(code, 0, "{summary}");
    assert_eq!(summary["resumed"], true);
    assert_eq!(
        (summary["submitted"].as_u64(), summary["stored"].as_u64()),
        (Some(0), Some(2))
    );
    assert_eq!(batch_creations(&mock), 1, "no new batch");
    assert!(
        std::fs::read_dir(&records).unwrap().next().is_none(),
        "the record is removed once every result is stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_without_batches_is_a_clear_error() {
    // The fake's own server answers 404 for any path it does not know; a bare hyper server
    // would do as well. Here: a base URL under which the Batches API does not exist.
    let mock = MockServer::start(MockConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = write_lines(dir.path(), &[line("claude-sonnet-4-6", "nowhere")]);
    let out = bin()
        .args(["prewarm", "--batch", "--poll-interval", "50ms"])
        .arg(&file)
        .args([
            "--upstream",
            &format!("{}/nothing-here", mock.url()),
            "--cache-dir",
        ])
        .arg(dir.path().join("cache"))
        .env("ANTHROPIC_API_KEY", KEY)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("does not offer the Message Batches API"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_the_batches_api_refuses_is_named_by_its_line_number() {
    let mock = MockServer::start(MockConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let no_max_tokens =
        json!({"model": "claude-sonnet-4-6", "messages": [{"role": "user", "content": "x"}]});
    let file = write_lines(
        dir.path(),
        &[line("claude-sonnet-4-6", "fine"), no_max_tokens.to_string()],
    );
    let out = bin()
        .args(["prewarm", "--batch"])
        .arg(&file)
        .args(["--upstream", &mock.url(), "--cache-dir"])
        .arg(dir.path().join("cache"))
        .env("ANTHROPIC_API_KEY", KEY)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("max_tokens") && stderr.contains("line 2 of the file"),
        "{stderr}"
    );
}
