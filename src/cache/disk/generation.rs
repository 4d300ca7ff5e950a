//! One generation of the disk tier: one sled database, its entries bounded by bytes. With
//! `open.rs`, the only file that talks to sled.
//!
//! Trees: `entries` (key -> encoded [`Entry`]); `index` (key -> [`Meta`]: last access, end of
//! the stale period, size; then the entry without its body, so that `cache stats` reads the
//! small index rows and no body: rows written before that carry the [`Meta`] alone);
//! `by_atime` and `by_expiry` (time ++ key -> nothing), ordered by time so that eviction walks
//! from their oldest end and never decodes an entry; `state` (the layout's version and the
//! counts). An entry's index row is swapped atomically; its time-ordered rows are written
//! before it and removed after, so a crash (or two writes of one key at once) can leave a row
//! naming no current entry; eviction checks each row against the index and drops such a row as
//! it meets it. (sled's transactions would make all of it atomic, at ten times the cost of a
//! write: a miss paid ~0.25 ms more.)
//!
//! Counts and bytes are kept as they change (and written to `state` with a write at most once
//! a second, on flush and when the tier is dropped), so start-up, `/metrics` and `/healthz`
//! read no entries: at any size, they cost the same. After a crash the counts may be off by
//! the last second's writes; `cache stats`, which reads every index row anyway, writes them
//! right.
//!
//! The size of the database's files is measured every [`LOOK_EVERY_BYTES`] of writes (a
//! `stat` of each file), for [`super::DiskTier`], which bounds the directory with it.
//!
//! Every call here blocks; [`crate::cache::Cache`] runs them on tokio's blocking pool with a
//! time limit, so that a slow, full or failing disk never stalls a request.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::watch;
use tracing::{debug, error, warn};

use crate::entry::{DecodeError, Entry, UnixMillis};
use crate::error::{report, DiskError};
use crate::key::CacheKey;

use super::open::{move_aside, open_db, OpenError};

/// Bookkeeping bytes per entry besides its encoded value (the key four times, the index row).
pub(super) const PER_ENTRY_OVERHEAD: u64 = 4 * 32 + META_LEN as u64 + 2 * 8;
/// Eviction brings the tier down to this share of its bound, so it does not run on every write.
const EVICT_TO_PERCENT: u64 = 90;
/// How often sled writes its log buffer out: the most a crash of the process can lose.
pub(super) const FLUSH_EVERY_MS: u64 = 100;
/// sled's own page cache. Its default (1 GiB) would dwarf the memory tier, which already holds
/// the hot entries; this is enough for sled's index and recently written pages.
pub(super) const SLED_CACHE_BYTES: u64 = 32 * 1024 * 1024;
/// sled's page cache for a one-off walk (`cache stats`, `export`): it reads each page once.
pub(super) const SLED_WALK_CACHE_BYTES: u64 = 4 * 1024 * 1024;
/// A read moves an entry's access time only when the recorded one is at least this old: LRU
/// at a second's grain, and an entry read from disk again and again (the memory tier off, or
/// too small) costs no writes each time.
const ACCESS_GRAIN_MS: u64 = 1000;
/// The layout of the trees this file writes; an older database is indexed once on open.
pub(super) const LAYOUT: u64 = 2;
/// How often (at most) a write also writes the counts to `state`, in milliseconds.
const PERSIST_EVERY_MS: u64 = 1000;
/// The files' size is measured again after this many bytes of writes (fewer for a small bound).
const LOOK_EVERY_BYTES: u64 = 1 << 20;

const META_LEN: usize = 24;
pub(super) const STATE_LAYOUT: &[u8] = b"layout";
pub(super) const STATE_COUNTS: &[u8] = b"counts";

/// One sled database of the tier. Cheap to clone.
#[derive(Clone)]
pub(super) struct Generation {
    inner: Arc<Inner>,
}

struct Inner {
    /// The database's directory (`<cache dir>/db`, `<cache dir>/db-1`, …).
    path: PathBuf,
    db: sled::Db,
    trees: Trees,
    /// Entries held, and the sum of their encoded sizes plus overhead.
    count: AtomicU64,
    bytes: AtomicU64,
    max_bytes: u64,
    /// When the counts were last written to `state` (Unix milliseconds).
    persisted_at: AtomicU64,
    /// Bytes written since the files were last measured, and what they measured then.
    written: AtomicU64,
    files: AtomicU64,
    /// Set once the generation is out of use: its directory goes with the last handle.
    retired: std::sync::Mutex<Option<Removal>>,
    /// True while an eviction pass runs, so writes start at most one at a time; a channel
    /// rather than a flag so that [`Generation::wait_for_eviction`] can wait for the pass to end.
    evicting: watch::Sender<bool>,
}

pub(super) struct Trees {
    pub(super) entries: sled::Tree,
    pub(super) index: sled::Tree,
    pub(super) by_atime: sled::Tree,
    pub(super) by_expiry: sled::Tree,
    pub(super) state: sled::Tree,
}

/// An entry's row in `index`: last access, end of its stale period, and its size as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Meta {
    pub(super) atime: UnixMillis,
    pub(super) stale_until: UnixMillis,
    pub(super) size: u64,
}

impl Meta {
    pub(super) fn encode(&self) -> [u8; META_LEN] {
        let mut out = [0u8; META_LEN];
        out[..8].copy_from_slice(&self.atime.to_be_bytes());
        out[8..16].copy_from_slice(&self.stale_until.to_be_bytes());
        out[16..].copy_from_slice(&self.size.to_be_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Option<Meta> {
        let at = |i: usize| Some(u64::from_be_bytes(bytes.get(i..i + 8)?.try_into().ok()?));
        Some(Meta {
            atime: at(0)?,
            stale_until: at(8)?,
            size: at(16)?,
        })
    }
}

/// An entry's row in `index`: its [`Meta`], then (for bytes that decode) the entry with an empty
/// body, encoded as entries are (checksummed).
fn index_row(meta: &Meta, entry: Option<&Entry>) -> Vec<u8> {
    let mut out = meta.encode().to_vec();
    if let Some(entry) = entry {
        let summary = Entry {
            body: bytes::Bytes::new(),
            model: entry.model.clone(),
            ..*entry
        };
        out.extend_from_slice(&summary.encode());
    }
    out
}

/// Whether `shadow` (a newer generation) holds `key` too.
fn shadowed(shadow: Option<&Generation>, key: &CacheKey) -> Result<bool, DiskError> {
    shadow.map_or(Ok(false), |newer| newer.contains(key))
}

/// A time-ordered index row: the time (big-endian, so rows sort by it), then the key.
pub(super) fn row(time: UnixMillis, key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + key.len());
    out.extend_from_slice(&time.to_be_bytes());
    out.extend_from_slice(key);
    out
}

/// The key of a time-ordered row.
fn key_of_row(row: &[u8]) -> Option<CacheKey> {
    Some(CacheKey(row.get(8..)?.try_into().ok()?))
}

/// What [`Generation::walk`] calls with each entry: its key, its encoded size, its bytes.
pub(super) type Visitor<'a> = dyn FnMut(CacheKey, usize, &[u8]) -> Result<(), DiskError> + 'a;

/// What [`Generation::walk_summaries`] calls with each entry: its key, the bytes it counts for,
/// the entry without its body.
pub(super) type Summaries<'a> =
    dyn FnMut(CacheKey, u64, Result<Entry, DecodeError>) -> Result<(), DiskError> + 'a;

/// What an eviction pass removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Evicted {
    pub expired: u64,
    pub corrupt: u64,
    pub least_recently_used: u64,
}

impl Generation {
    /// Opens (or creates) the database `name` in the cache directory `dir`. Another process's
    /// lock gives [`DiskError::Locked`]; a database that cannot be opened for any other reason
    /// (corrupt, truncated, of an unknown version) is moved aside to `<dir>/corrupt-<unix
    /// seconds>` (only the newest such copy is kept) and a new one is created.
    pub(super) fn open_blocking(
        dir: &Path,
        name: &str,
        max_bytes: u64,
        page_cache: u64,
    ) -> Result<Generation, DiskError> {
        let path = dir.join(name);
        let locked = || DiskError::Locked {
            dir: dir.display().to_string(),
        };
        let (db, trees, counts) = match open_db(&path, page_cache) {
            Ok(opened) => opened,
            Err(OpenError::Locked) => return Err(locked()),
            Err(OpenError::Unavailable(e)) => return Err(DiskError::storage(e)),
            Err(OpenError::Broken(why)) => {
                let aside = move_aside(dir, &path).map_err(DiskError::storage)?;
                error!(
                    ?path,
                    ?aside,
                    why,
                    "the disk cache could not be opened; moved it aside and starting empty"
                );
                match open_db(&path, page_cache) {
                    Ok(opened) => opened,
                    Err(OpenError::Locked) => return Err(locked()),
                    Err(OpenError::Unavailable(e)) => return Err(DiskError::storage(e)),
                    Err(OpenError::Broken(why)) => {
                        return Err(DiskError::storage(std::io::Error::other(why)))
                    }
                }
            }
        };
        debug!(
            ?path,
            entries = counts.0,
            bytes = counts.1,
            "disk cache open"
        );
        Ok(Generation {
            inner: Arc::new(Inner {
                files: AtomicU64::new(super::bytes_under(&path)),
                written: AtomicU64::new(0),
                retired: std::sync::Mutex::new(None),
                path,
                db,
                trees,
                count: AtomicU64::new(counts.0),
                bytes: AtomicU64::new(counts.1),
                max_bytes,
                persisted_at: AtomicU64::new(crate::entry::now_millis()),
                evicting: watch::Sender::new(false),
            }),
        })
    }

    /// Marks the generation out of use: when its last handle is dropped (at once, unless a
    /// read is in flight), its directory is deleted, `removal` saying when the files go.
    pub(super) fn retire(&self, removal: Removal) {
        let retired = self.inner.retired.lock();
        *retired.unwrap_or_else(std::sync::PoisonError::into_inner) = Some(removal);
    }

    /// The size of the database's files when last measured (at open, and every
    /// [`LOOK_EVERY_BYTES`] of writes since): what `du --apparent-size` reports for them.
    pub(super) fn files_bytes(&self) -> u64 {
        self.inner.files.load(Ordering::Relaxed)
    }

    /// Whether `key` has an entry (its bytes are not read out).
    pub(super) fn contains(&self, key: &CacheKey) -> Result<bool, DiskError> {
        let t = &self.inner.trees;
        t.index
            .contains_key(key.as_bytes())
            .map_err(DiskError::storage)
    }

    /// The entry under `key`, if it decodes. A corrupt entry is removed, logged, and a miss.
    /// Records the access for LRU eviction, at a second's grain (`ACCESS_GRAIN_MS`).
    pub(super) fn get(&self, key: &CacheKey, now: UnixMillis) -> Result<Option<Entry>, DiskError> {
        self.read(key, Some(now))
    }

    /// As [`Self::get`], without recording the access: for an older generation, whose entry
    /// found is copied forward (an access time written there would only grow its files).
    pub(super) fn peek(&self, key: &CacheKey) -> Result<Option<Entry>, DiskError> {
        self.read(key, None)
    }

    fn read(&self, key: &CacheKey, touch: Option<UnixMillis>) -> Result<Option<Entry>, DiskError> {
        let t = &self.inner.trees;
        let Some(bytes) = t.entries.get(key.as_bytes()).map_err(DiskError::storage)? else {
            return Ok(None);
        };
        match Entry::decode(&bytes) {
            Ok(entry) => {
                if let Some(now) = touch {
                    self.touch(key, now)?;
                }
                Ok(Some(entry))
            }
            Err(e) => {
                warn!(%key, error = %e, "corrupt disk cache entry removed");
                self.remove(key)?;
                Ok(None)
            }
        }
    }

    /// Moves `key`'s access time to `now` when the recorded one is a grain older.
    fn touch(&self, key: &CacheKey, now: UnixMillis) -> Result<(), DiskError> {
        let t = &self.inner.trees;
        let k = key.as_bytes();
        let Some(seen) = t.index.get(k).map_err(DiskError::storage)? else {
            return Ok(());
        };
        let Some(meta) = Meta::decode(&seen) else {
            return Ok(());
        };
        if meta.atime.saturating_add(ACCESS_GRAIN_MS) > now {
            return Ok(());
        }
        // The row with its access time (its first field) moved, the rest as it was.
        let mut moved = seen.to_vec();
        moved[..8].copy_from_slice(&now.to_be_bytes());
        let moved_len = moved.len();
        // Only the row seen is moved: another thread may have moved or replaced it since.
        let swapped = t
            .index
            .compare_and_swap(k, Some(seen), Some(moved))
            .map_err(DiskError::storage)?;
        if swapped.is_ok() {
            let (new_row, old_row) = (row(now, k), row(meta.atime, k));
            self.wrote((moved_len + new_row.len() + old_row.len()) as u64);
            t.by_atime
                .insert(new_row, &[])
                .map_err(DiskError::storage)?;
            t.by_atime.remove(old_row).map_err(DiskError::storage)?;
        }
        Ok(())
    }

    /// Stores `entry`, then starts an eviction pass in the background if over the bound.
    pub(super) fn insert(
        &self,
        key: &CacheKey,
        entry: &Entry,
        now: UnixMillis,
    ) -> Result<(), DiskError> {
        self.write(key, &entry.encode(), Some(entry), now)
    }

    /// Stores bytes as they are. Bytes that do not decode are indexed as already expired, so
    /// eviction takes them first.
    pub(super) fn insert_raw(
        &self,
        key: &CacheKey,
        bytes: &[u8],
        now: UnixMillis,
    ) -> Result<(), DiskError> {
        match Entry::decode(bytes) {
            Ok(entry) => self.write(key, bytes, Some(&entry), now),
            Err(_) => self.write(key, bytes, None, now),
        }
    }

    /// Writes the entry's bytes; `entry` is what they decode to (`None`: they do not), whose
    /// times and model the index row carries.
    fn write(
        &self,
        key: &CacheKey,
        bytes: &[u8],
        entry: Option<&Entry>,
        now: UnixMillis,
    ) -> Result<(), DiskError> {
        let stale_until = entry.map_or(0, |e| e.stale_until);
        let t = &self.inner.trees;
        let k = key.as_bytes();
        let meta = Meta {
            atime: now,
            stale_until,
            size: bytes.len() as u64 + PER_ENTRY_OVERHEAD,
        };
        let storage = DiskError::storage;
        // The new rows first, the entry last: a crash in between leaves rows that name no
        // current entry, which eviction drops as it meets them ([`Generation::evict_blocking`]).
        t.by_atime.insert(row(now, k), &[]).map_err(storage)?;
        t.by_expiry
            .insert(row(stale_until, k), &[])
            .map_err(storage)?;
        let old = t
            .index
            .insert(k, index_row(&meta, entry))
            .map_err(storage)?;
        let old = old.as_deref().and_then(Meta::decode);
        if let Some(old) = old.filter(|old| *old != meta) {
            t.by_atime.remove(row(old.atime, k)).map_err(storage)?;
            t.by_expiry
                .remove(row(old.stale_until, k))
                .map_err(storage)?;
        }
        t.entries.insert(k, bytes).map_err(storage)?;
        let inner = &self.inner;
        match old {
            Some(old) => saturating_sub(&inner.bytes, old.size),
            None => inner.count.fetch_add(1, Ordering::Relaxed),
        };
        let total = inner.bytes.fetch_add(meta.size, Ordering::Relaxed) + meta.size;
        if total.saturating_sub(old.map_or(0, |o| o.size)) > inner.max_bytes {
            self.evict_in_background(now);
        }
        self.wrote(meta.size);
        inner.persist_counts_now_and_then()
    }

    /// Counts `n` bytes written to the database; every [`LOOK_EVERY_BYTES`] of them (or a
    /// sixteenth of the bound, if less) measures its files again. Every write counts, the
    /// small ones of a read (its access time) and of a removal too: sled's log grows with
    /// each, and a read-mostly cache must not outgrow its bound unmeasured.
    fn wrote(&self, n: u64) {
        let inner = &self.inner;
        let written = inner.written.fetch_add(n, Ordering::Relaxed) + n;
        if written >= LOOK_EVERY_BYTES.min(inner.max_bytes / 16).max(1) {
            inner.written.store(0, Ordering::Relaxed);
            inner
                .files
                .store(super::bytes_under(&inner.path), Ordering::Relaxed);
        }
    }

    /// Removes `key`'s entry and its index rows; whether there was one.
    pub(super) fn remove(&self, key: &CacheKey) -> Result<bool, DiskError> {
        let t = &self.inner.trees;
        let k = key.as_bytes();
        let storage = DiskError::storage;
        let old = t.index.remove(k).map_err(storage)?;
        let old = old.as_deref().and_then(Meta::decode);
        t.entries.remove(k).map_err(storage)?;
        if let Some(old) = old {
            t.by_atime.remove(row(old.atime, k)).map_err(storage)?;
            t.by_expiry
                .remove(row(old.stale_until, k))
                .map_err(storage)?;
        }
        if let Some(old) = old {
            // Three rows and an entry removed: a key and a tombstone each in sled's log.
            self.wrote(4 * (8 + k.len() as u64));
            saturating_sub(&self.inner.count, 1);
            saturating_sub(&self.inner.bytes, old.size);
            self.inner.persist_counts_now_and_then()?;
        }
        Ok(old.is_some())
    }

    /// Entries and bytes held, as kept: no entry is read.
    pub(super) fn usage(&self) -> (u64, u64) {
        self.inner.counts()
    }

    /// Sets the kept counts to what a read of every entry found, and writes them down.
    pub(super) fn set_counts(&self, entries: u64, bytes: u64) -> Result<(), DiskError> {
        self.inner.count.store(entries, Ordering::Relaxed);
        self.inner.bytes.store(bytes, Ordering::Relaxed);
        self.inner.persist_counts()
    }

    /// Writes everything to the files: after this, a crash loses nothing stored so far. Waits
    /// first for an eviction pass that earlier writes started ([`Self::wait_for_eviction`]), so
    /// the files hold the tier within its bound.
    pub(super) async fn flush(&self) -> Result<(), DiskError> {
        self.wait_for_eviction().await;
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.persist_counts())
            .await
            .map_err(DiskError::worker)??;
        self.inner
            .db
            .flush_async()
            .await
            .map_err(DiskError::storage)?;
        Ok(())
    }

    /// Returns once no eviction pass runs. A write that takes the tier over its bound starts a
    /// pass in the background and returns at once; the pass goes on until the tier is within
    /// its bound, taking in what other writes add meanwhile. So once writes stop, this returns
    /// when the tier holds at most `max_bytes`: after a bulk load, before reading
    /// [`Self::usage`], or before handing the directory to another process.
    pub(super) async fn wait_for_eviction(&self) {
        let mut evicting = self.inner.evicting.subscribe();
        // The sender lives in `self`, so the channel cannot close while this waits.
        let _ = evicting.wait_for(|running| !running).await;
    }

    fn evict_in_background(&self, now: UnixMillis) {
        if self.inner.evicting.send_replace(true) {
            return;
        }
        let tier = self.clone();
        let run = move || loop {
            let inner = &tier.inner;
            let before = inner.bytes.load(Ordering::Relaxed);
            // A pass that panics inside sled must not leave the flag up for ever (eviction would
            // never run again, and `wait_for_eviction` never return).
            let pass = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                tier.evict_blocking(now, inner.max_bytes)
            }));
            let removed = match pass {
                Ok(Ok(evicted)) => {
                    debug!(?evicted, "disk cache eviction");
                    evicted.expired + evicted.corrupt + evicted.least_recently_used
                }
                Ok(Err(e)) => {
                    error!(error = %report(&e), "disk cache eviction failed");
                    inner.evicting.send_replace(false);
                    break;
                }
                Err(_) => {
                    error!("disk cache eviction panicked inside the storage engine");
                    inner.evicting.send_replace(false);
                    break;
                }
            };
            // Decide whether to go on while the flag is still up, so that a waiter
            // ([`Self::wait_for_eviction`]) never sees it down while a pass is still due. Writes
            // made during the pass only added bytes: they found this pass running and started
            // none. (The channel's lock orders this read after those writes' byte counts.)
            let after = {
                let _ordered = inner.evicting.borrow();
                inner.bytes.load(Ordering::Relaxed)
            };
            // A pass that removed nothing while nothing was added cannot do better: stop.
            let stuck = removed == 0 && after <= before;
            if after > inner.max_bytes && !stuck {
                continue;
            }
            inner.evicting.send_replace(false);
            // A write between that read and lowering the flag found it up and started nothing:
            // if it took the tier over, go on, unless a write since has started its own pass.
            let last = inner.bytes.load(Ordering::Relaxed);
            if last <= after || last <= inner.max_bytes || inner.evicting.send_replace(true) {
                break;
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => drop(handle.spawn_blocking(run)),
            Err(_) => run(),
        }
    }

    /// Removes expired entries (those past their stale period, and bytes that never decoded),
    /// then, if still over `max_bytes`, the least recently used until the tier holds at most 90%
    /// of it. Both walk a time-ordered index from its oldest end: no entry is read.
    pub(super) fn evict_blocking(
        &self,
        now: UnixMillis,
        max_bytes: u64,
    ) -> Result<Evicted, DiskError> {
        let mut evicted = Evicted::default();
        let t = &self.inner.trees;
        for item in t.by_expiry.range(..row(now.saturating_add(1), &[])) {
            let (r, _) = item.map_err(DiskError::storage)?;
            if self.current(&t.by_expiry, &r, |m| m.stale_until)? {
                evicted.expired += 1;
            }
        }
        if self.inner.bytes.load(Ordering::Relaxed) <= max_bytes {
            return Ok(evicted);
        }
        let target = max_bytes / 100 * EVICT_TO_PERCENT;
        for item in t.by_atime.iter() {
            if self.inner.bytes.load(Ordering::Relaxed) <= target {
                break;
            }
            let (r, _) = item.map_err(DiskError::storage)?;
            if self.current(&t.by_atime, &r, |m| m.atime)? {
                evicted.least_recently_used += 1;
            }
        }
        Ok(evicted)
    }

    /// Removes the entry a time-ordered row names, if the row is its current one (`time_of` its
    /// index row says the row's time); whether it did. A row that is not (left by a crash, or
    /// by two writes of one key at once) is dropped alone.
    fn current(
        &self,
        tree: &sled::Tree,
        r: &[u8],
        time_of: impl Fn(&Meta) -> UnixMillis,
    ) -> Result<bool, DiskError> {
        let time = r
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_be_bytes);
        if let Some(key) = key_of_row(r) {
            let meta = self.inner.trees.index.get(key.as_bytes());
            let meta = meta.map_err(DiskError::storage)?;
            let meta = meta.as_deref().and_then(Meta::decode);
            if meta.is_some_and(|m| Some(time_of(&m)) == time) {
                return self.remove(&key);
            }
        }
        tree.remove(r).map_err(DiskError::storage)?;
        Ok(false)
    }

    /// Calls `f` with every stored entry (its key, its encoded size, its bytes), one at a
    /// time, except those `shadow` holds too (a newer generation's copy wins); stops at `f`'s
    /// first error. Returns what it walked, shadowed ones included: the entries, and the bytes
    /// they count for.
    pub(super) fn walk(
        &self,
        shadow: Option<&Generation>,
        f: &mut Visitor<'_>,
    ) -> Result<(u64, u64), DiskError> {
        let (mut count, mut bytes) = (0, 0);
        for item in self.inner.trees.entries.iter() {
            let (k, v) = item.map_err(DiskError::storage)?;
            if let Ok(key) = <[u8; 32]>::try_from(k.as_ref()) {
                count += 1;
                bytes += v.len() as u64 + PER_ENTRY_OVERHEAD;
                let key = CacheKey(key);
                if !shadowed(shadow, &key)? {
                    f(key, v.len(), &v)?;
                }
            }
        }
        Ok((count, bytes))
    }

    /// Calls `f` with every entry as its index row describes it: its key, the bytes it counts
    /// for, and the entry without its body (for a row an earlier version wrote, or bytes that
    /// did not decode when stored, the entry as read). Stops at `f`'s first error; returns what
    /// it walked, as [`Self::walk`]. It reads the small index rows only, so sled's page cache,
    /// which holds thousands of pages it has not yet accounted for, holds small ones.
    pub(super) fn walk_summaries(
        &self,
        shadow: Option<&Generation>,
        f: &mut Summaries<'_>,
    ) -> Result<(u64, u64), DiskError> {
        let t = &self.inner.trees;
        let (mut count, mut bytes) = (0, 0);
        for item in t.index.iter() {
            let (k, index_row) = item.map_err(DiskError::storage)?;
            let (Ok(key), Some(meta)) =
                (<[u8; 32]>::try_from(k.as_ref()), Meta::decode(&index_row))
            else {
                continue;
            };
            let entry = match index_row.get(META_LEN..).filter(|tail| !tail.is_empty()) {
                Some(summary) => Entry::decode(summary),
                None => match t.entries.get(&k).map_err(DiskError::storage)? {
                    Some(stored) => Entry::decode(&stored),
                    None => continue, // a row a crash left: no entry
                },
            };
            count += 1;
            bytes += meta.size;
            let key = CacheKey(key);
            if !shadowed(shadow, &key)? {
                f(key, meta.size, entry)?;
            }
        }
        Ok((count, bytes))
    }
}

/// The last handle gone: the counts are written down, so that the next open reads them; or,
/// for a generation retired ([`Generation::retire`]), its directory is deleted: only now, so
/// that no read still in flight finds its files gone (sled reads large values from files of
/// their own, by path).
impl Drop for Inner {
    fn drop(&mut self) {
        let retired = self.retired.get_mut();
        match *retired.unwrap_or_else(|poisoned| poisoned.into_inner()) {
            Some(removal) => delete_generation(&self.path, removal),
            None => {
                if let Err(e) = self.persist_counts() {
                    warn!(error = %report(&e), "cannot write the disk cache's counts");
                }
            }
        }
    }
}

/// When a retired generation's files are removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Removal {
    /// Before the last handle's drop returns (opening, clearing: the space is expected back).
    Now,
    /// On a thread of its own: gigabytes of files can take a while to unlink, and the write
    /// that rotated must not wait for it.
    InBackground,
}

/// Deletes a generation's directory: renamed first (`<cache dir>/drop-<its name>`), so that a
/// crash midway leaves no half-deleted database where an open would look for one (an open
/// removes what is left).
pub(super) fn delete_generation(path: &Path, removal: Removal) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return;
    };
    let doomed = dir.join(format!("drop-{}", name.to_string_lossy()));
    if let Err(e) = std::fs::rename(path, &doomed) {
        warn!(?path, error = %e, "cannot delete an old disk cache generation");
        return;
    }
    let remove = move || {
        if let Err(e) = std::fs::remove_dir_all(&doomed) {
            warn!(path = ?doomed, error = %e, "cannot delete an old disk cache generation");
        }
    };
    let spawned = removal == Removal::InBackground
        && (std::thread::Builder::new().name("fallthrough-drop".into()))
            .spawn(remove.clone())
            .is_ok();
    if !spawned {
        remove();
    }
}

/// Subtracts from a kept count without wrapping: a row a crash left may be removed (and
/// subtracted) although the count never had it.
fn saturating_sub(count: &AtomicU64, n: u64) -> u64 {
    let update = |c: u64| Some(c.saturating_sub(n));
    (count.fetch_update(Ordering::Relaxed, Ordering::Relaxed, update)).unwrap_or(0)
}

impl Inner {
    fn counts(&self) -> (u64, u64) {
        (
            self.count.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }

    /// Writes the counts down when the last time was over [`PERSIST_EVERY_MS`] ago: a write
    /// in a second or more costs one more small write (no background task, which would hold
    /// the database open after its last handle is dropped).
    fn persist_counts_now_and_then(&self) -> Result<(), DiskError> {
        let now = crate::entry::now_millis();
        let last = self.persisted_at.load(Ordering::Relaxed);
        let due = now >= last + PERSIST_EVERY_MS
            && self
                .persisted_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
        match due {
            true => self.persist_counts(),
            false => Ok(()),
        }
    }

    fn persist_counts(&self) -> Result<(), DiskError> {
        let (count, bytes) = self.counts();
        let mut value = [0u8; 16];
        value[..8].copy_from_slice(&count.to_be_bytes());
        value[8..].copy_from_slice(&bytes.to_be_bytes());
        self.trees
            .state
            .insert(STATE_COUNTS, &value)
            .map_err(DiskError::storage)?;
        Ok(())
    }
}

/// Creates `dir` (and parents) readable by its owner only: entries are users' conversations.
pub(crate) fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir)
}
