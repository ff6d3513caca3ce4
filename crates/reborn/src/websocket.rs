//! The close frame a WebSocket gets at the hammer.
//!
//! After the upgrade the application owns the WebSocket, and a well-behaved one closes
//! it at its connection's moment ([`crate::Draining`]). One that does not is cut at the
//! drain deadline; its client should still learn why (`1012 Service Restart` when a new
//! generation serves, `1001 Going Away` at a shutdown) rather than see an abnormal close
//! (1006). reborn can write that frame only between two of the application's frames, so
//! it follows the frames the application writes: their headers say how long each is.
//! A connection in the middle of a frame at the hammer is cut without one.

/// The state of the outgoing byte stream of one upgraded connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not a WebSocket (or not yet upgraded): nothing is followed.
    Off,
    /// In the `101` response head; `matched` bytes of its closing `\r\n\r\n` seen.
    Head { matched: u8 },
    /// In a frame header: `have` of its bytes seen so far.
    Header { have: u8 },
    /// In a frame's payload, with this many bytes left.
    Payload { left: u64 },
}

/// Follows the frames written to one WebSocket, to know where a close frame fits.
#[derive(Debug)]
pub(crate) struct Outgoing {
    state: State,
    header: [u8; 14],
    /// Whether a close frame was sent (by the application or by reborn): no second one.
    closed: bool,
}

impl Outgoing {
    pub(crate) fn new() -> Self {
        Outgoing {
            state: State::Off,
            header: [0; 14],
            closed: false,
        }
    }

    /// Starts following: the connection's `101` response (a WebSocket's) is about to be
    /// written.
    pub(crate) fn start(&mut self) {
        if self.state == State::Off {
            self.state = State::Head { matched: 0 };
        }
    }

    pub(crate) fn is_on(&self) -> bool {
        self.state != State::Off
    }

    /// Whether a close frame written now would stand between two whole frames, and none
    /// was sent yet.
    pub(crate) fn close_fits(&self) -> bool {
        !self.closed && self.state == State::Header { have: 0 }
    }

    /// Takes note of bytes the transport accepted.
    pub(crate) fn observe(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match self.state {
                State::Off => return,
                State::Head { matched } => {
                    let end = b"\r\n\r\n";
                    let mut matched = matched as usize;
                    let mut used = 0;
                    for &b in bytes {
                        used += 1;
                        matched = if b == end[matched] {
                            matched + 1
                        } else if b == b'\r' {
                            1
                        } else {
                            0
                        };
                        if matched == end.len() {
                            break;
                        }
                    }
                    bytes = &bytes[used..];
                    self.state = if matched == end.len() {
                        State::Header { have: 0 }
                    } else {
                        State::Head {
                            matched: matched as u8,
                        }
                    };
                }
                State::Header { have } => {
                    let mut have = have as usize;
                    while have < header_len(&self.header[..have]) && !bytes.is_empty() {
                        self.header[have] = bytes[0];
                        have += 1;
                        bytes = &bytes[1..];
                    }
                    let header = &self.header[..have];
                    if have < header_len(header) {
                        self.state = State::Header { have: have as u8 };
                        return;
                    }
                    if header[0] & 0x0f == 0x8 {
                        self.closed = true;
                    }
                    let left = payload_len(header);
                    self.state = if left == 0 {
                        State::Header { have: 0 }
                    } else {
                        State::Payload { left }
                    };
                }
                State::Payload { left } => {
                    let used = (bytes.len() as u64).min(left);
                    bytes = &bytes[used as usize..];
                    self.state = if used == left {
                        State::Header { have: 0 }
                    } else {
                        State::Payload { left: left - used }
                    };
                }
            }
        }
    }

    /// Marks the close frame as sent (or given up on: one try only).
    pub(crate) fn close_sent(&mut self) {
        self.closed = true;
    }
}

/// How long a frame header is, judging by its first bytes (2 until the second is known).
fn header_len(seen: &[u8]) -> usize {
    let Some(&second) = seen.get(1) else {
        return 2;
    };
    let extended = match second & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if second & 0x80 != 0 { 4 } else { 0 };
    2 + extended + mask
}

/// The payload length a whole frame header gives.
fn payload_len(header: &[u8]) -> u64 {
    match header[1] & 0x7f {
        126 => u64::from(u16::from_be_bytes([header[2], header[3]])),
        127 => {
            let mut len = [0; 8];
            len.copy_from_slice(&header[2..10]);
            u64::from_be_bytes(len)
        }
        n => u64::from(n),
    }
}

/// A server's close frame (unmasked) with `code` and `reason` (at most 123 bytes).
pub(crate) fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    let reason = &reason.as_bytes()[..reason.len().min(123)];
    let mut frame = Vec::with_capacity(4 + reason.len());
    frame.push(0x88);
    frame.push((2 + reason.len()) as u8);
    frame.extend_from_slice(&code.to_be_bytes());
    frame.extend_from_slice(reason);
    frame
}

/// Whether a response switches the connection to the WebSocket protocol.
pub(crate) fn is_websocket_upgrade(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("websocket"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(opcode: u8, payload_len: usize) -> Vec<u8> {
        let mut f = vec![0x80 | opcode];
        match payload_len {
            n if n < 126 => f.push(n as u8),
            n if n <= 0xffff => {
                f.push(126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend(std::iter::repeat_n(b'x', payload_len));
        f
    }

    fn following() -> Outgoing {
        let mut out = Outgoing::new();
        out.start();
        out.observe(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n");
        out
    }

    #[test]
    fn a_close_fits_only_between_whole_frames() {
        let mut out = following();
        assert!(out.close_fits());
        for len in [0, 5, 125, 126, 300, 70_000] {
            let f = frame(0x1, len);
            // Byte by byte, and then in two halves: the transport may take any part.
            for b in &f[..f.len() - 1] {
                out.observe(std::slice::from_ref(b));
                assert!(!out.close_fits(), "mid-frame of {len}");
            }
            out.observe(&f[f.len() - 1..]);
            assert!(out.close_fits(), "after a frame of {len}");
            let (a, b) = f.split_at(f.len() / 2);
            out.observe(a);
            assert!(!out.close_fits() || a.is_empty());
            out.observe(b);
            assert!(out.close_fits());
        }
    }

    #[test]
    fn many_frames_in_one_write_and_the_applications_own_close() {
        let mut out = following();
        let mut bytes = frame(0x2, 10);
        bytes.extend(frame(0x9, 0));
        bytes.extend(frame(0x1, 200));
        out.observe(&bytes);
        assert!(out.close_fits());
        out.observe(&frame(0x8, 2));
        assert!(!out.close_fits(), "the application closed it already");
    }

    #[test]
    fn the_head_is_skipped_even_when_split() {
        let mut out = Outgoing::new();
        assert!(!out.is_on());
        out.start();
        out.observe(b"HTTP/1.1 101 OK\r\nx: y\r");
        assert!(!out.close_fits());
        out.observe(b"\n\r");
        assert!(!out.close_fits());
        out.observe(b"\n");
        assert!(out.close_fits());
    }

    #[test]
    fn close_frames_are_well_formed() {
        assert_eq!(close_frame(1012, "restart"), b"\x88\x09\x03\xf4restart");
        assert_eq!(close_frame(1001, &"x".repeat(200)).len(), 4 + 123);
    }
}
