//! `bench-server`: the server that `reborn-bench` restarts under load.
//!
//! ```text
//! bench-server --addr HOST:PORT [--pid-file PATH] [--plain-axum]
//! ```
//!
//! `GET /ping` answers at once with `pong <build-id> pid=<pid>`; `GET /ping?sleep_ms=N`
//! answers the same after N ms. The build-id is the xxh3-64 digest of the process's own
//! executable (`/proc/self/exe`, the inode it was started from), so a rebuilt or replaced
//! binary answers differently.
//!
//! The digest is computed off the critical path: a thread started first thing hashes the
//! executable while the runtime starts, the listener is obtained and readiness is
//! reported; a request that comes before the digest is done waits for it (in practice
//! the digest is done well before: see `build-id … in … µs` on stderr). xxh3 because it
//! runs at memory speed (several GB/s), so even the first request never waits; this is
//! an identity, not a security check, so a cryptographic hash would only cost time.
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
    /// How long a drain may take before what is left is closed (ms).
    #[arg(long, default_value_t = 60_000)]
    drain_timeout_ms: u64,
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

/// Hashes the executable this process runs (`/proc/self/exe` is the inode it started
/// from, even if the path was replaced since).
fn digest_own_executable() -> std::io::Result<String> {
    let bytes = std::fs::read("/proc/self/exe")?;
    Ok(format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&bytes)))
}

/// The router both modes serve.
fn router(state: Arc<AppState>) -> Router {
    Router::new().route("/ping", get(ping)).with_state(state)
}

fn main() -> std::process::ExitCode {
    reborn::init();
    let started = Instant::now();
    let (tx, rx) = watch::channel(None);
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
                "bench-server: build-id {id} in {} µs",
                t.elapsed().as_micros()
            );
            let _ = tx.send(Some(id));
        });
    if let Err(e) = hasher {
        eprintln!("bench-server: cannot start the build-id thread: {e}");
        return std::process::ExitCode::FAILURE;
    }
    let args = <Args as clap::Parser>::parse();
    let pid = std::process::id();
    let state = Arc::new(AppState { pid, build_id: rx });
    let result = if args.plain_axum {
        run_plain(&args, state)
    } else {
        run_reborn(&args, state, started)
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

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

fn run_reborn(
    args: &Args,
    state: Arc<AppState>,
    started: Instant,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut builder = reborn::Reborn::builder()
        .idle_grace(Duration::from_millis(args.idle_grace_ms))
        .drain_timeout(Duration::from_millis(args.drain_timeout_ms));
    if let Some(path) = &args.pid_file {
        builder = builder.pid_file(path);
    }
    let reborn = builder.build()?;
    let listener = reborn.listen("http", &args.addr)?;
    let addr = listener.local_addr();
    announce(state.pid, &addr);
    let rt = runtime()?;
    eprintln!(
        "bench-server[{}]: listener ready after {} µs",
        state.pid,
        started.elapsed().as_micros()
    );
    rt.block_on(reborn.serve(listener, router(state)))?;
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
