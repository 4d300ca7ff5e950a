//! The two tiers through their public face: lookups, promotion, reopening, corruption, bounds.

mod support;

use std::time::Duration;

use bytes::Bytes;
use fallthrough::cache::{Cache, DiskTier, Tier};
use fallthrough::entry::{now_millis, Entry, Freshness};
use fallthrough::error::DiskError;
use fallthrough::key::{CacheKey, KeyContext};
use serde_json::json;

const MIB: u64 = 1024 * 1024;
const HOUR: Duration = Duration::from_secs(3600);

fn key(n: usize) -> CacheKey {
    KeyContext::new("/v1/messages").key(&json!({"model": "m", "n": n}))
}

fn entry(n: usize, now: u64) -> Entry {
    let body = format!(r#"{{"type":"message","content":[{{"type":"text","text":"answer {n}"}}]}}"#);
    Entry::new(Bytes::from(body), "m", now, HOUR, 24 * HOUR)
}

#[tokio::test]
async fn miss_then_memory_hit() {
    let cache = Cache::memory_only(MIB);
    let now = now_millis();
    assert!(cache.get(&key(1), now).await.is_none());
    cache.insert(key(1), entry(1, now), now).await;
    let hit = cache.get(&key(1), now).await.expect("hit");
    assert_eq!(hit.tier, Tier::Memory);
    assert_eq!(hit.entry.body, entry(1, now).body);
    assert!(cache.get(&key(2), now).await.is_none());
}

#[tokio::test]
async fn reopened_store_answers_from_disk_then_memory() {
    let dir = tempfile::tempdir().unwrap();
    let now = now_millis();
    {
        let cache = Cache::open(dir.path(), MIB, 64 * MIB).await.unwrap();
        for n in 0..20 {
            cache.insert(key(n), entry(n, now), now).await;
        }
        cache.flush().await.unwrap();
    }
    let cache = support::once_unlocked(|| Cache::open(dir.path(), MIB, 64 * MIB)).await;
    for n in 0..20 {
        let hit = cache.get(&key(n), now).await.expect("disk hit");
        assert_eq!(hit.tier, Tier::Disk, "entry {n}");
        assert_eq!(*hit.entry, entry(n, now));
        let again = cache.get(&key(n), now).await.expect("promoted");
        assert_eq!(again.tier, Tier::Memory, "entry {n} was promoted");
    }
}

#[cfg(unix)]
#[tokio::test]
async fn cache_dir_is_created_private() {
    use std::os::unix::fs::PermissionsExt;
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("a/b/cache");
    let _cache = Cache::open(&dir, MIB, MIB).await.unwrap();
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
}

#[tokio::test]
async fn a_directory_in_use_gives_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let _held = DiskTier::open(dir.path(), MIB).await.unwrap();
    let err = DiskTier::open(dir.path(), MIB).await.err().expect("locked");
    assert!(matches!(err, DiskError::Locked { .. }), "{err:?}");
    assert!(err.to_string().contains("--server"), "{err}");
}

#[tokio::test]
async fn corrupt_entries_are_misses_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let now = now_millis();
    let disk = DiskTier::open(dir.path(), 64 * MIB).await.unwrap();
    let good = entry(1, now).encode();
    let mut flipped = good.clone();
    let last = flipped.len() - 3;
    flipped[last] ^= 0x01; // inside the body: the JSON would still parse
    disk.insert_raw(&key(1), &flipped, now).unwrap();
    disk.insert_raw(&key(2), &good[..good.len() / 2], now)
        .unwrap();
    disk.insert_raw(&key(3), b"not an entry at all", now)
        .unwrap();
    disk.insert(&key(4), &entry(4, now), now).unwrap();
    drop(disk);

    let cache = support::once_unlocked(|| Cache::open(dir.path(), MIB, 64 * MIB)).await;
    for n in 1..=3 {
        assert!(
            cache.get(&key(n), now).await.is_none(),
            "corrupt {n} served"
        );
    }
    assert_eq!(
        cache.get(&key(4), now).await.unwrap().entry.body,
        entry(4, now).body
    );
    // Removed, not just skipped.
    assert_eq!(cache.usage().await.disk_entries, 1);
}

#[tokio::test]
async fn stale_entries_are_found_and_expired_ones_are_gone() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path(), MIB, 64 * MIB).await.unwrap();
    let now = now_millis();
    let ttl = Duration::from_millis(50);
    let stale = Entry::new(Bytes::from_static(b"{}"), "m", now, ttl, HOUR);
    let expired = Entry::new(Bytes::from_static(b"{}"), "m", now - 10_000, ttl, ttl);
    cache.insert(key(1), stale, now).await;
    cache.insert(key(2), expired, now).await;
    let later = now + 1000;
    let hit = cache.get(&key(1), later).await.expect("stale entry found");
    assert_eq!(hit.entry.freshness(later, None), Freshness::Stale);
    assert!(cache.get(&key(2), later).await.is_none());
}

#[tokio::test]
async fn memory_tier_is_bounded_by_bytes() {
    let cache = Cache::memory_only(64 * 1024);
    let now = now_millis();
    let big = Bytes::from(vec![b'x'; 4096]);
    for n in 0..100 {
        let e = Entry::new(big.clone(), "m", now, HOUR, HOUR);
        cache.insert(key(n), e, now).await;
    }
    let usage = cache.usage().await;
    assert!(usage.memory_bytes <= 64 * 1024, "{usage:?}");
    assert!(
        usage.memory_entries < 100 && usage.memory_entries > 0,
        "{usage:?}"
    );
}

#[tokio::test]
async fn disk_eviction_takes_expired_first_then_least_recently_used() {
    let dir = tempfile::tempdir().unwrap();
    let body = Bytes::from(vec![b'x'; 1000]);
    let now = now_millis();
    // Opened with room to spare so writes start no pass of their own; each pass below is given
    // a bound with room for about ten entries.
    let disk = DiskTier::open(dir.path(), MIB).await.unwrap();
    let fresh = |t: u64| Entry::new(body.clone(), "m", t, HOUR, HOUR);
    let gone = Entry::new(
        body.clone(),
        "m",
        now - 10_000,
        Duration::ZERO,
        Duration::ZERO,
    );
    disk.insert_raw(&key(0), &gone.encode(), now).unwrap();
    for n in 1..10 {
        disk.insert(&key(n), &fresh(now), now + n as u64).unwrap();
    }
    // Entry 1 is used again (seconds later: access times move at a second's grain), so 2 is
    // now the least recently used.
    disk.get(&key(1), now + 5_000).unwrap().unwrap();
    let evicted = disk.evict(now + 6_000, 11_000).await.unwrap();
    assert_eq!(evicted.expired, 1);
    assert_eq!(
        evicted.least_recently_used, 0,
        "under the bound once expired went"
    );

    disk.insert(&key(10), &fresh(now), now + 7_000).unwrap();
    disk.insert(&key(11), &fresh(now), now + 7_001).unwrap();
    let evicted = disk.evict(now + 8_000, 11_000).await.unwrap();
    assert!(evicted.least_recently_used >= 1, "{evicted:?}");
    assert!(
        disk.get(&key(2), now + 9_000).unwrap().is_none(),
        "LRU entry kept"
    );
    assert!(
        disk.get(&key(1), now + 9_000).unwrap().is_some(),
        "recently used entry evicted"
    );
    assert!(
        disk.get(&key(11), now + 9_000).unwrap().is_some(),
        "newest entry evicted"
    );
    assert!(disk.usage().1 <= 11_000);
}

#[tokio::test]
async fn writes_over_the_disk_bound_evict_by_themselves() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path(), MIB, 50_000).await.unwrap();
    let body = Bytes::from(vec![b'y'; 2000]);
    let now = now_millis();
    for n in 0..200 {
        cache
            .insert(key(n), Entry::new(body.clone(), "m", now, HOUR, HOUR), now)
            .await;
    }
    // The writes started a pass on the blocking pool and returned; wait for it (and for the
    // passes it runs after it for what was written meanwhile) to end.
    cache.wait_for_eviction().await;
    let usage = cache.usage().await;
    assert!(usage.disk_bytes <= 50_000, "{usage:?}");
    assert!(usage.disk_entries > 0);
}

/// The bytes of the files under `dir`, as `du --apparent-size` counts them.
fn du(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|items| {
            items
                .flatten()
                .map(|item| match item.file_type() {
                    Ok(t) if t.is_dir() => du(&item.path()),
                    _ => item.metadata().map_or(0, |m| m.len()),
                })
                .sum()
        })
        .unwrap_or(0)
}

/// `disk_bytes` bounds the directory (SPEC: at most the bound + 10% + 16 MiB), not only the
/// entries' bytes: sled's files hold about twice their live bytes and grow with every removal,
/// so the tier starts a new generation when the newer's files reach half the bound and deletes
/// the older. An entry read from the older generation is copied forward and outlives it; one
/// never read goes with it.
#[tokio::test]
async fn the_directory_stays_within_disk_bytes_across_generations() {
    let dir = tempfile::tempdir().unwrap();
    let bound = 16 * MIB;
    let disk = DiskTier::open(dir.path(), bound).await.unwrap();
    let now = now_millis();
    let body = Bytes::from(vec![b'g'; 1500]);
    let filler = Entry::new(body, "m", now, HOUR, HOUR);
    disk.insert(&key(0), &entry(0, now), now).unwrap();
    disk.insert(&key(1), &entry(1, now), now).unwrap();
    let mut largest = 0;
    let mut next = 2;
    // Writes until generation `n`'s directory appears, measuring the directory as it grows.
    let mut write_until = |generation: &str| {
        for _ in 0..200_000 {
            if dir.path().join(generation).exists() {
                return;
            }
            disk.insert(&key(next), &filler, now).unwrap();
            if next % 100 == 0 {
                largest = largest.max(du(dir.path()));
            }
            next += 1;
        }
        panic!("no generation {generation} after {next} writes");
    };
    write_until("db-1");
    assert!(
        disk.get(&key(0), now).unwrap().is_some(),
        "read from the older generation"
    );
    write_until("db-2");
    assert!(
        !dir.path().join("db").exists(),
        "the first generation was deleted"
    );
    assert!(
        disk.get(&key(0), now).unwrap().is_some(),
        "a read entry outlives its generation"
    );
    assert!(
        disk.get(&key(1), now).unwrap().is_none(),
        "an entry never read goes with its generation"
    );
    write_until("db-6");
    disk.wait_for_eviction().await;
    disk.flush().await.unwrap();
    largest = largest.max(du(dir.path()));
    let allowed = bound + bound / 10 + 16 * MIB;
    assert!(
        largest <= allowed,
        "the directory reached {largest} bytes for a bound of {bound} (at most {allowed})"
    );
    let written = (next as u64) * 1500;
    assert!(written > bound, "only {written} bytes written");
}

/// `cache stats` reads the index rows (an entry's times and model), not the bodies, and counts
/// an entry copied forward from the older generation once; it agrees with a walk that reads
/// every body.
#[tokio::test]
async fn stats_read_the_index_and_agree_with_the_entries() {
    let dir = tempfile::tempdir().unwrap();
    let disk = DiskTier::open(dir.path(), 8 * MIB).await.unwrap();
    let now = now_millis();
    let stale = Entry::new(
        Bytes::from_static(b"{}"),
        "b",
        now - 2_000,
        Duration::from_secs(1),
        HOUR,
    );
    disk.insert(&key(0), &stale, now).unwrap();
    disk.insert(&key(1), &entry(1, now), now).unwrap();
    disk.insert_raw(&key(2), b"not an entry", now).unwrap();
    // Filler until a second generation starts; then entry 1 is read (copied forward).
    let body = Bytes::from(vec![b's'; 1500]);
    let mut n = 3;
    while !dir.path().join("db-1").exists() {
        assert!(n < 200_000, "no second generation");
        let filler = Entry::new(body.clone(), "m", now, HOUR, HOUR);
        disk.insert(&key(n), &filler, now).unwrap();
        n += 1;
    }
    assert!(disk.get(&key(1), now).unwrap().is_some());
    let stats = fallthrough::admin::stats(&disk, now).await.unwrap();
    assert_eq!(stats.entries, n as u64, "{stats:?}");
    assert_eq!(stats.corrupt, 1);
    assert_eq!(stats.stale, 1);
    assert_eq!(stats.fresh, n as u64 - 2);
    assert_eq!(stats.by_model["b"], 1);
    assert_eq!(stats.by_model["m"], n as u64 - 2);
    assert_eq!(stats.oldest, Some(now - 2_000));
    // The same through every body.
    let counted = std::sync::Arc::new(std::sync::Mutex::new((0u64, 0u64)));
    let into = counted.clone();
    disk.visit(move |_, size, _| {
        let mut c = into.lock().unwrap();
        c.0 += 1;
        c.1 += DiskTier::counted_size(size);
        Ok(())
    })
    .await
    .unwrap();
    assert_eq!(*counted.lock().unwrap(), (stats.entries, stats.bytes));
}

/// An open keeps the newest two generations and removes what a crash mid-deletion left
/// (`drop-…`); a purge of everything gives the space back at once (a new, empty generation in
/// place of both).
#[tokio::test]
async fn generations_left_over_are_removed_and_clearing_gives_the_space_back() {
    let dir = tempfile::tempdir().unwrap();
    let bound = 8 * MIB;
    let disk = DiskTier::open(dir.path(), bound).await.unwrap();
    let now = now_millis();
    let filler = Entry::new(Bytes::from(vec![b'c'; 1500]), "m", now, HOUR, HOUR);
    let mut n = 0;
    while !dir.path().join("db-2").exists() {
        assert!(n < 200_000, "no third generation");
        disk.insert(&key(n), &filler, now).unwrap();
        n += 1;
    }
    let last = key(n - 1);
    drop(disk);
    // An older generation than the two kept (as a crash between a rotation's steps could
    // leave), and a deletion's leftovers.
    for junk in ["db", "drop-db-9"] {
        std::fs::create_dir(dir.path().join(junk)).unwrap();
        std::fs::write(dir.path().join(junk).join("db"), b"left over").unwrap();
    }
    let disk = support::once_unlocked(|| DiskTier::open(dir.path(), bound)).await;
    for gone in ["db", "drop-db-9"] {
        assert!(!dir.path().join(gone).exists(), "{gone} left");
    }
    assert!(dir.path().join("db-1").exists() && dir.path().join("db-2").exists());
    assert!(disk.get(&last, now).unwrap().is_some());
    // A copy of the two generations, to put back after the clear: what a crash between the
    // clear's new generation and the deletion of the old ones would leave.
    drop(disk);
    let saved = tempfile::tempdir().unwrap();
    for generation in ["db-1", "db-2"] {
        support::copy_dir(&dir.path().join(generation), &saved.path().join(generation));
    }
    let disk = support::once_unlocked(|| DiskTier::open(dir.path(), bound)).await;

    let before = du(dir.path());
    disk.clear().await.unwrap();
    assert_eq!(disk.usage(), (0, 0));
    for gone in ["db-1", "db-2"] {
        assert!(!dir.path().join(gone).exists(), "{gone} kept after a clear");
    }
    let after = du(dir.path());
    assert!(
        after < before / 2,
        "{before} bytes before the clear, {after} after"
    );
    assert!(disk.get(&last, now).unwrap().is_none());
    disk.insert(&key(0), &entry(0, now), now).unwrap();
    assert!(disk.get(&key(0), now).unwrap().is_some());

    // The cleared generations back, as a crash midway would leave them: an open deletes them
    // (the clear recorded that they are cleared), and nothing purged comes back.
    drop(disk);
    for generation in ["db-1", "db-2"] {
        support::copy_dir(&saved.path().join(generation), &dir.path().join(generation));
    }
    let disk = support::once_unlocked(|| DiskTier::open(dir.path(), bound)).await;
    assert!(
        disk.get(&last, now).unwrap().is_none(),
        "a purged entry came back"
    );
    assert!(
        disk.get(&key(0), now).unwrap().is_some(),
        "written after the clear"
    );
    for gone in ["db-1", "db-2"] {
        assert!(
            !dir.path().join(gone).exists(),
            "{gone} kept after the reopen"
        );
    }
}

/// Writes from several threads at once rotate the generations one at a time: a write that
/// looked at the generations before another rotated does not start a rotation of its own over
/// the new one (it would find it locked and stop rotating for a minute), so the directory stays
/// within its bound and no more than two generations exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_rotate_one_generation_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let bound = 8 * MIB;
    let disk = DiskTier::open(dir.path(), bound).await.unwrap();
    let now = now_millis();
    let filler = Entry::new(Bytes::from(vec![b't'; 1500]), "m", now, HOUR, HOUR);
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (disk, filler) = (disk.clone(), filler.clone());
            tokio::task::spawn_blocking(move || {
                for n in 0..4000 {
                    disk.insert(&key(w * 100_000 + n), &filler, now).unwrap();
                }
            })
        })
        .collect();
    let mut largest = 0;
    for writer in writers {
        while !writer.is_finished() {
            largest = largest.max(du(dir.path()));
            tokio::task::yield_now().await;
        }
        writer.await.unwrap();
    }
    disk.wait_for_eviction().await;
    disk.flush().await.unwrap();
    largest = largest.max(du(dir.path()));
    let generations: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name == "db" || name.starts_with("db-"))
        .collect();
    assert!(generations.len() <= 2, "{generations:?}");
    let newest = (generations.iter())
        .filter_map(|g| g.strip_prefix("db-")?.parse::<u32>().ok())
        .max();
    assert!(
        newest >= Some(3),
        "rotated fewer than three times: {generations:?}"
    );
    let allowed = bound + bound / 10 + 16 * MIB;
    assert!(largest <= allowed, "{largest} bytes for a bound of {bound}");
}

/// A large bound splits the tier by key into shards (`<dir>/shard-<i>-of-<S>`), kept whatever
/// the bound says later; a `cache` command's walk opens one shard at a time and lets it go, so
/// its memory is bounded by a shard, not by the cache.
#[tokio::test]
async fn a_large_bound_shards_the_tier_and_a_walk_opens_one_shard_at_a_time() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    const ENTRIES: usize = 400;
    let dir = tempfile::tempdir().unwrap();
    let now = now_millis();
    {
        let disk = DiskTier::open(dir.path(), 10 << 30).await.unwrap();
        assert_eq!((disk.shards(), disk.shards_open()), (16, 16));
        for n in 0..ENTRIES {
            disk.insert(&key(n), &entry(n, now), now).unwrap();
        }
        assert_eq!(disk.usage().0, ENTRIES as u64);
        disk.flush().await.unwrap();
    }
    let mut laid_out: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|item| item.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("db") || name.starts_with("shard-"))
        .collect();
    laid_out.sort();
    let mut expected: Vec<String> = (0..16).map(|i| format!("shard-{i}-of-16")).collect();
    expected.sort();
    assert_eq!(laid_out, expected);

    // Reopened for a walk with a small bound: the same 16 shards, the first one open (so that
    // another process's lock is found at once).
    let walk = support::once_unlocked(|| DiskTier::open_for_walk(dir.path(), MIB)).await;
    assert_eq!((walk.shards(), walk.shards_open()), (16, 1));
    let (seen, most_open) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (counting, watching, tier) = (seen.clone(), most_open.clone(), walk.clone());
    walk.visit_summaries(move |_, _, entry| {
        assert!(entry.is_ok());
        counting.fetch_add(1, Ordering::Relaxed);
        watching.fetch_max(tier.shards_open(), Ordering::Relaxed);
    })
    .await
    .unwrap();
    assert_eq!(seen.load(Ordering::Relaxed), ENTRIES);
    // The one being walked, alone.
    assert_eq!(most_open.load(Ordering::Relaxed), 1);
    assert_eq!(
        walk.shards_open(),
        0,
        "every shard the walk opened was let go"
    );
    // A shard let go opens again (sled's lock taken back), and every entry is where its key says.
    for n in 0..ENTRIES {
        let found = walk.get(&key(n), now).unwrap();
        assert_eq!(found.as_ref(), Some(&entry(n, now)), "entry {n}");
    }
    assert_eq!(walk.usage().0, ENTRIES as u64);
}

/// Reads write too (each moves its entry's access time), and sled's files grow with them: a
/// cache that is only read must still start a new generation when the newer's files reach
/// half the bound, and the entries read go on into it.
#[tokio::test]
async fn reads_alone_rotate_the_generations() {
    let dir = tempfile::tempdir().unwrap();
    let bound = 8 * MIB;
    let disk = DiskTier::open(dir.path(), bound).await.unwrap();
    let start = now_millis();
    for n in 0..200 {
        disk.insert(&key(n), &entry(n, start), start).unwrap();
    }
    let mut pass = 0;
    while !dir.path().join("db-1").exists() {
        pass += 1;
        assert!(
            pass < 5_000,
            "no new generation after {pass} passes of reads"
        );
        // A second later each time: every read moves its access time.
        let now = start + pass * 1_001;
        for n in 0..200 {
            assert!(disk.get(&key(n), now).unwrap().is_some(), "entry {n} lost");
        }
    }
    eprintln!("a new generation after {pass} passes of 200 reads");
    let now = start + (pass + 1) * 1_001;
    for n in 0..200 {
        assert!(disk.get(&key(n), now).unwrap().is_some(), "entry {n} lost");
    }
    assert!(du(dir.path()) <= bound + bound / 10 + 16 * MIB);
}
