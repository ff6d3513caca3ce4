//! The control protocol's request line, parsed: pure, and using nothing but `std`, so that
//! the fuzz target `control_request` (in `fuzz/`) can include this very file.
//!
//! A request is one line, `upgrade`, `status` or `stop`, optionally surrounded by
//! whitespace and ended by `\n` (or `\r\n`), at most [`MAX_LINE_LEN`] bytes with its line
//! end. Anything else is a [`RequestError`] whose message says what was wrong and which
//! requests there are.

use std::fmt;

/// The longest request line accepted, in bytes, its line end included.
pub const MAX_LINE_LEN: usize = 256;

/// The requests there are, as a client writes them (for messages).
pub const COMMANDS: &str = "upgrade, status or stop";

/// A command sent to the master.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Start an upgrade and answer with its outcome.
    Upgrade,
    /// Answer with the state.
    Status,
    /// Stop gracefully.
    Stop,
}

impl Request {
    /// Every request.
    pub const ALL: [Request; 3] = [Request::Upgrade, Request::Status, Request::Stop];

    /// The request as a client writes it (without the line end).
    pub fn as_str(self) -> &'static str {
        match self {
            Request::Upgrade => "upgrade",
            Request::Status => "status",
            Request::Stop => "stop",
        }
    }
}

/// Why a request line is not a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestError {
    /// Nothing but whitespace (or nothing at all) was sent.
    Empty,
    /// The line is longer than [`MAX_LINE_LEN`] bytes.
    TooLong {
        /// How many bytes were read of it (more may have followed).
        len: usize,
    },
    /// The line is not valid UTF-8.
    NotUtf8 {
        /// The length of its valid prefix, in bytes.
        valid_up_to: usize,
    },
    /// A line that is no known request.
    Unknown(String),
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestError::Empty => write!(f, "empty request; expected {COMMANDS}"),
            RequestError::TooLong { len } => write!(
                f,
                "request too long ({len} bytes or more; at most {MAX_LINE_LEN}); expected \
                 {COMMANDS}"
            ),
            RequestError::NotUtf8 { valid_up_to } => write!(
                f,
                "request is not valid UTF-8 (invalid byte at offset {valid_up_to}); expected \
                 {COMMANDS}"
            ),
            // `{:?}` escapes control characters: the message stays one line.
            RequestError::Unknown(line) => {
                write!(f, "unknown request {line:?}; expected {COMMANDS}")
            }
        }
    }
}

impl std::error::Error for RequestError {}

/// Parses one request line as read from the socket: the bytes up to and including the
/// first `\n`, which may be missing when the client closed its side after the request.
pub fn parse_request(line: &[u8]) -> Result<Request, RequestError> {
    if line.len() > MAX_LINE_LEN {
        return Err(RequestError::TooLong { len: line.len() });
    }
    let text = std::str::from_utf8(line).map_err(|e| RequestError::NotUtf8 {
        valid_up_to: e.valid_up_to(),
    })?;
    let word = text.trim();
    Request::ALL
        .into_iter()
        .find(|r| r.as_str() == word)
        .ok_or_else(|| {
            if word.is_empty() {
                RequestError::Empty
            } else {
                RequestError::Unknown(word.to_owned())
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests() {
        for r in Request::ALL {
            let word = r.as_str();
            for line in [
                word.to_owned(),
                format!("{word}\n"),
                format!("{word}\r\n"),
                format!("  {word}\t\n"),
            ] {
                assert_eq!(parse_request(line.as_bytes()), Ok(r), "{line:?}");
            }
        }
    }

    #[test]
    fn empty() {
        for line in ["", "\n", " \r\n", "\t"] {
            let e = parse_request(line.as_bytes()).unwrap_err();
            assert_eq!(e, RequestError::Empty, "{line:?}");
            assert_eq!(
                e.to_string(),
                "empty request; expected upgrade, status or stop"
            );
        }
    }

    #[test]
    fn unknown() {
        let e = parse_request(b"restart\n").unwrap_err();
        assert_eq!(e, RequestError::Unknown("restart".into()));
        assert_eq!(
            e.to_string(),
            "unknown request \"restart\"; expected upgrade, status or stop"
        );
        // Case matters, and one request per line.
        assert!(parse_request(b"STATUS\n").is_err());
        assert_eq!(
            parse_request(b"status\nstop\n"),
            Err(RequestError::Unknown("status\nstop".into()))
        );
        // A control character in the request cannot break the message's line.
        let e = parse_request(b"st\x1bop\n").unwrap_err().to_string();
        assert!(!e.contains('\x1b') && !e.contains('\n'), "{e}");
    }

    #[test]
    fn not_utf8() {
        let e = parse_request(b"stat\xffus\n").unwrap_err();
        assert_eq!(e, RequestError::NotUtf8 { valid_up_to: 4 });
        assert_eq!(
            e.to_string(),
            "request is not valid UTF-8 (invalid byte at offset 4); expected upgrade, status \
             or stop"
        );
        // A truncated multi-byte character is invalid too.
        assert!(matches!(
            parse_request(b"stop \xc3"),
            Err(RequestError::NotUtf8 { valid_up_to: 5 })
        ));
    }

    #[test]
    fn too_long() {
        let mut line = vec![b' '; MAX_LINE_LEN - 7];
        line.extend_from_slice(b"status\n");
        assert_eq!(line.len(), MAX_LINE_LEN);
        assert_eq!(
            parse_request(&line),
            Ok(Request::Status),
            "the limit itself"
        );
        line.insert(0, b' ');
        let e = parse_request(&line).unwrap_err();
        assert_eq!(
            e,
            RequestError::TooLong {
                len: MAX_LINE_LEN + 1
            }
        );
        assert!(e.to_string().contains("at most 256"), "{e}");
        assert!(
            e.to_string().ends_with("expected upgrade, status or stop"),
            "{e}"
        );
    }
}
