//! Reporting readiness: the PID file, the service manager, and the previous generation.
//!
//! Order matters under systemd: the service manager hears `MAINPID=<this pid>` and
//! `READY=1` *before* the previous generation does, because the previous generation exits
//! soon after it hears, and systemd must already know who the main process is by then.

use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::server::Inner;

/// Sends a notify message, logging (not failing) if it cannot be delivered: the receiver
/// notices the silence (an upgrade times out and is rolled back, and says so).
pub(crate) fn tell(socket: &OsStr, message: &str) {
    if let Err(e) = crate::notify::send(socket, message) {
        crate::log::warning!(
            "cannot send {:?} to the notify socket {}: {e}",
            message.trim_end(),
            socket.to_string_lossy()
        );
    }
}

/// How a failed readiness check's status starts.
pub(crate) const CHECK_FAILED: &str = "readiness check failed: ";
/// How the status of a process that inherited listeners it did not ask for starts.
pub(crate) const UNCLAIMED: &str = "unclaimed inherited listeners: ";

/// Why a process did not report ready.
#[derive(Debug, Clone)]
pub(crate) enum Refusal {
    /// The application's readiness check failed, saying this.
    Check(String),
    /// It inherited these listeners and did not ask for them.
    Unclaimed(String),
}

impl Refusal {
    /// The error `serve` returns once what was accepted is drained.
    pub(crate) fn into_error(self) -> crate::Error {
        match self {
            Refusal::Check(message) => crate::Error::ReadyCheck { message },
            Refusal::Unclaimed(listeners) => crate::Error::UnclaimedListeners { listeners },
        }
    }

    /// The `STATUS=` sent with `ERRNO=`: the previous generation reads the reason back.
    fn status(&self) -> String {
        let (prefix, text) = match self {
            Refusal::Check(m) => (CHECK_FAILED, m.clone()),
            Refusal::Unclaimed(_) => (UNCLAIMED, self.clone().into_error().to_string()),
        };
        format!("{prefix}{}", text.replace('\n', " "))
    }
}

/// Reports ready, once.
pub(crate) fn report_ready(inner: &Arc<Inner>) {
    if inner.ready.swap(true, Ordering::SeqCst) {
        return;
    }
    if !inner.config.close_unclaimed {
        let unclaimed = inner.listeners().describe_unclaimed();
        if !unclaimed.is_empty() {
            return refuse(inner, Refusal::Unclaimed(unclaimed));
        }
    }
    match (&inner.ready_check, tokio::runtime::Handle::try_current()) {
        (Some(check), Ok(handle)) => {
            let (check, inner) = (check.clone(), inner.clone());
            handle.spawn(async move {
                match check().await {
                    Ok(()) => announce(&inner),
                    Err(e) => refuse(&inner, Refusal::Check(e.to_string())),
                }
            });
        }
        _ => announce(inner),
    }
}

/// This process will not report ready: say so to whoever waits for it (the previous
/// generation treats `ERRNO=` as a failed upgrade, with the status as its reason), and
/// stop; `serve` returns the error once what was accepted is drained.
fn refuse(inner: &Arc<Inner>, refusal: Refusal) {
    match &refusal {
        Refusal::Check(message) => crate::log::error!(
            "the readiness check failed: {message}; not reporting ready, stopping"
        ),
        Refusal::Unclaimed(_) => crate::log::error!("{}", refusal.clone().into_error()),
    }
    let report = format!("ERRNO=1\nSTATUS={}\n", refusal.status());
    if let Some(previous) = inner.notify.previous_generation() {
        tell(previous, &report);
    } else if let Some(manager) = inner.notify.manager() {
        tell(manager, &report);
    }
    *inner
        .ready_failure
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = Some(refusal);
    inner.begin_drain(crate::drain::DrainReason::Shutdown);
}

/// Says that this process serves: PID file, service manager, previous generation.
fn announce(inner: &Arc<Inner>) {
    inner.announced.store(true, Ordering::SeqCst);
    let pid = std::process::id();
    let addrs = {
        let mut set = inner.listeners();
        set.close_unclaimed();
        set.addresses()
    };
    // After a self-upgrade the previous generation writes this PID at its commit, once
    // it has stopped accepting: until then it is the one serving.
    if inner.master_pid.is_none() && !inner.notify.started_by_upgrade() {
        record_pid(inner, pid);
    }
    let status = format!("STATUS=serving on {}\n", addrs.join(", "));
    // First the channel on which the previous generation (or, under the master, the
    // previous worker) hands over its idle connections: it takes it once READY=1 is read.
    inner.handoff.connect_previous(inner.config.tcp_nodelay);
    if let Some(manager) = inner.notify.manager() {
        // Under the master: where the worker that replaces this one gets its connections.
        let handoff = match inner.master_pid {
            Some(_) if inner.config.hand_over_idle => inner
                .handoff
                .own_address()
                .map(|a| format!("REBORN_HANDOFF_SOCKET={}\n", a.to_string_lossy()))
                .unwrap_or_default(),
            _ => String::new(),
        };
        tell(
            manager,
            &format!("MAINPID={pid}\nREADY=1\n{status}{handoff}"),
        );
    }
    if let Some(previous) = inner.notify.previous_generation() {
        tell(previous, &format!("READY=1\nMAINPID={pid}\n{status}"));
    }
    tracing::info!(pid, "ready: serving on {}", addrs.join(", "));
    // After `READY=1`, so that a new generation's start-up does not wait for it.
    inner.files.fill();
}

/// Writes `pid` to `path` atomically (a temporary file renamed over it).
pub(crate) fn write_pid_file(path: &Path, pid: u32) -> crate::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{pid}.tmp"));
    let written =
        std::fs::write(&tmp, format!("{pid}\n")).and_then(|()| std::fs::rename(&tmp, path));
    written.map_err(|source| {
        // A full disk (or a rename that failed) must not leave the temporary file
        // behind, one per attempt.
        let _ = std::fs::remove_file(&tmp);
        crate::Error::PidFile {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// Writes `pid` to the PID file, if there is one, and logs a failure. The reserve of
/// descriptors makes room, for a process that is at its open-files limit.
pub(crate) fn record_pid(inner: &Inner, pid: u32) {
    if let Some(path) = &inner.config.pid_file {
        let _room = inner.files.release();
        if let Err(e) = write_pid_file(path, pid) {
            crate::log::error!("{e}");
        }
    }
}
