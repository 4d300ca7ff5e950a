//! The one pass itself: a JSON parser that writes the canonical form as it reads (sorted keys,
//! serde_json's escaping and numbers), and the small writers it uses.

use serde_json::Value;

use super::super::canonical::{
    find_special, write_escaped_char, write_float, write_number, IGNORED_BODY_FIELDS,
    IGNORED_EVERYWHERE, IGNORED_IN_TOOLS,
};
use super::{BodyFacts, KeyError, MAX_DEPTH, WRITE_TO_VEC};

/// Where a member's key is, for sorting: unescaped bytes, in the source when the key had no
/// escapes, else in `Parser::keys`.
#[derive(Clone, Copy)]
pub(super) struct Member {
    pub(super) key_start: usize,
    pub(super) key_end: usize,
    pub(super) key_decoded: bool,
    /// The member `"key":value` in `Parser::out`.
    pub(super) start: usize,
    pub(super) end: usize,
}

pub(super) struct Parser<'a> {
    pub(super) src: &'a [u8],
    pub(super) pos: usize,
    pub(super) depth: u32,
    pub(super) out: &'a mut Vec<u8>,
    pub(super) tmp: &'a mut Vec<u8>,
    pub(super) keys: &'a mut Vec<u8>,
    pub(super) members: &'a mut Vec<Member>,
    pub(super) facts: BodyFacts,
    /// Inside the value of the body's `tools`, whose definitions leave out `IGNORED_IN_TOOLS`.
    pub(super) in_tools: bool,
}

/// A string's content in the source, and whether it held escapes.
pub(super) struct RawString {
    pub(super) start: usize,
    pub(super) end: usize,
    pub(super) escaped: bool,
}

pub(super) fn key_bytes<'k>(src: &'k [u8], keys: &'k [u8], m: &Member) -> &'k [u8] {
    if m.key_decoded {
        &keys[m.key_start..m.key_end]
    } else {
        &src[m.key_start..m.key_end]
    }
}

impl Parser<'_> {
    #[inline]
    pub(super) fn peek(&self) -> Option<u8> {
        self.src.get(self.pos).copied()
    }

    pub(super) fn syntax(&self, what: &'static str) -> KeyError {
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
    pub(super) fn skip_ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\t' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    pub(super) fn value(&mut self) -> Result<(), KeyError> {
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

    pub(super) fn literal(&mut self, word: &'static [u8]) -> Result<(), KeyError> {
        let end = self.pos + word.len();
        if self.src.get(self.pos..end) != Some(word) {
            return Err(self.syntax("expected a value"));
        }
        self.pos = end;
        self.out.extend_from_slice(word);
        Ok(())
    }

    pub(super) fn enter(&mut self) -> Result<(), KeyError> {
        self.depth += 1;
        if self.depth >= MAX_DEPTH {
            return Err(KeyError::TooDeep { offset: self.pos });
        }
        Ok(())
    }

    pub(super) fn array(&mut self) -> Result<(), KeyError> {
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
    pub(super) fn object(&mut self, top: bool) -> Result<(), KeyError> {
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
                if top {
                    self.in_tools = self.key_is(key_start, key_end, key_decoded, b"tools");
                }
                self.value()?;
                if top {
                    self.in_tools = false;
                }
                let member = Member {
                    key_start,
                    key_end,
                    key_decoded,
                    start,
                    end: self.out.len(),
                };
                let keep = match top {
                    true => self.note_top_level(&member, value_start, value_src),
                    false => !self.ignored_nested(&member),
                };
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
    pub(super) fn reorder(&mut self, obj_start: usize, base: usize) {
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

    fn key_is(&self, start: usize, end: usize, decoded: bool, name: &[u8]) -> bool {
        let bytes = match decoded {
            true => &self.keys[start..end],
            false => &self.src[start..end],
        };
        bytes == name
    }

    /// Whether a member below the top level is left out of the key: `cache_control` anywhere,
    /// `eager_input_streaming` in a tool definition (an object right inside the body's `tools`).
    fn ignored_nested(&self, member: &Member) -> bool {
        let key = key_bytes(self.src, self.keys, member);
        key == IGNORED_EVERYWHERE.as_bytes()
            || (self.in_tools && self.depth == 3 && key == IGNORED_IN_TOOLS.as_bytes())
    }

    /// Notes a top-level member's facts; false when the member is left out of the key.
    pub(super) fn note_top_level(
        &mut self,
        member: &Member,
        value_start: usize,
        value_src: usize,
    ) -> bool {
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
            && key != IGNORED_EVERYWHERE.as_bytes()
    }

    /// The unescaped content of the (already validated) string whose content starts at `at`.
    pub(super) fn decoded_string_at(&self, at: usize) -> String {
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
    pub(super) fn string(&mut self) -> Result<RawString, KeyError> {
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
    pub(super) fn escape(&mut self) -> Result<(), KeyError> {
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
    pub(super) fn unicode_escape(&mut self) -> Result<char, KeyError> {
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

    pub(super) fn hex4(&mut self) -> Result<u32, KeyError> {
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
    pub(super) fn number(&mut self) -> Result<(), KeyError> {
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
            // An integer is its digits (no leading zeros: one lexeme per value), however long:
            // one too large for 64 bits is keyed exactly, never rounded to a float.
            let lexeme = &src[start..self.pos];
            self.out
                .extend_from_slice(if lexeme == b"-0" { b"0" } else { lexeme });
            return Ok(());
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
                    write_float(self.out, if negative { -f } else { f }).expect(WRITE_TO_VEC);
                    return Ok(());
                }
            }
        }
        match serde_json::from_slice::<Value>(&src[start..self.pos]) {
            Ok(Value::Number(n)) => {
                write_number(self.out, &n).expect(WRITE_TO_VEC);
                Ok(())
            }
            _ => Err(KeyError::NumberOutOfRange { offset: start }),
        }
    }

    #[inline]
    pub(super) fn skip_digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.pos += 1;
        }
    }
}

/// Powers of ten exact in an f64.
pub(super) const POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

/// ASCII digits (at most 19) as a number.
pub(super) fn parse_digits(digits: &[u8]) -> u64 {
    digits.iter().fold(0u64, |n, d| n * 10 + (d - b'0') as u64)
}

/// Unescapes the content of a string already validated by [`Parser::string`].
pub(super) fn decode_string(raw: &[u8], out: &mut Vec<u8>) {
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
