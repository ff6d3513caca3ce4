//! Readiness for programs that cannot notify: a TCP connect and an HTTP GET that must
//! answer 2xx, aimed at a health address of the worker's own (here Python's
//! `http.server`, which binds its own port and knows nothing of NOTIFY_SOCKET).

mod common;

use std::ffi::OsStr;

use common::{Master, tempdir};
use reborn_testkit::{PATIENCE, wait_for};

fn start(dir: &std::path::Path, ready: &str, port: u16, extra: &[&str]) -> Master {
    let mut opts = vec!["--ready", ready];
    opts.extend_from_slice(extra);
    let program = common::python_http_server(dir, port);
    let program: Vec<&OsStr> = program.iter().map(|a| a.as_os_str()).collect();
    Master::start(dir, &opts, &program)
}

#[test]
fn tcp_probe() {
    let dir = tempdir();
    let port = reborn_testkit::free_port();
    let master = start(dir.path(), &format!("tcp:127.0.0.1:{port}"), port, &[]);
    master.wait_serving();
    master.proc.wait_line("the probe's verdict", |l| {
        (l.contains("the worker is ready") && l.contains("probe")).then_some(())
    });
}

#[test]
fn http_probe_needs_2xx() {
    let dir = tempdir();
    std::fs::write(dir.path().join("health"), "ok").unwrap();
    let port = reborn_testkit::free_port();
    let master = start(
        dir.path(),
        &format!("http:http://127.0.0.1:{port}/health"),
        port,
        &[],
    );
    master.wait_serving();

    // A path that answers 404: never ready; at the deadline the worker is stopped and
    // tried again.
    let dir = tempdir();
    let port = reborn_testkit::free_port();
    let master = start(
        dir.path(),
        &format!("http:http://127.0.0.1:{port}/missing"),
        port,
        &["--ready-timeout", "1s", "--backoff-max", "200ms"],
    );
    master.proc.wait_line("the readiness deadline", |l| {
        l.contains("was not ready within 1.0s").then_some(())
    });
    wait_for("a second try", PATIENCE, || {
        (master.status()["crashes"].as_u64()? >= 1).then_some(())
    });
    assert_ne!(master.status()["state"], "serving");
}
