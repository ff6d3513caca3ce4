//! Readiness over systemd's notify protocol: sending it (the worker's side) and receiving
//! it (the upgrader's side).
//!
//! A message is a single datagram of `KEY=VALUE` lines sent to the Unix datagram socket
//! named by `NOTIFY_SOCKET` (a path, or `@name` for Linux's abstract namespace).
//! reborn uses `READY=1`, `STATUS=…`, `STOPPING=1`, `RELOADING=1` and `MAINPID=…`,
//! and understands `ERRNO=…` from workers that report a failure.
//!
//! A datagram may carry file descriptors. systemd's `BARRIER=1` (sent by
//! `sd_notify_barrier()`, and by `systemd-notify` since version 246 after every message)
//! carries the write end of a pipe: the sender waits until the receiver has closed it,
//! which tells it every earlier message was seen. Receivers here accept descriptors on
//! every datagram and close them at once, after the messages before them were handed
//! on: so barriers are answered, and no descriptor is kept by accident.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

/// A parsed notify datagram. Unknown keys are ignored, as systemd does.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NotifyMessage {
    /// `READY=1`: the sender serves.
    pub ready: bool,
    /// `STOPPING=1`: the sender is shutting down.
    pub stopping: bool,
    /// `RELOADING=1`: the sender is reloading (or upgrading).
    pub reloading: bool,
    /// `STATUS=…`: free-form status text.
    pub status: Option<String>,
    /// `MAINPID=…`: the process that is now the service's main process.
    pub main_pid: Option<u32>,
    /// `ERRNO=…`: the sender failed with this errno.
    pub errno: Option<i32>,
    /// `REBORN_HANDED_OVER=<pid>`: reborn's own, sent to the previous generation only:
    /// the sender has handed over to this newer process.
    pub handed_over: Option<u32>,
    /// `BARRIER=1`: the sender waits until the descriptor that came with this datagram
    /// is closed (a receiver closes it as soon as the datagram is read).
    pub barrier: bool,
    /// `REBORN_HANDOFF_SOCKET=…`: reborn's own, sent by a worker to the reborn master
    /// with `READY=1`: where the worker that replaces it may connect to be handed its
    /// idle keep-alive connections (the master passes it on in that worker's
    /// environment).
    pub handoff_socket: Option<std::ffi::OsString>,
}

impl NotifyMessage {
    /// Parses a datagram. Lines without `=`, and unknown keys, are skipped.
    pub fn parse(datagram: &[u8]) -> NotifyMessage {
        let mut msg = NotifyMessage::default();
        for line in datagram.split(|b| *b == b'\n') {
            let Some(eq) = line.iter().position(|b| *b == b'=') else {
                continue;
            };
            let (key, value) = (&line[..eq], &line[eq + 1..]);
            let text = String::from_utf8_lossy(value);
            match key {
                b"READY" => msg.ready = value == b"1",
                b"STOPPING" => msg.stopping = value == b"1",
                b"RELOADING" => msg.reloading = value == b"1",
                b"BARRIER" => msg.barrier = value == b"1",
                b"STATUS" => msg.status = Some(text.into_owned()),
                b"MAINPID" => msg.main_pid = text.trim().parse().ok(),
                b"ERRNO" => msg.errno = text.trim().parse().ok(),
                b"REBORN_HANDED_OVER" => msg.handed_over = text.trim().parse().ok(),
                // As text, as STATUS= is: reborn's addresses are.
                b"REBORN_HANDOFF_SOCKET" if !value.is_empty() => {
                    msg.handoff_socket = Some(text.into_owned().into());
                }
                _ => {}
            }
        }
        msg
    }

    /// Encodes the message as a datagram (the fields that are set, one line each).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Some(pid) = self.main_pid {
            out.push_str(&format!("MAINPID={pid}\n"));
        }
        if self.reloading {
            out.push_str("RELOADING=1\n");
            out.push_str(&format!("MONOTONIC_USEC={}\n", monotonic_usec()));
        }
        if self.ready {
            out.push_str("READY=1\n");
        }
        if self.stopping {
            out.push_str("STOPPING=1\n");
        }
        if let Some(errno) = self.errno {
            out.push_str(&format!("ERRNO={errno}\n"));
        }
        if let Some(pid) = self.handed_over {
            out.push_str(&format!("REBORN_HANDED_OVER={pid}\n"));
        }
        if self.barrier {
            out.push_str("BARRIER=1\n");
        }
        if let Some(socket) = &self.handoff_socket {
            out.push_str("REBORN_HANDOFF_SOCKET=");
            out.push_str(&socket.to_string_lossy());
            out.push('\n');
        }
        if let Some(status) = &self.status {
            // A status is one line.
            out.push_str("STATUS=");
            out.push_str(&status.replace('\n', " "));
            out.push('\n');
        }
        out
    }
}

fn monotonic_usec() -> u128 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u128 * 1_000_000 + t.tv_nsec() as u128 / 1_000)
        .unwrap_or(0)
}

/// Sends one datagram to a notify socket address (a path, or `@name` for the abstract
/// namespace).
pub fn send(addr: &OsStr, message: &str) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    let bytes = addr.as_bytes();
    if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            let sa = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)?;
            sock.send_to_addr(message.as_bytes(), &sa)?;
        }
        #[cfg(not(target_os = "linux"))]
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "NOTIFY_SOCKET={}: abstract socket names (@…) exist only on Linux",
                String::from_utf8_lossy(abstract_name)
            ),
        ));
    } else {
        sock.send_to(message.as_bytes(), Path::new(addr))?;
    }
    Ok(())
}

/// A private notify socket on which one child process reports readiness.
///
/// Two kinds, both accepting datagrams only from processes of this user (or root). On
/// Linux the kernel attaches the sender's credentials to each datagram (`SO_PASSCRED`)
/// and any other sender is ignored, with a warning; other systems (and Linux with the
/// `portable` feature) have no credentials on datagrams, and rely on the directory's
/// mode alone, which lets no other user reach the socket.
///
/// - [`NotifyReceiver::new`]: a socket file in a fresh directory only this user can enter
///   (mode 0700). Every notify client understands a path. The directory goes away when
///   this is dropped. ([`NotifyDir`] makes the directory once for many receivers.)
/// - [`NotifyReceiver::new_abstract`] (Linux only, not with the `portable` feature): a
///   name in Linux's abstract socket namespace
///   (`NOTIFY_SOCKET=@reborn/…`, understood by libsystemd, `systemd-notify` and reborn).
///   Nothing is created on disk, so it costs no file-system work on the upgrade's
///   critical path and leaves nothing behind if the process is killed.
#[derive(Debug)]
pub struct NotifyReceiver {
    socket: tokio::net::UnixDatagram,
    address: OsString,
    cleanup: Cleanup,
}

/// What goes away with a receiver.
#[derive(Debug)]
enum Cleanup {
    /// Nothing (an abstract name).
    #[cfg(reborn_linux)]
    Nothing,
    /// Its own private directory, and the socket file in it.
    Dir(#[allow(dead_code, reason = "held to be removed when dropped")] tempfile::TempDir),
    /// Its socket file, in a [`NotifyDir`].
    File(PathBuf),
}

impl Drop for NotifyReceiver {
    fn drop(&mut self) {
        if let Cleanup::File(path) = &self.cleanup {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A private directory (mode 0700, in `$XDG_RUNTIME_DIR` if set, else in the temporary
/// directory) for the notify sockets of many children, one socket file each: made once,
/// so starting a child costs no directory, and a process that is killed leaves one
/// directory behind rather than one per child. Removed, with what is left in it, when
/// dropped.
#[derive(Debug)]
pub struct NotifyDir {
    dir: tempfile::TempDir,
}

/// The start of a notify directory's name: `reborn-notify-NS-PID-RANDOM`, where NS is
/// the inode of the maker's PID namespace (a PID means something only in its own
/// namespace: a master in a container must not take a live master's directory outside
/// it for a dead one's).
const DIR_PREFIX: &str = "reborn-notify-";

/// The inode of this process's PID namespace (0 if it cannot be read).
pub(crate) fn pid_namespace() -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/pid")
        .map(|m| m.ino())
        .unwrap_or(0)
}

/// Where notify directories are made: `$XDG_RUNTIME_DIR` if set, else the temporary
/// directory.
fn dir_base() -> PathBuf {
    std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .unwrap_or_else(std::env::temp_dir)
}

/// The PID namespace and the PID in a notify directory's name
/// (`reborn-notify-NS-PID-RANDOM`), if it is one.
pub(crate) fn dir_owner(name: &str) -> Option<(u64, i32)> {
    let rest = name.strip_prefix(DIR_PREFIX)?;
    let mut parts = rest.splitn(3, '-');
    let (ns, pid, random) = (parts.next()?, parts.next()?, parts.next()?);
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    let ok = digits(ns)
        && digits(pid)
        && !random.is_empty()
        && random.bytes().all(|b| b.is_ascii_alphanumeric());
    if !ok {
        return None;
    }
    Some((ns.parse().ok()?, pid.parse().ok()?))
}

/// Removes the notify directories that processes of this user left behind when they
/// were killed (`SIGKILL` leaves no chance to clean up): those named
/// `reborn-notify-NS-PID-RANDOM`, made in this PID namespace, whose PID is no longer
/// alive, that belong to this user and hold nothing but sockets. Anything else is left
/// alone. Returns what was removed.
pub fn sweep_stale_dirs() -> Vec<PathBuf> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let me = nix::unistd::geteuid().as_raw();
    let mine = std::process::id() as i32;
    let ns = pid_namespace();
    let mut bases = vec![dir_base()];
    if !bases.contains(&std::env::temp_dir()) {
        bases.push(std::env::temp_dir());
    }
    let mut removed = Vec::new();
    for base in bases {
        let Ok(entries) = std::fs::read_dir(&base) else {
            continue;
        };
        for entry in entries.flatten() {
            let Some((their_ns, pid)) = entry.file_name().to_str().and_then(dir_owner) else {
                continue;
            };
            if their_ns != ns || ns == 0 {
                continue;
            }
            let path = entry.path();
            // Not a symlink, a directory of this user's.
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if !meta.is_dir() || meta.uid() != me || pid == mine || pid <= 0 {
                continue;
            }
            // Alive (or not ours to ask about): leave it.
            let gone = matches!(
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
                Err(nix::errno::Errno::ESRCH)
            );
            if !gone {
                continue;
            }
            let Ok(inside) = std::fs::read_dir(&path) else {
                continue;
            };
            let inside: Vec<_> = inside.flatten().collect();
            let only_sockets = inside
                .iter()
                .all(|e| e.file_type().is_ok_and(|t| t.is_socket()));
            if !only_sockets {
                continue;
            }
            for e in &inside {
                let _ = std::fs::remove_file(e.path());
            }
            if std::fs::remove_dir(&path).is_ok() {
                removed.push(path);
            }
        }
    }
    removed
}

impl NotifyDir {
    /// Makes the directory, named `reborn-notify-NS-PID-RANDOM` (see
    /// [`sweep_stale_dirs`]).
    pub fn new() -> io::Result<NotifyDir> {
        use std::os::unix::fs::PermissionsExt;
        let base = dir_base();
        // Private whatever the umask: only this user may reach the sockets in it.
        let prefix = format!("{DIR_PREFIX}{}-{}-", pid_namespace(), std::process::id());
        let mut builder = tempfile::Builder::new();
        builder
            .prefix(&prefix)
            .permissions(std::fs::Permissions::from_mode(0o700));
        let dir = builder.tempdir_in(&base).or_else(|_| builder.tempdir())?;
        Ok(NotifyDir { dir })
    }

    /// The directory itself, removed when dropped.
    #[cfg_attr(
        reborn_linux,
        allow(dead_code, reason = "the portable path's handoff socket")
    )]
    pub(crate) fn into_dir(self) -> tempfile::TempDir {
        self.dir
    }

    /// A receiver on the socket `NAME.sock` in this directory (a name not in use: one per
    /// child), whose file is removed when the receiver is dropped.
    pub fn receiver(&self, name: &str) -> io::Result<NotifyReceiver> {
        let path = self.dir.path().join(format!("{name}.sock"));
        let socket = UnixDatagram::bind(&path)?;
        NotifyReceiver::from_bound(socket, path.clone().into_os_string(), Cleanup::File(path))
    }
}

impl NotifyReceiver {
    /// Creates the socket in a private directory of its own (see [`NotifyDir`]).
    pub fn new() -> io::Result<NotifyReceiver> {
        let NotifyDir { dir } = NotifyDir::new()?;
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path)?;
        NotifyReceiver::from_bound(socket, path.into_os_string(), Cleanup::Dir(dir))
    }

    /// Creates the socket in the abstract namespace, under a name no other socket has
    /// (`reborn/<pid>/<random>`).
    #[cfg(reborn_linux)]
    pub fn new_abstract() -> io::Result<NotifyReceiver> {
        let (socket, address) = bind_abstract("reborn", UnixDatagram::bind_addr)?;
        NotifyReceiver::from_bound(socket, address, Cleanup::Nothing)
    }

    fn from_bound(
        socket: UnixDatagram,
        address: OsString,
        cleanup: Cleanup,
    ) -> io::Result<NotifyReceiver> {
        #[cfg(reborn_linux)]
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::PassCred, &true)?;
        socket.set_nonblocking(true)?;
        Ok(NotifyReceiver {
            socket: tokio::net::UnixDatagram::from_std(socket)?,
            address,
            cleanup,
        })
    }

    /// The value for the child's `NOTIFY_SOCKET`.
    pub fn address(&self) -> OsString {
        self.address.clone()
    }

    /// Waits for the next datagram from a process of this user (or root) and parses it.
    ///
    /// File descriptors that came with it (a `BARRIER=1`'s pipe, say) are closed before
    /// this returns, which releases a sender waiting on a barrier.
    pub async fn recv(&self) -> io::Result<NotifyMessage> {
        let mut buf = vec![0u8; 4096];
        loop {
            let datagram = self
                .socket
                .async_io(tokio::io::Interest::READABLE, || {
                    recv_with_sender(self.socket.as_raw_fd(), &mut buf)
                })
                .await?;
            if let Some(message) = accepted(datagram, &buf) {
                return Ok(message);
            }
        }
    }

    /// The datagrams already queued, without waiting: read from the socket itself, since
    /// the runtime may not have seen them arrive yet (a process that exits right after
    /// it sent one: its exit can be seen first).
    pub(crate) fn queued(&self) -> Vec<NotifyMessage> {
        let mut buf = vec![0u8; 4096];
        let mut messages = Vec::new();
        // Bounded: a sender cannot keep this busy.
        for _ in 0..64 {
            match recv_with_sender(self.socket.as_raw_fd(), &mut buf) {
                Ok(datagram) => messages.extend(accepted(datagram, &buf)),
                Err(_) => break,
            }
        }
        messages
    }

    /// Waits until a datagram carries `READY=1`, returning the last status seen with it.
    pub async fn wait_ready(&self) -> io::Result<NotifyMessage> {
        loop {
            let msg = self.recv().await?;
            if msg.ready {
                return Ok(msg);
            }
            if let Some(status) = &msg.status {
                tracing::info!(status = %status, "the new process reports");
            }
        }
    }
}

/// The message of a datagram from a process allowed to report, parsed; `None` (and a
/// warning) for one from another user, or without credentials where they are expected.
/// File descriptors that came with it are closed here, which releases a sender waiting
/// on a barrier.
fn accepted(datagram: Datagram, buf: &[u8]) -> Option<NotifyMessage> {
    let Datagram { len, sender, fds } = datagram;
    drop(fds);
    match sender {
        Some(s) if sender_allowed(s.uid) => Some(NotifyMessage::parse(&buf[..len])),
        Some(s) => {
            crate::log::warning!(
                "ignored a notify message from pid {}, a process of another user (uid {})",
                s.pid,
                s.uid
            );
            None
        }
        // No credentials here: the socket is in a directory only this user (and root)
        // can enter.
        #[cfg(not(reborn_linux))]
        None => Some(NotifyMessage::parse(&buf[..len])),
        #[cfg(reborn_linux)]
        None => {
            crate::log::warning!("ignored a notify message without its sender's credentials");
            None
        }
    }
}

/// Who sent a datagram, as the kernel says.
#[derive(Debug, Clone, Copy)]
#[cfg_attr(
    not(reborn_linux),
    allow(dead_code, reason = "credentials are Linux's")
)]
struct Sender {
    pid: i32,
    uid: u32,
}

/// Only this user (real or effective) and root may report.
fn sender_allowed(uid: u32) -> bool {
    uid == 0 || uid == nix::unistd::getuid().as_raw() || uid == nix::unistd::geteuid().as_raw()
}

/// One datagram as received.
struct Datagram {
    len: usize,
    sender: Option<Sender>,
    /// Descriptors that came with it, owned: closed when dropped.
    fds: Vec<OwnedFd>,
}

/// The most descriptors one datagram can carry (the kernel's `SCM_MAX_FD`).
const MAX_FDS_PER_DATAGRAM: usize = 253;

/// One non-blocking `recvmsg`, with the sender's credentials and any descriptors.
fn recv_with_sender(fd: RawFd, buf: &mut [u8]) -> io::Result<Datagram> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let mut iov = [io::IoSliceMut::new(buf)];
    // Room for the credentials and for as many descriptors as a datagram can carry: a
    // control buffer too small for them makes the kernel truncate it (MSG_CTRUNC), which
    // would lose the credentials' place and fail the read with ENOBUFS.
    #[cfg(reborn_linux)]
    let (mut space, flags) = (
        nix::cmsg_space!(
            nix::sys::socket::UnixCredentials,
            [RawFd; MAX_FDS_PER_DATAGRAM]
        ),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
    );
    // Not every system has MSG_CMSG_CLOEXEC: close-on-exec is set just after.
    #[cfg(not(reborn_linux))]
    let (mut space, flags) = (
        nix::cmsg_space!([RawFd; MAX_FDS_PER_DATAGRAM]),
        MsgFlags::MSG_DONTWAIT,
    );
    let msg = recvmsg::<()>(fd, &mut iov, Some(&mut space), flags)?;
    let len = msg.bytes;
    #[cfg_attr(not(reborn_linux), allow(unused_mut))]
    let mut sender = None;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs()? {
        match cmsg {
            #[cfg(reborn_linux)]
            ControlMessageOwned::ScmCredentials(c) => {
                sender = Some(Sender {
                    pid: c.pid(),
                    uid: c.uid(),
                });
            }
            ControlMessageOwned::ScmRights(received) => {
                // SAFETY: the kernel just installed these descriptors in this process
                // for this message (close-on-exec, by MSG_CMSG_CLOEXEC); nothing else
                // refers to them, so each is owned here and closed exactly once.
                fds.extend(
                    received
                        .into_iter()
                        .map(|raw| unsafe { OwnedFd::from_raw_fd(raw) }),
                );
                #[cfg(not(reborn_linux))]
                for fd in &fds {
                    let _ = nix::fcntl::fcntl(
                        fd,
                        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
                    );
                }
            }
            _ => {}
        }
    }
    Ok(Datagram { len, sender, fds })
}

/// Binds a socket with `bind` under a fresh name in the abstract namespace,
/// `PREFIX/<pid>/<random>`, and returns it with its address (`@…`, as `NOTIFY_SOCKET` and
/// `REBORN_HANDOFF_SOCKET` write it). A name already taken (by chance, or by someone
/// guessing) is drawn again, up to 8 times.
#[cfg(reborn_linux)]
pub(crate) fn bind_abstract<S>(
    prefix: &str,
    bind: impl Fn(&std::os::unix::net::SocketAddr) -> io::Result<S>,
) -> io::Result<(S, OsString)> {
    use std::os::linux::net::SocketAddrExt;
    let mut attempts = 0;
    loop {
        let name = format!("{prefix}/{}/{:016x}", std::process::id(), random_u64()?);
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        match bind(&addr) {
            Ok(socket) => return Ok((socket, format!("@{name}").into())),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && attempts < 8 => attempts += 1,
            Err(e) => return Err(e),
        }
    }
}

/// Eight random bytes from the kernel.
#[cfg(reborn_linux)]
fn random_u64() -> io::Result<u64> {
    let mut bytes = [0u8; 8];
    let mut filled = 0;
    while filled < bytes.len() {
        // SAFETY: getrandom writes at most the given length into the buffer.
        let n = unsafe {
            libc::getrandom(bytes[filled..].as_mut_ptr().cast(), bytes.len() - filled, 0)
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(u64::from_ne_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_dir_names() {
        assert_eq!(dir_owner("reborn-notify-77-1234-aB3xYz"), Some((77, 1234)));
        assert_eq!(dir_owner("reborn-1000"), None, "a control socket directory");
        assert_eq!(dir_owner("reborn-notify-1234-aB3xYz"), None);
        assert_eq!(dir_owner("reborn-notify-7-12x-abc"), None);
        assert_eq!(dir_owner("reborn-notify-7-12-"), None);
        assert_eq!(dir_owner("reborn-notify-7-12-a.b"), None);
        let dir = NotifyDir::new().unwrap();
        let name = dir
            .dir
            .path()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(
            dir_owner(&name),
            Some((pid_namespace(), std::process::id() as i32)),
            "{name}"
        );
    }

    #[test]
    fn parse_and_encode() {
        let m = NotifyMessage::parse(b"READY=1\nSTATUS=serving on :80\nMAINPID=42\nX=y\ngarbage");
        assert!(m.ready);
        assert_eq!(m.status.as_deref(), Some("serving on :80"));
        assert_eq!(m.main_pid, Some(42));
        let again = NotifyMessage::parse(m.encode().as_bytes());
        assert_eq!(again, m);
        assert!(!NotifyMessage::parse(b"READY=0").ready);
        assert!(NotifyMessage::parse(b"STOPPING=1").stopping);
    }

    #[tokio::test]
    async fn receive_from_path_socket() {
        use std::os::unix::fs::PermissionsExt;
        let rx = NotifyReceiver::new().unwrap();
        let dir = Path::new(&rx.address()).parent().unwrap().to_path_buf();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "private whatever the umask");
        send(&rx.address(), "STATUS=starting\n").unwrap();
        send(&rx.address(), "READY=1\n").unwrap();
        let m = rx.wait_ready().await.unwrap();
        assert!(m.ready);
        drop(rx);
        assert!(!dir.exists(), "the directory goes with the receiver");
    }

    #[cfg(reborn_linux)]
    #[tokio::test]
    async fn receive_from_abstract_socket() {
        let rx = NotifyReceiver::new_abstract().unwrap();
        let addr = rx.address();
        assert!(addr.as_bytes().starts_with(b"@reborn/"), "{addr:?}");
        // Nothing on disk.
        assert!(!Path::new(&addr).exists());
        send(&addr, "STATUS=starting\nMAINPID=7\n").unwrap();
        let m = rx.recv().await.unwrap();
        assert_eq!(m.main_pid, Some(7));
        send(&addr, "READY=1\n").unwrap();
        assert!(rx.wait_ready().await.unwrap().ready);
        // Each receiver has its own name.
        let other = NotifyReceiver::new_abstract().unwrap();
        assert_ne!(other.address(), addr);
    }

    /// `systemd-notify` (since 246) and `sd_notify_barrier()` send `BARRIER=1` with the
    /// write end of a pipe and wait for it to be closed. The datagram is read (not
    /// refused for its descriptor), the barrier is seen, and the pipe is closed.
    #[tokio::test]
    async fn a_barrier_is_read_and_its_descriptor_closed() {
        use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, sendmsg};
        use std::io::Read;
        #[cfg_attr(not(reborn_linux), allow(unused_mut))]
        let mut receivers = vec![NotifyReceiver::new().unwrap()];
        #[cfg(reborn_linux)]
        receivers.push(NotifyReceiver::new_abstract().unwrap());
        for rx in receivers {
            let addr = rx.address();
            send(&addr, "READY=1\n").unwrap();
            let (read_end, write_end) = nix::unistd::pipe().unwrap();
            let sock = UnixDatagram::unbound().unwrap();
            let to = match addr.as_bytes().strip_prefix(b"@") {
                Some(name) => UnixAddr::new_abstract(name).unwrap(),
                None => UnixAddr::new(Path::new(&addr)).unwrap(),
            };
            let fds = [write_end.as_raw_fd()];
            sendmsg(
                sock.as_raw_fd(),
                &[io::IoSlice::new(b"BARRIER=1\n")],
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::empty(),
                Some(&to),
            )
            .unwrap();
            drop(write_end);
            assert!(rx.recv().await.unwrap().ready);
            let m = rx
                .recv()
                .await
                .expect("a datagram with a descriptor is read");
            assert!(m.barrier);
            // The receiver closed its copy: the pipe reads end-of-file at once.
            let mut reader = std::fs::File::from(read_end);
            let mut byte = [0u8; 1];
            assert_eq!(reader.read(&mut byte).unwrap(), 0);
            // And the socket still works.
            send(&addr, "STATUS=after\n").unwrap();
            assert_eq!(rx.recv().await.unwrap().status.as_deref(), Some("after"));
        }
    }
}
