//! Prewarming: fill the cache from a JSONL file of Messages requests.
//!
//! Each line is checked first with `only-if-cached`, so a fresh entry is skipped and a rerun
//! resumes where the last one stopped. Only the requested model is used (never a fallback):
//! prewarm fills that model's entries. Overload and rate limits are the engine's business
//! (retries with backoff and `retry-after`), so a line fails only when the engine gives up.
//! Requests go through a [`Client`] over the cache directory, or through a running proxy
//! (`--server`) when that proxy holds the directory.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{stream, StreamExt};
use serde::Serialize;

use crate::client::{Client, Controls, Request};
use crate::error::Error;
use crate::jsonl::InvalidLine;

/// Where the requests go.
pub enum Target {
    /// Straight through the engine, over the cache directory.
    Local(Client),
    /// Through a running `fallthrough serve` at this base URL.
    Server {
        url: String,
        http: reqwest::Client,
        /// Sent as `x-api-key`; without it the proxy uses its own.
        api_key: Option<String>,
    },
}

#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Count what is cached and what is missing; call nothing upstream.
    pub dry_run: bool,
}

/// What a run did. Line numbers count from 1.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct Summary {
    pub lines: u64,
    /// Fetched from upstream and stored.
    pub fetched: u64,
    /// Already fresh in the cache: skipped.
    pub already_cached: u64,
    /// Not cached (only counted with `dry_run`).
    pub missing: u64,
    /// Lines the upstream (or the proxy) refused or could not answer.
    pub failed: Vec<Failure>,
    /// Lines that are not a JSON object with a `model`.
    pub invalid_lines: Vec<u64>,
    /// The same lines, each with the reason.
    pub invalid: Vec<InvalidLine>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Failure {
    pub line: u64,
    pub status: u16,
    pub message: String,
}

/// How one line went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineResult {
    Fetched,
    Cached,
    Missing,
    Invalid { reason: String },
    Failed { status: u16, message: String },
}

/// Runs every line of `input` against `target`; `progress` is called after each line.
pub async fn run(
    target: &Target,
    input: &str,
    options: Options,
    progress: impl Fn(u64, &LineResult),
) -> Summary {
    let lines = crate::jsonl::numbered_lines(input);
    let mut summary = Summary {
        lines: lines.len() as u64,
        ..Summary::default()
    };
    let mut results = stream::iter(lines)
        .map(|(n, line)| async move { (n, one(target, line, options.dry_run).await) })
        .buffer_unordered(options.concurrency.max(1));
    while let Some((n, result)) = results.next().await {
        progress(n, &result);
        match result {
            LineResult::Fetched => summary.fetched += 1,
            LineResult::Cached => summary.already_cached += 1,
            LineResult::Missing => summary.missing += 1,
            LineResult::Invalid { reason } => {
                summary.invalid_lines.push(n);
                summary.invalid.push(InvalidLine { line: n, reason });
            }
            LineResult::Failed { status, message } => summary.failed.push(Failure {
                line: n,
                status,
                message,
            }),
        }
    }
    summary.invalid_lines.sort_unstable();
    summary.invalid.sort_by_key(|i| i.line);
    summary.failed.sort_by_key(|f| f.line);
    summary
}

async fn one(target: &Target, line: &str, dry_run: bool) -> LineResult {
    if let Err(reason) = crate::jsonl::parse_request(line) {
        return LineResult::Invalid { reason };
    }
    let body = Bytes::copy_from_slice(line.as_bytes());
    let check = Controls {
        only_if_cached: true,
        ..Controls::default()
    };
    match send(target, body.clone(), check).await {
        Ok(()) => return LineResult::Cached,
        Err(Error::NotCached) => {}
        Err(e) => return failed(e),
    }
    if dry_run {
        return LineResult::Missing;
    }
    // Not fresh: fetch without looking up again, so a stale entry cannot stand in for the
    // answer (the line would count as fetched while the entry stays stale).
    let fetch = Controls {
        no_cache: true,
        no_fallback: true,
        ..Controls::default()
    };
    match send(target, body, fetch).await {
        Ok(()) => LineResult::Fetched,
        Err(e) => failed(e),
    }
}

fn failed(e: Error) -> LineResult {
    let (status, message) = match &e {
        Error::Upstream(u) => (
            u.status,
            error_message(&u.body).unwrap_or_else(|| e.to_string()),
        ),
        Error::InvalidRequest(m) => (400, m.clone()),
        other => (0, other.to_string()),
    };
    LineResult::Failed { status, message }
}

fn error_message(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    Some(v["error"]["message"].as_str()?.to_owned())
}

/// One request, plain (a `stream` flag in the line is ignored: entries are shared).
async fn send(target: &Target, body: Bytes, controls: Controls) -> Result<(), Error> {
    match target {
        Target::Local(client) => {
            let mut request = Request::messages(body);
            request.controls = controls;
            client.execute(request).await.map(drop)
        }
        Target::Server { url, http, api_key } => {
            let body = crate::jsonl::without_stream(body);
            let mut request = http
                .post(format!("{}/v1/messages", url.trim_end_matches('/')))
                .header("content-type", "application/json")
                .timeout(Duration::from_secs(600))
                .body(body);
            if controls.only_if_cached {
                request = request.header("cache-control", "only-if-cached");
            }
            if controls.no_cache {
                request = request.header("cache-control", "no-cache");
            }
            if controls.no_fallback {
                request = request.header("x-fallthrough-fallback", "off");
            }
            if let Some(key) = api_key {
                request = request.header("x-api-key", key);
            }
            let response = request
                .send()
                .await
                .map_err(|e| Error::Internal(format!("cannot reach the server {url}: {e}")))?;
            let status = response.status().as_u16();
            if status == 200 {
                return Ok(());
            }
            if status == 504 && controls.only_if_cached {
                return Err(Error::NotCached);
            }
            let headers = response.headers().clone();
            let body = response.bytes().await.unwrap_or_default();
            Err(Error::Upstream(crate::error::UpstreamError {
                kind: crate::error::UpstreamErrorKind::Client,
                model: String::new(),
                status,
                body,
                retry_after: None,
                attempts: 0,
                headers: Box::new(headers),
                should_retry: None,
            }))
        }
    }
}
