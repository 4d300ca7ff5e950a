//! Opening the database: its trees and counts, an older layout indexed once, and what a
//! database that cannot be opened becomes (moved aside, or left alone when the file system
//! refused).

use std::path::{Path, PathBuf};

use super::generation::{
    row, Meta, Trees, FLUSH_EVERY_MS, LAYOUT, PER_ENTRY_OVERHEAD, STATE_COUNTS, STATE_LAYOUT,
};
use crate::entry::Entry;

/// Why a database could not be opened.
pub(super) enum OpenError {
    /// Another process holds it.
    Locked,
    /// The file system refused (no space, no permission): nothing is wrong with the database,
    /// which is left where it is.
    Unavailable(std::io::Error),
    /// Anything else (corruption, an unknown version, a panic inside sled): it is moved aside.
    Broken(String),
}

/// Opens the database at `path` and its trees, and reads (or, for an older layout, counts) its
/// entries and bytes. Any failure but another process's lock, a panic inside sled included,
/// is [`OpenError::Broken`].
pub(super) fn open_db(
    path: &Path,
    page_cache: u64,
) -> Result<(sled::Db, Trees, (u64, u64)), OpenError> {
    let opened = std::panic::catch_unwind(|| -> sled::Result<_> {
        let db = sled::Config::new()
            .path(path)
            .flush_every_ms(Some(FLUSH_EVERY_MS))
            .cache_capacity(page_cache)
            .open()?;
        let trees = Trees {
            entries: db.open_tree("entries")?,
            index: db.open_tree("index")?,
            by_atime: db.open_tree("by_atime")?,
            by_expiry: db.open_tree("by_expiry")?,
            state: db.open_tree("state")?,
        };
        let counts = load_counts(&db, &trees)?;
        Ok((db, trees, counts))
    });
    match opened {
        Ok(Ok(opened)) => Ok(opened),
        Ok(Err(sled::Error::Io(io))) if io.to_string().contains("could not acquire lock") => {
            Err(OpenError::Locked)
        }
        Ok(Err(sled::Error::Io(io))) if is_refusal(&io) => Err(OpenError::Unavailable(io)),
        Ok(Err(e)) => Err(OpenError::Broken(e.to_string())),
        Err(panic) => Err(OpenError::Broken(format!(
            "the storage engine panicked: {}",
            panic_text(&panic)
        ))),
    }
}

/// The counts from `state`; for a database of an older layout (or none yet), the index is
/// built and the counts made by reading every entry, once.
fn load_counts(db: &sled::Db, t: &Trees) -> sled::Result<(u64, u64)> {
    let layout = t.state.get(STATE_LAYOUT)?;
    let current = layout.as_deref() == Some(&LAYOUT.to_be_bytes()[..]);
    if current {
        let counts = t.state.get(STATE_COUNTS)?;
        let at = |v: &[u8], i: usize| u64::from_be_bytes(v[i..i + 8].try_into().expect("8 bytes"));
        if let Some(v) = counts.filter(|v| v.len() == 16) {
            return Ok((at(&v, 0), at(&v, 8)));
        }
    }
    // Layout 1 kept access times alone in `atime`: index every entry anew.
    let old_atimes = db.open_tree("atime")?;
    let (mut count, mut bytes) = (0u64, 0u64);
    for item in t.entries.iter() {
        let (k, v) = item?;
        let atime = old_atimes
            .get(&k)?
            .and_then(|a| a.as_ref().try_into().ok())
            .map(u64::from_be_bytes);
        let decoded = Entry::decode(&v);
        let meta = Meta {
            atime: atime.unwrap_or_else(|| decoded.as_ref().map_or(0, |e| e.stored_at)),
            stale_until: decoded.as_ref().map_or(0, |e| e.stale_until),
            size: v.len() as u64 + PER_ENTRY_OVERHEAD,
        };
        t.index.insert(&k, &meta.encode())?;
        t.by_atime.insert(row(meta.atime, &k), &[])?;
        t.by_expiry.insert(row(meta.stale_until, &k), &[])?;
        count += 1;
        bytes += meta.size;
    }
    db.drop_tree("atime")?;
    let mut value = [0u8; 16];
    value[..8].copy_from_slice(&count.to_be_bytes());
    value[8..].copy_from_slice(&bytes.to_be_bytes());
    t.state.insert(STATE_COUNTS, &value)?;
    t.state.insert(STATE_LAYOUT, &LAYOUT.to_be_bytes())?;
    Ok((count, bytes))
}

/// A file system's refusal (no space, no permission, read-only), as opposed to bytes that do
/// not make a database (an unexpected end of file, say).
fn is_refusal(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    const ENOSPC: i32 = 28;
    const EACCES: i32 = 13;
    const EROFS: i32 = 30;
    const EDQUOT: i32 = 122;
    matches!(
        e.kind(),
        StorageFull | PermissionDenied | ReadOnlyFilesystem | QuotaExceeded
    ) || matches!(e.raw_os_error(), Some(ENOSPC | EACCES | EROFS | EDQUOT))
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// Moves the database at `path` to `<dir>/corrupt-<unix seconds>`, first removing any older
/// moved-aside copy, so that at most one is ever kept. One move at a time in the process: a
/// shard's two generations open side by side, and two damaged ones moved in the same second
/// would otherwise aim at the same name, and the second move would fail the open.
pub(super) fn move_aside(dir: &Path, path: &Path) -> std::io::Result<PathBuf> {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for old in std::fs::read_dir(dir)?.flatten() {
        let name = old.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("corrupt-") || name.starts_with("db.corrupt-") {
            let _ = std::fs::remove_dir_all(old.path());
        }
    }
    let aside = dir.join(format!("corrupt-{}", crate::entry::now_millis() / 1000));
    std::fs::rename(path, &aside)?;
    Ok(aside)
}
