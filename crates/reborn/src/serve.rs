//! Serving HTTP (HTTP/1.1 and HTTP/2 on one port) with the drain built in: the axum- and
//! hyper-shaped entry points.
//!
//! Connections are served by hyper-util's `auto` builder, which detects HTTP/2 by its
//! preface (h2c, prior knowledge) and otherwise speaks HTTP/1.1. Each connection runs in
//! its own task under the policy of [`crate::drain`].

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio_util::task::TaskTracker;

use crate::drain::{DrainReason, Phase};
use crate::error::{Error, Result};
use crate::listeners::{Listener, ListenerSocket};
use crate::server::{Inner, Reborn};

/// The error type services may return.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What reborn serves: a tower service of HTTP requests, cloned for each connection.
/// An axum `Router` is one; so is any `tower::ServiceBuilder` stack over such a service.
/// Implemented for every type that qualifies.
pub trait HttpService<B>:
    tower::Service<
        Request<Incoming>,
        Response = Response<B>,
        Error: Into<BoxError>,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static
{
}

impl<S, B> HttpService<B> for S
where
    S: tower::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
}

/// A response body reborn can send. Implemented for every type that qualifies.
pub trait HttpBody: http_body::Body<Data: Send, Error: Into<BoxError>> + Send + 'static {}

impl<B> HttpBody for B
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
}

enum Accepting {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

/// How long a connection may take for its handshake (TLS, say) before it is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl Reborn {
    /// Serves `service` on `listener` until the drain is over.
    ///
    /// `service` is any tower service of HTTP requests: an axum `Router`, a
    /// `tower::ServiceBuilder` stack, or a hyper service turned into a tower one. Each
    /// connection gets a clone.
    ///
    /// On the first call the signal handlers are installed; once every listener is served
    /// the process reports ready (see [`crate::ReadyMode`]). Returns once this process has
    /// stopped accepting (after an upgrade, `SIGTERM`, or [`Reborn::shutdown`]) and every
    /// connection it accepted is finished or was closed at the drain deadline.
    ///
    /// ```no_run
    /// use axum::{Router, routing::get};
    ///
    /// # async fn run() -> Result<(), reborn::Error> {
    /// let reborn = reborn::Reborn::new()?;
    /// let listener = reborn.listen("http", "127.0.0.1:8080")?;
    /// let app = Router::new().route("/", get(|| async { "hello" }));
    /// reborn.serve(listener, app).await
    /// # }
    /// ```
    ///
    /// # Errors
    /// Outside a tokio runtime, or when signal handlers cannot be installed. Errors of
    /// single connections are logged at debug level and never end the server.
    pub async fn serve<S, B>(&self, listener: Listener, service: S) -> Result<()>
    where
        S: HttpService<B>,
        B: HttpBody,
    {
        self.serve_impl(listener, |conn| std::future::ready(Ok(conn)), service, true)
            .await
    }

    /// As [`serve`](Self::serve), with a handshake run on each accepted connection before
    /// HTTP: TLS, typically. The handshake runs in the connection's own task (a slow
    /// client never holds up accepting), gets 10 seconds, and a failure drops just that
    /// connection.
    ///
    /// With rustls (through `tokio-rustls`):
    ///
    /// ```no_run
    /// # use std::sync::Arc;
    /// # async fn run(
    /// #     reborn: reborn::Reborn,
    /// #     listener: reborn::Listener,
    /// #     server_config: rustls::ServerConfig,
    /// #     app: axum::Router,
    /// # ) -> Result<(), reborn::Error> {
    /// let tls = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
    /// reborn.serve_with(listener, move |conn| tls.accept(conn), app).await
    /// # }
    /// ```
    ///
    /// # Errors
    /// As [`serve`](Self::serve).
    pub async fn serve_with<H, F, IO, S, B>(
        &self,
        listener: Listener,
        handshake: H,
        service: S,
    ) -> Result<()>
    where
        H: Fn(Connection) -> F + Send + Sync + 'static,
        F: std::future::Future<Output = std::io::Result<IO>> + Send + 'static,
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        S: HttpService<B>,
        B: HttpBody,
    {
        self.serve_impl(listener, handshake, service, false).await
    }

    /// `serve_with`; `plain`: the handshake hands the connection on as it is, so that an
    /// idle one can be handed to the next generation (see [`crate::handoff`]).
    async fn serve_impl<H, F, IO, S, B>(
        &self,
        listener: Listener,
        handshake: H,
        service: S,
        plain: bool,
    ) -> Result<()>
    where
        H: Fn(Connection) -> F + Send + Sync + 'static,
        F: std::future::Future<Output = std::io::Result<IO>> + Send + 'static,
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        S: HttpService<B>,
        B: HttpBody,
    {
        let inner = &self.inner;
        inner.start()?;
        let _serving = ActiveServe::count(inner);
        let addr = listener.local_addr();
        // Handed-over connections are matched to their listener by name (or address).
        let key: Arc<str> = listener.name().unwrap_or(&addr).into();
        let handoff = (plain && inner.config.hand_over_idle).then(|| key.clone());
        let accepting = match listener.into_socket() {
            ListenerSocket::Tcp(l) => tokio::net::TcpListener::from_std(l).map(Accepting::Tcp),
            ListenerSocket::Unix(l) => tokio::net::UnixListener::from_std(l).map(Accepting::Unix),
        }
        .map_err(|e| Error::io(format!("cannot register the listener on {addr}"), e))?;
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder.http2().max_concurrent_streams(1024);
        // hyper's timer, for the header read timeout (slowloris clients are closed
        // instead of holding a draining generation until its deadline).
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(inner.config.header_read_timeout);
        builder.http2().timer(TokioTimer::new());
        let conns = Connections {
            builder: Arc::new(builder),
            service: TowerToHyperService::new(service),
            handshake: Arc::new(handshake),
            inner: inner.clone(),
            tracker: TaskTracker::new(),
            handoff,
        };
        let mut phase = inner.drain.shutdown().receiver();
        let mut failures = AcceptFailures::default();
        // Connections the previous generation hands over, served as if accepted here.
        let mut handed = inner.handoff.open_inbox(&key);
        // Held while this loop may call `accept`: connections are told to leave only
        // once every loop has let go (see `drain::AcceptLoop`).
        let mut accept_loop = Some(inner.drain.accept_loop());
        inner.serving_one();
        loop {
            let accepted = tokio::select! {
                biased;
                _ = phase.wait_for(|p| *p != Phase::Serving) => None,
                Some(conn) = handed.recv() => Some(Ok(conn)),
                accepted = accepting.accept(inner.config.tcp_nodelay) => Some(accepted),
            };
            if accepted.is_none() {
                drop(accept_loop.take());
            }
            match accepted {
                Some(Ok(conn)) => {
                    if let Some((count, over)) = failures.succeeded(Instant::now()) {
                        tracing::info!(
                            addr = %addr,
                            "accepting again, after {count} failed accepts over {over:.1?}"
                        );
                    }
                    conns.spawn(conn)
                }
                Some(Err(e)) => accept_error(&addr, e, &mut failures, &inner.files).await,
                None => {
                    // The successor is on probation: keep the socket, and accept again
                    // if this process takes over. Meanwhile, serve what the previous
                    // generation still hands over (its own probation of this process
                    // ended when this one was upgraded): those clients wait for nothing.
                    let resumed = loop {
                        tokio::select! {
                            resumed = inner.resumed_after_probation() => break resumed,
                            Some(conn) = handed.recv() => conns.spawn(conn),
                        }
                    };
                    if !resumed {
                        break;
                    }
                    accept_loop.get_or_insert_with(|| inner.drain.accept_loop());
                    tracing::info!(addr = %addr, "accepting again");
                }
            }
        }
        // What is handed over from now on is refused, and stays with the previous
        // generation; what was already taken is served.
        inner.handoff.close_inbox(&key);
        while let Ok(conn) = handed.try_recv() {
            conns.spawn(conn);
        }
        if inner.drain.reason() == Some(DrainReason::Shutdown)
            && inner.drain.phase() == Phase::Draining
            && inner.master_pid.is_none()
        {
            // No successor will accept what is already queued: accept it, and serve it
            // under the drain's rules, rather than let it be reset at exit. (Under the
            // master, the queue is the next worker's.)
            // Accepting until the queue is empty needs a non-blocking socket.
            crate::listeners::ensure_nonblocking(accepting.as_fd(), "before the last accepts");
            let mut swept = 0;
            while swept < inner.config.backlog.max(1) {
                match accepting.accept_queued(inner.config.tcp_nodelay) {
                    Some(conn) => conns.spawn(conn),
                    None => break,
                }
                swept += 1;
            }
            if swept > 0 {
                tracing::info!(swept, "served the connections still queued at shutdown");
            }
        }
        drop(accepting);
        conns.tracker.close();
        let open = conns.tracker.len();
        if open > 0 {
            tracing::info!(addr = %addr, open, "waiting for open connections to finish");
        }
        conns.tracker.wait().await;
        // An upgrade still deciding must finish (commit, or stop the new process) before
        // this process may exit: a new process must never be left serving unwatched.
        drop(inner.upgrade_lock.lock().await);
        let counts = &inner.handoff.counts;
        let handed_over = counts
            .handed_over
            .load(std::sync::atomic::Ordering::Relaxed);
        let fell_back = counts.fell_back.load(std::sync::atomic::Ordering::Relaxed);
        if handed_over + fell_back > 0 {
            tracing::info!(
                addr = %addr,
                handed_over,
                fell_back,
                "drained: {handed_over} idle connection(s) handed to the next generation, \
                 {fell_back} kept and closed here"
            );
        } else {
            tracing::info!(addr = %addr, "drained");
        }
        match inner.ready_failure() {
            Some(refusal) => Err(refusal.into_error()),
            None => Ok(()),
        }
    }
}

/// Counts a running `serve` (see `Builder::hammer_grace`) while it lives.
struct ActiveServe<'a>(&'a Inner);

impl<'a> ActiveServe<'a> {
    fn count(inner: &'a Inner) -> Self {
        inner
            .active_serves
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        ActiveServe(inner)
    }
}

impl Drop for ActiveServe<'_> {
    fn drop(&mut self) {
        self.0
            .active_serves
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// An accepted connection, before any protocol runs on it.
#[derive(Debug)]
pub enum Connection {
    /// A TCP connection (`TCP_NODELAY` set unless turned off).
    Tcp(tokio::net::TcpStream),
    /// A Unix stream connection.
    Unix(tokio::net::UnixStream),
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Connection::Tcp($s) => {
                let $s = std::pin::Pin::new($s);
                $e
            }
            Connection::Unix($s) => {
                let $s = std::pin::Pin::new($s);
                $e
            }
        }
    };
}

impl Connection {
    fn tcp(stream: tokio::net::TcpStream, nodelay: bool) -> Connection {
        if nodelay {
            // Only fails on a socket that is already broken; the first read will say so.
            let _ = stream.set_nodelay(true);
        }
        Connection::Tcp(stream)
    }

    /// Where it comes from and where it arrived (see [`crate::peer`]); `None` if it is
    /// already broken.
    pub fn info(&self) -> Option<crate::ConnectionInfo> {
        crate::ConnectionInfo::of(self)
    }

    /// A connection the previous generation handed over (see [`crate::handoff`]): a TCP
    /// or Unix stream socket, by its address family.
    pub(crate) fn from_received(socket: OwnedFd, nodelay: bool) -> std::io::Result<Connection> {
        let tcp = socket2::SockRef::from(&socket)
            .local_addr()?
            .as_socket()
            .is_some();
        if tcp {
            let stream = std::net::TcpStream::from(socket);
            stream.set_nonblocking(true)?;
            Ok(Connection::tcp(
                tokio::net::TcpStream::from_std(stream)?,
                nodelay,
            ))
        } else {
            let stream = std::os::unix::net::UnixStream::from(socket);
            stream.set_nonblocking(true)?;
            Ok(Connection::Unix(tokio::net::UnixStream::from_std(stream)?))
        }
    }

    /// The socket's descriptor (held by this connection while it lives).
    fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        match self {
            Connection::Tcp(s) => s.as_raw_fd(),
            Connection::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl tokio::io::AsyncRead for Connection {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl tokio::io::AsyncWrite for Connection {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        delegate!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Connection::Tcp(s) => s.is_write_vectored(),
            Connection::Unix(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }
}

impl std::os::fd::AsFd for Accepting {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Accepting::Tcp(l) => l.as_fd(),
            Accepting::Unix(l) => l.as_fd(),
        }
    }
}

impl Accepting {
    async fn accept(&self, nodelay: bool) -> std::io::Result<Connection> {
        match self {
            Accepting::Tcp(l) => Ok(Connection::tcp(l.accept().await?.0, nodelay)),
            Accepting::Unix(l) => Ok(Connection::Unix(l.accept().await?.0)),
        }
    }

    /// Accepts a connection already in the kernel's queue, if any, without waiting: on
    /// the socket itself, since tokio's cached readiness may not know of it yet.
    fn accept_queued(&self, nodelay: bool) -> Option<Connection> {
        let accepted = match self {
            Accepting::Tcp(l) => socket2::SockRef::from(l).accept(),
            Accepting::Unix(l) => socket2::SockRef::from(l).accept(),
        };
        let (socket, _) = accepted.ok()?;
        socket.set_nonblocking(true).ok()?;
        match self {
            Accepting::Tcp(_) => tokio::net::TcpStream::from_std(socket.into())
                .ok()
                .map(|s| Connection::tcp(s, nodelay)),
            Accepting::Unix(_) => tokio::net::UnixStream::from_std(socket.into())
                .ok()
                .map(Connection::Unix),
        }
    }
}

struct Connections<H, S> {
    builder: Arc<auto::Builder<TokioExecutor>>,
    service: TowerToHyperService<S>,
    handshake: Arc<H>,
    inner: Arc<Inner>,
    tracker: TaskTracker,
    /// The listener's key, when idle connections may be handed to the next generation.
    handoff: Option<Arc<str>>,
}

impl<H, S> Connections<H, S> {
    fn spawn<F, IO, B>(&self, conn: Connection)
    where
        H: Fn(Connection) -> F + Send + Sync + 'static,
        F: std::future::Future<Output = std::io::Result<IO>> + Send + 'static,
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        S: HttpService<B>,
        B: HttpBody,
    {
        let builder = self.builder.clone();
        let service = self.service.clone();
        let shutdown = self.inner.drain.shutdown();
        let timing = crate::drain::ConnTiming {
            idle_grace: self.inner.config.idle_grace,
            header_read_timeout: self.inner.config.header_read_timeout,
        };
        let info = conn.info();
        let phase = self
            .inner
            .drain
            .watch(crate::peer::ConnectionInfo::describe(info.as_ref()));
        let mut extensions = info.map(|i| i.extensions()).unwrap_or_default();
        extensions.insert(phase.draining(self.inner.eviction_window()));
        let handoff = self.handoff.as_ref().map(|key| crate::drain::HandoffPlan {
            fd: conn.raw_fd(),
            key: key.clone(),
            handoff: self.inner.handoff.clone(),
        });
        let handshake = (self.handshake)(conn);
        // Counts the connection after an upgrade too, while the application holds it.
        let counted = self.tracker.token();
        self.tracker.spawn(async move {
            let io = tokio::select! {
                io = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake) => match io {
                    Ok(Ok(io)) => io,
                    Ok(Err(e)) => {
                        tracing::debug!("handshake failed: {e}");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!("handshake timed out");
                        return;
                    }
                },
                () = shutdown.hammered() => return,
            };
            let setup = crate::drain::ConnSetup {
                timing,
                extensions,
                counted,
                handoff,
            };
            crate::drain::serve_connection(builder, io, service, phase, setup).await
        });
    }
}

/// How often a run of failed accepts is reported.
const REPORT_ACCEPT_FAILURES_EVERY: Duration = Duration::from_secs(10);

/// A run of failed accepts (out of file descriptors, say): at 20 retries a second,
/// logging each would bury everything else, so the first is logged, then one line per
/// [`REPORT_ACCEPT_FAILURES_EVERY`] with the count, and one when accepting works again.
#[derive(Debug, Default)]
struct AcceptFailures {
    /// When the run started, and how many failed in it.
    run: Option<(Instant, u64)>,
    last_report: Option<Instant>,
    /// Failures since the last report.
    unreported: u64,
}

impl AcceptFailures {
    /// Counts a failure at `now`. Returns `Some(failures since the last report)` when
    /// this one is to be logged (`Some(0)` for the first of a run).
    fn failed(&mut self, now: Instant) -> Option<u64> {
        let (_, count) = self.run.get_or_insert((now, 0));
        *count += 1;
        let due = self
            .last_report
            .is_none_or(|at| now.duration_since(at) >= REPORT_ACCEPT_FAILURES_EVERY);
        if due {
            self.last_report = Some(now);
            Some(std::mem::take(&mut self.unreported))
        } else {
            self.unreported += 1;
            None
        }
    }

    /// An accept worked: ends the run. Returns how many failed in it, and over how long.
    fn succeeded(&mut self, now: Instant) -> Option<(u64, Duration)> {
        let (since, count) = self.run.take()?;
        *self = AcceptFailures::default();
        Some((count, now.duration_since(since)))
    }
}

/// Accept errors never end the server. Per-connection errors (the client gave up) are
/// skipped; resource errors (out of file descriptors) pause accepting briefly instead of
/// spinning, and are reported at a bounded rate ([`AcceptFailures`]).
async fn accept_error(
    addr: &str,
    e: std::io::Error,
    failures: &mut AcceptFailures,
    reserve: &crate::files::Reserve,
) {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted => {
            tracing::debug!(addr, "accept: {e}");
        }
        _ => {
            let advice = if crate::files::exhausted(&e) {
                format!("; {}", crate::files::advice(&e))
            } else {
                String::new()
            };
            match failures.failed(Instant::now()) {
                Some(0) => crate::log::error!(
                    "accept failed on {addr}: {e}{advice}; retrying every 50 ms (repeats are \
                     counted, and reported every {}s)",
                    REPORT_ACCEPT_FAILURES_EVERY.as_secs()
                ),
                Some(more) => crate::log::error!(
                    "accept still failing on {addr}: {e} ({more} more times){advice}"
                ),
                None => {}
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            // An upgrade is starting its process with the reserve's descriptors: do
            // not take them first.
            for _ in 0..100 {
                if !reserve.is_out() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_of_failed_accepts_is_reported_once_per_period_and_when_it_ends() {
        let mut f = AcceptFailures::default();
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        assert_eq!(f.failed(at(0)), Some(0), "the first is reported");
        let quiet = (1..200).filter_map(|i| f.failed(at(i * 50))).count();
        assert_eq!(quiet, 0, "20 retries a second for 10 s: none reported");
        assert_eq!(
            f.failed(at(10_000)),
            Some(199),
            "then one line with the count"
        );
        assert_eq!(
            f.succeeded(at(10_500)),
            Some((201, Duration::from_millis(10_500)))
        );
        assert_eq!(f.succeeded(at(11_000)), None, "a success alone is not news");
        assert_eq!(
            f.failed(at(11_000)),
            Some(0),
            "a new run is reported at once"
        );
    }
}
