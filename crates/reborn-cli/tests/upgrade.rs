//! Upgrades of the reborn demo server under the real master: zero failed requests under
//! load, a stable master PID, the protocol each worker sees, signals, and a graceful stop.

mod common;

use std::time::{Duration, Instant};

use common::{Master, bench_server, ping, refused, tempdir};
use reborn_testkit::Load;
use reborn_testkit::{PATIENCE, alive, copy_to, replace_with_variant, signal, wait_for};

/// Ten upgrades under continuous keep-alive and connection-per-request load, each to a
/// different binary, with a slow request in flight at each: no request fails, every slow
/// request is answered, the master's PID never changes.
#[test]
fn ten_upgrades_under_load_lose_nothing() {
    let dir = tempdir();
    let bench = bench_server();
    let app = copy_to(&bench, dir.path(), "app");
    let master = Master::start_bench(dir.path(), &[], &app);
    master.wait_serving();
    let load = Load::start(master.addr, "/ping", 4, 2);
    load.wait_progress(50);
    let mut durations = Vec::new();
    for i in 1..=10u8 {
        let (old_id, old_pid) = ping(master.addr);
        replace_with_variant(&app, &bench, &[i]);
        let slow = std::thread::spawn({
            let addr = master.addr;
            move || reborn_testkit::get(addr, "/ping?sleep_ms=700")
        });
        // Let the slow request reach the old worker before it is told to stop.
        std::thread::sleep(Duration::from_millis(50));
        let started = Instant::now();
        let (ok, text) = master.upgrade();
        durations.push(started.elapsed());
        assert!(ok, "upgrade {i} failed: {text}\n{}", master.proc.output());
        assert!(text.contains("is serving"), "{text}");
        let (new_id, new_pid) = wait_for("the new worker to answer", PATIENCE, || {
            let (id, pid) = ping(master.addr);
            (pid != old_pid).then_some((id, pid))
        });
        assert_ne!(new_id, old_id, "upgrade {i} runs the new binary");
        assert_eq!(master.serving_pid(), Some(new_pid));
        let slow = slow.join().unwrap().expect("the slow request is answered");
        assert_eq!(slow.status, 200);
        load.wait_progress(20);
    }
    let status = master.status();
    assert_eq!(status["master_pid"].as_u64(), Some(master.pid() as u64));
    assert_eq!(status["generation"].as_u64(), Some(11));
    assert_eq!(status["last_upgrade"]["ok"], true);
    let answered = load.finish_without_failures().ok;
    assert!(answered > 200, "only {answered} requests answered");
    let max = durations.iter().max().unwrap();
    eprintln!(
        "10 upgrades under load: {answered} requests, 0 failed; `reborn upgrade` took {:?} .. {max:?}",
        durations.iter().min().unwrap()
    );
}

/// SIGHUP upgrades like `reborn upgrade`; `reborn status` reports generation, PIDs,
/// listeners and the last upgrade; a new upgrade can start while an older generation
/// still drains a long request, so several generations drain at once.
#[test]
fn sighup_upgrades_and_generations_drain_side_by_side() {
    let dir = tempdir();
    let bench = bench_server();
    let master = Master::start_bench(dir.path(), &["--drain-timeout", "20s"], &bench);
    let first = master.wait_serving();
    let status = master.status();
    assert_eq!(status["generation"], 1);
    assert_eq!(status["state"], "serving");
    assert_eq!(status["listeners"][0]["name"], "http");
    assert_eq!(
        status["listeners"][0]["address"],
        master.addr.to_string().as_str()
    );
    assert!(status["last_upgrade"].is_null());

    let mut slow = Vec::new();
    for generation in 2..=3u64 {
        let addr = master.addr;
        slow.push(std::thread::spawn(move || {
            // Long enough to outlast two upgrades on a loaded machine.
            reborn_testkit::get(addr, "/ping?sleep_ms=8000")
        }));
        std::thread::sleep(Duration::from_millis(100));
        signal(master.pid(), libc::SIGHUP);
        wait_for("the SIGHUP upgrade", PATIENCE, || {
            (master.status()["generation"] == generation).then_some(())
        });
    }
    let status = master.status();
    let draining = status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["role"] == "draining")
        .count();
    assert_eq!(draining, 2, "two generations drain at once: {status:#}");
    assert_eq!(status["last_upgrade"]["ok"], true);
    assert!(status["last_upgrade"]["duration_ms"].as_u64().is_some());
    for s in slow {
        let r = s
            .join()
            .unwrap()
            .expect("a slow request is answered by its old worker");
        assert_eq!(r.status, 200);
    }
    wait_for("the old generations to exit", PATIENCE, || {
        (!alive(first)).then_some(())
    });
    let text = master.client("status", &[]);
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(text.contains("serving, generation 3"), "{text}");
    assert!(
        text.contains("last upgrade: generation 3 succeeded"),
        "{text}"
    );
}

/// The worker sees the protocol exactly: LISTEN_PID is its own PID, LISTEN_FDS and
/// LISTEN_FDNAMES match the listeners, NOTIFY_SOCKET and REBORN_MASTER_PID are set.
/// SIGUSR1, SIGUSR2 and SIGTSTP to the master reach the worker. A readiness delay works for a
/// program that cannot notify.
#[test]
fn worker_environment_and_forwarded_signals() {
    let dir = tempdir();
    let script = dir.path().join("worker.sh");
    let out = dir.path().join("env.txt");
    let sigs = dir.path().join("signals.txt");
    reborn_testkit::replace_with_script(
        &script,
        &format!(
            "#!/bin/sh\n\
             trap 'echo usr1 >> {sigs}' USR1\n\
             trap 'echo usr2 >> {sigs}' USR2\n\
             trap 'echo tstp >> {sigs}' TSTP\n\
             trap 'exit 0' TERM\n\
             fds=$(for f in /proc/$$/fd/*; do readlink $f; done | tr '\\n' ' ')\n\
             echo \"$$|$LISTEN_PID|$LISTEN_FDS|$LISTEN_FDNAMES|$REBORN_MASTER_PID|${{NOTIFY_SOCKET:+set}}|$fds\" > {out}.tmp\n\
             mv {out}.tmp {out}\n\
             while :; do sleep 0.05; done\n",
            sigs = sigs.display(),
            out = out.display()
        ),
    );
    let admin = dir.path().join("admin.sock");
    let master = Master::start(
        dir.path(),
        &[
            "--listen",
            &format!("admin={}", admin.display()),
            "--ready",
            "delay:200ms",
        ],
        &[script.as_os_str()],
    );
    let pid = master.wait_serving();
    let text = wait_for("the worker's environment", PATIENCE, || {
        std::fs::read_to_string(&out).ok()
    });
    let f: Vec<&str> = text.trim().split('|').collect();
    assert_eq!(f[0], pid.to_string(), "{text}");
    assert_eq!(f[1], f[0], "LISTEN_PID is the worker's own PID: {text}");
    assert_eq!(f[2], "2", "{text}");
    assert_eq!(f[3], "http:admin", "{text}");
    assert_eq!(f[4], master.pid().to_string(), "{text}");
    assert_eq!(f[5], "set", "NOTIFY_SOCKET: {text}");
    // Only the two listeners are sockets; nothing of the master's own (control socket,
    // notify sockets, epoll, signal pipes) leaks into the worker.
    let links: Vec<&str> = f[6].split_whitespace().collect();
    let sockets = links.iter().filter(|l| l.starts_with("socket:")).count();
    assert_eq!(sockets, 2, "{text}");
    assert!(
        !links.iter().any(|l| l.starts_with("anon_inode:")),
        "no epoll or eventfd of the master leaks: {text}"
    );

    signal(master.pid(), libc::SIGUSR1);
    wait_for("SIGUSR1 to reach the worker", PATIENCE, || {
        std::fs::read_to_string(&sigs)
            .ok()
            .filter(|s| s.contains("usr1"))
    });
    signal(master.pid(), libc::SIGUSR2);
    wait_for("SIGUSR2 to reach the worker", PATIENCE, || {
        std::fs::read_to_string(&sigs)
            .ok()
            .filter(|s| s.contains("usr2"))
    });
    signal(master.pid(), libc::SIGTSTP);
    wait_for("SIGTSTP to reach the worker", PATIENCE, || {
        std::fs::read_to_string(&sigs)
            .ok()
            .filter(|s| s.contains("tstp"))
    });
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", master.pid())).unwrap();
    let state = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .next()
        .unwrap();
    assert_ne!(
        state, "T",
        "the master handles SIGTSTP instead of being suspended"
    );
    assert!(alive(pid), "the worker survived the forwarded signals");
}

/// SIGTERM to the master: the worker drains (a request in flight is answered), both
/// exit, the port is released, and the PID file is written then removed.
#[test]
fn sigterm_stops_gracefully() {
    let dir = tempdir();
    let bench = bench_server();
    let pid_file = dir.path().join("master.pid");
    let mut master = Master::start_bench(
        dir.path(),
        &["--pid-file", pid_file.to_str().unwrap()],
        &bench,
    );
    let worker = master.wait_serving();
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        master.pid().to_string()
    );
    let addr = master.addr;
    let slow = std::thread::spawn(move || reborn_testkit::get(addr, "/ping?sleep_ms=1000"));
    std::thread::sleep(Duration::from_millis(200));
    signal(master.pid(), libc::SIGTERM);
    let r = slow
        .join()
        .unwrap()
        .expect("the request in flight is answered");
    assert_eq!(r.status, 200);
    assert_eq!(master.proc.wait_exit(PATIENCE), Some(0));
    assert!(!alive(worker));
    assert!(refused(addr), "the port is released");
    assert!(!pid_file.exists(), "the PID file is removed");
    assert!(!master.control.exists(), "the control socket is removed");
}

/// `reborn stop` stops the master and waits until it has exited.
#[test]
fn stop_command_waits_for_the_exit() {
    let dir = tempdir();
    let bench = bench_server();
    let mut master = Master::start_bench(dir.path(), &[], &bench);
    let worker = master.wait_serving();
    let out = master.client("stop", &[]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("has exited"));
    assert!(!alive(worker), "the worker has exited when stop returns");
    assert_eq!(master.proc.wait_exit(PATIENCE), Some(0));
}

/// A server built with the reborn library (the `ping` demo), run under the master,
/// inherits its socket, reports ready, and leaves upgrades to the master: a SIGHUP sent to
/// the worker itself starts nothing.
#[test]
fn library_worker_leaves_upgrades_to_the_master() {
    let dir = tempdir();
    let demo = reborn_testkit::example("reborn", "ping");
    let master = Master::start_bench(dir.path(), &[], &demo);
    let worker = master.wait_serving();
    signal(worker, libc::SIGHUP);
    master
        .proc
        .wait_line("the worker to decline the SIGHUP", |l| {
            l.contains("SIGHUP ignored").then_some(())
        });
    assert!(
        reborn_testkit::children(worker).is_empty(),
        "no child started"
    );
    assert!(alive(worker));
    let status = master.status();
    assert_eq!(status["generation"], 1);
    assert_eq!(status["workers"].as_array().unwrap().len(), 1);
    // It drains on the stop signal and exits with the master.
    let (ok, text) = master.upgrade();
    assert!(ok, "{text}");
    wait_for("the old demo worker to exit", PATIENCE, || {
        (!alive(worker)).then_some(())
    });
}

/// The workers' notify sockets live in one private directory of the master's, made once:
/// each worker's socket goes away with the worker, the directory with the master.
#[test]
fn worker_notify_sockets_share_one_private_directory() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let dir = tempdir();
    let script = dir.path().join("worker.sh");
    let out = dir.path().join("notify.txt");
    reborn_testkit::replace_with_script(
        &script,
        &format!(
            "#!/bin/sh\n\
             trap 'exit 0' TERM\n\
             echo \"$$ $NOTIFY_SOCKET\" > {out}.$$\n\
             mv {out}.$$ {out}\n\
             while :; do sleep 0.05; done\n",
            out = out.display()
        ),
    );
    let mut master = Master::start(
        dir.path(),
        &["--ready", "delay:100ms"],
        &[script.as_os_str()],
    );
    let socket_of = |pid: u32| {
        wait_for("the worker's NOTIFY_SOCKET", PATIENCE, || {
            let text = std::fs::read_to_string(&out).ok()?;
            let (p, socket) = text.trim().split_once(' ')?;
            (p == pid.to_string()).then(|| std::path::PathBuf::from(socket))
        })
    };
    let first = master.wait_serving();
    let s1 = socket_of(first);
    let private = s1.parent().expect("a directory").to_path_buf();
    let mode = std::fs::metadata(&private).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "{}", private.display());
    assert!(
        std::fs::symlink_metadata(&s1)
            .unwrap()
            .file_type()
            .is_socket()
    );

    let (ok, text) = master.upgrade();
    assert!(ok, "{text}");
    let second = wait_for("the new worker", PATIENCE, || {
        master.serving_pid().filter(|p| *p != first)
    });
    let s2 = socket_of(second);
    assert_ne!(s2, s1);
    assert_eq!(s2.parent(), Some(private.as_path()), "the same directory");
    wait_for("the old worker's socket to be removed", PATIENCE, || {
        (!s1.exists()).then_some(())
    });

    let stop = master.client("stop", &[]);
    assert!(stop.status.success(), "{stop:?}");
    assert_eq!(master.proc.wait_exit(PATIENCE), Some(0));
    assert!(!private.exists(), "the directory goes with the master");
}
