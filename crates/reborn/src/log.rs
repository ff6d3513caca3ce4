//! Warnings and errors that reach a person even when the application set up no logging.
//!
//! reborn logs through `tracing`. An application with a subscriber sees everything
//! there, once. One without (the README's one-liner) would see nothing at all, not even
//! "upgrade failed: the new binary is missing": so reborn's warnings and errors go to
//! stderr by themselves when no global subscriber is installed, prefixed `reborn:`, and
//! only then (never a second copy). Writing to a stderr that has gone is not an error.

/// Whether the application installed a global `tracing` subscriber.
pub(crate) fn has_subscriber() -> bool {
    tracing::dispatcher::has_been_set()
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
