//! The master's listening sockets: taken from systemd when the master was socket-activated,
//! bound from `--listen` otherwise (or in addition).
//!
//! The master binds once and keeps every socket for its whole life: each worker gets
//! duplicates at fds 3.., so a socket never closes between two generations and no
//! connection waiting in its queue is lost.

use std::os::fd::OwnedFd;

use reborn::activation::InheritedSocket;
use reborn::listeners::ListenAddr;

use crate::cli::ListenSpec;
use crate::control::ListenerStatus;

/// A socket to hand to workers.
#[derive(Debug)]
pub struct MasterListener {
    /// The socket (close-on-exec; duplicated into each worker).
    pub fd: OwnedFd,
    /// Its name in `LISTEN_FDNAMES`.
    pub name: Option<String>,
    /// Where it listens, for logs and `reborn status`.
    pub address: String,
}

/// Takes the inherited sockets, then binds each `--listen` that no inherited socket of the
/// same name stands for.
pub fn collect(
    inherited: Vec<InheritedSocket>,
    specs: &[ListenSpec],
    backlog: i32,
) -> reborn::error::Result<Vec<MasterListener>> {
    let mut out: Vec<MasterListener> = inherited
        .into_iter()
        .map(|s| MasterListener {
            address: describe(&s.fd),
            fd: s.fd,
            name: s.name,
        })
        .collect();
    for spec in specs {
        if let Some(name) = &spec.name
            && out.iter().any(|l| l.name.as_deref() == Some(name.as_str()))
        {
            tracing::info!(name = %name, "using the socket systemd passed under this name");
            continue;
        }
        let fd = reborn::listeners::bind(&spec.addr, backlog)?;
        let address = match &spec.addr {
            ListenAddr::Unix(_) => spec.addr.to_string(),
            ListenAddr::Tcp { .. } => describe(&fd),
        };
        out.push(MasterListener {
            fd,
            name: spec.name.clone(),
            address,
        });
    }
    Ok(out)
}

impl MasterListener {
    /// Its entry in `reborn status`.
    pub fn status(&self) -> ListenerStatus {
        ListenerStatus {
            name: self.name.clone(),
            address: self.address.clone(),
        }
    }
}

/// `127.0.0.1:8080`, `[::1]:80` or `unix:/path`.
fn describe(fd: &OwnedFd) -> String {
    match socket2::SockRef::from(fd).local_addr() {
        Ok(addr) => {
            if let Some(a) = addr.as_socket() {
                a.to_string()
            } else if let Some(p) = addr.as_pathname() {
                format!("unix:{}", p.display())
            } else {
                "a socket of another kind".into()
            }
        }
        Err(e) => format!("unknown address ({e})"),
    }
}
