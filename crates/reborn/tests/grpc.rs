//! gRPC across upgrades, with tonic's own client: a server-streaming call that the
//! handler ends at its connection's moment and the client resumes, and unary calls that
//! retry what GOAWAY refused, so that none fails.

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::uri::PathAndQuery;
use reborn_testkit::{PATIENCE, Proc, alive, signal, wait_for};
use tonic::{Code, Status, client::Grpc, transport::Channel};
use tonic_prost::ProstCodec;

#[path = "../examples/grpc/proto.rs"]
#[allow(dead_code)]
mod proto;

use proto::{Tick, TicksRequest, WhoRequest};

/// Attempts per unary call: a call refused by GOAWAY is retried on the next connection.
const ATTEMPTS: usize = 5;

/// `demo.Clock/Who`, retried while it fails for a reason that says the server never
/// processed it ([`reborn::retry::safe_to_retry`]: refused by GOAWAY, or never sent).
async fn who(channel: &Channel, retries: &AtomicU64) -> Result<u32, Status> {
    let mut last = Status::unknown("no attempt");
    for _ in 0..ATTEMPTS {
        let mut grpc = Grpc::new(channel.clone());
        let answer: Result<tonic::Response<proto::Who>, Status> = async {
            grpc.ready()
                .await
                .map_err(|e| Status::from_error(e.into()))?;
            grpc.unary(
                tonic::Request::new(WhoRequest {}),
                PathAndQuery::from_static(proto::WHO),
                ProstCodec::default(),
            )
            .await
        }
        .await;
        match answer {
            Ok(who) => return Ok(who.into_inner().pid),
            Err(status) if reborn::retry::safe_to_retry(&status) => {
                retries.fetch_add(1, Ordering::Relaxed);
                last = status;
            }
            Err(status) => return Err(status),
        }
    }
    Err(last)
}

/// What the streaming client saw.
#[derive(Default)]
struct StreamLog {
    ticks: Vec<Tick>,
    /// Streams the server ended with "server restarting", and the PID that ended each.
    restarts: Vec<u32>,
    failures: Vec<String>,
}

/// Reads `demo.Clock/Ticks` stream after stream, each resuming after the last tick seen,
/// until `stop`.
async fn follow_ticks(channel: Channel, log: Arc<Mutex<StreamLog>>, stop: Arc<AtomicBool>) {
    let deadline = Instant::now() + Duration::from_secs(180);
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let from = log.lock().unwrap().ticks.last().map_or(0, |t| t.n + 1);
        let mut grpc = Grpc::new(channel.clone());
        if grpc.ready().await.is_err() {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        let call = grpc
            .server_streaming(
                tonic::Request::new(TicksRequest { from, every_ms: 10 }),
                PathAndQuery::from_static(proto::TICKS),
                ProstCodec::default(),
            )
            .await;
        let mut stream = match call {
            Ok(stream) => stream.into_inner(),
            // Refused by GOAWAY: call again, on a new connection.
            Err(status) if reborn::retry::safe_to_retry(&status) => continue,
            Err(status) => {
                log.lock().unwrap().failures.push(format!("call: {status}"));
                continue;
            }
        };
        loop {
            match stream.message().await {
                Ok(Some(tick)) => log.lock().unwrap().ticks.push(tick),
                Ok(None) => {
                    log.lock()
                        .unwrap()
                        .failures
                        .push("ended without a status".into());
                    break;
                }
                Err(status)
                    if status.code() == Code::Unavailable
                        && status.message().starts_with("server restarting") =>
                {
                    let mut log = log.lock().unwrap();
                    let pid = log.ticks.last().map_or(0, |t| t.pid);
                    log.restarts.push(pid);
                    break;
                }
                Err(status) => {
                    if !stop.load(Ordering::Relaxed) {
                        log.lock()
                            .unwrap()
                            .failures
                            .push(format!("stream: {status}"));
                    }
                    break;
                }
            }
        }
    }
}

#[test]
fn a_streaming_call_ends_at_its_moment_and_retried_unary_calls_never_fail() {
    const UPGRADES: usize = 3;
    const CALLERS: usize = 4;
    let dir = tempfile::tempdir().unwrap();
    let bin = reborn_testkit::copy_to(
        &reborn_testkit::example("reborn", "grpc"),
        dir.path(),
        "server",
    );
    let mut cmd = Command::new(&bin);
    // The drain deadline is the default, 60 s: a stream that held the old generation
    // would keep it far longer than this test waits.
    cmd.args(["127.0.0.1:0", "500"]);
    let mut first = Proc::start(cmd);
    let addr: std::net::SocketAddr = first.wait_line("the address", |l| {
        l.strip_prefix("listening on ")?.parse().ok()
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let channel = rt.block_on(async {
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap()
    });
    let stop = Arc::new(AtomicBool::new(false));
    let (retries, calls) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let seen = Arc::new(Mutex::new(BTreeSet::new()));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let ticks = Arc::new(Mutex::new(StreamLog::default()));
    let follower = rt.spawn(follow_ticks(channel.clone(), ticks.clone(), stop.clone()));
    // Unary callers on the same channel as the stream, as a real client would be.
    let callers: Vec<_> = (0..CALLERS)
        .map(|_| {
            let (channel, stop, retries, calls) = (
                channel.clone(),
                stop.clone(),
                retries.clone(),
                calls.clone(),
            );
            let (seen, failures) = (seen.clone(), failures.clone());
            rt.spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(180);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    match who(&channel, &retries).await {
                        Ok(pid) => {
                            seen.lock().unwrap().insert(pid);
                        }
                        Err(status) => failures.lock().unwrap().push(status.to_string()),
                    }
                    calls.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
        })
        .collect();
    let mut pids = vec![first.pid()];
    for upgrade in 0..UPGRADES {
        let old = *pids.last().unwrap();
        wait_for(
            "the stream to tick on the current generation",
            PATIENCE,
            || {
                let log = ticks.lock().unwrap();
                log.ticks.last().filter(|t| t.pid == old).map(|_| ())
            },
        );
        signal(old, libc::SIGHUP);
        let new = wait_for(
            "a unary call answered by the new generation",
            PATIENCE,
            || {
                seen.lock()
                    .unwrap()
                    .iter()
                    .copied()
                    .find(|p| !pids.contains(p))
            },
        );
        // Well before the drain deadline: the stream let the old generation go.
        if upgrade == 0 {
            assert_eq!(first.wait_exit(Duration::from_secs(15)), Some(0));
        } else {
            wait_for(
                "the old generation to exit",
                Duration::from_secs(15),
                || (!alive(old)).then_some(()),
            );
        }
        pids.push(new);
    }
    wait_for(
        "the stream to tick on the last generation",
        PATIENCE,
        || {
            let log = ticks.lock().unwrap();
            log.ticks
                .last()
                .filter(|t| Some(&t.pid) == pids.last())
                .map(|_| ())
        },
    );
    stop.store(true, Ordering::Relaxed);
    rt.block_on(async {
        for caller in callers {
            caller.await.unwrap();
        }
    });
    let last = *pids.last().unwrap();
    signal(last, libc::SIGTERM);
    rt.block_on(follower).unwrap();
    wait_for("the last generation to exit", PATIENCE, || {
        (!alive(last)).then_some(())
    });

    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {} unary calls failed ({} retries): {failures:?}",
        failures.len(),
        calls.load(Ordering::Relaxed),
        retries.load(Ordering::Relaxed)
    );
    let log = ticks.lock().unwrap();
    assert!(
        log.failures.is_empty(),
        "the stream failed: {:?}",
        log.failures
    );
    // Every tick once, in order, across all streams.
    for (i, tick) in log.ticks.iter().enumerate() {
        assert_eq!(tick.n, i as u64, "tick {i} of the resumed streams");
    }
    // Each old generation ended its stream at the moment, and the stream resumed on the
    // next generation.
    for old in &pids[..UPGRADES] {
        assert!(
            log.restarts.contains(old),
            "generation {old} did not end the stream (restarts by {:?})",
            log.restarts
        );
    }
    let ticked: BTreeSet<u32> = log.ticks.iter().map(|t| t.pid).collect();
    assert_eq!(
        ticked,
        pids.iter().copied().collect(),
        "generations that ticked"
    );
    eprintln!(
        "{} unary calls, {} retried; {} ticks over {} streams",
        calls.load(Ordering::Relaxed),
        retries.load(Ordering::Relaxed),
        log.ticks.len(),
        log.restarts.len() + 1
    );
}
