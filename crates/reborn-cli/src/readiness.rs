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
                    if events
                        .send(Event::Notify {
                            generation,
                            message,
                        })
                        .is_err()
                    {
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
        probe => tokio::spawn(async move {
            loop {
                match probe_once(&probe, PROBE_TIMEOUT).await {
                    Ok(()) => {
                        let _ = events.send(Event::ProbeReady { generation });
                        return;
                    }
                    Err(e) => tracing::debug!(generation, error = %e, "readiness probe: not yet"),
                }
                tokio::time::sleep(PROBE_INTERVAL).await;
            }
        }),
    };
    Some(task.abort_handle())
}

/// One attempt of a `tcp` or `http` probe, within `timeout`: a connect that succeeds, a
/// `GET` answered 2xx. The one implementation behind `--ready` and `--liveness`.
pub async fn probe_once(mode: &ReadyMode, timeout: Duration) -> Result<(), String> {
    let attempt = async {
        match mode {
            ReadyMode::Tcp(addr) => tokio::net::TcpStream::connect(addr)
                .await
                .map(drop)
                .map_err(|e| format!("cannot connect to {addr}: {e}")),
            ReadyMode::Http(target) => match http_status(target).await {
                Ok(status) if (200..300).contains(&status) => Ok(()),
                Ok(status) => Err(format!("answered {status}")),
                Err(e) => Err(format!("no answer: {e}")),
            },
            ReadyMode::Notify | ReadyMode::Delay(_) => Ok(()),
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "no answer within {}",
            crate::supervisor::human(timeout)
        )),
    }
}

/// A liveness probe of a serving worker: how, how often, and how many failures in a row
/// make it dead.
#[derive(Debug, Clone)]
pub struct Liveness {
    /// The probe (`tcp` or `http`).
    pub probe: ReadyMode,
    /// The wait between two probes.
    pub interval: Duration,
    /// How long one probe may take.
    pub timeout: Duration,
    /// Failures in a row that make the worker dead.
    pub failures: u32,
}

impl Liveness {
    /// The probe, for people: `http://127.0.0.1:8080/health`, `tcp:127.0.0.1:9000`.
    pub fn describe(&self) -> String {
        match &self.probe {
            ReadyMode::Http(t) => format!("http://{}{}", t.host, t.path),
            ReadyMode::Tcp(a) => format!("tcp:{a}"),
            other => format!("{other:?}"),
        }
    }
}

/// Probes the worker of `generation` for as long as the returned task lives; after
/// `failures` failures in a row sends [`Event::LivenessFailed`] and ends.
pub fn start_liveness(
    generation: u64,
    liveness: &Liveness,
    events: UnboundedSender<Event>,
) -> AbortHandle {
    let liveness = liveness.clone();
    tokio::spawn(async move {
        let mut failed = 0;
        loop {
            tokio::time::sleep(liveness.interval).await;
            match probe_once(&liveness.probe, liveness.timeout).await {
                Ok(()) => failed = 0,
                Err(e) => {
                    failed += 1;
                    tracing::warn!(
                        generation,
                        probe = %liveness.describe(),
                        failed,
                        of = liveness.failures,
                        "liveness probe failed: {e}"
                    );
                    if failed >= liveness.failures {
                        let reason = format!(
                            "{failed} liveness probes in a row failed ({}), the last: {e}",
                            liveness.describe()
                        );
                        let _ = events.send(Event::LivenessFailed { generation, reason });
                        return;
                    }
                }
            }
        }
    })
    .abort_handle()
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
