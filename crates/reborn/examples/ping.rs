//! The demo: an axum server whose `GET /ping` takes 5 seconds to answer
//! `{"message":"pong"}`, upgraded in place with `kill -HUP <pid>`.
//!
//! ```text
//! cargo run --example ping                  # listens on 0.0.0.0:8080, prints [pid] N
//! cargo run --example ping -- --addr 127.0.0.1:9000
//! ```
//!
//! Compared with plain axum, the one change is the last line of `main`:
//! `reborn::listen_and_serve(&addr, app)` instead of binding a listener and calling
//! `axum::serve`.

use std::time::Duration;

use axum::{Json, Router, routing::get};
use serde_json::{Value, json};

async fn ping() -> Json<Value> {
    tokio::time::sleep(Duration::from_secs(5)).await;
    Json(json!({ "message": "pong" }))
}

fn main() -> Result<(), reborn::Error> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let addr = addr_from_args().unwrap_or_else(|msg| {
        eprintln!("ping: {msg}");
        std::process::exit(2);
    });
    println!("[pid] {}", std::process::id());
    let app = Router::new().route("/ping", get(ping));
    reborn::listen_and_serve(&addr, app)
}

/// `--addr HOST:PORT` (or `--addr=HOST:PORT`), default `0.0.0.0:8080`.
fn addr_from_args() -> Result<String, String> {
    let mut args = std::env::args().skip(1);
    let mut addr = "0.0.0.0:8080".to_owned();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--addr" => {
                addr = args
                    .next()
                    .ok_or("--addr needs a value, e.g. --addr 127.0.0.1:8080")?
            }
            a if a.starts_with("--addr=") => addr = a["--addr=".len()..].to_owned(),
            "-h" | "--help" => {
                println!("usage: ping [--addr HOST:PORT]   (default 0.0.0.0:8080)");
                std::process::exit(0);
            }
            other => {
                return Err(format!(
                    "unknown argument {other:?}; usage: ping [--addr HOST:PORT]"
                ));
            }
        }
    }
    Ok(addr)
}
