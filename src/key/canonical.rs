//! The canonical form's rules, written once: which body fields are left out, how numbers,
//! strings and objects are written, and the context around the body.
//!
//! Both ways to a key write through these functions: the value path ([`KeyContext::key`], over
//! a parsed `serde_json::Value`) and the byte path (`streaming`, one pass over the request
//! bytes). The byte path's parser decides only *what* to write (it sorts members itself, and
//! copies what needs no rewriting); every byte it writes follows the rules here, and its tests
//! hold its output equal to the value path's on a generated corpus.

use std::io::{self, Write};

use serde_json::{Number, Value};

use super::{KeyContext, KEY_FORMAT_VERSION};

/// Body fields that never affect the key: a streamed and a plain request share one entry, and
/// `metadata` names an end user, not the output.
pub(super) const IGNORED_BODY_FIELDS: [&str; 2] = ["stream", "metadata"];
/// Left out wherever it appears: prompt-caching breakpoints change billing, not the answer.
pub(super) const IGNORED_EVERYWHERE: &str = "cache_control";
/// Left out of each tool definition (the elements of the body's `tools`): some SDKs add it
/// only when they stream.
pub(super) const IGNORED_IN_TOOLS: &str = "eager_input_streaming";

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

/// `bytes` as lowercase hex into `out`, which holds exactly two characters per byte.
pub(super) fn hex_into(bytes: &[u8], out: &mut [u8]) {
    debug_assert_eq!(out.len(), bytes.len() * 2);
    for (b, pair) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        pair[0] = HEX_DIGITS[(b >> 4) as usize];
        pair[1] = HEX_DIGITS[(b & 0xf) as usize];
    }
}

/// The canonical form up to the body. Fields in sorted order, so the whole form is canonical
/// JSON too.
pub(super) fn write_prefix(ctx: &KeyContext, out: &mut impl Write) -> io::Result<()> {
    out.write_all(b"{\"anthropic_version\":")?;
    write_string_or_null(out, ctx.anthropic_version.as_deref())?;
    out.write_all(b",\"beta\":[")?;
    for (i, beta) in ctx.betas.iter().enumerate() {
        if i > 0 {
            out.write_all(b",")?;
        }
        write_string(out, beta)?;
    }
    out.write_all(b"],\"body\":")
}

/// The canonical form after the body.
pub(super) fn write_suffix(ctx: &KeyContext, out: &mut impl Write) -> io::Result<()> {
    out.write_all(b",\"credential\":")?;
    match &ctx.credential {
        Some(fingerprint) => {
            out.write_all(b"\"")?;
            out.write_all(&fingerprint.to_hex())?;
            out.write_all(b"\"")?;
        }
        None => out.write_all(b"null")?,
    }
    out.write_all(b",\"namespace\":")?;
    write_string(out, &ctx.namespace)?;
    out.write_all(b",\"path\":")?;
    write_string(out, &ctx.path)?;
    write!(out, ",\"v\":{KEY_FORMAT_VERSION}}}")
}

/// Writes the request body canonically, leaving out the top-level fields that never matter.
pub(super) fn write_body(out: &mut impl Write, body: &Value) -> io::Result<()> {
    match body {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map
                .iter()
                .filter(|(k, _)| !IGNORED_BODY_FIELDS.contains(&k.as_str()))
                .filter(|(k, _)| k.as_str() != IGNORED_EVERYWHERE)
                .collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            write_object(out, entries, Level::Body)
        }
        other => write_value(out, other),
    }
}

/// The body's `tools`: each definition without [`IGNORED_IN_TOOLS`].
fn write_tools(out: &mut impl Write, tools: &[Value]) -> io::Result<()> {
    out.write_all(b"[")?;
    for (i, tool) in tools.iter().enumerate() {
        if i > 0 {
            out.write_all(b",")?;
        }
        match tool {
            Value::Object(map) => write_object(
                out,
                sorted_members(map, Some(IGNORED_IN_TOOLS)),
                Level::Nested,
            )?,
            other => write_value(out, other)?,
        }
    }
    out.write_all(b"]")
}

/// An object's members in key order, less `cache_control` and `also_ignored`.
fn sorted_members<'a>(
    map: &'a serde_json::Map<String, Value>,
    also_ignored: Option<&str>,
) -> Vec<(&'a String, &'a Value)> {
    let mut entries: Vec<(&String, &Value)> = map
        .iter()
        .filter(|(k, _)| k.as_str() != IGNORED_EVERYWHERE && Some(k.as_str()) != also_ignored)
        .collect();
    entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
    entries
}

fn write_value(out: &mut impl Write, value: &Value) -> io::Result<()> {
    match value {
        Value::Null => out.write_all(b"null"),
        Value::Bool(true) => out.write_all(b"true"),
        Value::Bool(false) => out.write_all(b"false"),
        Value::Number(n) => write_number(out, n),
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            out.write_all(b"[")?;
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.write_all(b",")?;
                }
                write_value(out, item)?;
            }
            out.write_all(b"]")
        }
        Value::Object(map) => write_object(out, sorted_members(map, None), Level::Nested),
    }
}

/// Where an object stands: the body's own members include `tools`, whose definitions have
/// a rule of their own.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Level {
    Body,
    Nested,
}

fn write_object(
    out: &mut impl Write,
    entries: Vec<(&String, &Value)>,
    level: Level,
) -> io::Result<()> {
    out.write_all(b"{")?;
    for (i, (k, v)) in entries.into_iter().enumerate() {
        if i > 0 {
            out.write_all(b",")?;
        }
        write_string(out, k)?;
        out.write_all(b":")?;
        match (level, k.as_str(), v) {
            (Level::Body, "tools", Value::Array(tools)) => write_tools(out, tools)?,
            _ => write_value(out, v)?,
        }
    }
    out.write_all(b"}")
}

/// Equal numbers are written alike: an integral float is written as an integer (`1.0`, `1e0`
/// and `1` are all `1`; `1e17` is `100000000000000000`); other floats use the shortest form
/// that round-trips.
pub(super) fn write_number(out: &mut impl Write, n: &Number) -> io::Result<()> {
    if let Some(i) = n.as_i64() {
        return write!(out, "{i}");
    }
    if let Some(u) = n.as_u64() {
        return write!(out, "{u}");
    }
    write_float(out, n.as_f64().unwrap_or(f64::NAN))
}

/// The float branch of [`write_number`].
pub(super) fn write_float(out: &mut impl Write, f: f64) -> io::Result<()> {
    if f.fract() == 0.0 && f.abs() < 1e38 {
        write!(out, "{}", f as i128)
    } else {
        serde_json::to_writer(&mut *out, &f).map_err(io::Error::other)
    }
}

/// A string as serde_json writes it: a string with nothing to escape is copied as it stands.
pub(super) fn write_string(out: &mut impl Write, s: &str) -> io::Result<()> {
    if find_special(s.as_bytes(), 0) == s.len() {
        out.write_all(b"\"")?;
        out.write_all(s.as_bytes())?;
        out.write_all(b"\"")
    } else {
        serde_json::to_writer(&mut *out, s).map_err(io::Error::other)
    }
}

fn write_string_or_null(out: &mut impl Write, s: Option<&str>) -> io::Result<()> {
    match s {
        Some(s) => write_string(out, s),
        None => out.write_all(b"null"),
    }
}

/// A character as serde_json writes it inside a string: `"`, `\` and control characters are
/// escaped (`\b \t \n \f \r` short, the others `\u00xx`), everything else is UTF-8.
pub(super) fn write_escaped_char(out: &mut Vec<u8>, c: char) {
    let short = match c {
        '"' => b'"',
        '\\' => b'\\',
        '\u{8}' => b'b',
        '\t' => b't',
        '\n' => b'n',
        '\u{c}' => b'f',
        '\r' => b'r',
        c if (c as u32) < 0x20 => {
            let mut escape = *b"\\u0000";
            hex_into(&[c as u8], &mut escape[4..]);
            out.extend_from_slice(&escape);
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

/// The index of the first `"`, `\` or control byte in `s[from..]`, or `s.len()`: the bytes
/// serde_json escapes.
#[inline]
pub(super) fn find_special(s: &[u8], from: usize) -> usize {
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
