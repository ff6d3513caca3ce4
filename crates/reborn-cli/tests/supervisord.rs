//! Under real supervisord: `reborn run -- <reborn demo server>` is upgraded ten times
//! under continuous load; supervisord shows the same PID RUNNING throughout and no
//! request fails. (Go's endless breaks here: its PID changes at each restart, supervisord
//! believes the program died and starts it again.)

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{bench_server, parse_pong, reborn, require_tool, tempdir};
use reborn_testkit::Load;
use reborn_testkit::{PATIENCE, Proc, alive, copy_to, replace_with_variant, wait_for};

struct Supervisord {
    proc: Proc,
    conf: PathBuf,
    dir: PathBuf,
}

impl Supervisord {
    fn ctl(&self, args: &[&str]) -> String {
        let out = Command::new("supervisorctl")
            .arg("-c")
            .arg(&self.conf)
            .args(args)
            .output()
            .expect("run supervisorctl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `(state, pid)` of the program, from `supervisorctl status`.
    fn program(&self) -> (String, Option<u32>) {
        let text = self.ctl(&["status", "app"]);
        let mut words = text.split_whitespace();
        let _name = words.next();
        let state = words.next().unwrap_or("?").to_owned();
        let pid = text
            .split("pid ")
            .nth(1)
            .and_then(|r| r.split(',').next())
            .and_then(|p| p.trim().parse().ok());
        (state, pid)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("app.log")).unwrap_or_default()
    }
}

impl Drop for Supervisord {
    fn drop(&mut self) {
        // SIGTERM: supervisord stops its programs (the master, which stops its worker).
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(self.proc.pid() as i32, libc::SIGTERM) };
        let child = &mut self.proc.child;
        let _ = wait_for("supervisord to exit", PATIENCE, || {
            child.try_wait().ok().flatten()
        });
    }
}

fn start_supervisord(dir: &Path, command: &str) -> Supervisord {
    let conf = dir.join("supervisord.conf");
    let d = dir.display();
    std::fs::write(
        &conf,
        format!(
            "[unix_http_server]\nfile={d}/supervisor.sock\n\n\
             [supervisord]\nlogfile={d}/supervisord.log\npidfile={d}/supervisord.pid\n\
             nodaemon=true\nchildlogdir={d}\n\n\
             [rpcinterface:supervisor]\n\
             supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n\n\
             [supervisorctl]\nserverurl=unix://{d}/supervisor.sock\n\n\
             [program:app]\ncommand={command}\nstdout_logfile={d}/app.log\n\
             redirect_stderr=true\nstopsignal=TERM\nstopwaitsecs=30\nstartsecs=1\n\
             autorestart=true\n"
        ),
    )
    .unwrap();
    let mut cmd = Command::new("supervisord");
    cmd.arg("-n").arg("-c").arg(&conf);
    Supervisord {
        proc: Proc::start(cmd),
        conf,
        dir: dir.to_path_buf(),
    }
}

#[test]
fn ten_upgrades_under_supervisord_keep_pid_and_requests() {
    require_tool("supervisord", "apt-get install -y supervisor");
    require_tool("supervisorctl", "apt-get install -y supervisor");
    let dir = tempdir();
    let bench = bench_server();
    let app = copy_to(&bench, dir.path(), "app");
    let control = dir.path().join("ctl.sock");
    let command = format!(
        "{} run --listen http=127.0.0.1:0 --control {} -- {} --addr 127.0.0.1:0",
        reborn().display(),
        control.display(),
        app.display()
    );
    let sup = start_supervisord(dir.path(), &command);
    let (state, pid) = wait_for("supervisord to report app RUNNING", PATIENCE, || {
        let (state, pid) = sup.program();
        (state == "RUNNING").then_some((state, pid?))
    });
    assert_eq!(state, "RUNNING");
    let addr: SocketAddr = wait_for("the master's address in the program log", PATIENCE, || {
        sup.log()
            .lines()
            .find_map(|l| l.split("listening on http=").nth(1)?.trim().parse().ok())
    });
    wait_for("the first worker to serve", PATIENCE, || {
        reborn_testkit::get(addr, "/ping")
            .ok()
            .filter(|r| r.status == 200)
    });

    let load = Load::start(addr, "/ping", 4, 2);
    load.wait_progress(50);
    let mut last_id = String::new();
    for i in 1..=10u8 {
        replace_with_variant(&app, &bench, &[i]);
        let out = Command::new(reborn())
            .args(["upgrade", "--control"])
            .arg(&control)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "upgrade {i}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            sup.log()
        );
        // A request accepted by the old worker just before its stop is still answered
        // by it: wait for the new binary's answer.
        last_id = wait_for("the new binary to answer", PATIENCE, || {
            let (id, _) = parse_pong(&reborn_testkit::get(addr, "/ping").ok()?.body);
            (id != last_id).then_some(id)
        });
        let (state, now) = sup.program();
        assert_eq!(state, "RUNNING", "after upgrade {i}");
        assert_eq!(
            now,
            Some(pid),
            "supervisord sees the same PID after upgrade {i}"
        );
        load.wait_progress(20);
    }
    load.finish_without_failures();
    let main_log = std::fs::read_to_string(dir.path().join("supervisord.log")).unwrap();
    assert_eq!(
        main_log.matches("spawned: 'app'").count(),
        1,
        "supervisord started the program once:\n{main_log}"
    );

    // supervisorctl stop: the master stops its worker and exits; nothing is left behind.
    let text = sup.ctl(&["stop", "app"]);
    assert!(text.contains("stopped"), "{text}");
    assert!(!alive(pid));
    assert!(common::refused(addr), "the port is free after the stop");
}
