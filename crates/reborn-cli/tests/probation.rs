//! Probation under the master: a new worker that dies after it was ready is replaced by
//! the last good binary, pinned open, whatever the path holds by then.

mod common;

use common::{Master, parse_pong, ping, tempdir};
use reborn_testkit::{Load, PATIENCE, alive, copy_to, replace_with_variant, signal, wait_for};

fn testserver() -> std::path::PathBuf {
    reborn_testkit::example("reborn", "testserver")
}

/// Waits until a new connection is answered by a worker other than `not`, and returns
/// its (build id, pid).
fn wait_answer_other_than(master: &Master, not: u32) -> (String, u32) {
    wait_for("an answer from another worker", PATIENCE, || {
        reborn_testkit::get(master.addr, "/ping")
            .ok()
            .map(|r| parse_pong(&r.body))
            .filter(|(_, pid)| *pid != not)
    })
}

fn wait_probation_passed(master: &Master, times: usize) {
    wait_for("the worker to pass its probation", PATIENCE, || {
        (master.proc.output().matches("passed its probation").count() >= times).then_some(())
    });
}

#[test]
fn a_new_worker_that_dies_after_ready_is_replaced_by_the_last_good_binary() {
    let dir = tempdir();
    let app = copy_to(&testserver(), dir.path(), "app");
    let master = Master::start(dir.path(), &["--probation", "2s"], &[app.as_os_str()]);
    master.wait_serving();
    let (good_id, first) = ping(master.addr);
    wait_probation_passed(&master, 1);
    let load = Load::start(master.addr, "/ping", 4, 4);
    load.wait_progress(50);

    replace_with_variant(&app, &testserver(), b"\nknob:abort-after-ready-ms=200\n");
    let (ok, text) = master.upgrade();
    assert!(!ok, "`reborn upgrade` fails: {text}");
    assert!(
        text.contains("rolled back after commit") && text.contains("SIGABRT"),
        "it says why: {text}"
    );
    // The good binary serves again, although the path holds the bad one.
    let (id, restarted) = wait_answer_other_than(&master, first);
    assert_eq!(id, good_id, "the last good binary runs again");
    let (id, _) = wait_for("the restarted good binary to serve", PATIENCE, || {
        let (id, pid) = ping(master.addr);
        (pid == restarted || id == good_id).then_some((id, pid))
    });
    assert_eq!(id, good_id);
    let status = master.status();
    assert_eq!(status["last_upgrade"]["ok"], false, "{status}");
    assert!(
        status["last_upgrade"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("rolled back after commit")),
        "{status}"
    );
    load.wait_progress(100);

    // A good new version then upgrades as usual.
    replace_with_variant(&app, &testserver(), b"v3");
    let (ok, text) = master.upgrade();
    assert!(ok, "{text}\n{}", master.proc.output());
    assert!(text.contains("passed its probation"), "{text}");
    let (id, _) = ping(master.addr);
    assert_ne!(id, good_id, "the new version serves");
    load.wait_progress(100);
    let report = load.finish();
    assert_eq!(report.refused, 0, "nothing refused: {:?}", report.errors);
    assert!(
        report.failed <= 8,
        "only requests in flight on the crashed worker fail: {} {:?}",
        report.failed,
        report.errors
    );
}

#[test]
fn a_crash_restart_runs_the_pinned_binary_not_the_file_now_at_the_path() {
    let dir = tempdir();
    let app = copy_to(&testserver(), dir.path(), "app");
    let master = Master::start(dir.path(), &["--probation", "500ms"], &[app.as_os_str()]);
    master.wait_serving();
    let (good_id, first) = ping(master.addr);
    wait_probation_passed(&master, 1);

    // The path now holds a broken file, and the worker dies.
    std::fs::remove_file(&app).expect("rm");
    std::fs::write(&app, b"\x7fELF this is not a program").expect("write");
    signal(first, libc::SIGKILL);
    wait_for("the killed worker to be gone", PATIENCE, || {
        (!alive(first)).then_some(())
    });
    let (id, _) = wait_answer_other_than(&master, first);
    assert_eq!(id, good_id, "the restart ran the pinned good binary");

    // With nothing at the path at all, too.
    std::fs::remove_file(&app).expect("rm");
    let (_, second) = ping(master.addr);
    signal(second, libc::SIGKILL);
    let (id, _) = wait_answer_other_than(&master, second);
    assert_eq!(id, good_id);
}

#[test]
fn with_probation_off_a_crash_after_ready_restarts_the_path() {
    let dir = tempdir();
    let app = copy_to(&testserver(), dir.path(), "app");
    let master = Master::start_bench(
        dir.path(),
        &["--probation", "0", "--backoff-max", "200ms"],
        &app,
    );
    master.wait_serving();
    replace_with_variant(&app, &testserver(), b"\nknob:abort-after-ready-ms=300\n");
    let (ok, text) = master.upgrade();
    assert!(ok, "committed at once, as before: {text}");
    assert!(
        !text.contains("probation"),
        "no probation is mentioned: {text}"
    );
    wait_for("the new worker to crash", PATIENCE, || {
        master
            .proc
            .output()
            .contains("the serving worker")
            .then_some(())
    });
    assert!(!master.proc.output().contains("rolled back after commit"));
}
