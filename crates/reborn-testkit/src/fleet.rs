//! A fleet for tests: simulated hosts (one network namespace each, joined to this one by
//! a veth pair) and HAProxy in front of the servers they run, as a deploy sees them.
//!
//! Everything is made with the system's own tools (`ip` from iproute2, Debian's
//! `haproxy`) and removed on drop, also when a test panics. Without the right to make
//! network namespaces (not root), [`Hosts`] falls back to loopback: every host is
//! 127.0.0.1 and its servers take ports of their own.
//!
//! [`Fleet`] puts them together: instances of a server on those hosts behind HAProxy,
//! and the deploys they go through under load (rolling in-place upgrades, rolling
//! replacement), for the fleet test and `reborn-bench fleet` alike.
//!
//! ```no_run
//! use reborn_testkit::fleet::{Haproxy, HaproxyOptions, Hosts};
//!
//! let hosts = Hosts::new(3);
//! let mut servers = Vec::new();
//! for host in hosts.iter() {
//!     let mut cmd = host.command("/path/to/server");
//!     cmd.arg("--addr").arg(host.bind_addr(8080).to_string());
//!     // … start it, read the address it listens on …
//! #   servers.push(host.bind_addr(8080));
//! }
//! let haproxy = Haproxy::start(&servers, &HaproxyOptions::default());
//! haproxy.wait_up(&Haproxy::server(0));
//! ```

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::{PATIENCE, poll_until, wait_for};

mod instance;
mod scenario;

pub use scenario::{Fleet, FleetOptions, FleetReport, Replaced, Roll, Startup};

/// Fleets made by this process so far: with the PID, it makes every name unique.
static SERIAL: AtomicUsize = AtomicUsize::new(0);

/// The private subnets hosts take: `10.A.B.0/24`, `A` in 200–250.
const SUBNETS: usize = 51 * 256;

/// Runs `ip ARGS`, returning its stdout or, on failure, what it said.
fn ip<S: AsRef<OsStr>>(args: &[S]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let shown: Vec<_> = args.iter().map(|a| a.as_ref().to_string_lossy()).collect();
        Err(format!(
            "`ip {}` failed ({}): {}",
            shown.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// An exclusive lock on a file shared by every test process on the machine, held while
/// a fleet picks its subnet and makes its interfaces (so that two processes never pick
/// the same one). The kernel releases it when the descriptor closes, also on a crash.
struct MachineLock(#[allow(dead_code)] File);

impl MachineLock {
    fn take() -> Result<MachineLock, String> {
        let path = std::env::temp_dir().join("reborn-testkit-fleet.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let fd = file.as_raw_fd();
        poll_until(PATIENCE, || {
            // SAFETY: flock on a descriptor we own; no memory is involved.
            (unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } == 0).then_some(())
        })
        .ok_or_else(|| format!("timed out waiting for the lock {}", path.display()))?;
        Ok(MachineLock(file))
    }
}

/// Whether a process exists (a zombie counts: its PID is not free yet).
fn pid_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The entries of `dir` named `PREFIX<pid>-…` whose test process `<pid>` is gone: what a
/// test process killed before its drop ran left behind.
fn orphans(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|entry| {
            let name = entry.file_name();
            let owner = name
                .to_str()
                .and_then(|n| n.strip_prefix(prefix))
                .and_then(|rest| rest.split_once('-'))
                .and_then(|(pid, _)| pid.parse::<u32>().ok());
            owner.is_some_and(|p| p != std::process::id() && !pid_exists(p))
        })
        .map(|entry| entry.path())
        .collect()
}

/// Deletes the namespaces that fleets of processes now gone left behind (killed before
/// their drop ran), after killing what still runs in them; their veth pairs go with them.
fn reap_leftovers() {
    let Ok(list) = ip(&["netns", "list"]) else {
        return;
    };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let owner = name
            .strip_prefix("rb")
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, rest)| Some((pid.parse::<u32>().ok()?, rest)))
            .filter(|(_, rest)| rest.contains("-h"));
        if let Some((pid, _)) = owner
            && pid != std::process::id()
            && !pid_exists(pid)
        {
            if let Ok(pids) = ip(&["netns", "pids", name]) {
                for pid in pids
                    .split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok())
                {
                    // SAFETY: kill has no memory-safety preconditions.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            let _ = ip(&["netns", "del", name]);
        }
    }
}

/// A free `10.A.B.0/24` (no address or route of this machine in it), from a start that
/// the PID and serial number spread.
fn pick_subnet(pid: u32, serial: usize) -> Result<(u8, u8), String> {
    let taken = ip(&["-o", "-4", "addr", "show"])? + &ip(&["-4", "route", "show", "table", "all"])?;
    let start = (pid as usize)
        .wrapping_mul(7919)
        .wrapping_add(serial.wrapping_mul(104_729));
    (0..SUBNETS)
        .map(|k| (start.wrapping_add(k)) % SUBNETS)
        .map(|s| ((200 + s / 256) as u8, (s % 256) as u8))
        .find(|(a, b)| !taken.contains(&format!("10.{a}.{b}.")))
        .ok_or_else(|| "every subnet of 10.200-250.x.0/24 is in use".to_owned())
}

/// One simulated host: a network namespace with an address of its own, reachable from
/// this process's namespace (or, in the loopback fallback, 127.0.0.1).
#[derive(Debug)]
pub struct Host {
    addr: IpAddr,
    netns: Option<String>,
    root_link: Option<String>,
}

impl Host {
    /// The address a server binds inside the host's namespace, and the one that reaches
    /// it from here (127.0.0.1 in the loopback fallback).
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The name of the host's network namespace (`None` in the loopback fallback).
    pub fn namespace(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// The address for a server of this host to listen on: `addr():port` in a
    /// namespace, where the address is the host's own; `127.0.0.1:0` (a port of the
    /// system's choosing, which the server says) in the loopback fallback.
    pub fn bind_addr(&self, port: u16) -> SocketAddr {
        match self.netns {
            Some(_) => SocketAddr::new(self.addr, port),
            None => SocketAddr::from(([127, 0, 0, 1], 0)),
        }
    }

    /// A command that runs `program` on this host: `ip netns exec NAME program`, to
    /// which the caller adds arguments. `ip netns exec` execs the program (it does not
    /// fork), so the child's PID is the program's own.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns]).arg(program);
                cmd
            }
            None => Command::new(program),
        }
    }

    /// `cmd`, made to run on this host: its program, arguments, environment changes and
    /// working directory carried over (not its stdio settings, nor an `env_clear`).
    pub fn wrap(&self, cmd: &Command) -> Command {
        let mut out = self.command(cmd.get_program());
        out.args(cmd.get_args());
        for (key, value) in cmd.get_envs() {
            match value {
                Some(v) => out.env(key, v),
                None => out.env_remove(key),
            };
        }
        if let Some(dir) = cmd.get_current_dir() {
            out.current_dir(dir);
        }
        out
    }
}

/// Set (to anything but the empty string), [`Hosts::new`] makes no namespaces and
/// takes the loopback fallback, as without root.
pub const LOOPBACK_VAR: &str = "REBORN_FLEET_LOOPBACK";

/// N simulated hosts, removed on drop. Each is a network namespace named
/// `rb<pid>-<serial>-h<i>` with `lo` up and one end of a veth pair (`eth0`) at
/// `10.A.B.(4i+2)/30`; the other end, `rb<pid hex>-<serial hex>-<i>`, is here at
/// `10.A.B.(4i+1)`. The subnet `10.A.B.0/24` (`A` in 200–250) is one no address or
/// route of the machine uses, picked under a machine-wide lock, so that tests in
/// parallel, in this process or others, never collide.
#[derive(Debug)]
pub struct Hosts {
    hosts: Vec<Host>,
    namespaces: bool,
}

impl Hosts {
    /// Makes `n` hosts (at most 64), or, if network namespaces cannot be made, says so on
    /// one line and falls back to loopback.
    pub fn new(n: usize) -> Hosts {
        assert!((1..=64).contains(&n), "1 to 64 hosts, not {n}");
        let serial = SERIAL.fetch_add(1, Ordering::Relaxed);
        let made = if std::env::var_os(LOOPBACK_VAR).is_some_and(|v| !v.is_empty()) {
            Err(format!("{LOOPBACK_VAR} is set"))
        } else {
            Hosts::in_namespaces(n, std::process::id(), serial)
        };
        match made {
            Ok(hosts) => hosts,
            Err(e) => {
                println!(
                    "fleet: cannot create network namespaces ({e}): hosts are loopback ports instead"
                );
                Hosts {
                    hosts: (0..n)
                        .map(|_| Host {
                            addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
                            netns: None,
                            root_link: None,
                        })
                        .collect(),
                    namespaces: false,
                }
            }
        }
    }

    fn in_namespaces(n: usize, pid: u32, serial: usize) -> Result<Hosts, String> {
        // Dropped on an early return: what was made so far is removed.
        let mut hosts = Hosts {
            hosts: Vec::new(),
            namespaces: true,
        };
        let _lock = MachineLock::take()?;
        reap_leftovers();
        let (a, b) = pick_subnet(pid, serial)?;
        for i in 0..n {
            let netns = format!("rb{pid}-{serial}-h{i}");
            let link = format!("rb{pid:x}-{serial:x}-{i}");
            if link.len() > 15 {
                return Err(format!("interface name {link} is longer than 15 bytes"));
            }
            let addr = Ipv4Addr::new(10, a, b, (4 * i + 2) as u8);
            ip(&["netns", "add", &netns])?;
            hosts.hosts.push(Host {
                addr: IpAddr::V4(addr),
                netns: Some(netns.clone()),
                root_link: None,
            });
            // The peer is made in the namespace directly, so its name is private to it.
            ip(&[
                "link", "add", &link, "type", "veth", "peer", "name", "eth0", "netns", &netns,
            ])?;
            hosts.hosts[i].root_link = Some(link.clone());
            let here = format!("10.{a}.{b}.{}/30", 4 * i + 1);
            ip(&["addr", "add", &here, "dev", &link])?;
            ip(&[
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{addr}/30"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &netns, "link", "set", "lo", "up"])?;
            ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
            ip(&["link", "set", &link, "up"])?;
        }
        // Carrier comes once both ends are up: wait for it rather than hope.
        for host in &hosts.hosts {
            let link = host.root_link.as_deref().unwrap_or_default();
            let state = Path::new("/sys/class/net").join(link).join("operstate");
            poll_until(PATIENCE, || {
                let s = std::fs::read_to_string(&state).ok()?;
                (s.trim() == "up").then_some(())
            })
            .ok_or_else(|| format!("{link} never came up"))?;
        }
        Ok(hosts)
    }

    /// Whether the hosts are network namespaces (`false`: the loopback fallback).
    pub fn namespaces(&self) -> bool {
        self.namespaces
    }

    /// How many hosts there are.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    /// Whether there are none (never: [`Hosts::new`] makes at least one).
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// The hosts, in order.
    pub fn iter(&self) -> std::slice::Iter<'_, Host> {
        self.hosts.iter()
    }
}

impl std::ops::Index<usize> for Hosts {
    type Output = Host;

    fn index(&self, i: usize) -> &Host {
        &self.hosts[i]
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for host in &self.hosts {
            // Deleting the namespace deletes its end of the pair, and with it this end,
            // once no process is left in it; delete this end too, so that the address
            // goes now even if one is.
            if let Some(link) = &host.root_link
                && Path::new("/sys/class/net").join(link).exists()
                && let Err(e) = ip(&["link", "del", link])
            {
                eprintln!("fleet: {e}");
            }
            if let Some(ns) = &host.netns
                && let Err(e) = ip(&["netns", "del", ns])
            {
                eprintln!("fleet: {e}");
            }
        }
    }
}

/// Where `haproxy` is: on `PATH`, or in the `sbin` directories (which a user's `PATH`
/// may lack).
pub fn haproxy_path() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join("haproxy"))
        .find(|p| p.is_file())
}

/// The start of the name of a [`Haproxy`]'s directory, which the PID of the test process
/// follows.
const HAPROXY_DIR: &str = "reborn-haproxy-";

/// Kills the HAProxy processes that test processes now gone left behind (killed before
/// their drop ran), and removes their directories.
fn reap_haproxy_leftovers() {
    for dir in orphans(&std::env::temp_dir(), HAPROXY_DIR) {
        let pid = std::fs::read_to_string(dir.join("haproxy.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok());
        if let Some(pid) = pid {
            // Only if it still is that HAProxy (a PID can be reused).
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let config = dir.join("haproxy.cfg");
            if String::from_utf8_lossy(&cmdline).contains(&*config.to_string_lossy()) {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// How [`Haproxy`] checks its servers.
#[derive(Debug, Clone)]
pub struct HaproxyOptions {
    /// The path of the health check, `GET` (`option httpchk GET <path>`): `/readyz`.
    pub check_path: String,
    /// The interval between checks (`inter`): 100 ms.
    pub inter: Duration,
    /// Consecutive failed checks that take a server down (`fall`): 2.
    pub fall: u32,
    /// Consecutive passed checks that bring it up (`rise`): 2.
    pub rise: u32,
    /// How long a check waits for the answer (`timeout check`): 2 s, so that a loaded
    /// machine does not fail checks (connecting still has `min(inter, timeout connect)`).
    pub check_timeout: Duration,
}

impl Default for HaproxyOptions {
    fn default() -> HaproxyOptions {
        HaproxyOptions {
            check_path: "/readyz".to_owned(),
            inter: Duration::from_millis(100),
            fall: 2,
            rise: 2,
            check_timeout: Duration::from_secs(2),
        }
    }
}

/// Debian's `haproxy`, in the foreground (`-db`: the process started is the one that
/// serves, and it logs to its stderr), with a generated configuration: a frontend on
/// 127.0.0.1 (a free port), one backend (`be`) with a server `srv<i>` per address
/// given, health-checked; `mode http`, `balance roundrobin`, `http-reuse safe`,
/// `retries 0` and no `option redispatch` (a request that fails is the client's), and an
/// admin socket. Its output (state changes, abnormal requests) goes to a file, which
/// [`Haproxy::log`] reads. Killed on drop.
pub struct Haproxy {
    child: Child,
    dir: PathBuf,
    addr: SocketAddr,
}

impl Haproxy {
    /// The name of the server for the `i`th address (from 0) given to [`Haproxy::start`].
    pub fn server(i: usize) -> String {
        format!("srv{i}")
    }

    /// Starts HAProxy in front of `servers`, and waits until its admin socket answers.
    /// Panics if `haproxy` is not installed, naming the package.
    pub fn start(servers: &[SocketAddr], options: &HaproxyOptions) -> Haproxy {
        let program = haproxy_path().unwrap_or_else(|| {
            panic!(
                "haproxy is not installed: these tests run HAProxy in front of the servers \
                 (Debian/Ubuntu: apt-get install haproxy)"
            )
        });
        reap_haproxy_leftovers();
        let serial = SERIAL.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("{HAPROXY_DIR}{}-{serial}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot make {}: {e}", dir.display()));
        let log = dir.join("haproxy.log");
        let mut failures = String::new();
        // The port was free a moment ago; another process may take it before HAProxy
        // binds it: then try another.
        for _ in 0..5 {
            let addr = SocketAddr::from(([127, 0, 0, 1], crate::free_port()));
            let config = dir.join("haproxy.cfg");
            std::fs::write(&config, Haproxy::config(&dir, addr, servers, options))
                .expect("write haproxy.cfg");
            let out = File::create(&log).expect("create haproxy.log");
            let child = Command::new(&program)
                .arg("-db")
                .arg("-f")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(out.try_clone().expect("dup haproxy.log"))
                .stderr(out)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
            let mut haproxy = Haproxy {
                child,
                dir: dir.clone(),
                addr,
            };
            let _ = std::fs::write(dir.join("haproxy.pid"), haproxy.pid().to_string());
            let started = poll_until(PATIENCE, || {
                if let Ok(Some(status)) = haproxy.child.try_wait() {
                    return Some(Err(status));
                }
                haproxy.admin("show info").ok().map(|_| Ok(()))
            });
            match started {
                Some(Ok(())) => return haproxy,
                Some(Err(status)) => {
                    let said = haproxy.log();
                    let _ = writeln!(failures, "on {addr}: {status}:\n{said}");
                    if !said.contains("cannot bind") {
                        break;
                    }
                    // Keep the directory for the next attempt.
                    haproxy.dir = PathBuf::new();
                }
                None => panic!(
                    "haproxy did not answer on its admin socket within {PATIENCE:?}:\n{}",
                    haproxy.log()
                ),
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        panic!("haproxy did not start:\n{failures}");
    }

    fn config(dir: &Path, addr: SocketAddr, servers: &[SocketAddr], o: &HaproxyOptions) -> String {
        let ms = |d: Duration| format!("{}ms", d.as_millis().max(1));
        let mut c = String::new();
        let _ = writeln!(
            c,
            "global\n\
             \x20   log stderr format raw local0 info\n\
             \x20   stats socket {}/admin.sock mode 600 level admin\n\
             \n\
             defaults\n\
             \x20   mode http\n\
             \x20   log global\n\
             \x20   option httplog\n\
             \x20   option dontlognull\n\
             \x20   option dontlog-normal\n\
             \x20   retries 0\n\
             \x20   timeout connect 2s\n\
             \x20   timeout client 30s\n\
             \x20   timeout server 30s\n\
             \x20   timeout check {}\n\
             \n\
             frontend fe\n\
             \x20   bind {addr}\n\
             \x20   default_backend be\n\
             \n\
             backend be\n\
             \x20   balance roundrobin\n\
             \x20   http-reuse safe\n\
             \x20   option httpchk GET {}\n\
             \x20   default-server inter {} fall {} rise {}",
            dir.display(),
            ms(o.check_timeout),
            o.check_path,
            ms(o.inter),
            o.fall,
            o.rise,
        );
        for (i, server) in servers.iter().enumerate() {
            let _ = writeln!(c, "    server {} {server} check", Haproxy::server(i));
        }
        c
    }

    /// The frontend's address (on 127.0.0.1).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// HAProxy's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything HAProxy has written (its warnings, its servers' state changes, the
    /// requests that did not end normally).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("haproxy.log")).unwrap_or_default()
    }

    /// Sends one command to the admin socket and returns the answer.
    pub fn admin(&self, command: &str) -> std::io::Result<String> {
        let mut s = UnixStream::connect(self.dir.join("admin.sock"))?;
        s.set_read_timeout(Some(PATIENCE))?;
        s.set_write_timeout(Some(PATIENCE))?;
        s.write_all(format!("{command}\n").as_bytes())?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        Ok(answer)
    }

    /// The backend server's row of `show stat`, by column name (`status`, `chkdown`,
    /// `stot`, …), if the admin socket answers and the server exists.
    pub fn server_stats(&self, name: &str) -> Option<Vec<(String, String)>> {
        let stat = self.admin("show stat").ok()?;
        let mut lines = stat.lines();
        let header: Vec<&str> = lines.next()?.strip_prefix("# ")?.split(',').collect();
        lines.find_map(|line| {
            let row: Vec<&str> = line.split(',').collect();
            (row.first() == Some(&"be") && row.get(1) == Some(&name)).then(|| {
                header
                    .iter()
                    .zip(row)
                    .map(|(h, v)| (h.to_string(), v.to_owned()))
                    .collect()
            })
        })
    }

    /// One column of the server's `show stat` row.
    pub fn server_stat(&self, name: &str, column: &str) -> Option<String> {
        self.server_stats(name)?
            .into_iter()
            .find(|(h, _)| h == column)
            .map(|(_, v)| v)
    }

    /// The server's state as HAProxy reports it: `UP`, `DOWN`, `MAINT`, `UP 1/2` (up,
    /// one check failed), `DOWN 1/2` (down, one check passed), `no check`, …
    pub fn server_state(&self, name: &str) -> Option<String> {
        self.server_stat(name, "status")
    }

    /// Polls the server's state until `pred` holds, and returns it; panics after
    /// `timeout` with the last state and HAProxy's log.
    pub fn wait_state(&self, name: &str, pred: impl Fn(&str) -> bool, timeout: Duration) -> String {
        let mut last = None;
        poll_until(timeout, || {
            let state = self.server_state(name);
            last.clone_from(&state);
            state.filter(|s| pred(s))
        })
        .unwrap_or_else(|| {
            panic!(
                "timed out after {timeout:?} waiting for haproxy's {name}; its state: {last:?}; \
                 haproxy said:\n{}",
                self.log()
            )
        })
    }

    /// Waits (up to [`PATIENCE`]) until the server is `UP`.
    pub fn wait_up(&self, name: &str) {
        self.wait_state(name, |s| s == "UP", PATIENCE);
    }

    /// Waits (up to [`PATIENCE`]) until the server is `DOWN`.
    pub fn wait_down(&self, name: &str) {
        self.wait_state(name, |s| s == "DOWN", PATIENCE);
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !self.dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl std::fmt::Debug for Haproxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Haproxy")
            .field("pid", &self.child.id())
            .field("addr", &self.addr)
            .field("dir", &self.dir)
            .finish()
    }
}

/// Waits (up to [`PATIENCE`]) until `pid` has exited (or is a zombie).
pub fn wait_gone(pid: u32) {
    wait_for(&format!("pid {pid} to exit"), PATIENCE, || {
        (!crate::alive(pid)).then_some(())
    });
}
