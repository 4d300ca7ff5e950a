//! `fallthrough cache stats | get KEY | purge | export FILE | import FILE`

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{ArgGroup, Args, Subcommand};

use fallthrough::admin::{self, Purge};
use fallthrough::cache::DiskTier;
use fallthrough::entry::{now_millis, Freshness};
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
            let stats = admin::stats(&disk, now).await?;
            // With the directory to itself, what was read is exact: the kept counts follow.
            disk.set_counts(stats.entries, stats.bytes)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&stats)?);
            } else {
                println!("entries   {}", stats.entries);
                println!("bytes     {}", bytesize::ByteSize(stats.bytes));
                println!("fresh     {}", stats.fresh);
                println!("stale     {}", stats.stale);
                println!("expired   {}", stats.expired);
                println!("corrupt   {}", stats.corrupt);
                for (model, n) in &stats.by_model {
                    println!("model     {model}: {n}");
                }
            }
        }
        CacheCommand::Get { key } => {
            let key: CacheKey = key.parse().context("not a key")?;
            let Some(entry) = disk.get(&key, now)? else {
                eprintln!("no entry under {key}");
                return Ok(ExitCode::FAILURE);
            };
            let state = match entry.freshness(now, None) {
                Freshness::Fresh => "fresh",
                Freshness::Stale => "stale",
                Freshness::Expired => "expired",
            };
            eprintln!(
                "model {}  {state}  age {}",
                entry.model,
                humantime::format_duration(std::time::Duration::from_secs(
                    entry.age(now).as_secs()
                ))
            );
            std::io::stdout().write_all(&entry.body)?;
            println!();
        }
        CacheCommand::Purge(args) => {
            let what = match (args.expired, args.older_than, args.all) {
                (true, _, _) => Purge::Expired,
                (_, Some(age), _) => Purge::OlderThan(age),
                (_, _, true) => Purge::All,
                _ => bail!("say what to purge: --expired, --older-than DUR or --all"),
            };
            let removed = admin::purge(&disk, what, now).await?;
            println!("removed {removed} entries");
        }
        CacheCommand::Export { file } => {
            let out: Box<dyn Write + Send> = if file.as_os_str() == "-" {
                Box::new(std::io::stdout())
            } else {
                Box::new(
                    std::fs::File::create(&file)
                        .with_context(|| format!("cannot create {}", file.display()))?,
                )
            };
            let n = admin::export(&disk, out).await?;
            eprintln!("exported {n} entries");
        }
        CacheCommand::Import { file } => {
            let input: Box<dyn std::io::BufRead> = if file.as_os_str() == "-" {
                Box::new(std::io::stdin().lock())
            } else {
                let f = std::fs::File::open(&file)
                    .with_context(|| format!("cannot open {}", file.display()))?;
                Box::new(std::io::BufReader::new(f))
            };
            let report = admin::import(&disk, input, now).await?;
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
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
