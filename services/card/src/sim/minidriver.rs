//! The `minidriver` profile's commands (the APDU set is documented in [`crate::minidriver`]).

use cms_cardcrypto::verify_response;

use super::{Answer, Pending, Reference, VirtualCard};
use crate::apdu::{Command, Response, StatusWord};
use crate::iso7816::{PIN_REFERENCE, ins};
use crate::minidriver::{
    ADMIN_KEY_REFERENCE, CARD_ID_P1P2, MAX_PIN_LEN, MIN_PIN_LEN, RESET_WITH_NEW_PIN,
};

pub(super) fn handle(
    card: &mut VirtualCard,
    command: &Command,
    pending: Option<Pending>,
) -> Answer {
    match command.ins {
        // No applications: in particular not PIV, which is how an agent tells the profiles apart.
        ins::SELECT => Err(StatusWord::NOT_FOUND),
        ins::GET_DATA => get_data(card, command),
        ins::GET_CHALLENGE => get_challenge(card, command),
        ins::EXTERNAL_AUTHENTICATE => external_authenticate(card, command, pending),
        ins::RESET_RETRY_COUNTER => reset_retry_counter(card, command),
        ins::VERIFY => verify(card, command),
        ins::CHANGE_REFERENCE_DATA => change_reference_data(card, command),
        _ => Err(StatusWord::INS_NOT_SUPPORTED),
    }
}

fn pin_length_ok(pin: &[u8]) -> bool {
    (MIN_PIN_LEN..=MAX_PIN_LEN).contains(&pin.len())
}

fn get_data(card: &VirtualCard, command: &Command) -> Answer {
    if (command.p1, command.p2) != CARD_ID_P1P2 {
        return Err(StatusWord::NOT_FOUND);
    }
    Ok(Response::ok(card.state.card_id.clone()))
}

fn get_challenge(card: &mut VirtualCard, command: &Command) -> Answer {
    if (command.p1, command.p2) != (0, 0) || !command.data.is_empty() {
        return Err(StatusWord::WRONG_P1P2);
    }
    let block = card.admin_key().algorithm().block_len();
    match command.le {
        // Le absent or 00: the challenge of the admin key's length.
        None | Some(256) => {}
        Some(le) if le == block => {}
        Some(_) => return Err(StatusWord::wrong_le(block as u8)),
    }
    let challenge = card.random(block)?;
    let answer = Response::ok(challenge.to_vec());
    card.session.pending = Some(Pending::Challenge(challenge));
    Ok(answer)
}

fn external_authenticate(
    card: &mut VirtualCard,
    command: &Command,
    pending: Option<Pending>,
) -> Answer {
    if command.p1 != 0 || command.p2 != ADMIN_KEY_REFERENCE {
        return Err(StatusWord::REFERENCE_NOT_FOUND);
    }
    if command.data.is_empty() {
        // Status query: tries left, no try spent.
        return if card.session.admin_authenticated {
            Ok(Response::status(StatusWord::OK))
        } else {
            Err(card.tries_status(Reference::Admin))
        };
    }
    card.ensure_usable(Reference::Admin)?;
    let Some(Pending::Challenge(challenge)) = pending else {
        return Err(StatusWord::CONDITIONS_NOT_SATISFIED);
    };
    if command.data.len() != challenge.len() {
        // A response of the wrong size is a transport mistake, not a guess: no try spent.
        return Err(StatusWord::WRONG_LENGTH);
    }
    let matched = verify_response(card.admin_key(), &challenge, &command.data);
    card.record_attempt(Reference::Admin, matched)?;
    card.session.admin_authenticated = true;
    Ok(Response::status(StatusWord::OK))
}

fn reset_retry_counter(card: &mut VirtualCard, command: &Command) -> Answer {
    if command.p1 != RESET_WITH_NEW_PIN || command.p2 != PIN_REFERENCE {
        return Err(StatusWord::WRONG_P1P2);
    }
    if !card.session.admin_authenticated {
        return Err(StatusWord::SECURITY_STATUS_NOT_SATISFIED);
    }
    if !pin_length_ok(&command.data) {
        return Err(StatusWord::WRONG_DATA);
    }
    // One admin authentication allows one unblock.
    card.session.admin_authenticated = false;
    card.set_pin(&command.data)?;
    card.session.pin_verified = false;
    Ok(Response::status(StatusWord::OK))
}

fn verify(card: &mut VirtualCard, command: &Command) -> Answer {
    if command.p1 != 0 || command.p2 != PIN_REFERENCE {
        return Err(StatusWord::REFERENCE_NOT_FOUND);
    }
    if command.data.is_empty() {
        return if card.session.pin_verified {
            Ok(Response::status(StatusWord::OK))
        } else {
            Err(card.tries_status(Reference::Pin))
        };
    }
    card.check_secret(Reference::Pin, &command.data)?;
    Ok(Response::status(StatusWord::OK))
}

fn change_reference_data(card: &mut VirtualCard, command: &Command) -> Answer {
    if command.p1 != 0 || command.p2 != PIN_REFERENCE {
        return Err(StatusWord::WRONG_P1P2);
    }
    // ISO 7816-4: old reference data then new; the card knows where its own PIN ends.
    let split = card.state.pin.len();
    if command.data.len() <= split {
        // Too short to hold the old PIN and a new one: a wrong PIN, and it costs a try like one.
        card.check_secret(Reference::Pin, &command.data)?;
        return Err(StatusWord::WRONG_DATA);
    }
    let (old, new) = command.data.split_at(split);
    if !pin_length_ok(new) {
        return Err(StatusWord::WRONG_DATA);
    }
    card.check_secret(Reference::Pin, old)?;
    card.set_pin(new)?;
    Ok(Response::status(StatusWord::OK))
}
