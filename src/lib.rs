//! fallthrough: a response cache with resilient fallthrough for LLM APIs.
//!
//! # Layout
//! - [`key`]: the cache key, blake3 over a canonical form of the request; `key/canonical.rs`
//!   holds the form's rules once, for the value path and the one-pass byte path
//!   (`key/streaming.rs`); `key/secret.rs` the secret credential fingerprints are keyed with.
//! - [`entry`]: a stored answer, its freshness, and its versioned, checksummed encoding.
//! - [`cache`]: the tiers (memory in moka; disk in sled: `disk.rs`, its two generations,
//!   each a sled database in `disk/generation.rs`, opened in `disk/open.rs`; `shared.rs`, the
//!   tier several instances share on Redis/Valkey, with the fleet's leases and breaker holds)
//!   and promotion between them; `guard` runs every disk call
//!   on the blocking pool with a time limit and reopens a failed tier; `failures` counts and
//!   logs a tier's failures.
//! - [`admin`]: stats, get, purge, export and import over the disk or the shared tier.
//! - [`prewarm`]: filling the cache from a JSONL file of requests; [`batch`]: the same through
//!   the Message Batches API; [`jsonl`]: which lines of such a file are requests, and why the
//!   others are not.
//! - [`mock`]'s `batches`: the fake's Message Batches API.
//! - [`sse`]: server-sent events: `frame` (parsing and writing), `assemble` (a Message from its
//!   events), `replay` (a Message as events).
//! - [`mock`]: the fault-injecting fake of the Messages API: `state` (config, scripts, counts,
//!   fault schedule), `routes` (the HTTP face), `answer` (deterministic Messages).
//! - [`client`]: [`Client`], the engine every front end shares, one room per step:
//!   `client.rs` (public types), `builder`, `prepare` (headers, key), `flight` (one
//!   join-or-lead for plain and streamed misses), `chain` (primary, stale, fallbacks,
//!   exhausted), `attempt` (one model: permit, breaker, budget, retries), `form` (a whole
//!   body or a live stream), `store` (storing, stale answers and their refresh), `stream`
//!   (streamed calls and the relay), `tape` (a live stream recorded at the upstream's pace and
//!   read by each caller at its own), `pass` (uncached paths, through the same limits),
//!   `fleet` (breakers across the instances that share a tier).
//! - [`upstream`]: one HTTP attempt and its classification; retry policy, budget, breaker.
//! - `clock`: where the engine reads the time: the system's clocks, or a logical clock for a
//!   reproducible bench replay.
//! - [`bench`](mod@bench): replaying a workload through a [`Client`]; `report`: what it measured.
//! - [`server`]: the proxy, `fallthrough serve`: routes and drain in `mod.rs`, `conn`
//!   (connections and their limits: timeouts, caps), `access` (tokens, browser safety),
//!   `messages` (the cached paths), `pass` (everything else), `admin` (the cache's admin
//!   endpoints), `errors` (the API's error shape).
//! - [`config`]: `fallthrough.toml` and its defaults.
//! - [`metrics`]: Prometheus metrics; it renders the readings the engine gathers.
//! - [`outcome`]: how a request was answered (memory, disk, shared, miss, stale, bypass).
//! - [`error`]: the library's typed errors and the API's error shape.
//!
//! # Request path
//! [`Client::execute`] (plain) and [`Client::stream`] share it, in `client`: `prepare` keys the
//! request in one pass over its bytes ([`key`]); `look_up` asks the memory tier, then the disk
//! tier, then the shared tier ([`cache`]); a miss joins an identical request's flight or leads
//! one (`flight.rs`, `join_or_lead`), and a lead takes the fleet's lease on the key or waits for
//! the instance that holds it (`Cache::shared_flight`); the lead walks the chain (`chain.rs`, `run_chain`: the primary model with
//! its retries, then a stale entry, then the fallbacks), each model through `call_model`
//! (`attempt.rs`: concurrency permit, breaker, retry budget, backoff) and one HTTP attempt
//! ([`upstream`]); a complete answer is stored (`store.rs`) and handed to every joined request.
//! Other paths take [`Client::pass_through`]: the same permit, breaker and metrics, no cache.
//!
//! # Where what SPEC plans goes
//! - A second wire format (OpenAI Chat Completions): its request canonicalisation beside
//!   `key/canonical.rs` and its event format beside [`sse`], mapped onto the engine's
//!   [`Request`] by a route of its own in `server/`; the engine itself does not change.
//!
//! # Features
//! `cli` (on by default) builds the binary and turns on `proxy` ([`server`]), `mock` ([`mock`])
//! and `bench` ([`bench`](mod@bench)). With `default-features = false` the crate is the engine alone:
//! no axum, clap, indicatif or hdrhistogram.
pub mod admin;
pub mod batch;
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
