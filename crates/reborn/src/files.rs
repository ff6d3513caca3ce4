//! Open files: the limit, a reserve of descriptors for upgrades, and what to say when
//! they run out.
//!
//! A server full of connections can reach its open-files limit. Accepting then fails
//! with `EMFILE` until a connection closes, which is survivable; but an upgrade needs a
//! few descriptors of its own (a notify socket, the pipe through which a failed `exec`
//! reports), and without them the one way out (a new version, with more room) is shut
//! too. So:
//!
//! * at start-up the soft limit is raised to the hard limit (as Go's runtime does), which
//!   is where most "too many open files" end;
//! * a [`Reserve`] of descriptors (on `/dev/null`) is held from the start of a first
//!   process, and from the moment a process that replaces another is ready (not before:
//!   its start-up is on the upgrade's clock), given back to the system for the moment an
//!   upgrade starts its new process, then taken again;
//!   the accept loop, when it is out of descriptors, does not retry while the reserve is
//!   out, so it cannot take those descriptors first;
//! * errors that say "too many open files" name the count and the limit and tell what to
//!   raise ([`advice`]).

use std::fs::File;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// How many descriptors the reserve holds: an upgrade needs about six.
const RESERVE: usize = 16;

/// Raises the soft open-files limit to the hard limit. Returns the old and new soft
/// limits when it changed them.
pub(crate) fn raise_soft_limit() -> std::io::Result<Option<(u64, u64)>> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft >= hard {
        return Ok(None);
    }
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    Ok(Some((soft, hard)))
}

/// Whether `e` says this process, or the system, is out of file descriptors.
pub(crate) fn exhausted(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// What to do about an error that says the descriptors ran out: how many this process
/// has open, its limit, and how to raise it.
pub(crate) fn advice(e: &std::io::Error) -> String {
    // Counting needs a descriptor too: at the limit, the count is the limit.
    let open = std::fs::read_dir("/proc/self/fd").map(|d| d.count().saturating_sub(1));
    let limit = getrlimit(Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| soft.to_string())
        .unwrap_or_else(|_| "?".into());
    if e.raw_os_error() == Some(libc::ENFILE) {
        let open = open.map_or_else(|_| "?".into(), |n| n.to_string());
        return format!(
            "the system's table of open files is full (this process has {open} open): \
             raise fs.file-max, or find what holds them"
        );
    }
    let open = match open {
        Ok(n) => format!("this process has {n} files open, its limit is {limit}"),
        Err(_) => format!("this process has all the files open its limit is {limit} allows"),
    };
    format!(
        "{open}: raise the limit (`ulimit -n`, LimitNOFILE= in a systemd unit, \
         --ulimit nofile= in Docker)"
    )
}

/// Descriptors held back for an upgrade (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct Reserve {
    files: Mutex<Vec<File>>,
    out: AtomicBool,
}

impl Reserve {
    /// An empty reserve; [`fill`](Self::fill) takes its descriptors.
    pub(crate) fn new() -> Reserve {
        Reserve::default()
    }

    /// Takes the reserve's descriptors (as many as the system gives): one `open` and its
    /// duplicates; a full reserve is left as it is. A first process calls it as it is
    /// built, one that replaces another once it has reported ready, off the path of the
    /// handoff.
    pub(crate) fn fill(&self) {
        let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        if files.is_empty() {
            // std opens with O_CLOEXEC, and duplicates likewise: a new process never
            // inherits these.
            match File::open("/dev/null") {
                Ok(f) => files.push(f),
                Err(_) => return,
            }
        }
        while files.len() < RESERVE {
            match files[0].try_clone() {
                Ok(f) => files.push(f),
                Err(_) => break,
            }
        }
    }

    /// Gives the reserve back to the system until the returned guard is dropped.
    pub(crate) fn release(&self) -> Released<'_> {
        self.out.store(true, Ordering::SeqCst);
        self.files.lock().unwrap_or_else(|e| e.into_inner()).clear();
        Released(self)
    }

    /// Whether the reserve is given back right now (an upgrade is starting its process).
    pub(crate) fn is_out(&self) -> bool {
        self.out.load(Ordering::SeqCst)
    }
}

/// The reserve is out; dropping this takes it again.
#[derive(Debug)]
pub(crate) struct Released<'a>(&'a Reserve);

impl Drop for Released<'_> {
    fn drop(&mut self) {
        self.0.fill();
        self.0.out.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advice_names_the_limit_and_how_to_raise_it() {
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
        assert!(exhausted(&emfile));
        let text = advice(&emfile);
        assert!(
            text.contains("ulimit -n") && text.contains("its limit is "),
            "{text}"
        );
        let enfile = std::io::Error::from_raw_os_error(libc::ENFILE);
        assert!(exhausted(&enfile));
        assert!(advice(&enfile).contains("fs.file-max"));
        assert!(!exhausted(&std::io::Error::from_raw_os_error(libc::EACCES)));
    }

    #[test]
    fn the_reserve_is_given_back_and_taken_again() {
        let reserve = Reserve::new();
        let count = || reserve.files.lock().unwrap().len();
        assert_eq!(count(), 0);
        reserve.fill();
        assert_eq!(count(), RESERVE);
        {
            let _out = reserve.release();
            assert!(reserve.is_out());
            assert_eq!(count(), 0);
        }
        assert!(!reserve.is_out());
        assert_eq!(count(), RESERVE);
    }
}
