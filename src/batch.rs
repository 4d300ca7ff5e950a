//! Prewarming through the Message Batches API (`prewarm --batch`): the lines that are not
//! already fresh go out as batches, at half the price and away from the interactive overload;
//! each succeeded result is stored under the key its line has on `/v1/messages`, so a live
//! request for it is a hit.
//!
//! - A line's `custom_id` is `line-N`, its line number (from 1): results come back in any
//!   order and are matched to their lines by it.
//! - A batch holds at most [`MAX_REQUESTS`] requests and [`MAX_BYTES`] bytes; a larger file
//!   becomes several.
//! - `stream` is dropped from a line (batches do not stream; the key ignores it anyway).
//! - Batches in flight are recorded in the cache directory, under `batches/`, in a file named
//!   by the input's hash, as soon as each is created: a prewarm that is interrupted (killed,
//!   a lost connection) and run again on the same file polls the same batches instead of
//!   submitting again. The record holds batch ids only, never a credential; it is removed
//!   once every result is stored, so a later run submits only what is still missing (the
//!   lines that errored or expired).
//! - The batches' HTTP calls are not the engine's (no cache, no fallback): a refusal of a
//!   batch is the caller's to see. A poll that fails is tried again at the next interval.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::{info, warn};

use crate::client::{Client, Controls, Request};
use crate::error::Error;
use crate::jsonl::InvalidLine;

/// Requests a batch holds at most (the API's limit).
pub const MAX_REQUESTS: usize = 100_000;
/// Bytes of requests a batch holds at most (the API's limit is 256 MB; what we count is the
/// requests' JSON, so a margin is left for the envelope).
pub const MAX_BYTES: usize = 255 * 1024 * 1024;

/// How a batch prewarm runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Between two polls of the batches in flight.
    pub poll_interval: Duration,
    /// Say what would go out, in how many batches; submit nothing.
    pub dry_run: bool,
    /// Sent as `x-api-key` to the Batches API.
    pub api_key: Option<String>,
    /// Where batches in flight are recorded (the cache directory); `None`: not recorded.
    pub record_dir: Option<PathBuf>,
}

/// Counts of requests by state, over every batch of the run.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counts {
    pub processing: u64,
    pub succeeded: u64,
    pub errored: u64,
    pub canceled: u64,
    pub expired: u64,
}

/// What a run did. Line numbers count from 1.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct Summary {
    pub lines: u64,
    /// Already fresh: not submitted.
    pub already_cached: u64,
    /// Lines with the key of an earlier line (the same request): answered by its result.
    pub duplicates: u64,
    /// Lines sent in batches by this run (0 when it resumed recorded batches).
    pub submitted: u64,
    /// The batches polled, in order of creation.
    pub batches: Vec<String>,
    /// Whether the batches were a recorded earlier run's.
    pub resumed: bool,
    /// Results stored in the cache.
    pub stored: u64,
    /// Lines that errored, expired or were canceled, or whose result could not be stored.
    pub failed: Vec<Failure>,
    pub invalid_lines: Vec<u64>,
    pub invalid: Vec<InvalidLine>,
    /// With `dry_run`: the lines that would go out.
    pub would_submit: u64,
    /// With `dry_run`: in how many batches.
    pub would_batches: u64,
    /// The requests by state at the end.
    pub counts: Counts,
}

/// A line the batches did not answer.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Failure {
    pub line: u64,
    /// `errored`, `expired`, `canceled`, or `not stored`.
    pub result: String,
    pub reason: String,
}

/// The record of a run's batches in flight.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Record {
    batches: Vec<String>,
}

/// Runs `input` (JSONL of Messages requests) through the Batches API of the client's upstream,
/// storing the answers through `client`; `progress` hears the counts after each poll.
pub async fn run(
    client: &Client,
    input: &str,
    options: &Options,
    progress: impl Fn(&Counts),
) -> Result<Summary, Error> {
    let api = Api::new(&client.config().upstream, options.api_key.clone())?;
    let lines = crate::jsonl::numbered_lines(input);
    let mut summary = Summary {
        lines: lines.len() as u64,
        ..Summary::default()
    };
    let mut bodies = HashMap::new();
    for (n, line) in &lines {
        match crate::jsonl::parse_request(line) {
            Ok(_) => {
                let body = Bytes::copy_from_slice(line.as_bytes());
                bodies.insert(*n, crate::jsonl::without_stream(body));
            }
            Err(reason) => {
                summary.invalid_lines.push(*n);
                summary.invalid.push(InvalidLine { line: *n, reason });
            }
        }
    }
    let record = (options.record_dir.as_deref()).map(|dir| record_path(dir, input));
    let recorded = record.as_deref().and_then(read_record);
    match recorded {
        Some(recorded) if !recorded.batches.is_empty() => {
            info!(
                batches = recorded.batches.len(),
                "resuming the batches of an earlier run"
            );
            summary.resumed = true;
            summary.batches = recorded.batches;
            if options.dry_run {
                return Ok(summary); // a run would poll these, and submit nothing
            }
        }
        _ => {
            let pending = not_fresh(client, &bodies, &mut summary).await;
            let chunks = chunks(&pending);
            if options.dry_run {
                summary.would_submit = pending.len() as u64;
                summary.would_batches = chunks.len() as u64;
                return Ok(summary);
            }
            for chunk in chunks {
                let id = api.create(&chunk).await?;
                summary.submitted += chunk.len() as u64;
                summary.batches.push(id);
                if let Some(path) = &record {
                    write_record(path, &summary.batches);
                }
            }
        }
    }
    if summary.batches.is_empty() {
        return Ok(summary);
    }
    let ended = api
        .wait(&summary.batches, options.poll_interval, &progress)
        .await;
    summary.counts = ended.counts;
    for (id, results_url) in &ended.results {
        let results = api.results(id, results_url.as_deref()).await?;
        store_results(client, &bodies, &results, &mut summary).await;
    }
    client.flush().await?;
    if let Some(path) = &record {
        let _ = std::fs::remove_file(path);
    }
    summary.failed.sort_by_key(|f| f.line);
    Ok(summary)
}

/// The lines that have no fresh entry, in order, each request once (a line with the key of
/// an earlier one is a duplicate); the rest are counted as cached.
async fn not_fresh(
    client: &Client,
    bodies: &HashMap<u64, Bytes>,
    summary: &mut Summary,
) -> Vec<(u64, Bytes)> {
    let mut numbers: Vec<u64> = bodies.keys().copied().collect();
    numbers.sort_unstable();
    let mut pending = Vec::new();
    let mut keys = std::collections::HashSet::new();
    for n in numbers {
        let body = bodies[&n].clone();
        if let Ok(key) = client.key(&Request::messages(body.clone())) {
            if !keys.insert(key) {
                summary.duplicates += 1;
                continue;
            }
        }
        let check = Request::messages(body.clone()).controls(Controls {
            only_if_cached: true,
            ..Controls::default()
        });
        match client.execute(check).await {
            Ok(_) => summary.already_cached += 1,
            Err(_) => pending.push((n, body)),
        }
    }
    pending
}

/// The pending lines split into batches within the API's limits.
fn chunks(pending: &[(u64, Bytes)]) -> Vec<Vec<(u64, Bytes)>> {
    let mut out: Vec<Vec<(u64, Bytes)>> = Vec::new();
    let mut bytes = 0;
    for (n, body) in pending {
        let size = body.len() + 64; // the envelope: custom_id, params, punctuation
        let full = out
            .last()
            .is_none_or(|c| c.len() >= MAX_REQUESTS || bytes + size > MAX_BYTES);
        if full {
            out.push(Vec::new());
            bytes = 0;
        }
        out.last_mut().expect("pushed").push((*n, body.clone()));
        bytes += size;
    }
    out
}

/// Stores each succeeded result under its line's key; the others become failures.
async fn store_results(
    client: &Client,
    bodies: &HashMap<u64, Bytes>,
    results: &str,
    summary: &mut Summary,
) {
    for line in results.lines().filter(|l| !l.trim().is_empty()) {
        let Ok(result) = serde_json::from_str::<Value>(line) else {
            warn!("a batch result line is not JSON; skipped");
            continue;
        };
        let custom_id = result["custom_id"].as_str().unwrap_or_default();
        let Some(n) = line_number(custom_id).filter(|n| bodies.contains_key(n)) else {
            warn!(
                custom_id,
                "a batch result for no line of this file; skipped"
            );
            continue;
        };
        let kind = result["result"]["type"].as_str().unwrap_or("unknown");
        let failure = |result: &str, reason: String| Failure {
            line: n,
            result: result.to_owned(),
            reason,
        };
        match kind {
            "succeeded" => {
                let message = Bytes::from(result["result"]["message"].to_string());
                let request = Request::messages(bodies[&n].clone());
                match client.store_answer(&request, message).await {
                    Ok(_) => summary.stored += 1,
                    Err(e) => summary.failed.push(failure("not stored", e.to_string())),
                }
            }
            "errored" => {
                let error = &result["result"]["error"]["error"];
                let reason = format!(
                    "{}: {}",
                    error["type"].as_str().unwrap_or("error"),
                    error["message"].as_str().unwrap_or("no message")
                );
                summary.failed.push(failure("errored", reason));
            }
            "expired" => summary.failed.push(failure(
                "expired",
                "the batch ended (24 h) before this request was processed".into(),
            )),
            "canceled" => summary.failed.push(failure(
                "canceled",
                "the batch was canceled before this request was processed".into(),
            )),
            other => summary
                .failed
                .push(failure(other, "a result of an unknown type".into())),
        }
    }
}

fn line_number(custom_id: &str) -> Option<u64> {
    custom_id.strip_prefix("line-")?.parse().ok()
}

/// Where the batches of a run over `input` are recorded.
fn record_path(dir: &Path, input: &str) -> PathBuf {
    let hash = blake3::hash(input.as_bytes()).to_hex();
    dir.join("batches").join(format!("{}.json", &hash[..32]))
}

fn read_record(path: &Path) -> Option<Record> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text)
        .inspect_err(|e| warn!(path = %path.display(), error = %e, "unreadable batch record; submitting again"))
        .ok()
}

/// Writes the record (a temporary file renamed over it, so a crash leaves the old one or
/// the new one). A record that cannot be written only loses the resume.
fn write_record(path: &Path, batches: &[String]) {
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(path.parent().expect("a file in a directory"))?;
        let text = serde_json::to_string(&Record {
            batches: batches.to_vec(),
        })?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, path)
    };
    if let Err(e) = write() {
        warn!(path = %path.display(), error = %e, "cannot record the batches in flight; an interrupted run will submit again");
    }
}

/// The Batches API of one upstream.
struct Api {
    http: reqwest::Client,
    base: String,
    api_key: Option<String>,
}

/// The batches once all have ended: the counts, and each batch's results URL.
struct Ended {
    counts: Counts,
    results: Vec<(String, Option<String>)>,
}

impl Api {
    fn new(upstream: &str, api_key: Option<String>) -> Result<Api, Error> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(600))
            .build()
            .map_err(|e| Error::Internal(format!("HTTP client: {e}")))?;
        Ok(Api {
            http,
            base: format!("{}/v1/messages/batches", upstream.trim_end_matches('/')),
            api_key,
        })
    }

    fn request(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let r = (self.http.request(method, url)).header("anthropic-version", "2023-06-01");
        match &self.api_key {
            Some(key) => r.header("x-api-key", key),
            None => r,
        }
    }

    /// Creates a batch of `lines`; returns its id.
    async fn create(&self, lines: &[(u64, Bytes)]) -> Result<String, Error> {
        let mut body = Vec::with_capacity(lines.iter().map(|(_, b)| b.len() + 64).sum());
        body.extend_from_slice(b"{\"requests\":[");
        for (i, (n, params)) in lines.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(format!("{{\"custom_id\":\"line-{n}\",\"params\":").as_bytes());
            body.extend_from_slice(params);
            body.push(b'}');
        }
        body.extend_from_slice(b"]}");
        let response = self
            .request(reqwest::Method::POST, &self.base)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let batch = match self.answer(response).await {
            Ok(batch) => batch,
            Err(Error::Internal(message)) => {
                return Err(Error::Internal(name_line(&message, lines)))
            }
            Err(e) => return Err(e),
        };
        let id = batch["id"].as_str().unwrap_or_default().to_owned();
        info!(id, requests = lines.len(), "batch created");
        Ok(id)
    }

    /// Polls every batch until all have ended.
    async fn wait(&self, ids: &[String], every: Duration, progress: &impl Fn(&Counts)) -> Ended {
        let mut seen: HashMap<String, Value> = HashMap::new();
        loop {
            for id in ids {
                let done = seen
                    .get(id)
                    .is_some_and(|b| b["processing_status"] == "ended");
                if done {
                    continue;
                }
                match self.get(id).await {
                    Ok(batch) => {
                        seen.insert(id.clone(), batch);
                    }
                    Err(e) => warn!(id, error = %e, "polling a batch failed; trying again"),
                }
            }
            let counts = total(ids.iter().filter_map(|id| seen.get(id)));
            progress(&counts);
            let ended = ids.iter().all(|id| {
                seen.get(id)
                    .is_some_and(|b| b["processing_status"] == "ended")
            });
            if ended {
                let results = ids
                    .iter()
                    .map(|id| {
                        (
                            id.clone(),
                            seen[id]["results_url"].as_str().map(str::to_owned),
                        )
                    })
                    .collect();
                return Ended { counts, results };
            }
            tokio::time::sleep(every).await;
        }
    }

    async fn get(&self, id: &str) -> Result<Value, Error> {
        let url = format!("{}/{id}", self.base);
        let response = (self.request(reqwest::Method::GET, &url).send().await)
            .map_err(|e| self.unreachable(e))?;
        self.answer(response).await
    }

    /// A batch's results (JSONL), from its `results_url` (relative to the upstream when it is
    /// a path).
    async fn results(&self, id: &str, results_url: Option<&str>) -> Result<String, Error> {
        let url = match results_url {
            Some(u) if u.starts_with("http://") || u.starts_with("https://") => u.to_owned(),
            Some(path) if path.starts_with('/') => {
                let origin = self.base.trim_end_matches("/v1/messages/batches");
                format!("{origin}{path}")
            }
            _ => format!("{}/{id}/results", self.base),
        };
        let response = (self.request(reqwest::Method::GET, &url).send().await)
            .map_err(|e| self.unreachable(e))?;
        let status = response.status().as_u16();
        let text = response.text().await.map_err(|e| self.unreachable(e))?;
        match status {
            200 => Ok(text),
            _ => Err(refused(&self.base, status, text.as_bytes())),
        }
    }

    /// A JSON answer, or the API's refusal as an error.
    async fn answer(&self, response: reqwest::Response) -> Result<Value, Error> {
        let status = response.status().as_u16();
        let body = response.bytes().await.map_err(|e| self.unreachable(e))?;
        if status != 200 {
            return Err(refused(&self.base, status, &body));
        }
        serde_json::from_slice(&body).map_err(|e| {
            Error::Internal(format!(
                "the Batches API answered something that is not JSON: {e}"
            ))
        })
    }

    fn unreachable(&self, e: reqwest::Error) -> Error {
        Error::Internal(format!(
            "cannot reach the Batches API at {}: {e}",
            crate::config::redacted(&self.base)
        ))
    }
}

/// The API's refusal, said plainly; a 404 means the upstream has no Batches API.
fn refused(base: &str, status: u16, body: &[u8]) -> Error {
    let base = crate::config::redacted(base);
    if status == 404 {
        return Error::Config(format!(
            "the upstream does not offer the Message Batches API (404 from {base}); prewarm without --batch, or point --upstream at one that does"
        ));
    }
    let message = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    Error::Internal(format!(
        "the Batches API at {base} answered {status}: {message}"
    ))
}

/// The API names a refused request by its index in the batch (`requests.3.params…`): the
/// message says which line of the file that is.
fn name_line(message: &str, lines: &[(u64, Bytes)]) -> String {
    let index = message.split("requests.").nth(1).and_then(|rest| {
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<usize>().ok()
    });
    match index.and_then(|i| lines.get(i)) {
        Some((n, _)) => format!("{message} (line {n} of the file)"),
        None => message.to_owned(),
    }
}

/// The requests by state over `batches`.
fn total<'a>(batches: impl Iterator<Item = &'a Value>) -> Counts {
    let mut c = Counts::default();
    for b in batches {
        let n = |k: &str| b["request_counts"][k].as_u64().unwrap_or(0);
        c.processing += n("processing");
        c.succeeded += n("succeeded");
        c.errored += n("errored");
        c.canceled += n("canceled");
        c.expired += n("expired");
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_at_the_request_limit() {
        let pending: Vec<(u64, Bytes)> = (0..MAX_REQUESTS as u64 + 1)
            .map(|n| (n, Bytes::from_static(b"{}")))
            .collect();
        let split = chunks(&pending);
        assert_eq!(split.len(), 2);
        assert_eq!((split[0].len(), split[1].len()), (MAX_REQUESTS, 1));
    }

    #[test]
    fn lines_split_at_the_byte_limit() {
        let big = Bytes::from(vec![b' '; MAX_BYTES / 2]);
        let pending = vec![(1, big.clone()), (2, big.clone()), (3, big)];
        assert_eq!(
            chunks(&pending).len(),
            3,
            "two halves and their envelopes overflow one"
        );
    }

    #[test]
    fn a_refused_request_is_named_by_its_line() {
        let lines = [(4, Bytes::new()), (9, Bytes::new())];
        let said = name_line(
            "answered 400: requests.1.params.max_tokens: Field required",
            &lines,
        );
        assert!(said.ends_with("(line 9 of the file)"), "{said}");
        assert_eq!(name_line("no index here", &lines), "no index here");
    }

    #[test]
    fn custom_ids_map_back_to_line_numbers() {
        assert_eq!(line_number("line-42"), Some(42));
        assert_eq!(line_number("other"), None);
    }
}
