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
//! - numbers as [`write_number`] writes the number serde_json parses: plain integers that fit are
//!   copied (`-0` becomes `0`), small decimals are computed here (exactly as serde_json computes
//!   them, see [`Parser::number`]), anything else is parsed by serde_json itself;
//! - nesting deeper than 127 arrays/objects is rejected, as serde_json's recursion limit does.

use std::cell::RefCell;
use std::io::Write;

use serde_json::Value;

use super::{write_number, CacheKey, KeyContext, IGNORED_BODY_FIELDS, KEY_FORMAT_VERSION};

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
            write_prefix(self, &mut scratch.out);
            let facts = canonicalise_body(body, scratch)?;
            write_suffix(self, &mut scratch.out);
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

/// What [`KeyContext::write_prefix`] writes, without going through `fmt` and `io::Write`.
fn write_prefix(ctx: &KeyContext, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"anthropic_version\":");
    match &ctx.anthropic_version {
        Some(version) => write_str(out, version),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"beta\":[");
    for (i, beta) in ctx.betas.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, beta);
    }
    out.extend_from_slice(b"],\"body\":");
}

/// What [`KeyContext::write_suffix`] writes.
fn write_suffix(ctx: &KeyContext, out: &mut Vec<u8>) {
    out.extend_from_slice(b",\"credential\":");
    match &ctx.credential {
        Some(fingerprint) => {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.push(b'"');
            for b in fingerprint.0 {
                out.extend_from_slice(&[HEX[(b >> 4) as usize], HEX[(b & 0xf) as usize]]);
            }
            out.push(b'"');
        }
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"namespace\":");
    write_str(out, &ctx.namespace);
    out.extend_from_slice(b",\"path\":");
    write_str(out, &ctx.path);
    write!(out, ",\"v\":{KEY_FORMAT_VERSION}}}").expect("writing to a Vec never fails");
}

/// A string as serde_json writes it.
fn write_str(out: &mut Vec<u8>, s: &str) {
    if find_special(s.as_bytes(), 0) == s.len() {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        serde_json::to_writer(&mut *out, s).expect("writing to a Vec never fails");
    }
}

/// Writes the canonical body (as `write_body` does) for `body` to `scratch.out`.
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

/// Where a member's key is, for sorting: unescaped bytes, in the source when the key had no
/// escapes, else in `Parser::keys`.
#[derive(Clone, Copy)]
struct Member {
    key_start: usize,
    key_end: usize,
    key_decoded: bool,
    /// The member `"key":value` in `Parser::out`.
    start: usize,
    end: usize,
}

struct Parser<'a> {
    src: &'a [u8],
    pos: usize,
    depth: u32,
    out: &'a mut Vec<u8>,
    tmp: &'a mut Vec<u8>,
    keys: &'a mut Vec<u8>,
    members: &'a mut Vec<Member>,
    facts: BodyFacts,
}

/// A string's content in the source, and whether it held escapes.
struct RawString {
    start: usize,
    end: usize,
    escaped: bool,
}

fn key_bytes<'k>(src: &'k [u8], keys: &'k [u8], m: &Member) -> &'k [u8] {
    if m.key_decoded {
        &keys[m.key_start..m.key_end]
    } else {
        &src[m.key_start..m.key_end]
    }
}

impl Parser<'_> {
    #[inline]
    fn peek(&self) -> Option<u8> {
        self.src.get(self.pos).copied()
    }

    fn syntax(&self, what: &'static str) -> KeyError {
        if self.pos >= self.src.len() {
            KeyError::Syntax {
                what: "unexpected end of input",
                offset: self.src.len(),
            }
        } else {
            KeyError::Syntax {
                what,
                offset: self.pos,
            }
        }
    }

    #[inline]
    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\t' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    fn value(&mut self) -> Result<(), KeyError> {
        self.skip_ws();
        match self.peek() {
            Some(b'"') => self.string().map(|_| ()),
            Some(b'{') => self.object(false),
            Some(b'[') => self.array(),
            Some(b't') => self.literal(b"true"),
            Some(b'f') => self.literal(b"false"),
            Some(b'n') => self.literal(b"null"),
            Some(b'-' | b'0'..=b'9') => self.number(),
            _ => Err(self.syntax("expected a value")),
        }
    }

    fn literal(&mut self, word: &'static [u8]) -> Result<(), KeyError> {
        let end = self.pos + word.len();
        if self.src.get(self.pos..end) != Some(word) {
            return Err(self.syntax("expected a value"));
        }
        self.pos = end;
        self.out.extend_from_slice(word);
        Ok(())
    }

    fn enter(&mut self) -> Result<(), KeyError> {
        self.depth += 1;
        if self.depth >= MAX_DEPTH {
            return Err(KeyError::TooDeep { offset: self.pos });
        }
        Ok(())
    }

    fn array(&mut self) -> Result<(), KeyError> {
        self.enter()?;
        self.pos += 1;
        self.out.push(b'[');
        self.skip_ws();
        if self.peek() == Some(b']') {
            self.pos += 1;
        } else {
            loop {
                self.value()?;
                self.skip_ws();
                match self.peek() {
                    Some(b',') => {
                        self.pos += 1;
                        self.out.push(b',');
                        self.skip_ws();
                        if self.peek() == Some(b']') {
                            return Err(self.syntax("trailing comma"));
                        }
                    }
                    Some(b']') => {
                        self.pos += 1;
                        break;
                    }
                    _ => return Err(self.syntax("expected `,` or `]`")),
                }
            }
        }
        self.out.push(b']');
        self.depth -= 1;
        Ok(())
    }

    /// An object, its members sorted by key; `top` for the body itself, whose `stream` and
    /// `metadata` are dropped and whose `model` and `stream` are noted.
    fn object(&mut self, top: bool) -> Result<(), KeyError> {
        self.enter()?;
        self.pos += 1;
        let obj_start = self.out.len();
        self.out.push(b'{');
        let base = self.members.len();
        let mut sorted = true;
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.pos += 1;
        } else {
            loop {
                self.skip_ws();
                if self.peek() != Some(b'"') {
                    return Err(self.syntax("expected a string key"));
                }
                let start = self.out.len();
                let raw = self.string()?;
                let (key_start, key_end, key_decoded) = if raw.escaped {
                    let k0 = self.keys.len();
                    decode_string(&self.src[raw.start..raw.end], self.keys);
                    (k0, self.keys.len(), true)
                } else {
                    (raw.start, raw.end, false)
                };
                self.skip_ws();
                if self.peek() != Some(b':') {
                    return Err(self.syntax("expected `:`"));
                }
                self.pos += 1;
                self.out.push(b':');
                let value_start = self.out.len();
                let value_src = self.pos;
                self.value()?;
                let member = Member {
                    key_start,
                    key_end,
                    key_decoded,
                    start,
                    end: self.out.len(),
                };
                let keep = !top || self.note_top_level(&member, value_start, value_src);
                if keep {
                    if sorted && self.members.len() > base {
                        let prev = &self.members[self.members.len() - 1];
                        sorted = key_bytes(self.src, self.keys, prev)
                            < key_bytes(self.src, self.keys, &member);
                    }
                    self.members.push(member);
                    self.out.push(b',');
                } else {
                    self.out.truncate(start);
                }
                self.skip_ws();
                match self.peek() {
                    Some(b',') => {
                        self.pos += 1;
                        self.skip_ws();
                        if self.peek() == Some(b'}') {
                            return Err(self.syntax("trailing comma"));
                        }
                    }
                    Some(b'}') => {
                        self.pos += 1;
                        break;
                    }
                    _ => return Err(self.syntax("expected `,` or `}`")),
                }
            }
        }
        if sorted {
            // Members are in order, each followed by a comma: the last comma closes it.
            match self.out.last_mut() {
                Some(c @ b',') if self.members.len() > base => *c = b'}',
                _ => self.out.push(b'}'),
            }
        } else {
            self.reorder(obj_start, base);
        }
        self.members.truncate(base);
        self.depth -= 1;
        Ok(())
    }

    /// Rewrites `out[obj_start..]` (`{` and the members of `members[base..]`, each followed by
    /// a comma) in key order, keeping only the last of equal keys, and closes it.
    fn reorder(&mut self, obj_start: usize, base: usize) {
        let (src, keys) = (self.src, &*self.keys);
        let members = &mut self.members[base..];
        // Stable: among equal keys the last in the source stays last.
        members.sort_by(|a, b| key_bytes(src, keys, a).cmp(key_bytes(src, keys, b)));
        self.tmp.clear();
        for (i, m) in members.iter().enumerate() {
            if let Some(next) = members.get(i + 1) {
                if key_bytes(src, keys, m) == key_bytes(src, keys, next) {
                    continue; // a later duplicate wins
                }
            }
            if !self.tmp.is_empty() {
                self.tmp.push(b',');
            }
            self.tmp.extend_from_slice(&self.out[m.start..m.end]);
        }
        self.out.truncate(obj_start + 1);
        self.out.extend_from_slice(self.tmp);
        self.out.push(b'}');
    }

    /// Notes a top-level member's facts; false when the member is left out of the key.
    fn note_top_level(&mut self, member: &Member, value_start: usize, value_src: usize) -> bool {
        let key = key_bytes(self.src, self.keys, member);
        if key == b"model" {
            // The last `model` wins, as it does in serde_json's map.
            self.facts.model = if self.out[value_start] == b'"' {
                let mut at = value_src;
                while self.src[at] != b'"' {
                    at += 1; // whitespace before the value
                }
                Some(self.decoded_string_at(at + 1))
            } else {
                None
            };
            return true;
        }
        if key == b"stream" {
            self.facts.stream = &self.out[value_start..member.end] == b"true";
        }
        !IGNORED_BODY_FIELDS
            .iter()
            .any(|ignored| ignored.as_bytes() == key)
    }

    /// The unescaped content of the (already validated) string whose content starts at `at`.
    fn decoded_string_at(&self, at: usize) -> String {
        let mut end = at;
        loop {
            match self.src[end] {
                b'"' => break,
                b'\\' => end += 2,
                _ => end += 1,
            }
        }
        let mut bytes = Vec::with_capacity(end - at);
        decode_string(&self.src[at..end], &mut bytes);
        String::from_utf8(bytes).expect("validated UTF-8")
    }

    /// A string, written as serde_json writes it; returns where its content is in the source.
    fn string(&mut self) -> Result<RawString, KeyError> {
        self.pos += 1;
        self.out.push(b'"');
        let start = self.pos;
        let mut run = start;
        let mut escaped = false;
        loop {
            let at = find_special(self.src, self.pos);
            match self.src.get(at) {
                Some(b'"') => {
                    self.out.extend_from_slice(&self.src[run..at]);
                    self.out.push(b'"');
                    self.pos = at + 1;
                    return Ok(RawString {
                        start,
                        end: at,
                        escaped,
                    });
                }
                Some(b'\\') => {
                    self.out.extend_from_slice(&self.src[run..at]);
                    self.pos = at;
                    self.escape()?;
                    run = self.pos;
                    escaped = true;
                }
                Some(_) => {
                    self.pos = at;
                    return Err(self.syntax("control character in a string"));
                }
                None => {
                    self.pos = at;
                    return Err(self.syntax("unterminated string"));
                }
            }
        }
    }

    /// One escape at `pos` (the backslash), re-escaped into `out` as serde_json would write
    /// the character it stands for.
    fn escape(&mut self) -> Result<(), KeyError> {
        self.pos += 1;
        let Some(c) = self.peek() else {
            return Err(self.syntax("unterminated string"));
        };
        self.pos += 1;
        let short: &[u8] = match c {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'/' => b"/",
            b'b' => b"\\b",
            b'f' => b"\\f",
            b'n' => b"\\n",
            b'r' => b"\\r",
            b't' => b"\\t",
            b'u' => {
                let cp = self.unicode_escape()?;
                write_escaped_char(self.out, cp);
                return Ok(());
            }
            _ => {
                self.pos -= 1;
                return Err(self.syntax("invalid escape"));
            }
        };
        self.out.extend_from_slice(short);
        Ok(())
    }

    /// After `\u`: the character of one escape or a surrogate pair; lone surrogates are
    /// errors, as they are to serde_json.
    fn unicode_escape(&mut self) -> Result<char, KeyError> {
        let n1 = self.hex4()?;
        let cp = match n1 {
            0xDC00..=0xDFFF => return Err(self.syntax("lone surrogate in a \\u escape")),
            0xD800..=0xDBFF => {
                if self.src.get(self.pos..self.pos + 2) != Some(b"\\u") {
                    if self.pos + 2 > self.src.len() {
                        self.pos = self.src.len();
                    }
                    return Err(self.syntax("lone surrogate in a \\u escape"));
                }
                self.pos += 2;
                let n2 = self.hex4()?;
                if !(0xDC00..=0xDFFF).contains(&n2) {
                    return Err(self.syntax("lone surrogate in a \\u escape"));
                }
                (((n1 - 0xD800) << 10) | (n2 - 0xDC00)) + 0x1_0000
            }
            n => n,
        };
        Ok(char::from_u32(cp).expect("not a surrogate"))
    }

    fn hex4(&mut self) -> Result<u32, KeyError> {
        let mut n = 0u32;
        for _ in 0..4 {
            let Some(c) = self.peek() else {
                return Err(self.syntax("unterminated string"));
            };
            let d = match c {
                b'0'..=b'9' => c - b'0',
                b'a'..=b'f' => c - b'a' + 10,
                b'A'..=b'F' => c - b'A' + 10,
                _ => return Err(self.syntax("invalid \\u escape")),
            };
            n = n << 4 | d as u32;
            self.pos += 1;
        }
        Ok(n)
    }

    /// A number, written as [`write_number`] writes what serde_json parses from it.
    ///
    /// Plain integers of at most 19 digits (18 when negative) fit serde_json's u64/i64 and are
    /// written as they stand (but `-0`, which serde_json parses as the float `-0.0`, is `0`).
    /// A decimal whose digits number at most 15 (so they are exact in an f64) with a decimal
    /// exponent of at most 22 (so the power of ten is exact too) takes one correctly rounded
    /// multiplication or division — exactly what serde_json's own `f64_from_parts` does there.
    /// Everything else goes to serde_json.
    fn number(&mut self) -> Result<(), KeyError> {
        let start = self.pos;
        let src = self.src;
        let negative = src[self.pos] == b'-';
        if negative {
            self.pos += 1;
        }
        let int_start = self.pos;
        match self.peek() {
            Some(b'0') => {
                self.pos += 1;
                if let Some(b'0'..=b'9') = self.peek() {
                    return Err(self.syntax("invalid number (leading zero)"));
                }
            }
            Some(b'1'..=b'9') => self.skip_digits(),
            _ => return Err(self.syntax("invalid number")),
        }
        let int_end = self.pos;
        let mut frac = int_end..int_end;
        if self.peek() == Some(b'.') {
            self.pos += 1;
            let frac_start = self.pos;
            self.skip_digits();
            if self.pos == frac_start {
                return Err(self.syntax("invalid number"));
            }
            frac = frac_start..self.pos;
        }
        let mut exp: Option<(bool, std::ops::Range<usize>)> = None;
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            let exp_negative = match self.peek() {
                Some(b'-') => {
                    self.pos += 1;
                    true
                }
                Some(b'+') => {
                    self.pos += 1;
                    false
                }
                _ => false,
            };
            let exp_start = self.pos;
            self.skip_digits();
            if self.pos == exp_start {
                return Err(self.syntax("invalid number"));
            }
            exp = Some((exp_negative, exp_start..self.pos));
        }
        let int_digits = int_end - int_start;
        if frac.is_empty() && exp.is_none() {
            if int_digits <= 18 || (!negative && int_digits <= 19) {
                let lexeme = &src[start..self.pos];
                self.out
                    .extend_from_slice(if lexeme == b"-0" { b"0" } else { lexeme });
                return Ok(());
            }
        } else if int_digits + frac.len() <= 15 {
            let exp10 = match &exp {
                None => Some(0i32),
                Some((neg, digits)) if digits.len() <= 4 => {
                    let e = parse_digits(&src[digits.clone()]) as i32;
                    Some(if *neg { -e } else { e })
                }
                Some(_) => None,
            };
            if let Some(exp10) = exp10.map(|e| e - frac.len() as i32) {
                if exp10.unsigned_abs() <= 22 {
                    let significand = parse_digits(&src[int_start..int_end])
                        * 10u64.pow(frac.len() as u32)
                        + parse_digits(&src[frac]);
                    let pow = POW10[exp10.unsigned_abs() as usize];
                    let f = if exp10 >= 0 {
                        significand as f64 * pow
                    } else {
                        significand as f64 / pow
                    };
                    write_float(self.out, if negative { -f } else { f });
                    return Ok(());
                }
            }
        }
        match serde_json::from_slice::<Value>(&src[start..self.pos]) {
            Ok(Value::Number(n)) => {
                write_number(self.out, &n).expect("writing to a Vec never fails");
                Ok(())
            }
            _ => Err(KeyError::NumberOutOfRange { offset: start }),
        }
    }

    #[inline]
    fn skip_digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.pos += 1;
        }
    }
}

/// Powers of ten exact in an f64.
const POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

/// ASCII digits (at most 19) as a number.
fn parse_digits(digits: &[u8]) -> u64 {
    digits.iter().fold(0u64, |n, d| n * 10 + (d - b'0') as u64)
}

/// The float branch of [`write_number`].
fn write_float(out: &mut Vec<u8>, f: f64) {
    if f.fract() == 0.0 && f.abs() < 1e38 {
        write!(out, "{}", f as i128).expect("writing to a Vec never fails");
    } else {
        serde_json::to_writer(&mut *out, &f).expect("writing to a Vec never fails");
    }
}

/// A character as serde_json writes it inside a string.
fn write_escaped_char(out: &mut Vec<u8>, c: char) {
    let short = match c {
        '"' => b'"',
        '\\' => b'\\',
        '\u{8}' => b'b',
        '\t' => b't',
        '\n' => b'n',
        '\u{c}' => b'f',
        '\r' => b'r',
        c if (c as u32) < 0x20 => {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            let b = c as usize;
            out.extend_from_slice(&[b'\\', b'u', b'0', b'0', HEX[b >> 4], HEX[b & 0xf]]);
            return;
        }
        c => {
            let mut buf = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            return;
        }
    };
    out.extend_from_slice(&[b'\\', short]);
}

/// Unescapes the content of a string already validated by [`Parser::string`].
fn decode_string(raw: &[u8], out: &mut Vec<u8>) {
    let mut i = 0;
    while i < raw.len() {
        if raw[i] != b'\\' {
            out.push(raw[i]);
            i += 1;
            continue;
        }
        let c = match raw[i + 1] {
            b'"' => b'"',
            b'\\' => b'\\',
            b'/' => b'/',
            b'b' => 0x08,
            b'f' => 0x0c,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            _ => {
                let hex = |at: usize| {
                    std::str::from_utf8(&raw[at..at + 4])
                        .ok()
                        .and_then(|h| u32::from_str_radix(h, 16).ok())
                        .expect("validated escape")
                };
                let n1 = hex(i + 2);
                i += 6;
                let cp = if (0xD800..=0xDBFF).contains(&n1) {
                    let n2 = hex(i + 2);
                    i += 6;
                    (((n1 - 0xD800) << 10) | (n2 - 0xDC00)) + 0x1_0000
                } else {
                    n1
                };
                let c = char::from_u32(cp).expect("validated escape");
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                continue;
            }
        };
        out.push(c);
        i += 2;
    }
}

/// The index of the first `"`, `\` or control byte in `s[from..]`, or `s.len()`.
#[inline]
fn find_special(s: &[u8], from: usize) -> usize {
    let mut i = from;
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    while let Some(chunk) = s.get(i..i + 8) {
        let w = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        let quote = w ^ (ONES * b'"' as u64);
        let backslash = w ^ (ONES * b'\\' as u64);
        // Each term flags a matching byte exactly at its lowest match (false positives only
        // above a true one), so the lowest flag of the three is the first special byte.
        let hits = (quote.wrapping_sub(ONES) & !quote)
            | (backslash.wrapping_sub(ONES) & !backslash)
            | (w.wrapping_sub(ONES * 0x20) & !w);
        let hits = hits & HIGH;
        if hits != 0 {
            return i + (hits.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while let Some(&c) = s.get(i) {
        if c == b'"' || c == b'\\' || c < 0x20 {
            return i;
        }
        i += 1;
    }
    i
}

#[cfg(test)]
mod tests;
