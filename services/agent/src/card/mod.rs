//! The agent's card code: which readers there are ([`readers`]), what a card is and says about
//! itself ([`profile`]), and the command sequences of the two profiles ([`minidriver`],
//! [`piv`]). Everything here is blocking and runs on a blocking thread or a session's own
//! thread, never on a runtime worker.

pub mod minidriver;
pub mod piv;
pub mod profile;
pub mod readers;
pub mod sim;

use cms_card::apdu::{Command, Response};
use cms_card::backend::{CardError, CardTransaction};

/// Sends one command; transport failures pass through, every status word comes back.
pub fn send(tx: &mut dyn CardTransaction, command: Command) -> Result<Response, CardError> {
    tx.transmit(&command)
}
