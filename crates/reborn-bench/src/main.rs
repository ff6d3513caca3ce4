//! `reborn-bench`: does anything fail while a server restarts, and what does a restart
//! cost? Drives load against a server while it is restarted (self-upgrade, master, or
//! stop-and-start), counts every request by outcome, times each handoff and drain, and
//! prints a table and writes JSON. Also: steady-state throughput of reborn's serve
//! against plain `axum::serve`, and a drain of many idle keep-alive connections. And a
//! fleet: instances in network namespaces behind HAProxy, through rolling upgrades and
//! replacements.
//!
//! Loopback only (the fleet: loopback and the namespaces' addresses it made); every run
//! is bounded in count and time.

mod baddeploy;
mod fleet;
mod idle;
mod load;
mod restart;
mod scenario;
mod stats;
mod steady;
mod sys;
mod websocket;

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::load::Mode;
use crate::restart::{RestartPath, TargetOpts};

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "reborn-bench",
    version,
    about = "Measures what fails while a server restarts, and what a restart costs.",
    long_about = "Measures what fails while a server restarts, and what a restart costs.\n\n\
        restart: load a server over HTTP/1.1 keep-alive, HTTP/1.1 new connections or HTTP/2 \
        while restarting it N times (self-upgrade by SIGHUP, the reborn master, or \
        stop-and-start); count every request by outcome; time handoffs and drains.\n\
        steady:  the same handler served by reborn's serve and by plain axum::serve, same \
        load, throughput and latency as a ratio.\n\
        idle:    many idle keep-alive connections on the old generation; check each is \
        closed cleanly within the idle grace + 1 s of an upgrade.\n\
        websocket: many WebSocket clients through upgrades under load; each must get close \
        code 1012 at its moment in the eviction window and reconnect to the new generation.\n\
        fleet:   instances in network namespaces of their own behind HAProxy (/readyz checks, \
        retries 0) under clients that never retry, through rolling in-place upgrades and \
        rolling replacements with and without a shutdown delay; requests failed, time per \
        instance and in all.\n\n\
        Every run is bounded in time and count, and talks to loopback only (fleet: and to \
        the addresses of the namespaces it made).",
    after_help = "Examples:\n  \
        reborn-bench restart --path self --mode keepalive -c 64 --restarts 100 --interval-ms 250 --json self-ka.json\n  \
        reborn-bench restart --path stop-start --mode newconn --restarts 20\n  \
        reborn-bench restart --path self --url http://127.0.0.1:8080/ping --pid-file /run/app.pid\n  \
        reborn-bench steady --duration-s 10 --rounds 3\n  \
        reborn-bench idle --connections 10000 --path master\n  \
        reborn-bench websocket --clients 10000 --upgrades 1 --window-ms 2000\n  \
        reborn-bench fleet --instances 3 --rounds 3 --shutdown-delay-ms 1000 --json fleet.json"
)]
struct Cli {
    /// Keep the servers' logs, PID files and control sockets in this directory
    /// (created if missing) instead of a temporary one removed at the end.
    #[arg(long, global = true, value_name = "DIR")]
    work_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Load a server while restarting it; count failures, time handoffs and drains.
    Restart(RestartArgs),
    /// Throughput and latency of reborn's serve against plain axum::serve.
    Steady(SteadyArgs),
    /// Idle keep-alive connections through an upgrade: each closed cleanly in time?
    Idle(IdleArgs),
    /// A new version that crashes after it reported ready: lost, refused, time to recover.
    BadDeploy(BadDeployArgs),
    /// WebSocket clients through upgrades: 1012 at each one's moment, abnormal closes,
    /// reconnect times, the spread of reconnects.
    Websocket(WebSocketArgs),
    /// Instances in network namespaces behind HAProxy through rolling upgrades and
    /// replacements: requests failed, time per instance and in all.
    Fleet(FleetArgs),
}

#[derive(Debug, Args)]
struct FleetArgs {
    /// The bench-server binary [default: bench-server next to reborn-bench]. Each
    /// instance runs its own copy; the in-place upgrade deploys variants of it (the same
    /// file plus a few bytes: another build-id).
    #[arg(long, value_name = "PATH")]
    server: Option<PathBuf>,
    /// An extra argument for every instance (repeatable), e.g. --server-arg=--idle-grace-ms=500.
    #[arg(long = "server-arg", value_name = "ARG", allow_hyphen_values = true)]
    server_args: Vec<String>,
    /// Instances, each in a network namespace of its own (root; loopback ports without).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=8))]
    instances: u64,
    /// Rounds of the in-place upgrade, each over every instance.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
    rounds: u64,
    /// The shutdown delay of replace-delay (ms): after SIGTERM an instance serves on this
    /// long while /readyz answers 503, then drains.
    #[arg(long, value_name = "MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=20_000))]
    shutdown_delay_ms: u64,
    /// HTTP/1.1 clients that keep their connection to HAProxy alive (never retrying).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(0..=256))]
    keep_alive: u64,
    /// HTTP/1.1 clients that open a new connection to HAProxy per request.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(0..=256))]
    new_conn: u64,
    /// Which deploys: in-place, replace-delay, replace-no-delay, or all three (each on a
    /// fleet of its own).
    #[arg(long, value_enum, default_value = "all")]
    scenario: fleet::Scenario,
    /// Write the report as JSON to this file.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct WebSocketArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// How to upgrade: self or master.
    #[arg(long, value_enum, default_value = "self")]
    path: RestartPath,
    /// WebSocket clients connected to `/ws`.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    clients: u64,
    /// Upgrades.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=1000))]
    upgrades: u64,
    /// The server's eviction window (ms): passed as --eviction-window-ms.
    #[arg(long, value_name = "MS", default_value_t = 2_000)]
    window_ms: u64,
    /// The probation of each new generation (ms), during which the old one stays even
    /// once drained (passed as --probation-ms): the old generation is gone by the later of
    /// the window and the probation, plus a grace of 2 s.
    #[arg(long, value_name = "MS", default_value_t = 3_000)]
    probation_ms: u64,
    /// HTTP/1.1 keep-alive clients loading `/ping` throughout (0: none).
    #[arg(long, default_value_t = 8)]
    load: u64,
    /// Pace the HTTP load to this many requests per second in total (0: closed loop,
    /// which takes every CPU the WebSocket clients and the server leave).
    #[arg(long, value_name = "REQ/S", default_value_t = 2000.0)]
    rate: f64,
    /// Pause after every client is back, before the next upgrade (ms).
    #[arg(long, value_name = "MS", default_value_t = 500)]
    interval_ms: u64,
    /// Write the report as JSON to this file.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct BadDeployArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// How to upgrade: self (SIGHUP) or master (reborn upgrade).
    #[arg(long, value_enum, default_value = "self")]
    path: RestartPath,
    /// How the clients talk.
    #[arg(long, value_enum, default_value = "newconn")]
    mode: Mode,
    /// Number of clients.
    #[arg(short = 'c', long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    concurrency: u64,
    /// Pace the clients to this many requests per second in total (0: closed loop).
    #[arg(long, value_name = "REQ/S", default_value_t = 4000.0)]
    rate: f64,
    /// Bad deploys.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=1000))]
    rounds: u64,
    /// The new version aborts this long after it reported ready (ms).
    #[arg(long, value_name = "MS", default_value_t = 200)]
    crash_after_ms: u64,
    /// The probation window (ms) of the server (self) or the master.
    #[arg(long, value_name = "MS", default_value_t = 3000)]
    probation_ms: u64,
    /// Write the report as JSON to this file.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
}

/// Where the server under test is.
#[derive(Debug, Clone, Args)]
struct ServerArgs {
    /// The bench-server binary to start [default: bench-server next to reborn-bench].
    /// The bench starts it (port 0), restarts it, and stops it at the end.
    #[arg(long, value_name = "PATH", conflicts_with = "url")]
    server: Option<PathBuf>,
    /// An extra argument for the server (repeatable), e.g. --server-arg=--idle-grace-ms=500.
    #[arg(long = "server-arg", value_name = "ARG", allow_hyphen_values = true)]
    server_args: Vec<String>,
    /// Load a server that runs already, at this URL (http://HOST:PORT/…, loopback only),
    /// instead of starting one. The bench requests `/ping` and `/ping?sleep_ms=N` there
    /// (whatever the URL's path), which must answer `pong <build-id> pid=<pid>`.
    #[arg(long, value_name = "URL")]
    url: Option<String>,
    /// The running server's PID file (self path with --url).
    #[arg(long, value_name = "PATH", requires = "url")]
    pid_file: Option<PathBuf>,
    /// The running master's control socket (master path with --url).
    #[arg(long, value_name = "PATH", requires = "url")]
    control: Option<PathBuf>,
    /// The reborn master binary [default: reborn next to reborn-bench].
    #[arg(long, value_name = "PATH")]
    reborn: Option<PathBuf>,
    /// How long starting, restarting or stopping the server may take (ms).
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    step_timeout_ms: u64,
}

#[derive(Debug, Args)]
struct RestartArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// How to restart: self (SIGHUP to the PID in the PID file), master (reborn
    /// upgrade), stop-start (SIGTERM, wait for the exit, start again).
    #[arg(long, value_enum, default_value = "self")]
    path: RestartPath,
    /// How the clients talk: keepalive (HTTP/1.1), newconn (HTTP/1.1, a new connection
    /// per request), h2 (HTTP/2 prior knowledge).
    #[arg(long, value_enum, default_value = "keepalive")]
    mode: Mode,
    /// Number of closed-loop clients.
    #[arg(short = 'c', long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    concurrency: u64,
    /// Pace the clients to this many requests per second in total (0: closed loop, each
    /// client sends its next request as soon as the answer is in).
    #[arg(long, value_name = "REQ/S", default_value_t = 0.0)]
    rate: f64,
    /// Number of restarts.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    restarts: u64,
    /// Time between restarts, signal to signal (ms).
    #[arg(long, value_name = "MS", default_value_t = 250)]
    interval_ms: u64,
    /// Load before the first restart (ms).
    #[arg(long, value_name = "MS", default_value_t = 500)]
    warmup_ms: u64,
    /// Load after the last restart (ms).
    #[arg(long, value_name = "MS", default_value_t = 500)]
    cooldown_ms: u64,
    /// Slow requests started half an interval before each restart (they must be answered
    /// by the generation that accepted them).
    #[arg(long, default_value_t = 2)]
    slow_per_restart: usize,
    /// How long each slow request takes (ms): `?sleep_ms=` of the request.
    #[arg(long, value_name = "MS", default_value_t = 600)]
    slow_ms: u64,
    /// Timeout of one request, connect included (ms).
    #[arg(long, value_name = "MS", default_value_t = 5_000)]
    timeout_ms: u64,
    /// A restart window lasts from the signal until this long after the new generation's
    /// first answer (ms).
    #[arg(long, value_name = "MS", default_value_t = 100)]
    window_tail_ms: u64,
    /// The run stops after this many seconds whatever is left.
    #[arg(long, value_name = "S", default_value_t = 600)]
    max_time_s: u64,
    /// Write the report as JSON to this file.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct SteadyArgs {
    /// The bench-server binary [default: bench-server next to reborn-bench].
    #[arg(long, value_name = "PATH")]
    server: Option<PathBuf>,
    /// How the clients talk.
    #[arg(long, value_enum, default_value = "keepalive")]
    mode: Mode,
    /// Number of closed-loop clients.
    #[arg(short = 'c', long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    concurrency: u64,
    /// Length of each measured round per server (s).
    #[arg(long, value_name = "S", default_value_t = 5.0)]
    duration_s: f64,
    /// Rounds; each measures both servers, in alternating order.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
    rounds: u64,
    /// Unmeasured load before each measured round (s).
    #[arg(long, value_name = "S", default_value_t = 1.0)]
    warmup_s: f64,
    /// Write the report as JSON to this file.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct IdleArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// How to upgrade: self or master.
    #[arg(long, value_enum, default_value = "self")]
    path: RestartPath,
    /// Idle keep-alive connections to open (each sends one request first).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    connections: u64,
    /// Of those, how many send one more request during the idle grace (spread over it);
    /// each must be answered, not reset.
    #[arg(long, default_value_t = 200)]
    active: u64,
    /// The server's idle grace (ms): passed to the server as --idle-grace-ms.
    #[arg(long, value_name = "MS", default_value_t = 1_000)]
    idle_grace_ms: u64,
    /// Write the report as JSON to this file.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
}

fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Parses `http://HOST:PORT/...` into a loopback address (refuses anything else).
fn loopback_addr(url: &str) -> Result<SocketAddr, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// URLs"))?;
    let hostport = rest.split('/').next().unwrap_or(rest);
    let addr = hostport
        .to_socket_addrs()
        .map_err(|e| format!("{url}: {e}"))?
        .next()
        .ok_or_else(|| format!("{url}: resolves to nothing"))?;
    if !addr.ip().is_loopback() {
        return Err(format!("{url}: the bench talks to loopback addresses only"));
    }
    Ok(addr)
}

fn target_opts(
    s: &ServerArgs,
    path: RestartPath,
    dir: &Path,
    extra: Vec<String>,
) -> Result<TargetOpts, String> {
    let url_addr = s.url.as_deref().map(loopback_addr).transpose()?;
    let server = if url_addr.is_some() {
        None
    } else {
        Some(s.server.clone().unwrap_or_else(|| sibling("bench-server")))
    };
    let mut server_args = extra;
    server_args.extend(s.server_args.iter().cloned());
    Ok(TargetOpts {
        path,
        server,
        server_args,
        reborn: s.reborn.clone().unwrap_or_else(|| sibling("reborn")),
        url_addr,
        pid_file: s.pid_file.clone(),
        control: s.control.clone(),
        dir: dir.to_path_buf(),
        step_timeout: Duration::from_millis(s.step_timeout_ms),
        master_args: Vec::new(),
    })
}

fn write_json(path: Option<&Path>, v: &serde_json::Value) -> Result<(), String> {
    if let Some(p) = path {
        let text = serde_json::to_string_pretty(v).map_err(|e| e.to_string())?;
        std::fs::write(p, text + "\n").map_err(|e| format!("cannot write {}: {e}", p.display()))?;
    }
    Ok(())
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn run(cli: Cli) -> Result<(), BoxError> {
    let tmp;
    let dir: &Path = match &cli.work_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d
        }
        None => {
            tmp = tempfile::Builder::new().prefix("reborn-bench-").tempdir()?;
            tmp.path()
        }
    };
    match cli.command {
        Cmd::Restart(a) => {
            let cfg = scenario::RestartRun {
                target: target_opts(&a.server, a.path, dir, Vec::new())?,
                mode: a.mode,
                concurrency: a.concurrency as usize,
                restarts: a.restarts as usize,
                interval: Duration::from_millis(a.interval_ms),
                warmup: Duration::from_millis(a.warmup_ms),
                cooldown: Duration::from_millis(a.cooldown_ms),
                slow_per_restart: a.slow_per_restart,
                slow: Duration::from_millis(a.slow_ms),
                timeout: Duration::from_millis(a.timeout_ms),
                max_time: Duration::from_secs(a.max_time_s),
                window_tail: Duration::from_millis(a.window_tail_ms),
                rate: a.rate.max(0.0),
            };
            let (report, text) = scenario::run(cfg).await?;
            print!("{text}");
            write_json(a.json.as_deref(), &report)?;
        }
        Cmd::Steady(a) => {
            let cfg = steady::SteadyRun {
                server: a.server.clone().unwrap_or_else(|| sibling("bench-server")),
                dir: dir.to_path_buf(),
                mode: a.mode,
                concurrency: a.concurrency as usize,
                duration: Duration::from_secs_f64(a.duration_s.clamp(0.1, 3600.0)),
                warmup: Duration::from_secs_f64(a.warmup_s.clamp(0.0, 600.0)),
                rounds: a.rounds as usize,
            };
            let (report, text) = steady::run(cfg).await?;
            print!("{text}");
            write_json(a.json.as_deref(), &report)?;
        }
        Cmd::Idle(a) => {
            let extra = vec![format!("--idle-grace-ms={}", a.idle_grace_ms)];
            let cfg = idle::IdleRun {
                target: target_opts(&a.server, a.path, dir, extra)?,
                connections: a.connections as usize,
                active: a.active as usize,
                idle_grace: Duration::from_millis(a.idle_grace_ms),
            };
            let (report, text) = idle::run(cfg).await?;
            print!("{text}");
            write_json(a.json.as_deref(), &report)?;
        }
        Cmd::BadDeploy(a) => {
            if a.path == RestartPath::StopStart {
                return Err("bad-deploy measures the self and master paths".into());
            }
            let extra = vec![format!("--probation-ms={}", a.probation_ms)];
            let cfg = baddeploy::BadDeployRun {
                target: target_opts(&a.server, a.path, dir, extra)?,
                mode: a.mode,
                concurrency: a.concurrency as usize,
                rate: a.rate.max(0.0),
                rounds: a.rounds as usize,
                crash_after: Duration::from_millis(a.crash_after_ms),
                probation: Duration::from_millis(a.probation_ms),
            };
            let (report, text) = baddeploy::run(cfg).await?;
            print!("{text}");
            write_json(a.json.as_deref(), &report)?;
        }
        Cmd::Websocket(a) => {
            if a.path == RestartPath::StopStart {
                return Err("websocket measures the self and master paths".into());
            }
            let extra = vec![
                format!("--eviction-window-ms={}", a.window_ms),
                format!("--probation-ms={}", a.probation_ms),
            ];
            let cfg = websocket::WebSocketRun {
                target: target_opts(&a.server, a.path, dir, extra)?,
                clients: a.clients as usize,
                upgrades: a.upgrades as usize,
                window: Duration::from_millis(a.window_ms),
                probation: Duration::from_millis(a.probation_ms),
                load: a.load as usize,
                rate: a.rate.max(0.0),
                interval: Duration::from_millis(a.interval_ms),
            };
            let (report, text) = websocket::run(cfg).await?;
            print!("{text}");
            write_json(a.json.as_deref(), &report)?;
        }
        Cmd::Fleet(a) => {
            let cfg = fleet::FleetRun {
                server: a.server.clone().unwrap_or_else(|| sibling("bench-server")),
                server_args: a.server_args.clone(),
                dir: dir.to_path_buf(),
                instances: a.instances as usize,
                rounds: a.rounds as usize,
                shutdown_delay: Duration::from_millis(a.shutdown_delay_ms),
                keep_alive: a.keep_alive as usize,
                new_conn: a.new_conn as usize,
                scenario: a.scenario,
            };
            let (report, text) = fleet::run(cfg).await?;
            print!("{text}");
            write_json(a.json.as_deref(), &report)?;
            if !report["errors"].as_array().is_none_or(|e| e.is_empty()) {
                return Err("a fleet scenario could not run (see above)".into());
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = sys::raise_nofile() {
        eprintln!("reborn-bench: cannot raise RLIMIT_NOFILE: {e}");
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("reborn-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("reborn-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
