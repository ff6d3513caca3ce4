//! The master as PID 1, as in a container (a new PID namespace made with util-linux's
//! `unshare`): it serves and upgrades, reaps the orphans a worker leaves (no zombies),
//! and stops gracefully on SIGTERM (what `docker stop` sends).

mod common;

use std::process::Command;

use common::{bench_server, ping, reborn, require_tool, tempdir};
use reborn_testkit::{PATIENCE, Proc, wait_for};

fn zombies_under(pid: u32) -> usize {
    let mut n = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let text = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        for p in text.split_whitespace() {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            if stat
                .rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
            {
                n += 1;
            }
        }
    }
    n
}

#[test]
fn master_as_pid_1() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: a new PID namespace needs root");
        return;
    }
    let unshare = require_tool("unshare", "apt-get install -y util-linux");
    let dir = tempdir();
    let control = dir.path().join("ctl.sock");
    // A worker that leaves orphans behind at every start, then serves.
    let wrapper = dir.path().join("app.sh");
    reborn_testkit::replace_with_script(
        &wrapper,
        &format!(
            "#!/bin/sh\nfor i in 1 2 3; do (sleep 0.2 &) ; done\nexec {} --addr 127.0.0.1:0\n",
            bench_server().display()
        ),
    );
    let mut cmd = Command::new(unshare);
    cmd.args(["--pid", "--fork", "--kill-child"])
        .arg(reborn())
        .args(["run", "--listen", "http=127.0.0.1:0", "--control"])
        .arg(&control)
        .arg("--")
        .arg(&wrapper);
    let mut outer = Proc::start(cmd);
    let addr: std::net::SocketAddr = outer.wait_line("the listening address", |l| {
        l.split("listening on http=").nth(1)?.trim().parse().ok()
    });
    let status = || -> serde_json::Value {
        let out = Command::new(reborn())
            .args(["status", "--json", "--control"])
            .arg(&control)
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    };
    wait_for("a serving worker", PATIENCE, || {
        (status()["state"] == "serving").then_some(())
    });
    assert_eq!(
        status()["master_pid"],
        1,
        "the master is PID 1 in its namespace"
    );
    // `/proc` here is the host's (no --mount-proc): the worker's PID 2 there is another
    // process (kthreadd on most machines), which must not be taken for the worker when
    // the master checks that its listeners are in use.
    assert_eq!(
        status()["warnings"],
        serde_json::json!([]),
        "no false 'does not use the listener' warning"
    );
    let master = wait_for("the master's host PID", PATIENCE, || {
        reborn_testkit::children(outer.pid()).first().copied()
    });
    ping(addr);

    let out = Command::new(reborn())
        .args(["upgrade", "--control"])
        .arg(&control)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(status()["generation"], 2);
    ping(addr);
    // The orphans of both generations are gone, and no zombie is left.
    wait_for("no zombie under PID 1", PATIENCE, || {
        let kids = reborn_testkit::children(master).len();
        (zombies_under(master) == 0 && kids == 1).then_some(())
    });

    reborn_testkit::signal(master, libc::SIGTERM);
    assert_eq!(outer.wait_exit(PATIENCE), Some(0), "{}", outer.output());
    assert!(common::refused(addr));
}
