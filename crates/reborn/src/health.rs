//! Readiness that a load balancer can read: [`Readiness`], a small HTTP service to mount
//! at `/readyz`, and the [shutdown delay](crate::Builder::shutdown_delay) it reports.
//!
//! Why: an instance that is replaced (a Kubernetes rolling update, a host drained, an
//! autoscaler scaling in) gets `SIGTERM` while its load balancer still sends it traffic,
//! until the balancer's health check or endpoint list catches up. If the instance stops
//! accepting at once, the connections sent to it meanwhile are refused: the well-known
//! failed requests of rolling updates. With a shutdown delay the instance keeps serving
//! and accepting for a while after `SIGTERM` and answers its readiness check with `503`,
//! so the balancer takes it out of rotation *first*; only then does it drain. An
//! in-place upgrade (`SIGHUP`) needs none of this: the listening socket never closes,
//! and the readiness answer stays `200` all along.
//!
//! ```no_run
//! use std::time::Duration;
//! use axum::{Router, routing::get};
//!
//! # async fn example() -> Result<(), reborn::Error> {
//! let reborn = reborn::Reborn::builder()
//!     // Longer than the balancer takes to see a failing check (here 2 × 1 s).
//!     .shutdown_delay(Duration::from_secs(5))
//!     .build()?;
//! let app = Router::new()
//!     .route("/", get(|| async { "hello" }))
//!     .route("/livez", get(|| async { "alive" }))
//!     .route_service("/readyz", reborn.readiness());
//! let listener = reborn.listen("http", "0.0.0.0:8080")?;
//! reborn.serve(listener, app).await
//! # }
//! ```
//!
//! Liveness is a separate question ("should this process be restarted?") and must not
//! fail during the delay: keep a `/livez` of your own that answers while the process runs.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::Full;

use crate::server::Inner;

/// Whether this address should get traffic, as [`Readiness`] says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// A first start that has not reported ready yet (its
    /// [readiness check](crate::Builder::ready_check), if any, has not passed).
    Starting,
    /// Serving, or handing over to a new generation that serves in its place (an
    /// in-place upgrade keeps the address ready throughout).
    Ready,
    /// Shutting down: in the [shutdown delay](crate::Builder::shutdown_delay), draining
    /// for a shutdown, or hammered.
    ShuttingDown,
}

impl Health {
    /// `true` for [`Health::Ready`].
    pub fn is_ready(self) -> bool {
        self == Health::Ready
    }

    /// What the readiness endpoint answers: its status and body.
    fn answer(self) -> (StatusCode, &'static str) {
        match self {
            Health::Ready => (StatusCode::OK, "ready\n"),
            Health::Starting => (StatusCode::SERVICE_UNAVAILABLE, "starting\n"),
            Health::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n"),
        }
    }
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Health::Starting => "starting",
            Health::Ready => "ready",
            Health::ShuttingDown => "shutting down",
        })
    }
}

/// A readiness endpoint: a [`tower::Service`] that answers every request with `200
/// ready` while this address should get traffic and `503` (`starting`, `shutting down`)
/// otherwise, with `Cache-Control: no-store`. Made by
/// [`Reborn::readiness`](crate::Reborn::readiness); cheap to clone.
///
/// Mount it where the balancer checks, e.g. axum's
/// `Router::route_service("/readyz", reborn.readiness())`; for other frameworks,
/// [`health`](Readiness::health) gives the same answer to build a response from.
#[derive(Clone)]
pub struct Readiness {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness")
            .field("health", &self.health())
            .finish()
    }
}

impl Readiness {
    pub(crate) fn new(inner: Arc<Inner>) -> Readiness {
        Readiness { inner }
    }

    /// Where this process stands now.
    pub fn health(&self) -> Health {
        self.inner.health()
    }

    /// Whether the address should get traffic now.
    pub fn is_ready(&self) -> bool {
        self.health().is_ready()
    }

    /// The response for the current state.
    pub fn response(&self) -> Response<Full<Bytes>> {
        let (status, body) = self.health().answer();
        let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    }
}

impl<B> tower::Service<Request<B>> for Readiness {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<B>) -> Self::Future {
        ready(Ok(self.response()))
    }
}
