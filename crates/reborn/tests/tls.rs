//! HTTPS through rustls, upgraded in place: the handshake runs in `serve_with`, and
//! in-flight TLS requests finish on the old generation.

mod common;

use std::process::Command;
use std::sync::Arc;

use common::body_pid;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use reborn_testkit::{PATIENCE, Proc, alive, signal, wait_for};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

async fn https_get(
    addr: std::net::SocketAddr,
    cert: &std::path::Path,
    path: &str,
) -> std::io::Result<String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(cert).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender
        .send_request(req)
        .await
        .map_err(std::io::Error::other)?;
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

#[test]
fn https_server_upgrades_without_dropping_tls_requests() {
    let dir = tempfile::tempdir().unwrap();
    let bin = reborn_testkit::copy_to(
        &reborn_testkit::example("reborn", "tls"),
        dir.path(),
        "server",
    );
    let mut cmd = Command::new(&bin);
    cmd.args(["--addr", "127.0.0.1:0", "--cert-dir"])
        .arg(dir.path());
    let mut proc = Proc::start(cmd);
    let addr: std::net::SocketAddr = proc.wait_line("the address", |l| {
        l.strip_prefix("listening on ")?.parse().ok()
    });
    let cert = dir.path().join("cert.pem");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let first = proc.pid();
    let body = rt
        .block_on(https_get(addr, &cert, "/ping"))
        .expect("HTTPS works");
    assert_eq!(body_pid(&body), Some(first));

    let slow = rt.spawn({
        let cert = cert.clone();
        async move { https_get(addr, &cert, "/ping?sleep_ms=1500").await }
    });
    proc.wait_line("the slow request", |l| {
        l.starts_with("slow request started").then_some(())
    });
    signal(first, libc::SIGHUP);
    let second = wait_for("the new generation over HTTPS", PATIENCE, || {
        rt.block_on(https_get(addr, &cert, "/ping"))
            .ok()
            .and_then(|b| body_pid(&b))
            .filter(|p| *p != first)
    });
    let slow = rt
        .block_on(slow)
        .unwrap()
        .expect("the in-flight TLS request completes");
    assert_eq!(body_pid(&slow), Some(first));
    assert_eq!(proc.wait_exit(PATIENCE), Some(0));
    signal(second, libc::SIGTERM);
    wait_for("the second generation to exit", PATIENCE, || {
        (!alive(second)).then_some(())
    });
}
