//! A server with its own accept loop (a line protocol over TCP) that still gets
//! reborn's upgrades: it takes the raw socket, reports ready itself, and stops accepting
//! when the drain starts.
//!
//! Each line a client sends is answered with `<LINE> pid=<pid>`; a connection is
//! finished after its current line once the drain starts.
//!
//! ```text
//! cargo run --example raw_tcp -- 127.0.0.1:7000
//! printf 'hello\n' | nc -q1 127.0.0.1 7000
//! kill -HUP <pid>
//! ```

use reborn::listeners::ListenerSocket;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    reborn::init();
    tracing_subscriber::fmt().with_ansi(false).init();
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7000".into());
    let reborn = reborn::Reborn::builder()
        .ready_mode(reborn::ReadyMode::Manual)
        .build()?;
    let listener = reborn.listen("lines", &addr)?;
    let pid = std::process::id();
    println!("[pid] {pid}");
    println!("listening on {}", listener.local_addr());
    let ListenerSocket::Tcp(std_listener) = listener.into_socket() else {
        return Err("this example speaks TCP only".into());
    };
    tokio::runtime::Runtime::new()?.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(std_listener)?;
        let shutdown = reborn.shutdown_signal();
        // Signal handlers are installed by ready(): report it once accepting.
        reborn.ready()?;
        let tasks = tokio_util::task::TaskTracker::new();
        loop {
            let (stream, _) = tokio::select! {
                _ = shutdown.draining() => break,
                accepted = listener.accept() => accepted?,
            };
            let shutdown = shutdown.clone();
            tasks.spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                loop {
                    let line = tokio::select! {
                        line = lines.next_line() => line,
                        // Idle when the drain starts: close; mid-line, the answer is sent first.
                        _ = shutdown.draining() => break,
                    };
                    let Ok(Some(line)) = line else { break };
                    if write
                        .write_all(format!("{line} pid={pid}\n").as_bytes())
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            });
        }
        drop(listener);
        tasks.close();
        tokio::select! {
            _ = tasks.wait() => {}
            _ = shutdown.hammered() => {}
        }
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}
