//! The cache's administration over a running proxy (`fallthrough cache stats|get|purge
//! --server URL`), which holds the cache directory so that the CLI cannot open it:
//!
//! - `GET /fallthrough/stats`: what `cache stats --json` prints;
//! - `GET /fallthrough/entries/KEY`: the stored body, with `x-fallthrough-model`, `age` and
//!   `x-fallthrough-freshness`;
//! - `POST /fallthrough/purge`: `{"expired":true}`, `{"older_than":"7d"}` or `{"all":true}`,
//!   answered `{"removed":N}`; both tiers are purged.
//!
//! For loopback callers when `access.require_token` is false, else for tokens with
//! `admin = true`: the admin endpoints read every cached conversation.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response as HttpResponse};
use serde::Deserialize;

use super::access::Caller;
use super::conn::Peer;
use super::errors::api_error;
use super::{App, JSON, X_MODEL};
use crate::admin::{self, Purge};
use crate::entry::{now_millis, Freshness};
use crate::key::CacheKey;

/// Refuses callers who may not administer the cache (see the module's doc).
pub(super) async fn only_admins(
    State(app): State<Arc<App>>,
    request: Request,
    next: Next,
) -> HttpResponse {
    let allowed = match request.extensions().get::<Caller>() {
        Some(Caller::Token { admin, .. }) => *admin,
        Some(Caller::Open) if !app.access.requires_token() => request
            .extensions()
            .get::<Peer>()
            .is_some_and(|peer| peer.0.ip().is_loopback()),
        _ => false,
    };
    if !allowed {
        return api_error(
            403,
            "the admin endpoints are for loopback callers, or for access tokens with admin = true \
             when access.require_token is set",
        );
    }
    next.run(request).await
}

pub(super) async fn stats(State(app): State<Arc<App>>) -> HttpResponse {
    let Some(disk) = app.client.cache().disk() else {
        return api_error(404, "this proxy has no disk cache");
    };
    match admin::stats(&disk, now_millis()).await {
        Ok(stats) => json(&stats),
        Err(e) => api_error(500, &crate::error::report(&e)),
    }
}

pub(super) async fn entry(State(app): State<Arc<App>>, Path(key): Path<String>) -> HttpResponse {
    let Ok(key) = key.parse::<CacheKey>() else {
        return api_error(
            400,
            "a key is 64 hex characters (as x-fallthrough-key shows it)",
        );
    };
    let now = now_millis();
    let Some(found) = app.client.cache().get(&key, now).await else {
        return api_error(404, &format!("no entry under {key}"));
    };
    let entry = &found.entry;
    let mut out = (StatusCode::OK, entry.body.clone()).into_response();
    let h = out.headers_mut();
    h.insert(header::CONTENT_TYPE, JSON);
    h.insert(X_MODEL, super::header_value(&entry.model));
    h.insert(header::AGE, HeaderValue::from(entry.age(now).as_secs()));
    let freshness = match entry.freshness(now, None) {
        Freshness::Fresh => "fresh",
        Freshness::Stale => "stale",
        Freshness::Expired => "expired",
    };
    h.insert(
        "x-fallthrough-freshness",
        HeaderValue::from_static(freshness),
    );
    out
}

/// A purge request's body: exactly one of its fields.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PurgeBody {
    #[serde(default)]
    expired: bool,
    #[serde(default, with = "humantime_serde")]
    older_than: Option<Duration>,
    #[serde(default)]
    all: bool,
    namespace: Option<String>,
}

pub(super) async fn purge(State(app): State<Arc<App>>, body: axum::body::Body) -> HttpResponse {
    // Read as any request's body: within `server.body_timeout` (a busy connection has no
    // other timer) and `max_body_bytes`.
    let body = match super::read_body(&app, body).await {
        Ok(body) => body,
        Err(refusal) => return refusal,
    };
    let asked: PurgeBody = match serde_json::from_slice(&body) {
        Ok(asked) => asked,
        Err(e) => {
            return api_error(
                400,
                &format!(
                    "a purge is {{\"expired\":true}}, {{\"older_than\":\"7d\"}} or \
                     {{\"all\":true}}: {e}"
                ),
            )
        }
    };
    let what =
        match (asked.expired, asked.older_than, asked.all, asked.namespace) {
            (true, None, false, None) => Purge::Expired,
            (false, Some(age), false, None) => Purge::OlderThan(age),
            (false, None, true, None) => Purge::All,
            (false, None, false, Some(_)) => return api_error(
                400,
                "entries do not record their namespace (it is only part of their key), so they \
                 cannot be purged by it yet",
            ),
            _ => return api_error(400, "say exactly one of expired, older_than and all"),
        };
    let cache = app.client.cache();
    let removed = match (what, cache.disk()) {
        // The memory tier lets entries expire by itself: only `all` applies to it alone.
        (Purge::Expired | Purge::OlderThan(_), None) => 0,
        (Purge::All, _) => {
            let before = cache.usage().await;
            if let Err(e) = cache.clear().await {
                let status = match e {
                    crate::error::DiskError::Unavailable { .. } => 503,
                    _ => 500,
                };
                return api_error(status, &crate::error::report(&e));
            }
            before.disk_entries.max(before.memory_entries)
        }
        (what, Some(disk)) => {
            let chosen = match admin::chosen_for(&disk, what, now_millis()).await {
                Ok(chosen) => chosen,
                Err(e) => return api_error(500, &crate::error::report(&e)),
            };
            for key in &chosen {
                cache.remove(key).await;
            }
            chosen.len() as u64
        }
    };
    json(&serde_json::json!({ "removed": removed }))
}

fn json(value: &impl serde::Serialize) -> HttpResponse {
    let body = serde_json::to_vec(value).expect("plain data serializes");
    let mut out = (StatusCode::OK, body).into_response();
    out.headers_mut().insert(header::CONTENT_TYPE, JSON);
    out
}
