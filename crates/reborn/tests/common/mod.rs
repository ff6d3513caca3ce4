//! A test server run from a temporary directory, as a deploy would run it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use reborn_testkit::{PATIENCE, Proc, alive, wait_for};

pub struct Server {
    pub dir: tempfile::TempDir,
    pub bin: PathBuf,
    pub proc: Proc,
    pub addr: SocketAddr,
}

pub fn testserver() -> PathBuf {
    reborn_testkit::example("reborn", "testserver")
}

impl Server {
    /// Copies the test server into a fresh directory and starts it there.
    pub fn start(extra: &[&str]) -> Server {
        Server::start_with(None, &[], extra)
    }

    /// Likewise, with the open-files limit (soft and hard) set to `open_files` first.
    pub fn start_limited(open_files: Option<u32>, extra: &[&str]) -> Server {
        Server::start_with(open_files, &[], extra)
    }

    /// Likewise, with these environment variables.
    pub fn start_env(env: &[(&str, &str)], extra: &[&str]) -> Server {
        Server::start_with(None, env, extra)
    }

    fn start_with(open_files: Option<u32>, env: &[(&str, &str)], extra: &[&str]) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = reborn_testkit::copy_to(&testserver(), dir.path(), "server");
        let mut cmd = match open_files {
            None => Command::new(&bin),
            Some(n) => {
                let mut sh = Command::new("sh");
                sh.args(["-c", "ulimit -n \"$0\" && exec \"$@\"", &n.to_string()])
                    .arg(&bin);
                sh
            }
        };
        cmd.envs(env.iter().copied());
        cmd.args(["--addr", "127.0.0.1:0", "--pid-file"])
            .arg(dir.path().join("pid"))
            .args(extra)
            .current_dir(dir.path());
        let proc = Proc::start(cmd);
        let addr = proc.wait_line("the listening address", |l| {
            l.strip_prefix("listening on ")?.parse().ok()
        });
        // Printed just before, on the same stream: the server must take the system path
        // these tests were built for (see reborn_testkit::FEATURES_VAR).
        let path = if cfg!(reborn_linux) {
            "linux"
        } else {
            "portable"
        };
        assert!(
            proc.output().contains(&format!("system path: {path}")),
            "the test server was built for another system path than these tests ({path}); \
             set {}:\n{}",
            reborn_testkit::FEATURES_VAR,
            proc.output()
        );
        let server = Server {
            dir,
            bin,
            proc,
            addr,
        };
        server.wait_serving_pid(server.proc.pid());
        server
    }

    pub fn pid_file(&self) -> PathBuf {
        self.dir.path().join("pid")
    }

    /// The PID in the PID file.
    pub fn serving_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.pid_file())
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Waits until the PID file names `pid`.
    pub fn wait_serving_pid(&self, pid: u32) {
        wait_for(&format!("pid {pid} in the PID file"), PATIENCE, || {
            (self.serving_pid() == Some(pid)).then_some(())
        });
    }

    /// Waits until the PID file names a process other than `old`, and until that process
    /// answers, and returns it.
    pub fn wait_new_pid(&self, old: u32) -> u32 {
        let new = self.wait_pid_file_moves_from(old);
        self.wait_answered_by(new);
        new
    }

    /// Waits until the PID file names a process other than `old` (without asking it for
    /// an answer: it may not give one), and returns it.
    pub fn wait_pid_file_moves_from(&self, old: u32) -> u32 {
        reborn_testkit::poll_until(PATIENCE, || self.serving_pid().filter(|p| *p != old))
            .unwrap_or_else(|| {
                panic!(
                    "timed out after {PATIENCE:?} waiting for a new PID in the PID file; \
                 the server said:\n{}",
                    self.proc.output()
                )
            })
    }

    /// Waits until a new connection is answered by `pid` (the previous generation may
    /// still answer the connections it accepted just before it stopped accepting).
    pub fn wait_answered_by(&self, pid: u32) {
        wait_for(&format!("an answer from pid {pid}"), PATIENCE, || {
            reborn_testkit::get(self.addr, "/ping")
                .ok()
                .and_then(|r| body_pid(&r.body))
                .filter(|p| *p == pid)
        });
    }

    pub fn get(&self, path: &str) -> reborn_testkit::Response {
        reborn_testkit::get(self.addr, path)
            .unwrap_or_else(|e| panic!("GET {path}: {e}; server output:\n{}", self.proc.output()))
    }

    /// Replaces the binary on disk with a variant (a different digest).
    pub fn deploy_variant(&self, tag: &str) {
        reborn_testkit::replace_with_variant(&self.bin, &testserver(), tag.as_bytes());
    }

    /// SIGTERMs whatever process serves now, and waits for it to be gone.
    pub fn stop_current(&mut self) {
        if let Some(pid) = self.serving_pid().filter(|p| alive(*p)) {
            reborn_testkit::signal(pid, libc::SIGTERM);
            wait_for("the serving process to exit", PATIENCE, || {
                (!alive(pid)).then_some(())
            });
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Later generations are not our children: stop them by PID.
        if let Some(pid) = self.serving_pid()
            && pid != self.proc.pid()
            && alive(pid)
        {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

pub fn body_pid(body: &str) -> Option<u32> {
    body.rsplit_once("pid=")?.1.trim().parse().ok()
}

pub fn body_digest(body: &str) -> Option<&str> {
    body.split_whitespace().nth(1)
}

pub fn path_exists(p: &Path) -> bool {
    p.exists()
}

/// Sends an HTTP/1.1 upgrade request for `path` with the protocol's own `headers` (each
/// ending in CRLF) and reads the head of the answer, which must be `101`: the stream is
/// then the upgraded connection, read timeout set.
#[allow(dead_code)]
pub fn upgrade(addr: SocketAddr, path: &str, headers: &str) -> std::net::TcpStream {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(PATIENCE)).expect("timeout");
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\n{headers}\r\n");
    s.write_all(request.as_bytes())
        .expect("the upgrade request");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            s.read(&mut byte).expect("the 101 head"),
            1,
            "closed before the head"
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s
}

/// Sends `GET /ping` on `stream` and reads the whole response head and body.
pub fn ping_on(stream: &mut std::net::TcpStream) -> std::io::Result<String> {
    get_on(stream, "/ping")
}

/// Sends `GET path` on `stream` and reads the response, head and body as text.
pub fn get_on(stream: &mut std::net::TcpStream, path: &str) -> std::io::Result<String> {
    use std::io::Write;
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())?;
    read_response(stream)
}

/// Reads one response (`Content-Length` body) from `stream`, head and body as text.
pub fn read_response(stream: &mut std::net::TcpStream) -> std::io::Result<String> {
    use std::io::Read;
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&got).to_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body)?;
    Ok(format!("{head}{}", String::from_utf8_lossy(&body)))
}
