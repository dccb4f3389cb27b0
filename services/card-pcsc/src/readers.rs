//! The PC/SC context: listing readers with their card state, and connecting to a card.

use std::ffi::{CStr, CString};
use std::time::Duration;

use cms_card::backend::CardError;
use pcsc::{Context, Protocols, ReaderState, Scope, ShareMode, State};

use crate::card::PcscCard;
use crate::error::card_error;

/// A reader as PC/SC reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReaderStatus {
    /// Reader name, unique on this host.
    pub name: String,
    /// Whether a card is in the reader.
    pub card_present: bool,
    /// The card's answer-to-reset; empty when no card is present.
    pub atr: Vec<u8>,
    /// Whether another application holds the card exclusively.
    pub in_use: bool,
}

/// How the agent opens a card.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    /// No other application may use the card while it is open (unblock flows).
    Exclusive,
    /// Others may use the card between our transactions (reading card information).
    Shared,
}

/// A connection to pcsc-lite's resource manager (pcscd).
#[derive(Clone)]
pub struct Pcsc {
    context: Context,
}

impl std::fmt::Debug for Pcsc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pcsc").finish_non_exhaustive()
    }
}

impl Pcsc {
    /// Connects to pcscd; `CardError::ServiceUnavailable` when it is not running.
    pub fn establish() -> Result<Self, CardError> {
        let context = Context::establish(Scope::User).map_err(card_error)?;
        Ok(Pcsc { context })
    }

    /// Names of the readers present now (none is not an error).
    pub fn reader_names(&self) -> Result<Vec<CString>, CardError> {
        match self.context.list_readers_owned() {
            Ok(names) => Ok(names),
            Err(pcsc::Error::NoReadersAvailable) => Ok(Vec::new()),
            Err(e) => Err(card_error(e)),
        }
    }

    /// Every reader with its card state.
    pub fn readers(&self) -> Result<Vec<ReaderStatus>, CardError> {
        let names = self.reader_names()?;
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let mut states: Vec<ReaderState> = names
            .into_iter()
            .map(|n| ReaderState::new(n, State::UNAWARE))
            .collect();
        // UNAWARE makes pcscd answer at once with the current state of each reader.
        match self.context.get_status_change(Duration::ZERO, &mut states) {
            Ok(()) | Err(pcsc::Error::Timeout) => {}
            Err(e) => return Err(card_error(e)),
        }
        Ok(states.iter().map(reader_status).collect())
    }

    /// The state of one reader; `CardError::ReaderGone` when there is no such reader.
    pub fn reader(&self, name: &str) -> Result<ReaderStatus, CardError> {
        self.readers()?
            .into_iter()
            .find(|r| r.name == name)
            .ok_or(CardError::ReaderGone)
    }

    /// Connects to the card in `reader`. An exclusive connection fails with
    /// `CardError::Busy` while another application has the card open.
    pub fn connect(&self, reader: &str, sharing: Sharing) -> Result<PcscCard, CardError> {
        let name = CString::new(reader).map_err(|_| CardError::ReaderGone)?;
        let mode = match sharing {
            Sharing::Exclusive => ShareMode::Exclusive,
            Sharing::Shared => ShareMode::Shared,
        };
        let card = self
            .context
            .connect(&name, mode, Protocols::ANY)
            .map_err(|e| {
                if crate::error::is_sharing_violation(e) {
                    CardError::Busy
                } else {
                    card_error(e)
                }
            })?;
        PcscCard::new(card, reader.to_owned(), sharing)
    }
}

pub(crate) fn name_of(name: &CStr) -> String {
    name.to_string_lossy().into_owned()
}

pub(crate) fn reader_status(state: &ReaderState) -> ReaderStatus {
    let event = state.event_state();
    let card_present = event.contains(State::PRESENT) && !event.contains(State::MUTE);
    ReaderStatus {
        name: name_of(state.name()),
        card_present,
        atr: if card_present {
            state.atr().to_vec()
        } else {
            Vec::new()
        },
        in_use: event.contains(State::EXCLUSIVE),
    }
}
