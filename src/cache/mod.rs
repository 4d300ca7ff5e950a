//! The cache tiers and the rules between them: memory first, then disk, then the shared tier
//! of several instances (when configured); a hit is promoted to the tiers before it. A fault
//! of the disk or shared tier is logged and treated as a miss: the cache may lose an answer,
//! never serve a wrong one, and never fail a request by itself.

mod disk;
mod failures;
mod guard;
mod memory;
pub mod shared;

use std::path::PathBuf;
use std::sync::Arc;

use tracing::{error, info};

pub(crate) use disk::create_private_dir;
pub use disk::{DiskTier, Evicted};
pub use memory::MemoryTier;
pub use shared::SharedTier;

use crate::entry::{Entry, Freshness, UnixMillis};
use crate::error::{report, DiskError};
use crate::key::CacheKey;

/// How long [`Cache::open_serving`] waits for a large disk tier before serving without it.
pub const OPEN_WAIT: std::time::Duration = std::time::Duration::from_millis(100);
/// The size on disk above which [`Cache::open_serving`] may serve before the tier is open.
pub const BACKGROUND_OPEN_BYTES: u64 = 128 * 1024 * 1024;

/// Which tier answered a lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Memory,
    Disk,
    Shared,
}

/// A lookup's answer: the entry, fresh or stale, and where it was found.
#[derive(Debug, Clone)]
pub struct Lookup {
    pub entry: Arc<Entry>,
    pub tier: Tier,
}

/// Entries and bytes per tier, for stats and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    pub memory_entries: u64,
    pub memory_bytes: u64,
    pub disk_entries: u64,
    pub disk_bytes: u64,
    /// The disk tier's files as last measured (what `disk_bytes` bounds).
    pub disk_files_bytes: u64,
    /// Disk tier operations that failed, timed out or could not start, since the start.
    pub disk_errors: u64,
    /// Shared tier operations that failed or timed out, since the start.
    pub shared_errors: u64,
}

/// What a miss found of identical misses on other instances ([`Cache::shared_flight`]).
pub enum SharedFlight {
    /// Another instance's answer landed while this one waited.
    Answered(Lookup),
    /// This instance leads: the lease is held until it is dropped.
    Lead(shared::Lease),
    /// No shared tier, or it did not answer, or the wait ran out: go on alone.
    Alone,
}

/// Memory in front of an optional disk tier and an optional shared tier. Cheap to clone.
#[derive(Clone)]
pub struct Cache {
    memory: MemoryTier,
    /// The disk tier behind its guard; `None` for a memory-only cache.
    disk: Option<Arc<guard::Guard>>,
    /// The tier several instances share; `None` without `[shared]`.
    shared: Option<Arc<SharedTier>>,
    /// Moved on at the start and at the end of every [`Self::clear`]: a disk hit read before
    /// or during a clear is not copied into memory after it (it would bring a purged answer
    /// back).
    cleared: Arc<std::sync::atomic::AtomicU64>,
}

impl Cache {
    /// A cache that lives only as long as the process.
    pub fn memory_only(memory_bytes: u64) -> Self {
        Cache {
            memory: MemoryTier::new(memory_bytes),
            disk: None,
            shared: None,
            cleared: Default::default(),
        }
    }

    /// A memory tier over a disk tier in `dir` (created 0700 when missing).
    pub async fn open(
        dir: impl Into<PathBuf>,
        memory_bytes: u64,
        disk_bytes: u64,
    ) -> Result<Self, DiskError> {
        Ok(Cache {
            memory: MemoryTier::new(memory_bytes),
            disk: Some(Arc::new(guard::Guard::new(
                DiskTier::open(dir, disk_bytes).await?,
            ))),
            shared: None,
            cleared: Default::default(),
        })
    }

    /// As [`Self::open`], for a server that must answer at once: a large database (over
    /// [`BACKGROUND_OPEN_BYTES`] on disk, which sled takes seconds to read back at a million
    /// entries) that is not open after [`OPEN_WAIT`] goes on opening in the background while
    /// the memory tier and the upstream answer; it joins when it is ready. A smaller one is
    /// waited for, however slow the machine. Another process's lock, or a path that is a file,
    /// is found well within the wait and is an error as with [`Self::open`]; a tier that cannot
    /// be opened otherwise (a full disk, an unwritable directory) is logged and opened again
    /// every few seconds in the background, answering without the disk meanwhile.
    pub async fn open_serving(
        dir: impl Into<PathBuf>,
        memory_bytes: u64,
        disk_bytes: u64,
    ) -> Result<Self, DiskError> {
        let dir = dir.into();
        let guard = Arc::new(guard::Guard::opening(dir.clone(), disk_bytes));
        let large = disk::bytes_under(&dir) > BACKGROUND_OPEN_BYTES;
        let opening = tokio::spawn(DiskTier::open(dir.clone(), disk_bytes));
        if !large {
            Self::bring_in(&guard, opening.await.map_err(DiskError::worker)?)?;
        } else {
            Self::join_when_open(&guard, &dir, opening).await?;
        }
        Ok(Cache {
            memory: MemoryTier::new(memory_bytes),
            disk: Some(guard),
            shared: None,
            cleared: Default::default(),
        })
    }

    /// Waits [`OPEN_WAIT`] for a large tier's opening, then lets it join in the background.
    async fn join_when_open(
        guard: &Arc<guard::Guard>,
        dir: &std::path::Path,
        mut opening: tokio::task::JoinHandle<Result<DiskTier, DiskError>>,
    ) -> Result<(), DiskError> {
        match tokio::time::timeout(OPEN_WAIT, &mut opening).await {
            Ok(opened) => Self::bring_in(guard, opened.map_err(DiskError::worker)?)?,
            Err(_) => {
                info!(dir = %dir.display(), "the disk cache is large and still opening; answering from memory and the upstream meanwhile");
                let joining = guard.clone();
                tokio::spawn(async move {
                    let opened = opening.await.map_err(DiskError::worker).and_then(|r| r);
                    if opened.is_ok() {
                        info!("the disk cache is open");
                    }
                    // Too late to stop the start: even another process's lock is one to wait
                    // out, trying again.
                    if let Err(e) = Self::bring_in(&joining, opened) {
                        error!(error = %report(&e), "the disk cache cannot be opened; answering without it, and trying again every few seconds");
                        joining.retry_open();
                    }
                });
            }
        }
        Ok(())
    }

    /// Brings an opened tier into `guard`. A tier that could not be opened for want of working
    /// storage (a full disk, an unwritable directory, a failing device) leaves the guard
    /// empty, answering without the disk, and is opened again every few seconds in the
    /// background: storing starts by itself once the disk is back, as it resumes after a
    /// failure while serving (SPEC: a full disk never stops the process). Another process's
    /// lock, or a path that is a file, is the operator's to fix: an error for the caller.
    fn bring_in(
        guard: &Arc<guard::Guard>,
        opened: Result<DiskTier, DiskError>,
    ) -> Result<(), DiskError> {
        match opened {
            Ok(tier) => guard.set(tier),
            Err(e @ (DiskError::Locked { .. } | DiskError::NotADirectory { .. })) => return Err(e),
            Err(e) => {
                error!(dir = %guard.dir().display(), error = %report(&e), "the disk cache cannot be opened; answering without it, and trying again every few seconds");
                guard.retry_open();
            }
        }
        Ok(())
    }

    /// This cache in front of a shared tier (looked up after the local tiers, written with
    /// them).
    pub fn with_shared(mut self, shared: Option<Arc<SharedTier>>) -> Self {
        self.shared = shared;
        self
    }

    /// The shared tier, if there is one.
    pub fn shared(&self) -> Option<&Arc<SharedTier>> {
        self.shared.as_ref()
    }

    /// The cache directory, for a cache with a disk tier (open, or still opening).
    pub fn dir(&self) -> Option<&std::path::Path> {
        self.disk.as_deref().map(guard::Guard::dir)
    }

    /// The entry under `key` if it is still servable (fresh or stale) at `now`. A local
    /// entry that is only stale is checked against the shared tier, where another instance
    /// may have stored a fresh answer since: the fresher one wins.
    pub async fn get(&self, key: &CacheKey, now: UnixMillis) -> Option<Lookup> {
        let local = self.local_get(key, now).await;
        match (&local, &self.shared) {
            (Some(hit), Some(shared)) if hit.entry.freshness(now, None) != Freshness::Fresh => {
                match shared.get(key).await {
                    Some(entry) if entry.freshness(now, None) == Freshness::Fresh => {
                        self.promoted(key, entry, now).await.or(local)
                    }
                    _ => local,
                }
            }
            (Some(_), _) => local,
            (None, Some(shared)) => {
                let entry = shared.get(key).await?;
                self.promoted(key, entry, now).await
            }
            (None, None) => None,
        }
    }

    /// What an identical flight that has just ended stored under `key`, looked for as cheaply
    /// as it can be: a flight writes the memory tier last, before it leaves the flights, so
    /// the memory tier is enough (every tier, when it is off). Saves a miss a second disk
    /// read and a shared-tier round trip.
    pub async fn just_stored(&self, key: &CacheKey, now: UnixMillis) -> Option<Lookup> {
        if !self.memory.is_on() {
            return self.get(key, now).await;
        }
        let entry = self.memory.get(key).await?;
        (entry.freshness(now, None) != Freshness::Expired).then_some(Lookup {
            entry,
            tier: Tier::Memory,
        })
    }

    /// The memory tier's entry, else the disk tier's (promoted to memory).
    async fn local_get(&self, key: &CacheKey, now: UnixMillis) -> Option<Lookup> {
        if let Some(entry) = self.memory.get(key).await {
            if entry.freshness(now, None) != Freshness::Expired {
                return Some(Lookup {
                    entry,
                    tier: Tier::Memory,
                });
            }
        }
        let clears = self.cleared.load(std::sync::atomic::Ordering::SeqCst);
        let entry = self.disk_get(key, now).await?;
        if self.cleared.load(std::sync::atomic::Ordering::SeqCst) == clears {
            self.memory.insert(*key, entry.clone()).await;
        }
        Some(Lookup {
            entry,
            tier: Tier::Disk,
        })
    }

    /// The disk tier's servable entry under `key`; an expired one is removed.
    async fn disk_get(&self, key: &CacheKey, now: UnixMillis) -> Option<Arc<Entry>> {
        let disk = self.disk.as_ref()?;
        let k = *key;
        match disk.call("read", move |d| d.get(&k, now)).await?? {
            entry if entry.freshness(now, None) != Freshness::Expired => Some(Arc::new(entry)),
            _expired => {
                disk.call("remove", move |d| d.remove(&k)).await;
                None
            }
        }
    }

    /// A shared tier's entry, stored in the local tiers, as a shared hit (`None` if expired:
    /// the server's expiry is at the stale deadline, but its clock is not ours).
    async fn promoted(&self, key: &CacheKey, entry: Entry, now: UnixMillis) -> Option<Lookup> {
        if entry.freshness(now, None) == Freshness::Expired {
            return None;
        }
        let entry = Arc::new(entry);
        self.insert_local(*key, entry.clone(), now).await;
        Some(Lookup {
            entry,
            tier: Tier::Shared,
        })
    }

    /// A miss's place among identical misses on other instances: it leads (holding the
    /// shared lease on `key` for at most `ttl`), or waits, within `ttl`, for the instance that
    /// leads, and takes its answer. `Alone` without a shared tier, when the tier does not
    /// answer, or when the wait runs out.
    pub async fn shared_flight(&self, key: &CacheKey, ttl: std::time::Duration) -> SharedFlight {
        use shared::{Leasing, Watch};
        let Some(tier) = &self.shared else {
            return SharedFlight::Alone;
        };
        let until = tokio::time::Instant::now() + ttl;
        loop {
            match tier.lease(key, ttl).await {
                Leasing::Taken(lease) => return SharedFlight::Lead(lease),
                Leasing::Unavailable => return SharedFlight::Alone,
                Leasing::Held => {}
            }
            loop {
                if tokio::time::Instant::now() + shared::POLL_EVERY >= until {
                    return SharedFlight::Alone;
                }
                tokio::time::sleep(shared::POLL_EVERY).await;
                let now = crate::entry::now_millis();
                match tier.watch(key).await {
                    // A stale entry is the one this miss already knows: not the answer.
                    Watch::Seen {
                        entry: Some(entry), ..
                    } if entry.freshness(now, None) == Freshness::Fresh => {
                        return match self.promoted(key, entry, now).await {
                            Some(hit) => SharedFlight::Answered(hit),
                            None => SharedFlight::Alone,
                        };
                    }
                    Watch::Seen { leased: true, .. } => continue,
                    // The lead ended without an answer: lead ourselves.
                    Watch::Seen { leased: false, .. } => break,
                    Watch::Unavailable => return SharedFlight::Alone,
                }
            }
        }
    }

    /// Stores `entry` in every tier. The disk's and the shared tier's parts never fail or
    /// hold up the caller for long (their time limits): a tier that cannot take it is skipped.
    pub async fn insert(&self, key: CacheKey, entry: Entry, now: UnixMillis) {
        let entry = Arc::new(entry);
        if let Some(shared) = &self.shared {
            shared.put(&key, &entry, now).await;
        }
        self.insert_local(key, entry, now).await;
    }

    /// Stores `entry` in the memory and disk tiers.
    async fn insert_local(&self, key: CacheKey, entry: Arc<Entry>, now: UnixMillis) {
        if let Some(disk) = &self.disk {
            let stored = entry.clone();
            let write = move |d: &DiskTier| d.insert(&key, &stored, now);
            disk.call("write", write).await;
        }
        self.memory.insert(key, entry).await;
    }

    /// Removes `key` from every tier.
    pub async fn remove(&self, key: &CacheKey) {
        self.memory.remove(key).await;
        if let Some(disk) = &self.disk {
            let k = *key;
            disk.call("remove", move |d| d.remove(&k)).await;
        }
        if let Some(shared) = &self.shared {
            shared.remove(key).await;
        }
    }

    /// Removes everything from the local tiers (the shared one is other instances' too:
    /// `cache purge --shared` clears it). The disk first, then memory, so that a disk hit
    /// cannot refill memory with what was purged; a disk tier that is not open at this moment
    /// is [`DiskError::Unavailable`], not a purge that would leave its entries to come back.
    pub async fn clear(&self) -> Result<(), DiskError> {
        use std::sync::atomic::Ordering::SeqCst;
        self.cleared.fetch_add(1, SeqCst);
        let cleared = match &self.disk {
            None => Ok(()),
            Some(guard) => match guard.tier() {
                Some(disk) => disk.clear().await,
                None => Err(DiskError::Unavailable {
                    dir: guard.dir().display().to_string(),
                }),
            },
        };
        self.memory.clear();
        self.cleared.fetch_add(1, SeqCst);
        cleared
    }

    /// Returns once no eviction pass of the disk tier runs: after the last write, when the
    /// tier is within its bound. See [`DiskTier::wait_for_eviction`]; at once without a disk
    /// tier.
    pub async fn wait_for_eviction(&self) {
        if let Some(disk) = self.disk() {
            disk.wait_for_eviction().await;
        }
    }

    /// Writes the disk tier out, once an eviction pass in flight has ended
    /// ([`DiskTier::flush`]); a no-op without one. Disk calls still in flight (a write past
    /// its time limit) are waited for, a while.
    pub async fn flush(&self) -> Result<(), DiskError> {
        let Some(guard) = &self.disk else {
            return Ok(());
        };
        guard.settled(guard::TIME_LIMIT * 5).await;
        match guard.tier() {
            Some(disk) => disk.flush().await,
            None => Ok(()),
        }
    }

    pub fn memory(&self) -> &MemoryTier {
        &self.memory
    }

    /// The disk tier as it is now: `None` for a memory-only cache, or while a tier that
    /// failed is being reopened.
    pub fn disk(&self) -> Option<DiskTier> {
        self.disk.as_ref()?.tier()
    }

    pub async fn usage(&self) -> Usage {
        let (memory_entries, memory_bytes) = self.memory.usage().await;
        let disk = self.disk();
        let (disk_entries, disk_bytes) = disk.as_ref().map_or((0, 0), DiskTier::usage);
        Usage {
            memory_entries,
            memory_bytes,
            disk_entries,
            disk_bytes,
            disk_files_bytes: disk.as_ref().map_or(0, DiskTier::files_bytes),
            disk_errors: self.disk.as_ref().map_or(0, |g| g.failures()),
            shared_errors: self.shared.as_ref().map_or(0, |s| s.failures()),
        }
    }
}
