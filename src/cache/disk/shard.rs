//! One shard of the disk tier: its entries in sled, in two generations, bounded by the
//! shard's directory's real size.
//!
//! Why generations. `disk_bytes` bounds what the directory takes on disk (SPEC: at most the
//! bound + 10% + 16 MiB), and sled 0.34 is log-structured: it never gives space back to the
//! file system, and under steady writes it hardly reuses what it frees. Measured with a
//! million ~1 KB entries: a fresh database holds about twice its live bytes, and one whose
//! entries eviction held to 76 MB grew to 3.3 GB (removals are writes too). Deleting a whole
//! database is the one way to give the space back. So a shard is two sled databases, each a
//! [`Generation`]: writes go to the newer; when its files reach half the shard's bound, the
//! older is deleted, the newer becomes the older and a new one is started. Reads look in the
//! newer, then in the older; an entry found in the older is copied into the newer, so an entry
//! that is read outlives its generation (least recently used at the grain of a generation).
//! The directory thus holds at most two half-bounds, plus the little that one measurement of
//! the files (every MiB of writes) can miss.
//!
//! The price: the entries' bytes are a quarter to a half of the bound (sled's own overhead),
//! and a rotation drops the entries not read since the older generation began, all at once.
//!
//! A generation is `<shard dir>/db` (the first, named as earlier versions named their one
//! database) or `<shard dir>/db-<n>`. A generation being deleted is first renamed
//! `<shard dir>/drop-<its name>`, so a crash midway leaves nothing a later open could take for
//! a generation; an open removes such leftovers, and any generation beyond the newest two.
//!
//! Within a generation, entries are still bounded by bytes (the shard's bound) and evicted
//! expired first, then least recently used (see `generation.rs`); with rotation at half the
//! bound that bound is met only when it is under [`ROTATE_FLOOR`] twice over.
//!
//! Every call here blocks, except those marked async; [`super::DiskTier`] runs them on tokio's
//! blocking pool (and [`crate::cache::Cache`] with a time limit), so that a slow, full or
//! failing disk never stalls a request.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use tracing::{debug, warn};

use crate::entry::{Entry, UnixMillis};
use crate::error::DiskError;
use crate::key::CacheKey;

use super::create_private_dir;
use super::generation::{delete_generation, Evicted, Generation, Removal};

/// A generation is rotated out once its files reach half the bound, but never before they
/// reach this: sled's files for a handful of entries already take a few MiB, and a small bound
/// (SPEC allows it 16 MiB more) must not rotate on every write.
const ROTATE_FLOOR: u64 = 4 << 20;

/// After a failed rotation, writes go on into the full generation this long before one tries
/// again.
const ROTATION_RETRY_MS: u64 = 60_000;
/// The file in a shard's directory that records a clear: generations numbered below the number
/// it holds were cleared, and an open deletes them (a crash between a clear's new generation
/// and the deletion of the old ones must not bring the purged entries back).
const CLEARED_BELOW: &str = "cleared-below";

/// One shard. Cheap to clone.
#[derive(Clone)]
pub(super) struct Shard {
    inner: Arc<Inner>,
}

struct Inner {
    /// The shard's directory: the cache directory itself when there is one shard.
    dir: PathBuf,
    /// The shard's share of `disk_bytes`: the bound on its directory.
    max_bytes: u64,
    /// sled's page cache, per generation.
    page_cache: u64,
    /// Opened by a `cache` command, which holds the directory alone (sled's lock): a walk of
    /// everything then puts each generation's kept counts right.
    exclusive: bool,
    generations: RwLock<Generations>,
    /// Held by the one write that rotates; others that find the newer full go on.
    rotating: Mutex<()>,
    /// After a rotation failed (no space for a new database, say), no write tries again before
    /// this (Unix milliseconds): one warning, not one per write.
    retry_rotation_at: AtomicU64,
}

/// What [`Shard::walk_generations`] runs over a generation, with the newer one as its shadow
/// when it is the older: the entries it walked, and the bytes they count for.
pub(super) type GenerationWalk<'a> =
    dyn FnMut(&Generation, Option<&Generation>) -> Result<(u64, u64), DiskError> + 'a;

/// The generations, as one write or read sees them.
#[derive(Clone)]
struct Generations {
    newer: Generation,
    /// The newer's number: its directory is [`name`] of it.
    number: u64,
    older: Option<Generation>,
}

impl Shard {
    /// Opens (or creates, mode 0700) the shard in `dir`. A directory another process holds
    /// gives [`DiskError::Locked`]; a database that cannot be opened for any other reason
    /// (corrupt, truncated, of an unknown version) is moved aside to `<dir>/corrupt-<unix
    /// seconds>` (only the newest such copy is kept) and a new one is created. `exclusive`: a
    /// `cache` command holds the directory alone, and a walk of everything writes each
    /// generation's counts back.
    pub(super) fn open_blocking(
        dir: PathBuf,
        max_bytes: u64,
        page_cache: u64,
        exclusive: bool,
    ) -> Result<Shard, DiskError> {
        create_private_dir(&dir).map_err(DiskError::storage)?;
        let mut numbers = generations_in(&dir).map_err(DiskError::storage)?;
        let floor = cleared_below(&dir);
        while numbers.len() > 2 || numbers.first().is_some_and(|&n| n < floor) {
            drop_generation(&dir, numbers.remove(0));
        }
        let open = |n: u64| Generation::open_blocking(&dir, &name(n), max_bytes, page_cache);
        let number = numbers.last().copied().unwrap_or(floor);
        // Side by side: reading a large database back takes seconds (2.2 s at a million
        // entries), and the two do not wait for each other.
        let (newer, older) = std::thread::scope(|scope| {
            let older = (numbers.len() == 2).then(|| scope.spawn(|| open(numbers[0])));
            let newer = open(number);
            let older = older.map(|opening| {
                opening
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p))
            });
            (newer, older)
        });
        let (newer, older) = (newer?, older.transpose()?);
        Ok(Shard {
            inner: Arc::new(Inner {
                dir,
                max_bytes,
                page_cache,
                exclusive,
                generations: RwLock::new(Generations {
                    newer,
                    number,
                    older,
                }),
                rotating: Mutex::new(()),
                retry_rotation_at: AtomicU64::new(0),
            }),
        })
    }

    fn generations(&self) -> Generations {
        let held = self.inner.generations.read();
        held.unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The entry under `key`, if it decodes. A corrupt entry is removed, logged, and a miss.
    /// Records the access for LRU eviction, at a second's grain; an entry found in the older
    /// generation is copied into the newer, so that it outlives the older one.
    pub(super) fn get(&self, key: &CacheKey, now: UnixMillis) -> Result<Option<Entry>, DiskError> {
        let generations = self.generations();
        if let Some(entry) = generations.newer.get(key, now)? {
            // A read writes too (its access time): reads alone may fill the generation.
            self.rotate_when_full(&generations);
            return Ok(Some(entry));
        }
        let Some(older) = &generations.older else {
            return Ok(None);
        };
        let Some(entry) = older.peek(key)? else {
            return Ok(None);
        };
        if entry.stale_until <= now {
            return Ok(Some(entry)); // expired: the caller removes it, no use copying it
        }
        match self.copy_forward(&generations, key, &entry, now) {
            Ok(()) => self.rotate_when_full(&generations),
            // The hit stays a hit (a full disk, say); the next write meets the failure.
            Err(e) => {
                debug!(%key, error = %crate::error::report(&e), "cannot copy an entry forward")
            }
        }
        Ok(Some(entry))
    }

    /// Copies an entry found in the older generation into the newer one. The older copy stays
    /// (removing it would be one more write to the older's files): the newer one shadows it.
    /// Not over an entry stored in the newer meanwhile, and undone when the older copy was
    /// removed meanwhile (a purge), so that a copy never brings back what a removal took.
    fn copy_forward(
        &self,
        generations: &Generations,
        key: &CacheKey,
        entry: &Entry,
        now: UnixMillis,
    ) -> Result<(), DiskError> {
        let newer = &generations.newer;
        if newer.contains(key)? {
            return Ok(());
        }
        newer.insert(key, entry, now)?;
        let older = generations.older.as_ref();
        if older.map_or(Ok(false), |older| older.contains(key))? {
            return Ok(());
        }
        newer.remove(key).map(drop)
    }

    /// Stores `entry` in the newer generation; starts an eviction pass in the background if
    /// over the bound, and starts a new generation when the newer's files reach half of it.
    pub(super) fn insert(
        &self,
        key: &CacheKey,
        entry: &Entry,
        now: UnixMillis,
    ) -> Result<(), DiskError> {
        self.write_newer(|newer| newer.insert(key, entry, now))
    }

    /// Stores bytes as they are. Bytes that do not decode are indexed as already expired, so
    /// eviction takes them first.
    pub(super) fn insert_raw(
        &self,
        key: &CacheKey,
        bytes: &[u8],
        now: UnixMillis,
    ) -> Result<(), DiskError> {
        self.write_newer(|newer| newer.insert_raw(key, bytes, now))
    }

    /// Runs `write` on the newer generation, then starts a new one if that filled it.
    fn write_newer(
        &self,
        write: impl FnOnce(&Generation) -> Result<(), DiskError>,
    ) -> Result<(), DiskError> {
        let generations = self.generations();
        write(&generations.newer)?;
        self.rotate_when_full(&generations);
        Ok(())
    }

    /// Removes `key`'s entry from both generations; whether there was one.
    pub(super) fn remove(&self, key: &CacheKey) -> Result<bool, DiskError> {
        let generations = self.generations();
        let newer = generations.newer.remove(key)?;
        let older = match &generations.older {
            Some(older) => older.remove(key)?,
            None => false,
        };
        Ok(newer || older)
    }

    /// Entries and bytes held, as kept: no entry is read. An entry copied out of the older
    /// generation counts in both until the older one goes.
    pub(super) fn usage(&self) -> (u64, u64) {
        let generations = self.generations();
        let (mut entries, mut bytes) = generations.newer.usage();
        if let Some(older) = &generations.older {
            let (e, b) = older.usage();
            entries += e;
            bytes += b;
        }
        (entries, bytes)
    }

    /// The size of the generations' files when last measured (at open and every MiB of
    /// writes): what `du --apparent-size` reports for them, without measuring anything now.
    pub(super) fn files_bytes(&self) -> u64 {
        let generations = self.generations();
        let older = generations
            .older
            .as_ref()
            .map_or(0, Generation::files_bytes);
        generations.newer.files_bytes() + older
    }

    /// Writes everything to the files: after this, a crash loses nothing stored so far. Waits
    /// first for eviction passes that earlier writes started ([`Self::wait_for_eviction`]).
    pub(super) async fn flush(&self) -> Result<(), DiskError> {
        let generations = self.generations();
        if let Some(older) = &generations.older {
            older.flush().await?;
        }
        generations.newer.flush().await
    }

    /// Returns once no eviction pass runs in either generation
    /// ([`super::DiskTier::wait_for_eviction`]).
    pub(super) async fn wait_for_eviction(&self) {
        let generations = self.generations();
        if let Some(older) = &generations.older {
            older.wait_for_eviction().await;
        }
        generations.newer.wait_for_eviction().await;
    }

    /// Removes, in each generation, expired entries (those past their stale period, and bytes
    /// that never decoded), then, if still over `max_bytes`, the least recently used until it
    /// holds at most 90% of it. Both walk a time-ordered index from its oldest end: no entry is
    /// read.
    pub(super) fn evict_blocking(
        &self,
        now: UnixMillis,
        max_bytes: u64,
    ) -> Result<Evicted, DiskError> {
        let generations = self.generations();
        let mut evicted = generations.newer.evict_blocking(now, max_bytes)?;
        if let Some(older) = &generations.older {
            let more = older.evict_blocking(now, max_bytes)?;
            evicted.expired += more.expired;
            evicted.corrupt += more.corrupt;
            evicted.least_recently_used += more.least_recently_used;
        }
        Ok(evicted)
    }

    /// Runs `walk` over the newer generation, then over the older one with the newer as its
    /// shadow (an entry copied forward is walked once); opened `exclusive`, writes each
    /// generation's counts (what `walk` returns) back.
    pub(super) fn walk_generations(&self, walk: &mut GenerationWalk<'_>) -> Result<(), DiskError> {
        let generations = self.generations();
        let newer = &generations.newer;
        let walked = walk(newer, None)?;
        if self.inner.exclusive {
            newer.set_counts(walked.0, walked.1)?;
        }
        if let Some(older) = &generations.older {
            let walked = walk(older, Some(newer))?;
            if self.inner.exclusive {
                older.set_counts(walked.0, walked.1)?;
            }
        }
        Ok(())
    }

    /// Removes every entry, giving the space back: a new, empty generation takes the place
    /// of both, which are deleted before this returns (clearing sled's trees instead would
    /// write a removal per entry, and the files would only grow).
    pub(super) fn clear_blocking(&self) -> Result<(), DiskError> {
        let inner = &self.inner;
        let _rotating = inner
            .rotating
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let number = self.generations().number + 1;
        // Recorded first: from here on, whatever happens, an open starts from `number`.
        record_cleared_below(&inner.dir, number).map_err(DiskError::storage)?;
        let fresh = Generation::open_blocking(&inner.dir, &name(number), inner.max_bytes, {
            inner.page_cache
        })?;
        let cleared = {
            let mut held = (inner.generations.write()).unwrap_or_else(PoisonError::into_inner);
            let fresh = Generations {
                newer: fresh,
                number,
                older: None,
            };
            std::mem::replace(&mut *held, fresh)
        };
        // The older first: a crash between the two leaves the newer's entries, never the
        // older's that the newer had replaced.
        for generation in [cleared.older, Some(cleared.newer)].into_iter().flatten() {
            generation.retire(Removal::Now);
        }
        Ok(())
    }

    /// Starts a new generation when the newer's files (as last measured) have reached half the
    /// bound, deleting the older one. A failure is logged, and writes go on into the full one.
    fn rotate_when_full(&self, seen: &Generations) {
        let inner = &self.inner;
        if seen.newer.files_bytes() < (inner.max_bytes / 2).max(ROTATE_FLOOR)
            || crate::entry::now_millis() < inner.retry_rotation_at.load(Ordering::Relaxed)
        {
            return;
        }
        let Ok(_rotating) = inner.rotating.try_lock() else {
            return; // another write is rotating
        };
        // Seen before the lock was taken: another write may have rotated (or a clear run) in
        // between, and the number after `seen`'s may be the live newer one by now.
        if self.generations().number != seen.number {
            return;
        }
        let number = seen.number + 1;
        let fresh = Generation::open_blocking(&inner.dir, &name(number), inner.max_bytes, {
            inner.page_cache
        });
        let fresh = match fresh {
            Ok(fresh) => fresh,
            Err(e) => {
                let retry_at = crate::entry::now_millis() + ROTATION_RETRY_MS;
                inner.retry_rotation_at.store(retry_at, Ordering::Relaxed);
                warn!(
                    error = %crate::error::report(&e),
                    "cannot start a new disk cache generation; trying again in a minute"
                );
                return;
            }
        };
        let dropped = {
            let mut held = (inner.generations.write()).unwrap_or_else(PoisonError::into_inner);
            let newer = std::mem::replace(&mut held.newer, fresh);
            held.number = number;
            held.older.replace(newer)
        };
        let files = seen.newer.files_bytes();
        debug!(generation = number, files, "disk cache: new generation");
        if let Some(dropped) = dropped {
            // Reads in flight may still hold it: its files go when the last handle does.
            dropped.retire(Removal::InBackground);
        }
    }
}

/// The directory name of generation `n`.
fn name(n: u64) -> String {
    match n {
        0 => "db".to_owned(),
        n => format!("db-{n}"),
    }
}

/// The generations' numbers in `dir`, oldest first; leftovers of a deletion are removed.
fn generations_in(dir: &Path) -> std::io::Result<Vec<u64>> {
    let mut numbers = Vec::new();
    for item in std::fs::read_dir(dir)? {
        let item = item?;
        let file_name = item.file_name();
        let file_name = file_name.to_string_lossy();
        if file_name.starts_with("drop-") {
            let _ = std::fs::remove_dir_all(item.path());
        } else if file_name == "db" {
            numbers.push(0);
        } else if let Some(n) = file_name.strip_prefix("db-").and_then(|n| n.parse().ok()) {
            numbers.push(n);
        }
    }
    numbers.sort_unstable();
    Ok(numbers)
}

/// The number a clear recorded in `dir` (0 when none was, or the file does not read).
fn cleared_below(dir: &Path) -> u64 {
    let text = std::fs::read_to_string(dir.join(CLEARED_BELOW)).unwrap_or_default();
    text.trim().parse().unwrap_or(0)
}

/// Records durably that generations below `number` are cleared (a temporary file, synced,
/// renamed over the old record).
fn record_cleared_below(dir: &Path, number: u64) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = dir.join(format!("{CLEARED_BELOW}.tmp"));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(number.to_string().as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, dir.join(CLEARED_BELOW))?;
    std::fs::File::open(dir)?.sync_all()
}

fn drop_generation(dir: &Path, n: u64) {
    delete_generation(&dir.join(name(n)), Removal::Now);
}
