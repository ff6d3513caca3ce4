//! Listening sockets: asked for by name and address, inherited when a predecessor or the
//! service manager passed them, bound otherwise; and the list handed on at an upgrade.
//!
//! A listener is found in this order:
//! 1. the inherited socket with the asked-for name (`LISTEN_FDNAMES`);
//! 2. failing that, an inherited socket bound to the asked-for address (hosts such as
//!    `systemd-socket-activate` give no names); a TCP address with port 0 matches an
//!    inherited socket on the same IP address, whatever its port;
//! 3. otherwise a new socket, bound with `SO_REUSEADDR` and a configurable backlog.
//!
//! Inherited sockets that nobody asks for are closed once the process is ready.

use std::fmt;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use socket2::{Domain, SockRef, Socket, Type};

use crate::activation::InheritedSocket;
use crate::error::{Error, Result};

/// The backlog of sockets reborn binds, unless configured: large enough for the burst of
/// connections that queue while one generation hands over to the next. The kernel caps
/// it at `net.core.somaxconn`.
pub const DEFAULT_BACKLOG: i32 = 4096;

/// Where to listen: a TCP address or a Unix socket path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A TCP address, with every address its host name resolved to.
    Tcp {
        /// The address as written.
        text: String,
        /// What it resolved to (at least one).
        addrs: Vec<SocketAddr>,
    },
    /// A Unix stream socket at this path.
    Unix(PathBuf),
}

impl ListenAddr {
    /// Parses `HOST:PORT` (`[::1]:80`, `localhost:8080`, and `:8080` for every IPv4
    /// interface), or a Unix socket path: `unix:PATH`, or anything with a `/` in it.
    ///
    /// ```
    /// use reborn::listeners::ListenAddr;
    /// assert!(matches!(ListenAddr::parse("127.0.0.1:8080"), Ok(ListenAddr::Tcp { .. })));
    /// assert!(matches!(ListenAddr::parse("/run/app.sock"), Ok(ListenAddr::Unix(_))));
    /// let err = ListenAddr::parse("127.0.0.1").unwrap_err();
    /// assert!(err.to_string().contains("no port"));
    /// ```
    pub fn parse(text: &str) -> Result<ListenAddr> {
        let bad = |reason: &str| Error::BadAddress {
            addr: text.to_owned(),
            reason: reason.to_owned(),
        };
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err(bad("it is empty"));
        }
        if let Some(path) = trimmed.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad("the Unix socket path is empty"));
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        if trimmed.contains('/') {
            return Ok(ListenAddr::Unix(PathBuf::from(trimmed)));
        }
        if let Ok(addr) = trimmed.parse::<SocketAddr>() {
            return Ok(ListenAddr::Tcp {
                text: trimmed.to_owned(),
                addrs: vec![addr],
            });
        }
        let Some((host, port)) = trimmed.rsplit_once(':') else {
            return Err(bad("it has no port"));
        };
        let port: u16 = port.parse().map_err(|_| {
            bad(&format!(
                "the port {port:?} is not a number from 0 to 65535"
            ))
        })?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let host = if host.is_empty() { "0.0.0.0" } else { host };
        let addrs: Vec<SocketAddr> = (host, port)
            .to_socket_addrs()
            .map_err(|e| bad(&format!("the host {host:?} does not resolve ({e})")))?
            .collect();
        if addrs.is_empty() {
            return Err(bad(&format!("the host {host:?} has no address")));
        }
        Ok(ListenAddr::Tcp {
            text: trimmed.to_owned(),
            addrs,
        })
    }

    fn kind(&self) -> &'static str {
        match self {
            ListenAddr::Tcp { .. } => "TCP",
            ListenAddr::Unix(_) => "Unix stream",
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp { text, .. } => f.write_str(text),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl std::str::FromStr for ListenAddr {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        ListenAddr::parse(s)
    }
}

/// A listening socket, inherited or newly bound, in non-blocking mode.
#[derive(Debug)]
pub struct Listener {
    socket: ListenerSocket,
    name: Option<String>,
    inherited: bool,
}

/// The socket inside a [`Listener`].
#[derive(Debug)]
pub enum ListenerSocket {
    /// A TCP listener.
    Tcp(std::net::TcpListener),
    /// A Unix stream listener.
    Unix(UnixListener),
}

impl Listener {
    /// The name it is handed on under, if any.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// Whether it came from the process that started this one.
    pub fn is_inherited(&self) -> bool {
        self.inherited
    }

    /// The address it is bound to, for logs and messages.
    pub fn local_addr(&self) -> String {
        match &self.socket {
            ListenerSocket::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "tcp:?".into()),
            ListenerSocket::Unix(l) => l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| format!("unix:{}", p.display())))
                .unwrap_or_else(|| "unix:?".into()),
        }
    }

    /// The TCP address, for a TCP listener.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        match &self.socket {
            ListenerSocket::Tcp(l) => l.local_addr().ok(),
            ListenerSocket::Unix(_) => None,
        }
    }

    /// The socket, for servers that bring their own accept loop. It is non-blocking:
    /// hand it to `tokio::net::TcpListener::from_std` (or `UnixListener::from_std`).
    pub fn into_socket(self) -> ListenerSocket {
        self.socket
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.socket {
            ListenerSocket::Tcp(l) => l.as_fd(),
            ListenerSocket::Unix(l) => l.as_fd(),
        }
    }
}

/// The listeners of this process: the inherited ones not yet claimed, and every one handed
/// out (a duplicate of each is kept to hand on at an upgrade).
#[derive(Debug, Default)]
pub(crate) struct ListenerSet {
    unclaimed: Vec<InheritedSocket>,
    handed: Vec<(OwnedFd, Option<String>)>,
    backlog: i32,
}

impl ListenerSet {
    pub(crate) fn new(inherited: Vec<InheritedSocket>, backlog: i32) -> Self {
        ListenerSet {
            unclaimed: inherited,
            handed: Vec::new(),
            backlog,
        }
    }

    /// Finds or binds the listener `name` at `addr`.
    pub(crate) fn listen(&mut self, name: Option<&str>, addr: &ListenAddr) -> Result<Listener> {
        if let Some(name) = name {
            crate::activation::validate_name(name)?;
            if self.handed.iter().any(|(_, n)| n.as_deref() == Some(name)) {
                return Err(Error::Listen {
                    addr: addr.to_string(),
                    source: io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!(
                            "a listener named {name:?} was already asked for; give each listener its own name"
                        ),
                    ),
                });
            }
        }
        let (socket, inherited, name) = match self.claim(name, addr)? {
            Some(found) => {
                let name = name.map(str::to_owned).or(found.name);
                (found.fd, true, name)
            }
            None => (bind(addr, self.backlog)?, false, name.map(str::to_owned)),
        };
        let keep = socket
            .try_clone()
            .map_err(|e| Error::io("cannot duplicate a listening socket", e))?;
        let socket = into_listener_socket(socket, addr)?;
        self.handed.push((keep, name.clone()));
        let listener = Listener {
            socket,
            name,
            inherited,
        };
        tracing::info!(
            addr = %listener.local_addr(),
            name = listener.name().unwrap_or(crate::activation::UNNAMED),
            inherited,
            "listening"
        );
        Ok(listener)
    }

    /// The addresses of the listeners handed out, for logs and status lines.
    pub(crate) fn addresses(&self) -> Vec<String> {
        self.handed
            .iter()
            .map(|(fd, _)| describe_addr(fd))
            .collect()
    }

    /// How many listeners were handed out.
    pub(crate) fn handed_count(&self) -> usize {
        self.handed.len()
    }

    /// The sockets to hand on, in order, with their names.
    pub(crate) fn handed(&self) -> impl Iterator<Item = (BorrowedFd<'_>, Option<String>)> {
        self.handed.iter().map(|(fd, n)| (fd.as_fd(), n.clone()))
    }

    /// Puts every listener back in non-blocking mode where another process cleared it
    /// (see [`ensure_nonblocking`]); `when` says at which moment, for the log.
    pub(crate) fn restore_nonblocking(&self, when: &str) {
        for (fd, _) in &self.handed {
            ensure_nonblocking(fd.as_fd(), when);
        }
    }

    /// The inherited sockets nobody asked for, for people: `the listener "http"
    /// (127.0.0.1:8080)`, `the listeners "a" (…), "b" (…)`; empty if there are none.
    pub(crate) fn describe_unclaimed(&self) -> String {
        let each: Vec<String> = self
            .unclaimed
            .iter()
            .map(|s| {
                format!(
                    "{:?} ({})",
                    s.name.as_deref().unwrap_or(crate::activation::UNNAMED),
                    describe_addr(&s.fd)
                )
            })
            .collect();
        match each.len() {
            0 => String::new(),
            1 => format!("the listener {}", each[0]),
            _ => format!("the listeners {}", each.join(", ")),
        }
    }

    /// Closes the inherited sockets nobody asked for (at ready, allowed by
    /// `Builder::close_unclaimed_listeners`, or at the end).
    pub(crate) fn close_unclaimed(&mut self) {
        let unclaimed = self.describe_unclaimed();
        if !unclaimed.is_empty() {
            crate::log::warning!(
                "closing {unclaimed}, inherited and not asked for: this process does not \
                 serve that address"
            );
        }
        self.unclaimed.clear();
    }

    /// Closes this process's copies of every listener (they stay open in other processes
    /// that hold them). Used on a final shutdown so that new connections are refused at
    /// once rather than queued for nobody.
    pub(crate) fn close_all(&mut self) {
        self.close_unclaimed();
        self.handed.clear();
    }

    fn claim(&mut self, name: Option<&str>, addr: &ListenAddr) -> Result<Option<InheritedSocket>> {
        let by_name = name.and_then(|n| {
            self.unclaimed
                .iter()
                .position(|s| s.name.as_deref() == Some(n))
        });
        let index = by_name.or_else(|| {
            self.unclaimed
                .iter()
                .position(|s| bound_to(&s.fd, addr) == Some(true))
        });
        let Some(index) = index else {
            return Ok(None);
        };
        let socket = self.unclaimed.remove(index);
        if bound_to(&socket.fd, addr).is_none() {
            let found = describe(&socket.fd);
            return Err(Error::InheritedMismatch {
                name: socket
                    .name
                    .unwrap_or_else(|| crate::activation::UNNAMED.into()),
                fd: std::os::fd::AsRawFd::as_raw_fd(&socket.fd),
                found,
                wanted: addr.kind().to_owned(),
            });
        }
        if bound_to(&socket.fd, addr) == Some(false) {
            tracing::info!(
                name = name.unwrap_or_default(),
                asked = %addr,
                bound = %describe(&socket.fd),
                "using the inherited socket of this name, bound elsewhere than asked"
            );
        }
        Ok(Some(socket))
    }
}

/// Makes a listening socket non-blocking again if it is not; true if it had to.
///
/// `O_NONBLOCK` belongs to the open file description, which every process that inherited
/// the socket shares: a new version that puts its copy in blocking mode (many runtimes
/// do, for a socket they did not create) puts this process's copy in blocking mode too,
/// and a later `accept(2)` with nothing queued would then hang a runtime thread; the
/// drain would never end. So after a failed or rolled-back upgrade, and when a drain
/// starts, each listener is checked, and mended with a warning.
pub(crate) fn ensure_nonblocking(fd: BorrowedFd<'_>, when: &str) -> bool {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = match fcntl(fd, FcntlArg::F_GETFL) {
        Ok(bits) => OFlag::from_bits_retain(bits),
        Err(e) => {
            tracing::debug!("cannot read the flags of a listening socket: {e}");
            return false;
        }
    };
    if flags.contains(OFlag::O_NONBLOCK) {
        return false;
    }
    let addr = describe_addr(&fd);
    match fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)) {
        Ok(_) => {
            crate::log::warning!(
                "the listener on {addr} had been put in blocking mode by another process that \
                 shares it (a new version that failed?); made it non-blocking again {when}"
            );
            true
        }
        Err(e) => {
            crate::log::error!(
                "the listener on {addr} is in blocking mode (set by another process that shares \
                 it) and cannot be made non-blocking again ({e}): accepts may hang"
            );
            false
        }
    }
}

/// Whether an inherited socket is bound to `addr`: `None` if it is of another kind,
/// `Some(false)` if it is of the right kind but bound elsewhere.
fn bound_to(fd: &OwnedFd, addr: &ListenAddr) -> Option<bool> {
    let local = SockRef::from(fd).local_addr().ok()?;
    match addr {
        ListenAddr::Tcp { addrs, .. } => {
            let local = local.as_socket()?;
            Some(
                addrs
                    .iter()
                    .any(|want| *want == local || (want.port() == 0 && want.ip() == local.ip())),
            )
        }
        ListenAddr::Unix(path) => {
            if !local.is_unix() {
                return None;
            }
            let bound = local.as_pathname()?;
            Some(same_path(bound, path))
        }
    }
}

fn same_path(a: &Path, b: &Path) -> bool {
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    abs(a) == abs(b)
}

fn describe_addr(fd: &impl AsFd) -> String {
    match SockRef::from(fd).local_addr() {
        Ok(a) => match (a.as_socket(), a.as_pathname()) {
            (Some(s), _) => s.to_string(),
            (None, Some(p)) => format!("unix:{}", p.display()),
            _ => "?".into(),
        },
        Err(_) => "?".into(),
    }
}

fn describe(fd: &OwnedFd) -> String {
    let sock = SockRef::from(fd);
    match sock.local_addr() {
        Ok(a) if a.as_socket().is_some() => {
            format!(
                "a TCP socket on {}",
                a.as_socket().map(|s| s.to_string()).unwrap_or_default()
            )
        }
        Ok(a) if a.is_unix() => format!(
            "a Unix socket at {}",
            a.as_pathname()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "(unnamed)".into())
        ),
        _ => "a socket of another kind".into(),
    }
}

fn into_listener_socket(fd: OwnedFd, addr: &ListenAddr) -> Result<ListenerSocket> {
    let set_nonblocking =
        |r: io::Result<()>| r.map_err(|e| Error::io("cannot make a listener non-blocking", e));
    Ok(match addr {
        ListenAddr::Tcp { .. } => {
            let l = std::net::TcpListener::from(fd);
            set_nonblocking(l.set_nonblocking(true))?;
            ListenerSocket::Tcp(l)
        }
        ListenAddr::Unix(_) => {
            let l = UnixListener::from(fd);
            set_nonblocking(l.set_nonblocking(true))?;
            ListenerSocket::Unix(l)
        }
    })
}

fn bind_error(addr: &ListenAddr, e: io::Error) -> Error {
    let addr = addr.to_string();
    match e.kind() {
        io::ErrorKind::AddrInUse => Error::AddrInUse { addr },
        io::ErrorKind::PermissionDenied => Error::PermissionDenied { addr },
        io::ErrorKind::AddrNotAvailable => Error::Listen {
            addr,
            source: io::Error::new(
                e.kind(),
                "the address is not one of this machine's; use 0.0.0.0 for every interface",
            ),
        },
        _ => Error::Listen { addr, source: e },
    }
}

/// Binds a new listening socket (close-on-exec, `SO_REUSEADDR`).
pub fn bind(addr: &ListenAddr, backlog: i32) -> Result<OwnedFd> {
    match addr {
        ListenAddr::Tcp { addrs, .. } => {
            let mut last = None;
            for sa in addrs {
                match bind_tcp(*sa, backlog) {
                    Ok(s) => return Ok(s.into()),
                    Err(e) => last = Some(e),
                }
            }
            Err(bind_error(
                addr,
                last.unwrap_or_else(|| io::Error::other("no address to bind")),
            ))
        }
        ListenAddr::Unix(path) => bind_unix(path, backlog)
            .map(OwnedFd::from)
            .map_err(|e| bind_error(addr, e)),
    }
}

fn bind_tcp(addr: SocketAddr, backlog: i32) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    Ok(socket)
}

fn bind_unix(path: &Path, backlog: i32) -> io::Result<Socket> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket; remove it or choose another path",
            ));
        }
        // A socket file: in use if something accepts on it, stale otherwise.
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(io::Error::from(io::ErrorKind::AddrInUse)),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!(path = %path.display(), "removing a stale socket file");
                std::fs::remove_file(path)?;
            }
            Err(e) => return Err(e),
        }
    }
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    socket.bind(&socket2::SockAddr::unix(path)?)?;
    socket.listen(backlog)?;
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses() {
        let a = ListenAddr::parse(":8080").unwrap();
        assert!(
            matches!(&a, ListenAddr::Tcp { addrs, .. } if addrs[0].to_string() == "0.0.0.0:8080")
        );
        assert!(matches!(
            ListenAddr::parse("[::1]:80").unwrap(),
            ListenAddr::Tcp { .. }
        ));
        assert!(matches!(
            ListenAddr::parse("localhost:0").unwrap(),
            ListenAddr::Tcp { .. }
        ));
        assert!(
            matches!(ListenAddr::parse("unix:x.sock").unwrap(), ListenAddr::Unix(p) if p == Path::new("x.sock"))
        );
        for bad in ["", "8080", "1.2.3.4:99999", "host:abc", "unix:"] {
            let e = ListenAddr::parse(bad).unwrap_err();
            assert!(e.to_string().contains("is not a listen address"), "{e}");
        }
    }

    #[test]
    fn port_in_use_is_named() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = ListenAddr::parse(&taken.local_addr().unwrap().to_string()).unwrap();
        // SO_REUSEADDR does not allow two listeners on one port.
        let e = bind(&addr, 16).unwrap_err();
        assert!(matches!(e, Error::AddrInUse { .. }), "{e}");
        assert!(e.to_string().contains("already in use"));
    }

    #[test]
    fn inherited_by_name_then_address() {
        let a = bind(&ListenAddr::parse("127.0.0.1:0").unwrap(), 16).unwrap();
        let b = bind(&ListenAddr::parse("127.0.0.1:0").unwrap(), 16).unwrap();
        let b_addr = SockRef::from(&b).local_addr().unwrap().as_socket().unwrap();
        let mut set = ListenerSet::new(
            vec![
                InheritedSocket {
                    fd: a,
                    name: Some("http".into()),
                },
                InheritedSocket { fd: b, name: None },
            ],
            16,
        );
        let by_addr = set
            .listen(
                Some("admin"),
                &ListenAddr::parse(&b_addr.to_string()).unwrap(),
            )
            .unwrap();
        assert!(by_addr.is_inherited());
        assert_eq!(by_addr.tcp_addr(), Some(b_addr));
        let by_name = set
            .listen(Some("http"), &ListenAddr::parse("127.0.0.1:0").unwrap())
            .unwrap();
        assert!(by_name.is_inherited());
        let fresh = set
            .listen(Some("other"), &ListenAddr::parse("127.0.0.1:0").unwrap())
            .unwrap();
        assert!(!fresh.is_inherited());
        assert_eq!(set.handed_count(), 3);
        let wrong = set.listen(Some("http"), &ListenAddr::parse("127.0.0.1:0").unwrap());
        assert!(wrong.is_err(), "a name is handed out once");
    }

    #[test]
    fn unix_socket_stale_and_kind_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let addr = ListenAddr::Unix(path.clone());
        drop(bind(&addr, 16).unwrap()); // leaves a stale file
        let live = bind(&addr, 16).unwrap();
        assert!(matches!(bind(&addr, 16), Err(Error::AddrInUse { .. })));
        let mut set = ListenerSet::new(
            vec![InheritedSocket {
                fd: live,
                name: Some("web".into()),
            }],
            16,
        );
        let e = set
            .listen(Some("web"), &ListenAddr::parse("127.0.0.1:0").unwrap())
            .unwrap_err();
        assert!(matches!(e, Error::InheritedMismatch { .. }), "{e}");
    }
}
