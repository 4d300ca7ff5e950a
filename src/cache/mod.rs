//! The two cache tiers and the rules between them: memory first, then disk, and a disk hit is
//! promoted to memory. A fault of the disk tier is logged and treated as a miss: the cache may
//! lose an answer, never serve a wrong one, and never fail a request by itself.

mod disk;
mod memory;

use std::path::PathBuf;
use std::sync::Arc;

use tracing::warn;

pub(crate) use disk::create_private_dir;
pub use disk::{DiskTier, Evicted, Scanned};
pub use memory::MemoryTier;

use crate::entry::{Entry, Freshness, UnixMillis};
use crate::error::{report, DiskError};
use crate::key::CacheKey;

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
}

/// Memory in front of an optional disk tier. Cheap to clone.
#[derive(Clone)]
pub struct Cache {
    memory: MemoryTier,
    disk: Option<DiskTier>,
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
            disk: Some(DiskTier::open(dir, disk_bytes).await?),
        })
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
        match disk.get(key, now) {
            Ok(Some(entry)) if entry.freshness(now, None) != Freshness::Expired => {
                let entry = Arc::new(entry);
                self.memory.insert(*key, entry.clone()).await;
                Some(Lookup {
                    entry,
                    tier: Tier::Disk,
                })
            }
            Ok(Some(_expired)) => {
                self.log_disk_error(disk.remove(key).map(drop));
                None
            }
            Ok(None) => None,
            Err(e) => {
                warn!(%key, error = %report(&e), "disk cache read failed; treating as a miss");
                None
            }
        }
    }

    /// Stores `entry` in both tiers.
    pub async fn insert(&self, key: CacheKey, entry: Entry, now: UnixMillis) {
        if let Some(disk) = &self.disk {
            self.log_disk_error(disk.insert(&key, &entry, now));
        }
        self.memory.insert(key, Arc::new(entry)).await;
    }

    /// Removes `key` from both tiers.
    pub async fn remove(&self, key: &CacheKey) {
        self.memory.remove(key).await;
        if let Some(disk) = &self.disk {
            self.log_disk_error(disk.remove(key).map(drop));
        }
    }

    /// Removes everything from both tiers.
    pub async fn clear(&self) -> Result<(), DiskError> {
        self.memory.clear();
        if let Some(disk) = &self.disk {
            disk.clear().await?;
        }
        Ok(())
    }

    /// Returns once no eviction pass of the disk tier runs: after the last write, when the
    /// tier is within its bound. See [`DiskTier::wait_for_eviction`]; at once without a disk
    /// tier.
    pub async fn wait_for_eviction(&self) {
        if let Some(disk) = &self.disk {
            disk.wait_for_eviction().await;
        }
    }

    /// Writes the disk tier out, once an eviction pass in flight has ended
    /// ([`DiskTier::flush`]); a no-op without one.
    pub async fn flush(&self) -> Result<(), DiskError> {
        match &self.disk {
            Some(disk) => disk.flush().await,
            None => Ok(()),
        }
    }

    pub fn memory(&self) -> &MemoryTier {
        &self.memory
    }

    pub fn disk(&self) -> Option<&DiskTier> {
        self.disk.as_ref()
    }

    pub async fn usage(&self) -> Usage {
        let (memory_entries, memory_bytes) = self.memory.usage().await;
        let (disk_entries, disk_bytes) = self.disk.as_ref().map_or((0, 0), DiskTier::usage);
        Usage {
            memory_entries,
            memory_bytes,
            disk_entries,
            disk_bytes,
        }
    }

    fn log_disk_error(&self, result: Result<(), DiskError>) {
        if let Err(e) = result {
            warn!(error = %report(&e), "disk cache write failed");
        }
    }
}
