//! WebSocket clients through upgrades: N clients connected to `/ws` while the server is
//! upgraded under HTTP load. Each must get close code 1012 from the old generation, at
//! its own moment in the eviction window, and reconnect to the new one; the report
//! counts abnormal closes (no close frame, or another code), times each close from the
//! commit, each reconnect from its close, the busiest millisecond of reconnects (the
//! spread), and when the old generation exited.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::json;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::load::{Generations, Load, LoadConfig, Mode};
use crate::restart::{Target, TargetOpts};
use crate::stats::{ErrorSamples, Spread};

/// Settings of a WebSocket run.
#[derive(Debug, Clone)]
pub struct WebSocketRun {
    /// The server and how to upgrade it.
    pub target: TargetOpts,
    /// WebSocket clients.
    pub clients: usize,
    /// Upgrades.
    pub upgrades: usize,
    /// The server's eviction window.
    pub window: Duration,
    /// The server's probation: the old generation stays at least this long.
    pub probation: Duration,
    /// HTTP keep-alive clients loading `/ping` throughout (0: none).
    pub load: usize,
    /// The HTTP load's total request rate (0: closed loop).
    pub rate: f64,
    /// Pause after all clients reconnected, before the next upgrade.
    pub interval: Duration,
}

/// What happened to one client's connection, as the client saw it.
#[derive(Debug, Clone)]
enum Event {
    /// Connected and greeted by `pid`; `after`: since the previous connection closed.
    Connected { pid: u32, after: Option<Duration> },
    /// The server closed the connection of `pid` at `at`, with a close frame and `code`.
    Closed { pid: u32, at: Instant, code: u16 },
    /// The connection of `pid` ended at `at` without a close frame (1006), or with an
    /// error.
    Abnormal { pid: u32, at: Instant, why: String },
    /// A connection attempt failed.
    ConnectFailed(String),
}

/// Connects to `/ws` and reads the greeting: the PID of the generation that answers.
async fn connect(
    addr: SocketAddr,
) -> Result<
    (
        tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
        u32,
    ),
    String,
> {
    let url = format!("ws://{addr}/ws");
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .map_err(|e| format!("connect: {e}"))?;
    match ws.next().await {
        Some(Ok(Message::Text(t))) => {
            let pid = t
                .as_str()
                .strip_prefix("hello pid=")
                .and_then(|p| p.parse().ok())
                .ok_or_else(|| format!("unexpected greeting {:?}", t.as_str()))?;
            Ok((ws, pid))
        }
        other => Err(format!("no greeting: {other:?}")),
    }
}

/// One client: connects, waits for the server to close, reconnects, until `stop`.
async fn client(
    addr: SocketAddr,
    current: Arc<AtomicU32>,
    log: Arc<Mutex<Vec<Event>>>,
    mut stop: watch::Receiver<bool>,
    deadline: Instant,
    mut first: Option<tokio::sync::OwnedSemaphorePermit>,
) {
    let push = |e: Event| log.lock().unwrap_or_else(|e| e.into_inner()).push(e);
    let mut closed_at: Option<Instant> = None;
    while !*stop.borrow() && Instant::now() < deadline {
        let attempt = tokio::time::timeout(Duration::from_secs(10), connect(addr)).await;
        // The first handshake counts against the setup's limit; reconnects do not.
        first.take();
        let (mut ws, pid) = match attempt {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                push(Event::ConnectFailed(e));
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            Err(_) => {
                push(Event::ConnectFailed("connect timed out".into()));
                continue;
            }
        };
        current.store(pid, Ordering::Relaxed);
        push(Event::Connected {
            pid,
            after: closed_at.map(|c| c.elapsed()),
        });
        let left = deadline.saturating_duration_since(Instant::now());
        let stopped = async {
            let _ = stop.wait_for(|s| *s).await;
        };
        let end = tokio::select! {
            () = stopped => None,
            () = tokio::time::sleep(left) => None,
            end = async {
                loop {
                    match ws.next().await {
                        Some(Ok(Message::Close(frame))) => {
                            let code = frame.map_or(1005, |f| u16::from(f.code));
                            break Some(Event::Closed { pid, at: Instant::now(), code });
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => {
                            break Some(Event::Abnormal { pid, at: Instant::now(), why: e.to_string() });
                        }
                        None => {
                            let why = "the connection ended without a close frame (1006)".into();
                            break Some(Event::Abnormal { pid, at: Instant::now(), why });
                        }
                    }
                }
            } => end,
        };
        let Some(end) = end else {
            // Stopped, or out of time: close from this side.
            let _ = ws.close(None).await;
            return;
        };
        current.store(0, Ordering::Relaxed);
        let at = match &end {
            Event::Closed { at, .. } | Event::Abnormal { at, .. } => *at,
            _ => Instant::now(),
        };
        let clean = matches!(end, Event::Closed { .. });
        push(end);
        if clean {
            // Our close answers the server's (tungstenite sends it); then the server
            // closes the TCP connection.
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                while let Some(Ok(_)) = ws.next().await {}
            })
            .await;
        }
        closed_at = Some(at);
    }
}

/// What one upgrade did to the clients.
#[derive(Debug, Default)]
struct UpgradeStats {
    closes: Vec<Duration>,
    codes: HashMap<u16, usize>,
    abnormal: usize,
    reconnects: Vec<Duration>,
}

/// The busiest bucket of `width_ms`: the most closes within any one.
fn peak_per(closes: &[Duration], width_ms: u128) -> usize {
    let mut buckets: HashMap<u128, usize> = HashMap::new();
    for c in closes {
        *buckets
            .entry(c.as_micros() / (1000 * width_ms))
            .or_default() += 1;
    }
    buckets.values().copied().max().unwrap_or(0)
}

/// Runs the WebSocket scenario; returns the JSON report and a readable text.
pub async fn run(
    cfg: WebSocketRun,
) -> Result<(serde_json::Value, String), Box<dyn std::error::Error + Send + Sync>> {
    let mut target = Target::start(cfg.target.clone()).await?;
    let addr = target.addr;
    let epoch = Instant::now();
    let gens = Arc::new(Generations::default());
    let load = (cfg.load > 0).then(|| {
        let load_cfg = LoadConfig::ping(
            addr,
            Mode::Keepalive,
            cfg.load,
            Duration::from_secs(5),
            cfg.rate,
        );
        Load::start(load_cfg, gens.clone(), epoch)
    });
    // Connect the clients, a few hundred handshakes at a time.
    let (stop_tx, stop) = watch::channel(false);
    let deadline = Instant::now()
        + Duration::from_secs(120)
        + (cfg.window + Duration::from_secs(30)) * cfg.upgrades as u32;
    let logs: Vec<Arc<Mutex<Vec<Event>>>> = (0..cfg.clients).map(|_| Arc::default()).collect();
    let current: Vec<Arc<AtomicU32>> = (0..cfg.clients).map(|_| Arc::default()).collect();
    let sem = Arc::new(tokio::sync::Semaphore::new(256));
    let mut tasks = Vec::with_capacity(cfg.clients);
    for (log, current) in logs.iter().zip(&current) {
        let (log, current, stop, sem) = (log.clone(), current.clone(), stop.clone(), sem.clone());
        tasks.push(tokio::spawn(async move {
            let permit = sem.acquire_owned().await.ok();
            client(addr, current, log, stop, deadline, permit).await;
        }));
    }
    let first_pid = target.current_pid;
    let connected =
        crate::restart::poll(Duration::from_secs(120), Duration::from_millis(10), || {
            current
                .iter()
                .all(|c| c.load(Ordering::Relaxed) == first_pid)
                .then_some(())
        })
        .await;
    let setup_failed = current
        .iter()
        .filter(|c| c.load(Ordering::Relaxed) != first_pid)
        .count();
    let mut records = Vec::new();
    let mut errors = ErrorSamples::default();
    if connected.is_none() {
        errors.add(format!(
            "{setup_failed} clients not connected to pid {first_pid} in 120 s"
        ));
    }
    for i in 0..cfg.upgrades {
        let rec = target.restart(i, &gens, epoch, load.is_none()).await;
        let Some(new) = rec.new_pid else {
            errors.add(format!(
                "upgrade {i}: {}",
                rec.error.clone().unwrap_or_default()
            ));
            records.push(rec);
            break;
        };
        let all_back = crate::restart::poll(
            cfg.window + Duration::from_secs(30),
            Duration::from_millis(5),
            || {
                current
                    .iter()
                    .all(|c| c.load(Ordering::Relaxed) == new)
                    .then_some(())
            },
        )
        .await;
        if all_back.is_none() {
            let behind = current
                .iter()
                .filter(|c| c.load(Ordering::Relaxed) != new)
                .count();
            errors.add(format!(
                "upgrade {i}: {behind} clients not on pid {new} by window + 30 s"
            ));
        }
        records.push(rec);
        tokio::time::sleep(cfg.interval).await;
    }
    target
        .collect_drains(&mut records, cfg.window + Duration::from_secs(30))
        .await;
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    let http = match load {
        Some(l) => Some(l.finish().await),
        None => None,
    };
    let after = target.processes(&gens);
    target.stop().await;

    // Each close belongs to the upgrade whose old PID it came from.
    let by_old: HashMap<u32, usize> = records.iter().map(|r| (r.old_pid, r.index)).collect();
    let mut stats: Vec<UpgradeStats> = records.iter().map(|_| UpgradeStats::default()).collect();
    let mut connect_failed = 0;
    for log in &logs {
        let log = log.lock().unwrap_or_else(|e| e.into_inner());
        let mut last_upgrade = None;
        for e in log.iter() {
            match e {
                Event::Closed { pid, at, code } => {
                    last_upgrade = by_old.get(pid).copied();
                    if let Some(i) = last_upgrade {
                        let s = &mut stats[i];
                        let signal = records[i].signal_at;
                        s.closes.push(
                            signal.map_or(Duration::ZERO, |c| at.saturating_duration_since(c)),
                        );
                        *s.codes.entry(*code).or_default() += 1;
                        if *code != 1012 {
                            errors.add(format!("close code {code} from pid {pid}"));
                        }
                    } else {
                        errors.add(format!("close code {code} from pid {pid}, not upgraded"));
                    }
                }
                Event::Abnormal { pid, why, .. } => {
                    last_upgrade = by_old.get(pid).copied();
                    if let Some(s) = last_upgrade.and_then(|i| stats.get_mut(i)) {
                        s.abnormal += 1;
                    }
                    errors.add(format!("abnormal close from pid {pid}: {why}"));
                }
                Event::Connected {
                    pid,
                    after: Some(d),
                } => {
                    if let Some(i) = last_upgrade.take() {
                        if records[i].new_pid == Some(*pid) {
                            stats[i].reconnects.push(*d);
                        } else {
                            errors.add(format!(
                                "upgrade {i}: reconnected to pid {pid}, not the new generation"
                            ));
                        }
                    }
                }
                Event::Connected { after: None, .. } => {}
                Event::ConnectFailed(e) => {
                    connect_failed += 1;
                    errors.add(format!("connect failed: {e}"));
                }
            }
        }
    }
    let commit_ms = |i: usize| records[i].commit_ms.unwrap_or(0.0);
    let grace = Duration::from_secs(2);
    let mut upgrades = Vec::new();
    let mut text_rows = String::new();
    let mut pass = connected.is_some() && records.len() == cfg.upgrades && connect_failed == 0;
    for (i, s) in stats.iter().enumerate() {
        // From the commit (the drain's start), where the window starts.
        let from_commit: Vec<Duration> = s
            .closes
            .iter()
            .map(|d| d.saturating_sub(Duration::from_secs_f64(commit_ms(i) / 1000.0)))
            .collect();
        let spread = Spread::of(from_commit.iter().copied());
        let reconnect = Spread::of(s.reconnects.iter().copied());
        let peak = peak_per(&from_commit, 1);
        let peak_10ms = peak_per(&from_commit, 10);
        let span_ms = (spread.max_ms - spread.min_ms).max(1.0);
        let mean_per_ms = s.closes.len() as f64 / span_ms;
        let limit_ms =
            commit_ms(i) + (cfg.window.max(cfg.probation) + grace).as_secs_f64() * 1000.0;
        let drain_ms = records[i].drain_ms;
        let gone_in_time = drain_ms.is_some_and(|d| d <= limit_ms);
        let ok_1012 = s.codes.get(&1012).copied().unwrap_or(0);
        let ok = s.abnormal == 0
            && ok_1012 == cfg.clients
            && s.reconnects.len() == cfg.clients
            && gone_in_time;
        pass &= ok;
        upgrades.push(json!({
            "record": records[i],
            "closes_1012": ok_1012,
            "close_codes": s.codes.iter().map(|(k, v)| (k.to_string(), *v)).collect::<HashMap<_, _>>(),
            "abnormal": s.abnormal,
            "close_ms_after_commit": spread,
            "reconnected": s.reconnects.len(),
            "reconnect_ms": reconnect,
            "peak_reconnects_per_ms": peak,
            "peak_reconnects_per_10ms": peak_10ms,
            "mean_reconnects_per_ms": mean_per_ms,
            "old_gone_ms_after_signal": drain_ms,
            "old_gone_limit_ms": limit_ms,
            "pass": ok,
        }));
        let _ = writeln!(
            text_rows,
            "  {i:>3}  1012 {ok_1012:>6}  abnormal {:>4}  close after commit ms min {:>7.1} med {:>7.1} max {:>7.1}  reconnect ms med {:>6.2} p90 {:>6.2} max {:>7.2}  peak/ms {peak:>4}  peak/10ms {peak_10ms:>4}  mean/ms {mean_per_ms:>6.2}  old gone {} ms (limit {limit_ms:.0})",
            s.abnormal,
            spread.min_ms,
            spread.median_ms,
            spread.max_ms,
            reconnect.median_ms,
            reconnect.p90_ms,
            reconnect.max_ms,
            drain_ms.map_or("-".into(), |d| format!("{d:.0}")),
        );
    }
    let http_failed = http.as_ref().map_or(0, |r| r.counts.failed());
    pass &= http_failed == 0;
    let report = json!({
        "scenario": "websocket",
        "machine": crate::sys::machine(),
        "path": cfg.target.path,
        "clients": cfg.clients,
        "setup_failed": setup_failed,
        "connect_failed": connect_failed,
        "upgrades": upgrades,
        "window_ms": cfg.window.as_millis() as u64,
        "probation_ms": cfg.probation.as_millis() as u64,
        "http_load": http.as_ref().map(|r| json!({ "clients": cfg.load, "rate": cfg.rate, "counts": r.counts })),
        "errors": errors,
        "processes_after": after,
        "pass": pass,
    });
    let mut o = String::new();
    let _ = writeln!(
        o,
        "websocket: {} clients on pid {first_pid} ({setup_failed} not connected), {} upgrades, path {}, eviction window {} ms, probation {} ms, HTTP load {} keep-alive clients at {} req/s",
        cfg.clients,
        cfg.upgrades,
        cfg.target.path.name(),
        cfg.window.as_millis(),
        cfg.probation.as_millis(),
        cfg.load,
        cfg.rate
    );
    o.push_str(&text_rows);
    if let Some(r) = &http {
        let _ = writeln!(o, "HTTP load: {} ok, {http_failed} failed", r.counts.ok);
    }
    for (k, v) in &errors.0 {
        let _ = writeln!(o, "  {v:>8} x {k}");
    }
    let _ = writeln!(o, "{}", if pass { "PASS" } else { "FAIL" });
    Ok((report, o))
}
