//! Connections that switched protocols (a WebSocket, any HTTP/1.1 upgrade) are the
//! application's after the `101`, but they are still the old generation's connections:
//! it stays until they close, and the hammer cuts them at the drain deadline.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use reborn_testkit::{alive, signal};

/// Opens a connection to `/upgrade-echo` and reads the `101` head.
fn upgraded(addr: std::net::SocketAddr) -> TcpStream {
    upgraded_at(addr, "/upgrade-echo")
}

/// Opens a connection to `path` (an `/upgrade-echo`) and reads the `101` head.
fn upgraded_at(addr: std::net::SocketAddr, path: &str) -> TcpStream {
    common::upgrade(addr, path, "Upgrade: echo\r\n")
}

/// Sends `text` and reads it back.
fn echo(s: &mut TcpStream, text: &str) -> std::io::Result<()> {
    s.write_all(text.as_bytes())?;
    let mut back = vec![0u8; text.len()];
    s.read_exact(&mut back)?;
    assert_eq!(back, text.as_bytes());
    Ok(())
}

#[test]
fn an_upgraded_connection_keeps_the_old_generation_until_it_closes() {
    let mut server = common::Server::start(&["--drain-timeout-ms", "60000"]);
    let old = server.proc.pid();
    let mut conn = upgraded(server.addr);
    echo(&mut conn, "before").expect("echo before the upgrade");
    server.deploy_variant("v2");
    signal(old, libc::SIGHUP);
    let new = server.wait_new_pid(old);
    server
        .proc
        .wait_line("the old generation to wait for its connection", |l| {
            l.contains("waiting for open connections to finish")
                .then_some(())
        });
    echo(&mut conn, "during the drain").expect("the old generation still serves it");
    assert!(
        alive(old),
        "the old generation stays while the connection is open"
    );
    drop(conn);
    server.proc.assert_exits_with(0);
    // Written just before the exit: the reader may not have it yet.
    server
        .proc
        .wait_line("the end of the upgraded connection", |l| {
            l.contains("upgraded connection ended: closed by the client")
                .then_some(())
        });
    assert_eq!(common::body_pid(&server.get("/ping").body), Some(new));
    server.stop_current();
}

#[test]
fn an_upgraded_connection_that_never_closes_is_cut_at_the_deadline() {
    let mut server = common::Server::start(&["--drain-timeout-ms", "1000"]);
    let mut conn = upgraded(server.addr);
    echo(&mut conn, "hello").expect("echo");
    signal(server.proc.pid(), libc::SIGTERM);
    server.proc.assert_exits_with(0);
    // The application's read failed at the hammer (written just before the exit: the
    // reader may not have it yet).
    server
        .proc
        .wait_line("the hammer's error in the application", |l| {
            l.contains("upgraded connection ended: reborn: the drain deadline passed")
                .then_some(())
        });
    let mut rest = Vec::new();
    let _ = conn.read_to_end(&mut rest);
    assert!(rest.is_empty(), "nothing more arrives: {rest:?}");
}

/// Long-lived connections are asked to leave each at its own moment, spread over the
/// eviction window (`reborn::Draining`), not all at once: each says goodbye, its client
/// reconnects to the new generation, and the old one exits long before its deadline.
#[test]
fn long_lived_connections_leave_at_moments_spread_over_the_eviction_window() {
    let window = std::time::Duration::from_millis(2000);
    let mut server = common::Server::start(&[
        "--drain-timeout-ms",
        "600000",
        "--eviction-window-ms",
        &window.as_millis().to_string(),
    ]);
    let old = server.proc.pid();
    let clients: Vec<_> = (0..20)
        .map(|_| {
            let mut conn = upgraded_at(server.addr, "/upgrade-echo?leave=true");
            echo(&mut conn, "hi").expect("echo");
            std::thread::spawn(move || {
                let mut said = String::new();
                conn.read_to_string(&mut said).expect("the goodbye");
                (said, std::time::Instant::now())
            })
        })
        .collect();
    server.deploy_variant("v2");
    signal(old, libc::SIGHUP);
    let new = server.wait_new_pid(old);
    let mut times = Vec::new();
    for c in clients {
        let (said, at) = c.join().expect("client thread");
        assert_eq!(
            said, "bye\n",
            "each connection is told to leave, then closed"
        );
        times.push(at);
    }
    times.sort();
    let spread = times[times.len() - 1] - times[0];
    assert!(
        spread >= window / 2,
        "20 moments spread over the window, not one: {spread:?}"
    );
    server.proc.assert_exits_with(0);
    assert_eq!(common::body_pid(&server.get("/ping").body), Some(new));
    server.stop_current();
}
