//! The bad deploy: a new version that reports ready, then crashes (as most bad deploys
//! do: on the first request, the first query, a setting read lazily). Does the service
//! recover by itself, what is lost, and how long is nobody answering?
//!
//! Each round: the bench creates the crash flag, upgrades (SIGHUP to the serving PID, or
//! `reborn upgrade`), waits for the new generation's first answer, removes the flag (so
//! that whatever starts next is good), and watches the new PID through a pidfd until it
//! dies. From that moment a prober asks `/ping` on new connections until a process other
//! than the dead one answers: the recovery time. The load runs throughout and counts
//! every request by outcome.

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::process::Command;

use crate::load::{Generations, Load, LoadConfig, Mode, one_shot};
use crate::restart::{RestartPath, Target, TargetOpts};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A bad-deploy run.
#[derive(Debug, Clone)]
pub struct BadDeployRun {
    /// The server and how it is upgraded (self or master).
    pub target: TargetOpts,
    /// How the load talks.
    pub mode: Mode,
    /// Load clients.
    pub concurrency: usize,
    /// Requests per second over all clients (0: closed loop).
    pub rate: f64,
    /// Bad deploys.
    pub rounds: usize,
    /// How long after its readiness the new version crashes.
    pub crash_after: Duration,
    /// The probation window the server (or master) runs with.
    pub probation: Duration,
}

/// One bad deploy, measured.
#[derive(Debug, Clone, serde::Serialize)]
struct Round {
    bad_pid: u32,
    /// Upgrade to the bad version's first answer, ms.
    handoff_ms: f64,
    /// The bad version's first answer to its death, ms.
    lived_ms: f64,
    /// Its death to the first answer from another process, ms.
    recovery_ms: f64,
    /// Who answered then.
    recovered_pid: u32,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Waits for `pid` to die, through a pidfd (exact), else by polling.
async fn wait_death(pid: u32, limit: Duration) -> Option<Instant> {
    // SAFETY: pidfd_open has no memory-safety preconditions.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd >= 0 {
        // SAFETY: a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // SAFETY: the AsyncFd owns `fd`, which stays open and the same until dropped.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        }
        .ok()?;
        return tokio::time::timeout(limit, fd.readable())
            .await
            .ok()
            .map(|_| Instant::now());
    }
    crate::restart::poll(limit, Duration::from_micros(200), || {
        (!crate::sys::alive(pid)).then(Instant::now)
    })
    .await
}

/// Runs the bad deploys; returns the report and its table.
pub async fn run(cfg: BadDeployRun) -> Result<(serde_json::Value, String), BoxError> {
    let flag: PathBuf = cfg.target.dir.join("crash.flag");
    let mut opts = cfg.target.clone();
    opts.server_args.extend([
        format!("--crash-after-ready-ms={}", cfg.crash_after.as_millis()),
        format!("--crash-flag={}", flag.display()),
    ]);
    opts.master_args
        .push(format!("--probation={}ms", cfg.probation.as_millis()));
    let path = opts.path;
    let step = opts.step_timeout;
    let mut target = Target::start(opts).await?;
    let epoch = Instant::now();
    let gens = Arc::new(Generations::default());
    let load_cfg = LoadConfig::ping(
        target.addr,
        cfg.mode,
        cfg.concurrency,
        Duration::from_secs(5),
        cfg.rate,
    );
    let load = Load::start(load_cfg, gens.clone(), epoch);
    let probe = crate::restart::probe_cfg(target.addr, Duration::from_secs(2));
    // The first generation must pass its probation first: then it is the good version
    // that a bad deploy falls back to (the master pins its binary then).
    tokio::time::sleep(cfg.probation + Duration::from_millis(500)).await;
    let mut rounds = Vec::new();
    let mut errors = Vec::new();
    let pid_file = cfg.target.dir.join("server.pid");
    let control = cfg.target.dir.join("control.sock");
    for _ in 0..cfg.rounds {
        std::fs::write(&flag, b"crash")?;
        let known: Vec<u32> = gens.all().keys().copied().collect();
        let started = Instant::now();
        let upgrade = match path {
            RestartPath::SelfUpgrade => {
                let serving: u32 = std::fs::read_to_string(&pid_file)?.trim().parse()?;
                crate::sys::kill(serving, libc::SIGHUP)?;
                None
            }
            _ => Some(
                Command::new(&cfg.target.reborn)
                    .args(["upgrade", "--control"])
                    .arg(&control)
                    .stdin(Stdio::null())
                    .output(),
            ),
        };
        let deadline = tokio::time::Instant::from_std(started + step);
        let Some((bad, seen)) = gens.wait_new(&known, deadline).await else {
            errors.push("no answer from the bad version".to_string());
            let _ = std::fs::remove_file(&flag);
            break;
        };
        let _ = std::fs::remove_file(&flag);
        let Some(died) = wait_death(bad, step).await else {
            errors.push(format!("the bad version (pid {bad}) did not die"));
            break;
        };
        let back = loop {
            match one_shot(&probe).await {
                Ok(p) if p.pid != bad => break Some((Instant::now(), p.pid)),
                _ if died.elapsed() > step => break None,
                _ => {}
            }
        };
        let Some((at, recovered_pid)) = back else {
            errors.push(format!(
                "nobody answered within {step:?} of pid {bad}'s death"
            ));
            break;
        };
        rounds.push(Round {
            bad_pid: bad,
            handoff_ms: ms(seen.first.saturating_duration_since(started)),
            lived_ms: ms(died.saturating_duration_since(seen.first)),
            recovery_ms: ms(at.saturating_duration_since(died)),
            recovered_pid,
        });
        if let Some(out) = upgrade {
            match tokio::time::timeout(step + cfg.probation, out).await {
                Ok(Ok(o)) if !o.status.success() => {}
                Ok(Ok(o)) => errors.push(format!(
                    "reborn upgrade succeeded although the new worker died: {}",
                    String::from_utf8_lossy(&o.stdout).trim()
                )),
                Ok(Err(e)) => errors.push(format!("reborn upgrade: {e}")),
                Err(_) => errors.push("reborn upgrade did not return".into()),
            }
        }
        target.current_pid = recovered_pid;
        // Let the recovered generation settle (and the previous bad one be reaped).
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let result = load.finish().await;
    target.stop().await;
    let mut recovery: Vec<f64> = rounds.iter().map(|r| r.recovery_ms).collect();
    recovery.sort_by(f64::total_cmp);
    let median = recovery.get(recovery.len() / 2).copied();
    let max = recovery.last().copied();
    let c = &result.counts;
    let report = json!({
        "scenario": "bad-deploy",
        "path": path.name(),
        "mode": cfg.mode.name(),
        "concurrency": cfg.concurrency,
        "rate": cfg.rate,
        "crash_after_ms": ms(cfg.crash_after),
        "probation_ms": ms(cfg.probation),
        "rounds": rounds,
        "counts": c,
        "recovery_median_ms": median,
        "recovery_max_ms": max,
        "errors": errors,
        "machine": crate::sys::machine(),
    });
    let text = format!(
        "bad deploy, {} path, {} clients ({}), the new version aborts {} ms after ready, \
         {} rounds:\n  requests ok {}, refused {}, reset {}, timed out {}, other {}\n  \
         crash -> first answer again: median {} ms, max {} ms\n{}",
        path.name(),
        cfg.concurrency,
        cfg.mode.name(),
        cfg.crash_after.as_millis(),
        rounds.len(),
        c.ok,
        c.refused,
        c.reset,
        c.timed_out,
        c.other + c.bad_status + c.wrong_body,
        median.map_or("-".into(), |m| format!("{m:.2}")),
        max.map_or("-".into(), |m| format!("{m:.2}")),
        errors
            .iter()
            .map(|e| format!("  error: {e}\n"))
            .collect::<String>()
    );
    Ok((report, text))
}
