//! The command line: subcommands, flags, their help text, and the parsers that turn each
//! value into a typed setting with one precise error.
//!
//! Everything a user can get wrong on the command line is checked here, before any socket
//! is bound or process started, so that a mistake costs one line of error and nothing
//! else. The help text is the manual: each subcommand's `--help` says what it does, what
//! each flag means, and shows examples.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use reborn::listeners::ListenAddr;

const ABOUT: &str = "Run a network server under a master process with a stable PID, and upgrade it without dropping a connection";

const LONG_ABOUT: &str = "\
reborn runs a server program under a small master process. The master owns the listening \
sockets and keeps its PID while the server processes under it (the workers) are replaced, \
so supervisord, systemd and Docker keep seeing the same, healthy process.

Workers get the sockets the way systemd's socket activation hands them over (fds 3, 4, … \
with LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID) and report readiness on NOTIFY_SOCKET; \
servers built with the reborn library, and any program that speaks socket activation, \
work unchanged.";

const MAIN_AFTER: &str = "\
Examples:
  reborn run --listen http=0.0.0.0:8080 -- ./my-server --config app.toml
  reborn upgrade --name my-server      (or: kill -HUP <master pid>)
  reborn status --name my-server
  reborn stop --name my-server

See `reborn help run` for the signals the master understands.";

const RUN_AFTER: &str = "\
What the worker gets:
  fds 3, 4, …     the listeners, in the order of --listen (after any from systemd)
  LISTEN_FDS      their number;  LISTEN_FDNAMES: their names, ':'-separated
  LISTEN_PID      the worker's own PID (strict consumers check it)
  NOTIFY_SOCKET   where to send READY=1 (and STATUS=…, STOPPING=1)
  REBORN_MASTER_PID  the master's PID: a reborn-built server leaves upgrades to it

Signals to the master:
  SIGHUP          upgrade: start a new worker from the program as it is now on disk,
                  wait until it is ready, then stop the old one (drain, then SIGKILL at
                  the drain deadline). If the new one fails, the old one keeps serving.
  SIGTERM, SIGINT stop the workers gracefully, then exit; a second one kills them.
  SIGUSR1, SIGUSR2  forwarded to the workers.
A worker that crashes is restarted with exponential back-off up to --backoff-max.
Workers get SIGKILL if the master dies, so they never outlive it.

Readiness (--ready):
  notify          the worker sends READY=1 to NOTIFY_SOCKET (default)
  delay:DURATION  ready once it has run that long, e.g. delay:2s
  tcp:HOST:PORT   ready once a TCP connect to that address succeeds
  http:URL        ready once GET URL answers 2xx, e.g. http:http://127.0.0.1:9901/health
  A tcp or http probe must target an address of the worker's own (a health port), not
  one of the shared listeners: those are held by the master and the old worker answers.

Durations: 500ms, 30s, 2m, 1h, or plain seconds (30).

Examples:
  reborn run --listen http=127.0.0.1:8080 -- ./server
  reborn run --listen web=:80 --listen admin=/run/app/admin.sock -- /usr/bin/app
  reborn run --listen :8000 --name api --pid-file /run/api.pid \\
      -- gunicorn --workers 4 app:wsgi
  reborn run --listen :8080 --ready http:http://127.0.0.1:9000/ready -- ./legacy

Under systemd (Type=notify) the master reports READY=1 when its first worker is ready,
and RELOADING=1 … READY=1 around each upgrade; when systemd passes sockets to the master
(socket activation) they are handed on first.

Exit status: 0 after a stop (SIGTERM, SIGINT, `reborn stop`); 1 when the master cannot
start (program not found, address in use, bad control socket...) or its first worker
exits before it was ever ready (the program cannot start: it is not retried); 2 for a
usage error.
Set REBORN_LOG=debug|info|warn|error for more or less logging (on stderr).";

const CONTROL_AFTER: &str = "\
The master is found through its control socket: give the same --name or --control as to
`reborn run`. With neither, the only master of this user is used.";

/// `reborn`: the master and its clients.
#[derive(Debug, Parser)]
#[command(
    name = "reborn",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_help = MAIN_AFTER,
    propagate_version = true,
    arg_required_else_help = true
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run PROGRAM under the master: bind the listeners, start a worker, supervise it.
    #[command(
        after_help = RUN_AFTER,
        override_usage = "reborn run [--listen NAME=ADDR]... [OPTIONS] -- PROGRAM [ARGS]..."
    )]
    Run(Box<RunArgs>),
    /// Upgrade the running server: start a new worker, switch to it when it is ready.
    #[command(after_help = format!("{CONTROL_AFTER}

Waits until the new worker is ready and has passed its probation (--probation of
`reborn run`, 3s by default), prints the outcome and exits 0 when the new worker serves;
on failure (the new worker exited, could not start, was not ready in time, or died on
probation, when the last good binary is started again) prints the reason and exits 1,
and the old version keeps serving.

Example:
  reborn upgrade --name api && echo deployed"))]
    Upgrade(ControlArgs),
    /// Show the master's state: generation, worker PIDs, uptime, listeners, last upgrade.
    #[command(after_help = format!("{CONTROL_AFTER}

Example:
  reborn status --name api
  reborn status --name api --json | jq .generation"))]
    Status(StatusArgs),
    /// Stop the workers gracefully and the master with them; waits until it has exited.
    #[command(after_help = format!("{CONTROL_AFTER}

Same as sending SIGTERM to the master.

Example:
  reborn stop --name api"))]
    Stop(ControlArgs),
}

/// Where the control socket is.
#[derive(Debug, Clone, Args)]
pub struct ControlArgs {
    /// The service's name, which picks the control socket
    /// ($XDG_RUNTIME_DIR/reborn/NAME.sock, else /tmp/reborn-UID/NAME.sock). `reborn run`
    /// defaults it to the program's file name.
    #[arg(long, value_name = "NAME", value_parser = parse_name)]
    pub name: Option<String>,
    /// The control socket's path, instead of the one --name picks.
    #[arg(long, value_name = "PATH", conflicts_with = "name")]
    pub control: Option<PathBuf>,
}

/// `reborn status` flags.
#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    /// Where the master is.
    pub control: ControlArgs,
    /// Print the status as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// `reborn run` flags.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// A listener to bind and hand to every worker: NAME=ADDR, where ADDR is HOST:PORT
    /// (127.0.0.1:8080, 0.0.0.0:443, :8080 for every IPv4 interface; port 0 picks a free
    /// port) or a Unix socket path (/run/app.sock, unix:app.sock). NAME goes into
    /// LISTEN_FDNAMES; without NAME= the socket is unnamed. Repeat for more listeners.
    #[arg(long, short = 'l', value_name = "NAME=ADDR", value_parser = parse_listen)]
    pub listen: Vec<ListenSpec>,

    #[command(flatten)]
    /// Where the control socket is.
    pub control: ControlArgs,

    /// Write the master's PID to this file (removed at exit).
    #[arg(long, value_name = "PATH")]
    pub pid_file: Option<PathBuf>,

    /// How to tell that a worker is ready: notify, delay:DURATION, tcp:HOST:PORT or
    /// http:URL (see below).
    #[arg(long, value_name = "MODE", default_value = "notify", value_parser = parse_ready)]
    pub ready: ReadyMode,

    /// How long a new worker may take to become ready before it is given up on.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub ready_timeout: Duration,

    /// The signal that tells a worker to drain and exit.
    #[arg(long, value_name = "SIGNAL", default_value = "SIGTERM", value_parser = parse_signal)]
    pub stop_signal: Signal,

    /// How long a stopped worker may drain before it gets SIGKILL. The default is longer
    /// than a reborn worker's own drain deadline (60s), so that such a worker closes what
    /// is left itself, in order, before the master has to kill it.
    #[arg(long, value_name = "DURATION", default_value = "70s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// How long a new worker is on probation once it is ready: if it dies within this
    /// window, the master starts the last good binary again (the one that passed its own
    /// probation, pinned open, whatever the path now holds). `reborn upgrade` waits for
    /// the end of the window and fails if the new worker did not survive it. 0 turns
    /// probation off (crash restarts then read the path again).
    #[arg(long, value_name = "DURATION", default_value = "3s", value_parser = parse_duration)]
    pub probation: Duration,

    /// The longest wait between restarts of a worker that keeps crashing (the wait starts
    /// at 100ms and doubles).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub backoff_max: Duration,

    /// A liveness probe of the serving worker: http:HOST:PORT/PATH (or http:URL), which
    /// must answer 2xx, or tcp:HOST:PORT, which must accept. After --liveness-failures
    /// failures in a row the master logs an ERROR naming the probe and restarts the
    /// worker as after a crash (SIGKILL to its process group, then the back-off). An
    /// http probe may aim at a shared listener (a hung worker does not answer there); a
    /// tcp probe may not (the master's socket accepts for any worker). Off by default.
    #[arg(long, value_name = "PROBE", value_parser = parse_liveness)]
    pub liveness: Option<ReadyMode>,

    /// How often the liveness probe runs.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub liveness_interval: Duration,

    /// How long one liveness probe may take before it counts as failed.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
    pub liveness_timeout: Duration,

    /// How many liveness probes in a row must fail before the worker is restarted.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub liveness_failures: u32,

    /// After SIGTERM, keep the worker serving this long before stopping it, while the
    /// health listener (--health) answers 503: a load balancer that still sends traffic
    /// after the stop signal (a Kubernetes rolling update, a host drained) takes this
    /// instance out of rotation first. Make it longer than the balancer needs to see a
    /// failing check. A second SIGTERM stops at once; SIGINT (see
    /// --shutdown-delay-signal), `reborn stop` and SIGHUP upgrades are never delayed. 0
    /// (the default) stops at once.
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = parse_duration)]
    pub shutdown_delay: Duration,

    /// The signal whose shutdown --shutdown-delay delays: SIGTERM (what Kubernetes, Docker
    /// and systemd send) or SIGINT. The other one stops at once.
    #[arg(long, value_name = "SIGNAL", default_value = "SIGTERM", value_parser = parse_delay_signal)]
    pub shutdown_delay_signal: Signal,

    /// Serve health checks on HOST:PORT, answered by the master itself: GET /readyz is
    /// 200 while a worker is ready and serving and the master is not shutting down (503
    /// with the reason otherwise: starting, restarting, in the shutdown delay, stopping);
    /// GET /livez is 200 while the master runs. For a load balancer's checks; works for
    /// any worker, built on reborn or not.
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_health)]
    pub health: Option<std::net::SocketAddr>,

    /// The listen backlog of the sockets the master binds.
    #[arg(long, value_name = "N", default_value_t = 4096, value_parser = clap::value_parser!(i32).range(1..=65535))]
    pub backlog: i32,

    /// The program to run, then its arguments. A name without '/' is looked up in PATH,
    /// again at every upgrade.
    #[arg(required = true, last = true, value_name = "PROGRAM")]
    pub program: Vec<OsString>,
}

/// One `--listen` value.
#[derive(Debug, Clone)]
pub struct ListenSpec {
    /// The name for `LISTEN_FDNAMES`.
    pub name: Option<String>,
    /// Where to listen.
    pub addr: ListenAddr,
}

/// How readiness is detected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadyMode {
    /// `READY=1` on `NOTIFY_SOCKET`.
    Notify,
    /// Ready after the worker has run this long.
    Delay(Duration),
    /// Ready when a TCP connect succeeds.
    Tcp(String),
    /// Ready when `GET` answers 2xx.
    Http(HttpTarget),
}

/// A parsed `http://host:port/path` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpTarget {
    /// `host:port`, to connect to.
    pub authority: String,
    /// The `Host` header value.
    pub host: String,
    /// The request target, starting with `/`.
    pub path: String,
}

/// A signal given by name or number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signal(pub nix::sys::signal::Signal);

fn parse_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 100
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'))
        && !s.starts_with('.');
    if ok {
        Ok(s.to_owned())
    } else {
        Err(
            "a name is 1 to 100 characters among letters, digits, '-', '_', '.' and '@', \
             not starting with '.' (it becomes a file name)"
                .into(),
        )
    }
}

/// Parses `NAME=ADDR` or `ADDR`.
pub fn parse_listen(s: &str) -> Result<ListenSpec, String> {
    let (name, addr) = match s.split_once('=') {
        // A '/' before the '=' means a Unix socket path that contains '='.
        Some((name, addr)) if !name.contains('/') => {
            reborn::activation::validate_name(name).map_err(|e| e.to_string())?;
            (Some(name.to_owned()), addr)
        }
        _ => (None, s),
    };
    let addr = ListenAddr::parse(addr).map_err(|e| e.to_string())?;
    Ok(ListenSpec { name, addr })
}

/// Parses `500ms`, `30s`, `2m`, `1h` or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .ok()
        .filter(|v: &f64| v.is_finite() && *v >= 0.0)
        .ok_or_else(|| format!("{s:?} is not a duration; write e.g. 500ms, 30s, 2m or 1h"))?;
    let secs = match unit {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        _ => {
            return Err(format!(
                "{s:?} is not a duration: unknown unit {unit:?}; use ms, s, m or h"
            ));
        }
    };
    if secs > 86_400.0 * 365.0 {
        return Err(format!("{s:?} is longer than a year"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses a signal: `TERM`, `SIGTERM`, `sigterm` or `15`.
pub fn parse_signal(s: &str) -> Result<Signal, String> {
    use std::str::FromStr;
    let t = s.trim();
    if let Ok(n) = t.parse::<i32>() {
        return nix::sys::signal::Signal::try_from(n)
            .map(Signal)
            .map_err(|_| format!("{n} is not a signal number on this system"));
    }
    let upper = t.to_ascii_uppercase();
    let full = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    let sig = nix::sys::signal::Signal::from_str(&full)
        .map_err(|_| format!("{s:?} is not a signal; write e.g. SIGTERM, TERM, SIGQUIT or 3"))?;
    if matches!(
        sig,
        nix::sys::signal::Signal::SIGKILL | nix::sys::signal::Signal::SIGSTOP
    ) {
        return Err(format!(
            "{full} cannot be the stop signal: the worker could not drain; use a signal it handles (SIGTERM, SIGQUIT, SIGINT...)"
        ));
    }
    Ok(Signal(sig))
}

/// Parses `--ready`.
pub fn parse_ready(s: &str) -> Result<ReadyMode, String> {
    let (kind, arg) = match s.split_once(':') {
        Some((k, a)) => (k, Some(a)),
        None => (s, None),
    };
    match (kind, arg) {
        ("notify", None) => Ok(ReadyMode::Notify),
        ("delay", Some(d)) => parse_duration(d).map(ReadyMode::Delay),
        ("tcp", Some(addr)) => {
            use std::net::ToSocketAddrs;
            match addr.to_socket_addrs() {
                Ok(a) if a.len() > 0 => Ok(ReadyMode::Tcp(addr.to_owned())),
                _ => Err(format!(
                    "tcp:{addr} is not a TCP address to probe; write tcp:HOST:PORT, e.g. tcp:127.0.0.1:9000"
                )),
            }
        }
        ("http", Some(url)) => parse_http_url(url).map(ReadyMode::Http),
        _ => Err(format!(
            "{s:?} is not a readiness mode; use notify, delay:DURATION (delay:2s), \
             tcp:HOST:PORT (tcp:127.0.0.1:9000) or http:URL (http:http://127.0.0.1:9000/health)"
        )),
    }
}

/// Parses `--shutdown-delay-signal`: SIGTERM or SIGINT, the signals that stop the master.
pub fn parse_delay_signal(s: &str) -> Result<Signal, String> {
    let sig = parse_signal(s)?;
    match sig.0 {
        nix::sys::signal::Signal::SIGTERM | nix::sys::signal::Signal::SIGINT => Ok(sig),
        other => Err(format!(
            "{other} does not stop the master; the shutdown delay applies to SIGTERM or SIGINT"
        )),
    }
}

/// Parses `--health`: an IP address and port.
pub fn parse_health(s: &str) -> Result<std::net::SocketAddr, String> {
    s.parse().map_err(|_| {
        format!(
            "{s:?} is not a health listener address; give an IP address and a port, e.g. \
             127.0.0.1:9901 or [::1]:9901"
        )
    })
}

/// Parses `--liveness`: `http:HOST:PORT/PATH`, `http:http://HOST:PORT/PATH` or
/// `tcp:HOST:PORT`.
pub fn parse_liveness(s: &str) -> Result<ReadyMode, String> {
    let spelled = match s.strip_prefix("http:") {
        Some(rest) if !rest.starts_with("http://") => format!("http:http://{rest}"),
        _ => s.to_owned(),
    };
    match parse_ready(&spelled) {
        Ok(mode @ (ReadyMode::Http(_) | ReadyMode::Tcp(_))) => Ok(mode),
        _ => Err(format!(
            "{s:?} is not a liveness probe; use http:HOST:PORT/PATH \
             (http:127.0.0.1:8080/health) or tcp:HOST:PORT"
        )),
    }
}

fn parse_http_url(url: &str) -> Result<HttpTarget, String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        format!(
            "http:{url} is not a probe URL: it must start with http:// (https is not supported), \
             e.g. http:http://127.0.0.1:9000/health"
        )
    })?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(format!("http:{url} has no host"));
    }
    let with_port = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    Ok(HttpTarget {
        authority: with_port,
        host: authority.to_owned(),
        path: path.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("2x").unwrap_err().contains("unknown unit"));
        assert!(
            parse_duration("soon")
                .unwrap_err()
                .contains("not a duration")
        );
    }

    #[test]
    fn signals() {
        use nix::sys::signal::Signal as S;
        assert_eq!(parse_signal("TERM").unwrap().0, S::SIGTERM);
        assert_eq!(parse_signal("sigquit").unwrap().0, S::SIGQUIT);
        assert_eq!(parse_signal("2").unwrap().0, S::SIGINT);
        assert!(parse_signal("KILL").is_err());
        assert!(parse_signal("NOPE").unwrap_err().contains("not a signal"));
    }

    #[test]
    fn ready_modes() {
        assert_eq!(parse_ready("notify").unwrap(), ReadyMode::Notify);
        assert_eq!(
            parse_ready("delay:1s").unwrap(),
            ReadyMode::Delay(Duration::from_secs(1))
        );
        assert!(matches!(
            parse_ready("tcp:127.0.0.1:80").unwrap(),
            ReadyMode::Tcp(_)
        ));
        let ReadyMode::Http(t) = parse_ready("http:http://localhost:81/h?x=1").unwrap() else {
            panic!()
        };
        assert_eq!(t.authority, "localhost:81");
        assert_eq!(t.path, "/h?x=1");
        let ReadyMode::Http(t) = parse_ready("http:http://example").unwrap() else {
            panic!()
        };
        assert_eq!(t.authority, "example:80");
        assert!(parse_ready("ping").is_err());
        assert!(
            parse_ready("http:https://x/")
                .unwrap_err()
                .contains("http://")
        );
    }

    #[test]
    fn listen_specs() {
        let l = parse_listen("http=127.0.0.1:0").unwrap();
        assert_eq!(l.name.as_deref(), Some("http"));
        assert!(parse_listen("127.0.0.1:0").unwrap().name.is_none());
        assert!(parse_listen("/tmp/x.sock").is_ok());
        assert!(
            parse_listen("http=127.0.0.1")
                .unwrap_err()
                .contains("not a listen address")
        );
        assert!(parse_listen("a:b=127.0.0.1:1").is_err());
    }

    #[test]
    fn liveness() {
        let ReadyMode::Http(t) = parse_liveness("http:127.0.0.1:8080/health").unwrap() else {
            panic!("http")
        };
        assert_eq!(
            (t.authority.as_str(), t.path.as_str()),
            ("127.0.0.1:8080", "/health")
        );
        assert!(parse_liveness("http:http://127.0.0.1:8080/").is_ok());
        assert!(parse_liveness("tcp:127.0.0.1:9").is_ok());
        assert!(parse_liveness("notify").is_err());
        assert!(parse_liveness("delay:1s").is_err());
    }

    #[test]
    fn clap_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
