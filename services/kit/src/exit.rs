//! How server binaries end: a one-line message naming the problem and exit code 2 on error,
//! never a panic backtrace.

use std::error::Error;
use std::fmt::Write;
use std::process::ExitCode;

/// Formats an error with its sources on one line: `outer: inner: root`.
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
    line.replace('\n', " ")
}

/// Builds a multi-threaded runtime, runs `main`, and turns an error into one line on stderr.
pub fn run<E, F>(program: &str, main: impl FnOnce() -> F) -> ExitCode
where
    E: Error + 'static,
    F: std::future::Future<Output = Result<(), E>>,
{
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
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
