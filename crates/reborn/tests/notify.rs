//! What a service manager (systemd with `Type=notify`, `NotifyAccess=all`) hears from a
//! server across an upgrade, on a real notify socket.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;

use common::testserver;
use reborn_testkit::{PATIENCE, Proc, alive, signal, wait_for};

fn recv(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = sock
        .recv(&mut buf)
        .expect("a notify message before the timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// A notify socket playing the service manager, and the test server started under it
/// from a temporary directory.
fn start_under_manager() -> (tempfile::TempDir, UnixDatagram, std::path::PathBuf, Proc) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let manager = UnixDatagram::bind(&path).unwrap();
    manager.set_read_timeout(Some(PATIENCE)).unwrap();
    let bin = reborn_testkit::copy_to(&testserver(), dir.path(), "server");
    let mut cmd = Command::new(&bin);
    cmd.args(["--addr", "127.0.0.1:0"])
        .env("NOTIFY_SOCKET", &path);
    (dir, manager, bin, Proc::start(cmd))
}

#[test]
fn the_service_manager_follows_the_main_pid_across_upgrades() {
    let (_dir, manager, bin, mut proc) = start_under_manager();
    let first = proc.pid();

    let ready = recv(&manager);
    assert!(ready.contains(&format!("MAINPID={first}\n")), "{ready}");
    assert!(
        ready.contains("READY=1\n") && ready.contains("STATUS=serving on 127.0.0.1:"),
        "{ready}"
    );

    reborn_testkit::replace_with_variant(&bin, &testserver(), b"v2");
    signal(first, libc::SIGHUP);
    let reloading = recv(&manager);
    assert!(
        reloading.contains("RELOADING=1\n") && reloading.contains("MONOTONIC_USEC="),
        "{reloading}"
    );
    let handed = recv(&manager);
    let second: u32 = handed
        .lines()
        .find_map(|l| l.strip_prefix("MAINPID="))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("MAINPID in {handed:?}"));
    assert_ne!(second, first);
    assert!(handed.contains("READY=1\n"), "{handed}");

    // The old generation drains and exits without telling the manager it stops.
    assert_eq!(proc.wait_exit(PATIENCE), Some(0));
    manager
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 256];
    assert!(
        manager.recv(&mut buf).is_err(),
        "nothing else was said during the handover"
    );

    // A real shutdown of the new main process is announced.
    manager.set_read_timeout(Some(PATIENCE)).unwrap();
    signal(second, libc::SIGTERM);
    let stopping = recv(&manager);
    assert!(stopping.contains("STOPPING=1"), "{stopping}");
    wait_for("the last generation to exit", PATIENCE, || {
        (!alive(second)).then_some(())
    });
}

#[test]
fn a_failed_upgrade_tells_the_manager_it_is_ready_again_and_why() {
    let (_dir, manager, bin, proc) = start_under_manager();
    assert!(recv(&manager).contains("READY=1"));
    reborn_testkit::replace_with_script(&bin, "#!/bin/sh\nexit 7\n");
    signal(proc.pid(), libc::SIGHUP);
    assert!(recv(&manager).contains("RELOADING=1"));
    let back = recv(&manager);
    assert!(
        back.contains("READY=1")
            && back.contains("STATUS=upgrade failed")
            && back.contains("status 7"),
        "{back}"
    );
    assert!(
        back.contains(&format!("MAINPID={}\n", proc.pid())),
        "the main process is still the old one: {back}"
    );
}

/// The private readiness socket of an upgrade lives in the abstract namespace, which any
/// local process can reach: a datagram from another user must be ignored, one from this
/// user read.
#[cfg(reborn_linux)]
#[tokio::test]
async fn readiness_from_another_user_is_ignored() {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::process::CommandExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: sending as another user needs root");
        return;
    }
    let rx = reborn::notify::NotifyReceiver::new_abstract().unwrap();
    let addr = rx.address();
    let name = addr
        .as_bytes()
        .strip_prefix(b"@")
        .expect("an abstract address");
    let name = std::str::from_utf8(name).unwrap();
    // `nobody` sends READY=1 and exits: its datagram is queued before ours.
    let status = Command::new("python3")
        .args([
            "-c",
            "import socket, sys\n\
             s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n\
             s.sendto(b'READY=1\\nSTATUS=forged\\n', '\\0' + sys.argv[1])",
            name,
        ])
        .uid(65534)
        .gid(65534)
        .status()
        .expect("python3 runs");
    assert!(status.success(), "the foreign sender failed: {status}");
    reborn::notify::send(&addr, "STATUS=ours\n").unwrap();
    let first = tokio::time::timeout(PATIENCE, rx.recv())
        .await
        .expect("our message is read")
        .unwrap();
    assert!(!first.ready, "the forged READY=1 was accepted: {first:?}");
    assert_eq!(first.status.as_deref(), Some("ours"));
}

/// A readiness socket in a private directory (the only kind on other systems, and with
/// the `portable` feature) cannot be reached by another user at all: the directory's
/// mode stops them, credentials or not.
#[tokio::test]
async fn another_user_cannot_reach_a_private_readiness_socket() {
    use std::os::unix::process::CommandExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: sending as another user needs root");
        return;
    }
    let rx = reborn::notify::NotifyReceiver::new().unwrap();
    let addr = rx.address();
    let out = Command::new("python3")
        .args([
            "-c",
            "import socket, sys\n\
             s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n\
             try:\n    s.sendto(b'READY=1\\n', sys.argv[1])\n\
             except PermissionError:\n    sys.exit(3)",
        ])
        .arg(&addr)
        .uid(65534)
        .gid(65534)
        .output()
        .expect("python3 runs");
    assert_eq!(
        out.status.code(),
        Some(3),
        "another user reached the socket: {out:?}"
    );
    reborn::notify::send(&addr, "READY=1\n").unwrap();
    let first = tokio::time::timeout(PATIENCE, rx.recv())
        .await
        .expect("our message is read")
        .unwrap();
    assert!(first.ready);
}
