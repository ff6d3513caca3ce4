//! HTTPS (HTTP/1.1 and HTTP/2 over rustls) with zero-downtime upgrades: the TLS handshake
//! runs in [`reborn::Reborn::serve_with`], and the drain works as for plain HTTP.
//!
//! ```text
//! cargo run --example tls -- --addr 127.0.0.1:8443 --cert-dir /tmp/reborn-tls
//! curl --cacert /tmp/reborn-tls/cert.pem https://localhost:8443/ping
//! kill -HUP <pid>
//! ```
//!
//! `/peer` answers the client's address: axum's `ConnectInfo<SocketAddr>` works over TLS
//! too, filled from the socket before the handshake.
//!
//! The certificate and key are read from `--cert-dir` (`cert.pem`, `key.pem`); when they
//! are missing a self-signed pair for `localhost` is made and written there, so the next
//! generation serves the same certificate.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::{
    Router,
    extract::{ConnectInfo, Query},
    routing::get,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

#[derive(serde::Deserialize)]
struct PingParams {
    sleep_ms: Option<u64>,
}

fn tls_config(dir: &Path) -> Result<rustls::ServerConfig, Box<dyn std::error::Error>> {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    if !cert.exists() || !key.exists() {
        let made =
            rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])?;
        std::fs::create_dir_all(dir)?;
        std::fs::write(&key, made.signing_key.serialize_pem())?;
        std::fs::write(&cert, made.cert.pem())?;
    }
    let certs = CertificateDer::pem_file_iter(&cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(&key)?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    reborn::init();
    tracing_subscriber::fmt().with_ansi(false).init();
    let mut addr = "127.0.0.1:8443".to_owned();
    let mut cert_dir = PathBuf::from("reborn-tls");
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--addr" => addr = args.next().ok_or("--addr needs HOST:PORT")?,
            "--cert-dir" => cert_dir = args.next().ok_or("--cert-dir needs a directory")?.into(),
            other => {
                return Err(format!(
                    "unknown flag {other}; usage: tls [--addr HOST:PORT] [--cert-dir DIR]"
                )
                .into());
            }
        }
    }
    let pid = std::process::id();
    println!("[pid] {pid}");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls_config(&cert_dir)?));
    let reborn = reborn::Reborn::new()?;
    let listener = reborn.listen("https", &addr)?;
    println!("listening on {}", listener.local_addr());
    let app = Router::new()
        .route(
            "/ping",
            get(move |Query(p): Query<PingParams>| async move {
                if let Some(ms) = p.sleep_ms {
                    println!("slow request started: {ms} ms");
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                format!("pong pid={pid}")
            }),
        )
        .route(
            "/peer",
            get(
                |ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>| async move {
                    format!("peer={peer}")
                },
            ),
        );
    tokio::runtime::Runtime::new()?.block_on(async move {
        reborn
            .serve_with(listener, move |conn| acceptor.accept(conn), app)
            .await
    })?;
    Ok(())
}
