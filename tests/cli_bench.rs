//! `fallthrough bench`, run as a binary against its in-process fake API (`--mock`).

use std::io::Write;

use assert_cmd::Command;
use serde_json::Value;

const WORKLOAD: &str = "examples/workload.jsonl";

fn workload_lines() -> u64 {
    std::fs::read_to_string(WORKLOAD)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count() as u64
}

fn bench(args: &[&str]) -> Command {
    let mut cmd = Command::cargo_bin("fallthrough").unwrap();
    cmd.arg("bench")
        .args(args)
        .env_remove("FALLTHROUGH_CONFIG")
        .env_remove("FALLTHROUGH_UPSTREAM")
        .env("RUST_LOG", "warn")
        .timeout(std::time::Duration::from_secs(60));
    cmd
}

/// Runs bench with `--json`, expects success, and returns the report.
fn report(args: &[&str]) -> Value {
    let out = bench(args).arg("--json").assert().success();
    let stdout = String::from_utf8_lossy(&out.get_output().stdout).into_owned();
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

fn n(report: &Value, field: &str) -> u64 {
    report[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} missing in {report}"))
}

fn rate(report: &Value, field: &str) -> f64 {
    report[field].as_f64().unwrap()
}

#[test]
fn mock_run_counts_add_up_and_repeats_hit() {
    // A long ttl: nothing goes stale, so every upstream call is a distinct request's first miss.
    let r = report(&["--mock", "--ttl", "1h", WORKLOAD]);
    let requests = n(&r, "requests");
    assert_eq!(requests, workload_lines());
    assert_eq!(
        n(&r, "hits") + n(&r, "misses") + n(&r, "stale") + n(&r, "bypass") + n(&r, "errors"),
        requests
    );
    assert_eq!(n(&r, "memory") + n(&r, "disk"), n(&r, "hits"));
    assert_eq!(n(&r, "errors"), 0, "{r}");
    assert!(rate(&r, "hit_rate") > 0.5, "{r}");
    // Single flight merges concurrent plain requests; a stream can still race its twin once.
    let calls = n(&r, "mock_requests");
    assert!(
        calls <= n(&r, "distinct_requests") + n(&r, "streamed"),
        "{r}"
    );
    assert!(n(&r, "upstream_attempts") >= calls - n(&r, "streamed"));
    assert_eq!(n(&r, "calls_saved"), n(&r, "hits") + n(&r, "stale"));
    assert!(n(&r, "tokens_saved") > 0);
    assert_eq!(n(&r, "fallback_answers"), 0);
    let memory = &r["latency_us"]["memory"];
    assert_eq!(memory["count"].as_u64(), Some(n(&r, "memory")));
    assert!(memory["p50"].as_u64() <= memory["p99"].as_u64());
    assert!(r["latency_us"]["stale"]["p50"].is_null());
    assert!(rate(&r, "throughput_rps") > 0.0 && rate(&r, "wall_time_s") > 0.0);
}

#[test]
fn the_second_pass_hits() {
    let r = report(&[
        "--mock",
        "--latency",
        "0",
        "--ttl",
        "1h",
        "--repeat",
        "2",
        WORKLOAD,
    ]);
    assert_eq!(n(&r, "requests"), 2 * workload_lines());
    assert!(rate(&r, "hit_rate") >= 0.8, "{r}");
    // Every miss belongs to the first pass.
    assert!(n(&r, "misses") <= n(&r, "distinct_requests") + n(&r, "streamed"));
}

#[test]
fn overload_is_absorbed_by_retries_fallbacks_and_stale_answers() {
    let r = report(&[
        "--mock",
        "--overload-rate",
        "0.3",
        "--latency",
        "5",
        WORKLOAD,
    ]);
    let requests = n(&r, "requests");
    assert!(n(&r, "answered") * 100 >= requests * 99, "{r}");
    assert!(
        n(&r, "stale") + n(&r, "fallback_answers") > 0
            || n(&r, "upstream_attempts") > n(&r, "misses"),
        "{r}"
    );
    let by_status = r["mock_by_status"].as_object().unwrap();
    assert!(by_status["529"].as_u64().unwrap() > 0, "{r}");
}

#[test]
fn human_output_is_a_table() {
    let out = bench(&["--mock", WORKLOAD]).assert().success();
    let stdout = String::from_utf8_lossy(&out.get_output().stdout).into_owned();
    for needle in [
        "outcome",
        "count",
        "share",
        "p50",
        "p95",
        "p99",
        "memory",
        "miss",
        "stale",
        "error",
        "hit rate",
        "calls saved",
        "tokens saved",
        "fallback answers",
        "req/s",
    ] {
        assert!(stdout.contains(needle), "no {needle:?} in:\n{stdout}");
    }
    assert!(out.get_output().stderr.is_empty(), "stderr should be quiet");
}

#[test]
fn a_missing_file_fails_with_a_message() {
    let out = bench(&["--mock", "no/such/workload.jsonl"])
        .assert()
        .failure();
    let stderr = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
    assert!(stderr.contains("no/such/workload.jsonl"), "{stderr}");
    assert!(stderr.contains("cannot read"), "{stderr}");
}

#[test]
fn invalid_lines_are_reported_by_number_and_skipped() {
    let valid = r#"{"model":"claude-sonnet-4-6","max_tokens":64,"messages":[{"role":"user","content":"hi"}]}"#;
    let mut file = tempfile::NamedTempFile::new().unwrap();
    writeln!(file, "{valid}\nnot json\n{valid}\n{{\"no\":\"model\"}}\n").unwrap();
    let path = file.path().to_str().unwrap();

    let r = report(&["--mock", "--latency", "0", "--concurrency", "1", path]);
    assert_eq!(r["invalid_lines"], serde_json::json!([2, 4]));
    assert_eq!(
        (n(&r, "requests"), n(&r, "misses"), n(&r, "memory")),
        (2, 1, 1)
    );

    let out = bench(&["--mock", "--latency", "0", path])
        .assert()
        .success();
    let stdout = String::from_utf8_lossy(&out.get_output().stdout).into_owned();
    assert!(stdout.contains("2 lines skipped: 2, 4"), "{stdout}");
    assert!(stdout.contains("line 4: no \"model\""), "{stdout}");

    let mut bad = tempfile::NamedTempFile::new().unwrap();
    writeln!(bad, "nope\n\n[1, 2]").unwrap();
    let out = bench(&["--mock", bad.path().to_str().unwrap()])
        .assert()
        .failure();
    let stderr = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
    assert!(stderr.contains("no valid request lines"), "{stderr}");
    assert!(stderr.contains("line 1: not JSON ("), "{stderr}");
    assert!(stderr.contains("line 3: not a JSON object"), "{stderr}");
}

#[test]
fn fault_flags_need_mock() {
    bench(&["--overload-rate", "0.3", WORKLOAD])
        .assert()
        .failure();
    bench(&["--mock", "--overload-rate", "2", WORKLOAD])
        .assert()
        .failure();
}

/// The counts of a report: everything a reproducible replay promises to repeat.
fn counts(r: &Value) -> Value {
    let fields = [
        "requests",
        "answered",
        "errors",
        "hits",
        "memory",
        "disk",
        "stale",
        "misses",
        "bypass",
        "upstream_attempts",
        "mock_requests",
        "mock_by_status",
        "calls_saved",
        "tokens_saved",
        "fallback_answers",
    ];
    fields
        .iter()
        .map(|f| (f.to_string(), r[*f].clone()))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

#[test]
fn a_mock_run_with_a_seed_repeats_its_counts() {
    // Faults, retries, stale answers and fallbacks all in play: the counts still repeat.
    let args = [
        "--mock",
        "--overload-rate",
        "0.3",
        "--rate-limit-rate",
        "0.05",
        "--latency",
        "0",
        "--seed",
        "7",
        WORKLOAD,
    ];
    let first = report(&args);
    assert!(
        n(&first, "stale") > 0 && n(&first, "fallback_answers") > 0,
        "{first}"
    );
    assert!(
        n(&first, "mock_requests") > n(&first, "misses"),
        "retries were made: {first}"
    );
    assert_eq!(first["concurrency"], 1);
    for _ in 0..2 {
        assert_eq!(counts(&report(&args)), counts(&first));
    }
}

#[test]
fn a_mock_run_with_a_concurrency_is_live() {
    let r = report(&[
        "--mock",
        "--latency",
        "0",
        "--concurrency",
        "4",
        "--ttl",
        "1h",
        WORKLOAD,
    ]);
    assert_eq!(r["concurrency"], 4);
    assert!(r["logical_step_ms"].is_null(), "{r}");
    assert_eq!(n(&r, "answered"), n(&r, "requests"));
}

#[test]
fn bench_exits_1_when_requests_fail_after_printing_the_report() {
    // Every answer of the fake is a 500: nothing can be answered.
    let out = bench(&[
        "--mock",
        "--server-error-rate",
        "1",
        "--latency",
        "0",
        "--json",
        WORKLOAD,
    ])
    .assert()
    .code(1);
    let stdout = String::from_utf8_lossy(&out.get_output().stdout).into_owned();
    let r: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(n(&r, "errors"), n(&r, "requests"));
    assert_eq!(n(&r, "answered"), 0);

    let help = bench(&["--help"]).assert().success();
    let help = String::from_utf8_lossy(&help.get_output().stdout).into_owned();
    assert!(help.contains("1 when any request failed"), "{help}");
}
