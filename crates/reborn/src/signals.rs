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
//! ready process without them. Signals of one kind coalesce while one is pending: a second
//! `SIGTERM` during a drain is one more event, handled on purpose (it is logged; a second
//! `SIGINT`, the impatient Ctrl-C, hammers).
//!
//! Why a thread: a signal handled by the runtime (`tokio::signal`) is only seen when a
//! worker polls the runtime's I/O driver. A handler that blocks the worker that was
//! about to poll it (while the other workers sleep, with nothing to do) leaves nobody
//! listening, and `SIGHUP` or `SIGTERM` would wait for that handler. The signals arrive
//! instead on a thread of reborn's own (`reborn-signals`, through `signal-hook`), which
//! hands each one to the task that acts on it: a task woken from outside the runtime
//! wakes a sleeping worker, which then polls the driver for what the action needs.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

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

    fn number(self) -> libc::c_int {
        match self {
            Signal::Hup => libc::SIGHUP,
            Signal::Int => libc::SIGINT,
            Signal::Term => libc::SIGTERM,
            Signal::Usr1 => libc::SIGUSR1,
            Signal::Usr2 => libc::SIGUSR2,
            Signal::Tstp => libc::SIGTSTP,
        }
    }

    fn from_number(number: libc::c_int) -> Option<Signal> {
        Signal::ALL.into_iter().find(|s| s.number() == number)
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

/// The signals reborn acts on, as they arrive on the `reborn-signals` thread.
pub(crate) struct Signals {
    /// The registered handlers, until the thread that reads them starts.
    incoming: Option<signal_hook::iterator::Signals>,
    tx: tokio::sync::mpsc::UnboundedSender<Signal>,
    received: tokio::sync::mpsc::UnboundedReceiver<Signal>,
}

impl Signals {
    /// Installs the handlers: from here on no signal is lost (it waits in the handlers'
    /// pipe until [`start_thread`](Self::start_thread)).
    pub(crate) fn install(hooks: &Hooks) -> std::io::Result<Signals> {
        let numbers: Vec<libc::c_int> = Signal::ALL
            .into_iter()
            // Ctrl-Z still suspends a process that has no SIGTSTP hook.
            .filter(|s| *s != Signal::Tstp || hooks.has(*s))
            .map(Signal::number)
            .collect();
        let incoming = signal_hook::iterator::Signals::new(&numbers)?;
        let (tx, received) = tokio::sync::mpsc::unbounded_channel();
        Ok(Signals {
            incoming: Some(incoming),
            tx,
            received,
        })
    }

    /// Starts the thread that receives the signals (once). Starting a thread takes a
    /// fraction of a millisecond: this runs in the signal task, beside the start-up,
    /// not on its way to `READY=1`.
    pub(crate) fn start_thread(&mut self) -> std::io::Result<()> {
        let Some(mut incoming) = self.incoming.take() else {
            return Ok(());
        };
        let tx = self.tx.clone();
        std::thread::Builder::new()
            .name("reborn-signals".into())
            .spawn(move || {
                for number in incoming.forever() {
                    let Some(signal) = Signal::from_number(number) else {
                        continue;
                    };
                    if tx.send(signal).is_err() {
                        break;
                    }
                }
            })?;
        Ok(())
    }

    /// The next signal received (never ends: the thread lives as long as the process).
    pub(crate) async fn recv(&mut self) -> Signal {
        match self.received.recv().await {
            Some(signal) => signal,
            None => std::future::pending().await,
        }
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
