//! Warnings and errors that reach a person even when the application set up no logging.
//!
//! reborn logs through `tracing`. An application with a subscriber sees everything
//! there, once. One without (the README's one-liner) would see nothing at all, not even
//! "upgrade failed: the new binary is missing": so reborn's warnings and errors go to
//! stderr by themselves when no subscriber listens on the thread that logs, prefixed
//! `reborn:`, and only then (never a second copy). Writing to a stderr that has gone is
//! not an error.

/// Whether a `tracing` subscriber listens on this thread: the global one, or one set
/// for this thread alone (`tracing::subscriber::set_default`). One set for another
/// thread only (the `main` thread, say, while reborn logs from a runtime thread) does
/// not count: what is logged here would reach nobody.
pub(crate) fn has_subscriber() -> bool {
    tracing::dispatcher::get_default(|d| !d.is::<tracing::subscriber::NoSubscriber>())
}

/// Writes one line to stderr, ignoring a stderr that has gone.
pub(crate) fn to_stderr(level: &str, message: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "reborn: {level}: {message}");
}

/// `tracing::warn!` when a subscriber listens, else a line on stderr.
macro_rules! warning {
    ($($arg:tt)+) => {
        if $crate::log::has_subscriber() {
            tracing::warn!($($arg)+)
        } else {
            $crate::log::to_stderr("warning", format_args!($($arg)+))
        }
    };
}

/// `tracing::error!` when a subscriber listens, else a line on stderr.
macro_rules! error {
    ($($arg:tt)+) => {
        if $crate::log::has_subscriber() {
            tracing::error!($($arg)+)
        } else {
            $crate::log::to_stderr("error", format_args!($($arg)+))
        }
    };
}

pub(crate) use {error, warning};

#[cfg(test)]
mod tests {
    #[test]
    fn a_subscriber_set_for_another_thread_does_not_listen_here() {
        assert!(!super::has_subscriber(), "no subscriber in these tests");
        let _only_here = tracing::subscriber::set_default(tracing_subscriber::registry());
        assert!(super::has_subscriber());
        let elsewhere = std::thread::spawn(super::has_subscriber)
            .join()
            .expect("the thread");
        assert!(!elsewhere, "set for this thread only");
    }
}
