//! TODO docs
#![warn(missing_docs)]

pub mod activation;
pub mod drain;
pub mod error;
pub mod listeners;
pub mod notify;
mod readiness;
mod serve;
mod server;
pub mod signals;
pub mod spawn;
pub mod upgrade;

use std::sync::Mutex;

pub use drain::{Phase, Shutdown};
pub use error::{Error, Result};
pub use listeners::{ListenAddr, Listener};
pub use serve::BoxError;
pub use server::{Builder, ReadyMode, Reborn};
pub use signals::Signal;
pub use upgrade::{UpgradeError, Upgraded};

use activation::{ActivationError, ProcessEnv};

static EARLY: Mutex<Option<Result<ProcessEnv, ActivationError>>> = Mutex::new(None);
static PROCESS: std::sync::OnceLock<server::ProcessInfo> = std::sync::OnceLock::new();

/// Takes what the process was started with — inherited sockets, `NOTIFY_SOCKET`, the
/// program's path, arguments, environment and working directory — while the process is
/// still single-threaded, so the socket-activation variables can be removed from the
/// environment soundly. Call it first thing in `main`, before a tokio runtime starts.
///
/// Optional: [`Reborn::builder`] does the same later, but then leaves the variables in a
/// multi-threaded process's environment (it never hands them on itself).
pub fn init() {
    process_info();
    let mut early = EARLY.lock().unwrap_or_else(|e| e.into_inner());
    if early.is_none() {
        *early = Some(activation::take_from_env());
    }
}

pub(crate) fn take_process_env() -> Result<ProcessEnv, ActivationError> {
    process_info();
    let early = EARLY.lock().unwrap_or_else(|e| e.into_inner()).take();
    match early {
        Some(env) => env,
        None => activation::take_from_env(),
    }
}

/// The program's path, arguments, environment and working directory at start-up.
pub(crate) fn process_info() -> &'static server::ProcessInfo {
    PROCESS.get_or_init(|| {
        let mut args = std::env::args_os();
        let arg0 = args.next().unwrap_or_default();
        let cwd = std::env::current_dir().ok();
        let exe = program_path(&arg0, cwd.as_deref());
        let env = std::env::vars_os()
            .filter(|(k, _)| {
                !activation::CONSUMED_VARS
                    .iter()
                    .any(|c| std::ffi::OsStr::new(c) == k)
            })
            .collect();
        server::ProcessInfo {
            exe,
            arg0,
            args: args.collect(),
            env,
            cwd,
        }
    })
}

/// The path to start at an upgrade: `argv[0]` when it names a file (made absolute, so it
/// survives a `chdir`, and not resolved through symlinks, so a symlink switched to a new
/// release is followed), else the executable's own path.
fn program_path(arg0: &std::ffi::OsStr, cwd: Option<&std::path::Path>) -> std::path::PathBuf {
    use std::os::unix::ffi::OsStrExt;
    let path = std::path::Path::new(arg0);
    if arg0.as_bytes().contains(&b'/') {
        let joined = match cwd {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path.to_path_buf(),
        };
        let abs = std::path::absolute(&joined).unwrap_or(joined);
        if abs.is_file() {
            return abs;
        }
    }
    std::env::current_exe()
        .ok()
        .or_else(|| spawn::resolve_program(arg0))
        .unwrap_or_else(|| path.to_path_buf())
}

/// Serves `service` on `addr` with everything reborn does, in one call: the `axum::serve`
/// of zero-downtime upgrades. The listener is named `http`.
///
/// ```no_run
/// use axum::{Router, routing::get};
///
/// #[tokio::main]
/// async fn main() -> Result<(), reborn::Error> {
///     let app = Router::new().route("/", get(|| async { "hello" }));
///     reborn::serve("0.0.0.0:8080", app).await
/// }
/// ```
///
/// # Errors
/// A bad address, a port in use, a malformed socket-activation environment.
pub async fn serve<S, B>(addr: &str, service: S) -> Result<()>
where
    S: tower::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let reborn = Reborn::new()?;
    let listener = reborn.listen("http", addr)?;
    reborn.serve(listener, service).await
}

/// As [`serve`], but blocking, and it starts the tokio runtime itself after [`init`]: the
/// complete `main` of a server.
///
/// ```no_run
/// use axum::{Router, routing::get};
///
/// fn main() -> Result<(), reborn::Error> {
///     let app = Router::new().route("/", get(|| async { "hello" }));
///     reborn::listen_and_serve("0.0.0.0:8080", app)
/// }
/// ```
///
/// # Errors
/// As [`serve`], and a runtime that cannot start.
pub fn listen_and_serve<S, B>(addr: &str, service: S) -> Result<()>
where
    S: tower::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    init();
    let reborn = Reborn::new()?;
    let listener = reborn.listen("http", addr)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)?
        .block_on(reborn.serve(listener, service))
}
