//! Who may use the proxy (SPEC, "Access"). Every request passes [`admit`] before any route:
//! browser safety first (a web page must neither spend the proxy's key nor read its cache),
//! then the access token, whose caller is admitted under the token's name.
//!
//! Why each browser check: a page can make the browser `POST` to `127.0.0.1` without a CORS
//! preflight as long as the request is "simple" (a `text/plain` or form body, no custom
//! headers), so a JSON-only rule for the cached routes closes that door; a page that asks with
//! `fetch` carries an `Origin`, refused unless listed; and DNS rebinding (a name of the
//! attacker's that resolves to 127.0.0.1) lets a page read answers as if same-origin, but its
//! `Host` is the attacker's name, so only loopback names, IP literals the proxy listens on and
//! listed hosts are served.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::Response as HttpResponse;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tracing::{debug_span, Instrument};

use super::errors::api_error;
use super::App;
use crate::client::X_API_KEY;
use crate::config::AccessConfig;
use crate::error::Error;
use crate::metrics::{Counter, Metrics};

/// The admission rules, resolved for the address the proxy listens on.
pub(super) struct Access {
    tokens: Vec<Token>,
    require_token: bool,
    allowed_origins: Vec<String>,
    allowed_hosts: Vec<String>,
    listen: SocketAddr,
}

struct Token {
    name: Arc<str>,
    digest: [u8; 32],
    admin: bool,
    /// `fallthrough_caller_requests_total{caller=name}`.
    requests: Counter,
}

/// Who a request was admitted as; the routes find it in the request's extensions.
#[derive(Clone, Debug)]
pub(super) enum Caller {
    /// Presented a listed token: its credential was taken out, the proxy's goes upstream.
    Token { name: Arc<str>, admin: bool },
    /// No token needed: the caller's own credential is forwarded, or the proxy's fills in.
    Open,
}

impl Caller {
    /// The partition of the caller's entries: the token's name, or by credential (`None`).
    pub(super) fn partition(&self) -> Option<String> {
        match self {
            Caller::Token { name, .. } => Some(name.to_string()),
            Caller::Open => None,
        }
    }
}

impl Access {
    /// The rules of `config` for a proxy listening on `listen`. Refuses to listen open beyond
    /// loopback: `require_token` defaults to true there, and true with no tokens would refuse
    /// everyone, so a config must list tokens or say `require_token = false` itself.
    pub(super) fn new(
        config: &AccessConfig,
        listen: SocketAddr,
        metrics: &Metrics,
    ) -> Result<Access, Error> {
        let loopback = listen.ip().is_loopback();
        let require_token = config.require_token.unwrap_or(!loopback);
        if require_token && config.tokens.is_empty() {
            return Err(Error::Config(format!(
                "listening on {listen}{} with no access.tokens: no caller could be admitted. \
                 Add [[access.tokens]] (`fallthrough token NAME` makes one), or set \
                 access.require_token = false to let anyone who reaches the port spend the \
                 proxy's key",
                if loopback {
                    ""
                } else {
                    ", not a loopback address,"
                }
            )));
        }
        let tokens = config
            .tokens
            .iter()
            .map(|t| Token {
                name: t.name.as_str().into(),
                digest: t.digest().expect("validated with the config"),
                admin: t.admin,
                requests: metrics.caller_counter(&t.name),
            })
            .collect();
        let lower = |list: &[String]| list.iter().map(|s| normalized(s)).collect();
        Ok(Access {
            tokens,
            require_token,
            allowed_origins: lower(&config.allowed_origins),
            allowed_hosts: lower(&config.allowed_hosts),
            listen,
        })
    }

    /// Whether every caller must present a listed token.
    pub(super) fn requires_token(&self) -> bool {
        self.require_token
    }

    /// Why a request must be refused before anything else is read, as the API's error.
    fn browser_refusal(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Option<HttpResponse> {
        if let Some(origin) = headers.get(header::ORIGIN) {
            let text = origin.to_str().map(normalized).unwrap_or_default();
            if !self.allowed_origins.contains(&text) {
                return Some(api_error(
                    403,
                    &format!(
                        "requests from web pages are refused (Origin {:?}); list the origin in \
                         access.allowed_origins to allow it",
                        origin.to_str().unwrap_or("(not text)")
                    ),
                ));
            }
        }
        if let Some(host) = headers.get(header::HOST) {
            let text = host.to_str().unwrap_or_default();
            if !self.host_allowed(text) {
                return Some(api_error(
                    403,
                    &format!(
                        "Host {text:?} is not this proxy's; add it to access.allowed_hosts to \
                         serve it"
                    ),
                ));
            }
        }
        if method == Method::POST && super::is_cached_route(path) && !is_json(headers) {
            return Some(api_error(
                415,
                "content-type must be application/json on this path",
            ));
        }
        None
    }

    /// A loopback name or address, an IP literal the proxy listens on (any, when it listens
    /// on every address: a rebinding page's `Host` is a name, never an address), or a listed
    /// host (with or without its port).
    fn host_allowed(&self, host: &str) -> bool {
        let host = normalized(host);
        if self.allowed_hosts.contains(&host) {
            return true;
        }
        let name = host_name(&host);
        if self.allowed_hosts.iter().any(|h| h == name) {
            return true;
        }
        if name == "localhost" || name.ends_with(".localhost") {
            return true;
        }
        match name
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            Ok(ip) => {
                ip.is_loopback() || ip == self.listen.ip() || self.listen.ip().is_unspecified()
            }
            Err(_) => false,
        }
    }

    /// The token a caller presents as its API key or its bearer token, if it is one of the
    /// listed ones. Both headers are looked at: the official SDKs send both when both an API
    /// key and an auth token are configured (a placeholder `ANTHROPIC_API_KEY` next to the
    /// gateway's `ANTHROPIC_AUTH_TOKEN` is common). Every listed digest is compared, in constant
    /// time, whichever matches.
    fn token_of(&self, headers: &HeaderMap) -> Option<&Token> {
        let mut found = None;
        for presented in presented_keys(headers) {
            let digest: [u8; 32] = Sha256::digest(presented).into();
            for token in &self.tokens {
                if bool::from(token.digest.ct_eq(&digest)) {
                    found = Some(token);
                }
            }
        }
        found
    }
}

/// Admits a request (see the module's doc) and runs it as its caller; refusals are the API's
/// own error shapes, and nothing of a refused request reaches the upstream.
pub(super) async fn admit(
    State(app): State<Arc<App>>,
    mut request: Request,
    next: Next,
) -> HttpResponse {
    let access = &app.access;
    let path = request.uri().path();
    if path == "/healthz" {
        return next.run(request).await;
    }
    if let Some(refusal) = access.browser_refusal(request.method(), path, request.headers()) {
        return refusal;
    }
    if let Some(preflight) = preflight(&request) {
        return preflight;
    }
    let caller = match access.token_of(request.headers()) {
        Some(token) => {
            token.requests.inc();
            let headers = request.headers_mut();
            headers.remove(&X_API_KEY);
            headers.remove(header::AUTHORIZATION);
            Caller::Token {
                name: token.name.clone(),
                admin: token.admin,
            }
        }
        None if access.require_token => {
            return api_error(
                401,
                "this proxy admits callers by access token: send the token as x-api-key or \
                 authorization: Bearer",
            )
        }
        None => Caller::Open,
    };
    let span = match &caller {
        Caller::Token { name, .. } => debug_span!("caller", name = %name),
        Caller::Open => debug_span!("caller", name = "open"),
    };
    let origin = request.headers().get(header::ORIGIN).cloned();
    request.extensions_mut().insert(caller);
    let mut out = next.run(request).instrument(span).await;
    if let Some(origin) = origin {
        allow_origin(out.headers_mut(), origin);
    }
    out
}

/// The answer to a listed origin's CORS preflight (it carries no credential, so it comes
/// before the token): the proxy's own, never passed upstream.
fn preflight(request: &Request) -> Option<HttpResponse> {
    let headers = request.headers();
    if request.method() != Method::OPTIONS
        || !headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
    {
        return None;
    }
    let origin = headers.get(header::ORIGIN)?.clone();
    let mut out = HttpResponse::new(axum::body::Body::empty());
    *out.status_mut() = axum::http::StatusCode::NO_CONTENT;
    let h = out.headers_mut();
    allow_origin(h, origin);
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, OPTIONS"),
    );
    if let Some(asked) = headers.get(header::ACCESS_CONTROL_REQUEST_HEADERS) {
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked.clone());
    }
    h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from(600));
    Some(out)
}

/// A listed origin may read the answer: the CORS headers a browser looks for.
fn allow_origin(headers: &mut HeaderMap, origin: HeaderValue) {
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    headers.append(header::VARY, HeaderValue::from_static("origin"));
    headers.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static(
            "x-fallthrough-cache, x-fallthrough-key, x-fallthrough-model, \
             x-fallthrough-attempts, age, request-id, retry-after",
        ),
    );
}

/// The credentials a caller presents: its `x-api-key`, then its bearer `authorization`.
fn presented_keys(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    let api_key = headers.get(&X_API_KEY).map(HeaderValue::as_bytes);
    let bearer = headers.get(header::AUTHORIZATION).and_then(|auth| {
        let auth = auth.as_bytes();
        let (scheme, rest) = auth.split_at(auth.iter().position(|&b| b == b' ')?);
        scheme
            .eq_ignore_ascii_case(b"bearer")
            .then(|| rest.trim_ascii())
    });
    api_key.into_iter().chain(bearer)
}

fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or_default().trim();
    essence.eq_ignore_ascii_case("application/json")
}

/// Lower case, without a trailing slash: how origins and hosts are compared.
fn normalized(text: &str) -> String {
    text.trim().trim_end_matches('/').to_ascii_lowercase()
}

/// A `Host` without its port (`[::1]:8787` -> `[::1]`).
fn host_name(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_inclusive(']').next().unwrap_or(host);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// A new token: 32 random bytes, hex, behind a prefix that says what it is.
pub fn new_token() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("ft-{}", crate::key::hex(&bytes))
}

/// The hex SHA-256 of a token, as `[[access.tokens]]` holds it.
pub fn token_sha256(token: &str) -> String {
    crate::key::hex(&Sha256::digest(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(listen: &str, hosts: &[&str]) -> Access {
        let config = AccessConfig {
            require_token: Some(false),
            allowed_hosts: hosts.iter().map(|h| h.to_string()).collect(),
            ..AccessConfig::default()
        };
        Access::new(&config, listen.parse().unwrap(), &Metrics::default()).unwrap()
    }

    #[test]
    fn hosts_a_rebinding_page_could_use_are_refused() {
        let a = access("127.0.0.1:8787", &["proxy.internal"]);
        for ok in [
            "127.0.0.1:8787",
            "localhost:8787",
            "LOCALHOST",
            "[::1]:8787",
            "proxy.internal:9",
            "a.localhost",
        ] {
            assert!(a.host_allowed(ok), "{ok}");
        }
        for refused in [
            "evil.example:8787",
            "evil.example",
            "10.0.0.5:8787",
            "127.0.0.1.evil.example",
        ] {
            assert!(!a.host_allowed(refused), "{refused}");
        }
        let any = access("0.0.0.0:8787", &[]);
        assert!(any.host_allowed("10.0.0.5:8787"));
        assert!(!any.host_allowed("evil.example:8787"));
    }

    #[test]
    fn open_beyond_loopback_needs_saying_so() {
        let open = AccessConfig::default();
        let err = Access::new(&open, "0.0.0.0:8787".parse().unwrap(), &Metrics::default())
            .err()
            .unwrap();
        assert!(err.to_string().contains("access.tokens"), "{err}");
        assert!(Access::new(
            &open,
            "127.0.0.1:8787".parse().unwrap(),
            &Metrics::default()
        )
        .is_ok());
        let said = AccessConfig {
            require_token: Some(false),
            ..AccessConfig::default()
        };
        assert!(Access::new(&said, "0.0.0.0:8787".parse().unwrap(), &Metrics::default()).is_ok());
    }

    #[test]
    fn bearer_and_api_key_both_present_a_token() {
        let presented = |h: &HeaderMap| presented_keys(h).map(<[u8]>::to_vec).collect::<Vec<_>>();
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Bearer  ft-1 "));
        assert_eq!(presented(&h), [b"ft-1".to_vec()]);
        h.insert("x-api-key", HeaderValue::from_static("ft-2"));
        assert_eq!(presented(&h), [b"ft-2".to_vec(), b"ft-1".to_vec()]);
        let mut basic = HeaderMap::new();
        basic.insert("authorization", HeaderValue::from_static("Basic abc"));
        assert!(presented(&basic).is_empty());
    }
}
