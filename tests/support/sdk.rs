//! What the official SDKs' tests share: the `RESULT {...}` line their scripts print, and the
//! one-retry-layer measurement made the same way for each SDK.

use std::future::Future;

use fallthrough::mock::{MockConfig, MockServer, Scripted};
use serde_json::Value;

use super::proxy::{Proxy, MODEL};

/// The `RESULT {...}` line a script printed.
pub fn result_of(out: &std::process::Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("no RESULT line in {stdout}"));
    serde_json::from_str(line).expect("RESULT is JSON")
}

/// One retry layer, measured with an SDK at its default `max_retries` (2), straight at the
/// mock and through the proxy (also at 2) in the same test: for a 529 and a 429 that send
/// `retry-after: 1`, and a 529 that says `x-should-retry: false`. Through the proxy the SDK
/// adds no call to the proxy's own, so it makes no more upstream calls than the SDK alone.
///
/// `failing_request(base_url)` sends one request for [`MODEL`] with the SDK and returns its
/// `RESULT`: `status`, the proxy's `attempts` header and its `should_retry` header.
pub async fn assert_one_retry_layer<F, Fut>(failing_request: F)
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Value>,
{
    let overloaded = MockConfig {
        overloaded_models: vec![MODEL.to_owned()],
        retry_after: Some(1),
        ..MockConfig::default()
    };
    let rate_limited = MockConfig {
        rate_limit_rate: 1.0,
        retry_after: Some(1),
        ..MockConfig::default()
    };
    let cases = [
        ("529 with retry-after", overloaded, 529, false),
        ("429 with retry-after", rate_limited, 429, false),
        (
            "529 with x-should-retry: false",
            MockConfig::default(),
            529,
            true,
        ),
    ];
    for (case, config, status, no_retry) in cases {
        let start = |config: MockConfig| async move {
            let mock = MockServer::start(config).await.expect("mock starts");
            if no_retry {
                mock.script(Some(MODEL), vec![Scripted::NoRetry { status: 529 }; 5]);
            }
            mock
        };
        let straight_mock = start(config.clone()).await;
        let straight = failing_request(straight_mock.url()).await;
        let straight_calls = straight_mock.stats().requests;
        straight_mock.shutdown().await;

        // The proxy at max_retries 2, as the SDK.
        let proxy = Proxy::start_on(start(config).await, |b| b).await;
        let through = failing_request(proxy.url.clone()).await;
        let through_calls = proxy.mock.stats().requests;
        drop(proxy.shutdown().await);

        eprintln!("{case}: straight {straight_calls} calls, through the proxy {through_calls}");
        assert_eq!(straight["status"], status, "{case}: {straight}");
        assert_eq!(through["status"], status, "{case}: {through}");
        assert_eq!(through["should_retry"], "false", "{case}: {through}");
        let proxy_attempts: u64 = through["attempts"].as_str().unwrap().parse().unwrap();
        assert_eq!(
            through_calls, proxy_attempts,
            "{case}: the SDK added calls to the proxy's own"
        );
        assert!(
            through_calls <= straight_calls,
            "{case}: {through_calls} calls through the proxy, {straight_calls} straight"
        );
    }
}
