//! cmsctl's errors, how they read (one line, never tonic's debug dump of a status) and the exit
//! code each kind of failure gives, so that scripts can tell "refused" from "try again later".

/// Exit code of a command whose answer is negative (not all serving, a broken audit chain,
/// rejected import lines).
pub const NEGATIVE: u8 = 1;
/// Bad arguments or input (also clap's own usage errors), and failures not listed below.
pub const USAGE: u8 = 2;
/// Refused: no permission, not authenticated, or not allowed in the current state.
pub const REFUSED: u8 = 3;
/// What was named does not exist.
pub const NOT_FOUND: u8 = 4;
/// The gateway or a service behind it cannot answer now.
pub const UNAVAILABLE: u8 = 5;

/// The exit codes, for `cmsctl --help`.
pub const HELP: &str = "\
Exit codes:
  0  success
  1  the answer is negative (status: not everything serves; audit verify: the chain is broken;
     import and sync: lines were rejected)
  2  usage or input error (bad arguments, a mistyped code, an unreadable file), or another failure
  3  refused: permission denied, not authenticated, or not allowed now (the card's template, a
     missing approval, the card's state)
  4  not found (user, card, approval, template, key ...)
  5  unavailable: the gateway or a service behind it is unreachable, gave no answer in time, or
     asks to slow down; try again later";

#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Tls(#[from] cms_kit::tls::TlsError),
    #[error(transparent)]
    Client(#[from] cms_kit::client::ClientError),
    /// One line: the gateway's answer in words and its message, never tonic's debug dump of
    /// the status (metadata, details).
    #[error("{}", describe(address, status))]
    Rpc {
        address: String,
        status: Box<tonic::Status>,
    },
}

impl Error {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Setup(_) | Error::Tls(_) | Error::Client(_) => USAGE,
            Error::Rpc { status, .. } => code_exit(status.code()),
        }
    }
}

fn code_exit(code: tonic::Code) -> u8 {
    use tonic::Code;
    match code {
        Code::Ok => 0,
        Code::PermissionDenied
        | Code::Unauthenticated
        | Code::FailedPrecondition
        | Code::AlreadyExists
        | Code::Aborted => REFUSED,
        Code::NotFound => NOT_FOUND,
        Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted => UNAVAILABLE,
        Code::InvalidArgument
        | Code::OutOfRange
        | Code::Cancelled
        | Code::Unknown
        | Code::Unimplemented
        | Code::Internal
        | Code::DataLoss => USAGE,
    }
}

/// A gRPC status on one line. The three "try again later" codes read as plain sentences; a
/// status made by the client itself (no connection to the gateway) says so and names the cause.
fn describe(address: &str, status: &tonic::Status) -> String {
    use std::error::Error as _;
    use tonic::Code;
    let message = one_line(status.message());
    let mut root = None;
    let mut source = status.source();
    while let Some(cause) = source {
        root = Some(one_line(&cause.to_string()));
        source = cause.source();
    }
    // tonic gives client-side failures (connect, TLS) a source; answers from the gateway have none.
    if status.code() == Code::Unavailable
        && let Some(root) = root.as_deref()
    {
        return format!("cannot reach the gateway at {address}: {root}; is it running?");
    }
    let plain = match status.code() {
        Code::Unavailable => Some("unavailable now; try again later"),
        Code::DeadlineExceeded => Some("no answer in time; try again later"),
        Code::ResourceExhausted => Some("too many requests; wait a moment and try again"),
        _ => None,
    };
    if let Some(plain) = plain {
        return if message.is_empty() {
            format!("gateway at {address}: {plain}")
        } else {
            format!("gateway at {address}: {plain} ({message})")
        };
    }
    let mut text = format!("gateway at {address}: {}", code_words(status.code()));
    let mut add = |part: &str| {
        if !part.is_empty() && !text.contains(part) {
            text.push_str(": ");
            text.push_str(part);
        }
    };
    add(&message);
    let mut source = status.source();
    while let Some(cause) = source {
        add(&one_line(&cause.to_string()));
        source = cause.source();
    }
    text
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn code_words(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown error",
        Code::InvalidArgument => "invalid argument",
        Code::DeadlineExceeded => "no answer in time",
        Code::NotFound => "not found",
        Code::AlreadyExists => "already exists",
        Code::PermissionDenied => "permission denied",
        Code::ResourceExhausted => "resource exhausted",
        Code::FailedPrecondition => "refused in the current state",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out of range",
        Code::Unimplemented => "not implemented by this gateway",
        Code::Internal => "internal error",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rpc(status: tonic::Status) -> Error {
        Error::Rpc {
            address: "127.0.0.1:7400".into(),
            status: Box::new(status),
        }
    }

    #[test]
    fn each_kind_of_failure_has_its_exit_code() {
        use tonic::{Code, Status};
        for (code, exit) in [
            (Code::PermissionDenied, REFUSED),
            (Code::FailedPrecondition, REFUSED),
            (Code::NotFound, NOT_FOUND),
            (Code::Unavailable, UNAVAILABLE),
            (Code::DeadlineExceeded, UNAVAILABLE),
            (Code::ResourceExhausted, UNAVAILABLE),
            (Code::InvalidArgument, USAGE),
            (Code::Internal, USAGE),
        ] {
            assert_eq!(rpc(Status::new(code, "x")).exit_code(), exit, "{code:?}");
        }
        assert_eq!(Error::Setup("bad".into()).exit_code(), USAGE);
    }

    #[test]
    fn help_lists_the_exit_codes() {
        use clap::CommandFactory;
        let help = crate::Cli::command().render_long_help().to_string();
        for line in [
            "Exit codes:",
            "3  refused",
            "4  not found",
            "5  unavailable",
        ] {
            assert!(help.contains(line), "{line:?} missing from:\n{help}");
        }
    }

    #[test]
    fn try_again_codes_read_as_plain_sentences() {
        let e = rpc(tonic::Status::resource_exhausted(
            "operator \"h\" made too many requests",
        ));
        assert_eq!(
            e.to_string(),
            "gateway at 127.0.0.1:7400: too many requests; wait a moment and try again \
             (operator \"h\" made too many requests)"
        );
        let e = rpc(tonic::Status::deadline_exceeded(""));
        assert_eq!(
            e.to_string(),
            "gateway at 127.0.0.1:7400: no answer in time; try again later"
        );
        let e = rpc(tonic::Status::permission_denied("no\n helpdesk role"));
        assert_eq!(
            e.to_string(),
            "gateway at 127.0.0.1:7400: permission denied: no helpdesk role"
        );
    }
}
