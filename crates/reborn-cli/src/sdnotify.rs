//! The master's own reports to its service manager (systemd `Type=notify`).
//!
//! The master is the service's main process: it reports `READY=1` once its first worker is
//! ready, `RELOADING=1` … `READY=1` around each upgrade (so `systemctl reload` with
//! `ExecReload=reborn upgrade` shows the reload as it happens), `STATUS=` lines, and
//! `STOPPING=1` when it stops. Without `NOTIFY_SOCKET` (not under systemd) every call is
//! a no-op.

use std::ffi::OsString;

use reborn::notify::{NotifyMessage, send};

/// Where to report, if anywhere.
#[derive(Debug, Default)]
pub struct Upstream {
    socket: Option<OsString>,
}

impl Upstream {
    /// Reports to `socket` (the master's `NOTIFY_SOCKET`), or nowhere.
    pub fn new(socket: Option<OsString>) -> Upstream {
        Upstream { socket }
    }

    /// Whether a service manager listens.
    pub fn is_active(&self) -> bool {
        self.socket.is_some()
    }

    fn send(&self, message: NotifyMessage) {
        if let Some(socket) = &self.socket
            && let Err(e) = send(socket, &message.encode())
        {
            tracing::warn!(
                socket = %std::path::Path::new(socket).display(),
                error = %e,
                "cannot notify the service manager at its NOTIFY_SOCKET"
            );
        }
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: String) {
        self.send(NotifyMessage {
            ready: true,
            status: Some(status),
            ..Default::default()
        });
    }

    /// `RELOADING=1` with a status line.
    pub fn reloading(&self, status: String) {
        self.send(NotifyMessage {
            reloading: true,
            status: Some(status),
            ..Default::default()
        });
    }

    /// A status line alone.
    pub fn status(&self, status: String) {
        self.send(NotifyMessage {
            status: Some(status),
            ..Default::default()
        });
    }

    /// `STOPPING=1`.
    pub fn stopping(&self) {
        self.send(NotifyMessage {
            stopping: true,
            status: Some("stopping".into()),
            ..Default::default()
        });
    }
}
