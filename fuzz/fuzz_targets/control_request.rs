//! The control socket's request line, as the master parses it
//! (`crates/reborn-cli/src/protocol.rs`, included as it is: reborn-cli is a binary).
//!
//! Checked: no panic; a request is accepted exactly when the line is short enough, UTF-8,
//! and one of the requests once whitespace is trimmed; every error tells the truth about
//! the line (its length, where the UTF-8 breaks, the word sent); every error message is
//! one line with no control character (it is sent back in a JSON line and printed on the
//! client's terminal), bounded in size, and lists the requests.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code, reason = "the fuzz target uses part of the module")]
#[path = "../../crates/reborn-cli/src/protocol.rs"]
mod protocol;

use protocol::{COMMANDS, MAX_LINE_LEN, Request, RequestError, parse_request};

fuzz_target!(|data: &[u8]| {
    let result = parse_request(data);
    match &result {
        Ok(request) => {
            assert!(data.len() <= MAX_LINE_LEN);
            let text = std::str::from_utf8(data).expect("accepted a line that is not UTF-8");
            assert_eq!(text.trim(), request.as_str());
            assert_eq!(parse_request(request.as_str().as_bytes()), Ok(*request));
        }
        Err(RequestError::TooLong { len }) => {
            assert_eq!(*len, data.len());
            assert!(*len > MAX_LINE_LEN);
        }
        Err(RequestError::NotUtf8 { valid_up_to }) => {
            assert!(data.len() <= MAX_LINE_LEN);
            let e = std::str::from_utf8(data).expect_err("refused a UTF-8 line as not UTF-8");
            assert_eq!(e.valid_up_to(), *valid_up_to);
        }
        Err(RequestError::Empty) => {
            let text = std::str::from_utf8(data).expect("UTF-8");
            assert!(text.trim().is_empty(), "{text:?} is not empty");
        }
        Err(RequestError::Unknown(word)) => {
            let text = std::str::from_utf8(data).expect("UTF-8");
            assert_eq!(text.trim(), word);
            assert!(!word.is_empty());
            assert!(Request::ALL.iter().all(|r| r.as_str() != word));
        }
    }
    if let Err(e) = result {
        let message = e.to_string();
        assert!(message.ends_with(&format!("expected {COMMANDS}")), "{message:?}");
        assert!(
            !message
                .chars()
                .any(|c| c.is_control() || matches!(c, '\u{2028}' | '\u{2029}')),
            "a control character or line break in {message:?}"
        );
        // An escaped character takes at most 10 bytes (`\u{10ffff}`).
        assert!(message.len() <= 10 * MAX_LINE_LEN + 200, "{} bytes", message.len());
    }
});
