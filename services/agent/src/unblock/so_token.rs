//! The System Owner token: its unblock key is typed (groups and checksum), the cryptogram is
//! computed here with cms-cardcrypto, and the PIN is reset in one card transaction. No server
//! takes part, so this works while the whole CMS is down.

use cms_cardcrypto::KeyAlgorithm;
use cms_proto::agent::v1::{UnblockResult, UnblockSoTokenRequest};
use cms_proto::common::v1::KeyAlgorithm as ProtoAlgorithm;
use cms_proto::template::v1::PinPolicy;

use super::outcome::{card_error, choose_error, result};
use super::{codes, pin};
use crate::card::minidriver;
use crate::card::profile::{Profile, detect};
use crate::card::readers::{Readers, Sharing, choose};
use crate::unblock::session::check_card;

fn algorithm(value: i32) -> Option<KeyAlgorithm> {
    match ProtoAlgorithm::try_from(value).ok()? {
        ProtoAlgorithm::Tdes2key => Some(KeyAlgorithm::Tdes2Key),
        ProtoAlgorithm::Tdes3key => Some(KeyAlgorithm::Tdes3Key),
        ProtoAlgorithm::Aes128 => Some(KeyAlgorithm::Aes128),
        ProtoAlgorithm::Aes192 => Some(KeyAlgorithm::Aes192),
        ProtoAlgorithm::Aes256 => Some(KeyAlgorithm::Aes256),
        ProtoAlgorithm::Unspecified => None,
    }
}

/// Runs the whole flow (blocking).
pub fn unblock(
    readers: &dyn Readers,
    request: &UnblockSoTokenRequest,
    configured: Option<&PinPolicy>,
) -> UnblockResult {
    let algorithm = algorithm(request.algorithm);
    // With the algorithm named, the key and its KCV are checked before any card access.
    if let Some(a) = algorithm {
        match codes::so_key(request.so_unblock_key.as_ref(), Some(a), a.block_len()) {
            Ok(key) => {
                if let Err(r) = codes::check_kcv(&key, &request.expected_kcv) {
                    return r;
                }
            }
            Err(r) => return r,
        }
    }
    let policy = pin::in_force(request.pin_policy.as_ref(), configured);
    if let Err(r) = pin::check(&request.new_pin, policy, Profile::Minidriver) {
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
    if let Err(e) = check_card(&facts, &[]) {
        return result(
            cms_proto::agent::v1::UnblockOutcome::Unsupported,
            cms_proto::common::v1::ErrorReason::FlowNotAllowed,
            e.to_string(),
        );
    }
    let challenge = match minidriver::get_challenge(&mut *tx) {
        Ok(c) => c,
        Err(e) => return card_error(&e),
    };
    // Nothing but EXTERNAL AUTHENTICATE may follow GET CHALLENGE: the key is parsed and
    // checked in memory only.
    let key = match codes::so_key(request.so_unblock_key.as_ref(), algorithm, challenge.len()) {
        Ok(k) => k,
        Err(r) => return r,
    };
    if let Err(r) = codes::check_kcv(&key, &request.expected_kcv) {
        return r;
    }
    let cryptogram = match cms_cardcrypto::so_cryptogram(&key, &challenge) {
        Ok(c) => c,
        Err(e) => {
            return result(
                cms_proto::agent::v1::UnblockOutcome::Failed,
                cms_proto::common::v1::ErrorReason::InvalidArgument,
                e.to_string(),
            );
        }
    };
    super::authenticate_and_reset(
        &mut *tx,
        &cryptogram,
        request.new_pin.as_bytes(),
        "admin key",
    )
}
