//! The control protocol spoken by hand: a line that is no request (not UTF-8, unknown,
//! empty, too long) gets one JSON reply that says what was wrong and lists the requests,
//! and the master goes on answering.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use common::{Master, tempdir};
use reborn_testkit::PATIENCE;

fn testserver() -> std::path::PathBuf {
    reborn_testkit::example("reborn", "testserver")
}

/// Sends `bytes` on a fresh connection to the control socket, closes the sending side,
/// and returns everything the master answered before it closed the connection ("" when
/// it closed without an answer).
fn exchange(control: &Path, bytes: &[u8]) -> String {
    let mut stream = UnixStream::connect(control).expect("connect to the control socket");
    stream
        .set_read_timeout(Some(PATIENCE))
        .expect("a read timeout");
    stream.write_all(bytes).expect("send the request");
    stream
        .shutdown(std::net::Shutdown::Write)
        .expect("close the sending side");
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .expect("read the answer until the master closes");
    String::from_utf8(answer).expect("the answer is UTF-8")
}

/// Asserts that `answer` is exactly one line, a JSON reply with `ok: false` whose message
/// holds `what` and the list of requests, and returns the message.
fn assert_refused(answer: &str, what: &str, master: &Master) -> String {
    assert!(
        answer.ends_with('\n') && answer.matches('\n').count() == 1,
        "one line of answer, got {answer:?}; master output:\n{}",
        master.proc.output()
    );
    let reply: serde_json::Value = serde_json::from_str(answer).expect("the answer is JSON");
    assert_eq!(reply["ok"], false, "{reply}");
    let message = reply["message"].as_str().expect("a message");
    assert!(message.contains(what), "{what:?} in {message:?}");
    assert!(
        message.contains("expected upgrade, status or stop"),
        "the requests are listed: {message:?}"
    );
    assert!(!message.contains('\n'), "a one-line message: {message:?}");
    message.to_owned()
}

/// The master still serves its clients, and a request by hand still works.
fn assert_still_answers(master: &Master) {
    let status = master.status();
    assert_eq!(status["state"], "serving", "{status}");
    let answer = exchange(&master.control, b"status\n");
    let reply: serde_json::Value = serde_json::from_str(&answer).expect("JSON");
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["status"]["master_pid"], master.pid(), "{reply}");
}

#[test]
fn an_invalid_utf8_request_gets_a_one_line_error_answer() {
    let dir = tempdir();
    let master = Master::start(dir.path(), &[], &[testserver().as_os_str()]);
    master.wait_serving();

    let answer = exchange(&master.control, b"stat\xff\xfeus\n");
    let message = assert_refused(&answer, "not valid UTF-8", &master);
    assert_eq!(
        message,
        "request is not valid UTF-8 (invalid byte at offset 4); expected upgrade, status or \
         stop"
    );
    // Without a line end (the client closed its side after a truncated character).
    let answer = exchange(&master.control, b"stop \xc3");
    assert_refused(
        &answer,
        "not valid UTF-8 (invalid byte at offset 5)",
        &master,
    );

    assert_still_answers(&master);
}

#[test]
fn other_lines_that_are_no_request_get_a_clear_error_reply() {
    let dir = tempdir();
    let master = Master::start(dir.path(), &[], &[testserver().as_os_str()]);
    master.wait_serving();

    let answer = exchange(&master.control, b"restart\n");
    let message = assert_refused(&answer, "unknown request", &master);
    assert_eq!(
        message,
        "unknown request \"restart\"; expected upgrade, status or stop"
    );
    // A control character cannot break the answer's line.
    let answer = exchange(&master.control, b"st\x1b[2Jop\r\n");
    assert_refused(&answer, "unknown request", &master);
    // Nothing at all, and a line that is too long.
    let answer = exchange(&master.control, b"");
    assert_refused(&answer, "empty request", &master);
    let mut long = vec![b' '; 1000];
    long.extend_from_slice(b"status\n");
    let answer = exchange(&master.control, &long);
    assert_refused(&answer, "request too long", &master);

    assert_still_answers(&master);
}
