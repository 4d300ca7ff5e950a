//! fallthrough: a response cache with resilient fallthrough for LLM APIs.
//!
//! # Layout
//! - [`key`]: the cache key, blake3 over a canonical form of the request.
//! - [`entry`]: a stored answer, its freshness, and its versioned, checksummed encoding.
//! - [`cache`]: the two tiers (memory in moka, disk in sled) and promotion between them.
//! - [`sse`]: server-sent events: parsing, assembling a Message, replaying one.
//! - [`mock`]: the fault-injecting fake of the Messages API.
//! - [`error`]: the library's typed errors and the API's error shape.
pub mod cache;
pub mod entry;
pub mod error;
pub mod key;
pub mod mock;
pub mod outcome;
pub mod sse;
