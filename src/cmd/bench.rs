//! `fallthrough bench FILE.jsonl [--concurrency N] [--repeat N] [--json] [--mock ...]`

use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use fallthrough::bench::{self, Options, Report, Workload};
use fallthrough::mock::{MockConfig, MockServer, MockStats};
use fallthrough::{ClientBuilder, Config};

/// The model the `--mock` demo falls back to when the configuration names no fallback.
const DEMO_FALLBACK: &str = "claude-haiku-4-5";
/// How long answers stay fresh in a `--mock` run unless `--ttl` or the configuration says
/// otherwise: short, so that a run of seconds sees entries age and go stale as a day of traffic
/// would, and the demo shows stale answers. On the logical clock: 100 requests.
const DEMO_TTL: Duration = Duration::from_millis(500);
/// The logical clock's step per request in a `--mock` run (a reproducible replay, see
/// [`bench::Options::logical_step`]): 200 requests a second, about the pace of a concurrent
/// run against the fake.
const MOCK_STEP: Duration = Duration::from_millis(5);
/// Requests in flight at once when --concurrency is not given (and the run is live).
const DEFAULT_CONCURRENCY: u32 = 8;
/// Runs shorter than this get no progress bar.
const PROGRESS_FROM: usize = 300;
/// The credential sent to the in-process fake (never the real key).
const MOCK_KEY: &str = "sk-fallthrough-bench-mock";

#[derive(Args)]
#[command(after_help = EXIT_STATUS)]
pub struct BenchArgs {
    /// The workload: one Messages request body (JSON) a line.
    #[arg(value_name = "FILE.jsonl")]
    file: PathBuf,
    /// Requests in flight at once [default: 8]. With --mock, giving it makes a live run at
    /// that concurrency, whose counts vary from run to run (see --mock).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=10_000))]
    concurrency: Option<u32>,
    /// Passes over the workload.
    #[arg(long, default_value_t = 1, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=1_000))]
    repeat: u32,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
    /// Fallback chain for a model, `MODEL=A,B` (repeatable); replaces the configured one.
    #[arg(long, value_name = "MODEL=A,B", value_parser = parse_fallback)]
    fallback: Vec<(String, Vec<String>)>,
    /// Freshness period of stored answers (e.g. `10m`, `24h`) [default: the configuration's].
    #[arg(long, value_name = "DUR", value_parser = humantime::parse_duration)]
    ttl: Option<Duration>,

    /// Run against an in-process fake of the API: no key needed; reproducible.
    ///
    /// A --mock run is a reproducible replay: the same workload, flags, configuration and
    /// --seed give the same counts on every run (outcomes, errors, upstream attempts, what the
    /// fake received, calls and tokens saved, fallback answers); latencies and wall time vary.
    /// Requests go one at a time, in file order, each once everything the one before set going
    /// has ended (a background refresh included); the client decides freshness, the retry
    /// budget and breaker cooldowns by a logical clock that advances 5ms a request, not by the
    /// machine's speed; the fake decides each fault from the seed, the request and how many
    /// identical requests came before it. --concurrency N trades that for speed: a live run,
    /// N at a time on the system clocks, whose counts vary.
    ///
    /// What still runs on real time: timeouts, backoff and retry-after waits, the request
    /// deadline, and the memory tier's eviction at the end of an entry's stale period (a run
    /// longer than ttl + stale_for may take some hits from disk instead). A --cache-dir that
    /// already holds entries starts each run from what the last one left.
    ///
    /// Unless set otherwise, it uses a fresh temporary cache (no --cache-dir), a ttl of 500ms
    /// on the logical clock, i.e. 100 requests (no --ttl, no ttl in the config), so entries go
    /// stale during the run, and, when no fallback is configured, a chain from every model of
    /// the workload to claude-haiku-4-5, then the workload's other models.
    #[arg(long, help_heading = "Fake API (--mock)")]
    mock: bool,
    /// Share of requests the fake answers 529 overloaded_error.
    #[arg(long, requires = "mock", value_name = "P", value_parser = probability,
          help_heading = "Fake API (--mock)")]
    overload_rate: Option<f64>,
    /// Models the fake always answers 529.
    #[arg(
        long,
        requires = "mock",
        value_delimiter = ',',
        value_name = "A,B",
        help_heading = "Fake API (--mock)"
    )]
    overloaded_models: Vec<String>,
    /// Share of requests the fake answers 429 rate_limit_error.
    #[arg(long, requires = "mock", value_name = "P", value_parser = probability,
          help_heading = "Fake API (--mock)")]
    rate_limit_rate: Option<f64>,
    /// Share of requests the fake answers 500 api_error.
    #[arg(long, requires = "mock", value_name = "P", value_parser = probability,
          help_heading = "Fake API (--mock)")]
    server_error_rate: Option<f64>,
    /// `retry-after` seconds the fake sends with 429 and 529.
    #[arg(
        long,
        requires = "mock",
        value_name = "SECONDS",
        help_heading = "Fake API (--mock)"
    )]
    retry_after: Option<u64>,
    /// Delay before each of the fake's answers, so misses cost something [default: 20].
    #[arg(
        long,
        requires = "mock",
        value_name = "MS",
        help_heading = "Fake API (--mock)"
    )]
    latency: Option<u64>,
    /// Seed of the fake's faults: a run with the same seed gives the same counts [default: 0].
    #[arg(
        long,
        requires = "mock",
        value_name = "N",
        help_heading = "Fake API (--mock)"
    )]
    seed: Option<u64>,
}

/// The end of `bench --help`.
const EXIT_STATUS: &str = "Exit status: 0 when every request was answered; 1 when any request \
failed (the report is printed first) or the bench could not run; 2 for invalid arguments.";

fn probability(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        Ok(_) => Err("must be between 0 and 1".into()),
        Err(e) => Err(e.to_string()),
    }
}

fn parse_fallback(s: &str) -> Result<(String, Vec<String>), String> {
    let (model, chain) = s
        .split_once('=')
        .ok_or("expected MODEL=A,B (a model, `=`, and the models to try in turn)")?;
    let chain: Vec<String> = chain
        .split(',')
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .map(str::to_owned)
        .collect();
    if model.trim().is_empty() || chain.is_empty() {
        return Err("expected MODEL=A,B with a model on each side".into());
    }
    Ok((model.trim().to_owned(), chain))
}

pub async fn run(args: BenchArgs, common: crate::CommonArgs) -> Result<ExitCode> {
    let workload = Workload::read(&args.file)?;
    let mut config = crate::load_config(&common)?;
    if let Some(ttl) = args.ttl {
        config.cache.ttl = ttl;
    }
    for (model, chain) in &args.fallback {
        config.fallback.insert(model.clone(), chain.clone());
    }
    let mut temp_dir = None;
    let mut demo_chain = false;
    let mut mock = None;
    let builder = if args.mock {
        // The default chains name only the API's current models; the demo's chain covers the
        // workload's own.
        if config.fallback == Config::default().fallback {
            config.fallback = demo_fallbacks(&workload.models());
            demo_chain = true;
        }
        if args.ttl.is_none() && config.cache.ttl == Config::default().cache.ttl {
            config.cache.ttl = DEMO_TTL;
        }
        if common.cache_dir.is_none() {
            let dir = fresh_temp_dir()?;
            config.cache_dir = Some(dir.clone());
            temp_dir = Some(TempDir(dir));
        }
        let server = MockServer::start(MockConfig {
            overload_rate: args.overload_rate.unwrap_or(0.0),
            overloaded_models: args.overloaded_models.clone(),
            rate_limit_rate: args.rate_limit_rate.unwrap_or(0.0),
            server_error_rate: args.server_error_rate.unwrap_or(0.0),
            retry_after: args.retry_after,
            latency_ms: args.latency.unwrap_or(20),
            seed: args.seed.unwrap_or(0),
            ..MockConfig::default()
        })
        .await
        .context("starting the fake API")?;
        let url = server.url();
        mock = Some(server);
        ClientBuilder::from_config(config.clone())
            .upstream(url)
            .credential(MOCK_KEY)
    } else {
        crate::warn_if_no_key(&config.upstream, "the workload's requests");
        crate::with_credential(ClientBuilder::from_config(config.clone()))
    };
    let mock_latency = mock.as_ref().map(|_| args.latency.unwrap_or(20));
    let setup = setup_line(&args, &config, mock_latency, demo_chain);
    let dir = config.cache_dir();
    let client = builder
        .build()
        .await
        .with_context(|| format!("opening the cache in {}", dir.display()))?;

    let options = Options {
        concurrency: args.concurrency.unwrap_or(DEFAULT_CONCURRENCY) as usize,
        repeat: args.repeat as usize,
        // A --mock run is reproducible unless a concurrency was asked for.
        logical_step: (args.mock && args.concurrency.is_none()).then_some(MOCK_STEP),
    };
    let total = workload.lines.len() * options.repeat;
    let bar = (std::io::stderr().is_terminal() && total >= PROGRESS_FROM).then(|| progress(total));
    let mut report = bench::run(&client, &workload, &options, |done| {
        if let Some(bar) = &bar {
            bar.set_position(done);
        }
    })
    .await;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    report.file = Some(args.file.display().to_string());
    if let Some(mock) = &mock {
        add_mock_stats(&mut report, &mock.stats());
    }
    if temp_dir.is_none() {
        client.flush().await.context("writing the cache out")?;
    }
    drop(client);
    if let Some(mock) = mock {
        mock.shutdown().await;
    }
    drop(temp_dir);

    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report, &setup);
    }
    // As prewarm: a script learns from the status that some requests went unanswered.
    Ok(match report.errors {
        0 => ExitCode::SUCCESS,
        _ => ExitCode::from(1),
    })
}

/// The `--mock` demo's fallback chains: every model of the workload falls back to
/// [`DEMO_FALLBACK`], then to the workload's other models in turn.
fn demo_fallbacks(models: &[String]) -> HashMap<String, Vec<String>> {
    models
        .iter()
        .map(|model| {
            let mut chain = vec![DEMO_FALLBACK.to_owned()];
            chain.extend(models.iter().filter(|m| *m != DEMO_FALLBACK).cloned());
            chain.retain(|m| m != model);
            (model.clone(), chain)
        })
        .filter(|(_, chain)| !chain.is_empty())
        .collect()
}

/// Where requests went and with which settings, for the human report.
fn setup_line(
    args: &BenchArgs,
    config: &Config,
    mock_latency: Option<u64>,
    demo_chain: bool,
) -> String {
    let mut parts = Vec::new();
    match mock_latency {
        Some(latency) => {
            let mut faults = format!(
                "fake API in-process: latency {latency}ms, overload {:.0}%",
                args.overload_rate.unwrap_or(0.0) * 100.0
            );
            if let Some(p) = args.rate_limit_rate {
                faults.push_str(&format!(", rate limit {:.0}%", p * 100.0));
            }
            if let Some(p) = args.server_error_rate {
                faults.push_str(&format!(", server errors {:.0}%", p * 100.0));
            }
            if !args.overloaded_models.is_empty() {
                faults.push_str(&format!(
                    ", always overloaded: {}",
                    args.overloaded_models.join(",")
                ));
            }
            parts.push(faults);
        }
        None => parts.push(fallthrough::config::redacted(&config.upstream)),
    }
    parts.push(format!(
        "ttl {}",
        humantime::format_duration(config.cache.ttl)
    ));
    let mut chains: Vec<String> = config
        .fallback
        .iter()
        .map(|(model, chain)| format!("{model} -> {}", chain.join(" -> ")))
        .collect();
    chains.sort();
    parts.push(match (demo_chain, chains.is_empty()) {
        (true, _) => format!("fallback to {DEMO_FALLBACK}, then the other models"),
        (false, true) => "no fallback".to_owned(),
        (false, false) => format!("fallback {}", chains.join("; ")),
    });
    parts.join("; ")
}

fn progress(total: usize) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("{bar:40} {pos}/{len} requests  {rate}  eta {eta}")
    {
        bar.set_style(style.with_key("rate", crate::cmd::rate_key));
    }
    bar
}

/// A directory under the system's temp dir, removed when dropped: `--mock` starts cold.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn fresh_temp_dir() -> Result<PathBuf> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!(
        "fallthrough-bench-{}-{nanos:09}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("creating a temporary cache in {}", dir.display()))?;
    Ok(dir)
}

fn print_report(r: &Report, setup: &str) {
    let file = r.file.as_deref().map(Path::new).map(Path::display);
    if let Some(file) = file {
        let pace = match r.logical_step_ms {
            Some(step) => format!("one at a time, logical clock {step}ms a request"),
            None => format!("concurrency {}", r.concurrency),
        };
        println!(
            "workload     {file}: {} lines x {} = {} requests ({} distinct, {} streamed), {pace}",
            r.lines, r.repeat, r.requests, r.distinct_requests, r.streamed
        );
    }
    println!("upstream     {setup}");
    if !r.invalid_lines.is_empty() {
        println!(
            "invalid      {} lines skipped: {}",
            r.invalid_lines.len(),
            bench::line_list(&r.invalid_lines)
        );
        for line in fallthrough::jsonl::describe(&r.invalid) {
            println!("               {line}");
        }
    }
    println!(
        "wall time    {:.2} s, {:.1} req/s",
        r.wall_time_s, r.throughput_rps
    );
    println!();
    println!(
        "{:<8} {:>7} {:>7} {:>9} {:>9} {:>9} {:>9}",
        "outcome", "count", "share", "p50", "p95", "p99", "max"
    );
    let rows = [
        ("memory", r.memory),
        ("disk", r.disk),
        ("shared", r.shared),
        ("stale", r.stale),
        ("miss", r.misses),
        ("bypass", r.bypass),
        ("error", r.errors),
    ];
    for (name, count) in rows {
        let latency = r.latency_us.get(name).cloned().unwrap_or_default();
        let share = match r.requests {
            0 => 0.0,
            n => count as f64 * 100.0 / n as f64,
        };
        println!(
            "{:<8} {:>7} {:>6.1}% {:>9} {:>9} {:>9} {:>9}",
            name,
            count,
            share,
            micros(latency.p50),
            micros(latency.p95),
            micros(latency.p99),
            micros(latency.max)
        );
    }
    println!("{:<8} {:>7} {:>6.1}%", "total", r.requests, 100.0);
    println!();
    println!(
        "hit rate           {:.1}%  (memory {:.1}%, disk {:.1}%, stale {:.1}%)",
        r.hit_rate * 100.0,
        r.memory_rate * 100.0,
        r.disk_rate * 100.0,
        r.stale_rate * 100.0
    );
    println!("answered           {} of {}", r.answered, r.requests);
    let errors = match r.errors {
        0 => "0".to_owned(),
        n => format!("{n} ({})", counts(&r.errors_by_status)),
    };
    println!("errors             {errors}");
    println!(
        "upstream attempts  {} (summed over requests; retries and fallbacks included)",
        r.upstream_attempts
    );
    if let Some(n) = r.mock_requests {
        let by_status = r.mock_by_status.as_ref().map(counts).unwrap_or_default();
        println!("fake API received  {n} ({by_status})");
    }
    println!("calls saved        {}", r.calls_saved);
    println!("tokens saved       {}", thousands(r.tokens_saved));
    println!(
        "fallback answers   {} (answered by another model than asked)",
        r.fallback_answers
    );
}

/// `529: 3, 429: 1`
fn counts(map: &std::collections::BTreeMap<String, u64>) -> String {
    map.iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A latency in µs for people: `850µs`, `23.4ms`, `1.25s`; `-` when there is none.
fn micros(us: Option<u64>) -> String {
    match us {
        None => "-".to_owned(),
        Some(us) if us < 1_000 => format!("{us}µs"),
        Some(us) if us < 1_000_000 => format!("{:.1}ms", us as f64 / 1e3),
        Some(us) => format!("{:.2}s", us as f64 / 1e6),
    }
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Adds what the in-process fake saw (`--mock`) to the report.
fn add_mock_stats(report: &mut Report, stats: &MockStats) {
    let mut by_status = BTreeMap::new();
    for statuses in stats.by_model.values() {
        for (status, n) in statuses {
            *by_status.entry(status.to_string()).or_default() += n;
        }
    }
    report.mock_requests = Some(stats.requests);
    report.mock_by_status = Some(by_status);
}
