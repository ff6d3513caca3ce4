//! A fleet behind a load balancer: instances of bench-server, each in a network namespace
//! of its own, behind Debian's HAProxy (health checks on `/readyz`, `retries 0`), under
//! clients that never retry, through a rolling in-place upgrade (`SIGHUP`, a new binary),
//! a rolling replacement with a shutdown delay and one without. How many requests, how
//! many failed, how long each instance took and the whole roll.
//!
//! The fleet and its deploys are `reborn_testkit::fleet::Fleet`'s, the very ones the
//! fleet test (`crates/reborn/tests/fleet.rs`) asserts on: the bench measures what the
//! test checks, with the release build. Blocking threads (the testkit's), run off the
//! runtime. Traffic goes to HAProxy on 127.0.0.1 and from it to the namespaces' addresses
//! the fleet made (loopback ports without root); every step waits a bounded time.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use reborn_testkit::fleet::{Fleet, FleetOptions, FleetReport, HaproxyOptions, Startup};
use serde::Serialize;
use serde_json::json;

/// Which deploys to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Rolling in-place upgrades: a new binary and `SIGHUP`, instance after instance,
    /// `--rounds` times (probation 0: the old generation goes once the new is ready).
    InPlace,
    /// Rolling replacement, `SIGTERM` then a new instance, with `--shutdown-delay-ms`.
    ReplaceDelay,
    /// The same without a shutdown delay: what the delay saves.
    ReplaceNoDelay,
    /// The three, in that order, each on a fleet of its own.
    All,
}

impl Scenario {
    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::InPlace => "in-place",
            Scenario::ReplaceDelay => "replace-delay",
            Scenario::ReplaceNoDelay => "replace-no-delay",
            Scenario::All => "all",
        }
    }

    fn expand(self) -> Vec<Scenario> {
        match self {
            Scenario::All => vec![
                Scenario::InPlace,
                Scenario::ReplaceDelay,
                Scenario::ReplaceNoDelay,
            ],
            one => vec![one],
        }
    }
}

/// Settings of a fleet run.
#[derive(Debug, Clone)]
pub struct FleetRun {
    /// bench-server.
    pub server: PathBuf,
    /// More arguments for every instance.
    pub server_args: Vec<String>,
    /// Where each fleet's directory is made (removed at its end).
    pub dir: PathBuf,
    /// Instances, each on a host of its own.
    pub instances: usize,
    /// Rounds of the in-place upgrade.
    pub rounds: usize,
    /// The shutdown delay of `replace-delay`.
    pub shutdown_delay: Duration,
    /// Keep-alive clients.
    pub keep_alive: usize,
    /// New-connection clients.
    pub new_conn: usize,
    /// What to run.
    pub scenario: Scenario,
}

/// One scenario's outcome.
struct Done {
    scenario: Scenario,
    startup: Startup,
    report: FleetReport,
    logged_503: usize,
}

/// What a scenario must show, and whether it did (`None`: nothing to hold it to).
fn expectation(d: &Done) -> (&'static str, Option<bool>) {
    let r = &d.report;
    match d.scenario {
        Scenario::InPlace => (
            "0 failed, no server marked down, every generation answered",
            Some(r.failed == 0 && r.marked_down() == 0 && r.unanswered().is_empty()),
        ),
        Scenario::ReplaceDelay => ("0 failed", Some(r.failed == 0)),
        _ => ("failures: what the shutdown delay saves", None),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn label(cfg: &FleetRun, s: Scenario) -> String {
    match s {
        Scenario::InPlace => format!("in-place, {} rounds", cfg.rounds),
        Scenario::ReplaceDelay => format!("replace, {} ms delay", cfg.shutdown_delay.as_millis()),
        Scenario::ReplaceNoDelay => "replace, no delay".to_owned(),
        Scenario::All => "all".to_owned(),
    }
}

/// Starts a fleet for `scenario` and runs it. The testkit panics on what it cannot do
/// (an instance that does not start, HAProxy that never marks a server up): that is this
/// scenario's error, after the fleet has been taken down by its drop.
fn run_one(cfg: &FleetRun, scenario: Scenario) -> Result<Done, String> {
    let options = FleetOptions {
        hosts: cfg.instances,
        probation: (scenario == Scenario::InPlace).then_some(Duration::ZERO),
        shutdown_delay: (scenario == Scenario::ReplaceDelay).then_some(cfg.shutdown_delay),
        extra_args: cfg.server_args.clone(),
        keep_alive_clients: cfg.keep_alive,
        new_conn_clients: cfg.new_conn,
        dir: Some(cfg.dir.clone()),
        ..FleetOptions::default()
    };
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut fleet = Fleet::start(&cfg.server, options);
        let report = match scenario {
            Scenario::InPlace => fleet.roll_in_place(cfg.rounds),
            _ => fleet.roll_replace(),
        };
        Done {
            scenario,
            startup: fleet.startup().clone(),
            logged_503: fleet.logged_503().len(),
            report,
        }
    }))
    .map_err(|panic| {
        panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "the fleet panicked".to_owned())
    })
}

fn run_json(cfg: &FleetRun, d: &Done) -> serde_json::Value {
    let r = &d.report;
    let (expected, pass) = expectation(d);
    json!({
        "name": d.scenario.name(),
        "rounds": if d.scenario == Scenario::InPlace { cfg.rounds } else { 1 },
        "probation_ms": (d.scenario == Scenario::InPlace).then_some(0),
        "shutdown_delay_ms": (d.scenario == Scenario::ReplaceDelay)
            .then_some(cfg.shutdown_delay.as_millis() as u64),
        "namespaces": r.namespaces,
        "requests": r.requests,
        "failed": r.failed,
        "refused": r.refused,
        "reconnects": r.reconnects,
        "errors": r.errors.iter().take(5).collect::<Vec<_>>(),
        "haproxy_logged_503": d.logged_503,
        "per_instance_ms": r.per_instance.iter().map(|t| ms(*t)).collect::<Vec<_>>(),
        "per_instance": {
            "count": r.per_instance.len(),
            "median_ms": ms(r.median()),
            "max_ms": ms(r.max()),
        },
        "total_ms": ms(r.total),
        "downs": r.downs,
        "marked_down": r.marked_down(),
        "generations": r.generations.len(),
        "unanswered_generations": r.unanswered(),
        "replacements": r.replacements.iter().map(|p| json!({
            "down_ms": ms(p.down),
            "exited_ms": ms(p.exited),
            "up_ms": ms(p.up),
            "total_ms": ms(p.total),
        })).collect::<Vec<_>>(),
        "startup_ms": {
            "server_copied": ms(d.startup.prepared),
            "hosts": ms(d.startup.hosts),
            "instances": ms(d.startup.instances),
            "total": ms(d.startup.total),
        },
        "expected": expected,
        "pass": pass,
    })
}

/// Runs the scenarios, one after the other; returns the JSON report and a readable text.
pub async fn run(
    cfg: FleetRun,
) -> Result<(serde_json::Value, String), Box<dyn std::error::Error + Send + Sync>> {
    if !cfg.server.is_file() {
        return Err(format!(
            "{}: no such server (build it: cargo build --release -p reborn-bench)",
            cfg.server.display()
        )
        .into());
    }
    if reborn_testkit::fleet::haproxy_path().is_none() {
        return Err("haproxy is not installed (Debian/Ubuntu: apt-get install haproxy)".into());
    }
    if cfg.keep_alive + cfg.new_conn == 0 {
        return Err("no clients: give --keep-alive or --new-conn at least 1".into());
    }
    let c = cfg.clone();
    let outcomes = tokio::task::spawn_blocking(move || {
        c.scenario
            .expand()
            .into_iter()
            .map(|s| (s, run_one(&c, s)))
            .collect::<Vec<_>>()
    })
    .await?;
    Ok(render(&cfg, &outcomes))
}

fn render(
    cfg: &FleetRun,
    outcomes: &[(Scenario, Result<Done, String>)],
) -> (serde_json::Value, String) {
    let h = HaproxyOptions::default();
    let namespaces = outcomes
        .iter()
        .find_map(|(_, o)| o.as_ref().ok().map(|d| d.report.namespaces));
    let mut runs = Vec::new();
    let mut errors = Vec::new();
    let mut pass = true;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "fleet: {} instances of {} ({}) behind haproxy (GET {} every {} ms, fall {}, rise {}, \
         retries 0), {} keep-alive + {} new-connection clients that never retry",
        cfg.instances,
        cfg.server.display(),
        match namespaces {
            Some(true) => "each in a network namespace",
            Some(false) => "loopback ports: no network namespaces",
            None => "not started",
        },
        h.check_path,
        h.inter.as_millis(),
        h.fall,
        h.rise,
        cfg.keep_alive,
        cfg.new_conn,
    );
    let _ = writeln!(
        o,
        "{:<22} {:>9} {:>9} {:>7} {:>8} {:>7} {:>24} {:>8}  expected",
        "scenario",
        "instances",
        "requests",
        "failed",
        "refused",
        "downs",
        "per instance med/max ms",
        "total s"
    );
    let mut notes = String::new();
    for (s, outcome) in outcomes {
        match outcome {
            Ok(d) => {
                let r = &d.report;
                let (expected, ok) = expectation(d);
                pass &= ok.unwrap_or(true);
                let _ = writeln!(
                    o,
                    "{:<22} {:>9} {:>9} {:>7} {:>8} {:>7} {:>24} {:>8.2}  {expected}{}",
                    label(cfg, *s),
                    r.per_instance.len(),
                    r.requests,
                    r.failed,
                    r.refused,
                    r.marked_down(),
                    format!("{:.1} / {:.1}", ms(r.median()), ms(r.max())),
                    r.total.as_secs_f64(),
                    match ok {
                        Some(true) => ": PASS",
                        Some(false) => ": FAIL",
                        None => "",
                    }
                );
                let _ = writeln!(notes, "  {}: {}", s.name(), d.startup);
                if !r.replacements.is_empty() {
                    let parts: Vec<String> = r
                        .replacements
                        .iter()
                        .map(|p| {
                            format!(
                                "down {:.0} / exited {:.0} / up {:.0} / answered {:.0}",
                                ms(p.down),
                                ms(p.exited),
                                ms(p.up),
                                ms(p.total)
                            )
                        })
                        .collect();
                    let _ = writeln!(
                        notes,
                        "  {}: ms after SIGTERM, per instance: {}",
                        s.name(),
                        parts.join("; ")
                    );
                }
                if let Some(e) = r.errors.first() {
                    let _ = writeln!(
                        notes,
                        "  {}: first error: {}; haproxy logged {} answered 503",
                        s.name(),
                        e.lines().next().unwrap_or_default(),
                        d.logged_503
                    );
                }
                runs.push(run_json(cfg, d));
            }
            Err(e) => {
                pass = false;
                let _ = writeln!(o, "{:<22} error: {e}", label(cfg, *s));
                errors.push(json!({ "name": s.name(), "error": e }));
            }
        }
    }
    o.push_str(&notes);
    let _ = writeln!(o, "{}", if pass { "PASS" } else { "FAIL" });
    let report = json!({
        "scenario": "fleet",
        "machine": crate::sys::machine(),
        "server": cfg.server.display().to_string(),
        "server_args": cfg.server_args,
        "instances": cfg.instances,
        "namespaces": namespaces,
        "clients": { "keep_alive": cfg.keep_alive, "new_conn": cfg.new_conn },
        "haproxy": {
            "check": format!("GET {}", h.check_path),
            "inter_ms": h.inter.as_millis() as u64,
            "fall": h.fall,
            "rise": h.rise,
            "check_timeout_ms": h.check_timeout.as_millis() as u64,
            "balance": "roundrobin",
            "retries": 0,
        },
        "runs": runs,
        "errors": errors,
        "pass": pass,
    });
    (report, o)
}
