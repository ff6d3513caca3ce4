//! Handing idle keep-alive connections to the next generation, instead of closing them.
//!
//! Why: closing an idle HTTP/1.1 connection races a client that sends its next request at
//! that moment, and makes every keep-alive client (a load balancer's pool, say) reconnect
//! after each upgrade. The connection itself can move instead: the old generation sends
//! its socket (`SCM_RIGHTS`) to the new one, which serves it as if it had accepted it.
//! Bytes the client sent meanwhile are in the kernel's socket buffer and move with it:
//! nothing races, nothing is lost, the client never notices.
//!
//! Between two reborn processes only (hosts that are not reborn hear only systemd's
//! protocols):
//!
//! 1. Before it starts the new process, the old one listens on a private Unix stream
//!    socket (on Linux an abstract name, elsewhere a socket in a directory only this user
//!    can enter) and names it in `REBORN_HANDOFF_SOCKET`.
//! 2. The new process connects just before it reports ready. Once it is ready, the old one
//!    takes the connection if its peer is that very process (credentials: user, and PID
//!    where the system tells it); anything else is ignored.
//! 3. Each connection handed over is one frame of [`FRAME`] bytes carrying its socket: an
//!    id, and the name of the listener it was accepted on. The new process answers each
//!    with the id and whether it serves it (it has that listener) or not.
//! 4. The old process keeps its own copy of the socket until that answer. A refusal, a
//!    broken channel (the new process died) or no answer in [`ANSWER_TIMEOUT`] make it
//!    serve the connection again itself, under the usual drain: nothing is lost for
//!    being handed.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use tokio::io::Interest;
use tokio::sync::{mpsc, oneshot};

/// The size of one frame: the id (8 bytes), the name's length (1), the name.
const FRAME: usize = 64;
/// The longest listener name that fits in a frame.
const MAX_NAME: usize = FRAME - 9;
/// The size of an answer: the id (8 bytes) and 1 (served) or 0 (refused).
const ANSWER: usize = 9;
/// How long the old generation waits for the answer about one connection.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// How many connections were handed over, and how many fell back to the drain.
#[derive(Debug, Default)]
pub(crate) struct Counts {
    pub(crate) handed_over: AtomicU64,
    pub(crate) fell_back: AtomicU64,
}

/// The old generation's side, before the new process connects: a listening socket.
#[derive(Debug)]
pub(crate) struct HandoffListener {
    listener: std::os::unix::net::UnixListener,
    address: OsString,
    /// The private directory of a socket file (the portable path), removed when dropped.
    _dir: Option<tempfile::TempDir>,
}

impl HandoffListener {
    /// A new handoff socket, under a name no other socket has.
    pub(crate) fn new() -> io::Result<HandoffListener> {
        #[cfg(reborn_linux)]
        {
            let (listener, address) = crate::notify::bind_abstract(
                "reborn/handoff",
                std::os::unix::net::UnixListener::bind_addr,
            )?;
            listener.set_nonblocking(true)?;
            Ok(HandoffListener {
                listener,
                address,
                _dir: None,
            })
        }
        #[cfg(not(reborn_linux))]
        {
            let dir = crate::notify::NotifyDir::new()?.into_dir();
            let path = dir.path().join("handoff");
            let listener = std::os::unix::net::UnixListener::bind(&path)?;
            listener.set_nonblocking(true)?;
            Ok(HandoffListener {
                listener,
                address: path.into_os_string(),
                _dir: Some(dir),
            })
        }
    }

    /// What `REBORN_HANDOFF_SOCKET` says.
    pub(crate) fn address(&self) -> OsString {
        self.address.clone()
    }

    /// The new process's connection, if it made one: the first queued connection whose
    /// peer is process `child` of this user. Others are dropped. Never waits.
    pub(crate) fn take_child(&self, child: u32) -> Option<HandoffSender> {
        self.take(|pid| pid.is_none_or(|pid| i64::from(pid) == i64::from(child)))
            .map(|(sender, _)| sender)
    }

    /// Under the reborn master: the connection of the worker that replaces this one, if
    /// it made one (a process of this user whose parent is the master), and its PID.
    pub(crate) fn take_sibling(&self, master: u32) -> Option<(HandoffSender, Option<u32>)> {
        self.take(|pid| pid.is_some_and(|pid| parent_of(pid) == Some(master)))
    }

    /// The first queued connection from a process of this user whose PID (if the system
    /// says it) passes `peer`.
    fn take(&self, peer: impl Fn(Option<u32>) -> bool) -> Option<(HandoffSender, Option<u32>)> {
        for _ in 0..8 {
            let (stream, _) = self.listener.accept().ok()?;
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let Ok(stream) = tokio::net::UnixStream::from_std(stream) else {
                continue;
            };
            let Ok(cred) = stream.peer_cred() else {
                continue;
            };
            let ours = nix::unistd::geteuid().as_raw();
            let pid = cred.pid().and_then(|p| u32::try_from(p).ok());
            if cred.uid() == ours && peer(pid) {
                return Some((HandoffSender::start(stream), pid));
            }
            crate::log::warning!(
                "ignored a connection to the handoff socket from pid {:?}, uid {} (not the \
                 process that takes over from this one)",
                cred.pid(),
                cred.uid()
            );
        }
        None
    }
}

/// The parent of process `pid`, from `/proc` (Linux; elsewhere unknown).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name in parentheses: the state, then the parent's PID.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A connection to hand over: its socket (a copy: the caller keeps its own until the
/// answer) and the listener it was accepted on.
struct Handing {
    socket: OwnedFd,
    listener: String,
    /// Told once the socket is on its way (dropped unsent: it never left).
    sent: oneshot::Sender<()>,
    answer: oneshot::Sender<bool>,
}

/// The old generation's side once the new process is connected: hands sockets over, one
/// task writing them and reading the answers.
#[derive(Debug, Clone)]
pub(crate) struct HandoffSender {
    queue: mpsc::UnboundedSender<Handing>,
}

impl std::fmt::Debug for Handing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handing")
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

impl HandoffSender {
    /// For tests: the old generation's sender on one end of a real socket pair; the
    /// other end is the new generation's. Within a runtime.
    #[cfg(test)]
    pub(crate) fn over_socket_pair() -> (HandoffSender, std::os::unix::net::UnixStream) {
        let (old, new) = std::os::unix::net::UnixStream::pair().expect("a socket pair");
        old.set_nonblocking(true).expect("non-blocking");
        let old = tokio::net::UnixStream::from_std(old).expect("registered");
        (HandoffSender::start(old), new)
    }

    /// One task writes the sockets, another reads the answers: a writer that waited for
    /// room while answers piled up unread would wait for ever (the new process, its
    /// answers unread, stops reading sockets).
    fn start(stream: tokio::net::UnixStream) -> HandoffSender {
        let (queue, rx) = mpsc::unbounded_channel();
        let stream = Arc::new(stream);
        let waiting = Arc::new(std::sync::Mutex::new(Waiting::default()));
        let (broken, on_broken) = oneshot::channel();
        tokio::spawn(read_answers(stream.clone(), waiting.clone(), broken));
        tokio::spawn(send_sockets(stream, waiting, rx, on_broken));
        HandoffSender { queue }
    }

    /// Hands `socket` (a copy of a connection accepted on `listener`) to the new
    /// generation. `true` once the new generation said it serves it: the caller then
    /// closes its own copy without reading or writing. `false`: the caller still owns the
    /// connection, and serves it.
    pub(crate) async fn hand(&self, socket: OwnedFd, listener: &str) -> bool {
        if listener.len() > MAX_NAME {
            return false;
        }
        let (answer, answered) = oneshot::channel();
        let (sent, on_sent) = oneshot::channel();
        let handing = Handing {
            socket,
            listener: listener.to_owned(),
            sent,
            answer,
        };
        if self.queue.send(handing).is_err() {
            return false;
        }
        // Not sent: the new process never saw it.
        if on_sent.await.is_err() {
            return false;
        }
        match tokio::time::timeout(ANSWER_TIMEOUT, answered).await {
            Ok(Ok(served)) => served,
            // The channel broke (the new process died): whatever it received died with
            // it, and the connection is the caller's alone again.
            Ok(Err(_)) => false,
            // No answer yet from a live process that may be serving the connection: it
            // must not be served twice. Left to the new process.
            Err(_) => true,
        }
    }

    /// Whether the new process is still connected.
    pub(crate) fn is_open(&self) -> bool {
        !self.queue.is_closed()
    }
}

/// The connections sent and not answered yet, by id; `broken` once the channel broke.
#[derive(Default)]
struct Waiting {
    answers: HashMap<u64, oneshot::Sender<bool>>,
    broken: bool,
}

impl Waiting {
    /// The channel broke: every connection waiting for an answer falls back.
    fn fail_all(&mut self) {
        self.broken = true;
        for (_, tx) in self.answers.drain() {
            let _ = tx.send(false);
        }
    }
}

fn lock(waiting: &std::sync::Mutex<Waiting>) -> std::sync::MutexGuard<'_, Waiting> {
    waiting.lock().unwrap_or_else(|e| e.into_inner())
}

/// Writes each queued socket as a frame, until the channel breaks.
async fn send_sockets(
    stream: Arc<tokio::net::UnixStream>,
    waiting: Arc<std::sync::Mutex<Waiting>>,
    mut queue: mpsc::UnboundedReceiver<Handing>,
    mut on_broken: oneshot::Receiver<()>,
) {
    let mut next_id = 0u64;
    loop {
        let handing = tokio::select! {
            handing = queue.recv() => match handing {
                Some(h) => h,
                None => return,
            },
            _ = &mut on_broken => break,
        };
        next_id += 1;
        let mut frame = [0u8; FRAME];
        frame[..8].copy_from_slice(&next_id.to_le_bytes());
        frame[8] = handing.listener.len() as u8;
        frame[9..9 + handing.listener.len()].copy_from_slice(handing.listener.as_bytes());
        {
            let mut w = lock(&waiting);
            if w.broken {
                break;
            }
            // Before it is sent: the answer may come at once.
            w.answers.insert(next_id, handing.answer);
        }
        let fd = handing.socket.as_raw_fd();
        let sent = tokio::select! {
            sent = stream.async_io(Interest::WRITABLE, || {
                sendmsg::<()>(
                    stream.as_raw_fd(),
                    &[IoSlice::new(&frame)],
                    &[ControlMessage::ScmRights(&[fd])],
                    send_flags(),
                    None,
                )
                .map_err(io::Error::from)
            }) => sent,
            _ = &mut on_broken => break,
        };
        match sent {
            // A frame is far smaller than a socket's buffer: all of it or none.
            Ok(n) if n == FRAME => {
                let _ = handing.sent.send(());
            }
            _ => break,
        }
    }
    lock(&waiting).fail_all();
    queue.close();
    // What is still queued was never sent: each `sent` is dropped with it.
    while queue.try_recv().is_ok() {}
}

/// Reads the answers and gives each to its connection, until the channel ends.
async fn read_answers(
    stream: Arc<tokio::net::UnixStream>,
    waiting: Arc<std::sync::Mutex<Waiting>>,
    broken: oneshot::Sender<()>,
) {
    let mut answer = [0u8; ANSWER];
    let mut have = 0;
    loop {
        if stream.readable().await.is_err() {
            break;
        }
        match stream.try_read(&mut answer[have..]) {
            Ok(0) => break,
            Ok(n) => {
                have += n;
                if have == ANSWER {
                    have = 0;
                    let mut id = [0u8; 8];
                    id.copy_from_slice(&answer[..8]);
                    let tx = lock(&waiting).answers.remove(&u64::from_le_bytes(id));
                    if let Some(tx) = tx {
                        let _ = tx.send(answer[8] == 1);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => break,
        }
    }
    lock(&waiting).fail_all();
    let _ = broken.send(());
}

fn send_flags() -> MsgFlags {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        MsgFlags::MSG_NOSIGNAL
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        MsgFlags::empty()
    }
}

/// A connection received from the previous generation, for the `serve` of `listener`.
struct Received {
    listener: String,
    socket: OwnedFd,
}

/// The new generation's side: connects to the previous generation's handoff socket
/// (before reporting ready: the previous one takes the connection once it reads
/// `READY=1`).
fn connect(address: &std::ffi::OsStr) -> io::Result<std::os::unix::net::UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = address.as_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            return std::os::unix::net::UnixStream::connect_addr(&addr);
        }
        #[cfg(not(target_os = "linux"))]
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "{}=@{}: abstract socket names exist only on Linux",
                crate::activation::ENV_HANDOFF,
                String::from_utf8_lossy(name)
            ),
        ));
    }
    std::os::unix::net::UnixStream::connect(std::path::Path::new(address))
}

/// Receives connections until the previous generation closes the channel, and answers
/// each: `deliver` says whether a `serve` took it.
async fn receive(
    stream: std::os::unix::net::UnixStream,
    mut deliver: impl FnMut(Received) -> bool,
) -> io::Result<()> {
    stream.set_nonblocking(true)?;
    let stream = tokio::net::UnixStream::from_std(stream)?;
    let mut frame = [0u8; FRAME];
    loop {
        let mut have = 0;
        let mut socket: Option<OwnedFd> = None;
        while have < FRAME {
            let (n, fd) = stream
                .async_io(Interest::READABLE, || {
                    recv_part(&stream, &mut frame[have..])
                })
                .await?;
            if n == 0 {
                return Ok(());
            }
            have += n;
            if let Some(fd) = fd {
                socket = Some(fd);
            }
        }
        let id = &frame[..8];
        let len = usize::from(frame[8]).min(MAX_NAME);
        let listener = String::from_utf8_lossy(&frame[9..9 + len]).into_owned();
        let served = match socket {
            Some(socket) => deliver(Received { listener, socket }),
            None => false,
        };
        let mut answer = [0u8; ANSWER];
        answer[..8].copy_from_slice(id);
        answer[8] = u8::from(served);
        let mut written = 0;
        while written < ANSWER {
            stream.writable().await?;
            match stream.try_write(&answer[written..]) {
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// One `recvmsg` into `buf`, with room for one descriptor (more are closed).
fn recv_part(
    stream: &tokio::net::UnixStream,
    buf: &mut [u8],
) -> io::Result<(usize, Option<OwnedFd>)> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut space = nix::cmsg_space!([RawFd; 4]);
    #[cfg(reborn_linux)]
    let flags = MsgFlags::MSG_CMSG_CLOEXEC;
    #[cfg(not(reborn_linux))]
    let flags = MsgFlags::empty();
    let msg = recvmsg::<()>(stream.as_raw_fd(), &mut iov, Some(&mut space), flags)
        .map_err(io::Error::from)?;
    let mut socket = None;
    for cmsg in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            for raw in fds {
                // SAFETY: the kernel gave this process a new descriptor with the message;
                // nothing else owns it.
                let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                #[cfg(not(reborn_linux))]
                let _ = nix::fcntl::fcntl(
                    &fd,
                    nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
                );
                if socket.is_none() {
                    socket = Some(fd);
                }
            }
        }
    }
    Ok((msg.bytes, socket))
}

/// This process's side of handoffs: the `serve`s that take handed connections (its
/// inboxes, by listener), the next generation once it is connected (its outbox), and the
/// counts.
#[derive(Debug)]
pub(crate) struct Handoff {
    /// The previous generation's handoff socket, until this process connects to it.
    previous: std::sync::Mutex<Option<OsString>>,
    /// Under the reborn master: this worker's own handoff socket, on which the worker
    /// that replaces it connects (the master passes its address on).
    own: std::sync::Mutex<Option<HandoffListener>>,
    outbox: std::sync::Mutex<Option<HandoffSender>>,
    /// Whether, and when, connections go to the next generation.
    state: tokio::sync::watch::Sender<Outbox>,
    inboxes: std::sync::Mutex<HashMap<String, mpsc::UnboundedSender<crate::Connection>>>,
    pub(crate) counts: Counts,
}

/// Where the next generation stands, for handoffs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outbox {
    /// None is connected: connections drain as usual.
    None,
    /// Connected, and on probation: idle connections stay here until it passes (should
    /// it die, this process serves on, and they lose nothing), and are not told to close.
    Waiting,
    /// Connected and committed: idle connections go to it.
    Open,
}

impl Handoff {
    /// `previous`: the previous generation's handoff socket (`REBORN_HANDOFF_SOCKET`).
    pub(crate) fn new(previous: Option<OsString>) -> Handoff {
        Handoff {
            previous: std::sync::Mutex::new(previous),
            own: std::sync::Mutex::new(None),
            outbox: std::sync::Mutex::new(None),
            state: tokio::sync::watch::Sender::new(Outbox::None),
            inboxes: std::sync::Mutex::new(HashMap::new()),
            counts: Counts::default(),
        }
    }

    /// Connects to the previous generation's handoff socket, if there is one and this
    /// was not done yet (just before this process reports ready: the previous generation
    /// takes the connection once it reads `READY=1`), and takes the connections it
    /// hands over until it closes the channel.
    pub(crate) fn connect_previous(self: &Arc<Self>, nodelay: bool) {
        let previous = self
            .previous
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(address) = previous {
            self.receive_from(&address, nodelay);
        }
    }

    /// Under the reborn master: this worker's handoff socket, made once, for the master
    /// to pass on to the worker that will replace this one.
    pub(crate) fn own_address(&self) -> Option<OsString> {
        let mut own = self.own.lock().unwrap_or_else(|e| e.into_inner());
        if own.is_none() {
            match HandoffListener::new() {
                Ok(listener) => *own = Some(listener),
                Err(e) => tracing::debug!("no handoff socket for the next worker: {e}"),
            }
        }
        own.as_ref().map(HandoffListener::address)
    }

    /// Under the reborn master (whose PID is `master`), at the stop signal: the worker
    /// that replaces this one, if it connected, and its PID.
    pub(crate) fn take_successor(&self, master: u32) -> Option<(HandoffSender, Option<u32>)> {
        self.own
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()?
            .take_sibling(master)
    }

    /// The next generation is connected and ready; `open`: committed (no probation).
    pub(crate) fn set_outbox(&self, sender: HandoffSender, open: bool) {
        *self.outbox.lock().unwrap_or_else(|e| e.into_inner()) = Some(sender);
        self.state
            .send_replace(if open { Outbox::Open } else { Outbox::Waiting });
    }

    /// The next generation passed its probation: idle connections go to it now.
    pub(crate) fn open(&self) {
        self.state.send_if_modified(|s| {
            let waiting = *s == Outbox::Waiting;
            if waiting {
                *s = Outbox::Open;
            }
            waiting
        });
    }

    /// No next generation to hand to (it died on probation, or the upgrade was called
    /// off): the channel closes, and connections drain as usual.
    pub(crate) fn close(&self) {
        self.outbox.lock().unwrap_or_else(|e| e.into_inner()).take();
        self.state.send_replace(Outbox::None);
    }

    /// Where the next generation stands, as it changes.
    pub(crate) fn watch(&self) -> tokio::sync::watch::Receiver<Outbox> {
        self.state.subscribe()
    }

    /// Where the next generation stands now. On probation it stays `Waiting` until the
    /// verdict, whatever its channel does (a new generation that dies is the probation's
    /// to report: this one then serves on); once committed, `None` if its channel broke.
    pub(crate) fn state(&self) -> Outbox {
        let state = *self.state.borrow();
        if state != Outbox::Open {
            return state;
        }
        let connected = self
            .outbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(HandoffSender::is_open);
        if connected {
            Outbox::Open
        } else {
            Outbox::None
        }
    }

    /// The next generation, while it is connected and committed.
    pub(crate) fn outbox(&self) -> Option<HandoffSender> {
        if *self.state.borrow() != Outbox::Open {
            return None;
        }
        self.outbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .filter(|s| s.is_open())
            .cloned()
    }

    /// A `serve` of the listener `key` takes the connections handed to it from now on.
    pub(crate) fn open_inbox(&self, key: &str) -> mpsc::UnboundedReceiver<crate::Connection> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.inboxes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.to_owned(), tx);
        rx
    }

    /// That `serve` stopped accepting: connections for it are refused (and stay with the
    /// previous generation).
    pub(crate) fn close_inbox(&self, key: &str) {
        self.inboxes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }

    /// Gives a received connection to its `serve`; `false` if there is none.
    fn deliver(&self, received: Received, nodelay: bool) -> bool {
        let inboxes = self.inboxes.lock().unwrap_or_else(|e| e.into_inner());
        let Some(inbox) = inboxes.get(&received.listener) else {
            return false;
        };
        match crate::serve::Connection::from_received(received.socket, nodelay) {
            Ok(conn) => inbox.send(conn).is_ok(),
            Err(e) => {
                tracing::debug!("a handed-over connection could not be taken: {e}");
                false
            }
        }
    }

    /// Connects to the previous generation's handoff socket (just before this process
    /// reports ready) and takes the connections it hands over until it closes the channel.
    fn receive_from(self: &Arc<Self>, address: &std::ffi::OsStr, nodelay: bool) {
        let stream = match connect(address) {
            Ok(stream) => stream,
            Err(e) => {
                tracing::debug!("no handoff from the previous generation: {e}");
                return;
            }
        };
        let this = self.clone();
        tokio::spawn(async move {
            let taken = receive(stream, |r| this.deliver(r, nodelay)).await;
            if let Err(e) = taken {
                tracing::debug!("the handoff channel ended: {e}");
            }
        });
    }
}

impl Counts {
    pub(crate) fn handed(&self) {
        self.handed_over.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn fell(&self) {
        self.fell_back.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    //! The channel between two generations, over a real socket pair, with real TCP
    //! connections handed across it.

    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    /// A connection on loopback: the client's end, and the server's end to hand over.
    fn connection() -> (TcpStream, OwnedFd) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        (client, OwnedFd::from(server))
    }

    #[tokio::test]
    async fn a_connection_served_by_the_new_generation_moves_with_what_the_client_sent() {
        let (sender, new) = HandoffSender::over_socket_pair();
        let (got, taken) = std::sync::mpsc::channel();
        tokio::spawn(receive(new, move |r| got.send(r).is_ok()));
        let (mut client, server_end) = connection();
        // Sent while the old generation owns the socket and reads nothing.
        client.write_all(b"GET / HTTP/1.1\r\n").expect("write");
        assert!(sender.hand(server_end, "http").await, "served");
        let received = taken.recv().expect("delivered");
        assert_eq!(received.listener, "http");
        let mut moved = TcpStream::from(received.socket);
        let mut head = [0u8; 16];
        moved
            .read_exact(&mut head)
            .expect("the bytes moved with the socket");
        assert_eq!(&head, b"GET / HTTP/1.1\r\n");
        moved.write_all(b"ok").expect("write back");
        let mut answer = [0u8; 2];
        client
            .read_exact(&mut answer)
            .expect("the client is answered");
        assert_eq!(&answer, b"ok");
    }

    #[tokio::test]
    async fn a_connection_the_new_generation_refuses_stays_with_the_old_one() {
        let (sender, new) = HandoffSender::over_socket_pair();
        tokio::spawn(receive(new, |_| false));
        let (_client, server_end) = connection();
        assert!(!sender.hand(server_end, "http").await);
        assert!(sender.is_open(), "a refusal does not end the channel");
    }

    #[tokio::test]
    async fn a_channel_that_breaks_fails_every_connection_waiting_for_an_answer() {
        let (sender, new) = HandoffSender::over_socket_pair();
        let (_a, first) = connection();
        let (_b, second) = connection();
        let waiting = [
            tokio::spawn({
                let sender = sender.clone();
                async move { sender.hand(first, "http").await }
            }),
            tokio::spawn({
                let sender = sender.clone();
                async move { sender.hand(second, "http").await }
            }),
        ];
        // The new generation reads both frames (a blocking read: tokio's would take a
        // read that stops at a descriptor's boundary for a drained socket), then dies
        // without answering.
        tokio::task::spawn_blocking(move || {
            let mut new = new;
            let mut frames = [0u8; 2 * FRAME];
            new.read_exact(&mut frames).expect("two frames");
        })
        .await
        .expect("joined");
        for hand in waiting {
            assert!(!hand.await.expect("joined"), "fell back");
        }
        let (_c, third) = connection();
        assert!(
            !sender.hand(third, "http").await,
            "nothing is sent any more"
        );
    }

    #[tokio::test]
    async fn a_listener_name_that_does_not_fit_a_frame_is_not_sent() {
        let (sender, _new) = HandoffSender::over_socket_pair();
        let (_client, server_end) = connection();
        assert!(!sender.hand(server_end, &"x".repeat(MAX_NAME + 1)).await);
    }
}
