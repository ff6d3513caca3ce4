//! `LISTEN_PID` / `LISTEN_FDS` / `LISTEN_FDNAMES`, as `reborn::activation::parse_listen_fds`
//! reads them (the pure part of `take_from_env`: no environment, no file descriptors).
//!
//! The input is an environment block as in `/proc/PID/environ`: `KEY=VALUE` entries
//! separated by NUL bytes. The last `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` entries
//! count; a missing one is unset. This process's PID is taken to be [`OWN_PID`].
//!
//! Checked: no panic; the result agrees with the input (unset means ignored, another PID
//! is ignored, a count is what `LISTEN_FDS` says and within the limit, every name is one
//! systemd accepts); the names survive `encode_names` and parsing again unchanged; every
//! error's message is one non-empty line.
#![no_main]

use libfuzzer_sys::fuzz_target;
use reborn::activation::{
    ActivationError, Ignored, MAX_LISTEN_FDS, UNNAMED, encode_names, parse_listen_fds,
    validate_name,
};

/// The PID the variables must name to be used (the seeds use it).
const OWN_PID: u32 = 4242;

fuzz_target!(|data: &[u8]| {
    let (mut pid, mut fds, mut names) = (None, None, None);
    for entry in data.split(|b| *b == 0) {
        // take_from_env refuses a value that is not UTF-8 before parsing it.
        let Ok(entry) = std::str::from_utf8(entry) else {
            return;
        };
        let Some((key, value)) = entry.split_once('=') else {
            continue;
        };
        match key {
            "LISTEN_PID" => pid = Some(value),
            "LISTEN_FDS" => fds = Some(value),
            "LISTEN_FDNAMES" => names = Some(value),
            _ => {}
        }
    }
    check(pid, fds, names);
});

fn check(pid: Option<&str>, fds: Option<&str>, names: Option<&str>) {
    match parse_listen_fds(pid, fds, names, OWN_PID) {
        Ok(Err(Ignored::Absent)) => {
            assert!(pid.is_none() || fds.is_none(), "ignored as absent: {pid:?} {fds:?}");
        }
        Ok(Err(Ignored::OtherPid(other))) => {
            assert_ne!(other, OWN_PID, "ignored its own PID");
            assert!(other > 0);
            assert_eq!(pid.and_then(|p| p.trim().parse().ok()), Some(other));
        }
        Ok(Ok(parsed)) => {
            let (pid, fds) = (pid.expect("a PID"), fds.expect("a count"));
            assert_eq!(pid.trim().parse::<u32>().ok(), Some(OWN_PID));
            let count = parsed.count();
            assert!(count <= MAX_LISTEN_FDS, "{count} sockets");
            assert_eq!(fds.trim().parse::<usize>().ok(), Some(count));
            match names {
                None => assert!(parsed.names.iter().all(Option::is_none)),
                Some(list) => assert_eq!(list.split(':').count().max(1), count.max(1)),
            }
            for name in parsed.names.iter().flatten() {
                assert!(validate_name(name).is_ok(), "accepted a bad name {name:?}");
                assert_ne!(name, UNNAMED, "`unknown` means no name");
            }
            // What a master hands on to the next process reads back the same.
            let encoded = encode_names(parsed.names.iter().map(Option::as_deref));
            let again = parse_listen_fds(Some(pid), Some(&count.to_string()), Some(&encoded), OWN_PID);
            assert_eq!(again, Ok(Ok(parsed.clone())), "via LISTEN_FDNAMES={encoded:?}");
        }
        Err(e) => {
            match &e {
                ActivationError::BadName(name) => assert!(validate_name(name).is_err()),
                ActivationError::NameCount { named, count, .. } => assert_ne!(named, count),
                ActivationError::BadCount(n) => assert_eq!(Some(n.as_str()), fds),
                ActivationError::BadPid(p) => assert_eq!(Some(p.as_str()), pid),
                _ => {}
            }
            let message = e.to_string();
            assert!(!message.is_empty());
            assert!(
                !message.contains(['\n', '\r']),
                "a message of more than one line: {message:?}"
            );
        }
    }
}
