//! The memory tier: a moka cache bounded by bytes, whose entries vanish when they stop being
//! servable even as stale.
//!
//! moka hides an entry once its expiry passes, so its expiry is the entry's *stale* deadline and
//! freshness is read from the value itself.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::future::Cache;
use moka::Expiry;

use crate::entry::{now_millis, Entry};
use crate::key::CacheKey;

/// Entries in memory, bounded by the sum of their [`Entry::weight`].
#[derive(Clone)]
pub struct MemoryTier {
    cache: Cache<CacheKey, Arc<Entry>>,
}

/// Expires each entry when its stale period ends.
struct UntilStale;

impl Expiry<CacheKey, Arc<Entry>> for UntilStale {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        entry: &Arc<Entry>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(Duration::from_millis(
            entry.stale_until.saturating_sub(now_millis()),
        ))
    }

    fn expire_after_update(
        &self,
        key: &CacheKey,
        entry: &Arc<Entry>,
        updated_at: Instant,
        _current: Option<Duration>,
    ) -> Option<Duration> {
        self.expire_after_create(key, entry, updated_at)
    }
}

impl MemoryTier {
    pub fn new(max_bytes: u64) -> Self {
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_key: &CacheKey, entry: &Arc<Entry>| entry.weight())
            .expire_after(UntilStale)
            .build();
        MemoryTier { cache }
    }

    pub async fn get(&self, key: &CacheKey) -> Option<Arc<Entry>> {
        self.cache.get(key).await
    }

    pub async fn insert(&self, key: CacheKey, entry: Arc<Entry>) {
        self.cache.insert(key, entry).await;
    }

    pub async fn remove(&self, key: &CacheKey) {
        self.cache.invalidate(key).await;
    }

    pub fn clear(&self) {
        self.cache.invalidate_all();
    }

    /// Entries and bytes held, after applying pending evictions.
    pub async fn usage(&self) -> (u64, u64) {
        self.cache.run_pending_tasks().await;
        (self.cache.entry_count(), self.cache.weighted_size())
    }
}
