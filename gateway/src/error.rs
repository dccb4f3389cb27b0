/// Errors of the gateway; mapped to `tonic::Status` in one place.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Tls(#[from] cms_kit::tls::TlsError),
    #[error(transparent)]
    Client(#[from] cms_kit::client::ClientError),
    #[error(transparent)]
    Serve(#[from] cms_kit::server::ServeError),
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
            other => {
                // Internal detail stays in the server log; the caller gets a generic message.
                tracing::error!(error = %cms_kit::exit::one_line(&other), "internal error");
                tonic::Status::internal("internal error")
            }
        }
    }
}
