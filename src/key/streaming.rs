//! The key straight from the request bytes: one pass over the JSON, writing the canonical form
//! as it goes, with no `serde_json::Value` in between.
//!
//! The output is byte-identical to [`KeyContext::canonical_form`] of `serde_json::from_slice`
//! of the same bytes, and a body is rejected exactly when `serde_json::from_slice::<Value>`
//! rejects it (the tests hold both to that, on a generated corpus). The rules it must follow,
//! all taken from serde_json 1.x as this crate builds it (no `arbitrary_precision`, no
//! `preserve_order`, no `float_roundtrip`):
//! - object keys sorted by the bytes of the *unescaped* key; a duplicate key keeps its last
//!   value;
//! - strings re-escaped as serde_json writes them: only `"`, `\` and control characters are
//!   escaped (`\b \t \n \f \r` short, the others `\u00xx`), everything else is written as UTF-8,
//!   so a string without escapes is copied as it stands;
//! - numbers as `canonical::write_number` writes the number serde_json parses: plain integers that fit are
//!   copied (`-0` becomes `0`), small decimals are computed here (exactly as serde_json computes
//!   them, see [`Parser::number`]), anything else is parsed by serde_json itself;
//! - nesting deeper than 127 arrays/objects is rejected, as serde_json's recursion limit does.

use std::cell::RefCell;

use super::{canonical, CacheKey, KeyContext};

mod parser;
use parser::{Member, Parser};

const WRITE_TO_VEC: &str = "writing to a Vec never fails";

/// What the key pass learns about a request body besides its key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BodyFacts {
    /// The top-level `model`, when it is a string.
    pub model: Option<String>,
    /// Whether the top level holds `"stream": true`.
    pub stream: bool,
}

/// Why request bytes have no key: they are not one JSON value. `offset` is the byte where the
/// problem was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("request body is not valid UTF-8 (at byte {offset})")]
    InvalidUtf8 { offset: usize },
    #[error("request body is not valid JSON: {what} at byte {offset}")]
    Syntax { what: &'static str, offset: usize },
    #[error("request body nests arrays and objects deeper than 127 levels (at byte {offset})")]
    TooDeep { offset: usize },
    #[error("request body holds a number out of range at byte {offset}")]
    NumberOutOfRange { offset: usize },
}

/// serde_json's recursion limit: 128 levels fail, 127 pass.
const MAX_DEPTH: u32 = 128;

/// Scratch buffers kept per thread; dropped when a huge body left them large.
#[derive(Default)]
struct Scratch {
    out: Vec<u8>,
    tmp: Vec<u8>,
    keys: Vec<u8>,
    members: Vec<Member>,
}

const KEEP_SCRATCH_BYTES: usize = 1 << 20;

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

impl KeyContext {
    /// The key of a request body given as JSON bytes, in one pass, and its top-level facts.
    ///
    /// The same key as `self.key(&serde_json::from_slice(body)?)`, and an error exactly when
    /// that parse fails.
    pub fn key_of_bytes(&self, body: &[u8]) -> Result<(CacheKey, BodyFacts), KeyError> {
        self.with_canonical_bytes(body, |form| CacheKey(*blake3::hash(form).as_bytes()))
    }

    /// The canonical form of a request body given as JSON bytes: what [`Self::key_of_bytes`]
    /// hashes, and byte for byte what [`Self::canonical_form`] gives for the parsed body.
    pub fn canonical_form_of_bytes(&self, body: &[u8]) -> Result<String, KeyError> {
        let (form, _) = self.with_canonical_bytes(body, |form| form.to_vec())?;
        Ok(String::from_utf8(form).expect("canonical JSON is UTF-8"))
    }

    fn with_canonical_bytes<T>(
        &self,
        body: &[u8],
        f: impl FnOnce(&[u8]) -> T,
    ) -> Result<(T, BodyFacts), KeyError> {
        let run = |scratch: &mut Scratch| {
            scratch.out.clear();
            scratch.out.reserve(body.len() + 256);
            canonical::write_prefix(self, &mut scratch.out).expect(WRITE_TO_VEC);
            let facts = canonicalise_body(body, scratch)?;
            canonical::write_suffix(self, &mut scratch.out).expect(WRITE_TO_VEC);
            Ok((f(&scratch.out), facts))
        };
        SCRATCH.with(|cell| match cell.try_borrow_mut() {
            Ok(mut scratch) => {
                let result = run(&mut scratch);
                if scratch.out.capacity() > KEEP_SCRATCH_BYTES
                    || scratch.tmp.capacity() > KEEP_SCRATCH_BYTES
                    || scratch.keys.capacity() > KEEP_SCRATCH_BYTES
                    || scratch.members.capacity() > KEEP_SCRATCH_BYTES / 32
                {
                    *scratch = Scratch::default();
                }
                result
            }
            // Only reachable if `f` itself computed a key; never in practice.
            Err(_) => run(&mut Scratch::default()),
        })
    }
}

/// Writes the canonical body (as `canonical::write_body` does) for `body` to `scratch.out`.
fn canonicalise_body(body: &[u8], scratch: &mut Scratch) -> Result<BodyFacts, KeyError> {
    if let Err(e) = std::str::from_utf8(body) {
        return Err(KeyError::InvalidUtf8 {
            offset: e.valid_up_to(),
        });
    }
    scratch.tmp.clear();
    scratch.keys.clear();
    scratch.members.clear();
    let mut p = Parser {
        src: body,
        pos: 0,
        depth: 0,
        out: &mut scratch.out,
        tmp: &mut scratch.tmp,
        keys: &mut scratch.keys,
        members: &mut scratch.members,
        facts: BodyFacts::default(),
        in_tools: false,
    };
    p.skip_ws();
    match p.peek() {
        Some(b'{') => p.object(true)?,
        _ => p.value()?,
    }
    p.skip_ws();
    if p.pos != body.len() {
        return Err(p.syntax("trailing characters"));
    }
    Ok(p.facts)
}

#[cfg(test)]
mod tests;
