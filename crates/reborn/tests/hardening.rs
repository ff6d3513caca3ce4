//! Faults found by attacking reborn, each kept as a test.

mod common;

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use common::testserver;
use reborn_testkit::{PATIENCE, alive, signal, wait_for};

fn read_pid_file(path: &std::path::Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// A terminal that goes away (the user closes it): the kernel sends SIGHUP, and the
/// process, whose terminal is gone, shuts down gracefully instead of starting a new
/// generation on a dead terminal, or staying as an orphan that holds the port.
#[test]
fn a_terminal_that_hangs_up_ends_the_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = reborn_testkit::copy_to(&testserver(), dir.path(), "server");
    let pid_file = dir.path().join("pid");
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two fds into the given integers; the rest are null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // openpty's fds are inherited by every process started meanwhile (the tests run in
    // parallel): one that kept the terminal's master open would keep it from hanging up.
    for fd in [master, slave] {
        // SAFETY: F_SETFD on fds we own.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    // SAFETY: both fds are new and owned here.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let mut cmd = Command::new(&bin);
    // The panics of logging to a dead terminal print no backtrace (symbolizing a debug
    // binary takes a minute on a loaded machine).
    cmd.args(["--addr", "127.0.0.1:0", "--pid-file"])
        .arg(&pid_file)
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::from(slave.try_clone().expect("dup")))
        .stdout(Stdio::from(slave.try_clone().expect("dup")))
        .stderr(Stdio::from(slave));
    // SAFETY: setsid and ioctl are async-signal-safe; the child makes the pty its
    // controlling terminal, as a shell in a terminal window does for its jobs.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("start the server on a terminal");
    drop(cmd);
    // The terminal is not read: the little the server writes fits its buffer, and a
    // reader would keep the terminal open.
    let pid = child.id();
    wait_for("the server to serve", PATIENCE, || {
        (read_pid_file(&pid_file) == Some(pid)).then_some(())
    });
    // The user closes the terminal window.
    drop(master);
    let exited = wait_for("the server to exit after the hangup", PATIENCE, || {
        child.try_wait().ok().flatten()
    });
    // It may end with an error: every log line it writes fails on the dead terminal.
    let _ = exited;
    assert_eq!(
        read_pid_file(&pid_file),
        Some(pid),
        "no new generation was started"
    );
}

/// Logging to a stderr whose reader has gone must not end signal handling: the server
/// still upgrades on SIGHUP and stops on SIGTERM.
#[test]
fn signals_still_work_when_stderr_is_a_closed_pipe() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = reborn_testkit::copy_to(&testserver(), dir.path(), "server");
    let pid_file = dir.path().join("pid");
    let mut child = Command::new(&bin)
        .args(["--addr", "127.0.0.1:0", "--pid-file"])
        .arg(&pid_file)
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the server");
    let pid = child.id();
    wait_for("the server to serve", PATIENCE, || {
        (read_pid_file(&pid_file) == Some(pid)).then_some(())
    });
    // `./server 2>&1 | head`: the reader is gone.
    drop(child.stdout.take());
    drop(child.stderr.take());
    // Logging now fails (tracing-subscriber's fallback `eprint!` panics): SIGHUP may not
    // upgrade, but the process must still obey SIGTERM.
    reborn_testkit::replace_with_variant(&bin, &testserver(), b"v2");
    signal(pid, libc::SIGHUP);
    std::thread::sleep(std::time::Duration::from_millis(300));
    // A new process it started, if any, is stopped below whether or not it got ready.
    let started = reborn_testkit::children(pid);
    signal(pid, libc::SIGTERM);
    wait_for("the server to exit on SIGTERM", PATIENCE, || {
        child.try_wait().ok().flatten()
    });
    let committed = read_pid_file(&pid_file).filter(|p| *p != pid);
    for new in started.into_iter().chain(committed) {
        if alive(new) {
            signal(new, libc::SIGTERM);
            wait_for("the new process to exit on SIGTERM", PATIENCE, || {
                (!alive(new)).then_some(())
            });
        }
    }
}

/// A new version that puts the listening socket it inherited in blocking mode and then
/// fails: `O_NONBLOCK` lives on the open file description that both processes share, so
/// the old process's socket is now blocking too. It is mended after the failed upgrade,
/// with a warning, and the old process's next drain does not hang in `accept(2)`.
#[test]
fn a_failed_version_that_made_the_listener_blocking_does_not_hang_the_next_drain() {
    let mut server = common::Server::start(&["--drain-timeout-ms", "60000"]);
    let old = server.proc.pid();
    server.deploy_variant("\nknob:block-listeners-and-exit=1\n");
    signal(old, libc::SIGHUP);
    server.proc.wait_line("the failed upgrade", |l| {
        l.contains("upgrade failed").then_some(())
    });
    server.proc.wait_line("the listener mended", |l| {
        l.contains("made it non-blocking again").then_some(())
    });
    assert_eq!(common::body_pid(&server.get("/ping").body), Some(old));
    // The drain sweeps the accept queue until it is empty: with a blocking socket, the
    // last accept would wait for a connection forever.
    signal(old, libc::SIGTERM);
    wait_for("the old process to drain and exit", PATIENCE, || {
        (!alive(old)).then_some(())
    });
    server.stop_current();
}

/// A handler that blocks a runtime thread never sees the hammer, so `serve` would wait
/// for it forever and generations would pile up. After the drain deadline and the hammer
/// grace, the old generation exits anyway (status 75), naming what was still open.
///
/// The blocking request comes on an idle keep-alive connection: the worker that polls
/// the runtime's I/O driver is the one woken for it, and it is the one that blocks, while
/// the other worker sleeps. A SIGHUP seen only through that driver was never seen (CI
/// failed on this); reborn's signal thread wakes a worker.
#[test]
fn a_handler_that_blocks_a_runtime_thread_cannot_keep_an_old_generation_past_the_deadline() {
    let mut server = common::Server::start(&[
        "--drain-timeout-ms",
        "500",
        "--hammer-grace-ms",
        "1000",
        "--probation-ms",
        "0",
    ]);
    let old = server.proc.pid();
    let mut conn = std::net::TcpStream::connect(server.addr).expect("connect");
    common::ping_on(&mut conn).expect("a first request on the keep-alive connection");
    // Not a wait for readiness: a moment for the runtime to go idle, every worker asleep,
    // as a server between requests is. (Shorter, the test is weaker, never wrong.)
    std::thread::sleep(std::time::Duration::from_millis(200));
    let client = std::thread::spawn(move || {
        use std::io::Write;
        conn.write_all(b"GET /block?ms=600000 HTTP/1.1\r\nHost: test\r\n\r\n")?;
        common::read_response(&mut conn)
    });
    server.proc.wait_line("the handler to block", |l| {
        l.contains("blocking a runtime thread").then_some(())
    });
    server.deploy_variant("v2");
    signal(old, libc::SIGHUP);
    let new = server.wait_new_pid(old);
    let code = server.proc.wait_exit(PATIENCE);
    // Written just before the exit: the reader may not have it yet.
    server.proc.wait_line("the open connection named", |l| {
        l.contains("GET /block?ms=600000 for").then_some(())
    });
    let output = server.proc.output();
    assert_eq!(code, Some(reborn::EXIT_DRAIN_OVERRUN), "{output}");
    assert!(
        output.contains("Still open: 127.0.0.1:") && output.contains("GET /block?ms=600000 for"),
        "the open connection is named, with its request:\n{output}"
    );
    assert!(client.join().expect("client thread").is_err(), "cut");
    assert_eq!(common::body_pid(&server.get("/ping").body), Some(new));
    server.stop_current();
}

/// A new version that moved its listener (another name, another port) would leave the
/// old address to nobody once the old process exits: it refuses to report ready, says
/// which listener it left unclaimed, and the old version keeps serving on that address.
#[test]
fn a_new_version_that_moves_its_listener_is_refused_and_the_old_port_keeps_serving() {
    let mut server = common::Server::start(&[]);
    let old = server.proc.pid();
    server.deploy_variant("\nknob:listener=web@127.0.0.2:0\n");
    signal(old, libc::SIGHUP);
    let line = server.proc.wait_line("the refused upgrade", |l| {
        l.contains("upgrade failed").then(|| l.to_owned())
    });
    assert!(
        line.contains("refused to report ready")
            && line.contains(&format!("the listener \"http\" ({})", server.addr)),
        "{line}"
    );
    let output = server.proc.output();
    assert!(
        output.contains("ERROR") && output.contains("which it did not ask for"),
        "the new process says why, loudly:\n{output}"
    );
    for _ in 0..20 {
        assert_eq!(common::body_pid(&server.get("/ping").body), Some(old));
    }
    assert_eq!(server.serving_pid(), Some(old));
    server.stop_current();
}

/// The same move, made on purpose (`Builder::close_unclaimed_listeners`): the upgrade
/// goes through, with a warning naming the listener it closes.
#[test]
fn a_listener_moved_on_purpose_is_closed_with_a_warning() {
    let mut server = common::Server::start(&[]);
    let old = server.proc.pid();
    server.deploy_variant("\nknob:listener=web@127.0.0.2:0\nknob:close-unclaimed=1\n");
    signal(old, libc::SIGHUP);
    let new = server.wait_pid_file_moves_from(old);
    server.proc.wait_line("the warning", |l| {
        (l.contains("closing the listener \"http\"") && l.contains("not asked for")).then_some(())
    });
    wait_for("the old process to exit", PATIENCE, || {
        (!alive(old)).then_some(())
    });
    assert!(alive(new));
    server.stop_current();
}

/// During a drain, the idle grace closes keep-alive connections that sent nothing; a
/// client that is in the middle of sending its next request head when the grace ends is
/// not idle: it gets its answer (with `Connection: close`) instead of a closed connection.
#[test]
fn a_request_head_still_arriving_at_the_idle_grace_is_answered() {
    use std::io::{Read, Write};
    let mut server = common::Server::start(&["--idle-grace-ms", "1500"]);
    let pid = server.proc.pid();
    let connect = || {
        let mut s = std::net::TcpStream::connect(server.addr).expect("connect");
        s.set_read_timeout(Some(PATIENCE)).expect("read timeout");
        let first = common::ping_on(&mut s).expect("the first request");
        assert!(first.starts_with("http/1.1 200"), "{first}");
        s
    };
    let mut idle = connect();
    let mut slow: Vec<_> = (0..10).map(|_| connect()).collect();

    signal(pid, libc::SIGTERM);
    for s in &mut slow {
        s.write_all(b"GET /ping HTTP/1.1\r\n").expect("half a head");
    }
    // The idle connection is closed when the grace ends.
    let mut buf = [0u8; 1];
    assert_eq!(idle.read(&mut buf).expect("the idle connection"), 0);
    for (i, s) in slow.iter_mut().enumerate() {
        s.write_all(b"Host: test\r\n\r\n")
            .expect("the rest of the head");
        let answer = common::read_response(s)
            .unwrap_or_else(|e| panic!("slow client {i} lost its request at the grace: {e}"));
        assert!(answer.starts_with("http/1.1 200"), "{answer}");
        assert!(answer.contains("connection: close"), "{answer}");
        assert!(answer.contains(&format!("pid={pid}")), "{answer}");
    }
    server.proc.assert_exits_with(0);
}

/// A slowloris client, sending its request head a line at a time and never finishing it,
/// is closed at the header read timeout: it cannot hold a draining process until its
/// drain deadline (here 10 minutes).
#[test]
fn a_slowloris_client_cannot_hold_a_drain_until_its_deadline() {
    use std::io::Write;
    let mut server = common::Server::start(&[
        "--drain-timeout-ms",
        "600000",
        "--header-read-timeout-ms",
        "1000",
    ]);
    let addr = server.addr;
    // One slowloris on a fresh connection, one on a keep-alive connection after a
    // request; each sends a header line every 100 ms, for at most 60 s.
    let loris: Vec<_> = (0..2)
        .map(|n| {
            let mut s = std::net::TcpStream::connect(addr).expect("connect");
            s.set_read_timeout(Some(PATIENCE)).expect("read timeout");
            if n == 1 {
                common::ping_on(&mut s).expect("the first request");
            }
            s.write_all(b"GET /ping HTTP/1.1\r\n")
                .expect("the request line");
            std::thread::spawn(move || {
                for i in 0..600 {
                    if s.write_all(format!("X-Slow-{i}: y\r\n").as_bytes())
                        .is_err()
                    {
                        return true;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                false
            })
        })
        .collect();
    signal(server.proc.pid(), libc::SIGTERM);
    server.proc.assert_exits_with(0);
    for l in loris {
        assert!(
            l.join().expect("slowloris thread"),
            "the slowloris was closed"
        );
    }
}

/// A server at its open-files limit (its connections took every descriptor) reports the
/// failing accepts once, with the limit and what to raise, not 20 times a second; and
/// it can still upgrade: the reserve of descriptors it keeps makes room to start the new
/// version, which takes over the queued connections.
#[test]
fn a_server_out_of_file_descriptors_says_so_once_and_can_still_upgrade() {
    let mut server = common::Server::start_limited(Some(64), &["--idle-grace-ms", "200"]);
    let old = server.proc.pid();
    // More connections than the limit allows: the rest wait in the backlog.
    let clients: Vec<_> = (0..100)
        .map(|_| std::net::TcpStream::connect(server.addr).expect("connect"))
        .collect();
    server.proc.wait_line("accepts to fail", |l| {
        l.contains("accept failed").then_some(())
    });
    // Half a second of failing accepts, retried every 50 ms.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let output = server.proc.output();
    let reports = output
        .lines()
        .filter(|l| l.contains("accept failed") || l.contains("accept still failing"))
        .collect::<Vec<_>>();
    assert_eq!(reports.len(), 1, "one report, not one per retry:\n{output}");
    assert!(
        reports[0].contains("its limit is 64") && reports[0].contains("ulimit -n"),
        "{}",
        reports[0]
    );

    server.deploy_variant("v2");
    signal(old, libc::SIGHUP);
    let new = server.wait_pid_file_moves_from(old);
    drop(clients);
    server.wait_answered_by(new);
    server.proc.assert_exits_with(0);
    server.stop_current();
}

/// A PID file that cannot be written (the disk is full: here a 4 KiB tmpfs, already full,
/// in a mount namespace of the server's own) is reported, and leaves no temporary file
/// behind.
#[test]
fn a_pid_file_on_a_full_disk_leaves_no_temporary_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = reborn_testkit::copy_to(&common::testserver(), dir.path(), "server");
    let full = dir.path().join("full");
    std::fs::create_dir(&full).expect("mkdir");
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(
            "mount -t tmpfs -o size=4k reborn-full \"$1\" && \
             (cat /dev/zero > \"$1/fill\" 2>/dev/null; true) && \
             exec \"$0\" --addr 127.0.0.1:0 --pid-file \"$1/pid\"",
        )
        .arg(&bin)
        .arg(&full);
    let mut server = reborn_testkit::Proc::start(cmd);
    server.wait_line("the PID file to fail", |l| {
        l.contains("cannot write the PID file").then_some(())
    });
    // The server's view of the directory, through its own mount namespace.
    let seen = format!("/proc/{}/root{}", server.pid(), full.display());
    let names: Vec<String> = std::fs::read_dir(&seen)
        .unwrap_or_else(|e| panic!("{seen}: {e}"))
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["fill"], "{}", server.output());
    signal(server.pid(), libc::SIGTERM);
    server.assert_exits_with(0);
}

/// A `REBORN_MASTER_PID` handed on from another environment (no master made this
/// process's notify socket) is ignored, with a warning: SIGHUP still upgrades.
#[test]
fn a_stray_master_pid_does_not_disable_sighup() {
    let me = std::process::id().to_string();
    let mut server = common::Server::start_env(&[("REBORN_MASTER_PID", &me)], &[]);
    let old = server.proc.pid();
    // stdout and stderr are read apart: the warning may come after the PID file.
    server.proc.wait_line("the warning", |l| {
        l.contains(&format!("REBORN_MASTER_PID={me} is ignored"))
            .then_some(())
    });
    server.deploy_variant("v2");
    signal(old, libc::SIGHUP);
    server.wait_new_pid(old);
    server.stop_current();
}

/// A `REBORN_UPSTREAM_NOTIFY_SOCKET` handed on from another environment (this process
/// was not started by an upgrade) is ignored, with a warning: the PID file is written.
#[test]
fn a_stray_upstream_notify_socket_does_not_skip_the_pid_file() {
    // Server::start waits for the PID file to name the server.
    let mut server = common::Server::start_env(
        &[
            ("REBORN_UPSTREAM_NOTIFY_SOCKET", ""),
            ("NOTIFY_SOCKET", "@reborn/1/0123456789abcdef"),
        ],
        &[],
    );
    server.proc.wait_line("the warning", |l| {
        l.contains("REBORN_UPSTREAM_NOTIFY_SOCKET is ignored")
            .then_some(())
    });
    server.stop_current();
}
