//! A gRPC server (tonic) upgraded in place, whose streaming call ends at its
//! connection's moment to leave.
//!
//! tonic serves on reborn with no glue: a tonic service is a tower service over HTTP/2,
//! and reborn's drain sends each connection GOAWAY. What only the application can do is
//! end a stream: `Ticks` ends with `UNAVAILABLE` at its connection's moment
//! ([`reborn::Draining`], found in the request's extensions), and the client resumes on a
//! new call, which reaches the new generation. Calls that GOAWAY refused never reached a
//! handler: clients should retry them (see [`reborn::draining`]).
//!
//! The service is routed by hand, as `tonic-build`'s generated code does, so that the
//! example needs no build script or `protoc`; with generated code, a handler reads the
//! handle the same way: `request.extensions().get::<reborn::Draining>()`.
//!
//! ```text
//! cargo run --example grpc -- 127.0.0.1:50051 [EVICTION_WINDOW_MS]
//! kill -HUP <pid>
//! ```

mod proto;

use std::pin::Pin;
use std::time::Duration;

use axum::{Router, body::Body, extract::Request, response::Response, routing::post};
use futures_util::Stream;
use proto::{Tick, TicksRequest, Who, WhoRequest};
use tonic::{Status, server::Grpc};
use tonic_prost::ProstCodec;

type TickStream = Pin<Box<dyn Stream<Item = Result<Tick, Status>> + Send>>;

/// `demo.Clock/Who`: the PID of the process that answers.
async fn who(_: tonic::Request<WhoRequest>) -> Result<tonic::Response<Who>, Status> {
    Ok(tonic::Response::new(Who {
        pid: std::process::id(),
    }))
}

/// `demo.Clock/Ticks`: counts from `from`, one tick every `every_ms`, until this
/// connection's moment to leave, where it ends with `UNAVAILABLE` so that the client
/// resumes from its last tick on a new call.
async fn ticks(
    request: tonic::Request<TicksRequest>,
) -> Result<tonic::Response<TickStream>, Status> {
    let draining = request
        .extensions()
        .get::<reborn::Draining>()
        .cloned()
        .ok_or_else(|| Status::internal("reborn::Draining is given by reborn's serve"))?;
    let TicksRequest { from, every_ms } = request.into_inner();
    let every = tokio::time::interval(Duration::from_millis(every_ms.max(1)));
    let pid = std::process::id();
    let state = (from, every, draining, false);
    let stream = futures_util::stream::unfold(state, move |(n, mut every, draining, ended)| {
        async move {
            if ended {
                return None;
            }
            tokio::select! {
                // The moment first: a stream that ticks fast must still let go.
                biased;
                () = draining.moment() => {
                    let restart = Status::unavailable("server restarting: resume on a new call");
                    Some((Err(restart), (n, every, draining, true)))
                }
                _ = every.tick() => Some((Ok(Tick { n, pid }), (n + 1, every, draining, false))),
            }
        }
    });
    Ok(tonic::Response::new(Box::pin(stream) as TickStream))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:50051".into());
    let mut builder = reborn::Reborn::builder();
    if let Some(ms) = std::env::args().nth(2) {
        builder = builder.eviction_window(Duration::from_millis(ms.parse()?));
    }
    let reborn = builder.build()?;
    let listener = reborn.listen("grpc", &addr)?;
    println!("[pid] {}", std::process::id());
    println!("listening on {}", listener.local_addr());
    let app = Router::new()
        .route(
            proto::WHO,
            post(|req: Request| async move {
                let answer = Grpc::new(ProstCodec::default())
                    .unary(tower::service_fn(who), req)
                    .await;
                answer.map(Body::new)
            }),
        )
        .route(
            proto::TICKS,
            post(|req: Request| async move {
                let answer: Response<tonic::body::Body> = Grpc::new(ProstCodec::default())
                    .server_streaming(tower::service_fn(ticks), req)
                    .await;
                answer.map(Body::new)
            }),
        );
    tokio::runtime::Runtime::new()?.block_on(reborn.serve(listener, app))?;
    Ok(())
}
