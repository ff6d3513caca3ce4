//! Processes and limits: `/proc` readings, signals, `RLIMIT_NOFILE`.

use std::io;

pub use reborn_testkit::alive;

/// Sends `sig` to `pid`.
pub fn kill(pid: u32, sig: libc::c_int) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::other("pid out of range"))?;
    if pid <= 0 {
        return Err(io::Error::other("refusing to signal pid <= 0"));
    }
    // SAFETY: kill(2) has no memory-safety preconditions; pid > 0 names one process.
    let rc = unsafe { libc::kill(pid, sig) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The number of open file descriptors of a process, if it can be read.
pub fn fd_count(pid: u32) -> Option<usize> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|d| d.count())
}

/// The resident set size (`VmRSS`) of a process in KiB, if it can be read.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// A field of `/proc/PID/<file>` in KiB (`VmRSS:`, `RssAnon:`, `Pss:` …).
fn kib_field(pid: u32, file: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (children inherit it) and returns
/// the new soft limit.
pub fn raise_nofile() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the rlimit we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit reads the rlimit we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

/// A snapshot of one process's resources.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProcStat {
    /// What the process is: `master`, `generation`, `server`.
    pub role: String,
    /// Its PID.
    pub pid: u32,
    /// Whether it was alive (not a zombie) when looked at.
    pub alive: bool,
    /// Open file descriptors.
    pub fds: Option<usize>,
    /// Resident set size in KiB (`VmRSS`).
    pub rss_kib: Option<u64>,
    /// Of which anonymous memory (`RssAnon`): the process's own.
    pub rss_anon_kib: Option<u64>,
    /// Of which file-backed pages (`RssFile`): the binary and shared libraries, shared
    /// with every process that maps them.
    pub rss_file_kib: Option<u64>,
    /// Proportional set size (`Pss` of `smaps_rollup`): shared pages divided among
    /// their sharers.
    pub pss_kib: Option<u64>,
}

impl ProcStat {
    /// Looks at `pid` now.
    pub fn of(role: &str, pid: u32) -> ProcStat {
        let alive = alive(pid);
        ProcStat {
            role: role.to_owned(),
            pid,
            alive,
            fds: if alive { fd_count(pid) } else { None },
            rss_kib: if alive { rss_kib(pid) } else { None },
            rss_anon_kib: if alive {
                kib_field(pid, "status", "RssAnon:")
            } else {
                None
            },
            rss_file_kib: if alive {
                kib_field(pid, "status", "RssFile:")
            } else {
                None
            },
            pss_kib: if alive {
                kib_field(pid, "smaps_rollup", "Pss:")
            } else {
                None
            },
        }
    }
}

/// The machine, for the report.
pub fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    serde_json::json!({ "cpus": cpus, "cpu": cpu, "kernel": kernel })
}

/// Time the hypervisor took from this machine's CPUs (all of them, `steal` in
/// `/proc/stat`), in ms since boot. Counted in clock ticks (10 ms with the usual
/// `USER_HZ` of 100): coarse, but it tells a restart slowed by the virtual machine's CPUs
/// being taken away from one slowed by anything else.
pub fn steal_ms() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: u64 = cpu.split_whitespace().nth(8)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks as f64 * 1000.0 / hz as f64)
}
