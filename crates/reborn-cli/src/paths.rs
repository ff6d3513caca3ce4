//! Where the control socket and the PID file live.
//!
//! The control socket must be found again by `reborn upgrade|status|stop` without the user
//! repeating a path, so its default location derives from the service's name in a
//! per-user directory: `$XDG_RUNTIME_DIR/reborn/NAME.sock` (systemd's per-user runtime
//! directory, cleaned at logout) or, without it, `/tmp/reborn-UID/NAME.sock`. The
//! directory is created private (0700) and must belong to this user: a directory in
//! `/tmp` that someone else made first could otherwise be used to intercept commands.

use std::ffi::OsStr;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::cli::ControlArgs;

/// The directory that holds this user's default control sockets.
pub fn default_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(dir) if dir.is_absolute() && dir.is_dir() => dir.join("reborn"),
        _ => std::env::temp_dir().join(format!("reborn-{}", nix::unistd::geteuid())),
    }
}

/// A service name derived from the program: its file name, with characters unfit for a
/// file name replaced by `_`.
pub fn name_from_program(program: &OsStr) -> String {
    let base = Path::new(program)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "server".into());
    let clean: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let clean = clean.trim_start_matches('.').to_owned();
    if clean.is_empty() {
        "server".into()
    } else {
        clean
    }
}

/// The control socket path for `reborn run`, creating the default directory if needed.
pub fn control_path_for_run(args: &ControlArgs, program: &OsStr) -> io::Result<PathBuf> {
    if let Some(path) = &args.control {
        return Ok(path.clone());
    }
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| name_from_program(program));
    let dir = default_dir();
    ensure_private_dir(&dir)?;
    Ok(dir.join(format!("{name}.sock")))
}

/// The control socket path for a client command.
pub fn control_path_for_client(args: &ControlArgs) -> Result<PathBuf, String> {
    if let Some(path) = &args.control {
        return Ok(path.clone());
    }
    let dir = default_dir();
    if let Some(name) = &args.name {
        return Ok(dir.join(format!("{name}.sock")));
    }
    let sockets: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension() == Some(OsStr::new("sock")))
                .collect()
        })
        .unwrap_or_default();
    // A master that was killed (SIGKILL, a crash) leaves its socket file behind: nobody
    // listens on it, and it is not a master to choose from.
    let (mut found, mut stale): (Vec<PathBuf>, Vec<PathBuf>) =
        sockets.into_iter().partition(|p| !is_stale(p));
    found.sort();
    stale.sort();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 if !stale.is_empty() => Err(format!(
            "no reborn master of this user is running: nobody listens on {} (left by a \
             master that did not exit cleanly; remove it). Start one with `reborn run`, or give \
             --name NAME or --control PATH as given to `reborn run`",
            stale
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
        0 => Err(format!(
            "no reborn master of this user was found (no control socket in {}); is `reborn \
             run` running as this user? Give --name NAME or --control PATH as given to `reborn run`",
            dir.display()
        )),
        _ => Err(format!(
            "several reborn masters are running ({}); pick one with --name",
            found
                .iter()
                .filter_map(|p| p.file_stem())
                .map(|s| s.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// Whether nobody listens on the socket at `path` any more (connecting is refused). A
/// socket that cannot be tried for another reason (permissions, say) is not called stale.
fn is_stale(path: &Path) -> bool {
    match std::os::unix::net::UnixStream::connect(path) {
        // Closed at once: the master answers `empty request` to nobody, and logs
        // nothing.
        Ok(_) => false,
        Err(e) => e.kind() == io::ErrorKind::ConnectionRefused,
    }
}

/// Creates `dir` with mode 0700, or checks that the existing one belongs to this user and
/// is not writable by others.
fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "cannot create the control socket directory {}: {e}; give --control PATH",
                    dir.display()
                ),
            ));
        }
    }
    let meta = std::fs::metadata(dir)?;
    let me = nix::unistd::geteuid().as_raw();
    if !meta.is_dir() || meta.uid() != me || meta.permissions().mode() & 0o022 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is not a private directory of this user (uid {me}); remove it or give --control PATH",
                dir.display()
            ),
        ));
    }
    Ok(())
}

/// Writes `pid` to `path` atomically (write a temporary file, rename it over).
pub fn write_pid_file(path: &Path, pid: u32) -> io::Result<()> {
    let tmp = path.with_extension(format!("tmp{pid}"));
    std::fs::write(&tmp, format!("{pid}\n"))?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// The runtime files this process made (its control socket, its PID file), removed when
/// dropped — and only those: a `reborn run` that is refused because another master runs
/// under the same name made nothing, so it removes nothing, and a file that was replaced
/// since (another inode) is left to whoever made it.
#[derive(Debug, Default)]
pub struct RuntimeFiles {
    made: Vec<MadeFile>,
}

#[derive(Debug)]
struct MadeFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl RuntimeFiles {
    /// Nothing made yet.
    pub fn new() -> RuntimeFiles {
        RuntimeFiles::default()
    }

    /// Records that this process just made the file at `path` (as it is now on disk).
    pub fn made(&mut self, path: &Path) {
        match std::fs::symlink_metadata(path) {
            Ok(meta) => self.made.push(MadeFile {
                path: path.to_path_buf(),
                dev: meta.dev(),
                ino: meta.ino(),
            }),
            Err(e) => tracing::warn!(
                path = %path.display(),
                error = %e,
                "cannot look at a file just made; it will not be removed at exit"
            ),
        }
    }
}

impl Drop for RuntimeFiles {
    fn drop(&mut self) {
        for f in self.made.drain(..).rev() {
            let same = std::fs::symlink_metadata(&f.path)
                .is_ok_and(|m| m.dev() == f.dev && m.ino() == f.ino);
            if same {
                let _ = std::fs::remove_file(&f.path);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(name_from_program(OsStr::new("/usr/bin/my app")), "my_app");
        assert_eq!(name_from_program(OsStr::new("gunicorn")), "gunicorn");
        assert_eq!(name_from_program(OsStr::new(".hidden")), "hidden");
        assert_eq!(name_from_program(OsStr::new("/")), "server");
    }
}
