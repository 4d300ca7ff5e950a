//! The streaming key against the reference canonicaliser, and its edge cases.

use serde_json::Value;

use super::*;
use crate::key::canonical::find_special;
use crate::key::CredentialFingerprint;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn ctx() -> KeyContext {
    let mut ctx = KeyContext {
        anthropic_version: Some("2023-06-01".into()),
        ..KeyContext::new("/v1/messages")
    }
    .with_betas(["b-2,a-1"]);
    ctx.credential = Some(CredentialFingerprint::of(
        &crate::key::KeySecret::from_text("test"),
        "sk-test",
    ));
    ctx
}

/// The oracle: `serde_json::from_slice` + the Value-based canonical form. Panics with the
/// input on any difference in accept/reject, canonical bytes, key or facts.
fn check(ctx: &KeyContext, text: &[u8]) -> bool {
    let show = String::from_utf8_lossy(text);
    let oracle = serde_json::from_slice::<Value>(text);
    let mine = ctx.key_of_bytes(text);
    match (oracle, mine) {
        // A parsed Value holds an integer beyond 64 bits as a float: there the byte path, which
        // keys its digits, is right and the value path cannot be (see `big_integers_...`).
        (Ok(_), Ok(_)) if has_big_integer(text) => true,
        (Ok(value), Ok((key, facts))) => {
            let form = ctx.canonical_form_of_bytes(text).unwrap();
            assert_eq!(form, ctx.canonical_form(&value), "canonical form of {show}");
            assert_eq!(key, ctx.key(&value), "key of {show}");
            let model = value
                .get("model")
                .and_then(Value::as_str)
                .map(str::to_owned);
            assert_eq!(facts.model, model, "model of {show}");
            let stream = value.get("stream") == Some(&Value::Bool(true));
            assert_eq!(facts.stream, stream, "stream of {show}");
            true
        }
        (Err(_), Err(_)) => false,
        (Ok(_), Err(e)) => panic!("rejected what serde_json accepts: {show}: {e}"),
        (Err(e), Ok(_)) => panic!("accepted what serde_json rejects: {show}: {e}"),
    }
}

/// Whether `text` may hold an integer literal (no fraction, no exponent) beyond 64 bits: a
/// run of 19 or more digits that no `.`, `e` or digit comes before or after (digits inside
/// strings count too, which only skips a comparison now and then).
fn has_big_integer(text: &[u8]) -> bool {
    let before = |j: usize| j.checked_sub(1).map(|j| text[j]);
    let mut i = 0;
    while i < text.len() {
        let starts = text[i].is_ascii_digit()
            && match before(i) {
                Some(c) if c.is_ascii_digit() || b".eE".contains(&c) => false,
                Some(b'-' | b'+') => !matches!(before(i - 1), Some(b'e' | b'E')),
                _ => true,
            };
        if !starts {
            i += 1;
            continue;
        }
        let begin = i;
        while i < text.len() && text[i].is_ascii_digit() {
            i += 1;
        }
        if i - begin >= 19 && !matches!(text.get(i), Some(b'.' | b'e' | b'E')) {
            return true;
        }
    }
    false
}

struct Gen {
    rng: StdRng,
}

const KEYS: &[&str] = &[
    "a",
    "\\u0061",
    "b",
    "ab",
    "a\\u0062",
    "A",
    "\\\"",
    "#",
    "\\u0022",
    "!",
    "\\\\",
    "]",
    "\\/",
    "/",
    "",
    "é",
    "\\u00e9",
    "\\u00E9",
    "z",
    "\\ud83d\\ude00",
    "😀",
    "\\uffff",
    "stream",
    "metadata",
    "model",
    "\\u0073tream",
    "role",
    "content",
    "\\n",
    "\\u000a",
    "\\u001f",
    "\\t",
    "type",
    "text",
];

const NUMBERS: &[&str] = &[
    "0",
    "-0",
    "1",
    "-1",
    "1.0",
    "-0.0",
    "0.0",
    "1e0",
    "1E2",
    "1e+2",
    "1e-2",
    "0.1",
    "0.7",
    "1e400",
    "-1e400",
    "1e-400",
    "1e308",
    "1.7976931348623157e308",
    "1.8e308",
    "5e-324",
    "2.5e-324",
    "18446744073709551615",
    "18446744073709551616",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775808",
    "-9223372036854775809",
    "-18446744073709551616",
    "123456789012345678901234567890",
    "1e17",
    "1e22",
    "1e23",
    "1e37",
    "1e38",
    "1e39",
    "-1e38",
    "0.30000000000000004",
    "3.141592653589793238462643",
    "100000000000000000000000000000000000000",
    "99999999999999999999999999999999999999",
    "0e0",
    "0e99999999999",
    "1e-99999999999",
    "1e99999999999",
    "123.456e-7",
    "9007199254740993",
    "9007199254740993.0",
    "0.000000000000000000000000001",
    "1.5e1",
    "15e-1",
    "2.2250738585072014e-308",
    "4.35",
    "1234567.125",
    "0.1e1",
    "123456789012345",
    "1234567890123456.0",
    "12345678901234567.5e-3",
];

impl Gen {
    fn ws(&mut self) -> &'static str {
        match self.rng.random_range(0..10) {
            0 => " ",
            1 => "\n  ",
            2 => "\t",
            3 => "\r\n",
            _ => "",
        }
    }

    fn number(&mut self) -> String {
        if self.rng.random_bool(0.5) {
            return NUMBERS[self.rng.random_range(0..NUMBERS.len())].to_owned();
        }
        let mut s = String::new();
        if self.rng.random_bool(0.3) {
            s.push('-');
        }
        let int_digits = self.rng.random_range(1..22);
        for i in 0..int_digits {
            let lo = if i == 0 && int_digits > 1 { 1 } else { 0 };
            s.push((b'0' + self.rng.random_range(lo..10)) as char);
        }
        if self.rng.random_bool(0.5) {
            s.push('.');
            for _ in 0..self.rng.random_range(1..20) {
                s.push((b'0' + self.rng.random_range(0..10)) as char);
            }
        }
        if self.rng.random_bool(0.3) {
            s.push(if self.rng.random_bool(0.5) { 'e' } else { 'E' });
            match self.rng.random_range(0..3) {
                0 => s.push('-'),
                1 => s.push('+'),
                _ => {}
            }
            for _ in 0..self.rng.random_range(1..4) {
                s.push((b'0' + self.rng.random_range(0..10)) as char);
            }
        }
        s
    }

    fn string(&mut self) -> String {
        let mut s = String::from("\"");
        for _ in 0..self.rng.random_range(0..8) {
            let piece = match self.rng.random_range(0..24) {
                0 => "\\\"".to_owned(),
                1 => "\\\\".to_owned(),
                2 => "\\/".to_owned(),
                3 => ["\\b", "\\f", "\\n", "\\r", "\\t"][self.rng.random_range(0..5)].into(),
                4 => format!("\\u{:04x}", self.rng.random_range(0..0x20)),
                5 => format!("\\u{:04X}", self.rng.random_range(0x20..0xd800)),
                6 => format!("\\u{:04x}", self.rng.random_range(0xe000..0x10000)),
                7 => "\\ud83d\\ude00".into(),
                8 => "\\uD83D\\uDE00".into(),
                9 => "\\u0022\\u005c\\u002F".into(),
                10 => "é😀\u{7f}\u{80}\u{ffff}".into(),
                11 => "/".into(),
                12 => KEYS[self.rng.random_range(0..KEYS.len())].into(),
                _ => {
                    let n = self.rng.random_range(1..40);
                    (0..n)
                        .map(|_| self.rng.random_range(0x20u8..0x7f) as char)
                        .filter(|c| *c != '"' && *c != '\\')
                        .collect()
                }
            };
            s.push_str(&piece);
        }
        s.push('"');
        s
    }

    fn value(&mut self, depth: u32) -> String {
        let nest = if depth > 6 { 0 } else { 2 };
        match self.rng.random_range(0..(6 + nest)) {
            0 => ["null", "true", "false"][self.rng.random_range(0..3)].to_owned(),
            1 | 2 => self.number(),
            3..=5 => self.string(),
            6 => self.array(depth),
            _ => self.object(depth),
        }
    }

    fn array(&mut self, depth: u32) -> String {
        let n = self.rng.random_range(0..5);
        let items: Vec<String> = (0..n)
            .map(|_| format!("{}{}{}", self.ws(), self.value(depth + 1), self.ws()))
            .collect();
        format!("[{}{}]", items.join(","), self.ws())
    }

    fn object(&mut self, depth: u32) -> String {
        let n = self.rng.random_range(0..7);
        let members: Vec<String> = (0..n)
            .map(|_| {
                let key = if self.rng.random_bool(0.8) {
                    format!("\"{}\"", KEYS[self.rng.random_range(0..KEYS.len())])
                } else {
                    self.string()
                };
                let value = match key.as_str() {
                    "\"stream\"" if self.rng.random_bool(0.5) => "true".to_owned(),
                    _ => self.value(depth + 1),
                };
                format!(
                    "{}{key}{}:{}{value}{}",
                    self.ws(),
                    self.ws(),
                    self.ws(),
                    self.ws()
                )
            })
            .collect();
        format!("{{{}{}}}", members.join(","), self.ws())
    }

    fn body(&mut self) -> String {
        let body = match self.rng.random_range(0..10) {
            0 => self.value(0),
            _ => self.object(0),
        };
        format!("{}{body}{}", self.ws(), self.ws())
    }
}

#[test]
fn streaming_key_matches_the_value_oracle_on_generated_bodies() {
    let ctx = ctx();
    let mut gen = Gen {
        rng: StdRng::seed_from_u64(6),
    };
    let mut accepted = 0;
    for _ in 0..5000 {
        let body = gen.body();
        if check(&ctx, body.as_bytes()) {
            accepted += 1;
        }
    }
    // Out-of-range numbers make some bodies invalid; most must be valid to mean anything.
    assert!(accepted > 3000, "only {accepted} bodies accepted");
}

#[test]
fn streaming_key_matches_the_oracle_on_mutated_bodies() {
    let ctx = ctx();
    let mut gen = Gen {
        rng: StdRng::seed_from_u64(7),
    };
    const BYTES: &[u8] = b"{}[]\",:\\ u0eE.+-1a\x00\x1f\xff\xc3\xa9tn";
    for _ in 0..5000 {
        let mut body = gen.body().into_bytes();
        for _ in 0..gen.rng.random_range(1..3) {
            let at = gen.rng.random_range(0..=body.len());
            match gen.rng.random_range(0..3) {
                0 => body.truncate(at),
                1 => body.insert(at, BYTES[gen.rng.random_range(0..BYTES.len())]),
                _ if at < body.len() => {
                    body.remove(at);
                }
                _ => {}
            }
        }
        check(&ctx, &body);
    }
}

#[test]
fn whitespace_and_member_order_do_not_change_the_streaming_key() {
    let ctx = ctx();
    let mut gen = Gen {
        rng: StdRng::seed_from_u64(8),
    };
    for _ in 0..500 {
        let Ok(value) = serde_json::from_str::<Value>(&gen.body()) else {
            continue;
        };
        let compact = serde_json::to_vec(&value).unwrap();
        let pretty = serde_json::to_vec_pretty(&value).unwrap();
        let (a, _) = ctx.key_of_bytes(&compact).unwrap();
        let (b, _) = ctx.key_of_bytes(&pretty).unwrap();
        assert_eq!(a, b);
        // Not `ctx.key(&value)`: serde_json's float parsing is not always correctly
        // rounded, so a float need not survive its own round trip; compare bytes to bytes.
        check(&ctx, &compact);
        check(&ctx, &pretty);
    }
    let (a, _) = ctx
        .key_of_bytes(br#"{"b":1,"a":[1,{"y":2,"x":1}]}"#)
        .unwrap();
    let (b, _) = ctx
        .key_of_bytes(b" {\n \"a\" : [ 1 , { \"x\":1e0, \"y\":2.0 } ] ,\t\"b\":1.00 }\r\n")
        .unwrap();
    assert_eq!(a, b);
}

#[test]
fn streaming_handles_the_listed_edge_cases() {
    let ctx = ctx();
    for text in [
        r#"{"model":"claude","messages":[{"role":"user","content":"hi"}],"max_tokens":10}"#,
        r#"{"a":1,"a":2}"#,
        r#"{"b":1,"a":2,"b":3,"a":4}"#,
        r#"{"\u0061":1,"a":2}"#,
        r#"{"a":2,"\u0061":1}"#,
        r##"{"\"":1,"#":2}"##,
        r#"{"\u00e9":1,"é":2,"e":3}"#,
        r#"{"x":"\ud83d\ude00 \u00e9 \/ \u0000 \u001F \u007f \" \\"}"#,
        r#"{"stream":true,"stream":false}"#,
        r#"{"stream":false,"stream":true,"metadata":{"user_id":"u"}}"#,
        r#"{"model":"a","model":"b"}"#,
        r#"{"model":"a","model":1}"#,
        r#"{"model":"a\nb\u00e9"}"#,
        r#"{"stream":"true"}"#,
        r#"{"tools":[{"stream":true}]}"#,
        r#"{"model":null}"#,
        r#"{}"#,
        r#"{"stream":true}"#,
        r#"[{"b":1,"a":2}]"#,
        r#""just a string""#,
        "1",
        "-0",
        "null",
        "[]",
        "[1,1.0,1e0,-0,-0.0,1E2,0.1,1e400]",
        "[1,1.0,1e0,-0,-0.0,1E2,0.1,1e-400,123456789012345678901234567890]",
        "[-9223372036854775809,18446744073709551616,1e38,1e37,0.7,-0.7]",
    ] {
        check(&ctx, text.as_bytes());
    }
}

#[test]
fn context_strings_are_escaped_like_the_reference() {
    let mut ctx = ctx().with_betas(["q\"uote", "tab\there"]);
    ctx.namespace = "tenant \"é\" \u{1}".into();
    ctx.path = "/v1/messages?x=\\".into();
    ctx.anthropic_version = None;
    check(&ctx, br#"{"model":"m","b":[1,{"z":null,"a":true}]}"#);
    ctx.credential = None;
    check(&ctx, br#"{"model":"m"}"#);
}

#[test]
fn facts_are_the_top_level_model_and_stream() {
    let ctx = ctx();
    let facts = |text: &str| ctx.key_of_bytes(text.as_bytes()).unwrap().1;
    let f = facts(r#"{"model":"claude-x","stream":true}"#);
    assert_eq!(f.model.as_deref(), Some("claude-x"));
    assert!(f.stream);
    assert!(!facts(r#"{"model":"m","stream":false}"#).stream);
    assert!(!facts(r#"{"model":"m","stream":"true"}"#).stream);
    assert!(!facts(r#"{"model":"m","tools":[{"stream":true}],"x":{"stream":true}}"#).stream);
    assert!(!facts(r#"[{"stream":true}]"#).stream);
    assert_eq!(facts(r#"{"stream":true}"#).model, None);
    assert_eq!(facts(r#"{"model":7}"#).model, None);
    assert_eq!(facts(r#"{"model":{"name":"m"}}"#).model, None);
    assert_eq!(facts(r#"{"x":{"model":"m"}}"#).model, None);
    assert_eq!(
        facts(r#"{"m\u006fdel" : "a\u00e9"}"#).model.as_deref(),
        Some("aé")
    );
    assert!(facts(r#"{"str\u0065am":true}"#).stream);
    // stream and metadata never change the key; a nested stream does.
    let key = |text: &str| ctx.key_of_bytes(text.as_bytes()).unwrap().0;
    assert_eq!(
        key(r#"{"model":"m"}"#),
        key(r#"{"stream":true,"model":"m","metadata":{"user_id":"u"}}"#)
    );
    assert_ne!(key(r#"{"x":{}}"#), key(r#"{"x":{"stream":true}}"#));
}

#[test]
fn streaming_rejects_exactly_what_serde_json_rejects() {
    let ctx = ctx();
    let mut cases: Vec<Vec<u8>> = [
        "",
        " ",
        "{",
        "}",
        "{\"a\"",
        "{\"a\":",
        "{\"a\":1",
        "{\"a\":1,}",
        "[1,]",
        "[1 2]",
        "{\"a\" 1}",
        "{a:1}",
        "{\"a\":1}x",
        "{\"a\":1} {}",
        "[1]]",
        "\"abc",
        "\"a\\\"",
        "\"\\ud83d\"",
        "\"\\ude00\"",
        "\"\\ud83d\\u0041\"",
        "\"\\ud83dx\"",
        "\"\\ud83d\\n\"",
        "\"\\uD83D\\uD83D\"",
        "\"\\u12\"",
        "\"\\u12g4\"",
        "\"\\x\"",
        "\"\\'\"",
        "\"a\tb\"",
        "\"a\nb\"",
        "\"\u{1}\"",
        "NaN",
        "nan",
        "Infinity",
        "-Infinity",
        "01",
        "-01",
        "00",
        "+1",
        ".5",
        "1.",
        "1.e5",
        "1e",
        "1e+",
        "-",
        "--1",
        "0x10",
        "1e400",
        "-1e400",
        "1E309",
        "tru",
        "truex",
        "nul",
        "fals",
        "True",
        "[true false]",
        "{\"a\":1;\"b\":2}",
        "\u{feff}{}",
        "[1,,2]",
        "[,]",
        "{,}",
        "{\"a\":1,,\"b\":2}",
        "\"\\u0000\"",
        "{}\0",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    cases.push(b"\"\xff\"".to_vec());
    cases.push(b"{\"a\":\"\xc3\"}".to_vec());
    cases.push(b"{\"\xed\xa0\x80\":1}".to_vec());
    cases.push(b"{} \xff".to_vec());
    for depth in [126, 127, 128, 129, 200] {
        let mut s = "[".repeat(depth) + &"]".repeat(depth);
        cases.push(s.clone().into_bytes());
        s = "{\"a\":".repeat(depth) + "1" + &"}".repeat(depth);
        cases.push(s.into_bytes());
    }
    let mut rejected = 0;
    for case in &cases {
        if !check(&ctx, case) {
            rejected += 1;
            let error = ctx.key_of_bytes(case).unwrap_err();
            assert!(!error.to_string().is_empty());
        }
    }
    assert!(rejected > 60, "only {rejected} rejected");
    // The depth limit is serde_json's: 127 levels pass, 128 fail.
    let deep = |n: usize| "[".repeat(n) + &"]".repeat(n);
    assert!(ctx.key_of_bytes(deep(127).as_bytes()).is_ok());
    assert!(matches!(
        ctx.key_of_bytes(deep(128).as_bytes()),
        Err(KeyError::TooDeep { .. })
    ));
}

#[test]
fn errors_say_where() {
    let ctx = ctx();
    let err = |text: &[u8]| ctx.key_of_bytes(text).unwrap_err();
    assert_eq!(
        err(br#"{"a":1,}"#),
        KeyError::Syntax {
            what: "trailing comma",
            offset: 7
        }
    );
    assert_eq!(
        err(b"{\"a\":\"\xff\"}"),
        KeyError::InvalidUtf8 { offset: 6 }
    );
    assert_eq!(err(b"[1e400]"), KeyError::NumberOutOfRange { offset: 1 });
    assert_eq!(
        err(b"{\"a\":1} x"),
        KeyError::Syntax {
            what: "trailing characters",
            offset: 8
        }
    );
    assert!(err(b"{\"a\":").to_string().contains("end of input"));
}

#[test]
fn find_special_finds_the_first_special_byte() {
    let mut rng = StdRng::seed_from_u64(9);
    for _ in 0..2000 {
        let n = rng.random_range(0..40);
        let s: Vec<u8> = (0..n)
            .map(|_| match rng.random_range(0..12) {
                0 => b'"',
                1 => b'\\',
                2 => rng.random_range(0..0x20),
                3 => rng.random_range(0x80..=0xff),
                _ => rng.random_range(0x20..0x80),
            })
            .collect();
        let from = rng.random_range(0..=n);
        let expected = (from..n)
            .find(|&i| s[i] == b'"' || s[i] == b'\\' || s[i] < 0x20)
            .unwrap_or(n);
        assert_eq!(find_special(&s, from), expected, "{s:?} from {from}");
    }
}

#[test]
fn big_integers_are_keyed_by_their_digits() {
    let ctx = ctx();
    let key = |n: &str| {
        let body = format!(r#"{{"model":"m","seed":{n}}}"#);
        ctx.key_of_bytes(body.as_bytes()).unwrap().0
    };
    assert_ne!(
        key("123456789012345678901234567890"),
        key("123456789012345678901234567891"),
        "two numbers that differ in the 30th digit"
    );
    assert_ne!(key("-9223372036854775809"), key("-9223372036854775810"));
    assert_eq!(key("18446744073709551616"), key("18446744073709551616"));
    assert_eq!(key("-0"), key("0"));
}

#[test]
fn cache_control_and_eager_input_streaming_are_left_out_of_the_key() {
    let ctx = ctx();
    let plain = br#"{"model":"m","system":[{"type":"text","text":"s"}],"tools":[{"name":"t","input_schema":{"type":"object"}}],"messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}]}"#;
    let marked = br#"{"model":"m","cache_control":{"type":"ephemeral"},"system":[{"type":"text","text":"s","cache_control":{"type":"ephemeral"}}],"tools":[{"name":"t","eager_input_streaming":true,"input_schema":{"type":"object"},"cache_control":{"type":"ephemeral","ttl":"1h"}}],"messages":[{"role":"user","content":[{"type":"text","text":"hi","cache_control":{"type":"ephemeral"}}]}]}"#;
    let (a, _) = ctx.key_of_bytes(plain).unwrap();
    let (b, _) = ctx.key_of_bytes(marked).unwrap();
    assert_eq!(a, b);
    // Both paths agree.
    check(&ctx, marked);
    // eager_input_streaming counts anywhere but in a tool definition.
    let elsewhere = br#"{"model":"m","system":[{"type":"text","text":"s"}],"tools":[{"name":"t","input_schema":{"type":"object","eager_input_streaming":true}}],"messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}]}"#;
    assert_ne!(a, ctx.key_of_bytes(elsewhere).unwrap().0);
    check(&ctx, elsewhere);
}
