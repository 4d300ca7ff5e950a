//! Settings, as read from `fallthrough.toml`: every field documents its default, and
//! [`Config::validate`] refuses settings that cannot work, naming the one at fault.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;

use crate::error::Error;

/// The largest request body the Messages API accepts: the proxy's default limit, and the
/// fake's.
pub const API_MAX_BODY_BYTES: u64 = 32 * 1024 * 1024;

/// The whole configuration file. Every table and field is optional.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where misses go. Default `https://api.anthropic.com` (or `FALLTHROUGH_UPSTREAM`).
    pub upstream: String,
    /// The proxy's address. Default `127.0.0.1:8787`.
    pub listen: String,
    /// The disk tier's directory. Default: the user cache directory's `fallthrough`.
    pub cache_dir: Option<PathBuf>,
    /// Namespace for requests that send no `x-fallthrough-namespace`. Default empty.
    pub namespace: String,
    /// Let different credentials share entries. Default false: each API key has its own.
    pub shared_across_credentials: bool,
    /// Largest request body the proxy accepts. Default 32 MiB, as the API itself.
    #[serde(deserialize_with = "size")]
    pub max_body_bytes: ByteSize,
    /// Most upstream requests in flight at once; the rest queue. Default 64.
    pub max_concurrency: usize,
    pub cache: CacheConfig,
    pub retry: RetryConfig,
    pub breaker: BreakerConfig,
    /// Model -> models to try in turn when it cannot answer. Default: the chains of
    /// `default_fallbacks` (opus and sonnet to the cheaper models of their generation).
    pub fallback: HashMap<String, Vec<String>>,
    pub access: AccessConfig,
    pub server: ServerConfig,
    pub shared: SharedConfig,
}

/// `[shared]`: the tier that several instances share, on a Redis-protocol server (SPEC,
/// "Several instances: the shared tier"). No `url`, no shared tier.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SharedConfig {
    /// `redis://[user:password@]host:port/db`, or `rediss://` for TLS. Default none (or
    /// `FALLTHROUGH_SHARED_URL`). It may hold a password: never logged as it is.
    pub url: Option<String>,
    /// What every key the proxy writes starts with. Default `fallthrough:`.
    pub prefix: String,
    /// The longest a shared-tier operation may take before it counts as a miss of the tier.
    /// Default 100 ms.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// For `rediss://` with a private certificate authority: a PEM file of the certificates
    /// the server's must chain to. Default: the system's roots and the web's.
    pub ca_file: Option<PathBuf>,
}

impl Default for SharedConfig {
    fn default() -> Self {
        SharedConfig {
            url: None,
            prefix: "fallthrough:".into(),
            timeout: Duration::from_millis(100),
            ca_file: None,
        }
    }
}

impl SharedConfig {
    /// `ca_file`, a leading `~` meaning the home directory.
    pub fn ca_path(&self) -> Option<PathBuf> {
        self.ca_file.as_deref().map(expand_home)
    }

    fn validate(&self) -> Result<(), Error> {
        let Some(url) = &self.url else {
            return Ok(());
        };
        let scheme = url.split_once("://").map(|(scheme, _)| scheme);
        if !matches!(scheme, Some("redis" | "rediss")) {
            return Err(Error::Config(format!(
                "shared.url must start with redis:// or rediss://, for example redis://127.0.0.1:6379/0 (got {})",
                redacted(url)
            )));
        }
        if self.timeout.is_zero() {
            return Err(Error::Config(
                "shared.timeout must be more than zero".into(),
            ));
        }
        Ok(())
    }
}

/// The URL without its password, whatever else it holds.
impl std::fmt::Debug for SharedConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedConfig")
            .field("url", &self.url.as_deref().map(redacted))
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

/// `[access]`: who may use the proxy (SPEC, "Access").
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AccessConfig {
    /// Every caller must present a listed token. Default (`None`): false when listening on a
    /// loopback address, true otherwise.
    pub require_token: Option<bool>,
    /// Origins whose pages may call the proxy (`Origin` header, e.g. `http://localhost:3000`).
    /// Default none: a request with an `Origin` is refused.
    pub allowed_origins: Vec<String>,
    /// `Host` names accepted besides loopback names and the listen address. Default none.
    pub allowed_hosts: Vec<String>,
    pub tokens: Vec<TokenConfig>,
}

/// One `[[access.tokens]]` entry: a token is stored as its hash, so the file holds no secret.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Shown in logs and metrics, and the partition of the caller's entries.
    pub name: String,
    /// The hex SHA-256 of the token.
    pub sha256: String,
    /// May use the admin endpoints. Default false.
    #[serde(default)]
    pub admin: bool,
}

/// `[server]`: the proxy's limits on slow, stalled and too many callers (SPEC, "Limits").
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Time to send a request's headers, from the connection's first byte. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// Time to send a request's body once its headers are in. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
    /// A keep-alive connection with no request in it closes after this. Default 75 s.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A caller that takes no bytes of its answer for this long is disconnected. Default 60 s.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Connections open at once; more wait to be accepted. Default 4096.
    pub max_connections: usize,
    /// Misses waiting for an upstream slot; past it a miss is refused at once with 529.
    /// Default 1024.
    pub max_queued: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(75),
            write_timeout: Duration::from_secs(60),
            max_connections: 4096,
            max_queued: 1024,
        }
    }
}

/// `[cache]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Bound of the memory tier. Default 256 MiB.
    #[serde(deserialize_with = "size")]
    pub memory_bytes: ByteSize,
    /// Bound of the disk tier's directory (what `du` reports: at most this + 10% + 16 MiB; the
    /// entries themselves take a quarter to a half of it). Default 10 GiB.
    #[serde(deserialize_with = "size")]
    pub disk_bytes: ByteSize,
    /// How long an entry is fresh. Default 24 h.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// How long after that it may still stand in when the upstream fails. Default 30 days.
    #[serde(with = "humantime_serde")]
    pub stale_for: Duration,
}

/// `[retry]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Retries after the first attempt, per model. Default 4.
    pub max_retries: u32,
    /// Backoff before the first retry (full jitter below it). Default 500 ms.
    #[serde(with = "humantime_serde")]
    pub base_delay: Duration,
    /// Cap of the backoff. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    /// Longest `retry-after` waited out; a longer one ends the retries. Default 60 s.
    #[serde(with = "humantime_serde")]
    pub max_retry_after: Duration,
    /// Overall time for one request, retries and fallbacks included. Default 120 s.
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
    /// Share of first attempts that may be retried over a sliding 10 s window. Default 0.2.
    pub budget_ratio: f64,
    /// Retries allowed per window whatever the ratio, so a quiet client can still retry.
    /// Default 10.
    pub budget_floor: u32,
    /// Retries of a model that has a fallback after it, before the fallback is asked.
    /// Default 1. The last model of a chain (or a model without one) gets `max_retries`.
    pub retries_before_fallback: u32,
    /// Longest wait before each of those retries (full jitter below it; a longer
    /// `retry-after` sends the request on to the fallback instead). Default 100 ms: a fallback
    /// is ready, so a long backoff buys nothing but latency, and load on the model that is
    /// already overloaded.
    #[serde(with = "humantime_serde")]
    pub before_fallback_delay: Duration,
}

/// `[breaker]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// Consecutive failures (529, 5xx, timeouts) that open a model's breaker. Default 5.
    pub failures: u32,
    /// How long it stays open before one probe may pass. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub cooldown: Duration,
    /// While a model is held, one request with nowhere else to go (no stale entry, every model
    /// of its chain held) may try it this often: a recovery is noticed within it, not after the
    /// cooldown (see `upstream/breaker.rs`). Default 100 ms; `"0s"`: never.
    #[serde(with = "humantime_serde")]
    pub rescue_interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            upstream: "https://api.anthropic.com".into(),
            listen: "127.0.0.1:8787".into(),
            cache_dir: None,
            namespace: String::new(),
            shared_across_credentials: false,
            max_body_bytes: ByteSize::b(API_MAX_BODY_BYTES),
            max_concurrency: 64,
            cache: CacheConfig::default(),
            retry: RetryConfig::default(),
            breaker: BreakerConfig::default(),
            fallback: default_fallbacks(),
            access: AccessConfig::default(),
            server: ServerConfig::default(),
            shared: SharedConfig::default(),
        }
    }
}

/// The chains a user gets with no configuration file (README, "Configuration"): each model to
/// the cheaper ones of its generation. A `[fallback]` table in the file replaces them whole;
/// an empty one turns fallback off.
fn default_fallbacks() -> HashMap<String, Vec<String>> {
    let chains: [(&str, &[&str]); 4] = [
        (
            "claude-opus-4-6",
            &["claude-sonnet-4-6", "claude-haiku-4-5"],
        ),
        ("claude-sonnet-4-6", &["claude-haiku-4-5"]),
        (
            "claude-opus-4-1",
            &["claude-sonnet-4-5", "claude-haiku-4-5"],
        ),
        ("claude-sonnet-4-5", &["claude-haiku-4-5"]),
    ];
    chains
        .into_iter()
        .map(|(model, chain)| {
            (
                model.to_owned(),
                chain.iter().map(|m| (*m).to_owned()).collect(),
            )
        })
        .collect()
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            memory_bytes: ByteSize::mib(256),
            disk_bytes: ByteSize::gib(10),
            ttl: Duration::from_secs(24 * 3600),
            stale_for: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_retries: 4,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(60),
            deadline: Duration::from_secs(120),
            budget_ratio: 0.2,
            budget_floor: 10,
            retries_before_fallback: 1,
            before_fallback_delay: Duration::from_millis(100),
        }
    }
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failures: 5,
            cooldown: Duration::from_secs(30),
            rescue_interval: Duration::from_millis(100),
        }
    }
}

impl Config {
    /// Reads a TOML file.
    pub fn from_file(path: &Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
        Self::from_toml(&text).map_err(|e| match e {
            Error::Config(m) => Error::Config(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// Parses TOML text and validates it.
    pub fn from_toml(text: &str) -> Result<Config, Error> {
        let config: Config = toml::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Refuses settings that cannot work.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |m: &str| Err(Error::Config(m.to_owned()));
        check_upstream(&self.upstream).map_err(Error::Config)?;
        if self.max_concurrency == 0 {
            return bad("max_concurrency must be at least 1");
        }
        let r = &self.retry;
        if r.max_delay < r.base_delay {
            return bad("retry.max_delay must not be less than retry.base_delay");
        }
        if r.deadline.is_zero() {
            return bad("retry.deadline must be more than zero");
        }
        if !(0.0..=10.0).contains(&r.budget_ratio) {
            return bad("retry.budget_ratio must be between 0 and 10");
        }
        if self.breaker.failures == 0 {
            return bad("breaker.failures must be at least 1");
        }
        if self.cache.ttl.is_zero() {
            return bad("cache.ttl must be more than zero");
        }
        let s = &self.server;
        if s.max_connections == 0 {
            return bad("server.max_connections must be at least 1");
        }
        for (name, timeout) in [
            ("header_timeout", s.header_timeout),
            ("body_timeout", s.body_timeout),
            ("idle_timeout", s.idle_timeout),
            ("write_timeout", s.write_timeout),
        ] {
            if timeout.is_zero() {
                return Err(Error::Config(format!(
                    "server.{name} must be more than zero"
                )));
            }
        }
        self.access.validate()?;
        self.shared.validate()?;
        for (model, chain) in &self.fallback {
            if chain.iter().any(|m| m == model) {
                return Err(Error::Config(format!(
                    "fallback for {model} names {model} itself"
                )));
            }
        }
        Ok(())
    }

    /// The cache directory to use: the configured one (a leading `~` meaning the home
    /// directory, as in a shell), else the platform's user cache directory.
    pub fn cache_dir(&self) -> PathBuf {
        match &self.cache_dir {
            Some(dir) => expand_home(dir),
            None => default_cache_dir(),
        }
    }
}

impl AccessConfig {
    fn validate(&self) -> Result<(), Error> {
        let mut names = std::collections::HashSet::new();
        for token in &self.tokens {
            if token.name.is_empty() {
                return Err(Error::Config("access.tokens: a token needs a name".into()));
            }
            if !names.insert(&token.name) {
                return Err(Error::Config(format!(
                    "access.tokens: the name {:?} is used twice",
                    token.name
                )));
            }
            if token.digest().is_none() {
                return Err(Error::Config(format!(
                    "access.tokens: sha256 of {:?} is not 64 hex characters (make one with \
                     `fallthrough token {}`)",
                    token.name, token.name
                )));
            }
        }
        Ok(())
    }
}

impl TokenConfig {
    /// The token's SHA-256, when `sha256` is 64 hex characters.
    pub fn digest(&self) -> Option<[u8; 32]> {
        crate::key::hex32(self.sha256.trim())
    }
}

/// `~` and `~/rest` as the home directory and a path in it. A config file is not read by a
/// shell, so without this `cache_dir = "~/x"` would make a folder named `~` where it runs.
fn expand_home(path: &Path) -> PathBuf {
    let Ok(rest) = path.strip_prefix("~") else {
        return path.to_owned();
    };
    match dirs::home_dir() {
        Some(home) => home.join(rest),
        None => path.to_owned(),
    }
}

/// Why `upstream` cannot be used, echoing it; the userinfo of a URL is never echoed.
fn check_upstream(upstream: &str) -> Result<(), String> {
    const EXAMPLE: &str = "e.g. https://api.anthropic.com or http://127.0.0.1:8788";
    let url = match reqwest::Url::parse(upstream) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => url,
        _ => {
            return Err(format!(
                "upstream {:?} is not an http:// or https:// URL with a host ({EXAMPLE})",
                redacted(upstream)
            ));
        }
    };
    if url.path().trim_end_matches('/').ends_with("/v1") {
        return Err(format!(
            "upstream {:?} must not end in /v1: paths such as /v1/messages are appended \
             (use {})",
            redacted(upstream),
            redacted(upstream)
                .trim_end_matches('/')
                .trim_end_matches("/v1")
        ));
    }
    Ok(())
}

/// An upstream URL as messages and logs may show it: without a user name or password. One
/// that does not parse is shown as it is, unless it might hold credentials (an `@`).
pub fn redacted(upstream: &str) -> String {
    if !upstream.contains('@') {
        return upstream.to_owned(); // as the user wrote it
    }
    match reqwest::Url::parse(upstream) {
        Ok(mut url) => {
            let _ = url.set_username("");
            let _ = url.set_password(None);
            url.to_string()
        }
        Err(_) => "(with credentials, not shown)".to_owned(),
    }
}

/// A size setting: a number of bytes, or a string such as `"256MiB"` or `"1GB"`. Replaces
/// bytesize's own error ("expected parsable string") with one that says what is accepted.
fn size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<ByteSize, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Bytes(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Bytes(n) => Ok(ByteSize::b(n)),
        Raw::Text(text) => text.parse::<ByteSize>().map_err(|_| {
            serde::de::Error::custom(format!(
                "{text:?} is not a size: use a number of bytes or a size such as \"256MiB\", \
                 \"512MB\" or \"10GiB\""
            ))
        }),
    }
}

/// `~/.cache/fallthrough` on Linux, the platform's equivalent elsewhere.
pub fn default_cache_dir() -> PathBuf {
    dirs::cache_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("fallthrough")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_example_parses() {
        let config = Config::from_toml(
            r#"
upstream = "https://api.anthropic.com"
listen = "127.0.0.1:8787"

[cache]
memory_bytes = "256MiB"
disk_bytes = "10GiB"
ttl = "24h"
stale_for = "30d"

[retry]
max_retries = 4
base_delay = "500ms"
max_delay = "30s"
max_retry_after = "60s"
deadline = "120s"

[breaker]
failures = 5
cooldown = "30s"

[fallback]
"claude-opus-4-6" = ["claude-sonnet-4-6", "claude-haiku-4-5"]
"claude-sonnet-4-6" = ["claude-haiku-4-5"]

[access]
require_token = false
allowed_origins = []
allowed_hosts = []
[[access.tokens]]
name = "team-a"
sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
admin = false

[server]
header_timeout = "10s"
body_timeout = "30s"
idle_timeout = "75s"
write_timeout = "60s"
max_connections = 4096
max_queued = 1024
"#,
        )
        .unwrap();
        assert_eq!(config.access.tokens[0].name, "team-a");
        assert!(config.access.tokens[0].digest().is_some());
        assert_eq!(config.server.write_timeout, Duration::from_secs(60));
        assert_eq!(config.cache.memory_bytes, ByteSize::mib(256));
        assert_eq!(config.cache.stale_for, Duration::from_secs(30 * 86400));
        assert_eq!(config.retry.base_delay, Duration::from_millis(500));
        assert_eq!(config.fallback["claude-opus-4-6"].len(), 2);
    }

    #[test]
    fn empty_file_gives_the_defaults() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.cache.ttl, Duration::from_secs(86400));
        assert_eq!(c.retry.max_retries, 4);
        assert_eq!(c.breaker.failures, 5);
        assert_eq!(c.max_concurrency, 64);
        assert_eq!(c.listen, "127.0.0.1:8787");
    }

    #[test]
    fn bad_settings_are_named() {
        for (text, needle) in [
            (
                "[retry]\nbase_delay = \"5s\"\nmax_delay = \"1s\"",
                "max_delay",
            ),
            ("upstream = \"ftp://x\"", "upstream"),
            ("upstream = \"https://api.anthropic.com/v1\"", "/v1"),
            ("[breaker]\nfailures = 0", "breaker.failures"),
            ("[cache]\nttll = \"1h\"", "ttll"),
            ("[fallback]\na = [\"a\"]", "itself"),
            (
                "[[access.tokens]]\nname = \"a\"\nsha256 = \"nothex\"",
                "fallthrough token a",
            ),
            ("[server]\nwrite_timeout = \"0s\"", "server.write_timeout"),
        ] {
            let err = Config::from_toml(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }
}
