//! Steady state: the same handler served by reborn's serve and by plain `axum::serve`,
//! the same load against each in alternating rounds, throughput and latency as a ratio.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::load::{Generations, Load, LoadConfig, Mode};
use crate::stats::{Counts, Latency, histogram};

/// Settings of a steady-state comparison.
#[derive(Debug, Clone)]
pub struct SteadyRun {
    /// bench-server.
    pub server: PathBuf,
    /// Where the servers' logs go.
    pub dir: PathBuf,
    /// How the clients talk.
    pub mode: Mode,
    /// Number of clients.
    pub concurrency: usize,
    /// Each measured round.
    pub duration: Duration,
    /// Unmeasured load before each round.
    pub warmup: Duration,
    /// Number of rounds.
    pub rounds: usize,
}

struct Server {
    child: tokio::process::Child,
    addr: SocketAddr,
}

async fn start(
    server: &PathBuf,
    plain: bool,
    log: PathBuf,
) -> Result<Server, Box<dyn std::error::Error + Send + Sync>> {
    let f = std::fs::File::create(&log)?;
    let mut cmd = tokio::process::Command::new(server);
    cmd.arg("--addr").arg("127.0.0.1:0");
    if plain {
        cmd.arg("--plain-axum");
    }
    cmd.stdin(std::process::Stdio::null())
        .stdout(f.try_clone()?)
        .stderr(f)
        .kill_on_drop(true);
    let child = cmd.spawn()?;
    let addr = crate::restart::poll(Duration::from_secs(10), Duration::from_millis(2), || {
        std::fs::read_to_string(&log)
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("listening on "))
            .and_then(|a| a.trim().parse().ok())
    })
    .await
    .ok_or_else(|| {
        format!(
            "{} did not print its address; see {}",
            server.display(),
            log.display()
        )
    })?;
    Ok(Server { child, addr })
}

struct Round {
    counts: Counts,
    rps: f64,
    latency: hdrhistogram::Histogram<u64>,
}

async fn measure(cfg: &SteadyRun, addr: SocketAddr) -> Round {
    let load_cfg = LoadConfig::ping(addr, cfg.mode, cfg.concurrency, Duration::from_secs(5), 0.0);
    if !cfg.warmup.is_zero() {
        let warm = Load::start(
            load_cfg.clone(),
            Arc::new(Generations::default()),
            Instant::now(),
        );
        tokio::time::sleep(cfg.warmup).await;
        let _ = warm.finish().await;
    }
    let epoch = Instant::now();
    let load = Load::start(load_cfg, Arc::new(Generations::default()), epoch);
    tokio::time::sleep(cfg.duration).await;
    let elapsed = epoch.elapsed();
    let r = load.finish().await;
    let mut h = histogram();
    for s in &r.samples {
        let _ = h.record(s.latency_us.max(1));
    }
    Round {
        rps: r.counts.total() as f64 / elapsed.as_secs_f64(),
        counts: r.counts,
        latency: h,
    }
}

/// Runs the comparison; returns the JSON report and a readable text.
pub async fn run(
    cfg: SteadyRun,
) -> Result<(serde_json::Value, String), Box<dyn std::error::Error + Send + Sync>> {
    let mut reborn = start(&cfg.server, false, cfg.dir.join("reborn.log")).await?;
    let mut plain = start(&cfg.server, true, cfg.dir.join("plain.log")).await?;
    let mut per = [Vec::new(), Vec::new()];
    let mut hist = [histogram(), histogram()];
    let mut counts = [Counts::default(), Counts::default()];
    for round in 0..cfg.rounds {
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for which in order {
            let addr = if which == 0 { reborn.addr } else { plain.addr };
            let r = measure(&cfg, addr).await;
            per[which].push(r.rps);
            let _ = hist[which].add(&r.latency);
            counts[which].merge(&r.counts);
        }
    }
    for s in [&mut reborn, &mut plain] {
        if let Some(pid) = s.child.id() {
            let _ = crate::sys::kill(pid, libc::SIGTERM);
        }
        if tokio::time::timeout(Duration::from_secs(5), s.child.wait())
            .await
            .is_err()
        {
            let _ = s.child.kill().await;
        }
    }
    let mean = |v: &Vec<f64>| {
        if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    };
    let rps = [mean(&per[0]), mean(&per[1])];
    let lat = [Latency::of(&hist[0]), Latency::of(&hist[1])];
    let ratio = if rps[1] > 0.0 { rps[0] / rps[1] } else { 0.0 };
    // Each round measures both servers back to back: the ratio within a round is less
    // exposed to whatever else the machine does than the ratio of the means.
    let mut round_ratios: Vec<f64> = per[0]
        .iter()
        .zip(&per[1])
        .filter(|(_, b)| **b > 0.0)
        .map(|(a, b)| a / b)
        .collect();
    round_ratios.sort_by(|a, b| a.total_cmp(b));
    let median_round_ratio = round_ratios
        .get(round_ratios.len() / 2)
        .copied()
        .unwrap_or(0.0);
    let report = json!({
        "scenario": "steady",
        "machine": crate::sys::machine(),
        "mode": cfg.mode,
        "concurrency": cfg.concurrency,
        "rounds": cfg.rounds,
        "round_seconds": cfg.duration.as_secs_f64(),
        "reborn": { "rps_per_round": per[0], "rps": rps[0], "latency": lat[0], "counts": counts[0], "failed": counts[0].failed() },
        "plain_axum": { "rps_per_round": per[1], "rps": rps[1], "latency": lat[1], "counts": counts[1], "failed": counts[1].failed() },
        "throughput_ratio": ratio,
        "round_ratios_sorted": round_ratios,
        "median_round_ratio": median_round_ratio,
        "p50_ratio": if lat[1].p50_ms > 0.0 { lat[0].p50_ms / lat[1].p50_ms } else { 0.0 },
        "p99_ratio": if lat[1].p99_ms > 0.0 { lat[0].p99_ms / lat[1].p99_ms } else { 0.0 },
    });
    let mut o = String::new();
    let _ = writeln!(
        o,
        "steady state, {} clients over {}, {} rounds of {:.1} s each",
        cfg.concurrency,
        cfg.mode.name(),
        cfg.rounds,
        cfg.duration.as_secs_f64()
    );
    let _ = writeln!(
        o,
        "{:<12} {:>10} {:>8} {:>8} {:>8} {:>8} {:>7}  rounds (req/s)",
        "server", "req/s", "p50 ms", "p99 ms", "p99.9", "max", "failed"
    );
    for (i, name) in ["reborn", "plain axum"].iter().enumerate() {
        let rounds: Vec<String> = per[i].iter().map(|r| format!("{r:.0}")).collect();
        let _ = writeln!(
            o,
            "{:<12} {:>10.0} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>7}  {}",
            name,
            rps[i],
            lat[i].p50_ms,
            lat[i].p99_ms,
            lat[i].p999_ms,
            lat[i].max_ms,
            counts[i].failed(),
            rounds.join(" ")
        );
    }
    let _ = writeln!(
        o,
        "throughput ratio reborn / plain axum: {ratio:.3} (of the means); median of the per-round ratios {median_round_ratio:.3}"
    );
    Ok((report, o))
}
