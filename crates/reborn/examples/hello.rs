//! The README's "API in a few lines", as written there: `#[tokio::main]` and
//! `reborn::serve`, with no logging set up. The integration tests run it as a newcomer
//! would write it (`tests/readme.rs`).
//!
//! ```text
//! cargo run --example hello                    # listens on 0.0.0.0:8080
//! ADDR=127.0.0.1:9000 cargo run --example hello
//! ```
//!
//! `GET /ping` answers `pong pid=<pid>`; `GET /slow` answers the same after 2 seconds
//! (and prints `slow request started` as it starts), so that an upgrade can be seen to
//! finish what the old process accepted.

use std::time::Duration;

use axum::{Router, routing::get};

#[tokio::main]
async fn main() -> Result<(), reborn::Error> {
    let addr = std::env::var("ADDR").unwrap_or_else(|_| "0.0.0.0:8080".into());
    let app = Router::new()
        .route(
            "/ping",
            get(|| async { format!("pong pid={}", std::process::id()) }),
        )
        .route("/slow", get(slow));
    reborn::serve(&addr, app).await
}

async fn slow() -> String {
    println!("slow request started");
    tokio::time::sleep(Duration::from_secs(2)).await;
    format!("pong pid={}", std::process::id())
}
