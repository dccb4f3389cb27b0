//! The `piv` profile's commands: SP 800-73-4 card commands and the YubiKey extensions that
//! yubico-piv-tool sends (GET VERSION, GET SERIAL, GET METADATA, SET MANAGEMENT KEY).

use cms_cardcrypto::primitives::ct_eq;
use cms_cardcrypto::{KeyAlgorithm, SecretKey, response as encrypt_challenge};

use super::{Answer, Pending, Reference, VirtualCard, state};
use crate::apdu::{Command, Response, StatusWord};
use crate::iso7816::{SELECT_BY_NAME, ins};
use crate::piv::{
    AID, AID_RID_PIX, algorithm, auth, find, key_ref, object, push_tlv, tlv, tlvs, unpad_pin,
    yubikey,
};

/// The firmware version this card reports: 5.4.3 (AES management keys and GET METADATA exist).
pub const VERSION: [u8; 3] = [5, 4, 3];

/// A FASC-N for a card outside the US federal PKI (all-zero agency, as YubiKeys use).
const FASCN: [u8; 25] = [
    0xD4, 0xE7, 0x39, 0xDA, 0x73, 0x9C, 0xED, 0x39, 0xCE, 0x73, 0x9D, 0x83, 0x68, 0x58, 0x21, 0x08,
    0x42, 0x10, 0x84, 0x21, 0xC8, 0x42, 0x10, 0xC3, 0xEB,
];

pub(super) fn handle(
    card: &mut VirtualCard,
    command: &Command,
    pending: Option<Pending>,
) -> Answer {
    match command.ins {
        ins::SELECT => select(command),
        ins::GET_DATA_BER => get_data(card, command),
        ins::PUT_DATA_BER => put_data(card, command),
        ins::VERIFY => verify(card, command),
        ins::CHANGE_REFERENCE_DATA => change_reference_data(card, command),
        ins::RESET_RETRY_COUNTER => reset_retry_counter(card, command),
        ins::GENERAL_AUTHENTICATE => general_authenticate(card, command, pending),
        yubikey::INS_GET_VERSION => Ok(Response::ok(VERSION.to_vec())),
        yubikey::INS_GET_SERIAL => Ok(Response::ok(card.state.serial.to_be_bytes().to_vec())),
        yubikey::INS_GET_METADATA => metadata(card, command),
        yubikey::INS_SET_MGMKEY => set_management_key(card, command),
        _ => Err(StatusWord::INS_NOT_SUPPORTED),
    }
}

/// The algorithm identifier of a management key.
fn algorithm_id(key: KeyAlgorithm) -> u8 {
    match key {
        KeyAlgorithm::Tdes2Key | KeyAlgorithm::Tdes3Key => algorithm::TDES,
        KeyAlgorithm::Aes128 => algorithm::AES128,
        KeyAlgorithm::Aes192 => algorithm::AES192,
        KeyAlgorithm::Aes256 => algorithm::AES256,
    }
}

fn key_algorithm(id: u8) -> Option<KeyAlgorithm> {
    match id {
        algorithm::TDES => Some(KeyAlgorithm::Tdes3Key),
        algorithm::AES128 => Some(KeyAlgorithm::Aes128),
        algorithm::AES192 => Some(KeyAlgorithm::Aes192),
        algorithm::AES256 => Some(KeyAlgorithm::Aes256),
        _ => None,
    }
}

fn select(command: &Command) -> Answer {
    let aid = &command.data[..];
    if command.p1 != SELECT_BY_NAME || aid.len() < AID_RID_PIX.len() || !AID.starts_with(aid) {
        return Err(StatusWord::NOT_FOUND);
    }
    // Application property template: PIX, allocation authority, supported algorithms.
    let mut body = Vec::new();
    push_tlv(&mut body, &[0x4F], &AID[5..]);
    push_tlv(&mut body, &[0x79], &tlv(&[0x4F], &AID_RID_PIX));
    push_tlv(&mut body, &[0x50], b"CMS virtual PIV");
    let mut algorithms = Vec::new();
    for id in [
        algorithm::TDES,
        algorithm::AES128,
        algorithm::AES192,
        algorithm::AES256,
    ] {
        push_tlv(&mut algorithms, &[0x80], &[id]);
    }
    push_tlv(&mut algorithms, &[0x06], &[0x00]);
    push_tlv(&mut body, &[0xAC], &algorithms);
    Ok(Response::ok(tlv(&[0x61], &body)))
}

/// The object generated from the card state when nothing was written over it.
fn builtin_object(card: &VirtualCard, tag: &[u8]) -> Option<Vec<u8>> {
    if tag == object::CHUID {
        let mut chuid = Vec::new();
        push_tlv(&mut chuid, &[object::CHUID_FASCN], &FASCN);
        push_tlv(&mut chuid, &[object::CHUID_GUID], &card.state.card_id);
        push_tlv(&mut chuid, &[object::CHUID_EXPIRY], b"20991231");
        push_tlv(&mut chuid, &[object::CHUID_SIGNATURE], &[]);
        push_tlv(&mut chuid, &[object::LRC], &[]);
        Some(tlv(&[object::DATA], &chuid))
    } else if tag == object::CCC {
        // Card identifier: GSC-RID, manufacturer FF, card type 02 (Java card), then 14 bytes of
        // card id; versions 2.1; data model 0x10 (PIV).
        let mut id = vec![0xA0, 0x00, 0x00, 0x01, 0x16, 0xFF, 0x02];
        id.extend_from_slice(&card.state.card_id[..14]);
        let mut ccc = Vec::new();
        push_tlv(&mut ccc, &[0xF0], &id);
        push_tlv(&mut ccc, &[0xF1], &[0x21]);
        push_tlv(&mut ccc, &[0xF2], &[0x21]);
        push_tlv(&mut ccc, &[0xF3], &[]);
        push_tlv(&mut ccc, &[0xF4], &[0x00]);
        push_tlv(&mut ccc, &[0xF5], &[0x10]);
        for tag in [0xF6, 0xF7, 0xFA, 0xFB, 0xFC, 0xFD, object::LRC] {
            push_tlv(&mut ccc, &[tag], &[]);
        }
        Some(tlv(&[object::DATA], &ccc))
    } else if tag == object::DISCOVERY {
        // The PIV AID and the PIN usage policy: PIV PIN only, PIV PIN preferred.
        let mut discovery = Vec::new();
        push_tlv(&mut discovery, &[0x4F], &AID);
        push_tlv(&mut discovery, &[0x5F, 0x2F], &[0x40, 0x10]);
        Some(tlv(object::DISCOVERY, &discovery))
    } else {
        None
    }
}

/// The tag named by a GET DATA / PUT DATA `5C` list.
fn requested_tag(data: &[u8]) -> Result<(&[u8], &[u8]), StatusWord> {
    let (item, rest) = crate::piv::read_tlv(data).map_err(|_| StatusWord::WRONG_DATA)?;
    if item.tag != [object::TAG_LIST] || item.value.is_empty() || item.value.len() > 3 {
        return Err(StatusWord::WRONG_DATA);
    }
    Ok((item.value, rest))
}

fn get_data(card: &VirtualCard, command: &Command) -> Answer {
    if (command.p1, command.p2) != (0x3F, 0xFF) {
        return Err(StatusWord::WRONG_P1P2);
    }
    let (tag, rest) = requested_tag(&command.data)?;
    if !rest.is_empty() {
        return Err(StatusWord::WRONG_DATA);
    }
    let object = match card.state.objects.get(tag) {
        Some(stored) => stored.clone(),
        None => builtin_object(card, tag).ok_or(StatusWord::NOT_FOUND)?,
    };
    Ok(Response::ok(object))
}

fn put_data(card: &mut VirtualCard, command: &Command) -> Answer {
    if (command.p1, command.p2) != (0x3F, 0xFF) {
        return Err(StatusWord::WRONG_P1P2);
    }
    if !card.session.admin_authenticated {
        return Err(StatusWord::SECURITY_STATUS_NOT_SATISFIED);
    }
    let (tag, value) = requested_tag(&command.data)?;
    if tag == object::DISCOVERY {
        return Err(StatusWord::SECURITY_STATUS_NOT_SATISFIED);
    }
    let (item, rest) = crate::piv::read_tlv(value).map_err(|_| StatusWord::WRONG_DATA)?;
    if item.tag != [object::DATA] || !rest.is_empty() {
        return Err(StatusWord::WRONG_DATA);
    }
    if item.value.is_empty() {
        card.state.objects.remove(tag);
    } else {
        card.state.objects.insert(tag.to_vec(), value.to_vec());
    }
    card.persist()?;
    Ok(Response::status(StatusWord::OK))
}

/// A PIN or PUK field of 8 bytes, 0xFF-padded; the value must be 6 to 8 bytes.
fn padded_value(field: &[u8]) -> Result<&[u8], StatusWord> {
    let value = unpad_pin(field);
    if field.len() != 8 || !(6..=8).contains(&value.len()) {
        return Err(StatusWord::WRONG_DATA);
    }
    Ok(value)
}

fn reference(p2: u8) -> Result<Reference, StatusWord> {
    match p2 {
        key_ref::PIN => Ok(Reference::Pin),
        key_ref::PUK => Ok(Reference::Puk),
        _ => Err(StatusWord::REFERENCE_NOT_FOUND),
    }
}

fn verify(card: &mut VirtualCard, command: &Command) -> Answer {
    if command.p2 != key_ref::PIN {
        return Err(StatusWord::REFERENCE_NOT_FOUND);
    }
    match command.p1 {
        // SP 800-73-4: P1 = FF resets the PIN's security status.
        0xFF if command.data.is_empty() => {
            card.session.pin_verified = false;
            return Ok(Response::status(StatusWord::OK));
        }
        0x00 => {}
        _ => return Err(StatusWord::WRONG_P1P2),
    }
    if command.data.is_empty() {
        return if card.session.pin_verified {
            Ok(Response::status(StatusWord::OK))
        } else {
            Err(card.tries_status(Reference::Pin))
        };
    }
    if command.data.len() != 8 {
        return Err(StatusWord::WRONG_DATA);
    }
    // A badly padded PIN is a wrong PIN: the card compares what it was given.
    card.check_secret(Reference::Pin, unpad_pin(&command.data))?;
    Ok(Response::status(StatusWord::OK))
}

fn change_reference_data(card: &mut VirtualCard, command: &Command) -> Answer {
    let reference = reference(command.p2)?;
    if command.p1 != 0 || command.data.len() != 16 {
        return Err(StatusWord::WRONG_DATA);
    }
    let (old, new) = command.data.split_at(8);
    let new = padded_value(new)?;
    card.check_secret(reference, unpad_pin(old))?;
    match reference {
        Reference::Pin => card.set_pin(new)?,
        _ => {
            card.state.puk = Some(zeroize::Zeroizing::new(new.to_vec()));
            card.state.puk_tries = state::PUK_TRIES;
            card.persist()?;
        }
    }
    Ok(Response::status(StatusWord::OK))
}

fn reset_retry_counter(card: &mut VirtualCard, command: &Command) -> Answer {
    if command.p1 != 0 || command.p2 != key_ref::PIN {
        return Err(StatusWord::WRONG_P1P2);
    }
    if command.data.len() != 16 {
        return Err(StatusWord::WRONG_DATA);
    }
    let (puk, new_pin) = command.data.split_at(8);
    let new_pin = padded_value(new_pin)?;
    card.check_secret(Reference::Puk, unpad_pin(puk))?;
    card.set_pin(new_pin)?;
    Ok(Response::status(StatusWord::OK))
}

/// GENERAL AUTHENTICATE with the 9B management key, both SP 800-73-4 variants:
/// * mutual (yubico-piv-tool): `80 00` asks for a witness, the card answers `80 E_K(R)`; the host
///   sends `80 R' 81 C`, the card checks R' = R and answers `82 E_K(C)`;
/// * external (OpenSC `piv-tool -A A:9B:..`): `81 00` asks for a challenge C; the host sends
///   `82 E_K(C)`.
fn general_authenticate(
    card: &mut VirtualCard,
    command: &Command,
    pending: Option<Pending>,
) -> Answer {
    if command.p2 != key_ref::MANAGEMENT {
        return Err(StatusWord::REFERENCE_NOT_FOUND);
    }
    let key_algorithm = card.admin_key().algorithm();
    if algorithm_id(key_algorithm) != command.p1 {
        return Err(StatusWord::WRONG_P1P2);
    }
    card.ensure_usable(Reference::Admin)?;
    let template = find(&command.data, &[auth::TEMPLATE])
        .map_err(|_| StatusWord::WRONG_DATA)?
        .ok_or(StatusWord::WRONG_DATA)?;
    let (mut witness, mut challenge, mut response) = (None, None, None);
    for item in tlvs(template) {
        let item = item.map_err(|_| StatusWord::WRONG_DATA)?;
        match item.tag {
            [auth::WITNESS] => witness = Some(item.value),
            [auth::CHALLENGE] => challenge = Some(item.value),
            [auth::RESPONSE] => response = Some(item.value),
            _ => return Err(StatusWord::WRONG_DATA),
        }
    }
    let block = key_algorithm.block_len();
    match (witness, challenge, response) {
        // Step 1 of mutual: a witness, E_K(R), for the host to decrypt.
        (Some([]), None, None | Some([])) => {
            let plain = card.random(block)?;
            let encrypted = encrypt(card.admin_key(), &plain)?;
            card.session.pending = Some(Pending::Witness(plain));
            Ok(Response::ok(tlv(
                &[auth::TEMPLATE],
                &tlv(&[auth::WITNESS], &encrypted),
            )))
        }
        // Step 2 of mutual: the decrypted witness and the host's challenge.
        (Some(decrypted), Some(host_challenge), None | Some([])) => {
            let Some(Pending::Witness(plain)) = pending else {
                return Err(StatusWord::CONDITIONS_NOT_SATISFIED);
            };
            if decrypted.len() != block || host_challenge.len() != block {
                return Err(StatusWord::WRONG_DATA);
            }
            card.record_attempt(Reference::Admin, ct_eq(&plain, decrypted))?;
            card.session.admin_authenticated = true;
            let answer = encrypt(card.admin_key(), host_challenge)?;
            Ok(Response::ok(tlv(
                &[auth::TEMPLATE],
                &tlv(&[auth::RESPONSE], &answer),
            )))
        }
        // Step 1 of external: a challenge in clear.
        (None, Some([]), None | Some([])) => {
            let plain = card.random(block)?;
            let answer = tlv(&[auth::TEMPLATE], &tlv(&[auth::CHALLENGE], &plain));
            card.session.pending = Some(Pending::Challenge(plain));
            Ok(Response::ok(answer))
        }
        // Step 2 of external: E_K(challenge).
        (None, None, Some(host_response)) if !host_response.is_empty() => {
            let Some(Pending::Challenge(plain)) = pending else {
                return Err(StatusWord::CONDITIONS_NOT_SATISFIED);
            };
            if host_response.len() != block {
                return Err(StatusWord::WRONG_DATA);
            }
            let matched = cms_cardcrypto::verify_response(card.admin_key(), &plain, host_response);
            card.record_attempt(Reference::Admin, matched)?;
            card.session.admin_authenticated = true;
            Ok(Response::status(StatusWord::OK))
        }
        _ => Err(StatusWord::WRONG_DATA),
    }
}

fn encrypt(key: &SecretKey, block: &[u8]) -> Result<Vec<u8>, StatusWord> {
    encrypt_challenge(key, block)
        .map(|out| out.to_vec())
        .map_err(|_| StatusWord::WRONG_DATA)
}

/// YubiKey GET METADATA for the PIN, the PUK and the management key.
fn metadata(card: &VirtualCard, command: &Command) -> Answer {
    let mut out = Vec::new();
    match command.p2 {
        key_ref::MANAGEMENT => {
            let key = card.admin_key();
            push_tlv(
                &mut out,
                &[yubikey::METADATA_ALGORITHM],
                &[algorithm_id(key.algorithm())],
            );
            // PIN policy: never; touch policy: never.
            push_tlv(&mut out, &[yubikey::METADATA_POLICY], &[0x01, 0x01]);
            let default = key.algorithm() == KeyAlgorithm::Tdes3Key
                && ct_eq(key.expose_bytes(), &state::DEFAULT_MANAGEMENT_KEY);
            push_tlv(
                &mut out,
                &[yubikey::METADATA_IS_DEFAULT],
                &[u8::from(default)],
            );
        }
        p2 => {
            let reference = reference(p2)?;
            let (value, tries, max, factory): (&[u8], u8, u8, &[u8]) = match reference {
                Reference::Pin => (
                    &card.state.pin,
                    card.state.pin_tries,
                    state::PIN_TRIES,
                    state::DEFAULT_PIV_PIN,
                ),
                _ => (
                    card.state.puk.as_deref().map_or(&[][..], |p| &p[..]),
                    card.state.puk_tries,
                    state::PUK_TRIES,
                    state::DEFAULT_PIV_PUK,
                ),
            };
            push_tlv(&mut out, &[yubikey::METADATA_ALGORITHM], &[0xFF]);
            push_tlv(&mut out, &[yubikey::METADATA_POLICY], &[0x00, 0x00]);
            push_tlv(
                &mut out,
                &[yubikey::METADATA_IS_DEFAULT],
                &[u8::from(ct_eq(value, factory))],
            );
            push_tlv(&mut out, &[yubikey::METADATA_RETRIES], &[max, tries]);
        }
    }
    Ok(Response::ok(out))
}

/// YubiKey SET MANAGEMENT KEY: `FF FF` (or `FF FE`, touch), data = algorithm, 9B, length, key.
fn set_management_key(card: &mut VirtualCard, command: &Command) -> Answer {
    if command.p1 != 0xFF || !matches!(command.p2, 0xFF | 0xFE) {
        return Err(StatusWord::WRONG_P1P2);
    }
    if !card.session.admin_authenticated {
        return Err(StatusWord::SECURITY_STATUS_NOT_SATISFIED);
    }
    let [id, key_reference, length, key @ ..] = &command.data[..] else {
        return Err(StatusWord::WRONG_DATA);
    };
    let algorithm = key_algorithm(*id).ok_or(StatusWord::WRONG_DATA)?;
    if *key_reference != key_ref::MANAGEMENT
        || usize::from(*length) != key.len()
        || key.len() != algorithm.key_len()
    {
        return Err(StatusWord::WRONG_DATA);
    }
    card.state.admin_key = SecretKey::new(algorithm, key).map_err(|_| StatusWord::WRONG_DATA)?;
    card.state.admin_tries = state::ADMIN_TRIES;
    card.persist()?;
    Ok(Response::status(StatusWord::OK))
}
