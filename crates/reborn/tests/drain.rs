//! Graceful shutdown, hammer, drain deadline, hooks and HTTP/2 GOAWAY, on real processes.

mod common;

use std::time::{Duration, Instant};

use common::{Server, body_pid};
use reborn_testkit::{Http1, PATIENCE, signal};

fn wait_slow_started(server: &Server) {
    server.proc.wait_line("the slow request", |l| {
        l.starts_with("slow request started").then_some(())
    });
}

#[test]
fn sigterm_lets_in_flight_requests_finish_then_exits_zero() {
    // A long idle grace: the idle connection's next request below must not race it.
    let mut server = Server::start(&["--idle-grace-ms", "10000"]);
    let addr = server.addr;
    let slow: Vec<_> = (0..3)
        .map(|_| std::thread::spawn(move || reborn_testkit::get(addr, "/ping?sleep_ms=3000")))
        .collect();
    reborn_testkit::wait_for("the three slow requests to start", PATIENCE, || {
        (server.proc.output().matches("slow request started").count() >= 3).then_some(())
    });
    // An idle keep-alive connection, opened before the signal.
    let mut idle = Http1::connect(addr).unwrap();
    assert_eq!(idle.get("/ping").unwrap().status, 200);
    signal(server.proc.pid(), libc::SIGTERM);
    server
        .proc
        .wait_line("the drain", |l| l.contains("draining").then_some(()));
    // New connections are refused once the process stops listening.
    reborn_testkit::wait_for("the listener to close", PATIENCE, || {
        std::net::TcpStream::connect(addr).is_err().then_some(())
    });
    // The idle connection's next request, inside the grace, is answered and closes it.
    let resp = idle
        .get("/ping")
        .expect("a request on an idle connection during the grace");
    assert_eq!(resp.header("connection"), Some("close"));
    for t in slow {
        let r = t.join().unwrap().expect("the in-flight request completes");
        assert_eq!(r.status, 200);
        assert_eq!(r.header("connection"), Some("close"));
    }
    assert_eq!(
        server.proc.wait_exit(PATIENCE),
        Some(0),
        "{}",
        server.proc.output()
    );
    // Output is read by other threads: wait for the lines rather than peek.
    for hook in ["hook: before SIGTERM", "hook: after SIGTERM"] {
        server.proc.wait_line(hook, |l| (l == hook).then_some(()));
    }
}

#[test]
fn idle_keep_alive_connections_close_after_the_grace_not_before() {
    let mut server = Server::start(&["--idle-grace-ms", "800"]);
    let addr = server.addr;
    let mut idle = Http1::connect(addr).unwrap();
    idle.get("/ping").unwrap();
    let slow = std::thread::spawn(move || reborn_testkit::get(addr, "/ping?sleep_ms=3000"));
    wait_slow_started(&server);
    let signalled = Instant::now();
    signal(server.proc.pid(), libc::SIGTERM);
    // The idle connection sees a clean EOF, after the grace.
    let err = idle.get("/ping").err();
    let closed_after = signalled.elapsed();
    // Either it was answered (the request raced in inside the grace) or closed cleanly.
    if let Some(e) = err {
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
        assert!(
            closed_after >= Duration::from_millis(700),
            "closed after {closed_after:?}, before the grace"
        );
    }
    assert_eq!(slow.join().unwrap().unwrap().status, 200);
    assert_eq!(server.proc.wait_exit(PATIENCE), Some(0));
}

#[test]
fn sigusr2_hammers_in_flight_requests() {
    let mut server = Server::start(&[]);
    let addr = server.addr;
    let slow = std::thread::spawn(move || reborn_testkit::get(addr, "/ping?sleep_ms=20000"));
    wait_slow_started(&server);
    let t = Instant::now();
    signal(server.proc.pid(), libc::SIGUSR2);
    assert!(slow.join().unwrap().is_err(), "the request is cut off");
    assert_eq!(server.proc.wait_exit(PATIENCE), Some(0));
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "the hammer did not wait for the request"
    );
}

#[test]
fn the_drain_deadline_hammers_what_is_left() {
    let mut server = Server::start(&["--drain-timeout-ms", "700"]);
    let addr = server.addr;
    let slow = std::thread::spawn(move || reborn_testkit::get(addr, "/ping?sleep_ms=20000"));
    wait_slow_started(&server);
    signal(server.proc.pid(), libc::SIGTERM);
    assert!(slow.join().unwrap().is_err(), "cut off at the deadline");
    assert_eq!(server.proc.wait_exit(PATIENCE), Some(0));
    server.proc.wait_line("the deadline's log line", |l| {
        l.contains("drain deadline").then_some(())
    });
}

#[test]
fn user_hooks_run_on_sigusr1_and_sigtstp() {
    let server = Server::start(&[]);
    signal(server.proc.pid(), libc::SIGUSR1);
    server.proc.wait_line("the USR1 hooks", |l| {
        (l == "hook: after SIGUSR1").then_some(())
    });
    signal(server.proc.pid(), libc::SIGTSTP);
    server.proc.wait_line("the TSTP hooks", |l| {
        (l == "hook: after SIGTSTP").then_some(())
    });
    let out = server.proc.output();
    assert!(out.contains("hook: before SIGUSR1"));
    // Neither signal stopped or killed it.
    assert_eq!(body_pid(&server.get("/ping").body), Some(server.proc.pid()));
}

#[test]
fn http2_clients_get_goaway_and_their_streams_finish() {
    let mut server = Server::start(&[]);
    http2_stream_finishes_then_goaway(&server, libc::SIGTERM);
    assert_eq!(server.proc.wait_exit(PATIENCE), Some(0));
}

/// HTTP/2 connections are not handed to the next generation (only plain HTTP/1.1 moves):
/// at an upgrade too they get GOAWAY, their open streams finish, and the old generation
/// exits.
#[test]
fn http2_clients_get_goaway_at_an_upgrade_too() {
    let mut server = Server::start(&[]);
    let old = server.proc.pid();
    http2_stream_finishes_then_goaway(&server, libc::SIGHUP);
    assert_eq!(server.proc.wait_exit(PATIENCE), Some(0));
    assert_ne!(server.serving_pid(), Some(old));
    server.stop_current();
}

/// An HTTP/2 connection with a slow stream open when `signal` arrives: the stream
/// finishes, then the server ends the connection gracefully (GOAWAY), not with a reset.
fn http2_stream_finishes_then_goaway(server: &Server, signal_number: libc::c_int) {
    use http_body_util::{BodyExt, Empty};
    use hyper::body::Bytes;
    let addr = server.addr;
    let pid = server.proc.pid();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .unwrap();
        let conn = tokio::spawn(conn);
        let req = |path: &str| {
            http::Request::get(format!("http://{addr}{path}"))
                .body(Empty::<Bytes>::new())
                .unwrap()
        };
        let first = sender.send_request(req("/ping")).await.unwrap();
        assert_eq!(first.version(), http::Version::HTTP_2);
        let slow = tokio::spawn(sender.send_request(req("/ping?sleep_ms=1500")));
        tokio::task::block_in_place(|| wait_slow_started(server));
        signal(pid, signal_number);
        let resp = slow
            .await
            .unwrap()
            .expect("the open stream finishes, not reset");
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(body.starts_with(b"pong"));
        // The server ended the connection gracefully (GOAWAY), not with an error.
        let ended = tokio::time::timeout(PATIENCE, conn)
            .await
            .expect("the connection ends");
        ended.unwrap().expect("a graceful GOAWAY, not a reset");
    });
}

#[test]
fn a_panicking_hook_does_not_end_signal_handling() {
    let mut server = Server::start(&["--panic-on-usr1"]);
    signal(server.proc.pid(), libc::SIGUSR1);
    server.proc.wait_line("the logged panic", |l| {
        l.contains("hook panicked").then_some(())
    });
    signal(server.proc.pid(), libc::SIGTERM);
    assert_eq!(server.proc.wait_exit(PATIENCE), Some(0));
}

/// After an upgrade, the old generation drains; a Ctrl-C (SIGINT) it gets then is a
/// first request to stop, not the impatient second one: its requests still finish.
#[test]
fn the_first_sigint_after_an_upgrade_does_not_hammer() {
    let mut server = Server::start(&[]);
    let old = server.proc.pid();
    let addr = server.addr;
    let slow = std::thread::spawn(move || reborn_testkit::get(addr, "/ping?sleep_ms=1500"));
    wait_slow_started(&server);
    signal(old, libc::SIGHUP);
    server.wait_new_pid(old);
    signal(old, libc::SIGINT);
    let resp = slow.join().unwrap().expect("the slow request finishes");
    assert_eq!(body_pid(&resp.body), Some(old));
    assert_eq!(server.proc.wait_exit(PATIENCE), Some(0));
    server.stop_current();
}
