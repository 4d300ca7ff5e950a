//! The disk tier: entries in sled, bounded by bytes. The only file that talks to sled.
//!
//! Two trees: `entries` (key -> encoded [`Entry`]) and `atime` (key -> last access, u64 BE),
//! the latter for least-recently-used eviction. Point reads and writes run inline: sled answers
//! them from its page cache and an in-memory log buffer that its own thread flushes, in about a
//! microsecond. Everything that may take long — opening, flushing, eviction scans, export —
//! runs on tokio's blocking pool so it never stalls the runtime's threads.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::watch;
use tracing::{debug, error, warn};

use crate::entry::{Entry, UnixMillis};
use crate::error::{report, DiskError};
use crate::key::CacheKey;

/// Bookkeeping bytes per entry besides its encoded value (key twice, access time).
const PER_ENTRY_OVERHEAD: u64 = 32 + 32 + 8;
/// Eviction brings the tier down to this share of its bound, so it does not run on every write.
const EVICT_TO_PERCENT: u64 = 90;
/// How often sled writes its log buffer out: the most a crash of the process can lose.
const FLUSH_EVERY_MS: u64 = 100;
/// sled's own page cache. Its default (1 GiB) would dwarf the memory tier, which already holds
/// the hot entries; this is enough for sled's index and recently written pages.
const SLED_CACHE_BYTES: u64 = 32 * 1024 * 1024;

/// The sled-backed tier. Cheap to clone.
#[derive(Clone)]
pub struct DiskTier {
    inner: Arc<Inner>,
}

struct Inner {
    /// The cache directory: sled's database is its `db`.
    dir: PathBuf,
    db: sled::Db,
    entries: sled::Tree,
    atime: sled::Tree,
    /// Sum of encoded entry sizes plus overhead; kept in step with every insert and removal.
    bytes: AtomicU64,
    max_bytes: u64,
    /// True while an eviction pass runs, so writes start at most one at a time; a channel
    /// rather than a flag so that [`DiskTier::wait_for_eviction`] can wait for the pass to end.
    evicting: watch::Sender<bool>,
}

/// What an eviction pass removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Evicted {
    pub expired: u64,
    pub corrupt: u64,
    pub least_recently_used: u64,
}

/// A stored entry as a scan sees it: decoded, or the reason it could not be.
pub type Scanned = (CacheKey, Result<Entry, crate::entry::DecodeError>);

impl DiskTier {
    /// Opens (or creates, mode 0700) the tier in `dir`. A directory another process holds
    /// gives [`DiskError::Locked`]; a database sled finds corrupt is moved aside and started anew,
    /// since a cache can always be refilled.
    pub async fn open(dir: impl Into<PathBuf>, max_bytes: u64) -> Result<DiskTier, DiskError> {
        let dir = dir.into();
        tokio::task::spawn_blocking(move || Self::open_blocking(&dir, max_bytes))
            .await
            .map_err(DiskError::worker)?
    }

    fn open_blocking(dir: &Path, max_bytes: u64) -> Result<DiskTier, DiskError> {
        if dir.exists() && !dir.is_dir() {
            return Err(DiskError::NotADirectory {
                dir: dir.display().to_string(),
            });
        }
        create_private_dir(dir).map_err(DiskError::storage)?;
        let path = dir.join("db");
        let db = match open_db(&path) {
            Err(sled::Error::Corruption { .. }) => {
                let aside = dir.join(format!("db.corrupt-{}", crate::entry::now_millis()));
                error!(
                    ?path,
                    ?aside,
                    "disk cache is corrupt; moving it aside and starting empty"
                );
                std::fs::rename(&path, &aside).map_err(DiskError::storage)?;
                open_db(&path)
            }
            other => other,
        }
        .map_err(|e| match e {
            sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
                DiskError::Locked {
                    dir: dir.display().to_string(),
                }
            }
            other => DiskError::storage(other),
        })?;
        let entries = db.open_tree("entries").map_err(DiskError::storage)?;
        let atime = db.open_tree("atime").map_err(DiskError::storage)?;
        let mut bytes = 0;
        for item in entries.iter() {
            let (_, value) = item.map_err(DiskError::storage)?;
            bytes += value.len() as u64 + PER_ENTRY_OVERHEAD;
        }
        debug!(?path, entries = entries.len(), bytes, "disk cache open");
        Ok(DiskTier {
            inner: Arc::new(Inner {
                dir: dir.to_owned(),
                db,
                entries,
                atime,
                bytes: AtomicU64::new(bytes),
                max_bytes,
                evicting: watch::Sender::new(false),
            }),
        })
    }

    /// The cache directory the tier was opened in.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The entry under `key`, if it decodes. A corrupt entry is removed, logged, and a miss.
    /// Records the access for LRU eviction.
    pub fn get(&self, key: &CacheKey, now: UnixMillis) -> Result<Option<Entry>, DiskError> {
        let Some(bytes) = self
            .inner
            .entries
            .get(key.as_bytes())
            .map_err(DiskError::storage)?
        else {
            return Ok(None);
        };
        match Entry::decode(&bytes) {
            Ok(entry) => {
                self.inner
                    .atime
                    .insert(key.as_bytes(), &now.to_be_bytes())
                    .map_err(DiskError::storage)?;
                Ok(Some(entry))
            }
            Err(e) => {
                warn!(%key, error = %e, "corrupt disk cache entry removed");
                self.remove(key)?;
                Ok(None)
            }
        }
    }

    /// Stores `entry`, then starts an eviction pass in the background if over the bound.
    pub fn insert(&self, key: &CacheKey, entry: &Entry, now: UnixMillis) -> Result<(), DiskError> {
        self.insert_raw(key, &entry.encode(), now)
    }

    /// Stores bytes as they are. Public for tests that stage corruption; use [`Self::insert`].
    #[doc(hidden)]
    pub fn insert_raw(
        &self,
        key: &CacheKey,
        bytes: &[u8],
        now: UnixMillis,
    ) -> Result<(), DiskError> {
        let inner = &self.inner;
        let old = inner
            .entries
            .insert(key.as_bytes(), bytes)
            .map_err(DiskError::storage)?;
        inner
            .atime
            .insert(key.as_bytes(), &now.to_be_bytes())
            .map_err(DiskError::storage)?;
        let added = bytes.len() as u64 + PER_ENTRY_OVERHEAD;
        let removed = old.map_or(0, |v| v.len() as u64 + PER_ENTRY_OVERHEAD);
        let total = inner.bytes.fetch_add(added, Ordering::Relaxed) + added;
        inner.bytes.fetch_sub(removed, Ordering::Relaxed);
        if total.saturating_sub(removed) > inner.max_bytes {
            self.evict_in_background(now);
        }
        Ok(())
    }

    pub fn remove(&self, key: &CacheKey) -> Result<bool, DiskError> {
        self.inner
            .atime
            .remove(key.as_bytes())
            .map_err(DiskError::storage)?;
        let old = self
            .inner
            .entries
            .remove(key.as_bytes())
            .map_err(DiskError::storage)?;
        if let Some(v) = &old {
            self.inner
                .bytes
                .fetch_sub(v.len() as u64 + PER_ENTRY_OVERHEAD, Ordering::Relaxed);
        }
        Ok(old.is_some())
    }

    /// Entries and bytes held.
    pub fn usage(&self) -> (u64, u64) {
        (
            self.inner.entries.len() as u64,
            self.inner.bytes.load(Ordering::Relaxed),
        )
    }

    /// Writes everything to the files: after this, a crash loses nothing stored so far. Waits
    /// first for an eviction pass that earlier writes started ([`Self::wait_for_eviction`]), so
    /// the files hold the tier within its bound.
    pub async fn flush(&self) -> Result<(), DiskError> {
        self.wait_for_eviction().await;
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
            let removed = match tier.evict_blocking(now, inner.max_bytes) {
                Ok(evicted) => {
                    debug!(?evicted, "disk cache eviction");
                    evicted.expired + evicted.corrupt + evicted.least_recently_used
                }
                Err(e) => {
                    error!(error = %report(&e), "disk cache eviction failed");
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

    /// Removes expired and corrupt entries, then the least recently used until the tier holds at
    /// most 90% of `max_bytes` (nothing more when already under `max_bytes`).
    pub async fn evict(&self, now: UnixMillis, max_bytes: u64) -> Result<Evicted, DiskError> {
        let tier = self.clone();
        tokio::task::spawn_blocking(move || tier.evict_blocking(now, max_bytes))
            .await
            .map_err(DiskError::worker)?
    }

    fn evict_blocking(&self, now: UnixMillis, max_bytes: u64) -> Result<Evicted, DiskError> {
        let mut evicted = Evicted::default();
        let mut live: Vec<(UnixMillis, CacheKey)> = Vec::new();
        for item in self.inner.entries.iter() {
            let (k, v) = item.map_err(DiskError::storage)?;
            let Ok(key_bytes) = <[u8; 32]>::try_from(k.as_ref()) else {
                continue;
            };
            let key = CacheKey(key_bytes);
            match Entry::decode(&v) {
                Err(_) => {
                    self.remove(&key)?;
                    evicted.corrupt += 1;
                }
                Ok(entry) if entry.stale_until <= now => {
                    self.remove(&key)?;
                    evicted.expired += 1;
                }
                Ok(entry) => {
                    let accessed = self
                        .inner
                        .atime
                        .get(key.as_bytes())
                        .map_err(DiskError::storage)?
                        .and_then(|a| a.as_ref().try_into().ok())
                        .map_or(entry.stored_at, u64::from_be_bytes);
                    live.push((accessed, key));
                }
            }
        }
        if self.inner.bytes.load(Ordering::Relaxed) <= max_bytes {
            return Ok(evicted);
        }
        let target = max_bytes / 100 * EVICT_TO_PERCENT;
        live.sort_unstable();
        for (_, key) in live {
            if self.inner.bytes.load(Ordering::Relaxed) <= target {
                break;
            }
            self.remove(&key)?;
            evicted.least_recently_used += 1;
        }
        Ok(evicted)
    }

    /// Every stored entry, decoded where it can be (for stats and purges of small caches).
    pub async fn scan(&self) -> Result<Vec<Scanned>, DiskError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.visit(move |key, entry| {
            let _ = tx.send((key, entry));
            Ok(())
        })
        .await?;
        Ok(rx.try_iter().collect())
    }

    /// Calls `f` with every stored entry, decoded where it can be, on the blocking pool, one at
    /// a time (so an export of a large cache never holds it all in memory). Stops at `f`'s
    /// first error.
    pub async fn visit<F>(&self, mut f: F) -> Result<(), DiskError>
    where
        F: FnMut(CacheKey, Result<Entry, crate::entry::DecodeError>) -> std::io::Result<()>
            + Send
            + 'static,
    {
        let tier = self.clone();
        tokio::task::spawn_blocking(move || {
            for item in tier.inner.entries.iter() {
                let (k, v) = item.map_err(DiskError::storage)?;
                if let Ok(key) = <[u8; 32]>::try_from(k.as_ref()) {
                    f(CacheKey(key), Entry::decode(&v)).map_err(DiskError::Io)?;
                }
            }
            Ok(())
        })
        .await
        .map_err(DiskError::worker)?
    }

    /// Removes every entry.
    pub async fn clear(&self) -> Result<(), DiskError> {
        let tier = self.clone();
        tokio::task::spawn_blocking(move || {
            tier.inner.entries.clear().map_err(DiskError::storage)?;
            tier.inner.atime.clear().map_err(DiskError::storage)?;
            tier.inner.bytes.store(0, Ordering::Relaxed);
            Ok(())
        })
        .await
        .map_err(DiskError::worker)?
    }
}

fn open_db(path: &Path) -> sled::Result<sled::Db> {
    sled::Config::new()
        .path(path)
        .flush_every_ms(Some(FLUSH_EVERY_MS))
        .cache_capacity(SLED_CACHE_BYTES)
        .open()
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
