//! The demo's virtual cards: card files personalised with their admin key and a blocked PIN,
//! read by the agent's card code through the in-process transport (no pcscd needed).

use std::path::Path;

use cms_card::apdu::Command;
use cms_card::iso7816::{CLA, PIN_REFERENCE, ins};
use cms_card::sim::state::{ADMIN_TRIES, CardState, Profile};
use cms_card::sim::{SimReader, VirtualCard};
use cms_cardcrypto::SecretKey;
use zeroize::Zeroizing;

use super::DemoError;

/// The PIN a demo card had before the user forgot it (blocked: no tries left).
const FORGOTTEN_PIN: &[u8] = b"forgotten-1";

/// Writes a minidriver card file: `admin_key`, the identifier `card_id`, and a blocked PIN.
pub fn write_blocked_card(
    path: &Path,
    card_id: &[u8],
    serial: u32,
    admin_key: SecretKey,
) -> Result<(), DemoError> {
    let state = CardState {
        profile: Profile::Minidriver,
        card_id: card_id.to_vec(),
        serial,
        admin_key,
        admin_tries: ADMIN_TRIES,
        pin: Zeroizing::new(FORGOTTEN_PIN.to_vec()),
        pin_tries: 0,
        puk: None,
        puk_tries: 0,
        objects: Default::default(),
    };
    state
        .save(path)
        .map_err(|e| DemoError::Failed(e.to_string()))
}

/// The card of `path` in a simulated reader; it rewrites its file on every change.
pub fn insert(path: &Path) -> Result<SimReader, DemoError> {
    let card = VirtualCard::open(path).map_err(|e| DemoError::Failed(e.to_string()))?;
    Ok(SimReader::new(card))
}

/// VERIFY of the user PIN, answered by the card itself: true when `pin` is the card's PIN.
pub fn pin_verifies(reader: &SimReader, pin: &[u8]) -> bool {
    reader.with_card(|card| {
        card.process(&Command::new(CLA, ins::VERIFY, 0x00, PIN_REFERENCE).with_data(pin.to_vec()))
            .is_ok()
    })
}
