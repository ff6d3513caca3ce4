//! `bench-server`: the server that `reborn-bench` restarts under load.
//!
//! ```text
//! bench-server --addr HOST:PORT [--pid-file PATH] [--plain-axum]
//! ```
//!
//! `GET /ping` answers at once with `pong <build-id> pid=<pid>`; `GET /ping?sleep_ms=N`
//! answers the same after N ms. `GET /ws` is a WebSocket that says `hello pid=<pid>`,
//! echoes what it is sent, and at its connection's moment to leave
//! ([`reborn::Draining`], spread over `--eviction-window-ms`) sends close code 1012
//! and waits for the client's close. `GET /readyz` is reborn's readiness endpoint (503
//! from `--shutdown-delay-ms` on). The build-id is the xxh3-64 digest of the process's own
//! executable (`/proc/self/exe`, the inode it was started from), so a rebuilt or replaced
//! binary answers differently.
//!
//! The digest is computed off the critical path: a thread started first thing hashes the
//! executable (streamed, 256 KiB at a time) while the runtime starts, the listener is
//! obtained and readiness is reported; a request that comes before the digest is done
//! waits for it. xxh3 because it runs at memory speed (several GB/s): a 4 MiB release
//! binary hashes in about 1 ms; this is an identity, not a security check, so a
//! cryptographic hash would only cost time. The digest is cached per file identity
//! (device, inode, size, mtime, ctime) in a private directory, so restarts of the same
//! file skip the thread and its millisecond of CPU — which matters on a saturated
//! machine, where every runnable thread delays the new generation's start — while a
//! rebuilt or replaced binary, a new file, is hashed anew (`--no-build-id-cache`: always).
//!
//! Served by `reborn`'s `serve` (self-upgrade on `SIGHUP`, drain on `SIGTERM`), or with
//! `--plain-axum` by plain `axum::serve` on a plain listener, for the steady-state
//! comparison (no restarts in that mode: `SIGTERM` ends it at once).
//!
//! Prints `[pid] N` and `listening on ADDR` on stdout at start.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ws::{CloseFrame, Message, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::routing::get;
use serde::Deserialize;
use tokio::sync::watch;

/// The command line.
#[derive(Debug, clap::Parser)]
#[command(
    name = "bench-server",
    version,
    about = "The server reborn-bench restarts under load: GET /ping answers `pong <build-id> pid=<pid>` (after N ms with ?sleep_ms=N)."
)]
struct Args {
    /// The address to listen on (port 0: any free port; see `listening on` on stdout).
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: String,
    /// Keep the serving PID in this file (written when ready, replaced atomically).
    #[arg(long)]
    pid_file: Option<PathBuf>,
    /// Serve the same router with plain `axum::serve` instead of reborn's serve (no
    /// restarts, no drain): the steady-state baseline.
    #[arg(long)]
    plain_axum: bool,
    /// During a drain, how long an idle HTTP/1.1 keep-alive connection is kept (ms).
    #[arg(long, default_value_t = 1000)]
    idle_grace_ms: u64,
    /// Hash the executable at every start, even if a previous start cached the digest of
    /// this same file (same device, inode, size, mtime and ctime).
    #[arg(long)]
    no_build_id_cache: bool,
    /// How long a drain may take before what is left is closed (ms).
    #[arg(long, default_value_t = 60_000)]
    drain_timeout_ms: u64,
    /// A bad deploy, for `reborn-bench bad-deploy`: if the file given by --crash-flag
    /// exists when this process starts, it aborts this many ms after it reported ready.
    #[arg(long, value_name = "MS")]
    crash_after_ready_ms: Option<u64>,
    /// How long the previous generation stays on probation after an upgrade (ms).
    #[arg(long, value_name = "MS")]
    probation_ms: Option<u64>,
    /// See --crash-after-ready-ms.
    #[arg(long, value_name = "FILE")]
    crash_flag: Option<PathBuf>,
    /// The window over which long-lived connections (`/ws`) are told to leave (ms)
    /// [default: a tenth of the drain timeout].
    #[arg(long, value_name = "MS")]
    eviction_window_ms: Option<u64>,
    /// After SIGTERM, keep serving this long while /readyz answers 503, then drain (ms).
    #[arg(long, value_name = "MS")]
    shutdown_delay_ms: Option<u64>,
}

/// `?sleep_ms=N`.
#[derive(Debug, Deserialize)]
struct PingQuery {
    sleep_ms: Option<u64>,
}

/// What the handler needs: the pid, and the build-id once known.
struct AppState {
    pid: u32,
    build_id: watch::Receiver<Option<String>>,
}

async fn ping(State(state): State<Arc<AppState>>, Query(q): Query<PingQuery>) -> String {
    if let Some(ms) = q.sleep_ms {
        tokio::time::sleep(Duration::from_millis(ms.min(600_000))).await;
    }
    let id = {
        let current = state.build_id.borrow().clone();
        match current {
            Some(id) => id,
            None => {
                let mut rx = state.build_id.clone();
                match rx.wait_for(|v| v.is_some()).await {
                    Ok(v) => v.clone().unwrap_or_default(),
                    Err(_) => "unknown".to_owned(),
                }
            }
        }
    };
    format!("pong {id} pid={}", state.pid)
}

/// `GET /ws`: `hello pid=<pid>`, then an echo, until the connection's moment to leave.
async fn websocket(
    State(state): State<Arc<AppState>>,
    extensions: axum::http::Extensions,
    upgrade: WebSocketUpgrade,
) -> axum::response::Response {
    // Absent under --plain-axum: that mode never drains.
    let draining = extensions.get::<reborn::Draining>().cloned();
    let pid = state.pid;
    upgrade.on_upgrade(move |mut socket| async move {
        let hello = format!("hello pid={pid}");
        if socket.send(Message::Text(hello.into())).await.is_err() {
            return;
        }
        let moment = async {
            match &draining {
                Some(d) => d.moment().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(moment);
        loop {
            tokio::select! {
                msg = socket.recv() => match msg {
                    Some(Ok(Message::Text(t))) => {
                        if socket.send(Message::Text(t)).await.is_err() {
                            return;
                        }
                    }
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                    Some(Ok(_)) => {}
                },
                () = &mut moment => break,
            }
        }
        let close = CloseFrame {
            code: 1012,
            reason: "service restart".into(),
        };
        if socket.send(Message::Close(Some(close))).await.is_err() {
            return;
        }
        // The client's close answers ours; one that never answers is cut by the hammer.
        while let Some(Ok(msg)) = socket.recv().await {
            if let Message::Close(_) = msg {
                break;
            }
        }
    })
}

/// Hashes the executable this process runs (`/proc/self/exe` is the inode it started
/// from, even if the path was replaced since).
fn digest_own_executable() -> std::io::Result<String> {
    use std::io::Read;
    // Streamed through a small buffer: no allocation (and page faults) the size of the
    // binary.
    let mut file = std::fs::File::open("/proc/self/exe")?;
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:016x}", hasher.digest()))
}

/// The identity of the executable file this process runs: device, inode, size, and
/// modification and change times. A rebuilt or replaced binary (a new file renamed over
/// the old, or the old one rewritten) has a different identity.
fn exe_identity() -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata("/proc/self/exe").ok()?;
    Some(format!(
        "{}-{}-{}-{}.{}-{}.{}",
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec()
    ))
}

/// Where digests are cached: a directory of this user's own.
fn cache_dir() -> Option<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("bench-server-build-ids-{uid}"));
    let _ = std::fs::DirBuilder::new().mode(0o700).create(&dir);
    let m = std::fs::symlink_metadata(&dir).ok()?;
    // Trust only a real directory that is ours and closed to others.
    (m.is_dir() && m.uid() == uid && m.mode() & 0o077 == 0).then_some(dir)
}

fn read_cached(identity: &str) -> Option<String> {
    let id = std::fs::read_to_string(cache_dir()?.join(identity)).ok()?;
    let id = id.trim();
    (id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_owned())
}

fn write_cached(identity: &str, id: &str) {
    let Some(dir) = cache_dir() else { return };
    let tmp = dir.join(format!("{identity}.{}.tmp", std::process::id()));
    if std::fs::write(&tmp, id).is_ok() {
        let _ = std::fs::rename(&tmp, dir.join(identity));
    }
    prune_cache(&dir, 64);
}

/// Keeps the `keep` most recently written entries of the cache (a miss, which is when
/// this runs, is off the critical path).
fn prune_cache(dir: &std::path::Path, keep: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut files: Vec<(std::time::SystemTime, PathBuf)> = entries
        .flatten()
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    if files.len() <= keep {
        return;
    }
    files.sort_by_key(|f| std::cmp::Reverse(f.0));
    for (_, path) in files.into_iter().skip(keep) {
        let _ = std::fs::remove_file(path);
    }
}

/// Microseconds since the Unix epoch, to line up this process's start-up with the signal
/// that caused it.
fn unix_us() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0)
}

/// The router both modes serve.
fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/ping", get(ping))
        .route("/ws", get(websocket))
        .with_state(state)
}

fn main() -> std::process::ExitCode {
    let started_unix = unix_us();
    let started = Instant::now();
    reborn::init();
    let args = <Args as clap::Parser>::parse();
    // reborn's own log (upgrade steps, drain) with µs timestamps, at info level. A
    // `Targets` filter, not an `EnvFilter`: no regex to compile at every start.
    {
        use tracing_subscriber::layer::SubscriberExt as _;
        use tracing_subscriber::util::SubscriberInitExt as _;
        let filter = tracing_subscriber::filter::Targets::new()
            .with_target("reborn", tracing_subscriber::filter::LevelFilter::INFO);
        let _ = tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(false),
            )
            .with(filter)
            .try_init();
    }
    let (tx, rx) = watch::channel(None);
    let identity = if args.no_build_id_cache {
        None
    } else {
        exe_identity()
    };
    if let Some(id) = identity.as_deref().and_then(read_cached) {
        // The same file as a previous start: no hashing, no thread.
        let _ = tx.send(Some(id));
    } else {
        // Off the critical path: hash while the rest starts.
        let hasher = std::thread::Builder::new()
            .name("build-id".into())
            .spawn(move || {
                let t = Instant::now();
                let id = match digest_own_executable() {
                    Ok(id) => id,
                    Err(e) => {
                        eprintln!("bench-server: cannot hash /proc/self/exe: {e}");
                        "unknown".to_owned()
                    }
                };
                eprintln!(
                    "bench-server: build-id {id} hashed in {} µs, ready {} µs after start",
                    t.elapsed().as_micros(),
                    started.elapsed().as_micros()
                );
                let _ = tx.send(Some(id.clone()));
                if let Some(identity) = identity {
                    write_cached(&identity, &id);
                }
            });
        if let Err(e) = hasher {
            eprintln!("bench-server: cannot start the build-id thread: {e}");
            return std::process::ExitCode::FAILURE;
        }
    }
    let pid = std::process::id();
    let state = Arc::new(AppState { pid, build_id: rx });
    let result = if args.plain_axum {
        run_plain(&args, state)
    } else {
        run_reborn(&args, state, started, started_unix)
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-server[{pid}]: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn announce(pid: u32, addr: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "[pid] {pid}");
    let _ = writeln!(out, "listening on {addr}");
    let _ = out.flush();
}

/// The CPUs this process may run on (`sched_getaffinity`), without the cgroup file reads
/// of `available_parallelism` that tokio would do at every start.
fn cpus() -> usize {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity writes into it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0 {
            (libc::CPU_COUNT(&set) as usize).max(1)
        } else {
            1
        }
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cpus())
        .enable_all()
        .build()
}

fn run_reborn(
    args: &Args,
    state: Arc<AppState>,
    started: Instant,
    started_unix: u128,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut builder = reborn::Reborn::builder()
        .idle_grace(Duration::from_millis(args.idle_grace_ms))
        .drain_timeout(Duration::from_millis(args.drain_timeout_ms));
    if let Some(path) = &args.pid_file {
        builder = builder.pid_file(path);
    }
    if let Some(ms) = args.eviction_window_ms {
        builder = builder.eviction_window(Duration::from_millis(ms));
    }
    if let Some(ms) = args.probation_ms {
        builder = builder.probation(Duration::from_millis(ms));
    }
    if let Some(ms) = args.shutdown_delay_ms {
        builder = builder.shutdown_delay(Duration::from_millis(ms));
    }
    if let (Some(ms), Some(flag)) = (args.crash_after_ready_ms, &args.crash_flag)
        && flag.exists()
    {
        builder = builder.ready_check(move || async move {
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(ms));
                std::process::abort();
            });
            Ok(())
        });
    }
    let reborn = builder.build()?;
    let t_built = started.elapsed();
    let listener = reborn.listen("http", &args.addr)?;
    let t_listen = started.elapsed();
    let addr = listener.local_addr();
    announce(state.pid, &addr);
    let rt = runtime()?;
    eprintln!(
        "bench-server[{}]: started at {started_unix} µs (unix); built {} µs, listener {} µs, runtime {} µs after start",
        state.pid,
        t_built.as_micros(),
        t_listen.as_micros(),
        started.elapsed().as_micros()
    );
    let app = router(state).route_service("/readyz", reborn.readiness());
    rt.block_on(reborn.serve(listener, app))?;
    Ok(())
}

fn run_plain(args: &Args, state: Arc<AppState>) -> Result<(), Box<dyn std::error::Error>> {
    let rt = runtime()?;
    rt.block_on(async move {
        let addr: SocketAddr = tokio::net::lookup_host(&args.addr)
            .await?
            .next()
            .ok_or_else(|| std::io::Error::other(format!("{} resolves to nothing", args.addr)))?;
        let listener = tokio::net::TcpListener::bind(addr).await?;
        announce(state.pid, &listener.local_addr()?.to_string());
        if let Some(path) = &args.pid_file {
            std::fs::write(path, format!("{}\n", state.pid))?;
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        // reborn sets TCP_NODELAY on accepted connections: do the same, for a fair
        // comparison.
        use axum::serve::ListenerExt;
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, router(state))
            .with_graceful_shutdown(async move {
                term.recv().await;
            })
            .await?;
        Ok(())
    })
}
