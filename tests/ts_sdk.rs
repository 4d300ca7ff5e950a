//! The official TypeScript SDK (`@anthropic-ai/sdk`, pinned in `tests/ts/package.json` and
//! installed by `bash scripts/test.sh`) against the proxy: plain and streamed calls, a streamed
//! hit equal to the plain answer (a refusal's `stop_details` and a tool input's key order
//! included), `request-id` on a miss, and the error paths at the SDK's default retries. The
//! checks are in `tests/ts/test_sdk.mjs`; this side starts the servers and counts the upstream
//! calls.
//!
//! Node: `FALLTHROUGH_NODE`, else `node` on the PATH. A missing Node or SDK fails the test with
//! the reason: it never passes without having run.

use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fallthrough::mock::{MockConfig, MockServer};
use tokio::process::Command;

mod support;
use support::proxy::*;
use support::sdk::{assert_one_retry_layer, result_of};

const OVERLOADED: &str = "claude-overloaded";
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(180);

fn node() -> String {
    let node = std::env::var("FALLTHROUGH_NODE").unwrap_or_else(|_| "node".to_owned());
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/ts/node_modules/@anthropic-ai/sdk/package.json");
    assert!(
        sdk.exists(),
        "the TypeScript SDK is not installed in tests/ts/node_modules: \
         `bash scripts/test.sh` installs it (npm ci --prefix tests/ts)"
    );
    node
}

/// Runs `tests/ts/<script>` with `args` and `env` under `node`, within [`SCRIPT_TIMEOUT`]; fails
/// the test, with its output, unless it succeeds.
async fn run_script(
    node: &str,
    script: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> std::process::Output {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ts");
    let run = Command::new(node)
        .arg(dir.join(script))
        .args(args)
        .current_dir(&dir)
        .envs(env.iter().copied())
        .env_remove("ANTHROPIC_API_KEY")
        .env_remove("ANTHROPIC_AUTH_TOKEN")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = match tokio::time::timeout(SCRIPT_TIMEOUT, run).await {
        Ok(out) => out.unwrap_or_else(|e| panic!("{node} cannot run: {e}")),
        Err(_) => panic!("tests/ts/{script} did not finish in {SCRIPT_TIMEOUT:?}"),
    };
    assert!(
        out.status.success(),
        "tests/ts/{script} failed ({}).\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_typescript_sdk_through_the_proxy() {
    let node = node();
    let overloaded = MockConfig {
        overloaded_models: vec![OVERLOADED.to_owned()],
        ..MockConfig::default()
    };
    let mock = MockServer::start(overloaded).await.expect("mock starts");
    let proxy = Proxy::start_on(mock, |b| b).await;
    let (fixed_url, fixed_calls) = fixed_upstream(FAITHFUL).await;
    let spare = MockServer::start(MockConfig::default())
        .await
        .expect("mock starts");
    let fixed = Proxy::start_on(spare, move |b| b.upstream(fixed_url)).await;

    let out = run_script(
        &node,
        "test_sdk.mjs",
        &[],
        &[("MOCK_PROXY", &proxy.url), ("FIXED_PROXY", &fixed.url)],
    )
    .await;
    let result = result_of(&out);

    let stats = proxy.mock.stats();
    let by_status = |model: &str, status: u16| {
        stats
            .by_model
            .get(model)
            .and_then(|s| s.get(&status))
            .copied()
            .unwrap_or(0)
    };
    // Two misses (a plain one and a streamed one); the hits made no call.
    assert_eq!(by_status(MODEL, 200), 2, "{stats:#?}");
    // One retry layer: the SDK at its default max_retries made one request of the proxy, so
    // the upstream saw exactly the proxy's own attempts.
    let attempts = result["overloadedAttempts"].as_u64().unwrap();
    assert_eq!(attempts, 3, "the proxy's first try and its two retries");
    assert_eq!(by_status(OVERLOADED, 529), attempts, "{stats:#?}");
    assert_eq!(
        fixed_calls.load(Ordering::SeqCst),
        1,
        "the replay was a hit"
    );
}

/// One retry layer with the TypeScript SDK (see [`assert_one_retry_layer`]).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_typescript_sdk_does_not_retry_on_top_of_the_proxy() {
    let node = &node();
    assert_one_retry_layer(|url| async move {
        let env = [("ANTHROPIC_BASE_URL", url.as_str())];
        result_of(&run_script(node, "retry_layer.mjs", &[MODEL], &env).await)
    })
    .await;
}
