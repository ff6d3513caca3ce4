//! The master's health listener (`--health ADDR`): `GET /readyz` and `GET /livez` for a
//! load balancer or an orchestrator, answered by the master itself.
//!
//! Why the master answers and not the worker: a server not built on reborn (gunicorn,
//! Node, anything) knows nothing of the master's shutdown delay, of a worker restarting
//! after a crash, or of the master stopping; the master knows all three. `/readyz` is
//! `200 ready` while a worker is ready and serving and the master is not shutting down,
//! `503` with the reason otherwise; `/livez` is `200` while the master runs (liveness is
//! a separate question: a master in its shutdown delay is alive and must not be
//! restarted for it). Anything else is `404`. One request per connection, each answer
//! closes it: a balancer's checks are small and rare, so a hand-written responder of
//! a few lines does, where a full HTTP server would be more to keep safe.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What `/readyz` says: `Ok(())` ready, `Err(why)` not.
pub type Readiness = Result<(), &'static str>;

/// How long a client may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest request head read.
const HEAD_MAX: usize = 8 * 1024;

/// Answers health checks on `listener` until the runtime ends.
pub fn serve(listener: TcpListener, state: watch::Receiver<Readiness>) {
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, most likely: try again shortly, without spinning.
                    tracing::debug!("health listener: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let state = state.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(HEAD_TIMEOUT, answer(stream, state)).await;
            });
        }
    });
}

/// Reads one request head and answers it.
async fn answer(mut stream: TcpStream, state: watch::Receiver<Readiness>) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > HEAD_MAX {
            break;
        }
    }
    let (status, body) = respond(&head, *state.borrow());
    let head_only = head.starts_with(b"HEAD ");
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n{}",
        body.len(),
        if head_only { "" } else { body.as_str() }
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// The status line's code and reason, and the body, for a request head.
fn respond(head: &[u8], readiness: Readiness) -> (&'static str, String) {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" && method != "HEAD" {
        return ("405 Method Not Allowed", "GET or HEAD\n".into());
    }
    let path = target.split('?').next().unwrap_or("");
    match path {
        "/readyz" | "/ready" => match readiness {
            Ok(()) => ("200 OK", "ready\n".into()),
            Err(why) => ("503 Service Unavailable", format!("not ready: {why}\n")),
        },
        "/livez" | "/healthz" => ("200 OK", "alive\n".into()),
        _ => ("404 Not Found", "GET /readyz or /livez\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_states() {
        let get = |p: &str| format!("GET {p} HTTP/1.0\r\n\r\n").into_bytes();
        assert_eq!(respond(&get("/readyz"), Ok(())).0, "200 OK");
        let (status, body) = respond(&get("/readyz"), Err("in the shutdown delay"));
        assert_eq!(status, "503 Service Unavailable");
        assert_eq!(body, "not ready: in the shutdown delay\n");
        assert_eq!(respond(&get("/livez"), Err("stopping")).0, "200 OK");
        assert_eq!(respond(&get("/readyz?x=1"), Ok(())).0, "200 OK");
        assert_eq!(respond(&get("/"), Ok(())).0, "404 Not Found");
        assert_eq!(
            respond(b"POST /readyz HTTP/1.1\r\n\r\n", Ok(())).0,
            "405 Method Not Allowed"
        );
    }
}
