//! Signals and their actions, as endless defines them, with user hooks around each.
//!
//! | signal | action |
//! |---|---|
//! | `SIGHUP` | upgrade: start the binary now on disk with the listeners (not under the master) |
//! | `SIGTERM`, `SIGINT` | graceful shutdown: drain, then exit |
//! | `SIGUSR2` | hammer: close everything now |
//! | `SIGUSR1`, `SIGTSTP` | user hooks only |
//!
//! Handlers are installed before the process reports ready, so a signal never finds a
//! ready process without them. tokio coalesces signals of one kind: a second `SIGTERM`
//! during a drain is one more event, handled on purpose (it is logged; a second `SIGINT`,
//! the impatient Ctrl-C, hammers).

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use tokio::signal::unix::{SignalKind, signal};

/// The signals reborn acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Signal {
    /// `SIGHUP`: upgrade.
    Hup,
    /// `SIGINT`: graceful shutdown.
    Int,
    /// `SIGTERM`: graceful shutdown.
    Term,
    /// `SIGUSR1`: user hooks only.
    Usr1,
    /// `SIGUSR2`: hammer.
    Usr2,
    /// `SIGTSTP`: user hooks only (handled only when a hook is set, so that Ctrl-Z
    /// still suspends a process that has none).
    Tstp,
}

impl Signal {
    /// Every signal reborn knows.
    pub const ALL: [Signal; 6] = [
        Signal::Hup,
        Signal::Int,
        Signal::Term,
        Signal::Usr1,
        Signal::Usr2,
        Signal::Tstp,
    ];

    fn kind(self) -> SignalKind {
        match self {
            Signal::Hup => SignalKind::hangup(),
            Signal::Int => SignalKind::interrupt(),
            Signal::Term => SignalKind::terminate(),
            Signal::Usr1 => SignalKind::user_defined1(),
            Signal::Usr2 => SignalKind::user_defined2(),
            Signal::Tstp => SignalKind::from_raw(libc::SIGTSTP),
        }
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Signal::Hup => "SIGHUP",
            Signal::Int => "SIGINT",
            Signal::Term => "SIGTERM",
            Signal::Usr1 => "SIGUSR1",
            Signal::Usr2 => "SIGUSR2",
            Signal::Tstp => "SIGTSTP",
        })
    }
}

/// A user hook: a plain function, run on the task that handles signals. Keep it short;
/// spawn a task for anything long.
pub type Hook = Arc<dyn Fn() + Send + Sync + 'static>;

/// When a hook runs relative to the signal's own action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum When {
    Before,
    After,
}

/// The hooks of every signal.
#[derive(Clone, Default)]
pub(crate) struct Hooks {
    hooks: HashMap<(Signal, When), Vec<Hook>>,
}

impl fmt::Debug for Hooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.hooks.iter().map(|(k, v)| (k, v.len())))
            .finish()
    }
}

impl Hooks {
    pub(crate) fn add(&mut self, signal: Signal, when: When, hook: Hook) {
        self.hooks.entry((signal, when)).or_default().push(hook);
    }

    /// Runs the hooks; a hook that panics is logged, and the others and the signal's
    /// own action still run (a panic must not end signal handling).
    pub(crate) fn run(&self, signal: Signal, when: When) {
        if let Some(hooks) = self.hooks.get(&(signal, when)) {
            for hook in hooks {
                if let Err(panic) =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| hook()))
                {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a panic".into());
                    crate::log::error!("a {signal} hook panicked: {what}");
                }
            }
        }
    }

    pub(crate) fn has(&self, signal: Signal) -> bool {
        self.hooks.contains_key(&(signal, When::Before))
            || self.hooks.contains_key(&(signal, When::After))
    }
}

/// A stream of the signals reborn acts on, merged.
pub(crate) struct Signals {
    streams: Vec<(Signal, tokio::signal::unix::Signal)>,
}

impl Signals {
    /// Installs the handlers. Needs a tokio runtime.
    pub(crate) fn install(hooks: &Hooks) -> std::io::Result<Signals> {
        let mut streams = Vec::new();
        for s in Signal::ALL {
            if s == Signal::Tstp && !hooks.has(s) {
                continue;
            }
            streams.push((s, signal(s.kind())?));
        }
        Ok(Signals { streams })
    }

    /// The next signal received.
    pub(crate) async fn recv(&mut self) -> Signal {
        std::future::poll_fn(|cx| {
            for (s, stream) in self.streams.iter_mut() {
                if let std::task::Poll::Ready(Some(())) = stream.poll_recv(cx) {
                    return std::task::Poll::Ready(*s);
                }
            }
            std::task::Poll::Pending
        })
        .await
    }
}

/// Which of stdin, stdout and stderr are terminals now.
pub(crate) fn on_terminal() -> [bool; 3] {
    use std::io::IsTerminal;
    [
        std::io::stdin().is_terminal(),
        std::io::stdout().is_terminal(),
        std::io::stderr().is_terminal(),
    ]
}

/// Whether a terminal the process was started on has hung up since (a hung-up terminal
/// answers no terminal request, so it no longer counts as one).
pub(crate) fn terminal_hung_up(at_start: [bool; 3]) -> bool {
    let now = on_terminal();
    at_start.iter().zip(now).any(|(was, is)| *was && !is)
}
