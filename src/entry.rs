//! A stored answer: its body, the model that produced it, its freshness, and the versioned,
//! checksummed byte format it has on disk.
//!
//! Freshness is a pure function of `now` (milliseconds since the Unix epoch), so tests pass the
//! time in. Wall-clock time is used, not a monotonic clock, because entries outlive the process.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

/// Milliseconds since the Unix epoch.
pub type UnixMillis = u64;

/// The current wall-clock time in [`UnixMillis`].
pub fn now_millis() -> UnixMillis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The first byte of every encoded entry, so stray bytes are not mistaken for one.
const MAGIC: u8 = 0xF7;
/// The on-disk format version. A new layout gets a new number; old ones decode or are misses.
const FORMAT_V1: u8 = 1;
const CHECKSUM_LEN: usize = 16;
/// magic, version, checksum, three timestamps, model length.
const HEADER_LEN: usize = 2 + CHECKSUM_LEN + 3 * 8 + 2;

/// How usable an entry is at a given time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Served as a hit.
    Fresh,
    /// Served only when the upstream cannot answer.
    Stale,
    /// Never served; removed when seen.
    Expired,
}

/// A complete, successful answer of the upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The Message JSON in its plain (non-streamed) form, exactly as stored.
    pub body: Bytes,
    /// The model that produced the body (a fallback's answer names the fallback).
    pub model: String,
    pub stored_at: UnixMillis,
    /// Until then the entry is fresh.
    pub fresh_until: UnixMillis,
    /// Until then the entry is stale; after it, gone.
    pub stale_until: UnixMillis,
}

/// Why bytes are not an entry. Every variant means: a miss, remove it, log it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    #[error("entry is truncated ({0} bytes)")]
    Truncated(usize),
    #[error("entry has an unknown format (magic {magic:#x}, version {version})")]
    UnknownFormat { magic: u8, version: u8 },
    #[error("entry fails its checksum")]
    Checksum,
    #[error("entry's model name is not UTF-8")]
    Model,
}

impl Entry {
    /// An entry stored at `now`, fresh for `ttl`, then stale for `stale_for`.
    pub fn new(
        body: Bytes,
        model: impl Into<String>,
        now: UnixMillis,
        ttl: Duration,
        stale_for: Duration,
    ) -> Self {
        let fresh_until = now.saturating_add(ttl.as_millis() as u64);
        Entry {
            body,
            model: model.into(),
            stored_at: now,
            fresh_until,
            stale_until: fresh_until.saturating_add(stale_for.as_millis() as u64),
        }
    }

    /// Freshness at `now`; `max_age` (the caller's `cache-control: max-age`) can only shorten it.
    pub fn freshness(&self, now: UnixMillis, max_age: Option<Duration>) -> Freshness {
        if now >= self.stale_until {
            Freshness::Expired
        } else if now < self.fresh_until && max_age.is_none_or(|m| self.age(now) <= m) {
            Freshness::Fresh
        } else {
            Freshness::Stale
        }
    }

    /// Time since the entry was stored.
    pub fn age(&self, now: UnixMillis) -> Duration {
        Duration::from_millis(now.saturating_sub(self.stored_at))
    }

    /// How much memory the entry holds, for the memory tier's byte bound: its bytes plus the
    /// cache's own bookkeeping per entry (moka's node, key, expiry and LRU links, the `Arc`),
    /// about 300 bytes as measured, so that the bound is a bound on memory, not on bodies.
    pub fn weight(&self) -> u32 {
        const BOOKKEEPING: usize = 320;
        let bytes = self.body.len() + self.model.len() + HEADER_LEN + BOOKKEEPING;
        u32::try_from(bytes).unwrap_or(u32::MAX)
    }

    /// The on-disk bytes: `MAGIC, version, checksum[16], stored_at, fresh_until, stale_until
    /// (u64 LE each), model length (u16 LE), model, body`. The checksum is blake3 over all
    /// that follows it, so any flipped or missing byte is caught.
    pub fn encode(&self) -> Vec<u8> {
        let model = &self.model.as_bytes()[..self.model.len().min(u16::MAX as usize)];
        let mut out = Vec::with_capacity(HEADER_LEN + model.len() + self.body.len());
        out.push(MAGIC);
        out.push(FORMAT_V1);
        out.extend_from_slice(&[0; CHECKSUM_LEN]);
        out.extend_from_slice(&self.stored_at.to_le_bytes());
        out.extend_from_slice(&self.fresh_until.to_le_bytes());
        out.extend_from_slice(&self.stale_until.to_le_bytes());
        out.extend_from_slice(&(model.len() as u16).to_le_bytes());
        out.extend_from_slice(model);
        out.extend_from_slice(&self.body);
        let sum = checksum(&out[2 + CHECKSUM_LEN..]);
        out[2..2 + CHECKSUM_LEN].copy_from_slice(&sum);
        out
    }

    /// Decodes and verifies bytes made by [`Entry::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Entry, DecodeError> {
        if bytes.len() < HEADER_LEN {
            return Err(DecodeError::Truncated(bytes.len()));
        }
        if bytes[0] != MAGIC || bytes[1] != FORMAT_V1 {
            return Err(DecodeError::UnknownFormat {
                magic: bytes[0],
                version: bytes[1],
            });
        }
        let payload = &bytes[2 + CHECKSUM_LEN..];
        if checksum(payload) != bytes[2..2 + CHECKSUM_LEN] {
            return Err(DecodeError::Checksum);
        }
        let u64_at = |i: usize| u64::from_le_bytes(payload[i..i + 8].try_into().expect("8 bytes"));
        let model_len = u16::from_le_bytes([payload[24], payload[25]]) as usize;
        let rest = &payload[26..];
        if rest.len() < model_len {
            return Err(DecodeError::Truncated(bytes.len()));
        }
        let model = std::str::from_utf8(&rest[..model_len]).map_err(|_| DecodeError::Model)?;
        Ok(Entry {
            stored_at: u64_at(0),
            fresh_until: u64_at(8),
            stale_until: u64_at(16),
            model: model.to_owned(),
            body: Bytes::copy_from_slice(&rest[model_len..]),
        })
    }
}

fn checksum(payload: &[u8]) -> [u8; CHECKSUM_LEN] {
    let mut out = [0u8; CHECKSUM_LEN];
    out.copy_from_slice(&blake3::hash(payload).as_bytes()[..CHECKSUM_LEN]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn entry() -> Entry {
        Entry::new(
            Bytes::from_static(br#"{"type":"message","content":[]}"#),
            "claude-sonnet-4-6",
            1_000_000,
            HOUR,
            24 * HOUR,
        )
    }

    #[test]
    fn fresh_then_stale_then_expired() {
        let e = entry();
        let h = HOUR.as_millis() as u64;
        assert_eq!(e.freshness(1_000_000, None), Freshness::Fresh);
        assert_eq!(e.freshness(1_000_000 + h - 1, None), Freshness::Fresh);
        assert_eq!(e.freshness(1_000_000 + h, None), Freshness::Stale);
        assert_eq!(e.freshness(1_000_000 + 25 * h - 1, None), Freshness::Stale);
        assert_eq!(e.freshness(1_000_000 + 25 * h, None), Freshness::Expired);
    }

    #[test]
    fn max_age_shortens_freshness_only() {
        let e = entry();
        let ten_s = Some(Duration::from_secs(10));
        assert_eq!(e.freshness(1_000_000 + 5_000, ten_s), Freshness::Fresh);
        assert_eq!(e.freshness(1_000_000 + 11_000, ten_s), Freshness::Stale);
        let long = Some(48 * HOUR);
        let h = HOUR.as_millis() as u64;
        assert_eq!(e.freshness(1_000_000 + 2 * h, long), Freshness::Stale);
    }

    #[test]
    fn encode_decode_round_trip() {
        let e = entry();
        assert_eq!(Entry::decode(&e.encode()).unwrap(), e);
    }

    #[test]
    fn every_flipped_byte_is_caught() {
        let bytes = entry().encode();
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert!(Entry::decode(&bad).is_err(), "flip at {i} went unnoticed");
        }
    }

    #[test]
    fn every_truncation_is_caught() {
        let bytes = entry().encode();
        for len in 0..bytes.len() {
            assert!(Entry::decode(&bytes[..len]).is_err(), "truncated to {len}");
        }
    }

    #[test]
    fn unknown_version_is_refused() {
        let mut bytes = entry().encode();
        bytes[1] = 99;
        assert_eq!(
            Entry::decode(&bytes),
            Err(DecodeError::UnknownFormat {
                magic: MAGIC,
                version: 99
            })
        );
    }
}
