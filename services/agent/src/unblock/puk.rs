//! PIV offline: the PIN is reset with the PUK the helpdesk read out (with its checksum).

use cms_proto::agent::v1::{UnblockOutcome, UnblockResult, UnblockWithPukRequest};
use cms_proto::common::v1::ErrorReason;
use cms_proto::template::v1::PinPolicy;

use super::outcome::{blocked, card_error, choose_error, refused, result, success};
use super::{codes, pin};
use crate::card::minidriver::Verdict;
use crate::card::piv;
use crate::card::profile::{Profile, detect};
use crate::card::readers::{Readers, Sharing, choose};

/// Runs the whole flow (blocking).
pub fn unblock(
    readers: &dyn Readers,
    request: &UnblockWithPukRequest,
    configured: Option<&PinPolicy>,
) -> UnblockResult {
    let puk = match codes::puk(&request.puk, &request.puk_checksum) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let policy = pin::in_force(request.pin_policy.as_ref(), configured);
    if let Err(r) = pin::check(&request.new_pin, policy, Profile::Piv) {
        return r;
    }
    let reader = match choose(readers, &request.reader) {
        Ok(r) => r,
        Err(e) => return choose_error(&e),
    };
    let mut backend = match readers.open(&reader, Sharing::Exclusive) {
        Ok(b) => b,
        Err(e) => return card_error(&e),
    };
    let mut tx = match backend.transaction() {
        Ok(tx) => tx,
        Err(e) => return card_error(&e),
    };
    let facts = match detect(&mut *tx, &reader) {
        Ok(f) => f,
        Err(e) => return card_error(&e),
    };
    if facts.profile != Some(Profile::Piv) {
        return result(
            UnblockOutcome::Unsupported,
            ErrorReason::FlowNotAllowed,
            "this card is not a PIV card: unblock it with a challenge and response",
        );
    }
    if !request.expected_card_id.is_empty() && facts.card_id != request.expected_card_id {
        return result(
            UnblockOutcome::CardMismatch,
            ErrorReason::InvalidArgument,
            "the card in the reader is not the expected card; the card was not touched",
        );
    }
    if facts.admin_blocked() {
        return blocked("PUK");
    }
    match piv::reset_with_puk(&mut *tx, &puk, request.new_pin.as_bytes()) {
        Err(e) => card_error(&e),
        Ok(Verdict::Accepted) => success(piv::pin_tries(&mut *tx).ok().flatten()),
        Ok(verdict) => refused(verdict, "PUK", "PUK"),
    }
}
