//! The restart scenario: load, slow requests, N restarts, and the report.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::load::{Generations, Load, LoadConfig, LoadResult, Mode, Sample, one_shot};
use crate::restart::{RestartRecord, Target, TargetOpts};
use crate::stats::{Counts, ErrorSamples, Latency, Spread, histogram};

/// Settings of a restart run.
#[derive(Debug, Clone)]
pub struct RestartRun {
    /// The server and how to restart it.
    pub target: TargetOpts,
    /// How the clients talk.
    pub mode: Mode,
    /// Number of clients.
    pub concurrency: usize,
    /// Number of restarts.
    pub restarts: usize,
    /// Time between restarts (from one signal to the next, at least).
    pub interval: Duration,
    /// Load before the first restart.
    pub warmup: Duration,
    /// Load after the last restart.
    pub cooldown: Duration,
    /// Slow requests started before each restart.
    pub slow_per_restart: usize,
    /// How long each slow request takes.
    pub slow: Duration,
    /// Timeout of one request.
    pub timeout: Duration,
    /// A run ends after this long whatever is left to do.
    pub max_time: Duration,
    /// A restart window lasts from the signal to this long after the new generation's
    /// first answer.
    pub window_tail: Duration,
    /// Total request rate (0: closed loop, as fast as answers come).
    pub rate: f64,
}

/// Slow requests in flight and their results.
#[derive(Default)]
struct Slow {
    tasks: Vec<tokio::task::JoinHandle<SlowResult>>,
}

struct SlowResult {
    launched_ms: f64,
    expected_pid: u32,
    result: Result<u32, (crate::stats::Outcome, String)>,
}

impl Slow {
    fn launch(
        &mut self,
        base: &LoadConfig,
        n: usize,
        sleep: Duration,
        expected_pid: u32,
        launched_ms: f64,
    ) {
        for _ in 0..n {
            let mut cfg = base.clone();
            cfg.path = format!("/ping?sleep_ms={}", sleep.as_millis());
            let limit = sleep + cfg.timeout;
            self.tasks.push(tokio::spawn(async move {
                let result = match tokio::time::timeout(limit, one_shot(&cfg)).await {
                    Ok(Ok(p)) => Ok(p.pid),
                    Ok(Err(f)) => Err((f.outcome, f.message)),
                    Err(_) => Err((
                        crate::stats::Outcome::Timeout,
                        "slow request: timed out".into(),
                    )),
                };
                SlowResult {
                    launched_ms,
                    expected_pid,
                    result,
                }
            }));
        }
    }

    async fn finish(self, wait: Duration) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + wait;
        let mut counts = Counts::default();
        let mut errors = ErrorSamples::default();
        let mut old_gen = 0u64;
        let mut others = Vec::new();
        let sent = self.tasks.len();
        for t in self.tasks {
            match tokio::time::timeout_at(deadline, t).await {
                Ok(Ok(r)) => match r.result {
                    Ok(pid) => {
                        counts.add(crate::stats::Outcome::Ok);
                        if pid == r.expected_pid {
                            old_gen += 1;
                        } else if others.len() < 20 {
                            others.push(json!({ "launched_ms": r.launched_ms, "expected_pid": r.expected_pid, "answered_by": pid }));
                        }
                    }
                    Err((o, m)) => {
                        counts.add(o);
                        errors.add(m);
                    }
                },
                _ => {
                    counts.add(crate::stats::Outcome::Timeout);
                    errors.add("slow request still running at the end".into());
                }
            }
        }
        json!({
            "sent": sent,
            "counts": counts,
            "failed": counts.failed(),
            "answered_by_old_generation": old_gen,
            "answered_by_another": others,
            "errors": errors,
        })
    }
}

/// Merged restart windows, in µs since the epoch, sorted and disjoint.
fn windows(records: &[RestartRecord], tail: Duration) -> Vec<(u64, u64)> {
    let mut w: Vec<(u64, u64)> = records
        .iter()
        .filter_map(|r| {
            let start = (r.at_ms * 1000.0) as u64;
            let end_ms = r.at_ms + r.handoff_ms? + tail.as_secs_f64() * 1000.0;
            Some((start, (end_ms * 1000.0) as u64))
        })
        .collect();
    w.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in w {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    merged
}

fn in_window(w: &[(u64, u64)], s: &Sample) -> bool {
    let end = s.start_us + s.latency_us;
    // The last window starting at or before the request's end.
    let i = w.partition_point(|(ws, _)| *ws <= end);
    i > 0 && w[i - 1].1 >= s.start_us
}

/// Runs a restart scenario; returns the JSON report and a readable text.
pub async fn run(
    cfg: RestartRun,
) -> Result<(serde_json::Value, String), Box<dyn std::error::Error + Send + Sync>> {
    let run_started = Instant::now();
    let mut target = Target::start(cfg.target.clone()).await?;
    let first = target.processes(&Generations::default());
    let gens = Arc::new(Generations::default());
    let epoch = Instant::now();
    let load_cfg = LoadConfig::ping(
        target.addr,
        cfg.mode,
        cfg.concurrency,
        cfg.timeout,
        cfg.rate,
    );
    let load = Load::start(load_cfg.clone(), gens.clone(), epoch);
    tokio::time::sleep(cfg.warmup).await;
    let mut slow = Slow::default();
    let mut records: Vec<RestartRecord> = Vec::new();
    let budget_end = run_started + cfg.max_time;
    let mut note = None;
    for i in 0..cfg.restarts {
        if Instant::now() + cfg.interval + cfg.target.step_timeout > budget_end {
            note = Some(format!("stopped after {i} restarts: --max-time reached"));
            break;
        }
        let half = cfg.interval / 2;
        tokio::time::sleep(half).await;
        if cfg.slow_per_restart > 0 {
            let at = epoch.elapsed().as_secs_f64() * 1000.0;
            slow.launch(
                &load_cfg,
                cfg.slow_per_restart,
                cfg.slow,
                target.current_pid,
                at,
            );
        }
        tokio::time::sleep(cfg.interval - half).await;
        let rec = target.restart(i, &gens, epoch, false).await;
        let failed = rec.error.is_some() && rec.new_pid.is_none();
        records.push(rec);
        if failed {
            note = Some(format!("stopped after restart {i} failed"));
            break;
        }
    }
    tokio::time::sleep(cfg.cooldown).await;
    let load_elapsed = epoch.elapsed();
    let result: LoadResult = load.finish().await;
    let slow_report = slow
        .finish(cfg.slow + cfg.timeout + Duration::from_secs(2))
        .await;
    target
        .collect_drains(
            &mut records,
            cfg.target.step_timeout + Duration::from_secs(5),
        )
        .await;
    let end_procs = target.processes(&gens);
    let seen = gens.history();
    let generations = seen.len();
    let mut build_ids: Vec<String> = seen.iter().map(|s| s.build_id.clone()).collect();
    build_ids.sort();
    build_ids.dedup();
    let log = target.log_path().display().to_string();
    target.stop().await;

    // Latency over the whole run and inside the restart windows.
    let w = windows(&records, cfg.window_tail);
    let mut all = histogram();
    let mut inside = histogram();
    let mut failed_inside = 0u64;
    for s in &result.samples {
        let v = s.latency_us.max(1);
        let _ = all.record(v);
        if in_window(&w, s) {
            let _ = inside.record(v);
            failed_inside += u64::from(!s.ok);
        }
    }
    let handoffs = Spread::of(
        records
            .iter()
            .filter_map(|r| r.handoff_ms)
            .map(|m| Duration::from_secs_f64(m / 1000.0)),
    );
    let commits = Spread::of(
        records
            .iter()
            .filter_map(|r| r.commit_ms)
            .map(|m| Duration::from_secs_f64(m / 1000.0)),
    );
    let drains = Spread::of(
        records
            .iter()
            .filter_map(|r| r.drain_ms)
            .map(|m| Duration::from_secs_f64(m / 1000.0)),
    );
    let errors: Vec<String> = records
        .iter()
        .filter_map(|r| r.error.clone().map(|e| format!("#{}: {e}", r.index)))
        .collect();
    let lat_all = Latency::of(&all);
    let lat_win = Latency::of(&inside);
    let rps = result.counts.total() as f64 / load_elapsed.as_secs_f64();
    let report = json!({
        "scenario": "restart",
        "machine": crate::sys::machine(),
        "path": cfg.target.path,
        "mode": cfg.mode,
        "concurrency": cfg.concurrency,
        "rate_limit": cfg.rate,
        "restarts_requested": cfg.restarts,
        "restarts_done": records.iter().filter(|r| r.new_pid.is_some()).count(),
        "interval_ms": cfg.interval.as_millis() as u64,
        "load_seconds": load_elapsed.as_secs_f64(),
        "requests": {
            "total": result.counts.total(),
            "failed": result.counts.failed(),
            "counts": result.counts,
            "per_second": rps,
            "connections_opened": result.connections,
            "reconnects": result.reconnects,
            "errors": result.errors,
        },
        "slow_requests": slow_report,
        "latency": { "all": lat_all, "restart_windows": lat_win, "window_tail_ms": cfg.window_tail.as_millis() as u64 },
        "failed_in_restart_windows": failed_inside,
        "handoff": handoffs,
        "commit": commits,
        "drain": drains,
        "restarts": records,
        "restart_errors": errors,
        "generations_seen": generations,
        "build_ids_seen": build_ids,
        "processes_at_start": first,
        "processes_at_end": end_procs,
        "note": note,
        "server_log": log,
    });
    let text = render(&report);
    Ok((report, text))
}

fn f(v: &serde_json::Value) -> String {
    match v.as_f64() {
        Some(x) if x.fract() == 0.0 && x.abs() < 1e15 => format!("{}", x as i64),
        Some(x) => format!("{x:.2}"),
        None => "-".into(),
    }
}

fn procs(out: &mut String, title: &str, v: &serde_json::Value) {
    let _ = writeln!(out, "{title}");
    for p in v.as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  {:<16} pid {:>7}  alive {:<5}  fds {:>6}  rss {:>7} KiB (anon {:>6}, file {:>6}, pss {:>6})",
            p["role"].as_str().unwrap_or("?"),
            f(&p["pid"]),
            p["alive"].as_bool().unwrap_or(false),
            f(&p["fds"]),
            f(&p["rss_kib"]),
            f(&p["rss_anon_kib"]),
            f(&p["rss_file_kib"]),
            f(&p["pss_kib"])
        );
    }
}

/// The readable table of a restart report.
pub fn render(r: &serde_json::Value) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "restart path {}, {} clients over {}, {} of {} restarts {} ms apart, load for {:.1} s",
        r["path"].as_str().unwrap_or("?"),
        f(&r["concurrency"]),
        r["mode"].as_str().unwrap_or("?"),
        f(&r["restarts_done"]),
        f(&r["restarts_requested"]),
        f(&r["interval_ms"]),
        r["load_seconds"].as_f64().unwrap_or(0.0)
    );
    let q = &r["requests"];
    let c = &q["counts"];
    let _ = writeln!(
        o,
        "requests   {:>10} {:>10} {:>8} {:>8} {:>8} {:>10} {:>10} {:>6} {:>8} {:>9}",
        "total",
        "ok",
        "refused",
        "reset",
        "timeout",
        "bad-status",
        "wrong-body",
        "other",
        "FAILED",
        "req/s"
    );
    let _ = writeln!(
        o,
        "           {:>10} {:>10} {:>8} {:>8} {:>8} {:>10} {:>10} {:>6} {:>8} {:>9.0}",
        f(&q["total"]),
        f(&c["ok"]),
        f(&c["refused"]),
        f(&c["reset"]),
        f(&c["timed_out"]),
        f(&c["bad_status"]),
        f(&c["wrong_body"]),
        f(&c["other"]),
        f(&q["failed"]),
        q["per_second"].as_f64().unwrap_or(0.0)
    );
    let rc = &q["reconnects"];
    let _ = writeln!(
        o,
        "reconnects (not failures): after Connection: close {}, closed between requests {}, after GOAWAY {} (+{} requests refused unprocessed by GOAWAY, sent again); connections opened {}",
        f(&rc["after_connection_close"]),
        f(&rc["closed_between_requests"]),
        f(&rc["after_goaway"]),
        f(&rc["refused_unprocessed_by_goaway"]),
        f(&q["connections_opened"])
    );
    if let Some(errs) = q["errors"].as_object()
        && !errs.is_empty()
    {
        let _ = writeln!(o, "errors:");
        for (k, v) in errs {
            let _ = writeln!(o, "  {:>8} x {k}", f(v));
        }
    }
    let s = &r["slow_requests"];
    let _ = writeln!(
        o,
        "slow requests: {} sent, {} ok, {} failed, {} answered by the generation that accepted them",
        f(&s["sent"]),
        f(&s["counts"]["ok"]),
        f(&s["failed"]),
        f(&s["answered_by_old_generation"])
    );
    let _ = writeln!(
        o,
        "latency ms        {:>9} {:>8} {:>8} {:>8} {:>8}",
        "count", "p50", "p99", "p99.9", "max"
    );
    for (name, key) in [("whole run", "all"), ("restart windows", "restart_windows")] {
        let l = &r["latency"][key];
        let _ = writeln!(
            o,
            "  {:<15} {:>9} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
            name,
            f(&l["count"]),
            l["p50_ms"].as_f64().unwrap_or(0.0),
            l["p99_ms"].as_f64().unwrap_or(0.0),
            l["p999_ms"].as_f64().unwrap_or(0.0),
            l["max_ms"].as_f64().unwrap_or(0.0)
        );
    }
    let _ = writeln!(
        o,
        "per restart ms    {:>9} {:>8} {:>8} {:>8} {:>8}",
        "count", "min", "median", "p90", "max"
    );
    for (name, key) in [
        ("handoff", "handoff"),
        ("commit", "commit"),
        ("old one's exit", "drain"),
    ] {
        let l = &r[key];
        let _ = writeln!(
            o,
            "  {:<15} {:>9} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
            name,
            f(&l["count"]),
            l["min_ms"].as_f64().unwrap_or(0.0),
            l["median_ms"].as_f64().unwrap_or(0.0),
            l["p90_ms"].as_f64().unwrap_or(0.0),
            l["max_ms"].as_f64().unwrap_or(0.0)
        );
    }
    // The slowest handoff, and whether the hypervisor took CPU time during it.
    let restarts = r["restarts"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let stolen = restarts
        .iter()
        .filter(|x| x["steal_ms"].as_f64().is_some_and(|s| s > 0.0))
        .count();
    if let Some(worst) = restarts.iter().max_by(|a, b| {
        let key = |x: &serde_json::Value| x["handoff_ms"].as_f64().unwrap_or(f64::NAN);
        key(a).total_cmp(&key(b))
    }) && let Some(h) = worst["handoff_ms"].as_f64()
    {
        let steal = worst["steal_ms"]
            .as_f64()
            .map_or("not counted".to_owned(), |s| format!("{s:.0} ms"));
        let _ = writeln!(
            o,
            "CPU steal (hypervisor) during {stolen} of {} restarts; the slowest handoff ({h:.2} ms, restart {}): {steal}",
            restarts.len(),
            worst["index"]
        );
    }
    for e in r["restart_errors"]
        .as_array()
        .into_iter()
        .flatten()
        .take(10)
    {
        let _ = writeln!(o, "restart error {}", e.as_str().unwrap_or("?"));
    }
    if let Some(n) = r["note"].as_str() {
        let _ = writeln!(o, "note: {n}");
    }
    procs(&mut o, "processes at start:", &r["processes_at_start"]);
    procs(&mut o, "processes at end:", &r["processes_at_end"]);
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(at_ms: f64, handoff_ms: Option<f64>) -> RestartRecord {
        RestartRecord {
            index: 0,
            old_pid: 1,
            new_pid: Some(2),
            at_ms,
            at_unix_us: 0,
            handoff_ms,
            commit_ms: None,
            drain_ms: None,
            steal_ms: None,
            error: None,
            signal_at: None,
        }
    }

    #[test]
    fn windows_merge_and_contain_overlapping_requests() {
        let tail = Duration::from_millis(10);
        let w = windows(
            &[
                rec(100.0, Some(5.0)),
                rec(110.0, Some(5.0)),
                rec(500.0, None),
            ],
            tail,
        );
        // 100..115 and 110..125 merge; the restart without handoff has no window.
        assert_eq!(w, vec![(100_000, 125_000)]);
        let s = |start_us, latency_us| Sample {
            start_us,
            latency_us,
            ok: true,
        };
        assert!(in_window(&w, &s(90_000, 20_000)), "spans the start");
        assert!(in_window(&w, &s(120_000, 1)), "inside");
        assert!(!in_window(&w, &s(126_000, 1)), "after");
        assert!(!in_window(&w, &s(10_000, 1_000)), "before");
    }
}
