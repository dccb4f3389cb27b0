//! The unblock flows that need no server: offline challenge/response (a session that holds the
//! card between GetChallenge and ApplyResponse), PIV with the PUK read out by the helpdesk, and
//! the System Owner token with its unblock key. Every typed code and the new PIN are checked
//! before the card sees a byte.

pub mod codes;
pub mod outcome;
pub mod pin;
pub mod puk;
pub mod session;
pub mod so_token;

use cms_card::backend::CardTransaction;
use cms_proto::agent::v1::UnblockResult;

use crate::card::minidriver::{self, Verdict};
use outcome::{card_error, refused, result, success};

/// EXTERNAL AUTHENTICATE with the response to the challenge the card just gave, then RESET
/// RETRY COUNTER with the new PIN: the minidriver unblock, for helpdesk and SO token alike.
pub fn authenticate_and_reset(
    tx: &mut dyn CardTransaction,
    response: &[u8],
    new_pin: &[u8],
    admin: &str,
) -> UnblockResult {
    match minidriver::external_authenticate(tx, response) {
        Err(e) => card_error(&e),
        Ok(Verdict::Accepted) => match minidriver::reset_pin(tx, new_pin) {
            Err(e) => card_error(&e),
            Ok(Verdict::Accepted) => success(minidriver::pin_tries(tx).ok().flatten()),
            Ok(_) => result(
                cms_proto::agent::v1::UnblockOutcome::PinRejected,
                cms_proto::common::v1::ErrorReason::PinPolicyViolation,
                "the card accepted the response but refused the new PIN; start again with a PIN the card takes",
            ),
        },
        Ok(verdict) => refused(verdict, "response", admin),
    }
}
