//! The master's hardening (issue 9), with real processes: a refused second master leaves
//! the running one's files alone; `reborn stop` is answered when no worker lives; a
//! program that cannot start fails the master at once; workers run in process groups of
//! their own; messages say what happened and what to do; the control socket caps its
//! connections; a worker that does not use the master's listeners is loud; stale notify
//! directories are swept; a liveness probe restarts a hung worker.

mod common;

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;

use common::{Master, bench_server, ping, reborn, start_app, tempdir};
use reborn_testkit::{PATIENCE, Proc, alive, copy_to, replace_with_script, signal, wait_for};

/// A second `reborn run` under the same control socket is refused, and on its way out
/// leaves the running master's control socket and PID file in place: the running master
/// can still be queried, upgraded and stopped.
#[test]
fn refused_second_master_leaves_the_first_ones_files() {
    let dir = tempdir();
    let pid_file = dir.path().join("app.pid");
    let pid_arg = pid_file.to_str().unwrap().to_owned();
    let (mut master, app) = start_app(dir.path(), &["--pid-file", &pid_arg]);
    wait_for("the PID file", PATIENCE, || pid_file.exists().then_some(()));

    let out = Command::new(reborn())
        .arg("run")
        .arg("--control")
        .arg(&master.control)
        .args(["--pid-file", &pid_arg, "--listen", "127.0.0.1:0", "--"])
        .arg(&app)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("another reborn master is running"), "{err}");

    assert!(
        master.control.exists(),
        "the running master's control socket"
    );
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        master.pid().to_string(),
        "the running master's PID file"
    );
    assert_eq!(master.status()["state"], "serving");
    let (ok, text) = master.upgrade();
    assert!(ok, "{text}");
    let out = master.client("stop", &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(master.proc.wait_exit(PATIENCE), Some(0));
    assert!(
        !master.control.exists() && !pid_file.exists(),
        "removed by their owner"
    );
}

/// `reborn stop` while no worker lives (a crash loop, waiting out its back-off): the
/// master stops at once, and the client gets its answer and exits 0.
#[test]
fn stop_with_no_worker_alive_is_answered() {
    let dir = tempdir();
    let script = dir.path().join("flaky.sh");
    // Serves the first time; every later start fails at once.
    replace_with_script(
        &script,
        &format!(
            "#!/bin/sh\nif [ -e {m} ]; then exit 1; fi\ntouch {m}\nexec sleep 600\n",
            m = dir.path().join("started").display()
        ),
    );
    let mut master = Master::start(
        dir.path(),
        &["--ready", "delay:100ms", "--backoff-max", "5s"],
        &[script.as_os_str()],
    );
    let first = master.wait_serving();
    signal(first, libc::SIGKILL);
    // Crashes in a row grow the back-off (0.1, 0.2, 0.4, 0.8s…): wait for a long one.
    wait_for("a long back-off with no worker", PATIENCE, || {
        let s = master.status();
        (s["crashes_in_a_row"].as_u64()? >= 4 && s["workers"].as_array()?.is_empty()).then_some(())
    });
    let out = master.client("stop", &[]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}\n{}", master.proc.output());
    assert!(text.contains("stopping the master"), "{text}");
    assert_eq!(master.proc.wait_exit(PATIENCE), Some(0));
}

/// A program that cannot start at all (it exits before it is ever ready, or cannot be
/// executed) fails the master at once, non-zero, with the worker's reason; it is not
/// retried forever. (Crashes after a worker was once ready keep their back-off: see
/// `failures.rs`.)
#[test]
fn first_start_failure_fails_the_master_fast() {
    let dir = tempdir();
    let bad_flag = dir.path().join("bad-flag.sh");
    replace_with_script(
        &bad_flag,
        "#!/bin/sh\necho 'unknown flag --frobnicate' >&2\nexit 3\n",
    );
    let not_a_program = dir.path().join("not-a-program");
    replace_with_script(&not_a_program, "this is not a program\n");
    for (program, reason) in [
        (&bad_flag, "exited with status 3 before it was ready"),
        (&not_a_program, "could not be started"),
    ] {
        let mut cmd = Command::new(reborn());
        cmd.args(["run", "--listen", "127.0.0.1:0", "--control"])
            .arg(dir.path().join("ctl.sock"))
            .args(["--backoff-max", "100ms", "--"])
            .arg(program);
        let mut master = Proc::start(cmd);
        let code = master.wait_exit(PATIENCE);
        // Written just before the exit: the reader may not have it yet.
        master.wait_line("the error", |l| {
            (l.contains("error: the program cannot start") && l.contains(reason)).then_some(())
        });
        let out = master.output();
        assert_eq!(code, Some(1), "{out}");
        assert!(!out.contains("restarting the worker"), "not retried: {out}");
    }
}

/// The PID a script wrote to `path`, once it is there.
fn read_pid(path: &Path) -> u32 {
    wait_for("a PID file written by the worker", PATIENCE, || {
        std::fs::read_to_string(path).ok()?.trim().parse().ok()
    })
}

/// A worker runs in a process group of its own, which the master stops as a whole: a
/// process it started in the background (which, like the worker, ignores SIGTERM) does
/// not survive `reborn stop` and the master's exit; the group gets SIGKILL at the drain
/// deadline.
#[test]
fn stop_reaches_the_workers_whole_process_group() {
    let dir = tempdir();
    let child_pid = dir.path().join("child.pid");
    let script = dir.path().join("start.sh");
    replace_with_script(
        &script,
        &format!(
            "#!/bin/sh\ntrap '' TERM\n(while :; do sleep 0.1; done) &\necho $! > {}\n\
             while :; do sleep 0.1; done\n",
            child_pid.display()
        ),
    );
    let mut master = Master::start(
        dir.path(),
        &["--ready", "delay:100ms", "--drain-timeout", "1s"],
        &[script.as_os_str()],
    );
    let worker = master.wait_serving();
    let child = read_pid(&child_pid);
    assert!(alive(child));
    let out = master.client("stop", &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(master.proc.wait_exit(PATIENCE), Some(0));
    assert!(!alive(worker), "the worker");
    wait_for(
        "the worker's background process to be gone",
        PATIENCE,
        || (!alive(child)).then_some(()),
    );
}

/// A worker that exits while a process it started in the background still runs (it
/// daemonized): the master says so and what to do, and stops the leftover.
#[test]
fn a_worker_that_daemonizes_is_named_and_its_leftovers_stopped() {
    let dir = tempdir();
    let daemon_pid = dir.path().join("daemon.pid");
    let script = dir.path().join("start.sh");
    replace_with_script(
        &script,
        &format!(
            "#!/bin/sh\nif [ -e {ran} ]; then exec sleep 600; fi\ntouch {ran}\n\
             sleep 600 &\necho $! > {pid}\nsleep 1\n",
            ran = dir.path().join("ran").display(),
            pid = daemon_pid.display()
        ),
    );
    let master = Master::start(
        dir.path(),
        &["--ready", "delay:100ms"],
        &[script.as_os_str()],
    );
    let daemon = read_pid(&daemon_pid);
    master.proc.wait_line("the warning about daemonizing", |l| {
        (l.contains("WARN")
            && l.contains("left 1 process(es) of its process group running")
            && l.contains("daemonizes")
            && l.contains("`exec server`")
            && l.contains(&daemon.to_string()))
        .then_some(())
    });
    wait_for("the leftover to be stopped", PATIENCE, || {
        (!alive(daemon)).then_some(())
    });
    master.proc.wait_line("the leftover's exit", |l| {
        l.contains("what the worker left in its process group has exited")
            .then_some(())
    });
}

/// The master's messages say what happened and what to do: a missing program and a
/// non-executable one are told apart; a worker that dies of the stop signal the master
/// sent was stopped as asked, not "killed"; its lifetime and its drain are both given,
/// labelled; a warning about a socket names the socket.
#[test]
fn messages_say_what_happened_and_what_to_do() {
    let dir = tempdir();
    let script = dir.path().join("app.sh");
    // Dies of SIGTERM (the default action), as many programs do.
    replace_with_script(&script, "#!/bin/sh\nexec sleep 600\n");
    let bad_notify = dir.path().join("no-such-dir").join("notify.sock");
    let mut cmd = Command::new(reborn());
    cmd.args(["run", "--listen", "127.0.0.1:0", "--control"])
        .arg(dir.path().join("ctl.sock"))
        .args(["--ready", "delay:100ms", "--probation", "0", "--"])
        .arg(&script)
        .env("NOTIFY_SOCKET", &bad_notify);
    let proc = Proc::start(cmd);
    proc.wait_line("the control socket", |l| {
        l.contains("control socket: ").then_some(())
    });
    let master = Master {
        proc,
        control: dir.path().join("ctl.sock"),
        addr: "127.0.0.1:1".parse().unwrap(),
    };
    let first = master.wait_serving();

    // (d) The warning about the service manager's socket names it.
    master.proc.wait_line("the notify warning", |l| {
        (l.contains("cannot notify the service manager")
            && l.contains(&bad_notify.display().to_string()))
        .then_some(())
    });

    // (a) Not executable: say chmod +x.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, text) = master.upgrade();
    assert!(!ok);
    assert!(
        text.contains("is not executable")
            && text.contains(&format!("chmod +x {}", script.display())),
        "{text}"
    );
    // Missing: say check the path.
    std::fs::remove_file(&script).unwrap();
    let (ok, text) = master.upgrade();
    assert!(!ok);
    assert!(
        text.contains("is missing (no such file); check the path"),
        "{text}"
    );
    assert!(!text.contains("chmod"), "{text}");

    // (b), (c) The old worker dies of the SIGTERM it was sent.
    replace_with_script(&script, "#!/bin/sh\nexec sleep 600\n");
    let (ok, text) = master.upgrade();
    assert!(ok, "{text}");
    let line = master.proc.wait_line("the old worker's end", |l| {
        (l.contains("a stopped worker") && l.contains(&format!("(pid {first})")))
            .then(|| l.to_owned())
    });
    assert!(line.contains("stopped (SIGTERM, as asked)"), "{line}");
    assert!(!line.contains("killed"), "{line}");
    assert!(
        line.contains("lifetime=") && line.contains("drained_in="),
        "{line}"
    );
}

/// The control socket serves at most 64 connections at once (one more is answered with
/// a one-line error and closed), and closes a connection that sends no request line
/// within 10 s; then it serves again.
#[test]
fn control_connections_are_capped_and_idle_ones_time_out() {
    use std::io::{BufRead, BufReader, Read};
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};
    let dir = tempdir();
    let (master, _app) = start_app(dir.path(), &[]);
    let opened = Instant::now();
    let idle: Vec<UnixStream> = (0..64)
        .map(|_| UnixStream::connect(&master.control).unwrap())
        .collect();
    // The 65th: one line of error, then EOF.
    let extra = UnixStream::connect(&master.control).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut reader = BufReader::new(extra);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let reply: serde_json::Value = serde_json::from_str(&line).expect("a JSON reply line");
    assert_eq!(reply["ok"], false, "{line}");
    assert!(
        reply["message"]
            .as_str()
            .unwrap()
            .contains("64 control connections"),
        "{line}"
    );
    let mut rest = String::new();
    assert_eq!(
        reader.read_to_string(&mut rest).unwrap(),
        0,
        "closed after it"
    );
    let out = master.client("status", &[]);
    assert!(
        !out.status.success(),
        "the cap holds for the real client too"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the master is busy"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The idle ones are closed at about 10 s; the master serves again.
    for mut conn in idle {
        conn.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(conn.read(&mut buf).unwrap(), 0, "closed without an answer");
    }
    let took = opened.elapsed();
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(40),
        "{took:?}"
    );
    wait_for(
        "the master to serve control connections again",
        PATIENCE,
        || master.client("status", &[]).status.success().then_some(()),
    );
}

/// A server that moved its listener: it closes the socket it was handed (fd 3), binds
/// its own port, reports ready and accepts there.
const MOVER: &str = r#"
import os, socket
os.close(3)
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen()
n = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
n.sendto(b"READY=1", os.environ["NOTIFY_SOCKET"])
while True:
    c, _ = s.accept()
    c.close()
"#;

/// A worker that does not use the master's listener (a new version that moved its
/// listener to another name and port: it closes the socket it was handed and binds its
/// own) is loud: an ERROR naming the listener and the address; as an upgrade it is
/// refused (the old worker keeps serving the master's socket); as the only worker it
/// serves, and `reborn status` warns.
#[test]
fn a_worker_that_moves_its_listener_is_loud() {
    let dir = tempdir();
    let (master, app) = start_app(dir.path(), &[]);
    let (_, old_pid) = ping(master.addr);
    // The new version closes the socket it was handed and binds a port of its own.
    let python = common::require_tool("python3", "apt-get install -y python3");
    let mover = dir.path().join("mover.py");
    std::fs::write(&mover, MOVER).unwrap();
    let moved = format!("#!/bin/sh\nexec {} {}\n", python.display(), mover.display());
    replace_with_script(&app, &moved);
    let (ok, text) = master.upgrade();
    let listener = format!("listener http ({})", master.addr);
    assert!(!ok, "{text}");
    assert!(text.contains(&listener), "{text}");
    assert!(
        text.contains("closed the socket it was handed and listens on 127.0.0.1:"),
        "{text}"
    );
    assert!(
        text.contains(&format!("(pid {old_pid}) keeps serving")),
        "{text}"
    );
    master.proc.wait_line("the ERROR", |l| {
        (l.contains("ERROR") && l.contains(&listener)).then_some(())
    });
    assert_eq!(ping(master.addr).1, old_pid);
    assert!(master.status()["warnings"].as_array().unwrap().is_empty());

    // The only worker: it serves, and status warns.
    let dir2 = tempdir();
    let script = dir2.path().join("moved.sh");
    replace_with_script(&script, &moved);
    let second = Master::start(dir2.path(), &[], &[script.as_os_str()]);
    second.wait_serving();
    let listener = format!("listener http ({})", second.addr);
    second.proc.wait_line("the ERROR", |l| {
        (l.contains("ERROR") && l.contains(&listener)).then_some(())
    });
    let status = second.status();
    assert_eq!(status["state"], "serving");
    let warnings = status["warnings"].as_array().unwrap();
    assert!(
        warnings.len() == 1 && warnings[0].as_str().unwrap().contains(&listener),
        "{status}"
    );
    let out = second.client("status", &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("WARNING: ") && text.contains(&listener),
        "{text}"
    );
}

/// A master killed with SIGKILL leaves its workers' notify directory behind; the next
/// master of this user sweeps it — and only dead masters' directories of this naming.
#[test]
fn a_killed_masters_notify_directory_is_swept() {
    use std::os::unix::fs::MetadataExt;
    let runtime = tempdir();
    let dir = tempdir();
    let script = dir.path().join("app.sh");
    replace_with_script(&script, "#!/bin/sh\nexec sleep 600\n");
    let start = |name: &str| {
        let mut cmd = Command::new(reborn());
        cmd.args(["run", "--listen", "127.0.0.1:0", "--control"])
            .arg(dir.path().join(format!("{name}.sock")))
            .args(["--ready", "delay:100ms", "--"])
            .arg(&script)
            .env("XDG_RUNTIME_DIR", runtime.path());
        let proc = Proc::start(cmd);
        proc.wait_line("the control socket", |l| {
            l.contains("control socket: ").then_some(())
        });
        Master {
            proc,
            control: dir.path().join(format!("{name}.sock")),
            addr: "127.0.0.1:1".parse().unwrap(),
        }
    };
    let mut first = start("first");
    let worker = first.wait_serving();
    let environ = std::fs::read(format!("/proc/{worker}/environ")).unwrap();
    let notify = environ
        .split(|b| *b == 0)
        .find_map(|kv| kv.strip_prefix(b"NOTIFY_SOCKET="))
        .map(|v| std::path::PathBuf::from(String::from_utf8_lossy(v).into_owned()))
        .expect("the worker's NOTIFY_SOCKET");
    let stale = notify.parent().unwrap().to_path_buf();
    assert_eq!(
        stale.parent().unwrap(),
        runtime.path(),
        "{}",
        stale.display()
    );
    signal(first.pid(), libc::SIGKILL);
    first.proc.wait_exit(PATIENCE);
    wait_for("the worker to die with its master", PATIENCE, || {
        (!alive(worker)).then_some(())
    });
    assert!(stale.is_dir(), "SIGKILL left {} behind", stale.display());

    // What must stay: a control socket directory's name, a live process's directory,
    // and a dead one's that holds something other than sockets.
    let ns = std::fs::metadata("/proc/self/ns/pid").unwrap().ino();
    let keep = [
        runtime.path().join("reborn-0"),
        runtime
            .path()
            .join(format!("reborn-notify-{ns}-{}-live01", std::process::id())),
        runtime
            .path()
            .join(format!("reborn-notify-{ns}-999999999-files1")),
    ];
    for k in &keep {
        std::fs::create_dir(k).unwrap();
    }
    std::fs::write(keep[2].join("data"), "not a socket").unwrap();

    let second = start("second");
    second.wait_serving();
    second.proc.wait_line("the sweep", |l| {
        (l.contains("removed the notify directory") && l.contains(&stale.display().to_string()))
            .then_some(())
    });
    assert!(!stale.exists(), "{} is swept", stale.display());
    for k in &keep {
        assert!(k.is_dir(), "{} is left alone", k.display());
    }
}

/// `--liveness`: a worker that hangs (here SIGSTOPped: it still holds the socket, and the
/// kernel still queues connections for it, but nothing answers) fails its probe; after
/// the failures in a row the master logs an ERROR naming the probe, kills the worker
/// and restarts it as after a crash.
#[test]
fn liveness_probe_restarts_a_hung_worker() {
    let dir = tempdir();
    let port = reborn_testkit::free_port();
    let app = copy_to(&bench_server(), dir.path(), "app");
    let probe = format!("http:127.0.0.1:{port}/ping");
    let master = Master::start_on(
        dir.path(),
        &format!("127.0.0.1:{port}"),
        &[
            "--liveness",
            &probe,
            "--liveness-interval",
            "200ms",
            // Long enough that a loaded machine does not fail a healthy worker three
            // times in a row: bench-server's first answer waits for its build id, which
            // took 1.2 s to hash beside a full test suite (and a 500 ms timeout killed
            // healthy workers); a stopped worker never answers.
            "--liveness-timeout",
            "3s",
            "--liveness-failures",
            "3",
        ],
        &[
            app.as_os_str(),
            OsStr::new("--addr"),
            OsStr::new("127.0.0.1:0"),
        ],
    );
    let hung = master.wait_serving();
    assert_eq!(ping(master.addr).1, hung);
    signal(hung, libc::SIGSTOP);
    let line = master.proc.wait_line("the liveness ERROR", |l| {
        (l.contains("ERROR") && l.contains("liveness probes in a row failed")).then(|| l.to_owned())
    });
    assert!(
        line.contains(&format!("http://127.0.0.1:{port}/ping"))
            && line.contains(&format!("pid {hung}")),
        "{line}"
    );
    let next = wait_for("a restarted worker", PATIENCE, || {
        master.serving_pid().filter(|p| *p != hung)
    });
    assert!(!alive(hung), "the hung worker is gone");
    assert_eq!(ping(master.addr).1, next);
    assert_eq!(master.status()["crashes"], 1);
    master.proc.wait_line("the crash's reason", |l| {
        l.contains("was killed by SIGKILL (its liveness probe failed)")
            .then_some(())
    });
}

/// `reborn upgrade` and `reborn status` without `--name` or `--control` find the one
/// master of this user that runs, past a control socket that a killed master left behind
/// (nobody listens on it); with only that one left, the error says so and names it.
/// Looking does not make the live master log a refused request.
#[test]
fn a_client_without_a_name_finds_the_live_master_past_a_stale_socket() {
    let runtime = tempdir();
    let dir = tempdir();
    let sockets = runtime.path().join("reborn");
    std::fs::create_dir(&sockets).unwrap();
    let stale = sockets.join("dead.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let app = copy_to(&bench_server(), dir.path(), "app");
    let mut cmd = Command::new(reborn());
    cmd.args(["run", "--listen", "http=127.0.0.1:0", "--"])
        .arg(&app)
        .args(["--addr", "127.0.0.1:0"])
        .env("XDG_RUNTIME_DIR", runtime.path());
    let proc = Proc::start(cmd);
    let addr = proc.wait_line("the master's listening address", |l| {
        l.split("listening on http=")
            .nth(1)
            .and_then(|a| a.trim().parse().ok())
    });
    proc.wait_line("the control socket", |l| {
        l.contains("control socket: ").then_some(())
    });
    let mut master = Master {
        proc,
        control: sockets.join("app.sock"),
        addr,
    };
    let first = master.wait_serving();
    let client = |subcommand: &str| {
        let out = Command::new(reborn())
            .arg(subcommand)
            .env("XDG_RUNTIME_DIR", runtime.path())
            .output()
            .expect("run the reborn client");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let (ok, text) = client("status");
    assert!(ok && text.contains(&first.to_string()), "{text}");
    let (ok, text) = client("upgrade");
    assert!(ok, "{text}\n{}", master.proc.output());
    let second = wait_for("the new worker", PATIENCE, || {
        master.serving_pid().filter(|p| *p != first)
    });
    wait_for("an answer from the new worker", PATIENCE, || {
        (ping(master.addr).1 == second).then_some(())
    });
    assert!(
        !master.proc.output().contains("refused a request"),
        "{}",
        master.proc.output()
    );
    let (ok, text) = client("stop");
    assert!(ok, "{text}");
    master.proc.assert_exits_with(0);
    let (ok, text) = client("status");
    assert!(
        !ok && text.contains("no reborn master of this user is running")
            && text.contains(&stale.display().to_string()),
        "{text}"
    );
}
