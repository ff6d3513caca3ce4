//! Zero-downtime restarts and hot upgrades for Rust network servers.
//!
//! A server built with reborn upgrades itself in place: `kill -HUP <pid>` starts the
//! binary that is *now on disk* as a new process that inherits the listening sockets.
//! Once the new process is ready, the old one stops accepting, finishes every request
//! already accepted, closes its idle keep-alive connections without racing the clients,
//! and exits. If the new process fails — it crashes, never gets ready, cannot start —
//! the old one keeps serving and logs why. No request is refused or reset on the way.
//!
//! # Quick start
//!
//! An axum server changes one line: `axum::serve(listener, app)` becomes
//! `reborn::serve(addr, app)`.
//!
//! ```no_run
//! use axum::{Router, routing::get};
//!
//! #[tokio::main]
//! async fn main() -> Result<(), reborn::Error> {
//!     let app = Router::new().route("/ping", get(|| async { "pong" }));
//!     reborn::serve("0.0.0.0:8080", app).await
//! }
//! ```
//!
//! Or, without `#[tokio::main]`, [`listen_and_serve`] starts the runtime itself:
//!
//! ```no_run
//! use axum::{Router, routing::get};
//!
//! fn main() -> Result<(), reborn::Error> {
//!     let app = Router::new().route("/ping", get(|| async { "pong" }));
//!     reborn::listen_and_serve("0.0.0.0:8080", app)
//! }
//! ```
//!
//! The two are equally correct. The only difference: `listen_and_serve` calls [`init`]
//! while the process is single-threaded, which also removes `LISTEN_FDS` and the other
//! variables it consumed from the process's environment; under `#[tokio::main]` they
//! stay there (removing them from a multi-threaded process is not sound). Nothing reborn
//! does depends on that: it hands the next generation an environment of its own making,
//! and a child process the application starts ignores `LISTEN_FDS`, since `LISTEN_PID`
//! names another process. (`NOTIFY_SOCKET` stays visible to such children, as in any
//! systemd service that does not unset it; an application that starts children which
//! themselves notify systemd calls [`init`] first thing in `main`.) Returned from `main`, an [`Error`] prints its message
//! (`Error: cannot listen on 0.0.0.0:8080: the address is already in use; …`).
//!
//! Then, with the server running:
//!
//! | signal | what happens |
//! |---|---|
//! | `SIGHUP` | upgrade to the binary on disk |
//! | `SIGTERM`, `SIGINT` | graceful shutdown: drain, then exit 0 (after the [shutdown delay](Builder::shutdown_delay), if one is set) |
//! | `SIGUSR2` | hammer: close every connection now |
//! | `SIGUSR1`, `SIGTSTP` | your hooks ([`Builder::on`]) |
//!
//! # More control
//!
//! [`Reborn`] is the process's share of the protocol; [`Builder`] configures it.
//!
//! ```no_run
//! use std::time::Duration;
//! use axum::{Router, routing::get};
//!
//! fn main() -> Result<(), reborn::Error> {
//!     reborn::init(); // optional: also removes LISTEN_FDS & co. from the environment
//!     let reborn = reborn::Reborn::builder()
//!         .drain_timeout(Duration::from_secs(30))
//!         .pid_file("/run/app.pid")
//!         .on(reborn::Signal::Usr1, || tracing::info!("reopen the logs"))
//!         .build()?;
//!     let public = reborn.listen("http", "0.0.0.0:8080")?;
//!     let admin = reborn.listen("admin", "/run/app-admin.sock")?;
//!     let app = Router::new().route("/", get(|| async { "hello" }));
//!     let ops = Router::new().route("/health", get(|| async { "ok" }));
//!     let rt = tokio::runtime::Runtime::new().map_err(reborn::Error::Runtime)?;
//!     rt.block_on(async {
//!         let r = reborn.clone();
//!         let admin = tokio::spawn(async move { r.serve(admin, ops).await });
//!         reborn.serve(public, app).await?;
//!         admin.await.map_err(|e| reborn::Error::Runtime(std::io::Error::other(e)))?
//!     })
//! }
//! ```
//!
//! A server with its own accept loop (a TLS terminator, a raw TCP protocol, another
//! framework) takes the socket with [`Listener::into_socket`], calls [`Reborn::ready`]
//! once it accepts, and stops accepting when [`Shutdown::draining`] resolves. The
//! `raw_tcp` example does so with a line protocol, the `actix` example with actix-web
//! (`HttpServer::listen` on the socket, `disable_signals`, a graceful `stop` at the
//! drain). Such a server owns its connections, and closes idle keep-alive ones itself
//! when it stops: actix does so at once, racing a client that sends its next request just
//! then. reborn's keep-alive drain applies to what [`Reborn::serve`] runs.
//!
//! # One protocol, three hosts
//!
//! Between whatever starts a server and the server, reborn speaks only systemd's
//! protocols, so one binary works in three places:
//!
//! * **on its own**: the previous generation starts it, passes the sockets as
//!   `LISTEN_FDS`/`LISTEN_FDNAMES` from fd 3 with `LISTEN_PID` set to the new process's
//!   PID, and waits for `READY=1` on a private `NOTIFY_SOCKET` (an abstract socket that
//!   accepts only this user's processes);
//! * **under systemd** (`Type=notify`, `NotifyAccess=all`, optionally socket-activated):
//!   the sockets come from systemd; on each upgrade systemd hears `RELOADING=1`, then
//!   `MAINPID=<new pid>` and `READY=1` from the new process;
//! * **under the `reborn` master** (`reborn run -- ./server`), which keeps the sockets and
//!   a stable PID for supervisors: the server reports ready and drains on `SIGTERM`, and
//!   leaves upgrades to the master.
//!
//! Listeners are found by name, then by address, then bound anew (see [`listeners`]).
//!
//! # A bad deploy undoes itself
//!
//! Most bad deploys report ready, then crash: on the first request, the first database
//! query, a setting read lazily. After an upgrade commits, the previous generation stays
//! on *probation* for a few seconds ([`Builder::probation`], 3 s by default): it has
//! stopped accepting and drains as usual, but keeps its sockets. If the new generation
//! dies in that window, the previous one accepts again at once, writes its PID to the PID
//! file, tells systemd, and logs why:
//!
//! ```text
//! ERROR pid 5653 (the new version) died 0.2 s after it was ready (killed by signal 6 (SIGABRT)): rolled back, pid 5600 serves again
//! ```
//!
//! `READY=1` can mean "healthy", not only "accepting": [`Builder::ready_check`] runs an
//! async check (the database answers, the cache is warm) before the new process reports
//! ready; a failing check is a failed upgrade with the check's message.
//!
//! # The drain
//!
//! hyper's graceful shutdown closes idle HTTP/1.1 connections at once, racing clients
//! that are sending their next request; every peer tool loses requests there. reborn
//! answers the next request on each connection with `Connection: close` and closes a
//! connection only after it stayed idle for a grace period ([`Builder::idle_grace`]);
//! HTTP/2 connections get a graceful GOAWAY. A client halfway through sending its next
//! request when the grace ends is not idle, and is answered. See [`drain`].
//!
//! After an upgrade it does better still: an idle plain HTTP/1.1 connection is not
//! closed at all but handed to the new generation (its socket, sent over a private Unix
//! socket between the two processes), so keep-alive clients and the connection pools of
//! load balancers keep their connections, and nothing races a close
//! ([`Builder::hand_over_idle_connections`], on by default; [`Reborn::handoff_counts`]).
//!
//! # Behind a load balancer
//!
//! An in-place upgrade keeps the listening socket open, so a balancer in front sees
//! nothing. An instance that is *replaced* (a Kubernetes rolling update, a host drained)
//! gets `SIGTERM` while the balancer still sends it traffic; with a
//! [shutdown delay](Builder::shutdown_delay) it serves on for a while, its readiness
//! endpoint ([`Reborn::readiness`], mounted at `/readyz`) answering `503`, and drains
//! only once the balancer has taken it out. See [`health`], and `docs/fleet.md` for
//! Kubernetes, systemd and HAProxy settings.
//!
//! # WebSockets, event streams, gRPC streams
//!
//! A connection that switched protocols (a WebSocket) or carries a long stream is the
//! application's to end. Each gets its own moment to leave, spread over an eviction
//! window so that thousands of clients do not reconnect at once; the handler learns it
//! from the [`Draining`] handle in its request (an axum extractor), sends `1012 Service
//! Restart` or ends its stream, and the client reconnects to the new generation. The old
//! generation stays until they are gone, or until the drain deadline closes what is
//! left, WebSockets with a close frame. See [`draining`]; gRPC clients, see [`retry`].
//!
//! # What cannot hold a process forever
//!
//! * a slow or stalled client: a request head must arrive within
//!   [`Builder::header_read_timeout`] (30 s), so a slowloris cannot keep a draining
//!   generation alive;
//! * a handler that blocks a runtime thread: after the drain deadline and
//!   [`Builder::hammer_grace`] the process exits with [`EXIT_DRAIN_OVERRUN`], naming what
//!   was still open;
//! * running out of file descriptors: the soft open-files limit is raised to the hard
//!   one at start, failing accepts are reported once per 10 s with the limit and what to
//!   raise, and a reserve of descriptors lets a process full of connections still start
//!   its upgrade;
//! * a terminal that goes away, or a log pipe whose reader died: signals keep working
//!   (see [`signals`]).
//!
//! # Other systems
//!
//! Socket inheritance, readiness and drains are POSIX, and so is reborn's portable path,
//! taken on every Unix but Linux. Linux takes a faster, tighter one. To test the portable
//! path on Linux, build with the `portable` feature: `scripts/test-portable` runs the
//! library's tests of what the two paths do differently that way (as CI does), or by hand
//! `REBORN_TEST_FEATURES=reborn/portable cargo test -p reborn --features portable` (the
//! variable builds the servers the tests start with the feature too; without it they
//! refuse to run on the other path).
//!
//! | | Linux | other systems, and the `portable` feature |
//! |---|---|---|
//! | starting a generation | `clone` with vfork semantics (no copy of a large server's page tables); a pinned program by `execveat` | `fork` and `exec`; a pinned program as `/dev/fd/N` |
//! | knowing it exited | a pidfd | `waitpid` at each `SIGCHLD` |
//! | its readiness socket | an abstract name (nothing on disk), each datagram's sender checked by its credentials | a socket file in a fresh directory only this user can enter (mode 0700) |
//! | [`spawn::SpawnSpec::parent_death_signal`] | `PR_SET_PDEATHSIG` | none: the child outlives a parent that is killed |
//! | removing `LISTEN_*` from a single-threaded environment ([`init`]) | counted in `/proc/self/task` | left in place (harmless: reborn never hands them on) |
//!
//! What a user sees is the same: the signals, the drain, the upgrade and its errors.
//! Only Linux targets can be built where reborn is developed, so other systems are
//! covered through the feature, not on the systems themselves. The master, `reborn run`,
//! is made for Linux (it reads `/proc` and collects its workers' orphans as their
//! subreaper); on other systems, use the library's own upgrades.
//!
//! # A faster handoff: link statically
//!
//! Most of an upgrade's handoff, the time from `SIGHUP` to the first answer of the new
//! generation, is the new process's own start: `exec`, then the dynamic loader mapping
//! and relocating glibc, libm and libgcc_s, then the runtime's threads. reborn's part
//! (its sockets, the spawn, the readiness message) is a few dozen system calls. A
//! statically linked binary skips the loader; for a server that is upgraded often, or
//! behind clients with tight timeouts, build it so:
//!
//! ```sh
//! RUSTFLAGS="-C target-feature=+crt-static" \
//!     cargo build --release --target x86_64-unknown-linux-gnu
//! ```
//!
//! (`--target` keeps build scripts and proc macros dynamic, as they must be.) What it
//! buys, measured side by side at light load (`BENCHMARKS.md`, "Keep-alive connections
//! move"): the first answer of the new generation came 1.2 ms sooner in the median (4.6
//! against 5.8 ms on a slow-to-exec VM; on a faster machine a static build measured
//! 2.1 against 2.6 ms). What it costs: the binary carries its own copy of glibc (a glibc
//! security update means a rebuild), and whatever glibc loads at run time needs the same
//! glibc version on the machine: name lookups through NSS modules other than `files` and
//! `dns` (LDAP or sssd users, systemd-resolved's `resolve`, mDNS), `iconv` conversions,
//! `dlopen`. A server that uses none of these (most do not) loses nothing; the binary
//! stays position-independent (`static-pie`), so address randomization is kept.
#![warn(missing_docs)]

pub mod activation;
pub mod drain;
pub mod draining;
pub mod error;
mod files;
pub(crate) mod handoff;
pub mod health;
pub mod listeners;
mod log;
pub mod notify;
pub mod peer;
mod probation;
mod readiness;
pub mod retry;
mod serve;
mod server;
pub mod signals;
pub mod spawn;
pub mod upgrade;
mod websocket;

use std::sync::Mutex;

pub use drain::{Phase, Shutdown};
pub use draining::Draining;
pub use error::{Error, Result};
pub use health::{Health, Readiness};
pub use listeners::{ListenAddr, Listener};
pub use peer::{ConnectionInfo, UnixPeer};
pub use serve::{BoxError, Connection, HttpBody, HttpService};
pub use server::{Builder, EXIT_DRAIN_OVERRUN, HandoffCounts, ReadyMode, Reborn};
pub use signals::Signal;
pub use upgrade::{UpgradeError, Upgraded};

use activation::{ActivationError, ProcessEnv};

static EARLY: Mutex<Option<Result<ProcessEnv, ActivationError>>> = Mutex::new(None);
static PROCESS: std::sync::OnceLock<server::ProcessInfo> = std::sync::OnceLock::new();

/// Takes what the process was started with — inherited sockets, `NOTIFY_SOCKET`, the
/// program's path, arguments, environment and working directory — and, while the process
/// is still single-threaded, removes the socket-activation variables from its
/// environment (only then is that sound). For that, call it first thing in `main`,
/// before a runtime starts; [`listen_and_serve`] does.
///
/// Optional: [`Reborn::builder`] takes the same later, from any thread, and only leaves
/// the variables in the environment, which is harmless: reborn never hands them on
/// (each generation gets an environment of reborn's making), and a child the application
/// starts ignores `LISTEN_FDS`, as `LISTEN_PID` names another process (see the crate
/// documentation for `NOTIFY_SOCKET`).
pub fn init() {
    process_info();
    let mut early = EARLY.lock().unwrap_or_else(|e| e.into_inner());
    if early.is_none() {
        *early = Some(activation::take_from_env());
    }
}

pub(crate) fn take_process_env() -> Result<ProcessEnv, ActivationError> {
    process_info();
    let early = EARLY.lock().unwrap_or_else(|e| e.into_inner()).take();
    match early {
        Some(env) => env,
        None => activation::take_from_env(),
    }
}

/// The program's path, arguments, environment and working directory at start-up.
pub(crate) fn process_info() -> &'static server::ProcessInfo {
    PROCESS.get_or_init(|| {
        let mut args = std::env::args_os();
        let arg0 = args.next().unwrap_or_default();
        let cwd = std::env::current_dir().ok();
        let exe = program_path(&arg0, cwd.as_deref());
        let env = std::env::vars_os()
            .filter(|(k, _)| {
                !activation::CONSUMED_VARS
                    .iter()
                    .any(|c| std::ffi::OsStr::new(c) == k)
            })
            .collect();
        server::ProcessInfo {
            exe,
            arg0,
            args: args.collect(),
            env,
            cwd_fd: cwd.as_deref().and_then(open_dir).map(std::sync::Arc::new),
            cwd,
        }
    })
}

/// The directory, held open to `fchdir` into: on Linux without read access (`O_PATH`).
fn open_dir(dir: &std::path::Path) -> Option<std::os::fd::OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    #[cfg(target_os = "linux")]
    let flags = libc::O_PATH | libc::O_DIRECTORY;
    #[cfg(not(target_os = "linux"))]
    let flags = libc::O_DIRECTORY;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(dir)
        .ok()
        .map(std::os::fd::OwnedFd::from)
}

/// The path to start at an upgrade: `argv[0]` when it names a file (made absolute, so it
/// survives a `chdir`, and not resolved through symlinks, so a symlink switched to a new
/// release is followed), else the executable's own path.
fn program_path(arg0: &std::ffi::OsStr, cwd: Option<&std::path::Path>) -> std::path::PathBuf {
    use std::os::unix::ffi::OsStrExt;
    let path = std::path::Path::new(arg0);
    if arg0.as_bytes().contains(&b'/') {
        let joined = match cwd {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path.to_path_buf(),
        };
        let abs = std::path::absolute(&joined).unwrap_or(joined);
        if abs.is_file() {
            return abs;
        }
    }
    std::env::current_exe()
        .ok()
        .or_else(|| spawn::resolve_program(arg0))
        .unwrap_or_else(|| path.to_path_buf())
}

/// Serves `service` on `addr` with everything reborn does, in one call: the `axum::serve`
/// of zero-downtime upgrades. The listener is named `http`.
///
/// ```no_run
/// use axum::{Router, routing::get};
///
/// #[tokio::main]
/// async fn main() -> Result<(), reborn::Error> {
///     let app = Router::new().route("/", get(|| async { "hello" }));
///     reborn::serve("0.0.0.0:8080", app).await
/// }
/// ```
///
/// # Errors
/// A bad address, a port in use, a malformed socket-activation environment.
pub async fn serve<S, B>(addr: &str, service: S) -> Result<()>
where
    S: HttpService<B>,
    B: HttpBody,
{
    let reborn = Reborn::new()?;
    let listener = reborn.listen("http", addr)?;
    reborn.serve(listener, service).await
}

/// As [`serve`], but blocking, and it starts the tokio runtime itself after [`init`]: the
/// complete `main` of a server.
///
/// ```no_run
/// use axum::{Router, routing::get};
///
/// fn main() -> Result<(), reborn::Error> {
///     let app = Router::new().route("/", get(|| async { "hello" }));
///     reborn::listen_and_serve("0.0.0.0:8080", app)
/// }
/// ```
///
/// # Errors
/// As [`serve`], and a runtime that cannot start.
pub fn listen_and_serve<S, B>(addr: &str, service: S) -> Result<()>
where
    S: HttpService<B>,
    B: HttpBody,
{
    init();
    let reborn = Reborn::new()?;
    let listener = reborn.listen("http", addr)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)?
        .block_on(reborn.serve(listener, service))
}
