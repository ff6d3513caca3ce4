//! Idle keep-alive connections move to the next generation (`SCM_RIGHTS`) instead of
//! being closed: clients keep their connection across upgrades.

mod common;

use std::io::Write;

use common::{ping_on, read_response};
use std::net::TcpStream;

use reborn_testkit::{Load, PATIENCE, alive, fd_count, signal, wait_for};

fn wait_gone(pid: u32) {
    wait_for(&format!("pid {pid} to exit"), PATIENCE, || {
        (!alive(pid)).then_some(())
    });
}

/// Keep-alive clients that never retry, busy without a pause, through 20 upgrades: no
/// request fails, no client reconnects, and each generation answers on the connections
/// it was handed. The descriptors of each generation stay flat.
#[test]
fn keep_alive_clients_keep_their_connections_through_20_upgrades() {
    const UPGRADES: usize = 20;
    const KEEP_ALIVE: usize = 8;
    let mut server = common::Server::start(&["--probation-ms", "0"]);
    let addr = server.addr;
    let load = Load::start(addr, "/ping", KEEP_ALIVE, 0);
    load.wait_progress(100);
    let mut current = server.proc.pid();
    let mut fds = Vec::new();
    for round in 1..=UPGRADES {
        server.deploy_variant(&format!("v{round}"));
        signal(current, libc::SIGHUP);
        let next = server.wait_new_pid(current);
        wait_gone(current);
        load.wait_progress(100);
        // Each client's connection is now this generation's: no more, no fewer.
        fds.push(fd_count(next));
        current = next;
    }
    let report = load.finish_without_failures();
    assert_eq!(report.reconnects, 0, "{report:?}");
    let generations: std::collections::HashSet<_> = report
        .bodies
        .iter()
        .filter_map(|b| common::body_pid(b))
        .collect();
    assert_eq!(
        generations.len(),
        UPGRADES + 1,
        "every generation answered on the handed connections: {:?}",
        report.bodies
    );
    let (min, max) = (fds.iter().min().unwrap(), fds.iter().max().unwrap());
    assert!(max - min <= 2, "descriptors per generation: {fds:?}");
    assert!(
        server
            .proc
            .output()
            .contains(&format!("{KEEP_ALIVE} idle connection(s) handed")),
        "{}",
        server.proc.output()
    );
    server.stop_current();
}

/// A request whose head is half sent when the drain starts is answered (by the old
/// generation, which waits for it), without `Connection: close`; the connection then
/// moves, once the new generation has passed its probation, and the next request on it
/// is the new generation's.
#[test]
fn a_request_half_sent_at_the_handoff_is_answered_and_the_connection_moves() {
    let mut server = common::Server::start(&["--probation-ms", "1500"]);
    let old = server.proc.pid();
    let mut conn = TcpStream::connect(server.addr).expect("connect");
    conn.set_read_timeout(Some(PATIENCE)).unwrap();
    let first = ping_on(&mut conn).expect("a first request");
    assert_eq!(common::body_pid(&first), Some(old));
    conn.write_all(b"GET /ping HTTP/1.1\r\nHo").unwrap();
    server.deploy_variant("v2");
    signal(old, libc::SIGHUP);
    let new = server.wait_new_pid(old);
    server.proc.wait_line("the drain", |l| {
        l.contains("no longer accepting; draining").then_some(())
    });
    conn.write_all(b"st: test\r\n\r\n").unwrap();
    let answer = read_response(&mut conn).expect("the half-sent request is answered");
    assert!(answer.starts_with("http/1.1 200"), "{answer}");
    assert!(!answer.contains("connection: close"), "{answer}");
    let pid = common::body_pid(&answer);
    assert!(pid == Some(old) || pid == Some(new), "{answer}");
    // The old generation lets the connection go once the new one has passed probation.
    wait_gone(old);
    let next = ping_on(&mut conn).expect("the connection is still open");
    assert_eq!(common::body_pid(&next), Some(new), "{next}");
    server.stop_current();
}

/// A new generation that dies on probation took no connection with it: connections stay
/// with the old generation until the new one has passed, so a crash after ready loses
/// nothing and forces no reconnect. The next, good, upgrade hands them over.
#[test]
fn a_new_generation_that_dies_on_probation_takes_no_connection_with_it() {
    let mut server = common::Server::start(&["--probation-ms", "2000"]);
    let first = server.proc.pid();
    let load = Load::start(server.addr, "/ping", 8, 0);
    load.wait_progress(100);
    server.deploy_variant("\nknob:abort-after-ready-ms=300\n");
    signal(first, libc::SIGHUP);
    server
        .proc
        .wait_line("the rollback", |l| l.contains("rolled back").then_some(()));
    load.wait_progress(100);
    assert_eq!(load.snapshot().reconnects, 0, "{:?}", load.snapshot());
    server.deploy_variant("v3");
    signal(first, libc::SIGHUP);
    let next = server.wait_new_pid(first);
    wait_gone(first);
    load.wait_progress(100);
    let report = load.finish_without_failures();
    assert_eq!(report.reconnects, 0, "{report:?}");
    assert!(
        report
            .bodies
            .iter()
            .any(|b| common::body_pid(b) == Some(next)),
        "the good generation answers on the handed connections: {:?}",
        report.bodies
    );
    server.stop_current();
}

/// An upgrade of a generation still on probation: the generation before it ends its own
/// wait and hands its idle connections to the one being upgraded, which serves them at
/// once while it waits out its successor's probation, instead of holding them unread
/// until that ends.
#[test]
fn connections_handed_to_a_generation_being_upgraded_are_served_at_once() {
    let probation = std::time::Duration::from_secs(20);
    let mut server = common::Server::start(&["--probation-ms", "20000"]);
    let first = server.proc.pid();
    let mut conn = TcpStream::connect(server.addr).expect("connect");
    conn.set_read_timeout(Some(PATIENCE)).unwrap();
    let answer = ping_on(&mut conn).expect("a first request");
    assert_eq!(common::body_pid(&answer), Some(first), "{answer}");
    server.deploy_variant("v2");
    signal(first, libc::SIGHUP);
    let second = server.wait_new_pid(first);
    // The connection waits in the first generation for the second's probation; the
    // second's own upgrade ends that wait.
    server.deploy_variant("v3");
    signal(second, libc::SIGHUP);
    let third = server.wait_new_pid(second);
    if reborn_testkit::poll_until(PATIENCE, || (!alive(first)).then_some(())).is_none() {
        panic!(
            "the first generation is still there:\n{}",
            server.proc.output()
        );
    }
    let asked = std::time::Instant::now();
    let answer = ping_on(&mut conn).expect("the handed connection is served");
    let took = asked.elapsed();
    assert_eq!(common::body_pid(&answer), Some(second), "{answer}");
    assert!(
        took < probation / 2,
        "the answer took {took:?}: held until the end of the probation ({probation:?})"
    );
    drop(conn);
    server.stop_current();
    assert_ne!(third, second);
    if reborn_testkit::poll_until(PATIENCE, || (!alive(second)).then_some(())).is_none() {
        panic!(
            "the second generation is still there:\n{}",
            server.proc.output()
        );
    }
}

/// `hand_over_idle_connections(false)` keeps the usual drain: keep-alive clients are
/// told `Connection: close` and reconnect.
#[test]
fn with_handoff_off_keep_alive_clients_reconnect() {
    let mut server = common::Server::start(&["--probation-ms", "0", "--no-handoff"]);
    let old = server.proc.pid();
    let load = Load::start(server.addr, "/ping", 4, 0);
    load.wait_progress(50);
    server.deploy_variant("v2");
    signal(old, libc::SIGHUP);
    server.wait_new_pid(old);
    wait_gone(old);
    // A reconnection is counted once its first request is answered.
    wait_for("every client to reconnect", PATIENCE, || {
        (load.snapshot().reconnects >= 4).then_some(())
    });
    let report = load.finish_without_failures();
    assert!(report.reconnects >= 4, "{report:?}");
    server.stop_current();
}

/// A connection the new generation refuses (it serves another listener now) falls back
/// to the usual drain: from then on its answers say `Connection: close`, so its client
/// leaves between requests instead of meeting the idle grace's close under a request.
#[test]
fn a_connection_the_new_generation_refuses_is_told_to_close() {
    use std::io::Read;
    use std::time::{Duration, Instant};
    let mut server = common::Server::start(&["--probation-ms", "0", "--idle-grace-ms", "60000"]);
    let old = server.proc.pid();
    let mut conn = TcpStream::connect(server.addr).expect("connect");
    conn.set_read_timeout(Some(PATIENCE)).unwrap();
    let first = ping_on(&mut conn).expect("a first request");
    assert_eq!(common::body_pid(&first), Some(old));
    server.deploy_variant("\nknob:listener=web@127.0.0.2:0\nknob:close-unclaimed=1\n");
    signal(old, libc::SIGHUP);
    server.wait_pid_file_moves_from(old);
    server.proc.wait_line("the drain", |l| {
        l.contains("no longer accepting; draining").then_some(())
    });
    // The idle grace (60 s) cannot end it meanwhile: only the fallback says close.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = ping_on(&mut conn).expect("every request on the kept connection is answered");
        assert_eq!(common::body_pid(&answer), Some(old), "{answer}");
        if answer.contains("connection: close") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "20 s after the drain began, the refused connection's answers still did not say \
             Connection: close"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut rest = [0u8; 1];
    assert_eq!(conn.read(&mut rest).expect("a clean close"), 0);
    server.proc.wait_line("the drain's counts", |l| {
        l.contains("0 idle connection(s) handed to the next generation, 1 kept")
            .then_some(())
    });
    wait_gone(old);
    server.stop_current();
}

/// Requests sent right at the moment of a handoff: 12 keep-alive clients, each pausing a
/// different few hundred microseconds between its requests so that their next requests
/// fall before, at and after the moment their connection changes hands, through 10
/// upgrades. Every request is answered, on the client's one connection.
#[test]
fn requests_sent_at_the_moment_of_the_handoff_are_all_answered() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
    use std::time::{Duration, Instant};
    const CLIENTS: u64 = 12;
    let mut server = common::Server::start(&["--probation-ms", "0"]);
    let addr = server.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    // The PID of each client's latest answer.
    let latest: Arc<Vec<AtomicU32>> = Arc::new((0..CLIENTS).map(|_| AtomicU32::new(0)).collect());
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (stop, answered, latest) = (stop.clone(), answered.clone(), latest.clone());
            std::thread::spawn(move || -> Result<(u64, Option<u32>), String> {
                let mut conn = TcpStream::connect(addr).map_err(|e| e.to_string())?;
                conn.set_read_timeout(Some(PATIENCE))
                    .map_err(|e| e.to_string())?;
                let pause = Duration::from_micros(i * 50);
                let deadline = Instant::now() + Duration::from_secs(120);
                let (mut n, mut last) = (0, None);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let answer =
                        ping_on(&mut conn).map_err(|e| format!("client {i}, request {n}: {e}"))?;
                    if !answer.starts_with("http/1.1 200") || answer.contains("connection: close") {
                        return Err(format!("client {i}, request {n}: {answer}"));
                    }
                    n += 1;
                    last = common::body_pid(&answer);
                    latest[i as usize].store(last.unwrap_or(0), Ordering::Relaxed);
                    answered.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(pause);
                }
                Ok((n, last))
            })
        })
        .collect();
    let progress = |n: u64| {
        let start = answered.load(Ordering::Relaxed);
        wait_for("the clients to make progress", PATIENCE, || {
            (answered.load(Ordering::Relaxed) >= start + n).then_some(())
        });
    };
    progress(200);
    let mut current = server.proc.pid();
    for round in 1..=10 {
        server.deploy_variant(&format!("v{round}"));
        signal(current, libc::SIGHUP);
        let next = server.wait_new_pid(current);
        wait_gone(current);
        progress(200);
        current = next;
    }
    // A client the scheduler left behind may not have sent its next request yet.
    wait_for(
        "every client to be answered by the last generation",
        PATIENCE,
        || {
            latest
                .iter()
                .all(|p| p.load(Ordering::Relaxed) == current)
                .then_some(())
        },
    );
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let (n, last) = c
            .join()
            .expect("client thread")
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(n > 0);
        // Its one connection now belongs to the last generation.
        assert_eq!(last, Some(current));
    }
    server.stop_current();
}
