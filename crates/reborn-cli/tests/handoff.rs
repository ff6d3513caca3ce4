//! Under the master, a worker built on reborn hands its idle keep-alive connections to the
//! worker that replaces it, once the new one has passed the master's probation.

mod common;

use common::{Master, tempdir};
use reborn_testkit::{Load, PATIENCE, alive, copy_to, replace_with_variant, wait_for};

fn testserver() -> std::path::PathBuf {
    reborn_testkit::example("reborn", "testserver")
}

fn body_pid(body: &str) -> Option<u32> {
    body.rsplit_once("pid=")?.1.trim().parse().ok()
}

#[test]
fn under_the_master_keep_alive_clients_keep_their_connections_through_upgrades() {
    keep_alive_clients_keep_their_connections(&[]);
}

/// The master's stop signal may be SIGINT: the old worker hands over on it too.
#[test]
fn with_sigint_as_the_stop_signal_keep_alive_clients_keep_their_connections() {
    keep_alive_clients_keep_their_connections(&["--stop-signal", "SIGINT"]);
}

fn keep_alive_clients_keep_their_connections(options: &[&str]) {
    let dir = tempdir();
    let app = copy_to(&testserver(), dir.path(), "app");
    let mut args = vec!["--probation", "500ms"];
    args.extend_from_slice(options);
    let master = Master::start(dir.path(), &args, &[app.as_os_str()]);
    let mut current = master.wait_serving();
    let load = Load::start(master.addr, "/ping", 8, 0);
    load.wait_progress(100);
    for round in 1..=3 {
        replace_with_variant(&app, &testserver(), format!("v{round}").as_bytes());
        let (ok, text) = master.upgrade();
        assert!(ok, "{text}\n{}", master.proc.output());
        let next = wait_for("the new worker to serve", PATIENCE, || {
            master.serving_pid().filter(|p| *p != current)
        });
        wait_for("the old worker to exit", PATIENCE, || {
            (!alive(current)).then_some(())
        });
        load.wait_progress(100);
        current = next;
    }
    let report = load.finish_without_failures();
    assert_eq!(report.reconnects, 0, "{report:?}\n{}", master.proc.output());
    assert!(
        report.bodies.iter().any(|b| body_pid(b) == Some(current)),
        "the last worker answers on the handed connections: {:?}",
        report.bodies
    );
}
