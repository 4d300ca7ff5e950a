//! The shared tier: entries on a Redis-protocol server (Redis 6+ or Valkey) that several
//! instances share, and a lease per key so that identical misses on different instances make
//! one upstream call. This file is the only one that speaks to the server.
//!
//! # Never in the way
//! The server is another machine's process: it may be down, slow or full. Every operation is
//! given `timeout` (100 ms by default); one that fails or takes longer is a miss of the tier
//! (or a store that did not happen), counted (`fallthrough_shared_errors_total`) and logged at
//! most once a minute. After a failure to reach the server the tier is *resting*: requests skip
//! it at once, as if there were none, while a background task pings the server every
//! [`PING_EVERY`] and ends the rest when it answers. (A server that answers with a refusal, a
//! full one's `OOM command not allowed`, is not rested from: its writes fail and are counted,
//! its reads go on.) So an outage of the server costs one request at most `timeout`, not
//! every request, and sharing resumes by itself. The connection itself is redis-rs's
//! connection manager, made lazily (a server down at start-up does not stop the start) and
//! reconnecting when its connection drops. Making a connection may take [`CONNECT_WAIT`], not
//! just `timeout`: it is made in the background, by the resting tier's ping.
//!
//! # What is stored
//! An entry is the same versioned, checksummed bytes as on disk ([`Entry::encode`]), under
//! `{prefix}e:{key}`, expiring at its stale deadline. Bytes that do not decode (a bad
//! checksum, a value some other program wrote) are a miss and are deleted, so the next answer
//! replaces them. Entries hold no credential: keys are hashes, bodies are the API's answers.
//!
//! # Single flight across instances: a lease, then polling
//! The first instance to miss takes `{prefix}l:{key}` (`SET NX PX`, expiring after the
//! request's deadline, so a lead that dies frees it). Another instance that misses the same
//! key finds the lease and waits: every [`POLL_EVERY`] it reads the entry and the lease in one
//! `MGET`, and takes the entry when it lands, or leads itself when the lease is gone without
//! one (the lead failed). Polling rather than pub/sub: a subscription needs a connection of
//! its own per instance and a channel per key, and a missed message would leave a waiter
//! waiting out the lease; polling costs a waiter one small round trip per 20 ms, only while an
//! identical request is in flight elsewhere, and cannot miss the answer.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{AsyncCommands, FromRedisValue};
use tokio::time::Instant;
use tracing::info;

use super::failures::Failures;
use crate::config::{redacted, SharedConfig};
use crate::entry::{Entry, UnixMillis};
use crate::error::SharedError;
use crate::key::CacheKey;

/// The longest one step of an admin command (`cache … --shared`) may take: it walks the
/// server in batches, and a batch of a thousand values is more than a request's look-up.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Keys an admin walk reads per round trip.
const ADMIN_BATCH: usize = 500;

/// The longest a connection to the server may take to set up: TCP, TLS, the setup commands.
/// More than an operation's `timeout`, which bounds what a request waits: a server a few tens
/// of milliseconds away answers each operation well within 100 ms but needs two to four round
/// trips to connect, and a connection given only `timeout` would never be made. Requests do not
/// wait for it: they skip the resting tier while the background ping drives the connection.
pub const CONNECT_WAIT: Duration = Duration::from_secs(5);
/// How often a resting tier pings its server.
pub const PING_EVERY: Duration = Duration::from_millis(500);
/// How often a request waiting for another instance's answer looks for it.
pub const POLL_EVERY: Duration = Duration::from_millis(20);

/// Deletes a lease only if it is still the one its holder took.
const RELEASE: &str =
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0";

/// The shared tier (see the module's doc). Cheap to share behind an `Arc`.
pub struct SharedTier {
    connection: ConnectionManager,
    prefix: String,
    timeout: Duration,
    /// Set after a failure until the server answers a ping again.
    resting: AtomicBool,
    failures: Failures,
}

/// What a waiting instance saw of another's flight.
pub enum Watch {
    /// The entry under the key (one that decodes), if any, and whether the lease is held.
    Seen { entry: Option<Entry>, leased: bool },
    /// The tier did not answer.
    Unavailable,
}

/// What taking a lease gave.
pub enum Leasing {
    /// Ours: lead the flight; dropping the lease frees it.
    Taken(Lease),
    /// Another instance holds it.
    Held,
    /// The tier did not answer: go on alone.
    Unavailable,
}

impl SharedTier {
    /// The tier the configuration describes, or `None` without a `url`. Does not connect:
    /// the connection is made by the first operation, and a server that is down then is only
    /// a miss.
    pub fn from_config(config: &SharedConfig) -> Result<Option<Arc<Self>>, SharedError> {
        let Some(url) = &config.url else {
            return Ok(None);
        };
        let bad = |e: redis::RedisError| SharedError::Url {
            url: redacted(url),
            reason: e.to_string(),
        };
        let client = match &config.ca_path() {
            None => redis::Client::open(url.as_str()).map_err(bad)?,
            Some(path) => {
                let root_cert = std::fs::read(path).map_err(|e| SharedError::CaFile {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })?;
                let certificates = redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root_cert),
                };
                redis::Client::build_with_tls(url.as_str(), certificates).map_err(bad)?
            }
        };
        let settings = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_WAIT.max(config.timeout)))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(1)
            .set_max_delay(PING_EVERY);
        let connection = ConnectionManager::new_lazy_with_config(client, settings).map_err(bad)?;
        info!(url = %redacted(url), prefix = %config.prefix, "shared tier");
        Ok(Some(Arc::new(SharedTier {
            connection,
            prefix: config.prefix.clone(),
            timeout: config.timeout,
            resting: AtomicBool::new(false),
            failures: Failures::new(
                "the shared tier failed; answering without it until it is back",
            ),
        })))
    }

    /// The entry under `key`, if the tier holds one that decodes. One that does not is
    /// deleted: it is never served, and the next answer replaces it.
    pub async fn get(self: &Arc<Self>, key: &CacheKey) -> Option<Entry> {
        let name = self.entry_name(key);
        let bytes: Option<Vec<u8>> = self.run("read", redis::cmd("GET").arg(&name)).await?;
        self.decoded(key, bytes?).await
    }

    /// Stores `entry` under `key`, expiring at its stale deadline (nothing when that has
    /// passed).
    pub async fn put(self: &Arc<Self>, key: &CacheKey, entry: &Entry, now: UnixMillis) {
        let ttl = entry.stale_until.saturating_sub(now);
        if ttl == 0 {
            return;
        }
        let mut set = redis::cmd("SET");
        set.arg(self.entry_name(key))
            .arg(entry.encode())
            .arg("PX")
            .arg(ttl);
        let _: Option<()> = self.run("write", &set).await;
    }

    /// Removes the entry under `key`.
    pub async fn remove(self: &Arc<Self>, key: &CacheKey) {
        let _: Option<u64> = self
            .run("remove", redis::cmd("DEL").arg(self.entry_name(key)))
            .await;
    }

    /// Takes the flight's lease on `key` for `ttl`.
    pub async fn lease(self: &Arc<Self>, key: &CacheKey, ttl: Duration) -> Leasing {
        let name = self.lease_name(key);
        let token = format!("{:032x}", rand::random::<u128>());
        let mut set = redis::cmd("SET");
        set.arg(&name)
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis().max(1) as u64);
        match self.run::<Option<String>>("lease", &set).await {
            Some(Some(_ok)) => Leasing::Taken(Lease {
                tier: self.clone(),
                name,
                token,
            }),
            Some(None) => Leasing::Held,
            None => Leasing::Unavailable,
        }
    }

    /// The entry and the lease under `key`, in one round trip.
    pub async fn watch(self: &Arc<Self>, key: &CacheKey) -> Watch {
        let mut mget = redis::cmd("MGET");
        mget.arg(self.entry_name(key)).arg(self.lease_name(key));
        let Some((entry, lease)) = self
            .run::<(Option<Vec<u8>>, Option<Vec<u8>>)>("watch", &mget)
            .await
        else {
            return Watch::Unavailable;
        };
        let entry = match entry {
            Some(bytes) => self.decoded(key, bytes).await,
            None => None,
        };
        Watch::Seen {
            entry,
            leased: lease.is_some(),
        }
    }

    /// Tells the fleet that `model` is held for `cooldown`, for `cause` (a name).
    pub async fn open_breaker(self: &Arc<Self>, model: &str, cause: &str, cooldown: Duration) {
        let mut set = redis::cmd("SET");
        set.arg(self.breaker_name(model))
            .arg(cause)
            .arg("PX")
            .arg(cooldown.as_millis().max(1) as u64);
        let _: Option<()> = self.run("breaker", &set).await;
    }

    /// Tells the fleet that `model` answers again.
    pub async fn close_breaker(self: &Arc<Self>, model: &str) {
        let _: Option<u64> = self
            .run("breaker", redis::cmd("DEL").arg(self.breaker_name(model)))
            .await;
    }

    /// The fleet's held models: name, cause (a name) and the time the hold has left.
    /// `None` when the tier does not answer (or rests). Read by a background task, never on
    /// a request's path.
    pub async fn breakers(self: &Arc<Self>) -> Option<Vec<(String, String, Duration)>> {
        if self.is_resting() {
            return None;
        }
        let prefix = self.breaker_name("");
        let names = match self.names(&prefix).await {
            Ok(names) => names,
            Err(e) => return self.fail("breakers", &e),
        };
        if names.is_empty() {
            return Some(Vec::new());
        }
        let mut pipe = redis::pipe();
        for name in &names {
            pipe.cmd("GET").arg(name).cmd("PTTL").arg(name);
        }
        let mut replies = Vec::new();
        if !self.is_resting() {
            let mut connection = self.connection.clone();
            let query = pipe.query_async::<Vec<redis::Value>>(&mut connection);
            match tokio::time::timeout(self.timeout, query).await {
                Ok(Ok(values)) => replies = values,
                Ok(Err(e)) => return self.fail("breakers", &e),
                Err(_) => return self.fail("breakers", &"no answer in time"),
            }
        }
        let held = names
            .iter()
            .zip(replies.chunks(2))
            .filter_map(|(name, pair)| {
                let cause = String::from_redis_value(pair.first()?.clone()).ok()?;
                let left = i64::from_redis_value(pair.get(1)?.clone()).ok()?;
                let model = name.strip_prefix(&prefix)?.to_owned();
                (left > 0).then(|| (model, cause, Duration::from_millis(left as u64)))
            });
        Some(held.collect())
    }

    /// Every entry, in batches: `visit` gets each one's key, stored size and decoded entry
    /// (an `Err` for bytes that do not decode). For `cache … --shared`: its failures are
    /// errors, not misses.
    pub async fn visit(
        self: &Arc<Self>,
        mut visit: impl FnMut(CacheKey, usize, Result<Entry, crate::entry::DecodeError>),
    ) -> Result<(), SharedError> {
        let names = self.names(&self.entry_name_prefix()).await?;
        for batch in names.chunks(ADMIN_BATCH) {
            let mut mget = redis::cmd("MGET");
            for name in batch {
                mget.arg(name);
            }
            let values: Vec<Option<Vec<u8>>> = self.admin(&mget).await?;
            for (name, value) in batch.iter().zip(values) {
                let key = name.strip_prefix(&self.entry_name_prefix());
                let (Some(key), Some(bytes)) = (key.and_then(|k| k.parse().ok()), value) else {
                    continue; // expired meanwhile, or not a name this tier writes
                };
                visit(key, bytes.len(), Entry::decode(&bytes));
            }
        }
        Ok(())
    }

    /// The entry under `key` as the admin commands see it: `Err` inside for bytes that do not
    /// decode.
    pub async fn lookup(
        self: &Arc<Self>,
        key: &CacheKey,
    ) -> Result<Option<Result<Entry, crate::entry::DecodeError>>, SharedError> {
        let bytes: Option<Vec<u8>> = self
            .admin(redis::cmd("GET").arg(self.entry_name(key)))
            .await?;
        Ok(bytes.map(|b| Entry::decode(&b)))
    }

    /// Stores an entry for `cache import --shared`.
    pub async fn store(
        self: &Arc<Self>,
        key: &CacheKey,
        entry: &Entry,
        now: UnixMillis,
    ) -> Result<(), SharedError> {
        let ttl = entry.stale_until.saturating_sub(now).max(1);
        let mut set = redis::cmd("SET");
        set.arg(self.entry_name(key))
            .arg(entry.encode())
            .arg("PX")
            .arg(ttl);
        self.admin(&set).await
    }

    /// Deletes these entries; returns how many there were.
    pub async fn delete(self: &Arc<Self>, keys: &[CacheKey]) -> Result<u64, SharedError> {
        let mut removed = 0;
        for batch in keys.chunks(ADMIN_BATCH) {
            let mut del = redis::cmd("DEL");
            for key in batch {
                del.arg(self.entry_name(key));
            }
            removed += self.admin::<u64>(&del).await?;
        }
        Ok(removed)
    }

    /// Deletes everything under the prefix (entries, leases, breakers); returns how many
    /// entries went. Other programs' keys on the server are left alone.
    pub async fn clear(self: &Arc<Self>) -> Result<u64, SharedError> {
        let names = self.names(&self.prefix).await?;
        let entries = (names.iter())
            .filter(|n| n.starts_with(&self.entry_name_prefix()))
            .count();
        for batch in names.chunks(ADMIN_BATCH) {
            let mut del = redis::cmd("DEL");
            for name in batch {
                del.arg(name);
            }
            let _: u64 = self.admin(&del).await?;
        }
        Ok(entries as u64)
    }

    /// The names on the server that start with `prefix`, walked with `SCAN` (which, unlike
    /// `KEYS`, does not hold the server up on a large database).
    async fn names(self: &Arc<Self>, prefix: &str) -> Result<Vec<String>, SharedError> {
        let mut names = Vec::new();
        let mut cursor = 0u64;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(format!("{}*", glob_escaped(prefix)))
                .arg("COUNT")
                .arg(ADMIN_BATCH);
            let (next, batch): (u64, Vec<String>) = self.admin(&scan).await?;
            names.extend(batch);
            cursor = next;
            if cursor == 0 {
                return Ok(names);
            }
        }
    }

    /// Runs an admin command within [`ADMIN_TIMEOUT`].
    async fn admin<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, SharedError> {
        let mut connection = self.connection.clone();
        match tokio::time::timeout(ADMIN_TIMEOUT, cmd.query_async(&mut connection)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(SharedError::Server(e.to_string())),
            Err(_) => Err(SharedError::Server(format!(
                "no answer within {ADMIN_TIMEOUT:?}"
            ))),
        }
    }

    /// Operations that failed or timed out, since the start (those skipped while the tier
    /// rests are not counted: they cost nothing).
    pub fn failures(&self) -> u64 {
        self.failures.count()
    }

    /// Whether the tier is skipped for now (after a failure, until the server answers).
    pub fn is_resting(&self) -> bool {
        self.resting.load(Ordering::Relaxed)
    }

    /// `bytes` as an entry, or `None` (and the value deleted) when they do not decode.
    async fn decoded(self: &Arc<Self>, key: &CacheKey, bytes: Vec<u8>) -> Option<Entry> {
        match Entry::decode(&bytes) {
            Ok(entry) => Some(entry),
            Err(e) => {
                self.failures.record("decode", &e);
                self.remove(key).await;
                None
            }
        }
    }

    /// Runs `cmd` within the timeout; `None` when it failed, took too long, or the tier rests.
    async fn run<T: FromRedisValue>(self: &Arc<Self>, what: &str, cmd: &redis::Cmd) -> Option<T> {
        if self.is_resting() {
            return None;
        }
        let mut connection = self.connection.clone();
        let why = match tokio::time::timeout(self.timeout, cmd.query_async(&mut connection)).await {
            Ok(Ok(value)) => return Some(value),
            // The server answered, with a refusal (full: `OOM command not allowed`, or
            // read-only): this operation failed, the server is there; nothing to rest from.
            Ok(Err(e)) if refused_by_the_server(&e) => {
                self.failures.record(what, &e);
                return None;
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {:?}", self.timeout),
        };
        self.fail(what, &why)
    }

    /// Counts and logs a failure, and rests the tier.
    fn fail<T>(self: &Arc<Self>, what: &str, why: &dyn std::fmt::Display) -> Option<T> {
        self.failures.record(what, why);
        self.rest();
        None
    }

    /// Skips the tier until a ping is answered, pinging in the background. A ping waits up to
    /// [`CONNECT_WAIT`], not `timeout`: no request waits for it, and the first ping after the
    /// connection dropped is the one that makes the new connection.
    fn rest(self: &Arc<Self>) {
        if self.resting.swap(true, Ordering::Relaxed) {
            return; // a pinger runs already
        }
        let tier = self.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            loop {
                tokio::time::sleep(PING_EVERY).await;
                let mut connection = tier.connection.clone();
                let ping = connection.ping::<String>();
                let wait = CONNECT_WAIT.max(tier.timeout);
                if let Ok(Ok(_)) = tokio::time::timeout(wait, ping).await {
                    tier.resting.store(false, Ordering::Relaxed);
                    info!(after = ?started.elapsed(), "the shared tier answers again");
                    return;
                }
            }
        });
    }

    fn entry_name(&self, key: &CacheKey) -> String {
        format!("{}e:{key}", self.prefix)
    }

    fn entry_name_prefix(&self) -> String {
        format!("{}e:", self.prefix)
    }

    fn lease_name(&self, key: &CacheKey) -> String {
        format!("{}l:{key}", self.prefix)
    }

    fn breaker_name(&self, model: &str) -> String {
        format!("{}b:{model}", self.prefix)
    }
}

/// Whether the server itself refused the command (an error reply), as opposed to a lost
/// connection, a timeout or an unreadable answer.
fn refused_by_the_server(e: &redis::RedisError) -> bool {
    let reply = matches!(
        e.kind(),
        redis::ErrorKind::Server(_) | redis::ErrorKind::Extension
    );
    reply && !e.is_io_error() && !e.is_timeout()
}

/// `text` with the glob characters of `SCAN MATCH` escaped, so a prefix matches as written.
fn glob_escaped(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A flight's lease on a key; dropping it frees the key for other instances at once (a lease
/// whose holder died expires by itself).
pub struct Lease {
    tier: Arc<SharedTier>,
    name: String,
    token: String,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let tier = self.tier.clone();
        let mut release = redis::cmd("EVAL");
        release
            .arg(RELEASE)
            .arg(1)
            .arg(std::mem::take(&mut self.name))
            .arg(std::mem::take(&mut self.token));
        runtime.spawn(async move {
            let _: Option<u64> = tier.run("release", &release).await;
        });
    }
}
