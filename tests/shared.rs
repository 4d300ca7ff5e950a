//! Several instances over one real Redis (SPEC, "Several instances: the shared tier"): two
//! `fallthrough serve` processes, one `redis-server` started for the test, one fake API.

mod support;

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

use fallthrough::mock::{MockConfig, MockServer};
use support::proxy::{header, request};
use support::redis::{Redis, Setup};

/// The same secret on every instance: requests with a credential get the same keys.
const SECRET: &str = "the fleet's key secret";
const CALLER: &str = "sk-ant-caller";

struct Serve {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An instance over `mock` sharing `redis`, with `more` appended to its configuration.
fn serve(mock: &MockServer, redis: &Redis, more: &str) -> Serve {
    // A generous shared timeout: the default 100 ms is for production, where a slow server
    // costs a miss; here a loaded machine's first connect must not turn into one.
    serve_over(mock, &redis.url(), "10s", more)
}

/// An instance over `mock` sharing the server at `url` with the shared tier's `timeout`.
fn serve_over(mock: &MockServer, url: &str, timeout: &str, more: &str) -> Serve {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("fallthrough.toml");
    let config =
        format!("[shared]\nurl = \"{url}\"\nprefix = \"test:\"\ntimeout = \"{timeout}\"\n{more}");
    std::fs::write(&file, config).unwrap();
    let (child, url) = support::spawn_serve(&mock.url(), &dir.path().join("cache"), |cmd| {
        cmd.arg("--config")
            .arg(&file)
            .env("FALLTHROUGH_KEY_SECRET", SECRET)
            .env("RUST_LOG", "warn")
            .stderr(Stdio::null());
    });
    Serve {
        child,
        url,
        _dir: dir,
    }
}

async fn ask(url: &str, text: &str) -> reqwest::Response {
    ask_with(url, text, &[]).await
}

async fn ask_with(url: &str, text: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut r = reqwest::Client::new()
        .post(format!("{url}/v1/messages"))
        .header("x-api-key", CALLER)
        .json(&request(text));
    for (name, value) in headers {
        r = r.header(*name, *value);
    }
    r.send().await.unwrap()
}

/// `POST /v1/messages` calls the fake answered with `status`.
fn upstream_calls(mock: &MockServer, status: u16) -> u64 {
    mock.stats()
        .by_model
        .values()
        .filter_map(|by_status| by_status.get(&status))
        .sum()
}

async fn cache_header(r: reqwest::Response) -> (u16, String, String) {
    let outcome = header(&r, "x-fallthrough-cache").to_owned();
    let status = r.status().as_u16();
    (status, outcome, r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_on_one_instance_is_a_shared_hit_on_another() {
    let redis = Redis::start().await;
    let mock = MockServer::start(MockConfig::default()).await.unwrap();
    let (a, b) = (serve(&mock, &redis, ""), serve(&mock, &redis, ""));

    let (status, outcome, first) = cache_header(ask(&a.url, "shared question").await).await;
    assert_eq!((status, outcome.as_str()), (200, "miss"));
    let (status, outcome, second) = cache_header(ask(&b.url, "shared question").await).await;
    assert_eq!((status, outcome.as_str()), (200, "shared"));
    assert_eq!(first, second, "the same answer, byte for byte");
    let (_, outcome, _) = cache_header(ask(&b.url, "shared question").await).await;
    assert_eq!(
        outcome, "memory",
        "a shared hit is promoted to the local tiers"
    );
    assert_eq!(upstream_calls(&mock, 200), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_misses_spread_over_two_instances_make_one_upstream_call() {
    let redis = Redis::start().await;
    let slow = MockConfig {
        latency_ms: 300,
        ..MockConfig::default()
    };
    let mock = MockServer::start(slow).await.unwrap();
    let (a, b) = (serve(&mock, &redis, ""), serve(&mock, &redis, ""));

    let asks: Vec<_> = (0..10)
        .map(|n| {
            let url = if n % 2 == 0 {
                a.url.clone()
            } else {
                b.url.clone()
            };
            tokio::spawn(async move { cache_header(ask(&url, "everyone asks this").await).await })
        })
        .collect();
    let mut outcomes = Vec::new();
    for ask in asks {
        let (status, outcome, _) = ask.await.unwrap();
        assert_eq!(status, 200);
        outcomes.push(outcome);
    }
    assert_eq!(upstream_calls(&mock, 200), 1, "outcomes: {outcomes:?}");
    assert!(
        outcomes.iter().any(|o| o == "shared"),
        "the other instance took the lead's answer from the shared tier: {outcomes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_entry_written_by_one_instance_stands_in_on_another() {
    let redis = Redis::start().await;
    let mock = MockServer::start(MockConfig::default()).await.unwrap();
    let (a, b) = (serve(&mock, &redis, ""), serve(&mock, &redis, ""));
    let (status, _, answer) = cache_header(ask(&a.url, "asked before the outage").await).await;
    assert_eq!(status, 200);

    mock.set_config(MockConfig {
        overload_rate: 1.0,
        ..MockConfig::default()
    });
    // `max-age=0`: the shared entry is stale for this request, so the upstream is asked, and
    // when it cannot answer the entry stands in.
    let r = ask_with(
        &b.url,
        "asked before the outage",
        &[("cache-control", "max-age=0")],
    )
    .await;
    let (status, outcome, body) = cache_header(r).await;
    assert_eq!((status, outcome.as_str()), (200, "stale"));
    assert_eq!(body, answer);
    assert!(
        upstream_calls(&mock, 529) >= 1,
        "the upstream was asked first"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbage_value_is_a_miss_never_served_and_is_rewritten() {
    let redis = Redis::start().await;
    let mock = MockServer::start(MockConfig::default()).await.unwrap();
    let (a, b) = (serve(&mock, &redis, ""), serve(&mock, &redis, ""));
    let r = ask(&a.url, "a question whose entry is damaged").await;
    let key = header(&r, "x-fallthrough-key").to_owned();
    assert_eq!(r.status(), 200);

    let mut conn = redis.connection().await;
    let name = format!("test:e:{key}");
    let stored: Vec<u8> = redis::cmd("GET")
        .arg(&name)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        !stored.is_empty(),
        "the answer was written to the shared tier"
    );
    let mut damaged = stored.clone();
    let last = damaged.len() - 1;
    damaged[last] ^= 0x20;
    let _: () = redis::cmd("SET")
        .arg(&name)
        .arg(&damaged)
        .query_async(&mut conn)
        .await
        .unwrap();

    let (status, outcome, _) =
        cache_header(ask(&b.url, "a question whose entry is damaged").await).await;
    assert_eq!(
        (status, outcome.as_str()),
        (200, "miss"),
        "a value that fails its checksum is never served"
    );
    assert_eq!(upstream_calls(&mock, 200), 2);
    let rewritten: Vec<u8> = redis::cmd("GET")
        .arg(&name)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_ne!(
        rewritten, damaged,
        "the new answer replaced the damaged value"
    );
    assert!(fallthrough::entry::Entry::decode(&rewritten).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_both_instances_answer_and_sharing_resumes_when_it_is_back() {
    let mut redis = Redis::start().await;
    let mock = MockServer::start(MockConfig::default()).await.unwrap();
    let (a, b) = (serve(&mock, &redis, ""), serve(&mock, &redis, ""));
    let (_, outcome, _) = cache_header(ask(&a.url, "before the fall").await).await;
    assert_eq!(outcome, "miss");

    redis.kill();
    let (status, outcome, _) = cache_header(ask(&a.url, "before the fall").await).await;
    assert_eq!(
        (status, outcome.as_str()),
        (200, "memory"),
        "local hits go on"
    );
    for (n, s) in [&a, &b].into_iter().enumerate() {
        let (status, outcome, _) =
            cache_header(ask(&s.url, &format!("while down {n}")).await).await;
        assert_eq!(
            (status, outcome.as_str()),
            (200, "miss"),
            "misses go upstream"
        );
    }
    let errors = metric(&b.url, SHARED_ERRORS).await;
    assert!(errors >= Some(1.0), "{errors:?}");

    redis.restart().await;
    let mut n = 0;
    support::eventually_async("sharing resumes by itself", || {
        n += 1;
        let (a, b) = (a.url.clone(), b.url.clone());
        async move {
            let question = format!("after the return {n}");
            let _ = ask(&a, &question).await;
            let (_, outcome, _) = cache_header(ask(&b, &question).await).await;
            outcome == "shared"
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_without_a_disk_tier_can_overlap_on_one_directory() {
    let redis = Redis::start().await;
    let mock = MockServer::start(MockConfig::default()).await.unwrap();
    let a = serve(&mock, &redis, "[cache]\ndisk_bytes = \"0\"\n");
    let dir = tempfile::tempdir().unwrap();
    // Both on one --cache-dir: with the disk tier off, neither takes its lock.
    let spawn = |url: &str| {
        let file = dir.path().join("fallthrough.toml");
        std::fs::write(
            &file,
            format!(
                "[shared]\nurl = \"{}\"\nprefix = \"test:\"\ntimeout = \"10s\"\n[cache]\ndisk_bytes = \"0\"\n",
                redis.url()
            ),
        )
        .unwrap();
        support::spawn_serve(url, &dir.path().join("cache"), |cmd| {
            cmd.arg("--config")
                .arg(&file)
                .env("FALLTHROUGH_KEY_SECRET", SECRET)
                .stderr(Stdio::null());
        })
    };
    let (mut old, old_url) = spawn(&mock.url());
    let (mut new, new_url) = spawn(&mock.url());
    let (_, outcome, _) = cache_header(ask(&old_url, "during the deploy").await).await;
    assert_eq!(outcome, "miss");
    let (_, outcome, _) = cache_header(ask(&new_url, "during the deploy").await).await;
    assert_eq!(outcome, "shared");
    let (_, outcome, _) = cache_header(ask(&a.url, "during the deploy").await).await;
    assert_eq!(outcome, "shared");
    let laid_out = std::fs::read_dir(dir.path().join("cache"))
        .into_iter()
        .flatten()
        .map(|item| item.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("db") || name.starts_with("shard-"))
        .collect::<Vec<_>>();
    assert!(laid_out.is_empty(), "a disk tier was opened: {laid_out:?}");
    for child in [&mut old, &mut new] {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The shared tier's error counter.
const SHARED_ERRORS: &str = "fallthrough_shared_errors_total";

/// The value of the metric `name` (labels included, as exposed) on the instance at `url`.
async fn metric(url: &str, name: &str) -> Option<f64> {
    let text = reqwest::get(format!("{url}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let value = text
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))?;
    value.trim().parse().ok()
}

/// The breaker gauge of `model` on the instance at `url` (0 passing, 1 blocking, 2 probing).
async fn breaker_gauge(url: &str, model: &str) -> Option<i64> {
    let name = format!("fallthrough_breaker_state{{model=\"{model}\"}}");
    metric(url, &name).await.map(|v| v as i64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breaker_opened_on_one_instance_holds_the_model_on_another_until_its_probe_answers() {
    let redis = Redis::start().await;
    let mock = MockServer::start(MockConfig::default()).await.unwrap();
    // Rescues on (the default): only the opener, A, may rescue the held model.
    // A cooldown longer than the test: B must hold the model for as long as the test looks,
    // and A's rescue (not the cooldown's end) is what lets the model through again.
    let config =
        "[fallback]\n[breaker]\nfailures = 2\ncooldown = \"60s\"\n[retry]\nmax_retries = 0\n";
    let (a, b) = (serve(&mock, &redis, config), serve(&mock, &redis, config));
    let model = support::proxy::MODEL;
    mock.set_config(MockConfig {
        overload_rate: 1.0,
        ..MockConfig::default()
    });
    for n in 0..2 {
        let r = ask(&a.url, &format!("overloaded {n}")).await;
        assert_eq!(r.status(), 529);
    }
    assert_eq!(
        breaker_gauge(&a.url, model).await,
        Some(1),
        "A's breaker opened"
    );
    support::eventually_async("B holds the model A's breaker blocks", || async {
        breaker_gauge(&b.url, model).await == Some(1)
    })
    .await;

    let before = mock.stats().requests;
    let r = ask(&b.url, "a new question on B").await;
    assert_eq!(r.status(), 529, "held as what opened it: an overload");
    assert_eq!(mock.stats().requests, before, "B made no upstream attempt");

    // The upstream recovers; A's rescue probe decides for both.
    mock.set_config(MockConfig::default());
    let mut n = 0;
    support::eventually_async("A's probe is answered", || {
        n += 1;
        let url = a.url.clone();
        async move { ask(&url, &format!("probe {n}")).await.status() == 200 }
    })
    .await;
    assert_eq!(upstream_calls(&mock, 200), 1, "one probe");
    support::eventually_async("B passes again", || async {
        breaker_gauge(&b.url, model).await == Some(0)
    })
    .await;
    assert_eq!(upstream_calls(&mock, 200), 1, "B did not probe for itself");
    let (status, outcome, _) = cache_header(ask(&b.url, "after the recovery").await).await;
    assert_eq!((status, outcome.as_str()), (200, "miss"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_commands_work_on_the_shared_tier() {
    let redis = Redis::start().await;
    let mock = MockServer::start(MockConfig::default()).await.unwrap();
    let a = serve(&mock, &redis, "");
    let mut keys = Vec::new();
    for n in 0..2 {
        let r = ask(&a.url, &format!("kept in the fleet {n}")).await;
        assert_eq!(r.status(), 200);
        keys.push(header(&r, "x-fallthrough-key").to_owned());
    }
    let dir = tempfile::tempdir().unwrap();
    let export = dir.path().join("export.jsonl");
    let cache = |args: &[&str]| {
        support::bin()
            .args(["cache", "--shared"])
            .args(args)
            .env("FALLTHROUGH_SHARED_URL", redis.url())
            .env("FALLTHROUGH_KEY_SECRET", SECRET)
            .output()
            .unwrap()
    };
    // The prefix is the configuration's: give it the tests' one.
    let config = dir.path().join("fallthrough.toml");
    std::fs::write(&config, "[shared]\nprefix = \"test:\"\n").unwrap();
    let config = config.to_str().unwrap();
    let stats = |cache: &dyn Fn(&[&str]) -> std::process::Output| {
        let out = cache(&["stats", "--json", "--config", config]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let s = stats(&cache);
    assert_eq!(
        (s["entries"].as_u64(), s["fresh"].as_u64()),
        (Some(2), Some(2))
    );

    let got = cache(&["get", &keys[0], "--config", config]);
    assert!(got.status.success());
    let body: serde_json::Value = serde_json::from_slice(&got.stdout).unwrap();
    assert_eq!(body["type"], "message");

    let out = cache(&["export", export.to_str().unwrap(), "--config", config]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = std::fs::read_to_string(&export).unwrap();
    assert_eq!(
        lines.lines().count(),
        3,
        "the fleet's secret, then two entries"
    );

    let out = cache(&["purge", "--all", "--config", config]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "removed 2 entries"
    );
    assert_eq!(stats(&cache)["entries"], 0);
    let missing = cache(&["get", &keys[0], "--config", config]);
    assert!(!missing.status.success());

    let out = cache(&["import", export.to_str().unwrap(), "--config", config]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("imported 2,"));
    // A new instance finds them: shared hits, no upstream call.
    let b = serve(&mock, &redis, "");
    let (status, outcome, _) = cache_header(ask(&b.url, "kept in the fleet 1").await).await;
    assert_eq!((status, outcome.as_str()), (200, "shared"));
    assert_eq!(upstream_calls(&mock, 200), 2);
}

/// A relay to the Redis server on `port` that makes it `rtt` away: each chunk, each way, is
/// held half of it, and a connection's first bytes wait one more `rtt` (its TCP handshake).
/// Returns the relay's `redis://` URL; it relays until the test ends.
async fn far_away(port: u16, rtt: Duration) -> String {
    async fn pipe(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, hold: Duration) {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buf).await {
            tokio::time::sleep(hold).await;
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("redis://{}/0", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((caller, _)) = listener.accept().await {
            tokio::spawn(async move {
                tokio::time::sleep(rtt).await;
                let Ok(server) = TcpStream::connect(("127.0.0.1", port)).await else {
                    return;
                };
                let ((from_caller, to_caller), (from_server, to_server)) =
                    (caller.into_split(), server.into_split());
                tokio::join!(
                    pipe(from_caller, to_server, rtt / 2),
                    pipe(from_server, to_caller, rtt / 2)
                );
            });
        }
    });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_takes_longer_to_connect_than_the_timeout_is_still_shared() {
    // 200 ms away with a 300 ms timeout: every operation fits, but a connection (its handshake,
    // then the setup commands: two round trips) does not. The tier must connect anyway.
    let redis = Redis::start().await;
    let far = far_away(redis.port, Duration::from_millis(200)).await;
    let mock = MockServer::start(MockConfig::default()).await.unwrap();
    let a = serve_over(&mock, &far, "300ms", "");
    let mut n = 0;
    support::eventually_async("an answer of the far instance lands in Redis", || {
        n += 1;
        let (url, redis) = (a.url.clone(), &redis);
        async move {
            let r = ask(&url, &format!("from afar {n}")).await;
            assert_eq!(r.status(), 200);
            !everything(redis).await.is_empty()
        }
    })
    .await;
    // What landed is the fleet's: another instance, near the server, is answered from it.
    let b = serve(&mock, &redis, "");
    let (status, outcome, _) = cache_header(ask(&b.url, &format!("from afar {n}")).await).await;
    assert_eq!((status, outcome.as_str()), (200, "shared"));
}

/// Every name and value under the tests' prefix.
async fn everything(redis: &Redis) -> Vec<(String, Vec<u8>)> {
    let mut conn = redis.connection().await;
    let names: Vec<String> = redis::cmd("KEYS")
        .arg("test:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut all = Vec::new();
    for name in names {
        let value: Option<Vec<u8>> = redis::cmd("GET")
            .arg(&name)
            .query_async(&mut conn)
            .await
            .unwrap();
        all.push((name, value.unwrap_or_default()));
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_a_password_is_shared_and_never_sees_a_credential() {
    let redis = Redis::start_with(|port| Setup {
        args: vec!["--requirepass".into(), "fleet-password".into()],
        url: format!("redis://:fleet-password@127.0.0.1:{port}/0"),
        ca: None,
    })
    .await;
    let mock = MockServer::start(MockConfig::default()).await.unwrap();
    let (a, b) = (serve(&mock, &redis, ""), serve(&mock, &redis, ""));
    let (_, outcome, _) = cache_header(ask(&a.url, "behind a password").await).await;
    assert_eq!(outcome, "miss");
    let (_, outcome, _) = cache_header(ask(&b.url, "behind a password").await).await;
    assert_eq!(outcome, "shared");

    let all = everything(&redis).await;
    assert!(!all.is_empty());
    for (name, value) in &all {
        let text = String::from_utf8_lossy(value);
        assert!(
            !name.contains(CALLER) && !text.contains(CALLER) && !text.contains(SECRET),
            "{name} holds a credential or the key secret"
        );
    }
    // And a wrong password is only a shared tier that does not answer.
    let wrong = Redis::start_with(|port| Setup {
        args: vec!["--requirepass".into(), "right".into()],
        url: format!("redis://:right@127.0.0.1:{port}/0"),
        ca: None,
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("fallthrough.toml");
    let url = format!("redis://:wrong@127.0.0.1:{}/0", wrong.port);
    std::fs::write(&file, format!("[shared]\nurl = \"{url}\"\n")).unwrap();
    let (mut c, c_url) = support::spawn_serve(&mock.url(), &dir.path().join("cache"), |cmd| {
        cmd.arg("--config").arg(&file).stderr(Stdio::null());
    });
    let (status, outcome, _) = cache_header(ask(&c_url, "a wrong password").await).await;
    assert_eq!((status, outcome.as_str()), (200, "miss"));
    let _ = c.kill();
    let _ = c.wait();
}

/// A certificate authority and a certificate for 127.0.0.1 signed by it, made with openssl
/// in `dir`: (CA file, certificate file, key file).
fn certificates(dir: &std::path::Path) -> (String, String, String) {
    let run = |line: &str| {
        let out = std::process::Command::new("openssl")
            .args(line.split(' '))
            .current_dir(dir)
            .output()
            .expect("openssl, to make the TLS test's certificates");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    run("req -x509 -newkey rsa:2048 -nodes -days 2 -keyout ca.key -out ca.pem -subj /CN=ca");
    run("req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=127.0.0.1");
    run("x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 -extfile ext.cnf");
    let path = |name: &str| dir.join(name).to_str().unwrap().to_owned();
    (path("ca.pem"), path("server.pem"), path("server.key"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_server_with_a_private_authority_is_shared() {
    let pki = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificates(pki.path());
    let ca_pem = std::fs::read(&ca).unwrap();
    let redis = Redis::start_with(|port| Setup {
        args: [
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            "no",
        ]
        .map(String::from)
        .to_vec(),
        url: format!("rediss://127.0.0.1:{port}/0"),
        ca: Some(ca_pem),
    })
    .await;
    let mock = MockServer::start(MockConfig::default()).await.unwrap();
    let with_ca = format!("ca_file = \"{ca}\"\n");
    let (a, b) = (
        serve(&mock, &redis, &with_ca),
        serve(&mock, &redis, &with_ca),
    );
    let (_, outcome, _) = cache_header(ask(&a.url, "over TLS").await).await;
    assert_eq!(outcome, "miss");
    let (_, outcome, _) = cache_header(ask(&b.url, "over TLS").await).await;
    assert_eq!(outcome, "shared");
    assert_eq!(upstream_calls(&mock, 200), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_shared_answer_wins_over_a_stale_local_copy() {
    let redis = Redis::start().await;
    let mock = MockServer::start(MockConfig::default()).await.unwrap();
    // A and B store answers fresh for a second; C for an hour, so that its answer stays
    // fresh however slow the rest of the test runs.
    let short = "[cache]\nttl = \"1s\"\n";
    let (a, b) = (serve(&mock, &redis, short), serve(&mock, &redis, short));
    let c = serve(&mock, &redis, "[cache]\nttl = \"1h\"\n");
    // B must find A's answer while it is still fresh: a machine that stalls past the second
    // between the two asks makes B fetch for itself; then the test asks a new question.
    let mut question = String::new();
    let mut key = String::new();
    for n in 0.. {
        assert!(n < 20, "B never found A's answer fresh in the shared tier");
        question = format!("asked everywhere {n}");
        let r = ask(&a.url, &question).await;
        key = header(&r, "x-fallthrough-key").to_owned();
        let (_, outcome, _) = cache_header(ask(&b.url, &question).await).await;
        if outcome == "shared" {
            break; // B keeps a copy
        }
    }
    let calls = upstream_calls(&mock, 200);

    // B's copy goes stale (read through its admin endpoint: no request, no refresh).
    let entry = format!("{}/fallthrough/entries/{key}", b.url);
    support::eventually_async("B's copy is stale", || async {
        let r = reqwest::get(&entry).await.unwrap();
        header(&r, "x-fallthrough-freshness") == "stale"
    })
    .await;
    // C fetches again; its fresh answer lands in the shared tier.
    let r = ask_with(&c.url, &question, &[("cache-control", "no-cache")]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(upstream_calls(&mock, 200), calls + 1);
    let (status, outcome, _) = cache_header(ask(&b.url, &question).await).await;
    assert_eq!(
        (status, outcome.as_str()),
        (200, "shared"),
        "B takes the fleet's fresh answer instead of going upstream"
    );
    assert_eq!(upstream_calls(&mock, 200), calls + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_server_refuses_writes_and_still_serves_what_it_holds() {
    let redis = Redis::start().await;
    let mock = MockServer::start(MockConfig::default()).await.unwrap();
    let (a, b) = (serve(&mock, &redis, ""), serve(&mock, &redis, ""));
    let (_, outcome, _) = cache_header(ask(&b.url, "stored before it filled up").await).await;
    assert_eq!(outcome, "miss");

    // Full: every write is refused (`OOM command not allowed`), reads go on.
    let mut conn = redis.connection().await;
    for (name, value) in [("maxmemory-policy", "noeviction"), ("maxmemory", "1")] {
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg(name)
            .arg(value)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let (status, outcome, _) = cache_header(ask(&a.url, "asked when it was full").await).await;
    assert_eq!(
        (status, outcome.as_str()),
        (200, "miss"),
        "the refused write costs nothing"
    );
    let (status, outcome, _) = cache_header(ask(&a.url, "stored before it filled up").await).await;
    assert_eq!(
        (status, outcome.as_str()),
        (200, "shared"),
        "a refusal is not an outage: A still reads the tier"
    );
    let errors = metric(&a.url, SHARED_ERRORS).await;
    assert!(
        errors >= Some(1.0),
        "the refused write is counted: {errors:?}"
    );
}
