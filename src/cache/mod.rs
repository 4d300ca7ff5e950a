//! The two cache tiers and the rules between them: memory first, then disk, and a disk hit is
//! promoted to memory. A fault of the disk tier is logged and treated as a miss: the cache may
//! lose an answer, never serve a wrong one, and never fail a request by itself.

mod disk;
mod guard;
mod memory;

use std::path::PathBuf;
use std::sync::Arc;

use tracing::{error, info};

pub(crate) use disk::create_private_dir;
pub use disk::{DiskTier, Evicted};
pub use memory::MemoryTier;

use crate::entry::{Entry, Freshness, UnixMillis};
use crate::error::{report, DiskError};
use crate::key::CacheKey;

/// How long [`Cache::open_serving`] waits for a large disk tier before serving without it.
pub const OPEN_WAIT: std::time::Duration = std::time::Duration::from_millis(100);
/// The size on disk above which [`Cache::open_serving`] may serve before the tier is open.
pub const BACKGROUND_OPEN_BYTES: u64 = 128 * 1024 * 1024;

/// The bytes of the files under `dir` (0 when it does not exist).
fn bytes_under(dir: &std::path::Path) -> u64 {
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

/// Which tier answered a lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Memory,
    Disk,
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
    /// Disk tier operations that failed, timed out or could not start, since the start.
    pub disk_errors: u64,
}

/// Memory in front of an optional disk tier. Cheap to clone.
#[derive(Clone)]
pub struct Cache {
    memory: MemoryTier,
    /// The disk tier behind its guard; `None` for a memory-only cache.
    disk: Option<Arc<guard::Guard>>,
}

impl Cache {
    /// A cache that lives only as long as the process.
    pub fn memory_only(memory_bytes: u64) -> Self {
        Cache {
            memory: MemoryTier::new(memory_bytes),
            disk: None,
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
        })
    }

    /// As [`Self::open`], for a server that must answer at once: a large database (over
    /// [`BACKGROUND_OPEN_BYTES`] on disk, which sled takes seconds to read back at a million
    /// entries) that is not open after [`OPEN_WAIT`] goes on opening in the background while
    /// the memory tier and the upstream answer; it joins when it is ready. A smaller one is
    /// waited for, however slow the machine. Another process's lock, or a path that is a file,
    /// is found well within the wait and is an error as with [`Self::open`]; a failure found
    /// later is logged, and the cache stays in memory.
    pub async fn open_serving(
        dir: impl Into<PathBuf>,
        memory_bytes: u64,
        disk_bytes: u64,
    ) -> Result<Self, DiskError> {
        let dir = dir.into();
        let guard = Arc::new(guard::Guard::opening(dir.clone(), disk_bytes));
        let large = bytes_under(&dir.join("db")) > BACKGROUND_OPEN_BYTES;
        let opening = tokio::spawn(DiskTier::open(dir.clone(), disk_bytes));
        if !large {
            guard.set(opening.await.map_err(DiskError::worker)??);
        } else {
            Self::join_when_open(&guard, &dir, opening).await?;
        }
        Ok(Cache {
            memory: MemoryTier::new(memory_bytes),
            disk: Some(guard),
        })
    }

    /// Waits [`OPEN_WAIT`] for a large tier's opening, then lets it join in the background.
    async fn join_when_open(
        guard: &Arc<guard::Guard>,
        dir: &std::path::Path,
        mut opening: tokio::task::JoinHandle<Result<DiskTier, DiskError>>,
    ) -> Result<(), DiskError> {
        match tokio::time::timeout(OPEN_WAIT, &mut opening).await {
            Ok(opened) => guard.set(opened.map_err(DiskError::worker)??),
            Err(_) => {
                info!(dir = %dir.display(), "the disk cache is large and still opening; answering from memory and the upstream meanwhile");
                let joining = guard.clone();
                tokio::spawn(async move {
                    match opening.await {
                        Ok(Ok(tier)) => {
                            info!("the disk cache is open");
                            joining.set(tier);
                        }
                        Ok(Err(e)) => {
                            error!(error = %report(&e), "the disk cache could not be opened; serving from memory only")
                        }
                        Err(e) => error!(error = %e, "opening the disk cache failed"),
                    }
                });
            }
        }
        Ok(())
    }

    /// The cache directory, for a cache with a disk tier (open, or still opening).
    pub fn dir(&self) -> Option<&std::path::Path> {
        self.disk.as_deref().map(guard::Guard::dir)
    }

    /// The entry under `key` if it is still servable (fresh or stale) at `now`.
    pub async fn get(&self, key: &CacheKey, now: UnixMillis) -> Option<Lookup> {
        if let Some(entry) = self.memory.get(key).await {
            if entry.freshness(now, None) != Freshness::Expired {
                return Some(Lookup {
                    entry,
                    tier: Tier::Memory,
                });
            }
        }
        let disk = self.disk.as_ref()?;
        let k = *key;
        let found = disk.call("read", move |d| d.get(&k, now)).await?;
        match found {
            Some(entry) if entry.freshness(now, None) != Freshness::Expired => {
                let entry = Arc::new(entry);
                self.memory.insert(*key, entry.clone()).await;
                Some(Lookup {
                    entry,
                    tier: Tier::Disk,
                })
            }
            Some(_expired) => {
                disk.call("remove", move |d| d.remove(&k)).await;
                None
            }
            None => None,
        }
    }

    /// Stores `entry` in both tiers. The disk's part never fails or holds up the caller for
    /// long (the `guard` room): a disk that cannot take it leaves the entry in memory only.
    pub async fn insert(&self, key: CacheKey, entry: Entry, now: UnixMillis) {
        let entry = Arc::new(entry);
        if let Some(disk) = &self.disk {
            let stored = entry.clone();
            let write = move |d: &DiskTier| d.insert(&key, &stored, now);
            disk.call("write", write).await;
        }
        self.memory.insert(key, entry).await;
    }

    /// Removes `key` from both tiers.
    pub async fn remove(&self, key: &CacheKey) {
        self.memory.remove(key).await;
        if let Some(disk) = &self.disk {
            let k = *key;
            disk.call("remove", move |d| d.remove(&k)).await;
        }
    }

    /// Removes everything from both tiers.
    pub async fn clear(&self) -> Result<(), DiskError> {
        self.memory.clear();
        if let Some(disk) = self.disk() {
            disk.clear().await?;
        }
        Ok(())
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
        let (disk_entries, disk_bytes) = self.disk().as_ref().map_or((0, 0), DiskTier::usage);
        Usage {
            memory_entries,
            memory_bytes,
            disk_entries,
            disk_bytes,
            disk_errors: self.disk.as_ref().map_or(0, |g| g.failures()),
        }
    }
}
