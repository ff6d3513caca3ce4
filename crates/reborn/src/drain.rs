//! The drain: stop accepting, let every accepted request finish, close idle connections
//! without racing the client, and close whatever is left at the deadline (the hammer).
//!
//! hyper's own `graceful_shutdown` closes an idle HTTP/1.1 connection at once. A busy
//! client has its next request on the wire at that moment and gets a reset: that is how
//! endless, tableflip and nginx lose about one request per open connection per restart.
//! reborn's policy, per connection:
//!
//! * **Plain HTTP/1.1 after an upgrade**: the connection is handed to the new
//!   generation, socket and all, once it is between requests (see
//!   [`Builder::hand_over_idle_connections`](crate::Builder::hand_over_idle_connections)):
//!   its responses do not say `Connection: close`, and the client keeps its connection.
//!   While the new generation is on probation, connections wait here for it to pass. A
//!   handoff that fails falls back to the rule below, as does a connection whose moment
//!   to leave came to a handler waiting for it (its client is to come back elsewhere).
//! * **HTTP/1.x**: from the start of the drain, every response carries
//!   `Connection: close`, so a busy connection ends cleanly after its next response. A
//!   connection still open after the idle grace has had no request during the whole grace:
//!   it is then shut down gracefully (closed if idle, or once its current response is
//!   written). A connection whose next request head is arriving at that moment is not
//!   idle: it gets up to the header read timeout for the head, and its answer.
//! * **HTTP/2**: a graceful GOAWAY at once (two-step: the client learns to open no new
//!   streams, then the last stream ID is set); open streams finish.
//! * **Upgraded** (HTTP/1.1 `101`: a WebSocket, or another protocol): the application
//!   holds the connection after the upgrade, and it still counts: the process stays
//!   until the application closes it.
//! * **At the hammer** (drain deadline, `SIGUSR2`): the connection is dropped; an
//!   upgraded one's reads and writes fail (`ConnectionAborted`), so the application's
//!   task ends and lets it go; a WebSocket is first sent a close frame (`1012` when a new
//!   generation serves, `1001` at a shutdown) if it is between two frames.
//!
//! Each connection is registered with who it is from and which request it is in, so that
//! a process that cannot finish (a handler blocking a runtime thread ignores the hammer)
//! can say what was still open when it exits anyway (see `Builder::hammer_grace`).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};

use atomic_waker::AtomicWaker;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{HeaderValue, Request, Response, Version, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::sync::watch;

/// Where the process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Accepting and serving.
    Serving,
    /// No longer accepting; accepted connections finish.
    Draining,
    /// Closing everything now.
    Hammer,
}

/// Why the drain started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainReason {
    /// A new generation (this PID) is ready and serves in this one's place.
    Upgraded {
        /// The new generation's PID.
        successor: u32,
    },
    /// A graceful shutdown was asked for (`SIGTERM`, `SIGINT`, or from code).
    Shutdown,
}

/// A cheap, cloneable view of the drain, for servers with their own accept loop.
///
/// ```no_run
/// # async fn example(shutdown: reborn::Shutdown) {
/// tokio::select! {
///     _ = shutdown.draining() => { /* stop accepting, finish what is in flight */ }
///     _ = async { /* accept loop */ } => {}
/// }
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Shutdown {
    rx: watch::Receiver<Phase>,
}

impl Shutdown {
    /// The current phase.
    pub fn phase(&self) -> Phase {
        *self.rx.borrow()
    }

    /// Whether the drain has started.
    pub fn is_draining(&self) -> bool {
        self.phase() >= Phase::Draining
    }

    /// Resolves once the drain starts (at once if it has).
    pub async fn draining(&self) {
        self.wait(Phase::Draining).await
    }

    /// Resolves once everything must close now (at once if it must).
    pub async fn hammered(&self) {
        self.wait(Phase::Hammer).await
    }

    async fn wait(&self, phase: Phase) {
        let mut rx = self.rx.clone();
        // An error means the sender is gone, which happens only when the process's
        // reborn state is dropped: nothing will ever change, so treat it as reached.
        let _ = rx.wait_for(|p| *p >= phase).await;
    }

    pub(crate) fn receiver(&self) -> watch::Receiver<Phase> {
        self.rx.clone()
    }
}

/// The phase as plain atomics, read on every request and every connection wake-up
/// without touching shared locks or reference counts (leaked once per [`DrainControl`],
/// which lives as long as the process).
#[derive(Debug)]
pub(crate) struct PhaseFlags {
    phase: AtomicU8,
    draining: AtomicBool,
}

impl PhaseFlags {
    pub(crate) fn phase(&self) -> Phase {
        match self.phase.load(Ordering::SeqCst) {
            0 => Phase::Serving,
            1 => Phase::Draining,
            _ => Phase::Hammer,
        }
    }
}

/// The sending side of the phase, owned by the process's reborn state.
///
/// Connections do not poll a shared channel (its lock would be taken on every wake-up
/// of every connection): each registers its own waker, and a phase change wakes them all.
#[derive(Debug)]
pub(crate) struct DrainControl {
    tx: watch::Sender<Phase>,
    flags: &'static PhaseFlags,
    reason: std::sync::Mutex<Option<DrainReason>>,
    conns: std::sync::Mutex<HashMap<u64, Arc<ConnRecord>>>,
    next_conn: AtomicU64,
    /// Counts resumptions: a drain deadline armed before one no longer applies.
    epoch: AtomicU64,
    /// When the current drain started.
    started_at: std::sync::Mutex<Option<Instant>>,
    /// How many of `serve`'s accept loops may still take a connection from the kernel.
    accept_loops: watch::Sender<usize>,
}

impl DrainControl {
    pub(crate) fn new() -> Self {
        DrainControl {
            tx: watch::Sender::new(Phase::Serving),
            flags: Box::leak(Box::new(PhaseFlags {
                phase: AtomicU8::new(0),
                draining: AtomicBool::new(false),
            })),
            reason: std::sync::Mutex::new(None),
            conns: std::sync::Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            started_at: std::sync::Mutex::new(None),
            accept_loops: watch::Sender::new(0),
        }
    }

    /// Counts an accept loop as accepting until the guard is dropped.
    pub(crate) fn accept_loop(self: &Arc<Self>) -> AcceptLoop {
        self.accept_loops.send_modify(|n| *n += 1);
        AcceptLoop {
            control: self.clone(),
        }
    }

    /// Resolves once no accept loop can take a connection any more (at once if none
    /// runs).
    pub(crate) async fn accept_loops_stopped(&self) {
        let mut rx = self.accept_loops.subscribe();
        // The sender lives as long as `self`: an error cannot happen while we borrow it.
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    /// When the current drain started, if one has.
    pub(crate) fn started_at(&self) -> Option<Instant> {
        *self.started_at.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many times the process went back to serving after a drain.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    pub(crate) fn shutdown(&self) -> Shutdown {
        Shutdown {
            rx: self.tx.subscribe(),
        }
    }

    pub(crate) fn phase(&self) -> Phase {
        self.flags.phase()
    }

    pub(crate) fn reason(&self) -> Option<DrainReason> {
        *self.reason.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves the phase forward to `to`; returns false if it was there already.
    fn advance(&self, to: Phase) -> bool {
        let code = match to {
            Phase::Serving => 0,
            Phase::Draining => 1,
            Phase::Hammer => 2,
        };
        self.flags.draining.store(true, Ordering::SeqCst);
        self.started_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(Instant::now);
        let before = self.flags.phase.fetch_max(code, Ordering::SeqCst);
        if before >= code {
            return false;
        }
        self.tx.send_if_modified(|p| {
            let moved = *p < to;
            if moved {
                *p = to;
            }
            moved
        });
        self.wake_all();
        true
    }

    /// Wakes every connection after the phase is stored: one that registers its waker
    /// later reads the new phase itself.
    fn wake_all(&self) {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        for conn in conns.values() {
            conn.waker.wake();
            conn.read_waker.wake();
            conn.write_waker.wake();
        }
    }

    /// Goes back from a drain that an upgrade started to `Serving`: the new generation
    /// died while this one was on probation. Returns false (and changes nothing) unless
    /// the drain is an upgrade's and has not been hammered. Connections already told to
    /// close (`Connection: close`, GOAWAY) still close; the others are served as before.
    pub(crate) fn resume(&self) -> bool {
        let mut slot = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if !matches!(*slot, Some(DrainReason::Upgraded { .. })) {
            return false;
        }
        if self
            .flags
            .phase
            .compare_exchange(1, 0, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return false;
        }
        *slot = None;
        *self.started_at.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.flags.draining.store(false, Ordering::SeqCst);
        self.tx.send_replace(Phase::Serving);
        drop(slot);
        self.wake_all();
        true
    }

    /// Claims the drain for `reason`; returns false if it had already started. The phase
    /// moves on [`start_draining`](Self::start_draining), so the caller can say why
    /// first.
    pub(crate) fn claim(&self, reason: DrainReason) -> bool {
        let mut slot = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_some() {
            return false;
        }
        *slot = Some(reason);
        true
    }

    /// Moves to `Draining`: accept loops stop and connections apply the drain policy.
    pub(crate) fn start_draining(&self) {
        self.advance(Phase::Draining);
    }

    /// Closes everything now; returns false if that had already been asked.
    pub(crate) fn hammer(&self) -> bool {
        let mut slot = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        self.fall(&mut slot)
    }

    /// The drain deadline's hammer, for the drain that began in `epoch`: closes
    /// everything now, unless the process went back to serving since (a rollback), or
    /// the hammer fell already. `before` runs just before it falls (to say so). Under the
    /// lock [`resume`](Self::resume) takes: a rollback at the deadline's very moment
    /// comes either before (no hammer) or after (the process is closing; nothing to
    /// resume), never between the look and the hammer.
    pub(crate) fn hammer_drain(&self, epoch: u64, before: impl FnOnce()) -> bool {
        let mut slot = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if self.epoch() != epoch || self.phase() != Phase::Draining {
            return false;
        }
        before();
        self.fall(&mut slot)
    }

    /// The hammer falls, the drain's reason held (`slot`): a shutdown's, unless the
    /// drain had one.
    fn fall(&self, slot: &mut Option<DrainReason>) -> bool {
        slot.get_or_insert(DrainReason::Shutdown);
        self.advance(Phase::Hammer)
    }

    /// A new connection's number: its place in the eviction window.
    pub(crate) fn next_connection(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers a connection from `peer` (for the record) for phase changes.
    pub(crate) fn watch(self: &Arc<Self>, peer: String) -> PhaseWatch {
        let id = self.next_connection();
        let record = Arc::new(ConnRecord {
            waker: AtomicWaker::new(),
            read_waker: AtomicWaker::new(),
            write_waker: AtomicWaker::new(),
            upgraded: AtomicBool::new(false),
            websocket: AtomicBool::new(false),
            peer,
            since: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_request: std::sync::Mutex::new(None),
            told_to_leave: AtomicBool::new(false),
        });
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, record.clone());
        PhaseWatch {
            control: self.clone(),
            registration: Arc::new(Registration {
                control: self.clone(),
                id,
            }),
            record,
            seen: Phase::Serving,
        }
    }

    /// Connection `id`'s moment to leave came to a handler that waited for it.
    pub(crate) fn told_to_leave(&self, id: u64) {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(record) = conns.get(&id) {
            record.told_to_leave.store(true, Ordering::SeqCst);
        }
    }

    /// The connections still open, one line each (peer, age, the request it is in), the
    /// oldest first.
    pub(crate) fn open_connections(&self) -> Vec<String> {
        let mut records: Vec<Arc<ConnRecord>> = self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        records.sort_by_key(|r| r.since);
        records.iter().map(|r| r.describe()).collect()
    }
}

/// What is known of one open connection.
#[derive(Debug)]
struct ConnRecord {
    waker: AtomicWaker,
    /// The wakers of a read and of a write waiting on the connection's transport, woken
    /// at the hammer: an upgraded connection (a WebSocket) is read and written by the
    /// application, not by hyper, and must be cut too.
    read_waker: AtomicWaker,
    write_waker: AtomicWaker,
    /// Whether it switched protocols (`101`, a WebSocket or another HTTP/1.1 upgrade).
    upgraded: AtomicBool,
    /// Whether it switched to the WebSocket protocol: the hammer sends a close frame.
    websocket: AtomicBool,
    /// Who it is from: `IP:port`, or a Unix-socket client.
    peer: String,
    since: Instant,
    /// Requests whose handler has not answered yet.
    in_flight: AtomicUsize,
    /// The last request started on it: method and path, and when.
    last_request: std::sync::Mutex<Option<(String, Instant)>>,
    /// A handler waited for its moment to leave (`Draining::moment`), which came: the
    /// application ends what it holds there (a stream, a long poll), and its client is to
    /// come back to the next generation, on a new connection. So it is not handed over,
    /// and its responses say `Connection: close` from now on.
    told_to_leave: AtomicBool,
}

impl ConnRecord {
    fn describe(&self) -> String {
        let open = self.since.elapsed().as_secs_f64();
        let busy = self.in_flight.load(Ordering::SeqCst);
        let last = self
            .last_request
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if self.upgraded.load(Ordering::SeqCst) {
            return format!(
                "{} (open {open:.1} s, upgraded: a WebSocket or another protocol)",
                self.peer
            );
        }
        match (busy, last) {
            (0, _) => format!("{} (open {open:.1} s, between requests)", self.peer),
            (n, Some((request, at))) => format!(
                "{} (open {open:.1} s, {n} request{} unanswered: {request} for {:.1} s)",
                self.peer,
                if n == 1 { "" } else { "s" },
                at.elapsed().as_secs_f64()
            ),
            (n, None) => format!("{} (open {open:.1} s, {n} requests unanswered)", self.peer),
        }
    }
}

/// Counts a request as unanswered while it lives.
struct InFlight(Arc<ConnRecord>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A connection's view of the phase: resolves when it moves past what was last seen.
pub(crate) struct PhaseWatch {
    control: Arc<DrainControl>,
    registration: Arc<Registration>,
    record: Arc<ConnRecord>,
    seen: Phase,
}

/// An accept loop that may still take a connection from the kernel: between its check
/// of the phase and its `accept` call, another thread may have started the drain.
/// Counted so that no connection is told to leave before every loop has stopped: a
/// client told to leave at the drain's first moment reconnects within a millisecond, and
/// a loop that had not yet seen the phase change could take that very client back.
#[derive(Debug)]
pub(crate) struct AcceptLoop {
    control: Arc<DrainControl>,
}

impl Drop for AcceptLoop {
    fn drop(&mut self) {
        self.control
            .accept_loops
            .send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// A connection's place among the open ones: it stays while hyper serves the
/// connection, and after an upgrade while the application holds the transport.
#[derive(Debug)]
struct Registration {
    control: Arc<DrainControl>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.control
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

impl PhaseWatch {
    /// The next phase after the one last returned (the first call returns the current
    /// phase at once if it is not `Serving`).
    pub(crate) fn changed(&mut self) -> impl Future<Output = Phase> + '_ {
        std::future::poll_fn(move |cx| {
            self.record.waker.register(cx.waker());
            let now = self.control.flags.phase();
            if now != self.seen {
                self.seen = now;
                Poll::Ready(now)
            } else {
                Poll::Pending
            }
        })
    }

    fn flags(&self) -> &'static PhaseFlags {
        self.control.flags
    }

    /// This connection's [`crate::Draining`] handle, its moment placed in `window`.
    pub(crate) fn draining(&self, window: Duration) -> crate::Draining {
        crate::draining::Draining::new(self.control.clone(), self.registration.id, window)
    }
}

/// Per-connection facts the service learns from requests.
#[derive(Debug, Default)]
struct ConnFacts {
    http2: AtomicBool,
    /// Bytes arrived while no request was in flight, and no request has been made of
    /// them yet: the next request head is on its way (or sits half-read in hyper).
    head_arriving: AtomicBool,
    /// Responses whose body has not been sent to the end yet.
    responses_open: AtomicUsize,
    /// Hyper may hold bytes the connection's next owner would need: the client sent a
    /// request body, or more than one request head at a time (pipelining). Such a
    /// connection is never handed over.
    unsure: AtomicBool,
    /// A handoff of this connection failed (refused, or the channel broke): it stays
    /// here, under the usual drain, and its responses say `Connection: close` again.
    kept: AtomicBool,
    /// How much of a request head's end (`\r\n\r\n`) the last bytes read between
    /// requests matched.
    head_end: AtomicU8,
    /// The last write or flush is waiting for the socket: hyper holds bytes to send.
    write_pending: AtomicBool,
    /// Notified when the last open response is sent to its end.
    idle: tokio::sync::Notify,
}

impl ConnFacts {
    /// Follows bytes read between requests: any byte after the end of a request head was
    /// read ahead of the request's call, so hyper holds it.
    fn read_between_requests(&self, bytes: &[u8]) {
        const END: &[u8; 4] = b"\r\n\r\n";
        let mut matched = usize::from(self.head_end.load(Ordering::Relaxed));
        for &b in bytes {
            if matched == END.len() {
                self.unsure.store(true, Ordering::SeqCst);
                return;
            }
            matched = if b == END[matched] {
                matched + 1
            } else if b == END[0] {
                1
            } else {
                0
            };
        }
        self.head_end.store(matched as u8, Ordering::Relaxed);
    }

    /// Whether the connection may move to the next generation once it is idle: nothing
    /// it sent may be stuck in hyper, no handoff of it failed, and it was not told to
    /// leave.
    fn may_move(&self, record: &ConnRecord) -> bool {
        !self.unsure.load(Ordering::SeqCst)
            && !self.kept.load(Ordering::SeqCst)
            && !record.told_to_leave.load(Ordering::SeqCst)
    }

    /// Whether the connection is between requests with nothing held in hyper: its socket
    /// can change hands.
    fn can_hand_over(&self, record: &ConnRecord) -> bool {
        !self.http2.load(Ordering::SeqCst)
            && self.may_move(record)
            && !self.head_arriving.load(Ordering::SeqCst)
            && !self.write_pending.load(Ordering::SeqCst)
            && self.responses_open.load(Ordering::SeqCst) == 0
            && record.in_flight.load(Ordering::SeqCst) == 0
            && !record.upgraded.load(Ordering::SeqCst)
    }

    fn response_done(&self) {
        if self.responses_open.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.idle.notify_one();
        }
    }
}

/// What a connection needs to be handed to the next generation: its socket (owned by
/// its transport, which lives as long as the connection's task), its listener's key, and
/// the process's handoff state.
pub(crate) struct HandoffPlan {
    pub(crate) fd: std::os::fd::RawFd,
    pub(crate) key: Arc<str>,
    pub(crate) handoff: Arc<crate::handoff::Handoff>,
}

impl HandoffPlan {
    /// Where the next generation stands, for this connection: only an upgrade's drain
    /// hands connections over.
    fn state(&self, control: &DrainControl) -> crate::handoff::Outbox {
        match control.reason() {
            Some(DrainReason::Upgraded { .. }) => self.handoff.state(),
            _ => crate::handoff::Outbox::None,
        }
    }

    /// The next generation, when this connection may go to it now.
    fn outbox(&self, control: &DrainControl) -> Option<crate::handoff::HandoffSender> {
        match control.reason() {
            Some(DrainReason::Upgraded { .. }) => self.handoff.outbox(),
            _ => None,
        }
    }

    /// Hands the connection over: `true` if the next generation serves it now.
    async fn hand(&self, sender: &crate::handoff::HandoffSender) -> bool {
        // SAFETY: F_DUPFD_CLOEXEC on the connection's socket, which its transport keeps
        // open while this task runs.
        let copy = unsafe { libc::fcntl(self.fd, libc::F_DUPFD_CLOEXEC, 0) };
        if copy < 0 {
            self.handoff.counts.fell();
            return false;
        }
        // SAFETY: a new descriptor nothing else owns.
        let copy = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(copy) };
        let served = sender.hand(copy, &self.key).await;
        if served {
            self.handoff.counts.handed();
        } else {
            self.handoff.counts.fell();
        }
        served
    }
}

/// The connection's transport, watched: a read that brings bytes while no request is in
/// flight marks the next request head as arriving, so the idle grace does not close a
/// connection whose client is in the middle of sending a request.
///
/// It also keeps the connection counted after an HTTP/1.1 upgrade (hyper hands this
/// transport to the application, inside `hyper::upgrade::Upgraded`): the connection
/// stays among the open ones and `serve` waits for it, until the application drops it
/// or the hammer cuts it (reads and writes then fail with `ConnectionAborted`). A
/// WebSocket is sent a close frame first where one fits (see [`crate::websocket`]).
struct HeadWatch<IO> {
    io: IO,
    facts: Arc<ConnFacts>,
    record: Arc<ConnRecord>,
    flags: &'static PhaseFlags,
    ws: crate::websocket::Outgoing,
    registration: Arc<Registration>,
    _counted: tokio_util::task::task_tracker::TaskTrackerToken,
}

impl<IO: tokio::io::AsyncWrite + Unpin> HeadWatch<IO> {
    /// Whether the hammer has fallen.
    fn hammered(&self) -> bool {
        self.flags.phase() == Phase::Hammer
    }

    /// The hammer's error, after one try (without waiting) at a WebSocket close frame
    /// where one fits: `1012 Service Restart` when a new generation serves, `1001 Going
    /// Away` at a shutdown.
    fn hammer(&mut self, cx: &mut Context<'_>) -> std::io::Error {
        if self.ws.close_fits() {
            self.ws.close_sent();
            let frame = match self.registration.control.reason() {
                Some(DrainReason::Upgraded { .. }) => {
                    crate::websocket::close_frame(1012, "service restart")
                }
                _ => crate::websocket::close_frame(1001, "going away"),
            };
            if let Poll::Ready(Ok(n)) = Pin::new(&mut self.io).poll_write(cx, &frame)
                && n == frame.len()
            {
                let _ = Pin::new(&mut self.io).poll_flush(cx);
            }
        }
        hammer_error()
    }

    /// Follows a WebSocket's frames from the `101` response on: `bufs` were written, of
    /// which the first `n` bytes were taken.
    fn wrote<'b>(&mut self, bufs: impl IntoIterator<Item = &'b [u8]>, mut n: usize) {
        if !self.ws.is_on() {
            if !self.record.websocket.load(Ordering::Relaxed) {
                return;
            }
            self.ws.start();
        }
        for buf in bufs {
            let taken = n.min(buf.len());
            self.ws.observe(&buf[..taken]);
            n -= taken;
            if n == 0 {
                return;
            }
        }
    }

    /// Runs one poll of the transport, unless the hammer has fallen. Only a poll that
    /// would wait registers to be woken at the hammer (reads and writes apart, so that a
    /// connection split between a reader task and a writer task wakes both): a ready
    /// one, the common case, costs one atomic load.
    fn poll_unless_hammered<T>(
        &mut self,
        cx: &mut Context<'_>,
        waker: fn(&ConnRecord) -> &AtomicWaker,
        poll: impl FnOnce(Pin<&mut IO>, &mut Context<'_>) -> Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>>
    where
        IO: Unpin,
    {
        if self.hammered() {
            return Poll::Ready(Err(self.hammer(cx)));
        }
        let res = poll(Pin::new(&mut self.io), cx);
        if res.is_pending() {
            waker(&self.record).register(cx.waker());
            if self.hammered() {
                return Poll::Ready(Err(self.hammer(cx)));
            }
        }
        res
    }
}

fn hammer_error() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        "reborn: the drain deadline passed (hammer): connection closed",
    )
}

impl<IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> tokio::io::AsyncRead
    for HeadWatch<IO>
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let res = self.poll_unless_hammered(cx, |r| &r.read_waker, |io, cx| io.poll_read(cx, buf));
        if matches!(res, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            if self.record.in_flight.load(Ordering::SeqCst) == 0 {
                self.facts.head_arriving.store(true, Ordering::SeqCst);
                self.facts.read_between_requests(&buf.filled()[before..]);
            } else {
                // A request body, or the next request read ahead: hyper holds it.
                self.facts.unsure.store(true, Ordering::SeqCst);
            }
        }
        res
    }
}

impl<IO: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for HeadWatch<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let res =
            self.poll_unless_hammered(cx, |r| &r.write_waker, |io, cx| io.poll_write(cx, buf));
        self.facts
            .write_pending
            .store(res.is_pending(), Ordering::SeqCst);
        if let Poll::Ready(Ok(n)) = res {
            self.wrote([buf], n);
        }
        res
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let res = self.poll_unless_hammered(
            cx,
            |r| &r.write_waker,
            |io, cx| io.poll_write_vectored(cx, bufs),
        );
        self.facts
            .write_pending
            .store(res.is_pending(), Ordering::SeqCst);
        if let Poll::Ready(Ok(n)) = res {
            self.wrote(bufs.iter().map(|b| &**b), n);
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let res = Pin::new(&mut self.io).poll_flush(cx);
        self.facts
            .write_pending
            .store(res.is_pending(), Ordering::SeqCst);
        res
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The timing rules one connection is served under.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnTiming {
    /// How long an idle HTTP/1.x connection is kept once the drain starts.
    pub(crate) idle_grace: Duration,
    /// How long a request head may take to arrive; also how long the idle grace waits
    /// for a head that is arriving when it ends (`None`: until the hammer).
    pub(crate) header_read_timeout: Option<Duration>,
}

/// How often the end of the idle grace looks again at a connection whose next request
/// head is arriving.
const HEAD_ARRIVING_POLL: Duration = Duration::from_millis(50);

/// How soon a connection to hand over, not between requests yet, is looked at again.
const HANDOFF_LOOK_AGAIN: Duration = Duration::from_millis(10);

/// Wraps the user's service: marks HTTP/2 connections, gives each request the
/// connection's extensions, and during the drain adds `Connection: close` to HTTP/1.x
/// responses.
#[derive(Clone)]
pub(crate) struct DrainService<S> {
    inner: S,
    flags: &'static PhaseFlags,
    facts: Arc<ConnFacts>,
    record: Arc<ConnRecord>,
    /// Put in every request's extensions: who the connection is from.
    extensions: http::Extensions,
    /// Whether the connection will be handed over after the response being made.
    handing_over: Option<Arc<dyn Fn() -> bool + Send + Sync>>,
}

impl<S, B> hyper::service::Service<Request<Incoming>> for DrainService<S>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>>,
{
    type Response = Response<SentBody<B>>;
    type Error = S::Error;
    type Future = DrainFuture<S::Future>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        use http_body::Body as _;
        req.extensions_mut().extend(self.extensions.clone());
        let http1 = req.version() < Version::HTTP_2;
        if !http1 {
            self.facts.http2.store(true, Ordering::Relaxed);
        }
        if !req.body().is_end_stream() {
            self.facts.unsure.store(true, Ordering::SeqCst);
        }
        self.record.in_flight.fetch_add(1, Ordering::SeqCst);
        self.facts.responses_open.fetch_add(1, Ordering::SeqCst);
        self.facts.head_end.store(0, Ordering::Relaxed);
        self.facts.head_arriving.store(false, Ordering::SeqCst);
        *self
            .record
            .last_request
            .lock()
            .unwrap_or_else(|e| e.into_inner()) =
            Some((format!("{} {}", req.method(), req.uri()), Instant::now()));
        let in_flight = InFlight(self.record.clone());
        DrainFuture {
            inner: self.inner.call(req),
            close_when_draining: http1.then_some(&self.flags.draining),
            handing_over: self.handing_over.clone(),
            facts: Some(self.facts.clone()),
            _in_flight: in_flight,
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body, followed to its end: the connection is between requests again
    /// once the last one is sent.
    pub(crate) struct SentBody<B> {
        #[pin]
        inner: B,
        facts: Option<Arc<ConnFacts>>,
    }

    impl<B> PinnedDrop for SentBody<B> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(facts) = this.project().facts.take() {
                facts.response_done();
            }
        }
    }
}

impl<B: http_body::Body> http_body::Body for SentBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = std::task::ready!(this.inner.poll_frame(cx));
        if frame.is_none()
            && let Some(facts) = this.facts.take()
        {
            facts.response_done();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`DrainService`].
    pub(crate) struct DrainFuture<F> {
        #[pin]
        inner: F,
        close_when_draining: Option<&'static AtomicBool>,
        // Whether this connection is to be handed over after this response (then it
        // does not say `Connection: close`).
        handing_over: Option<Arc<dyn Fn() -> bool + Send + Sync>>,
        // Given to the response's body; without a response, the request is done here.
        facts: Option<Arc<ConnFacts>>,
        _in_flight: InFlight,
    }

    impl<F> PinnedDrop for DrainFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(facts) = this.project().facts.take() {
                facts.response_done();
            }
        }
    }
}

impl<F, B, E> Future for DrainFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<SentBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut res = std::task::ready!(this.inner.poll(cx));
        if let Ok(resp) = &res
            && resp.status() == http::StatusCode::SWITCHING_PROTOCOLS
        {
            this._in_flight.0.upgraded.store(true, Ordering::SeqCst);
            if crate::websocket::is_websocket_upgrade(resp.headers()) {
                this._in_flight.0.websocket.store(true, Ordering::SeqCst);
            }
        }
        if let (Ok(resp), Some(draining)) = (&mut res, *this.close_when_draining)
            && says_close(draining, this.handing_over.as_deref())
        {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        let facts = this.facts.take();
        match res {
            Ok(resp) => Poll::Ready(Ok(resp.map(|inner| SentBody { inner, facts }))),
            Err(e) => {
                if let Some(facts) = facts {
                    facts.response_done();
                }
                Poll::Ready(Err(e))
            }
        }
    }
}

/// Whether an HTTP/1 response made now says `Connection: close`: during a drain, unless
/// the connection is to be handed to the next generation after it.
///
/// The drain is looked at again after the handoff: a rollback (the new generation died
/// on probation) clears the drain's reason, which `handing_over` reads, only after the
/// flag is down, so a response that saw the drain, then no handoff, may have seen the
/// rollback in between. Its client had no reason to reconnect.
fn says_close(
    draining: &AtomicBool,
    handing_over: Option<&(dyn Fn() -> bool + Send + Sync)>,
) -> bool {
    draining.load(Ordering::SeqCst)
        && !handing_over.is_some_and(|h| h())
        && draining.load(Ordering::SeqCst)
}

/// What a connection is served with, besides its transport and service.
pub(crate) struct ConnSetup {
    pub(crate) timing: ConnTiming,
    /// Put in every request's extensions.
    pub(crate) extensions: http::Extensions,
    /// Counts the connection in its `serve` while it lives.
    pub(crate) counted: tokio_util::task::task_tracker::TaskTrackerToken,
    /// Set when it may be handed to the next generation.
    pub(crate) handoff: Option<HandoffPlan>,
}

/// Serves one connection under the drain policy above; returns when it is closed.
pub(crate) async fn serve_connection<IO, S, B>(
    builder: Arc<auto::Builder<TokioExecutor>>,
    io: IO,
    service: S,
    mut phase: PhaseWatch,
    setup: ConnSetup,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let ConnSetup {
        timing,
        extensions,
        counted,
        handoff,
    } = setup;
    let facts = Arc::new(ConnFacts::default());
    let plan = handoff.map(Arc::new);
    let handing_over = plan.as_ref().map(|plan| {
        let (plan, facts, control) = (plan.clone(), facts.clone(), phase.control.clone());
        let record = phase.record.clone();
        Arc::new(move || {
            facts.may_move(&record) && plan.state(&control) != crate::handoff::Outbox::None
        }) as Arc<dyn Fn() -> bool + Send + Sync>
    });
    let service = DrainService {
        inner: service,
        flags: phase.flags(),
        facts: facts.clone(),
        record: phase.record.clone(),
        extensions,
        handing_over,
    };
    let io = HeadWatch {
        io,
        facts: facts.clone(),
        record: phase.record.clone(),
        flags: phase.flags(),
        ws: crate::websocket::Outgoing::new(),
        registration: phase.registration.clone(),
        _counted: counted,
    };
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    // A connection accepted during the drain is served under the drain's rules from its
    // first byte: `changed` reports a phase other than `Serving` at once.
    let mut grace: Option<Pin<Box<tokio::time::Sleep>>> = None;
    // When the idle grace ended with a request head arriving.
    let mut head_wait_since: Option<Instant> = None;
    let mut shut_down = false;
    // Waiting for the moment to hand the connection to the next generation, and when to
    // look again if it was not that moment yet.
    let mut handing = false;
    let mut look_again: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let mut next_generation = plan.as_ref().map(|p| p.handoff.watch());
    loop {
        tokio::select! {
            biased;
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            now = phase.changed() => match now {
                // Back to serving (the new generation died on probation): an idle
                // connection not yet told to close is kept, as before the drain.
                Phase::Serving => {
                    if !shut_down {
                        grace = None;
                        head_wait_since = None;
                    }
                    handing = false;
                    look_again = None;
                }
                Phase::Draining => {
                    if facts.http2.load(Ordering::Relaxed) {
                        if !shut_down {
                            shut_down = true;
                            conn.as_mut().graceful_shutdown();
                        }
                    } else if !shut_down
                        && facts.may_move(&phase.record)
                        && plan.as_ref().is_some_and(|p| {
                            p.state(&phase.control) != crate::handoff::Outbox::None
                        })
                    {
                        handing = true;
                        facts.idle.notify_one();
                    } else if grace.is_none() && !shut_down {
                        grace = Some(Box::pin(tokio::time::sleep(timing.idle_grace)));
                    }
                }
                Phase::Hammer => return,
            },
            () = async {
                tokio::select! {
                    () = facts.idle.notified() => {}
                    () = async { if let Some(l) = look_again.as_mut() { l.await } }, if look_again.is_some() => {}
                    _ = async {
                        match next_generation.as_mut() {
                            Some(w) => w.changed().await,
                            None => std::future::pending().await,
                        }
                    } => {}
                }
            }, if handing => {
                look_again = None;
                let state = plan
                    .as_ref()
                    .map_or(crate::handoff::Outbox::None, |p| p.state(&phase.control));
                let outbox = plan.as_ref().and_then(|p| Some((p, p.outbox(&phase.control)?)));
                match outbox {
                    // It may not move any more (told to leave, say): the usual drain,
                    // without waiting for a probation to end.
                    _ if !facts.may_move(&phase.record) => {
                        handing = false;
                        grace = Some(Box::pin(tokio::time::sleep(timing.idle_grace)));
                    }
                    // On probation: stay, until it passes or dies.
                    None if state == crate::handoff::Outbox::Waiting => {}
                    Some(_) if !facts.can_hand_over(&phase.record) => {
                        // A response still going out, a head arriving, a write waiting
                        // for the socket: the end of a response says so, the rest is
                        // looked at again shortly.
                        look_again = Some(Box::pin(tokio::time::sleep(HANDOFF_LOOK_AGAIN)));
                    }
                    Some((plan, sender)) => {
                        // hyper is not polled while the socket changes hands: what the
                        // client sends now waits in the socket, for its next owner.
                        if plan.hand(&sender).await {
                            return;
                        }
                        // Refused, or the channel broke: the usual drain, from now on.
                        facts.kept.store(true, Ordering::SeqCst);
                        handing = false;
                        grace = Some(Box::pin(tokio::time::sleep(timing.idle_grace)));
                    }
                    None => {
                        handing = false;
                        grace = Some(Box::pin(tokio::time::sleep(timing.idle_grace)));
                    }
                }
            },
            () = async { if let Some(g) = grace.as_mut() { g.await } }, if grace.is_some() => {
                grace = None;
                if shut_down {
                    continue;
                }
                // Serving again (a rollback since the phase was last looked at): the
                // connection stays, as the phase's change will say.
                if phase.control.phase() == Phase::Serving {
                    continue;
                }
                // A client in the middle of sending its next request is not idle: hyper
                // would close the connection under it and lose the request. Wait for the
                // head (its response carries `Connection: close`), as long as a head may
                // take to arrive.
                let since = *head_wait_since.get_or_insert_with(Instant::now);
                let patience = timing.header_read_timeout.unwrap_or(Duration::MAX);
                if facts.head_arriving.load(Ordering::SeqCst) && since.elapsed() < patience {
                    grace = Some(Box::pin(tokio::time::sleep(HEAD_ARRIVING_POLL)));
                    continue;
                }
                shut_down = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The drain deadline of a drain the process has since resumed from (a rollback)
    /// does not hammer the process that serves again.
    #[test]
    fn a_deadline_of_a_drain_called_off_does_not_hammer() {
        let control = DrainControl::new();
        assert!(control.claim(DrainReason::Upgraded { successor: 1 }));
        control.start_draining();
        let epoch = control.epoch();
        assert!(control.resume());
        let mut said = false;
        assert!(!control.hammer_drain(epoch, || said = true));
        assert!(!said, "nothing said");
        assert_eq!(control.phase(), Phase::Serving);
        // The deadline of a drain still under way does.
        assert!(control.claim(DrainReason::Shutdown));
        control.start_draining();
        assert!(control.hammer_drain(control.epoch(), || said = true));
        assert!(said);
        assert_eq!(control.phase(), Phase::Hammer);
        assert!(!control.hammer_drain(control.epoch(), || {}), "once");
    }

    /// A response made while the new generation dies on probation: it saw the drain,
    /// then the rollback (no drain, no next generation) when it asked about the handoff.
    /// It must not say `Connection: close`: the client would reconnect for nothing.
    #[tokio::test]
    async fn a_response_made_across_a_rollback_does_not_say_close() {
        let control = Arc::new(DrainControl::new());
        let handoff = Arc::new(crate::handoff::Handoff::new(None));
        let (sender, _new) = crate::handoff::HandoffSender::over_socket_pair();
        handoff.set_outbox(sender, false);
        let plan = HandoffPlan {
            fd: -1,
            key: "http".into(),
            handoff: handoff.clone(),
        };
        let draining = &control.flags.draining;
        assert!(!says_close(draining, None), "serving: no drain");
        assert!(control.claim(DrainReason::Upgraded { successor: 1 }));
        control.start_draining();
        let waiting = || plan.state(&control) != crate::handoff::Outbox::None;
        assert!(
            !says_close(draining, Some(&waiting)),
            "kept for the handoff"
        );
        assert!(says_close(draining, None), "draining, no handoff");
        // The rollback happens between the look at the drain and the one at the handoff.
        let rolled_back = || {
            assert!(control.resume());
            handoff.close();
            plan.state(&control) != crate::handoff::Outbox::None
        };
        assert!(!says_close(draining, Some(&rolled_back)));
    }

    fn unsure_after(reads: &[&[u8]]) -> bool {
        let facts = ConnFacts::default();
        for r in reads {
            facts.read_between_requests(r);
        }
        facts.unsure.load(Ordering::SeqCst)
    }

    #[test]
    fn bytes_after_a_request_head_mean_hyper_holds_them() {
        let head: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        assert!(!unsure_after(&[head]), "one whole head");
        assert!(
            !unsure_after(&[b"GET / HTTP/1.1\r\nHo", b"st: x\r", b"\n\r\n"]),
            "one head, split anywhere (even inside its end)"
        );
        assert!(
            unsure_after(&[b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /b"]),
            "a second request read ahead"
        );
        assert!(
            unsure_after(&[b"GET / HTTP/1.1\r\nHost: x\r\n\r", b"\nX"]),
            "a byte after an end split across reads"
        );
        assert!(
            !unsure_after(&[b"GET / HTTP/1.1\r\nA: \r\r\n\r\n"]),
            "a stray \\r before the end"
        );
    }
}
