//! One server instance on one host of a fleet, run as a deploy runs it: from a copy of
//! the binary in a directory of its own (so that a deploy can rename a new binary over
//! it, and an in-place upgrade execs what is then on disk), with a PID file that names
//! the generation serving now. Every generation it had is killed on drop, also when a
//! caller panics: later generations are not our children, and would otherwise outlive
//! the run.
//!
//! The server is any binary that takes `--addr HOST:PORT` and `--pid-file PATH`, prints
//! `listening on ADDR` once it listens, and writes its PID file when ready (the test
//! server and bench-server both do).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{Host, SERIAL};
use crate::{PATIENCE, Proc, alive, poll_until, wait_for};

/// The start of the name of a [`ScratchDir`], which the PID of its process follows.
const SCRATCH_PREFIX: &str = "reborn-fleet-";

/// A directory of this process's own, removed on drop: `BASE/reborn-fleet-<pid>-<serial>`.
/// (The testkit depends on libc and std only: no `tempfile`.)
#[derive(Debug)]
pub(crate) struct ScratchDir(PathBuf);

impl ScratchDir {
    /// Makes a fresh directory under `base`, after removing the ones that processes now
    /// gone left there (killed before their drop ran).
    pub(crate) fn new(base: &Path) -> ScratchDir {
        reap_scratch_leftovers(base);
        let serial = SERIAL.fetch_add(1, Ordering::Relaxed);
        let dir = base.join(format!("{SCRATCH_PREFIX}{}-{serial}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot make {}: {e}", dir.display()));
        ScratchDir(dir)
    }

    /// Makes a fresh subdirectory `name` of this one.
    pub(crate) fn subdir(&self, name: &str) -> PathBuf {
        let dir = self.0.join(name);
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot make {}: {e}", dir.display()));
        dir
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn reap_scratch_leftovers(base: &Path) {
    for dir in super::orphans(base, SCRATCH_PREFIX) {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// One instance of a server, from its own copy of the binary, on one host.
pub(crate) struct Instance {
    /// The first generation (started through `ip netns exec`, which execs it).
    proc: Proc,
    addr: SocketAddr,
    /// Every PID that served from this directory, to kill on drop.
    pids: Vec<u32>,
    bin: PathBuf,
    /// Its own directory (the binary, the PID file), removed on drop.
    dir: PathBuf,
}

impl Instance {
    /// Starts one instance of `server` per `(host, address, directory)` (all at once:
    /// each start may read its whole binary), and waits until each one listens and has
    /// written its PID file.
    pub(crate) fn start_all(
        server: &Path,
        hosts: &[(&Host, SocketAddr, PathBuf)],
        args: &[String],
    ) -> Vec<Instance> {
        let started: Vec<_> = hosts
            .iter()
            .map(|(host, addr, dir)| {
                let bin = crate::copy_to(server, dir, "server");
                let proc = launch(host, &bin, dir, *addr, args);
                (bin, proc)
            })
            .collect();
        started
            .into_iter()
            .zip(hosts)
            .map(|((bin, mut proc), (host, addr, dir))| {
                let mut attempts = 0;
                let addr = loop {
                    match listening(&mut proc) {
                        Started::On(addr) => break addr,
                        // The copy can be briefly "busy" (another thread's fork holds its
                        // write descriptor until that child execs): `ip` says so and exits.
                        Started::Busy if attempts < 50 => {
                            attempts += 1;
                            std::thread::sleep(Duration::from_millis(20));
                            proc = launch(host, &bin, dir, *addr, args);
                        }
                        _ => panic!("the instance on {addr} did not start:\n{}", proc.output()),
                    }
                };
                let pid = proc.pid();
                let instance = Instance {
                    proc,
                    addr,
                    pids: vec![pid],
                    bin,
                    dir: dir.clone(),
                };
                wait_for(&format!("pid {pid} in its PID file"), PATIENCE, || {
                    (instance.serving_pid() == Some(pid)).then_some(())
                });
                instance
            })
            .collect()
    }

    /// The address it listens on, as reached from here.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The first generation.
    pub(crate) fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }

    /// The PID in the PID file.
    pub(crate) fn serving_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Waits until the PID file names a process other than `old`, and returns it.
    pub(crate) fn wait_new_pid(&mut self, old: u32) -> u32 {
        let new = poll_until(PATIENCE, || self.serving_pid().filter(|p| *p != old)).unwrap_or_else(
            || {
                panic!(
                    "timed out after {PATIENCE:?} waiting for a new PID on {}; the server \
                     said:\n{}",
                    self.addr,
                    self.proc.output()
                )
            },
        );
        self.pids.push(new);
        new
    }

    /// Replaces the binary on disk with a variant of `server` (a different digest).
    pub(crate) fn deploy_variant(&self, server: &Path, tag: &str) {
        crate::replace_with_variant(&self.bin, server, tag.as_bytes());
    }

    /// Whether `pid` runs a binary of this instance's directory (a PID can be reused).
    fn owns(&self, pid: u32) -> bool {
        std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe.starts_with(&self.dir))
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        // Later generations are not our children: kill them by PID (and any generation
        // started but not yet in the PID file), the first one through `proc`'s drop.
        let mut pids = self.pids.clone();
        pids.extend(self.serving_pid());
        for pid in pids.clone() {
            pids.extend(crate::children(pid));
        }
        for pid in pids {
            if pid != self.proc.pid() && alive(pid) && self.owns(pid) {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
        // The binary and PID file; the first generation, killed next, runs from a file
        // that no longer has a name, as a replaced binary does.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn launch(host: &Host, bin: &Path, dir: &Path, addr: SocketAddr, args: &[String]) -> Proc {
    let mut cmd: Command = host.command(bin);
    cmd.arg("--addr")
        .arg(addr.to_string())
        .arg("--pid-file")
        .arg(dir.join("pid"))
        .args(args)
        .current_dir(dir);
    Proc::start(cmd)
}

enum Started {
    On(SocketAddr),
    Busy,
    Exited,
}

/// Waits for the `listening on` line, or for the process to end.
fn listening(proc: &mut Proc) -> Started {
    let started = poll_until(PATIENCE, || {
        let output = proc.output();
        if let Some(addr) = output
            .lines()
            .find_map(|l| l.strip_prefix("listening on ")?.trim().parse().ok())
        {
            return Some(Started::On(addr));
        }
        if let Ok(Some(_)) = proc.child.try_wait() {
            // What it printed last may still be in its pipes.
            proc.wait_output_end(PATIENCE);
            return Some(if proc.output().contains("Text file busy") {
                Started::Busy
            } else {
                Started::Exited
            });
        }
        None
    });
    started.unwrap_or_else(|| {
        panic!(
            "timed out after {PATIENCE:?} waiting for the listening address:\n{}",
            proc.output()
        )
    })
}
