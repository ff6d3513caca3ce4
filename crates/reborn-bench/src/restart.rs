//! The server under test, and the ways to restart it: the self-upgrade (`SIGHUP` to the
//! serving PID, following the PID file), the master (`reborn upgrade`), and the baseline
//! of stop-and-start (`SIGTERM`, wait for the exit, start again).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

use crate::load::{Generations, LoadConfig, Mode, one_shot};
use crate::sys::{self, ProcStat};

/// How the server is restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPath {
    /// `SIGHUP` to the serving process (found in the PID file): it upgrades itself.
    #[value(name = "self")]
    #[serde(rename = "self")]
    SelfUpgrade,
    /// `reborn upgrade` to a `reborn run` master.
    Master,
    /// Stop and start: `SIGTERM`, wait for the exit, start again (no tool).
    StopStart,
}

impl RestartPath {
    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            RestartPath::SelfUpgrade => "self",
            RestartPath::Master => "master",
            RestartPath::StopStart => "stop-start",
        }
    }
}

/// How to find or start the server under test.
#[derive(Debug, Clone)]
pub struct TargetOpts {
    /// The restart path.
    pub path: RestartPath,
    /// The bench-server binary to start (None: the server runs already, at `url_addr`).
    pub server: Option<PathBuf>,
    /// Extra arguments for the server.
    pub server_args: Vec<String>,
    /// The `reborn` binary, for the master path.
    pub reborn: PathBuf,
    /// The address of a server that runs already.
    pub url_addr: Option<SocketAddr>,
    /// The PID file of a server that runs already (self path).
    pub pid_file: Option<PathBuf>,
    /// The control socket of a master that runs already.
    pub control: Option<PathBuf>,
    /// A directory for the PID file, control socket and the server's log.
    pub dir: PathBuf,
    /// How long any one step (start, restart, stop) may take.
    pub step_timeout: Duration,
    /// Extra options for `reborn run` (master path). Unless they set `--probation`, it is
    /// turned off: `reborn upgrade` then returns at the commit, which the handoff and
    /// commit times measure.
    pub master_args: Vec<String>,
}

/// One restart, as measured.
#[derive(Debug, Clone, Serialize)]
pub struct RestartRecord {
    /// 0-based.
    pub index: usize,
    /// The PID that served before.
    pub old_pid: u32,
    /// The PID that served after.
    pub new_pid: Option<u32>,
    /// ms since the start of the run when the signal (or command) was sent.
    pub at_ms: f64,
    /// The same moment in µs since the Unix epoch (to line up with the server's log).
    pub at_unix_us: u64,
    /// Signal to the first answer from the new generation, ms.
    pub handoff_ms: Option<f64>,
    /// Signal to commit (PID file names the new PID, `reborn upgrade` returned, or the
    /// new process started for stop-start), ms.
    pub commit_ms: Option<f64>,
    /// Signal to the old process's exit, ms.
    pub drain_ms: Option<f64>,
    /// CPU time the hypervisor took from this machine (all CPUs) between the signal and
    /// the commit, ms, in clock ticks (see [`sys::steal_ms`]); `None` where not counted.
    pub steal_ms: Option<f64>,
    /// What went wrong, if anything.
    pub error: Option<String>,
    #[serde(skip)]
    /// When the signal was sent.
    pub signal_at: Option<Instant>,
}

/// The server under test.
pub struct Target {
    opts: TargetOpts,
    /// Where it listens.
    pub addr: SocketAddr,
    /// The PID serving now.
    pub current_pid: u32,
    /// The master's PID (master path).
    pub master_pid: Option<u32>,
    pid_file: Option<PathBuf>,
    control: Option<PathBuf>,
    /// Processes we started (first generation, master, stop-start generations).
    children: Vec<Child>,
    drains: Vec<(usize, JoinHandle<Option<Duration>>)>,
    log: PathBuf,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub(crate) fn probe_cfg(addr: SocketAddr, timeout: Duration) -> LoadConfig {
    LoadConfig::ping(addr, Mode::Newconn, 1, timeout, 0.0)
}

/// Polls `check` every `every` until it gives `Some` or `timeout` passes.
pub async fn poll<T>(
    timeout: Duration,
    every: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(every).await;
    }
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// A free loopback port (bound, then released: a small race, acceptable on loopback).
fn free_addr() -> std::io::Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    l.local_addr()
}

fn log_file(path: &Path) -> std::io::Result<(Stdio, Stdio)> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    let g = f.try_clone()?;
    Ok((Stdio::from(f), Stdio::from(g)))
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Target {
    /// Starts the server (or finds the running one) and waits until it answers.
    pub async fn start(opts: TargetOpts) -> Result<Target, BoxError> {
        let log = opts.dir.join("server.log");
        let mut t = Target {
            addr: opts
                .url_addr
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
            current_pid: 0,
            master_pid: None,
            pid_file: opts.pid_file.clone(),
            control: opts.control.clone(),
            children: Vec::new(),
            drains: Vec::new(),
            log,
            opts,
        };
        if t.opts.server.is_some() {
            match t.opts.path {
                RestartPath::SelfUpgrade | RestartPath::StopStart => {
                    if t.opts.path == RestartPath::SelfUpgrade {
                        t.pid_file = Some(t.opts.dir.join("server.pid"));
                    }
                    let child = t.spawn_server().await?;
                    t.children.push(child);
                }
                RestartPath::Master => {
                    t.addr = free_addr()?;
                    t.control = Some(t.opts.dir.join("control.sock"));
                    t.spawn_master()?;
                }
            }
        } else if t.opts.url_addr.is_none() {
            return Err(
                "give the server to start (--server) or the URL of a running one (--url)".into(),
            );
        } else if t.opts.path == RestartPath::StopStart {
            return Err("the stop-start path needs --server: the bench starts and stops it".into());
        }
        // Wait until it answers, and learn who answers.
        let cfg = probe_cfg(t.addr, Duration::from_secs(2));
        let pong = {
            let deadline = Instant::now() + t.opts.step_timeout;
            loop {
                match one_shot(&cfg).await {
                    Ok(p) => break p,
                    Err(e) => {
                        if Instant::now() > deadline {
                            return Err(format!(
                                "the server at {} did not answer within {:?}: {}; log {}",
                                t.addr,
                                t.opts.step_timeout,
                                e.message,
                                t.log.display()
                            )
                            .into());
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
        };
        t.current_pid = pong.pid;
        if let Some(pf) = &t.pid_file {
            let pf = pf.clone();
            let want = pong.pid;
            if poll(t.opts.step_timeout, Duration::from_millis(2), || {
                (read_pid(&pf) == Some(want)).then_some(())
            })
            .await
            .is_none()
            {
                return Err(format!(
                    "the PID file {} does not name the serving PID {want}",
                    pf.display()
                )
                .into());
            }
        }
        Ok(t)
    }

    /// Starts bench-server (self and stop-start paths) and waits for its address.
    async fn spawn_server(&mut self) -> Result<Child, BoxError> {
        let server = self.opts.server.clone().ok_or("no server binary")?;
        let mut cmd = Command::new(&server);
        cmd.arg("--addr").arg(self.addr.to_string());
        if let Some(pf) = &self.pid_file {
            cmd.arg("--pid-file").arg(pf);
        }
        cmd.args(&self.opts.server_args);
        let (out, err) = log_file(&self.log)?;
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(false);
        let before = std::fs::read_to_string(&self.log)
            .map(|s| s.len())
            .unwrap_or(0);
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", server.display()))?;
        let pid = child.id().unwrap_or(0);
        if self.addr.port() == 0 {
            let log = self.log.clone();
            let needle = format!("[pid] {pid}");
            let found = poll(self.opts.step_timeout, Duration::from_millis(2), || {
                let text = std::fs::read_to_string(&log).ok()?;
                let mine = text.get(before..)?;
                let at = mine.find(&needle)?;
                mine[at..]
                    .lines()
                    .find_map(|l| l.strip_prefix("listening on "))
                    .and_then(|a| a.trim().parse::<SocketAddr>().ok())
            })
            .await;
            self.addr = found.ok_or_else(|| {
                format!(
                    "{} did not print its address; log {}",
                    server.display(),
                    self.log.display()
                )
            })?;
        }
        Ok(child)
    }

    fn spawn_master(&mut self) -> Result<(), BoxError> {
        let server = self.opts.server.clone().ok_or("no server binary")?;
        let control = self.control.clone().ok_or("no control socket")?;
        let mut cmd = Command::new(&self.opts.reborn);
        cmd.arg("run")
            .arg("--listen")
            .arg(format!("http={}", self.addr))
            .arg("--control")
            .arg(&control)
            .arg("--pid-file")
            .arg(self.opts.dir.join("master.pid"))
            .args(&self.opts.master_args);
        if !self
            .opts
            .master_args
            .iter()
            .any(|a| a.starts_with("--probation"))
        {
            cmd.args(["--probation", "0"]);
        }
        cmd.arg("--")
            .arg(&server)
            .arg("--addr")
            .arg(self.addr.to_string())
            .args(&self.opts.server_args);
        let (out, err) = log_file(&self.log)?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd.spawn().map_err(|e| {
            format!(
                "cannot start the master {}: {e}",
                self.opts.reborn.display()
            )
        })?;
        self.master_pid = child.id();
        self.children.push(child);
        Ok(())
    }

    /// The server's log (stdout and stderr of what the bench started).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Restarts the server once and measures the handoff. `probe`: send our own requests
    /// to find the new generation (when no load runs).
    pub async fn restart(
        &mut self,
        index: usize,
        gens: &Arc<Generations>,
        epoch: Instant,
        probe: bool,
    ) -> RestartRecord {
        // A PID handed out again is a new generation: forget the ones that are gone.
        gens.retire_dead(crate::sys::alive);
        let known: Vec<u32> = gens
            .all()
            .keys()
            .copied()
            .chain([self.current_pid])
            .collect();
        let mut rec = RestartRecord {
            index,
            old_pid: self.current_pid,
            new_pid: None,
            at_ms: 0.0,
            at_unix_us: 0,
            handoff_ms: None,
            commit_ms: None,
            drain_ms: None,
            steal_ms: None,
            error: None,
            signal_at: None,
        };
        let steal_before = sys::steal_ms();
        let prober = probe.then(|| spawn_prober(self.addr, gens.clone()));
        let timeout = self.opts.step_timeout;
        let result = match self.opts.path {
            RestartPath::SelfUpgrade => self.restart_self(&mut rec, gens, &known).await,
            RestartPath::Master => self.restart_master(&mut rec, gens, &known).await,
            RestartPath::StopStart => self.restart_stop_start(&mut rec, gens, &known).await,
        };
        if let (Some(a), Some(b)) = (steal_before, sys::steal_ms()) {
            rec.steal_ms = Some(b - a);
        }
        if let Some((stop, task)) = prober {
            let _ = stop.send(true);
            let _ = task.await;
        }
        if let Some(at) = rec.signal_at {
            rec.at_ms = ms(at.saturating_duration_since(epoch));
            let now_unix = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            rec.at_unix_us = now_unix.saturating_sub(at.elapsed()).as_micros() as u64;
        }
        if let Err(e) = result {
            rec.error = Some(e);
        }
        if let Some(new) = rec.new_pid {
            self.current_pid = new;
        }
        // The old process drains in the background; its exit is timed from the signal.
        if self.opts.path != RestartPath::StopStart
            && let Some(at) = rec.signal_at
        {
            let old = rec.old_pid;
            let limit = timeout + Duration::from_secs(60);
            self.drains.push((
                index,
                tokio::spawn(async move {
                    poll(limit, Duration::from_millis(1), || {
                        (!sys::alive(old)).then(|| at.elapsed())
                    })
                    .await
                }),
            ));
        }
        rec
    }

    async fn restart_self(
        &mut self,
        rec: &mut RestartRecord,
        gens: &Generations,
        known: &[u32],
    ) -> Result<(), String> {
        let pf = self
            .pid_file
            .clone()
            .ok_or("the self path needs the PID file (--pid-file)")?;
        let old =
            read_pid(&pf).ok_or_else(|| format!("cannot read the PID file {}", pf.display()))?;
        rec.old_pid = old;
        let t = Instant::now();
        rec.signal_at = Some(t);
        sys::kill(old, libc::SIGHUP).map_err(|e| format!("SIGHUP to {old}: {e}"))?;
        let deadline = tokio::time::Instant::from_std(t + self.opts.step_timeout);
        // The commit (the drain's start) is when the old generation names the new one in
        // the PID file. Watched alongside the load, which may reach the new generation
        // only later: its keep-alive connections move once the probation has passed.
        let committed = poll(self.opts.step_timeout, Duration::from_micros(500), || {
            read_pid(&pf)
                .filter(|p| *p != old)
                .map(|p| (p, t.elapsed()))
        });
        let (new, committed) = tokio::join!(gens.wait_new(known, deadline), committed);
        let (new, seen) = new.ok_or_else(|| {
            format!(
                "no answer from a new generation within {:?} of SIGHUP to {old}",
                self.opts.step_timeout
            )
        })?;
        rec.new_pid = Some(new);
        rec.handoff_ms = Some(ms(seen.first.saturating_duration_since(t)));
        match committed {
            Some((pid, d)) if pid == new => rec.commit_ms = Some(ms(d)),
            Some((pid, _)) => {
                return Err(format!(
                    "the PID file named {pid}, but the new generation that answered is {new}"
                ));
            }
            None => return Err(format!("the PID file never named the new PID {new}")),
        }
        Ok(())
    }

    async fn restart_master(
        &mut self,
        rec: &mut RestartRecord,
        gens: &Generations,
        known: &[u32],
    ) -> Result<(), String> {
        let control = self
            .control
            .clone()
            .ok_or("the master path needs the control socket (--control)")?;
        let t = Instant::now();
        rec.signal_at = Some(t);
        let out = Command::new(&self.opts.reborn)
            .arg("upgrade")
            .arg("--control")
            .arg(&control)
            .stdin(Stdio::null())
            .output();
        let deadline = tokio::time::Instant::from_std(t + self.opts.step_timeout);
        let (out, new) = tokio::join!(
            tokio::time::timeout_at(deadline, out),
            gens.wait_new(known, deadline)
        );
        match out {
            Ok(Ok(o)) if o.status.success() => rec.commit_ms = Some(ms(t.elapsed())),
            Ok(Ok(o)) => {
                return Err(format!(
                    "reborn upgrade failed ({}): {}{}",
                    o.status,
                    String::from_utf8_lossy(&o.stdout).trim(),
                    String::from_utf8_lossy(&o.stderr).trim()
                ));
            }
            Ok(Err(e)) => {
                return Err(format!(
                    "cannot run {} upgrade: {e}",
                    self.opts.reborn.display()
                ));
            }
            Err(_) => return Err("reborn upgrade did not return in time".into()),
        }
        let (new, seen) = new.ok_or("no answer from a new generation after reborn upgrade")?;
        rec.new_pid = Some(new);
        rec.handoff_ms = Some(ms(seen.first.saturating_duration_since(t)));
        Ok(())
    }

    async fn restart_stop_start(
        &mut self,
        rec: &mut RestartRecord,
        gens: &Generations,
        known: &[u32],
    ) -> Result<(), String> {
        let mut child = self.children.pop().ok_or("no server process to stop")?;
        let old = child.id().unwrap_or(self.current_pid);
        rec.old_pid = old;
        let t = Instant::now();
        rec.signal_at = Some(t);
        sys::kill(old, libc::SIGTERM).map_err(|e| format!("SIGTERM to {old}: {e}"))?;
        match tokio::time::timeout(self.opts.step_timeout, child.wait()).await {
            Ok(Ok(_)) => rec.drain_ms = Some(ms(t.elapsed())),
            Ok(Err(e)) => return Err(format!("waiting for {old}: {e}")),
            Err(_) => {
                let _ = child.kill().await;
                return Err(format!(
                    "{old} did not exit within {:?} of SIGTERM",
                    self.opts.step_timeout
                ));
            }
        }
        let child = self.spawn_server().await.map_err(|e| e.to_string())?;
        rec.commit_ms = Some(ms(t.elapsed()));
        self.children.push(child);
        let deadline = tokio::time::Instant::from_std(t + self.opts.step_timeout);
        let (new, seen) = gens
            .wait_new(known, deadline)
            .await
            .ok_or("no answer from the restarted server")?;
        rec.new_pid = Some(new);
        rec.handoff_ms = Some(ms(seen.first.saturating_duration_since(t)));
        Ok(())
    }

    /// Waits (bounded) for the old generations' drains and fills in their times.
    pub async fn collect_drains(&mut self, records: &mut [RestartRecord], wait: Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        for (index, task) in self.drains.drain(..) {
            let res = tokio::time::timeout_at(deadline, task).await;
            if let Some(rec) = records.get_mut(index) {
                match res {
                    Ok(Ok(Some(d))) => rec.drain_ms = Some(ms(d)),
                    _ => {
                        if rec.error.is_none() {
                            rec.error = Some(format!(
                                "old process {} still alive at the end",
                                rec.old_pid
                            ));
                        }
                    }
                }
            }
        }
    }

    /// The file descriptors and memory of the master and of every generation still
    /// alive, plus every PID that ever answered (to show that none lingers).
    pub fn processes(&self, gens: &Generations) -> Vec<ProcStat> {
        let mut out = Vec::new();
        if let Some(m) = self.master_pid {
            out.push(ProcStat::of("master", m));
        }
        out.push(ProcStat::of("serving", self.current_pid));
        let mut pids: Vec<u32> = gens
            .all()
            .keys()
            .copied()
            .filter(|p| *p != self.current_pid)
            .collect();
        pids.sort_unstable();
        for p in pids {
            let s = ProcStat::of("old generation", p);
            if s.alive {
                out.push(s);
            }
        }
        out
    }

    /// Stops everything the bench started (bounded: SIGKILL after the step timeout).
    pub async fn stop(mut self) {
        if self.opts.server.is_none() {
            return;
        }
        let mut pids = Vec::new();
        match self.opts.path {
            RestartPath::Master => pids.extend(self.master_pid),
            _ => {
                if let Some(pf) = &self.pid_file
                    && let Some(p) = read_pid(pf)
                {
                    pids.push(p);
                }
                pids.push(self.current_pid);
            }
        }
        pids.sort_unstable();
        pids.dedup();
        for p in &pids {
            let _ = sys::kill(*p, libc::SIGTERM);
        }
        let limit = self.opts.step_timeout;
        let all_gone = poll(limit, Duration::from_millis(5), || {
            pids.iter().all(|p| !sys::alive(*p)).then_some(())
        })
        .await;
        if all_gone.is_none() {
            for p in &pids {
                let _ = sys::kill(*p, libc::SIGKILL);
            }
        }
        for mut c in self.children.drain(..) {
            if tokio::time::timeout(Duration::from_secs(2), c.wait())
                .await
                .is_err()
            {
                let _ = c.kill().await;
            }
        }
    }
}

/// Sends new-connection requests in a loop, recording who answers, until stopped.
fn spawn_prober(
    addr: SocketAddr,
    gens: Arc<Generations>,
) -> (tokio::sync::watch::Sender<bool>, JoinHandle<()>) {
    let (tx, mut rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move {
        let cfg = probe_cfg(addr, Duration::from_secs(2));
        while !*rx.borrow_and_update() {
            if let Ok(p) = one_shot(&cfg).await {
                gens.record(&p, Instant::now());
            }
            tokio::select! {
                _ = rx.changed() => {}
                _ = tokio::time::sleep(Duration::from_micros(200)) => {}
            }
        }
    });
    (tx, task)
}
