//! Readiness over systemd's notify protocol: sending it (the worker's side) and receiving
//! it (the upgrader's side).
//!
//! A message is a single datagram of `KEY=VALUE` lines sent to the Unix datagram socket
//! named by `NOTIFY_SOCKET` (a path, or `@name` for Linux's abstract namespace).
//! reborn uses `READY=1`, `STATUS=…`, `STOPPING=1`, `RELOADING=1` and `MAINPID=…`,
//! and understands `ERRNO=…` from workers that report a failure.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

/// A parsed notify datagram. Unknown keys are ignored, as systemd does.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NotifyMessage {
    /// `READY=1`: the sender serves.
    pub ready: bool,
    /// `STOPPING=1`: the sender is shutting down.
    pub stopping: bool,
    /// `RELOADING=1`: the sender is reloading (or upgrading).
    pub reloading: bool,
    /// `STATUS=…`: free-form status text.
    pub status: Option<String>,
    /// `MAINPID=…`: the process that is now the service's main process.
    pub main_pid: Option<u32>,
    /// `ERRNO=…`: the sender failed with this errno.
    pub errno: Option<i32>,
}

impl NotifyMessage {
    /// Parses a datagram. Lines without `=`, and unknown keys, are skipped.
    pub fn parse(datagram: &[u8]) -> NotifyMessage {
        let mut msg = NotifyMessage::default();
        for line in datagram.split(|b| *b == b'\n') {
            let Some(eq) = line.iter().position(|b| *b == b'=') else {
                continue;
            };
            let (key, value) = (&line[..eq], &line[eq + 1..]);
            let text = String::from_utf8_lossy(value);
            match key {
                b"READY" => msg.ready = value == b"1",
                b"STOPPING" => msg.stopping = value == b"1",
                b"RELOADING" => msg.reloading = value == b"1",
                b"STATUS" => msg.status = Some(text.into_owned()),
                b"MAINPID" => msg.main_pid = text.trim().parse().ok(),
                b"ERRNO" => msg.errno = text.trim().parse().ok(),
                _ => {}
            }
        }
        msg
    }

    /// Encodes the message as a datagram (the fields that are set, one line each).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Some(pid) = self.main_pid {
            out.push_str(&format!("MAINPID={pid}\n"));
        }
        if self.reloading {
            out.push_str("RELOADING=1\n");
            out.push_str(&format!("MONOTONIC_USEC={}\n", monotonic_usec()));
        }
        if self.ready {
            out.push_str("READY=1\n");
        }
        if self.stopping {
            out.push_str("STOPPING=1\n");
        }
        if let Some(errno) = self.errno {
            out.push_str(&format!("ERRNO={errno}\n"));
        }
        if let Some(status) = &self.status {
            // A status is one line.
            out.push_str("STATUS=");
            out.push_str(&status.replace('\n', " "));
            out.push('\n');
        }
        out
    }
}

fn monotonic_usec() -> u128 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u128 * 1_000_000 + t.tv_nsec() as u128 / 1_000)
        .unwrap_or(0)
}

/// Sends one datagram to a notify socket address (a path, or `@name` for the abstract
/// namespace).
pub fn send(addr: &OsStr, message: &str) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    let bytes = addr.as_bytes();
    if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let sa = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)?;
        sock.send_to_addr(message.as_bytes(), &sa)?;
    } else {
        sock.send_to(message.as_bytes(), Path::new(addr))?;
    }
    Ok(())
}

/// A private notify socket on which one child process reports readiness.
///
/// It lives in a fresh directory only this user can enter (mode 0700), so only processes
/// of this user can write to it; its path is given to one child only (and to whatever
/// that child hands its environment on to, such as `systemd-notify`). The directory goes
/// away when this is dropped.
#[derive(Debug)]
pub struct NotifyReceiver {
    socket: tokio::net::UnixDatagram,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl NotifyReceiver {
    /// Creates the socket in `$XDG_RUNTIME_DIR` if set, else in the temporary directory.
    pub fn new() -> io::Result<NotifyReceiver> {
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let dir = tempfile::Builder::new()
            .prefix("reborn-")
            .tempdir_in(&base)
            .or_else(|_| tempfile::Builder::new().prefix("reborn-").tempdir())?;
        let path = dir.path().join("notify");
        let socket = tokio::net::UnixDatagram::bind(&path)?;
        Ok(NotifyReceiver {
            socket,
            path,
            _dir: dir,
        })
    }

    /// The value for the child's `NOTIFY_SOCKET`.
    pub fn address(&self) -> OsString {
        self.path.clone().into_os_string()
    }

    /// Waits for the next datagram and parses it.
    pub async fn recv(&self) -> io::Result<NotifyMessage> {
        let mut buf = vec![0u8; 4096];
        let n = self.socket.recv(&mut buf).await?;
        Ok(NotifyMessage::parse(&buf[..n]))
    }

    /// Waits until a datagram carries `READY=1`, returning the last status seen with it.
    pub async fn wait_ready(&self) -> io::Result<NotifyMessage> {
        loop {
            let msg = self.recv().await?;
            if msg.ready {
                return Ok(msg);
            }
            if let Some(status) = &msg.status {
                tracing::info!(status = %status, "the new process reports");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_encode() {
        let m = NotifyMessage::parse(b"READY=1\nSTATUS=serving on :80\nMAINPID=42\nX=y\ngarbage");
        assert!(m.ready);
        assert_eq!(m.status.as_deref(), Some("serving on :80"));
        assert_eq!(m.main_pid, Some(42));
        let again = NotifyMessage::parse(m.encode().as_bytes());
        assert_eq!(again, m);
        assert!(!NotifyMessage::parse(b"READY=0").ready);
        assert!(NotifyMessage::parse(b"STOPPING=1").stopping);
    }

    #[tokio::test]
    async fn receive_from_path_socket() {
        let rx = NotifyReceiver::new().unwrap();
        send(&rx.address(), "STATUS=starting\n").unwrap();
        send(&rx.address(), "READY=1\n").unwrap();
        let m = rx.wait_ready().await.unwrap();
        assert!(m.ready);
    }
}
