//! A short run of the real binaries: a few self-upgrades under keep-alive and
//! new-connection load, asserting that no request failed and that the JSON report says so.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

fn run_bench(args: &[&str], json: &Path) -> serde_json::Value {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_reborn-bench"))
        .arg("restart")
        .arg("--server")
        .arg(env!("CARGO_BIN_EXE_bench-server"))
        .arg("--json")
        .arg(json)
        // Bounded: the bench stops itself after this, whatever is left.
        .args(["--max-time-s", "50"])
        .args(args)
        .output()
        .expect("reborn-bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "reborn-bench failed ({:?}):\n{stdout}\n{stderr}",
        out.status
    );
    eprintln!("{stdout}(took {:?})", started.elapsed());
    let text = std::fs::read_to_string(json).expect("the JSON report was written");
    serde_json::from_str(&text).expect("the JSON report parses")
}

fn check(report: &serde_json::Value, restarts: u64) {
    let req = &report["requests"];
    assert!(
        req["total"].as_u64().unwrap() > 0,
        "no request was sent: {report:#}"
    );
    assert_eq!(
        req["failed"].as_u64(),
        Some(0),
        "failed requests: {:#}",
        req
    );
    assert_eq!(req["counts"]["ok"], req["total"]);
    assert_eq!(
        report["restarts_done"].as_u64(),
        Some(restarts),
        "restarts: {:#}",
        report["restarts"]
    );
    let slow = &report["slow_requests"];
    assert_eq!(slow["failed"].as_u64(), Some(0), "slow requests: {slow:#}");
    assert_eq!(
        slow["answered_by_old_generation"], slow["sent"],
        "slow requests: {slow:#}"
    );
    // Every restart has a handoff, and each old generation exited.
    for r in report["restarts"].as_array().unwrap() {
        assert!(
            r["handoff_ms"].as_f64().is_some(),
            "restart without handoff: {r:#}"
        );
        assert!(
            r["drain_ms"].as_f64().is_some(),
            "old generation did not exit: {r:#}"
        );
        assert_ne!(r["old_pid"], r["new_pid"]);
    }
    assert_eq!(report["generations_seen"].as_u64(), Some(restarts + 1));
    // No generation but the serving one is left at the end.
    let end = report["processes_at_end"].as_array().unwrap();
    assert_eq!(
        end.iter().filter(|p| p["alive"] == true).count(),
        1,
        "{end:#?}"
    );
}

fn smoke(mode: &str, clients: &str, extra: &[&str]) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let restarts = 3;
    let restarts_arg = restarts.to_string();
    let mut args = vec![
        "--path",
        "self",
        "--mode",
        mode,
        "-c",
        clients,
        "--restarts",
        &restarts_arg,
        "--interval-ms",
        "300",
        "--warmup-ms",
        "300",
        "--cooldown-ms",
        "200",
        "--slow-per-restart",
        "1",
        "--slow-ms",
        "400",
        "--step-timeout-ms",
        "20000",
        "--timeout-ms",
        "20000",
    ];
    args.extend_from_slice(extra);
    let report = run_bench(&args, &json);
    assert_eq!(report["mode"], mode);
    check(&report, restarts);
    report
}

#[test]
fn self_upgrade_keepalive_loses_nothing() {
    smoke("keepalive", "8", &[]);
}

#[test]
fn self_upgrade_new_connections_lose_nothing() {
    smoke("newconn", "8", &[]);
}

#[test]
fn self_upgrade_h2_loses_nothing() {
    smoke("h2", "8", &[]);
}

/// `--rate` paces the clients: no more requests than the rate allows over the run
/// (the pacing thread hands out one turn per 1/rate s, plus at most one banked per
/// client), and they do get through (unpaced, 4 clients send thousands per second).
#[test]
fn paced_clients_keep_to_the_rate() {
    let rate = 400.0;
    let report = smoke("newconn", "4", &["--rate", "400"]);
    let total = report["requests"]["total"].as_u64().unwrap() as f64;
    let seconds = report["load_seconds"].as_f64().unwrap();
    // 5 % for the edges of the measured interval.
    let allowed = rate * seconds * 1.05 + 4.0 + 1.0;
    assert!(
        total <= allowed,
        "{total} requests in {seconds:.2} s at {rate} req/s (at most {allowed:.0})"
    );
    assert!(
        total >= rate * seconds * 0.25,
        "{total} requests in {seconds:.2} s at {rate} req/s: the clients barely ran"
    );
}

#[test]
fn help_describes_the_subcommands() {
    let out = Command::new(env!("CARGO_BIN_EXE_reborn-bench"))
        .arg("--help")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for word in ["restart", "steady", "idle", "websocket", "fleet"] {
        assert!(text.contains(word), "{text}");
    }
}

#[test]
fn websocket_clients_get_1012_and_reconnect_to_the_new_generation() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("ws.json");
    let out = Command::new(env!("CARGO_BIN_EXE_reborn-bench"))
        .args(["websocket", "--server", env!("CARGO_BIN_EXE_bench-server")])
        .args(["--clients", "100", "--upgrades", "2", "--window-ms", "500"])
        .args(["--probation-ms", "200", "--load", "2", "--rate", "200"])
        .arg("--json")
        .arg(&json)
        .output()
        .expect("reborn-bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let upgrades = report["upgrades"].as_array().expect("per-upgrade results");
    assert_eq!(upgrades.len(), 2, "{stdout}");
    for u in upgrades {
        assert_eq!(u["closes_1012"], 100, "{stdout}");
        assert_eq!(u["abnormal"], 0, "{stdout}");
        assert_eq!(u["reconnected"], 100, "{stdout}");
        // Spread over the window, not all at once.
        let spread = &u["close_ms_after_commit"];
        let span = spread["max_ms"].as_f64().unwrap() - spread["min_ms"].as_f64().unwrap();
        assert!(span >= 250.0, "closes spread over {span} ms: {stdout}");
    }
    assert_eq!(report["pass"], true, "{stdout}");
}
