//! Card code shared by the card agent (PC side) and the virtual card (`cms-vcard`).
//!
//! * [`apdu`]: command and response APDUs (short and extended), status words; data is wiped on
//!   drop and never printed.
//! * [`backend`]: the exclusive card transaction behind a trait ([`CardBackend`],
//!   [`CardTransaction`]) and [`CardError`].
//! * [`iso7816`], [`piv`], [`minidriver`]: instruction bytes, references, AIDs, data-object tags
//!   and encodings of the two card profiles.
//! * [`sim`]: the virtual card (both profiles, retry counters, challenge invalidation, card file,
//!   APDU log) and [`sim::SimReader`], the in-process [`CardBackend`] over it.

#![forbid(unsafe_code)]

pub mod apdu;
pub mod backend;
pub mod iso7816;
pub mod minidriver;
pub mod piv;
pub mod sim;

pub use apdu::{ApduError, Command, Response, StatusWord};
pub use backend::{CardBackend, CardError, CardTransaction};
