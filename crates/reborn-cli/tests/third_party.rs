//! Workers no one here wrote: gunicorn (socket activation with a strict LISTEN_PID check,
//! READY=1 on NOTIFY_SOCKET) upgraded under load with no failed request, and a shell
//! script that reports readiness with Debian's `systemd-notify --ready`.

mod common;

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::Command;

use common::{Master, require_tool, tempdir};
use reborn_testkit::Load;
use reborn_testkit::{PATIENCE, alive, replace_with_script, wait_for};

/// The Python interpreter that has gunicorn, resolved to its real path (not a shim, so
/// that the process started is the one that reads LISTEN_PID).
fn python_with_gunicorn() -> PathBuf {
    let python = require_tool("python3", "apt-get install -y python3");
    let out = Command::new(python)
        .args(["-c", "import gunicorn, sys; print(sys.executable)"])
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "this test needs gunicorn: install it with `python3 -m pip install gunicorn`"
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

const APP: &str = r#"
import os
VERSION = open(os.path.join(os.path.dirname(__file__), "VERSION")).read().strip()

def app(environ, start_response):
    body = ("pong %s pid=%d" % (VERSION, os.getpid())).encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]
"#;

#[test]
fn gunicorn_upgrades_under_load() {
    let python = python_with_gunicorn();
    let dir = tempdir();
    std::fs::write(dir.path().join("app.py"), APP).unwrap();
    std::fs::write(dir.path().join("VERSION"), "v1").unwrap();
    let chdir = dir.path().to_str().unwrap().to_owned();
    let master = Master::start(
        dir.path(),
        &["--drain-timeout", "60s"],
        &[
            python.as_os_str(),
            OsStr::new("-m"),
            OsStr::new("gunicorn"),
            OsStr::new("--chdir"),
            OsStr::new(&chdir),
            OsStr::new("--workers"),
            OsStr::new("2"),
            OsStr::new("--graceful-timeout"),
            OsStr::new("15"),
            OsStr::new("app:app"),
        ],
    );
    let first = master.wait_serving();
    let r = wait_for("gunicorn to answer", PATIENCE, || {
        reborn_testkit::get(master.addr, "/").ok()
    });
    assert!(r.body.starts_with("pong v1"), "{r:?}");
    let load = Load::start(master.addr, "/ping", 3, 1);
    load.wait_progress(30);
    for v in 2..=4 {
        std::fs::write(dir.path().join("VERSION"), format!("v{v}")).unwrap();
        let (ok, text) = master.upgrade();
        assert!(
            ok,
            "gunicorn upgrade to v{v}: {text}\n{}",
            master.proc.output()
        );
        wait_for("the new gunicorn to answer", PATIENCE, || {
            let r = reborn_testkit::get(master.addr, "/").ok()?;
            r.body.starts_with(&format!("pong v{v}")).then_some(())
        });
        load.wait_progress(30);
    }
    let answered = load.finish_without_failures().ok;
    wait_for("the first gunicorn to drain and exit", PATIENCE, || {
        (!alive(first)).then_some(())
    });
    eprintln!("gunicorn: 3 upgrades under load, {answered} requests, 0 failed");
}

#[test]
fn systemd_notify_reports_readiness() {
    let notify = require_tool("systemd-notify", "apt-get install -y systemd");
    let dir = tempdir();
    let script = dir.path().join("worker.sh");
    replace_with_script(
        &script,
        &format!(
            "#!/bin/sh\ntrap 'exit 0' TERM\nsleep 0.3\n{n} --ready --status=\"warmed up\"\n\
             echo $? > \"{rc}.$$\"\nwhile :; do sleep 0.05; done\n",
            n = notify.display(),
            rc = dir.path().join("notify-rc").display(),
        ),
    );
    let master = Master::start(
        dir.path(),
        &["--ready-timeout", "20s"],
        &[script.as_os_str()],
    );
    let first = master.wait_serving();
    assert_eq!(master.status()["workers"][0]["status"], "warmed up");
    let (ok, text) = master.upgrade();
    assert!(ok, "{text}");
    assert!(text.contains("generation 2"), "{text}");
    wait_for("the old worker to stop", PATIENCE, || {
        (!alive(first)).then_some(())
    });
    // systemd-notify (252) follows READY=1 with BARRIER=1, which carries a pipe's write
    // end and waits until the master closes it: read, closed, no warning, exit 0.
    for pid in [first, master.wait_serving()] {
        let rc = dir.path().join(format!("notify-rc.{pid}"));
        let rc = wait_for("systemd-notify to return", PATIENCE, || {
            std::fs::read_to_string(&rc)
                .ok()
                .filter(|s| s.ends_with('\n'))
        });
        assert_eq!(rc.trim(), "0", "systemd-notify in worker {pid}");
    }
    let output = master.proc.output();
    assert!(
        !output.contains("notify socket"),
        "no warning about the notify socket:\n{output}"
    );
}

/// The documented Python example (docs/examples/master/server.py, standard library
/// only) runs under the master and is upgraded under keep-alive load with no failed
/// request.
#[test]
fn documented_python_server_upgrades_under_load() {
    let python = require_tool("python3", "apt-get install -y python3");
    let server =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/examples/master/server.py");
    assert!(server.is_file(), "{} exists", server.display());
    let dir = tempdir();
    // A drain deadline beyond the test's patience: an old generation that does not
    // drain by itself fails the test rather than being killed in time.
    let master = Master::start(
        dir.path(),
        &["--drain-timeout", "60s"],
        &[python.as_os_str(), server.as_os_str()],
    );
    let first = master.wait_serving();
    let r = reborn_testkit::get(master.addr, "/").unwrap();
    assert_eq!(r.body.trim(), format!("hello from pid {first}"));
    let load = Load::start(master.addr, "/ping", 3, 1);
    load.wait_progress(30);
    let mut last = first;
    for _ in 0..3 {
        let (ok, text) = master.upgrade();
        assert!(ok, "{text}\n{}", master.proc.output());
        let now = master.wait_serving();
        assert_ne!(now, last);
        last = now;
        load.wait_progress(30);
    }
    load.finish_without_failures();
    wait_for("the first generation to drain and exit", PATIENCE, || {
        (!alive(first)).then_some(())
    });
    assert!(
        !master
            .proc
            .output()
            .contains("did not exit within the drain timeout"),
        "every generation drained by itself"
    );
}
