//! [`ClientBuilder`]: a [`Client`]'s settings, and the engine built from them.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use tracing::{error, warn};

use crate::cache::{Cache, SharedTier};
use crate::clock::Clock;
use crate::config::Config;
use crate::error::{report, DiskError, Error};
use crate::key::{secret, CredentialFingerprint, KeySecret};
use crate::metrics::Metrics;
use crate::upstream::breaker::Breakers;
use crate::upstream::retry::RetryBudget;
use crate::upstream::{self, Upstream};

use super::{Client, Engine, MAX_REFRESHES};

/// Builds a [`Client`]. Every setting defaults as in [`Config`].
#[must_use]
pub struct ClientBuilder {
    config: Config,
    credential: Option<String>,
    cache: Option<Cache>,
    memory_only: bool,
    metrics: Option<Arc<Metrics>>,
    key_secret: Option<KeySecret>,
}

/// The environment's secret, else a random one for this process.
fn fresh_secret() -> KeySecret {
    secret::from_env().map_or_else(KeySecret::random, |text| KeySecret::from_text(&text))
}

/// The configured cache; a disk tier that cannot be opened (an unwritable directory, a full
/// disk) answers without the disk and is opened again in the background until it opens
/// ([`Cache::open_serving`]); one that fails in any other way leaves a memory-only cache and an
/// error in the log, not a process that cannot start. Another process holding the directory,
/// or a path that is a file, is the caller's to fix and stops the build.
async fn open_or_memory_only(config: &Config) -> Result<Cache, Error> {
    let memory = config.cache.memory_bytes.as_u64();
    if config.cache.disk_bytes.as_u64() == 0 {
        return Ok(Cache::memory_only(memory)); // `disk_bytes = "0"`: no local state
    }
    let dir = config.cache_dir();
    match Cache::open_serving(&dir, memory, config.cache.disk_bytes.as_u64()).await {
        Ok(cache) => Ok(cache),
        Err(e @ (DiskError::Locked { .. } | DiskError::NotADirectory { .. })) => Err(e.into()),
        Err(e) => {
            error!(dir = %dir.display(), error = %report(&e), "the disk cache cannot be opened; serving from memory only");
            Ok(Cache::memory_only(memory))
        }
    }
}

/// The configured shared tier, if any. Instances share entries for requests with a
/// credential only if they fingerprint credentials with the same secret: without
/// `FALLTHROUGH_KEY_SECRET`, each keeps its own, and says so.
fn shared_tier(config: &Config) -> Result<Option<Arc<SharedTier>>, Error> {
    let tier = SharedTier::from_config(&config.shared)?;
    if tier.is_some() && secret::from_env().is_none() {
        warn!(
            "a shared tier without {}: requests that carry a credential are keyed with this instance's own secret, so other instances cannot share their entries; set the same {} on every instance",
            secret::SECRET_ENV,
            secret::SECRET_ENV
        );
    }
    Ok(tier)
}

impl ClientBuilder {
    /// Starts from a whole configuration (as read from `fallthrough.toml`).
    pub fn from_config(config: Config) -> Self {
        ClientBuilder {
            config,
            credential: None,
            cache: None,
            memory_only: false,
            metrics: None,
            key_secret: None,
        }
    }

    /// Where misses go. Default `https://api.anthropic.com`.
    pub fn upstream(mut self, url: impl Into<String>) -> Self {
        self.config.upstream = url.into();
        self
    }

    /// The API key sent when a request carries no credential of its own. Default none.
    pub fn credential(mut self, api_key: impl Into<String>) -> Self {
        self.credential = Some(api_key.into());
        self
    }

    /// The disk tier's directory. Default: the user cache directory's `fallthrough`.
    pub fn cache_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.config.cache_dir = Some(dir.into());
        self
    }

    /// Uses an already-open cache instead of opening one.
    pub fn cache(mut self, cache: Cache) -> Self {
        self.cache = Some(cache);
        self
    }

    /// No disk tier: entries live as long as the process. Default off.
    pub fn memory_only(mut self) -> Self {
        self.memory_only = true;
        self
    }

    /// Memory tier bound. Default 256 MiB.
    pub fn memory_bytes(mut self, bytes: u64) -> Self {
        self.config.cache.memory_bytes = bytesize::ByteSize(bytes);
        self
    }

    /// Disk tier bound. Default 10 GiB.
    pub fn disk_bytes(mut self, bytes: u64) -> Self {
        self.config.cache.disk_bytes = bytesize::ByteSize(bytes);
        self
    }

    /// Freshness and staleness periods. Default 24 h and 30 days.
    pub fn ttl(mut self, ttl: Duration, stale_for: Duration) -> Self {
        self.config.cache.ttl = ttl;
        self.config.cache.stale_for = stale_for;
        self
    }

    /// Retries per model and backoff. Default 4, 500 ms, 30 s.
    pub fn retries(mut self, max_retries: u32, base_delay: Duration, max_delay: Duration) -> Self {
        self.config.retry.max_retries = max_retries;
        self.config.retry.base_delay = base_delay;
        self.config.retry.max_delay = max_delay;
        self
    }

    /// Quick retries of a model before its fallback is asked, and their longest wait.
    /// Default 1 and 100 ms (see [`crate::config::RetryConfig`]).
    pub fn before_fallback(mut self, retries: u32, max_delay: Duration) -> Self {
        self.config.retry.retries_before_fallback = retries;
        self.config.retry.before_fallback_delay = max_delay;
        self
    }

    /// Longest `retry-after` waited out. Default 60 s.
    pub fn max_retry_after(mut self, max: Duration) -> Self {
        self.config.retry.max_retry_after = max;
        self
    }

    /// Overall time for one request. Default 120 s.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.config.retry.deadline = deadline;
        self
    }

    /// Consecutive failures that open a model's breaker, and its cooldown. Default 5, 30 s.
    pub fn breaker(mut self, failures: u32, cooldown: Duration) -> Self {
        self.config.breaker.failures = failures;
        self.config.breaker.cooldown = cooldown;
        self
    }

    /// How often a held model lets one request with nowhere else to go try it anyway (see
    /// [`crate::config::BreakerConfig::rescue_interval`]). Default 100 ms; zero: never.
    pub fn breaker_rescue_interval(mut self, interval: Duration) -> Self {
        self.config.breaker.rescue_interval = interval;
        self
    }

    /// Models tried in turn when `model` cannot answer. Default none.
    /// No fallback chains at all, not even the default ones ([`Config::default`]): every
    /// request is answered by its own model or not at all, unless [`Self::fallback`] adds a
    /// chain after this.
    pub fn without_fallbacks(mut self) -> Self {
        self.config.fallback.clear();
        self
    }

    pub fn fallback<S: Into<String>>(
        mut self,
        model: impl Into<String>,
        chain: impl IntoIterator<Item = S>,
    ) -> Self {
        let chain = chain.into_iter().map(Into::into).collect();
        self.config.fallback.insert(model.into(), chain);
        self
    }

    /// Upstream requests in flight at once. Default 64.
    pub fn max_concurrency(mut self, n: usize) -> Self {
        self.config.max_concurrency = n;
        self
    }

    /// The secret credential fingerprints are keyed with ([`KeySecret`]). Default:
    /// `FALLTHROUGH_KEY_SECRET`, else the cache directory's, else (a memory-only cache) a
    /// random one.
    pub fn key_secret(mut self, secret: KeySecret) -> Self {
        self.key_secret = Some(secret);
        self
    }

    /// Requests that may wait for an upstream slot; more are refused at once with 529.
    /// Default 1024.
    pub fn max_queued(mut self, n: usize) -> Self {
        self.config.server.max_queued = n;
        self
    }

    /// Shares the metrics registry of a server.
    pub fn metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Validates the settings and opens the cache.
    pub async fn build(self) -> Result<Client, Error> {
        let config = self.config;
        config.validate()?;
        let upstream = Upstream::new(&config.upstream)
            .map_err(|e| Error::Config(format!("upstream client: {e}")))?;
        let cache = match self.cache {
            Some(cache) => cache,
            None if self.memory_only => Cache::memory_only(config.cache.memory_bytes.as_u64()),
            None => open_or_memory_only(&config).await?,
        };
        let cache = match cache.shared() {
            Some(_) => cache,
            None => cache.with_shared(shared_tier(&config)?),
        };
        let key_secret = match (self.key_secret, cache.dir()) {
            (Some(secret), _) => secret,
            (None, Some(dir)) => KeySecret::for_dir(dir).unwrap_or_else(|e| {
                warn!(error = %e, "cannot keep the key secret in the cache directory; using one for this process only");
                fresh_secret()
            }),
            (None, None) => fresh_secret(),
        };
        let credential = self.credential.as_deref().and_then(upstream::sensitive);
        let credential_fingerprint = self
            .credential
            .as_deref()
            .filter(|_| credential.is_some())
            .map(|c| CredentialFingerprint::of(&key_secret, c));
        // With a shared tier, the breakers' turns go to the fleet (`fleet.rs`).
        let fleet = (cache.shared().cloned()).map(|s| (s, tokio::sync::mpsc::unbounded_channel()));
        let breakers = Breakers::new(config.breaker.failures, config.breaker.cooldown)
            .rescuing_every(config.breaker.rescue_interval);
        let breakers = match &fleet {
            Some((_, (turns, _))) => breakers.reporting_to(turns.clone()),
            None => breakers,
        };
        let engine = Arc::new(Engine {
            breakers,
            budget: RetryBudget::new(config.retry.budget_ratio, config.retry.budget_floor),
            permits: Arc::new(Semaphore::new(config.max_concurrency)),
            queued: Default::default(),
            refreshes: Arc::new(Semaphore::new(MAX_REFRESHES)),
            flights: Mutex::new(HashMap::new()),
            flight_ended: Notify::new(),
            clock: Clock::system(),
            metrics: self.metrics.unwrap_or_default(),
            credential,
            credential_fingerprint,
            key_secret,
            upstream,
            cache,
            config,
        });
        if let Some((shared, (_, heard))) = fleet {
            super::fleet::spawn(&engine, shared, heard);
        }
        Ok(Client { engine })
    }
}
