//! Connections that switched protocols (a WebSocket, any HTTP/1.1 upgrade) are the
//! application's after the `101`, but they are still the old generation's connections:
//! it stays until they close, and the hammer cuts them at the drain deadline.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use reborn_testkit::{PATIENCE, alive, signal};

/// Opens a connection to `/upgrade-echo` and reads the `101` head.
fn upgraded(addr: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(PATIENCE)).expect("timeout");
    s.write_all(
        b"GET /upgrade-echo HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n",
    )
    .expect("the upgrade request");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            s.read(&mut byte).expect("the 101 head"),
            1,
            "closed before the head"
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s
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
    assert_eq!(
        server.proc.wait_exit(PATIENCE),
        Some(0),
        "{}",
        server.proc.output()
    );
    let output = server.proc.output();
    assert!(
        output.contains("upgraded connection ended: closed by the client"),
        "{output}"
    );
    assert_eq!(common::body_pid(&server.get("/ping").body), Some(new));
    server.stop_current();
}

#[test]
fn an_upgraded_connection_that_never_closes_is_cut_at_the_deadline() {
    let mut server = common::Server::start(&["--drain-timeout-ms", "1000"]);
    let mut conn = upgraded(server.addr);
    echo(&mut conn, "hello").expect("echo");
    signal(server.proc.pid(), libc::SIGTERM);
    assert_eq!(
        server.proc.wait_exit(PATIENCE),
        Some(0),
        "{}",
        server.proc.output()
    );
    let output = server.proc.output();
    assert!(
        output.contains("upgraded connection ended: reborn: the drain deadline passed"),
        "the application's read failed at the hammer:\n{output}"
    );
    let mut rest = Vec::new();
    let _ = conn.read_to_end(&mut rest);
    assert!(rest.is_empty(), "nothing more arrives: {rest:?}");
}
