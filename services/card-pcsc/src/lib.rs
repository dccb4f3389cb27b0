//! The PC/SC backend of the card agent, over the `pcsc` crate (pcsc-lite on Linux and macOS,
//! WinSCard on Windows): readers and their cards, card insertion and removal events, and cards
//! opened exclusively or shared whose transactions implement cms-card's [`CardBackend`].
//!
//! Errors map to [`CardError`] in one place ([`error::card_error`]): pcscd not running, a reader
//! that disappeared and a removed card are the three a person at the PC can act on.
//!
//! [`CardBackend`]: cms_card::backend::CardBackend
//! [`CardError`]: cms_card::backend::CardError

mod card;
pub mod error;
mod events;
mod readers;

pub use card::PcscCard;
pub use events::{ReaderEvent, ReaderWatcher, Watch, WatchCanceller};
pub use readers::{Pcsc, ReaderStatus, Sharing};
