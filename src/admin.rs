//! Cache administration over the disk tier: stats, get, purge, and export/import as JSONL so
//! entries can move between machines.
//!
//! An exported line is `{"key":…,"model":…,"stored_at":…,"fresh_until":…,"stale_until":…,
//! "body":<the Message JSON, verbatim>}` with times in Unix milliseconds. Import keeps the
//! times, so an entry is exactly as fresh on the new machine as it was on the old one.
//!
//! The first line, `{"key_secret":…}`, carries the secret the keys' credential partitions were
//! computed with ([`crate::key::KeySecret`]): without it, no imported entry that was stored for
//! a credential would ever match again.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::cache::DiskTier;
use crate::entry::{Entry, Freshness, UnixMillis};
use crate::error::DiskError;
use crate::key::{secret, CacheKey};

/// What the disk tier holds.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stats {
    pub entries: u64,
    pub bytes: u64,
    pub fresh: u64,
    pub stale: u64,
    pub expired: u64,
    pub corrupt: u64,
    /// Entries by the model that produced them.
    pub by_model: BTreeMap<String, u64>,
    /// `stored_at` of the oldest and newest entry.
    pub oldest: Option<UnixMillis>,
    pub newest: Option<UnixMillis>,
}

/// Which entries a purge removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purge {
    /// Past their stale period (and corrupt ones).
    Expired,
    /// Stored longer ago than this.
    OlderThan(Duration),
    All,
}

/// How an import went.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct Imported {
    pub imported: u64,
    /// Already expired: not worth storing.
    pub expired: u64,
    /// Line numbers (from 1) that are not valid export lines.
    pub invalid_lines: Vec<u64>,
    /// What became of the export's key secret.
    pub secret: SecretImport,
}

/// An export's key secret, as an import met it.
#[derive(Debug, Default, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SecretImport {
    /// The export carried none (an older export): keys stay as they were computed.
    #[default]
    NotCarried,
    /// The cache already used the same secret.
    Same,
    /// The cache was empty and now uses the export's secret.
    Adopted,
    /// The cache holds entries under another secret (or `FALLTHROUGH_KEY_SECRET` sets one):
    /// entries stored for a credential will not match here.
    Differs,
}

/// The export's first line.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    key_secret: String,
}

#[derive(Serialize, Deserialize)]
struct Line<'a> {
    key: String,
    model: String,
    stored_at: UnixMillis,
    fresh_until: UnixMillis,
    stale_until: UnixMillis,
    #[serde(borrow)]
    body: &'a RawValue,
}

/// Reads every entry, one at a time: memory stays bounded by a constant whatever the cache
/// holds. `bytes` is what the entries count for, as read (the tier's kept count may lag after
/// a crash; [`DiskTier::set_counts`] puts it right).
pub async fn stats(disk: &DiskTier, now: UnixMillis) -> Result<Stats, DiskError> {
    let stats = Arc::new(Mutex::new(Stats::default()));
    let gathered = stats.clone();
    disk.visit(move |_, size, entry| {
        let mut stats = gathered.lock().expect("stats lock");
        stats.entries += 1;
        stats.bytes += DiskTier::counted_size(size);
        let Ok(entry) = entry else {
            stats.corrupt += 1;
            return Ok(());
        };
        match entry.freshness(now, None) {
            Freshness::Fresh => stats.fresh += 1,
            Freshness::Stale => stats.stale += 1,
            Freshness::Expired => stats.expired += 1,
        }
        if let Some(n) = stats.by_model.get_mut(&entry.model) {
            *n += 1;
        } else {
            stats.by_model.insert(entry.model.clone(), 1);
        }
        let at = entry.stored_at;
        stats.oldest = Some(stats.oldest.map_or(at, |o| o.min(at)));
        stats.newest = Some(stats.newest.map_or(at, |n| n.max(at)));
        Ok(())
    })
    .await?;
    let stats = stats.lock().expect("stats lock").clone();
    Ok(stats)
}

/// Removes what `purge` selects; returns how many entries went.
pub async fn purge(disk: &DiskTier, purge: Purge, now: UnixMillis) -> Result<u64, DiskError> {
    if purge == Purge::All {
        let (entries, _) = disk.usage();
        disk.clear().await?;
        return Ok(entries);
    }
    let mut removed = 0;
    for key in chosen_for(disk, purge, now).await? {
        if disk.remove(&key)? {
            removed += 1;
        }
    }
    disk.flush().await?;
    Ok(removed)
}

/// The keys of the entries `purge` selects (corrupt ones included), read one entry at a time.
pub async fn chosen_for(
    disk: &DiskTier,
    purge: Purge,
    now: UnixMillis,
) -> Result<Vec<CacheKey>, DiskError> {
    let chosen = Arc::new(Mutex::new(Vec::new()));
    let choosing = chosen.clone();
    disk.visit(move |key, _, entry| {
        let goes = match (&entry, purge) {
            (Err(_), _) => true,
            (Ok(e), Purge::Expired) => e.freshness(now, None) == Freshness::Expired,
            (Ok(e), Purge::OlderThan(age)) => e.age(now) > age,
            (Ok(_), Purge::All) => true,
        };
        if goes {
            choosing.lock().expect("purge lock").push(key);
        }
        Ok(())
    })
    .await?;
    let chosen = std::mem::take(&mut *chosen.lock().expect("purge lock"));
    Ok(chosen)
}

/// Writes every entry that decodes as one JSONL line; returns how many were written.
pub async fn export(disk: &DiskTier, out: impl Write + Send + 'static) -> Result<u64, DiskError> {
    let mut out = std::io::BufWriter::new(out);
    let key_secret = secret::text_for_dir(disk.dir()).map_err(DiskError::Io)?;
    let header = serde_json::to_string(&Header { key_secret }).expect("a string field");
    writeln!(out, "{header}").map_err(DiskError::Io)?;
    let (tx, rx) = std::sync::mpsc::channel();
    disk.visit(move |key, _, entry| {
        let Ok(entry) = entry else { return Ok(()) };
        // Stored bodies are JSON; one that is not (it cannot pass the checksum otherwise) is
        // left out rather than exported broken.
        let Ok(text) = String::from_utf8(entry.body.to_vec()) else {
            return Ok(());
        };
        let Ok(body) = RawValue::from_string(text) else {
            return Ok(());
        };
        let line = Line {
            key: key.to_string(),
            model: entry.model,
            stored_at: entry.stored_at,
            fresh_until: entry.fresh_until,
            stale_until: entry.stale_until,
            body: &body,
        };
        serde_json::to_writer(&mut out, &line)?;
        out.write_all(b"\n")?;
        let _ = tx.send(());
        Ok(())
    })
    .await?;
    Ok(rx.try_iter().count() as u64)
}

/// Reads JSONL made by [`export`]; invalid lines are reported, not fatal.
pub async fn import(
    disk: &DiskTier,
    input: impl BufRead,
    now: UnixMillis,
) -> Result<Imported, DiskError> {
    let mut report = Imported::default();
    for (n, line) in input.lines().enumerate() {
        let line = line.map_err(DiskError::Io)?;
        if line.trim().is_empty() {
            continue;
        }
        if n == 0 {
            if let Ok(header) = serde_json::from_str::<Header>(&line) {
                report.secret = adopt_secret(disk, &header.key_secret)?;
                continue;
            }
        }
        let Some((key, entry)) = parse_line(&line) else {
            report.invalid_lines.push(n as u64 + 1);
            continue;
        };
        if entry.freshness(now, None) == Freshness::Expired {
            report.expired += 1;
            continue;
        }
        disk.insert(&key, &entry, now)?;
        report.imported += 1;
    }
    disk.flush().await?;
    Ok(report)
}

/// Takes an export's secret when the cache is empty and no environment variable decides.
fn adopt_secret(disk: &DiskTier, text: &str) -> Result<SecretImport, DiskError> {
    let ours = secret::text_for_dir(disk.dir()).map_err(DiskError::Io)?;
    if ours == text.trim() {
        return Ok(SecretImport::Same);
    }
    if secret::from_env().is_some() || disk.usage().0 > 0 {
        return Ok(SecretImport::Differs);
    }
    secret::replace_in_dir(disk.dir(), text).map_err(DiskError::Io)?;
    Ok(SecretImport::Adopted)
}

fn parse_line(line: &str) -> Option<(CacheKey, Entry)> {
    let line: Line = serde_json::from_str(line).ok()?;
    let key = line.key.parse().ok()?;
    let entry = Entry {
        body: Bytes::copy_from_slice(line.body.get().as_bytes()),
        model: line.model,
        stored_at: line.stored_at,
        fresh_until: line.fresh_until,
        stale_until: line.stale_until,
    };
    (entry.stored_at <= entry.fresh_until && entry.fresh_until <= entry.stale_until)
        .then_some((key, entry))
}
