//! Properties of the protocol's pure parts, on arbitrary input: parsing never panics,
//! and what reborn writes, it (and systemd's rules) read back the same.

use proptest::prelude::*;
use reborn::activation::{encode_names, parse_listen_fds, validate_name};
use reborn::notify::NotifyMessage;

proptest! {
    #[test]
    fn listen_fds_parsing_never_panics(pid in ".{0,12}", fds in ".{0,12}", names in proptest::option::of(".{0,64}"), own in 1u32..) {
        let _ = parse_listen_fds(Some(&pid), Some(&fds), names.as_deref(), own);
    }

    #[test]
    fn valid_names_round_trip(names in proptest::collection::vec(proptest::option::of("[ -9;-~]{1,20}"), 0..8), pid in 1u32..) {
        // [ -9;-~] is printable ASCII without ':'.
        for n in names.iter().flatten() {
            prop_assert!(validate_name(n).is_ok());
        }
        let encoded = encode_names(names.iter().map(|n| n.as_deref()));
        let parsed = parse_listen_fds(Some(&pid.to_string()), Some(&names.len().to_string()), Some(&encoded), pid)
            .unwrap()
            .unwrap();
        let expected: Vec<Option<String>> = names
            .into_iter()
            .map(|n| n.filter(|n| n != "unknown"))
            .collect();
        prop_assert_eq!(parsed.names, expected);
    }

    #[test]
    fn notify_parsing_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = NotifyMessage::parse(&bytes);
    }

    #[test]
    fn notify_messages_round_trip(ready: bool, stopping: bool, status in proptest::option::of("[^\n]{0,40}"), main_pid in proptest::option::of(1u32..), errno in proptest::option::of(0i32..200)) {
        let msg = NotifyMessage { ready, stopping, status, main_pid, errno, ..Default::default() };
        prop_assert_eq!(NotifyMessage::parse(msg.encode().as_bytes()), msg);
    }
}
