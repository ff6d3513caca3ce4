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
//! A connection that is plain HTTP needs nothing: the drain closes it between requests.
//! What stays open past the window is cut by the drain deadline's hammer, a WebSocket
//! with a close frame of its own (`1012` at an upgrade, `1001 Going Away` at shutdown)
//! where the connection is between frames.
//!
//! # WebSockets
//!
//! At the moment, send what is due, then a close frame with code 1012, and wait for the
//! client's close (a client that never answers is cut at the deadline). Browsers and
//! WebSocket libraries reconnect, and reach the new generation:
//!
//! ```no_run
//! use axum::{Router, extract::ws::{CloseFrame, Message, WebSocketUpgrade}, routing::get};
//!
//! async fn ws(upgrade: WebSocketUpgrade, draining: reborn::Draining) -> axum::response::Response {
//!     upgrade.on_upgrade(move |mut socket| async move {
//!         loop {
//!             tokio::select! {
//!                 msg = socket.recv() => match msg {
//!                     Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
//!                     Some(Ok(msg)) => { let _ = socket.send(msg).await; }
//!                 },
//!                 () = draining.moment() => break,
//!             }
//!         }
//!         // 1012: Service Restart. The client reconnects, to the new generation.
//!         let close = CloseFrame { code: 1012, reason: "service restart".into() };
//!         let _ = socket.send(Message::Close(Some(close))).await;
//!         // Its close answers ours; then the connection is done.
//!         while let Some(Ok(msg)) = socket.recv().await {
//!             if let Message::Close(_) = msg { break }
//!         }
//!     })
//! }
//! # let _ = Router::<()>::new().route("/ws", get(ws));
//! ```
//!
//! # Server-sent events
//!
//! End the stream at the moment. `EventSource` reconnects by itself (after the `retry`
//! the stream set) and sends the id of the last event it received as `Last-Event-ID`;
//! the new generation resumes after it, so no event is lost. Events must be read from
//! where they are kept (a log, a database, a broker), not from one process's memory:
//!
//! ```no_run
//! use std::{convert::Infallible, time::Duration};
//! use axum::{Router, http::HeaderMap, response::sse::{Event, Sse}, routing::get};
//! use futures_util::Stream;
//!
//! /// Event `n` of the application's log (here, a function of `n`).
//! async fn event(n: u64) -> Event {
//!     tokio::time::sleep(Duration::from_millis(100)).await;
//!     Event::default().id(n.to_string()).data(format!("event {n}"))
//! }
//!
//! async fn events(
//!     headers: HeaderMap,
//!     draining: reborn::Draining,
//! ) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
//!     let last: u64 = headers
//!         .get("last-event-id")
//!         .and_then(|v| v.to_str().ok()?.parse().ok())
//!         .unwrap_or(0);
//!     let stream = futures_util::stream::unfold((last + 1, draining), |(n, draining)| async move {
//!         tokio::select! {
//!             biased;
//!             // The connection's moment: end the stream; the client resumes elsewhere.
//!             () = draining.moment() => None,
//!             event = event(n) => Some((Ok(event.retry(Duration::from_millis(100))), (n + 1, draining))),
//!         }
//!     });
//!     Sse::new(stream)
//! }
//! # let _ = Router::<()>::new().route("/events", get(events));
//! ```
//!
//! # gRPC (tonic)
//!
//! tonic services run on [`serve`](crate::Reborn::serve) unchanged, and each HTTP/2
//! connection gets GOAWAY at the drain. A streaming handler reads the handle from its
//! request, `request.extensions().get::<reborn::Draining>()`, and ends its stream at the
//! moment, for instance with `Status::unavailable`, after which the client calls again
//! and resumes (the `grpc` example does, with a test). Clients should retry calls that
//! GOAWAY refused: they never reached a handler, and tonic does not retry them itself.
//! Such a call fails with `Code::Internal`, not `Unavailable`, so a retry on
//! `UNAVAILABLE` alone misses it: ask [`crate::retry::safe_to_retry`].
//!
//! # Servers with their own accept loop
//!
//! [`Reborn::draining`](crate::Reborn::draining) gives each connection accepted by hand
//! its handle, with its own moment in the same window (the `raw_tcp` example).

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
    /// The connection's number.
    conn: u64,
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
            conn,
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
    ///
    /// Never before the accept loops of [`serve`](crate::Reborn::serve) have stopped: a
    /// client told to leave reconnects within a millisecond, and must reach the next
    /// generation, not a loop of this process that had not yet seen the drain start.
    ///
    /// Once it has come, the connection is not handed to the next generation, and its
    /// responses say `Connection: close`: a client that comes back on the same keep-alive
    /// connection (an `EventSource` resuming its stream, a long poll) is sent on to the
    /// next generation instead of being served here again, where its moment has passed.
    pub async fn moment(&self) {
        let mut rx = self.control.shutdown().receiver();
        loop {
            if rx.wait_for(|p| *p >= Phase::Draining).await.is_err() {
                return;
            }
            if self.control.phase() == Phase::Hammer {
                return;
            }
            // Not before every accept loop has stopped: a loop that had not yet seen the
            // drain could take this very client back when it reconnects.
            tokio::select! {
                () = self.control.accept_loops_stopped() => {}
                changed = rx.wait_for(|p| *p != Phase::Draining) => {
                    if changed.is_err() || self.control.phase() == Phase::Hammer {
                        return;
                    }
                    continue;
                }
            }
            let started = self
                .control
                .started_at()
                .unwrap_or_else(std::time::Instant::now);
            let at = tokio::time::Instant::from_std(started + self.offset());
            tokio::select! {
                () = tokio::time::sleep_until(at) => {
                    if self.control.phase() >= Phase::Draining {
                        // Its client is to come back to the next generation: the
                        // connection is not kept for a handoff.
                        self.control.told_to_leave(self.conn);
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

    #[tokio::test]
    async fn no_moment_comes_while_an_accept_loop_may_still_accept() {
        use std::sync::Arc;
        use std::time::Duration;

        use crate::drain::{DrainControl, DrainReason};

        let control = Arc::new(DrainControl::new());
        // Connection 0's moment is the drain's very start.
        let draining = super::Draining::new(control.clone(), 0, Duration::from_secs(1));
        assert_eq!(draining.offset(), Duration::ZERO);
        let accept_loop = control.accept_loop();
        assert!(control.claim(DrainReason::Upgraded { successor: 1 }));
        control.start_draining();
        let moment = tokio::spawn({
            let draining = draining.clone();
            async move { draining.moment().await }
        });
        // A loop that has not yet let go could take the client back: no moment yet.
        let early = tokio::time::timeout(Duration::from_millis(300), async {
            while !moment.is_finished() {
                tokio::task::yield_now().await;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await;
        assert!(early.is_err(), "the moment came while an accept loop ran");
        drop(accept_loop);
        tokio::time::timeout(Duration::from_secs(10), moment)
            .await
            .expect("the moment comes once the last accept loop stopped")
            .expect("the task ends");
    }
}
