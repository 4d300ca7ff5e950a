//! fallthrough: a response cache with resilient fallthrough for LLM APIs.
//!
//! # Layout
//! - [`key`]: the cache key, blake3 over a canonical form of the request.
//! - [`entry`]: a stored answer, its freshness, and its versioned, checksummed encoding.
//! - [`cache`]: the two tiers (memory in moka, disk in sled) and promotion between them.
//! - [`admin`]: stats, get, purge, export and import over the disk tier.
//! - [`prewarm`]: filling the cache from a JSONL file of requests; [`jsonl`]: which lines of
//!   such a file are requests, and why the others are not.
//! - [`sse`]: server-sent events: `frame` (parsing and writing), `assemble` (a Message from its
//!   events), `replay` (a Message as events).
//! - [`mock`]: the fault-injecting fake of the Messages API: `state` (config, scripts, counts,
//!   fault schedule), `routes` (the HTTP face), `answer` (deterministic Messages).
//! - [`client`]: [`Client`], the engine every front end shares: lookup, single flight, retries,
//!   breaker, fallback chain, stale answers.
//! - [`upstream`]: one HTTP attempt and its classification; retry policy, budget, breaker.
//! - `clock`: where the engine reads the time: the system's clocks, or a logical clock for a
//!   reproducible bench replay.
//! - [`bench`](mod@bench): replaying a workload through a [`Client`] and reporting hits, savings, latency.
//! - [`server`]: the proxy, `fallthrough serve`: HTTP in front of a [`Client`].
//! - [`config`]: `fallthrough.toml` and its defaults.
//! - [`metrics`]: Prometheus metrics.
//! - [`outcome`]: how a request was answered (memory, disk, miss, stale, bypass).
//! - [`error`]: the library's typed errors and the API's error shape.
//!
//! # Request path
//! [`Client::execute`] (plain) and [`Client::stream`] share it, in `client`: `prepare` keys the
//! request in one pass over its bytes ([`key`]); `look_up` asks the memory tier, then the disk
//! tier ([`cache`]); a miss joins an identical request's flight or leads one
//! (`join_or_start_flight`); the lead walks the chain (`fly`: the primary model with its retries,
//! then a stale entry, then the fallbacks), each model through `call_model` (breaker, retry
//! budget, concurrency permit, backoff) and one HTTP attempt ([`upstream`]); a complete answer is
//! stored (`store`) and handed to every joined request.
//!
//! # Features
//! `cli` (on by default) builds the binary and turns on `proxy` ([`server`]), `mock` ([`mock`])
//! and `bench` ([`bench`](mod@bench)). With `default-features = false` the crate is the engine alone:
//! no axum, clap, indicatif or hdrhistogram.
pub mod admin;
#[cfg(feature = "bench")]
pub mod bench;
pub mod cache;
pub mod client;
mod clock;
pub mod config;
pub mod entry;
pub mod error;
pub mod jsonl;
pub mod key;
pub mod metrics;
#[cfg(feature = "mock")]
pub mod mock;
pub mod outcome;
pub mod prewarm;
#[cfg(feature = "proxy")]
pub mod server;
pub mod sse;
pub mod upstream;

pub use client::{Client, ClientBuilder, Controls, Request, Response};
pub use config::Config;
pub use error::{Error, UpstreamError, UpstreamErrorKind};
pub use key::CacheKey;
pub use outcome::Outcome;
