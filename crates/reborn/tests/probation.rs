//! Probation: a new version that dies after it reported ready is rolled back by the
//! previous generation, which kept its sockets; the readiness check the application owns;
//! an upgrade from a working directory that has gone.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Server, body_pid, testserver};
use reborn_testkit::{Load, PATIENCE, Proc, alive, children, signal, wait_for};

/// The knob a test server binary carries to abort this long after it is ready.
fn aborting(ms: u64) -> String {
    format!("\nknob:abort-after-ready-ms={ms}\n")
}

#[test]
fn a_new_version_that_dies_after_ready_is_rolled_back_and_the_next_upgrade_works() {
    let mut server = Server::start(&["--probation-ms", "3000", "--idle-grace-ms", "200"]);
    let old = server.proc.pid();
    let load = Load::start(server.addr, "/ping", 4, 4);
    load.wait_progress(50);

    server.deploy_variant(&aborting(200));
    signal(old, libc::SIGHUP);
    // The new process, as the old one started it: it lives 200 ms after its readiness
    // check, too short to count on finding it in the PID file or answering.
    let bad = wait_for("the new process", PATIENCE, || {
        children(old).first().copied()
    });
    server.proc.wait_line("the rollback", |l| {
        l.contains("rolled back").then(|| l.to_owned())
    });
    let line = server.proc.output();
    assert!(
        line.contains(&format!("pid {bad} (the new version) died"))
            && line.contains("SIGABRT")
            && line.contains(&format!("rolled back, pid {old} serves again")),
        "the reason is logged: {line}"
    );
    server.wait_serving_pid(old);
    server.wait_answered_by(old);
    load.wait_progress(200);
    assert!(!alive(bad), "the bad version is gone");

    // A good version after that is upgraded to as usual, and sticks.
    server.deploy_variant("good");
    signal(old, libc::SIGHUP);
    let good = server.wait_new_pid(old);
    load.wait_progress(100);
    wait_for(
        "the previous generation to exit after its probation",
        PATIENCE,
        || (!alive(old)).then_some(()),
    );
    load.wait_progress(100);
    let report = load.finish();
    assert_eq!(report.refused, 0, "nothing refused: {:?}", report.errors);
    // Only requests in flight on the process that crashed may fail: one per client.
    assert!(
        report.failed <= 8,
        "{} failed (at most one per client, on the crashed process): {:?}",
        report.failed,
        report.errors
    );
    assert_eq!(server.serving_pid(), Some(good));
    server.stop_current();
}

#[test]
fn with_probation_off_the_previous_generation_exits_as_before() {
    let mut server = Server::start(&["--probation-ms", "0", "--idle-grace-ms", "100"]);
    let old = server.proc.pid();
    server.deploy_variant(&aborting(300));
    signal(old, libc::SIGHUP);
    // The PID file names the new process once the old one has committed; not asked for
    // an answer, as it lives only 300 ms after its readiness check.
    let bad = server.wait_pid_file_moves_from(old);
    assert_eq!(
        server.proc.wait_exit(PATIENCE),
        Some(0),
        "the old process exits"
    );
    assert!(
        !server.proc.output().contains("rolled back"),
        "no probation, no rollback"
    );
    wait_for("the bad version to die", PATIENCE, || {
        (!alive(bad)).then_some(())
    });
    // Nobody serves now: this is what probation prevents.
    assert!(reborn_testkit::get(server.addr, "/ping").is_err());
}

#[test]
fn sigterm_to_the_previous_generation_ends_its_probation() {
    let mut server = Server::start(&["--probation-ms", "20000", "--idle-grace-ms", "100"]);
    let old = server.proc.pid();
    server.deploy_variant("v2");
    signal(old, libc::SIGHUP);
    let new = server.wait_new_pid(old);
    server.proc.wait_line("the probation", |l| {
        l.contains("on probation").then_some(())
    });
    signal(old, libc::SIGTERM);
    assert_eq!(
        server.proc.wait_exit(PATIENCE),
        Some(0),
        "the old process exits without waiting out 20 s"
    );
    assert_eq!(body_pid(&server.get("/ping").body), Some(new));
    server.stop_current();
}

/// A new generation told to stop right after its commit shuts down on purpose: the
/// previous generation, on probation, ends its wait and exits too, and does not take its
/// exit for a crash (which would roll back, and leave the stopped service serving). Here
/// the previous generation's runtime threads are busy while the new one stops, so that it
/// sees the exit and the `STOPPING=1` sent before it at the same time.
#[test]
fn a_successor_stopped_right_after_its_commit_is_not_rolled_back() {
    let (mut server, old, new, mut conns) = upgraded_on_probation(20_000);
    block_both_runtime_threads(&server, &mut conns);
    signal(new, libc::SIGTERM);
    wait_for("the new generation to exit", PATIENCE, || {
        (!alive(new)).then_some(())
    });
    drop(conns);
    let gone = reborn_testkit::poll_until(PATIENCE, || (!alive(old)).then_some(()));
    assert!(
        gone.is_some() && !server.proc.output().contains("rolled back"),
        "the previous generation exits without waiting out 20 s, and rolls nothing back:\n{}",
        server.proc.output()
    );
    assert_eq!(server.proc.wait_exit(PATIENCE), Some(0));
}

/// A test server upgraded to `v2`, its new generation on a probation of
/// `probation_ms`: the server, the previous generation's PID and the new one's, and two
/// connections kept by the previous generation (see [`busy_connections`]).
fn upgraded_on_probation(probation_ms: u64) -> (Server, u32, u32, Vec<std::net::TcpStream>) {
    let probation = probation_ms.to_string();
    let server = Server::start(&["--probation-ms", &probation, "--idle-grace-ms", "100"]);
    let old = server.proc.pid();
    let conns = busy_connections(&server);
    server.deploy_variant("v2");
    signal(old, libc::SIGHUP);
    let new = server.wait_pid_file_moves_from(old);
    server.proc.wait_line("the probation", |l| {
        l.contains("on probation").then_some(())
    });
    (server, old, new, conns)
}

/// Two connections to the current generation, on which it can be kept busy.
fn busy_connections(server: &Server) -> Vec<std::net::TcpStream> {
    let pid = server.proc.pid();
    (0..2)
        .map(|_| {
            let mut c = std::net::TcpStream::connect(server.addr).expect("connect");
            c.set_read_timeout(Some(PATIENCE)).unwrap();
            assert_eq!(body_pid(&common::ping_on(&mut c).expect("ping")), Some(pid));
            c
        })
        .collect()
}

/// Blocks both runtime threads of the test server (it has two) for 1.5 s, one request on
/// each of `conns`, and waits until both are blocked.
fn block_both_runtime_threads(server: &Server, conns: &mut [std::net::TcpStream]) {
    use std::io::Write;
    for c in conns.iter_mut() {
        c.write_all(b"GET /block?ms=1500 HTTP/1.1\r\nHost: test\r\n\r\n")
            .unwrap();
    }
    wait_for("both runtime threads to block", PATIENCE, || {
        (server
            .proc
            .output()
            .matches("blocking a runtime thread")
            .count()
            >= 2)
            .then_some(())
    });
}

/// A stop signal that comes as the new generation dies on probation is not undone by a
/// rollback: the previous generation exits, whichever of the two it sees first. Both
/// happen here while its runtime threads are busy, so that it sees them together. (The
/// narrowest order, the death seen and the stop handled before the rollback, is the
/// unit test `probation::tests::a_stop_before_the_rollback_leaves_nothing_to_resume`.)
#[test]
fn a_stop_that_comes_as_the_new_generation_dies_is_not_lost() {
    let (mut server, old, new, mut conns) = upgraded_on_probation(20_000);
    block_both_runtime_threads(&server, &mut conns);
    signal(new, libc::SIGKILL);
    wait_for("the new generation to die", PATIENCE, || {
        (!alive(new)).then_some(())
    });
    signal(old, libc::SIGTERM);
    drop(conns);
    let gone = reborn_testkit::poll_until(PATIENCE, || (!alive(old)).then_some(()));
    assert!(
        gone.is_some(),
        "the previous generation exits, as told:\n{}",
        server.proc.output()
    );
    assert_eq!(server.proc.wait_exit(PATIENCE), Some(0));
}

/// `Reborn::shutdown` while the next generation is on probation ends the probation, as
/// `SIGTERM` does: the process exits once drained instead of waiting the probation out,
/// and the new generation, not rolled back, serves on.
#[test]
fn reborn_shutdown_on_probation_ends_the_probation() {
    let probation = Duration::from_secs(60);
    let (mut server, old, new, mut conns) = upgraded_on_probation(60_000);
    // A kept connection is still the previous generation's, on probation.
    let answer = common::get_on(&mut conns[0], "/shutdown").expect("an answer");
    assert!(answer.contains("shutting down"), "{answer}");
    drop(conns);
    let gone = reborn_testkit::poll_until(probation / 3, || (!alive(old)).then_some(()));
    assert!(
        gone.is_some(),
        "the previous generation exits without waiting out its probation:\n{}",
        server.proc.output()
    );
    assert!(alive(new));
    assert!(!server.proc.output().contains("rolled back"));
    assert_eq!(body_pid(&server.get("/ping").body), Some(new));
    server.stop_current();
}

#[test]
fn a_failing_readiness_check_rolls_the_upgrade_back_with_its_message() {
    let mut server = Server::start(&[]);
    let old = server.proc.pid();
    server.deploy_variant("\nknob:fail-ready-check=the database at db:5432 does not answer\n");
    signal(old, libc::SIGHUP);
    let line = server.proc.wait_line("the failed upgrade", |l| {
        l.contains("upgrade failed").then(|| l.to_owned())
    });
    assert!(
        line.contains("failed its readiness check: the database at db:5432 does not answer"),
        "{line}"
    );
    // Until it has gone, the unhealthy process may still answer a connection it took
    // from the shared queue before its check failed.
    wait_for("the unhealthy process to be gone", PATIENCE, || {
        children(old).is_empty().then_some(())
    });
    assert_eq!(body_pid(&server.get("/ping").body), Some(old));
    assert_eq!(server.serving_pid(), Some(old));
    server.stop_current();
}

#[test]
fn a_failing_readiness_check_on_a_first_start_stops_the_process_with_its_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = reborn_testkit::copy_to(&testserver(), dir.path(), "server");
    reborn_testkit::replace_with_variant(
        &bin,
        &testserver(),
        b"\nknob:fail-ready-check=no config\n",
    );
    let mut cmd = Command::new(&bin);
    cmd.args(["--addr", "127.0.0.1:0"]);
    let mut proc = Proc::start(cmd);
    assert_eq!(proc.wait_exit(PATIENCE), Some(1), "{}", proc.output());
    // Written just before the exit: the reader may not have it yet.
    proc.wait_line("the check's message", |l| {
        l.contains("the readiness check failed: no config")
            .then_some(())
    });
}

#[test]
fn an_upgrade_works_after_the_working_directory_was_removed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = reborn_testkit::copy_to(&testserver(), dir.path(), "server");
    let release = dir.path().join("release-1");
    std::fs::create_dir(&release).expect("mkdir");
    let pid_file = dir.path().join("pid");
    let mut cmd = Command::new(&bin);
    cmd.args(["--addr", "127.0.0.1:0", "--pid-file"])
        .arg(&pid_file)
        .current_dir(&release);
    let mut proc = Proc::start(cmd);
    let addr: std::net::SocketAddr = proc.wait_line("the listening address", |l| {
        l.strip_prefix("listening on ")?.parse().ok()
    });
    let old = proc.pid();
    let serving =
        || -> Option<u32> { std::fs::read_to_string(&pid_file).ok()?.trim().parse().ok() };
    wait_for("the first generation to serve", PATIENCE, || {
        (serving() == Some(old)).then_some(())
    });

    // The deploy prunes the old release directory, then upgrades.
    std::fs::remove_dir(&release).expect("rmdir");
    reborn_testkit::replace_with_variant(&bin, &testserver(), b"v2");
    signal(old, libc::SIGHUP);
    let new = wait_for("a new generation", PATIENCE, || {
        serving().filter(|p| *p != old)
    });
    wait_for("an answer from the new generation", PATIENCE, || {
        reborn_testkit::get(addr, "/ping")
            .ok()
            .and_then(|r| body_pid(&r.body))
            .filter(|p| *p == new)
    });
    assert!(
        !proc.output().contains("is gone"),
        "never 'the binary is gone': {}",
        proc.output()
    );
    signal(new, libc::SIGTERM);
    wait_for("the new generation to exit", PATIENCE, || {
        (!alive(new)).then_some(())
    });
    let _ = proc.wait_exit(Duration::from_secs(10));
}
