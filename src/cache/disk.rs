//! The disk tier: entries in sled, spread by key over shards, each a directory of two
//! generations (`shard.rs`), together bounded by the directory's real size.
//!
//! Why shards. sled keeps a record of every page of a database in memory from the moment it
//! opens it, rebuilt at each open from a snapshot it reads whole. Measured on a bare sled 0.34
//! database of a million ~1.3 KB values in one tree: 53 MB of memory to open it, before a row
//! is read, and twice that with a second tree of a million small rows. A tier that is one
//! database (per generation) therefore costs memory in proportion to its entries for anything
//! that opens it, `cache stats` and `cache export` included, which SPEC wants bounded by a
//! constant. Split by key over `S` databases, the tier opens them all to serve (about the
//! memory of one) while a walk opens one shard at a time, so its memory is bounded by a
//! shard's share of the bound; and a key's shard follows from its bytes, so a look-up still
//! reads one database.
//!
//! How many. One shard per [`SHARD_BYTES`] of `disk_bytes`, from 1 to [`MAX_SHARDS`]: the
//! default 10 GiB makes 16, a bound under 1.25 GiB keeps one. The number is fixed when the
//! directory is first used and kept after, whatever `disk_bytes` says later (the bound is
//! divided among the shards there are): shard `i` of `S` is `<dir>/shard-<i>-of-<S>`; a single
//! shard is the cache directory itself, as every earlier version laid it out, so such a
//! directory is read as it is.
//!
//! Serving, every shard is opened at once (two at a time). A `cache` command
//! ([`DiskTier::open_for_walk`]) opens the first shard, so that another process's lock is
//! found at once, and the others as it needs them; its walks let each shard go once walked,
//! before opening the next, so that one shard at a time is open.
//!
//! Every call here blocks, except those marked async; [`super::Cache`] runs them on tokio's
//! blocking pool with a time limit, so that a slow, full or failing disk never stalls a request.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tracing::warn;

use crate::entry::{DecodeError, Entry, UnixMillis};
use crate::error::{report, DiskError};
use crate::key::CacheKey;

mod generation;
mod open;
mod shard;

pub(crate) use generation::create_private_dir;
pub use generation::Evicted;
use generation::{Generation, PER_ENTRY_OVERHEAD, SLED_CACHE_BYTES, SLED_WALK_CACHE_BYTES};
use shard::Shard;

/// A shard per this much of `disk_bytes`. A shard's directory holds about twice its entries'
/// bytes, so a full one holds ~230k entries of ~1 KB, and a walk of it measured 66 MiB (a
/// 644 MiB directory, both generations full): what a `cache` command's walk costs at most,
/// whatever the bound (up to [`MAX_SHARDS`] shards). A million such entries under the
/// default bound spread over 16 shards: 36–39 MiB.
const SHARD_BYTES: u64 = 640 << 20;
/// The most shards: each is two sled databases, with a thread of sled's each. Past
/// `MAX_SHARDS` × [`SHARD_BYTES`] (40 GiB) a shard's share grows with the bound again.
const MAX_SHARDS: usize = 64;
/// The least page cache a serving shard gets (its share of [`SLED_CACHE_BYTES`]).
const MIN_SHARD_PAGE_CACHE: u64 = 1 << 20;
/// The most an open waits for a shard that this process walked and let go: sled's threads
/// hold its lock a moment after the last handle is dropped (milliseconds, usually). The open
/// polls for the lock's release, the event itself; the bound is generous so that a loaded
/// machine never turns that moment into an error, and it applies only to a shard this process
/// let go (another process's lock is an error at once).
const RELOCK_WAIT: Duration = Duration::from_secs(30);

/// The tier. Cheap to clone.
#[derive(Clone)]
pub struct DiskTier {
    inner: Arc<Inner>,
}

struct Inner {
    /// The cache directory.
    dir: PathBuf,
    /// `disk_bytes`: the bound on the directory.
    max_bytes: u64,
    /// sled's page cache, per generation of a shard.
    page_cache: u64,
    /// Opened by a `cache` command, which holds the directory alone (sled's lock): shards are
    /// opened as they are needed, and a walk of everything puts each one's kept counts right.
    exclusive: bool,
    shards: Vec<Slot>,
}

/// One shard's place: open, or not yet (a `cache` command's).
struct Slot {
    dir: PathBuf,
    open: Mutex<Option<Shard>>,
    /// Set once a walk opened the shard for itself and let it go ([`RELOCK_WAIT`]).
    let_go: AtomicBool,
}

impl DiskTier {
    /// Opens (or creates, mode 0700) the tier in `dir`, every shard of it. A directory another
    /// process holds gives [`DiskError::Locked`]; a database that cannot be opened for any
    /// other reason (corrupt, truncated, of an unknown version) is moved aside to `<shard
    /// dir>/corrupt-<unix seconds>` (only the newest such copy is kept) and a new one is
    /// created.
    pub async fn open(dir: impl Into<PathBuf>, max_bytes: u64) -> Result<DiskTier, DiskError> {
        Self::open_with(dir.into(), max_bytes, SLED_CACHE_BYTES, false).await
    }

    /// As [`Self::open`], for a process that walks the tier once and exits (the `cache`
    /// commands): a small page cache (one sized for serving would only grow its memory),
    /// shards opened as they are needed and a walk's let go after it (see the module's doc),
    /// and a walk of every entry ([`Self::visit`]) writes the counts it found back.
    pub async fn open_for_walk(
        dir: impl Into<PathBuf>,
        max_bytes: u64,
    ) -> Result<DiskTier, DiskError> {
        Self::open_with(dir.into(), max_bytes, SLED_WALK_CACHE_BYTES, true).await
    }

    async fn open_with(
        dir: PathBuf,
        max_bytes: u64,
        page_cache: u64,
        exclusive: bool,
    ) -> Result<DiskTier, DiskError> {
        let open = move || Self::open_blocking(dir, max_bytes, page_cache, exclusive);
        tokio::task::spawn_blocking(open)
            .await
            .map_err(DiskError::worker)?
    }

    fn open_blocking(
        dir: PathBuf,
        max_bytes: u64,
        page_cache: u64,
        exclusive: bool,
    ) -> Result<DiskTier, DiskError> {
        if dir.exists() && !dir.is_dir() {
            return Err(DiskError::NotADirectory {
                dir: dir.display().to_string(),
            });
        }
        create_private_dir(&dir).map_err(DiskError::storage)?;
        let count = shard_count(&dir, max_bytes).map_err(DiskError::storage)?;
        let shards = (0..count)
            .map(|i| Slot {
                dir: shard_dir(&dir, i, count),
                open: Mutex::new(None),
                let_go: AtomicBool::new(false),
            })
            .collect();
        // A walk opens one shard at a time and can have the whole cache; serving, they share it.
        let page_cache = match exclusive {
            true => page_cache,
            false => (page_cache / count as u64).max(MIN_SHARD_PAGE_CACHE),
        };
        let tier = DiskTier {
            inner: Arc::new(Inner {
                dir,
                max_bytes,
                page_cache,
                exclusive,
                shards,
            }),
        };
        let opening = if exclusive { 1 } else { count };
        // Two at a time: reading a large database back takes seconds, and more threads at it
        // would only take the cores from the server that answers meanwhile.
        let next = std::sync::atomic::AtomicUsize::new(0);
        let open_next = || loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= opening {
                return Ok::<_, DiskError>(());
            }
            tier.shard(i)?;
        };
        std::thread::scope(|scope| {
            let other = (opening > 1).then(|| scope.spawn(open_next));
            let mine = open_next();
            let other = other.map(|t| t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
            mine.and(other.unwrap_or(Ok(())))
        })?;
        Ok(tier)
    }

    /// The bound it was opened with (on the directory's size).
    pub fn max_bytes(&self) -> u64 {
        self.inner.max_bytes
    }

    /// The cache directory the tier was opened in.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// How many shards the tier is split into (see the module's doc).
    pub fn shards(&self) -> usize {
        self.inner.shards.len()
    }

    /// How many shards are open now: all of them when serving; for a `cache` command, those
    /// it has needed so far. For tests of the walks' memory.
    #[doc(hidden)]
    pub fn shards_open(&self) -> usize {
        self.opened().len()
    }

    /// Shard `i`, opened if it is not yet (and kept open).
    fn shard(&self, i: usize) -> Result<Shard, DiskError> {
        let slot = &self.inner.shards[i];
        let mut open = slot.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(shard) = &*open {
            return Ok(shard.clone());
        }
        let shard = self.open_shard(slot)?;
        *open = Some(shard.clone());
        Ok(shard)
    }

    /// Opens a slot's shard. One that this process walked and let go may still be locked by
    /// sled's threads winding down: that lock is waited for, another process's is not.
    fn open_shard(&self, slot: &Slot) -> Result<Shard, DiskError> {
        let inner = &self.inner;
        let bound = inner.max_bytes / inner.shards.len() as u64;
        let open = || {
            let dir = slot.dir.clone();
            Shard::open_blocking(dir, bound, inner.page_cache, inner.exclusive)
        };
        let waiting_until = Instant::now() + RELOCK_WAIT;
        loop {
            match open() {
                Err(DiskError::Locked { .. })
                    if slot.let_go.load(Ordering::Relaxed) && Instant::now() < waiting_until =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                opened => return opened,
            }
        }
    }

    /// The shards open now.
    fn opened(&self) -> Vec<Shard> {
        let open = |slot: &Slot| {
            slot.open
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
        };
        self.inner.shards.iter().filter_map(open).collect()
    }

    /// Every shard, opening those that are not open yet.
    fn all(&self) -> Result<Vec<Shard>, DiskError> {
        (0..self.inner.shards.len())
            .map(|i| self.shard(i))
            .collect()
    }

    /// The shard that holds `key`: chosen by its first bytes (a blake3 hash, so evenly).
    fn shard_of(&self, key: &CacheKey) -> Result<Shard, DiskError> {
        let bytes: [u8; 8] = key.as_bytes()[..8].try_into().expect("a key has 32 bytes");
        let count = self.inner.shards.len() as u64;
        self.shard((u64::from_le_bytes(bytes) % count) as usize)
    }

    /// The entry under `key`, if it decodes. A corrupt entry is removed, logged, and a miss.
    /// Records the access for LRU eviction, at a second's grain; an entry found in the older
    /// generation is copied into the newer, so that it outlives the older one.
    pub fn get(&self, key: &CacheKey, now: UnixMillis) -> Result<Option<Entry>, DiskError> {
        self.shard_of(key)?.get(key, now)
    }

    /// Stores `entry`; starts an eviction pass in the background if over the bound, and a new
    /// generation when the newer's files reach half of the shard's bound.
    pub fn insert(&self, key: &CacheKey, entry: &Entry, now: UnixMillis) -> Result<(), DiskError> {
        self.shard_of(key)?.insert(key, entry, now)
    }

    /// Stores bytes as they are. Public for tests that stage corruption; use [`Self::insert`].
    /// Bytes that do not decode are indexed as already expired, so eviction takes them first.
    #[doc(hidden)]
    pub fn insert_raw(
        &self,
        key: &CacheKey,
        bytes: &[u8],
        now: UnixMillis,
    ) -> Result<(), DiskError> {
        self.shard_of(key)?.insert_raw(key, bytes, now)
    }

    /// Removes `key`'s entry from both generations; whether there was one.
    pub fn remove(&self, key: &CacheKey) -> Result<bool, DiskError> {
        self.shard_of(key)?.remove(key)
    }

    /// Entries and bytes held, as kept: no entry is read. An entry copied out of the older
    /// generation counts in both until the older one goes. A `cache` command opens every
    /// shard for it (one that cannot be opened is left out, and logged).
    pub fn usage(&self) -> (u64, u64) {
        let shards = self.all().unwrap_or_else(|e| {
            warn!(error = %report(&e), "cannot open every shard of the disk cache to count it");
            self.opened()
        });
        let add = |(entries, bytes): (u64, u64), shard: &Shard| {
            let (e, b) = shard.usage();
            (entries + e, bytes + b)
        };
        shards.iter().fold((0, 0), add)
    }

    /// The size of the open shards' files when last measured (at open and every MiB of
    /// writes): what `du --apparent-size` reports for them, without measuring anything now.
    pub fn files_bytes(&self) -> u64 {
        self.opened().iter().map(Shard::files_bytes).sum()
    }

    /// The bytes an entry of `encoded_len` bytes counts for.
    pub fn counted_size(encoded_len: usize) -> u64 {
        encoded_len as u64 + PER_ENTRY_OVERHEAD
    }

    /// Writes everything to the files: after this, a crash loses nothing stored so far. Waits
    /// first for eviction passes that earlier writes started ([`Self::wait_for_eviction`]).
    pub async fn flush(&self) -> Result<(), DiskError> {
        for shard in self.opened() {
            shard.flush().await?;
        }
        Ok(())
    }

    /// Returns once no eviction pass runs. A write that takes a generation over its bound
    /// starts a pass in the background and returns at once; the pass goes on until the
    /// generation is within its bound, taking in what other writes add meanwhile. So once
    /// writes stop, this returns when each generation holds at most its shard's bound: after
    /// a bulk load, before reading [`Self::usage`], or before handing the directory to another
    /// process.
    ///
    /// ```no_run
    /// # async fn demo(disk: fallthrough::cache::DiskTier) {
    /// // ... many inserts ...
    /// disk.wait_for_eviction().await;
    /// let (_entries, bytes) = disk.usage();
    /// # let _ = bytes;
    /// # }
    /// ```
    pub async fn wait_for_eviction(&self) {
        for shard in self.opened() {
            shard.wait_for_eviction().await;
        }
    }

    /// Removes, in each generation of each shard, expired entries (those past their stale
    /// period, and bytes that never decoded), then, if still over its share of `max_bytes`,
    /// the least recently used until it holds at most 90% of that. Both walk a time-ordered
    /// index from its oldest end: no entry is read.
    pub async fn evict(&self, now: UnixMillis, max_bytes: u64) -> Result<Evicted, DiskError> {
        let tier = self.clone();
        let share = max_bytes / self.shards() as u64;
        let evict = move || {
            let mut evicted = Evicted::default();
            for shard in tier.all()? {
                let more = shard.evict_blocking(now, share)?;
                evicted.expired += more.expired;
                evicted.corrupt += more.corrupt;
                evicted.least_recently_used += more.least_recently_used;
            }
            Ok(evicted)
        };
        tokio::task::spawn_blocking(evict)
            .await
            .map_err(DiskError::worker)?
    }

    /// Calls `f` with every stored entry, decoded where it can be, on the blocking pool, one at
    /// a time (so stats and exports of a large cache never hold it in memory); an older copy
    /// that the newer generation shadows is skipped. Stops at `f`'s first error. Opened with
    /// [`Self::open_for_walk`], it opens one shard at a time, and a walk to the end writes the
    /// counts it found back.
    pub async fn visit<F>(&self, mut f: F) -> Result<(), DiskError>
    where
        F: FnMut(CacheKey, usize, Result<Entry, DecodeError>) -> std::io::Result<()>
            + Send
            + 'static,
    {
        self.walk_shards(move |generation, shadow| {
            generation.walk(shadow, &mut |key, size, bytes| {
                f(key, size, Entry::decode(bytes)).map_err(DiskError::Io)
            })
        })
        .await
    }

    /// As [`Self::visit`], with each entry's body left out (empty) and the bytes it counts for
    /// ([`Self::counted_size`]) instead of its encoded size: what `cache stats` needs. It reads
    /// the index's small rows, not the entries, so its memory stays small at any size. An
    /// entry whose bytes went bad after they were stored is not seen as corrupt here (a read
    /// finds it, and removes it).
    pub async fn visit_summaries<F>(&self, mut f: F) -> Result<(), DiskError>
    where
        F: FnMut(CacheKey, u64, Result<Entry, DecodeError>) + Send + 'static,
    {
        self.walk_shards(move |generation, shadow| {
            generation.walk_summaries(shadow, &mut |key, size, entry| {
                f(key, size, entry);
                Ok(())
            })
        })
        .await
    }

    /// Runs `walk` over each shard's generations in turn ([`Shard::walk_generations`]), on
    /// the blocking pool. A `cache` command's walk opens each shard for itself and lets it go
    /// before opening the next (the command's later calls open again what they need).
    async fn walk_shards<W>(&self, mut walk: W) -> Result<(), DiskError>
    where
        W: FnMut(&Generation, Option<&Generation>) -> Result<(u64, u64), DiskError>
            + Send
            + 'static,
    {
        let tier = self.clone();
        let walk_all = move || {
            for (i, slot) in tier.inner.shards.iter().enumerate() {
                let walked = tier.shard(i)?.walk_generations(&mut walk);
                if tier.inner.exclusive {
                    slot.let_go.store(true, Ordering::Relaxed);
                    drop(
                        slot.open
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .take(),
                    );
                }
                walked?;
            }
            Ok(())
        };
        tokio::task::spawn_blocking(walk_all)
            .await
            .map_err(DiskError::worker)?
    }

    /// Removes every entry, giving the space back: in each shard, a new, empty generation
    /// takes the place of both, which are deleted before this returns (clearing sled's trees
    /// instead would write a removal per entry, and the files would only grow).
    pub async fn clear(&self) -> Result<(), DiskError> {
        let tier = self.clone();
        let clear = move || tier.all()?.iter().try_for_each(Shard::clear_blocking);
        tokio::task::spawn_blocking(clear)
            .await
            .map_err(DiskError::worker)?
    }
}

/// How many shards the directory is split into: as laid out already (a generation at its top
/// level is the one shard of a directory from before shards, or of a small bound), or, for a
/// new directory, one per [`SHARD_BYTES`] of `max_bytes`, 1 to [`MAX_SHARDS`].
fn shard_count(dir: &Path, max_bytes: u64) -> std::io::Result<usize> {
    let mut laid_out = None;
    for item in std::fs::read_dir(dir)? {
        let name = item?.file_name();
        let name = name.to_string_lossy();
        if name == "db" || name.starts_with("db-") {
            return Ok(1);
        }
        laid_out = laid_out.max(shards_named(&name));
    }
    let for_bound = usize::try_from(max_bytes / SHARD_BYTES).unwrap_or(MAX_SHARDS);
    Ok(laid_out.unwrap_or(for_bound.clamp(1, MAX_SHARDS)))
}

/// The `S` of a directory named `shard-<i>-of-<S>`.
fn shards_named(name: &str) -> Option<usize> {
    let (_, of) = name.strip_prefix("shard-")?.split_once("-of-")?;
    of.parse().ok().filter(|n| (2..=MAX_SHARDS).contains(n))
}

/// The directory of shard `i` of `count`.
fn shard_dir(dir: &Path, i: usize, count: usize) -> PathBuf {
    match count {
        1 => dir.to_owned(),
        _ => dir.join(format!("shard-{i}-of-{count}")),
    }
}

/// The bytes of the files under `dir`, recursively, as `du --apparent-size` counts them. A file
/// removed meanwhile (an old snapshot of sled's) counts for nothing.
pub(crate) fn bytes_under(dir: &Path) -> u64 {
    let Ok(items) = std::fs::read_dir(dir) else {
        return 0;
    };
    items
        .flatten()
        .map(|item| match item.file_type() {
            Ok(t) if t.is_dir() => bytes_under(&item.path()),
            _ => item.metadata().map_or(0, |m| m.len()),
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_directory_gets_a_shard_per_share_of_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let count = |bound| shard_count(dir.path(), bound).unwrap();
        assert_eq!(count(0), 1);
        assert_eq!(count(SHARD_BYTES * 2 - 1), 1);
        assert_eq!(count(SHARD_BYTES * 2), 2);
        assert_eq!(count(10 << 30), 16);
        assert_eq!(count(u64::MAX), MAX_SHARDS);
    }

    #[test]
    fn a_laid_out_directory_keeps_its_shards_whatever_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("shard-3-of-16")).unwrap();
        assert_eq!(shard_count(dir.path(), 1 << 20).unwrap(), 16);
        let earlier = tempfile::tempdir().unwrap();
        std::fs::create_dir(earlier.path().join("db")).unwrap();
        assert_eq!(shard_count(earlier.path(), 100 << 30).unwrap(), 1);
        assert_eq!(shards_named("shard-0-of-1"), None);
        assert_eq!(shards_named("shard-0-of-x"), None);
    }
}
