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
    /// More server arguments (a password, TLS), kept for restarts.
    args: Vec<String>,
    /// The URL clients use.
    url: String,
    /// The PEM certificate authority of a TLS server, for the test's own connections.
    ca: Option<Vec<u8>>,
}

/// How a test's server is set up beyond the defaults: more server arguments, the URL
/// clients use, and the CA of a TLS server.
pub struct Setup {
    pub args: Vec<String>,
    pub url: String,
    pub ca: Option<Vec<u8>>,
}

impl Redis {
    /// Starts a server on a free port and waits until it answers.
    pub async fn start() -> Redis {
        Self::start_with(|port| Setup {
            args: vec![],
            url: format!("redis://127.0.0.1:{port}/0"),
            ca: None,
        })
        .await
    }

    /// As [`Self::start`], set up as `setup` says for the port (its arguments come after the
    /// default ones, so they may override them).
    pub async fn start_with(setup: impl FnOnce(u16) -> Setup) -> Redis {
        let port = free_port();
        let Setup { args, url, ca } = setup(port);
        let mut redis = Redis {
            child: None,
            port,
            dir: tempfile::tempdir().unwrap(),
            args,
            url,
            ca,
        };
        redis.restart().await;
        redis
    }

    /// The URL clients use (`redis://127.0.0.1:PORT/0` unless set up otherwise).
    pub fn url(&self) -> String {
        self.url.clone()
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
            .args(&self.args)
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
        super::eventually_async("redis-server answers", || async { self.ping().await }).await;
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
        self.client()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    fn client(&self) -> redis::Client {
        match &self.ca {
            None => redis::Client::open(self.url()).unwrap(),
            Some(ca) => {
                let certificates = redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(ca.clone()),
                };
                redis::Client::build_with_tls(self.url(), certificates).unwrap()
            }
        }
    }

    async fn ping(&self) -> bool {
        let client = self.client();
        let attempt = async {
            let mut c = client.get_multiplexed_async_connection().await.ok()?;
            redis::cmd("PING").query_async::<String>(&mut c).await.ok()
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(1), attempt).await,
            Ok(Some(_))
        )
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port nothing listens on now (the kernel's choice for port 0).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
