//! Who a connection is from reaches the application: axum's `ConnectInfo<SocketAddr>`
//! over TCP, `ConnectInfo<reborn::UnixPeer>` over a Unix socket, and
//! `reborn::ConnectionInfo` in either case, before and after an upgrade.

mod common;

use std::io::{Read, Write};

use reborn_testkit::{PATIENCE, signal, wait_for};

/// One request on a fresh connection from `stream`, with `Connection: close`.
fn whoami(mut stream: impl Read + Write, path: &str) -> std::io::Result<String> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes())?;
    let mut out = String::new();
    stream.read_to_string(&mut out)?;
    Ok(out)
}

#[test]
fn axum_connect_info_is_the_real_peer_over_tcp_before_and_after_an_upgrade() {
    let server = common::Server::start(&[]);
    let ask = || {
        let stream = std::net::TcpStream::connect(server.addr).expect("connect");
        stream.set_read_timeout(Some(PATIENCE)).expect("timeout");
        let me = stream.local_addr().expect("local address");
        let answer = whoami(stream, "/whoami").expect("answer");
        (me, answer)
    };
    let (me, answer) = ask();
    assert!(
        answer.contains(&format!("tcp peer={me} local={}", server.addr)),
        "{answer}"
    );
    let old = server.proc.pid();
    server.deploy_variant("v2");
    signal(old, libc::SIGHUP);
    let new = server.wait_new_pid(old);
    let (me, answer) = ask();
    assert!(answer.contains(&format!("pid={new}")), "{answer}");
    assert!(answer.contains(&format!("tcp peer={me} ")), "{answer}");
}

#[test]
fn a_unix_socket_client_is_known_by_its_credentials() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("app.sock");
    let server = common::Server::start(&["--unix", sock.to_str().expect("utf-8 path")]);
    let answer = wait_for("an answer on the Unix socket", PATIENCE, || {
        std::os::unix::net::UnixStream::connect(&sock)
            .and_then(|s| whoami(s, "/whoami-unix"))
            .ok()
    });
    // SAFETY: getuid and getgid cannot fail and have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let expected = format!(
        "unix peer_pid={} uid={uid} gid={gid} local={} pid={}",
        std::process::id(),
        sock.display(),
        server.proc.pid()
    );
    assert!(answer.contains(&expected), "{answer}\nexpected {expected}");
}
