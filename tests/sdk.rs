//! The official `anthropic` Python SDK (installed from PyPI by `.ci/run` into `.venv`) against
//! the proxy in front of the in-process mock: plain calls, streams the SDK assembles, hits,
//! tools, a 529 the SDK raises as `OverloadedError`, count_tokens and a passed-through path.
//! The checks themselves are in `tests/sdk/test_sdk.py`; this side starts the servers, runs the
//! script, and checks the upstream calls in the mock's counters.
//!
//! The interpreter: `FALLTHROUGH_PYTHON`, else `.venv/bin/python` in the crate (`bash
//! scripts/test.sh`, the test command, provisions it). When neither can `import anthropic`, the
//! test fails with the reason: it never passes without having run.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use fallthrough::mock::{MockConfig, MockServer};
use tokio::process::Command;

mod support;
use support::proxy::*;
use support::sdk::{assert_one_retry_layer, result_of};

const OVERLOADED: &str = "claude-overloaded";
/// The whole script; it makes a few dozen loopback calls.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(180);

/// The Python to use, if it can import `anthropic`: (path, `anthropic.__version__`).
async fn find_python() -> Result<(PathBuf, String), String> {
    let candidate = match std::env::var_os("FALLTHROUGH_PYTHON") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"),
    };
    let probe = Command::new(&candidate)
        .args(["-c", "import anthropic; print(anthropic.__version__)"])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(Duration::from_secs(60), probe).await {
        Ok(Ok(out)) if out.status.success() => Ok((
            candidate,
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        )),
        Ok(Ok(out)) => Err(format!(
            "{} cannot import anthropic: {}",
            candidate.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Ok(Err(e)) => Err(format!("{} cannot run: {e}", candidate.display())),
        Err(_) => Err(format!("{} did not answer in 60 s", candidate.display())),
    }
}

/// Upstream answers the mock gave for `model` with `status`.
fn calls(mock: &MockServer, model: &str, status: u16) -> u64 {
    mock.stats()
        .by_model
        .get(model)
        .and_then(|s| s.get(&status))
        .copied()
        .unwrap_or(0)
}

fn path_calls(mock: &MockServer, path: &str) -> u64 {
    mock.stats().by_path.get(path).copied().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_python_sdk_through_the_proxy() {
    // Never skipped: a missing SDK is a failure that says how to get it.
    let (python, version) = match find_python().await {
        Ok(found) => found,
        Err(why) => panic!(
            "no Python with the official anthropic SDK: {why}\n\
             `bash scripts/test.sh` creates .venv with the pinned SDK and runs the tests; \
             or set FALLTHROUGH_PYTHON to a Python that can `import anthropic`"
        ),
    };
    eprintln!("python: {} (anthropic {version})", python.display());

    let mock = MockServer::start(MockConfig {
        overloaded_models: vec![OVERLOADED.to_owned()],
        ..MockConfig::default()
    })
    .await
    .expect("mock starts");
    // The proxy retries twice (10 ms to 50 ms backoff), without fallback chains.
    let proxy = Proxy::start_on(mock, |b| b).await;
    let proxy_url = proxy.url.clone();

    let out = run_script(&python, "test_sdk.py", &[], &proxy_url).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "tests/sdk/test_sdk.py failed ({}).\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        out.status
    );
    println!("{stdout}");

    // Upstream calls: every hit in the script made none.
    // - 1 plain (then 2 hits); 1 streamed (then a streamed and a plain hit);
    // - plain miss + streamed hit, streamed miss + plain no-cache fetch: 3;
    // - tools: streamed miss + plain no-cache fetch (then a streamed hit): 2;
    // - count_tokens: 1 miss, 1 hit.
    let mock = &proxy.mock;
    let stats = mock.stats();
    let context = format!("mock stats: {stats:#?}");
    assert_eq!(calls(mock, MODEL, 200), 8, "{context}");
    assert_eq!(
        path_calls(mock, "/v1/messages/count_tokens"),
        1,
        "{context}"
    );
    assert_eq!(path_calls(mock, "/v1/models"), 1, "{context}");
    assert_eq!(
        path_calls(mock, &format!("/v1/models/{MODEL}")),
        1,
        "{context}"
    );
    // The overloaded model: 2 requests, each at most 1 + 2 retries (the breaker and the retry
    // budget may cut that short), and never a success.
    let overloaded = calls(mock, OVERLOADED, 529);
    assert!((2..=6).contains(&overloaded), "{context}");
    assert_eq!(calls(mock, OVERLOADED, 200), 0, "{context}");
    // The SDK's key reached the upstream (newer SDKs send it as `authorization: Bearer`).
    assert!(
        matches!(
            stats.last_api_key.as_deref(),
            Some("sk-test" | "Bearer sk-test")
        ),
        "{context}"
    );

    // Drained and flushed; the mock stops with it.
    drop(proxy.shutdown().await);
}

/// Runs `tests/sdk/<script>` with `args`, the SDK pointed at `base_url`, within
/// [`SCRIPT_TIMEOUT`].
async fn run_script(
    python: &Path,
    script: &str,
    args: &[&str],
    base_url: &str,
) -> std::process::Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/sdk")
        .join(script);
    let run = Command::new(python)
        .arg(&script)
        .args(args)
        .env("ANTHROPIC_BASE_URL", base_url)
        .env("ANTHROPIC_API_KEY", "sk-test")
        .env_remove("ANTHROPIC_AUTH_TOKEN")
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(SCRIPT_TIMEOUT, run).await {
        Ok(out) => out.expect("the python script runs"),
        Err(_) => panic!("{} did not finish in {SCRIPT_TIMEOUT:?}", script.display()),
    }
}

/// Runs `tests/sdk/retry_layer.py` for `model` against `base_url`: the JSON it reports.
async fn one_failing_request(python: &Path, base_url: &str, model: &str) -> serde_json::Value {
    let out = run_script(python, "retry_layer.py", &[model], base_url).await;
    assert!(
        out.status.success(),
        "retry_layer.py failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    result_of(&out)
}

/// One retry layer with the Python SDK (see [`assert_one_retry_layer`]).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_does_not_retry_on_top_of_the_proxy() {
    let (python, _) = find_python()
        .await
        .unwrap_or_else(|why| panic!("no Python with the official anthropic SDK: {why}"));
    let python = &python;
    assert_one_retry_layer(|url| async move { one_failing_request(python, &url, MODEL).await })
        .await;
}
