//! Self-upgrade end to end: real processes, real sockets, real signals, and a binary
//! replaced on disk.

mod common;

use std::time::Duration;

use common::{Server, body_digest, body_pid};
use reborn_testkit::{Load, PATIENCE, alive, children, fd_count, signal, wait_for};

/// The README's walkthrough: a slow request started before `SIGHUP` gets the old answer,
/// the next one the new, the old process exits, and nothing fails meanwhile.
#[test]
fn sighup_runs_the_binary_now_on_disk() {
    let mut server = Server::start(&[]);
    let old_pid = server.proc.pid();
    let before = server.get("/ping");
    let old_digest = body_digest(&before.body).unwrap().to_owned();
    assert_eq!(body_pid(&before.body), Some(old_pid));

    let load = Load::start(server.addr, "/ping", 2, 2);
    let addr = server.addr;
    let slow = std::thread::spawn(move || reborn_testkit::get(addr, "/ping?sleep_ms=2000"));
    server.proc.wait_line("the slow request", |l| {
        l.starts_with("slow request started").then_some(())
    });

    server.deploy_variant("new version");
    signal(old_pid, libc::SIGHUP);
    let new_pid = server.wait_new_pid(old_pid);

    let after = server.get("/ping");
    assert_eq!(body_pid(&after.body), Some(new_pid), "{}", after.body);
    assert_ne!(
        body_digest(&after.body),
        Some(old_digest.as_str()),
        "the new binary answers"
    );

    let slow = slow.join().unwrap().expect("the slow request is answered");
    assert_eq!(slow.status, 200);
    assert_eq!(
        body_pid(&slow.body),
        Some(old_pid),
        "the old process answers its own request"
    );
    assert_eq!(body_digest(&slow.body), Some(old_digest.as_str()));

    let code = server.proc.wait_exit(PATIENCE);
    assert_eq!(
        code,
        Some(0),
        "the old process exits cleanly:\n{}",
        server.proc.output()
    );
    let report = load.finish();
    assert_eq!(report.failed, 0, "failed requests: {:?}", report.errors);
    assert!(report.ok > 0);
    assert!(alive(new_pid));
    server.stop_current();
}

/// 20 upgrades in a row under continuous load from keep-alive and new-connection clients
/// that never retry: every request is counted and none fails; the serving process does
/// not accumulate file descriptors.
#[test]
fn twenty_upgrades_under_load_lose_nothing() {
    let mut server = Server::start(&["--idle-grace-ms", "300"]);
    let mut pid = server.proc.pid();
    let mut previous = Vec::new();
    // Measured idle, before and after: connections come and go with the load.
    let first_fds = fd_count(pid);
    let load = Load::start(server.addr, "/ping", 4, 4);
    for i in 0..20 {
        previous.push(pid);
        let before = load.snapshot().ok;
        wait_for("requests between upgrades", PATIENCE, || {
            (load.snapshot().ok > before + 20).then_some(())
        });
        server.deploy_variant(&format!("v{i}"));
        signal(pid, libc::SIGHUP);
        pid = server.wait_new_pid(pid);
    }
    let before = load.snapshot().ok;
    wait_for("requests after the last upgrade", PATIENCE, || {
        (load.snapshot().ok > before + 20).then_some(())
    });
    let report = load.finish();
    assert_eq!(
        report.failed, 0,
        "{} failed: {:?}",
        report.failed, report.errors
    );
    // Each generation's probation ends when its successor hands over in turn; the last
    // one's ends with its window (3 s by default), then its drain.
    wait_for("every previous generation to be gone", PATIENCE, || {
        previous.iter().all(|p| !alive(*p)).then_some(())
    });
    assert!(
        report.bodies.len() >= 21,
        "every generation answered: {:?}",
        report.bodies.len()
    );
    // Once the clients are gone, the 21st generation holds what the first did: its own
    // descriptors (listeners, runtime, notify sockets) do not pile up across generations.
    let deadline = std::time::Instant::now() + PATIENCE;
    let mut last_fds = fd_count(pid);
    while last_fds > first_fds + 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        last_fds = fd_count(pid);
    }
    assert!(
        last_fds <= first_fds + 1,
        "fds grew from {first_fds} to {last_fds} across 20 generations"
    );
    server.stop_current();
}

/// Each way a new binary can fail leaves the old process serving, and alone.
fn assert_rolls_back(server: &Server, expect_in_log: &str) {
    let old = server.proc.pid();
    signal(old, libc::SIGHUP);
    server.proc.wait_line(expect_in_log, |l| {
        (l.contains("upgrade failed") && l.contains(expect_in_log)).then_some(())
    });
    // A new process that had started serving (side by side, before its ready) is told
    // to stop at the failure, and may answer until it has seen that: only once it has
    // gone is the old process alone.
    wait_for("the failed process to be gone", PATIENCE, || {
        children(old).is_empty().then_some(())
    });
    let resp = server.get("/ping");
    assert_eq!(
        body_pid(&resp.body),
        Some(old),
        "the old process keeps serving"
    );
    assert_eq!(server.serving_pid(), Some(old));
    assert!(alive(old));
}

#[test]
fn rollback_when_the_new_binary_exits_at_once() {
    let server = Server::start(&[]);
    reborn_testkit::replace_with_script(
        &server.bin,
        "#!/bin/sh\necho 'broken build' >&2\nexit 3\n",
    );
    assert_rolls_back(&server, "exited with status 3");
}

#[test]
fn rollback_when_the_new_binary_never_gets_ready() {
    let server = Server::start(&["--ready-timeout-ms", "1000"]);
    reborn_testkit::replace_with_script(&server.bin, "#!/bin/sh\nexec sleep 600\n");
    assert_rolls_back(&server, "was not ready within");
}

#[test]
fn rollback_when_a_reborn_binary_is_too_slow_to_get_ready() {
    // A real reborn server that reports ready only after 10 s, with a 1 s deadline.
    let server = Server::start(&["--ready-timeout-ms", "1000", "--ready-delay-ms", "10000"]);
    // The running process was started with --ready-delay-ms too, but reported ready in
    // its own time; only the successor's deadline matters here.
    server.deploy_variant("slow");
    assert_rolls_back(&server, "was not ready within");
}

#[test]
fn rollback_when_the_binary_is_missing() {
    let server = Server::start(&[]);
    std::fs::remove_file(&server.bin).unwrap();
    assert_rolls_back(&server, "is gone");
}

/// With no logging set up (the README's one-liner), a failed upgrade still says why, on
/// stderr, once; with a subscriber, it says so there and only there.
#[test]
fn a_failed_upgrade_is_reported_on_stderr_once_with_or_without_a_subscriber() {
    for subscriber in [false, true] {
        let env: &[(&str, &str)] = if subscriber {
            &[]
        } else {
            &[("TESTSERVER_NO_SUBSCRIBER", "1")]
        };
        let mut server = Server::start_env(env, &[]);
        let old = server.proc.pid();
        std::fs::remove_file(&server.bin).unwrap();
        signal(old, libc::SIGHUP);
        let line = server.proc.wait_line("the failed upgrade", |l| {
            l.contains("upgrade failed").then(|| l.to_owned())
        });
        // The report is complete once the process serves again; give a second copy, if
        // any, the time a request takes to come.
        assert_eq!(body_pid(&server.get("/whoami").body), Some(old));
        let output = server.proc.output();
        let reports = output
            .lines()
            .filter(|l| l.contains("upgrade failed"))
            .count();
        assert_eq!(reports, 1, "one report of the failure:\n{output}");
        if subscriber {
            assert!(
                line.contains("ERROR") && !line.starts_with("reborn: "),
                "{line}"
            );
        } else {
            assert!(
                line.starts_with("reborn: error: upgrade failed: "),
                "{line}"
            );
            assert!(line.contains("is gone"), "it says why: {line}");
        }
        server.stop_current();
    }
}

#[test]
fn rollback_when_the_binary_is_not_executable() {
    use std::os::unix::fs::PermissionsExt;
    let server = Server::start(&[]);
    std::fs::set_permissions(&server.bin, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert_rolls_back(&server, "is not executable");
}

/// A second SIGHUP while an upgrade is under way is reported, not stacked; the upgrade
/// after it works.
#[test]
fn sighup_during_an_upgrade_is_reported_not_queued() {
    let server = Server::start(&["--ready-timeout-ms", "20000"]);
    let old = server.proc.pid();
    reborn_testkit::replace_with_script(&server.bin, "#!/bin/sh\nexec sleep 5\n");
    signal(old, libc::SIGHUP);
    wait_for("the new process to start", PATIENCE, || {
        (!children(old).is_empty()).then_some(())
    });
    signal(old, libc::SIGHUP);
    server.proc.wait_line("the refusal", |l| {
        l.contains("already in progress").then_some(())
    });
    server.proc.wait_line("the rollback", |l| {
        (l.contains("upgrade failed") && l.contains("exited")).then_some(())
    });
    server.deploy_variant("good");
    signal(old, libc::SIGHUP);
    let new = server.wait_new_pid(old);
    assert_eq!(body_pid(&server.get("/ping").body), Some(new));
}

#[test]
fn an_upgrade_can_follow_while_the_old_generation_still_drains() {
    let mut server = Server::start(&[]);
    let first = server.proc.pid();
    let addr = server.addr;
    // Long enough to outlast two upgrades on a loaded machine.
    let slow = std::thread::spawn(move || reborn_testkit::get(addr, "/ping?sleep_ms=8000"));
    server.proc.wait_line("the slow request", |l| {
        l.starts_with("slow request started").then_some(())
    });
    signal(first, libc::SIGHUP);
    let second = server.wait_new_pid(first);
    signal(second, libc::SIGHUP);
    let third = server.wait_new_pid(second);
    assert!(
        alive(first),
        "the first generation still drains its slow request"
    );
    assert_eq!(body_pid(&server.get("/ping").body), Some(third));
    let slow = slow.join().unwrap().expect("the slow request is answered");
    assert_eq!(body_pid(&slow.body), Some(first));
    assert_eq!(server.proc.wait_exit(Duration::from_secs(30)), Some(0));
    server.stop_current();
}

/// A shutdown while the new process is starting: the new process is stopped too, and
/// nothing is left serving.
#[test]
fn sigterm_during_an_upgrade_stops_the_new_process_too() {
    let mut server = Server::start(&["--ready-timeout-ms", "60000"]);
    let old = server.proc.pid();
    reborn_testkit::replace_with_script(&server.bin, "#!/bin/sh\nexec sleep 600\n");
    signal(old, libc::SIGHUP);
    let new = wait_for("the new process to start", PATIENCE, || {
        children(old).first().copied()
    });
    signal(old, libc::SIGTERM);
    assert_eq!(server.proc.wait_exit(PATIENCE), Some(0));
    wait_for("the new process to be stopped", PATIENCE, || {
        (!alive(new)).then_some(())
    });
}
