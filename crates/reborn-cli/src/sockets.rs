//! Which of the master's listeners a worker really uses.
//!
//! A new version that moves its listener (another name, another port) closes the socket
//! it was handed and binds its own: clients keep arriving on the master's socket, queue
//! there with no one to accept them, and hang. The master finds that out from `/proc`:
//! the socket inodes open in the processes of the worker's group, compared with its own
//! listeners' inodes, and the listening TCP sockets among them that are not the
//! master's (from `/proc/PID/net/tcp{,6}`, the worker's network namespace).
//!
//! This module only looks; the supervisor decides (see `docs/master.md`).

use std::collections::HashSet;
use std::os::fd::OwnedFd;

/// The inode of a socket, as `/proc/PID/fd` shows it (`socket:[INODE]`).
// `st_ino` is `u64` on Linux but narrower on some other Unix targets.
#[allow(clippy::unnecessary_cast)]
pub fn inode(fd: &OwnedFd) -> Option<u64> {
    nix::sys::stat::fstat(fd).ok().map(|st| st.st_ino as u64)
}

/// What the processes of a worker's group hold.
#[derive(Debug, Default)]
pub struct Held {
    /// The socket inodes open in any of them.
    pub sockets: HashSet<u64>,
    /// Whether anything could be read at all (a process that is gone, or `/proc` not
    /// readable, proves nothing).
    pub readable: bool,
}

/// Looks at the sockets open in `pids`.
pub fn held_by(pids: &[u32]) -> Held {
    let mut held = Held::default();
    if !proc_shows_our_pids() {
        return held;
    }
    for pid in pids {
        let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        held.readable = true;
        for entry in entries.flatten() {
            if let Ok(target) = std::fs::read_link(entry.path())
                && let Some(n) = target
                    .to_str()
                    .and_then(|t| t.strip_prefix("socket:["))
                    .and_then(|t| t.strip_suffix(']'))
                    .and_then(|t| t.parse::<u64>().ok())
            {
                held.sockets.insert(n);
            }
        }
    }
    held
}

/// The addresses of the listening TCP sockets among `held` that are not among `ours`,
/// from the tables of `pid`'s network namespace. Those tables list every socket of the
/// namespace (thousands on a busy host): they are read a line at a time, and only once
/// a listener was found missing.
pub fn own_listening(pid: u32, held: &Held, ours: &[u64]) -> Vec<String> {
    use std::io::BufRead;
    let mut out: Vec<String> = Vec::new();
    for (file, v6) in [("tcp", false), ("tcp6", true)] {
        let Ok(f) = std::fs::File::open(format!("/proc/{pid}/net/{file}")) else {
            continue;
        };
        for line in std::io::BufReader::new(f).lines().skip(1) {
            let Ok(line) = line else {
                break;
            };
            if let Some((addr, inode)) = listening(&line, v6)
                && held.sockets.contains(&inode)
                && !ours.contains(&inode)
                && !out.contains(&addr)
            {
                out.push(addr);
            }
        }
    }
    out
}

/// Whether `/proc` is mounted for our PID namespace. A master started in a new PID
/// namespace without a `/proc` of its own (`unshare --pid --fork`, no `--mount-proc`)
/// sees the host's: its workers' PIDs there name other processes (kernel threads, for
/// the low ones), so what they hold proves nothing about the workers.
fn proc_shows_our_pids() -> bool {
    std::fs::read_link("/proc/self")
        .ok()
        .and_then(|p| p.to_str()?.parse::<u32>().ok())
        == Some(std::process::id())
}

/// A listening socket's line of a `/proc/net/tcp{,6}` table: (address, inode).
fn listening(line: &str, v6: bool) -> Option<(String, u64)> {
    let f: Vec<&str> = line.split_whitespace().collect();
    // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
    if f.len() < 10 || f[3] != "0A" {
        return None;
    }
    Some((parse_addr(f[1], v6)?, f[9].parse::<u64>().ok()?))
}

/// `0100007F:1F90` → `127.0.0.1:8080` (the words are in host byte order).
fn parse_addr(text: &str, v6: bool) -> Option<String> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    if v6 {
        if ip.len() != 32 {
            return None;
        }
        let mut bytes = [0u8; 16];
        for w in 0..4 {
            let word = u32::from_str_radix(&ip[w * 8..w * 8 + 8], 16).ok()?;
            bytes[w * 4..w * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
        Some(std::net::SocketAddr::from((std::net::Ipv6Addr::from(bytes), port)).to_string())
    } else {
        let word = u32::from_str_radix(ip, 16).ok()?;
        let ip = std::net::Ipv4Addr::from(word.to_ne_bytes());
        Some(std::net::SocketAddr::from((ip, port)).to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables() {
        let t = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
                 0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000\n   \
                 1: 0100007F:1F91 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 12346 1 0000\n";
        let found: Vec<_> = t
            .lines()
            .skip(1)
            .filter_map(|l| listening(l, false))
            .collect();
        assert_eq!(found, vec![("127.0.0.1:8080".into(), 12345)]);
        assert_eq!(
            parse_addr("00000000000000000000000001000000:0050", true).as_deref(),
            Some("[::1]:80")
        );
    }
}
