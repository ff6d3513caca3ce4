//! The README, as a newcomer follows it: the demo's walkthrough step by step and in its
//! order, on the binary cargo writes, the "API in a few lines" as written there, and the
//! message a port in use gets.
//!
//! The walkthrough edits the demo's source and rebuilds it, as the reader does. So as
//! not to touch this repository while other tests run, it does so in a copy of the
//! `reborn` package (its own workspace, the same `Cargo.lock`), built into the same
//! target directory, which shares every compiled dependency. The copy's example is
//! named `ping-walkthrough`, so that its binary does not replace the real `ping`.

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use reborn_testkit::{PATIENCE, Proc, alive, signal, wait_for};

const EXAMPLE: &str = "ping-walkthrough";

/// Copies `from` into `to`, recursively.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// A workspace of its own holding a copy of the `reborn` package with only the demo as
/// an example; returns its directory and the demo's source.
fn copy_of_the_package(dir: &Path) -> (PathBuf, PathBuf) {
    let package = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = package.join("../..");
    let testkit = root.join("crates/reborn-testkit").canonicalize().unwrap();
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let mut workspace = String::new();
    for line in manifest.lines() {
        let line = if line.starts_with("members = ") {
            "members = [\"reborn\"]".to_owned()
        } else if line.starts_with("reborn = { path = ") {
            "reborn = { path = \"reborn\" }".to_owned()
        } else if line.starts_with("reborn-testkit = { path = ") {
            format!(
                "reborn-testkit = {{ path = {:?} }}",
                testkit.display().to_string()
            )
        } else if line.starts_with("exclude = ") || line.starts_with("[profile.release.package.") {
            // Neither the fuzz workspace nor the CLI's profile is here.
            "# (not in this copy)".to_owned()
        } else if line.starts_with("opt-level = \"s\"") {
            "# (not in this copy)".to_owned()
        } else {
            line.to_owned()
        };
        workspace.push_str(&line);
        workspace.push('\n');
    }
    let ws = dir.join("ws");
    std::fs::create_dir_all(ws.join("reborn/examples")).unwrap();
    std::fs::write(ws.join("Cargo.toml"), workspace).unwrap();
    std::fs::copy(root.join("Cargo.lock"), ws.join("Cargo.lock")).unwrap();
    std::fs::copy(package.join("Cargo.toml"), ws.join("reborn/Cargo.toml")).unwrap();
    copy_tree(&package.join("src"), &ws.join("reborn/src"));
    let source = ws.join(format!("reborn/examples/{EXAMPLE}.rs"));
    std::fs::copy(package.join("examples/ping.rs"), &source).unwrap();
    (ws, source)
}

/// `cargo build --example ping-walkthrough` in the copy, into the shared target directory;
/// returns the binary cargo writes.
fn cargo_build(ws: &Path) -> PathBuf {
    let profile = reborn_testkit::target_dir();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args(["build", "--quiet", "--offline", "--example", EXAMPLE])
        .current_dir(ws)
        .env("CARGO_TARGET_DIR", profile.parent().unwrap())
        .output()
        .expect("cargo runs");
    assert!(
        out.status.success(),
        "cargo build --example {EXAMPLE} in the copy failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    profile.join("examples").join(EXAMPLE)
}

/// The line without its terminal colours.
fn plain(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The sockets a process holds: its listener, plus one per accepted connection.
fn sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|l| l.to_string_lossy().starts_with("socket:"))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn the_demo_walkthrough_works_as_the_readme_says_in_its_order() {
    let dir = tempfile::tempdir().unwrap();
    let (ws, source) = copy_of_the_package(dir.path());
    let bin = cargo_build(&ws);

    // 1. Start the server: it prints its PID, then says it is ready.
    let mut cmd = Command::new(&bin);
    cmd.args(["--addr", "127.0.0.1:0"]);
    let mut old = Proc::start(cmd);
    let pid: u32 = old.wait_line("the [pid] line", |l| l.strip_prefix("[pid] ")?.parse().ok());
    assert_eq!(pid, old.pid());
    let addr: SocketAddr = old.wait_line("the ready line", |l| {
        let l = plain(l);
        let (_, rest) = l.split_once("ready: serving on ")?;
        rest.split_whitespace().next()?.parse().ok()
    });

    // 2. Change "pong" to "pong1" in the example's source, and rebuild.
    let code = std::fs::read_to_string(&source).unwrap();
    assert!(code.contains("\"pong\""), "the demo answers \"pong\"");
    std::fs::write(&source, code.replace("\"pong\"", "\"pong1\"")).unwrap();
    assert_eq!(cargo_build(&ws), bin);

    // 3. A slow request, accepted by the running process.
    let before = sockets(pid);
    let pending = std::thread::spawn(move || reborn_testkit::get(addr, "/ping"));
    wait_for("the old process to accept the request", PATIENCE, || {
        (sockets(pid) > before).then_some(())
    });
    let sent = Instant::now();

    // 4. Within its 5 seconds: kill -HUP <pid>.
    signal(pid, libc::SIGHUP);
    let new: u32 = old.wait_line("the new process's [pid] line", |l| {
        l.strip_prefix("[pid] ")?.parse().ok().filter(|p| *p != pid)
    });
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "the upgrade came within the request's 5 seconds"
    );

    // 5. The pending request: the old answer. The next: the new one.
    let answer = pending
        .join()
        .unwrap()
        .expect("the pending request is answered");
    assert_eq!(
        (answer.status, answer.body.as_str()),
        (200, r#"{"message":"pong"}"#)
    );
    let next = reborn_testkit::get(addr, "/ping").expect("the next request");
    assert_eq!(
        (next.status, next.body.as_str()),
        (200, r#"{"message":"pong1"}"#)
    );

    // 6. The old process exits once drained (cargo run would return to the prompt); the
    // new one serves on, and stops by its PID.
    assert_eq!(old.wait_exit(PATIENCE), Some(0), "{}", old.output());
    assert!(
        alive(new),
        "the new process serves on after the old one exited"
    );
    signal(new, libc::SIGTERM);
    wait_for("the new process to stop", PATIENCE, || {
        (!alive(new)).then_some(())
    });
}

/// Runs `cmd` (a server told to listen on `addr`, which is taken) and checks that it
/// prints the message, once, and exits with code 1.
fn assert_port_in_use_message(mut cmd: Command, addr: SocketAddr) {
    let out = cmd.stdin(std::process::Stdio::null()).output().unwrap();
    let mut stderr = String::new();
    out.stderr.as_slice().read_to_string(&mut stderr).unwrap();
    assert_eq!(
        stderr,
        format!(
            "Error: cannot listen on {addr}: the address is already in use; another process \
             listens there (see `ss -ltnp` for TCP, `ss -lxp` for Unix sockets), stop it or \
             choose another address\n"
        )
    );
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn a_port_in_use_gets_the_message_not_a_struct() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let mut cmd = Command::new(reborn_testkit::example("reborn", "ping"));
    cmd.args(["--addr", &addr.to_string()]);
    assert_port_in_use_message(cmd, addr);
}

/// Starts the README's few lines (`examples/hello.rs`, a copy in `dir`) on an ephemeral
/// port chosen here: the code prints nothing to learn its address from. Another process
/// may take the port in between; then another one is tried.
fn start_hello(dir: &Path) -> (Proc, SocketAddr) {
    let bin = reborn_testkit::copy_to(&reborn_testkit::example("reborn", "hello"), dir, "hello");
    for _ in 0..5 {
        let addr: SocketAddr = format!("127.0.0.1:{}", reborn_testkit::free_port())
            .parse()
            .unwrap();
        let mut cmd = Command::new(&bin);
        cmd.env("ADDR", addr.to_string());
        let proc = Proc::start(cmd);
        let pid = proc.pid();
        let up = reborn_testkit::poll_until(PATIENCE, || {
            if !alive(pid) {
                return Some(false);
            }
            let r = reborn_testkit::get(addr, "/ping").ok()?;
            (r.body == format!("pong pid={pid}")).then_some(true)
        });
        match up {
            Some(true) => return (proc, addr),
            Some(false) if proc.output().contains("already in use") => continue,
            _ => panic!("the README's server did not start:\n{}", proc.output()),
        }
    }
    panic!("five ephemeral ports were taken before the server could listen");
}

/// The README's "API in a few lines", as written (`#[tokio::main]`, `reborn::serve`, no
/// logging set up): `kill -HUP` while a request is in flight starts the binary on disk;
/// the old process answers the request it accepted, the next answer is the new
/// process's, and nothing is printed but the application's own line. `SIGTERM` stops it.
#[test]
fn the_readmes_few_lines_upgrade_and_stop() {
    let dir = tempfile::tempdir().unwrap();
    let (mut old, addr) = start_hello(dir.path());
    let pid = old.pid();
    let pending = std::thread::spawn(move || reborn_testkit::get(addr, "/slow"));
    old.wait_line("the slow request", |l| {
        (l == "slow request started").then_some(())
    });
    reborn_testkit::replace_with_variant(
        &dir.path().join("hello"),
        &reborn_testkit::example("reborn", "hello"),
        b"v2",
    );
    signal(pid, libc::SIGHUP);
    let new = wait_for("an answer from the new process", PATIENCE, || {
        let r = reborn_testkit::get(addr, "/ping").ok()?;
        let answered_by: u32 = r.body.strip_prefix("pong pid=")?.parse().ok()?;
        (answered_by != pid).then_some(answered_by)
    });
    let answer = pending
        .join()
        .unwrap()
        .expect("the request in flight is answered");
    assert_eq!(
        (answer.status, answer.body),
        (200, format!("pong pid={pid}"))
    );
    assert_eq!(old.wait_exit(PATIENCE), Some(0), "{}", old.output());
    assert_eq!(
        old.output().trim(),
        "slow request started",
        "{}",
        old.output()
    );
    signal(new, libc::SIGTERM);
    wait_for("the new process to stop", PATIENCE, || {
        (!alive(new)).then_some(())
    });
}

/// The same few lines on an address in use: the message, once, and exit code 1.
#[test]
fn the_readmes_few_lines_on_a_port_in_use_say_so_once() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let mut cmd = Command::new(reborn_testkit::example("reborn", "hello"));
    cmd.env("ADDR", addr.to_string());
    assert_port_in_use_message(cmd, addr);
}
