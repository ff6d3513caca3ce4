//! Errors, as enums whose messages say what went wrong and what to do about it.
//!
//! Every message names the thing at fault (the address, the variable, the file) so that a
//! log line alone is enough to act on.
//!
//! `Debug` prints the same message as `Display`, because `fn main() -> Result<(),
//! reborn::Error>` reports an error with `Debug`: a person starting the program reads
//! `Error: cannot listen on 127.0.0.1:8080: the address is already in use; …`, not a
//! struct. `{:#?}` shows the variant and its fields, for a developer.

use std::io;
use std::path::PathBuf;

/// What can go wrong while setting up or running a server with reborn.
///
/// Returned from `main`, it prints its message:
///
/// ```
/// let e = reborn::Error::AddrInUse { addr: "127.0.0.1:8080".into() };
/// assert!(format!("{e:?}").starts_with("cannot listen on 127.0.0.1:8080: the address is already in use;"));
/// assert!(format!("{e:#?}").starts_with("AddrInUse {"));
/// ```
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The application's readiness check failed
    /// ([`Builder::ready_check`](crate::Builder::ready_check)); the process did not
    /// report ready and stopped.
    #[error("the readiness check failed: {message}; this process did not report ready and stopped")]
    ReadyCheck {
        /// What the check said.
        message: String,
    },
    /// This process inherited listeners it did not ask for, so it did not report ready
    /// and stopped (see
    /// [`Builder::close_unclaimed_listeners`](crate::Builder::close_unclaimed_listeners)).
    #[error(
        "this process inherited {listeners}, which it did not ask for: serving without it would \
         leave that address to nobody once the previous generation exits; ask for it \
         (Reborn::listen or Reborn::listen_named, with that name or address) or, to move off \
         it on purpose, build with Builder::close_unclaimed_listeners(true); this process did \
         not report ready and stopped"
    )]
    UnclaimedListeners {
        /// The listeners, for people: `the listener "http" (127.0.0.1:8080)`.
        listeners: String,
    },
    /// An address that is neither `host:port` nor a Unix socket path.
    #[error(
        "{addr:?} is not a listen address: {reason}; write a TCP address as HOST:PORT \
         (e.g. 127.0.0.1:8080, [::1]:8080, :8080 for every interface) or a Unix socket \
         path (e.g. /run/app.sock, ./app.sock, unix:app.sock)"
    )]
    BadAddress {
        /// The address as given.
        addr: String,
        /// Why it does not parse.
        reason: String,
    },
    /// Another socket is already bound to the address.
    #[error(
        "cannot listen on {addr}: the address is already in use; another process listens \
         there (see `ss -ltnp` for TCP, `ss -lxp` for Unix sockets), stop it or choose \
         another address"
    )]
    AddrInUse {
        /// The address asked for.
        addr: String,
    },
    /// The process may not bind the address.
    #[error(
        "cannot listen on {addr}: permission denied; ports below 1024 need root or \
         CAP_NET_BIND_SERVICE, and a Unix socket needs a writable directory"
    )]
    PermissionDenied {
        /// The address asked for.
        addr: String,
    },
    /// Any other failure to create a listener.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address asked for.
        addr: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// An inherited socket does not fit what was asked for.
    #[error(
        "the inherited socket {name:?} (fd {fd}) is {found}, but a {wanted} listener was asked \
         for; fix the socket unit or the address the program asks for"
    )]
    InheritedMismatch {
        /// The name the socket was handed on under.
        name: String,
        /// Its file descriptor.
        fd: i32,
        /// What it is.
        found: String,
        /// What was asked for.
        wanted: String,
    },
    /// The socket-activation environment is malformed.
    #[error(transparent)]
    Activation(#[from] crate::activation::ActivationError),
    /// Starting, or handing over to, the next generation failed.
    #[error(transparent)]
    Upgrade(#[from] crate::upgrade::UpgradeError),
    /// Writing the PID file failed.
    #[error(
        "cannot write the PID file {path}: {source}; {}",
        pid_file_hint(source)
    )]
    PidFile {
        /// The PID file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// A [`Builder`](crate::Builder) setting that cannot work, and why.
    #[error("{0}")]
    Config(String),
    /// The tokio runtime could not be built or signal handlers could not be installed.
    #[error("cannot start the runtime: {0}")]
    Runtime(#[source] io::Error),
    /// Any other I/O failure, with what was being done.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
}

/// The message, as `Display` writes it; `{:#?}`: the variant and its fields.
impl std::fmt::Debug for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !f.alternate() {
            return std::fmt::Display::fmt(self, f);
        }
        match self {
            Error::ReadyCheck { message } => f
                .debug_struct("ReadyCheck")
                .field("message", message)
                .finish(),
            Error::UnclaimedListeners { listeners } => f
                .debug_struct("UnclaimedListeners")
                .field("listeners", listeners)
                .finish(),
            Error::BadAddress { addr, reason } => f
                .debug_struct("BadAddress")
                .field("addr", addr)
                .field("reason", reason)
                .finish(),
            Error::AddrInUse { addr } => f.debug_struct("AddrInUse").field("addr", addr).finish(),
            Error::PermissionDenied { addr } => f
                .debug_struct("PermissionDenied")
                .field("addr", addr)
                .finish(),
            Error::Listen { addr, source } => f
                .debug_struct("Listen")
                .field("addr", addr)
                .field("source", source)
                .finish(),
            Error::InheritedMismatch {
                name,
                fd,
                found,
                wanted,
            } => f
                .debug_struct("InheritedMismatch")
                .field("name", name)
                .field("fd", fd)
                .field("found", found)
                .field("wanted", wanted)
                .finish(),
            Error::Activation(e) => f.debug_tuple("Activation").field(e).finish(),
            Error::Upgrade(e) => f.debug_tuple("Upgrade").field(e).finish(),
            Error::PidFile { path, source } => f
                .debug_struct("PidFile")
                .field("path", path)
                .field("source", source)
                .finish(),
            Error::Config(m) => f.debug_tuple("Config").field(m).finish(),
            Error::Runtime(e) => f.debug_tuple("Runtime").field(e).finish(),
            Error::Io { what, source } => f
                .debug_struct("Io")
                .field("what", what)
                .field("source", source)
                .finish(),
        }
    }
}

impl Error {
    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

/// `Result` with reborn's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What to check when the PID file cannot be written.
fn pid_file_hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::ENOSPC | libc::EDQUOT) => "its file system is full (or over quota)",
        Some(libc::EMFILE | libc::ENFILE) => "out of file descriptors: raise `ulimit -n`",
        Some(libc::EISDIR) => "that path is a directory: give a file's path",
        Some(libc::EROFS) => "its file system is read-only",
        _ => "check that its directory exists and is writable",
    }
}
