use cms_kit::error_details::Refusal;
use cms_proto::common::v1::ErrorReason;

/// Errors of the directory service; mapped to `tonic::Status` in one place.
///
/// Messages may name fields and echo identifiers (usernames, ids) but never a secret: no
/// security answer, TOTP secret or code ever reaches an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Tls(#[from] cms_kit::tls::TlsError),
    #[error(transparent)]
    Db(#[from] cms_kit::db::DbError),
    #[error(transparent)]
    Serve(#[from] cms_kit::server::ServeError),
    #[error("database migrations: {0}")]
    Migrate(sea_orm::DbErr),
    #[error("secrets.key_file {path}: {reason}")]
    SecretsKey { path: String, reason: String },
    #[error("template: {0}")]
    TemplateClient(String),

    /// A request field is malformed.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("{0} not found")]
    NotFound(String),
    /// The named template does not exist (or not in that version).
    #[error("unknown template: {0}")]
    UnknownTemplate(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// An import or sync refused as a whole; nothing was written.
    #[error("{0}")]
    Import(String),
    #[error("template service unavailable: {0}")]
    Unavailable(String),
    /// A write that could not proceed in time (the database or a queue busy): retry it.
    #[error("{0}")]
    Busy(String),
    /// An LDAP source could not be read (connection, bind, search).
    #[error("{0}")]
    Ldap(String),
    /// Storage and other internal failures; the detail stays in the server log.
    #[error("storage: {0}")]
    Storage(#[from] sea_orm::DbErr),
    #[error("internal: {0}")]
    Internal(String),
}

impl Error {
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.to_owned(),
            message: message.into(),
        }
    }
}

/// The error domain of this service's `google.rpc.ErrorInfo`.
pub const DOMAIN: &str = "cms.directory";

fn status(code: tonic::Code, reason: ErrorReason, field: &str, message: String) -> tonic::Status {
    status_retry(code, reason, field, message, 0)
}

fn status_retry(
    code: tonic::Code,
    reason: ErrorReason,
    field: &str,
    message: String,
    retry_after_seconds: u32,
) -> tonic::Status {
    Refusal::new(code, reason, message)
        .field(field)
        .retry_after_seconds(retry_after_seconds)
        .into_status(DOMAIN)
}

/// UNAVAILABLE with a hint to retry after a second, for a write that could not proceed in
/// time.
fn busy(message: String) -> tonic::Status {
    tracing::warn!(error = %message, "write refused as busy");
    status_retry(
        tonic::Code::Unavailable,
        ErrorReason::Unspecified,
        "",
        message,
        1,
    )
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        use tonic::Code;
        let message = err.to_string();
        match &err {
            Error::Invalid { field, .. } => status(
                Code::InvalidArgument,
                ErrorReason::InvalidArgument,
                field,
                message,
            ),
            Error::Import(_) => status(
                Code::InvalidArgument,
                ErrorReason::InvalidArgument,
                "",
                message,
            ),
            Error::NotFound(_) => status(Code::NotFound, ErrorReason::NotFound, "", message),
            Error::UnknownTemplate(_) => status(
                Code::InvalidArgument,
                ErrorReason::NotFound,
                "template_id",
                message,
            ),
            Error::AlreadyExists(_) => {
                status(Code::AlreadyExists, ErrorReason::AlreadyExists, "", message)
            }
            Error::Conflict(_) => {
                status(Code::Aborted, ErrorReason::VersionConflict, "etag", message)
            }
            Error::FailedPrecondition(_) => status(
                Code::FailedPrecondition,
                ErrorReason::Unspecified,
                "",
                message,
            ),
            Error::Ldap(_) => {
                tracing::warn!(error = %message, "LDAP sync failed");
                status(
                    Code::Unavailable,
                    ErrorReason::Unspecified,
                    "source",
                    message,
                )
            }
            Error::Busy(_) => busy(message),
            Error::Storage(e) if crate::util::busy(e) => {
                busy("the database is busy; try again shortly".into())
            }
            Error::Unavailable(_) => {
                tracing::warn!(error = %message, "dependency unavailable");
                status(
                    Code::Unavailable,
                    ErrorReason::Unspecified,
                    "",
                    "the template service is unavailable".to_owned(),
                )
            }
            Error::Tls(_)
            | Error::Db(_)
            | Error::Serve(_)
            | Error::Migrate(_)
            | Error::SecretsKey { .. }
            | Error::TemplateClient(_)
            | Error::Storage(_)
            | Error::Internal(_) => {
                // Internal detail stays in the server log; the caller gets a generic message.
                tracing::error!(error = %cms_kit::exit::one_line(&err), "internal error");
                tonic::Status::internal("internal error")
            }
        }
    }
}
