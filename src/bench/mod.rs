//! Replaying a workload through a [`Client`] and measuring what the cache did
//! (`fallthrough bench`).
//!
//! It owns the replay and its [`Report`]: a workload is a JSONL file of Messages request bodies
//! ([`Workload`]); [`run`] sends them, `repeat` times over, through [`Client::call`], with
//! `concurrency` requests in flight, started in file order so that a repeat later in the file
//! can hit what an earlier line stored. Streamed requests are drained to the end, as a caller
//! would, so their latency covers the whole answer. Printing belongs to the binary.
//!
//! # Reproducible replays
//! A live run's counts depend on timing: which identical requests meet in flight, how old an
//! entry is when it is read again, and the order in which concurrent requests reach the
//! engine's shared state (the retry budget grants its last retries to whoever asks first; a
//! breaker counts consecutive failures across requests). With [`Options::logical_step`] the
//! replay takes all of that out: requests are sent one at a time, in order, each after
//! everything the one before set going has ended (a background refresh included), and the
//! client decides by a logical clock that advances by the step before each request, so that
//! entries age, budget windows slide and breaker cooldowns end by request count, not by the
//! machine's speed. Against an upstream whose answers depend only on the requests it gets (the
//! fake in [`crate::mock`], for a given seed), the counts are then the same on every run;
//! latencies and wall time still vary.
//!
//! ```no_run
//! # async fn demo(client: fallthrough::Client) -> Result<(), fallthrough::bench::BenchError> {
//! use fallthrough::bench::{self, Options, Workload};
//!
//! let workload = Workload::read("examples/workload.jsonl".as_ref())?;
//! let report = bench::run(&client, &workload, &Options::default(), |_done| {}).await;
//! println!("hit rate {:.1}%", report.hit_rate * 100.0);
//! # Ok(()) }
//! ```

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::Value;

use crate::client::Reply;
use crate::error::Error;
use crate::jsonl::InvalidLine;
use crate::{Client, Request};

mod report;

pub use report::{Latency, Report};
use report::{Sample, Tally, ERROR};

/// Errors that stop a bench before it starts; failed requests are not errors, they are counted
/// in the [`Report`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BenchError {
    #[error("bench: cannot read the workload {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "bench: the workload {} has no valid request lines{}",
        path.display(),
        invalid_note(invalid)
    )]
    NoRequests {
        path: PathBuf,
        /// The lines that were not request bodies, and why.
        invalid: Vec<InvalidLine>,
    },
}

fn invalid_note(invalid: &[InvalidLine]) -> String {
    match invalid {
        [] => " (it is empty)".to_owned(),
        invalid => format!(": {}", crate::jsonl::describe(invalid).join("; ")),
    }
}

/// `1, 4, 9`, shortened after 20 numbers.
pub fn line_list(lines: &[usize]) -> String {
    let mut text = lines
        .iter()
        .take(20)
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    if lines.len() > 20 {
        text.push_str(&format!(", ... ({} in all)", lines.len()));
    }
    text
}

/// One request of a workload.
#[derive(Debug, Clone)]
pub struct Line {
    /// 1-based line number in the file.
    pub number: usize,
    /// The body, byte for byte as in the file.
    pub body: Bytes,
    /// The `model` the body asks for: an answer from another model is a fallback's.
    pub model: String,
    /// The body asks for `"stream": true`.
    pub stream: bool,
}

/// A parsed workload: the usable lines, and the numbers of those that were not.
#[derive(Debug, Clone, Default)]
pub struct Workload {
    pub lines: Vec<Line>,
    /// 1-based numbers of lines that are not a JSON object with a string `model`; they are
    /// skipped. Blank lines are neither requests nor invalid.
    pub invalid_lines: Vec<usize>,
    /// The same lines, each with the reason.
    pub invalid: Vec<InvalidLine>,
}

impl Workload {
    /// Parses JSONL text: one Messages request body a line.
    pub fn parse(text: &str) -> Workload {
        let mut workload = Workload::default();
        for (i, raw) in text.lines().enumerate() {
            let raw = raw.trim();
            if raw.is_empty() {
                continue;
            }
            let number = i + 1;
            match crate::jsonl::parse_request(raw) {
                Ok(json) => workload.lines.push(Line {
                    number,
                    body: Bytes::copy_from_slice(raw.as_bytes()),
                    model: json["model"].as_str().unwrap_or_default().to_owned(),
                    stream: json.get("stream") == Some(&Value::Bool(true)),
                }),
                Err(reason) => {
                    workload.invalid_lines.push(number);
                    workload.invalid.push(InvalidLine {
                        line: number as u64,
                        reason,
                    });
                }
            }
        }
        workload
    }

    /// Reads and parses `path`; a workload without a single valid line is an error.
    pub fn read(path: &Path) -> Result<Workload, BenchError> {
        let text = std::fs::read_to_string(path).map_err(|source| BenchError::Read {
            path: path.to_owned(),
            source,
        })?;
        let workload = Workload::parse(&text);
        if workload.lines.is_empty() {
            return Err(BenchError::NoRequests {
                path: path.to_owned(),
                invalid: workload.invalid,
            });
        }
        Ok(workload)
    }

    /// The models the workload asks for, each once, in order of first appearance.
    pub fn models(&self) -> Vec<String> {
        let mut seen = HashSet::new();
        self.lines
            .iter()
            .filter(|l| seen.insert(l.model.as_str()))
            .map(|l| l.model.clone())
            .collect()
    }
}

/// How to replay a workload.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Requests in flight at once (at least 1). Default 8. A reproducible replay sends one at
    /// a time.
    pub concurrency: usize,
    /// Passes over the workload (at least 1). Default 1.
    pub repeat: usize,
    /// Replay reproducibly (see the module docs): one request at a time, on a logical clock
    /// that starts at the wall-clock time of the run's start and advances by this step before
    /// each request after the first. The client keeps using it until the run ends, then goes
    /// back to the system clocks. Default `None`: a live run, on the system clocks.
    pub logical_step: Option<Duration>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            concurrency: 8,
            repeat: 1,
            logical_step: None,
        }
    }
}

/// Replays `workload` through `client` as `options` say and reports what happened.
/// `progress` is called with the number of requests finished after each one.
///
/// Requests start in file order (pass after pass), at most `options.concurrency` at once (one
/// in a reproducible replay); each runs in its own task, so a slow one does not hold up the
/// measurement of the others.
pub async fn run(
    client: &Client,
    workload: &Workload,
    options: &Options,
    mut progress: impl FnMut(u64),
) -> Report {
    let concurrency = match options.logical_step {
        Some(_) => 1,
        None => options.concurrency.max(1),
    };
    let repeat = options.repeat.max(1);
    let distinct = workload
        .lines
        .iter()
        .filter_map(|l| client.key(&Request::messages(l.body.clone())).ok())
        .collect::<HashSet<_>>()
        .len();
    let mut tally = Tally::new();
    let started = Instant::now();
    let jobs = (0..repeat).flat_map(|_| workload.lines.iter().cloned());
    let spawn = |line: Line| {
        let client = client.clone();
        tokio::spawn(async move { replay(&client, &line).await })
    };
    let mut done = 0;
    let mut add = |joined: Result<Sample, tokio::task::JoinError>| {
        tally.add(joined.unwrap_or_else(|_| Sample::panicked()));
        done += 1;
        progress(done);
    };
    match options.logical_step {
        None => {
            let mut finished = futures_util::stream::iter(jobs)
                .map(spawn)
                .buffer_unordered(concurrency);
            while let Some(joined) = finished.next().await {
                add(joined);
            }
        }
        Some(step) => {
            client.clock().set_logical(true);
            for (i, line) in jobs.enumerate() {
                if i > 0 {
                    client.clock().advance(step);
                }
                let joined = spawn(line).await;
                client.settled().await;
                add(joined);
            }
            client.clock().set_logical(false);
        }
    }
    let mut report = tally.report(started.elapsed());
    report.lines = workload.lines.len();
    report.invalid_lines = workload.invalid_lines.clone();
    report.invalid = workload.invalid.clone();
    report.distinct_requests = distinct;
    report.repeat = repeat;
    report.concurrency = concurrency;
    report.logical_step_ms = options
        .logical_step
        .map(|step| u64::try_from(step.as_millis()).unwrap_or(u64::MAX));
    report
}

impl Sample {
    /// The sample of a request whose task panicked.
    fn panicked() -> Sample {
        Sample {
            result: Err("internal".into()),
            latency: Duration::ZERO,
            attempts: 0,
            tokens: 0,
            fallback: false,
            streamed: false,
        }
    }
}

/// Sends one line and reads its whole answer.
async fn replay(client: &Client, line: &Line) -> Sample {
    let started = Instant::now();
    let mut sample = Sample {
        result: Err(ERROR.into()),
        latency: Duration::ZERO,
        attempts: 0,
        tokens: 0,
        fallback: false,
        streamed: line.stream,
    };
    let answer = match client.call(Request::messages(line.body.clone())).await {
        Ok(Reply::Plain(r)) => {
            sample.attempts = r.attempts;
            Ok((
                r.outcome,
                r.model,
                serde_json::from_slice::<Value>(&r.body).ok(),
            ))
        }
        Ok(Reply::Stream(mut s)) => {
            sample.attempts = s.attempts;
            let mut bytes = Vec::new();
            let mut broken = false;
            while let Some(chunk) = s.events.next().await {
                match chunk {
                    Ok(chunk) => bytes.extend_from_slice(&chunk),
                    Err(_) => {
                        broken = true;
                        break;
                    }
                }
            }
            match crate::sse::assemble(&bytes) {
                Ok(message) if !broken => Ok((s.outcome, s.model, Some(message))),
                _ => Err("stream".to_owned()),
            }
        }
        Err(Error::Upstream(e)) => {
            sample.attempts = e.attempts;
            Err(e.status.to_string())
        }
        Err(Error::InvalidRequest(_)) => Err("invalid".to_owned()),
        Err(Error::Disk(_)) => Err("disk".to_owned()),
        Err(_) => Err("internal".to_owned()),
    };
    sample.latency = started.elapsed();
    match answer {
        Ok((outcome, model, message)) => {
            if outcome.is_hit() {
                sample.tokens = message.as_ref().map_or(0, tokens_of);
            }
            sample.fallback = model != line.model;
            sample.result = Ok(outcome);
        }
        Err(label) => sample.result = Err(label),
    }
    sample
}

/// `usage.input_tokens + usage.output_tokens` of a Message.
fn tokens_of(message: &Value) -> u64 {
    let usage = &message["usage"];
    usage["input_tokens"].as_u64().unwrap_or(0) + usage["output_tokens"].as_u64().unwrap_or(0)
}

// The tests replay against the fake upstream.
#[cfg(all(test, feature = "mock"))]
mod tests {
    use super::*;
    use crate::mock::{MockConfig, MockServer};

    #[test]
    fn parse_skips_blank_lines_and_numbers_invalid_ones() {
        let text =
            "{\"model\":\"a\",\"max_tokens\":5,\"messages\":[]}\n\nnot json\n[1]\n{\"x\":1}\n\
                    {\"model\":\"b\",\"stream\":true}\n";
        let w = Workload::parse(text);
        assert_eq!(w.invalid_lines, vec![3, 4, 5]);
        assert_eq!(w.lines.len(), 2);
        assert_eq!((w.lines[1].number, w.lines[1].stream), (6, true));
        assert_eq!(w.models(), vec!["a", "b"]);
    }

    #[test]
    fn line_list_is_shortened() {
        let lines: Vec<usize> = (1..=25).collect();
        assert!(line_list(&lines).ends_with("... (25 in all)"));
        assert_eq!(line_list(&[2, 7]), "2, 7");
    }

    #[tokio::test]
    async fn repeats_hit_streams_included_and_counts_add_up() {
        let mock = MockServer::start(MockConfig::default()).await.unwrap();
        let client = Client::builder()
            .upstream(mock.url())
            .credential("sk-test")
            .memory_only()
            .build()
            .await
            .unwrap();
        let q = |text: &str, stream: bool| {
            serde_json::json!({"model": "m", "max_tokens": 64, "stream": stream,
                "messages": [{"role": "user", "content": text}]})
            .to_string()
        };
        let text = [q("a", false), q("b", false), q("a", true), q("b", false)].join("\n");
        let workload = Workload::parse(&text);
        let options = Options {
            concurrency: 1,
            repeat: 2,
            ..Options::default()
        };
        let mut calls = 0;
        let r = run(&client, &workload, &options, |_| calls += 1).await;
        assert_eq!((r.requests, calls, r.streamed), (8, 8, 2));
        assert_eq!(
            (r.misses, r.memory, r.errors, r.distinct_requests),
            (2, 6, 0, 2)
        );
        assert_eq!(mock.stats().requests, 2);
        assert!(r.tokens_saved > 0);
        assert_eq!(r.latency_us["memory"].count, 6);
        assert_eq!(r.latency_us["stale"].p50, None);
        assert!((r.hit_rate - 0.75).abs() < 1e-9);
    }
}
