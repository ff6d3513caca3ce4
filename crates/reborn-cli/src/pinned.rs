//! Pinned binaries: the program file of each worker, held open from its start.
//!
//! A deploy replaces the file at the program's path; a bad deploy may leave a broken file
//! there, or nothing. The master executes every worker from the file it opened for it
//! (`execveat` on the descriptor), and keeps the file of the last generation that passed
//! its probation: crash restarts, and the restart after a new worker died on probation,
//! run that one. Only an upgrade reads the path again.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// A program file, held open.
#[derive(Debug)]
pub struct Binary {
    /// The open file.
    pub fd: OwnedFd,
    /// Whether it is a `#!` script (its interpreter opens it by `/dev/fd/N`).
    pub script: bool,
    /// The path it was opened at.
    pub path: PathBuf,
}

impl Binary {
    /// Opens the file now at `path`. A file that may be executed but not read (mode
    /// 0711) is held by `O_PATH`: it runs all the same, unless it is a script.
    pub fn open(path: &Path) -> io::Result<Binary> {
        match File::open(path) {
            Ok(mut file) => {
                let mut head = [0u8; 2];
                let script = file.read_exact(&mut head).is_ok() && &head == b"#!";
                Ok(Binary {
                    fd: file.into(),
                    script,
                    path: path.to_path_buf(),
                })
            }
            // An execute-only binary: Linux can hold it open without read access.
            #[cfg(target_os = "linux")]
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_PATH)
                    .open(path)?;
                Ok(Binary {
                    fd: file.into(),
                    script: false,
                    path: path.to_path_buf(),
                })
            }
            Err(e) => Err(e),
        }
    }
}
