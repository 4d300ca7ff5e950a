//! The overload scenario of issue 3 ("Targets under overload"), against the in-process fake API.
//!
//! A steady stream of requests (open loop: a request starts every `1/rate` seconds whether or
//! not earlier ones have finished), 75% of them repeats of earlier ones (skewed towards popular
//! ones), for primary model `a` with fallback `b`, through four phases:
//!
//! 1. healthy;
//! 2. `a` answers 529 to half of its requests;
//! 3. `a` answers only 529 (30 s by default);
//! 4. recovery.
//!
//! In the easier scenario (the default) `b` stays healthy throughout. In the harder one
//! (`--scenario hard`, issue 14) `b` answers 529 to 30% of its requests from phase 2 on and only
//! 529 in phase 3, with `a`: a total outage, in which only a stored answer can serve a request.
//! The ttl is short, so entries go stale during the run. At the end it prints (or with `--json`
//! emits) requests, the share answered, the share answered of what could be answered (every
//! request outside the total outage, and in it those whose question was asked before it began;
//! and, stricter, of those whose question was answered before it began, since no one can serve
//! during a total outage a question that was never answered),
//! upstream attempts per request (from the fake's counters), p50/p99 latency, the share answered
//! by the fallback model, and outcomes by kind, overall and per phase, against the targets:
//! easier: >= 99.9% answered, <= 0.6 attempts per request, p99 <= 300 ms, <= 20% from a
//! fallback; harder: >= 99.9% of the answerable answered, <= 0.6 attempts per request, p99 <=
//! 300 ms.
//!
//! Run it with `cargo run --release --example overload [-- --scenario hard]` (about 75 s with
//! the defaults).

use std::collections::BTreeMap;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use fallthrough::mock::{MockConfig, MockServer, MockStats};
use fallthrough::{ClientBuilder, Config, Error};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::time::{Instant, MissedTickBehavior};

const PRIMARY: &str = "a";
const FALLBACK: &str = "b";
const PHASES: [&str; 4] = ["healthy", "half-529", "all-529", "recovery"];

/// Which models fail when.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    /// `b` stays healthy (issue 3).
    Easy,
    /// `b` fails 30% from the storm on and is down with `a` in the outage (issue 14).
    Hard,
}

/// The overload scenarios of issues 3 and 14.
#[derive(Parser, Debug)]
struct Args {
    /// The easier scenario (the fallback stays healthy) or the harder one (it fails too).
    #[arg(long, value_enum, default_value_t = Scenario::Easy)]
    scenario: Scenario,
    /// Requests started per second.
    #[arg(long, default_value_t = 40.0)]
    rate: f64,
    /// Seconds of the healthy phase.
    #[arg(long, default_value_t = 15)]
    healthy: u64,
    /// Seconds during which `a` answers 529 to half of its requests.
    #[arg(long, default_value_t = 15)]
    half: u64,
    /// Seconds during which `a` answers only 529.
    #[arg(long, default_value_t = 30)]
    dead: u64,
    /// Seconds of recovery.
    #[arg(long, default_value_t = 15)]
    recovery: u64,
    /// Share of requests that repeat an earlier one.
    #[arg(long, default_value_t = 0.75)]
    repeat: f64,
    /// How long an entry is fresh, in seconds.
    #[arg(long, default_value_t = 20)]
    ttl: u64,
    /// The fake's latency per answer, in milliseconds.
    #[arg(long, default_value_t = 50)]
    latency_ms: u64,
    /// Seeds the workload and the fake's faults.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Retries per model (default: the library's).
    #[arg(long)]
    max_retries: Option<u32>,
    /// Retries of `a` before `b` is asked (default: the library's).
    #[arg(long)]
    retries_before_fallback: Option<u32>,
    /// Backoff base in milliseconds (default: the library's).
    #[arg(long)]
    base_delay_ms: Option<u64>,
    /// Consecutive failures that open the breaker (default: the library's).
    #[arg(long)]
    breaker_failures: Option<u32>,
    /// Breaker cooldown in seconds (default: the library's).
    #[arg(long)]
    cooldown: Option<u64>,
    /// Time between rescues of a held model, in milliseconds; 0: none (default: the library's).
    #[arg(long)]
    rescue_interval_ms: Option<u64>,
    /// Retries the budget allows on top of its share of first attempts, per instance
    /// (default: the library's).
    #[arg(long)]
    budget_floor: Option<u32>,
    /// Instances (engines in this process) the requests are spread over, in turn; more than
    /// one needs `--shared-url` (issue 15: a fleet sharing one Redis).
    #[arg(long, default_value_t = 1)]
    instances: usize,
    /// The shared tier's server, for example `redis://127.0.0.1:6379/0`; every run writes
    /// under a prefix of its own.
    #[arg(long)]
    shared_url: Option<String>,
    /// Emit the results as one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Also write every request (start, question, phase, outcome, model, latency) to this file
    /// as JSON lines, to see where the losses are.
    #[arg(long)]
    records: Option<std::path::PathBuf>,
}

/// What became of one request.
struct Record {
    /// When it was sent, from the start of the run.
    sent: Duration,
    /// Its cache key, to find it in the log (`RUST_LOG=fallthrough=debug`).
    key: String,
    question: u64,
    phase: usize,
    /// Whether its question was asked before the total outage, or it was sent outside it: an
    /// answer could be given.
    answerable: bool,
    /// Stricter: sent outside the outage, or its question was *answered* for a request sent
    /// before the outage (only then was there an answer to store; a question whose every try
    /// failed before the outage can be answered by no one during it).
    stored_answerable: bool,
    latency: Duration,
    /// The outcome's name, or `error <status>`.
    outcome: String,
    /// The model that answered; `None` for an error.
    model: Option<String>,
}

fn question(n: u64) -> Value {
    json!({
        "model": PRIMARY,
        "max_tokens": 256,
        "messages": [{"role": "user", "content": format!("Question number {n}?")}],
    })
}

fn mock_config(phase: usize, args: &Args) -> MockConfig {
    let mut config = MockConfig {
        latency_ms: args.latency_ms,
        seed: args.seed + phase as u64,
        ..MockConfig::default()
    };
    let hard = args.scenario == Scenario::Hard;
    match phase {
        1 => {
            config.model_overload_rate.insert(PRIMARY.into(), 0.5);
            if hard {
                config.model_overload_rate.insert(FALLBACK.into(), 0.3);
            }
        }
        2 => {
            config.overloaded_models.push(PRIMARY.into());
            if hard {
                config.overloaded_models.push(FALLBACK.into());
            }
        }
        _ => {}
    }
    config
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let durations = [args.healthy, args.half, args.dead, args.recovery].map(Duration::from_secs);
    let total: Duration = durations.iter().sum();
    let planned = (total.as_secs_f64() * args.rate).round() as u64;

    let mock = MockServer::start(mock_config(0, &args)).await?;
    let mut config = Config::default();
    config.cache.ttl = Duration::from_secs(args.ttl);
    if let Some(n) = args.max_retries {
        config.retry.max_retries = n;
    }
    if let Some(n) = args.retries_before_fallback {
        config.retry.retries_before_fallback = n;
    }
    if let Some(ms) = args.base_delay_ms {
        config.retry.base_delay = Duration::from_millis(ms);
    }
    if let Some(n) = args.breaker_failures {
        config.breaker.failures = n;
    }
    if let Some(s) = args.cooldown {
        config.breaker.cooldown = Duration::from_secs(s);
    }
    if let Some(ms) = args.rescue_interval_ms {
        config.breaker.rescue_interval = Duration::from_millis(ms);
    }
    if let Some(n) = args.budget_floor {
        config.retry.budget_floor = n;
    }
    config
        .fallback
        .insert(PRIMARY.into(), vec![FALLBACK.into()]);
    anyhow::ensure!(
        args.instances >= 1 && (args.instances == 1 || args.shared_url.is_some()),
        "--instances above 1 needs --shared-url: instances share nothing else"
    );
    config.shared.url = args.shared_url.clone();
    config.shared.prefix = format!("overload-{}-{}:", std::process::id(), args.seed);
    let mut clients = Vec::new();
    for _ in 0..args.instances {
        let client = ClientBuilder::from_config(config.clone())
            .upstream(mock.url())
            .credential("sk-overload")
            .memory_only()
            .key_secret(fallthrough::key::KeySecret::from_text("the fleet's secret"))
            .build()
            .await?;
        clients.push(client);
    }
    let used = clients[0].config();
    let config_json = json!({
        "scenario": format!("{:?}", args.scenario).to_lowercase(),
        "instances": args.instances,
        "shared": args.shared_url.is_some(),
        "requests": planned,
        "rate_per_s": args.rate,
        "phases_s": {"healthy": args.healthy, "half_529": args.half, "all_529": args.dead, "recovery": args.recovery},
        "repeat_share": args.repeat,
        "ttl_s": used.cache.ttl.as_secs(),
        "stale_for_s": used.cache.stale_for.as_secs(),
        "mock_latency_ms": args.latency_ms,
        "seed": args.seed,
        "max_retries": used.retry.max_retries,
        "retries_before_fallback": used.retry.retries_before_fallback,
        "base_delay_ms": used.retry.base_delay.as_millis() as u64,
        "max_delay_ms": used.retry.max_delay.as_millis() as u64,
        "deadline_s": used.retry.deadline.as_secs(),
        "budget": format!("{} of first attempts + {}", used.retry.budget_ratio, used.retry.budget_floor),
        "breaker": format!("{} failures, {} s cooldown, rescues every {} ms", used.breaker.failures, used.breaker.cooldown.as_secs(), used.breaker.rescue_interval.as_millis()),
        "max_concurrency": used.max_concurrency,
        "fallback": format!("{PRIMARY} -> {FALLBACK}"),
    });
    if !args.json {
        println!("config: {config_json}");
        println!("running {planned} requests over {} s ...", total.as_secs());
    }

    // The workload, drawn up front from the seed: 25% new questions, 75% repeats skewed
    // towards the first (most popular) questions.
    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut distinct = 0u64;
    let workload: Vec<u64> = (0..planned)
        .map(|_| {
            if distinct == 0 || !rng.random_bool(args.repeat) {
                distinct += 1;
                distinct - 1
            } else {
                let u: f64 = rng.random();
                ((u * u * distinct as f64) as u64).min(distinct - 1)
            }
        })
        .collect();

    let started = Instant::now();
    let boundaries: Vec<Instant> = durations
        .iter()
        .scan(started, |at, d| {
            *at += *d;
            Some(*at)
        })
        .collect();
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate));
    ticks.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut phase = 0;
    let mut stats_at_phase_start = vec![MockStats::default()];
    let mut tasks = Vec::with_capacity(workload.len());
    // Questions asked before the total outage began (phase index 2).
    let mut asked_before_outage = std::collections::HashSet::new();
    for n in workload {
        let now = ticks.tick().await;
        while phase + 1 < PHASES.len() && now >= boundaries[phase] {
            phase += 1;
            stats_at_phase_start.push(mock.stats());
            mock.set_config(mock_config(phase, &args));
            if !args.json {
                println!(
                    "{:>5.1} s: phase {}",
                    started.elapsed().as_secs_f64(),
                    PHASES[phase]
                );
            }
        }
        if phase < 2 {
            asked_before_outage.insert(n);
        }
        let answerable =
            args.scenario == Scenario::Easy || phase != 2 || asked_before_outage.contains(&n);
        let client = clients[tasks.len() % clients.len()].clone();
        tasks.push(tokio::spawn(async move {
            let begun = Instant::now();
            let sent = begun - started;
            let key = client
                .key(&fallthrough::Request::json(&question(n)))
                .map(|k| k.to_string())
                .unwrap_or_default();
            let result = client.send(&question(n)).await;
            let latency = begun.elapsed();
            let (outcome, model) = match result {
                Ok(r) => (r.outcome.as_str().to_owned(), Some(r.model)),
                Err(Error::Upstream(e)) => (format!("error {}", e.status), None),
                Err(e) => (format!("error {e}"), None),
            };
            Record {
                sent,
                key,
                question: n,
                phase,
                answerable,
                stored_answerable: false, // known once every request has ended
                latency,
                outcome,
                model,
            }
        }));
    }
    let mut records = Vec::with_capacity(tasks.len());
    for task in tasks {
        records.push(task.await?);
    }
    let elapsed = started.elapsed();
    stats_at_phase_start.push(mock.stats());
    let answered_before_outage: std::collections::HashSet<u64> = (records.iter())
        .filter(|r| r.phase < 2 && r.model.is_some())
        .map(|r| r.question)
        .collect();
    for r in &mut records {
        r.stored_answerable = r.answerable
            && (args.scenario == Scenario::Easy
                || r.phase != 2
                || answered_before_outage.contains(&r.question));
    }
    if let Some(path) = &args.records {
        write_records(path, &records)?;
    }

    let overall = summarize(&records, &stats_at_phase_start[0], &stats_at_phase_start[4]);
    let phases: Vec<Value> = (0..PHASES.len())
        .map(|p| {
            let mine: Vec<&Record> = records.iter().filter(|r| r.phase == p).collect();
            let mut s = summarize_refs(
                &mine,
                &stats_at_phase_start[p],
                &stats_at_phase_start[p + 1],
            );
            s["phase"] = json!(PHASES[p]);
            s
        })
        .collect();
    let figure = |name: &str, missing: f64| overall[name].as_f64().unwrap_or(missing);
    let targets = match args.scenario {
        Scenario::Easy => json!({
            "answered_pct >= 99.9": figure("answered_pct", 0.0) >= 99.9,
            "attempts_per_request <= 0.6": figure("attempts_per_request", f64::MAX) <= 0.6,
            "p99_ms <= 300": figure("p99_ms", f64::MAX) <= 300.0,
            "fallback_pct <= 20": figure("fallback_pct", f64::MAX) <= 20.0,
        }),
        Scenario::Hard => json!({
            "answered_of_answerable_pct >= 99.9": figure("answered_of_answerable_pct", 0.0) >= 99.9,
            "attempts_per_request <= 0.6": figure("attempts_per_request", f64::MAX) <= 0.6,
            "p99_ms <= 300": figure("p99_ms", f64::MAX) <= 300.0,
        }),
    };
    let report = json!({
        "config": config_json,
        "elapsed_s": elapsed.as_secs_f64(),
        "distinct_questions": distinct,
        "overall": overall,
        "phases": phases,
        "upstream_by_model": mock.stats().by_model,
        "targets_met": targets,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&report);
    }
    Ok(())
}

fn write_records(path: &std::path::Path, records: &[Record]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for r in records {
        let line = json!({
            "sent_ms": r.sent.as_millis() as u64,
            "question": r.question,
            "key": r.key,
            "phase": PHASES[r.phase],
            "answerable": r.answerable,
            "stored_answerable": r.stored_answerable,
            "outcome": r.outcome,
            "model": r.model,
            "latency_ms": r.latency.as_secs_f64() * 1000.0,
        });
        writeln!(out, "{line}")?;
    }
    out.flush()?;
    Ok(())
}

fn summarize(records: &[Record], before: &MockStats, after: &MockStats) -> Value {
    let refs: Vec<&Record> = records.iter().collect();
    summarize_refs(&refs, before, after)
}

fn upstream_requests(stats: &MockStats) -> u64 {
    stats.by_model.values().flat_map(|m| m.values()).sum()
}

/// Figures for a set of requests; upstream attempts are the fake's requests between `before`
/// and `after` (for a phase this includes the retries and refreshes of requests begun earlier).
fn summarize_refs(records: &[&Record], before: &MockStats, after: &MockStats) -> Value {
    let n = records.len().max(1) as f64;
    let answered: Vec<&&Record> = records.iter().filter(|r| r.model.is_some()).collect();
    let answerable = records.iter().filter(|r| r.answerable).count();
    let answered_answerable = answered.iter().filter(|r| r.answerable).count();
    let stored_answerable = records.iter().filter(|r| r.stored_answerable).count();
    let answered_stored = answered.iter().filter(|r| r.stored_answerable).count();
    let from_fallback = answered
        .iter()
        .filter(|r| r.model.as_deref() == Some(FALLBACK))
        .count();
    let mut outcomes: BTreeMap<&str, u64> = BTreeMap::new();
    let mut by_outcome: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    for r in records {
        *outcomes.entry(&r.outcome).or_default() += 1;
        by_outcome.entry(&r.outcome).or_default().push(r.latency);
    }
    let mut latencies: Vec<Duration> = records.iter().map(|r| r.latency).collect();
    let attempts = upstream_requests(after).saturating_sub(upstream_requests(before));
    let slow = records
        .iter()
        .filter(|r| r.latency > Duration::from_millis(300))
        .count();
    let latency_by_outcome: BTreeMap<&str, Value> = by_outcome
        .into_iter()
        .map(|(k, mut v)| {
            (
                k,
                json!({"p50_ms": pct(&mut v, 0.50), "p99_ms": pct(&mut v, 0.99), "max_ms": pct(&mut v, 1.0)}),
            )
        })
        .collect();
    json!({
        "requests": records.len(),
        "answered_pct": 100.0 * answered.len() as f64 / n,
        "answerable": answerable,
        "answered_of_answerable_pct": 100.0 * answered_answerable as f64 / answerable.max(1) as f64,
        "stored_answerable": stored_answerable,
        "answered_of_stored_answerable_pct":
            100.0 * answered_stored as f64 / stored_answerable.max(1) as f64,
        "upstream_attempts": attempts,
        "attempts_per_request": attempts as f64 / n,
        "p50_ms": pct(&mut latencies, 0.50),
        "p99_ms": pct(&mut latencies, 0.99),
        "max_ms": pct(&mut latencies, 1.0),
        "over_300ms": slow,
        "fallback_pct": 100.0 * from_fallback as f64 / answered.len().max(1) as f64,
        "outcomes": outcomes,
        "latency_by_outcome": latency_by_outcome,
    })
}

/// The `q` quantile in milliseconds (nearest rank).
fn pct(values: &mut [Duration], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_unstable();
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    (values[rank - 1].as_secs_f64() * 1000.0 * 10.0).round() / 10.0
}

fn print_text(report: &Value) {
    let line = |name: &str, s: &Value| {
        println!(
            "{name:<10} {:>6} req  answered {:>6.2}% (of answerable {:>6.2}%, of answered before {:>6.2}%)  attempts/req {:>5.2}  p50 {:>7.1} ms  p99 {:>8.1} ms  >300ms {:>4}  fallback {:>5.1}%",
            s["requests"],
            s["answered_pct"].as_f64().unwrap_or(0.0),
            s["answered_of_answerable_pct"].as_f64().unwrap_or(0.0),
            s["answered_of_stored_answerable_pct"].as_f64().unwrap_or(0.0),
            s["attempts_per_request"].as_f64().unwrap_or(0.0),
            s["p50_ms"].as_f64().unwrap_or(0.0),
            s["p99_ms"].as_f64().unwrap_or(0.0),
            s["over_300ms"],
            s["fallback_pct"].as_f64().unwrap_or(0.0),
        );
        println!("{:<10} outcomes {}", "", s["outcomes"]);
        println!("{:<10} latency by outcome {}", "", s["latency_by_outcome"]);
    };
    println!(
        "\nelapsed {:.1} s, {} distinct questions",
        report["elapsed_s"].as_f64().unwrap_or(0.0),
        report["distinct_questions"]
    );
    for phase in report["phases"].as_array().into_iter().flatten() {
        line(phase["phase"].as_str().unwrap_or("?"), phase);
    }
    line("overall", &report["overall"]);
    println!(
        "upstream by model and status: {}",
        report["upstream_by_model"]
    );
    println!("targets met: {}", report["targets_met"]);
}
