//! Probation: after a self-upgrade commits, the previous generation stays for a while,
//! holding its listening sockets, ready to take over again.
//!
//! Most bad deploys do not fail at start-up: they report ready, then crash on the first
//! request, the first database query, a configuration value read lazily. Without
//! probation the previous generation has already gone by then, and every client is
//! refused until someone restarts the service by hand. With it, the previous generation
//! stops accepting and drains exactly as without, but stays alive (idle, cheap) until
//! the window ends; if the new generation dies in the window, for any reason, the
//! previous one *resumes*: it accepts again at once, writes its PID to the PID file,
//! tells the service manager that it is the main process again, and logs what happened.
//!
//! The window ends early, without a rollback, when this process is told to stop
//! (`SIGTERM`, `SIGINT`, `Reborn::shutdown`, the hammer), and when the new generation
//! itself hands over to a newer one or shuts down on purpose: it says so on the private
//! notify socket it inherited (`REBORN_HANDED_OVER=<pid>`, `STOPPING=1`). A stop and a
//! death that come together never leave the process serving: whichever ends the
//! probation first decides (`Probation::take_over`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::notify::NotifyReceiver;
use crate::readiness::tell;
use crate::server::Inner;
use crate::spawn::SpawnedChild;
use crate::upgrade::{UpgradeError, Upgraded, describe_exit};

/// The default window: long enough for the usual lazy failures (the first requests, the
/// first connection to a database) to show, short enough that the previous generation,
/// idle by then, does not linger.
pub(crate) const DEFAULT_PROBATION: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// No probation under way.
    Idle,
    /// A successor is on probation; this process waits, able to resume.
    Running,
    /// The probation is over (passed, or cut short): this process finishes its drain.
    Over,
}

/// The probation's state, watched by the accept loops.
#[derive(Debug)]
pub(crate) struct Probation {
    tx: watch::Sender<State>,
}

impl Probation {
    pub(crate) fn new() -> Self {
        Probation {
            tx: watch::Sender::new(State::Idle),
        }
    }

    fn set(&self, state: State) {
        self.tx.send_replace(state);
    }

    pub(crate) fn begin(&self) {
        self.set(State::Running);
    }

    /// Back to no probation (the upgrade did not commit, or this process resumed).
    pub(crate) fn clear(&self) {
        self.set(State::Idle);
    }

    /// Ends a running probation without a rollback; returns whether one was running.
    pub(crate) fn end(&self) -> bool {
        self.tx.send_if_modified(|s| {
            let running = *s == State::Running;
            if running {
                *s = State::Over;
            }
            running
        })
    }

    /// The successor died: runs `resume` (this process serves again, if it can) unless
    /// the probation ended meanwhile, because this process was told to stop. Returns
    /// whether it resumed. Atomic with [`end`](Self::end): a stop signal either ends the
    /// probation first, and nothing is resumed (the process goes on to exit), or comes
    /// after, and finds a serving process to shut down. Read apart, a `SIGTERM` that
    /// ended a probation whose successor had just died was undone by the rollback, and
    /// the process served on.
    pub(crate) fn take_over(&self, resume: impl FnOnce() -> bool) -> bool {
        let mut resumed = false;
        self.tx.send_if_modified(|s| {
            if *s != State::Running {
                return false;
            }
            resumed = resume();
            *s = if resumed { State::Idle } else { State::Over };
            true
        });
        resumed
    }

    /// Resolves once no probation is running.
    pub(crate) async fn settled(&self) {
        let mut rx = self.tx.subscribe();
        let _ = rx.wait_for(|s| *s != State::Running).await;
    }
}

/// How a probation ended.
enum Verdict {
    Passed,
    /// Cut short, without a rollback: why.
    CutShort(&'static str),
    /// The successor died: how, and how long after it was ready.
    Died(String, Duration),
}

/// Why a message from the successor ends its probation early, if it does.
fn cut_short(message: &crate::notify::NotifyMessage) -> Option<&'static str> {
    if message.handed_over.is_some() {
        Some("it handed over to a newer generation")
    } else if message.stopping {
        Some("it is shutting down on purpose")
    } else {
        None
    }
}

/// Watches the committed successor for `window`. On its death this process resumes and
/// the error says what happened; otherwise the upgrade stands.
pub(crate) async fn watch(
    inner: &Arc<Inner>,
    mut child: SpawnedChild,
    receiver: NotifyReceiver,
    upgraded: Upgraded,
    window: Duration,
) -> Result<Upgraded, UpgradeError> {
    let pid = upgraded.pid;
    let ready_at = Instant::now();
    tracing::info!(
        successor = pid,
        "pid {pid} is on probation for {window:?}: this process keeps its sockets and \
         takes over again if pid {pid} dies"
    );
    let mut listening = true;
    let deadline = tokio::time::sleep(window);
    tokio::pin!(deadline);
    let verdict = loop {
        tokio::select! {
            biased;
            status = child.wait() => {
                // What it said just before it exited decides: a successor told to stop
                // right after its commit says `STOPPING=1`, and its exit is no crash.
                if let Some(why) = receiver.queued().iter().find_map(cut_short) {
                    break Verdict::CutShort(why);
                }
                break Verdict::Died(
                    match status {
                        Ok(s) => describe_exit(s),
                        Err(e) => format!("could not be waited for ({e})"),
                    },
                    ready_at.elapsed(),
                );
            }
            () = inner.probation.settled() => break Verdict::CutShort("this process was told to stop"),
            message = receiver.recv(), if listening => match message {
                Ok(m) => if let Some(why) = cut_short(&m) {
                    break Verdict::CutShort(why);
                },
                Err(e) => {
                    tracing::debug!("stopped listening to pid {pid}'s notify messages: {e}");
                    listening = false;
                }
            },
            () = &mut deadline => break Verdict::Passed,
        }
    };
    match verdict {
        Verdict::Passed | Verdict::CutShort(_) => {
            inner.probation.end();
            inner.handoff.open();
            match verdict {
                Verdict::CutShort(why) => {
                    tracing::info!(successor = pid, "probation of pid {pid} ended early: {why}")
                }
                _ => tracing::info!(successor = pid, "pid {pid} passed its probation"),
            }
            tokio::spawn(async move {
                let _ = child.wait().await;
            });
            Ok(upgraded)
        }
        Verdict::Died(status, after) => {
            // Non-blocking before an accept loop can wake: the dead version may have
            // made the shared sockets blocking, and an accept on an empty queue would
            // then hold a runtime thread until the next client.
            inner.listeners().restore_nonblocking("after the rollback");
            // Serving again first, then no next generation: the other way round, a
            // response made in between would be a drain's without a handoff, and say
            // `Connection: close` to a client that had no reason to reconnect.
            let resumed = inner.probation.take_over(|| inner.drain.resume());
            inner.handoff.close();
            let me = std::process::id();
            // Not resumed, the probation is over (`take_over`): this process drains on.
            if !resumed {
                let error = UpgradeError::DiedOnProbation {
                    pid,
                    status,
                    after,
                    resumed: false,
                };
                crate::log::error!("{error}");
                return Err(error);
            }
            crate::readiness::record_pid(inner, me);
            let error = UpgradeError::DiedOnProbation {
                pid,
                status,
                after,
                resumed: true,
            };
            if let Some(manager) = inner.notify.manager() {
                tell(
                    manager,
                    &format!("MAINPID={me}\nREADY=1\nSTATUS=rolled back: {error}\n"),
                );
            }
            crate::log::error!("{error}");
            Err(error)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drain::{DrainControl, DrainReason, Phase};

    /// A probation running, its successor committed to: this process drains.
    fn on_probation() -> (Probation, DrainControl) {
        let probation = Probation::new();
        let drain = DrainControl::new();
        probation.begin();
        assert!(drain.claim(DrainReason::Upgraded { successor: 1 }));
        drain.start_draining();
        (probation, drain)
    }

    /// The successor's death was seen, then a stop signal ended the probation before
    /// the rollback ran: the rollback must not make the process serve again, or the
    /// stop is lost (its handler saw a probation, and only ended it).
    #[test]
    fn a_stop_before_the_rollback_leaves_nothing_to_resume() {
        let (probation, drain) = on_probation();
        assert!(probation.end(), "the stop ends the probation");
        assert!(!probation.take_over(|| drain.resume()));
        assert_eq!(
            drain.phase(),
            Phase::Draining,
            "the drain goes on, to the exit"
        );
    }

    /// The rollback ran first: the stop finds no probation to end, and so shuts the
    /// process down like any serving one.
    #[test]
    fn a_stop_after_the_rollback_finds_a_serving_process() {
        let (probation, drain) = on_probation();
        assert!(probation.take_over(|| drain.resume()));
        assert_eq!(drain.phase(), Phase::Serving);
        assert!(!probation.end(), "nothing to end: the stop shuts down");
        assert!(
            drain.claim(DrainReason::Shutdown),
            "and its drain can start"
        );
    }
}
