//! The control socket: how `reborn upgrade|status|stop` talk to a running master.
//!
//! A Unix stream socket, mode 0600, whose peers are checked with `SO_PEERCRED`: only the
//! master's own user and root are obeyed (the file mode already keeps others out; the
//! check holds even if someone loosens it). The protocol is one request line
//! (`upgrade`, `status` or `stop`, parsed by [`crate::protocol`]) answered by one JSON
//! line, a [`Reply`]; a line that is no request (not UTF-8, unknown, empty, too long) is
//! answered by a [`Reply`] that says so and lists the requests. `upgrade`
//! answers once the outcome is known; after answering `stop` the master keeps the
//! connection open until it exits, so the client can wait for that.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Notify, Semaphore, mpsc::UnboundedSender, oneshot};

pub use crate::protocol::Request;
use crate::protocol::{MAX_LINE_LEN, parse_request};
use crate::supervisor::Event;

/// The master's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    /// Whether the command succeeded.
    pub ok: bool,
    /// What happened, for people.
    pub message: String,
    /// The state, for `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
}

impl Reply {
    /// A success.
    pub fn ok(message: impl Into<String>) -> Reply {
        Reply {
            ok: true,
            message: message.into(),
            status: None,
        }
    }

    /// A failure.
    pub fn err(message: impl Into<String>) -> Reply {
        Reply {
            ok: false,
            message: message.into(),
            status: None,
        }
    }
}

/// The master's state, as `reborn status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// The service name.
    pub name: String,
    /// The master's PID.
    pub master_pid: u32,
    /// The program as given.
    pub program: String,
    /// The generation of the serving worker (0 before the first is ready).
    pub generation: u64,
    /// `starting`, `serving`, `upgrading`, `restarting` or `stopping`.
    pub state: String,
    /// Seconds since the master started.
    pub uptime_secs: f64,
    /// Every worker alive, newest first.
    pub workers: Vec<WorkerStatus>,
    /// The listeners handed to workers.
    pub listeners: Vec<ListenerStatus>,
    /// The last upgrade's outcome.
    pub last_upgrade: Option<UpgradeStatus>,
    /// Worker crashes since the master started.
    pub crashes: u64,
    /// Crashes in a row (reset once a worker stays up).
    pub crashes_in_a_row: u32,
    /// Problems that need a person: e.g. a serving worker that does not use one of the
    /// master's listeners (its clients hang).
    #[serde(default)]
    pub warnings: Vec<String>,
}

/// One worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// Its generation.
    pub generation: u64,
    /// Its PID, once started.
    pub pid: Option<u32>,
    /// `starting`, `serving` or `draining`.
    pub role: String,
    /// Seconds since it was started.
    pub uptime_secs: f64,
    /// Its last `STATUS=` message.
    pub status: Option<String>,
}

/// One listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListenerStatus {
    /// Its name in `LISTEN_FDNAMES`.
    pub name: Option<String>,
    /// Where it listens.
    pub address: String,
}

/// The outcome of an upgrade.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpgradeStatus {
    /// The generation it started.
    pub generation: u64,
    /// Whether the new worker took over.
    pub ok: bool,
    /// What happened.
    pub message: String,
    /// From its start to its outcome, in milliseconds.
    pub duration_ms: u64,
    /// Seconds since its outcome.
    pub ago_secs: f64,
}

/// Binds the control socket at `path` (mode 0600). A stale socket file is replaced; a
/// live one means another master runs under that name.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if path.exists() {
        match StdUnixStream::connect(path) {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "another reborn master is running with the control socket {}; stop it \
                         (`reborn stop --control {}`) or give this one another --name",
                        path.display(),
                        path.display()
                    ),
                ));
            }
            // Nobody accepts there: a stale file from a master that is gone.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path)?,
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!(
                        "{} exists and cannot be checked ({e}); remove it if no master uses it, \
                         or give this one another --name",
                        path.display()
                    ),
                ));
            }
        }
    }
    let listener = UnixListener::bind(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot create the control socket {}: {e}", path.display()),
        )
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// The control connections being answered, for the master to let every answer it gave
/// reach its client before it exits.
#[derive(Debug, Clone, Default)]
pub struct Answers {
    inner: Arc<AnswersInner>,
}

#[derive(Debug, Default)]
struct AnswersInner {
    /// Requests read and not answered on the wire yet.
    pending: AtomicUsize,
    /// Woken when `pending` drops to 0.
    done: Notify,
}

/// One request being answered; counted while it lives.
struct Answering(Arc<AnswersInner>);

impl Drop for Answering {
    fn drop(&mut self) {
        if self.0.pending.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.done.notify_waiters();
        }
    }
}

impl Answers {
    fn begin(&self) -> Answering {
        self.inner.pending.fetch_add(1, Ordering::SeqCst);
        Answering(self.inner.clone())
    }

    /// Waits until every request read so far has its answer written (the supervisor has
    /// answered or dropped each), or `timeout` passes. Run after the supervisor has
    /// returned, so that, e.g., the answer to the `stop` that ended it is not lost with
    /// the runtime.
    pub async fn settle(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, async {
            loop {
                let done = self.inner.done.notified();
                if self.inner.pending.load(Ordering::SeqCst) == 0 {
                    return;
                }
                done.await;
            }
        })
        .await;
    }
}

/// The most control connections served at once; more are answered with an error and
/// closed, so that clients that hold connections open cannot exhaust the master's fds.
/// (Each connection also has 10 s to send its request line, or it is closed.)
pub const MAX_CONNECTIONS: usize = 64;

/// Tells a connection over the cap why it is closed, in one reply line.
async fn refuse_busy(mut stream: UnixStream) {
    let reply = Reply::err(format!(
        "the master is busy: {MAX_CONNECTIONS} control connections are open already; try \
         again in a moment"
    ));
    let mut text = serde_json::to_string(&reply).unwrap_or_else(|_| "{}".into());
    text.push('\n');
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(text.as_bytes())).await;
}

/// Answers control connections until the runtime ends, at most [`MAX_CONNECTIONS`] at a
/// time.
pub fn serve(listener: UnixListener, path: &Path, events: UnboundedSender<Event>) -> Answers {
    let path = path.to_path_buf();
    let answers = Answers::default();
    let counted = answers.clone();
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => match permits.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let (events, counted) = (events.clone(), counted.clone());
                        tokio::spawn(async move {
                            handle(stream, events, counted).await;
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        tracing::warn!(
                            socket = %path.display(),
                            "control socket: {MAX_CONNECTIONS} connections are open already; \
                             refused one"
                        );
                        tokio::spawn(refuse_busy(stream));
                    }
                },
                Err(e) => {
                    tracing::warn!(socket = %path.display(), error = %e, "control socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    answers
}

async fn handle(stream: UnixStream, events: UnboundedSender<Event>, answers: Answers) {
    // Counted from before the request is read until its answer is written.
    let answering = answers.begin();
    let me = nix::unistd::geteuid().as_raw();
    let peer = stream.peer_cred().map(|c| c.uid()).ok();
    let (read, mut write) = stream.into_split();
    let reply = match peer {
        Some(uid) if uid == me || uid == 0 => {
            // Bytes, not a `String`: a line that is not UTF-8 gets an answer too. One byte
            // more than the limit tells a line that is too long.
            let mut line = Vec::new();
            let mut reader = tokio::io::BufReader::new(read).take(MAX_LINE_LEN as u64 + 1);
            let read =
                tokio::time::timeout(Duration::from_secs(10), reader.read_until(b'\n', &mut line));
            match read.await {
                Ok(Ok(read)) => match parse_request(&line) {
                    Ok(request) => ask(request, &events).await,
                    // Closed without a word: a client looking for the masters that run
                    // (`reborn upgrade` without a name). Answered, not worth a warning.
                    Err(e) if read == 0 => Reply::err(e.to_string()),
                    Err(e) => {
                        tracing::warn!(error = %e, "control socket: refused a request");
                        Reply::err(e.to_string())
                    }
                },
                _ => return,
            }
        }
        Some(uid) => {
            tracing::warn!(uid, "control socket: refused a command from another user");
            Reply::err(format!(
                "refused: this master runs as uid {me} and obeys only that user and root \
                 (you are uid {uid}); run the command as uid {me} or root"
            ))
        }
        None => Reply::err("refused: cannot read the peer's credentials"),
    };
    let stop = reply.ok && reply.message.starts_with("stopping");
    let mut text = serde_json::to_string(&reply).unwrap_or_else(|_| "{}".into());
    text.push('\n');
    if write.write_all(text.as_bytes()).await.is_err() {
        return;
    }
    drop(answering);
    if stop {
        // Keep the connection until the master exits: the client waits for EOF.
        std::future::pending::<()>().await;
    }
}

async fn ask(request: Request, events: &UnboundedSender<Event>) -> Reply {
    let (tx, rx) = oneshot::channel();
    if events.send(Event::Control { request, reply: tx }).is_err() {
        return Reply::err("the master is exiting");
    }
    rx.await
        .unwrap_or_else(|_| Reply::err("the master is exiting"))
}

/// Client side: sends `request` to the master at `path` and returns its reply. For
/// `stop`, also waits until the master has exited.
pub fn call(path: &PathBuf, request: Request) -> Result<Reply, String> {
    let stream = StdUnixStream::connect(path).map_err(|e| {
        let hint = match e.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                "is `reborn run` running? Give the same --name or --control as to `reborn run`"
            }
            io::ErrorKind::PermissionDenied => {
                "the control socket belongs to another user; run this as the master's user or root"
            }
            _ => "check the path",
        };
        format!(
            "cannot reach the reborn master at {}: {e}; {hint}",
            path.display()
        )
    })?;
    let mut writer = &stream;
    // A master that refuses this client answers without reading: the write may fail
    // while the answer is there to read.
    let sent = writer.write_all(format!("{}\n", request.as_str()).as_bytes());
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    let read = reader.read_line(&mut line);
    if line.is_empty() {
        return Err(match (sent, read) {
            (Err(e), _) => format!("cannot send to the master: {e}"),
            (_, Err(e)) => format!("no answer from the master: {e}"),
            _ => "the master closed the connection without answering".into(),
        });
    }
    let reply: Reply = serde_json::from_str(&line)
        .map_err(|e| format!("cannot read the master's answer ({e}): {line:?}"))?;
    if request == Request::Stop && reply.ok {
        let mut rest = Vec::new();
        let _ = io::Read::read_to_end(&mut reader, &mut rest);
    }
    Ok(reply)
}
