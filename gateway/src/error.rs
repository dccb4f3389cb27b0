/// Errors of the gateway; mapped to `tonic::Status` in one place.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Tls(#[from] cms_kit::tls::TlsError),
    #[error(transparent)]
    Client(#[from] cms_kit::client::ClientError),
    #[error(transparent)]
    Serve(#[from] cms_kit::server::ServeError),
    #[error(transparent)]
    Db(#[from] cms_kit::db::DbError),
    #[error("database: {0}")]
    Storage(#[from] sea_orm::DbErr),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("config: {0}")]
    Config(String),
    /// A refusal with its reason code, field and retry hint, as the caller sees it.
    #[error("{}", .0.message())]
    Refused(Box<cms_kit::error_details::Refusal>),
    /// A backend's answer passed on as it came (its message is caller-safe already).
    #[error("{}", .0.message())]
    Backend(tonic::Status),
}

impl Error {
    /// A refusal with a reason code.
    pub fn refused(
        code: tonic::Code,
        reason: cms_proto::common::v1::ErrorReason,
        message: impl Into<String>,
    ) -> Self {
        Self::Refused(Box::new(cms_kit::error_details::Refusal::new(
            code, reason, message,
        )))
    }

    /// PERMISSION_DENIED with its reason.
    pub fn denied(message: impl Into<String>) -> Self {
        Self::Forbidden(message.into())
    }

    /// NOT_FOUND.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::refused(
            tonic::Code::NotFound,
            cms_proto::common::v1::ErrorReason::NotFound,
            message,
        )
    }

    /// INVALID_ARGUMENT naming the field at fault.
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        Self::Refused(Box::new(
            cms_kit::error_details::Refusal::new(
                tonic::Code::InvalidArgument,
                cms_proto::common::v1::ErrorReason::InvalidArgument,
                message,
            )
            .field(field),
        ))
    }

    /// The gRPC code the caller will see.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Self::Forbidden(_) => Code::PermissionDenied,
            Self::BadRequest(_) => Code::InvalidArgument,
            Self::Timeout(_) => Code::DeadlineExceeded,
            Self::Unavailable(_) => Code::Unavailable,
            Self::Refused(r) => r.code(),
            Self::Backend(s) => s.code(),
            _ => Code::Internal,
        }
    }
}

/// The error domain of the gateway's own `google.rpc.ErrorInfo` (errors passed through from
/// custody keep custody's).
pub const DOMAIN: &str = "cms.gateway";

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        use cms_kit::error_details::Refusal;
        use cms_proto::common::v1::ErrorReason;
        use tonic::Code;
        let refusal = |code, reason, msg| Refusal::new(code, reason, msg).into_status(DOMAIN);
        match err {
            Error::Forbidden(msg) => {
                refusal(Code::PermissionDenied, ErrorReason::PermissionDenied, msg)
            }
            Error::BadRequest(msg) => {
                refusal(Code::InvalidArgument, ErrorReason::InvalidArgument, msg)
            }
            Error::Timeout(msg) => refusal(Code::DeadlineExceeded, ErrorReason::Unspecified, msg),
            Error::Unavailable(msg) => refusal(Code::Unavailable, ErrorReason::Unspecified, msg),
            Error::Refused(r) => r.into_status(DOMAIN),
            Error::Backend(status) => status,
            other => {
                // Internal detail stays in the server log; the caller gets a generic message.
                tracing::error!(error = %cms_kit::exit::one_line(&other), "internal error");
                tonic::Status::internal("internal error")
            }
        }
    }
}
