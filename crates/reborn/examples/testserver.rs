//! The server the integration tests run: every knob of the library on the command line,
//! and answers that say which binary and which process served them.
//!
//! `GET /ping` answers `pong <digest> pid=<pid>` (the digest is of the executable file
//! itself, its size and its end, where a variant's tag is appended, so a variant answers
//! differently); `?sleep_ms=N` waits first.
//! `GET /whoami` (TCP) and `GET /whoami-unix` answer who the connection is from, as
//! axum's `ConnectInfo` and `reborn::ConnectionInfo` say.
//! `GET /upgrade-echo` (with `Upgrade: echo`) switches protocols and echoes what it
//! reads, as a WebSocket would hold a connection after its upgrade; with `?leave=true`
//! it says `bye` and closes at the connection's moment (`reborn::Draining`).
//! `GET /ws` is a WebSocket that sends `tick N pid=P` every `?tick_ms=` (200 by default)
//! and echoes text as `echo TEXT pid=P`; at the connection's moment it sends
//! `last N pid=P`, closes with `1012 Service Restart` and waits for the client's close
//! (`?leave=false`: it ignores the moment, and only the hammer ends it).
//! `GET /events` is a server-sent event stream: event `N` (`data: event N pid=P`) every
//! `?tick_ms=` (50 by default), from the one after `Last-Event-ID`; it ends at the
//! connection's moment, and the client's reconnection resumes where it left off.
//! `GET /block?ms=N` blocks its runtime thread for N ms (as a handler that calls blocking
//! code in async code does) before it answers.
//! Hooks print `hook: <when> <signal>` lines.
//! `--ready-check-waits-for PATH` gives it a readiness check that passes once PATH exists.
//!
//! A binary can carry knobs of its own, appended to the file (a bad deploy is a bad
//! *file*, not a bad command line, which the next generation inherits): a line
//! `knob:abort-after-ready-ms=N` makes the process abort N ms after its readiness check
//! passed, `knob:fail-ready-check=TEXT` makes its readiness check fail with TEXT, and
//! `knob:block-listeners-and-exit=1` makes it put the listening sockets it inherited in
//! blocking mode and exit at once (as a new version on another runtime may, before it
//! fails). `knob:listener=NAME@ADDR` makes it listen under another name and address than
//! its command line says (a new version that moved its listener), and
//! `knob:close-unclaimed=1` lets it close what it inherited and did not ask for.

use std::time::Duration;

/// `println!`, except that a closed stdout (`./server | head`) is not a panic: the tests
/// check that reborn's own handling survives a terminal or a pipe that has gone.
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

/// `eprintln!`, likewise.
macro_rules! esay {
    ($($t:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

use axum::{
    Extension, Router,
    extract::{ConnectInfo, Query},
    routing::get,
};

#[derive(serde::Deserialize)]
struct BlockParams {
    ms: u64,
}

#[derive(serde::Deserialize)]
struct StreamParams {
    tick_ms: Option<u64>,
    /// Whether to let go at the connection's moment (the default) or ignore it.
    leave: Option<bool>,
}

#[derive(serde::Deserialize)]
struct EchoParams {
    /// Say "bye" and close at the connection's moment (`reborn::Draining`).
    leave: Option<bool>,
}

#[derive(serde::Deserialize)]
struct PingParams {
    sleep_ms: Option<u64>,
}

struct Args {
    addr: String,
    unix: Option<String>,
    pid_file: Option<String>,
    ready_timeout: Option<Duration>,
    drain_timeout: Option<Duration>,
    idle_grace: Option<Duration>,
    ready_delay: Option<Duration>,
    probation: Option<Duration>,
    hammer_grace: Option<Duration>,
    header_read_timeout: Option<Duration>,
    eviction_window: Option<Duration>,
    panic_on_usr1: bool,
    no_handoff: bool,
    shutdown_delay: Option<Duration>,
    ready_check_waits_for: Option<std::path::PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        addr: "127.0.0.1:0".into(),
        unix: None,
        pid_file: None,
        ready_timeout: None,
        drain_timeout: None,
        idle_grace: None,
        ready_delay: None,
        probation: None,
        hammer_grace: None,
        header_read_timeout: None,
        eviction_window: None,
        panic_on_usr1: false,
        no_handoff: false,
        shutdown_delay: None,
        ready_check_waits_for: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        let ms = |v: String| {
            v.parse::<u64>()
                .map(Duration::from_millis)
                .map_err(|e| format!("{v}: {e}"))
        };
        match flag.as_str() {
            "--addr" => a.addr = value()?,
            "--unix" => a.unix = Some(value()?),
            "--pid-file" => a.pid_file = Some(value()?),
            "--ready-timeout-ms" => a.ready_timeout = Some(ms(value()?)?),
            "--drain-timeout-ms" => a.drain_timeout = Some(ms(value()?)?),
            "--idle-grace-ms" => a.idle_grace = Some(ms(value()?)?),
            "--ready-delay-ms" => a.ready_delay = Some(ms(value()?)?),
            "--probation-ms" => a.probation = Some(ms(value()?)?),
            "--hammer-grace-ms" => a.hammer_grace = Some(ms(value()?)?),
            "--header-read-timeout-ms" => a.header_read_timeout = Some(ms(value()?)?),
            "--eviction-window-ms" => a.eviction_window = Some(ms(value()?)?),
            "--panic-on-usr1" => a.panic_on_usr1 = true,
            "--no-handoff" => a.no_handoff = true,
            "--shutdown-delay-ms" => a.shutdown_delay = Some(ms(value()?)?),
            "--ready-check-waits-for" => a.ready_check_waits_for = Some(value()?.into()),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(a)
}

/// The executable's digest, and the knobs appended to it.
struct SelfFile {
    digest: String,
    abort_after_ready: Option<Duration>,
    fail_ready_check: Option<String>,
    block_listeners_and_exit: bool,
    listener: Option<(String, String)>,
    close_unclaimed: bool,
}

fn read_self() -> SelfFile {
    // The digest is of the file's size and its last 64 KiB, where a variant's tag and
    // knobs are appended: reading and hashing the whole debug binary (75 MB) cost every
    // start of every test up to a second on a loaded machine.
    const TAIL: u64 = 64 * 1024;
    let tail_bytes = || -> std::io::Result<(u64, Vec<u8>)> {
        use std::io::{Read, Seek, SeekFrom};
        let mut file = std::fs::File::open("/proc/self/exe")?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(TAIL)))?;
        let mut tail = Vec::new();
        file.read_to_end(&mut tail)?;
        Ok((len, tail))
    };
    let (len, bytes) = tail_bytes().unwrap_or_default();
    // FNV-1a: cheap, and any changed byte of what it covers changes it.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in len.to_le_bytes().iter().chain(&bytes) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    let tail = String::from_utf8_lossy(&bytes[bytes.len().saturating_sub(4096)..]).into_owned();
    let knob = |name: &str| {
        let key = format!("knob:{name}=");
        let start = tail.rfind(&key)? + key.len();
        let value = tail[start..].lines().next()?.to_owned();
        Some(value)
    };
    SelfFile {
        digest: format!("{h:016x}"),
        abort_after_ready: knob("abort-after-ready-ms")
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis),
        fail_ready_check: knob("fail-ready-check"),
        block_listeners_and_exit: knob("block-listeners-and-exit").is_some_and(|v| v == "1"),
        listener: knob("listener").and_then(|v| {
            let (name, addr) = v.split_once('@')?;
            Some((name.to_owned(), addr.to_owned()))
        }),
        close_unclaimed: knob("close-unclaimed").is_some_and(|v| v == "1"),
    }
}

fn main() {
    let me = read_self();
    if me.block_listeners_and_exit {
        block_listeners_and_exit();
    }
    reborn::init();
    // TESTSERVER_NO_SUBSCRIBER: no logging set up, as in the README's one-liner.
    if std::env::var_os("TESTSERVER_NO_SUBSCRIBER").is_none() {
        tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "info".into()),
            )
            .with_ansi(false)
            .init();
    }
    if let Err(e) = run(me) {
        esay!("testserver: {e}");
        std::process::exit(1);
    }
}

/// Clears `O_NONBLOCK` on the sockets passed by `LISTEN_FDS` (the open file descriptions
/// the previous generation shares), then exits with status 3.
fn block_listeners_and_exit() -> ! {
    use std::os::fd::BorrowedFd;
    let count: i32 = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    for fd in 3..3 + count {
        // SAFETY: the fds of LISTEN_FDS are open for the life of this process, which
        // exits below; the borrow does not outlive this loop.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        if let Ok(bits) = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL) {
            let flags = nix::fcntl::OFlag::from_bits_retain(bits) - nix::fcntl::OFlag::O_NONBLOCK;
            let _ = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFL(flags));
        }
    }
    esay!("put {count} inherited listeners in blocking mode, as this binary was built to; exiting");
    std::process::exit(3);
}

fn run(me: SelfFile) -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let pid = std::process::id();
    say!("[pid] {pid}");
    let mut builder = reborn::Reborn::builder().hand_over_idle_connections(!args.no_handoff);
    if let Some(d) = args.probation {
        builder = builder.probation(d);
    }
    if let Some(d) = args.eviction_window {
        builder = builder.eviction_window(d);
    }
    if let Some(d) = args.header_read_timeout {
        builder = builder.header_read_timeout(Some(d));
    }
    if let Some(d) = args.hammer_grace {
        builder = builder.hammer_grace(d);
    }
    if let Some(d) = args.shutdown_delay {
        builder = builder.shutdown_delay(d);
    }
    let waits_for = args.ready_check_waits_for.clone();
    if me.abort_after_ready.is_some() || me.fail_ready_check.is_some() || waits_for.is_some() {
        let (abort, fail) = (me.abort_after_ready, me.fail_ready_check.clone());
        builder = builder.ready_check(move || {
            let (fail, waits_for) = (fail.clone(), waits_for.clone());
            async move {
                if let Some(message) = fail {
                    return Err(message.into());
                }
                // A check that takes its time (a database still starting): it passes
                // once the file exists, and fails after a minute.
                if let Some(path) = waits_for {
                    let mut tries = 0;
                    while !path.exists() {
                        tries += 1;
                        if tries > 6000 {
                            return Err(format!("{} never appeared", path.display()).into());
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                if let Some(after) = abort {
                    std::thread::spawn(move || {
                        std::thread::sleep(after);
                        say!("aborting, as this binary was built to");
                        std::process::abort();
                    });
                }
                Ok(())
            }
        });
    }
    if let Some(p) = &args.pid_file {
        builder = builder.pid_file(p);
    }
    if let Some(d) = args.ready_timeout {
        builder = builder.ready_timeout(d);
    }
    if let Some(d) = args.drain_timeout {
        builder = builder.drain_timeout(d);
    }
    if let Some(d) = args.idle_grace {
        builder = builder.idle_grace(d);
    }
    if args.ready_delay.is_some() {
        builder = builder.ready_mode(reborn::ReadyMode::Manual);
    }
    for signal in [
        reborn::Signal::Usr1,
        reborn::Signal::Tstp,
        reborn::Signal::Term,
    ] {
        builder = builder
            .before(signal, move || say!("hook: before {signal}"))
            .after(signal, move || say!("hook: after {signal}"));
    }
    if args.panic_on_usr1 {
        builder = builder.on(reborn::Signal::Usr1, || panic!("a hook that panics"));
    }
    if me.close_unclaimed {
        builder = builder.close_unclaimed_listeners(true);
    }
    let reborn = builder.build()?;
    let (name, addr) = me
        .listener
        .clone()
        .unwrap_or_else(|| ("http".to_owned(), args.addr.clone()));
    let tcp = reborn.listen(&name, &addr)?;
    // Which of reborn's system paths this build takes (the tests check that it is theirs).
    say!(
        "system path: {}",
        if cfg!(reborn_linux) {
            "linux"
        } else {
            "portable"
        }
    );
    say!("listening on {}", tcp.local_addr());
    let unix = match &args.unix {
        Some(path) => {
            let l = reborn.listen("unix", path)?;
            say!("listening on {}", l.local_addr());
            Some(l)
        }
        None => None,
    };
    let digest = me.digest;
    let app = Router::new()
        .route_service("/readyz", reborn.readiness())
        .route(
            "/whoami",
            get(
                move |ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
                      Extension(info): Extension<reborn::ConnectionInfo>| async move {
                    match info {
                        reborn::ConnectionInfo::Tcp { local, .. } => {
                            format!("tcp peer={peer} local={local} pid={pid}")
                        }
                        other => format!("mismatch {other:?} pid={pid}"),
                    }
                },
            ),
        )
        .route(
            "/whoami-unix",
            get(
                move |ConnectInfo(p): ConnectInfo<reborn::UnixPeer>,
                      Extension(info): Extension<reborn::ConnectionInfo>| async move {
                    match info {
                        reborn::ConnectionInfo::Unix { local, .. } => format!(
                            "unix peer_pid={} uid={} gid={} local={} pid={pid}",
                            p.pid.unwrap_or(0),
                            p.uid,
                            p.gid,
                            local.map(|l| l.display().to_string()).unwrap_or_default()
                        ),
                        other => format!("mismatch {other:?} pid={pid}"),
                    }
                },
            ),
        )
        .route(
            "/upgrade-echo",
            get(
                |Query(p): Query<EchoParams>, mut req: axum::extract::Request| async move {
                    let upgrade = hyper::upgrade::on(&mut req);
                    let draining = req.extensions().get::<reborn::Draining>().cloned();
                    tokio::spawn(async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let Ok(upgraded) = upgrade.await else {
                            return;
                        };
                        let mut io = hyper_util::rt::TokioIo::new(upgraded);
                        let mut buf = [0u8; 1024];
                        let moment = async {
                            match (&draining, p.leave) {
                                (Some(d), Some(true)) => d.moment().await,
                                _ => std::future::pending().await,
                            }
                        };
                        tokio::pin!(moment);
                        let end = loop {
                            tokio::select! {
                                read = io.read(&mut buf) => match read {
                                    Ok(0) => break "closed by the client".to_owned(),
                                    Ok(n) => {
                                        if let Err(e) = io.write_all(&buf[..n]).await {
                                            break e.to_string();
                                        }
                                    }
                                    Err(e) => break e.to_string(),
                                },
                                () = &mut moment => {
                                    let _ = io.write_all(b"bye\n").await;
                                    let _ = io.shutdown().await;
                                    break "let go at its moment".to_owned();
                                }
                            }
                        };
                        say!("upgraded connection ended: {end}");
                    });
                    axum::response::Response::builder()
                        .status(http::StatusCode::SWITCHING_PROTOCOLS)
                        .header(http::header::CONNECTION, "upgrade")
                        .header(http::header::UPGRADE, "echo")
                        .body(axum::body::Body::empty())
                        .unwrap_or_default()
                },
            ),
        )
        .route(
            "/ws",
            get(
                move |upgrade: axum::extract::ws::WebSocketUpgrade,
                      Query(p): Query<StreamParams>,
                      draining: reborn::Draining| async move {
                    upgrade.on_upgrade(move |socket| websocket(socket, draining, p, pid))
                },
            ),
        )
        .route(
            "/events",
            get(
                move |Query(p): Query<StreamParams>,
                      headers: http::HeaderMap,
                      draining: reborn::Draining| async move {
                    let last: u64 = headers
                        .get("last-event-id")
                        .and_then(|v| v.to_str().ok()?.parse().ok())
                        .unwrap_or(0);
                    events(last, draining, p, pid)
                },
            ),
        )
        .route(
            "/shutdown",
            get({
                let reborn = reborn.clone();
                move || async move {
                    reborn.shutdown();
                    "shutting down"
                }
            }),
        )
        .route(
            "/block",
            get(|Query(p): Query<BlockParams>| async move {
                say!("blocking a runtime thread for {} ms", p.ms);
                std::thread::sleep(Duration::from_millis(p.ms));
                "unblocked"
            }),
        )
        .route(
            "/ping",
            get(move |Query(p): Query<PingParams>| {
                let digest = digest.clone();
                async move {
                    if let Some(ms) = p.sleep_ms {
                        say!("slow request started: {ms} ms");
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                    format!("pong {digest} pid={pid}")
                }
            }),
        );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let unix_task = unix.map(|l| {
            tokio::spawn({
                let reborn = reborn.clone();
                let app = app.clone();
                async move { reborn.serve(l, app).await }
            })
        });
        if let Some(delay) = args.ready_delay {
            let reborn = reborn.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                if let Err(e) = reborn.ready() {
                    esay!("testserver: {e}");
                }
            });
        }
        reborn.serve(tcp, app).await?;
        if let Some(t) = unix_task {
            t.await??;
        }
        say!("exiting");
        Ok(())
    })
}

/// The `/ws` session: ticks and echoes until the connection's moment, then a clean close.
async fn websocket(
    mut socket: axum::extract::ws::WebSocket,
    draining: reborn::Draining,
    p: StreamParams,
    pid: u32,
) {
    use axum::extract::ws::{CloseFrame, Message};
    let mut tick = tokio::time::interval(Duration::from_millis(p.tick_ms.unwrap_or(200)));
    tick.tick().await;
    let moment = async {
        match p.leave {
            Some(false) => std::future::pending().await,
            _ => draining.moment().await,
        }
    };
    tokio::pin!(moment);
    let mut n = 0u64;
    let end = loop {
        tokio::select! {
            msg = socket.recv() => match msg {
                Some(Ok(Message::Text(t))) => {
                    let answer = format!("echo {} pid={pid}", t.as_str());
                    if let Err(e) = socket.send(Message::Text(answer.into())).await {
                        break format!("send failed: {e}");
                    }
                }
                Some(Ok(Message::Close(_))) | None => break "closed by the client".to_owned(),
                Some(Ok(_)) => {}
                Some(Err(e)) => break format!("error: {e}"),
            },
            _ = tick.tick() => {
                n += 1;
                if let Err(e) = socket.send(Message::Text(format!("tick {n} pid={pid}").into())).await {
                    break format!("send failed: {e}");
                }
            }
            () = &mut moment => {
                let _ = socket.send(Message::Text(format!("last {n} pid={pid}").into())).await;
                let close = CloseFrame { code: 1012, reason: "service restart".into() };
                let _ = socket.send(Message::Close(Some(close))).await;
                // The client answers with its own close; then the connection is done.
                // One that never answers is cut by the hammer.
                let end = loop {
                    match socket.recv().await {
                        Some(Ok(Message::Close(_))) | None => break "let go at its moment",
                        Some(Ok(_)) => {}
                        Some(Err(_)) => break "let go at its moment; cut before the client answered",
                    }
                };
                break end.to_owned();
            }
        }
    };
    say!("websocket ended: {end}");
}

/// The `/events` stream: event `last + 1` on, until the connection's moment. Each event is
/// a function of its number here; a real application reads them from where they are
/// kept (a log, a database) from `Last-Event-ID` on, so any generation can resume.
fn events(
    last: u64,
    draining: reborn::Draining,
    p: StreamParams,
    pid: u32,
) -> axum::response::sse::Sse<
    impl futures_util::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>,
> {
    use axum::response::sse::{Event, Sse};
    let tick = Duration::from_millis(p.tick_ms.unwrap_or(50));
    // The first event tells the client to reconnect 100 ms after the stream ends.
    let first = Event::default()
        .retry(Duration::from_millis(100))
        .comment("resuming");
    let stream = futures_util::stream::unfold(
        (Some(first), last, draining),
        move |(first, n, draining)| async move {
            if let Some(first) = first {
                return Some((Ok(first), (None, n, draining)));
            }
            tokio::select! {
                () = draining.moment() => None,
                () = tokio::time::sleep(tick) => {
                    let event = Event::default()
                        .id((n + 1).to_string())
                        .data(format!("event {} pid={pid}", n + 1));
                    Some((Ok(event), (None, n + 1, draining)))
                }
            }
        },
    );
    Sse::new(stream)
}
