//! actix-web on reborn's raw listener (the `actix` example): upgraded three times under
//! new-connection load with a slow request in flight each time.

use std::process::Command;

use reborn_testkit::{Load, PATIENCE, Proc, alive, signal, wait_for};

fn pid_of(body: &str) -> Option<u32> {
    body.rsplit_once("pid=")?.1.trim().parse().ok()
}

/// The PID that answers `GET /` on a new connection, if any does.
fn answering(addr: std::net::SocketAddr) -> Option<u32> {
    pid_of(&reborn_testkit::get(addr, "/").ok()?.body)
}

#[test]
fn actix_web_on_the_raw_listener_is_upgraded_with_no_failed_request() {
    let example = reborn_testkit::example("reborn", "actix");
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = reborn_testkit::copy_to(&example, dir.path(), "server");
    let mut cmd = Command::new(&bin);
    cmd.arg("127.0.0.1:0");
    let mut first = Proc::start(cmd);
    let addr = first.wait_line("the listening address", |l| {
        l.strip_prefix("listening on ")?.parse().ok()
    });
    let mut current = wait_for("actix to answer", PATIENCE, || answering(addr));
    assert_eq!(current, first.pid());
    // New connections only: actix closes idle keep-alive connections itself when it
    // stops (the example's docs say so), a race reborn's drain cannot reach.
    let load = Load::start(addr, "/", 0, 4);
    load.wait_progress(20);
    for round in 1..=3 {
        let slow = std::thread::spawn(move || reborn_testkit::get(addr, "/slow/1500"));
        // Every generation writes to the same output: this round's slow request is
        // the round-th one started.
        wait_for("the slow request to start", PATIENCE, || {
            (first.output().matches("slow request started").count() >= round).then_some(())
        });
        reborn_testkit::replace_with_variant(&bin, &example, format!("v{round}").as_bytes());
        signal(current, libc::SIGHUP);
        let next = wait_for("the new generation to answer", PATIENCE, || {
            answering(addr).filter(|p| *p != current)
        });
        let slow = slow
            .join()
            .expect("the slow client")
            .unwrap_or_else(|e| panic!("the slow request was cut: {e}\n{}", first.output()));
        assert_eq!(slow.status, 200, "{slow:?}");
        assert_eq!(
            pid_of(&slow.body),
            Some(current),
            "answered by the old generation"
        );
        if current == first.pid() {
            assert_eq!(first.wait_exit(PATIENCE), Some(0), "{}", first.output());
        } else {
            wait_for("the old generation to exit", PATIENCE, || {
                (!alive(current)).then_some(())
            });
        }
        load.wait_progress(20);
        current = next;
    }
    let report = load.finish_without_failures();
    assert!(report.ok > 60, "{report:?}");
    signal(current, libc::SIGTERM);
    wait_for("the last generation to exit", PATIENCE, || {
        (!alive(current)).then_some(())
    });
    assert!(
        first.output().contains("exiting"),
        "each generation leaves by its own drain:\n{}",
        first.output()
    );
}
