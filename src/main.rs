//! The `fallthrough` binary: parses arguments, sets up logging, calls the library, and prints
//! an error chain once.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

use fallthrough::cache::DiskTier;
use fallthrough::key::KeySecret;
use fallthrough::mock::{self, MockConfig};

mod cmd;
use fallthrough::{Client, ClientBuilder, Config};

/// A response cache with resilient fallthrough for LLM APIs.
///
/// Requests are looked up in memory, then on disk; only a miss reaches the API, through
/// backoff, a per-model circuit breaker, a retry budget and a model-fallback chain. When the
/// API is overloaded, a stale answer is served instead of an error.
#[derive(Parser)]
#[command(name = "fallthrough", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the caching proxy: point an SDK's base URL at it.
    Serve(ServeArgs),
    /// Run a fault-injecting fake of the Messages API, for tests and demos.
    Mock(MockArgs),
    /// Fill the cache from a JSONL file of Messages requests (a rerun resumes).
    Prewarm {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        args: cmd::prewarm::PrewarmArgs,
    },
    /// Replay a workload through the full client and report hit rates, savings and latency.
    Bench {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        args: cmd::bench::BenchArgs,
    },
    /// Inspect and manage the disk cache.
    Cache {
        #[command(flatten)]
        common: CommonArgs,
        /// Go through a running proxy's admin endpoints (for when it holds the cache
        /// directory): `stats`, `get` and `purge`. `ANTHROPIC_API_KEY` is sent as the key (an
        /// admin token when the proxy requires tokens).
        #[arg(long, global = true, value_name = "URL", conflicts_with = "shared")]
        server: Option<String>,
        /// Work on the shared tier (`[shared]` in the configuration, or
        /// `FALLTHROUGH_SHARED_URL`) instead of the disk cache: every subcommand.
        #[arg(long, global = true)]
        shared: bool,
        #[command(subcommand)]
        command: cmd::cache::CacheCommand,
    },
    /// Print a new random access token and the `[[access.tokens]]` lines that admit it.
    Token {
        /// The name the token's callers are admitted as (logs, metrics, cache partition).
        name: String,
        /// Let the token use the admin endpoints.
        #[arg(long)]
        admin: bool,
        /// Print JSON: `{"name", "token", "sha256"}`.
        #[arg(long)]
        json: bool,
    },
    /// Print a request's canonical form and key; with --diff, why two requests' keys differ.
    Key {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        args: cmd::key::KeyArgs,
    },
}

/// Settings shared by every command that uses the cache. Global, so that they may come
/// after a subcommand's own subcommand too (`cache stats --cache-dir X`).
#[derive(Args, Clone)]
pub struct CommonArgs {
    /// Configuration file (TOML). Flags override it.
    #[arg(long, global = true, env = "FALLTHROUGH_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Where misses go.
    #[arg(long, global = true, env = "FALLTHROUGH_UPSTREAM", value_name = "URL")]
    pub upstream: Option<String>,
    /// The disk cache's directory [default: the user cache directory's `fallthrough`].
    #[arg(long, global = true, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Address to listen on [default: 127.0.0.1:8787].
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
}

#[derive(Args)]
struct MockArgs {
    /// Address to listen on; port 0 picks a free one (printed on stdout).
    #[arg(long, default_value = "127.0.0.1:8788", value_name = "ADDR")]
    listen: String,
    /// Share of requests answered 529 overloaded_error.
    #[arg(long, default_value_t = 0.0, value_name = "P")]
    overload_rate: f64,
    /// Models that always answer 529.
    #[arg(long, value_delimiter = ',', value_name = "A,B")]
    overloaded_models: Vec<String>,
    /// Share of requests answered 429 rate_limit_error.
    #[arg(long, default_value_t = 0.0, value_name = "P")]
    rate_limit_rate: f64,
    /// Share of requests answered 500 api_error.
    #[arg(long, default_value_t = 0.0, value_name = "P")]
    server_error_rate: f64,
    /// `retry-after` seconds sent with 429 and 529.
    #[arg(long, value_name = "SECONDS")]
    retry_after: Option<u64>,
    /// Added before every answer.
    #[arg(long, default_value_t = 0, value_name = "MS")]
    latency: u64,
    /// Seed of the random faults: each is decided by the seed, the request and how many
    /// identical requests came before it, so the same requests get the same faults in any order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// How long a Message Batch takes to end (`/v1/messages/batches`), e.g. `1s`, `10m`.
    #[arg(long, default_value = "0s", value_name = "DUR", value_parser = humantime::parse_duration)]
    batch_latency: std::time::Duration,
    /// Share of batched requests that end `expired`.
    #[arg(long, default_value_t = 0.0, value_name = "P")]
    batch_expire_rate: f64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A server logs what it does; a script's output is its report, so only warnings by default.
    let default_level = match cli.command {
        Command::Serve(_) | Command::Mock(_) => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Mock(args) => run_mock(args).await,
        Command::Prewarm { common, args } => cmd::prewarm::run(args, common).await,
        Command::Bench { common, args } => cmd::bench::run(args, common).await,
        Command::Cache {
            server: Some(url),
            command,
            ..
        } => cmd::cache::run_remote(command, &url).await,
        Command::Cache {
            common,
            command,
            shared: true,
            ..
        } => {
            let config = load_config(&common)?;
            // An admin walk's batches may take longer than a request's look-up is allowed.
            let mut settings = config.shared.clone();
            settings.timeout = (settings.timeout).max(fallthrough::cache::shared::ADMIN_TIMEOUT);
            let Some(shared) = fallthrough::cache::SharedTier::from_config(&settings)? else {
                anyhow::bail!(
                    "--shared needs a shared tier: a [shared] table with a url in the configuration (--config), or FALLTHROUGH_SHARED_URL"
                );
            };
            cmd::cache::run_shared(command, shared).await
        }
        Command::Cache {
            common, command, ..
        } => {
            let config = load_config(&common)?;
            let dir = config.cache_dir();
            let disk = DiskTier::open_for_walk(&dir, config.cache.disk_bytes.as_u64())
                .await
                .with_context(|| format!("opening the cache in {}", dir.display()))?;
            cmd::cache::run(command, disk).await
        }
        Command::Token { name, admin, json } => Ok(print_token(&name, admin, json)),
        Command::Key { common, args } => {
            let config = load_config(&common)?;
            // Keyed with the cache directory's secret, as `serve` on that directory keys.
            let secret = KeySecret::for_dir(&config.cache_dir()).with_context(|| {
                format!("reading the key secret in {}", config.cache_dir().display())
            })?;
            let client = with_credential(ClientBuilder::from_config(config))
                .memory_only()
                .key_secret(secret)
                .build()
                .await?;
            cmd::key::run(args, client).await
        }
    }
}

/// `fallthrough token NAME`: the token on stdout's first line, so that scripts can take it,
/// then the lines that admit it.
fn print_token(name: &str, admin: bool, json: bool) -> ExitCode {
    let token = fallthrough::server::new_token();
    let sha256 = fallthrough::server::token_sha256(&token);
    if json {
        println!(
            "{}",
            serde_json::json!({"name": name, "token": token, "sha256": sha256, "admin": admin})
        );
        return ExitCode::SUCCESS;
    }
    println!("{token}");
    println!();
    println!("# Add to fallthrough.toml; callers send the token above as their API key");
    println!("# (x-api-key, or authorization: Bearer). It is shown once and stored nowhere.");
    println!("[[access.tokens]]");
    println!("name = {}", toml_string(name));
    println!("sha256 = \"{sha256}\"");
    if admin {
        println!("admin = true");
    }
    ExitCode::SUCCESS
}

/// A TOML basic string (JSON's escapes are TOML's).
fn toml_string(text: &str) -> String {
    serde_json::Value::String(text.to_owned()).to_string()
}

/// The configuration: file, then environment and flags over it.
pub fn load_config(common: &CommonArgs) -> Result<Config> {
    let mut config = match &common.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(upstream) = &common.upstream {
        config.upstream = upstream.clone();
    }
    if let Some(dir) = &common.cache_dir {
        config.cache_dir = Some(dir.clone());
    }
    if let Some(url) = std::env::var("FALLTHROUGH_SHARED_URL")
        .ok()
        .filter(|u| !u.is_empty())
    {
        config.shared.url = Some(url);
    }
    config.validate()?;
    Ok(config)
}

/// A client over the configured cache, with `ANTHROPIC_API_KEY` as the default credential.
async fn build_client(config: Config) -> Result<Client> {
    let dir = config.cache_dir();
    with_credential(ClientBuilder::from_config(config))
        .build()
        .await
        .with_context(|| format!("opening the cache in {}", dir.display()))
}

/// Says on stderr, once, that `ANTHROPIC_API_KEY` is unset: what then goes to `upstream`
/// without a key, and what to do. `who` names the requests that carry none of their own.
pub fn warn_if_no_key(upstream: &str, who: &str) {
    if std::env::var_os("ANTHROPIC_API_KEY").is_some_and(|k| !k.is_empty()) {
        return;
    }
    let upstream = fallthrough::config::redacted(upstream);
    eprintln!(
        "warning: ANTHROPIC_API_KEY is not set; {who} go to {upstream} without a key, which \
         the real API refuses (set ANTHROPIC_API_KEY, or point --upstream at `fallthrough \
         mock` to try it without one)"
    );
}

/// Binds `listen`, saying what a valid address looks like when it is not one.
async fn bind(listen: &str) -> Result<TcpListener> {
    let hint = match listen.rsplit_once(':') {
        Some((_, port)) if port.parse::<u16>().is_ok() => "",
        _ => " (expected HOST:PORT, e.g. 127.0.0.1:8787)",
    };
    TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen:?}{hint}"))
}

/// `ANTHROPIC_API_KEY`, when it is set and not empty.
pub fn api_key_from_env() -> Option<String> {
    std::env::var("ANTHROPIC_API_KEY")
        .ok()
        .filter(|k| !k.is_empty())
}

/// `ANTHROPIC_API_KEY` as the credential for requests that carry none.
pub fn with_credential(builder: ClientBuilder) -> ClientBuilder {
    match api_key_from_env() {
        Some(key) => builder.credential(key),
        None => builder,
    }
}

async fn serve(args: ServeArgs) -> Result<ExitCode> {
    let mut config = load_config(&args.common)?;
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    let listen = config.listen.clone();
    // Refused before anything is bound: an open proxy must never listen beyond loopback,
    // even for a moment.
    if let Ok(addrs) = tokio::net::lookup_host(&listen).await {
        for addr in addrs {
            fallthrough::server::check_access(&config.access, addr)?;
        }
    }
    let upstream = fallthrough::config::redacted(&config.upstream);
    let cache = config.cache_dir();
    warn_if_no_key(
        &config.upstream,
        "requests without their own x-api-key or authorization header",
    );
    let client = build_client(config).await?;
    let listener = bind(&listen).await?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, %upstream, cache = %cache.display(), "fallthrough serving");
    println!("fallthrough listening on http://{addr}");
    fallthrough::server::serve(listener, client, shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

async fn run_mock(args: MockArgs) -> Result<ExitCode> {
    let config = MockConfig {
        overload_rate: args.overload_rate,
        overloaded_models: args.overloaded_models,
        rate_limit_rate: args.rate_limit_rate,
        server_error_rate: args.server_error_rate,
        retry_after: args.retry_after,
        latency_ms: args.latency,
        seed: args.seed,
        batch_latency_ms: args.batch_latency.as_millis() as u64,
        batch_expire_rate: args.batch_expire_rate,
        ..MockConfig::default()
    };
    let listener = bind(&args.listen).await?;
    println!("mock listening on http://{}", listener.local_addr()?);
    mock::serve(listener, config, shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown signal received; draining");
}
