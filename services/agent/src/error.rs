use cms_card::backend::CardError;

use crate::card::readers::ChooseError;

/// Errors of the agent; mapped to `tonic::Status` in one place.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Tls(#[from] cms_kit::tls::TlsError),
    #[error(transparent)]
    Serve(#[from] cms_kit::server::ServeError),
    #[error(transparent)]
    Client(#[from] cms_kit::client::ClientError),
    #[error("agent_id: {0}")]
    AgentId(String),
    /// The local API socket (bind, permissions, serve).
    #[error("local_api: {0}")]
    LocalApi(String),
    /// A reader or card problem: one line a person can act on.
    #[error(transparent)]
    Card(#[from] CardError),
    #[error(transparent)]
    Choose(#[from] ChooseError),
    /// The card cannot do what was asked (wrong profile, blocked, not the expected card).
    #[error("{0}")]
    Refused(String),
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        // Card and reader messages are fixed texts without card data: safe to send. Anything
        // else stays in the server log; the caller gets a generic message.
        match &err {
            Error::Card(card) => {
                let message = card.to_string();
                match card {
                    CardError::ReaderGone => tonic::Status::not_found(message),
                    CardError::NoCard => tonic::Status::failed_precondition(message),
                    CardError::Removed => tonic::Status::aborted(message),
                    _ => tonic::Status::unavailable(message),
                }
            }
            Error::Choose(ChooseError::Card(CardError::ReaderGone)) => {
                tonic::Status::not_found(err.to_string())
            }
            Error::Choose(_) | Error::Refused(_) => {
                tonic::Status::failed_precondition(err.to_string())
            }
            _ => {
                tracing::error!(error = %cms_kit::exit::one_line(&err), "internal error");
                tonic::Status::internal("internal error")
            }
        }
    }
}
