//! Closed-loop load clients on hyper 1.x client connections (no pooling, no retries).
//!
//! Each client sends one request at a time and counts how it ended. A request is never
//! sent twice. In keep-alive mode a client reconnects, without counting a failure, when a
//! response carried `Connection: close` or when the server had closed the connection
//! cleanly *before* the request was written (hyper hands the unsent request back: see
//! [`hyper::client::conn::TrySendError::take_message`]); a close that races a request
//! already written is a failure. For HTTP/2, a connection that received GOAWAY is
//! replaced the same way.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::stats::{Counts, ErrorSamples, Outcome};

/// How the clients talk to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// HTTP/1.1, requests in sequence over a kept-alive connection.
    Keepalive,
    /// HTTP/1.1, a new connection for every request (`Connection: close`).
    Newconn,
    /// HTTP/2 (prior knowledge, h2c), one connection per client.
    H2,
}

impl Mode {
    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Keepalive => "keep-alive",
            Mode::Newconn => "new-conn",
            Mode::H2 => "h2",
        }
    }
}

/// What a parsed `pong <build-id> pid=<pid>` body says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pong {
    /// The build-id.
    pub build_id: String,
    /// The PID that answered.
    pub pid: u32,
}

/// Parses a `pong <build-id> pid=<pid>` body.
pub fn parse_pong(body: &[u8]) -> Option<Pong> {
    let text = std::str::from_utf8(body).ok()?;
    let mut words = text.split_whitespace();
    if words.next()? != "pong" {
        return None;
    }
    let build_id = words.next()?.to_owned();
    let pid = words.next()?.strip_prefix("pid=")?.parse().ok()?;
    if words.next().is_some() {
        return None;
    }
    Some(Pong { build_id, pid })
}

/// When a generation (PID) first answered.
#[derive(Debug, Clone)]
pub struct Seen {
    /// When its first response was received.
    pub first: Instant,
    /// Its build-id.
    pub build_id: String,
}

/// Which PIDs answered and when each answered first; wakes waiters on a new one.
#[derive(Debug, Default)]
pub struct Generations {
    seen: Mutex<HashMap<u32, Seen>>,
    /// Generations whose process is gone, taken out of `seen` so that a PID the system
    /// hands out again (after thousands of restarts, PIDs wrap) counts as a new one.
    retired: Mutex<Vec<Seen>>,
    notify: Notify,
}

impl Generations {
    /// Records an answer from `pong` received at `at`.
    pub fn record(&self, pong: &Pong, at: Instant) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let mut new = false;
        seen.entry(pong.pid)
            .and_modify(|s| {
                if at < s.first {
                    s.first = at;
                }
            })
            .or_insert_with(|| {
                new = true;
                Seen {
                    first: at,
                    build_id: pong.build_id.clone(),
                }
            });
        drop(seen);
        if new {
            self.notify.notify_waiters();
        }
    }

    /// Retires the generations whose process `is_alive` says is gone.
    pub fn retire_dead(&self, is_alive: impl Fn(u32) -> bool) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let dead: Vec<u32> = seen.keys().copied().filter(|p| !is_alive(*p)).collect();
        let mut retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
        for pid in dead {
            if let Some(s) = seen.remove(&pid) {
                retired.push(s);
            }
        }
    }

    /// Every generation that answered, retired ones included.
    pub fn history(&self) -> Vec<Seen> {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
        seen.values().chain(retired.iter()).cloned().collect()
    }

    /// Every PID seen so far whose generation is not retired.
    pub fn all(&self) -> HashMap<u32, Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits (until `deadline`) for a PID not in `old` to answer; returns it and when it
    /// first answered.
    pub async fn wait_new(
        &self,
        old: &[u32],
        deadline: tokio::time::Instant,
    ) -> Option<(u32, Seen)> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
                if let Some((pid, s)) = seen
                    .iter()
                    .filter(|(pid, _)| !old.contains(pid))
                    .min_by_key(|(_, s)| s.first)
                {
                    return Some((*pid, s.clone()));
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }
}

/// Reconnects that are not failures.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Reconnects {
    /// After a response that carried `Connection: close`.
    pub after_connection_close: u64,
    /// The server closed the connection cleanly before the next request was written.
    pub closed_between_requests: u64,
    /// HTTP/2: the connection was going away (GOAWAY) or had closed.
    pub after_goaway: u64,
    /// HTTP/2: requests that a graceful GOAWAY (`NO_ERROR`) refused: either the h2 client
    /// refused to open the stream because the GOAWAY had arrived (the request waited in
    /// hyper's dispatch queue meanwhile), or the stream's id was above the GOAWAY's last
    /// stream id. Either way RFC 9113 §6.8 guarantees the server did not process it. Sent
    /// on a new connection and counted here, not as failures.
    pub refused_unprocessed_by_goaway: u64,
}

impl Reconnects {
    fn merge(&mut self, o: &Reconnects) {
        self.after_connection_close += o.after_connection_close;
        self.closed_between_requests += o.closed_between_requests;
        self.after_goaway += o.after_goaway;
        self.refused_unprocessed_by_goaway += o.refused_unprocessed_by_goaway;
    }
}

/// One request's timing: start (µs since the run's epoch) and latency (µs); failures
/// have their latency too (time to the failure).
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Start, µs since the epoch.
    pub start_us: u64,
    /// Latency, µs.
    pub latency_us: u64,
    /// Whether it succeeded.
    pub ok: bool,
}

/// What the clients of a run produced.
#[derive(Debug, Default)]
pub struct LoadResult {
    /// Outcomes.
    pub counts: Counts,
    /// Reconnects that are not failures.
    pub reconnects: Reconnects,
    /// Error messages of failed requests.
    pub errors: ErrorSamples,
    /// Every request's timing.
    pub samples: Vec<Sample>,
    /// Connections opened.
    pub connections: u64,
}

impl LoadResult {
    fn merge(&mut self, o: LoadResult) {
        self.counts.merge(&o.counts);
        self.reconnects.merge(&o.reconnects);
        self.errors.merge(&o.errors);
        self.samples.extend(o.samples);
        self.connections += o.connections;
    }
}

/// Settings for a set of clients.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// The server.
    pub addr: SocketAddr,
    /// The request path and query.
    pub path: String,
    /// The `Host` header.
    pub host: String,
    /// How to talk.
    pub mode: Mode,
    /// Number of clients.
    pub concurrency: usize,
    /// Timeout for one request (connect included).
    pub timeout: Duration,
    /// Pause after a failed request before the next (a closed-loop client must not spin).
    pub pause_after_failure: Duration,
    /// Total requests per second over all clients (0: as fast as answers come).
    pub rate: f64,
}

impl LoadConfig {
    /// Clients that `GET /ping` on `addr`, pausing 1 ms after a failure.
    pub fn ping(
        addr: SocketAddr,
        mode: Mode,
        concurrency: usize,
        timeout: Duration,
        rate: f64,
    ) -> LoadConfig {
        LoadConfig {
            addr,
            path: "/ping".into(),
            host: addr.to_string(),
            mode,
            concurrency,
            timeout,
            pause_after_failure: Duration::from_millis(1),
            rate,
        }
    }
}

/// Load running in the background.
pub struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<LoadResult>>,
    pacer: Option<Pacer>,
}

impl Load {
    /// Starts `cfg.concurrency` clients (paced by one [`Pacer`] when `cfg.rate > 0`).
    pub fn start(cfg: LoadConfig, gens: Arc<Generations>, epoch: Instant) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let pacer = (cfg.rate > 0.0).then(|| Pacer::start(cfg.rate, cfg.concurrency.max(1)));
        let tasks = (0..cfg.concurrency)
            .map(|_| {
                let cfg = cfg.clone();
                let gens = gens.clone();
                let stop = stop.clone();
                let turns = pacer.as_ref().map(|p| p.turns.clone());
                tokio::spawn(async move { client(cfg, gens, stop, epoch, turns).await })
            })
            .collect();
        Load { stop, tasks, pacer }
    }

    /// Stops the clients (each finishes its request in flight) and merges their results.
    pub async fn finish(self) -> LoadResult {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(pacer) = self.pacer {
            pacer.stop();
        }
        let mut total = LoadResult::default();
        for t in self.tasks {
            match t.await {
                Ok(r) => total.merge(r),
                Err(e) => total.errors.add(format!("client task failed: {e}")),
            }
        }
        total
    }
}

/// Hands the paced clients their turns, evenly spaced at the requested total rate.
///
/// Tokio's timer counts in whole milliseconds: clients that each slept until their own
/// staggered start would all wake on the same millisecond tick and send in bursts, and
/// a server that becomes able to answer just after a burst would wait up to a
/// millisecond for the next one. A thread of its own, sleeping on the kernel's
/// high-resolution timer (timer slack 1 µs), releases one turn every `1 / rate` seconds
/// instead, taken by whichever client is free. Turns that no client was free to take are
/// kept up to one per client (the same "do not burst to catch up" bound as a client
/// that fell behind), the rest dropped.
struct Pacer {
    turns: Arc<tokio::sync::Semaphore>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Pacer {
    fn start(rate: f64, clients: usize) -> Pacer {
        let turns = Arc::new(tokio::sync::Semaphore::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let period = Duration::from_secs_f64(1.0 / rate);
        let thread = {
            let turns = turns.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("pacer".into())
                .spawn(move || {
                    // SAFETY: PR_SET_TIMERSLACK only changes this thread's timer slack.
                    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong) };
                    let mut next = Instant::now() + period;
                    while !stop.load(Ordering::Relaxed) {
                        let now = Instant::now();
                        if next > now {
                            // Unparked early by `stop`, or spuriously: look again.
                            std::thread::park_timeout(next - now);
                            continue;
                        }
                        // This turn, and those missed if this thread woke late.
                        let mut due = 1;
                        next += period;
                        while next <= now && due < clients {
                            next += period;
                            due += 1;
                        }
                        if next <= now {
                            next = now + period;
                        }
                        let room = clients.saturating_sub(turns.available_permits());
                        turns.add_permits(due.min(room));
                    }
                })
                .ok()
        };
        if thread.is_none() {
            eprintln!("reborn-bench: cannot start the pacing thread: the clients run unpaced");
            turns.close();
        }
        Pacer {
            turns,
            stop,
            thread,
        }
    }

    /// Ends the turns: clients waiting for one stop.
    fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.turns.close();
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

enum Conn {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

impl Conn {
    fn is_closed(&self) -> bool {
        match self {
            Conn::H1(s) => s.is_closed(),
            Conn::H2(s) => s.is_closed(),
        }
    }
}

/// Connects and hands the connection to hyper (HTTP/1.1 or HTTP/2).
async fn connect(addr: SocketAddr, h2: bool) -> Result<Conn, Failure> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| Failure::io("connect", &e))?;
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(stream);
    if h2 {
        let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| Failure::hyper("h2 handshake", &e))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn::H2(send))
    } else {
        let (send, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| Failure::hyper("h1 handshake", &e))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn::H1(send))
    }
}

/// A failed request: its class and a message.
#[derive(Debug)]
pub struct Failure {
    /// The class.
    pub outcome: Outcome,
    /// What happened.
    pub message: String,
}

impl Failure {
    fn io(stage: &str, e: &io::Error) -> Failure {
        Failure {
            outcome: classify_io(e),
            message: format!("{stage}: {:?}", e.kind()),
        }
    }

    fn hyper(stage: &str, e: &hyper::Error) -> Failure {
        Failure {
            outcome: classify_hyper(e),
            message: format!("{stage}: {}", chain(e)),
        }
    }

    fn timeout(stage: &str) -> Failure {
        Failure {
            outcome: Outcome::Timeout,
            message: format!("{stage}: timed out"),
        }
    }
}

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Classifies an I/O error.
pub fn classify_io(e: &io::Error) -> Outcome {
    use io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => Outcome::Refused,
        ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof | NotConnected => {
            Outcome::Reset
        }
        TimedOut | WouldBlock => Outcome::Timeout,
        _ => Outcome::Other,
    }
}

/// Classifies a hyper error: an I/O error anywhere in its chain decides; else EOF before
/// a complete message, or a connection closed under a request, is a reset.
pub fn classify_hyper(e: &hyper::Error) -> Outcome {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if let Some(io) = c.downcast_ref::<io::Error>() {
            return classify_io(io);
        }
        cur = c.source();
    }
    if e.is_incomplete_message() || e.is_canceled() || e.is_closed() || e.is_body_write_aborted() {
        Outcome::Reset
    } else if e.is_timeout() {
        Outcome::Timeout
    } else {
        Outcome::Other
    }
}

fn request(cfg: &LoadConfig, close: bool) -> Request<Empty<Bytes>> {
    let mut b = Request::get(cfg.path.as_str());
    if cfg.mode == Mode::H2 {
        b = b.uri(format!("http://{}{}", cfg.host, cfg.path));
    } else {
        b = b.header(http::header::HOST, cfg.host.as_str());
    }
    if close {
        b = b.header(http::header::CONNECTION, "close");
    }
    // The path comes from the command line and was checked when it was parsed.
    b.body(Empty::new())
        .unwrap_or_else(|_| Request::new(Empty::new()))
}

/// Reads a response to the end and checks it; returns what it said and whether the
/// server asked to close the connection.
async fn check_response(resp: Response<Incoming>) -> Result<(Pong, bool), Failure> {
    let status = resp.status();
    let close = resp
        .headers()
        .get_all(http::header::CONNECTION)
        .iter()
        .any(|v| {
            v.to_str()
                .map(|s| s.to_ascii_lowercase().contains("close"))
                .unwrap_or(false)
        });
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| Failure::hyper("body", &e))?
        .to_bytes();
    if !status.is_success() {
        return Err(Failure {
            outcome: Outcome::BadStatus,
            message: format!("status {}", status.as_u16()),
        });
    }
    let _ = StatusCode::OK;
    match parse_pong(&body) {
        Some(p) => Ok((p, close)),
        None => Err(Failure {
            outcome: Outcome::WrongBody,
            message: format!(
                "wrong body {:?}",
                String::from_utf8_lossy(&body[..body.len().min(64)])
            ),
        }),
    }
}

/// The result of one attempt.
enum Attempt {
    /// Answered (and whether the connection must be replaced).
    Done(Pong, bool),
    /// The request was never written: the connection had closed; replace it and send.
    NotSent,
    /// HTTP/2: a graceful GOAWAY refused the request unprocessed; replace the connection
    /// and send.
    GoawayUnprocessed,
    /// Failed.
    Failed(Failure),
}

async fn send_on(conn: &mut Conn, req: Request<Empty<Bytes>>) -> Attempt {
    let result = match conn {
        Conn::H1(s) => s.try_send_request(req).await,
        Conn::H2(s) => s.try_send_request(req).await,
    };
    match result {
        Ok(resp) => match check_response(resp).await {
            Ok((p, close)) => Attempt::Done(p, close),
            Err(f) => Attempt::Failed(f),
        },
        Err(mut e) => {
            if e.take_message().is_some() {
                Attempt::NotSent
            } else if graceful_goaway(e.error()) {
                Attempt::GoawayUnprocessed
            } else {
                Attempt::Failed(Failure::hyper("request", e.error()))
            }
        }
    }
}

/// Whether a hyper error is a graceful (`NO_ERROR`) GOAWAY from the server: the request
/// was not processed (RFC 9113 §6.8).
fn graceful_goaway(e: &hyper::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if let Some(h2e) = c.downcast_ref::<h2::Error>() {
            return h2e.is_go_away()
                && h2e.is_remote()
                && h2e.reason() == Some(h2::Reason::NO_ERROR);
        }
        cur = c.source();
    }
    false
}

/// One request on a new connection, `Connection: close` (HTTP/1.1).
pub async fn one_shot(cfg: &LoadConfig) -> Result<Pong, Failure> {
    let mut conn = connect(cfg.addr, false).await?;
    match send_on(&mut conn, request(cfg, true)).await {
        Attempt::Done(p, _) => Ok(p),
        Attempt::NotSent | Attempt::GoawayUnprocessed => Err(Failure {
            outcome: Outcome::Reset,
            message: "new connection closed before the request was written".into(),
        }),
        Attempt::Failed(f) => Err(f),
    }
}

async fn client(
    cfg: LoadConfig,
    gens: Arc<Generations>,
    stop: Arc<AtomicBool>,
    epoch: Instant,
    turns: Option<Arc<tokio::sync::Semaphore>>,
) -> LoadResult {
    let mut out = LoadResult::default();
    let mut conn: Option<Conn> = None;
    let mut last_pid = 0u32;
    while !stop.load(Ordering::Relaxed) {
        if let Some(turns) = &turns {
            match turns.acquire().await {
                Ok(turn) => turn.forget(),
                // Closed: the load is stopping (or could not be paced: run unpaced).
                Err(_) if stop.load(Ordering::Relaxed) => break,
                Err(_) => {}
            }
        }
        let start = Instant::now();
        let deadline = tokio::time::Instant::from_std(start + cfg.timeout);
        let result: Result<Pong, Failure> = match cfg.mode {
            Mode::Newconn => {
                out.connections += 1;
                match tokio::time::timeout_at(deadline, one_shot(&cfg)).await {
                    Ok(r) => r,
                    Err(_) => Err(Failure::timeout("request")),
                }
            }
            Mode::Keepalive | Mode::H2 => {
                let h2 = cfg.mode == Mode::H2;
                let attempt = tokio::time::timeout_at(deadline, async {
                    // At most one replacement of a connection that closed before the
                    // request was written: the request itself is sent once.
                    for _ in 0..2 {
                        if let Some(c) = &conn
                            && c.is_closed()
                        {
                            conn = None;
                            if h2 {
                                out.reconnects.after_goaway += 1;
                            } else {
                                out.reconnects.closed_between_requests += 1;
                            }
                        }
                        let c = match &mut conn {
                            Some(c) => c,
                            None => {
                                out.connections += 1;
                                conn.insert(connect(cfg.addr, h2).await?)
                            }
                        };
                        match send_on(c, request(&cfg, false)).await {
                            Attempt::Done(p, close) => {
                                if close {
                                    conn = None;
                                    out.reconnects.after_connection_close += 1;
                                }
                                return Ok(p);
                            }
                            Attempt::NotSent => {
                                conn = None;
                                if h2 {
                                    out.reconnects.after_goaway += 1;
                                } else {
                                    out.reconnects.closed_between_requests += 1;
                                }
                            }
                            Attempt::GoawayUnprocessed => {
                                conn = None;
                                out.reconnects.refused_unprocessed_by_goaway += 1;
                            }
                            Attempt::Failed(f) => {
                                conn = None;
                                return Err(f);
                            }
                        }
                    }
                    Err(Failure {
                        outcome: Outcome::Reset,
                        message: "a new connection closed before the request was written".into(),
                    })
                })
                .await;
                match attempt {
                    Ok(r) => r,
                    Err(_) => {
                        conn = None;
                        Err(Failure::timeout("request"))
                    }
                }
            }
        };
        let end = Instant::now();
        let sample = Sample {
            start_us: start.saturating_duration_since(epoch).as_micros() as u64,
            latency_us: end.saturating_duration_since(start).as_micros() as u64,
            ok: result.is_ok(),
        };
        out.samples.push(sample);
        match result {
            Ok(p) => {
                out.counts.add(Outcome::Ok);
                if p.pid != last_pid {
                    last_pid = p.pid;
                    gens.record(&p, end);
                }
            }
            Err(f) => {
                out.counts.add(f.outcome);
                out.errors.add(f.message);
                tokio::time::sleep(cfg.pause_after_failure).await;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pong_bodies() {
        let p = parse_pong(b"pong 00ff00ff00ff00ff pid=42").unwrap();
        assert_eq!(p.pid, 42);
        assert_eq!(p.build_id, "00ff00ff00ff00ff");
        assert!(parse_pong(b"ping x pid=1").is_none());
        assert!(parse_pong(b"pong x pid=").is_none());
        assert!(parse_pong(b"pong x pid=1 extra").is_none());
        assert!(parse_pong(b"").is_none());
    }

    #[test]
    fn classifies_io_errors() {
        use io::ErrorKind::*;
        assert_eq!(classify_io(&ConnectionRefused.into()), Outcome::Refused);
        for k in [
            ConnectionReset,
            BrokenPipe,
            UnexpectedEof,
            ConnectionAborted,
        ] {
            assert_eq!(classify_io(&k.into()), Outcome::Reset, "{k:?}");
        }
        assert_eq!(classify_io(&TimedOut.into()), Outcome::Timeout);
        assert_eq!(classify_io(&io::Error::other("x")), Outcome::Other);
    }

    #[tokio::test]
    async fn generations_report_the_first_new_pid() {
        let g = Generations::default();
        let t0 = Instant::now();
        g.record(
            &Pong {
                build_id: "a".into(),
                pid: 1,
            },
            t0,
        );
        let deadline = tokio::time::Instant::now() + Duration::from_millis(20);
        assert!(g.wait_new(&[1], deadline).await.is_none());
        let t1 = Instant::now();
        g.record(
            &Pong {
                build_id: "a".into(),
                pid: 2,
            },
            t1,
        );
        let (pid, seen) = g
            .wait_new(&[1], deadline + Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(pid, 2);
        assert_eq!(seen.first, t1);
    }
}
