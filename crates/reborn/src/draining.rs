//! Each connection's moment to leave: for WebSockets, server-sent events and long
//! streams, which only the application can end cleanly.
//!
//! The drain ends a plain HTTP connection by itself (`Connection: close`, GOAWAY). A
//! WebSocket or an event stream is the application's after the response started: only
//! it can send a close frame (`1012 Service Restart`) or end the stream, so that the
//! client reconnects, to the new generation. If 10,000 of them did so the moment the
//! drain starts, 10,000 clients would reconnect in the same millisecond. So each
//! connection gets its own moment, spread evenly over the *eviction window*
//! ([`Builder::eviction_window`](crate::Builder::eviction_window), a tenth of the drain
//! deadline by default): every request carries a [`Draining`] handle (an axum extractor
//! too) whose [`moment`](Draining::moment) resolves at its connection's moment.
//!
//! ```no_run
//! use axum::{Router, extract::ws::{CloseFrame, Message, WebSocketUpgrade}, routing::get};
//!
//! async fn ws(upgrade: WebSocketUpgrade, draining: reborn::Draining) -> axum::response::Response {
//!     upgrade.on_upgrade(move |mut socket| async move {
//!         loop {
//!             tokio::select! {
//!                 msg = socket.recv() => match msg {
//!                     Some(Ok(msg)) => { let _ = socket.send(msg).await; }
//!                     _ => return,
//!                 },
//!                 () = draining.moment() => {
//!                     // 1012: Service Restart. Browsers and clients reconnect.
//!                     let close = CloseFrame { code: 1012, reason: "restarting".into() };
//!                     let _ = socket.send(Message::Close(Some(close))).await;
//!                     return;
//!                 }
//!             }
//!         }
//!     })
//! }
//! # let _ = Router::<()>::new().route("/ws", get(ws));
//! ```
//!
//! For server-sent events, end the stream at the moment; `EventSource` reconnects by
//! itself, sending `Last-Event-ID`, from which the new generation resumes. A tonic
//! streaming handler ends its stream the same way; gRPC clients should enable retries
//! for calls refused by GOAWAY.

use std::sync::Arc;
use std::time::Duration;

use crate::drain::{DrainControl, Phase};

/// The golden ratio's fractional part: `(n × φ) mod 1` spreads any number of
/// connections, numbered in order, evenly over `[0, 1)`.
const SPREAD: f64 = 0.618_033_988_749_895;

/// One connection's view of the drain: when it should let go. Cheap to clone; in every
/// request's extensions, and an axum extractor.
#[derive(Clone)]
pub struct Draining {
    control: Arc<DrainControl>,
    /// Where in the window this connection's moment lies, in `[0, 1)`.
    slot: f64,
    window: Duration,
}

impl std::fmt::Debug for Draining {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Draining")
            .field("offset", &self.offset())
            .field("phase", &self.control.phase())
            .finish()
    }
}

impl Draining {
    pub(crate) fn new(control: Arc<DrainControl>, conn: u64, window: Duration) -> Draining {
        Draining {
            control,
            slot: (conn as f64 * SPREAD).fract(),
            window,
        }
    }

    /// How long after the drain starts this connection's moment comes.
    pub fn offset(&self) -> Duration {
        self.window.mul_f64(self.slot)
    }

    /// Whether the process is draining (or past it).
    pub fn is_draining(&self) -> bool {
        self.control.phase() >= Phase::Draining
    }

    /// Resolves at this connection's moment to leave: its offset into the eviction
    /// window after the drain starts, or at once at the hammer. If the drain is called
    /// off (the new generation died on probation), it waits for the next one.
    pub async fn moment(&self) {
        let mut rx = self.control.shutdown().receiver();
        loop {
            if rx.wait_for(|p| *p >= Phase::Draining).await.is_err() {
                return;
            }
            if self.control.phase() == Phase::Hammer {
                return;
            }
            let started = self
                .control
                .started_at()
                .unwrap_or_else(std::time::Instant::now);
            let at = tokio::time::Instant::from_std(started + self.offset());
            tokio::select! {
                () = tokio::time::sleep_until(at) => {
                    if self.control.phase() >= Phase::Draining {
                        return;
                    }
                }
                changed = rx.wait_for(|p| *p != Phase::Draining) => {
                    if changed.is_err() || self.control.phase() == Phase::Hammer {
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(feature = "axum")]
impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Draining {
    type Rejection = (http::StatusCode, &'static str);

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Draining>().cloned().ok_or((
            http::StatusCode::INTERNAL_SERVER_ERROR,
            "reborn::Draining is given to requests served by reborn's serve",
        ))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn moments_spread_evenly_over_the_window() {
        let mut slots: Vec<f64> = (0..100)
            .map(|n| (n as f64 * super::SPREAD).fract())
            .collect();
        slots.sort_by(f64::total_cmp);
        let widest = slots.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max);
        assert!(
            widest < 0.03,
            "no gap wider than 3% of the window: {widest}"
        );
        assert!(slots[0] < 0.01 && slots[99] > 0.98);
    }
}
