//! A request made ready for every later step: its body checked, its key computed in one pass,
//! its headers with the defaults they go upstream with.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use serde_json::Value;

use crate::error::Error;
use crate::key::{CacheKey, CredentialFingerprint, KeyContext};

use super::{
    Controls, Engine, FlightKey, Request, ANTHROPIC_BETA, ANTHROPIC_VERSION,
    DEFAULT_ANTHROPIC_VERSION, X_API_KEY,
};

/// A request after parsing: what every step below needs.
pub(crate) struct Prepared {
    pub(super) path: String,
    /// The body as the caller sent it: valid JSON, an object with a string `model`.
    pub(super) body: Bytes,
    pub(super) model: String,
    pub(super) ctx: KeyContext,
    pub(super) key: CacheKey,
    pub(super) headers: HeaderMap,
    pub(super) controls: Controls,
    /// The body asks for `"stream": true`.
    pub(super) stream: bool,
}

impl Engine {
    /// Keys the request in one pass over its bytes (no JSON tree is built on the hit path).
    pub(super) fn prepare(&self, request: Request) -> Result<Prepared, Error> {
        // Headers are left as the caller sent them: the defaults (credential, version) are
        // keyed as if present and added only when a request goes upstream.
        let headers = request.headers;
        let path = sorted_query(request.path);
        let ctx = self.key_context(&path, &headers, request.namespace, request.partition);
        let (key, facts) = ctx
            .key_of_bytes(&request.body)
            .map_err(|e| Error::InvalidRequest(format!("the body is not valid JSON: {e}")))?;
        let Some(model) = facts.model else {
            let is_object = request.body.trim_ascii_start().first() == Some(&b'{');
            return Err(Error::InvalidRequest(match is_object {
                true => "model: field required".into(),
                false => "the body must be a JSON object".into(),
            }));
        };
        Ok(Prepared {
            path,
            body: request.body,
            model,
            ctx,
            key,
            headers,
            controls: request.controls,
            stream: facts.stream,
        })
    }

    /// A request's headers as sent upstream: the caller's, with the defaults filled in.
    pub(super) fn upstream_headers(&self, headers: &HeaderMap) -> HeaderMap {
        let mut headers = headers.clone();
        self.add_defaults(&mut headers);
        headers
    }

    pub(super) fn add_credential(&self, headers: &mut HeaderMap) {
        let has_credential =
            headers.contains_key(&X_API_KEY) || headers.contains_key(http::header::AUTHORIZATION);
        if let (false, Some(credential)) = (has_credential, &self.credential) {
            headers.insert(X_API_KEY, credential.clone());
        }
    }

    pub(super) fn add_defaults(&self, headers: &mut HeaderMap) {
        self.add_credential(headers);
        if !headers.contains_key(&ANTHROPIC_VERSION) {
            headers.insert(
                ANTHROPIC_VERSION,
                HeaderValue::from_static(DEFAULT_ANTHROPIC_VERSION),
            );
        }
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }

    pub(super) fn key_context(
        &self,
        path: &str,
        headers: &HeaderMap,
        namespace: Option<String>,
        partition: Option<String>,
    ) -> KeyContext {
        let secret = &self.key_secret;
        let credential = match (partition, sent_credentials(headers)) {
            _ if self.config.shared_across_credentials => None,
            (Some(name), _) => Some(CredentialFingerprint::of_token_name(secret, &name)),
            (None, Some(sent)) => Some(CredentialFingerprint::of_bytes(secret, &sent)),
            (None, None) => self.credential_fingerprint,
        };
        let anthropic_version = match headers.get(&ANTHROPIC_VERSION) {
            None => Some(DEFAULT_ANTHROPIC_VERSION),
            Some(v) => v.to_str().ok(),
        };
        KeyContext {
            path: path.to_owned(),
            anthropic_version: anthropic_version.map(str::to_owned),
            betas: Vec::new(),
            namespace: namespace.unwrap_or_else(|| self.config.namespace.clone()),
            credential,
        }
        .with_betas(
            headers
                .get_all(&ANTHROPIC_BETA)
                .iter()
                .filter_map(|v| v.to_str().ok()),
        )
    }
}

impl Prepared {
    pub(super) fn flight_key(&self) -> FlightKey {
        (self.key, self.controls)
    }

    /// The body as a JSON tree: only the miss path needs one.
    pub(super) fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_default()
    }

    /// The body as sent upstream for the request's own model: byte for byte when its
    /// `stream` already says what the call asks (`stream`); otherwise with `"stream": true` set
    /// or `stream` removed (a plain fetch, a background refresh).
    pub(super) fn body(&self, stream: bool) -> Bytes {
        if self.stream == stream {
            return self.body.clone();
        }
        let mut json = self.json();
        set_stream(&mut json, stream);
        Bytes::from(json.to_string())
    }

    /// The key and body of this request sent to `model` instead (a fallback), asking for a
    /// stream or not.
    pub(super) fn for_model(&self, model: &str, stream: bool) -> (CacheKey, Bytes) {
        let mut json = self.json();
        json["model"] = Value::String(model.to_owned());
        let key = self.ctx.key(&json);
        set_stream(&mut json, stream);
        (key, Bytes::from(json.to_string()))
    }
}

fn set_stream(json: &mut Value, stream: bool) {
    match stream {
        true => json["stream"] = Value::Bool(true),
        false => {
            json.as_object_mut().map(|o| o.shift_remove("stream"));
        }
    }
}

/// The path with its query's parameters sorted (`/v1/messages?beta=true` stays as it is): the
/// query is keyed and forwarded, and parameters in another order ask the same thing.
/// (A path without a query, the usual case, is returned as it came: no copy on the hit path.)
pub(super) fn sorted_query(full: String) -> String {
    let Some((path, query)) = full.split_once('?') else {
        return full;
    };
    let mut params: Vec<&str> = query.split('&').filter(|p| !p.is_empty()).collect();
    if params.is_empty() {
        return path.to_owned();
    }
    params.sort_unstable();
    format!("{path}?{}", params.join("&"))
}

/// The caller's credentials as the bytes it sent, for its partition: its `x-api-key`, its
/// `authorization`, or both (the SDKs send both when both are configured, and an upstream that
/// authenticates by the bearer must not let two callers who share a placeholder key read each
/// other's answers). One header alone is its own bytes; both are joined by a line feed, which no
/// header value holds. Bytes that are not valid text are still their own partition.
fn sent_credentials(headers: &HeaderMap) -> Option<Vec<u8>> {
    let api_key = headers.get(&X_API_KEY).map(HeaderValue::as_bytes);
    let authorization = headers
        .get(http::header::AUTHORIZATION)
        .map(HeaderValue::as_bytes);
    match (api_key, authorization) {
        (None, None) => None,
        (Some(one), None) | (None, Some(one)) => Some(one.to_vec()),
        (Some(key), Some(auth)) => Some([key, b"\n", auth].concat()),
    }
}
