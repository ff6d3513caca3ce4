//! `reborn`: a master process with a stable PID that owns a server's listening sockets and
//! replaces the server processes under it without dropping a connection.
//!
//! Go's endless and its kin change PID at every restart, so supervisord, systemd and
//! Docker believe the service died. The master fixes that by staying put: it binds the
//! listeners once, starts the worker with them (systemd's socket-activation protocol, so
//! any program that speaks it works), and on an upgrade starts the next worker, waits for
//! it to be ready and only then retires the old one.
//!
//! The modules, one concept each:
//! * [`cli`]: the command line and its help;
//! * [`listen`]: the listening sockets (from systemd or bound);
//! * [`spawner`]: forking workers from one long-lived thread (parent-death signal);
//! * [`reaper`]: collecting exit statuses in one place, orphans included;
//! * [`groups`]: the workers' process groups (signalled whole, leftovers found);
//! * [`readiness`]: notify messages and readiness probes;
//! * [`sockets`]: which of the master's listeners a worker really uses;
//! * [`supervisor`]: the state machine of workers, upgrades, crashes and stop;
//! * [`control`]: the control socket and its protocol (`upgrade`, `status`, `stop`);
//! * [`protocol`]: the control protocol's request line, parsed (pure, fuzzed);
//! * [`sdnotify`]: the master's own reports to systemd;
//! * [`paths`]: where the control socket and PID file go.

mod cli;
mod control;
mod groups;
mod health;
mod listen;
mod paths;
mod pinned;
mod protocol;
mod readiness;
mod reaper;
mod sdnotify;
mod sockets;
mod spawner;
mod supervisor;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use crate::cli::{Cli, Command, ReadyMode, RunArgs};
use crate::control::Request;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run(*args),
        Command::Upgrade(args) => client(&args, Request::Upgrade, false),
        Command::Status(args) => client(&args.control, Request::Status, args.json),
        Command::Stop(args) => client(&args, Request::Stop, false),
    }
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::FAILURE
}

fn init_logging() {
    use tracing_subscriber::filter::LevelFilter;
    let level = match std::env::var("REBORN_LOG").as_deref() {
        Ok("error") => LevelFilter::ERROR,
        Ok("warn") => LevelFilter::WARN,
        Ok("debug") => LevelFilter::DEBUG,
        Ok("trace") => LevelFilter::TRACE,
        Ok("off") => LevelFilter::OFF,
        _ => LevelFilter::INFO,
    };
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(false);
    // The journal stamps each line itself.
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().init();
    } else {
        builder.init();
    }
}

/// `reborn run`.
fn run(args: RunArgs) -> ExitCode {
    // First, while the process has a single thread: take what systemd passed to the master
    // (sockets, NOTIFY_SOCKET) and clear it from the environment workers inherit.
    let taken = reborn::activation::take_from_env();
    init_logging();
    let process_env = match taken {
        Ok(env) => env,
        Err(e) => return fail(e),
    };

    let mut argv = args.program.into_iter();
    let Some(program) = argv.next() else {
        return fail("no program given; write it after --, e.g. `reborn run -- ./server`");
    };
    let prog_args: Vec<OsString> = argv.collect();
    if let Err(msg) = check_program(&program) {
        return fail(msg);
    }
    if args.backoff_max < std::time::Duration::from_millis(100) {
        return fail(
            "--backoff-max must be at least 100ms, so that a crashing worker cannot make the \
             master spin",
        );
    }
    if let Err(msg) = check_probe("--ready", &args.ready, &args.listen) {
        return fail(msg);
    }
    // A tcp liveness probe of a shared listener would be accepted by the master's socket
    // whatever the worker does; an http one needs the worker's answer.
    if let Some(probe @ ReadyMode::Tcp(_)) = &args.liveness
        && let Err(msg) = check_probe("--liveness", probe, &args.listen)
    {
        return fail(msg);
    }
    let listeners = match listen::collect(process_env.sockets, &args.listen, args.backlog) {
        Ok(l) => l,
        Err(e) => return fail(e),
    };
    if listeners.is_empty() {
        tracing::warn!(
            "no --listen given and no socket from systemd: workers get no listening socket"
        );
    }
    for l in &listeners {
        tracing::info!(
            "listening on {}={}",
            l.name.as_deref().unwrap_or(reborn::activation::UNNAMED),
            l.address
        );
    }
    let name = args
        .control
        .name
        .clone()
        .unwrap_or_else(|| paths::name_from_program(&program));
    let control_path = match paths::control_path_for_run(&args.control, &program) {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    for stale in reborn::notify::sweep_stale_dirs() {
        tracing::info!(
            dir = %stale.display(),
            "removed the notify directory of a master that is gone (it was killed)"
        );
    }
    if let Err(e) = reaper::become_subreaper() {
        tracing::warn!(error = %e, "cannot become a child subreaper; orphans of workers go to init");
    }

    let env: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| {
            !reborn::activation::CONSUMED_VARS
                .iter()
                .any(|c| std::ffi::OsStr::new(c) == k)
        })
        .collect();
    let cfg = supervisor::Config {
        name,
        program,
        args: prog_args,
        env,
        ready: args.ready,
        ready_timeout: args.ready_timeout,
        stop_signal: args.stop_signal.0,
        drain_timeout: args.drain_timeout,
        backoff_max: args.backoff_max,
        probation: args.probation,
        listeners: listeners.iter().map(|l| l.status()).collect(),
        listener_inodes: listeners.iter().map(|l| sockets::inode(&l.fd)).collect(),
        liveness: args.liveness.map(|probe| readiness::Liveness {
            probe,
            interval: args.liveness_interval,
            timeout: args.liveness_timeout,
            failures: args.liveness_failures,
        }),
        shutdown_delay: args.shutdown_delay,
        shutdown_delay_signal: args.shutdown_delay_signal.0,
    };
    let health = args.health;
    let sockets = listeners.into_iter().map(|l| (l.fd, l.name)).collect();
    let upstream = sdnotify::Upstream::new(process_env.notify_socket);

    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    let pid_file = args.pid_file;
    // What this process made, removed at its exit; nothing that another master made.
    let mut made = paths::RuntimeFiles::new();
    let result = runtime.block_on(async {
        let signals = supervisor::MasterSignals::install()?;
        let control = control::bind(&control_path)?;
        made.made(&control_path);
        tracing::info!("control socket: {}", control_path.display());
        if let Some(path) = &pid_file {
            paths::write_pid_file(path, std::process::id()).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "cannot write the PID file {}: {e}; check that its directory exists and is writable",
                        path.display()
                    ),
                )
            })?;
            made.made(path);
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let answers = control::serve(control, &control_path, tx.clone());
        let spawner = spawner::Spawner::start(sockets, tx.clone())?;
        if upstream.is_active() {
            tracing::info!("reporting to the service manager through NOTIFY_SOCKET");
        }
        let supervisor = supervisor::Supervisor::new(cfg, tx, spawner, upstream);
        if let Some(addr) = health {
            let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    match e.kind() {
                        std::io::ErrorKind::AddrInUse => format!(
                            "cannot listen on {addr} for --health: the address is already in \
                             use; pick a free port"
                        ),
                        _ => format!("cannot listen on {addr} for --health: {e}"),
                    },
                )
            })?;
            let bound = listener.local_addr().unwrap_or(addr);
            tracing::info!("health checks: http://{bound}/readyz and /livez");
            health::serve(listener, supervisor.health());
        }
        let result = supervisor.run(signals, rx).await;
        // The answers given (the `stop` that ended the loop among them) reach their
        // clients before the runtime, and the tasks writing them, go.
        answers.settle(Duration::from_secs(2)).await;
        result
    });
    drop(made);
    // Ends the tasks still holding `reborn stop` connections: their clients see EOF.
    drop(runtime);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

/// Checks that the program can be run, with a message that says what to do if not.
fn check_program(program: &OsString) -> Result<(), String> {
    let shown = Path::new(program).display().to_string();
    match reborn::spawn::resolve_program(program) {
        None => Err(format!(
            "cannot run {shown:?}: no such command in PATH; give the program's path \
             (e.g. ./{shown}) or install it"
        )),
        Some(path) => {
            if reborn::spawn::is_executable_file(&path) {
                return Ok(());
            }
            match std::fs::metadata(&path) {
                Err(_) => Err(format!(
                    "cannot run {shown}: no such file; check the path (relative paths start \
                     from {}) or build the program first",
                    std::env::current_dir()
                        .map(|d| d.display().to_string())
                        .unwrap_or_else(|_| "the current directory".into())
                )),
                Ok(m) if m.is_dir() => Err(format!(
                    "cannot run {shown}: it is a directory; give the program inside it"
                )),
                Ok(_) => Err(format!(
                    "cannot run {shown}: it is not executable; `chmod +x {shown}` or run it \
                     through its interpreter (e.g. -- python3 {shown})"
                )),
            }
        }
    }
}

/// A tcp or http probe aimed at a shared listener would be answered by the old worker
/// (or queued by the master's socket), so it proves nothing: refuse it.
fn check_probe(flag: &str, ready: &ReadyMode, listens: &[cli::ListenSpec]) -> Result<(), String> {
    use std::net::ToSocketAddrs;
    let target = match ready {
        ReadyMode::Tcp(a) => a.clone(),
        ReadyMode::Http(t) => t.authority.clone(),
        _ => return Ok(()),
    };
    let probe: Vec<_> = target
        .to_socket_addrs()
        .map(|a| a.collect())
        .unwrap_or_default();
    for spec in listens {
        if let reborn::listeners::ListenAddr::Tcp { addrs, .. } = &spec.addr {
            let clash = addrs.iter().any(|l| {
                l.port() != 0
                    && probe.iter().any(|p| {
                        p.port() == l.port() && (l.ip().is_unspecified() || p.ip() == l.ip())
                    })
            });
            if clash {
                return Err(format!(
                    "{flag} probes {target}, which is the shared listener {}: the old worker \
                     (or the master's queue) would answer, so the probe proves nothing; probe a \
                     health address of the worker's own{}",
                    spec.addr,
                    if flag == "--ready" {
                        ", or use --ready notify"
                    } else {
                        ", or an http: probe, which needs the worker's answer"
                    }
                ));
            }
        }
    }
    Ok(())
}

/// `reborn upgrade|status|stop`.
fn client(args: &cli::ControlArgs, request: Request, json: bool) -> ExitCode {
    let path: PathBuf = match paths::control_path_for_client(args) {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    let reply = match control::call(&path, request) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    if !reply.ok {
        return fail(reply.message);
    }
    match request {
        Request::Status => match &reply.status {
            Some(s) if json => {
                println!("{}", serde_json::to_string_pretty(s).unwrap_or_default());
            }
            Some(s) => print_status(s),
            None => return fail("the master sent no status"),
        },
        Request::Upgrade => println!("{}", reply.message),
        Request::Stop => println!("{}; it has exited", reply.message),
    }
    ExitCode::SUCCESS
}

fn secs(s: f64) -> String {
    supervisor::human(std::time::Duration::from_secs_f64(s.max(0.0)))
}

fn print_status(s: &control::Status) {
    println!(
        "{}: {}, generation {} (master pid {}, up {})",
        s.name,
        s.state,
        s.generation,
        s.master_pid,
        secs(s.uptime_secs)
    );
    println!("program: {}", s.program);
    println!("listeners:");
    for l in &s.listeners {
        println!(
            "  {} {}",
            l.name.as_deref().unwrap_or(reborn::activation::UNNAMED),
            l.address
        );
    }
    println!("workers:");
    for w in &s.workers {
        let pid = w.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
        let status = w
            .status
            .as_deref()
            .map(|t| format!("  \"{t}\""))
            .unwrap_or_default();
        println!(
            "  generation {} pid {} {} up {}{}",
            w.generation,
            pid,
            w.role,
            secs(w.uptime_secs),
            status
        );
    }
    match &s.last_upgrade {
        Some(u) => println!(
            "last upgrade: generation {} {} in {}ms, {} ago: {}",
            u.generation,
            if u.ok { "succeeded" } else { "failed" },
            u.duration_ms,
            secs(u.ago_secs),
            u.message
        ),
        None => println!("last upgrade: none"),
    }
    println!("crashes: {} ({} in a row)", s.crashes, s.crashes_in_a_row);
    for w in &s.warnings {
        println!("WARNING: {w}");
    }
}
