//! The README's install command works: `cargo install --path crates/reborn-cli` into a
//! temporary root gives a `reborn` that runs.

use std::path::Path;
use std::process::Command;

#[test]
fn cargo_install_from_the_repository_gives_a_working_reborn() {
    let root = tempfile::tempdir().unwrap();
    let package = Path::new(env!("CARGO_MANIFEST_DIR"));
    // The shared target directory and the debug profile: the build reuses what the test
    // run compiled instead of a release build from scratch; --locked: the repository's
    // Cargo.lock, as a user's install from it would (with --locked).
    let target = reborn_testkit::target_dir();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "install",
            "--quiet",
            "--offline",
            "--locked",
            "--debug",
            "--path",
        ])
        .arg(package)
        .arg("--root")
        .arg(root.path())
        .env("CARGO_TARGET_DIR", target.parent().unwrap())
        .output()
        .expect("cargo runs");
    assert!(
        out.status.success(),
        "cargo install failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reborn = root.path().join("bin/reborn");
    let version = Command::new(&reborn).arg("--version").output().unwrap();
    assert!(version.status.success());
    assert_eq!(
        String::from_utf8_lossy(&version.stdout),
        format!("reborn {}\n", env!("CARGO_PKG_VERSION"))
    );
    let help = Command::new(&reborn).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for command in ["run", "upgrade", "status", "stop"] {
        assert!(help.contains(command), "{help}");
    }
}
