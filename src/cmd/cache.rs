//! `fallthrough cache stats | get KEY | purge | export FILE | import FILE`

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{ArgGroup, Args, Subcommand};

use fallthrough::admin::{self, Purge};
use fallthrough::cache::{DiskTier, SharedTier};
use fallthrough::entry::{now_millis, Entry, Freshness};
use fallthrough::CacheKey;

#[derive(Subcommand)]
pub enum CacheCommand {
    /// Entries, bytes, freshness and models of the disk cache.
    Stats {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print one entry: its metadata on stderr, its body on stdout.
    Get {
        /// The key (64 hex characters, as in `x-fallthrough-key`).
        key: String,
    },
    /// Remove entries.
    Purge(PurgeArgs),
    /// Write every entry as a JSONL line (`-` for stdout).
    Export { file: PathBuf },
    /// Read entries written by `export` (`-` for stdin), keeping their times.
    Import { file: PathBuf },
}

impl PurgeArgs {
    fn what(&self) -> Result<Purge> {
        Ok(match (self.expired, self.older_than, self.all) {
            (true, _, _) => Purge::Expired,
            (_, Some(age), _) => Purge::OlderThan(age),
            (_, _, true) => Purge::All,
            _ => bail!("say what to purge: --expired, --older-than DUR or --all"),
        })
    }

    /// The body of `POST /fallthrough/purge`.
    fn body(&self) -> Result<serde_json::Value> {
        Ok(match self.what()? {
            Purge::Expired => serde_json::json!({"expired": true}),
            Purge::OlderThan(age) => {
                serde_json::json!({"older_than": humantime::format_duration(age).to_string()})
            }
            Purge::All => serde_json::json!({"all": true}),
        })
    }
}

#[derive(Args)]
#[command(group(ArgGroup::new("what").required(true).args(["expired", "older_than", "all"])))]
pub struct PurgeArgs {
    /// Entries past their stale period, and corrupt ones.
    #[arg(long)]
    expired: bool,
    /// Entries stored longer ago than this (e.g. `12h`, `7d`).
    #[arg(long, value_name = "DUR", value_parser = humantime::parse_duration)]
    older_than: Option<std::time::Duration>,
    /// Everything.
    #[arg(long)]
    all: bool,
}

pub async fn run(command: CacheCommand, disk: DiskTier) -> Result<ExitCode> {
    let now = now_millis();
    match command {
        CacheCommand::Stats { json } => {
            // With the directory to itself (`open_for_walk`), the walk writes the counts it
            // found back.
            let stats = admin::stats(&disk, now).await?;
            print_stats(&stats, json)?;
        }
        CacheCommand::Get { key } => {
            let key: CacheKey = key.parse().context("not a key")?;
            return Ok(show(&key, disk.get(&key, now)?, now));
        }
        CacheCommand::Purge(args) => {
            let removed = admin::purge(&disk, args.what()?, now).await?;
            println!("removed {removed} entries");
        }
        CacheCommand::Export { file } => {
            let n = admin::export(&disk, output(&file)?).await?;
            eprintln!("exported {n} entries");
        }
        CacheCommand::Import { file } => {
            let report = admin::import(&disk, input(&file)?, now).await?;
            return Ok(imported(&report));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Every subcommand on the shared tier (`--shared`), over the server `[shared]` names.
pub async fn run_shared(command: CacheCommand, shared: Arc<SharedTier>) -> Result<ExitCode> {
    let now = now_millis();
    match command {
        CacheCommand::Stats { json } => {
            print_stats(&admin::shared_stats(&shared, now).await?, json)?
        }
        CacheCommand::Get { key } => {
            let key: CacheKey = key.parse().context("not a key")?;
            let entry = match shared.lookup(&key).await? {
                Some(Ok(entry)) => Some(entry),
                Some(Err(e)) => bail!(
                    "the shared tier's value under {key} is damaged ({e}); it is never served"
                ),
                None => None,
            };
            return Ok(show(&key, entry, now));
        }
        CacheCommand::Purge(args) => {
            let removed = admin::shared_purge(&shared, args.what()?, now).await?;
            println!("removed {removed} entries");
        }
        CacheCommand::Export { file } => {
            let n = admin::shared_export(&shared, output(&file)?).await?;
            eprintln!("exported {n} entries");
        }
        CacheCommand::Import { file } => {
            let report = admin::shared_import(&shared, input(&file)?, now).await?;
            return Ok(imported(&report));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints an entry found under `key` (failure when there is none).
fn show(key: &CacheKey, entry: Option<Entry>, now: u64) -> ExitCode {
    let Some(entry) = entry else {
        eprintln!("no entry under {key}");
        return ExitCode::FAILURE;
    };
    let state = match entry.freshness(now, None) {
        Freshness::Fresh => "fresh",
        Freshness::Stale => "stale",
        Freshness::Expired => "expired",
    };
    match print_entry(&entry.model, state, entry.age(now).as_secs(), &entry.body) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Where `export` writes: the file, or stdout for `-`.
fn output(file: &Path) -> Result<Box<dyn Write + Send>> {
    if file.as_os_str() == "-" {
        return Ok(Box::new(std::io::stdout()));
    }
    let f =
        std::fs::File::create(file).with_context(|| format!("cannot create {}", file.display()))?;
    Ok(Box::new(f))
}

/// What `import` reads: the file, or stdin for `-`.
fn input(file: &Path) -> Result<Box<dyn std::io::BufRead>> {
    if file.as_os_str() == "-" {
        return Ok(Box::new(std::io::stdin().lock()));
    }
    let f = std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    Ok(Box::new(std::io::BufReader::new(f)))
}

/// Prints how an import went; failure when any line was invalid.
fn imported(report: &admin::Imported) -> ExitCode {
    println!(
        "imported {}, skipped {} expired, {} invalid lines",
        report.imported,
        report.expired,
        report.invalid_lines.len()
    );
    if report.secret == admin::SecretImport::Differs {
        eprintln!(
            "warning: this cache keys credentials with another secret than the export's: \
             entries stored for an API key or token will not match here. Import into an \
             empty cache directory, or set FALLTHROUGH_KEY_SECRET to the exporting cache's \
             key-secret file's content"
        );
    }
    if !report.invalid_lines.is_empty() {
        println!("invalid lines: {:?}", report.invalid_lines);
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// `stats`, `get` and `purge` through a running proxy's admin endpoints.
pub async fn run_remote(command: CacheCommand, server: &str) -> Result<ExitCode> {
    let base = server.trim_end_matches('/');
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(600))
        .build()?;
    let with_key = |r: reqwest::RequestBuilder| match crate::api_key_from_env() {
        Some(key) => r.header("x-api-key", key),
        None => r,
    };
    let send = |r: reqwest::RequestBuilder| async move {
        let r = with_key(r)
            .send()
            .await
            .with_context(|| format!("cannot reach the proxy at {base}"))?;
        let status = r.status();
        let headers = r.headers().clone();
        let body = r.bytes().await?;
        anyhow::Ok((status, headers, body))
    };
    let refused = |status: reqwest::StatusCode, body: &[u8]| {
        let message = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
        anyhow::anyhow!("the proxy at {base} answered {status}: {message}")
    };
    match command {
        CacheCommand::Stats { json } => {
            let (status, _, body) = send(http.get(format!("{base}/fallthrough/stats"))).await?;
            if !status.is_success() {
                return Err(refused(status, &body));
            }
            print_stats(&serde_json::from_slice(&body)?, json)?;
        }
        CacheCommand::Get { key } => {
            let key: CacheKey = key.parse().context("not a key")?;
            let url = format!("{base}/fallthrough/entries/{key}");
            let (status, headers, body) = send(http.get(url)).await?;
            if status == reqwest::StatusCode::NOT_FOUND {
                eprintln!("no entry under {key}");
                return Ok(ExitCode::FAILURE);
            }
            if !status.is_success() {
                return Err(refused(status, &body));
            }
            let text = |name: &str| {
                headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned()
            };
            let age = text("age").parse().unwrap_or(0);
            print_entry(
                &text("x-fallthrough-model"),
                &text("x-fallthrough-freshness"),
                age,
                &body,
            )?;
        }
        CacheCommand::Purge(args) => {
            let url = format!("{base}/fallthrough/purge");
            let (status, _, body) = send(http.post(url).json(&args.body()?)).await?;
            if !status.is_success() {
                return Err(refused(status, &body));
            }
            let answer: serde_json::Value = serde_json::from_slice(&body)?;
            println!("removed {} entries", answer["removed"]);
        }
        CacheCommand::Export { .. } | CacheCommand::Import { .. } => bail!(
            "export and import read and write the cache directory itself: run them without \
             --server, with the proxy stopped (or on a copy of its directory)"
        ),
    }
    Ok(ExitCode::SUCCESS)
}

fn print_stats(stats: &admin::Stats, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(stats)?);
        return Ok(());
    }
    println!("entries   {}", stats.entries);
    println!("bytes     {}", bytesize::ByteSize(stats.bytes));
    println!("fresh     {}", stats.fresh);
    println!("stale     {}", stats.stale);
    println!("expired   {}", stats.expired);
    println!("corrupt   {}", stats.corrupt);
    for (model, n) in &stats.by_model {
        println!("model     {model}: {n}");
    }
    Ok(())
}

/// An entry: its metadata on stderr, its body on stdout.
fn print_entry(model: &str, state: &str, age_secs: u64, body: &[u8]) -> Result<()> {
    let age = humantime::format_duration(std::time::Duration::from_secs(age_secs));
    eprintln!("model {model}  {state}  age {age}");
    std::io::stdout().write_all(body)?;
    println!();
    Ok(())
}
