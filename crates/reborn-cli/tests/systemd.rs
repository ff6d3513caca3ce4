//! The master under a service manager, with systemd's own protocol and no mocks of the
//! master: its NOTIFY_SOCKET is a real datagram socket read here (READY=1 once the first
//! worker is ready, RELOADING=1 … READY=1 around an upgrade, STOPPING=1 at the stop), and
//! its listening socket comes from socket activation (fd 3, LISTEN_PID = the master's
//! PID, set between fork and exec by reborn's own spawner).

mod common;

use std::os::fd::AsFd;
use std::os::unix::net::UnixDatagram;
use std::process::Stdio;
use std::time::Duration;

use common::{bench_server, ping, reborn, tempdir};
use reborn_testkit::{PATIENCE, Proc, alive, signal, wait_for};

fn recv_until(sock: &UnixDatagram, what: &str, pred: impl Fn(&str) -> bool) -> Vec<String> {
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + PATIENCE;
    let mut buf = [0u8; 4096];
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}; got {seen:?}"
        );
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = pred(&msg);
            seen.push(msg);
            if done {
                return seen;
            }
        }
    }
}

#[test]
fn master_reports_to_systemd_and_takes_activated_sockets() {
    let dir = tempdir();
    let notify_path = dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let control = dir.path().join("ctl.sock");
    let bench = bench_server();

    // Start the master as systemd would: the socket at fd 3, LISTEN_PID = its PID.
    let spec = reborn::spawn::SpawnSpec::new(reborn())
        .args([
            "run".as_ref(),
            "--control".as_ref(),
            control.as_os_str(),
            "--".as_ref(),
            bench.as_os_str(),
            "--addr".as_ref(),
            "127.0.0.1:0".as_ref(),
        ])
        .envs(std::env::vars_os())
        .env("NOTIFY_SOCKET", &notify_path)
        .socket(listener.as_fd(), Some("http".into()));
    let mut cmd = spec.command().unwrap();
    cmd.stdin(Stdio::null());
    let mut master = Proc::start(cmd);
    drop(listener);

    let seen = recv_until(&notify, "READY=1", |m| m.contains("READY=1"));
    assert!(seen.iter().all(|m| !m.contains("RELOADING=1")), "{seen:?}");
    let (_, first) = ping(addr);
    master.wait_line("the inherited socket", |l| {
        l.contains(&format!("listening on http={addr}"))
            .then_some(())
    });

    let out = std::process::Command::new(reborn())
        .args(["upgrade", "--control"])
        .arg(&control)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let seen = recv_until(&notify, "RELOADING=1", |m| m.contains("RELOADING=1"));
    assert!(seen.last().unwrap().contains("MONOTONIC_USEC="), "{seen:?}");
    recv_until(&notify, "READY=1 after the upgrade", |m| {
        m.contains("READY=1")
    });
    wait_for("the new worker", PATIENCE, || {
        (ping(addr).1 != first).then_some(())
    });

    signal(master.pid(), libc::SIGTERM);
    recv_until(&notify, "STOPPING=1", |m| m.contains("STOPPING=1"));
    assert_eq!(master.wait_exit(PATIENCE), Some(0));
    assert!(!alive(first));
}
