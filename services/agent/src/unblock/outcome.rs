//! Building the [`UnblockResult`] a person reads: one line that says what happened and what to
//! do next, never a PIN, code or key.

use cms_card::backend::CardError;
use cms_proto::agent::v1::{UnblockOutcome, UnblockResult};
use cms_proto::common::v1::ErrorReason;

use crate::card::minidriver::Verdict;
use crate::card::readers::ChooseError;

pub fn result(
    outcome: UnblockOutcome,
    reason: ErrorReason,
    message: impl Into<String>,
) -> UnblockResult {
    UnblockResult {
        outcome: outcome as i32,
        pin_tries_left: None,
        admin_tries_left: None,
        message: message.into(),
        reason: reason as i32,
    }
}

pub fn success(pin_tries_left: Option<u8>) -> UnblockResult {
    UnblockResult {
        pin_tries_left: pin_tries_left.map(u32::from),
        ..result(
            UnblockOutcome::Success,
            ErrorReason::Unspecified,
            "the PIN was reset: the card works with the new PIN",
        )
    }
}

/// A card transport failure during a flow.
pub fn card_error(err: &CardError) -> UnblockResult {
    match err {
        CardError::Removed | CardError::NoCard => result(
            UnblockOutcome::CardRemoved,
            ErrorReason::CardSessionLost,
            "the card was removed: the challenge is void; insert the card and start again",
        ),
        other => result(
            UnblockOutcome::Failed,
            ErrorReason::AgentUnavailable,
            other.to_string(),
        ),
    }
}

pub fn choose_error(err: &ChooseError) -> UnblockResult {
    match err {
        ChooseError::Card(e) => card_error(e),
        other => result(
            UnblockOutcome::Failed,
            ErrorReason::InvalidArgument,
            other.to_string(),
        ),
    }
}

/// What a refused or failed admin authentication (response, SO key or PUK) means.
/// `what` names the secret: "response", "PUK".
pub fn refused(verdict: Verdict, what: &str, admin: &str) -> UnblockResult {
    match verdict {
        Verdict::Accepted => result(
            UnblockOutcome::Failed,
            ErrorReason::Unspecified,
            "internal: accepted",
        ),
        Verdict::Refused { tries_left } => UnblockResult {
            admin_tries_left: Some(u32::from(tries_left)),
            ..result(
                UnblockOutcome::WrongResponse,
                ErrorReason::Unspecified,
                format!(
                    "the card refused the {what}: {tries_left} {} left before the {admin} is blocked for good",
                    if tries_left == 1 { "try" } else { "tries" }
                ),
            )
        },
        Verdict::Blocked => blocked(admin),
        Verdict::NoChallenge => result(
            UnblockOutcome::SessionLost,
            ErrorReason::CardSessionLost,
            "the card no longer holds the challenge: start again with a new challenge",
        ),
        Verdict::Other(sw) => result(
            UnblockOutcome::Failed,
            ErrorReason::Unspecified,
            format!("the card refused the {what} (status {sw})"),
        ),
    }
}

pub fn blocked(admin: &str) -> UnblockResult {
    UnblockResult {
        admin_tries_left: Some(0),
        ..result(
            UnblockOutcome::AdminBlocked,
            ErrorReason::CardNotActive,
            format!(
                "the card's {admin} is blocked: this card cannot be unblocked any more and must be replaced"
            ),
        )
    }
}
