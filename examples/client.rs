//! Embedding [`fallthrough::Client`] in a program, against the in-process fake API.
//!
//! The example starts the fake (`fallthrough::mock`), builds a `Client` with a temporary cache
//! directory and a fallback chain (`a` -> `b`), and makes a series of calls, printing for each
//! how it was answered:
//!
//! 1. a miss (the upstream answers), then a memory hit;
//! 2. a disk hit after the client is dropped and reopened on the same directory, then a memory
//!    hit (the disk hit was promoted);
//! 3. a stale answer: the entry's ttl has run out and the fake now answers `a` only with 529,
//!    so the stale entry is served at once instead of an error;
//! 4. a fallback: a new question while `a` is overloaded is answered by `b`;
//! 5. an error when every model is overloaded and nothing is cached.
//!
//! Run it with `cargo run --example client`.

use std::path::Path;
use std::time::Duration;

use fallthrough::mock::{MockConfig, MockServer};
use fallthrough::{Client, Error, Response};
use serde_json::{json, Value};

/// Short enough that the example's entry goes stale while it runs.
const TTL: Duration = Duration::from_secs(1);

fn question(model: &str, text: &str) -> Value {
    json!({
        "model": model,
        "max_tokens": 128,
        "messages": [{"role": "user", "content": text}],
    })
}

async fn open(mock: &MockServer, dir: &Path) -> Result<Client, Error> {
    Client::builder()
        .upstream(mock.url())
        .credential("sk-example")
        .cache_dir(dir)
        .ttl(TTL, Duration::from_secs(3600))
        // Short delays so the example runs in a few seconds; the defaults are 500 ms and 30 s.
        .retries(2, Duration::from_millis(50), Duration::from_millis(200))
        .fallback("a", ["b"])
        .build()
        .await
}

fn print(what: &str, result: &Result<Response, Error>) {
    match result {
        Ok(r) => {
            let age = r
                .age
                .map_or_else(|| "-".to_owned(), |a| format!("{:.1}s", a.as_secs_f64()));
            println!(
                "{what:<42} {:<7} {:<6} {:>8} {:>6}",
                r.outcome.as_str(),
                r.model,
                r.attempts,
                age
            );
        }
        Err(Error::Upstream(e)) => println!(
            "{what:<42} error   {:<6} {:>8}      -   ({} {:?}, retry after {})",
            e.model,
            e.attempts,
            e.status,
            e.kind,
            e.retry_after
                .map_or("none".to_owned(), |d| humantime::format_duration(d)
                    .to_string())
        ),
        Err(e) => println!("{what:<42} error: {e}"),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mock = MockServer::start(MockConfig::default()).await?;
    let dir = tempfile::tempdir()?;
    println!(
        "fake API at {}, cache in {}",
        mock.url(),
        dir.path().display()
    );
    println!(
        "{:<42} {:<7} {:<6} {:>8} {:>6}",
        "call", "outcome", "model", "attempts", "age"
    );

    let capital = question("a", "What is the capital of France?");
    let client = open(&mock, dir.path()).await?;
    print("1. first call", &client.send(&capital).await);
    print("2. same call again", &client.send(&capital).await);

    // Drop the client (closing the disk tier) and open a new one on the same directory.
    client.flush().await?;
    drop(client);
    let client = loop {
        match open(&mock, dir.path()).await {
            // The old client's last background task may still hold the directory for a moment.
            Err(Error::Disk(_)) => tokio::time::sleep(Duration::from_millis(20)).await,
            other => break other?,
        }
    };
    print("3. after reopening", &client.send(&capital).await);
    print("4. and again", &client.send(&capital).await);

    tokio::time::sleep(TTL + Duration::from_millis(200)).await;
    mock.set_config(MockConfig {
        overloaded_models: vec!["a".into()],
        ..MockConfig::default()
    });
    print(
        "5. past its ttl, model a overloaded",
        &client.send(&capital).await,
    );
    let river = question("a", "Which river flows through Paris?");
    print("6. new question, a overloaded", &client.send(&river).await);
    print(
        "7. the same question for b",
        &client
            .send(&question("b", "Which river flows through Paris?"))
            .await,
    );

    mock.set_config(MockConfig {
        overloaded_models: vec!["a".into(), "b".into()],
        ..MockConfig::default()
    });
    let moon = question("a", "How far away is the Moon?");
    print(
        "8. new question, a and b overloaded",
        &client.send(&moon).await,
    );

    let stats = mock.stats();
    println!(
        "\nupstream requests by model and status: {:?}",
        stats.by_model
    );
    Ok(())
}
