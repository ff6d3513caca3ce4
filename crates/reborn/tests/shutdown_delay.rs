//! The shutdown delay and the readiness endpoint: after `SIGTERM` a process with a delay
//! keeps accepting and serving while `/readyz` answers 503, then drains; an in-place
//! upgrade is never delayed and keeps the address ready throughout.

mod common;

use reborn_testkit::{Load, PATIENCE, Proc, alive, signal, wait_for};

fn wait_gone(pid: u32) {
    wait_for(&format!("pid {pid} to exit"), PATIENCE, || {
        (!alive(pid)).then_some(())
    });
}

fn readyz(server: &common::Server) -> (u16, String) {
    let r = server.get("/readyz");
    (r.status, r.body)
}

/// During the delay: `/readyz` says 503 `shutting down`, new connections are still
/// accepted and answered (clients that never retry, on kept and on new connections,
/// fail nothing), and `SIGHUP` does not upgrade a process that was told to stop. A
/// second `SIGTERM` ends the delay: the process drains and exits 0.
#[test]
fn in_the_delay_the_process_serves_and_accepts_reporting_not_ready() {
    let mut server = common::Server::start(&["--shutdown-delay-ms", "120000"]);
    let pid = server.proc.pid();
    assert_eq!(readyz(&server), (200, "ready\n".into()));
    let load = Load::start(server.addr, "/ping", 2, 4);
    load.wait_progress(100);
    signal(pid, libc::SIGTERM);
    wait_for("/readyz to answer 503", PATIENCE, || {
        (readyz(&server) == (503, "shutting down\n".into())).then_some(())
    });
    server.proc.wait_line("the delay's log line", |l| {
        l.contains("SIGTERM: shutting down in").then_some(())
    });
    // Still accepting: fresh connections, one after another.
    load.wait_progress(200);
    for _ in 0..20 {
        let r = server.get("/ping");
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(common::body_pid(&r.body), Some(pid));
    }
    server.deploy_variant("v2");
    signal(pid, libc::SIGHUP);
    server.proc.wait_line("SIGHUP ignored", |l| {
        l.contains("SIGHUP ignored: this process is shutting down")
            .then_some(())
    });
    load.wait_progress(100);
    let report = load.finish_without_failures();
    assert_eq!(server.serving_pid(), Some(pid), "no new generation");
    assert!(
        !server.proc.output().contains("no longer accepting"),
        "the drain started within the delay:\n{}",
        server.proc.output()
    );
    signal(pid, libc::SIGTERM);
    server.proc.wait_line("the drain", |l| {
        l.contains("during the shutdown delay: draining now")
            .then_some(())
    });
    // Far sooner than the 120 s delay.
    assert_eq!(server.proc.wait_exit(PATIENCE), Some(0));
    println!("{report:?}");
}

/// Once the delay is over the process drains by itself, and not before.
#[test]
fn the_drain_starts_when_the_delay_is_over() {
    let mut server = common::Server::start(&["--shutdown-delay-ms", "1000"]);
    let pid = server.proc.pid();
    let sent = std::time::Instant::now();
    signal(pid, libc::SIGTERM);
    server.proc.wait_line("the drain", |l| {
        l.contains("shutting down: no longer accepting; draining")
            .then_some(())
    });
    let waited = sent.elapsed();
    assert!(
        waited >= std::time::Duration::from_millis(1000),
        "drained {waited:?} after SIGTERM"
    );
    assert_eq!(server.proc.wait_exit(PATIENCE), Some(0));
}

/// `SIGHUP` is not delayed, and the address stays ready through an in-place upgrade:
/// `/readyz`, asked continuously on kept and new connections, never says 503, and the
/// old generation is gone without waiting out the delay.
#[test]
fn an_upgrade_is_not_delayed_and_the_address_stays_ready_throughout() {
    let server = common::Server::start(&["--shutdown-delay-ms", "120000", "--probation-ms", "0"]);
    let load = Load::start(server.addr, "/readyz", 2, 2);
    load.wait_progress(50);
    let mut current = server.proc.pid();
    for round in 1..=3 {
        server.deploy_variant(&format!("v{round}"));
        signal(current, libc::SIGHUP);
        let next = server.wait_new_pid(current);
        // Gone long before the 120 s delay would end.
        wait_gone(current);
        load.wait_progress(50);
        current = next;
    }
    let report = load.finish_without_failures();
    assert_eq!(report.bodies, vec!["ready\n".to_owned()], "{report:?}");
    // The last generation still delays its own shutdown; a second SIGTERM ends it.
    signal(current, libc::SIGTERM);
    wait_for("/readyz to answer 503", PATIENCE, || {
        (readyz(&server).0 == 503).then_some(())
    });
    signal(current, libc::SIGTERM);
    wait_gone(current);
}

/// Only SIGTERM and SIGINT start a shutdown: another delayed signal is a clear error.
#[test]
fn a_delay_on_another_signal_is_refused_by_name() {
    let err = reborn::Reborn::builder()
        .shutdown_delay(std::time::Duration::from_secs(1))
        .shutdown_delay_signal(reborn::Signal::Usr1)
        .build()
        .expect_err("SIGUSR1 does not shut down");
    let message = err.to_string();
    assert!(
        message.contains("shutdown_delay_signal(SIGUSR1)") && message.contains("Signal::Term"),
        "{message}"
    );
}

/// A first start answers `/readyz` with 503 `starting` until its readiness check has
/// passed, although it already accepts; then 200. (A balancer must not send traffic to a
/// process whose database is still out of reach.)
#[test]
fn readyz_says_starting_until_the_readiness_check_passes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = reborn_testkit::copy_to(&common::testserver(), dir.path(), "server");
    let go = dir.path().join("go");
    let mut cmd = std::process::Command::new(&bin);
    cmd.args(["--addr", "127.0.0.1:0", "--pid-file"])
        .arg(dir.path().join("pid"))
        .arg("--ready-check-waits-for")
        .arg(&go)
        .current_dir(dir.path());
    let mut proc = Proc::start(cmd);
    let addr: std::net::SocketAddr = proc.wait_line("the listening address", |l| {
        l.strip_prefix("listening on ")?.parse().ok()
    });
    let readyz = || {
        reborn_testkit::get(addr, "/readyz")
            .ok()
            .map(|r| (r.status, r.body))
    };
    // The check waits for the file: meanwhile the process answers, and says starting.
    for _ in 0..5 {
        assert_eq!(
            readyz(),
            Some((503, "starting\n".into())),
            "{}",
            proc.output()
        );
    }
    assert!(
        !common::path_exists(&dir.path().join("pid")),
        "the PID file is written once ready"
    );
    std::fs::write(&go, b"").expect("the check's file");
    wait_for("/readyz to answer 200", PATIENCE, || {
        (readyz() == Some((200, "ready\n".into()))).then_some(())
    });
    signal(proc.pid(), libc::SIGTERM);
    proc.assert_exits_with(0);
}
