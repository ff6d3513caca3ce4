//! systemd's socket-activation and notify environment: parsing, encoding, and taking it
//! from this process.
//!
//! Every host that starts a reborn worker (systemd, `systemd-socket-activate`, the reborn
//! master, or the previous generation of the same server) speaks one protocol:
//!
//! * listening sockets at file descriptors 3, 4, …, announced by `LISTEN_FDS=<n>`,
//!   `LISTEN_PID=<pid of the receiving process>` and, optionally,
//!   `LISTEN_FDNAMES=<name>:<name>…`;
//! * a Unix datagram socket named by `NOTIFY_SOCKET` to which the worker reports
//!   `READY=1` (and `STATUS=…`, `STOPPING=1`, …).
//!
//! The parsing here is pure (no environment, no file descriptors) so that it can be
//! tested and fuzzed on its own; [`take_from_env`] applies it to this process once.

use std::ffi::OsString;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

/// The first file descriptor of the inherited sockets (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;
/// The most sockets reborn accepts from `LISTEN_FDS`; a larger number is surely garbage.
pub const MAX_LISTEN_FDS: usize = 4096;
/// The name systemd gives a socket that has none.
pub const UNNAMED: &str = "unknown";

/// `LISTEN_PID`: the process the sockets are meant for.
pub const ENV_LISTEN_PID: &str = "LISTEN_PID";
/// `LISTEN_FDS`: how many sockets start at fd 3.
pub const ENV_LISTEN_FDS: &str = "LISTEN_FDS";
/// `LISTEN_FDNAMES`: their names, separated by `:`.
pub const ENV_LISTEN_FDNAMES: &str = "LISTEN_FDNAMES";
/// `NOTIFY_SOCKET`: where to report readiness.
pub const ENV_NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
/// reborn's own addition, set by a self-upgrade: the service manager's notify socket,
/// which the new process must tell that it is now the main process (empty when there is
/// no service manager).
pub const ENV_UPSTREAM_NOTIFY: &str = "REBORN_UPSTREAM_NOTIFY_SOCKET";
/// reborn's own addition: set by the reborn master to its PID. A worker that sees it leaves
/// upgrades to the master.
pub const ENV_MASTER_PID: &str = "REBORN_MASTER_PID";
/// reborn's own addition: set by a self-upgrade to the previous generation's handoff
/// socket, on which it hands over its idle keep-alive connections (see
/// [`Builder::hand_over_idle_connections`](crate::Builder::hand_over_idle_connections)).
pub const ENV_HANDOFF: &str = "REBORN_HANDOFF_SOCKET";
/// reborn's own addition: set by the reborn master to the probation of each new worker
/// (ms). A worker being replaced keeps its idle connections that long before it hands
/// them to the new worker: should that one die on probation, they lose nothing.
pub const ENV_MASTER_PROBATION: &str = "REBORN_MASTER_PROBATION_MS";

/// The variables this module consumes; they are never handed on as they were.
pub const CONSUMED_VARS: [&str; 8] = [
    ENV_LISTEN_PID,
    ENV_LISTEN_FDS,
    ENV_LISTEN_FDNAMES,
    ENV_NOTIFY_SOCKET,
    ENV_UPSTREAM_NOTIFY,
    ENV_MASTER_PID,
    ENV_HANDOFF,
    ENV_MASTER_PROBATION,
];

/// A malformed socket-activation environment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ActivationError {
    /// `LISTEN_PID` is not a process ID.
    #[error(
        "LISTEN_PID={0:?} is not a process ID; whatever started this program set up socket \
         activation wrongly (unset LISTEN_PID and LISTEN_FDS to bind sockets instead)"
    )]
    BadPid(String),
    /// `LISTEN_FDS` is not a count of file descriptors.
    #[error(
        "LISTEN_FDS={0:?} is not a number of file descriptors (expected 0 to {MAX_LISTEN_FDS}); \
         whatever started this program set up socket activation wrongly (unset LISTEN_FDS \
         to bind sockets instead)"
    )]
    BadCount(String),
    /// `LISTEN_FDNAMES` names a different number of sockets than `LISTEN_FDS` announces.
    #[error(
        "LISTEN_FDNAMES={names:?} names {named} socket(s) but LISTEN_FDS={count}; the two must \
         match (fix the socket unit or the program that starts this one)"
    )]
    NameCount {
        /// The variable's value.
        names: String,
        /// How many names it holds.
        named: usize,
        /// `LISTEN_FDS`.
        count: usize,
    },
    /// A listener name that systemd would refuse.
    #[error(
        "{0:?} is not a valid socket name: use 1 to 255 printable ASCII characters without ':'"
    )]
    BadName(String),
    /// An announced file descriptor is not an open socket.
    #[error(
        "LISTEN_FDS announces fd {fd} but it is {found}; whatever started this program passed \
         the wrong file descriptors"
    )]
    NotASocket {
        /// The file descriptor.
        fd: RawFd,
        /// What it is instead.
        found: String,
    },
    /// An announced socket is not a listening stream socket.
    #[error(
        "the inherited socket {name:?} (fd {fd}) is not listening ({found}); pass listening \
         stream sockets (ListenStream= in a systemd socket unit)"
    )]
    NotListening {
        /// Its name.
        name: String,
        /// The file descriptor.
        fd: RawFd,
        /// What it is instead.
        found: String,
    },
    /// A variable is not valid UTF-8.
    #[error("{0} is not valid UTF-8")]
    NotUtf8(&'static str),
}

/// The socket-activation variables, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenFds {
    /// One entry per file descriptor from 3; `None` where no name was given (or `unknown`).
    pub names: Vec<Option<String>>,
}

impl ListenFds {
    /// How many sockets were announced.
    pub fn count(&self) -> usize {
        self.names.len()
    }
}

/// Why the socket-activation variables were ignored rather than used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ignored {
    /// `LISTEN_FDS` or `LISTEN_PID` is unset: nothing was passed.
    Absent,
    /// `LISTEN_PID` names another process: the variables were inherited by accident.
    OtherPid(u32),
}

/// Parses the three `LISTEN_*` variables as `sd_listen_fds(3)` does, strictly.
///
/// Returns `Ok(Err(Ignored))` when the variables do not apply to the process `own_pid`
/// (unset, or meant for another process) and an error when they are malformed.
pub fn parse_listen_fds(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    listen_fdnames: Option<&str>,
    own_pid: u32,
) -> Result<Result<ListenFds, Ignored>, ActivationError> {
    let (Some(pid), Some(fds)) = (listen_pid, listen_fds) else {
        return Ok(Err(Ignored::Absent));
    };
    let pid_num: u32 = pid
        .trim()
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| ActivationError::BadPid(pid.to_owned()))?;
    if pid_num != own_pid {
        return Ok(Err(Ignored::OtherPid(pid_num)));
    }
    let count: usize = fds
        .trim()
        .parse()
        .ok()
        .filter(|n| *n <= MAX_LISTEN_FDS)
        .ok_or_else(|| ActivationError::BadCount(fds.to_owned()))?;
    let names = match listen_fdnames {
        None => vec![None; count],
        Some(list) => {
            let parts: Vec<&str> = if list.is_empty() {
                Vec::new()
            } else {
                list.split(':').collect()
            };
            if parts.len() != count {
                return Err(ActivationError::NameCount {
                    names: list.to_owned(),
                    named: parts.len(),
                    count,
                });
            }
            parts
                .into_iter()
                .map(|name| {
                    validate_name(name)?;
                    Ok((name != UNNAMED).then(|| name.to_owned()))
                })
                .collect::<Result<_, _>>()?
        }
    };
    Ok(Ok(ListenFds { names }))
}

/// Checks a socket name as systemd does (`fdname_is_valid`): 1 to 255 printable ASCII
/// characters, no `:`.
pub fn validate_name(name: &str) -> Result<(), ActivationError> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b':');
    if ok {
        Ok(())
    } else {
        Err(ActivationError::BadName(name.to_owned()))
    }
}

/// Encodes names for `LISTEN_FDNAMES`; unnamed sockets become `unknown`.
pub fn encode_names<'a>(names: impl IntoIterator<Item = Option<&'a str>>) -> String {
    names
        .into_iter()
        .map(|n| n.unwrap_or(UNNAMED))
        .collect::<Vec<_>>()
        .join(":")
}

/// A socket handed to this process by socket activation.
#[derive(Debug)]
pub struct InheritedSocket {
    /// The socket; close-on-exec is set.
    pub fd: OwnedFd,
    /// Its name, if it was given one.
    pub name: Option<String>,
}

/// What this process was given by whatever started it: sockets, and where to report.
#[derive(Debug, Default)]
pub struct ProcessEnv {
    /// Sockets from `LISTEN_FDS`, in order.
    pub sockets: Vec<InheritedSocket>,
    /// `NOTIFY_SOCKET`: the process that waits for this one to be ready.
    pub notify_socket: Option<OsString>,
    /// The service manager's notify socket when this process was started by a
    /// self-upgrade under one (reborn's own variable).
    pub upstream_notify_socket: Option<OsString>,
    /// Whether this process was started by a self-upgrade: then `NOTIFY_SOCKET` is the
    /// previous generation's, and the service manager's (if any) is
    /// `upstream_notify_socket`.
    pub started_by_upgrade: bool,
    /// The reborn master's PID when this process runs under one.
    pub master_pid: Option<u32>,
    /// The previous generation's handoff socket (`REBORN_HANDOFF_SOCKET`), when a
    /// self-upgrade or the reborn master started this process.
    pub handoff_socket: Option<OsString>,
    /// The reborn master's probation of new workers (`REBORN_MASTER_PROBATION_MS`).
    pub master_probation: Option<std::time::Duration>,
    /// Why `LISTEN_*` were not used, when they were not.
    pub ignored: Option<Ignored>,
}

static TAKEN: Mutex<bool> = Mutex::new(false);

/// Takes this process's socket-activation and notify environment, once.
///
/// The inherited sockets are checked (each must be an open listening stream socket),
/// marked close-on-exec and owned by the result. The variables are removed from the
/// environment when that is sound, that is while the process has a single thread (call
/// [`crate::init`] first thing in `main` to make sure of it); otherwise they are left in
/// place, and reborn never hands them on to the processes it starts.
///
/// A second call returns an empty [`ProcessEnv`]: the sockets have one owner.
pub fn take_from_env() -> Result<ProcessEnv, ActivationError> {
    let mut taken = TAKEN.lock().unwrap_or_else(|e| e.into_inner());
    if *taken {
        return Ok(ProcessEnv::default());
    }
    *taken = true;
    let get = |name: &'static str| -> Result<Option<String>, ActivationError> {
        match std::env::var_os(name) {
            None => Ok(None),
            Some(v) => v
                .into_string()
                .map(Some)
                .map_err(|_| ActivationError::NotUtf8(name)),
        }
    };
    let listen_pid = get(ENV_LISTEN_PID)?;
    let listen_fds = get(ENV_LISTEN_FDS)?;
    let listen_fdnames = get(ENV_LISTEN_FDNAMES)?;
    let notify_socket = std::env::var_os(ENV_NOTIFY_SOCKET).filter(|s| !s.is_empty());
    let upstream = std::env::var_os(ENV_UPSTREAM_NOTIFY);
    let started_by_upgrade = upstream.is_some();
    let upstream_notify_socket = upstream.filter(|s| !s.is_empty());
    let master_pid = get(ENV_MASTER_PID)?.and_then(|p| p.trim().parse().ok());
    let handoff_socket = std::env::var_os(ENV_HANDOFF).filter(|s| !s.is_empty());
    let master_probation = get(ENV_MASTER_PROBATION)?
        .and_then(|ms| ms.trim().parse().ok())
        .map(std::time::Duration::from_millis);
    clear_consumed_vars();
    let parent = nix::unistd::getppid().as_raw() as u32;
    let master_pid = master_pid.filter(|&m| {
        let trusted = notify_socket
            .as_deref()
            .is_some_and(|s| made_by_master(s, m));
        if !trusted {
            crate::log::warning!(
                "{ENV_MASTER_PID}={m} is ignored: NOTIFY_SOCKET is not one that a reborn \
                 master with that PID made for its workers (a variable handed on from another \
                 environment?); this process upgrades itself on SIGHUP"
            );
        }
        trusted
    });
    let (started_by_upgrade, upstream_notify_socket) = if started_by_upgrade
        && !notify_socket
            .as_deref()
            .is_some_and(|s| made_by_upgrade(s, parent))
    {
        crate::log::warning!(
            "{ENV_UPSTREAM_NOTIFY} is ignored: this process was not started by a reborn \
             upgrade (NOTIFY_SOCKET is not its parent's, pid {parent}); a variable handed on \
             from another environment?"
        );
        (false, None)
    } else {
        (started_by_upgrade, upstream_notify_socket)
    };

    let parsed = parse_listen_fds(
        listen_pid.as_deref(),
        listen_fds.as_deref(),
        listen_fdnames.as_deref(),
        std::process::id(),
    )?;
    let (sockets, ignored) = match parsed {
        Err(ignored) => (Vec::new(), Some(ignored)),
        Ok(fds) => {
            // Close-on-exec first, for the whole range: should one of them fail the
            // checks below, none may leak into the processes this one starts.
            for raw in LISTEN_FDS_START..LISTEN_FDS_START + fds.count() as RawFd {
                // SAFETY: F_SETFD on any integer is harmless; an fd that is not open
                // yields EBADF, reported by the checks below.
                unsafe { libc::fcntl(raw, libc::F_SETFD, libc::FD_CLOEXEC) };
            }
            let mut sockets = Vec::with_capacity(fds.count());
            for (i, name) in fds.names.into_iter().enumerate() {
                let raw = LISTEN_FDS_START + i as RawFd;
                check_listening_socket(raw, name.as_deref())?;
                // SAFETY: `raw` is an open socket (checked with fstat just above), passed to
                // this process by the socket-activation protocol, which hands over its
                // ownership; the `TAKEN` flag makes sure it is wrapped only once.
                let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                sockets.push(InheritedSocket { fd, name });
            }
            (sockets, None)
        }
    };
    Ok(ProcessEnv {
        sockets,
        notify_socket,
        upstream_notify_socket,
        started_by_upgrade,
        master_pid,
        // Only from the previous generation, which made this process's notify socket,
        // or from the reborn master, which did.
        handoff_socket: handoff_socket.filter(|_| started_by_upgrade || master_pid.is_some()),
        master_probation: master_probation.filter(|_| master_pid.is_some()),
        ignored,
    })
}

/// Whether `notify_socket` is one that the reborn master with PID `master` made for its
/// workers: `DIR/reborn-notify-NS-MASTER-RANDOM/NAME`, in this PID namespace.
pub fn made_by_master(notify_socket: &std::ffi::OsStr, master: u32) -> bool {
    in_private_dir_of(notify_socket, master)
}

/// Whether `notify_socket` is one that a reborn process with PID `parent` made for the
/// new process of its self-upgrade: on Linux the abstract `@reborn/PARENT/RANDOM`; on
/// the portable path (other systems, the `portable` feature) a socket in the parent's
/// private directory, `DIR/reborn-notify-NS-PARENT-RANDOM/notify`. Either is accepted
/// whichever path this build takes: the parent may have been built the other way.
pub fn made_by_upgrade(notify_socket: &std::ffi::OsStr, parent: u32) -> bool {
    let abstract_name = notify_socket
        .to_str()
        .and_then(|s| s.strip_prefix("@reborn/"))
        .and_then(|rest| rest.split_once('/'))
        .is_some_and(|(pid, random)| pid == parent.to_string() && !random.is_empty());
    abstract_name || in_private_dir_of(notify_socket, parent)
}

/// Whether `notify_socket` is in a notify directory made by the process `pid` of this
/// PID namespace (`DIR/reborn-notify-NS-PID-RANDOM/NAME`).
fn in_private_dir_of(notify_socket: &std::ffi::OsStr, pid: u32) -> bool {
    let path = std::path::Path::new(notify_socket);
    path.parent()
        .and_then(|dir| dir.file_name())
        .and_then(|name| name.to_str())
        .and_then(crate::notify::dir_owner)
        .is_some_and(|(ns, owner)| {
            i64::from(owner) == i64::from(pid) && ns == crate::notify::pid_namespace()
        })
}

/// Removes the consumed variables when the process is single-threaded (the only time
/// `remove_var` is sound).
fn clear_consumed_vars() {
    if thread_count() != Some(1) {
        tracing::debug!(
            "more than one thread is running: the socket-activation variables stay in the \
             environment (reborn does not hand them on)"
        );
        return;
    }
    for name in CONSUMED_VARS {
        // SAFETY: the process has a single thread (checked just above through
        // /proc/self/task), so nothing can read the environment concurrently.
        unsafe { std::env::remove_var(name) };
    }
}

/// The number of threads of this process, from `/proc/self/task`.
fn thread_count() -> Option<usize> {
    std::fs::read_dir("/proc/self/task")
        .ok()
        .map(|dir| dir.count())
}

fn check_listening_socket(raw: RawFd, name: Option<&str>) -> Result<(), ActivationError> {
    let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat only writes into the provided buffer; an invalid fd yields EBADF.
    let rc = unsafe { libc::fstat(raw, stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(ActivationError::NotASocket {
            fd: raw,
            found: "not an open file descriptor".into(),
        });
    }
    // SAFETY: fstat succeeded, so it initialised the buffer.
    let mode = unsafe { stat.assume_init() }.st_mode & libc::S_IFMT;
    if mode != libc::S_IFSOCK {
        let found = match mode {
            libc::S_IFREG => "a regular file",
            libc::S_IFDIR => "a directory",
            libc::S_IFIFO => "a pipe",
            libc::S_IFCHR => "a character device (a terminal or /dev/null?)",
            _ => "not a socket",
        };
        return Err(ActivationError::NotASocket {
            fd: raw,
            found: found.into(),
        });
    }
    // SAFETY: `raw` is open (fstat succeeded just above) and nothing closes it while this
    // function runs; the borrow does not leave the function.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(raw) };
    let sock_type = nix::sys::socket::getsockopt(&borrowed, nix::sys::socket::sockopt::SockType);
    let listening = nix::sys::socket::getsockopt(&borrowed, nix::sys::socket::sockopt::AcceptConn)
        .unwrap_or(false);
    let name = name.unwrap_or(UNNAMED).to_owned();
    match sock_type {
        Ok(nix::sys::socket::SockType::Stream) if listening => Ok(()),
        Ok(nix::sys::socket::SockType::Stream) => Err(ActivationError::NotListening {
            name,
            fd: raw,
            found: "a stream socket that is not listening (a connection?)".into(),
        }),
        Ok(other) => Err(ActivationError::NotListening {
            name,
            fd: raw,
            found: format!("a {other:?} socket, not a stream socket"),
        }),
        Err(e) => Err(ActivationError::NotListening {
            name,
            fd: raw,
            found: format!("a socket whose type cannot be read ({e})"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_master_and_upgrade_variables_are_trusted_only_beside_their_notify_socket() {
        let ns = crate::notify::pid_namespace();
        let ours = format!("/run/user/0/reborn-notify-{ns}-4242-aB3x/worker-1");
        assert!(made_by_master(ours.as_ref(), 4242));
        assert!(!made_by_master(ours.as_ref(), 4243), "another master's PID");
        let other_ns = format!("/tmp/reborn-notify-{}-4242-aB3x/worker-1", ns + 1);
        assert!(
            !made_by_master(other_ns.as_ref(), 4242),
            "another PID namespace"
        );
        assert!(!made_by_master("/run/systemd/notify".as_ref(), 1));
        assert!(made_by_upgrade("@reborn/77/00ff".as_ref(), 77));
        assert!(!made_by_upgrade("@reborn/77/00ff".as_ref(), 7));
        assert!(!made_by_upgrade("@reborn/77/".as_ref(), 77));
        assert!(!made_by_upgrade("/run/systemd/notify".as_ref(), 77));
        // The portable path's socket, in the parent's private directory.
        let portable = format!("/tmp/reborn-notify-{ns}-77-Qz9k/notify");
        assert!(made_by_upgrade(portable.as_ref(), 77));
        assert!(!made_by_upgrade(portable.as_ref(), 78), "another parent");
        let other_ns = format!("/tmp/reborn-notify-{}-77-Qz9k/notify", ns + 1);
        assert!(
            !made_by_upgrade(other_ns.as_ref(), 77),
            "another PID namespace"
        );
    }

    #[test]
    fn absent_and_foreign() {
        assert_eq!(
            parse_listen_fds(None, None, None, 7).unwrap(),
            Err(Ignored::Absent)
        );
        assert_eq!(
            parse_listen_fds(None, Some("2"), None, 7).unwrap(),
            Err(Ignored::Absent)
        );
        assert_eq!(
            parse_listen_fds(Some("8"), Some("2"), None, 7).unwrap(),
            Err(Ignored::OtherPid(8))
        );
    }

    #[test]
    fn counts_and_names() {
        let got = parse_listen_fds(Some("7"), Some("2"), Some("http:unknown"), 7)
            .unwrap()
            .unwrap();
        assert_eq!(got.names, vec![Some("http".to_owned()), None]);
        let got = parse_listen_fds(Some("7"), Some("3"), None, 7)
            .unwrap()
            .unwrap();
        assert_eq!(got.names, vec![None, None, None]);
        let got = parse_listen_fds(Some("7"), Some("0"), Some(""), 7)
            .unwrap()
            .unwrap();
        assert_eq!(got.count(), 0);
    }

    #[test]
    fn garbage_is_named() {
        let e = parse_listen_fds(Some("7"), Some("abc"), None, 7).unwrap_err();
        assert_eq!(e, ActivationError::BadCount("abc".into()));
        assert!(e.to_string().contains("LISTEN_FDS=\"abc\""), "{e}");
        assert!(parse_listen_fds(Some("7"), Some("-1"), None, 7).is_err());
        assert!(parse_listen_fds(Some("7"), Some("99999999"), None, 7).is_err());
        assert!(parse_listen_fds(Some("x"), Some("1"), None, 7).is_err());
        assert!(parse_listen_fds(Some("0"), Some("1"), None, 7).is_err());
        let e = parse_listen_fds(Some("7"), Some("2"), Some("a"), 7).unwrap_err();
        assert!(matches!(
            e,
            ActivationError::NameCount {
                named: 1,
                count: 2,
                ..
            }
        ));
        assert!(parse_listen_fds(Some("7"), Some("1"), Some("bad\u{1}"), 7).is_err());
    }

    #[test]
    fn names_round_trip() {
        let s = encode_names([Some("http"), None, Some("admin")]);
        assert_eq!(s, "http:unknown:admin");
        let got = parse_listen_fds(Some("1"), Some("3"), Some(&s), 1)
            .unwrap()
            .unwrap();
        assert_eq!(
            got.names,
            vec![Some("http".into()), None, Some("admin".into())]
        );
        assert!(validate_name("a:b").is_err());
        assert!(validate_name("").is_err());
        assert!(validate_name(&"x".repeat(256)).is_err());
    }
}
