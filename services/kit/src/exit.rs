//! How server binaries end: a one-line message naming the problem and exit code 2 on error,
//! never a panic backtrace.

use std::error::Error;
use std::fmt::Write;
use std::process::ExitCode;

/// Formats an error with its sources as `outer: inner: root` (one line unless a message
/// itself carries lines, like a log tail).
pub fn one_line(err: &(dyn Error + 'static)) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !line.contains(&text) {
            let _ = write!(line, ": {text}");
        }
        source = s.source();
    }
    line
}

/// Builds a multi-threaded runtime, runs `main`, and turns an error into one line on stderr.
pub fn run<E, F>(program: &str, main: impl FnOnce() -> F) -> ExitCode
where
    E: Error + 'static,
    F: std::future::Future<Output = Result<(), E>>,
{
    install_panic_hook(program);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{program}: error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(main()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{program}: error: {}", one_line(&e));
            ExitCode::from(2)
        }
    }
}

/// A panic is a bug; report it on one line (with where it happened) instead of a backtrace.
fn install_panic_hook(program: &str) {
    let program = program.to_owned();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        let place = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("{program}: internal error (a bug, please report it): {message}{place}");
    }));
}
