//! The card transaction behind a trait, so the agent's card code runs the same over PC/SC
//! (cms-card-pcsc) and over the in-process virtual card ([`crate::sim`]).
//!
//! Modelled on openpgp-card's card-backend: a backend hands out an exclusive transaction
//! (PC/SC: SCardBeginTransaction ... SCardEndTransaction); everything that must happen in one card
//! session (GET CHALLENGE, EXTERNAL AUTHENTICATE, RESET RETRY COUNTER) happens inside one.

use crate::apdu::{Command, Response};

/// Why a command did not reach the card or no response came back. The messages are one line,
/// meant for the person at the PC, and never contain APDU data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CardError {
    /// No card in the reader.
    #[error("no card in the reader")]
    NoCard,
    /// The card was removed (or reset by someone else) during the session: anything it held in
    /// RAM, such as a challenge, is gone.
    #[error("the card was removed; insert it and start again")]
    Removed,
    /// The reader is not there (any more).
    #[error("the card reader is gone")]
    ReaderGone,
    /// The PC/SC service is not running.
    #[error("the smart-card service (pcscd) is not running")]
    ServiceUnavailable,
    /// Another application holds the card exclusively.
    #[error("the card is in use by another application")]
    Busy,
    /// A command could not be encoded, or the card's answer was malformed.
    #[error("malformed APDU: {0}")]
    Apdu(#[from] crate::apdu::ApduError),
    /// Any other transport failure (the text names the PC/SC error, never data).
    #[error("card transport error: {0}")]
    Transport(String),
}

/// Something that can give exclusive access to one card.
pub trait CardBackend: Send {
    /// Starts an exclusive transaction on the card (PC/SC: SCardBeginTransaction). The
    /// transaction ends when the returned value is dropped.
    fn transaction(&mut self) -> Result<Box<dyn CardTransaction + '_>, CardError>;
}

/// One exclusive card session.
pub trait CardTransaction {
    /// Sends one command and returns the card's response. Implementations handle the transport
    /// level (T=0 GET RESPONSE, 61xx chaining) so callers see the whole response.
    fn transmit(&mut self, command: &Command) -> Result<Response, CardError>;

    /// The card's answer to reset.
    fn atr(&self) -> &[u8];
}
