use cms_kit::error_details::Refusal;
use cms_proto::common::v1::ErrorReason;
use cms_proto::template::v1::{Severity, Violation};

/// Errors of the template service; mapped to `tonic::Status` in one place.
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

    /// A request field is malformed.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// The spec has violations of severity ERROR.
    #[error("invalid template: {}", summary(.0))]
    Policy(Vec<Violation>),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error(
        "template {id} is at version {current}, not {expected}: reload it and apply the change again"
    )]
    VersionConflict {
        id: String,
        expected: u32,
        current: u32,
    },
    #[error("{0}")]
    FailedPrecondition(String),
    /// Storage failures; the detail stays in the server log.
    #[error("storage: {0}")]
    Storage(#[from] sea_orm::DbErr),
}

impl Error {
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.to_owned(),
            message: message.into(),
        }
    }
}

/// The error-severity violations, `field: message` joined by "; ".
fn summary(violations: &[Violation]) -> String {
    violations
        .iter()
        .filter(|v| v.severity == Severity::Error as i32)
        .map(|v| format!("{} ({})", v.message, v.code))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The error domain of this service's `google.rpc.ErrorInfo`.
pub const DOMAIN: &str = "cms.template";

fn status(code: tonic::Code, reason: ErrorReason, field: &str, message: String) -> tonic::Status {
    Refusal::new(code, reason, message)
        .field(field)
        .into_status(DOMAIN)
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
            Error::Policy(violations) => {
                let errors = violations
                    .iter()
                    .filter(|v| v.severity == Severity::Error as i32);
                let field = errors.clone().next().map(|v| v.field.clone());
                Refusal::new(Code::InvalidArgument, ErrorReason::InvalidArgument, message)
                    .field(field.unwrap_or_default())
                    .violations(
                        errors.map(|v| (v.field.clone(), format!("{} ({})", v.message, v.code))),
                    )
                    .into_status(DOMAIN)
            }
            Error::NotFound(_) => status(Code::NotFound, ErrorReason::NotFound, "", message),
            Error::AlreadyExists(_) => {
                status(Code::AlreadyExists, ErrorReason::AlreadyExists, "", message)
            }
            Error::VersionConflict { .. } => status(
                Code::Aborted,
                ErrorReason::VersionConflict,
                "expected_current_version",
                message,
            ),
            Error::FailedPrecondition(_) => status(
                Code::FailedPrecondition,
                ErrorReason::Unspecified,
                "",
                message,
            ),
            Error::Tls(_)
            | Error::Db(_)
            | Error::Serve(_)
            | Error::Migrate(_)
            | Error::Storage(_) => {
                // Internal detail stays in the server log; the caller gets a generic message.
                tracing::error!(error = %cms_kit::exit::one_line(&err), "internal error");
                tonic::Status::internal("internal error")
            }
        }
    }
}
