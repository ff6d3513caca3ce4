//! Starting a process with listening sockets at fds 3, 4, … and `LISTEN_PID` set to its
//! own PID.
//!
//! Between `fork` and `exec` only async-signal-safe calls are allowed (the parent may be a
//! multi-threaded tokio process: another thread could hold the allocator's lock). So
//! everything is built before the fork: the argument and environment arrays, a
//! fixed-width placeholder for `LISTEN_PID`, and a slot for each temporary fd. The child
//! then only calls `fcntl`, `dup2`, `close`, `getpid`, `prctl`, `getppid` and `execve`,
//! and writes digits into memory it already owns.
//!
//! Two ways to start it, one plan:
//!
//! * [`SpawnSpec::command`] gives a [`std::process::Command`] whose `pre_exec` closure ends
//!   in its own `execve`: std's stdio set-up, working directory, process group and
//!   signal-mask reset still apply, a failed `execve` is the `io::Error` of `spawn`, and
//!   the caller waits for the child as it likes (the master reaps its own). Any `pre_exec`
//!   makes std `fork`, which copies the page tables of the whole process.
//! * [`SpawnSpec::spawn`] starts the child with vfork semantics, as `posix_spawn` does: it
//!   runs on a small stack of its own in the parent's memory until it execs, so a large
//!   server pays no copy (about 1 ms less per upgrade, measured); it is waited for through
//!   a pidfd from tokio. The self-upgrade uses it.
//!
//! On other systems (and on Linux with the `portable` feature) `spawn` is a plain `fork`
//! and `exec`, with the exec's error sent back over a close-on-exec pipe as std does; the
//! child is waited for with `waitpid` each time `SIGCHLD` arrives; a pinned program is
//! executed as `/dev/fd/N`; and [`SpawnSpec::parent_death_signal`], which has no
//! equivalent there, is Linux's alone.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::activation::{
    CONSUMED_VARS, ENV_LISTEN_FDNAMES, ENV_LISTEN_FDS, ENV_LISTEN_PID, LISTEN_FDS_START,
    encode_names,
};

/// What to start, and what to hand it.
#[derive(Debug, Clone)]
pub struct SpawnSpec<'fd> {
    program: PathBuf,
    arg0: OsString,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    cwd: Option<PathBuf>,
    cwd_fd: Option<BorrowedFd<'fd>>,
    program_fd: Option<(BorrowedFd<'fd>, bool)>,
    sockets: Vec<(BorrowedFd<'fd>, Option<String>)>,
    parent_death_signal: Option<(libc::c_int, libc::pid_t)>,
}

impl<'fd> SpawnSpec<'fd> {
    /// Starts `program` (a path: it is executed as is, never looked up in `PATH`; a
    /// relative path is taken from this process's working directory).
    ///
    /// `argv[0]` defaults to the program path. The environment starts empty: add to it
    /// with [`env`](Self::env) or [`envs`](Self::envs). Any socket-activation or notify
    /// variable among them is dropped; set readiness with [`env`](Self::env) after
    /// adding the rest.
    pub fn new(program: impl Into<PathBuf>) -> Self {
        let program = program.into();
        // Relative to the parent's working directory, not the child's.
        let program = std::path::absolute(&program).unwrap_or(program);
        SpawnSpec {
            arg0: program.clone().into_os_string(),
            program,
            args: Vec::new(),
            env: Vec::new(),
            cwd: None,
            cwd_fd: None,
            program_fd: None,
            sockets: Vec::new(),
            parent_death_signal: None,
        }
    }

    /// Sets `argv[0]`.
    pub fn arg0(mut self, arg0: impl Into<OsString>) -> Self {
        self.arg0 = arg0.into();
        self
    }

    /// Appends arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Adds environment variables, dropping the ones reborn's protocol owns
    /// (`LISTEN_*`, `NOTIFY_SOCKET`, `REBORN_*`): those are set on purpose or not at all.
    pub fn envs<I, K, V>(mut self, vars: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<OsString>,
        V: Into<OsString>,
    {
        for (k, v) in vars {
            let k = k.into();
            if !CONSUMED_VARS.iter().any(|c| OsStr::new(c) == k) {
                self.env.push((k, v.into()));
            }
        }
        self
    }

    /// Sets one environment variable, replacing an earlier value.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        let key = key.into();
        self.env.retain(|(k, _)| *k != key);
        self.env.push((key, value.into()));
        self
    }

    /// Sets the working directory.
    pub fn current_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    /// Executes the file open at `fd` (`execveat` with `AT_EMPTY_PATH`) instead of the
    /// program path, which is still what the errors name: a binary pinned this way runs
    /// even after its path holds another file, or none. `script` says that the file is a
    /// `#!` script, whose interpreter opens it as `/dev/fd/N`: that fd then stays open in
    /// the child.
    pub fn program_fd(mut self, fd: BorrowedFd<'fd>, script: bool) -> Self {
        self.program_fd = Some((fd, script));
        self
    }

    /// An open descriptor of the working directory, entered (`fchdir`) by
    /// [`spawn`](Self::spawn) when the [`current_dir`](Self::current_dir) path cannot be
    /// (it was removed or renamed since): deploys that prune old release directories
    /// must not break the next upgrade.
    pub fn current_dir_fd(mut self, dir: BorrowedFd<'fd>) -> Self {
        self.cwd_fd = Some(dir);
        self
    }

    /// Hands a listening socket to the child; the n-th socket becomes fd `3 + n`.
    pub fn socket(mut self, fd: BorrowedFd<'fd>, name: Option<String>) -> Self {
        self.sockets.push((fd, name));
        self
    }

    /// Asks the kernel to send `signal` to the child when the thread that spawns it exits
    /// (`PR_SET_PDEATHSIG`). `parent` is the spawning process's PID: if it is already gone
    /// when the child starts, the child exits at once.
    ///
    /// The signal follows the spawning *thread*: spawn from a thread that lives as long
    /// as the parent does. Linux only: other systems have no such request, and the child
    /// outlives a parent that is killed.
    pub fn parent_death_signal(mut self, signal: libc::c_int, parent: libc::pid_t) -> Self {
        self.parent_death_signal = Some((signal, parent));
        self
    }

    /// The program's path.
    pub fn program(&self) -> &Path {
        &self.program
    }

    /// Builds the [`Command`], ready to be spawned (by std or by tokio, which converts
    /// from it). Stdio is inherited unless the caller changes it.
    pub fn command(&self) -> io::Result<Command> {
        let plan = ExecPlan::new(self, true)?;
        let mut cmd = Command::new(&self.program);
        if let Some(dir) = &self.cwd {
            cmd.current_dir(dir);
        }
        let mut plan = plan;
        // SAFETY: the closure runs in the child between fork and exec and only makes
        // async-signal-safe calls (fcntl, dup2, close, getpid, prctl, getppid, execve) on
        // memory prepared before the fork; it allocates nothing and takes no locks.
        unsafe {
            cmd.pre_exec(move || plan.exec_in_child());
        }
        Ok(cmd)
    }
}

/// Everything the child needs, laid out before the fork.
struct ExecPlan {
    program: CString,
    // Owners of the strings the pointer arrays point into.
    _argv_owned: Vec<CString>,
    _envp_owned: Vec<CString>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    /// `LISTEN_PID=` followed by room for the digits and a NUL, when sockets are passed.
    listen_pid: Option<Vec<u8>>,
    sources: Vec<RawFd>,
    moved: Vec<RawFd>,
    /// The open file to execute instead of `program`, and whether it is a script.
    program_fd: Option<(RawFd, bool)>,
    /// Without `execveat`: a copy of the program's fd, made in the parent above the
    /// target range, and its `/dev/fd/N` path to execute.
    #[cfg(not(reborn_linux))]
    program_path_fd: Option<(OwnedFd, CString)>,
    #[cfg_attr(not(target_os = "linux"), allow(dead_code, reason = "Linux's alone"))]
    parent_death_signal: Option<(libc::c_int, libc::pid_t)>,
    /// Placeholders on the parent's free fds in the target range, held until the
    /// `Command` is dropped (after its spawn): std opens the pipe on which the child
    /// reports a failed `execve` at the lowest free fd, and a `dup2` onto it in the child
    /// would turn an exec failure into a successful-looking spawn.
    _placeholders: Vec<OwnedFd>,
}

// SAFETY: the raw pointers point into the CStrings and the buffer owned by the same plan
// (heap memory that does not move when the plan does); the plan is used only by the
// child, after fork, where there is a single thread.
unsafe impl Send for ExecPlan {}
// SAFETY: as above; `&ExecPlan` gives no access to the pointers.
unsafe impl Sync for ExecPlan {}

const LISTEN_PID_PREFIX: &[u8] = b"LISTEN_PID=";
const PID_DIGITS: usize = 20;

fn cstring(bytes: &[u8], what: &str) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} contains a NUL byte"),
        )
    })
}

impl ExecPlan {
    /// `for_std_command`: the plan runs in a `std::process::Command`'s `pre_exec`, whose
    /// exec-error pipe needs the placeholders (see `_placeholders`).
    fn new(spec: &SpawnSpec<'_>, for_std_command: bool) -> io::Result<ExecPlan> {
        let program = cstring(spec.program.as_os_str().as_bytes(), "the program path")?;
        let mut argv_owned = vec![cstring(spec.arg0.as_bytes(), "argv[0]")?];
        for a in &spec.args {
            argv_owned.push(cstring(a.as_bytes(), "an argument")?);
        }
        let mut envp_owned = Vec::with_capacity(spec.env.len() + 3);
        for (k, v) in &spec.env {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            envp_owned.push(cstring(&kv, "an environment variable")?);
        }
        let mut listen_pid = None;
        if !spec.sockets.is_empty() {
            envp_owned.push(cstring(
                format!("{ENV_LISTEN_FDS}={}", spec.sockets.len()).as_bytes(),
                "LISTEN_FDS",
            )?);
            let names = encode_names(spec.sockets.iter().map(|(_, n)| n.as_deref()));
            envp_owned.push(cstring(
                format!("{ENV_LISTEN_FDNAMES}={names}").as_bytes(),
                "LISTEN_FDNAMES",
            )?);
            let mut buf = Vec::with_capacity(LISTEN_PID_PREFIX.len() + PID_DIGITS + 1);
            buf.extend_from_slice(ENV_LISTEN_PID.as_bytes());
            buf.push(b'=');
            buf.resize(LISTEN_PID_PREFIX.len() + PID_DIGITS + 1, 0);
            listen_pid = Some(buf);
        }
        let argv = argv_owned
            .iter()
            .map(|c| c.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        let mut envp: Vec<*const libc::c_char> = envp_owned.iter().map(|c| c.as_ptr()).collect();
        if let Some(buf) = &listen_pid {
            envp.push(buf.as_ptr().cast());
        }
        envp.push(std::ptr::null());
        let sources: Vec<RawFd> = spec.sockets.iter().map(|(fd, _)| fd.as_raw_fd()).collect();
        let placeholders = if for_std_command {
            occupy_free_fds(LISTEN_FDS_START..LISTEN_FDS_START + sources.len() as RawFd)?
        } else {
            Vec::new()
        };
        #[cfg(not(reborn_linux))]
        let program_path_fd = match spec.program_fd {
            Some((fd, _)) => {
                let above = LISTEN_FDS_START + sources.len() as RawFd;
                let copy = fcntl_dup_cloexec(fd.as_raw_fd(), above)?;
                let path = cstring(
                    format!("/dev/fd/{}", copy.as_raw_fd()).as_bytes(),
                    "the program path",
                )?;
                Some((copy, path))
            }
            None => None,
        };
        Ok(ExecPlan {
            #[cfg(not(reborn_linux))]
            program_path_fd,
            program,
            _argv_owned: argv_owned,
            _envp_owned: envp_owned,
            argv,
            envp,
            listen_pid,
            moved: vec![-1; sources.len()],
            sources,
            program_fd: spec.program_fd.map(|(fd, script)| (fd.as_raw_fd(), script)),
            parent_death_signal: spec.parent_death_signal,
            _placeholders: placeholders,
        })
    }

    /// Runs in the child. Returns only on failure.
    fn exec_in_child(&mut self) -> io::Result<()> {
        #[cfg(target_os = "linux")]
        if let Some((signal, parent)) = self.parent_death_signal {
            // SAFETY: prctl and getppid are async-signal-safe system calls.
            unsafe {
                if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    // The parent died before the signal was armed.
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
            }
        }
        let n = self.sources.len() as RawFd;
        let first_free = LISTEN_FDS_START + n;
        // The program's fd goes above the target range too, where no dup2 below lands.
        #[cfg(reborn_linux)]
        let program_fd = match self.program_fd {
            Some((src, script)) => {
                // SAFETY: fcntl is async-signal-safe; `src` is an fd the parent kept open.
                let fd = unsafe { libc::fcntl(src, libc::F_DUPFD_CLOEXEC, first_free) };
                // SAFETY: as above, on the fd just made. A script's interpreter opens
                // `/dev/fd/N` after the exec: that one fd must survive it.
                if fd < 0 || (script && unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } < 0) {
                    return Err(io::Error::last_os_error());
                }
                Some(fd)
            }
            None => None,
        };
        // Without execveat, the copy made in the parent is already above the range.
        #[cfg(not(reborn_linux))]
        if let (Some((copy, _)), Some((_, true))) = (&self.program_path_fd, self.program_fd) {
            // SAFETY: fcntl is async-signal-safe; the copy is open in this child. A
            // script's interpreter opens `/dev/fd/N` after the exec: that fd must survive.
            if unsafe { libc::fcntl(copy.as_raw_fd(), libc::F_SETFD, 0) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // First move every source above the target range, so that no dup2 below can
        // overwrite a source that is still to be placed.
        for (slot, src) in self.moved.iter_mut().zip(&self.sources) {
            // SAFETY: fcntl(F_DUPFD_CLOEXEC) is async-signal-safe; `src` is an fd the
            // parent kept open for the spawn.
            let fd = unsafe { libc::fcntl(*src, libc::F_DUPFD_CLOEXEC, first_free) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            *slot = fd;
        }
        for (i, fd) in self.moved.iter().enumerate() {
            let target = LISTEN_FDS_START + i as RawFd;
            // SAFETY: dup2 and close are async-signal-safe. `fd` >= first_free > target,
            // so dup2 really duplicates, and the new fd has close-on-exec cleared.
            unsafe {
                if libc::dup2(*fd, target) < 0 {
                    return Err(io::Error::last_os_error());
                }
                libc::close(*fd);
            }
        }
        if let Some(buf) = self.listen_pid.as_mut() {
            // SAFETY: getpid is async-signal-safe.
            let pid = unsafe { libc::getpid() };
            write_decimal(&mut buf[LISTEN_PID_PREFIX.len()..], pid as u64);
        }
        #[cfg(reborn_linux)]
        if let Some(fd) = program_fd {
            // SAFETY: execveat is a system call (async-signal-safe); the empty path is a
            // static NUL-terminated string and the arrays are as for execve below.
            unsafe {
                libc::syscall(
                    libc::SYS_execveat,
                    fd,
                    c"".as_ptr(),
                    self.argv.as_ptr(),
                    self.envp.as_ptr(),
                    libc::AT_EMPTY_PATH,
                );
            }
            return Err(io::Error::last_os_error());
        }
        #[cfg(not(reborn_linux))]
        let program = match &self.program_path_fd {
            Some((_, path)) => path,
            None => &self.program,
        };
        #[cfg(reborn_linux)]
        let program = &self.program;
        // SAFETY: execve is async-signal-safe; the arrays are NUL-terminated and point
        // into strings owned by `self`, which outlives the call.
        unsafe {
            libc::execve(program.as_ptr(), self.argv.as_ptr(), self.envp.as_ptr());
        }
        Err(io::Error::last_os_error())
    }
}

/// A close-on-exec copy of `fd` on the lowest free fd at or above `lowest`.
#[cfg(not(reborn_linux))]
fn fcntl_dup_cloexec(fd: RawFd, lowest: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC duplicates an fd the caller keeps open for the call.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, lowest) };
    if dup < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `dup` is a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(dup) })
}

/// Puts a close-on-exec placeholder (`/dev/null`) on every free fd in `range`.
fn occupy_free_fds(range: std::ops::Range<RawFd>) -> io::Result<Vec<OwnedFd>> {
    let mut held = Vec::new();
    if range.is_empty() {
        return Ok(held);
    }
    let devnull = std::fs::File::open("/dev/null")?;
    for fd in range {
        // SAFETY: F_GETFD only reads the flags of whatever `fd` is, if anything.
        let free = unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0
            && io::Error::last_os_error().raw_os_error() == Some(libc::EBADF);
        if !free {
            continue;
        }
        // SAFETY: F_DUPFD_CLOEXEC duplicates an fd we own onto the lowest free fd >= `fd`.
        let dup = unsafe { libc::fcntl(devnull.as_raw_fd(), libc::F_DUPFD_CLOEXEC, fd) };
        if dup < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `dup` is a new fd that nothing else owns.
        held.push(unsafe { OwnedFd::from_raw_fd(dup) });
    }
    Ok(held)
}

/// Writes `value` in decimal followed by a NUL into `out`, which holds at least 21 bytes.
/// Allocation-free: it runs between fork and exec.
fn write_decimal(out: &mut [u8], mut value: u64) {
    let mut digits = [0u8; PID_DIGITS];
    let mut len = 0;
    loop {
        digits[len] = b'0' + (value % 10) as u8;
        len += 1;
        value /= 10;
        if value == 0 || len == PID_DIGITS {
            break;
        }
    }
    for i in 0..len {
        out[i] = digits[len - 1 - i];
    }
    out[len] = 0;
}

/// How many times a start that failed because the program file is busy is tried again,
/// [`BUSY_PAUSE`] apart (a second in all): see [`is_busy`].
pub const BUSY_RETRIES: u32 = 20;

/// The pause between two tries of a start that failed because the program file is busy.
pub const BUSY_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);

/// Whether a start failed with "Text file busy" (`ETXTBSY`): the program file is open
/// for writing somewhere, by a deploy still copying it or by a child that another thread
/// has just forked and that has not yet reached its `exec`. Both pass in a moment: the
/// start is worth trying again, [`BUSY_RETRIES`] times at most.
pub fn is_busy(error: &io::Error) -> bool {
    error.raw_os_error() == Some(libc::ETXTBSY)
}

/// Finds `program` as a shell would: a name with a `/` is used as is, a bare name is
/// looked up in `PATH` (executable regular files only).
pub fn resolve_program(program: &OsStr) -> Option<PathBuf> {
    if program.as_bytes().contains(&b'/') {
        return Some(PathBuf::from(program));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable_file(candidate))
}

/// Whether `path` is a regular file with an execute bit.
pub fn is_executable_file(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal() {
        let mut buf = [0xffu8; 21];
        write_decimal(&mut buf, 0);
        assert_eq!(&buf[..2], b"0\0");
        write_decimal(&mut buf, 4194304);
        assert_eq!(&buf[..8], b"4194304\0");
        write_decimal(&mut buf, u64::MAX);
        assert_eq!(&buf[..21], b"18446744073709551615\0");
    }

    #[test]
    fn child_sees_its_own_pid_and_sockets() {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let spec = SpawnSpec::new("/bin/sh")
            .args([
                "-c",
                "echo $$ $LISTEN_PID $LISTEN_FDS $LISTEN_FDNAMES; \
                 ls -l /proc/self/fd/3 /proc/self/fd/4 | grep -c socket",
            ])
            .envs([("PATH", "/usr/bin:/bin"), ("LISTEN_FDS", "99")])
            .socket(std::os::fd::AsFd::as_fd(&a), Some("one".into()))
            .socket(std::os::fd::AsFd::as_fd(&b), None);
        let out = spec
            .command()
            .unwrap()
            .stdout(std::process::Stdio::piped())
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let mut lines = text.lines();
        let first: Vec<&str> = lines.next().unwrap().split(' ').collect();
        assert_eq!(
            first[0], first[1],
            "LISTEN_PID is the child's own pid: {text}"
        );
        assert_eq!(first[2], "2");
        assert_eq!(first[3], "one:unknown");
        assert_eq!(lines.next(), Some("2"), "{text}");
    }

    /// A hole among the target fds must not swallow std's exec-error pipe.
    #[test]
    fn exec_failure_is_reported_with_holes_below_the_targets() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dups: Vec<OwnedFd> = (0..12)
            .map(|_| std::os::fd::AsFd::as_fd(&l).try_clone_to_owned().unwrap())
            .collect();
        let highest = dups.iter().map(|d| d.as_raw_fd()).max().unwrap();
        // Free every other dup: holes at known numbers, all below 3 + n.
        let (keep, free): (Vec<_>, Vec<_>) =
            dups.into_iter().enumerate().partition(|(i, _)| i % 2 == 0);
        drop(free);
        let n = (highest - LISTEN_FDS_START + 1) as usize;
        let mut spec = SpawnSpec::new("/nonexistent/reborn-test");
        for _ in 0..n {
            spec = spec.socket(std::os::fd::AsFd::as_fd(&keep[0].1), None);
        }
        let err = spec.command().unwrap().spawn().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[tokio::test]
    async fn vfork_spawn_hands_sockets_and_pid_and_reports_exit() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let script = format!(
            "echo $$ $LISTEN_PID $LISTEN_FDS $LISTEN_FDNAMES $(pwd) > {}; \
             ls -l /proc/self/fd/3 | grep -c socket >> {}; exit 7",
            out.display(),
            out.display()
        );
        let mut child = SpawnSpec::new("/bin/sh")
            .args(["-c", &script])
            .envs([("PATH", "/usr/bin:/bin")])
            .current_dir(dir.path())
            .socket(std::os::fd::AsFd::as_fd(&a), Some("web".into()))
            .spawn()
            .unwrap();
        let status = child.wait().await.unwrap();
        assert_eq!(status.code(), Some(7));
        let text = std::fs::read_to_string(&out).unwrap();
        let fields: Vec<&str> = text.split_whitespace().collect();
        assert_eq!(
            fields[0], fields[1],
            "LISTEN_PID is the child's own pid: {text}"
        );
        assert_eq!(fields[0], child.id().to_string());
        assert_eq!(&fields[2..4], ["1", "web"]);
        assert_eq!(
            std::path::Path::new(fields[4]),
            dir.path().canonicalize().unwrap()
        );
        assert_eq!(fields[5], "1", "{text}");
    }

    #[tokio::test]
    async fn vfork_spawn_reports_exec_failure() {
        let err = SpawnSpec::new("/nonexistent/reborn-test")
            .spawn()
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        let dir = tempfile::tempdir().unwrap();
        let not_exec = dir.path().join("x");
        std::fs::write(&not_exec, "#!/bin/sh\n").unwrap();
        let err = SpawnSpec::new(&not_exec).spawn().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
    }

    #[test]
    fn missing_program_is_reported() {
        let err = SpawnSpec::new("/nonexistent/reborn-test")
            .command()
            .unwrap()
            .spawn()
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}

/// A process started by [`SpawnSpec::spawn`]: its PID, and what tells when it exits (a
/// pidfd on Linux, `SIGCHLD` elsewhere).
#[derive(Debug)]
pub struct SpawnedChild {
    pid: libc::pid_t,
    #[cfg(reborn_linux)]
    pidfd: tokio::io::unix::AsyncFd<OwnedFd>,
    /// `SIGCHLD`, registered before the child existed: its exit cannot be missed.
    #[cfg(not(reborn_linux))]
    exited: tokio::signal::unix::Signal,
    status: Option<std::process::ExitStatus>,
}

impl SpawnedChild {
    /// Its PID.
    pub fn id(&self) -> u32 {
        self.pid as u32
    }

    /// Sends it `signal`, unless it has already been waited for.
    pub fn signal(&self, signal: libc::c_int) {
        if self.status.is_some() {
            return;
        }
        #[cfg(reborn_linux)]
        // SAFETY: pidfd_send_signal on our own pidfd; no memory is passed.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.get_ref().as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            );
        }
        // Unreaped, so the PID is still this child's (a zombie's at worst).
        #[cfg(not(reborn_linux))]
        if let Ok(signal) = nix::sys::signal::Signal::try_from(signal) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid), signal);
        }
    }

    /// Its exit status if it has exited (and reaps it), without waiting.
    pub fn try_wait(&mut self) -> io::Result<Option<std::process::ExitStatus>> {
        use nix::sys::wait::{WaitPidFlag, WaitStatus};
        use std::os::unix::process::ExitStatusExt;
        if let Some(status) = self.status {
            return Ok(Some(status));
        }
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG;
        #[cfg(reborn_linux)]
        let waited = {
            let fd = std::os::fd::AsFd::as_fd(self.pidfd.get_ref());
            nix::sys::wait::waitid(nix::sys::wait::Id::PIDFd(fd), flags)
        };
        #[cfg(not(reborn_linux))]
        let waited = nix::sys::wait::waitpid(
            nix::unistd::Pid::from_raw(self.pid),
            Some(flags - WaitPidFlag::WEXITED),
        );
        let status = match waited.map_err(io::Error::from)? {
            WaitStatus::Exited(_, code) => std::process::ExitStatus::from_raw((code & 0xff) << 8),
            WaitStatus::Signaled(_, sig, _) => std::process::ExitStatus::from_raw(sig as i32),
            _ => return Ok(None),
        };
        self.status = Some(status);
        Ok(Some(status))
    }

    /// Waits for it to exit, and reaps it.
    pub async fn wait(&mut self) -> io::Result<std::process::ExitStatus> {
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            #[cfg(reborn_linux)]
            {
                let mut ready = self.pidfd.readable().await?;
                ready.clear_ready();
            }
            #[cfg(not(reborn_linux))]
            if self.exited.recv().await.is_none() {
                return Err(io::Error::other(
                    "the runtime's signal driver has shut down: cannot wait for the child",
                ));
            }
        }
    }
}

/// Starting a process failed because its working directory could not be entered; the
/// `io::Error` that [`SpawnSpec::spawn`] returns carries it (`get_ref`/`downcast`).
#[derive(Debug, thiserror::Error)]
#[error("cannot enter the working directory {dir}: {source}")]
pub struct WorkingDirError {
    /// The directory.
    pub dir: PathBuf,
    /// Why.
    #[source]
    pub source: io::Error,
}

/// Why a child did not reach its program.
#[derive(Debug, Clone, Copy)]
struct ChildFailure {
    errno: libc::c_int,
    /// Entering the working directory failed, not the exec.
    chdir_failed: bool,
}

impl ChildFailure {
    fn into_error(self, dir: Option<&Path>) -> io::Error {
        let source = io::Error::from_raw_os_error(self.errno);
        if self.chdir_failed {
            return io::Error::new(
                source.kind(),
                WorkingDirError {
                    dir: dir.map(Path::to_path_buf).unwrap_or_default(),
                    source,
                },
            );
        }
        source
    }
}

/// What the child needs from the parent, prepared before it starts.
struct ChildStart<'a> {
    plan: &'a mut ExecPlan,
    cwd: Option<&'a std::ffi::CStr>,
    cwd_fd: Option<RawFd>,
}

impl ChildStart<'_> {
    /// Runs in the child, whether it shares the parent's memory (vfork) or has a copy
    /// (fork): resets signal handling, enters the working directory, and executes the
    /// program. Returns only on failure.
    ///
    /// Only async-signal-safe system calls, on memory prepared before the child started.
    /// Handlers are reset before signals are unblocked, so none of the parent's handlers
    /// can run here; SIGPIPE goes back to its default as std does for children.
    fn exec(&mut self) -> ChildFailure {
        let errno = || {
            io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EINVAL)
        };
        // SAFETY: sigaction and sigprocmask on storage of this frame; chdir and fchdir
        // on a NUL-terminated path and an fd the parent keeps open.
        unsafe {
            for sig in 1..=last_signal() {
                let mut current: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, std::ptr::null(), &mut current) == 0
                    && current.sa_sigaction != libc::SIG_DFL
                    && (current.sa_sigaction != libc::SIG_IGN || sig == libc::SIGPIPE)
                {
                    let mut default: libc::sigaction = std::mem::zeroed();
                    default.sa_sigaction = libc::SIG_DFL;
                    libc::sigaction(sig, &default, std::ptr::null_mut());
                }
            }
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            if let Some(dir) = self.cwd {
                // The path first (a `current` symlink switched to a new release is
                // followed), the directory held open if the path has gone.
                if libc::chdir(dir.as_ptr()) != 0
                    && self.cwd_fd.is_none_or(|fd| libc::fchdir(fd) != 0)
                {
                    return ChildFailure {
                        errno: errno(),
                        chdir_failed: true,
                    };
                }
            }
        }
        let errno = match self.plan.exec_in_child() {
            Err(e) => e.raw_os_error().unwrap_or(libc::EINVAL),
            Ok(()) => libc::EINVAL,
        };
        ChildFailure {
            errno,
            chdir_failed: false,
        }
    }
}

/// The highest signal number whose handler the child may have to reset.
fn last_signal() -> libc::c_int {
    #[cfg(target_os = "linux")]
    {
        libc::SIGRTMAX()
    }
    // Past the last signal sigaction fails with EINVAL, which is harmless: enough for
    // every BSD's real-time signals.
    #[cfg(not(target_os = "linux"))]
    {
        128
    }
}

/// Blocks every signal on this thread until dropped, so that no handler of the parent
/// runs in a child before it has reset them.
struct AllSignalsBlocked(libc::sigset_t);

impl AllSignalsBlocked {
    fn new() -> AllSignalsBlocked {
        // SAFETY: sigset operations on local storage; pthread_sigmask on this thread.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
            AllSignalsBlocked(old)
        }
    }
}

impl Drop for AllSignalsBlocked {
    fn drop(&mut self) {
        // SAFETY: restores this thread's signal mask saved by `new`.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut()) };
    }
}

impl SpawnSpec<'_> {
    /// Starts the process the fast way, and returns a handle to wait for it from tokio.
    ///
    /// `fork` copies the page tables of a large, multi-threaded server, and std falls
    /// back to it whenever a `pre_exec` step is needed; here, on Linux, the child runs on
    /// a small stack of its own in the parent's memory (`clone(CLONE_VM | CLONE_VFORK)`,
    /// as `posix_spawn` does) until it execs, doing only the async-signal-safe steps of
    /// [`command`](Self::command), with every signal blocked around the clone and every
    /// handler reset in the child. Elsewhere (or with the `portable` feature) it is a
    /// plain `fork`, as the [module](self) says. A failed `execve`, or a working directory
    /// that cannot be entered ([`WorkingDirError`]), is returned as this call's error.
    /// Stdio is inherited. Needs a tokio runtime (the child's exit is watched from it).
    pub fn spawn(&self) -> io::Result<SpawnedChild> {
        let mut plan = ExecPlan::new(self, false)?;
        let cwd = match &self.cwd {
            Some(dir) => Some(cstring(
                dir.as_os_str().as_bytes(),
                "the working directory",
            )?),
            None => None,
        };
        let start = ChildStart {
            plan: &mut plan,
            cwd: cwd.as_deref(),
            cwd_fd: self.cwd_fd.map(|fd| fd.as_raw_fd()),
        };
        start_child(start).map_err(|e| match e {
            Started::Failed(failure) => failure.into_error(self.cwd.as_deref()),
            Started::Error(e) => e,
        })
    }
}

/// How starting a child went wrong.
enum Started {
    /// The child ran and could not reach its program.
    Failed(ChildFailure),
    /// The child could not be started or watched.
    Error(io::Error),
}

impl From<io::Error> for Started {
    fn from(e: io::Error) -> Started {
        Started::Error(e)
    }
}

/// Reaps a child that failed before its program ran.
fn reap(pid: libc::pid_t) {
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
}

/// The state a vfork-style child shares with its parent.
#[cfg(reborn_linux)]
struct VforkShared<'a> {
    start: ChildStart<'a>,
    failure: Option<ChildFailure>,
}

#[cfg(reborn_linux)]
fn start_child(start: ChildStart<'_>) -> Result<SpawnedChild, Started> {
    let mut shared = VforkShared {
        start,
        failure: None,
    };
    let mut stack = vec![0u8; 256 * 1024];
    // SAFETY: the stack grows down from its end; 16-byte alignment as the ABI wants.
    let top = unsafe { stack.as_mut_ptr().add(stack.len()) } as usize & !15;
    let blocked = AllSignalsBlocked::new();
    // SAFETY: the child runs `vfork_child` on `stack` in this process's memory while
    // this thread is suspended (CLONE_VFORK) until it execs or exits; it touches only
    // `shared` (which outlives the call) and makes async-signal-safe system calls.
    // All signals are blocked, so no handler of this process runs in the child.
    let pid = unsafe {
        libc::clone(
            vfork_child,
            top as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            (&mut shared as *mut VforkShared<'_>).cast(),
        )
    };
    let clone_error = io::Error::last_os_error();
    drop(blocked);
    drop(stack);
    if pid < 0 {
        return Err(clone_error.into());
    }
    if let Some(failure) = shared.failure {
        // The child exited with 127.
        reap(pid);
        return Err(Started::Failed(failure));
    }
    // SAFETY: pidfd_open on the PID of our own unreaped child.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        // Without a pidfd the child cannot be watched: it must not run unwatched.
        let err = io::Error::last_os_error();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        reap(pid);
        return Err(io::Error::new(
            err.kind(),
            format!("cannot watch the new process (pidfd_open needs Linux 5.3 or later): {err}"),
        )
        .into());
    }
    // SAFETY: a new fd that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    set_cloexec(&pidfd);
    // SAFETY: the AsyncFd owns `pidfd`, which stays open and the same until it is
    // dropped with it.
    let pidfd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE)
    }
    .map_err(io::Error::from)?;
    Ok(SpawnedChild {
        pid,
        pidfd,
        status: None,
    })
}

#[cfg(reborn_linux)]
fn set_cloexec(fd: &OwnedFd) {
    // SAFETY: F_SETFD on an fd we own.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
}

/// The child's side of the vfork-style start: on its own stack, in the parent's memory.
#[cfg(reborn_linux)]
extern "C" fn vfork_child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `VforkShared` the parent passed, alive while it is suspended.
    let shared = unsafe { &mut *arg.cast::<VforkShared<'_>>() };
    shared.failure = Some(shared.start.exec());
    // SAFETY: _exit is async-signal-safe and runs no destructors.
    unsafe { libc::_exit(127) }
}

/// The portable start: `fork`, then the same steps in the child, which reports a failure
/// through a close-on-exec pipe (end of file: the program runs).
#[cfg(not(reborn_linux))]
fn start_child(mut start: ChildStart<'_>) -> Result<SpawnedChild, Started> {
    use tokio::signal::unix::{SignalKind, signal};
    let exited = signal(SignalKind::child())?;
    // Close-on-exec set at once: `pipe2` is not everywhere. (A fork by another thread in
    // between would hold the write end until its exec, delaying only our read.)
    let (read_end, write_end) = nix::unistd::pipe().map_err(io::Error::from)?;
    for end in [&read_end, &write_end] {
        nix::fcntl::fcntl(
            end,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .map_err(io::Error::from)?;
    }
    let blocked = AllSignalsBlocked::new();
    // SAFETY: the child makes only async-signal-safe calls (ChildStart::exec, write,
    // _exit) on memory prepared before the fork, and never returns from this block.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let failure = start.exec();
        let mut report = [0u8; 5];
        report[..4].copy_from_slice(&failure.errno.to_ne_bytes());
        report[4] = u8::from(failure.chdir_failed);
        // SAFETY: write and _exit are async-signal-safe; the buffer is on this stack.
        unsafe {
            libc::write(write_end.as_raw_fd(), report.as_ptr().cast(), report.len());
            libc::_exit(127)
        }
    }
    let fork_error = io::Error::last_os_error();
    drop(blocked);
    drop(write_end);
    if pid < 0 {
        return Err(fork_error.into());
    }
    let mut report = [0u8; 5];
    let mut got = 0;
    let mut reader = std::fs::File::from(read_end);
    while got < report.len() {
        match io::Read::read(&mut reader, &mut report[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                reap(pid);
                return Err(e.into());
            }
        }
    }
    if got > 0 {
        reap(pid);
        let mut errno = [0u8; 4];
        errno.copy_from_slice(&report[..4]);
        return Err(Started::Failed(ChildFailure {
            errno: if got == report.len() {
                i32::from_ne_bytes(errno)
            } else {
                libc::EINVAL
            },
            chdir_failed: got == report.len() && report[4] == 1,
        }));
    }
    Ok(SpawnedChild {
        pid,
        exited,
        status: None,
    })
}
