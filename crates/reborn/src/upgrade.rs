//! The upgrade: start the next generation with the listeners, wait for it to be ready or
//! to fail, then commit (this process drains) or roll back (the new one is stopped, this
//! one keeps serving).
//!
//! ```text
//!  serving ──SIGHUP / upgrade()──▶ spawning ──READY=1──▶ committed: stop accepting, drain, exit
//!     ▲                               │
//!     └── exit / exec error / timeout ┘ rolled back: the new process is stopped, the reason logged
//! ```
//!
//! One upgrade at a time: a request while one runs is refused and reported, never queued.
//! Once the new process is ready, *it* serves and takes the next upgrade, while this one
//! may still drain long requests: deploys in quick succession all take effect.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::activation::{ENV_NOTIFY_SOCKET, ENV_UPSTREAM_NOTIFY};
use crate::drain::{DrainReason, Phase};
use crate::notify::NotifyReceiver;
use crate::readiness::tell;
use crate::server::Inner;
use crate::spawn::SpawnSpec;

/// A finished upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Upgraded {
    /// The new generation's PID.
    pub pid: u32,
    /// From the start of the upgrade to the new generation's `READY=1`.
    pub took: Duration,
}

/// Why an upgrade did not happen. In every case the current process keeps serving.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpgradeError {
    /// Another upgrade is under way.
    #[error(
        "an upgrade is already in progress; this request was ignored, not queued (retry once it is done)"
    )]
    InProgress,
    /// This process has handed over, or is shutting down.
    #[error(
        "this process (pid {pid}) is draining and no longer serves: upgrade the serving process \
         instead (its PID is in the PID file)"
    )]
    Draining {
        /// This process's PID.
        pid: u32,
    },
    /// This process is in its shutdown delay
    /// ([`Builder::shutdown_delay`](crate::Builder::shutdown_delay)): it was told to stop.
    #[error(
        "this process (pid {pid}) is shutting down (in its shutdown delay) and starts no new \
         generation: start the new version in its place instead"
    )]
    ShuttingDown {
        /// This process's PID.
        pid: u32,
    },
    /// The reborn master does the upgrades.
    #[error(
        "this process runs under the reborn master (pid {master}), which does the upgrades: run \
         `reborn upgrade` or send SIGHUP to pid {master}"
    )]
    UnderMaster {
        /// The master's PID.
        master: u32,
    },
    /// The binary is not there.
    #[error(
        "the binary {path} is gone: put the new version at that path, then upgrade again \
         (the running version keeps serving)"
    )]
    BinaryMissing {
        /// The path.
        path: std::path::PathBuf,
    },
    /// The binary cannot be executed.
    #[error(
        "{path} is not executable ({reason}): fix it (e.g. chmod +x), then upgrade again (the running version keeps serving)"
    )]
    NotExecutable {
        /// The path.
        path: std::path::PathBuf,
        /// Why.
        reason: String,
    },
    /// Starting the new process failed otherwise.
    #[error("cannot start {path}: {source} (the running version keeps serving)")]
    Spawn {
        /// The path.
        path: std::path::PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The new process exited before it was ready.
    #[error(
        "the new process (pid {pid}) {status} before it was ready; its own output says why \
         (the running version keeps serving)"
    )]
    Exited {
        /// Its PID.
        pid: u32,
        /// How it ended.
        status: String,
    },
    /// The new process did not report ready in time.
    #[error(
        "the new process (pid {pid}) was not ready within {timeout:?} and was stopped (the \
         running version keeps serving); if start-up is really that slow, raise the ready \
         timeout"
    )]
    NotReady {
        /// Its PID.
        pid: u32,
        /// The timeout.
        timeout: Duration,
    },
    /// The new process reported ready, then died while this one was on probation
    /// ([`Builder::probation`](crate::Builder::probation)).
    #[error("{}", died_on_probation(*pid, status, *after, *resumed))]
    DiedOnProbation {
        /// Its PID.
        pid: u32,
        /// How it ended.
        status: String,
        /// How long after its `READY=1` it died.
        after: Duration,
        /// Whether this process took over again (false only when it was already being
        /// closed down, by the hammer).
        resumed: bool,
    },
    /// The new process's readiness check failed
    /// ([`Builder::ready_check`](crate::Builder::ready_check)).
    #[error(
        "the new process (pid {pid}) failed its readiness check: {message} (the running \
         version keeps serving)"
    )]
    NotHealthy {
        /// Its PID.
        pid: u32,
        /// What the check said.
        message: String,
    },
    /// The new process refused to report ready for a reason of its own (it inherited a
    /// listener it did not ask for: see
    /// [`Builder::close_unclaimed_listeners`](crate::Builder::close_unclaimed_listeners)).
    #[error(
        "the new process (pid {pid}) refused to report ready: {message} (the running version keeps serving)"
    )]
    Refused {
        /// Its PID.
        pid: u32,
        /// Why.
        message: String,
    },
    /// The working directory the process was started in cannot be entered.
    #[error(
        "cannot start the new version in the working directory {dir}: {source}; the running \
         version keeps serving (recreate the directory, or start the service from one that \
         stays)"
    )]
    WorkingDirectory {
        /// The directory.
        dir: std::path::PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The readiness socket could not be made or read.
    #[error("cannot listen for the new process's readiness: {0}")]
    Notify(#[source] std::io::Error),
    /// This process is out of file descriptors (or the system is), even after giving back
    /// the reserve it keeps for upgrades.
    #[error(
        "cannot start {path}: out of file descriptors: {advice} (the running version keeps serving)"
    )]
    OutOfFiles {
        /// The path.
        path: std::path::PathBuf,
        /// How many are open, the limit, and what to raise.
        advice: String,
    },
}

fn died_on_probation(pid: u32, status: &str, after: Duration, resumed: bool) -> String {
    let me = std::process::id();
    let how = status.strip_prefix("was ").unwrap_or(status);
    let head = format!(
        "pid {pid} (the new version) died {:.1} s after it was ready ({how})",
        after.as_secs_f64()
    );
    if resumed {
        format!("{head}: rolled back, pid {me} serves again")
    } else {
        format!("{head}; pid {me} was already closing down and could not take over")
    }
}

/// Runs one upgrade.
pub(crate) async fn upgrade(inner: &Arc<Inner>) -> Result<Upgraded, UpgradeError> {
    if let Some(master) = inner.master_pid {
        return Err(UpgradeError::UnderMaster { master });
    }
    let _one_at_a_time = inner
        .upgrade_lock
        .try_lock()
        .map_err(|_| UpgradeError::InProgress)?;
    if inner.drain.phase() != Phase::Serving {
        return Err(UpgradeError::Draining {
            pid: std::process::id(),
        });
    }
    if inner.in_shutdown_delay() {
        return Err(UpgradeError::ShuttingDown {
            pid: std::process::id(),
        });
    }
    let started = Instant::now();
    let path = inner.exe.clone();
    check_executable(&path)?;
    tracing::info!(path = %path.display(), "upgrading: starting the binary on disk");
    let manager = inner.notify.manager().cloned();
    if let Some(m) = &manager {
        let reloading = crate::notify::NotifyMessage {
            reloading: true,
            status: Some("upgrading".into()),
            ..Default::default()
        };
        tell(m, &reloading.encode());
    }
    let result = spawn_and_wait(inner, &path, manager.as_deref(), started).await;
    if let Err(e) = &result
        && let Some(m) = &manager
    {
        // The new process may have told the manager it is the main process before it
        // failed: this one is, still.
        tell(
            m,
            &format!(
                "MAINPID={}\nREADY=1\nSTATUS=upgrade failed: {e}\n",
                std::process::id()
            ),
        );
    }
    result
}

fn check_executable(path: &std::path::Path) -> Result<(), UpgradeError> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(UpgradeError::BinaryMissing {
            path: path.to_path_buf(),
        }),
        Err(e) => Err(UpgradeError::Spawn {
            path: path.to_path_buf(),
            source: e,
        }),
        Ok(m) if !m.is_file() => Err(UpgradeError::NotExecutable {
            path: path.to_path_buf(),
            reason: "not a regular file".into(),
        }),
        Ok(m) if m.permissions().mode() & 0o111 == 0 => Err(UpgradeError::NotExecutable {
            path: path.to_path_buf(),
            reason: "no execute permission".into(),
        }),
        Ok(_) => Ok(()),
    }
}

async fn spawn_and_wait(
    inner: &Arc<Inner>,
    path: &std::path::Path,
    manager: Option<&std::ffi::OsStr>,
    started: Instant,
) -> Result<Upgraded, UpgradeError> {
    let out_of_files = |e: &std::io::Error| UpgradeError::OutOfFiles {
        path: path.to_path_buf(),
        advice: crate::files::advice(e),
    };
    // A process full of connections may be at its open-files limit: the reserve makes
    // room for the notify socket and the spawn, and is taken again once it has started.
    let reserve = inner.files.release();
    // Linux: an abstract name, nothing on disk. Elsewhere: a socket in a private
    // directory.
    #[cfg(reborn_linux)]
    let receiver = NotifyReceiver::new_abstract();
    #[cfg(not(reborn_linux))]
    let receiver = NotifyReceiver::new();
    let receiver = receiver.map_err(|e| {
        if crate::files::exhausted(&e) {
            out_of_files(&e)
        } else {
            UpgradeError::Notify(e)
        }
    })?;
    // The channel on which idle connections will go to the new process, once ready.
    let handoff = if inner.config.hand_over_idle {
        crate::handoff::HandoffListener::new()
            .inspect_err(|e| tracing::debug!("no connection handoff for this upgrade: {e}"))
            .ok()
    } else {
        None
    };
    let spawn_err = |source: std::io::Error| match source.kind() {
        _ if crate::files::exhausted(&source) => out_of_files(&source),
        _ if source
            .get_ref()
            .is_some_and(|e| e.is::<crate::spawn::WorkingDirError>()) =>
        {
            let kind = source.kind();
            match source
                .into_inner()
                .map(|e| e.downcast::<crate::spawn::WorkingDirError>())
            {
                Some(Ok(e)) => UpgradeError::WorkingDirectory {
                    dir: e.dir,
                    source: e.source,
                },
                _ => UpgradeError::WorkingDirectory {
                    dir: inner.process.cwd.clone().unwrap_or_default(),
                    source: kind.into(),
                },
            }
        }
        std::io::ErrorKind::NotFound => UpgradeError::BinaryMissing {
            path: path.to_path_buf(),
        },
        std::io::ErrorKind::PermissionDenied => UpgradeError::NotExecutable {
            path: path.to_path_buf(),
            reason: source.to_string(),
        },
        _ if source.raw_os_error() == Some(libc::ENOEXEC) => UpgradeError::NotExecutable {
            path: path.to_path_buf(),
            reason: "not a program this system can run".into(),
        },
        _ => UpgradeError::Spawn {
            path: path.to_path_buf(),
            source,
        },
    };
    // "Text file busy": the file is being written right now (a deploy still copying
    // it). Give the writer a moment rather than fail the upgrade.
    let mut busy_retries = crate::spawn::BUSY_RETRIES;
    let mut child = loop {
        match spawn_child(inner, path, manager, &receiver, handoff.as_ref()) {
            Err(e) if crate::spawn::is_busy(&e) && busy_retries > 0 => {
                busy_retries -= 1;
                tracing::info!(path = %path.display(), "the binary is busy (still being written?); retrying");
                tokio::time::sleep(crate::spawn::BUSY_PAUSE).await;
            }
            other => break other.map_err(spawn_err)?,
        }
    };
    drop(reserve);
    let pid = child.id();
    tracing::info!(pid, "new process started; waiting for it to be ready");
    let timeout = inner.config.ready_timeout;
    let shutdown = inner.drain.shutdown();
    let outcome = tokio::select! {
        // An exit is looked at first: a process that said READY=1 and died at once
        // must not be committed to.
        biased;
        status = child.wait() => {
            let exited = UpgradeError::Exited {
                pid,
                status: match status {
                    Ok(s) => describe_exit(s),
                    Err(e) => format!("could not be waited for ({e})"),
                },
            };
            // A process that refused to report ready (a failed readiness check,
            // unclaimed listeners) said why before it drained and exited: that datagram
            // is already queued, and is the better reason.
            match tokio::time::timeout(REFUSAL_AFTER_EXIT, wait_ready(&receiver, pid)).await {
                Ok(Err(refused @ (UpgradeError::NotHealthy { .. } | UpgradeError::Refused { .. }))) => {
                    Err(refused)
                }
                _ => Err(exited),
            }
        }
        ready = wait_ready(&receiver, pid) => ready,
        // A shutdown while the new process starts: it must not be left serving alone.
        () = shutdown.draining() => Err(UpgradeError::Draining { pid: std::process::id() }),
        () = tokio::time::sleep(timeout) => Err(UpgradeError::NotReady { pid, timeout }),
    };
    // Still alive at the moment of the commit?
    let outcome = match (outcome, child.try_wait()) {
        (Ok(()), Ok(Some(status))) => Err(UpgradeError::Exited {
            pid,
            status: describe_exit(status),
        }),
        (outcome, _) => outcome,
    };
    let probation = inner.config.probation;
    let committed = match outcome {
        Ok(()) => commit(inner, pid, probation, handoff.as_ref()),
        Err(e) => Err(e),
    };
    drop(handoff);
    match committed {
        Ok(()) => {
            crate::readiness::record_pid(inner, pid);
            let upgraded = Upgraded {
                pid,
                took: started.elapsed(),
            };
            if !probation.is_zero() {
                return crate::probation::watch(inner, child, receiver, upgraded, probation).await;
            }
            // Reap the new process if it ends while this one still drains.
            tokio::spawn(async move {
                let _ = child.wait().await;
            });
            Ok(upgraded)
        }
        Err(e) => {
            stop(inner, child);
            Err(e)
        }
    }
}

/// Waits for the new process's `READY=1`; a report of failure (`ERRNO=`, as a failed
/// readiness check sends) is an error with the status it came with.
/// How long an exited new process's queued notify messages are read for its refusal.
const REFUSAL_AFTER_EXIT: Duration = Duration::from_millis(50);

async fn wait_ready(receiver: &NotifyReceiver, pid: u32) -> Result<(), UpgradeError> {
    loop {
        let msg = receiver.recv().await.map_err(UpgradeError::Notify)?;
        if msg.errno.is_some() {
            let status = msg.status.unwrap_or_default();
            if let Some(message) = status.strip_prefix(crate::readiness::UNCLAIMED) {
                return Err(UpgradeError::Refused {
                    pid,
                    message: message.to_owned(),
                });
            }
            return Err(UpgradeError::NotHealthy {
                pid,
                message: match status.strip_prefix(crate::readiness::CHECK_FAILED) {
                    Some(message) => message.to_owned(),
                    None if status.is_empty() => {
                        format!("it reported errno {}", msg.errno.unwrap_or(0))
                    }
                    None => status,
                },
            });
        }
        if msg.ready {
            return Ok(());
        }
        if let Some(status) = &msg.status {
            tracing::info!(status = %status, "the new process reports");
        }
    }
}

/// Starts the new generation with this process's program, arguments, environment,
/// working directory and listeners.
fn spawn_child(
    inner: &Inner,
    path: &std::path::Path,
    manager: Option<&std::ffi::OsStr>,
    receiver: &NotifyReceiver,
    handoff: Option<&crate::handoff::HandoffListener>,
) -> std::io::Result<crate::spawn::SpawnedChild> {
    let listeners = inner.listeners();
    let p = &inner.process;
    let mut spec = SpawnSpec::new(path)
        .arg0(p.arg0.clone())
        .args(p.args.iter().cloned())
        .envs(p.env.iter().cloned())
        .env(ENV_NOTIFY_SOCKET, receiver.address())
        .env(ENV_UPSTREAM_NOTIFY, manager.unwrap_or_default());
    if let Some(handoff) = handoff {
        spec = spec.env(crate::activation::ENV_HANDOFF, handoff.address());
    }
    if let Some(dir) = &p.cwd {
        spec = spec.current_dir(dir);
        if let Some(fd) = &p.cwd_fd {
            use std::os::fd::AsFd;
            spec = spec.current_dir_fd(fd.as_fd());
        }
    }
    for (fd, name) in listeners.handed() {
        spec = spec.socket(fd, name);
    }
    spec.spawn()
}

/// Commits to the new process `pid`, ready: it serves, and this process drains (after
/// a probation of `probation`, unless zero). Called off, with why, when this process
/// was told to stop while the new one started: a stop must not be undone by an upgrade.
/// One at a time with a stop signal's decision ([`Inner::stop_or_commit`]).
fn commit(
    inner: &Arc<Inner>,
    pid: u32,
    probation: Duration,
    handoff: Option<&crate::handoff::HandoffListener>,
) -> Result<(), UpgradeError> {
    let _one_at_a_time = inner.stop_or_commit();
    let me = std::process::id();
    // A shutdown delay that began while the new process was starting.
    if inner.in_shutdown_delay() {
        return Err(UpgradeError::ShuttingDown { pid: me });
    }
    if !probation.is_zero() {
        // Before the drain starts, so that the accept loops know to wait.
        inner.probation.begin();
    }
    if let Some(sender) = handoff.and_then(|l| l.take_child(pid)) {
        // Before the drain starts: its connections learn from it whether to close. On
        // probation, they wait for it to pass.
        inner.handoff.set_outbox(sender, probation.is_zero());
    }
    if inner.begin_drain(DrainReason::Upgraded { successor: pid }) {
        return Ok(());
    }
    // A shutdown began while the new process was starting: its drain is not the
    // upgrade's, and the new process must not serve.
    inner.probation.clear();
    inner.handoff.close();
    Err(UpgradeError::Draining { pid: me })
}

/// Stops a rolled-back process: `SIGTERM` (it drains what it may have accepted), then
/// `SIGKILL` after the stop timeout; reaped in the background. Once it is gone, the
/// listeners it shared are made non-blocking again if it had changed them.
fn stop(inner: &Arc<Inner>, mut child: crate::spawn::SpawnedChild) {
    let grace = inner.config.stop_timeout;
    child.signal(libc::SIGTERM);
    inner
        .listeners()
        .restore_nonblocking("after the failed upgrade");
    let inner = inner.clone();
    tokio::spawn(async move {
        if tokio::time::timeout(grace, child.wait()).await.is_err() {
            crate::log::warning!(
                "the rolled-back process ignored SIGTERM for {grace:?}: killing it"
            );
            child.signal(libc::SIGKILL);
            let _ = child.wait().await;
        }
        inner
            .listeners()
            .restore_nonblocking("after the failed upgrade");
    });
}

pub(crate) fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!(
            "was killed by signal {sig} ({})",
            nix::sys::signal::Signal::try_from(sig)
                .map(|s| s.as_str())
                .unwrap_or("?")
        ),
        _ => "ended".into(),
    }
}
