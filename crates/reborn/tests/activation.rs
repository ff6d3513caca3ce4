//! Socket activation as systemd speaks it, and the errors a user meets first.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{body_pid, testserver};
use reborn_testkit::{PATIENCE, Proc, alive, signal, wait_for};

fn run_to_end(mut cmd: Command) -> (Option<i32>, String) {
    let out = cmd.output().expect("runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// Debian's `systemd-socket-activate` binds the socket, waits for the first connection,
/// then execs the server with `LISTEN_FDS=1` and no names: the server serves on the
/// socket it was handed (found by address), and a `SIGHUP` hands it on.
#[test]
fn serves_and_upgrades_under_systemd_socket_activate() {
    let Ok(_) = Command::new("systemd-socket-activate")
        .arg("--version")
        .output()
    else {
        panic!("systemd-socket-activate is missing: apt-get install systemd");
    };
    let dir = tempfile::tempdir().unwrap();
    let bin = reborn_testkit::copy_to(&testserver(), dir.path(), "server");
    let port = reborn_testkit::free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.arg("-l")
        .arg(addr.to_string())
        .arg(&bin)
        .args(["--addr", &addr.to_string(), "--pid-file"])
        .arg(dir.path().join("pid"));
    let mut proc = Proc::start(cmd);
    proc.wait_line("systemd-socket-activate listening", |l| {
        l.contains("Listening on").then_some(())
    });
    // The first connection starts the server, which accepts it from the inherited socket.
    let first = reborn_testkit::get(addr, "/ping").expect("served through the inherited socket");
    let pid = body_pid(&first.body).unwrap();
    assert_eq!(
        pid,
        proc.pid(),
        "systemd-socket-activate execs the server in its own process"
    );
    proc.wait_line("the inherited listener", |l| {
        l.contains("inherited=true").then_some(())
    });

    reborn_testkit::replace_with_variant(&bin, &testserver(), b"v2");
    signal(pid, libc::SIGHUP);
    let new_pid = wait_for("the new generation", PATIENCE, || {
        reborn_testkit::get(addr, "/ping")
            .ok()
            .and_then(|r| body_pid(&r.body))
            .filter(|p| *p != pid)
    });
    assert_eq!(proc.wait_exit(PATIENCE), Some(0));
    let resp = reborn_testkit::get(addr, "/ping").unwrap();
    assert_eq!(body_pid(&resp.body), Some(new_pid));
    signal(new_pid, libc::SIGTERM);
    wait_for("the last generation to exit", PATIENCE, || {
        (!alive(new_pid)).then_some(())
    });
}

/// Named sockets (`LISTEN_FDNAMES`) are found by name even when the address asked for
/// differs, as with `FileDescriptorName=` in a socket unit.
#[test]
fn finds_inherited_sockets_by_name() {
    let port = reborn_testkit::free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.arg("-l")
        .arg(addr.to_string())
        .arg("--fdname=http")
        .arg(testserver())
        .args(["--addr", "127.0.0.1:0"]);
    let proc = Proc::start(cmd);
    proc.wait_line("systemd-socket-activate listening", |l| {
        l.contains("Listening on").then_some(())
    });
    let resp = reborn_testkit::get(addr, "/ping").expect("served on the named socket");
    assert_eq!(body_pid(&resp.body), Some(proc.pid()));
    proc.wait_line("the name", |l| {
        (l.contains("inherited=true") && l.contains("name=\"http\"")).then_some(())
    });
}

#[test]
fn garbage_listen_fds_gets_one_precise_error() {
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ LISTEN_FDS=three exec \"$0\" --addr 127.0.0.1:0")
        .arg(testserver());
    let (code, out) = run_to_end(cmd);
    assert_eq!(code, Some(1));
    assert!(
        out.contains("LISTEN_FDS=\"three\" is not a number of file descriptors"),
        "{out}"
    );
}

#[test]
fn a_listen_fds_fd_that_is_not_a_socket_is_named() {
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg("exec 3</etc/hostname; LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" --addr 127.0.0.1:0")
        .arg(testserver());
    let (code, out) = run_to_end(cmd);
    assert_eq!(code, Some(1));
    assert!(
        out.contains("fd 3") && out.contains("regular file"),
        "{out}"
    );
}

#[test]
fn listen_fds_for_another_process_are_ignored() {
    let mut cmd = Command::new(testserver());
    cmd.args(["--addr", "127.0.0.1:0"])
        .env("LISTEN_PID", "1")
        .env("LISTEN_FDS", "1");
    let proc = Proc::start(cmd);
    let addr: std::net::SocketAddr = proc.wait_line("the address", |l| {
        l.strip_prefix("listening on ")?.parse().ok()
    });
    assert_eq!(reborn_testkit::get(addr, "/ping").unwrap().status, 200);
    proc.wait_line("the warning", |l| {
        l.contains("LISTEN_FDS is set for another process")
            .then_some(())
    });
}

#[test]
fn a_bad_address_gets_one_precise_error() {
    let mut cmd = Command::new(testserver());
    cmd.args(["--addr", "localhost:http"]);
    let (code, out) = run_to_end(cmd);
    assert_eq!(code, Some(1));
    assert!(
        out.contains(
            "\"localhost:http\" is not a listen address: the port \"http\" is not a number"
        ),
        "{out}"
    );
}

#[test]
fn a_port_in_use_gets_one_precise_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut cmd = Command::new(testserver());
    cmd.args(["--addr", &addr]);
    let (code, out) = run_to_end(cmd);
    assert_eq!(code, Some(1));
    assert!(
        out.contains(&format!(
            "cannot listen on {addr}: the address is already in use"
        )),
        "{out}"
    );
}

/// A Unix socket listener beside the TCP one: both are handed on, in order, by name.
#[test]
fn unix_and_tcp_listeners_are_both_handed_on() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("app.sock");
    let server = common::Server::start(&["--unix", sock.to_str().unwrap()]);
    let get_unix = || {
        let mut s = std::os::unix::net::UnixStream::connect(&sock)?;
        s.write_all(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok::<_, std::io::Error>(out)
    };
    let old = server.proc.pid();
    assert!(get_unix().unwrap().contains(&format!("pid={old}")));
    signal(old, libc::SIGHUP);
    let new = server.wait_new_pid(old);
    wait_for("the new generation on the Unix socket", PATIENCE, || {
        get_unix()
            .ok()
            .filter(|b| b.contains(&format!("pid={new}")))
    });
    assert_eq!(body_pid(&server.get("/ping").body), Some(new));
}

/// A server with its own accept loop (raw listener, manual readiness) is upgraded too.
/// The raw_tcp example, copied into `dir` (an upgrade runs the file again), started with
/// `args`; and the address it listens on.
fn raw_tcp(dir: &std::path::Path, args: &[&str]) -> (Proc, std::net::SocketAddr) {
    let bin = reborn_testkit::copy_to(&reborn_testkit::example("reborn", "raw_tcp"), dir, "server");
    let mut cmd = Command::new(&bin);
    cmd.args(args);
    let proc = Proc::start(cmd);
    let addr = proc.wait_line("the address", |l| {
        l.strip_prefix("listening on ")?.parse().ok()
    });
    (proc, addr)
}

/// Sends `line` to raw_tcp on a new connection and reads the answer.
fn ask_raw(addr: std::net::SocketAddr, line: &str) -> std::io::Result<String> {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.write_all(format!("{line}\n").as_bytes())?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer)?;
    Ok(answer)
}

#[test]
fn a_raw_accept_loop_server_is_upgraded() {
    let dir = tempfile::tempdir().unwrap();
    let (mut proc, addr) = raw_tcp(dir.path(), &["127.0.0.1:0"]);
    let ask = |line: &str| ask_raw(addr, line);
    let first = proc.pid();
    assert_eq!(ask("hello").unwrap(), format!("hello pid={first}\n"));
    signal(first, libc::SIGHUP);
    let second = wait_for("the new generation", PATIENCE, || {
        ask("hi")
            .ok()
            .and_then(|a| {
                a.trim()
                    .rsplit_once("pid=")
                    .and_then(|(_, p)| p.parse::<u32>().ok())
            })
            .filter(|p| *p != first)
    });
    assert_eq!(proc.wait_exit(PATIENCE), Some(0));
    signal(second, libc::SIGTERM);
    wait_for("the second generation to exit", PATIENCE, || {
        (!alive(second)).then_some(())
    });
}

#[test]
fn a_raw_accept_loop_server_lets_each_connection_go_at_its_own_moment() {
    use std::io::{BufRead, BufReader, Write};
    const CLIENTS: usize = 20;
    const WINDOW: Duration = Duration::from_millis(1000);
    let dir = tempfile::tempdir().unwrap();
    let window = WINDOW.as_millis().to_string();
    let (mut proc, addr) = raw_tcp(dir.path(), &["127.0.0.1:0", &window]);
    let first = proc.pid();
    // Connected and answered by the first generation, then idle.
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(PATIENCE)).unwrap();
            s.write_all(format!("hello {i}\n").as_bytes()).unwrap();
            let mut reader = BufReader::new(s);
            let mut answer = String::new();
            reader.read_line(&mut answer).unwrap();
            assert_eq!(answer, format!("hello {i} pid={first}\n"));
            reader
        })
        .collect();
    signal(first, libc::SIGHUP);
    // Each client is told goodbye by the old generation, then the connection closes.
    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut reader| {
            std::thread::spawn(move || {
                let mut bye = String::new();
                reader.read_line(&mut bye).unwrap();
                let at = Instant::now();
                let mut rest = String::new();
                let eof = reader.read_line(&mut rest).unwrap();
                (bye, at, eof, rest)
            })
        })
        .collect();
    let mut times = Vec::new();
    for reader in readers {
        let (bye, at, eof, rest) = reader.join().unwrap();
        assert_eq!(bye, format!("bye pid={first}\n"));
        assert_eq!((eof, rest.as_str()), (0, ""), "closed after the goodbye");
        times.push(at);
    }
    let spread = *times.iter().max().unwrap() - *times.iter().min().unwrap();
    assert!(
        spread >= WINDOW / 2 && spread <= WINDOW + Duration::from_secs(2),
        "the goodbyes spread over {spread:?}, the window is {WINDOW:?}"
    );
    assert_eq!(proc.wait_exit(PATIENCE), Some(0));
    let second = wait_for("the new generation", PATIENCE, || {
        ask_raw(addr, "hi")
            .ok()?
            .trim()
            .rsplit_once("pid=")?
            .1
            .parse::<u32>()
            .ok()
    });
    assert_ne!(second, first);
    signal(second, libc::SIGTERM);
    wait_for("the second generation to exit", PATIENCE, || {
        (!alive(second)).then_some(())
    });
}
