//! Idle keep-alive connections through an upgrade: open many, each with one answered
//! request, upgrade, and watch each one: it must either be closed cleanly (EOF, no reset)
//! within the idle grace + 1 s of the old generation starting its drain, or, handed to
//! the new generation (a self-upgrade hands idle connections over), still be open and
//! answer its next request from the new generation. A few send one more request during
//! the grace and must get an answer, not a reset.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::load::{Generations, parse_pong};
use crate::restart::{Target, TargetOpts};
use crate::stats::Spread;

/// Settings of an idle run.
#[derive(Debug, Clone)]
pub struct IdleRun {
    /// The server and how to upgrade it.
    pub target: TargetOpts,
    /// Connections to open.
    pub connections: usize,
    /// Of those, how many send a request during the grace.
    pub active: usize,
    /// The server's idle grace.
    pub idle_grace: Duration,
}

/// Reads one HTTP/1.1 response with a `Content-Length` body from `s` (bytes already read
/// are in `buf`). Returns (status, connection: close?, body).
async fn read_response(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> std::io::Result<(u16, bool, Vec<u8>)> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            let close = head
                .lines()
                .any(|l| l.starts_with("connection:") && l.contains("close"));
            while buf.len() < end + 4 + len {
                let mut chunk = [0u8; 4096];
                let n = s.read(&mut chunk).await?;
                if n == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = buf[end + 4..end + 4 + len].to_vec();
            buf.drain(..end + 4 + len);
            return Ok((status, close, body));
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

const REQUEST: &[u8] = b"GET /ping HTTP/1.1\r\nHost: bench\r\n\r\n";

/// How a watched connection ended.
#[derive(Debug)]
enum End {
    /// Closed cleanly (EOF) this long after the signal; for active ones, after an answer.
    Closed(Duration),
    /// Reset (or another error) this long after the signal.
    Reset(Duration, String),
    /// Unexpected bytes from the server on an idle connection.
    Data,
    /// Still open at the end of the watch, and then answered by this process (handed
    /// over to it).
    Handed(u32),
    /// Still open at the end of the watch, and then not answered.
    Open(String),
    /// Active: the request got no answer (connection closed or reset under it).
    Unanswered(String),
}

async fn watch_idle(mut s: TcpStream, t0: Instant, limit: Duration) -> End {
    let mut b = [0u8; 64];
    match tokio::time::timeout(limit, s.read(&mut b)).await {
        Ok(Ok(0)) => End::Closed(t0.elapsed()),
        Ok(Ok(_)) => End::Data,
        Ok(Err(e)) => End::Reset(t0.elapsed(), format!("{:?}", e.kind())),
        // Still open: handed over? Then its next request is answered.
        Err(_) => {
            if let Err(e) = s.write_all(REQUEST).await {
                return End::Open(format!("write: {:?}", e.kind()));
            }
            let mut buf = Vec::new();
            match tokio::time::timeout(Duration::from_secs(10), read_response(&mut s, &mut buf))
                .await
            {
                Ok(Ok((200, _, body))) => match parse_pong(&body) {
                    Some(pong) => End::Handed(pong.pid),
                    None => End::Open("a wrong body".into()),
                },
                Ok(Ok((status, _, _))) => End::Open(format!("status {status}")),
                Ok(Err(e)) => End::Open(format!("{:?}", e.kind())),
                Err(_) => End::Open("timed out".into()),
            }
        }
    }
}

async fn watch_active(
    mut s: TcpStream,
    t0: Instant,
    delay: Duration,
    limit: Duration,
) -> (End, bool) {
    tokio::time::sleep(delay).await;
    if let Err(e) = s.write_all(REQUEST).await {
        return (End::Unanswered(format!("write: {:?}", e.kind())), false);
    }
    let mut buf = Vec::new();
    let close = match tokio::time::timeout(limit, read_response(&mut s, &mut buf)).await {
        Ok(Ok((200, close, body))) if parse_pong(&body).is_some() => close,
        Ok(Ok((status, _, _))) => return (End::Unanswered(format!("status {status}")), false),
        Ok(Err(e)) => return (End::Unanswered(format!("{:?}", e.kind())), false),
        Err(_) => return (End::Unanswered("timed out".into()), false),
    };
    (watch_idle(s, t0, limit).await, close)
}

fn show(v: Option<u64>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

/// Runs the idle scenario; returns the JSON report and a readable text.
pub async fn run(
    cfg: IdleRun,
) -> Result<(serde_json::Value, String), Box<dyn std::error::Error + Send + Sync>> {
    let mut target = Target::start(cfg.target.clone()).await?;
    let addr = target.addr;
    // Open the connections, a few hundred at a time, each with one answered request.
    let sem = Arc::new(tokio::sync::Semaphore::new(256));
    let mut opening = Vec::with_capacity(cfg.connections);
    for _ in 0..cfg.connections {
        let sem = sem.clone();
        opening.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await.map_err(|e| e.to_string())?;
            let mut s = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
                .await
                .map_err(|_| "connect timed out".to_string())?
                .map_err(|e| format!("connect: {:?}", e.kind()))?;
            let _ = s.set_nodelay(true);
            s.write_all(REQUEST)
                .await
                .map_err(|e| format!("write: {:?}", e.kind()))?;
            let mut buf = Vec::new();
            let (status, close, body) =
                tokio::time::timeout(Duration::from_secs(10), read_response(&mut s, &mut buf))
                    .await
                    .map_err(|_| "response timed out".to_string())?
                    .map_err(|e| format!("read: {:?}", e.kind()))?;
            let pong = parse_pong(&body).ok_or_else(|| format!("status {status}, wrong body"))?;
            if close {
                return Err("the server closed a fresh keep-alive connection".to_string());
            }
            Ok::<_, String>((s, pong.pid))
        }));
    }
    let mut conns = Vec::with_capacity(cfg.connections);
    let mut setup_errors: Vec<String> = Vec::new();
    for o in opening {
        match o.await {
            Ok(Ok(c)) => conns.push(c),
            Ok(Err(e)) => setup_errors.push(e),
            Err(e) => setup_errors.push(e.to_string()),
        }
    }
    let before = target.processes(&Generations::default());
    let old_pid = target.current_pid;
    let on_old = conns.iter().filter(|(_, p)| *p == old_pid).count();

    // Watch every connection from the signal on.
    let gens = Arc::new(Generations::default());
    let t0 = Instant::now();
    let limit = cfg.idle_grace + Duration::from_secs(10);
    let active = cfg.active.min(conns.len());
    let mut watchers = Vec::with_capacity(conns.len());
    for (i, (s, _)) in conns.into_iter().enumerate() {
        if i < active {
            // Spread over the first 90 % of the grace, after the restart is committed
            // (the restart below takes a few ms; the delay counts from the signal).
            let delay = cfg
                .idle_grace
                .mul_f64(0.9 * i as f64 / active.max(1) as f64);
            watchers.push(tokio::spawn(async move {
                watch_active(s, t0, delay, limit).await
            }));
        } else {
            watchers.push(tokio::spawn(async move {
                (watch_idle(s, t0, limit).await, false)
            }));
        }
    }
    let rec = target.restart(0, &gens, t0, true).await;
    let signal_to_t0 = rec
        .signal_at
        .map(|s| s.saturating_duration_since(t0))
        .unwrap_or_default();
    let mut closes = Vec::new();
    let (
        mut clean,
        mut reset,
        mut data,
        mut open,
        mut unanswered,
        mut answered,
        mut answered_close,
    ) = (0, 0, 0, 0, 0, 0, 0);
    // Handed over and answered by the new generation; by another process (wrongly).
    let (mut handed, mut handed_elsewhere) = (0, 0);
    let mut errors = crate::stats::ErrorSamples::default();
    for (i, w) in watchers.into_iter().enumerate() {
        let (end, close) = match w.await {
            Ok(v) => v,
            Err(e) => (End::Unanswered(e.to_string()), false),
        };
        if i < active && !matches!(end, End::Unanswered(_)) {
            answered += 1;
            if close {
                answered_close += 1;
            }
        }
        match end {
            End::Closed(d) => {
                clean += 1;
                closes.push(d.saturating_sub(signal_to_t0));
            }
            End::Reset(d, e) => {
                reset += 1;
                closes.push(d.saturating_sub(signal_to_t0));
                errors.add(format!("reset: {e}"));
            }
            End::Data => data += 1,
            End::Handed(pid) if pid != old_pid => handed += 1,
            End::Handed(pid) => {
                handed_elsewhere += 1;
                errors.add(format!("still served by the old generation (pid {pid})"));
            }
            End::Open(e) => {
                open += 1;
                errors.add(format!("open but unanswered: {e}"));
            }
            End::Unanswered(e) => {
                unanswered += 1;
                errors.add(format!("active request unanswered: {e}"));
            }
        }
    }
    let mut recs = vec![rec];
    target
        .collect_drains(&mut recs, cfg.idle_grace + Duration::from_secs(15))
        .await;
    let rec = recs.remove(0);
    let after = target.processes(&gens);
    target.stop().await;

    let spread = Spread::of(closes.iter().copied());
    let mut sorted: Vec<f64> = closes.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let deciles: Vec<f64> = (0..=10)
        .filter_map(|i| sorted.get(((sorted.len().max(1) - 1) * i) / 10).copied())
        .collect();
    let commit_ms = rec.commit_ms.or(rec.handoff_ms).unwrap_or(0.0);
    let deadline_ms = commit_ms + cfg.idle_grace.as_secs_f64() * 1000.0 + 1000.0;
    let late = closes
        .iter()
        .filter(|d| d.as_secs_f64() * 1000.0 > deadline_ms)
        .count();
    let pass = setup_errors.is_empty()
        && reset == 0
        && data == 0
        && open == 0
        && handed_elsewhere == 0
        && unanswered == 0
        && late == 0;
    let report = json!({
        "scenario": "idle",
        "machine": crate::sys::machine(),
        "path": cfg.target.path,
        "connections": cfg.connections,
        "opened": cfg.connections - setup_errors.len(),
        "on_old_generation": on_old,
        "setup_errors": setup_errors.iter().take(10).collect::<Vec<_>>(),
        "setup_failed": setup_errors.len(),
        "idle_grace_ms": cfg.idle_grace.as_millis() as u64,
        "restart": rec,
        "active": { "sent": active, "answered": answered, "answered_with_connection_close": answered_close, "unanswered": unanswered },
        "closed_cleanly": clean,
        "reset": reset,
        "unexpected_data": data,
        "still_open": open,
        "handed_over": handed,
        "still_on_old_generation": handed_elsewhere,
        "closed_after_deadline": late,
        "deadline_ms_after_signal": deadline_ms,
        "close_ms_after_signal": spread,
        "close_ms_after_signal_deciles": deciles,
        "errors": errors,
        "processes_before_upgrade": before,
        "processes_after": after,
        "pass": pass,
    });
    let mut o = String::new();
    let _ = writeln!(
        o,
        "idle keep-alive: {} connections ({} failed to open) on pid {}, path {}, idle grace {} ms",
        cfg.connections,
        setup_errors.len(),
        old_pid,
        cfg.target.path.name(),
        cfg.idle_grace.as_millis()
    );
    let _ = writeln!(
        o,
        "upgrade: handoff {:.2} ms, commit {:.2} ms, old process exited {} ms after the signal",
        rec.handoff_ms.unwrap_or(f64::NAN),
        commit_ms,
        rec.drain_ms
            .map(|d| format!("{d:.1}"))
            .unwrap_or_else(|| "-".into())
    );
    let _ = writeln!(
        o,
        "closed cleanly {clean}, handed over (open, then answered by the new generation) {handed}, reset {reset}, unexpected data {data}, open but unanswered {open}, still on the old generation {handed_elsewhere}, closed after the deadline ({deadline_ms:.0} ms) {late}"
    );
    let _ = writeln!(
        o,
        "close time after the signal, ms: min {:.1}, median {:.1}, p90 {:.1}, max {:.1}",
        spread.min_ms, spread.median_ms, spread.p90_ms, spread.max_ms
    );
    let _ = writeln!(
        o,
        "active during the grace: {active} sent, {answered} answered ({answered_close} with Connection: close), {unanswered} unanswered"
    );
    for (k, v) in &errors.0 {
        let _ = writeln!(o, "  {v:>8} x {k}");
    }
    for (title, ps) in [("before the upgrade:", &before), ("after:", &after)] {
        let _ = writeln!(o, "{title}");
        for p in ps {
            let _ = writeln!(
                o,
                "  {:<16} pid {:>7}  fds {:>6}  rss {:>7} KiB (anon {:>6}, file {:>6}, pss {:>6})",
                p.role,
                p.pid,
                show(p.fds.map(|v| v as u64)),
                show(p.rss_kib),
                show(p.rss_anon_kib),
                show(p.rss_file_kib),
                show(p.pss_kib)
            );
        }
    }
    let _ = writeln!(o, "{}", if pass { "PASS" } else { "FAIL" });
    Ok((report, o))
}
