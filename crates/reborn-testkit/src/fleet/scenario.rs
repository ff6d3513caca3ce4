//! The deploys of a fleet, as production runs them: HAProxy in front of N instances of a
//! server, each on a host of its own, health-checked on `/readyz`, under load from
//! clients that never retry (and HAProxy with `retries 0`, no redispatch: a request that
//! fails reaches the client). Each instance in turn is upgraded in place
//! ([`Fleet::roll_in_place`]: a new binary, `SIGHUP`) or replaced
//! ([`Fleet::roll_replace`]: `SIGTERM`, HAProxy takes it out, a new instance starts at
//! its address) while the others serve.
//!
//! One implementation for two users: the fleet test asserts on the [`FleetReport`]
//! (nothing lost, no server taken out), and `reborn-bench fleet` prints and records the
//! same report, so that the benchmark measures exactly what the test checks.
//!
//! ```no_run
//! use std::path::Path;
//! use std::time::Duration;
//! use reborn_testkit::fleet::{Fleet, FleetOptions};
//!
//! let mut fleet = Fleet::start(
//!     Path::new("target/release/bench-server"),
//!     FleetOptions {
//!         probation: Some(Duration::ZERO),
//!         ..FleetOptions::default()
//!     },
//! );
//! let report = fleet.roll_in_place(3);
//! assert_eq!(report.failed, 0, "{:?}", report.errors);
//! ```

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::instance::{Instance, ScratchDir};
use super::{Haproxy, HaproxyOptions, Hosts, wait_gone};
use crate::{Load, LoadReport, PATIENCE, poll_until, signal};

/// How to start a [`Fleet`].
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// Instances, each on a host of its own (1 to 64): 3.
    pub hosts: usize,
    /// The port every instance listens on inside its host's namespace (private to it;
    /// in the loopback fallback each takes a port of the system's choosing): 8080.
    pub port: u16,
    /// `--probation-ms` for every instance (`None`: the server's default). An in-place
    /// roll waits for each old generation to exit, which it does only after the new
    /// one's probation: `Some(Duration::ZERO)` makes that at once.
    pub probation: Option<Duration>,
    /// `--shutdown-delay-ms` for every instance (`None`: none): after `SIGTERM` the
    /// instance keeps serving this long while `/readyz` answers 503, so that HAProxy
    /// takes it out before it stops accepting. Pick it above HAProxy's
    /// `inter × fall` (200 ms by default) with a margin: 1 s.
    pub shutdown_delay: Option<Duration>,
    /// More arguments for every instance, after `--addr` and `--pid-file`.
    pub extra_args: Vec<String>,
    /// How HAProxy checks the instances.
    pub haproxy: HaproxyOptions,
    /// Clients that keep their connection to HAProxy alive: 4.
    pub keep_alive_clients: usize,
    /// Clients that open a new connection to HAProxy per request: 2.
    pub new_conn_clients: usize,
    /// Run a copy of the server without its debug information (`strip --strip-debug`,
    /// from binutils; the server whole if `strip` fails): for an unoptimized test server,
    /// which hashes its whole file at every start (75 MB of a debug build against 15 MB
    /// without debug information). `false`.
    pub strip_debug: bool,
    /// Where the fleet's directory (the binaries, the PID files) is made, removed at the
    /// end: the system's temporary directory if `None`.
    pub dir: Option<PathBuf>,
}

impl Default for FleetOptions {
    fn default() -> FleetOptions {
        FleetOptions {
            hosts: 3,
            port: 8080,
            probation: None,
            shutdown_delay: None,
            extra_args: Vec::new(),
            haproxy: HaproxyOptions::default(),
            keep_alive_clients: 4,
            new_conn_clients: 2,
            strip_debug: false,
            dir: None,
        }
    }
}

/// How a [`Fleet`] came up, and how long each part took.
#[derive(Debug, Clone)]
pub struct Startup {
    /// HAProxy's frontend (on 127.0.0.1).
    pub haproxy: SocketAddr,
    /// The instances' addresses, as HAProxy reaches them.
    pub servers: Vec<SocketAddr>,
    /// Whether the hosts are network namespaces (`false`: the loopback fallback).
    pub namespaces: bool,
    /// Whether the instances run a copy stripped of its debug information.
    pub stripped: bool,
    /// Copying (or stripping) the server.
    pub prepared: Duration,
    /// Making the hosts.
    pub hosts: Duration,
    /// Starting the instances, until each listens and has written its PID file.
    pub instances: Duration,
    /// Everything, until HAProxy reports every instance up.
    pub total: Duration,
}

impl fmt::Display for Startup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "haproxy on {} in front of {:?} ({}), up in {:.2?} (server {} {:.2?}, hosts made \
             {:.2?}, instances started {:.2?})",
            self.haproxy,
            self.servers,
            if self.namespaces {
                "network namespaces"
            } else {
                "loopback"
            },
            self.total,
            if self.stripped { "stripped" } else { "copied" },
            self.prepared,
            self.hosts,
            self.instances,
        )
    }
}

/// Which deploy a [`FleetReport`] is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Roll {
    /// [`Fleet::roll_in_place`]: this many rounds over every instance.
    InPlace {
        /// Rounds.
        rounds: usize,
    },
    /// [`Fleet::roll_replace`], the instances started with this shutdown delay.
    Replace {
        /// [`FleetOptions::shutdown_delay`].
        shutdown_delay: Option<Duration>,
    },
}

/// The parts of one replacement, each from the `SIGTERM`.
#[derive(Debug, Clone)]
pub struct Replaced {
    /// Until HAProxy reports the instance `DOWN`.
    pub down: Duration,
    /// Until the old instance has exited.
    pub exited: Duration,
    /// Until HAProxy reports the new instance `UP`.
    pub up: Duration,
    /// Until the load has had an answer from the new instance.
    pub total: Duration,
}

/// What a roll over the fleet counted, and how long it took.
#[derive(Debug, Clone)]
pub struct FleetReport {
    /// Which deploy.
    pub roll: Roll,
    /// Requests the clients sent through HAProxy, answered or not.
    pub requests: u64,
    /// Of those, the ones that failed, any way (the clients never retry).
    pub failed: u64,
    /// Of those, connections refused (by HAProxy: the servers are behind it).
    pub refused: u64,
    /// Connections a keep-alive client opened after its first one.
    pub reconnects: u64,
    /// The first failures (at most 20), described.
    pub errors: Vec<String>,
    /// Each upgrade or replacement, from its start until the load had an answer from the
    /// new generation through HAProxy, in order.
    pub per_instance: Vec<Duration>,
    /// The parts of each replacement (empty for an in-place roll).
    pub replacements: Vec<Replaced>,
    /// The whole roll, first signal to the last new generation's first answer.
    pub total: Duration,
    /// Each server's count of HAProxy's UP to DOWN transitions (`chkdown`), at the end.
    pub downs: Vec<u64>,
    /// The PID of each new generation, in order.
    pub generations: Vec<u32>,
    /// Every PID that answered the load (`pid=` of the bodies), in order of first answer.
    pub answered: Vec<u32>,
    /// Whether the hosts were network namespaces (`false`: the loopback fallback).
    pub namespaces: bool,
}

impl FleetReport {
    /// The median of [`FleetReport::per_instance`] (the upper one of an even count).
    pub fn median(&self) -> Duration {
        let mut sorted = self.per_instance.clone();
        sorted.sort();
        sorted.get(sorted.len() / 2).copied().unwrap_or_default()
    }

    /// The longest of [`FleetReport::per_instance`].
    pub fn max(&self) -> Duration {
        self.per_instance.iter().max().copied().unwrap_or_default()
    }

    /// `median M, max X` of the times per instance.
    pub fn summary(&self) -> String {
        format!("median {:.2?}, max {:.2?}", self.median(), self.max())
    }

    /// The UP to DOWN transitions of every server, summed.
    pub fn marked_down(&self) -> u64 {
        self.downs.iter().sum()
    }

    /// The new generations that never answered the load.
    pub fn unanswered(&self) -> Vec<u32> {
        self.generations
            .iter()
            .copied()
            .filter(|pid| !self.answered.contains(pid))
            .collect()
    }
}

/// HAProxy in front of instances on hosts of their own, and the deploys they go through.
/// Everything is removed on drop, also on a panic: HAProxy, the instances (every
/// generation), then the hosts they ran on, then the directory.
pub struct Fleet {
    haproxy: Haproxy,
    instances: Vec<Instance>,
    hosts: Hosts,
    /// The server the instances run (the fleet's own copy).
    server: PathBuf,
    options: FleetOptions,
    startup: Startup,
    /// Instances started so far (names their directories).
    started: usize,
    /// Variants deployed so far (tags each one).
    deployed: usize,
    dir: ScratchDir,
}

impl Fleet {
    /// Makes the hosts, starts one instance of `server` on each, and HAProxy in front of
    /// them, and waits until HAProxy reports every instance up. Panics, saying why, if
    /// anything fails (`haproxy` missing, an instance that does not start).
    pub fn start(server: &Path, options: FleetOptions) -> Fleet {
        let t = Instant::now();
        let dir = ScratchDir::new(&options.dir.clone().unwrap_or_else(std::env::temp_dir));
        let (own, stripped) = prepare(server, dir.path(), options.strip_debug);
        let prepared = t.elapsed();
        let hosts = Hosts::new(options.hosts);
        let made = t.elapsed();
        let binds: Vec<_> = hosts
            .iter()
            .enumerate()
            .map(|(i, h)| {
                (
                    h,
                    h.bind_addr(options.port),
                    dir.subdir(&format!("host{i}-0")),
                )
            })
            .collect();
        let instances = Instance::start_all(&own, &binds, &server_args(&options));
        let started = t.elapsed();
        let servers: Vec<_> = instances.iter().map(|i| i.addr()).collect();
        let haproxy = Haproxy::start(&servers, &options.haproxy);
        for i in 0..instances.len() {
            haproxy.wait_up(&Haproxy::server(i));
        }
        let startup = Startup {
            haproxy: haproxy.addr(),
            servers,
            namespaces: hosts.namespaces(),
            stripped,
            prepared,
            hosts: made - prepared,
            instances: started - made,
            total: t.elapsed(),
        };
        Fleet {
            haproxy,
            started: instances.len(),
            instances,
            hosts,
            server: own,
            options,
            startup,
            deployed: 0,
            dir,
        }
    }

    /// How the fleet came up.
    pub fn startup(&self) -> &Startup {
        &self.startup
    }

    /// The options it was started with.
    pub fn options(&self) -> &FleetOptions {
        &self.options
    }

    /// HAProxy (its log, its admin socket).
    pub fn haproxy(&self) -> &Haproxy {
        &self.haproxy
    }

    /// The hosts.
    pub fn hosts(&self) -> &Hosts {
        &self.hosts
    }

    /// The lines of HAProxy's log for requests it answered 503 itself (no server to
    /// send them to, or the one it picked refused the connection).
    pub fn logged_503(&self) -> Vec<String> {
        self.haproxy
            .log()
            .lines()
            .filter(|l| l.contains(" 503 "))
            .map(str::to_owned)
            .collect()
    }

    /// Rolling in-place upgrades: `rounds` times, each instance in turn gets a new binary
    /// on disk (a variant of the server: another digest) and `SIGHUP`; the roll moves on
    /// once the new generation is in the PID file, the old one has exited, HAProxy has
    /// it up and the load has had an answer from the new generation through HAProxy.
    /// Start the fleet with a zero probation, or each step waits for it.
    ///
    /// The load stops by itself after [`Load::LIMIT`]: a roll must take less.
    pub fn roll_in_place(&mut self, rounds: usize) -> FleetReport {
        let load = self.load();
        let start = Instant::now();
        let mut times = Vec::new();
        let mut generations = Vec::new();
        for round in 1..=rounds {
            for i in 0..self.instances.len() {
                let t = Instant::now();
                self.deployed += 1;
                let tag = format!("deploy {} round {round} host {i}", self.deployed);
                let instance = &mut self.instances[i];
                let old = instance.serving_pid().expect("a PID file");
                instance.deploy_variant(&self.server, &tag);
                signal(old, libc::SIGHUP);
                let new = instance.wait_new_pid(old);
                wait_gone(old);
                self.haproxy.wait_up(&Haproxy::server(i));
                self.wait_load_answered_by(&load, new);
                generations.push(new);
                times.push(t.elapsed());
            }
        }
        let total = start.elapsed();
        let downs = self.downs();
        self.report(
            Roll::InPlace { rounds },
            load.finish(),
            times,
            Vec::new(),
            total,
            downs,
            generations,
        )
    }

    /// Rolling replacement: each instance in turn gets `SIGTERM`; once HAProxy has it
    /// down and it has exited, a new instance (the same binary) starts at the same
    /// address, and the roll moves on once HAProxy has it up and the load has had an
    /// answer from it. With [`FleetOptions::shutdown_delay`] the old instance serves on
    /// while HAProxy's checks see it go; without, it stops accepting at once, and the
    /// requests HAProxy sends it meanwhile fail.
    ///
    /// The load stops by itself after [`Load::LIMIT`]: a roll must take less.
    pub fn roll_replace(&mut self) -> FleetReport {
        let load = self.load();
        let start = Instant::now();
        let mut replaced = Vec::new();
        let mut generations = Vec::new();
        for i in 0..self.instances.len() {
            let (r, pid) = self.replace(i, &load);
            replaced.push(r);
            generations.push(pid);
        }
        let total = start.elapsed();
        let downs = self.downs();
        self.report(
            Roll::Replace {
                shutdown_delay: self.options.shutdown_delay,
            },
            load.finish(),
            replaced.iter().map(|r| r.total).collect(),
            replaced,
            total,
            downs,
            generations,
        )
    }

    /// Each server's count of UP to DOWN transitions.
    pub fn downs(&self) -> Vec<u64> {
        (0..self.instances.len())
            .map(|i| {
                let name = Haproxy::server(i);
                let stat = self.haproxy.server_stat(&name, "chkdown");
                stat.as_deref()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("haproxy's chkdown of {name}: {stat:?}"))
            })
            .collect()
    }

    /// Starts the clients, through HAProxy, and waits until they have had 200 answers.
    fn load(&self) -> Load {
        let load = Load::start(
            self.haproxy.addr(),
            "/ping",
            self.options.keep_alive_clients,
            self.options.new_conn_clients,
        );
        load.wait_progress(200);
        load
    }

    /// Waits until the load has had an answer from `pid`, through HAProxy.
    fn wait_load_answered_by(&self, load: &Load, pid: u32) {
        poll_until(PATIENCE, || {
            let bodies = load.snapshot().bodies;
            bodies
                .iter()
                .any(|b| body_pid(b) == Some(pid))
                .then_some(())
        })
        .unwrap_or_else(|| {
            panic!(
                "the load had no answer from pid {pid} within {PATIENCE:?}: {:?}; haproxy \
                 said:\n{}",
                load.snapshot(),
                self.haproxy.log()
            )
        });
    }

    /// Replaces instance `i`: SIGTERM, HAProxy marks it down, it exits, a new instance
    /// starts at the same address, HAProxy marks it up, the load has an answer from it.
    /// Returns how long each part took, and the new instance's PID.
    fn replace(&mut self, i: usize, load: &Load) -> (Replaced, u32) {
        let name = Haproxy::server(i);
        let t = Instant::now();
        let old = self.instances[i].serving_pid().expect("a PID file");
        signal(old, libc::SIGTERM);
        self.haproxy.wait_down(&name);
        let down = t.elapsed();
        let first = self.instances[i].proc();
        if first.pid() == old {
            let code = first.wait_exit(PATIENCE);
            assert_eq!(
                code,
                Some(0),
                "the old instance exits cleanly:\n{}",
                first.output()
            );
        } else {
            // A later generation (after an in-place roll): not our child.
            wait_gone(old);
        }
        let exited = t.elapsed();
        let addr = self.instances[i].addr();
        let dir = self.dir.subdir(&format!("host{i}-{}", self.started));
        self.started += 1;
        let args = server_args(&self.options);
        let mut new = Instance::start_all(&self.server, &[(&self.hosts[i], addr, dir)], &args)
            .pop()
            .expect("one instance");
        let pid = new.proc().pid();
        self.instances[i] = new;
        self.haproxy.wait_up(&name);
        let up = t.elapsed();
        self.wait_load_answered_by(load, pid);
        let replaced = Replaced {
            down,
            exited,
            up,
            total: t.elapsed(),
        };
        (replaced, pid)
    }

    #[allow(clippy::too_many_arguments)]
    fn report(
        &self,
        roll: Roll,
        load: LoadReport,
        per_instance: Vec<Duration>,
        replacements: Vec<Replaced>,
        total: Duration,
        downs: Vec<u64>,
        generations: Vec<u32>,
    ) -> FleetReport {
        FleetReport {
            roll,
            requests: load.ok + load.failed,
            failed: load.failed,
            refused: load.refused,
            reconnects: load.reconnects,
            answered: load.bodies.iter().filter_map(|b| body_pid(b)).collect(),
            errors: load.errors,
            per_instance,
            replacements,
            total,
            downs,
            generations,
            namespaces: self.hosts.namespaces(),
        }
    }
}

impl fmt::Debug for Fleet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fleet")
            .field("startup", &self.startup)
            .field("haproxy", &self.haproxy)
            .field("dir", &self.dir)
            .finish()
    }
}

/// The instances' arguments after `--addr` and `--pid-file`.
fn server_args(o: &FleetOptions) -> Vec<String> {
    let mut args = Vec::new();
    if let Some(p) = o.probation {
        args.extend(["--probation-ms".to_owned(), p.as_millis().to_string()]);
    }
    if let Some(d) = o.shutdown_delay {
        args.extend(["--shutdown-delay-ms".to_owned(), d.as_millis().to_string()]);
    }
    args.extend(o.extra_args.iter().cloned());
    args
}

/// The fleet's own copy of `server` in `dir` (stripped of its debug information if
/// asked and `strip` can), and whether it was stripped. The variants deployed are made
/// from it.
fn prepare(server: &Path, dir: &Path, strip: bool) -> (PathBuf, bool) {
    let own = dir.join("server");
    if strip {
        match Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&own)
            .arg(server)
            .status()
        {
            Ok(status) if status.success() => return (own, true),
            other => println!(
                "fleet: cannot strip {} ({other:?}): running it whole",
                server.display()
            ),
        }
    }
    (crate::copy_to(server, dir, "server"), false)
}

/// The PID that answered: `pid=<pid>` at the end of a `/ping` body.
fn body_pid(body: &str) -> Option<u32> {
    body.rsplit_once("pid=")?.1.trim().parse().ok()
}
