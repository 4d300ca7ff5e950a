//! The secret the credential fingerprint is keyed with. An unkeyed fingerprint would let
//! anyone who sees a key (`fallthrough key`, `x-fallthrough-key`) test guesses of a weak
//! credential or token offline; keyed, a guess can only be tested by someone who holds the
//! secret as well.
//!
//! Where it comes from, first found wins: `FALLTHROUGH_KEY_SECRET`; the cache directory's
//! `key-secret` file (created with random content, mode 0600, with the directory); a random
//! one for a cache that lives only as long as the process. The secret is the blake3-derived
//! key of that text, so the file's content can be copied into the variable.

use std::fmt;
use std::io::Write;
use std::path::Path;

/// The environment variable that sets the secret for every process that reads it.
pub const SECRET_ENV: &str = "FALLTHROUGH_KEY_SECRET";
/// The file, in the cache directory, that holds the secret's text.
pub const SECRET_FILE: &str = "key-secret";

const DERIVE_CONTEXT: &str = "fallthrough key secret v1";

/// The fingerprint's key. Its `Debug` never shows it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KeySecret(pub(super) [u8; 32]);

impl fmt::Debug for KeySecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeySecret(..)")
    }
}

impl KeySecret {
    /// The secret a text stands for (surrounding whitespace ignored, as a file's newline).
    pub fn from_text(text: &str) -> Self {
        KeySecret(blake3::derive_key(DERIVE_CONTEXT, text.trim().as_bytes()))
    }

    /// A new random secret, for a cache that is not kept.
    pub fn random() -> Self {
        Self::from_text(&random_text())
    }

    /// The secret for the cache in `dir`: the environment's, else the directory's (created
    /// when missing).
    pub fn for_dir(dir: &Path) -> std::io::Result<Self> {
        Ok(Self::from_text(&text_for_dir(dir)?))
    }
}

/// The secret's text as `dir`'s cache uses it: the environment's, else the directory's file,
/// created with random content (mode 0600) when missing. `export` writes it down.
pub fn text_for_dir(dir: &Path) -> std::io::Result<String> {
    if let Some(text) = from_env() {
        return Ok(text);
    }
    let path = dir.join(SECRET_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => return Ok(text.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // Made with the directory: a `fallthrough key` before the first `serve` must print the
    // keys that `serve` will use.
    crate::cache::create_private_dir(dir)?;
    let text = random_text();
    match write_private(&path, &text, false) {
        Ok(()) => Ok(text),
        // Another process created it first: theirs is the directory's.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Ok(std::fs::read_to_string(&path)?.trim().to_owned())
        }
        Err(e) => Err(e),
    }
}

/// Replaces `dir`'s secret with `text` (an import into an empty cache adopts the exporter's).
pub fn replace_in_dir(dir: &Path, text: &str) -> std::io::Result<()> {
    write_private(&dir.join(SECRET_FILE), text.trim(), true)
}

/// Whether `FALLTHROUGH_KEY_SECRET` decides, whatever a directory holds.
pub fn from_env() -> Option<String> {
    std::env::var(SECRET_ENV)
        .ok()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
}

fn random_text() -> String {
    let bytes: [u8; 32] = rand::random();
    super::hex(&bytes)
}

/// Writes a file readable by its owner only; `replace` swaps it in whole (written aside, then
/// renamed), else it must not exist yet.
fn write_private(path: &Path, text: &str, replace: bool) -> std::io::Result<()> {
    let target = match replace {
        true => path.with_extension("new"),
        false => path.to_owned(),
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true);
    match replace {
        true => options.create(true).truncate(true),
        false => options.create_new(true),
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&target)?;
    file.write_all(text.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    if replace {
        std::fs::rename(&target, path)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_keeps_its_secret_and_no_one_else_reads_it() {
        if from_env().is_some() {
            return; // the environment decides; nothing of the directory's is read
        }
        let dir = tempfile::tempdir().unwrap();
        let first = KeySecret::for_dir(dir.path()).unwrap();
        assert_eq!(KeySecret::for_dir(dir.path()).unwrap(), first);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(SECRET_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let other = tempfile::tempdir().unwrap();
        assert_ne!(KeySecret::for_dir(other.path()).unwrap(), first);
        let text = text_for_dir(dir.path()).unwrap();
        replace_in_dir(other.path(), &text).unwrap();
        assert_eq!(KeySecret::for_dir(other.path()).unwrap(), first);
    }
}
