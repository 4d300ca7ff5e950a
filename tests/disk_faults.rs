//! The disk tier under faults (SPEC, "The disk tier under faults, and at scale"): a full disk
//! never fails a request, stalls `/metrics` or `/healthz`, or stops SIGTERM, and storing
//! resumes when space is back; a damaged database never stops the start and never serves a
//! corrupt answer.
//!
//! The full-disk test mounts a small tmpfs, so it needs root (CI runs as root); without it,
//! it fails and says so.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command as StdCommand, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fallthrough::cache::Cache;
use fallthrough::entry::{now_millis, Entry};
use fallthrough::key::CacheKey;
use fallthrough::mock::{MockConfig, MockServer};
use support::proxy::request;

const EVENTUALLY: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

/// A tmpfs of `size` mounted at a new directory, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let out = StdCommand::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("running mount");
        assert!(
            out.status.success(),
            "this test mounts a tmpfs to fill a disk, which needs root (CI runs as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { dir }
    }

    fn resize(&self, size: &str) {
        let status = StdCommand::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.dir.path())
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = StdCommand::new("umount").arg(self.dir.path()).status();
    }
}

/// The value of an unlabelled or labelled sample in Prometheus text.
fn sample(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_never_fails_a_request_and_storing_resumes_when_space_is_back() {
    let disk = Tmpfs::mount("2m");
    let mock = MockServer::start(MockConfig::default()).await.unwrap();
    let cache = disk.path().join("cache");
    let log = disk
        .path()
        .join("..")
        .join(format!("serve-{}.log", std::process::id()));
    let log_file = std::fs::File::create(&log).unwrap();
    let (mut child, url) = support::spawn_serve(&mock.url(), &cache, |cmd| {
        cmd.env("RUST_LOG", "warn").stderr(Stdio::from(log_file));
    });
    let http = reqwest::Client::new();
    let http = &http;
    let url = url.as_str();
    let ask = |n: u64| async move {
        let r = http
            .post(format!("{url}/v1/messages"))
            .header("x-api-key", "sk-ant-caller-key")
            .json(&request(&format!("question {n} {}", "padding ".repeat(50))))
            .send()
            .await
            .unwrap();
        r.status().as_u16()
    };
    let metrics = || async move {
        let r = tokio::time::timeout(EVENTUALLY, http.get(format!("{url}/metrics")).send())
            .await
            .expect("/metrics answers");
        r.unwrap().text().await.unwrap()
    };

    // Fill the disk (and go on past full), 8 at a time: every request is answered.
    let mut n = 0;
    while sample(&metrics().await, "fallthrough_store_errors_total") == 0.0 {
        assert!(n < 20_000, "the 2 MiB disk never filled");
        let answers = futures_util::future::join_all((n..n + 200).map(ask)).await;
        assert!(answers.iter().all(|s| *s == 200), "{answers:?}");
        n += 200;
    }
    let answers = futures_util::future::join_all((n..n + 200).map(ask)).await;
    assert!(answers.iter().all(|s| *s == 200), "full disk: {answers:?}");
    n += 200;
    let health = tokio::time::timeout(EVENTUALLY, http.get(format!("{url}/healthz")).send()).await;
    assert_eq!(health.expect("/healthz answers").unwrap().status(), 200);
    let full = metrics().await;
    let stored_when_full = sample(&full, "fallthrough_cache_entries{tier=\"disk\"}");

    // Space is back: within a reopen interval or so, new answers are stored again.
    disk.resize("64m");
    let next = std::cell::Cell::new(n);
    let resumed = || async {
        let from = next.replace(next.get() + 20);
        let answers = futures_util::future::join_all((from..from + 20).map(ask)).await;
        assert!(answers.iter().all(|s| *s == 200), "{answers:?}");
        sample(&metrics().await, "fallthrough_cache_entries{tier=\"disk\"}") > stored_when_full
    };
    support::eventually_async("storing to resume", resumed).await;

    // SIGTERM still drains and exits.
    support::terminate(&child);
    support::eventually("serve to exit on SIGTERM", || {
        child.try_wait().unwrap().is_some()
    })
    .await;
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    let logged = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    let complaints = logged.matches("the disk cache failed").count();
    assert!(
        (1..=3).contains(&complaints),
        "logged {complaints} times:\n{logged}"
    );
}

fn key(n: u64) -> CacheKey {
    CacheKey(*blake3::hash(&n.to_le_bytes()).as_bytes())
}

fn body(n: u64) -> Bytes {
    Bytes::from(format!(
        "{{\"answer\":{n},\"text\":\"{}\"}}",
        "x".repeat(300)
    ))
}

const ENTRIES: u64 = 60;

/// A cache directory holding `ENTRIES` entries, flushed and closed.
async fn filled(dir: &Path) {
    filled_under(dir, 1 << 30).await;
}

/// As [`filled`], under the disk bound `disk_bytes` (which sets the number of shards).
async fn filled_under(dir: &Path, disk_bytes: u64) {
    let cache = Cache::open(dir, 1 << 20, disk_bytes).await.unwrap();
    let now = now_millis();
    for n in 0..ENTRIES {
        cache
            .insert(key(n), Entry::new(body(n), "m", now, HOUR, HOUR), now)
            .await;
    }
    cache.flush().await.unwrap();
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for item in std::fs::read_dir(dir).unwrap() {
        let path = item.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// Opens a damaged directory: it must open, serve only what was written, byte for byte, and
/// keep at most one moved-aside copy.
async fn opens_and_serves_nothing_corrupt(dir: &Path, what: &str) -> bool {
    let open = support::once_unlocked(|| Cache::open(dir, 1 << 20, 1 << 30));
    let cache = tokio::time::timeout(EVENTUALLY, open)
        .await
        .unwrap_or_else(|_| panic!("{what}: opening hung"));
    let now = now_millis();
    for n in 0..ENTRIES {
        if let Some(hit) = cache.get(&key(n), now).await {
            assert_eq!(hit.entry.body, body(n), "{what}: entry {n} served corrupt");
        }
    }
    // Still usable: a write and a read.
    cache
        .insert(key(999), Entry::new(body(999), "m", now, HOUR, HOUR), now)
        .await;
    assert_eq!(
        cache.get(&key(999), now).await.unwrap().entry.body,
        body(999),
        "{what}"
    );
    drop(cache);
    let aside = std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("corrupt-")
        })
        .count();
    assert!(aside <= 1, "{what}: {aside} moved-aside copies");
    aside == 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_database_never_stops_the_start_nor_serves_a_corrupt_answer() {
    let work = tempfile::tempdir().unwrap();
    let template = work.path().join("template");
    filled(&template).await;
    let db_files = files(&template.join("db"));
    assert!(!db_files.is_empty());

    let mut trial = 0;
    let mut fresh = |damage: &dyn Fn(&Path)| {
        trial += 1;
        let dir = work.path().join(format!("trial-{trial}"));
        support::copy_dir(&template, &dir);
        damage(&dir.join("db"));
        dir
    };
    let mut trials: Vec<(String, PathBuf)> = Vec::new();
    for file in &db_files {
        let rel = file.strip_prefix(template.join("db")).unwrap().to_owned();
        let len = std::fs::metadata(file).unwrap().len();
        for step in 0..6u64 {
            let at = len * step / 6 + (step * 7919) % len.max(1);
            let rel = rel.clone();
            let dir = fresh(&|db: &Path| {
                let path = db.join(&rel);
                let mut bytes = std::fs::read(&path).unwrap();
                if !bytes.is_empty() {
                    let i = (at as usize) % bytes.len();
                    bytes[i] ^= 0x5a;
                }
                std::fs::write(&path, bytes).unwrap();
            });
            trials.push((format!("{} flipped at {at}", rel.display()), dir));
        }
        let rel_half = rel.clone();
        let dir = fresh(&|db: &Path| {
            let path = db.join(&rel_half);
            let bytes = std::fs::read(&path).unwrap();
            std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        });
        trials.push((format!("{} truncated to half", rel.display()), dir));
    }
    let dir = fresh(&|db: &Path| std::fs::write(db.join("conf"), b"garbage\x00\xff").unwrap());
    trials.push(("conf replaced by garbage".into(), dir));
    let mut moved = 0;
    for (what, dir) in &trials {
        moved += usize::from(opens_and_serves_nothing_corrupt(dir, what).await);
    }
    // Some of the damage is bad enough that sled cannot open the database (it was moved
    // aside), so these trials do reach that path; the rest opened with the damage in place.
    eprintln!(
        "{moved} of {} damaged databases were moved aside",
        trials.len()
    );
    assert!(moved >= 1, "no trial reached the move-aside path");
    // Damaged again after a move-aside: still one copy kept.
    let (what, dir) = &trials[trials.len() - 1];
    std::fs::write(dir.join("db").join("conf"), b"garbage again").unwrap();
    opens_and_serves_nothing_corrupt(dir, &format!("{what}, twice")).await;
    assert!(trials.len() >= 10, "{} trials", trials.len());
}

#[tokio::test]
async fn counts_survive_a_restart_without_reading_the_entries() {
    let dir = tempfile::tempdir().unwrap();
    filled(dir.path()).await;
    let open = || Cache::open(dir.path(), 1 << 20, 1 << 30);
    let cache = Arc::new(support::once_unlocked(open).await);
    let usage = cache.usage().await;
    assert_eq!(usage.disk_entries, ENTRIES);
    assert!(usage.disk_bytes > ENTRIES * 300, "{usage:?}");
    cache.remove(&key(0)).await;
    drop(cache);
    let again = support::once_unlocked(open).await;
    assert_eq!(again.usage().await.disk_entries, ENTRIES - 1);
}

/// In a sharded directory (a bound of 10 GiB: 16 shards) a database that cannot be opened is
/// one shard's: it alone is moved aside, inside its own directory, and every other shard keeps
/// its entries. Nothing corrupt is served, and the process opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_shard_is_moved_aside_alone_and_the_others_keep_their_entries() {
    const SHARDED: u64 = 10 << 30;
    const SHARDS: u64 = 16;
    let shard_of = |n: u64| u64::from_le_bytes(key(n).0[..8].try_into().unwrap()) % SHARDS;
    let dir = tempfile::tempdir().unwrap();
    filled_under(dir.path(), SHARDED).await;
    let damaged = shard_of(0);
    let shard_dir = |i: u64| dir.path().join(format!("shard-{i}-of-{SHARDS}"));
    std::fs::write(
        shard_dir(damaged).join("db").join("conf"),
        b"garbage\x00\xff",
    )
    .unwrap();

    let open = support::once_unlocked(|| Cache::open(dir.path(), 1 << 20, SHARDED));
    let cache = tokio::time::timeout(EVENTUALLY, open)
        .await
        .expect("opening hung");
    let now = now_millis();
    for n in 0..ENTRIES {
        let hit = cache.get(&key(n), now).await;
        if shard_of(n) == damaged {
            assert!(hit.is_none(), "entry {n}: its shard was moved aside");
        } else {
            let hit = hit.unwrap_or_else(|| panic!("entry {n} of an undamaged shard was lost"));
            assert_eq!(hit.entry.body, body(n), "entry {n} served corrupt");
        }
    }
    // The damaged shard works again, fresh.
    cache
        .insert(key(0), Entry::new(body(0), "m", now, HOUR, HOUR), now)
        .await;
    assert_eq!(cache.get(&key(0), now).await.unwrap().entry.body, body(0));
    drop(cache);
    let aside = |dir: &Path| {
        std::fs::read_dir(dir)
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                name.to_string_lossy().starts_with("corrupt-")
            })
            .count()
    };
    assert_eq!(aside(dir.path()), 0, "nothing moved aside at the top");
    for i in 0..SHARDS {
        let expected = usize::from(i == damaged);
        assert_eq!(
            aside(&shard_dir(i)),
            expected,
            "moved-aside copies in shard {i}"
        );
    }
}

/// A disk already full when `serve` starts: it starts, answers without the disk, and starts
/// storing by itself once there is space (SPEC: a full disk never stops the process; storing
/// resumes when space is back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_full_at_the_start_is_used_once_space_is_back() {
    let disk = Tmpfs::mount("256k");
    let filler = disk.path().join("filler");
    // Fill it: writes until the tmpfs refuses.
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 4096];
        while file.write_all(&block).is_ok() {}
    }
    let mock = MockServer::start(MockConfig::default()).await.unwrap();
    let (mut child, url) = support::spawn_serve(&mock.url(), &disk.path().join("cache"), |cmd| {
        cmd.env("RUST_LOG", "warn").stderr(Stdio::null());
    });
    let http = reqwest::Client::new();
    let ask = |n: u64| {
        let (http, url) = (&http, &url);
        async move {
            let r = http
                .post(format!("{url}/v1/messages"))
                .header("x-api-key", "sk-ant-caller-key")
                .json(&request(&format!("asked on a full disk {n}")))
                .send()
                .await
                .unwrap();
            r.status().as_u16()
        }
    };
    let disk_entries = || async {
        let text = http.get(format!("{url}/metrics")).send().await.unwrap();
        sample(
            &text.text().await.unwrap(),
            "fallthrough_cache_entries{tier=\"disk\"}",
        )
    };
    assert_eq!(ask(0).await, 200, "answered with the disk full");
    assert_eq!(disk_entries().await, 0.0);

    // Space is back: within a retry or so, answers are stored on disk.
    std::fs::remove_file(&filler).unwrap();
    disk.resize("64m");
    let mut n = 0;
    support::eventually_async("the disk tier to open and store", || {
        n += 1;
        let asked = ask(n);
        async move {
            assert_eq!(asked.await, 200);
            disk_entries().await > 0.0
        }
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
}

/// Both generations of a shard damaged: they open side by side and are moved aside in the
/// same second; the open still succeeds, with one moved-aside copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_damaged_generations_are_moved_aside_and_the_tier_opens() {
    let dir = tempfile::tempdir().unwrap();
    filled(dir.path()).await;
    support::copy_dir(&dir.path().join("db"), &dir.path().join("db-1"));
    for generation in ["db", "db-1"] {
        std::fs::write(dir.path().join(generation).join("conf"), b"garbage\x00\xff").unwrap();
    }
    assert!(opens_and_serves_nothing_corrupt(dir.path(), "two damaged generations").await);
}
