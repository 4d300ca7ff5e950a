//! What the binary says when it is given something wrong or incomplete: each message says
//! what was wrong and what to do. Run as a user would, with no API key in the environment.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command as StdCommand, Stdio};
use std::time::Duration;

use predicates::prelude::*;
use predicates::str::contains;

mod support;
use support::bin;

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

const REQUEST: &str =
    r#"{"model":"claude-sonnet-4-6","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}"#;

#[test]
fn a_tilde_in_cache_dir_is_the_home_directory() {
    let home = tempfile::tempdir().unwrap();
    let cwd = tempfile::tempdir().unwrap();
    let config = write(cwd.path(), "ft.toml", "cache_dir = \"~/ft-cache\"\n");
    bin()
        .current_dir(cwd.path())
        .env("HOME", home.path())
        .args(["cache", "stats", "--config"])
        .arg(&config)
        .assert()
        .success();
    assert!(
        home.path().join("ft-cache").is_dir(),
        "the cache is in $HOME"
    );
    assert!(!cwd.path().join("~").exists(), "no folder named ~");
}

#[test]
fn common_flags_may_follow_the_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    bin()
        .args(["cache", "stats", "--cache-dir"])
        .arg(dir.path().join("c"))
        .assert()
        .success()
        .stdout(contains("entries"));
}

#[test]
fn a_cache_dir_that_is_a_file_is_named_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "not-a-dir", "");
    bin()
        .args(["cache", "stats", "--cache-dir"])
        .arg(&file)
        .assert()
        .failure()
        .stderr(contains("is a file, not a directory"))
        .stderr(contains("--cache-dir"))
        .stderr(contains("os error").not());
}

#[test]
fn a_listen_address_without_a_port_gets_the_form() {
    let dir = tempfile::tempdir().unwrap();
    bin()
        .args(["serve", "--listen", "9000", "--cache-dir"])
        .arg(dir.path())
        .assert()
        .failure()
        .stderr(contains("\"9000\""))
        .stderr(contains("expected HOST:PORT, e.g. 127.0.0.1:8787"));
}

#[test]
fn a_bad_upstream_is_echoed_with_an_example() {
    for (upstream, says) in [
        ("ftp://x", "\"ftp://x\""),
        ("https://a b", "\"https://a b\""),
        ("https://api.example.com/v1", "use https://api.example.com"),
    ] {
        bin()
            .args(["cache", "stats", "--upstream", upstream])
            .assert()
            .failure()
            .stderr(contains(says));
    }
    // Credentials in the URL are never echoed.
    bin()
        .args([
            "cache",
            "stats",
            "--upstream",
            "https://user:hunter2@x.com/v1",
        ])
        .assert()
        .failure()
        .stderr(contains("hunter2").not());
}

#[test]
fn a_bad_size_names_the_setting_and_the_accepted_forms() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "ft.toml",
        "[cache]\nmemory_bytes = \"256 MBs\"\n",
    );
    bin()
        .args(["cache", "stats", "--config"])
        .arg(&config)
        .assert()
        .failure()
        .stderr(contains("memory_bytes"))
        .stderr(contains("\"256 MBs\" is not a size"))
        .stderr(contains("\"256MiB\""))
        .stderr(contains("expected parsable string").not());
    let config = write(
        dir.path(),
        "ok.toml",
        "[cache]\nmemory_bytes = \"64MiB\"\ndisk_bytes = 1000000\n",
    );
    bin()
        .args(["cache", "stats", "--cache-dir"])
        .arg(dir.path().join("c"))
        .arg("--config")
        .arg(&config)
        .assert()
        .success();
}

#[test]
fn invalid_lines_are_explained_and_the_dry_run_columns_line_up() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "w.jsonl",
        &format!("{REQUEST}\nnot json\n[1]\n{{\"no\": \"model\"}}\n"),
    );
    let out = bin()
        .args(["prewarm", "--dry-run", "--cache-dir"])
        .arg(dir.path().join("c"))
        .arg(&file)
        .assert()
        .success();
    let stdout = String::from_utf8_lossy(&out.get_output().stdout).into_owned();
    assert!(stdout.contains("line 2: not JSON (expected"), "{stdout}");
    assert!(stdout.contains("line 3: not a JSON object"), "{stdout}");
    assert!(stdout.contains("line 4: no \"model\""), "{stdout}");
    // Every count starts in the same column.
    let columns: Vec<usize> = stdout
        .lines()
        .filter(|l| !l.starts_with(' '))
        .map(|l| l.rfind(' ').unwrap() + 1)
        .collect();
    assert_eq!(columns.len(), 4, "{stdout}");
    assert!(columns.windows(2).all(|w| w[0] == w[1]), "{stdout}");
    let stderr = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
    assert!(
        !stderr.contains("ANTHROPIC_API_KEY"),
        "a dry run calls nothing: {stderr}"
    );
}

#[test]
fn prewarm_refuses_a_concurrency_of_zero_and_warns_without_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "w.jsonl", &format!("{REQUEST}\n"));
    bin()
        .args(["prewarm", "--concurrency", "0"])
        .arg(&file)
        .assert()
        .code(2)
        .stderr(contains("0 is not in 1..=10000"));
    // Port 1 on loopback refuses at once: the line fails, after the warning.
    let config = write(
        dir.path(),
        "ft.toml",
        "[retry]\nmax_retries = 0\n[breaker]\nfailures = 100\n",
    );
    bin()
        .args(["prewarm", "--upstream", "http://127.0.0.1:1", "--cache-dir"])
        .arg(dir.path().join("c"))
        .arg("--config")
        .arg(&config)
        .arg(&file)
        .assert()
        .code(1)
        .stderr(contains("warning: ANTHROPIC_API_KEY is not set"));
}

#[test]
fn serve_names_its_upstream_and_cache_and_warns_without_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("the-cache");
    let mut child = StdCommand::new(assert_cmd::cargo::cargo_bin("fallthrough"))
        .args(["serve", "--listen", "127.0.0.1:0", "--upstream"])
        .arg("http://someone:hunter2@127.0.0.1:9")
        .arg("--cache-dir")
        .arg(&cache)
        .env_remove("ANTHROPIC_API_KEY")
        .env_remove("FALLTHROUGH_CONFIG")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    let serving = loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) if line.contains("fallthrough serving") => break line,
            Ok(line) => seen.push(line),
            Err(_) => break String::new(),
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(serving.contains(&cache.display().to_string()), "{serving}");
    assert!(serving.contains("127.0.0.1:9"), "{serving}");
    assert!(
        !serving.contains("hunter2"),
        "credentials logged: {serving}"
    );
    let warned = seen
        .iter()
        .any(|l| l.contains("warning: ANTHROPIC_API_KEY is not set"));
    assert!(warned, "{seen:?}");
}

#[test]
fn the_key_example_files_of_the_readme_exist() {
    // As written in the README: the default cache directory (here a fresh one), whose key
    // secret `key` creates with it.
    let home = tempfile::tempdir().unwrap();
    bin()
        .env("XDG_CACHE_HOME", home.path())
        .args([
            "key",
            "examples/key-a.json",
            "--diff",
            "examples/key-b.json",
        ])
        .assert()
        .code(1)
        .stdout(contains("body.messages[0].content"));
}
