//! Who a connection is from: the addresses (TCP) or the credentials (Unix sockets) that
//! `serve` puts in every request's extensions.
//!
//! Access logs, rate limiters and "who called this" checks need the client's address.
//! axum gets it from `into_make_service_with_connect_info`, which does not fit a server
//! that owns its accept loop; so reborn inserts it itself, in the same type axum's
//! extractor reads. An axum handler takes `ConnectInfo<SocketAddr>` unchanged over TCP,
//! or `ConnectInfo<reborn::UnixPeer>` over a Unix socket; any other service reads
//! [`ConnectionInfo`] from `request.extensions()`.
//!
//! ```no_run
//! use std::net::SocketAddr;
//! use axum::{Router, extract::ConnectInfo, routing::get};
//!
//! async fn whoami(ConnectInfo(peer): ConnectInfo<SocketAddr>) -> String {
//!     format!("you are {peer}")
//! }
//!
//! fn main() -> Result<(), reborn::Error> {
//!     reborn::listen_and_serve("127.0.0.1:8080", Router::new().route("/", get(whoami)))
//! }
//! ```
//!
//! Behind a proxy or load balancer, the peer is the proxy: take the client from what the
//! proxy forwards (`X-Forwarded-For`, the PROXY protocol) instead.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::serve::Connection;

/// A Unix-socket client: its process's credentials as the kernel reported them when it
/// connected (`SO_PEERCRED`), which a client cannot forge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnixPeer {
    /// Its process ID, when the kernel reports one (not across PID namespaces).
    pub pid: Option<i32>,
    /// Its user ID.
    pub uid: u32,
    /// Its group ID.
    pub gid: u32,
}

/// Where a connection comes from and where it arrived; in every request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionInfo {
    /// A TCP connection.
    Tcp {
        /// The client's address (a proxy's, behind a proxy).
        peer: SocketAddr,
        /// The address it connected to.
        local: SocketAddr,
    },
    /// A Unix-socket connection.
    Unix {
        /// The client's credentials, if the kernel gave them.
        peer: Option<UnixPeer>,
        /// The socket's path, if it has one (not for abstract or unnamed sockets).
        local: Option<PathBuf>,
    },
}

impl ConnectionInfo {
    /// What the operating system says of `conn`; `None` if it is already broken (the
    /// client hung up).
    pub fn of(conn: &Connection) -> Option<ConnectionInfo> {
        match conn {
            Connection::Tcp(s) => Some(ConnectionInfo::Tcp {
                peer: s.peer_addr().ok()?,
                local: s.local_addr().ok()?,
            }),
            Connection::Unix(s) => Some(ConnectionInfo::Unix {
                peer: s.peer_cred().ok().map(|c| UnixPeer {
                    pid: c.pid(),
                    uid: c.uid(),
                    gid: c.gid(),
                }),
                local: s
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_pathname().map(PathBuf::from)),
            }),
        }
    }

    /// Who the connection is from, for logs: `IP:port`, or a Unix-socket client and its
    /// process.
    pub(crate) fn describe(info: Option<&ConnectionInfo>) -> String {
        match info {
            Some(ConnectionInfo::Tcp { peer, .. }) => peer.to_string(),
            Some(ConnectionInfo::Unix {
                peer: Some(UnixPeer { pid: Some(pid), .. }),
                ..
            }) => format!("a Unix-socket client (pid {pid})"),
            Some(ConnectionInfo::Unix { .. }) => "a Unix-socket client".into(),
            None => "a client".into(),
        }
    }

    /// The extensions every request on this connection gets: this, and with the `axum`
    /// feature, axum's `ConnectInfo` of the peer.
    pub(crate) fn extensions(self) -> http::Extensions {
        let mut ext = http::Extensions::new();
        #[cfg(feature = "axum")]
        match &self {
            ConnectionInfo::Tcp { peer, .. } => {
                ext.insert(axum::extract::ConnectInfo(*peer));
            }
            ConnectionInfo::Unix { peer: Some(p), .. } => {
                ext.insert(axum::extract::ConnectInfo(*p));
            }
            ConnectionInfo::Unix { peer: None, .. } => {}
        }
        ext.insert(self);
        ext
    }
}
