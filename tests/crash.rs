//! `kill -9` of `fallthrough serve` during a burst of writes, then a restart on the same cache
//! directory: the server starts (the kernel released sled's lock with the process), serves the
//! entries that reached the disk, and never serves a corrupt or different body. Also: a second
//! `serve` on a directory that a running one holds exits non-zero naming `--server`.
//!
//! Every wait is bounded; the children are killed by a guard when the test fails.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fallthrough::mock::{MockConfig, MockServer};
use serde_json::{json, Value};
use tokio::sync::Semaphore;

const MODEL: &str = "claude-sonnet-4-6";
const REQUESTS: usize = 300;
const CONCURRENCY: usize = 16;
/// Answers before the kill.
const KILL_AFTER: usize = 150;
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A `fallthrough serve` child, killed (SIGKILL) and reaped when dropped.
struct Server {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Server {
    /// Starts `serve` on a free port and waits (bounded) for its address on stdout.
    fn start(upstream: &str, cache_dir: &Path, log: PathBuf) -> Server {
        let stderr = File::create(&log).expect("log file");
        let child = command(upstream, cache_dir)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("fallthrough serve spawns");
        let mut server = Server {
            child,
            url: String::new(),
            log,
        };
        let stdout = server.child.stdout.take().expect("stdout piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // Reads to the end, so the child never blocks on a full pipe.
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(url) = line.strip_prefix("fallthrough listening on ") {
                    let _ = tx.send(url.trim().to_owned());
                }
            }
        });
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(url) => server.url = url,
            Err(_) => {
                let status = server.child.try_wait().ok().flatten();
                panic!(
                    "fallthrough serve did not print its address in {START_TIMEOUT:?} \
                     (exit: {status:?}); its log:\n{}",
                    server.log_text()
                );
            }
        }
        server
    }

    /// SIGKILL, then reap.
    fn kill_9(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaped");
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn command(upstream: &str, cache_dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fallthrough"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--upstream", upstream])
        .arg("--cache-dir")
        .arg(cache_dir)
        .env("RUST_LOG", "info")
        .env_remove("FALLTHROUGH_CONFIG")
        .env_remove("FALLTHROUGH_UPSTREAM")
        .env_remove("ANTHROPIC_API_KEY")
        .stdin(Stdio::null());
    cmd
}

fn body(i: usize) -> String {
    json!({
        "model": MODEL,
        "max_tokens": 64,
        "messages": [{"role": "user", "content": format!("crash burst request {i}")}],
    })
    .to_string()
}

fn header<'a>(r: &'a reqwest::Response, name: &str) -> &'a str {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_during_a_burst_then_restart() {
    // Latency makes the burst last long enough (about 16 answers per 50 ms) that most answers
    // are older than the disk tier's 100 ms flush interval when the kill comes.
    let mock = MockServer::start(MockConfig {
        latency_ms: 50,
        ..MockConfig::default()
    })
    .await
    .expect("mock starts");
    let upstream = mock.url();
    let tmp = tempfile::tempdir().expect("temp dir");
    let cache_dir = tmp.path().join("cache");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("http client");

    let mut first = tokio::task::block_in_place(|| {
        Server::start(&upstream, &cache_dir, tmp.path().join("first.log"))
    });

    // A second server on the same directory is refused, with a message naming `--server`.
    tokio::task::block_in_place(|| {
        second_serve_is_refused(&upstream, &cache_dir, &tmp.path().join("second.log"))
    });

    // The burst: every request distinct, so every answer is a write.
    let answered: Arc<Mutex<Vec<(usize, Bytes)>>> = Arc::default();
    let count = Arc::new(AtomicUsize::new(0));
    let killed = Arc::new(AtomicBool::new(false));
    let permits = Arc::new(Semaphore::new(CONCURRENCY));
    let mut tasks = Vec::with_capacity(REQUESTS);
    for i in 0..REQUESTS {
        let (http, url) = (http.clone(), first.url.clone());
        let (answered, count, killed, permits) = (
            answered.clone(),
            count.clone(),
            killed.clone(),
            permits.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let _permit = permits.acquire_owned().await.expect("semaphore open");
            // Past KILL_AFTER answers no new request starts: those in flight are the ones the
            // kill catches, and the burst cannot finish before the kill however late it comes.
            if killed.load(Ordering::SeqCst) || count.load(Ordering::SeqCst) >= KILL_AFTER {
                return;
            }
            let sent = http
                .post(format!("{url}/v1/messages"))
                .header("content-type", "application/json")
                .header("x-api-key", "sk-test")
                .header("anthropic-version", "2023-06-01")
                .body(body(i))
                .send()
                .await;
            let Ok(response) = sent else { return };
            if response.status() != 200 {
                return;
            }
            assert_eq!(header(&response, "x-fallthrough-cache"), "miss");
            if let Ok(bytes) = response.bytes().await {
                answered.lock().unwrap().push((i, bytes));
                count.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }

    let deadline = Instant::now() + Duration::from_secs(60);
    while count.load(Ordering::SeqCst) < KILL_AFTER {
        assert!(
            Instant::now() < deadline,
            "only {} of {REQUESTS} answered in 60 s; log:\n{}",
            count.load(Ordering::SeqCst),
            first.log_text()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    killed.store(true, Ordering::SeqCst);
    tokio::task::block_in_place(|| first.kill_9());
    let at_kill = count.load(Ordering::SeqCst);
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("a burst request ended in 30 s after the kill")
            .expect("burst task");
    }
    let answered = std::mem::take(&mut *answered.lock().unwrap());
    assert!(answered.len() >= KILL_AFTER && answered.len() < REQUESTS);
    eprintln!(
        "killed after {at_kill} answers; {} answered in all",
        answered.len()
    );

    // Restart on the same directory: it must start.
    let second = tokio::task::block_in_place(|| {
        Server::start(&upstream, &cache_dir, tmp.path().join("restart.log"))
    });
    let calls_before = mock.stats().requests;

    // Every answer given before the kill: a disk hit with the same bytes, or lost (504 under
    // only-if-cached). Never anything else.
    let before: std::collections::HashMap<usize, Bytes> = answered.into_iter().collect();
    let mut hits = 0;
    let mut lost = 0;
    let mut unanswered_hits = Vec::new();
    for i in 0..REQUESTS {
        let response = http
            .post(format!("{}/v1/messages", second.url))
            .header("content-type", "application/json")
            .header("x-api-key", "sk-test")
            .header("anthropic-version", "2023-06-01")
            .header("cache-control", "only-if-cached")
            .body(body(i))
            .send()
            .await
            .expect("the restarted server answers");
        let status = response.status().as_u16();
        let cache = header(&response, "x-fallthrough-cache").to_owned();
        let bytes = response.bytes().await.expect("body");
        match (status, before.get(&i)) {
            (200, answer) => {
                assert_eq!(
                    cache, "disk",
                    "request {i}: a hit after a restart is a disk hit"
                );
                match answer {
                    Some(answer) => {
                        assert_eq!(
                            &bytes, answer,
                            "request {i}: the cached body differs from the one answered before \
                             the kill"
                        );
                        hits += 1;
                    }
                    // Answered by the upstream but not yet relayed when the kill came.
                    None => unanswered_hits.push((i, bytes)),
                }
            }
            (504, _) => {
                let error: Value = serde_json::from_slice(&bytes).expect("504 body is JSON");
                assert_eq!(error["type"], "error", "{error}");
                if before.contains_key(&i) {
                    lost += 1;
                }
            }
            (status, _) => panic!(
                "request {i}: status {status} from the restarted server: {}",
                String::from_utf8_lossy(&bytes)
            ),
        }
    }
    assert_eq!(
        mock.stats().requests,
        calls_before,
        "only-if-cached must not reach the upstream"
    );
    eprintln!(
        "after the restart: {hits} of {} hits, {lost} lost in flight, {} hits never answered",
        before.len(),
        unanswered_hits.len()
    );
    assert!(
        hits * 2 >= before.len(),
        "fewer than half of the {} answers before the kill survived it ({hits}); \
         the disk tier flushes every 100 ms",
        before.len()
    );
    // Entries stored but never relayed must still be the upstream's answer, intact.
    for (i, bytes) in unanswered_hits {
        let direct = http
            .post(format!("{upstream}/v1/messages"))
            .header("content-type", "application/json")
            .header("x-api-key", "sk-test")
            .body(body(i))
            .send()
            .await
            .expect("mock answers")
            .bytes()
            .await
            .expect("mock body");
        let cached: Value = serde_json::from_slice(&bytes).expect("cached body is JSON");
        let direct: Value = serde_json::from_slice(&direct).expect("mock body is JSON");
        assert_eq!(cached, direct, "request {i}: a corrupt entry was served");
    }

    // The restarted server still works as a cache: a new request is a miss, then a hit.
    for expected in ["miss", "memory"] {
        let response = http
            .post(format!("{}/v1/messages", second.url))
            .header("content-type", "application/json")
            .header("x-api-key", "sk-test")
            .body(body(REQUESTS + 1))
            .send()
            .await
            .expect("answers");
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "x-fallthrough-cache"), expected);
    }
    drop(second);
    mock.shutdown().await;
}

/// `serve` on a directory a running server holds: exits non-zero, and says to use `--server`.
fn second_serve_is_refused(upstream: &str, cache_dir: &Path, log: &Path) {
    let stderr = File::create(log).expect("log file");
    let child = command(upstream, cache_dir)
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("second serve spawns");
    let mut guard = Server {
        child,
        url: String::new(),
        log: log.to_owned(),
    };
    let deadline = Instant::now() + START_TIMEOUT;
    let status = loop {
        if let Some(status) = guard.child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "a second serve on a held cache directory still runs after {START_TIMEOUT:?}; log:\n{}",
            guard.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = guard.log_text();
    assert!(
        !status.success(),
        "a second serve on a held directory succeeded; log:\n{text}"
    );
    assert!(
        text.contains("--server"),
        "the error does not name --server:\n{text}"
    );
}
