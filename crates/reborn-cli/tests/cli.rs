//! The command line as a user meets it: `--help` for every subcommand reads like a man
//! page, and each mistake (bad flag, bad address, bad duration or signal, missing
//! program, port in use, no master running) gets one precise error.

mod common;

use std::process::{Command, Output};

use common::{bench_server, reborn, tempdir};

fn run(args: &[&str]) -> Output {
    Command::new(reborn())
        .args(args)
        .env_remove("XDG_RUNTIME_DIR")
        .output()
        .expect("run reborn")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// One `error:` line (clap adds a usage hint after a blank line).
fn assert_one_error(out: &Output, code: i32, needles: &[&str]) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(code), "{err}");
    assert_eq!(err.matches("error:").count(), 1, "one error: {err}");
    for n in needles {
        assert!(err.contains(n), "{n:?} in {err}");
    }
}

#[test]
fn help_for_every_subcommand() {
    let top = run(&["--help"]);
    assert!(top.status.success());
    let text = String::from_utf8_lossy(&top.stdout);
    for needle in [
        "keeps its PID",
        "run",
        "upgrade",
        "status",
        "stop",
        "Examples:",
    ] {
        assert!(
            text.contains(needle),
            "{needle:?} in top-level help:\n{text}"
        );
    }
    let expect: [(&str, &[&str]); 4] = [
        (
            "run",
            &[
                "reborn run [--listen NAME=ADDR]... [OPTIONS] -- PROGRAM [ARGS]...",
                "--listen",
                "--ready",
                "--stop-signal",
                "--drain-timeout",
                "--pid-file",
                "LISTEN_PID",
                "SIGHUP",
                "Examples:",
                "Exit status:",
            ],
        ),
        ("upgrade", &["--name", "--control", "exits 1", "Example:"]),
        ("status", &["--json", "generation", "Example:"]),
        ("stop", &["SIGTERM", "Example:"]),
    ];
    for (sub, needles) in expect {
        let out = run(&[sub, "--help"]);
        assert!(out.status.success(), "{sub} --help");
        let text = String::from_utf8_lossy(&out.stdout);
        for n in needles {
            assert!(text.contains(n), "{n:?} in `reborn {sub} --help`:\n{text}");
        }
        let short = run(&["help", sub]);
        assert!(short.status.success(), "reborn help {sub}");
    }
}

#[test]
fn bad_flags_and_values() {
    assert_one_error(&run(&["run", "--bogus", "--", "x"]), 2, &["--bogus"]);
    assert_one_error(&run(&["frobnicate"]), 2, &["frobnicate"]);
    assert_one_error(
        &run(&["run", "--listen", "http=127.0.0.1", "--", "x"]),
        2,
        &[
            "\"127.0.0.1\" is not a listen address",
            "no port",
            "HOST:PORT",
        ],
    );
    assert_one_error(
        &run(&["run", "--listen", "http=localhost:99999", "--", "x"]),
        2,
        &["99999"],
    );
    assert_one_error(
        &run(&["run", "--listen", "a:b=127.0.0.1:0", "--", "x"]),
        2,
        &["not a valid socket name"],
    );
    assert_one_error(
        &run(&["run", "--drain-timeout", "10 parsecs", "--", "x"]),
        2,
        &["unknown unit", "ms, s, m or h"],
    );
    assert_one_error(
        &run(&["run", "--stop-signal", "SIGNOPE", "--", "x"]),
        2,
        &["\"SIGNOPE\" is not a signal"],
    );
    assert_one_error(
        &run(&["run", "--stop-signal", "KILL", "--", "x"]),
        2,
        &["cannot be the stop signal"],
    );
    assert_one_error(
        &run(&["run", "--ready", "ping", "--", "x"]),
        2,
        &["not a readiness mode", "notify"],
    );
    assert_one_error(&run(&["run", "--listen", "127.0.0.1:0"]), 2, &["PROGRAM"]);
    assert_one_error(
        &run(&["run", "--backoff-max", "0", "--", "/bin/true"]),
        1,
        &["at least 100ms"],
    );
    assert_one_error(
        &run(&["status", "--name", "../etc"]),
        2,
        &["becomes a file name"],
    );
}

#[test]
fn missing_program_is_named() {
    let dir = tempdir();
    let ctl = dir.path().join("c.sock");
    let out = run(&["run", "--control", ctl.to_str().unwrap(), "--", "./nope"]);
    assert_one_error(
        &out,
        1,
        &[
            "cannot run ./nope: no such file",
            "relative paths start from",
        ],
    );
    let out = run(&[
        "run",
        "--control",
        ctl.to_str().unwrap(),
        "--",
        "no-such-command-xyz",
    ]);
    assert_one_error(
        &out,
        1,
        &["\"no-such-command-xyz\"", "no such command in PATH"],
    );
    let script = dir.path().join("not-executable");
    std::fs::write(&script, "#!/bin/sh\n").unwrap();
    let out = run(&[
        "run",
        "--control",
        ctl.to_str().unwrap(),
        "--",
        script.to_str().unwrap(),
    ]);
    assert_one_error(&out, 1, &["is not executable", "chmod +x"]);
}

#[test]
fn port_in_use_is_named() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempdir();
    let ctl = dir.path().join("c.sock");
    let bench = bench_server();
    let out = run(&[
        "run",
        "--listen",
        &format!("http={addr}"),
        "--control",
        ctl.to_str().unwrap(),
        "--",
        bench.to_str().unwrap(),
    ]);
    assert_one_error(&out, 1, &[&addr, "already in use"]);
}

#[test]
fn probe_on_a_shared_listener_is_refused() {
    let out = run(&[
        "run",
        "--listen",
        "http=127.0.0.1:8089",
        "--ready",
        "tcp:127.0.0.1:8089",
        "--",
        "/bin/true",
    ]);
    assert_one_error(&out, 1, &["proves nothing", "health address"]);
}

#[test]
fn clients_without_a_master() {
    let dir = tempdir();
    let ctl = dir.path().join("none.sock");
    for sub in ["upgrade", "status", "stop"] {
        let out = run(&[sub, "--control", ctl.to_str().unwrap()]);
        assert_one_error(
            &out,
            1,
            &["cannot reach the reborn master", "is `reborn run` running?"],
        );
    }
}
