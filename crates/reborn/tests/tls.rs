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

/// An HTTPS/1.1 connection to `addr`, kept open: its sender, and the client's own address.
async fn https_connect(
    addr: std::net::SocketAddr,
    cert: &std::path::Path,
) -> std::io::Result<(
    hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    tokio::task::JoinHandle<hyper::Result<()>>,
    std::net::SocketAddr,
)> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(cert).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let local = tcp.local_addr()?;
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .map_err(std::io::Error::other)?;
    Ok((sender, tokio::spawn(conn), local))
}

/// One request on `sender`: the response's `Connection` header (if any) and its body.
async fn ask(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    path: &str,
) -> std::io::Result<(Option<String>, String)> {
    let req = http::Request::get(path)
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())
        .unwrap();
    // The connection takes its next request once it has finished the last one.
    sender.ready().await.map_err(std::io::Error::other)?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(std::io::Error::other)?;
    let connection = resp
        .headers()
        .get(http::header::CONNECTION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    Ok((connection, String::from_utf8_lossy(&body).into_owned()))
}

async fn https_get(
    addr: std::net::SocketAddr,
    cert: &std::path::Path,
    path: &str,
) -> std::io::Result<String> {
    let (mut sender, _conn, _) = https_connect(addr, cert).await?;
    Ok(ask(&mut sender, path).await?.1)
}

/// The `tls` example, started in `dir` (its certificate is made there): the process, its
/// address and the certificate's path.
fn start_tls(dir: &std::path::Path) -> (Proc, std::net::SocketAddr, std::path::PathBuf) {
    let bin = reborn_testkit::copy_to(&reborn_testkit::example("reborn", "tls"), dir, "server");
    let mut cmd = Command::new(&bin);
    cmd.args(["--addr", "127.0.0.1:0", "--cert-dir"]).arg(dir);
    let proc = Proc::start(cmd);
    let addr: std::net::SocketAddr = proc.wait_line("the address", |l| {
        l.strip_prefix("listening on ")?.parse().ok()
    });
    (proc, addr, dir.join("cert.pem"))
}

/// Once the first generation has a slow request in flight, `SIGHUP`: the new
/// generation's PID, once it answers over HTTPS.
fn upgrade_with_a_slow_request_in_flight(
    proc: &Proc,
    rt: &tokio::runtime::Runtime,
    addr: std::net::SocketAddr,
    cert: &std::path::Path,
) -> u32 {
    let first = proc.pid();
    proc.wait_line("the slow request", |l| {
        l.starts_with("slow request started").then_some(())
    });
    signal(first, libc::SIGHUP);
    wait_for("the new generation over HTTPS", PATIENCE, || {
        rt.block_on(https_get(addr, cert, "/ping"))
            .ok()
            .and_then(|b| body_pid(&b))
            .filter(|p| *p != first)
    })
}

/// `SIGTERM`s a generation that is not our child, and waits for it to be gone.
fn stop(pid: u32) {
    signal(pid, libc::SIGTERM);
    wait_for("the generation to exit", PATIENCE, || {
        (!alive(pid)).then_some(())
    });
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn https_server_upgrades_without_dropping_tls_requests() {
    let dir = tempfile::tempdir().unwrap();
    let (mut proc, addr, cert) = start_tls(dir.path());
    let rt = runtime();
    let first = proc.pid();
    let body = rt
        .block_on(https_get(addr, &cert, "/ping"))
        .expect("HTTPS works");
    assert_eq!(body_pid(&body), Some(first));

    let slow = rt.spawn({
        let cert = cert.clone();
        async move { https_get(addr, &cert, "/ping?sleep_ms=1500").await }
    });
    let second = upgrade_with_a_slow_request_in_flight(&proc, &rt, addr, &cert);
    let slow = rt
        .block_on(slow)
        .unwrap()
        .expect("the in-flight TLS request completes");
    assert_eq!(body_pid(&slow), Some(first));
    assert_eq!(proc.wait_exit(PATIENCE), Some(0));
    stop(second);
}

/// axum's `ConnectInfo<SocketAddr>` over TLS (`serve_with`) is the client's real address.
#[test]
fn connect_info_over_tls_is_the_real_peer() {
    let dir = tempfile::tempdir().unwrap();
    let (mut proc, addr, cert) = start_tls(dir.path());
    let rt = runtime();
    let (body, local) = rt.block_on(async {
        let (mut sender, _conn, local) = https_connect(addr, &cert).await.expect("HTTPS works");
        (ask(&mut sender, "/peer").await.expect("answered").1, local)
    });
    assert_eq!(body, format!("peer={local}"));
    signal(proc.pid(), libc::SIGTERM);
    assert_eq!(proc.wait_exit(PATIENCE), Some(0));
}

/// A TLS connection is not handed to the next generation (only plain HTTP/1.1 moves): it
/// keeps the usual drain. Its request in flight at the upgrade is answered by the old
/// generation with `Connection: close`, the connection then ends, and the old
/// generation exits.
#[test]
fn a_tls_connection_keeps_the_usual_drain_at_an_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let (mut proc, addr, cert) = start_tls(dir.path());
    let rt = runtime();
    let first = proc.pid();
    let (mut sender, conn, _) = rt
        .block_on(https_connect(addr, &cert))
        .expect("HTTPS works");
    let (_, body) = rt.block_on(ask(&mut sender, "/ping")).expect("answered");
    assert_eq!(body_pid(&body), Some(first));
    // Long enough to outlast the new generation's start on a loaded machine: the answer
    // is made during the drain.
    let slow = rt.spawn(async move { ask(&mut sender, "/ping?sleep_ms=8000").await });
    let second = upgrade_with_a_slow_request_in_flight(&proc, &rt, addr, &cert);
    let (connection, body) = rt
        .block_on(slow)
        .unwrap()
        .expect("the in-flight TLS request completes");
    assert_eq!(body_pid(&body), Some(first));
    assert_eq!(connection.as_deref(), Some("close"), "{body}");
    rt.block_on(async { tokio::time::timeout(PATIENCE, conn).await })
        .expect("the TLS connection ends")
        .unwrap()
        .expect("cleanly");
    assert_eq!(proc.wait_exit(PATIENCE), Some(0));
    stop(second);
}
