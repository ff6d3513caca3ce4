//! Telling when a new worker is ready to serve.
//!
//! The default is the worker's own word: `READY=1` on the private `NOTIFY_SOCKET` the
//! master gives each worker (one socket per worker, in a directory only this user can
//! enter: a message on it comes from that worker, or from a process it handed the
//! variable to, such as `systemd-notify`). For programs that cannot notify, three probes stand in: a
//! fixed delay, a TCP connect, or an HTTP `GET` answering 2xx. A probe must target an
//! address of the worker's own: the shared listeners are held open by the master and
//! answered by the old worker, so a probe there would prove nothing (`reborn run`
//! refuses such a probe).
//!
//! Every worker's notify messages are read all its life (`STATUS=` and `STOPPING=1` are
//! logged and `STATUS=` is shown by `reborn status`); the probe runs only until ready.

use std::sync::Arc;
use std::time::Duration;

use reborn::notify::NotifyReceiver;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::AbortHandle;

use crate::cli::{HttpTarget, ReadyMode};
use crate::supervisor::Event;

/// How often a probe is retried.
const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// How long one probe attempt may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Reads a worker's notify socket for as long as the returned task lives, sending each
/// message as [`Event::Notify`].
pub fn watch_notify(
    generation: u64,
    receiver: Arc<NotifyReceiver>,
    events: UnboundedSender<Event>,
) -> AbortHandle {
    tokio::spawn(async move {
        loop {
            match receiver.recv().await {
                Ok(message) => {
                    if events.send(Event::Notify { generation, message }).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(
                        generation,
                        socket = %std::path::Path::new(&receiver.address()).display(),
                        error = %e,
                        "cannot read the worker's notify socket"
                    );
                    return;
                }
            }
        }
    })
    .abort_handle()
}

/// Starts the probe that `mode` asks for, if it is not `notify`; sends
/// [`Event::ProbeReady`] when it succeeds.
pub fn start_probe(
    generation: u64,
    mode: &ReadyMode,
    events: UnboundedSender<Event>,
) -> Option<AbortHandle> {
    let mode = mode.clone();
    let task = match mode {
        ReadyMode::Notify => return None,
        ReadyMode::Delay(d) => tokio::spawn(async move {
            tokio::time::sleep(d).await;
            let _ = events.send(Event::ProbeReady { generation });
        }),
        ReadyMode::Tcp(addr) => tokio::spawn(async move {
            loop {
                let attempt =
                    tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(&addr))
                        .await;
                if let Ok(Ok(_)) = attempt {
                    let _ = events.send(Event::ProbeReady { generation });
                    return;
                }
                tokio::time::sleep(PROBE_INTERVAL).await;
            }
        }),
        ReadyMode::Http(target) => tokio::spawn(async move {
            loop {
                match tokio::time::timeout(PROBE_TIMEOUT, http_status(&target)).await {
                    Ok(Ok(status)) if (200..300).contains(&status) => {
                        let _ = events.send(Event::ProbeReady { generation });
                        return;
                    }
                    Ok(Ok(status)) => {
                        tracing::debug!(generation, status, "readiness probe: not 2xx yet")
                    }
                    _ => {}
                }
                tokio::time::sleep(PROBE_INTERVAL).await;
            }
        }),
    };
    Some(task.abort_handle())
}

/// Sends `GET` and returns the response's status code.
async fn http_status(target: &HttpTarget) -> std::io::Result<u16> {
    let mut stream = tokio::net::TcpStream::connect(&target.authority).await?;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: reborn-probe\r\nConnection: close\r\n\r\n",
        target.path, target.host
    );
    stream.write_all(request.as_bytes()).await?;
    let mut buf = [0u8; 64];
    let mut len = 0;
    // The status line fits in 64 bytes: "HTTP/1.1 200 OK".
    while len < 13 {
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            break;
        }
        len += n;
    }
    parse_status_line(&buf[..len])
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP response"))
}

fn parse_status_line(bytes: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut parts = text.split(' ');
    if !parts.next()?.starts_with("HTTP/") {
        return None;
    }
    parts.next()?.get(..3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(parse_status_line(b"HTTP/1.1 204 No Content\r\n"), Some(204));
        assert_eq!(parse_status_line(b"HTTP/1.0 503"), Some(503));
        assert_eq!(parse_status_line(b"SSH-2.0"), None);
    }
}
