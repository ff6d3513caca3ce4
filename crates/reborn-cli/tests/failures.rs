//! Every failure path of the master, with real processes: a new worker that crashes,
//! hangs or is missing (the old one keeps serving); an old worker that ignores its stop
//! signal (killed at the deadline); a worker that crashes on its own (restarted with
//! back-off, never spinning); a master killed with SIGKILL (its workers die with it and
//! the port frees); orphans reaped; and a control socket that refuses another user.

mod common;

use std::ffi::OsStr;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Master, bench_server, ping, reborn, refused, start_app, tempdir};
use reborn_testkit::Load;
use reborn_testkit::{PATIENCE, alive, copy_to, replace_with_script, signal, wait_for};

/// A new worker that exits before it is ready: the upgrade fails with the reason, the
/// old worker keeps serving, and no request fails meanwhile.
#[test]
fn new_worker_crashes_old_keeps_serving() {
    let dir = tempdir();
    let (master, app) = start_app(dir.path(), &[]);
    let (_, old_pid) = ping(master.addr);
    let load = Load::start(master.addr, "/ping", 2, 1);
    load.wait_progress(20);
    replace_with_script(
        &app,
        "#!/bin/sh\necho 'new version: bad config' >&2\nexit 3\n",
    );
    let (ok, text) = master.upgrade();
    assert!(!ok, "the upgrade must fail: {text}");
    assert!(
        text.contains("exited with status 3 before it was ready"),
        "{text}"
    );
    assert!(
        text.contains(&format!("(pid {old_pid}) keeps serving")),
        "{text}"
    );
    load.wait_progress(20);
    assert_eq!(ping(master.addr).1, old_pid);
    let status = master.status();
    assert_eq!(status["last_upgrade"]["ok"], false);
    assert_eq!(status["generation"], 1);
    assert_eq!(status["crashes"], 0, "a failed upgrade is not a crash");
    load.finish_without_failures();
}

/// A new worker that never becomes ready: stopped at the readiness deadline, the old one
/// keeps serving; a second upgrade while the first is in flight is refused.
#[test]
fn new_worker_hangs_is_stopped_at_the_deadline() {
    let dir = tempdir();
    let (master, app) = start_app(dir.path(), &["--ready-timeout", "2s"]);
    let (_, old_pid) = ping(master.addr);
    replace_with_script(&app, "#!/bin/sh\nexec sleep 600\n");
    let first = std::thread::spawn({
        let reborn = reborn();
        let control = master.control.clone();
        move || {
            Command::new(reborn)
                .args(["upgrade", "--control"])
                .arg(control)
                .output()
                .unwrap()
        }
    });
    let hung = wait_for("the upgrade to start", PATIENCE, || {
        let s = master.status();
        (s["state"] == "upgrading")
            .then(|| {
                s["workers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|w| w["role"] == "starting")
                    .and_then(|w| w["pid"].as_u64())
            })
            .flatten()
    });
    let (ok, text) = master.upgrade();
    assert!(!ok && text.contains("already in progress"), "{text}");
    let started = Instant::now();
    let out = first.join().unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(text.contains("was not ready within 2.0s"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(20));
    wait_for("the hung worker to be stopped", PATIENCE, || {
        (!alive(hung as u32)).then_some(())
    });
    assert_eq!(ping(master.addr).1, old_pid);
    assert_eq!(master.status()["generation"], 1);
}

/// The program is gone from disk: the upgrade fails at once and says so.
#[test]
fn missing_program_fails_the_upgrade() {
    let dir = tempdir();
    let (master, app) = start_app(dir.path(), &[]);
    let (_, old_pid) = ping(master.addr);
    std::fs::remove_file(&app).unwrap();
    let (ok, text) = master.upgrade();
    assert!(!ok);
    assert!(
        text.contains(&format!("{} is missing", app.display())),
        "{text}"
    );
    assert!(text.contains("keeps serving"), "{text}");
    assert_eq!(ping(master.addr).1, old_pid);
}

/// A program still open for writing when the master starts it ("Text file busy": a
/// deploy still copying it) is started once the writer lets go, as a self-upgrade does:
/// the master tries again for up to a second instead of giving up.
#[test]
fn a_program_still_being_written_is_started_once_the_writer_is_done() {
    let dir = tempdir();
    let app = copy_to(&bench_server(), dir.path(), "app");
    let writer = std::fs::OpenOptions::new()
        .write(true)
        .open(&app)
        .expect("open the program for writing");
    let master = Master::start_bench(dir.path(), &[], &app);
    master
        .proc
        .wait_line("the master to find the program busy", |l| {
            l.contains("the program is busy").then_some(())
        });
    drop(writer);
    let pid = master.wait_serving();
    assert_eq!(ping(master.addr).1, pid);
}

/// An old worker that ignores its stop signal is killed at the drain deadline.
#[test]
fn old_worker_ignoring_stop_is_killed_at_the_deadline() {
    let dir = tempdir();
    let script = dir.path().join("stubborn.sh");
    replace_with_script(
        &script,
        "#!/bin/sh\ntrap '' TERM\nwhile :; do sleep 0.1; done\n",
    );
    let master = Master::start(
        dir.path(),
        // No probation: `reborn upgrade` returns at the commit, when the clock starts.
        &[
            "--ready",
            "delay:200ms",
            "--drain-timeout",
            "1500ms",
            "--probation",
            "0",
        ],
        &[script.as_os_str()],
    );
    let old = master.wait_serving();
    // Before the upgrade, so before the commit that starts the deadline's clock: a
    // lower bound for the kill that no slow reply can shorten.
    let asked = Instant::now();
    let (ok, text) = master.upgrade();
    assert!(ok, "{text}");
    std::thread::sleep(Duration::from_millis(500));
    assert!(alive(old), "it ignores SIGTERM");
    wait_for("the stubborn worker to be killed", PATIENCE, || {
        (!alive(old)).then_some(())
    });
    assert!(
        asked.elapsed() >= Duration::from_millis(1500),
        "killed at the deadline, not before"
    );
    master.proc.wait_line("the kill at the deadline", |l| {
        l.contains("did not exit within the drain timeout")
            .then_some(())
    });
}

/// A worker that crashes on its own is restarted; one that keeps crashing is retried at
/// the back-off ceiling, said to keep crashing, never spun; once fixed it serves again.
#[test]
fn crashing_worker_is_restarted_with_backoff() {
    let dir = tempdir();
    let (master, app) = start_app(dir.path(), &["--backoff-max", "400ms"]);
    let first = master.wait_serving();
    signal(first, libc::SIGKILL);
    let second = wait_for("a restarted worker", PATIENCE, || {
        master.serving_pid().filter(|p| *p != first)
    });
    assert_eq!(ping(master.addr).1, second);
    assert_eq!(master.status()["crashes"], 1);

    replace_with_script(&app, "#!/bin/sh\nexit 1\n");
    signal(second, libc::SIGKILL);
    master.proc.wait_line("the crash-loop warning", |l| {
        l.contains("keeps crashing").then_some(())
    });
    let before = master.status()["crashes"].as_u64().unwrap();
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let after = master.status()["crashes"].as_u64().unwrap();
    let rate_bound = (t.elapsed().as_secs_f64() / 0.4).ceil() as u64 + 1;
    assert!(
        after - before <= rate_bound,
        "{} restarts in {:?}: the master spins",
        after - before,
        t.elapsed()
    );
    assert!(after > before, "it keeps trying");
    assert_eq!(master.status()["state"], "restarting");

    copy_to(&bench_server(), dir.path(), "app.fixed");
    std::fs::rename(dir.path().join("app.fixed"), &app).unwrap();
    let third = master.wait_serving();
    assert_eq!(ping(master.addr).1, third);
}

/// SIGKILL to the master: its workers die with it (parent-death signal), the port frees,
/// and a new master starts cleanly on the same port.
#[test]
fn killed_master_takes_its_workers_along() {
    let dir = tempdir();
    let (mut master, _app) = start_app(dir.path(), &[]);
    let worker = master.wait_serving();
    let addr = master.addr;
    signal(master.pid(), libc::SIGKILL);
    master.proc.wait_exit(PATIENCE);
    wait_for("the worker to die with the master", PATIENCE, || {
        (!alive(worker)).then_some(())
    });
    wait_for("the port to free", PATIENCE, || refused(addr).then_some(()));

    let dir2 = tempdir();
    let bench = bench_server();
    let again = Master::start_on(
        dir2.path(),
        &addr.to_string(),
        &[],
        &[
            bench.as_os_str(),
            OsStr::new("--addr"),
            OsStr::new("127.0.0.1:0"),
        ],
    );
    assert_eq!(again.addr, addr);
    let pid = again.wait_serving();
    assert_eq!(ping(addr).1, pid);
}

/// Orphans that a worker leaves behind are reparented to the master and reaped: no
/// zombie piles up.
///
/// Each orphan writes its PID and lives 3 s, long enough for a loaded machine to see
/// it as the master's child; once it exits, it must vanish from /proc (a zombie would
/// stay there until its parent reaps it).
#[test]
fn orphans_are_reaped() {
    let dir = tempdir();
    let script = dir.path().join("spawner.sh");
    let pids = dir.path().join("orphans");
    replace_with_script(
        &script,
        &format!(
            "#!/bin/sh\nfor i in 1 2 3 4 5; do (sleep 3 & echo $! >> '{}') ; done\n\
             while :; do sleep 0.1; done\n",
            pids.display()
        ),
    );
    let master = Master::start(
        dir.path(),
        &["--ready", "delay:100ms"],
        &[script.as_os_str()],
    );
    master.wait_serving();
    let orphans: Vec<u32> = wait_for("the worker to start its orphans", PATIENCE, || {
        let text = std::fs::read_to_string(&pids).ok()?;
        let list: Vec<u32> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
        (list.len() == 5).then_some(list)
    });
    wait_for("an orphan to become the master's child", PATIENCE, || {
        let kids = all_children(master.pid());
        orphans
            .iter()
            .any(|o| kids.iter().any(|(p, _)| p == o))
            .then_some(())
    });
    wait_for("the orphans to be reaped", PATIENCE, || {
        let left: Vec<&u32> = orphans
            .iter()
            .filter(|o| Path::new(&format!("/proc/{o}")).exists())
            .collect();
        left.is_empty().then_some(())
    });
    let zombies = all_children(master.pid())
        .iter()
        .filter(|(_, z)| *z)
        .count();
    assert_eq!(zombies, 0, "the master left zombies");
}

/// The children of `pid`, zombies included: (pid, is a zombie).
fn all_children(pid: u32) -> Vec<(u32, bool)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let text = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        for p in text
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
        {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            let zombie = stat
                .rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'));
            out.push((p, zombie));
        }
    }
    out
}

/// The control socket obeys only the master's user and root: another user is stopped
/// by the socket's mode (0600), and, if someone loosens the mode, by the peer-credential
/// check.
#[test]
fn control_socket_refuses_another_user() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: this test runs the client as `nobody`, which needs root");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = tempdir();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (master, _app) = start_app(dir.path(), &[]);
    let mode = std::fs::metadata(&master.control)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let as_nobody = |sub: &str| {
        // The binary must be reachable by nobody: copy it into the open directory.
        let client = dir.path().join("reborn-client");
        if !client.exists() {
            std::fs::copy(reborn(), &client).unwrap();
        }
        // A just-copied binary may still be open for writing in a process another test
        // is forking at this moment ("text file busy"): try again briefly.
        let mut tries = 0;
        loop {
            match Command::new(&client)
                .args([sub, "--control"])
                .arg(&master.control)
                .uid(65534)
                .gid(65534)
                .output()
            {
                Err(e) if reborn::spawn::is_busy(&e) && tries < 50 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => break other.unwrap(),
            }
        }
    };
    let out = as_nobody("stop");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("Permission denied"), "{err}");

    std::fs::set_permissions(&master.control, std::fs::Permissions::from_mode(0o666)).unwrap();
    for sub in ["stop", "upgrade", "status"] {
        let out = as_nobody(sub);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{sub}");
        assert!(
            err.contains("refused: this master runs as uid 0") && err.contains("uid 65534"),
            "{err}"
        );
    }
    assert_eq!(master.status()["state"], "serving", "nothing was obeyed");
    assert_eq!(master.status()["generation"], 1);
}

/// A new program that cannot be executed (exec fails: not a binary, no `#!`): the
/// upgrade fails with the system's reason, the spawning thread survives (the reaper
/// leaves the failed child to it), and a later upgrade to a good binary works.
#[test]
fn unexecutable_program_fails_the_upgrade() {
    let dir = tempdir();
    let (master, app) = start_app(dir.path(), &[]);
    let (_, old_pid) = ping(master.addr);
    replace_with_script(&app, "this is not a program\n");
    let (ok, text) = master.upgrade();
    assert!(!ok);
    assert!(text.contains("could not be started"), "{text}");
    assert!(text.contains("keeps serving"), "{text}");
    assert_eq!(ping(master.addr).1, old_pid);

    copy_to(&bench_server(), dir.path(), "app.good");
    std::fs::rename(dir.path().join("app.good"), &app).unwrap();
    let (ok, text) = master.upgrade();
    assert!(ok, "{text}\n{}", master.proc.output());
    wait_for("the good binary to serve", PATIENCE, || {
        (ping(master.addr).1 != old_pid).then_some(())
    });
}

/// SIGTERM stops gracefully; a second SIGTERM while a worker still drains kills it at
/// once, and the master exits.
#[test]
fn second_sigterm_kills_a_draining_worker() {
    let dir = tempdir();
    let script = dir.path().join("stubborn.sh");
    replace_with_script(
        &script,
        "#!/bin/sh\ntrap '' TERM\nwhile :; do sleep 0.1; done\n",
    );
    let mut master = Master::start(
        dir.path(),
        &["--ready", "delay:100ms", "--drain-timeout", "10m"],
        &[script.as_os_str()],
    );
    let worker = master.wait_serving();
    signal(master.pid(), libc::SIGTERM);
    master.proc.wait_line("the graceful stop", |l| {
        l.contains("stopping a worker").then_some(())
    });
    assert!(alive(worker), "it ignores SIGTERM and the deadline is far");
    signal(master.pid(), libc::SIGTERM);
    assert_eq!(master.proc.wait_exit(PATIENCE), Some(0));
    assert!(!alive(worker));
}
