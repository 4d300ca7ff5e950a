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

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ts/test_sdk.mjs");
    let run = Command::new(&node)
        .arg(&script)
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ts"))
        .env("MOCK_PROXY", &proxy.url)
        .env("FIXED_PROXY", &fixed.url)
        .env_remove("ANTHROPIC_API_KEY")
        .env_remove("ANTHROPIC_AUTH_TOKEN")
        .env_remove("ANTHROPIC_BASE_URL")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = match tokio::time::timeout(SCRIPT_TIMEOUT, run).await {
        Ok(out) => out.unwrap_or_else(|e| panic!("{node} cannot run: {e}")),
        Err(_) => panic!("the node script did not finish in {SCRIPT_TIMEOUT:?}"),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "tests/ts/test_sdk.mjs failed ({}).\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        out.status
    );
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("no RESULT line in {stdout}"));
    let result: serde_json::Value = serde_json::from_str(line).expect("RESULT is JSON");

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
