//! A server with its own accept loop (a line protocol over TCP) that still gets
//! reborn's upgrades: it takes the raw socket, reports ready itself, and stops accepting
//! when the drain starts.
//!
//! Each line a client sends is answered with `<LINE> pid=<pid>`. Once the drain starts,
//! each connection is told `bye pid=<pid>` and closed at its own moment
//! ([`reborn::Reborn::draining`]), the moments spread over the eviction window (the
//! second argument, in milliseconds), so that clients do not all reconnect at once.
//!
//! ```text
//! cargo run --example raw_tcp -- 127.0.0.1:7000 2000
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
    let mut builder = reborn::Reborn::builder().ready_mode(reborn::ReadyMode::Manual);
    if let Some(ms) = std::env::args().nth(2) {
        builder = builder.eviction_window(std::time::Duration::from_millis(ms.parse()?));
    }
    let reborn = builder.build()?;
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
            // This connection's moment to leave, once the drain starts.
            let draining = reborn.draining();
            tasks.spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                loop {
                    let line = tokio::select! {
                        line = lines.next_line() => line,
                        // At the connection's moment: say so and close. A line being
                        // answered is answered first.
                        () = draining.moment() => {
                            let _ = write.write_all(format!("bye pid={pid}\n").as_bytes()).await;
                            break;
                        }
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
