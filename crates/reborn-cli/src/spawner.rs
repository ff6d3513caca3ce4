//! Starting workers, from one dedicated thread that lives as long as the master.
//!
//! Workers are armed with `PR_SET_PDEATHSIG(SIGKILL)` so that they never outlive a master
//! that is killed (a restarted master would otherwise find its port taken by an orphan).
//! The kernel fires that signal when the *thread* that forked the child exits, not the
//! process; the runtime's threads are not meant to be relied on for that, so every fork
//! happens here, on a thread that only ends with the process.
//!
//! The fork itself is `reborn::spawn::SpawnSpec`: everything is prepared before the fork
//! and only async-signal-safe calls run between fork and exec. A program file that is
//! busy (still open for writing) is tried again for up to a second, as a self-upgrade
//! does. The listening sockets are owned by this thread; the rest of the master only
//! refers to them by index.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::mpsc;

use tokio::sync::mpsc::UnboundedSender;

use crate::supervisor::Event;

/// One worker to start.
#[derive(Debug)]
pub struct SpawnJob {
    /// The worker's generation, echoed back in [`Event::Spawned`].
    pub generation: u64,
    /// The program, resolved to a path.
    pub program: PathBuf,
    /// `argv[0]`, as the user wrote it.
    pub arg0: OsString,
    /// The other arguments.
    pub args: Vec<OsString>,
    /// The worker's environment, including `NOTIFY_SOCKET` and `REBORN_MASTER_PID`.
    pub env: Vec<(OsString, OsString)>,
    /// The program file, held open: what is executed (so that the file that ran is the
    /// one pinned if it proves good), whatever `program` names by then.
    pub binary: Option<Arc<crate::pinned::Binary>>,
}

/// The handle the supervisor keeps: a queue into the spawning thread.
#[derive(Debug, Clone)]
pub struct Spawner {
    jobs: mpsc::Sender<SpawnJob>,
}

impl Spawner {
    /// Starts the spawning thread, which owns `sockets` (handed to every worker at fds
    /// 3.. in this order, with these names) and reports each outcome on `events`.
    pub fn start(
        sockets: Vec<(OwnedFd, Option<String>)>,
        events: UnboundedSender<Event>,
    ) -> io::Result<Spawner> {
        let (tx, rx) = mpsc::channel::<SpawnJob>();
        let master_pid = std::process::id() as libc::pid_t;
        std::thread::Builder::new()
            .name("reborn-spawner".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                for job in rx {
                    let generation = job.generation;
                    let result = spawn_one(&sockets, job, master_pid);
                    if events.send(Event::Spawned { generation, result }).is_err() {
                        break;
                    }
                }
                // The supervisor has gone: the process is exiting. Keep this thread (and
                // so the workers' parent-death signal) until the process ends.
                loop {
                    std::thread::park();
                }
            })?;
        Ok(Spawner { jobs: tx })
    }

    /// Queues a worker to start; the outcome arrives as [`Event::Spawned`].
    pub fn spawn(&self, job: SpawnJob) -> Result<(), SpawnJob> {
        self.jobs.send(job).map_err(|e| e.0)
    }
}

fn spawn_one(
    sockets: &[(OwnedFd, Option<String>)],
    job: SpawnJob,
    master_pid: libc::pid_t,
) -> io::Result<u32> {
    let mut spec = reborn::spawn::SpawnSpec::new(&job.program)
        .arg0(job.arg0)
        .args(job.args)
        .parent_death_signal(libc::SIGKILL, master_pid);
    for (k, v) in job.env {
        spec = spec.env(k, v);
    }
    for (fd, name) in sockets {
        spec = spec.socket(fd.as_fd(), name.clone());
    }
    // A script runs by its path: its interpreter would see `/dev/fd/N` as `$0`, which
    // breaks wrappers that look at their own name (pyenv's shims, for one).
    if let Some(binary) = job.binary.as_ref().filter(|b| !b.script) {
        spec = spec.program_fd(binary.fd.as_fd(), false);
    }
    let mut cmd = spec.command()?;
    cmd.stdin(Stdio::null());
    // A process group of its own (setpgid in the child, before exec: async-signal-safe),
    // so that what the worker starts is stopped with it (see `crate::groups`).
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    // "Text file busy": the program is still being written (a deploy still copying it).
    // Give the writer a moment rather than fail the start, as a self-upgrade does.
    let mut busy_retries = reborn::spawn::BUSY_RETRIES;
    let child = loop {
        match cmd.spawn() {
            Err(e) if reborn::spawn::is_busy(&e) && busy_retries > 0 => {
                busy_retries -= 1;
                tracing::info!(program = %job.program.display(), "the program is busy (still being written?); retrying");
                std::thread::sleep(reborn::spawn::BUSY_PAUSE);
            }
            other => break other?,
        }
    };
    // The reaper collects the status; dropping `Child` does not wait.
    Ok(child.id())
}
