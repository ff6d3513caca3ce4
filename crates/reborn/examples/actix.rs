//! actix-web on reborn's raw listener: actix owns its accept loop, workers and
//! connections; reborn gives it the listening socket (inherited across upgrades), learns
//! when it is ready, and tells it when to stop accepting and when to give up.
//!
//! `GET /` answers `pong pid=<pid>`; `GET /slow/<ms>` answers the same after `<ms>`
//! milliseconds (a request that an upgrade must not cut).
//!
//! ```text
//! cargo run --example actix -- 127.0.0.1:8080
//! curl localhost:8080/slow/5000 &    # answered by this process, after the upgrade
//! kill -HUP <pid>                    # the binary on disk takes over
//! ```
//!
//! What reborn's own `serve` does and actix does not: actix's graceful stop closes idle
//! keep-alive connections at once, so a client that sends its next request on one just
//! then loses it, as with every server that owns its connections (measured with actix,
//! Node and uvicorn: 8–16 lost requests over 2 upgrades at 8 keep-alive clients). New
//! connections lose nothing. Servers that `reborn`'s `serve` runs answer that request
//! with `Connection: close` instead.

use std::time::Duration;

use actix_web::{App, HttpServer, web};
use reborn::listeners::ListenerSocket;

/// How long actix waits for in-flight requests once it stops accepting: reborn's drain
/// deadline, which then hammers.
const DRAIN: Duration = Duration::from_secs(30);

/// How long connections accepted just before the pause get to have their request read.
const JUST_ACCEPTED: Duration = Duration::from_secs(1);

fn main() -> Result<(), Box<dyn std::error::Error>> {
    reborn::init();
    tracing_subscriber::fmt().with_ansi(false).init();
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8080".into());
    let reborn = reborn::Reborn::builder()
        // actix says when it accepts; reborn must not report ready on its own.
        .ready_mode(reborn::ReadyMode::Manual)
        .drain_timeout(DRAIN)
        .build()?;
    let listener = reborn.listen("http", &addr)?;
    let pid = std::process::id();
    println!("[pid] {pid}");
    println!("listening on {}", listener.local_addr());
    let ListenerSocket::Tcp(std_listener) = listener.into_socket() else {
        return Err("this example speaks TCP only".into());
    };
    actix_web::rt::System::new().block_on(async move {
        let server = HttpServer::new(move || {
            App::new()
                .route(
                    "/",
                    web::get().to(move || async move { format!("pong pid={pid}") }),
                )
                .route(
                    "/slow/{ms}",
                    web::get().to(move |ms: web::Path<u64>| async move {
                        println!("slow request started: {} ms", *ms);
                        tokio::time::sleep(Duration::from_millis(*ms)).await;
                        format!("pong pid={pid}")
                    }),
                )
        })
        // reborn handles the signals: SIGHUP upgrades, SIGTERM drains, SIGUSR2 hammers.
        .disable_signals()
        .workers(2)
        .shutdown_timeout(DRAIN.as_secs())
        .listen(std_listener)?
        .run();
        let handle = server.handle();
        let shutdown = reborn.shutdown_signal();
        // Accepting from here on (actix's accept thread is up): the previous generation,
        // if any, may stop.
        reborn.ready()?;
        actix_web::rt::spawn(async move {
            shutdown.draining().await;
            // Stop accepting first: the next generation accepts from the same socket.
            handle.pause().await;
            // actix's graceful stop closes every connection with no request in flight,
            // also one accepted a moment ago whose request has not been read yet (its
            // client sees a reset). Give those a moment to be read: then they are in
            // flight, and finished.
            tokio::select! {
                () = tokio::time::sleep(JUST_ACCEPTED) => {}
                () = shutdown.hammered() => {}
            }
            // Finish what is in flight (the socket is closed, never shut down); the
            // hammer ends the rest.
            tokio::select! {
                () = handle.stop(true) => {}
                () = shutdown.hammered() => handle.stop(false).await,
            }
        });
        server.await?;
        println!("exiting");
        Ok(())
    })
}
