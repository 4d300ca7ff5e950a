//! Helpers shared by the integration tests that need them (`mod support;`).

// Each test binary uses only some of these.
#![allow(dead_code)]

pub mod proxy;
pub mod redis;
pub mod sdk;

use std::path::Path;
use std::process::{Child, Command as StdCommand, Stdio};
use std::time::Duration;

use fallthrough::entry::{now_millis, Entry};
use fallthrough::error::DiskError;
use fallthrough::key::CacheKey;
use fallthrough::Client;

/// Makes the entry under `key` `by` older: stored, fresh until and stale until `by` earlier.
/// Freshness is a function of the clock and of those times, so this is waiting `by` without
/// the wait (and without the race of a wait against a ttl). Returns the entry as it now is.
pub async fn backdate(client: &Client, key: &CacheKey, by: Duration) -> Entry {
    let now = now_millis();
    let hit = client
        .cache()
        .get(key, now)
        .await
        .expect("an entry to backdate");
    let by = by.as_millis() as u64;
    let entry = Entry {
        stored_at: hit.entry.stored_at - by,
        fresh_until: hit.entry.fresh_until - by,
        stale_until: hit.entry.stale_until - by,
        ..(*hit.entry).clone()
    };
    client.cache().insert(*key, entry.clone(), now).await;
    entry
}

/// An address where connections are refused, for an unreachable upstream: a socket bound to
/// it but not listening. Keep the socket for as long as the address is used: it holds the
/// port, so that no other test's listener can take it meanwhile (a port merely closed can be
/// handed out again).
pub fn refusing_address() -> (tokio::net::TcpSocket, std::net::SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    (socket, addr)
}

/// Copies the directory `from` to `to`, recursively (a cache directory, closed).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for item in std::fs::read_dir(from).unwrap() {
        let item = item.unwrap();
        let target = to.join(item.file_name());
        if item.file_type().unwrap().is_dir() {
            copy_dir(&item.path(), &target);
        } else {
            std::fs::copy(item.path(), target).unwrap();
        }
    }
}

/// Polls `done` every 10 ms until it holds, for at most a minute (a bound only a wedged
/// process reaches), then panics with `what`. For events a test cannot await directly.
pub async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    eventually_async(what, || std::future::ready(done())).await;
}

/// As [`eventually`], for a condition that has to ask over the network (a request, a scrape).
pub async fn eventually_async<F: std::future::Future<Output = bool>>(
    what: &str,
    mut done: impl FnMut() -> F,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !done().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited a minute for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What `open` opens, once the cache directory's lock is free. A tier dropped in this process
/// lets go of sled's lock a moment later (when sled's flusher thread ends), so an open right
/// after a drop can find the directory still held: it is tried again until it opens, for at
/// most a minute (a bound only a wedged process reaches). Any other error panics.
pub async fn once_unlocked<T, F: std::future::Future<Output = Result<T, DiskError>>>(
    mut open: impl FnMut() -> F,
) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match open().await {
            Ok(opened) => return opened,
            Err(DiskError::Locked { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            Err(e) => panic!("opening the cache: {e}"),
        }
    }
}

/// The `fallthrough` binary as a user with a clean environment runs it: no API key, no
/// configuration or upstream from the environment, and a minute at most.
pub fn bin() -> assert_cmd::Command {
    let mut cmd = assert_cmd::Command::cargo_bin("fallthrough").unwrap();
    cmd.env_remove("ANTHROPIC_API_KEY")
        .env_remove("FALLTHROUGH_CONFIG")
        .env_remove("FALLTHROUGH_UPSTREAM")
        .env_remove("FALLTHROUGH_SHARED_URL")
        .timeout(Duration::from_secs(60));
    cmd
}

/// `fallthrough serve` on a free loopback port over `upstream` and `cache`, tuned by `tune`
/// (more arguments, environment, stderr), with a clean environment as [`bin`]'s; returns the
/// child and the URL it printed once listening.
pub fn spawn_serve(
    upstream: &str,
    cache: &Path,
    tune: impl FnOnce(&mut StdCommand),
) -> (Child, String) {
    let mut cmd = StdCommand::new(assert_cmd::cargo::cargo_bin("fallthrough"));
    cmd.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        upstream,
        "--cache-dir",
    ])
    .arg(cache)
    .env_remove("ANTHROPIC_API_KEY")
    .env_remove("FALLTHROUGH_CONFIG")
    .env_remove("FALLTHROUGH_SHARED_URL")
    .stdout(Stdio::piped());
    tune(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    let mut first = String::new();
    let stdout = child.stdout.take().unwrap();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut first).unwrap();
    let url = first.trim().rsplit(' ').next().unwrap().to_owned();
    assert!(url.starts_with("http://"), "{first}");
    (child, url)
}

/// Sends SIGTERM to a child this test started (by its pid).
pub fn terminate(child: &Child) {
    let pid = child.id().to_string();
    let sent = StdCommand::new("kill").args(["-TERM", &pid]).status();
    assert!(sent.unwrap().success(), "kill -TERM {pid}");
}
