//! Long-lived connections through upgrades, with real clients: WebSockets (tokio-tungstenite)
//! are closed with `1012 Service Restart` at their connection's moment, spread over the
//! eviction window, and reconnect to the new generation; one that ignores the close is
//! cut at the deadline; a handler that ignores the moment still gets its client a close
//! frame from the hammer; server-sent event clients resume with `Last-Event-ID`.

mod common;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use reborn_testkit::{Load, PATIENCE, alive, signal, wait_for};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime")
}

/// The PID at the end of a `... pid=P` message.
fn pid_of(text: &str) -> Option<u32> {
    common::body_pid(text)
}

/// What one WebSocket client saw, across its reconnections.
#[derive(Debug, Default)]
struct Seen {
    /// The generation its current connection is served by.
    serving: Option<u32>,
    /// Each clean close: the generation that closed it, and when.
    closes: Vec<(u32, Instant)>,
    /// From a close to the first answer of the next connection.
    reconnects: Vec<Duration>,
    /// Anything else: a close without a frame (1006), a wrong code, a lost message.
    abnormal: Vec<String>,
}

type Board = Arc<Mutex<Vec<Seen>>>;

/// The events one SSE client has read: `(id, data)`.
type EventLog = Arc<Mutex<Vec<(u64, String)>>>;

fn note(board: &Board, me: usize, f: impl FnOnce(&mut Seen)) {
    f(&mut board.lock().unwrap_or_else(|e| e.into_inner())[me]);
}

/// One client: connects, says hello (its answer names the generation), reads ticks until
/// the server closes, checks that the close is 1012 after every tick and the server's
/// `last N`, and reconnects at once. Until `stop`.
async fn ws_client(
    url: String,
    me: usize,
    board: Board,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut closed_at: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(300);
    while !*stop.borrow() && Instant::now() < deadline {
        let mut ws = match tokio_tungstenite::connect_async(url.as_str()).await {
            Ok((ws, _)) => ws,
            Err(e) => {
                note(&board, me, |s| s.abnormal.push(format!("connect: {e}")));
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        if let Err(e) = ws.send(Message::text(format!("hello {me}"))).await {
            note(&board, me, |s| s.abnormal.push(format!("hello: {e}")));
            continue;
        }
        let mut ticks = 0u64;
        let mut last_said = false;
        let mut pid = None;
        loop {
            let msg = tokio::select! {
                msg = ws.next() => msg,
                _ = stop.changed() => {
                    let _ = ws.close(None).await;
                    return;
                }
            };
            match msg {
                Some(Ok(Message::Text(t))) => {
                    let t = t.as_str();
                    if t.starts_with("echo ") {
                        pid = pid_of(t);
                        let since = closed_at.take().map(|c| c.elapsed());
                        note(&board, me, |s| {
                            s.serving = pid;
                            s.reconnects.extend(since);
                        });
                    } else if let Some(rest) = t.strip_prefix("tick ") {
                        let n: u64 = rest
                            .split(' ')
                            .next()
                            .and_then(|n| n.parse().ok())
                            .unwrap_or(0);
                        if n != ticks + 1 {
                            note(&board, me, |s| {
                                s.abnormal.push(format!("tick {n} after {ticks}"))
                            });
                        }
                        ticks = n;
                    } else if let Some(rest) = t.strip_prefix("last ") {
                        let n: u64 = rest
                            .split(' ')
                            .next()
                            .and_then(|n| n.parse().ok())
                            .unwrap_or(0);
                        if n != ticks {
                            note(&board, me, |s| {
                                s.abnormal.push(format!("last {n} after tick {ticks}"))
                            });
                        }
                        last_said = true;
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    let at = Instant::now();
                    let code = frame.as_ref().map(|f| f.code);
                    note(&board, me, |s| match (code, pid) {
                        (Some(CloseCode::Restart), Some(p)) if last_said => s.closes.push((p, at)),
                        _ => s.abnormal.push(format!(
                            "close {code:?} from {pid:?}, last said: {last_said}"
                        )),
                    });
                    closed_at = Some(at);
                    // Our answer to the close goes out as we read on; the server then closes.
                    let _ = tokio::time::timeout(PATIENCE, async {
                        while let Some(Ok(_)) = ws.next().await {}
                    })
                    .await;
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    note(&board, me, |s| {
                        s.abnormal.push(format!("abnormal close (1006): {e}"))
                    });
                    break;
                }
                None => {
                    note(&board, me, |s| {
                        s.abnormal
                            .push("abnormal close (1006): no close frame".into())
                    });
                    break;
                }
            }
        }
    }
}

/// Waits for `pid` to be gone (the first generation is our child: reap it).
fn wait_gone(server: &mut common::Server, pid: u32) {
    if pid == server.proc.pid() {
        server.proc.assert_exits_with(0);
    } else {
        wait_for(&format!("pid {pid} to exit"), PATIENCE, || {
            (!alive(pid)).then_some(())
        });
    }
}

#[test]
fn two_hundred_websockets_through_ten_upgrades_close_with_1012_and_reconnect_to_the_new_generation()
{
    const CLIENTS: usize = 200;
    const UPGRADES: usize = 10;
    let window = Duration::from_millis(1500);
    let mut server = common::Server::start(&[
        "--drain-timeout-ms",
        "120000",
        "--eviction-window-ms",
        &window.as_millis().to_string(),
    ]);
    let rt = runtime();
    let board: Board = Arc::new(Mutex::new((0..CLIENTS).map(|_| Seen::default()).collect()));
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let url = format!("ws://{}/ws", server.addr);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|me| rt.spawn(ws_client(url.clone(), me, board.clone(), stop.clone())))
        .collect();
    let all_served_by = |pid: u32| {
        board
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .all(|s| s.serving == Some(pid))
    };
    let mut pid = server.proc.pid();
    wait_for("every client to be connected", PATIENCE, || {
        all_served_by(pid).then_some(())
    });
    let load = Load::start(server.addr, "/ping", 2, 1);
    let mut generations = vec![pid];
    for round in 0..UPGRADES {
        let old = pid;
        server.deploy_variant(&format!("v{round}"));
        signal(old, libc::SIGHUP);
        pid = server.wait_new_pid(old);
        generations.push(pid);
        wait_gone(&mut server, old);
        wait_for(
            &format!("every client to reconnect to {pid}"),
            PATIENCE,
            || all_served_by(pid).then_some(()),
        );
    }
    let _ = stop_tx.send(true);
    rt.block_on(async {
        for c in clients {
            let _ = c.await;
        }
    });
    let report = load.finish_without_failures();
    assert!(report.ok > 0);

    let seen = board.lock().unwrap_or_else(|e| e.into_inner());
    let abnormal: Vec<_> = seen
        .iter()
        .flat_map(|s| s.abnormal.iter())
        .take(10)
        .collect();
    assert!(
        abnormal.is_empty(),
        "clients saw abnormal closes: {abnormal:?}"
    );
    for (me, s) in seen.iter().enumerate() {
        let closed_by: Vec<u32> = s.closes.iter().map(|(p, _)| *p).collect();
        assert_eq!(
            closed_by,
            generations[..UPGRADES],
            "client {me} is closed once by each old generation, and reconnects to the next"
        );
    }
    // Each generation's closes are spread over the window, not all at once.
    for old in &generations[..UPGRADES] {
        let times: Vec<Instant> = seen
            .iter()
            .flat_map(|s| s.closes.iter().filter(|(p, _)| p == old).map(|(_, t)| *t))
            .collect();
        let first = *times.iter().min().expect("closes");
        let last = *times.iter().max().expect("closes");
        let spread = last - first;
        assert!(
            spread >= window / 2 && spread <= window + Duration::from_secs(2),
            "the closes of {old} span {spread:?}, for a window of {window:?}"
        );
    }
    let slowest = seen.iter().flat_map(|s| s.reconnects.iter()).max().copied();
    println!("slowest reconnection: {slowest:?}");
    drop(seen);
    server.stop_current();
}

/// Opens a WebSocket by hand (so that it can ignore the protocol) and reads the `101`.
fn raw_websocket(addr: SocketAddr, path: &str) -> TcpStream {
    common::upgrade(
        addr,
        path,
        "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
    )
}

/// The close frame the server sends next (other messages are skipped), within PATIENCE.
async fn next_close<S>(
    ws: &mut tokio_tungstenite::WebSocketStream<S>,
) -> Option<tokio_tungstenite::tungstenite::protocol::CloseFrame>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        match tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("a close before the patience ends")
        {
            Some(Ok(Message::Close(frame))) => return frame,
            Some(Ok(_)) => {}
            other => panic!("a close frame, not {other:?}"),
        }
    }
}

/// The frames (opcode, payload) a server sends until it closes the connection.
fn frames_until_eof(s: &mut TcpStream) -> Vec<(u8, Vec<u8>)> {
    let mut bytes = Vec::new();
    s.read_to_end(&mut bytes)
        .expect("read until the server closes");
    let mut frames = Vec::new();
    let mut at = 0;
    while at + 2 <= bytes.len() {
        let opcode = bytes[at] & 0x0f;
        let (len, header) = match bytes[at + 1] & 0x7f {
            126 => (
                u16::from_be_bytes([bytes[at + 2], bytes[at + 3]]) as usize,
                4,
            ),
            127 => panic!("no frame here is that long"),
            n => (n as usize, 2),
        };
        frames.push((opcode, bytes[at + header..at + header + len].to_vec()));
        at += header + len;
    }
    assert_eq!(at, bytes.len(), "whole frames only");
    frames
}

fn close_code(payload: &[u8]) -> u16 {
    u16::from_be_bytes([payload[0], payload[1]])
}

#[test]
fn a_websocket_client_that_ignores_the_close_is_cut_at_the_deadline() {
    let mut server =
        common::Server::start(&["--drain-timeout-ms", "2000", "--eviction-window-ms", "10"]);
    let old = server.proc.pid();
    let mut ws = raw_websocket(server.addr, "/ws?tick_ms=100");
    server.deploy_variant("v2");
    let signalled = Instant::now();
    signal(old, libc::SIGHUP);
    server.wait_new_pid(old);
    // The client never answers the close: the connection stays until the deadline.
    let frames = frames_until_eof(&mut ws);
    let cut_after = signalled.elapsed();
    let closes: Vec<u16> = frames
        .iter()
        .filter(|(op, _)| *op == 0x8)
        .map(|(_, p)| close_code(p))
        .collect();
    assert_eq!(
        closes,
        [1012],
        "one close frame, the application's: {frames:?}"
    );
    assert!(
        cut_after >= Duration::from_secs(2),
        "cut at the deadline, not before: {cut_after:?}"
    );
    server.proc.assert_exits_with(0);
    // Written just before the exit: the reader may not have it yet.
    server.proc.wait_line("the cut", |l| {
        l.contains("cut before the client answered").then_some(())
    });
    server.stop_current();
}

#[test]
fn the_hammer_sends_a_close_frame_to_a_websocket_whose_handler_ignores_the_moment() {
    // At an upgrade: 1012, the new generation serves.
    let mut server = common::Server::start(&["--drain-timeout-ms", "1000"]);
    let old = server.proc.pid();
    let rt = runtime();
    let url = format!("ws://{}/ws?leave=false&tick_ms=50", server.addr);
    let mut ws = rt
        .block_on(tokio_tungstenite::connect_async(url.as_str()))
        .expect("connect")
        .0;
    server.deploy_variant("v2");
    signal(old, libc::SIGHUP);
    let new = server.wait_new_pid(old);
    let close = rt.block_on(next_close(&mut ws));
    assert_eq!(close.map(|f| f.code), Some(CloseCode::Restart));
    server.proc.assert_exits_with(0);

    // At a shutdown: 1001, going away.
    let url = format!("ws://{}/ws?leave=false&tick_ms=50", server.addr);
    let mut ws = rt
        .block_on(tokio_tungstenite::connect_async(url.as_str()))
        .expect("connect")
        .0;
    rt.block_on(async {
        // Served by the new generation before it is stopped.
        while let Some(Ok(msg)) = ws.next().await {
            if msg.to_text().is_ok_and(|t| t.starts_with("tick")) {
                break;
            }
        }
    });
    signal(new, libc::SIGTERM);
    let close = rt.block_on(next_close(&mut ws));
    assert_eq!(close.map(|f| f.code), Some(CloseCode::Away));
    wait_gone(&mut server, new);
}

/// A request for an event stream at `path`, resuming after `last_id` if given.
fn events_request(path: &str, last_id: Option<u64>) -> http::request::Builder {
    let request = http::Request::get(path)
        .header("host", "x")
        .header("accept", "text/event-stream");
    match last_id {
        Some(id) => request.header("last-event-id", id.to_string()),
        None => request,
    }
}

/// One server-sent event's `(id, data)`, from its block of lines.
fn parse_event(block: &str) -> Option<(u64, String)> {
    let mut id = None;
    let mut payload = None;
    for line in block.lines() {
        if let Some(v) = line.strip_prefix("id:") {
            id = v.trim().parse().ok();
        } else if let Some(v) = line.strip_prefix("data:") {
            payload = Some(v.trim().to_owned());
        }
    }
    Some((id?, payload?))
}

/// Reads one server-sent event stream from `last_id` on, putting each event's `(id,
/// data)` in `events` as it arrives, until the stream ends or `stop`.
async fn read_events(
    addr: SocketAddr,
    last_id: Option<u64>,
    events: &Mutex<Vec<(u64, String)>>,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) {
    use http_body_util::BodyExt;
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .expect("a handshake");
    tokio::spawn(conn);
    let response = send
        .send_request(
            events_request("/events", last_id)
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .expect("a request"),
        )
        .await
        .expect("a response");
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut text = String::new();
    loop {
        let frame = tokio::select! {
            frame = body.frame() => frame,
            _ = stop.changed() => return,
        };
        let Some(frame) = frame else { return };
        let frame = frame.expect("the stream ends cleanly, never cut");
        let Ok(data) = frame.into_data() else {
            continue;
        };
        text.push_str(std::str::from_utf8(&data).expect("utf-8"));
        while let Some((block, rest)) = text.split_once("\n\n") {
            if let Some(event) = parse_event(block) {
                events.lock().unwrap_or_else(|e| e.into_inner()).push(event);
            }
            text = rest.to_owned();
        }
    }
}

#[test]
fn server_sent_event_clients_resume_with_last_event_id_and_lose_nothing() {
    const UPGRADES: usize = 3;
    const CLIENTS: usize = 4;
    let mut server =
        common::Server::start(&["--drain-timeout-ms", "30000", "--eviction-window-ms", "300"]);
    let addr = server.addr;
    let rt = runtime();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let logs: Vec<EventLog> = (0..CLIENTS)
        .map(|_| Arc::new(Mutex::new(Vec::new())))
        .collect();
    // Each client reads stream after stream, resuming from the last event it saw.
    let clients: Vec<_> = logs
        .iter()
        .map(|log| {
            let (log, mut stop) = (log.clone(), stop.clone());
            rt.spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(120);
                while !*stop.borrow() && Instant::now() < deadline {
                    let last = log
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .last()
                        .map(|(id, _)| *id);
                    read_events(addr, last, &log, &mut stop).await;
                }
            })
        })
        .collect();
    let has_events_from = |pid: u32| {
        logs.iter().all(|log| {
            log.lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .any(|(_, data)| pid_of(data) == Some(pid))
        })
    };
    let mut pid = server.proc.pid();
    for round in 0..=UPGRADES {
        wait_for(
            &format!("every client to have events from {pid}"),
            PATIENCE,
            || has_events_from(pid).then_some(()),
        );
        if round == UPGRADES {
            break;
        }
        let old = pid;
        server.deploy_variant(&format!("v{round}"));
        signal(old, libc::SIGHUP);
        pid = server.wait_new_pid(old);
        wait_gone(&mut server, old);
    }
    let _ = stop_tx.send(true);
    rt.block_on(async {
        for c in clients {
            c.await.expect("a client");
        }
    });
    for log in logs {
        let events = log.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let ids: Vec<u64> = events.iter().map(|(id, _)| *id).collect();
        let expected: Vec<u64> = (1..=ids.len() as u64).collect();
        assert_eq!(
            ids, expected,
            "every event once, in order, across the upgrades"
        );
        for (id, data) in &events {
            assert!(data.starts_with(&format!("event {id} pid=")), "{data}");
        }
    }
    server.stop_current();
}

/// One event stream's answer on a kept connection: whether the response said
/// `Connection: close`, and the events it carried, `(id, data)`, up to its end or to the
/// first event from `until` (whose stream goes on).
async fn events_on(
    send: &mut hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    last_id: Option<u64>,
    until: u32,
) -> Option<(bool, Vec<(u64, String)>)> {
    use http_body_util::BodyExt;
    send.ready().await.ok()?;
    let response = send
        .send_request(
            events_request("/events?tick_ms=20", last_id)
                .body(http_body_util::Empty::new())
                .expect("a request"),
        )
        .await
        .ok()?;
    assert_eq!(response.status(), 200);
    let closes = response
        .headers()
        .get("connection")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    let mut body = response.into_body();
    let mut text = String::new();
    let mut events = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.ok()?.into_data() else {
            continue;
        };
        text.push_str(std::str::from_utf8(&data).expect("utf-8"));
        while let Some((block, rest)) = text.split_once("\n\n") {
            let event = parse_event(block);
            text = rest.to_owned();
            if let Some((id, payload)) = event {
                let done = pid_of(&payload) == Some(until);
                events.push((id, payload));
                if done {
                    return Some((closes, events));
                }
            }
        }
    }
    Some((closes, events))
}

/// An event-stream client that resumes on its kept connection (as a browser's
/// `EventSource` does, through its connection pool): once its stream has ended at its
/// moment, the old generation, whose successor is on probation, tells it to close
/// instead of keeping the connection for the handoff and serving it again (with its
/// moment passed, an empty stream, again and again until the probation ends). The client
/// reaches the new generation at once, and no event is lost.
#[test]
fn an_event_stream_resumed_on_its_kept_connection_goes_to_the_new_generation() {
    let mut server =
        common::Server::start(&["--probation-ms", "20000", "--eviction-window-ms", "300"]);
    let old = server.proc.pid();
    let addr = server.addr;
    let rt = runtime();
    let (new, seen) = rt.block_on(async {
        let connect = || async {
            let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let (send, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                    .await
                    .expect("a handshake");
            tokio::spawn(conn);
            send
        };
        let mut send = connect().await;
        // The first stream: the old generation's, until its moment after the upgrade.
        let stream = tokio::spawn(async move {
            let answer = events_on(&mut send, None, 0).await;
            (send, answer)
        });
        let ticking = Instant::now();
        while ticking.elapsed() < Duration::from_millis(200) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        server.deploy_variant("v2");
        signal(old, libc::SIGHUP);
        let new = tokio::task::block_in_place(|| server.wait_new_pid(old));
        let (mut send, answer) = stream.await.expect("the first stream's task");
        let (_, mut seen) = answer.expect("the first stream ends cleanly");
        assert!(!seen.is_empty(), "the first stream carried events");
        // Resume, on the same connection while it is open, then on a new one.
        let resumed = Instant::now();
        let mut kept_answers = 0;
        loop {
            assert!(
                resumed.elapsed() < Duration::from_secs(10),
                "still not at the new generation after {:?} (probation 20 s): {kept_answers} \
                 answers on the kept connection",
                resumed.elapsed()
            );
            let last = seen.last().map(|(id, _)| *id);
            match events_on(&mut send, last, new).await {
                Some((closes, events)) => {
                    kept_answers += 1;
                    let at_new = events.iter().any(|(_, d)| pid_of(d) == Some(new));
                    seen.extend(events);
                    if at_new {
                        break;
                    }
                    assert!(
                        closes,
                        "an answer from the old generation on the kept connection says \
                         Connection: close"
                    );
                }
                None => send = connect().await,
            }
        }
        assert!(
            kept_answers <= 2,
            "{kept_answers} answers on the kept connection"
        );
        (new, seen)
    });
    // Every event once, in order, across the two generations.
    let ids: Vec<u64> = seen.iter().map(|(id, _)| *id).collect();
    let expected: Vec<u64> = (ids[0]..ids[0] + ids.len() as u64).collect();
    assert_eq!(ids, expected, "{seen:?}");
    assert!(seen.iter().any(|(_, d)| pid_of(d) == Some(old)));
    assert!(seen.iter().any(|(_, d)| pid_of(d) == Some(new)));
    server.stop_current();
}
