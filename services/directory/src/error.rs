/// Errors of the directory service; mapped to `tonic::Status` in one place.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Tls(#[from] cms_kit::tls::TlsError),
    #[error(transparent)]
    Db(#[from] cms_kit::db::DbError),
    #[error(transparent)]
    Serve(#[from] cms_kit::server::ServeError),
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        // Internal detail stays in the server log; the caller gets a generic message.
        tracing::error!(error = %cms_kit::exit::one_line(&err), "internal error");
        tonic::Status::internal("internal error")
    }
}
