//! Collecting the exit statuses of child processes, in one place.
//!
//! The master is the only code in its process that waits for children, and it waits
//! carefully: a blanket `waitpid(-1)` would also collect a child that `std::process`
//! is waiting for itself (when `exec` fails, `Command::spawn` waits for the child it
//! forked, and panics if the status is gone). So the reaper first *peeks* at a finished
//! child with `waitid(P_ALL, WEXITED | WNOHANG | WNOWAIT)`, which leaves it a zombie, and
//! then reaps it only if it is a worker the master knows, or an orphan while no spawn is
//! in flight. As PID 1 in a container (or as a child subreaper) the master thereby also
//! collects orphans reparented to it, so no zombie piles up.

use std::io;

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// `exit(code)`.
    Exited(i32),
    /// Killed by a signal.
    Signaled(i32),
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Exited(code) => write!(f, "exited with status {code}"),
            ExitStatus::Signaled(sig) => {
                let name = nix::sys::signal::Signal::try_from(*sig)
                    .map(|s| s.as_str().to_owned())
                    .unwrap_or_else(|_| format!("signal {sig}"));
                write!(f, "was killed by {name}")
            }
        }
    }
}

/// The PID of some child that has exited and not been reaped yet, without reaping it.
pub fn peek_exited() -> io::Result<Option<u32>> {
    // SAFETY: an all-zero siginfo_t is a valid value; waitid writes into it.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid only writes into `info`, which lives for the call.
    let rc = unsafe {
        libc::waitid(
            libc::P_ALL,
            0,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    if rc != 0 {
        let err = io::Error::last_os_error();
        return if err.raw_os_error() == Some(libc::ECHILD) {
            Ok(None)
        } else {
            Err(err)
        };
    }
    // SAFETY: after a successful waitid, si_pid is set (0 when no child has changed
    // state, because of WNOHANG).
    let pid = unsafe { info.si_pid() };
    Ok((pid > 0).then_some(pid as u32))
}

/// Reaps `pid`, which [`peek_exited`] reported, and says how it ended.
pub fn reap(pid: u32) -> io::Result<Option<ExitStatus>> {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    match waitpid(
        nix::unistd::Pid::from_raw(pid as i32),
        Some(WaitPidFlag::WNOHANG),
    ) {
        Ok(WaitStatus::Exited(_, code)) => Ok(Some(ExitStatus::Exited(code))),
        Ok(WaitStatus::Signaled(_, sig, _)) => Ok(Some(ExitStatus::Signaled(sig as i32))),
        Ok(_) => Ok(None),
        Err(e) => Err(io::Error::from(e)),
    }
}

/// Makes this process the reaper of its descendants' orphans (`PR_SET_CHILD_SUBREAPER`),
/// so that the grandchildren a multi-process worker leaves behind are collected here.
/// Linux only: elsewhere orphans go to init, as they always did.
#[cfg(not(target_os = "linux"))]
pub fn become_subreaper() -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "child subreapers are Linux's (PR_SET_CHILD_SUBREAPER)",
    ))
}

/// Makes this process the reaper of its descendants' orphans (`PR_SET_CHILD_SUBREAPER`),
/// so that the grandchildren a multi-process worker leaves behind are collected here.
#[cfg(target_os = "linux")]
pub fn become_subreaper() -> io::Result<()> {
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes plain integers.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_text() {
        assert_eq!(ExitStatus::Exited(3).to_string(), "exited with status 3");
        assert_eq!(ExitStatus::Signaled(9).to_string(), "was killed by SIGKILL");
    }
}
