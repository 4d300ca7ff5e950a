//! Connections, and the limits that keep slow, stalled and too many callers from wedging the
//! proxy (SPEC, "Limits"). hyper serves each connection; this room owns what hyper alone does
//! not: the accept loop's connection cap, a header timeout that does not also cut idle
//! keep-alive connections (hyper's own timer starts as soon as a connection waits for its next
//! request, so it cannot tell a slow sender from an idle one), the idle timeout, and a write
//! timeout at the socket: a caller that takes no bytes for `write_timeout` is disconnected
//! while the engine goes on reading the upstream at the upstream's pace.
//!
//! Each connection has a [`Phase`]: waiting for a request's first byte (idle), reading its
//! head, or busy with requests (their handlers and answers, however long). A watchdog task
//! per connection closes it when the idle or head phase outlasts its timeout; a busy
//! connection is never cut by them (the body timeout and the write timeout govern it).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use http_body::Frame;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tower_service::Service;
use tracing::{debug, warn};

use crate::config::ServerConfig;
use crate::metrics::{Counter, Metrics};

/// Most request headers, and most bytes of them, the proxy accepts; past either it answers
/// 431 in the API's shape. (Claude Code sends about 20 headers, 4 KiB in all.)
const MAX_HEADERS: usize = 256;
const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Headers hyper itself accepts: more than the proxy's own limit, so that hyper's bare 431 is
/// only for heads past its 400 KB buffer.
const HYPER_MAX_HEADERS: usize = 1024;

/// Refuses a request whose headers are too many or too large, in the API's shape.
pub(super) async fn header_limits(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let headers = request.headers();
    let bytes: usize = headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len())
        .sum();
    if headers.len() > MAX_HEADERS || bytes > MAX_HEADER_BYTES {
        return super::errors::api_error(
            431,
            &format!(
                "request headers are too large ({} headers, {bytes} bytes; at most \
                 {MAX_HEADERS} headers and {MAX_HEADER_BYTES} bytes)",
                headers.len()
            ),
        );
    }
    next.run(request).await
}

/// The counters of connections cut by each timeout (`fallthrough_connections_cut_total`),
/// so that an operator, and a test, can see a cut that the caller may not.
#[derive(Clone)]
struct Cuts {
    idle: Counter,
    header: Counter,
    write: Counter,
}

impl Cuts {
    fn new(metrics: &Metrics) -> Self {
        Cuts {
            idle: metrics.connections_cut("idle_timeout"),
            header: metrics.connections_cut("header_timeout"),
            write: metrics.connections_cut("write_timeout"),
        }
    }
}

/// Accepts connections until `shutdown` resolves, each served with `limits`; then lets open
/// connections finish their requests and returns when the last one has closed.
pub(super) async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ServerConfig,
    metrics: &Metrics,
    shutdown: impl Future<Output = ()>,
) {
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let (closing, closing_rx) = watch::channel(false);
    let limits = Arc::new(limits);
    let cuts = Cuts::new(metrics);
    tokio::pin!(shutdown);
    loop {
        // Past `max_connections`, new connections wait in the listen backlog; the open ones
        // keep being served.
        let permit = tokio::select! {
            permit = open.clone().acquire_owned() => permit.expect("never closed"),
            () = &mut shutdown => break,
        };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, most often: give open connections a moment to
                    // close rather than spin.
                    warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // No Nagle: a relayed stream is many small writes, and Nagle's wait for the caller's
        // delayed ACK held each streamed answer back by ~40 ms.
        let _ = tcp.set_nodelay(true);
        let connection = Connection {
            router: router.clone(),
            limits: limits.clone(),
            closing: closing_rx.clone(),
            cuts: cuts.clone(),
            peer: Peer(peer),
            _permit: permit,
        };
        tokio::spawn(connection.run(tcp));
    }
    drop(listener);
    let _ = closing.send(true);
    // Every connection holds a permit until it has closed.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = open.acquire_many(all).await;
}

/// The caller's address, in every request's extensions.
#[derive(Clone, Copy, Debug)]
pub(super) struct Peer(pub std::net::SocketAddr);

struct Connection {
    peer: Peer,
    router: Router,
    limits: Arc<ServerConfig>,
    closing: watch::Receiver<bool>,
    cuts: Cuts,
    _permit: OwnedSemaphorePermit,
}

impl Connection {
    async fn run(mut self, tcp: TcpStream) {
        let watch = Arc::new(Watch::new());
        let io = TokioIo::new(Watched {
            inner: tcp,
            watch: watch.clone(),
            write_timeout: self.limits.write_timeout,
            stalled: None,
            cut: self.cuts.write.clone(),
        });
        let router = self.router.clone();
        let in_service = watch.clone();
        let peer = self.peer;
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(peer);
            let busy = in_service.begin();
            let mut router = router.clone();
            async move {
                let answer = router.call(request).await?;
                Ok::<_, Infallible>(answer.map(|body| Body::new(Guarded { body, _busy: busy })))
            }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .max_headers(HYPER_MAX_HEADERS)
            .serve_connection(io, service);
        tokio::pin!(conn);
        let mut closing = *self.closing.borrow();
        if closing {
            conn.as_mut().graceful_shutdown();
        }
        loop {
            tokio::select! {
                served = conn.as_mut() => {
                    if let Err(e) = served {
                        debug!(error = %e, "connection ended with an error");
                    }
                    return;
                }
                why = watch.expired(&self.limits) => {
                    debug!(why = why.as_str(), "closing a connection");
                    match why {
                        Timeout::Idle => self.cuts.idle.inc(),
                        Timeout::Header => self.cuts.header.inc(),
                    };
                    return; // dropping hyper's connection closes the socket
                }
                changed = self.closing.changed(), if !closing => {
                    closing = true;
                    if changed.is_ok() {
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
        }
    }
}

/// Which of the watchdog's timeouts ran out.
#[derive(Clone, Copy, Debug)]
enum Timeout {
    Idle,
    Header,
}

impl Timeout {
    fn as_str(self) -> &'static str {
        match self {
            Timeout::Idle => "idle_timeout",
            Timeout::Header => "header_timeout",
        }
    }
}

/// Where a connection is in its life; see the module's doc.
#[derive(Clone, Copy, Debug)]
enum Phase {
    /// Waiting for the next request's first byte.
    Idle { since: Instant },
    /// A request's first bytes came; its head is not complete.
    Head { since: Instant },
    /// This many requests are being answered.
    Busy(usize),
}

/// A connection's phase, shared by its socket, its service and its watchdog.
struct Watch {
    phase: Mutex<Phase>,
    changed: Notify,
}

impl Watch {
    fn new() -> Self {
        // A new connection must send its head within the header timeout, as if its first
        // byte had come: a connection that sends nothing is a slow sender too.
        Watch {
            phase: Mutex::new(Phase::Head {
                since: Instant::now(),
            }),
            changed: Notify::new(),
        }
    }

    fn set(&self, phase: impl FnOnce(Phase) -> Phase) {
        let mut now = self.phase.lock().expect("phase lock");
        *now = phase(*now);
        drop(now);
        self.changed.notify_one();
    }

    /// Bytes arrived: an idle connection starts a request's head.
    fn read(&self) {
        let idle = matches!(*self.phase.lock().expect("phase lock"), Phase::Idle { .. });
        if idle {
            self.set(|_| Phase::Head {
                since: Instant::now(),
            });
        }
    }

    /// A request's head is in: the connection is busy until its answer has been sent.
    fn begin(self: &Arc<Self>) -> Busy {
        self.set(|phase| match phase {
            Phase::Busy(n) => Phase::Busy(n + 1),
            _ => Phase::Busy(1),
        });
        Busy(self.clone())
    }

    /// Resolves when the idle or head phase has lasted longer than its timeout; says which.
    async fn expired(&self, limits: &ServerConfig) -> Timeout {
        loop {
            let changed = self.changed.notified();
            let deadline = match *self.phase.lock().expect("phase lock") {
                Phase::Idle { since } => Some((since + limits.idle_timeout, Timeout::Idle)),
                Phase::Head { since } => Some((since + limits.header_timeout, Timeout::Header)),
                Phase::Busy(_) => None,
            };
            match deadline {
                Some((at, why)) => tokio::select! {
                    () = tokio::time::sleep_until(at) => {
                        if self.still_expired(limits) {
                            return why;
                        }
                    }
                    () = changed => {}
                },
                None => changed.await,
            }
        }
    }

    fn still_expired(&self, limits: &ServerConfig) -> bool {
        let now = Instant::now();
        match *self.phase.lock().expect("phase lock") {
            Phase::Idle { since } => now >= since + limits.idle_timeout,
            Phase::Head { since } => now >= since + limits.header_timeout,
            Phase::Busy(_) => false,
        }
    }
}

/// One request being answered; the connection is idle again once every one has ended.
struct Busy(Arc<Watch>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.set(|phase| match phase {
            Phase::Busy(n) if n > 1 => Phase::Busy(n - 1),
            _ => Phase::Idle {
                since: Instant::now(),
            },
        });
    }
}

/// An answer's body, keeping its request [`Busy`] until hyper has sent it all (or dropped it).
struct Guarded {
    body: Body,
    _busy: Busy,
}

impl http_body::Body for Guarded {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The socket, telling the [`Watch`] when bytes arrive, and failing a write that has made no
/// progress for `write_timeout` (a caller that stopped reading).
struct Watched {
    inner: TcpStream,
    watch: Arc<Watch>,
    write_timeout: Duration,
    /// Armed when a write could not proceed; disarmed by any progress.
    stalled: Option<Pin<Box<Sleep>>>,
    /// Counts the cut (`write_timeout`).
    cut: Counter,
}

impl Watched {
    fn on_write<T>(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if result.is_ready() {
            self.stalled = None;
            return result;
        }
        let timeout = self.write_timeout;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.stalled = None;
                self.cut.inc();
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the caller took no bytes for server.write_timeout",
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.watch.read();
        }
        result
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.on_write(cx, result)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.on_write(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_flush(cx);
        self.on_write(cx, result)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
