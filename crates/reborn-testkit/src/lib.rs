//! Helpers shared by reborn's integration tests: find the workspace's binaries, start
//! servers and read their output, poll with deadlines (never sleep-and-hope), talk
//! HTTP/1.1 over plain sockets with no retries, and look at processes.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub mod fleet;

/// How long tests wait for things that should happen quickly, on a loaded 2-core machine.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// `target/<profile>`: the directory of the running test binary's parent.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary has a path");
    let deps = exe.parent().expect("tests live in target/<profile>/deps");
    deps.parent().expect("target/<profile>").to_path_buf()
}

static BUILT: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// The features the binaries are built with, as `cargo --features` takes them, when the
/// tests themselves were (`scripts/test-portable` sets it to `reborn/portable`): a
/// binary built without them would take another path than the tests think they test.
pub const FEATURES_VAR: &str = "REBORN_TEST_FEATURES";

/// Builds a target once per test process (cargo makes it a no-op when it is up to date),
/// so that a filtered `cargo test --test x` never runs a stale binary.
fn ensure_built(path: PathBuf, package: &str, kind: &str, name: &str) -> PathBuf {
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !built.contains(&path) {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", package, kind, name]);
        // What cargo set for this test process describes the test's own package. A build
        // script that watches one of them (ring's watches CARGO_MANIFEST_DIR and OUT_DIR)
        // would rerun, and the next `cargo test` would rebuild it all again the other way.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if is_set_by_cargo_for_the_test(&key) {
                cmd.env_remove(&*key);
            }
        }
        if let Some(features) = std::env::var_os(FEATURES_VAR).filter(|f| !f.is_empty()) {
            cmd.arg("--features").arg(features);
        }
        if target_dir().file_name() == Some("release".as_ref()) {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("cargo runs");
        assert!(
            status.success(),
            "cargo build -p {package} {kind} {name} failed"
        );
        built.push(path.clone());
    }
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// Whether `key` is one of the variables cargo sets for the crate it runs (`OUT_DIR` when
/// the package has a build script), not one of the user's settings such as `CARGO_HOME`
/// or `CARGO_TARGET_DIR`.
fn is_set_by_cargo_for_the_test(key: &str) -> bool {
    matches!(
        key,
        "CARGO_MANIFEST_DIR"
            | "CARGO_MANIFEST_PATH"
            | "CARGO_CRATE_NAME"
            | "CARGO_PRIMARY_PACKAGE"
            | "CARGO_TARGET_TMPDIR"
            | "CARGO_RUSTC_CURRENT_DIR"
            | "OUT_DIR"
    ) || key.starts_with("CARGO_PKG_")
        || key.starts_with("CARGO_BIN_EXE_")
}

/// The path of a binary target of a workspace package, built if missing.
pub fn bin(package: &str, name: &str) -> PathBuf {
    ensure_built(target_dir().join(name), package, "--bin", name)
}

/// The path of an example of a workspace package, built if missing.
pub fn example(package: &str, name: &str) -> PathBuf {
    ensure_built(
        target_dir().join("examples").join(name),
        package,
        "--example",
        name,
    )
}

/// Polls `check` until it returns `Some`, or panics after `timeout` naming `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, check: impl FnMut() -> Option<T>) -> T {
    poll_until(timeout, check)
        .unwrap_or_else(|| panic!("timed out after {timeout:?} waiting for {what}"))
}

/// Polls `check` until it returns `Some`, or returns `None` after `timeout` (for a caller
/// that says more when it times out, such as a process's output).
pub fn poll_until<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(2);
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// A port that was free a moment ago, for tools that insist on binding an address
/// themselves (`systemd-socket-activate`, a worker probed on its own port): bound on
/// 127.0.0.1 with port 0, read, released.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("an ephemeral port on 127.0.0.1")
}

/// A process's state letter from `/proc/<pid>/stat` (`R`, `S`, `T`, `Z`, …), if it exists.
pub fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The state follows the command name in parentheses.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

/// Whether a process exists and is not a zombie (a process that is not our child stays a
/// zombie until its own parent reaps it; for us it is gone).
pub fn alive(pid: u32) -> bool {
    !matches!(process_state(pid), Some('Z') | Some('X') | None)
}

/// Sends `signal` to `pid`.
pub fn signal(pid: u32, signal: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid as libc::pid_t, signal) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {signal}): {}",
        io::Error::last_os_error()
    );
}

/// The number of open file descriptors of a process.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The PIDs of the direct children of `pid`.
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            let file = task.path().join("children");
            if let Ok(text) = std::fs::read_to_string(file) {
                out.extend(
                    text.split_whitespace()
                        .filter_map(|p| p.parse::<u32>().ok()),
                );
            }
        }
    }
    out.retain(|p| alive(*p));
    out
}

/// A child process whose stdout and stderr lines are collected as they come.
pub struct Proc {
    /// The process.
    pub child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    /// How many of stdout and stderr have not reached their end yet.
    open_streams: Arc<std::sync::atomic::AtomicUsize>,
}

impl Proc {
    /// Starts `cmd` with piped stdout and stderr.
    pub fn start(mut cmd: Command) -> Proc {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // A binary just copied can be briefly "busy": another test thread's fork may
        // still hold the copy's write descriptor until that child execs.
        let mut attempts = 0;
        let mut child = loop {
            match cmd.spawn() {
                Ok(child) => break child,
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && attempts < 50 => {
                    attempts += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("cannot start {cmd:?}: {e}"),
            }
        };
        let lines = Arc::new(Mutex::new(Vec::new()));
        let open_streams = Arc::new(std::sync::atomic::AtomicUsize::new(2));
        let out = child.stdout.take().expect("piped");
        let err = child.stderr.take().expect("piped");
        for stream in [Box::new(out) as Box<dyn Read + Send>, Box::new(err)] {
            let (lines, open_streams) = (lines.clone(), open_streams.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    if std::env::var_os("REBORN_TEST_ECHO").is_some() {
                        eprintln!("| {line}");
                    }
                    lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                }
                open_streams.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
        Proc {
            child,
            lines,
            open_streams,
        }
    }

    /// Waits, up to `timeout`, until everything the process (and whatever inherited its
    /// stdout and stderr) printed has been read: both streams have reached their end.
    /// Returns whether they have. A process that has exited may still have lines in its
    /// pipes that [`output`](Self::output) does not hold yet.
    pub fn wait_output_end(&self, timeout: Duration) -> bool {
        poll_until(timeout, || {
            (self.open_streams.load(std::sync::atomic::Ordering::SeqCst) == 0).then_some(())
        })
        .is_some()
    }

    /// The PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything printed so far.
    pub fn output(&self) -> String {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .join("\n")
    }

    /// Waits for a printed line for which `find` returns `Some`.
    pub fn wait_line<T>(&self, what: &str, mut find: impl FnMut(&str) -> Option<T>) -> T {
        let deadline = Instant::now() + PATIENCE;
        loop {
            {
                let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(v) = lines.iter().find_map(|l| find(l)) {
                    return v;
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}; output so far:\n{}",
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the process to exit and returns its exit code (`None` if killed by a
    /// signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let child = &mut self.child;
        let status = wait_for("the process to exit", timeout, || {
            child.try_wait().ok().flatten()
        });
        status.code()
    }

    /// Waits (up to [`PATIENCE`]) for the process to exit, and asserts that it exited
    /// with `code`, showing everything it printed otherwise.
    pub fn assert_exits_with(&mut self, code: i32) {
        let exit = self.wait_exit(PATIENCE);
        assert_eq!(exit, Some(code), "{}", self.output());
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A parsed HTTP/1.1 response.
#[derive(Debug, Clone)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// Header lines, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: String,
}

impl Response {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// An HTTP/1.1 client on one connection, for tests: no pooling, no retries.
pub struct Http1 {
    stream: BufReader<TcpStream>,
}

impl Http1 {
    /// Connects.
    pub fn connect(addr: SocketAddr) -> io::Result<Http1> {
        let stream = TcpStream::connect_timeout(&addr, PATIENCE)?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        stream.set_nodelay(true)?;
        Ok(Http1 {
            stream: BufReader::new(stream),
        })
    }

    /// Sends `GET path` and reads the response (`Content-Length` bodies only).
    pub fn get(&mut self, path: &str) -> io::Result<Response> {
        let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n");
        self.stream.get_mut().write_all(req.as_bytes())?;
        read_response(&mut self.stream)
    }
}

/// One request on a fresh connection.
pub fn get(addr: SocketAddr, path: &str) -> io::Result<Response> {
    Http1::connect(addr)?.get(path)
}

fn read_response(r: &mut impl BufRead) -> io::Result<Response> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed before a response",
        ));
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad status line {line:?}"),
            )
        })?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((n, v)) = l.split_once(':') {
            headers.push((n.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    let len: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    r.read_exact(&mut body)?;
    Ok(Response {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// Copies a file to `dir/name`, keeping its permissions, and returns the new path.
pub fn copy_to(src: &Path, dir: &Path, name: &str) -> PathBuf {
    let dst = dir.join(name);
    std::fs::copy(src, &dst)
        .unwrap_or_else(|e| panic!("copy {} to {}: {e}", src.display(), dst.display()));
    dst
}

/// Replaces `path` with a copy of `src` plus `extra` bytes at the end (a different binary
/// with a different digest), the way a deploy does: write a new file, rename over.
pub fn replace_with_variant(path: &Path, src: &Path, extra: &[u8]) {
    let tmp = path.with_extension("new");
    std::fs::copy(src, &tmp).expect("copy the binary");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&tmp)
        .expect("open copy");
    f.write_all(extra).expect("append");
    drop(f);
    std::fs::rename(&tmp, path).expect("rename over the old binary");
}

/// Writes a shell script (mode 0755) at `path`, by rename (replacing what was there).
pub fn replace_with_script(path: &Path, script: &str) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, script).expect("write script");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::rename(&tmp, path).expect("rename over the old binary");
}

/// What a [`Load`] counted.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    /// Requests answered with 200.
    pub ok: u64,
    /// Requests that failed, any way.
    pub failed: u64,
    /// Of those, connections refused (nothing listening, or a full queue).
    pub refused: u64,
    /// The first few failures, described.
    pub errors: Vec<String>,
    /// Distinct response bodies seen, in order of first appearance.
    pub bodies: Vec<String>,
    /// Connections a keep-alive client opened after its first one (it reconnects only
    /// after a `Connection: close` response or a failure).
    pub reconnects: u64,
}

/// Continuous HTTP/1.1 load from client threads that never retry: some keep their
/// connection alive (reconnecting only after a `Connection: close` response), some open
/// a new connection per request. Every request is counted. Bounded: the clients stop
/// when the load is finished or dropped, and by themselves after [`Load::LIMIT`].
pub struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    report: Arc<Mutex<LoadReport>>,
}

impl Load {
    /// The longest a load runs.
    pub const LIMIT: Duration = Duration::from_secs(300);

    /// Starts `keep_alive` + `new_conn` clients against `addr`, requesting `path`.
    pub fn start(addr: SocketAddr, path: &str, keep_alive: usize, new_conn: usize) -> Load {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let report = Arc::new(Mutex::new(LoadReport::default()));
        let mut threads = Vec::new();
        for i in 0..keep_alive + new_conn {
            let (stop, report, path) = (stop.clone(), report.clone(), path.to_owned());
            let reuse = i < keep_alive;
            threads.push(std::thread::spawn(move || {
                let mut conn: Option<Http1> = None;
                let mut connected_before = false;
                let deadline = Instant::now() + Load::LIMIT;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline
                {
                    let reconnect = reuse && conn.is_none() && connected_before;
                    connected_before = true;
                    let result = match conn.take() {
                        Some(mut c) => c.get(&path).map(|r| (r, Some(c))),
                        None => Http1::connect(addr)
                            .and_then(|mut c| c.get(&path).map(|r| (r, Some(c)))),
                    };
                    let mut rep = report.lock().unwrap_or_else(|e| e.into_inner());
                    if reconnect {
                        rep.reconnects += 1;
                    }
                    match result {
                        Ok((resp, c)) if resp.status == 200 => {
                            rep.ok += 1;
                            if !rep.bodies.contains(&resp.body) {
                                rep.bodies.push(resp.body.clone());
                            }
                            let closing = resp
                                .header("connection")
                                .is_some_and(|v| v.eq_ignore_ascii_case("close"));
                            if reuse && !closing {
                                conn = c;
                            }
                        }
                        Ok((resp, _)) => {
                            rep.failed += 1;
                            if rep.errors.len() < 20 {
                                rep.errors
                                    .push(format!("status {}: {}", resp.status, resp.body));
                            }
                        }
                        Err(e) => {
                            rep.failed += 1;
                            if e.kind() == io::ErrorKind::ConnectionRefused {
                                rep.refused += 1;
                            }
                            if rep.errors.len() < 20 {
                                rep.errors.push(format!(
                                    "{} connection: {e}",
                                    if reuse { "keep-alive" } else { "new" }
                                ));
                            }
                        }
                    }
                }
            }));
        }
        Load {
            stop,
            threads,
            report,
        }
    }

    /// What was counted so far.
    pub fn snapshot(&self) -> LoadReport {
        self.report
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until `n` more requests have been answered.
    pub fn wait_progress(&self, n: u64) {
        let start = self.snapshot().ok;
        wait_for("the load to make progress", PATIENCE, || {
            (self.snapshot().ok >= start + n).then_some(())
        });
    }

    /// Stops the clients and panics, listing the first failures, if any request failed.
    pub fn finish_without_failures(self) -> LoadReport {
        let report = self.finish();
        assert!(
            report.failed == 0,
            "{} of {} requests failed: {:?}",
            report.failed,
            report.ok + report.failed,
            report.errors
        );
        report
    }

    /// Stops the clients (each finishes its current request) and returns the count.
    pub fn finish(mut self) -> LoadReport {
        self.stop_clients();
        self.snapshot()
    }

    fn stop_clients(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in std::mem::take(&mut self.threads) {
            let _ = t.join();
        }
    }
}

/// A load dropped unfinished (its test panicked) stops its clients, rather than
/// loading the machine, and the tests that run beside it, until [`Load::LIMIT`].
impl Drop for Load {
    fn drop(&mut self) {
        self.stop_clients();
    }
}
