//! A real `redis-server` for one test: started on a free loopback port with no persistence,
//! stopped by its pid. `scripts/test.sh` installs it when it is missing; without it the test
//! fails and says so (`FALLTHROUGH_REDIS_SERVER` names another binary).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// One test's Redis server.
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Redis {
    /// Starts a server on a free port and waits until it answers.
    pub async fn start() -> Redis {
        let port = free_port();
        let mut redis = Redis {
            child: None,
            port,
            dir: tempfile::tempdir().unwrap(),
        };
        redis.restart().await;
        redis
    }

    /// `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Starts the server (again) on its port, empty, and waits until it answers.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let binary =
            std::env::var("FALLTHROUGH_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let child = Command::new(&binary)
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {binary} ({e}): these tests need a real Redis server; \
                     `bash scripts/test.sh` installs Debian's redis-server (or set \
                     FALLTHROUGH_REDIS_SERVER to one)"
                )
            });
        self.child = Some(child);
        let url = self.url();
        super::eventually_async("redis-server answers", || {
            let url = url.clone();
            async move { ping(&url).await }
        })
        .await;
    }

    /// Stops the server (SIGKILL to its pid) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A connection for the test's own look at the server.
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn ping(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else {
        return false;
    };
    let attempt = async {
        let mut c = client.get_multiplexed_async_connection().await.ok()?;
        redis::cmd("PING").query_async::<String>(&mut c).await.ok()
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), attempt).await,
        Ok(Some(_))
    )
}

/// A port nothing listens on now (the kernel's choice for port 0).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
