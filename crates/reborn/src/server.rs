//! [`Reborn`]: this process's share of the protocol — its listeners, its readiness, its
//! signals, its drain — and the [`Builder`] that configures it.

use std::ffi::OsString;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::drain::{DrainControl, DrainReason, Phase, Shutdown};
use crate::error::{Error, Result};
use crate::listeners::{DEFAULT_BACKLOG, ListenAddr, Listener, ListenerSet};
use crate::signals::{Hook, Hooks, Signal, When};
use crate::upgrade::{UpgradeError, Upgraded};

/// When the process reports that it is ready.
///
/// In both modes a new process accepts from the inherited listeners as soon as
/// [`Reborn::serve`] runs, side by side with the previous generation, before it reports
/// ready. The connections it accepts in that window share its fate if the upgrade is
/// rolled back. One that refuses to report ready (a failed [`Builder::ready_check`],
/// unclaimed listeners), or that is sent `SIGTERM` because it was not ready in time,
/// drains them first; one that crashes, or ignores that `SIGTERM` past the stop timeout
/// and is killed, takes them along (their clients see the connection reset). So do
/// the start-up work that can fail (configuration, a database, warm caches) *before* the
/// first `serve`, or with [`ReadyMode::Manual`] before calling `serve` at all, and keep
/// the time between `serve` and ready short.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadyMode {
    /// Once every listener handed out by [`Reborn::listen`] is served by
    /// [`Reborn::serve`] (the default). Ask for every listener before the first `serve`.
    Auto,
    /// When the program calls [`Reborn::ready`]: for servers with their own accept loop,
    /// or with work to do (warm caches, connect to a database) before serving.
    Manual,
}

/// How long an HTTP/1.x request head may take to arrive.
const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How long after the hammer a process may take to finish before it exits anyway.
const DEFAULT_HAMMER_GRACE: Duration = Duration::from_secs(5);

/// What [`Reborn::handoff_counts`] says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HandoffCounts {
    /// Connections handed to the next generation.
    pub handed_over: u64,
    /// Connections whose handoff failed, drained here instead.
    pub fell_back: u64,
}

/// The exit status of a process that could not finish its drain by the hammer grace.
pub const EXIT_DRAIN_OVERRUN: i32 = 75;

#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) drain_timeout: Duration,
    pub(crate) idle_grace: Duration,
    pub(crate) ready_timeout: Duration,
    pub(crate) stop_timeout: Duration,
    pub(crate) pid_file: Option<PathBuf>,
    pub(crate) backlog: i32,
    pub(crate) ready_mode: ReadyMode,
    pub(crate) upgrade_on_sighup: bool,
    pub(crate) tcp_nodelay: bool,
    pub(crate) executable: Option<PathBuf>,
    pub(crate) probation: Duration,
    pub(crate) hammer_grace: Duration,
    pub(crate) close_unclaimed: bool,
    pub(crate) header_read_timeout: Option<Duration>,
    pub(crate) eviction_window: Option<Duration>,
    pub(crate) hand_over_idle: bool,
    pub(crate) shutdown_delay: Duration,
    pub(crate) shutdown_delay_signal: Signal,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            drain_timeout: Duration::from_secs(60),
            idle_grace: Duration::from_secs(1),
            ready_timeout: Duration::from_secs(30),
            stop_timeout: Duration::from_secs(5),
            pid_file: None,
            backlog: DEFAULT_BACKLOG,
            ready_mode: ReadyMode::Auto,
            upgrade_on_sighup: true,
            hand_over_idle: true,
            tcp_nodelay: true,
            executable: None,
            probation: crate::probation::DEFAULT_PROBATION,
            hammer_grace: DEFAULT_HAMMER_GRACE,
            close_unclaimed: false,
            header_read_timeout: Some(DEFAULT_HEADER_READ_TIMEOUT),
            eviction_window: None,
            shutdown_delay: Duration::ZERO,
            shutdown_delay_signal: Signal::Term,
        }
    }
}

/// Configures a [`Reborn`].
///
/// ```no_run
/// use std::time::Duration;
///
/// let reborn = reborn::Reborn::builder()
///     .drain_timeout(Duration::from_secs(30))
///     .idle_grace(Duration::from_millis(500))
///     .pid_file("/run/app.pid")
///     .on(reborn::Signal::Usr1, || println!("reopening logs"))
///     .build()?;
/// # Ok::<(), reborn::Error>(())
/// ```
#[derive(Default)]
#[must_use]
pub struct Builder {
    config: Config,
    hooks: Hooks,
    ready_check: Option<ReadyCheck>,
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("config", &self.config)
            .field("hooks", &self.hooks)
            .field("ready_check", &self.ready_check.is_some())
            .finish()
    }
}

/// The application's readiness check: run before `READY=1` is reported.
pub(crate) type ReadyCheck = Arc<
    dyn Fn() -> Pin<Box<dyn Future<Output = std::result::Result<(), crate::BoxError>> + Send>>
        + Send
        + Sync,
>;

impl Builder {
    /// How long a drain may take before what is left is closed (the hammer). Default 60 s,
    /// endless's hammer time.
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.config.drain_timeout = timeout;
        self
    }

    /// Lets this process close the inherited listeners it does not ask for, and serve
    /// without them. Off by default.
    ///
    /// A process that inherited a listener (from the previous generation, the master or
    /// systemd) and reports ready without asking for it would leave that address to
    /// nobody: once the previous generation exits, its clients are refused (or, where a
    /// master or systemd holds the socket, left waiting). That is what a new version does
    /// that renamed its listener or moved it to another port by mistake. So by default
    /// such a process does not report ready: it logs an ERROR naming each unclaimed
    /// listener, tells whoever waits for it (an upgrade then fails and the running version
    /// keeps serving), drains what it accepted, and [`Reborn::serve`] returns
    /// [`Error::UnclaimedListeners`].
    ///
    /// Set this when the new version moves off an address on purpose. Under `reborn run`
    /// the master's listeners stay the master's: restart it with the new `--listen`.
    pub fn close_unclaimed_listeners(mut self, close: bool) -> Self {
        self.config.close_unclaimed = close;
        self
    }

    /// How long after the hammer (the drain deadline, or `SIGUSR2`) the process may still
    /// take to finish. Default 5 s.
    ///
    /// The hammer drops every connection, but a handler that blocks a runtime thread
    /// (`std::thread::sleep`, a blocking lock or read in async code) is never polled again
    /// and does not notice: `serve` would wait for it forever, and old generations would
    /// pile up. So once the grace is over, with a `serve` still waiting, the process exits
    /// with status [`EXIT_DRAIN_OVERRUN`] (75), after logging at ERROR which connections
    /// were still open: their peers, how long they were open, and the request each was
    /// in. The watch runs on a thread of its own, so a blocked runtime cannot stop it.
    /// A process whose every `serve` has returned is never exited this way: what the
    /// program does after serving is its own business.
    pub fn hammer_grace(mut self, grace: Duration) -> Self {
        self.config.hammer_grace = grace;
        self
    }

    /// Whether an upgrade hands idle plain HTTP/1.1 keep-alive connections to the new
    /// generation (their sockets move, with whatever the client sent meanwhile), instead
    /// of closing them after the idle grace. Default on.
    ///
    /// The client keeps its connection: no reconnect, and no request racing a close. A
    /// connection is handed over once it is between requests with nothing half-read;
    /// one busy with a request is handed after its response. Connections that are not
    /// handed keep the usual drain (`Connection: close`, the idle grace): TLS and
    /// HTTP/2 connections, upgraded ones, connections of [`Reborn::serve_with`],
    /// connections whose client sent a request body or pipelined requests, connections
    /// whose moment to leave ([`Draining::moment`](crate::Draining::moment)) came to a
    /// handler waiting for it (an event stream, a long poll: the client is to come
    /// back to the new generation), all
    /// connections at a shutdown (there is no next generation), connections of a listener
    /// whose name (or, unnamed, address) is longer than 55 bytes (a long Unix socket
    /// path), and any connection whose handoff failed (the new generation died or
    /// refused it). Between reborn processes
    /// only: after a self-upgrade, and under the reborn master between two workers built
    /// on reborn (the master passes the old worker's handoff socket on to the new one);
    /// under systemd alone (`systemctl restart`), the usual drain applies.
    /// [`Reborn::handoff_counts`] says how many were handed over and how many fell back.
    ///
    /// Connections move once the new generation has passed its
    /// [probation](Builder::probation): one that dies in it takes none with it. With
    /// probation off, they move at once, and a new generation that dies just after takes
    /// the ones it was handed (their clients see the connection close and reconnect).
    pub fn hand_over_idle_connections(mut self, on: bool) -> Self {
        self.config.hand_over_idle = on;
        self
    }

    /// How long the process keeps serving after `SIGTERM`, before it drains. Default zero
    /// (drain at once).
    ///
    /// For instances behind a load balancer that are *replaced* (a Kubernetes rolling
    /// update, a host drained, scaling in): the balancer keeps sending traffic for a
    /// while after the instance is told to stop, until its health check or endpoint list
    /// catches up, and an instance that stops accepting at once refuses those
    /// connections. During the delay the process accepts and serves as before, while its
    /// readiness endpoint ([`Reborn::readiness`]) answers `503` and the service manager
    /// is told `STATUS=shutting down…`; then it drains as on any graceful shutdown. Make
    /// it longer than the balancer needs to see a failing check (its interval times its
    /// fall count, plus any propagation), and keep the stop timeout of whatever sends
    /// the signal (`terminationGracePeriodSeconds`, `TimeoutStopSec=`) above the delay
    /// plus the [drain deadline](Builder::drain_timeout). See `docs/fleet.md`.
    ///
    /// The delay never holds up an upgrade (`SIGHUP`, and the stop signal the reborn
    /// master sends a worker it has replaced). During it, the delayed signal again,
    /// `SIGINT` or [`Reborn::shutdown`] drain at once, `SIGUSR2` closes everything, and
    /// `SIGHUP` does not upgrade a process that is shutting down.
    ///
    /// ```no_run
    /// use std::time::Duration;
    ///
    /// let reborn = reborn::Reborn::builder()
    ///     .shutdown_delay(Duration::from_secs(5))
    ///     .build()?;
    /// # Ok::<(), reborn::Error>(())
    /// ```
    pub fn shutdown_delay(mut self, delay: Duration) -> Self {
        self.config.shutdown_delay = delay;
        self
    }

    /// Which signal the [shutdown delay](Builder::shutdown_delay) applies to. Default
    /// [`Signal::Term`] (what Kubernetes, Docker and systemd send); [`Signal::Int`] also
    /// works. Any other signal is refused by [`build`](Builder::build).
    pub fn shutdown_delay_signal(mut self, signal: Signal) -> Self {
        self.config.shutdown_delay_signal = signal;
        self
    }

    /// How long an idle HTTP/1.1 keep-alive connection is kept during a drain, so that a
    /// client sending its next request gets an answer (with `Connection: close`) instead
    /// of a reset. Default 1 s.
    pub fn idle_grace(mut self, grace: Duration) -> Self {
        self.config.idle_grace = grace;
        self
    }

    /// How long an HTTP/1.x client may take to send a complete request head, or `None` for
    /// no limit. Default 30 s (hyper's own default once it has a timer).
    ///
    /// A connection whose head is not complete in time is closed. This is what stops a slowloris client,
    /// one that sends its head a byte at a time, from holding a connection, and during a
    /// drain, from holding the whole old generation until its deadline. As in hyper, the
    /// clock also runs while a keep-alive connection waits for its next request, so an
    /// idle keep-alive connection is closed after this long: keep clients' pool idle
    /// timeouts shorter, or raise it.
    ///
    /// During a drain, an HTTP/1.x connection whose next request head is arriving when
    /// the [idle grace](Builder::idle_grace) ends is not closed under it: it gets up to
    /// this long more for the head, then its answer with `Connection: close`.
    pub fn header_read_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.config.header_read_timeout = timeout;
        self
    }

    /// Over how long after the drain starts long-lived connections are asked to leave,
    /// each at its own moment ([`Draining::moment`](crate::Draining::moment)), so that
    /// their clients do not all reconnect at once. Default: a tenth of the
    /// [drain deadline](Builder::drain_timeout). See [`crate::draining`].
    pub fn eviction_window(mut self, window: Duration) -> Self {
        self.config.eviction_window = Some(window);
        self
    }

    /// How long a new generation may take to report ready before the upgrade is rolled
    /// back. Default 30 s.
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.config.ready_timeout = timeout;
        self
    }

    /// How long a rolled-back new generation gets to exit after `SIGTERM` before it is
    /// killed. Default 5 s.
    pub fn stop_timeout(mut self, timeout: Duration) -> Self {
        self.config.stop_timeout = timeout;
        self
    }

    /// A file that always holds the PID of the serving process (replaced atomically by
    /// each generation once it is ready). Not written under the reborn master, which
    /// keeps its own.
    pub fn pid_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.pid_file = Some(path.into());
        self
    }

    /// The listen backlog of sockets reborn binds. Default 4096 (capped by the kernel at
    /// `net.core.somaxconn`).
    pub fn backlog(mut self, backlog: i32) -> Self {
        self.config.backlog = backlog;
        self
    }

    /// How long the previous generation stays on probation after an upgrade commits
    /// (default 3 s; zero turns probation off).
    ///
    /// During probation the previous generation has stopped accepting and drains as
    /// usual, but keeps its listening sockets and stays alive, idle, until the window
    /// ends. If the new generation dies in the window (any exit, any signal), the previous
    /// one takes over again at once: it accepts, writes its PID to the PID file, tells
    /// systemd `MAINPID=`, `READY=1` and why, and logs the reason at ERROR;
    /// [`Reborn::upgrade`] then returns [`UpgradeError::DiedOnProbation`]. This is what a
    /// bad deploy usually looks like: ready at start-up, then a crash on the first request,
    /// the first database query, a setting read lazily. Three seconds catch those while
    /// the previous generation, idle by then, costs next to nothing; raise it for
    /// services whose first real work comes later.
    ///
    /// Told to stop in the window (`SIGTERM`, `SIGINT`, [`Reborn::shutdown`]), the
    /// previous generation ends its probation and exits once drained; the new one serves
    /// on. A stop that comes as the new generation dies is not undone by the rollback.
    pub fn probation(mut self, window: Duration) -> Self {
        self.config.probation = window;
        self
    }

    /// A check run in the new process before it reports ready: `READY=1` then means
    /// "healthy" (the database answers, the cache is warm), not only "accepting".
    ///
    /// A failing check (an `Err`) is a failed upgrade with the check's message: the
    /// previous generation keeps serving, and this process drains what it accepted and
    /// [`Reborn::serve`] returns [`Error::ReadyCheck`]. On a first start (no previous
    /// generation) the process likewise stops with that error.
    ///
    /// ```no_run
    /// let reborn = reborn::Reborn::builder()
    ///     .ready_check(|| async {
    ///         // e.g. run `SELECT 1` against the database
    ///         Ok(())
    ///     })
    ///     .build()?;
    /// # Ok::<(), reborn::Error>(())
    /// ```
    pub fn ready_check<F, Fut>(mut self, check: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), crate::BoxError>> + Send + 'static,
    {
        self.ready_check = Some(Arc::new(move || Box::pin(check())));
        self
    }

    /// When to report ready; see [`ReadyMode`].
    pub fn ready_mode(mut self, mode: ReadyMode) -> Self {
        self.config.ready_mode = mode;
        self
    }

    /// Whether `SIGHUP` upgrades the process (default true). When false, `SIGHUP` runs
    /// only its hooks; [`Reborn::upgrade`] still works.
    pub fn upgrade_on_sighup(mut self, enabled: bool) -> Self {
        self.config.upgrade_on_sighup = enabled;
        self
    }

    /// Whether accepted TCP connections get `TCP_NODELAY` (default true).
    pub fn tcp_nodelay(mut self, enabled: bool) -> Self {
        self.config.tcp_nodelay = enabled;
        self
    }

    /// The program an upgrade starts. Default: the path this process was started from
    /// (`argv[0]` made absolute at start-up, so a binary replaced on disk is found).
    pub fn executable(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.executable = Some(path.into());
        self
    }

    /// Runs `hook` when `signal` arrives, after reborn's own action for it. This is how
    /// `SIGUSR1` and `SIGTSTP`, which have no action of their own, are used.
    pub fn on(self, signal: Signal, hook: impl Fn() + Send + Sync + 'static) -> Self {
        self.after(signal, hook)
    }

    /// Runs `hook` when `signal` arrives, before reborn's own action.
    pub fn before(mut self, signal: Signal, hook: impl Fn() + Send + Sync + 'static) -> Self {
        self.hooks.add(signal, When::Before, Arc::new(hook) as Hook);
        self
    }

    /// Runs `hook` when `signal` arrives, after reborn's own action has started.
    pub fn after(mut self, signal: Signal, hook: impl Fn() + Send + Sync + 'static) -> Self {
        self.hooks.add(signal, When::After, Arc::new(hook) as Hook);
        self
    }

    /// Takes this process's inherited sockets and notify socket and builds the
    /// [`Reborn`]. Needs no runtime. Call it once per process.
    ///
    /// # Errors
    /// A malformed socket-activation environment ([`Error::Activation`]).
    pub fn build(self) -> Result<Reborn> {
        if !matches!(
            self.config.shutdown_delay_signal,
            Signal::Term | Signal::Int
        ) {
            return Err(Error::Config(format!(
                "shutdown_delay_signal({}): only SIGTERM and SIGINT start a shutdown; use \
                 Signal::Term or Signal::Int",
                self.config.shutdown_delay_signal
            )));
        }
        let env = crate::take_process_env()?;
        match &env.ignored {
            Some(crate::activation::Ignored::OtherPid(pid)) => crate::log::warning!(
                "LISTEN_FDS is set for another process (LISTEN_PID={pid}): ignoring it and \
                 binding sockets; something handed its environment on"
            ),
            Some(crate::activation::Ignored::Absent) | None => {}
        }
        let process = crate::process_info();
        match crate::files::raise_soft_limit() {
            Ok(Some((old, new))) => {
                tracing::debug!(
                    old,
                    new,
                    "raised the soft open-files limit to the hard limit"
                );
            }
            Ok(None) => {}
            Err(e) => tracing::debug!("cannot raise the soft open-files limit: {e}"),
        }
        let listeners = ListenerSet::new(env.sockets, self.config.backlog);
        let inner = Inner {
            exe: self
                .config
                .executable
                .clone()
                .unwrap_or(process.exe.clone()),
            process: process.clone(),
            config: self.config,
            hooks: self.hooks,
            ready_check: self.ready_check,
            ready_failure: Mutex::new(None),
            probation: crate::probation::Probation::new(),
            listeners: Mutex::new(listeners),
            notify: NotifyTargets {
                notify_socket: env.notify_socket,
                upstream: env.upstream_notify_socket,
                started_by_upgrade: env.started_by_upgrade,
            },
            master_pid: env.master_pid,
            master_probation: env.master_probation,
            drain: Arc::new(DrainControl::new()),
            ready: AtomicBool::new(false),
            announced: AtomicBool::new(false),
            serving: AtomicUsize::new(0),
            active_serves: AtomicUsize::new(0),
            hammer_watch: AtomicBool::new(false),
            sigint_seen: AtomicBool::new(false),
            delaying: AtomicBool::new(false),
            started: OnceLock::new(),
            on_terminal: crate::signals::on_terminal(),
            upgrade_lock: tokio::sync::Mutex::new(()),
            stop_or_commit: std::sync::Mutex::new(()),
            files: crate::files::Reserve::new(),
            replaces_previous: env.started_by_upgrade || env.handoff_socket.is_some(),
            handoff: Arc::new(crate::handoff::Handoff::new(env.handoff_socket)),
        };
        // A first process takes its reserve now, so that its descriptors are what they
        // will stay from its first answer on; a process that replaces another takes it
        // after its READY=1, off the path of the handoff (see `readiness::announce`).
        if !inner.replaces_previous {
            inner.files.fill();
        }
        Ok(Reborn {
            inner: Arc::new(inner),
        })
    }
}

/// What this process was started as, captured at start-up.
#[derive(Debug, Clone)]
pub(crate) struct ProcessInfo {
    pub(crate) exe: PathBuf,
    pub(crate) arg0: OsString,
    pub(crate) args: Vec<OsString>,
    pub(crate) env: Vec<(OsString, OsString)>,
    pub(crate) cwd: Option<PathBuf>,
    /// The working directory, held open: an upgrade still starts there if the path has
    /// gone (a deploy that prunes old release directories).
    pub(crate) cwd_fd: Option<Arc<std::os::fd::OwnedFd>>,
}

/// Where readiness and state go.
#[derive(Debug)]
pub(crate) struct NotifyTargets {
    notify_socket: Option<OsString>,
    upstream: Option<OsString>,
    started_by_upgrade: bool,
}

impl NotifyTargets {
    /// The service manager's socket (systemd's, or the reborn master's), if any.
    pub(crate) fn manager(&self) -> Option<&OsString> {
        if self.started_by_upgrade {
            self.upstream.as_ref()
        } else {
            self.notify_socket.as_ref()
        }
    }

    /// Whether a self-upgrade started this process.
    pub(crate) fn started_by_upgrade(&self) -> bool {
        self.started_by_upgrade
    }

    /// The previous generation's socket, when a self-upgrade started this process.
    pub(crate) fn previous_generation(&self) -> Option<&OsString> {
        if self.started_by_upgrade {
            self.notify_socket.as_ref()
        } else {
            None
        }
    }
}

pub(crate) struct Inner {
    pub(crate) exe: PathBuf,
    pub(crate) process: ProcessInfo,
    pub(crate) config: Config,
    pub(crate) hooks: Hooks,
    pub(crate) ready_check: Option<ReadyCheck>,
    /// Why this process refused to report ready, once it has.
    pub(crate) ready_failure: Mutex<Option<crate::readiness::Refusal>>,
    pub(crate) probation: crate::probation::Probation,
    pub(crate) listeners: Mutex<ListenerSet>,
    pub(crate) notify: NotifyTargets,
    pub(crate) master_pid: Option<u32>,
    /// The master's probation of new workers, under the master.
    master_probation: Option<Duration>,
    pub(crate) drain: Arc<DrainControl>,
    /// Readiness was asked for (once; the readiness check may still run).
    pub(crate) ready: AtomicBool,
    /// `READY=1` was said: the readiness check, if any, passed.
    pub(crate) announced: AtomicBool,
    pub(crate) serving: AtomicUsize,
    /// Calls of `serve` that have not returned yet.
    pub(crate) active_serves: AtomicUsize,
    /// Whether the watch that ends the process after the hammer runs.
    hammer_watch: AtomicBool,
    sigint_seen: AtomicBool,
    /// In the shutdown delay: serving, and reporting not ready.
    delaying: AtomicBool,
    started: OnceLock<()>,
    /// Which of stdin, stdout, stderr were terminals at start-up.
    on_terminal: [bool; 3],
    pub(crate) upgrade_lock: tokio::sync::Mutex<()>,
    /// Held while a stop signal decides what it does, and while an upgrade commits: a
    /// stop then comes either before the commit (and calls the upgrade off) or after it
    /// (and ends the probation), never halfway (see [`Inner::stop_or_commit`]).
    stop_or_commit: std::sync::Mutex<()>,
    /// Descriptors held back so that a process at its open-files limit can still upgrade.
    pub(crate) files: crate::files::Reserve,
    /// Started to take over from a previous generation that still serves (a
    /// self-upgrade, or a worker the reborn master started to replace one built on
    /// reborn).
    replaces_previous: bool,
    /// Idle connections handed to the next generation, or taken from the previous one.
    pub(crate) handoff: Arc<crate::handoff::Handoff>,
}

impl Inner {
    /// The eviction window: as set, or a tenth of the drain deadline.
    pub(crate) fn eviction_window(&self) -> Duration {
        self.config
            .eviction_window
            .unwrap_or(self.config.drain_timeout / 10)
    }

    pub(crate) fn listeners(&self) -> std::sync::MutexGuard<'_, ListenerSet> {
        self.listeners.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the drain (once) and arms the deadline. Returns false if it had started.
    pub(crate) fn begin_drain(self: &Arc<Self>, reason: DrainReason) -> bool {
        if !self.drain.claim(reason) {
            return false;
        }
        self.delaying.store(false, Ordering::SeqCst);
        match reason {
            DrainReason::Upgraded { successor } => {
                tracing::info!(
                    successor,
                    "handed over to pid {successor}: no longer accepting; draining"
                );
                self.tell_previous(&format!("REBORN_HANDED_OVER={successor}\n"));
            }
            DrainReason::Shutdown => {
                tracing::info!("shutting down: no longer accepting; draining");
                if let Some(manager) = self.notify.manager() {
                    crate::readiness::tell(manager, "STOPPING=1\nSTATUS=draining\n");
                }
                self.tell_previous("STOPPING=1\n");
            }
        }
        self.drain.start_draining();
        {
            let mut listeners = self.listeners();
            // A drain must never hang in a blocking accept.
            listeners.restore_nonblocking("as the drain starts");
            if reason == DrainReason::Shutdown {
                listeners.close_all();
            }
        }
        let deadline = self.config.drain_timeout;
        let inner = self.clone();
        let epoch = self.drain.epoch();
        // A thread keeps the deadline, not a task: a runtime whose threads a handler
        // blocks would never wake the task.
        let spawned = std::thread::Builder::new()
            .name("reborn-drain-deadline".into())
            .spawn(move || {
                std::thread::sleep(deadline);
                // A drain this process resumed from (probation) has no deadline any more.
                // Said before it is done: once the connections are closed, `serve`
                // returns and the process may exit before this thread writes a word.
                let said = || {
                    crate::log::warning!(
                        "drain deadline of {deadline:?} reached: closing the connections that are left"
                    )
                };
                if inner.drain.hammer_drain(epoch, said) {
                    inner.probation.end();
                    inner.watch_after_hammer();
                }
            });
        if let Err(e) = spawned {
            crate::log::error!("cannot start the thread that keeps the drain deadline: {e}");
        }
        true
    }

    /// After the hammer: gives the process the hammer grace to finish, then, if a
    /// `serve` is still waiting for connections that ignore the hammer, names them and
    /// exits. Runs once.
    fn watch_after_hammer(self: &Arc<Self>) {
        if self.hammer_watch.swap(true, Ordering::SeqCst) {
            return;
        }
        let inner = self.clone();
        let grace = self.config.hammer_grace;
        let spawned = std::thread::Builder::new()
            .name("reborn-hammer-grace".into())
            .spawn(move || {
                std::thread::sleep(grace);
                if inner.active_serves.load(Ordering::SeqCst) == 0 {
                    return;
                }
                let open = inner.drain.open_connections();
                let shown = open.len().min(20);
                let more = match open.len() - shown {
                    0 => String::new(),
                    n => format!("; and {n} more"),
                };
                crate::log::error!(
                    "the hammer was {grace:?} ago and {} connection(s) are still open (a handler \
                     that blocks a runtime thread never sees it): exiting with status \
                     {EXIT_DRAIN_OVERRUN}. Still open: {}{more}",
                    open.len(),
                    if open.is_empty() {
                        "none registered (a blocked task of the program's own?)".to_owned()
                    } else {
                        open[..shown].join(", ")
                    }
                );
                if let Some(manager) = inner.notify.manager() {
                    let _ = crate::notify::send(
                        manager,
                        &format!(
                            "STATUS=exiting: {} connection(s) still open after the hammer\n",
                            open.len()
                        ),
                    );
                }
                std::process::exit(EXIT_DRAIN_OVERRUN);
            });
        if let Err(e) = spawned {
            crate::log::error!("cannot start the thread that ends a stuck drain: {e}");
        }
    }

    /// Waits out a probation of the successor, if one runs; true if this process took
    /// over again (it serves: accept again).
    pub(crate) async fn resumed_after_probation(&self) -> bool {
        self.probation.settled().await;
        self.drain.phase() == Phase::Serving
    }

    /// Why this process refused to report ready, if it did.
    pub(crate) fn ready_failure(&self) -> Option<crate::readiness::Refusal> {
        self.ready_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Tells the previous generation, if it is still there (on probation), how this
    /// process goes on; it may have gone, so a failure is not worth a word.
    fn tell_previous(&self, message: &str) {
        if let Some(previous) = self.notify.previous_generation() {
            let _ = crate::notify::send(previous, message);
        }
    }

    /// Under the reborn master, at the stop signal: if the worker that replaces this one
    /// connected to this one's handoff socket, this drain is an upgrade's, and idle
    /// connections go to it once the master's probation of it is over. Returns whether
    /// the drain started so.
    fn replaced_under_master(self: &Arc<Self>) -> bool {
        let Some(master) = self.master_pid else {
            return false;
        };
        let Some((sender, Some(successor))) = self.handoff.take_successor(master) else {
            return false;
        };
        let probation = self.master_probation.unwrap_or_default();
        self.handoff.set_outbox(sender, probation.is_zero());
        if !probation.is_zero() {
            let handoff = self.handoff.clone();
            tokio::spawn(async move {
                tokio::time::sleep(probation).await;
                handoff.open();
            });
        }
        self.begin_drain(DrainReason::Upgraded { successor })
    }

    /// One at a time: a stop signal's decision, or an upgrade's commit. Without it, a
    /// `SIGTERM` at the moment of a commit could begin the shutdown delay just before the
    /// upgrade claimed the drain (which ended the delay: the new generation served on,
    /// the stop lost), or end a probation that was about to begin (the upgrade then
    /// committed with no probation, and the new generation served on).
    pub(crate) fn stop_or_commit(&self) -> std::sync::MutexGuard<'_, ()> {
        self.stop_or_commit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Ends a probation this process is waiting out (told to stop by `why`), so that it
    /// finishes its drain; returns whether one was running. Ended, and not merely seen
    /// running: a successor that died at that moment makes this process serve again,
    /// and the stop must then shut it down.
    fn end_probation(&self, why: &str) -> bool {
        let ended = self.probation.end();
        if ended {
            tracing::info!(
                "{why}: the probation of the new generation ends; this process exits once drained"
            );
        }
        ended
    }

    /// Closes everything now.
    pub(crate) fn hammer(self: &Arc<Self>) {
        self.probation.end();
        if self.drain.phase() == Phase::Hammer {
            return;
        }
        // Said first, for the reason the drain deadline says it first.
        crate::log::warning!("hammer: closing every connection now");
        if self.drain.hammer() {
            self.listeners().close_all();
            self.watch_after_hammer();
        }
    }

    /// Installs signal handlers and starts the task that acts on them, once.
    pub(crate) fn start(self: &Arc<Self>) -> Result<()> {
        if self.started.get().is_some() {
            return Ok(());
        }
        let handle = tokio::runtime::Handle::try_current().map_err(|_| {
            Error::Runtime(std::io::Error::other(
                "reborn's serve() and ready() must run inside a tokio runtime",
            ))
        })?;
        let mut signals = crate::signals::Signals::install(&self.hooks).map_err(|e| {
            Error::io(
                "cannot install the signal handlers (SIGHUP, SIGTERM, SIGINT, SIGUSR1, SIGUSR2)",
                e,
            )
        })?;
        if self.started.set(()).is_err() {
            return Ok(());
        }
        let inner = self.clone();
        handle.spawn(async move {
            if let Err(e) = signals.start_thread() {
                crate::log::error!(
                    "cannot start the thread that receives signals: {e}; this process will \
                     not act on SIGHUP, SIGTERM or the others (stop it with SIGKILL)"
                );
            }
            loop {
                let signal = signals.recv().await;
                // Nothing may end signal handling: a log line written to a terminal or a
                // pipe that has gone can panic (`eprint!`), and the process would then
                // catch SIGTERM and SIGHUP forever and do nothing.
                let handled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    inner.on_signal(signal)
                }));
                if handled.is_err() {
                    inner.signal_panicked(signal);
                }
            }
        });
        Ok(())
    }

    /// The handling of `signal` panicked (logging to a stderr that has gone, most
    /// likely): do what the signal asks without logging, and tell the service manager,
    /// the one listener left.
    fn signal_panicked(self: &Arc<Self>, signal: Signal) {
        match signal {
            Signal::Term | Signal::Int => {
                if !self.probation.end() {
                    self.begin_drain_quietly();
                }
            }
            Signal::Usr2 => {
                self.probation.end();
                if self.drain.hammer() {
                    self.listeners().close_all();
                    self.watch_after_hammer();
                }
            }
            // An upgrade logs all along its way: with logging broken it cannot be run
            // safely. A terminal that hung up ends the session, as in `on_signal`.
            Signal::Hup if crate::signals::terminal_hung_up(self.on_terminal) => {
                if !self.probation.end() {
                    self.begin_drain_quietly();
                }
            }
            Signal::Hup | Signal::Usr1 | Signal::Tstp => {}
        }
        if let Some(manager) = self.notify.manager() {
            let _ = crate::notify::send(
                manager,
                &format!(
                    "STATUS=handling {signal} failed (is stderr gone?); the process still \
                     obeys SIGTERM and SIGUSR2\n"
                ),
            );
        }
    }

    /// A drain without a word in the log.
    fn begin_drain_quietly(self: &Arc<Self>) {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.begin_drain(DrainReason::Shutdown)
        }));
        // If logging panicked inside, the phase may not have moved yet.
        if self.drain.claim(DrainReason::Shutdown) || self.drain.phase() == Phase::Serving {
            self.drain.start_draining();
            self.listeners().close_all();
        }
    }

    fn on_signal(self: &Arc<Self>, signal: Signal) {
        tracing::info!(%signal, "signal received");
        self.hooks.run(signal, When::Before);
        match signal {
            Signal::Hup if crate::signals::terminal_hung_up(self.on_terminal) => {
                // The terminal that started this process has closed: the session is
                // over. Starting the next generation on a dead terminal helps nobody,
                // and staying would leave an orphan holding the port.
                tracing::info!(
                    "SIGHUP: the terminal this process was started from has gone; shutting \
                     down gracefully (start a server that must outlive its terminal under \
                     systemd, `reborn run`, nohup or setsid: then SIGHUP upgrades)"
                );
                let _one_at_a_time = self.stop_or_commit();
                if !self.end_probation("SIGHUP") {
                    self.begin_drain(DrainReason::Shutdown);
                }
            }
            Signal::Hup => {
                if self.delaying.load(Ordering::SeqCst) {
                    tracing::info!(
                        "SIGHUP ignored: this process is shutting down (in its shutdown delay)"
                    );
                } else if let Some(master) = self.master_pid {
                    tracing::info!(
                        "SIGHUP ignored: this process runs under the reborn master (pid {master}), \
                         which does the upgrades; send SIGHUP to the master or run `reborn upgrade`"
                    );
                } else if !self.config.upgrade_on_sighup {
                    tracing::info!("SIGHUP: upgrades on SIGHUP are turned off");
                } else {
                    let inner = self.clone();
                    tokio::spawn(async move {
                        match crate::upgrade::upgrade(&inner).await {
                            Ok(done) => tracing::info!(
                                pid = done.pid,
                                took_ms = done.took.as_millis() as u64,
                                "upgrade committed: pid {} serves",
                                done.pid
                            ),
                            Err(e) => crate::log::error!("upgrade failed: {e}"),
                        }
                    });
                }
            }
            Signal::Term => {
                let _one_at_a_time = self.stop_or_commit();
                if !self.end_probation("SIGTERM")
                    && !self.replaced_under_master()
                    && !self.shut_down(signal)
                {
                    tracing::info!("already draining; send SIGUSR2 to close connections now");
                }
            }
            Signal::Int => {
                // The impatient second Ctrl-C hammers; the first one drains, also after
                // an upgrade has already started this generation's drain.
                let again = self.sigint_seen.swap(true, Ordering::SeqCst);
                let _one_at_a_time = self.stop_or_commit();
                if self.end_probation("SIGINT") {
                    // This process exits once drained.
                } else if !again && self.replaced_under_master() {
                    // The master's stop signal (`reborn run --stop-signal SIGINT`), as
                    // SIGTERM above.
                } else if !self.shut_down(signal) && again {
                    self.hammer();
                }
            }
            Signal::Usr2 => self.hammer(),
            Signal::Usr1 | Signal::Tstp => {}
        }
        self.hooks.run(signal, When::After);
    }

    /// A shutdown asked for by `signal`: the drain now, or first the shutdown delay if
    /// `signal` is the delayed one. Returns false if the drain had already started.
    fn shut_down(self: &Arc<Self>, signal: Signal) -> bool {
        let delay = self.config.shutdown_delay;
        if self.delaying.load(Ordering::SeqCst) {
            tracing::info!("{signal} during the shutdown delay: draining now");
            return self.begin_drain(DrainReason::Shutdown);
        }
        if delay.is_zero()
            || signal != self.config.shutdown_delay_signal
            || self.drain.phase() != Phase::Serving
            || self.drain.reason().is_some()
        {
            return self.begin_drain(DrainReason::Shutdown);
        }
        self.delaying.store(true, Ordering::SeqCst);
        tracing::info!(
            "{signal}: shutting down in {delay:?}; serving until then, and the readiness \
             endpoint answers 503 (send {signal} again to drain now)"
        );
        if let Some(manager) = self.notify.manager() {
            crate::readiness::tell(
                manager,
                &format!("STATUS=shutting down in {delay:?}: serving, not ready\n"),
            );
        }
        // A thread, as for the drain deadline: a blocked runtime must not keep the
        // process serving past its delay.
        let inner = self.clone();
        let spawned = std::thread::Builder::new()
            .name("reborn-shutdown-delay".into())
            .spawn(move || {
                std::thread::sleep(delay);
                if inner.delaying.load(Ordering::SeqCst) {
                    inner.begin_drain(DrainReason::Shutdown);
                }
            });
        if let Err(e) = spawned {
            crate::log::error!(
                "cannot start the thread that keeps the shutdown delay ({e}): draining now"
            );
            return self.begin_drain(DrainReason::Shutdown);
        }
        true
    }

    /// Whether this address should get traffic (see [`crate::health`]).
    pub(crate) fn health(&self) -> crate::health::Health {
        use crate::health::Health;
        if self.delaying.load(Ordering::SeqCst) {
            return Health::ShuttingDown;
        }
        match self.drain.reason() {
            // The successor serves this address.
            Some(DrainReason::Upgraded { .. }) => Health::Ready,
            Some(DrainReason::Shutdown) => Health::ShuttingDown,
            None if self.drain.phase() == Phase::Hammer => Health::ShuttingDown,
            // Before its own `READY=1`, a new generation stands in for a previous one
            // that still serves.
            None if self.announced.load(Ordering::SeqCst) || self.replaces_previous => {
                Health::Ready
            }
            None => Health::Starting,
        }
    }

    /// Whether the shutdown delay runs.
    pub(crate) fn in_shutdown_delay(&self) -> bool {
        self.delaying.load(Ordering::SeqCst)
    }

    /// One more listener is being served; in auto mode, report ready once all are.
    pub(crate) fn serving_one(self: &Arc<Self>) {
        let now = self.serving.fetch_add(1, Ordering::SeqCst) + 1;
        if self.config.ready_mode == ReadyMode::Auto && now >= self.listeners().handed_count() {
            crate::readiness::report_ready(self);
        }
    }
}

/// This process's reborn state: listeners, readiness, signals, upgrades and drain.
///
/// Cheap to clone (an `Arc`). Build one per process with [`Reborn::builder`], early in
/// `main` (see [`crate::init`]).
#[derive(Clone)]
pub struct Reborn {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Reborn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reborn")
            .field("exe", &self.inner.exe)
            .field("phase", &self.inner.drain.phase())
            .field("master_pid", &self.inner.master_pid)
            .finish_non_exhaustive()
    }
}

impl Reborn {
    /// A [`Builder`] with the defaults.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// A `Reborn` with the defaults.
    ///
    /// # Errors
    /// As [`Builder::build`].
    pub fn new() -> Result<Reborn> {
        Builder::default().build()
    }

    /// A listener named `name` on `addr` (`host:port` or a Unix socket path): the
    /// inherited one of that name, else the inherited one bound to that address, else a
    /// new one. Every listener asked for is handed on at an upgrade.
    ///
    /// # Errors
    /// A bad address, a port in use, a permission problem, or an inherited socket of the
    /// wrong kind; each message names the address.
    pub fn listen(&self, name: &str, addr: &str) -> Result<Listener> {
        let addr = ListenAddr::parse(addr)?;
        self.listen_on(Some(name), &addr)
    }

    /// As [`listen`](Self::listen), with an already parsed address and an optional name
    /// (an unnamed listener is found again by its address only).
    ///
    /// # Errors
    /// As [`listen`](Self::listen).
    pub fn listen_on(&self, name: Option<&str>, addr: &ListenAddr) -> Result<Listener> {
        if self.inner.ready.load(Ordering::SeqCst) {
            crate::log::warning!(
                "a listener ({addr}) was asked for after this process reported ready: the \
                 previous generation may already be gone, and inherited sockets not asked for \
                 by then were closed; ask for every listener before the first serve()"
            );
        }
        self.inner.listeners().listen(name, addr)
    }

    /// Reports that this process is ready (for [`ReadyMode::Manual`], or a server with its
    /// own accept loop): installs the signal handlers if not yet done, writes the PID
    /// file, and tells whoever started it. Idempotent. Must run inside a tokio runtime.
    ///
    /// # Errors
    /// Outside a tokio runtime, or when the signal handlers cannot be installed.
    pub fn ready(&self) -> Result<()> {
        self.inner.start()?;
        crate::readiness::report_ready(&self.inner);
        Ok(())
    }

    /// Upgrades now, as `SIGHUP` does: starts the program on disk with the listeners and
    /// waits for it to be ready (then this process drains) or to fail (then this process
    /// keeps serving). Resolves with the new process's PID once the handover is done and
    /// the new process has passed its probation ([`Builder::probation`]); if it died on
    /// probation, with [`UpgradeError::DiedOnProbation`], and this process serves again.
    ///
    /// # Errors
    /// [`UpgradeError`] says why the upgrade did not happen; this process keeps serving.
    pub async fn upgrade(&self) -> Result<Upgraded, UpgradeError> {
        crate::upgrade::upgrade(&self.inner).await
    }

    /// Starts a graceful shutdown now, as `SIGTERM` does without a
    /// [shutdown delay](Builder::shutdown_delay) (and ends one that runs). While the
    /// next generation is on [probation](Builder::probation), this process is already
    /// draining: the probation ends, without a rollback, and the process exits once
    /// drained.
    pub fn shutdown(&self) {
        let _one_at_a_time = self.inner.stop_or_commit();
        if !self.inner.end_probation("Reborn::shutdown") {
            self.inner.begin_drain(DrainReason::Shutdown);
        }
    }

    /// The readiness endpoint for a load balancer: `200` while this address should get
    /// traffic, `503` from the [shutdown delay](Builder::shutdown_delay) on. See
    /// [`crate::health`].
    ///
    /// ```no_run
    /// # fn example(reborn: reborn::Reborn) {
    /// let app: axum::Router = axum::Router::new().route_service("/readyz", reborn.readiness());
    /// # }
    /// ```
    pub fn readiness(&self) -> crate::health::Readiness {
        crate::health::Readiness::new(self.inner.clone())
    }

    /// Closes every connection now, as `SIGUSR2` does.
    pub fn hammer(&self) {
        self.inner.hammer();
    }

    /// How many idle keep-alive connections this process handed to the next generation,
    /// and how many it meant to hand but kept (the handoff failed: the new generation
    /// died, or refused them) and drained as usual. See
    /// [`Builder::hand_over_idle_connections`].
    pub fn handoff_counts(&self) -> HandoffCounts {
        let counts = &self.inner.handoff.counts;
        HandoffCounts {
            handed_over: counts.handed_over.load(Ordering::Relaxed),
            fell_back: counts.fell_back.load(Ordering::Relaxed),
        }
    }

    /// A view of the drain, for servers with their own accept loop.
    pub fn shutdown_signal(&self) -> Shutdown {
        self.inner.drain.shutdown()
    }

    /// A [`Draining`](crate::Draining) handle for one connection of a server with its
    /// own accept loop: call it once per accepted connection, and each gets its own
    /// moment in the eviction window, as connections served by [`serve`](Self::serve) do.
    /// Stop accepting at the drain's start, as below, before anything else: a client told
    /// to leave at the first moment reconnects within a millisecond.
    ///
    /// ```no_run
    /// # async fn example(reborn: reborn::Reborn, listener: tokio::net::TcpListener) {
    /// let shutdown = reborn.shutdown_signal();
    /// loop {
    ///     let (stream, _) = tokio::select! {
    ///         _ = shutdown.draining() => break,
    ///         accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => continue },
    ///     };
    ///     let draining = reborn.draining();
    ///     tokio::spawn(async move {
    ///         // ... serve `stream` until `draining.moment()`, then say goodbye and close.
    ///         draining.moment().await;
    ///         drop(stream);
    ///     });
    /// }
    /// # }
    /// ```
    pub fn draining(&self) -> crate::Draining {
        crate::Draining::new(
            self.inner.drain.clone(),
            self.inner.drain.next_connection(),
            self.inner.eviction_window(),
        )
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.inner.drain.phase()
    }

    /// The reborn master's PID, when this process runs under one.
    pub fn master_pid(&self) -> Option<u32> {
        self.inner.master_pid
    }
}
