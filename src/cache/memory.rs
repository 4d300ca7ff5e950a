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

/// Entries in memory, bounded by the sum of their [`Entry::weight`]. A bound of 0 turns the
/// tier off: every lookup goes to disk.
#[derive(Clone)]
pub struct MemoryTier {
    cache: Option<Cache<CacheKey, Arc<Entry>>>,
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
    /// Whether the tier holds anything at all (a bound above 0).
    pub fn is_on(&self) -> bool {
        self.cache.is_some()
    }

    pub fn new(max_bytes: u64) -> Self {
        let cache = (max_bytes > 0).then(|| {
            Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|_key: &CacheKey, entry: &Arc<Entry>| entry.weight())
                .expire_after(UntilStale)
                .build()
        });
        MemoryTier { cache }
    }

    pub async fn get(&self, key: &CacheKey) -> Option<Arc<Entry>> {
        self.cache.as_ref()?.get(key).await
    }

    pub async fn insert(&self, key: CacheKey, entry: Arc<Entry>) {
        if let Some(cache) = &self.cache {
            cache.insert(key, entry).await;
        }
    }

    pub async fn remove(&self, key: &CacheKey) {
        if let Some(cache) = &self.cache {
            cache.invalidate(key).await;
        }
    }

    pub fn clear(&self) {
        if let Some(cache) = &self.cache {
            cache.invalidate_all();
        }
    }

    /// Entries and bytes held, after applying pending evictions.
    pub async fn usage(&self) -> (u64, u64) {
        let Some(cache) = &self.cache else {
            return (0, 0);
        };
        cache.run_pending_tasks().await;
        (cache.entry_count(), cache.weighted_size())
    }
}
