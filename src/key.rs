//! The cache key: blake3 over a canonical form of everything that decides the answer.
//!
//! The canonical form is itself a JSON object (so `fallthrough key` can print it and diff two):
//! `{"v":1,"path":…,"anthropic_version":…,"beta":[…],"namespace":…,"credential":…,"body":…}`,
//! written with object keys sorted at every depth, no insignificant whitespace, and equal
//! numbers written alike. `stream` and `metadata` are left out of the body: a streamed and a
//! plain request share one entry, and `metadata` names an end user, not the output.

use std::fmt;
use std::io::Write;
use std::str::FromStr;

use serde_json::Value;

mod canonical;
pub mod secret;
mod streaming;

pub use secret::KeySecret;
pub use streaming::{BodyFacts, KeyError};

/// Bumped whenever the canonical form changes, so old entries are never served under new rules.
pub const KEY_FORMAT_VERSION: u64 = 2;

/// A 32-byte blake3 digest, shown as 64 lowercase hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey(pub [u8; 32]);

impl CacheKey {
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The 64 lowercase hex characters, without allocating (the proxy's hot path sends them
    /// in a header).
    pub fn to_hex(&self) -> [u8; 64] {
        let mut out = [0u8; 64];
        canonical::hex_into(&self.0, &mut out);
        out
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hex = self.to_hex();
        f.write_str(std::str::from_utf8(&hex).expect("hex is ASCII"))
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CacheKey({self})")
    }
}

/// Why a string is not a key.
#[derive(Debug, thiserror::Error)]
#[error("a cache key is 64 hex characters")]
pub struct ParseKeyError;

impl FromStr for CacheKey {
    type Err = ParseKeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        hex32(s).map(CacheKey).ok_or(ParseKeyError)
    }
}

/// `bytes` as lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    let mut out = vec![0u8; bytes.len() * 2];
    canonical::hex_into(bytes, &mut out);
    String::from_utf8(out).expect("hex is ASCII")
}

/// 32 bytes from their 64 hex characters (either case): keys, token hashes, key secrets.
pub(crate) fn hex32(s: &str) -> Option<[u8; 32]> {
    let s = s.as_bytes();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        out[i] = hex_digit(pair[0])? << 4 | hex_digit(pair[1])?;
    }
    Some(out)
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// A one-way fingerprint of a credential: partitions the cache by API key without keeping it.
/// Keyed with the cache's [`KeySecret`], so that a key shown to anyone cannot be used to test
/// guesses of the credential offline.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CredentialFingerprint([u8; 16]);

/// What a fingerprint stands for; the two never collide, whatever the bytes.
#[derive(Clone, Copy)]
enum Partition {
    /// A credential sent upstream, as its raw bytes.
    Credential = 0,
    /// The name an access token admitted its caller as.
    TokenName = 1,
}

impl CredentialFingerprint {
    pub fn of(secret: &KeySecret, credential: &str) -> Self {
        Self::of_bytes(secret, credential.as_bytes())
    }

    /// The fingerprint of a credential's raw bytes: one that is not valid header text still
    /// gets a partition of its own, never another credential's or "none".
    pub fn of_bytes(secret: &KeySecret, credential: &[u8]) -> Self {
        Self::keyed(secret, Partition::Credential, credential)
    }

    /// The partition of a caller admitted by an access token: by the token's name, so that a
    /// token can be replaced without losing its entries, and two tokens never share.
    pub fn of_token_name(secret: &KeySecret, name: &str) -> Self {
        Self::keyed(secret, Partition::TokenName, name.as_bytes())
    }

    fn keyed(secret: &KeySecret, what: Partition, bytes: &[u8]) -> Self {
        let mut hasher = blake3::Hasher::new_keyed(&secret.0);
        hasher.update(&[what as u8]);
        hasher.update(bytes);
        let mut out = [0u8; 16];
        out.copy_from_slice(&hasher.finalize().as_bytes()[..16]);
        CredentialFingerprint(out)
    }

    /// The 32 lowercase hex characters, as the canonical form holds them.
    pub fn to_hex(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        canonical::hex_into(&self.0, &mut out);
        out
    }
}

impl fmt::Display for CredentialFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hex = self.to_hex();
        f.write_str(std::str::from_utf8(&hex).expect("hex is ASCII"))
    }
}

impl fmt::Debug for CredentialFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CredentialFingerprint({self})")
    }
}

/// Everything besides the body that goes into a key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyContext {
    /// Endpoint path, e.g. `/v1/messages`.
    pub path: String,
    /// The `anthropic-version` header, if sent.
    pub anthropic_version: Option<String>,
    /// `anthropic-beta` values, split on commas, trimmed, sorted and deduplicated.
    pub betas: Vec<String>,
    /// `x-fallthrough-namespace`, or the configured default (empty by default).
    pub namespace: String,
    /// `None` when the cache is shared across credentials, or no credential is sent.
    pub credential: Option<CredentialFingerprint>,
}

impl KeyContext {
    /// A context for `path` with nothing else set.
    pub fn new(path: impl Into<String>) -> Self {
        KeyContext {
            path: path.into(),
            ..Default::default()
        }
    }

    /// Adds `anthropic-beta` header values (each may be a comma-separated list).
    pub fn with_betas<'a>(mut self, values: impl IntoIterator<Item = &'a str>) -> Self {
        for value in values {
            for beta in value.split(',').map(str::trim).filter(|b| !b.is_empty()) {
                self.betas.push(beta.to_owned());
            }
        }
        self.betas.sort();
        self.betas.dedup();
        self
    }

    /// The key of `body` (a Messages request) in this context. A parsed `Value` holds an
    /// integer beyond 64 bits as a float, so such integers are keyed as that float here;
    /// [`Self::key_of_bytes`] (what the engine uses) keys their exact digits.
    pub fn key(&self, body: &Value) -> CacheKey {
        let mut hasher = blake3::Hasher::new();
        let mut writer = HashWriter(&mut hasher);
        self.write_canonical(body, &mut writer)
            .expect("hashing never fails");
        CacheKey(*hasher.finalize().as_bytes())
    }

    /// The canonical form as a string: what the key hashes (for `fallthrough key`).
    pub fn canonical_form(&self, body: &Value) -> String {
        let mut out = Vec::with_capacity(256);
        self.write_canonical(body, &mut out)
            .expect("writing to a Vec never fails");
        String::from_utf8(out).expect("canonical JSON is UTF-8")
    }

    /// The canonical form as a JSON value, for field-by-field comparison.
    pub fn canonical_value(&self, body: &Value) -> Value {
        serde_json::from_str(&self.canonical_form(body)).expect("canonical form is JSON")
    }

    fn write_canonical(&self, body: &Value, out: &mut impl Write) -> std::io::Result<()> {
        canonical::write_prefix(self, out)?;
        canonical::write_body(out, body)?;
        canonical::write_suffix(self, out)
    }
}

/// The body part of the canonical form alone (object keys sorted at every depth, equal numbers
/// written alike, `stream` and `metadata` left out): what decides the answer, for a fake
/// upstream that must answer equal requests alike.
pub fn canonical_body(body: &Value) -> String {
    let mut out = Vec::with_capacity(256);
    canonical::write_body(&mut out, body).expect("writing to a Vec never fails");
    String::from_utf8(out).expect("canonical JSON is UTF-8")
}

/// One place where two canonical forms differ.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Difference {
    /// Where, e.g. `body.messages[0].content` or `anthropic_version`.
    pub path: String,
    /// The value on each side; `None` where the field is absent.
    pub left: Option<Value>,
    pub right: Option<Value>,
}

/// Every field that differs between two canonical forms (as [`KeyContext::canonical_value`]
/// gives them): the answer to "why did this miss?".
pub fn diff(left: &Value, right: &Value) -> Vec<Difference> {
    let mut out = Vec::new();
    diff_at(String::new(), left, right, &mut out);
    out
}

fn diff_at(path: String, left: &Value, right: &Value, out: &mut Vec<Difference>) {
    let join = |key: &str| match path.is_empty() {
        true => key.to_owned(),
        false => format!("{path}.{key}"),
    };
    match (left, right) {
        (Value::Object(l), Value::Object(r)) => {
            let keys: std::collections::BTreeSet<&String> = l.keys().chain(r.keys()).collect();
            for key in keys {
                match (l.get(key), r.get(key)) {
                    (Some(a), Some(b)) => diff_at(join(key), a, b, out),
                    (a, b) => out.push(Difference {
                        path: join(key),
                        left: a.cloned(),
                        right: b.cloned(),
                    }),
                }
            }
        }
        (Value::Array(l), Value::Array(r)) if l.len() == r.len() => {
            for (i, (a, b)) in l.iter().zip(r).enumerate() {
                diff_at(format!("{path}[{i}]"), a, b, out);
            }
        }
        (a, b) if a != b => out.push(Difference {
            path,
            left: Some(a.clone()),
            right: Some(b.clone()),
        }),
        _ => {}
    }
}

struct HashWriter<'a>(&'a mut blake3::Hasher);

impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx() -> KeyContext {
        KeyContext {
            anthropic_version: Some("2023-06-01".into()),
            ..KeyContext::new("/v1/messages")
        }
    }

    fn key_of(text: &str) -> CacheKey {
        ctx().key(&serde_json::from_str(text).unwrap())
    }

    #[test]
    fn key_order_and_whitespace_do_not_matter() {
        let a =
            key_of(r#"{"model":"m","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#);
        let b = key_of(
            r#"{ "messages" : [ { "content":"hi", "role":"user" } ], "max_tokens":10, "model":"m" }"#,
        );
        assert_eq!(a, b);
    }

    #[test]
    fn equal_numbers_are_one_number() {
        let a = key_of(r#"{"model":"m","temperature":1,"max_tokens":10}"#);
        let b = key_of(r#"{"model":"m","temperature":1.0,"max_tokens":10}"#);
        let c = key_of(r#"{"model":"m","temperature":1e0,"max_tokens":1e1}"#);
        assert_eq!(a, b);
        assert_eq!(a, c);
        let d = key_of(r#"{"model":"m","temperature":0.5,"max_tokens":10}"#);
        let e = key_of(r#"{"model":"m","temperature":5e-1,"max_tokens":10}"#);
        assert_eq!(d, e);
        assert_ne!(a, d);
    }

    #[test]
    fn stream_and_metadata_are_left_out() {
        let a = key_of(r#"{"model":"m","messages":[]}"#);
        let b = key_of(r#"{"model":"m","messages":[],"stream":true,"metadata":{"user_id":"u1"}}"#);
        assert_eq!(a, b);
        // Only at the top level: a nested `stream` field is content.
        let c = key_of(r#"{"model":"m","messages":[],"tools":[{"stream":true}]}"#);
        let d = key_of(r#"{"model":"m","messages":[],"tools":[{}]}"#);
        assert_ne!(c, d);
    }

    #[test]
    fn content_differences_give_different_keys() {
        let base = key_of(r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#);
        for other in [
            r#"{"model":"n","messages":[{"role":"user","content":"hi"}]}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"hi "}]}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0}"#,
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}]}"#,
        ] {
            assert_ne!(base, key_of(other), "{other}");
        }
        // Array order is significant.
        let a = key_of(r#"{"model":"m","stop_sequences":["a","b"]}"#);
        let b = key_of(r#"{"model":"m","stop_sequences":["b","a"]}"#);
        assert_ne!(a, b);
    }

    #[test]
    fn context_fields_partition_keys() {
        let body = json!({"model":"m","messages":[]});
        let base = ctx().key(&body);
        let mut other = ctx();
        other.path = "/v1/messages/count_tokens".into();
        assert_ne!(base, other.key(&body));
        let mut other = ctx();
        other.anthropic_version = Some("2024-01-01".into());
        assert_ne!(base, other.key(&body));
        let mut other = ctx();
        other.namespace = "tenant-a".into();
        assert_ne!(base, other.key(&body));
        let mut other = ctx();
        other.credential = Some(CredentialFingerprint::of(
            &KeySecret::from_text("test"),
            "sk-ant-1",
        ));
        let with_one = other.key(&body);
        assert_ne!(base, with_one);
        other.credential = Some(CredentialFingerprint::of(
            &KeySecret::from_text("test"),
            "sk-ant-2",
        ));
        assert_ne!(with_one, other.key(&body));
        let other = ctx().with_betas(["tools-2024"]);
        assert_ne!(base, other.key(&body));
    }

    #[test]
    fn betas_are_sorted_and_deduplicated() {
        let body = json!({"model":"m"});
        let a = ctx().with_betas(["b-2, a-1"]).key(&body);
        let b = ctx().with_betas(["a-1", "b-2", "a-1"]).key(&body);
        assert_eq!(a, b);
    }

    #[test]
    fn canonical_form_never_holds_the_credential() {
        let mut c = ctx();
        c.credential = Some(CredentialFingerprint::of(
            &KeySecret::from_text("test"),
            "sk-ant-secret-value",
        ));
        let form = c.canonical_form(&json!({"model":"m"}));
        assert!(!form.contains("sk-ant-secret-value"));
        assert!(form.contains(&c.credential.unwrap().to_string()));
    }

    #[test]
    fn canonical_form_is_sorted_compact_json() {
        let form = ctx().canonical_form(&json!({"z":1,"a":{"y":[1.5,{"b":1,"a":2}],"x":null}}));
        assert_eq!(
            form,
            r#"{"anthropic_version":"2023-06-01","beta":[],"body":{"a":{"x":null,"y":[1.5,{"a":2,"b":1}]},"z":1},"credential":null,"namespace":"","path":"/v1/messages","v":2}"#
        );
    }

    #[test]
    fn diff_names_the_fields_that_differ() {
        let a = ctx()
            .canonical_value(&json!({"model":"m","temperature":1,"messages":[{"content":"a"}]}));
        let mut other = ctx();
        other.namespace = "x".into();
        let b = other.canonical_value(
            &json!({"model":"m","temperature":1.0,"messages":[{"content":"b"}],"top_k":5}),
        );
        let paths: Vec<String> = diff(&a, &b).into_iter().map(|d| d.path).collect();
        assert_eq!(
            paths,
            ["body.messages[0].content", "body.top_k", "namespace"]
        );
        assert!(diff(&a, &a).is_empty());
    }

    #[test]
    fn key_round_trips_through_hex() {
        let k = key_of(r#"{"model":"m"}"#);
        let hex = k.to_string();
        assert_eq!(hex.len(), 64);
        assert!(hex
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)));
        assert_eq!(hex.parse::<CacheKey>().unwrap(), k);
        assert!("xyz".parse::<CacheKey>().is_err());
        assert!(hex.replace('a', "g").parse::<CacheKey>().is_err() || !hex.contains('a'));
    }
}
