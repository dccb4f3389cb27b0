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

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        match err {
            Error::Forbidden(msg) => tonic::Status::permission_denied(msg),
            Error::BadRequest(msg) => tonic::Status::invalid_argument(msg),
            Error::Timeout(msg) => tonic::Status::deadline_exceeded(msg),
            Error::Unavailable(msg) => tonic::Status::unavailable(msg),
            other => {
                // Internal detail stays in the server log; the caller gets a generic message.
                tracing::error!(error = %cms_kit::exit::one_line(&other), "internal error");
                tonic::Status::internal("internal error")
            }
        }
    }
}
