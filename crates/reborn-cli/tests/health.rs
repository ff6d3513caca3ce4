//! The master's shutdown delay and health listener: after `SIGTERM` the worker serves on
//! while `/readyz` says 503, so a load balancer takes the instance out first; `/readyz`
//! follows the worker's state for any program, built on reborn or not.

mod common;

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{Master, bench_server, tempdir};
use reborn_testkit::{Load, PATIENCE, alive, get, signal, wait_for};

/// The health listener's address, as the master logs it.
fn health_addr(master: &Master) -> SocketAddr {
    master.proc.wait_line("the health listener", |l| {
        l.split("health checks: http://")
            .nth(1)?
            .split('/')
            .next()?
            .parse()
            .ok()
    })
}

fn readyz(addr: SocketAddr) -> (u16, String) {
    let r = get(addr, "/readyz").expect("GET /readyz");
    (r.status, r.body)
}

/// In the delay: 503 on `/readyz`, 200 on `/livez`, the worker keeps serving kept and
/// new connections (clients that never retry fail nothing), upgrades are refused. A
/// second `SIGTERM` stops at once.
#[test]
fn after_sigterm_the_worker_serves_out_the_delay_while_readyz_says_503() {
    let dir = tempdir();
    let bench = bench_server();
    let mut master = Master::start(
        dir.path(),
        &["--shutdown-delay", "120s", "--health", "127.0.0.1:0"],
        &[bench.as_os_str()],
    );
    let health = health_addr(&master);
    let worker = master.wait_serving();
    wait_for("/readyz to answer 200", PATIENCE, || {
        (readyz(health) == (200, "ready\n".into())).then_some(())
    });
    assert_eq!(get(health, "/livez").expect("GET /livez").status, 200);
    let load = Load::start(master.addr, "/ping", 2, 4);
    load.wait_progress(100);
    signal(master.pid(), libc::SIGTERM);
    wait_for("/readyz to answer 503", PATIENCE, || {
        let (status, body) = readyz(health);
        (status == 503 && body.contains("shutdown delay")).then_some(())
    });
    assert_eq!(get(health, "/livez").expect("GET /livez").status, 200);
    load.wait_progress(300);
    let (ok, said) = master.upgrade();
    assert!(!ok && said.contains("shutdown delay"), "{said}");
    assert_eq!(master.status()["state"], "stopping");
    load.wait_progress(100);
    let report = load.finish_without_failures();
    assert!(alive(worker), "the worker serves through the delay");
    signal(master.pid(), libc::SIGTERM);
    master.proc.wait_line("the stop", |l| {
        l.contains("SIGTERM during the shutdown delay: stopping now")
            .then_some(())
    });
    assert_eq!(master.proc.wait_exit(PATIENCE), Some(0));
    println!("{report:?}");
}

/// The delay ends by itself: the workers are stopped then, not before.
#[test]
fn the_master_stops_its_worker_when_the_delay_is_over() {
    let dir = tempdir();
    let bench = bench_server();
    let mut master = Master::start(
        dir.path(),
        &["--shutdown-delay", "1s"],
        &[bench.as_os_str()],
    );
    master.wait_serving();
    let sent = Instant::now();
    signal(master.pid(), libc::SIGTERM);
    master.proc.wait_line("the stop", |l| {
        l.contains("the shutdown delay is over: stopping the workers")
            .then_some(())
    });
    let waited = sent.elapsed();
    assert!(
        waited >= Duration::from_secs(1),
        "stopped {waited:?} after SIGTERM"
    );
    assert_eq!(master.proc.wait_exit(PATIENCE), Some(0));
}

/// For a program that knows nothing of reborn (Python's http.server, ready after a
/// delay): `/readyz` says `starting` until the master counts it ready, then 200; when
/// the worker dies, `restarting` until its replacement is ready.
#[test]
fn readyz_follows_a_foreign_workers_state() {
    let dir = tempdir();
    let program = common::python_http_server(dir.path(), reborn_testkit::free_port());
    let program: Vec<&OsStr> = program.iter().map(|a| a.as_os_str()).collect();
    let master = Master::start(
        dir.path(),
        &["--ready", "delay:1500ms", "--health", "127.0.0.1:0"],
        &program,
    );
    let health = health_addr(&master);
    let (status, body) = readyz(health);
    assert!(
        (status, body.as_str()) == (503, "not ready: starting\n") || status == 200,
        "{status} {body}"
    );
    let worker = master.wait_serving();
    wait_for("/readyz to answer 200", PATIENCE, || {
        (readyz(health).0 == 200).then_some(())
    });
    signal(worker, libc::SIGKILL);
    wait_for("/readyz to say restarting", PATIENCE, || {
        let (status, body) = readyz(health);
        (status == 503 && body.contains("restarting")).then_some(())
    });
    wait_for("/readyz to answer 200 again", PATIENCE, || {
        (readyz(health).0 == 200).then_some(())
    });
    assert_ne!(master.wait_serving(), worker);
}

/// A health address in use: one clear message, and the master does not start.
#[test]
fn a_health_address_in_use_is_named() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let dir = tempdir();
    let out = std::process::Command::new(common::reborn())
        .args([
            "run",
            "--listen",
            "http=127.0.0.1:0",
            "--health",
            &addr,
            "--control",
        ])
        .arg(dir.path().join("ctl.sock"))
        .arg("--")
        .arg(bench_server())
        .output()
        .expect("run reborn");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "cannot listen on {addr} for --health: the address is already in use"
        )),
        "{stderr}"
    );
}

/// `--shutdown-delay-signal SIGINT` moves the delay to SIGINT; a second SIGINT in it
/// stops at once. A signal that does not stop the master is refused by name.
#[test]
fn the_delay_can_wait_on_sigint_instead() {
    let dir = tempdir();
    let bench = bench_server();
    let mut master = Master::start(
        dir.path(),
        &[
            "--shutdown-delay",
            "120s",
            "--shutdown-delay-signal",
            "INT",
            "--health",
            "127.0.0.1:0",
        ],
        &[bench.as_os_str()],
    );
    let health = health_addr(&master);
    master.wait_serving();
    signal(master.pid(), libc::SIGINT);
    wait_for("/readyz to answer 503", PATIENCE, || {
        (readyz(health).0 == 503).then_some(())
    });
    master.proc.wait_line("the delay", |l| {
        l.contains("SIGINT: stopping in 2m0s").then_some(())
    });
    signal(master.pid(), libc::SIGINT);
    assert_eq!(master.proc.wait_exit(PATIENCE), Some(0));

    let out = std::process::Command::new(common::reborn())
        .args(["run", "--shutdown-delay-signal", "SIGUSR1", "--", "true"])
        .output()
        .expect("run reborn");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("SIGUSR1 does not stop the master"),
        "{stderr}"
    );
}
