//! The `minidriver` profile's commands (the table in cms-card's `minidriver` module): card id,
//! admin-key tries, GET CHALLENGE, EXTERNAL AUTHENTICATE and RESET RETRY COUNTER.

use cms_card::apdu::{Command, StatusWord};
use cms_card::backend::{CardError, CardTransaction};
use cms_card::iso7816::{CLA, PIN_REFERENCE, ins};
use cms_card::minidriver::{ADMIN_KEY_REFERENCE, CARD_ID_LEN, CARD_ID_P1P2, RESET_WITH_NEW_PIN};
use zeroize::Zeroizing;

use super::send;

/// What the card said to an authentication attempt (response, PIN or PUK).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accepted,
    /// Refused; this many tries are left (0: now blocked).
    Refused {
        tries_left: u8,
    },
    /// Blocked before or by this attempt.
    Blocked,
    /// The card holds no challenge (it died with a reset, a removal or another command).
    NoChallenge,
    /// Any other status word.
    Other(StatusWord),
}

pub(crate) fn verdict(sw: StatusWord) -> Verdict {
    if sw.is_ok() {
        Verdict::Accepted
    } else if sw.blocked() {
        Verdict::Blocked
    } else if let Some(tries) = sw.tries_left() {
        if tries == 0 {
            Verdict::Blocked
        } else {
            Verdict::Refused { tries_left: tries }
        }
    } else if sw == StatusWord::CONDITIONS_NOT_SATISFIED {
        Verdict::NoChallenge
    } else {
        Verdict::Other(sw)
    }
}

/// The 16-byte card identifier (GET DATA 01 00); `None` when the card has none.
pub fn card_id(tx: &mut dyn CardTransaction) -> Result<Option<Vec<u8>>, CardError> {
    let (p1, p2) = CARD_ID_P1P2;
    let r = send(
        tx,
        Command::new(CLA, ins::GET_DATA, p1, p2).with_le(CARD_ID_LEN),
    )?;
    Ok(r.is_ok().then(|| r.data.to_vec()))
}

/// Admin-key tries left: `Ok(Some(0))` when blocked, `None` when the card does not say.
pub fn admin_tries(tx: &mut dyn CardTransaction) -> Result<Option<u8>, CardError> {
    let r = send(
        tx,
        Command::new(CLA, ins::EXTERNAL_AUTHENTICATE, 0x00, ADMIN_KEY_REFERENCE),
    )?;
    Ok(match verdict(r.sw) {
        Verdict::Refused { tries_left } => Some(tries_left),
        Verdict::Blocked => Some(0),
        _ => None,
    })
}

/// User PIN tries left (VERIFY without data): `Some(0)` when blocked.
pub fn pin_tries(tx: &mut dyn CardTransaction) -> Result<Option<u8>, CardError> {
    let r = send(tx, Command::new(CLA, ins::VERIFY, 0x00, PIN_REFERENCE))?;
    Ok(match verdict(r.sw) {
        Verdict::Refused { tries_left } => Some(tries_left),
        Verdict::Blocked => Some(0),
        _ => None,
    })
}

/// GET CHALLENGE with Le 00: the card answers with its admin key's block length (8: 3DES,
/// 16: AES). The challenge is valid for the very next command only.
pub fn get_challenge(tx: &mut dyn CardTransaction) -> Result<Zeroizing<Vec<u8>>, CardError> {
    let mut r = send(tx, Command::new(CLA, ins::GET_CHALLENGE, 0, 0).with_le(256))?;
    if !r.is_ok() || !matches!(r.data.len(), 8 | 16) {
        return Err(CardError::Transport(format!(
            "the card gave no challenge (status {})",
            r.sw
        )));
    }
    Ok(r.take_data())
}

/// EXTERNAL AUTHENTICATE with the response to the challenge.
pub fn external_authenticate(
    tx: &mut dyn CardTransaction,
    response: &[u8],
) -> Result<Verdict, CardError> {
    let r = send(
        tx,
        Command::new(CLA, ins::EXTERNAL_AUTHENTICATE, 0x00, ADMIN_KEY_REFERENCE)
            .with_data(response.to_vec()),
    )?;
    Ok(verdict(r.sw))
}

/// RESET RETRY COUNTER with the new PIN (after a successful EXTERNAL AUTHENTICATE).
pub fn reset_pin(tx: &mut dyn CardTransaction, new_pin: &[u8]) -> Result<Verdict, CardError> {
    let r = send(
        tx,
        Command::new(
            CLA,
            ins::RESET_RETRY_COUNTER,
            RESET_WITH_NEW_PIN,
            PIN_REFERENCE,
        )
        .with_data(new_pin.to_vec()),
    )?;
    Ok(verdict(r.sw))
}
