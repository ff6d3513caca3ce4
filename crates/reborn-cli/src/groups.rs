//! Workers' process groups: each worker is the leader of a group of its own (`setpgid`
//! in the child before `exec`, done by `std::process::Command::process_group`, which is
//! async-signal-safe), so that what it starts in the background (`server &` in a start
//! script, the processes of a multi-process server) is stopped with it: the stop signal
//! and the `SIGKILL` at the drain deadline go to the whole group.
//!
//! This module only looks and signals; the supervisor decides when.

use std::io;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Sends `sig` to every process of the group `pgid`. A leader that left its group (it
/// made a session of its own) is signalled alone.
pub fn signal(pgid: u32, sig: Signal) -> io::Result<()> {
    match kill(Pid::from_raw(-(pgid as i32)), sig) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::ESRCH) => kill(Pid::from_raw(pgid as i32), sig).map_err(Into::into),
        Err(e) => Err(e.into()),
    }
}

/// The processes of the group `pgid` that are still running (zombies excluded), read
/// from `/proc`.
pub fn members(pgid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if let Some((state, group)) = parse_stat(&stat)
            && group == pgid
            && !matches!(state, 'Z' | 'X')
        {
            out.push(pid);
        }
    }
    out.sort_unstable();
    out
}

/// The state letter and the process group of a `/proc/PID/stat` line.
fn parse_stat(stat: &str) -> Option<(char, u32)> {
    // `pid (comm) state ppid pgrp …`; comm may hold spaces and parentheses.
    let mut rest = stat.rsplit_once(')')?.1.split_whitespace();
    let state = rest.next()?.chars().next()?;
    let _ppid = rest.next()?;
    let pgrp = rest.next()?.parse().ok()?;
    Some((state, pgrp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines() {
        assert_eq!(parse_stat("42 (a (b) c) S 1 40 40 0 -1"), Some(('S', 40)));
        assert_eq!(parse_stat("garbage"), None);
        let me = std::process::id();
        // SAFETY: getpgrp has no preconditions.
        let group = unsafe { libc::getpgrp() } as u32;
        assert!(members(group).contains(&me));
    }
}
