//! A notify datagram (`READY=1`, `STATUS=…`, `BARRIER=1`, …), as
//! `reborn::notify::NotifyMessage::parse` reads it.
//!
//! Checked: no panic; the encoded message is `KEY=VALUE` lines and parses back to the
//! same message; lines without `=` and unknown keys change nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use reborn::notify::NotifyMessage;

fuzz_target!(|data: &[u8]| {
    let message = NotifyMessage::parse(data);

    let encoded = message.encode();
    assert!(encoded.is_empty() || encoded.ends_with('\n'), "{encoded:?}");
    for line in encoded.lines() {
        assert!(line.contains('='), "a line without '=' in {encoded:?}");
    }
    assert_eq!(
        NotifyMessage::parse(encoded.as_bytes()),
        message,
        "round trip through {encoded:?}"
    );

    // Unknown keys and lines without '=' are skipped, wherever they are.
    let mut padded = b"X_UNKNOWN=1\nno equals sign\n".to_vec();
    padded.extend_from_slice(data);
    padded.extend_from_slice(b"\nno equals sign either\nMONOTONIC_USEC=1");
    assert_eq!(NotifyMessage::parse(&padded), message, "padded: {padded:?}");
});
