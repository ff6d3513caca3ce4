//! Chooses the system path: `reborn_linux` (clone with vfork semantics, pidfd, abstract
//! notify sockets, sender credentials) on Linux, unless the `portable` feature asks for
//! the path every other Unix takes (fork and exec, waitpid, notify sockets in a private
//! directory), so that path is built and tested on Linux too.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(reborn_linux)");
    let linux = std::env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "linux");
    let portable = std::env::var_os("CARGO_FEATURE_PORTABLE").is_some();
    if linux && !portable {
        println!("cargo::rustc-cfg=reborn_linux");
    }
}
