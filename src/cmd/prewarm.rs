//! `fallthrough prewarm FILE.jsonl|- [--concurrency N] [--dry-run] [--server URL] [--json]
//! [--batch [--poll-interval DUR]]`

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use fallthrough::batch;
use fallthrough::prewarm::{self, LineResult, Options, Summary, Target};

#[derive(Args)]
pub struct PrewarmArgs {
    /// Messages request bodies, one JSON object a line; `-` for stdin.
    file: PathBuf,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 4, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    concurrency: u32,
    /// Count what is cached and what is missing; call nothing upstream.
    #[arg(long)]
    dry_run: bool,
    /// Send the requests through a running `fallthrough serve` (when it holds the cache).
    #[arg(long, value_name = "URL")]
    server: Option<String>,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    /// Send the lines that are not fresh as Message Batches (half the price, outside the
    /// interactive overload) and store each result; a rerun resumes the batches in flight.
    #[arg(long, conflicts_with = "server")]
    batch: bool,
    /// With --batch: how often the batches in flight are polled.
    #[arg(long, default_value = "30s", value_name = "DUR", value_parser = humantime::parse_duration, requires = "batch")]
    poll_interval: Duration,
}

pub async fn run(args: PrewarmArgs, common: crate::CommonArgs) -> Result<ExitCode> {
    let input = if args.file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading stdin")?
    } else {
        std::fs::read_to_string(&args.file)
            .with_context(|| format!("cannot read {}", args.file.display()))?
    };
    if args.batch {
        return run_batch(&args, &input, common).await;
    }
    let target = match &args.server {
        Some(url) => Target::Server {
            url: url.clone(),
            http: reqwest::Client::new(),
            api_key: crate::api_key_from_env(),
        },
        None => {
            let config = crate::load_config(&common)?;
            if !args.dry_run {
                crate::warn_if_no_key(&config.upstream, "the lines' requests");
            }
            Target::Local(crate::build_client(config).await?)
        }
    };
    let total = input.lines().filter(|l| !l.trim().is_empty()).count() as u64;
    let options = Options {
        concurrency: args.concurrency as usize,
        dry_run: args.dry_run,
    };
    let progress = Progress::new(total);
    let summary = prewarm::run(&target, &input, options, |_, result| progress.tick(result)).await;
    progress.finish();
    if let Target::Local(client) = &target {
        client.flush().await?;
    }
    report(&summary, args.json, args.dry_run)?;
    Ok(if summary.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `prewarm --batch`: through the Batches API, storing into the cache directory.
async fn run_batch(args: &PrewarmArgs, input: &str, common: crate::CommonArgs) -> Result<ExitCode> {
    let config = crate::load_config(&common)?;
    if !args.dry_run {
        crate::warn_if_no_key(&config.upstream, "the batches");
    }
    let client = crate::build_client(config).await?;
    let options = batch::Options {
        poll_interval: args.poll_interval,
        dry_run: args.dry_run,
        api_key: crate::api_key_from_env(),
        record_dir: client.cache().dir().map(std::path::Path::to_path_buf),
    };
    let bar = BatchProgress::new();
    let summary = batch::run(&client, input, &options, |counts| bar.show(counts)).await;
    bar.finish();
    let summary = summary?;
    report_batch(&summary, args.json, args.dry_run)?;
    let failed = !summary.failed.is_empty();
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn report_batch(s: &batch::Summary, json: bool, dry_run: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(s)?);
        return Ok(());
    }
    let row = |label: &str, count: u64| println!("{label:<16} {count}");
    row("already cached", s.already_cached);
    if s.duplicates > 0 {
        row("duplicates", s.duplicates);
    }
    match (dry_run, s.resumed) {
        (true, true) => println!(
            "would resume     {} batches of an earlier run",
            s.batches.len()
        ),
        (true, false) => println!(
            "would submit     {} lines in {} batches",
            s.would_submit, s.would_batches
        ),
        (false, true) => println!(
            "resumed          {} batches of an earlier run",
            s.batches.len()
        ),
        (false, false) => row("submitted", s.submitted),
    }
    if !dry_run {
        row("stored", s.stored);
        row("failed", s.failed.len() as u64);
        for f in &s.failed {
            println!("  line {}: {}: {}", f.line, f.result, f.reason);
        }
    }
    row("invalid lines", s.invalid.len() as u64);
    for line in fallthrough::jsonl::describe(&s.invalid) {
        println!("  {line}");
    }
    Ok(())
}

/// The batches' states: a spinner with the counts on a terminal, else a line per poll.
struct BatchProgress {
    bar: Option<ProgressBar>,
}

impl BatchProgress {
    fn new() -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} batches {elapsed} {msg}")
                    .expect("valid template"),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        BatchProgress { bar }
    }

    fn show(&self, c: &batch::Counts) {
        let text = format!(
            "processing {}, succeeded {}, errored {}, canceled {}, expired {}",
            c.processing, c.succeeded, c.errored, c.canceled, c.expired
        );
        match &self.bar {
            Some(bar) => bar.set_message(text),
            None => eprintln!("prewarm: {text}"),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

fn report(s: &Summary, json: bool, dry_run: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(s)?);
        return Ok(());
    }
    // One column of labels, one of counts, whichever rows a run prints.
    let row = |label: &str, count: usize| println!("{label:<16} {count}");
    if dry_run {
        row("cached", s.already_cached as usize);
        row("missing", s.missing as usize);
    } else {
        row("fetched", s.fetched as usize);
        row("already cached", s.already_cached as usize);
    }
    row("failed", s.failed.len());
    for f in &s.failed {
        println!("  line {}: {} {}", f.line, f.status, f.message);
    }
    row("invalid lines", s.invalid.len());
    for line in fallthrough::jsonl::describe(&s.invalid) {
        println!("  {line}");
    }
    Ok(())
}

/// A bar on a terminal; otherwise a plain line every few seconds and at the end.
struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    done: AtomicU64,
    failed: AtomicU64,
    started: Instant,
    last_line: std::sync::Mutex<Instant>,
}

impl Progress {
    fn new(total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} prewarm [{bar:30}] {pos}/{len} {rate} eta {eta} {msg}",
                )
                .expect("valid template")
                .with_key("rate", crate::cmd::rate_key)
                .progress_chars("=> "),
            );
            bar
        });
        Progress {
            bar,
            total,
            done: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            started: Instant::now(),
            last_line: std::sync::Mutex::new(Instant::now()),
        }
    }

    fn tick(&self, result: &LineResult) {
        let done = self.done.fetch_add(1, Ordering::Relaxed) + 1;
        if matches!(result, LineResult::Failed { .. }) {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        let failed = self.failed.load(Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.set_position(done);
            if failed > 0 {
                bar.set_message(format!("{failed} failed"));
            }
            return;
        }
        let mut last = self.last_line.lock().expect("progress lock");
        if last.elapsed() >= Duration::from_secs(5) {
            *last = Instant::now();
            eprintln!("prewarm: {done}/{} lines, {failed} failed", self.total);
        }
    }

    fn finish(&self) {
        let done = self.done.load(Ordering::Relaxed);
        match &self.bar {
            Some(bar) => bar.finish_and_clear(),
            None => eprintln!(
                "prewarm: {done}/{} lines in {:.1} s",
                self.total,
                self.started.elapsed().as_secs_f64()
            ),
        }
    }
}
