//! `fallthrough key REQUEST.json [--diff OTHER.json] [--header NAME:VALUE]...`

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;

use fallthrough::key::diff;
use fallthrough::{Client, Request};

#[derive(Args)]
pub struct KeyArgs {
    /// A Messages request body (JSON); `-` for stdin.
    request: PathBuf,
    /// A second request: print exactly which fields and headers make the keys differ.
    #[arg(long, value_name = "OTHER.json")]
    diff: Option<PathBuf>,
    /// A request header, as the proxy would receive it (e.g. `anthropic-beta:tools-2024-04-04`).
    /// Applies to both requests.
    #[arg(long = "header", short = 'H', value_name = "NAME:VALUE")]
    headers: Vec<String>,
    /// Endpoint path.
    #[arg(long, default_value = "/v1/messages")]
    path: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: KeyArgs, client: Client) -> Result<ExitCode> {
    let left = request(&args.request, &args)?;
    let (key, canonical) = client.canonical(&left)?;
    let Some(other) = &args.diff else {
        if args.json {
            println!(
                "{}",
                json!({"key": key.to_string(), "canonical": canonical})
            );
        } else {
            println!("{}", serde_json::to_string(&canonical)?);
            println!("{key}");
        }
        return Ok(ExitCode::SUCCESS);
    };
    let (other_key, other_canonical) = client.canonical(&request(other, &args)?)?;
    let differences = diff(&canonical, &other_canonical);
    if args.json {
        let out = json!({
            "left": key.to_string(),
            "right": other_key.to_string(),
            "same": key == other_key,
            "differences": differences,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else if key == other_key {
        println!("same key {key}");
    } else {
        println!("{key}  {}", args.request.display());
        println!("{other_key}  {}", other.display());
        for d in &differences {
            let show = |v: &Option<serde_json::Value>| {
                v.as_ref().map_or("(absent)".to_owned(), |v| v.to_string())
            };
            println!("{}: {} -> {}", d.path, show(&d.left), show(&d.right));
        }
    }
    Ok(if key == other_key {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn request(file: &Path, args: &KeyArgs) -> Result<Request> {
    let body = if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?
    };
    let mut request = Request::messages(body);
    request.path = args.path.clone();
    for header in &args.headers {
        let Some((name, value)) = header.split_once(':') else {
            bail!("--header takes NAME:VALUE, got {header:?}");
        };
        request = request.header(name.trim(), value.trim());
        if name.trim().eq_ignore_ascii_case("x-fallthrough-namespace") {
            request.namespace = Some(value.trim().to_owned());
        }
    }
    Ok(request)
}
