//! Custody's errors and their one mapping to `tonic::Status`. Every refusal has its own code
//! and `cms.common.v1.ErrorDetail` reason so callers can tell them apart; messages name what
//! is wrong and never carry a key, challenge or response.

use cms_proto::common::v1::{ErrorDetail, ErrorReason};
use tonic::Code;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // Start-up.
    #[error(transparent)]
    Tls(#[from] cms_kit::tls::TlsError),
    #[error(transparent)]
    Db(#[from] cms_kit::db::DbError),
    #[error(transparent)]
    Serve(#[from] cms_kit::server::ServeError),
    #[error("database migration: {0}")]
    Migrate(#[source] sea_orm::DbErr),
    #[error(transparent)]
    Seal(#[from] crate::seal::SealError),
    #[error(
        "another custody instance is using this database: {path} is locked by it (one custody per SQLite database; run several only on PostgreSQL)"
    )]
    DatabaseInUse { path: String },
    #[error("lock file {path}: {source}")]
    LockFile {
        path: String,
        source: std::io::Error,
    },

    // Refusals.
    #[error(
        "this custody instance is a standby: another instance holds the lease and serves; retry (a standby takes over within seconds when the active one goes)"
    )]
    Standby,
    #[error("custody is sealed: unseal it with the custodians' shares")]
    Sealed,
    #[error("custody has no key-encryption key yet: run `cmsctl custody init`")]
    Uninitialised,
    #[error("custody failed its start-up self-test and refuses all work")]
    SelfTestFailed,
    #[error("{0}")]
    NotAllowed(String),
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("{field}: {source}")]
    Code {
        field: &'static str,
        source: cms_cardcrypto::CodeError,
    },
    #[error("no master key {reference} version {version}")]
    UnknownKey { reference: String, version: u32 },
    #[error("master key {reference} version {version} is retired")]
    Retired { reference: String, version: u32 },
    #[error(
        "master key {reference} version {version} is its current version, and the current version cannot be retired: rotate the key first, then retire this version"
    )]
    RetireCurrent { reference: String, version: u32 },
    #[error(
        "master key {reference} version {version} was made by the {made_by} keystore backend, and this custody runs the {running} backend: run custody with keystore.backend = \"{made_by}\", or import the key again"
    )]
    OtherBackend {
        reference: String,
        version: u32,
        made_by: crate::config::KeystoreBackend,
        running: crate::config::KeystoreBackend,
    },
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    NotFound(String),
    #[error("key check value does not match: {0}")]
    KcvMismatch(String),
    #[error(
        "this challenge was already answered for this card; read a new challenge from the card"
    )]
    Replay,
    #[error(
        "this card reached its limit of {limit} key uses in {window_hours} h (cryptograms and PIV PUK releases count together)"
    )]
    CardLimit { limit: u32, window_hours: u64 },
    #[error("too many requests from this caller; retry shortly")]
    CallerRate,
    #[error("custody is at its limit of requests in progress; retry shortly")]
    Overloaded,
    #[error("the audit log cannot be written, so the request was refused")]
    AuditUnavailable,
    #[error("{0}")]
    Precondition(String),

    // Internal: logged, never sent.
    #[error("database: {0}")]
    Store(#[from] sea_orm::DbErr),
    #[error(transparent)]
    Keystore(#[from] crate::keystore::KeystoreError),
    #[error(transparent)]
    Audit(crate::audit::AuditError),
}

impl From<crate::audit::AuditError> for Error {
    fn from(e: crate::audit::AuditError) -> Self {
        match e {
            crate::audit::AuditError::Unavailable(_)
            | crate::audit::AuditError::Stopped
            | crate::audit::AuditError::Broken(_) => {
                tracing::error!(error = %cms_kit::exit::one_line(&e), "audit write failed");
                Self::AuditUnavailable
            }
            other => Self::Audit(other),
        }
    }
}

impl Error {
    /// The gRPC code the error is answered with.
    pub(crate) fn code(&self) -> Code {
        self.classify().map_or(Code::Internal, |(code, ..)| code)
    }

    fn classify(&self) -> Option<(Code, ErrorReason, &'static str)> {
        use ErrorReason as R;
        Some(match self {
            Self::Sealed => (Code::FailedPrecondition, R::CustodySealed, ""),
            Self::Uninitialised => (Code::FailedPrecondition, R::CustodySealed, ""),
            Self::SelfTestFailed => (Code::FailedPrecondition, R::CustodySelfTestFailed, ""),
            Self::NotAllowed(_) => (Code::PermissionDenied, R::PermissionDenied, ""),
            Self::Invalid { field, .. } => (Code::InvalidArgument, R::InvalidArgument, field),
            Self::Code { field, source } => (
                Code::InvalidArgument,
                match source {
                    cms_cardcrypto::CodeError::ChecksumMismatch => R::CodeChecksumMismatch,
                    cms_cardcrypto::CodeError::ChecksumMalformed => R::CodeChecksumMismatch,
                    cms_cardcrypto::CodeError::ChecksumMissing { .. } => R::CodeChecksumMissing,
                    cms_cardcrypto::CodeError::NotHex { .. } => R::CodeNotHex,
                    _ => R::CodeWrongLength,
                },
                field,
            ),
            Self::UnknownKey { .. } | Self::NotFound(_) => (Code::NotFound, R::NotFound, ""),
            Self::Retired { .. } | Self::RetireCurrent { .. } | Self::Precondition(_) => {
                (Code::FailedPrecondition, R::Unspecified, "")
            }
            Self::OtherBackend { .. } => (Code::FailedPrecondition, R::KeyFromOtherBackend, ""),
            Self::AlreadyExists(_) => (Code::AlreadyExists, R::AlreadyExists, ""),
            Self::KcvMismatch(_) => (Code::InvalidArgument, R::KcvMismatch, ""),
            Self::Replay => (Code::AlreadyExists, R::ReplayedChallenge, "challenge"),
            Self::CardLimit { .. } => (Code::ResourceExhausted, R::CardLimitReached, ""),
            Self::CallerRate => (Code::ResourceExhausted, R::RateLimited, ""),
            Self::Overloaded => (Code::ResourceExhausted, R::Overloaded, ""),
            Self::AuditUnavailable => (Code::Unavailable, R::AuditUnavailable, ""),
            Self::Standby => (Code::Unavailable, R::Unspecified, ""),
            Self::Seal(e) => match e {
                crate::seal::SealError::Share(_, code) => (
                    Code::InvalidArgument,
                    match code {
                        cms_cardcrypto::CodeError::ChecksumMismatch => R::CodeChecksumMismatch,
                        cms_cardcrypto::CodeError::ChecksumMissing { .. } => R::CodeChecksumMissing,
                        cms_cardcrypto::CodeError::NotHex { .. } => R::CodeNotHex,
                        _ => R::CodeWrongLength,
                    },
                    "share",
                ),
                crate::seal::SealError::ShareLength(_)
                | crate::seal::SealError::WrongShares
                | crate::seal::SealError::Duplicate(_)
                | crate::seal::SealError::Parameters { .. } => {
                    (Code::InvalidArgument, R::InvalidArgument, "share")
                }
                crate::seal::SealError::Wrap(_) | crate::seal::SealError::DevFile { .. } => {
                    return None;
                }
            },
            _ => return None,
        })
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        match err.classify() {
            Some((code, reason, field)) => {
                let retry_after_seconds = match err {
                    Error::CallerRate | Error::Overloaded | Error::Standby => 1,
                    _ => 0,
                };
                // The standard rich error details, with our ErrorDetail among them.
                cms_kit::error_details::Refusal::new(code, reason, err.to_string())
                    .field(field)
                    .retry_after_seconds(retry_after_seconds)
                    .into_status(DOMAIN)
            }
            None => {
                // Internal detail stays in the server log; the caller gets a generic message.
                tracing::error!(error = %cms_kit::exit::one_line(&err), "internal error");
                tonic::Status::internal("internal error")
            }
        }
    }
}

/// The error domain of custody's `google.rpc.ErrorInfo`.
pub const DOMAIN: &str = "cms.custody";

/// The ErrorDetail a custody status carries, for clients and tests.
pub fn detail(status: &tonic::Status) -> Option<ErrorDetail> {
    cms_kit::error_details::detail(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each limit has its own reason: a caller can tell "retry in a second" (its rate, the
    /// server's load) from "this card is done for the window".
    #[test]
    fn limits_have_distinct_reasons() {
        let reason = |e: Error| e.classify().map(|(code, reason, _)| (code, reason));
        let card = Error::CardLimit {
            limit: 3,
            window_hours: 24,
        };
        assert!(card.to_string().contains("PUK releases"), "{card}");
        assert_eq!(
            reason(card),
            Some((Code::ResourceExhausted, ErrorReason::CardLimitReached))
        );
        assert_eq!(
            reason(Error::CallerRate),
            Some((Code::ResourceExhausted, ErrorReason::RateLimited))
        );
        assert_eq!(
            reason(Error::Overloaded),
            Some((Code::ResourceExhausted, ErrorReason::Overloaded))
        );
    }
}
