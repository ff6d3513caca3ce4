//! Shared pieces of the master's integration tests: start a real `reborn run` on an
//! ephemeral port, ask it things through the real `reborn` client, and put real load on
//! it with clients that never retry.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use reborn_testkit::{PATIENCE, Proc, wait_for};

/// The `reborn` binary under test.
pub fn reborn() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_reborn"))
}

/// The reborn demo server (built if missing).
pub fn bench_server() -> PathBuf {
    reborn_testkit::bin("reborn-bench", "bench-server")
}

/// Fails with a clear message when a tool the test needs is not installed.
pub fn require_tool(tool: &str, install: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(tool))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| panic!("this test needs `{tool}`: install it with `{install}`"))
}

/// A private temporary directory that other users can enter (for the test that runs a
/// client as `nobody`) and whose files are ours.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("reborn-cli-test-")
        .tempdir()
        .expect("a temporary directory")
}

/// A running `reborn run`.
pub struct Master {
    /// The master process, its output collected.
    pub proc: Proc,
    /// Its control socket.
    pub control: PathBuf,
    /// The `http` listener's address.
    pub addr: SocketAddr,
}

/// A master serving a copy of bench-server at `dir/app` (which a test may replace, to
/// upgrade), once its first worker serves; the master and the copy's path.
pub fn start_app(dir: &Path, opts: &[&str]) -> (Master, PathBuf) {
    let app = reborn_testkit::copy_to(&bench_server(), dir, "app");
    let master = Master::start_bench(dir, opts, &app);
    master.wait_serving();
    (master, app)
}

impl Master {
    /// Starts `reborn run --listen http=127.0.0.1:0 --control DIR/ctl.sock OPTS -- PROGRAM`,
    /// and waits until it prints its listener's address.
    pub fn start(dir: &Path, opts: &[&str], program: &[&OsStr]) -> Master {
        Self::start_on(dir, "127.0.0.1:0", opts, program)
    }

    /// A master running `app` (bench-server, or a copy of it) on an ephemeral port.
    pub fn start_bench(dir: &Path, opts: &[&str], app: &Path) -> Master {
        Self::start(
            dir,
            opts,
            &[
                app.as_os_str(),
                OsStr::new("--addr"),
                OsStr::new("127.0.0.1:0"),
            ],
        )
    }

    /// Like [`start`](Self::start) on a given address.
    pub fn start_on(dir: &Path, listen: &str, opts: &[&str], program: &[&OsStr]) -> Master {
        let control = dir.join("ctl.sock");
        let mut cmd = Command::new(reborn());
        cmd.arg("run")
            .arg("--listen")
            .arg(format!("http={listen}"))
            .arg("--control")
            .arg(&control)
            .args(opts)
            .arg("--")
            .args(program);
        let proc = Proc::start(cmd);
        let addr = proc.wait_line("the master's listening address", |l| {
            l.split("listening on http=")
                .nth(1)
                .and_then(|a| a.trim().parse::<SocketAddr>().ok())
        });
        // The control socket is bound after the listeners are reported.
        proc.wait_line("the control socket", |l| {
            l.contains("control socket: ").then_some(())
        });
        Master {
            proc,
            control,
            addr,
        }
    }

    /// The master's PID.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Runs `reborn SUBCOMMAND --control PATH ARGS`.
    pub fn client(&self, subcommand: &str, args: &[&str]) -> Output {
        Command::new(reborn())
            .arg(subcommand)
            .arg("--control")
            .arg(&self.control)
            .args(args)
            .output()
            .expect("run the reborn client")
    }

    /// `reborn status --json`, parsed.
    pub fn status(&self) -> serde_json::Value {
        let out = self.client("status", &["--json"]);
        assert!(
            out.status.success(),
            "reborn status failed: {}\nmaster output:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.proc.output()
        );
        serde_json::from_slice(&out.stdout).expect("status is JSON")
    }

    /// The PID of the serving worker, once one serves.
    pub fn serving_pid(&self) -> Option<u32> {
        let s = self.status();
        s["workers"]
            .as_array()?
            .iter()
            .find(|w| w["role"] == "serving")
            .and_then(|w| w["pid"].as_u64())
            .map(|p| p as u32)
    }

    /// Waits until a worker serves and returns its PID.
    pub fn wait_serving(&self) -> u32 {
        wait_for("a serving worker", PATIENCE, || self.serving_pid())
    }

    /// `reborn upgrade`: (success, stdout + stderr).
    pub fn upgrade(&self) -> (bool, String) {
        let out = self.client("upgrade", &[]);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }
}

/// The `pong <build-id> pid=<pid>` answer of the demo server, split.
pub fn ping(addr: SocketAddr) -> (String, u32) {
    let r = reborn_testkit::get(addr, "/ping").expect("GET /ping");
    assert_eq!(r.status, 200, "{r:?}");
    parse_pong(&r.body)
}

/// Splits `pong <build-id> pid=<pid>`.
pub fn parse_pong(body: &str) -> (String, u32) {
    let mut parts = body.split_whitespace();
    assert_eq!(parts.next(), Some("pong"), "{body}");
    let id = parts.next().expect("a build id").to_owned();
    let pid = parts
        .next()
        .and_then(|p| p.strip_prefix("pid="))
        .and_then(|p| p.parse().ok())
        .expect("pid=");
    (id, pid)
}

/// Whether a TCP connect to `addr` is refused (nobody holds the port).
pub fn refused(addr: SocketAddr) -> bool {
    matches!(
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

/// `python3 -m http.server --bind 127.0.0.1 --directory DIR PORT`: a worker that knows
/// nothing of reborn (it binds its own port, never notifies).
pub fn python_http_server(dir: &Path, port: u16) -> Vec<std::ffi::OsString> {
    let python = require_tool("python3", "apt-get install -y python3");
    let mut cmd: Vec<std::ffi::OsString> = vec![python.into()];
    for arg in ["-m", "http.server", "--bind", "127.0.0.1", "--directory"] {
        cmd.push(arg.into());
    }
    cmd.push(dir.into());
    cmd.push(port.to_string().into());
    cmd
}
