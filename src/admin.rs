//! Cache administration over the disk tier, or the shared tier (`--shared`): stats, get,
//! purge, and export/import as JSONL so entries can move between machines and tiers.
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

use crate::cache::{DiskTier, SharedTier};
use crate::entry::{DecodeError, Entry, Freshness, UnixMillis};
use crate::error::{DiskError, SharedError};
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

/// Reads every entry's index row (its times and model, not its body), one at a time: memory
/// stays bounded by a constant whatever the cache holds ([`DiskTier::visit_summaries`]).
/// `corrupt` counts bytes that did not decode when stored (and, in rows written before the
/// index carried summaries, when read now). `bytes` is what the entries count for, as read
/// (the tier's kept count may lag after a crash, or count an entry twice while its
/// generation's copy lasts; a walk of a tier opened with [`DiskTier::open_for_walk`] puts it
/// right).
pub async fn stats(disk: &DiskTier, now: UnixMillis) -> Result<Stats, DiskError> {
    let stats = Arc::new(Mutex::new(Stats::default()));
    let gathered = stats.clone();
    disk.visit_summaries(move |_, size, entry| {
        gathered
            .lock()
            .expect("stats lock")
            .count(size, &entry, now);
    })
    .await?;
    let stats = stats.lock().expect("stats lock").clone();
    Ok(stats)
}

/// [`stats`] of the shared tier (`bytes`: the stored values' sizes).
pub async fn shared_stats(shared: &Arc<SharedTier>, now: UnixMillis) -> Result<Stats, SharedError> {
    let mut stats = Stats::default();
    shared
        .visit(|_, size, entry| stats.count(size as u64, &entry, now))
        .await?;
    Ok(stats)
}

impl Stats {
    /// Counts one entry (of `size` bytes) as read at `now`.
    fn count(&mut self, size: u64, entry: &Result<Entry, DecodeError>, now: UnixMillis) {
        self.entries += 1;
        self.bytes += size;
        let Ok(entry) = entry else {
            self.corrupt += 1;
            return;
        };
        match entry.freshness(now, None) {
            Freshness::Fresh => self.fresh += 1,
            Freshness::Stale => self.stale += 1,
            Freshness::Expired => self.expired += 1,
        }
        if let Some(n) = self.by_model.get_mut(&entry.model) {
            *n += 1;
        } else {
            self.by_model.insert(entry.model.clone(), 1);
        }
        let at = entry.stored_at;
        self.oldest = Some(self.oldest.map_or(at, |o| o.min(at)));
        self.newest = Some(self.newest.map_or(at, |n| n.max(at)));
    }
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
        if goes(purge, &entry, now) {
            choosing.lock().expect("purge lock").push(key);
        }
        Ok(())
    })
    .await?;
    let chosen = std::mem::take(&mut *chosen.lock().expect("purge lock"));
    Ok(chosen)
}

/// Whether `purge` selects an entry (corrupt ones always).
fn goes(purge: Purge, entry: &Result<Entry, DecodeError>, now: UnixMillis) -> bool {
    match (entry, purge) {
        (Err(_), _) => true,
        (Ok(e), Purge::Expired) => e.freshness(now, None) == Freshness::Expired,
        (Ok(e), Purge::OlderThan(age)) => e.age(now) > age,
        (Ok(_), Purge::All) => true,
    }
}

/// [`purge`] of the shared tier. `All` removes everything under the prefix (leases and the
/// fleet's breakers too).
pub async fn shared_purge(
    shared: &Arc<SharedTier>,
    purge: Purge,
    now: UnixMillis,
) -> Result<u64, SharedError> {
    if purge == Purge::All {
        return shared.clear().await;
    }
    let mut chosen = Vec::new();
    shared
        .visit(|key, _, entry| {
            if goes(purge, &entry, now) {
                chosen.push(key);
            }
        })
        .await?;
    shared.delete(&chosen).await
}

/// Writes every entry that decodes as one JSONL line; returns how many were written.
pub async fn export(disk: &DiskTier, out: impl Write + Send + 'static) -> Result<u64, DiskError> {
    let mut out = std::io::BufWriter::new(out);
    let key_secret = secret::text_for_dir(disk.dir()).map_err(DiskError::Io)?;
    let header = serde_json::to_string(&Header { key_secret }).expect("a string field");
    writeln!(out, "{header}").map_err(DiskError::Io)?;
    let (tx, rx) = std::sync::mpsc::channel();
    disk.visit(move |key, _, entry| {
        if let Ok(entry) = entry {
            if write_line(&mut out, &key, entry)? {
                let _ = tx.send(());
            }
        }
        Ok(())
    })
    .await?;
    Ok(rx.try_iter().count() as u64)
}

/// [`export`] of the shared tier. Its header carries `FALLTHROUGH_KEY_SECRET`, the secret
/// a fleet keys with; without one, no header (each instance then keys with its own).
pub async fn shared_export(shared: &Arc<SharedTier>, out: impl Write) -> Result<u64, SharedError> {
    let failed = |e: std::io::Error| SharedError::Server(format!("writing the export: {e}"));
    let mut out = std::io::BufWriter::new(out);
    if let Some(key_secret) = secret::from_env() {
        let header = serde_json::to_string(&Header { key_secret }).expect("a string field");
        writeln!(out, "{header}").map_err(failed)?;
    }
    let (mut written, mut error) = (0, None);
    shared
        .visit(
            |key, _, entry| match entry.map(|e| write_line(&mut out, &key, e)) {
                Ok(Ok(true)) => written += 1,
                Ok(Err(e)) => error = error.take().or(Some(e)),
                _ => {}
            },
        )
        .await?;
    match error {
        Some(e) => Err(failed(e)),
        None => out.flush().map(|_| written).map_err(failed),
    }
}

/// Writes an entry as an export line; `false` when its body is not JSON (it cannot pass the
/// checksum otherwise): left out rather than exported broken.
fn write_line(out: &mut impl Write, key: &CacheKey, entry: Entry) -> std::io::Result<bool> {
    let Ok(text) = String::from_utf8(entry.body.to_vec()) else {
        return Ok(false);
    };
    let Ok(body) = RawValue::from_string(text) else {
        return Ok(false);
    };
    let line = Line {
        key: key.to_string(),
        model: entry.model,
        stored_at: entry.stored_at,
        fresh_until: entry.fresh_until,
        stale_until: entry.stale_until,
        body: &body,
    };
    serde_json::to_writer(&mut *out, &line)?;
    out.write_all(b"\n")?;
    Ok(true)
}

/// Reads JSONL made by [`export`]; invalid lines are reported, not fatal.
pub async fn import(
    disk: &DiskTier,
    input: impl BufRead,
    now: UnixMillis,
) -> Result<Imported, DiskError> {
    let report = import_lines(
        input,
        now,
        DiskError::Io,
        |text| adopt_secret(disk, text),
        async |key, entry| disk.insert(&key, &entry, now),
    )
    .await?;
    disk.flush().await?;
    Ok(report)
}

/// [`import`] into the shared tier. An export's secret is compared with
/// `FALLTHROUGH_KEY_SECRET`, the fleet's: a fleet's secret is not kept in the tier.
pub async fn shared_import(
    shared: &Arc<SharedTier>,
    input: impl BufRead,
    now: UnixMillis,
) -> Result<Imported, SharedError> {
    let failed = |e: std::io::Error| SharedError::Server(format!("reading the import: {e}"));
    let compared = |text: &str| {
        Ok(match secret::from_env() {
            Some(ours) if ours == text.trim() => SecretImport::Same,
            _ => SecretImport::Differs,
        })
    };
    let store = async |key, entry| shared.store(&key, &entry, now).await;
    import_lines(input, now, failed, compared, store).await
}

/// The import loop of both tiers: the header line goes to `header`, each valid unexpired
/// entry to `insert`.
async fn import_lines<E>(
    input: impl BufRead,
    now: UnixMillis,
    io: impl Fn(std::io::Error) -> E,
    header: impl FnOnce(&str) -> Result<SecretImport, E>,
    mut insert: impl AsyncFnMut(CacheKey, Entry) -> Result<(), E>,
) -> Result<Imported, E> {
    let mut report = Imported::default();
    let mut header = Some(header);
    for (n, line) in input.lines().enumerate() {
        let line = line.map_err(&io)?;
        if line.trim().is_empty() {
            continue;
        }
        if n == 0 {
            if let Ok(h) = serde_json::from_str::<Header>(&line) {
                let adopt = header.take().expect("the first line comes once");
                report.secret = adopt(&h.key_secret)?;
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
        insert(key, entry).await?;
        report.imported += 1;
    }
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
