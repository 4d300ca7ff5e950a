//! `fallthrough bench FILE.jsonl [--concurrency N] [--repeat N] [--json] [--mock ...]`

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

#[derive(Args)]
pub struct BenchArgs {}

pub async fn run(_args: BenchArgs, _common: crate::CommonArgs) -> Result<ExitCode> {
    anyhow::bail!("bench is being built")
}
