//! The supervisor: the master's state machine, driven by one event loop.
//!
//! Everything that changes the master's state happens on one task, in [`Supervisor::run`]:
//! signals, child exits (through the [`crate::reaper`]), readiness reports,
//! timers, spawn outcomes and control commands all arrive here as [`Event`]s or signal
//! wake-ups, so no state is shared and no lock is needed. Timers are small tasks that
//! send an event naming the generation they are for; an event for a generation that has
//! moved on is ignored.
//!
//! A worker is `starting` (spawned, not ready), `serving` (the current generation) or
//! `draining` (told to stop, `SIGKILL` at its deadline). Starting workers have a purpose:
//! an *upgrade* replaces the serving worker when it becomes ready and is rolled back if it
//! fails; a *replacement* starts a worker when none serves (the first one, or after a
//! crash). At most one upgrade is in flight; many generations may drain at once.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use reborn::notify::{NotifyDir, NotifyMessage, NotifyReceiver};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::sync::oneshot;
use tokio::task::AbortHandle;

use crate::cli::ReadyMode;
use crate::control::{ListenerStatus, Reply, Request, Status, UpgradeStatus, WorkerStatus};
use crate::groups;
use crate::pinned::Binary;
use crate::reaper;
use crate::sdnotify::Upstream;
use crate::sockets;
use crate::spawner::{SpawnJob, Spawner};

/// The master's signal handlers. Installed before anything announces the master (the
/// control socket, the PID file), so that a signal sent as soon as it is visible is
/// handled, not fatal.
pub struct MasterSignals {
    chld: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
    usr2: tokio::signal::unix::Signal,
    tstp: tokio::signal::unix::Signal,
}

impl MasterSignals {
    /// Installs the handlers; needs the runtime.
    pub fn install() -> io::Result<MasterSignals> {
        Ok(MasterSignals {
            chld: signal(SignalKind::child())?,
            hup: signal(SignalKind::hangup())?,
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            usr1: signal(SignalKind::user_defined1())?,
            usr2: signal(SignalKind::user_defined2())?,
            tstp: signal(SignalKind::from_raw(libc::SIGTSTP))?,
        })
    }
}

/// The first wait before restarting a crashed worker; it doubles up to the ceiling.
const BACKOFF_START: Duration = Duration::from_millis(100);
/// A worker that served this long was healthy: the crash count starts over.
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// From this many crashes in a row the master says the worker keeps crashing.
const CRASH_LOOP: u32 = 5;

/// Something that happened, for the supervisor to act on.
#[derive(Debug)]
pub enum Event {
    /// The spawning thread started (or failed to start) a worker.
    Spawned {
        /// The worker's generation.
        generation: u64,
        /// Its PID, or why it could not start.
        result: io::Result<u32>,
    },
    /// A worker sent a notify datagram.
    Notify {
        /// The worker's generation.
        generation: u64,
        /// What it said.
        message: NotifyMessage,
    },
    /// A readiness probe succeeded.
    ProbeReady {
        /// The worker's generation.
        generation: u64,
    },
    /// A starting worker's readiness deadline passed.
    ReadyTimeout {
        /// The worker's generation.
        generation: u64,
    },
    /// A serving worker's probation window is over.
    ProbationOver {
        /// The worker's generation.
        generation: u64,
    },
    /// The deadline of the processes a worker left behind in its group passed.
    GroupDeadline {
        /// The group (the gone worker's PID).
        pgid: u32,
    },
    /// The serving worker failed its liveness probe too often in a row.
    LivenessFailed {
        /// The worker's generation.
        generation: u64,
        /// What failed, for the log.
        reason: String,
    },
    /// A draining worker's deadline passed.
    DrainDeadline {
        /// The worker's generation.
        generation: u64,
    },
    /// The back-off wait before a restart is over.
    Restart {
        /// Which scheduled restart this is; stale ones are ignored.
        token: u64,
    },
    /// The shutdown delay after `SIGTERM` is over: stop now.
    ShutdownDelayOver,
    /// A command from the control socket.
    Control {
        /// The command.
        request: Request,
        /// Where the answer goes.
        reply: oneshot::Sender<Reply>,
    },
}

/// What the supervisor runs, and how.
#[derive(Debug)]
pub struct Config {
    /// The service name.
    pub name: String,
    /// The program as given (looked up again at each start).
    pub program: OsString,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// The environment passed on to workers (the protocol variables excluded).
    pub env: Vec<(OsString, OsString)>,
    /// How readiness is detected.
    pub ready: ReadyMode,
    /// How long a worker may take to be ready.
    pub ready_timeout: Duration,
    /// The signal that starts a worker's drain.
    pub stop_signal: Signal,
    /// How long a worker may drain.
    pub drain_timeout: Duration,
    /// The longest back-off between restarts.
    pub backoff_max: Duration,
    /// How long a new worker's death makes the master go back to the last good binary.
    pub probation: Duration,
    /// The listeners, for `status`.
    pub listeners: Vec<ListenerStatus>,
    /// Their socket inodes (as in `/proc/PID/fd`), in the same order, to tell whether a
    /// worker uses them.
    pub listener_inodes: Vec<Option<u64>>,
    /// The serving worker's liveness probe, if any.
    pub liveness: Option<crate::readiness::Liveness>,
    /// How long the master keeps its worker serving after `SIGTERM`, reporting not
    /// ready, before it stops it.
    pub shutdown_delay: Duration,
    /// The signal whose stop waits out the shutdown delay (`SIGTERM` or `SIGINT`).
    pub shutdown_delay_signal: Signal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    Upgrade,
    Replace,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Starting(Purpose),
    Serving,
    Draining,
}

#[derive(Debug)]
struct Worker {
    generation: u64,
    pid: Option<u32>,
    started: Instant,
    ready_at: Option<Instant>,
    role: Role,
    stop_sent: bool,
    /// When it was told to stop (its stop signal sent).
    stop_sent_at: Option<Instant>,
    /// It was sent `SIGKILL` on purpose, and why.
    killed_for: Option<&'static str>,
    /// It does not use some of the master's listeners (see [`crate::sockets`]).
    listener_problem: Option<String>,
    /// `READY=1` arrived before the PID did.
    ready_early: bool,
    /// It sent at least one notify message.
    said_anything: bool,
    status: Option<String>,
    _notify: Arc<NotifyReceiver>,
    watcher: AbortHandle,
    probe: Option<AbortHandle>,
    /// Its liveness probe, while it serves.
    liveness: Option<AbortHandle>,
    /// Its pending timers (ready timeout, drain deadline): cancelled once they cannot
    /// matter, so that frequent upgrades do not pile up sleeping tasks.
    ready_timer: Option<AbortHandle>,
    drain_timer: Option<AbortHandle>,
    probation_timer: Option<AbortHandle>,
    /// Ready, and its probation not over yet.
    on_probation: bool,
    /// Its program file, held open (see [`crate::pinned`]).
    binary: Option<Arc<Binary>>,
    /// Where the worker that replaces it is handed its idle keep-alive connections
    /// (`REBORN_HANDOFF_SOCKET`, said by a worker built on reborn with `READY=1`).
    handoff: Option<OsString>,
}

impl Worker {
    fn label(&self) -> String {
        match self.pid {
            Some(pid) => format!("generation {} (pid {pid})", self.generation),
            None => format!("generation {}", self.generation),
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.watcher.abort();
        for task in [
            &self.probe,
            &self.liveness,
            &self.ready_timer,
            &self.drain_timer,
            &self.probation_timer,
        ]
        .into_iter()
        .flatten()
        {
            task.abort();
        }
    }
}

#[derive(Debug)]
struct UpgradeInFlight {
    generation: u64,
    started: Instant,
    waiters: Vec<oneshot::Sender<Reply>>,
}

#[derive(Debug)]
struct UpgradeOutcome {
    generation: u64,
    ok: bool,
    message: String,
    duration: Duration,
    at: Instant,
}

/// The master's state.
pub struct Supervisor {
    cfg: Config,
    events: UnboundedSender<Event>,
    spawner: Spawner,
    upstream: Upstream,
    started: Instant,
    workers: BTreeMap<u64, Worker>,
    pids: HashMap<u32, u64>,
    spawning: usize,
    last_generation: u64,
    current: Option<u64>,
    upgrade: Option<UpgradeInFlight>,
    last_upgrade: Option<UpgradeOutcome>,
    crashes: u64,
    crashes_in_a_row: u32,
    restart_token: u64,
    /// The pending back-off restart's timer.
    restart_timer: Option<AbortHandle>,
    /// The private directory of the workers' notify sockets, made with the first worker.
    notify_dir: Option<NotifyDir>,
    stopping: bool,
    ever_ready: bool,
    /// The last good binary: of the last generation that passed its probation.
    pinned: Option<(u64, Arc<Binary>)>,
    /// `reborn upgrade` clients waiting for the end of a new worker's probation.
    probation_waiters: Vec<(u64, oneshot::Sender<Reply>)>,
    /// Why the master gives up (the first worker could not start at all): the loop ends
    /// and the master exits non-zero with this reason.
    fatal: Option<String>,
    /// In the shutdown delay: the worker serves on, the health listener says 503.
    delaying: bool,
    /// What the health listener says (see [`crate::health`]).
    health: tokio::sync::watch::Sender<crate::health::Readiness>,
    /// Groups whose leader (a worker) has gone while other processes of the group live:
    /// they are being stopped; `SIGKILL` at their deadline, or when the master exits.
    lingering: BTreeMap<u32, Lingering>,
}

/// What a gone worker left behind in its process group.
#[derive(Debug)]
struct Lingering {
    label: String,
    deadline: AbortHandle,
}

/// Formats a duration for people: `85ms`, `2.5s`.
pub fn human(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else if d < Duration::from_secs(60) {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        format!("{}m{}s", d.as_secs() / 60, d.as_secs() % 60)
    }
}

impl Supervisor {
    /// A supervisor with no worker yet.
    pub fn new(
        cfg: Config,
        events: UnboundedSender<Event>,
        spawner: Spawner,
        upstream: Upstream,
    ) -> Supervisor {
        Supervisor {
            cfg,
            events,
            spawner,
            upstream,
            started: Instant::now(),
            workers: BTreeMap::new(),
            pids: HashMap::new(),
            spawning: 0,
            last_generation: 0,
            current: None,
            upgrade: None,
            last_upgrade: None,
            crashes: 0,
            crashes_in_a_row: 0,
            restart_token: 0,
            restart_timer: None,
            notify_dir: None,
            stopping: false,
            ever_ready: false,
            pinned: None,
            probation_waiters: Vec::new(),
            fatal: None,
            delaying: false,
            health: tokio::sync::watch::Sender::new(Err("starting")),
            lingering: BTreeMap::new(),
        }
    }

    /// Starts the first worker and runs until the master has stopped and every worker has
    /// exited.
    pub async fn run(
        mut self,
        signals: MasterSignals,
        mut events: UnboundedReceiver<Event>,
    ) -> io::Result<()> {
        let MasterSignals {
            mut chld,
            mut hup,
            mut term,
            mut int,
            mut usr1,
            mut usr2,
            mut tstp,
        } = signals;

        if let Err(reason) = self.start_worker(Purpose::Replace) {
            return Err(io::Error::other(reason));
        }
        loop {
            tokio::select! {
                _ = chld.recv() => self.reap_children(),
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: upgrading");
                    self.request_upgrade(None);
                }
                _ = term.recv() => self.on_stop_signal(Signal::SIGTERM),
                _ = int.recv() => self.on_stop_signal(Signal::SIGINT),
                _ = usr1.recv() => self.forward(Signal::SIGUSR1),
                _ = usr2.recv() => self.forward(Signal::SIGUSR2),
                _ = tstp.recv() => self.forward(Signal::SIGTSTP),
                event = events.recv() => match event {
                    Some(event) => self.handle(event),
                    None => break,
                },
            }
            self.publish_health();
            if let Some(reason) = self.fatal.take() {
                self.upstream.status(reason.clone());
                self.kill_lingering();
                return Err(io::Error::other(reason));
            }
            if self.stopping
                && self.workers.is_empty()
                && self.spawning == 0
                && self.lingering.is_empty()
            {
                break;
            }
        }
        tracing::info!("every worker has exited; the master exits");
        self.kill_lingering();
        Ok(())
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Spawned { generation, result } => self.on_spawned(generation, result),
            Event::Notify {
                generation,
                message,
            } => self.on_notify(generation, message),
            Event::ProbeReady { generation } => self.on_ready(generation, "probe"),
            Event::ReadyTimeout { generation } => self.on_ready_timeout(generation),
            Event::DrainDeadline { generation } => self.on_drain_deadline(generation),
            Event::GroupDeadline { pgid } => self.on_group_deadline(pgid),
            Event::LivenessFailed { generation, reason } => {
                self.on_liveness_failed(generation, reason)
            }
            Event::ProbationOver { generation } => self.on_probation_over(generation),
            Event::ShutdownDelayOver => {
                if self.delaying {
                    self.request_stop("the shutdown delay is over", true);
                }
            }
            Event::Restart { token } => self.on_restart(token),
            Event::Control { request, reply } => match request {
                Request::Status => {
                    self.recheck_listeners();
                    let mut r = Reply::ok("status");
                    r.status = Some(self.status());
                    let _ = reply.send(r);
                }
                Request::Upgrade => self.request_upgrade(Some(reply)),
                Request::Stop => {
                    let pid = std::process::id();
                    let _ = reply.send(Reply::ok(format!("stopping the master (pid {pid})")));
                    self.request_stop("a stop command", false);
                }
            },
        }
    }

    // ---- starting workers -------------------------------------------------------------

    fn start_worker(&mut self, purpose: Purpose) -> Result<u64, String> {
        let (program, binary) = match (purpose, &self.pinned) {
            // A restart runs the last good binary; only an upgrade reads the path again.
            (Purpose::Replace, Some((_, pinned))) => (pinned.path.clone(), Some(pinned.clone())),
            _ => {
                let program = self.resolve_program()?;
                let binary = Binary::open(&program).ok().map(Arc::new);
                (program, binary)
            }
        };
        let generation = self.last_generation + 1;
        let notify = self
            .worker_notify_socket(generation)
            .map(Arc::new)
            .map_err(|e| format!("cannot create a notify socket for the worker: {e}"))?;
        self.last_generation = generation;
        let mut env = self.cfg.env.clone();
        env.push(("NOTIFY_SOCKET".into(), notify.address()));
        env.push((
            reborn::activation::ENV_MASTER_PID.into(),
            std::process::id().to_string().into(),
        ));
        // A worker built on reborn takes the serving worker's idle connections once it is
        // ready (and that one keeps them through the new one's probation).
        let handoff = self
            .current
            .and_then(|g| self.workers.get(&g))
            .and_then(|w| w.handoff.clone());
        if let Some(handoff) = handoff {
            env.push((reborn::activation::ENV_HANDOFF.into(), handoff));
        }
        env.push((
            reborn::activation::ENV_MASTER_PROBATION.into(),
            self.cfg.probation.as_millis().to_string().into(),
        ));
        let job = SpawnJob {
            generation,
            program,
            arg0: self.cfg.program.clone(),
            args: self.cfg.args.clone(),
            env,
            binary: binary.clone(),
        };
        if self.spawner.spawn(job).is_err() {
            return Err("the spawning thread has stopped".into());
        }
        self.spawning += 1;
        let watcher =
            crate::readiness::watch_notify(generation, notify.clone(), self.events.clone());
        let ready_timer = self.after(self.cfg.ready_timeout, Event::ReadyTimeout { generation });
        self.workers.insert(
            generation,
            Worker {
                generation,
                pid: None,
                started: Instant::now(),
                ready_at: None,
                role: Role::Starting(purpose),
                stop_sent: false,
                stop_sent_at: None,
                killed_for: None,
                listener_problem: None,
                ready_early: false,
                said_anything: false,
                status: None,
                _notify: notify,
                watcher,
                probe: None,
                liveness: None,
                ready_timer: Some(ready_timer),
                drain_timer: None,
                probation_timer: None,
                on_probation: false,
                binary,
                handoff: None,
            },
        );
        Ok(generation)
    }

    /// The program now at the configured path.
    fn resolve_program(&self) -> Result<std::path::PathBuf, String> {
        let program = reborn::spawn::resolve_program(&self.cfg.program).ok_or_else(|| {
            format!(
                "cannot find {:?} in PATH; give the program's path",
                self.cfg.program
            )
        })?;
        if reborn::spawn::is_executable_file(&program) {
            return Ok(program);
        }
        let shown = program.display();
        Err(match std::fs::metadata(&program) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => format!(
                "{shown} is missing (no such file); check the path, or deploy the program there"
            ),
            Err(e) => {
                format!("{shown} cannot be looked at ({e}); check the path and its permissions")
            }
            Ok(m) if m.is_dir() => {
                format!("{shown} is a directory, not a program; give the program inside it")
            }
            Ok(_) => format!(
                "{shown} is not executable; `chmod +x {shown}` (or run it through its \
                 interpreter, e.g. -- python3 {shown})"
            ),
        })
    }

    fn on_spawned(&mut self, generation: u64, result: io::Result<u32>) {
        self.spawning = self.spawning.saturating_sub(1);
        match result {
            Ok(pid) => {
                self.pids.insert(pid, generation);
                let probe =
                    crate::readiness::start_probe(generation, &self.cfg.ready, self.events.clone());
                if let Some(w) = self.workers.get_mut(&generation) {
                    w.pid = Some(pid);
                    w.probe = probe;
                    tracing::info!(generation, pid, "started a worker");
                    if w.role == Role::Draining {
                        // Told to stop while it was being started.
                        self.stop_worker(generation);
                    } else if w.ready_early {
                        self.on_ready(generation, "READY=1");
                    }
                }
            }
            Err(e) => {
                let hint = match e.raw_os_error() {
                    Some(libc::ENOEXEC) => "; a script needs a #! line",
                    Some(libc::ENOENT) => {
                        "; the program, or the interpreter its #! line names, does not exist"
                    }
                    Some(libc::EACCES) => "; check its execute permission",
                    _ => "",
                };
                let reason = format!("could not be started ({:?}: {e}{hint})", self.cfg.program);
                self.worker_gone(generation, None, reason);
            }
        }
        // A zombie that arrived while a spawn was in flight may be waiting.
        self.reap_children();
    }

    fn on_notify(&mut self, generation: u64, message: NotifyMessage) {
        let Some(w) = self.workers.get_mut(&generation) else {
            return;
        };
        w.said_anything = true;
        if let Some(handoff) = &message.handoff_socket {
            w.handoff = Some(handoff.clone());
        }
        if let Some(status) = &message.status {
            tracing::info!(worker = %w.label(), status = %status, "worker status");
            w.status = Some(status.clone());
            if self.current == Some(generation) {
                self.upstream.status(status.clone());
            }
        }
        if message.stopping {
            tracing::info!(worker = %w.label(), "the worker is stopping");
        }
        if let Some(errno) = message.errno {
            tracing::warn!(worker = %w.label(), errno, "the worker reports a failure");
        }
        if message.ready {
            self.on_ready(generation, "READY=1");
        }
    }

    fn on_ready(&mut self, generation: u64, how: &str) {
        let Some(w) = self.workers.get_mut(&generation) else {
            return;
        };
        let Role::Starting(purpose) = w.role else {
            return;
        };
        if w.pid.is_none() {
            // The worker reported before the spawning thread's word that it started
            // reached this loop: act on it once its PID is known.
            w.ready_early = true;
            return;
        }
        if self.current.is_some_and(|c| c > generation) {
            // A newer generation (an upgrade that won the race with a restart) serves
            // already: this one is moot.
            tracing::info!(worker = %w.label(), "a newer generation serves already; stopping this one");
            self.stop_worker(generation);
            return;
        }
        if let Some(problem) = self.listener_problem(generation) {
            tracing::error!("{problem}");
            match purpose {
                // Safe: the old worker keeps serving the master's sockets.
                Purpose::Upgrade => {
                    self.stop_worker(generation);
                    let msg = format!(
                        "upgrade failed: the new worker, {problem}; it is being stopped. \
                         Have the program use the sockets it is handed (LISTEN_FDS, the names \
                         in LISTEN_FDNAMES), or restart `reborn run` with the new --listen"
                    );
                    self.finish_upgrade(generation, false, msg);
                    if self.current.is_none() {
                        self.schedule_restart();
                    }
                    return;
                }
                // No other worker to keep: it serves, loudly (`reborn status` warns).
                Purpose::Replace => {
                    if let Some(w) = self.workers.get_mut(&generation) {
                        w.listener_problem = Some(problem);
                    }
                }
            }
        }
        let Some(w) = self.workers.get_mut(&generation) else {
            return;
        };
        for task in [w.probe.take(), w.ready_timer.take()].into_iter().flatten() {
            task.abort();
        }
        w.role = Role::Serving;
        w.ready_at = Some(Instant::now());
        if let Some(liveness) = &self.cfg.liveness {
            w.liveness = Some(crate::readiness::start_liveness(
                generation,
                liveness,
                self.events.clone(),
            ));
        }
        let took = w.started.elapsed();
        let label = w.label();
        let probation = self.cfg.probation;
        if probation.is_zero() {
            if let Some(binary) = w.binary.clone() {
                self.pinned = Some((generation, binary));
            }
        } else {
            w.on_probation = true;
            let timer = self.after(probation, Event::ProbationOver { generation });
            if let Some(w) = self.workers.get_mut(&generation) {
                w.probation_timer = Some(timer);
            }
        }
        tracing::info!(worker = %label, took = %human(took), how, "the worker is ready");
        let old = self.current.replace(generation);
        // A pending restart is moot now.
        self.restart_token += 1;
        match purpose {
            Purpose::Replace => {
                if let Some(old) = old {
                    self.stop_worker(old);
                }
                let text = format!("serving: {label}");
                if self.ever_ready {
                    self.upstream.status(text);
                } else {
                    self.upstream.ready(text);
                }
            }
            Purpose::Upgrade => {
                let old_label = old.and_then(|g| self.workers.get(&g)).map(|w| w.label());
                if let Some(old) = old {
                    self.settle_probation(
                        old,
                        true,
                        format!("upgraded; then superseded by {label}"),
                    );
                    self.stop_worker(old);
                }
                if !probation.is_zero() {
                    // `reborn upgrade` learns the outcome once the probation is over.
                    if let Some(up) = self.upgrade.as_mut() {
                        for waiter in up.waiters.drain(..) {
                            self.probation_waiters.push((generation, waiter));
                        }
                    }
                }
                let message = match old_label {
                    Some(o) => format!(
                        "upgraded: {label} is serving (ready in {}); {o} is draining",
                        human(took)
                    ),
                    None => format!("upgraded: {label} is serving (ready in {})", human(took)),
                };
                self.finish_upgrade(generation, true, message);
            }
        }
        self.ever_ready = true;
    }

    fn on_ready_timeout(&mut self, generation: u64) {
        let Some(w) = self.workers.get(&generation) else {
            return;
        };
        let Role::Starting(purpose) = w.role else {
            return;
        };
        let label = w.label();
        let hint = if self.cfg.ready == ReadyMode::Notify && !w.said_anything {
            " (it sent nothing to NOTIFY_SOCKET: a program that cannot report READY=1 \
             needs --ready delay:…, tcp:… or http:…)"
        } else {
            ""
        };
        let reason = format!(
            "{label} was not ready within {} (--ready-timeout){hint}; it is being stopped",
            human(self.cfg.ready_timeout)
        );
        self.stop_worker(generation);
        match purpose {
            Purpose::Upgrade => {
                let msg = format!("upgrade failed: the new worker, {reason}");
                self.finish_upgrade(generation, false, msg);
                if self.current.is_none() {
                    self.schedule_restart();
                }
            }
            Purpose::Replace => {
                tracing::warn!("{reason}");
                self.note_crash(None);
                self.schedule_restart();
            }
        }
    }

    /// What is wrong, if anything, with the listeners the worker of `generation` uses:
    /// the master's listeners that no process of its group holds (it closed them), and
    /// the addresses it listens on itself.
    fn listener_problem(&self, generation: u64) -> Option<String> {
        let w = self.workers.get(&generation)?;
        let pid = w.pid?;
        let ours: Vec<u64> = self.cfg.listener_inodes.iter().flatten().copied().collect();
        if ours.is_empty() {
            return None;
        }
        let mut members = groups::members(pid);
        if members.is_empty() {
            members.push(pid);
        }
        let held = sockets::held_by(&members);
        if !held.readable {
            return None;
        }
        let missing: Vec<String> = self
            .cfg
            .listeners
            .iter()
            .zip(&self.cfg.listener_inodes)
            .filter(|(_, inode)| inode.is_some_and(|i| !held.sockets.contains(&i)))
            .map(|(l, _)| {
                format!(
                    "{} ({})",
                    l.name.as_deref().unwrap_or(reborn::activation::UNNAMED),
                    l.address
                )
            })
            .collect();
        if missing.is_empty() {
            return None;
        }
        let own_listening = sockets::own_listening(pid, &held, &ours);
        let own = if own_listening.is_empty() {
            String::new()
        } else {
            format!(" and listens on {} itself", own_listening.join(", "))
        };
        Some(format!(
            "{} does not use the master's listener {}: it closed the socket it was handed{own}, \
             so clients of that address queue with no one to accept them",
            w.label(),
            missing.join(", ")
        ))
    }

    /// Looks again at the serving worker's listeners (for `reborn status`): a problem
    /// found now is logged once, as an error.
    fn recheck_listeners(&mut self) {
        let Some(current) = self.current else {
            return;
        };
        let problem = self.listener_problem(current);
        if let Some(w) = self.workers.get_mut(&current)
            && w.listener_problem != problem
        {
            if let Some(p) = &problem {
                tracing::error!("{p}");
            }
            w.listener_problem = problem;
        }
    }

    // ---- probation --------------------------------------------------------------------

    fn on_probation_over(&mut self, generation: u64) {
        let Some(w) = self.workers.get_mut(&generation) else {
            return;
        };
        if !w.on_probation || w.role != Role::Serving {
            return;
        }
        w.on_probation = false;
        w.probation_timer = None;
        let label = w.label();
        let pinned = w.binary.clone();
        let message = format!(
            "upgraded: {label} is serving and passed its probation ({})",
            human(self.cfg.probation)
        );
        match pinned {
            Some(binary) => {
                tracing::info!(worker = %label, binary = %binary.path.display(), "passed its probation: its binary is the last good one");
                self.pinned = Some((generation, binary));
            }
            None => tracing::info!(worker = %label, "passed its probation"),
        }
        self.settle_probation(generation, true, message);
    }

    /// Answers the `reborn upgrade` clients waiting for the probation of `generation`.
    fn settle_probation(&mut self, generation: u64, ok: bool, message: String) {
        let (done, waiting) = std::mem::take(&mut self.probation_waiters)
            .into_iter()
            .partition(|(g, _)| *g == generation);
        self.probation_waiters = waiting;
        for (_, waiter) in done {
            let _ = waiter.send(if ok {
                Reply::ok(message.clone())
            } else {
                Reply::err(message.clone())
            });
        }
    }

    /// A serving worker died on probation: go back to the last good binary at once (the
    /// sockets are the master's: connections wait in the backlog meanwhile). Returns
    /// false when there is none to go back to (the usual crash handling applies).
    fn roll_back_after_commit(&mut self, w: &Worker, reason: &str) -> bool {
        let label = w.label();
        let after = w.ready_at.map(|t| t.elapsed()).unwrap_or_default();
        let Some((good, binary)) = self.pinned.clone() else {
            return false;
        };
        if w.binary.as_ref().is_some_and(|b| Arc::ptr_eq(b, &binary)) {
            // The last good binary itself died: that is a crash, not a bad deploy.
            return false;
        }
        let message = format!(
            "rolled back after commit: {label} (the new version) {reason} {} after it was \
             ready; starting the last good binary again ({}, of generation {good})",
            human(after),
            binary.path.display()
        );
        tracing::error!("{message}");
        self.upstream.status(message.clone());
        self.last_upgrade = Some(UpgradeOutcome {
            generation: w.generation,
            ok: false,
            message: message.clone(),
            duration: w.started.elapsed(),
            at: Instant::now(),
        });
        self.settle_probation(w.generation, false, message);
        if let Err(reason) = self.start_worker(Purpose::Replace) {
            tracing::error!("cannot start the last good binary: {reason}");
            self.schedule_restart();
        }
        true
    }

    // ---- stopping workers -------------------------------------------------------------

    /// Tells a worker to drain (its stop signal) and arms its deadline.
    fn stop_worker(&mut self, generation: u64) {
        let drain = self.cfg.drain_timeout;
        let sig = self.cfg.stop_signal;
        let Some(w) = self.workers.get_mut(&generation) else {
            return;
        };
        w.role = Role::Draining;
        for task in [w.probe.take(), w.liveness.take()].into_iter().flatten() {
            task.abort();
        }
        if w.stop_sent {
            return;
        }
        let Some(pid) = w.pid else {
            // Still being spawned: stopped once its PID is known.
            return;
        };
        w.stop_sent = true;
        w.stop_sent_at = Some(Instant::now());
        tracing::info!(worker = %w.label(), signal = %sig, drain = %human(drain), "stopping a worker");
        if let Err(e) = groups::signal(pid, sig) {
            tracing::warn!(worker = %w.label(), error = %e, "cannot signal the worker");
        }
        let timer = self.after(drain, Event::DrainDeadline { generation });
        if let Some(w) = self.workers.get_mut(&generation) {
            w.drain_timer = Some(timer);
        }
    }

    fn on_drain_deadline(&mut self, generation: u64) {
        if let Some(w) = self.workers.get_mut(&generation)
            && let Some(pid) = w.pid
        {
            w.killed_for = Some("at the drain deadline");
            tracing::warn!(
                worker = %w.label(),
                "the worker did not exit within the drain timeout ({}); killing it and its \
                 process group",
                human(self.cfg.drain_timeout)
            );
            let _ = groups::signal(pid, Signal::SIGKILL);
        }
    }

    /// The serving worker is hung (or dead to its clients): kill it, group and all; its
    /// exit is then handled as a crash (restart after the back-off).
    fn on_liveness_failed(&mut self, generation: u64, reason: String) {
        let Some(w) = self.workers.get_mut(&generation) else {
            return;
        };
        let Some(pid) = w.pid.filter(|_| w.role == Role::Serving) else {
            return;
        };
        tracing::error!(
            worker = %w.label(),
            "{reason}; killing the worker (SIGKILL to its process group) to restart it"
        );
        w.killed_for = Some("its liveness probe failed");
        if let Err(e) = groups::signal(pid, Signal::SIGKILL) {
            tracing::warn!(worker = %w.label(), error = %e, "cannot kill the worker");
        }
    }

    /// A gone worker's leftovers are still there at their deadline: kill them.
    fn on_group_deadline(&mut self, pgid: u32) {
        if let Some(l) = self.lingering.remove(&pgid) {
            let left = groups::members(pgid);
            if !left.is_empty() {
                tracing::warn!(
                    worker = %l.label,
                    pids = ?left,
                    "what the worker left in its process group is still there at the drain \
                     deadline ({}); killing it",
                    human(self.cfg.drain_timeout)
                );
                let _ = groups::signal(pgid, Signal::SIGKILL);
            }
        }
    }

    /// The master exits: nothing it started may outlive it.
    fn kill_lingering(&mut self) {
        for (pgid, l) in std::mem::take(&mut self.lingering) {
            l.deadline.abort();
            if !groups::members(pgid).is_empty() {
                tracing::warn!(worker = %l.label, "killing what the worker left in its process group");
                let _ = groups::signal(pgid, Signal::SIGKILL);
            }
        }
    }

    /// Forgets the lingering groups that have emptied.
    fn check_lingering(&mut self) {
        if self.lingering.is_empty() {
            return;
        }
        let gone: Vec<u32> = self
            .lingering
            .keys()
            .copied()
            .filter(|g| groups::members(*g).is_empty())
            .collect();
        for g in gone {
            if let Some(l) = self.lingering.remove(&g) {
                l.deadline.abort();
                tracing::info!(worker = %l.label, "what the worker left in its process group has exited");
            }
        }
    }

    /// A worker has gone: if it left processes running in its group (it daemonized, or
    /// backgrounded its server), say so, and stop them as the worker would have been.
    fn stop_leftovers(&mut self, w: &Worker) {
        let Some(pgid) = w.pid else {
            return;
        };
        let left = groups::members(pgid);
        if left.is_empty() {
            return;
        }
        tracing::warn!(
            worker = %w.label(),
            pids = ?left,
            "the worker exited but left {} process(es) of its process group running: it \
             daemonizes or starts its server in the background (`server &`), so the master \
             supervises a process that is gone and not the server; run the server in the \
             foreground (end a start script with `exec server`, turn off daemon mode). \
             Stopping them ({} now, SIGKILL in {})",
            left.len(),
            self.cfg.stop_signal,
            human(self.cfg.drain_timeout)
        );
        if !w.stop_sent {
            let _ = groups::signal(pgid, self.cfg.stop_signal);
        }
        let deadline = self.after(self.cfg.drain_timeout, Event::GroupDeadline { pgid });
        if let Some(old) = self.lingering.insert(
            pgid,
            Lingering {
                label: w.label(),
                deadline,
            },
        ) {
            old.deadline.abort();
        }
    }

    fn forward(&self, sig: Signal) {
        for w in self.workers.values() {
            if matches!(w.role, Role::Serving | Role::Draining)
                && let Some(pid) = w.pid
            {
                tracing::info!(worker = %w.label(), signal = %sig, "forwarding a signal");
                let _ = kill(Pid::from_raw(pid as i32), sig);
            }
        }
    }

    /// What the health listener reports (see [`crate::health`]).
    pub fn health(&self) -> tokio::sync::watch::Receiver<crate::health::Readiness> {
        self.health.subscribe()
    }

    fn readiness(&self) -> crate::health::Readiness {
        if self.stopping {
            Err("the master is stopping")
        } else if self.delaying {
            Err("shutting down (in the shutdown delay)")
        } else if self.current.is_some() {
            Ok(())
        } else if self.ever_ready {
            Err("no worker serves (restarting)")
        } else {
            Err("starting")
        }
    }

    fn publish_health(&self) {
        let now = self.readiness();
        self.health.send_if_modified(|h| {
            let changed = *h != now;
            *h = now;
            changed
        });
    }

    /// `SIGTERM` or `SIGINT`: the shutdown delay first, if there is one for this signal;
    /// any stop signal in the delay stops at once.
    fn on_stop_signal(&mut self, sig: Signal) {
        let delay = self.cfg.shutdown_delay;
        let why = sig.as_str();
        if self.delaying {
            tracing::info!("{why} during the shutdown delay: stopping now");
            return self.request_stop(why, true);
        }
        if delay.is_zero() || self.stopping || sig != self.cfg.shutdown_delay_signal {
            return self.request_stop(why, true);
        }
        self.delaying = true;
        tracing::info!(
            "{why}: stopping in {}; the worker serves until then while the health \
             listener answers 503 (send {why} again to stop now)",
            human(delay)
        );
        self.upstream.status(format!(
            "shutting down in {}: serving, not ready",
            human(delay)
        ));
        let _ = self.after(delay, Event::ShutdownDelayOver);
    }

    fn request_stop(&mut self, why: &str, hammer_if_repeated: bool) {
        self.delaying = false;
        if self.stopping {
            if hammer_if_repeated {
                tracing::warn!("{why} again while stopping: killing every worker");
                for w in self.workers.values_mut() {
                    if let Some(pid) = w.pid {
                        w.killed_for = Some("the stop was asked for again");
                        let _ = groups::signal(pid, Signal::SIGKILL);
                    }
                }
                self.kill_lingering();
            }
            return;
        }
        tracing::info!("{why}: stopping the workers, then the master");
        self.stopping = true;
        self.upstream.stopping();
        self.restart_token += 1;
        if let Some(up) = &self.upgrade {
            let g = up.generation;
            self.finish_upgrade(g, false, "upgrade abandoned: the master is stopping".into());
        }
        for (_, waiter) in self.probation_waiters.drain(..) {
            let _ = waiter.send(Reply::err(
                "the master is stopping before the new worker's probation was over",
            ));
        }
        let gens: Vec<u64> = self.workers.keys().copied().collect();
        for g in gens {
            self.stop_worker(g);
        }
    }

    // ---- exits and crashes --------------------------------------------------------------

    fn reap_children(&mut self) {
        self.reap_exited();
        self.check_lingering();
    }

    fn reap_exited(&mut self) {
        loop {
            let pid = match reaper::peek_exited() {
                Ok(Some(pid)) => pid,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "waitid failed");
                    return;
                }
            };
            match self.pids.get(&pid).copied() {
                Some(generation) => {
                    let status = match reaper::reap(pid) {
                        Ok(Some(s)) => s,
                        _ => return,
                    };
                    self.pids.remove(&pid);
                    self.worker_gone(generation, Some(status), status.to_string());
                }
                // A failed exec's child is reaped by the spawning thread itself: leave
                // unknown children alone while a spawn is in flight.
                None if self.spawning > 0 => return,
                None => match reaper::reap(pid) {
                    Ok(Some(status)) => tracing::debug!(pid, %status, "reaped an orphan"),
                    _ => return,
                },
            }
        }
    }

    fn worker_gone(&mut self, generation: u64, status: Option<reaper::ExitStatus>, reason: String) {
        let Some(w) = self.workers.remove(&generation) else {
            return;
        };
        self.stop_leftovers(&w);
        let label = w.label();
        let lived = w.started.elapsed();
        let reason = self.why_gone(&w, status).unwrap_or(reason);
        let when = if reason.starts_with("could not be started") {
            ""
        } else {
            " before it was ready"
        };
        match w.role {
            Role::Draining => {
                let drained = w
                    .stop_sent_at
                    .map(|t| human(t.elapsed()))
                    .unwrap_or_else(|| "-".into());
                tracing::info!(
                    worker = %label,
                    lifetime = %human(lived),
                    drained_in = %drained,
                    "a stopped worker {reason}"
                );
            }
            Role::Starting(Purpose::Upgrade) => {
                let msg = format!("upgrade failed: the new worker, {label}, {reason}{when}");
                self.finish_upgrade(generation, false, msg);
                if self.current.is_none() && !self.stopping {
                    self.schedule_restart();
                }
            }
            Role::Starting(Purpose::Replace) if self.first_start_failed() => {
                // Like supervisord's `startsecs`: a program that cannot start at all
                // (a bad flag, a missing library) is not retried forever.
                self.fatal = Some(format!(
                    "the program cannot start: its first worker, {label}, {reason}{when}; \
                     the master gives up (only a worker that was ready once is restarted \
                     after a crash). Its own output above says why; fix the program or \
                     its arguments, then run the master again"
                ));
            }
            Role::Starting(Purpose::Replace) => {
                tracing::warn!(worker = %label, "the worker {reason}{when}");
                self.note_crash(None);
                self.schedule_restart();
            }
            Role::Serving => {
                if self.current == Some(generation) {
                    self.current = None;
                }
                tracing::warn!(worker = %label, lifetime = %human(lived), "the serving worker {reason}");
                self.note_crash(w.ready_at);
                let rolled_back = w.on_probation
                    && !self.stopping
                    && self.current.is_none()
                    && self.upgrade.is_none()
                    && self.roll_back_after_commit(&w, &reason);
                if !rolled_back {
                    self.settle_probation(
                        generation,
                        false,
                        format!("upgrade failed: {label} {reason} during its probation"),
                    );
                    if self.upgrade.is_none() {
                        self.schedule_restart();
                    }
                }
            }
        }
    }

    /// How a worker ended, said with what the master did to it: dying of the stop signal
    /// the master sent is being stopped as asked, not "killed"; `None` for the plain
    /// status.
    fn why_gone(&self, w: &Worker, status: Option<reaper::ExitStatus>) -> Option<String> {
        let reaper::ExitStatus::Signaled(sig) = status? else {
            return None;
        };
        let name = Signal::try_from(sig).ok()?;
        if name == Signal::SIGKILL
            && let Some(why) = w.killed_for
        {
            return Some(format!("was killed by SIGKILL ({why})"));
        }
        (w.stop_sent && name == self.cfg.stop_signal)
            .then(|| format!("stopped ({}, as asked)", name.as_str()))
    }

    /// Whether the worker that just went was the first start, failed: no worker was
    /// ever ready, none other is alive or starting (an upgrade may still make it), and
    /// the master is not stopping.
    fn first_start_failed(&self) -> bool {
        !self.ever_ready && !self.stopping && self.workers.is_empty() && self.spawning == 0
    }

    fn note_crash(&mut self, ready_at: Option<Instant>) {
        if self.stopping {
            return;
        }
        self.crashes += 1;
        let stable = ready_at.is_some_and(|t| t.elapsed() >= STABLE_AFTER);
        self.crashes_in_a_row = if stable { 1 } else { self.crashes_in_a_row + 1 };
    }

    fn backoff(&self) -> Duration {
        let n = self.crashes_in_a_row.saturating_sub(1).min(20);
        (BACKOFF_START * 2u32.pow(n)).min(self.cfg.backoff_max)
    }

    fn schedule_restart(&mut self) {
        if self.stopping || self.current.is_some() {
            return;
        }
        let delay = self.backoff();
        if self.crashes_in_a_row >= CRASH_LOOP {
            let msg = format!(
                "the worker keeps crashing ({} times in a row); retrying every {} until it \
                 starts (fix the program, then `reborn upgrade` to try at once)",
                self.crashes_in_a_row,
                human(delay)
            );
            tracing::error!("{msg}");
            self.upstream.status(msg);
        } else {
            tracing::info!(delay = %human(delay), "restarting the worker after a back-off");
        }
        self.restart_token += 1;
        let token = self.restart_token;
        if let Some(previous) = self
            .restart_timer
            .replace(self.after(delay, Event::Restart { token }))
        {
            previous.abort();
        }
    }

    fn on_restart(&mut self, token: u64) {
        if token != self.restart_token || self.stopping || self.current.is_some() {
            return;
        }
        let starting = self
            .workers
            .values()
            .any(|w| matches!(w.role, Role::Starting(_)));
        if starting {
            return;
        }
        if let Err(reason) = self.start_worker(Purpose::Replace) {
            tracing::error!("cannot restart the worker: {reason}");
            self.note_crash(None);
            self.schedule_restart();
        }
    }

    // ---- upgrades ---------------------------------------------------------------------

    fn request_upgrade(&mut self, reply: Option<oneshot::Sender<Reply>>) {
        let refuse = |reply: Option<oneshot::Sender<Reply>>, msg: String| {
            tracing::warn!("upgrade refused: {msg}");
            if let Some(r) = reply {
                let _ = r.send(Reply::err(msg));
            }
        };
        if self.stopping {
            return refuse(reply, "the master is stopping".into());
        }
        if self.delaying {
            return refuse(
                reply,
                "the master is shutting down (in its shutdown delay)".into(),
            );
        }
        if let Some(up) = &self.upgrade {
            let msg = format!(
                "an upgrade is already in progress (generation {}, started {} ago); wait for \
                 its outcome, then upgrade again",
                up.generation,
                human(up.started.elapsed())
            );
            return refuse(reply, msg);
        }
        let started = Instant::now();
        match self.start_worker(Purpose::Upgrade) {
            Ok(generation) => {
                self.upstream
                    .reloading(format!("upgrading to generation {generation}"));
                self.upgrade = Some(UpgradeInFlight {
                    generation,
                    started,
                    waiters: reply.into_iter().collect(),
                });
            }
            Err(reason) => {
                let generation = self.last_generation + 1;
                let msg = format!("upgrade failed: {reason}{}", self.keeps_serving());
                tracing::warn!("{msg}");
                self.last_upgrade = Some(UpgradeOutcome {
                    generation,
                    ok: false,
                    message: msg.clone(),
                    duration: started.elapsed(),
                    at: Instant::now(),
                });
                if let Some(r) = reply {
                    let _ = r.send(Reply::err(msg));
                }
            }
        }
    }

    fn keeps_serving(&self) -> String {
        match self.current.and_then(|g| self.workers.get(&g)) {
            Some(w) => format!("; {} keeps serving", w.label()),
            None => String::new(),
        }
    }

    fn finish_upgrade(&mut self, generation: u64, ok: bool, message: String) {
        let Some(up) = self.upgrade.take_if(|u| u.generation == generation) else {
            return;
        };
        let message = if ok {
            message
        } else {
            format!("{message}{}", self.keeps_serving())
        };
        let duration = up.started.elapsed();
        if ok {
            tracing::info!(duration = %human(duration), "{message}");
        } else {
            tracing::warn!(duration = %human(duration), "{message}");
        }
        for w in up.waiters {
            let _ = w.send(if ok {
                Reply::ok(message.clone())
            } else {
                Reply::err(message.clone())
            });
        }
        if !self.stopping {
            let label = self
                .current
                .and_then(|g| self.workers.get(&g))
                .map(|w| format!("serving: {}", w.label()))
                .unwrap_or_else(|| "no worker serves".into());
            self.upstream.ready(label);
        }
        self.last_upgrade = Some(UpgradeOutcome {
            generation,
            ok,
            message,
            duration,
            at: Instant::now(),
        });
    }

    // ---- helpers ----------------------------------------------------------------------

    /// The notify socket for the worker of `generation`, in the master's private
    /// directory (made on first use).
    fn worker_notify_socket(&mut self, generation: u64) -> std::io::Result<NotifyReceiver> {
        let dir = match &mut self.notify_dir {
            Some(dir) => dir,
            none => none.insert(NotifyDir::new()?),
        };
        dir.receiver(&format!("worker-{generation}"))
    }

    /// Sends `event` after `delay`, unless the returned handle aborts it first.
    fn after(&self, delay: Duration, event: Event) -> AbortHandle {
        let events = self.events.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = events.send(event);
        })
        .abort_handle()
    }

    fn status(&self) -> Status {
        let state = if self.stopping || self.delaying {
            "stopping"
        } else if self.upgrade.is_some() {
            "upgrading"
        } else if self.current.is_some() {
            "serving"
        } else if self.ever_ready {
            "restarting"
        } else {
            "starting"
        };
        Status {
            name: self.cfg.name.clone(),
            master_pid: std::process::id(),
            program: self.cfg.program.to_string_lossy().into_owned(),
            generation: self.current.unwrap_or(0),
            state: state.into(),
            uptime_secs: self.started.elapsed().as_secs_f64(),
            workers: self
                .workers
                .values()
                .rev()
                .map(|w| WorkerStatus {
                    generation: w.generation,
                    pid: w.pid,
                    role: match w.role {
                        Role::Starting(_) => "starting",
                        Role::Serving => "serving",
                        Role::Draining => "draining",
                    }
                    .into(),
                    uptime_secs: w.started.elapsed().as_secs_f64(),
                    status: w.status.clone(),
                })
                .collect(),
            listeners: self.cfg.listeners.clone(),
            last_upgrade: self.last_upgrade.as_ref().map(|u| UpgradeStatus {
                generation: u.generation,
                ok: u.ok,
                message: u.message.clone(),
                duration_ms: u.duration.as_millis() as u64,
                ago_secs: u.at.elapsed().as_secs_f64(),
            }),
            crashes: self.crashes,
            crashes_in_a_row: self.crashes_in_a_row,
            warnings: self
                .workers
                .values()
                .filter_map(|w| w.listener_problem.clone())
                .collect(),
        }
    }
}
